//! Starts the `berth` binary on an ephemeral port in a temp dir and stops it by PID.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `berth serve` child process with its own data directory.
pub struct BerthProcess {
    child: Option<Child>,
    /// `127.0.0.1:PORT` of the first listener.
    pub addr: String,
    /// `127.0.0.1:PORT` of the first TLS listener, if any.
    pub tls_addr: Option<String>,
    /// Directory holding `config.toml` and `data/`.
    pub dir: PathBuf,
}

impl BerthProcess {
    /// Starts berth with `extra_toml` appended to a config that sets the data dir and one listener.
    /// A `data/` dir already present in `dir` is reused (restart after a crash).
    pub fn start_in(dir: &Path, extra_toml: &str) -> BerthProcess {
        BerthProcess::start_logging(dir, extra_toml, true)
    }

    /// As [`BerthProcess::start_in`], without `RUST_LOG` (the config's `log` filter decides,
    /// and a reload may change it).
    pub fn start_config_logging(dir: &Path, extra_toml: &str) -> BerthProcess {
        BerthProcess::start_logging(dir, extra_toml, false)
    }

    fn start_logging(dir: &Path, extra_toml: &str, rust_log: bool) -> BerthProcess {
        BerthProcess::start_as(dir, extra_toml, rust_log, "127.0.0.1:0", &[])
    }

    /// Starts berth listening on `listen` through `wrapper` (`ip netns exec NS`: berth in a
    /// network namespace of its own).
    pub fn start_wrapped(
        dir: &Path,
        extra_toml: &str,
        listen: &str,
        wrapper: &[&str],
    ) -> BerthProcess {
        BerthProcess::start_as(dir, extra_toml, true, listen, wrapper)
    }

    fn start_as(
        dir: &Path,
        extra_toml: &str,
        rust_log: bool,
        listen: &str,
        wrapper: &[&str],
    ) -> BerthProcess {
        let config = format!(
            "data_dir = {:?}\nshutdown_grace = \"5s\"\n[[listen]]\naddr = \"{listen}\"\n{}\n",
            dir.join("data"),
            extra_toml
        );
        let config_path = dir.join("config.toml");
        std::fs::write(&config_path, config).unwrap();
        let bin = berth_bin();
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        command.arg("serve").arg("--config").arg(&config_path);
        if rust_log {
            command.env(
                "RUST_LOG",
                std::env::var("BERTH_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            );
        } else {
            command.env_remove("RUST_LOG");
        }
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn berth");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let (mut addr, mut tls) = (None, None);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.strip_prefix("berth listening on http://") {
                    addr.get_or_insert_with(|| rest.trim().to_string());
                }
                if let Some(rest) = line.strip_prefix("berth listening on https://") {
                    tls.get_or_insert_with(|| rest.trim().to_string());
                }
                if line.trim() == "berth ready" {
                    let _ = tx.send((addr.take(), tls.take()));
                }
            }
        });
        let (addr, tls_addr) = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("berth did not print `berth ready` within 30 s");
        let addr = addr.expect("berth printed no plain-http listener");
        BerthProcess {
            child: Some(child),
            addr,
            tls_addr,
            dir: dir.to_path_buf(),
        }
    }

    /// Base URL, e.g. `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// PID of the child.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// SIGKILL: the crash case.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends SIGHUP (reload) without waiting.
    pub fn signal_hup(&self) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .arg("-HUP")
                .arg(c.id().to_string())
                .status();
        }
    }

    /// Sends SIGTERM without waiting.
    pub fn signal_term(&self) {
        if let Some(c) = &self.child {
            sigterm(c.id());
        }
    }

    /// SIGTERM and wait (with a deadline) for a clean exit; returns the exit status success.
    pub fn terminate(&mut self) -> bool {
        self.signal_term();
        self.wait_exit(Duration::from_secs(20))
    }

    /// Waits for the process to exit; true if it exited with success within `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> bool {
        let Some(mut c) = self.child.take() else {
            return false;
        };
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                return status.success();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn sigterm(pid: u32) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status();
}

impl Drop for BerthProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs the `berth` command with `args` and `env`, never with the caller's own
/// BERTH_ACCESS_KEY / BERTH_SECRET_KEY; (success, stdout, stderr).
pub fn run_berth(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let out = Command::new(berth_bin())
        .env_remove("BERTH_ACCESS_KEY")
        .env_remove("BERTH_SECRET_KEY")
        .envs(env.iter().copied())
        .args(args)
        .output()
        .expect("run berth");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The `berth` binary the tests run: `BERTH_TEST_BIN` when set, else cargo's build of this
/// package. The override exists because worktrees sharing one target directory overwrite each
/// other's `target/debug/berth`; point it at the hashed `target/debug/deps/berth-*` of this build.
pub fn berth_bin() -> String {
    std::env::var("BERTH_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_berth").to_string())
}
