//! Real registry clients for integration tests: skopeo, a private dockerd, a private containerd
//! (and Debian's `docker-registry` as a reference peer).
//!
//! Every helper returns the command's stdout and panics with the command line, exit status,
//! stdout and the full stderr when the command fails (or exceeds its deadline). A missing tool
//! is a panic that names the Debian package to install: tests fail, they never skip.
//!
//! Daemons run as described in `/work/shared/TESTING.md`: each gets its own root/state/socket
//! dirs under a temp dir, proxies pointing at `127.0.0.1:9` so a fallback to Docker Hub fails
//! at once on loopback, readiness is polled with a deadline, and Drop stops them by PID.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tempfile::TempDir;

pub const SKOPEO: &str = "/usr/bin/skopeo";
/// Debian's docker client (`/usr/local/bin/docker` may be another build: don't use `PATH`).
pub const DOCKER: &str = "/usr/bin/docker";
pub const DOCKERD: &str = "/usr/sbin/dockerd";
pub const CONTAINERD: &str = "/usr/bin/containerd";
pub const CTR: &str = "/usr/bin/ctr";
pub const RUNC: &str = "/usr/sbin/runc";
pub const DOCKER_REGISTRY: &str = "/usr/bin/docker-registry";

/// Default deadline for one client command.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
/// Deadline for a daemon to become ready.
const DAEMON_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Deadline for a daemon to exit after SIGTERM before it gets SIGKILL.
const DAEMON_STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// Debian package that provides `program`.
fn package_of(program: &str) -> &'static str {
    match Path::new(program)
        .file_name()
        .and_then(|f| f.to_str())
        .unwrap_or("")
    {
        "skopeo" => "skopeo",
        "docker" | "dockerd" => "docker.io",
        "containerd" | "ctr" | "containerd-shim-runc-v2" => "containerd",
        "runc" => "runc",
        "busybox" => "busybox-static",
        "docker-registry" => "docker-registry",
        _ => "(unknown)",
    }
}

/// Panics unless `program` exists, naming the Debian package to install.
pub fn require_tool(program: &str) {
    if program.contains('/') && !Path::new(program).exists() {
        panic!(
            "required tool {program} is missing: install Debian package `{}` \
             (apt-get update && apt-get install -y skopeo docker.io containerd runc busybox-static docker-registry)",
            package_of(program)
        );
    }
}

/// Environment that keeps a client or daemon on loopback: any proxied request goes to the
/// closed port 127.0.0.1:9 and fails at once; loopback itself is not proxied.
pub fn loopback_proxy_env(cmd: &mut Command) -> &mut Command {
    for (k, v) in [
        ("HTTPS_PROXY", "http://127.0.0.1:9"),
        ("HTTP_PROXY", "http://127.0.0.1:9"),
        ("https_proxy", "http://127.0.0.1:9"),
        ("http_proxy", "http://127.0.0.1:9"),
        ("NO_PROXY", "127.0.0.1,localhost,::1"),
        ("no_proxy", "127.0.0.1,localhost,::1"),
    ] {
        cmd.env(k, v);
    }
    cmd
}

/// Captured result of a finished command.
#[derive(Debug)]
pub struct CmdOutput {
    pub command: String,
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl CmdOutput {
    pub fn success(&self) -> bool {
        self.status.success()
    }
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    pub fn stderr_str(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
    /// Panics with everything unless the command succeeded; returns stdout.
    pub fn expect_success(self) -> String {
        if !self.success() {
            panic!("{}", self.describe("failed"));
        }
        self.stdout_str()
    }
    /// Panics unless the command failed; returns stderr.
    pub fn expect_failure(self) -> String {
        if self.success() {
            panic!("{}", self.describe("succeeded but was expected to fail"));
        }
        self.stderr_str()
    }
    fn describe(&self, what: &str) -> String {
        format!(
            "command {what}: {}\nstatus: {}\n--- stdout ---\n{}\n--- stderr ---\n{}\n--- end ---",
            self.command,
            self.status,
            self.stdout_str(),
            self.stderr_str()
        )
    }
}

fn describe_command(cmd: &Command) -> String {
    let mut s = String::new();
    for (k, v) in cmd.get_envs() {
        if let (Some(k), Some(v)) = (k.to_str(), v.and_then(|v| v.to_str())) {
            if k.starts_with("DOCKER_") || k.starts_with("REGISTRY_") {
                s.push_str(&format!("{k}={v} "));
            }
        }
    }
    s.push_str(&cmd.get_program().to_string_lossy());
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd` to completion (stdin closed) with a deadline; never panics on a non-zero exit.
/// Panics if the program is missing or the deadline passes (the child is killed).
pub fn exec(cmd: &mut Command, timeout: Duration) -> CmdOutput {
    let command = describe_command(cmd);
    let program = cmd.get_program().to_string_lossy().into_owned();
    require_tool(&program);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {command}: {e}"));
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stdout = out_t.join().unwrap_or_default();
            let stderr = err_t.join().unwrap_or_default();
            panic!(
                "command timed out after {timeout:?}: {command}\n--- stdout ---\n{}\n--- stderr ---\n{}\n--- end ---",
                String::from_utf8_lossy(&stdout),
                String::from_utf8_lossy(&stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    CmdOutput {
        command,
        status,
        stdout: out_t.join().unwrap(),
        stderr: err_t.join().unwrap(),
    }
}

/// Runs `cmd`, panics with its full stderr on failure, returns stdout.
pub fn run(cmd: &mut Command) -> String {
    exec(cmd, COMMAND_TIMEOUT).expect_success()
}

// ---------------------------------------------------------------------------------------------
// skopeo
// ---------------------------------------------------------------------------------------------

/// `skopeo --insecure-policy ARGS` (no `/etc/containers/policy.json` needed), on loopback.
pub fn skopeo_command(args: &[&str]) -> Command {
    let mut cmd = Command::new(SKOPEO);
    loopback_proxy_env(&mut cmd);
    cmd.arg("--insecure-policy").args(args);
    cmd
}

/// Runs skopeo without judging the exit status.
pub fn try_skopeo(args: &[&str]) -> CmdOutput {
    exec(&mut skopeo_command(args), COMMAND_TIMEOUT)
}

/// Runs skopeo; panics with stderr on failure; returns stdout.
pub fn skopeo(args: &[&str]) -> String {
    try_skopeo(args).expect_success()
}

/// `skopeo copy` between any two transports, plain HTTP allowed on both sides.
pub fn skopeo_copy(src: &str, dst: &str, extra: &[&str]) -> String {
    let mut args = vec!["copy", "--src-tls-verify=false", "--dest-tls-verify=false"];
    args.extend_from_slice(extra);
    args.push(src);
    args.push(dst);
    skopeo(&args)
}

/// `skopeo inspect --raw IMAGE`: the exact manifest bytes the registry serves.
pub fn skopeo_inspect_raw(image: &str) -> Vec<u8> {
    let out = try_skopeo(&["inspect", "--tls-verify=false", "--raw", image]);
    if !out.success() {
        panic!("{}", out.describe("failed"));
    }
    out.stdout
}

/// `skopeo inspect --tls-verify=false ARGS... IMAGE`, without judging the exit status.
pub fn try_skopeo_inspect(image: &str, extra: &[&str]) -> CmdOutput {
    let mut args = vec!["inspect", "--tls-verify=false"];
    args.extend_from_slice(extra);
    args.push(image);
    try_skopeo(&args)
}

/// `skopeo list-tags docker://REPO`: the tags.
pub fn skopeo_list_tags(repo: &str) -> Vec<String> {
    let out = skopeo(&["list-tags", "--tls-verify=false", repo]);
    let v: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("list-tags output {out:?}: {e}"));
    v["Tags"]
        .as_array()
        .unwrap_or_else(|| panic!("list-tags output without Tags: {out}"))
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect()
}

/// `skopeo delete docker://IMAGE`.
pub fn skopeo_delete(image: &str) -> String {
    skopeo(&["delete", "--tls-verify=false", image])
}

// ---------------------------------------------------------------------------------------------
// daemon plumbing
// ---------------------------------------------------------------------------------------------

static UNIQUE: AtomicU32 = AtomicU32::new(0);

/// A short process-unique name, e.g. for container ids.
pub fn unique_name(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        UNIQUE.fetch_add(1, Ordering::Relaxed)
    )
}

/// A daemon child started with stdout/stderr in `log`, stopped by PID on drop.
struct Daemon {
    name: &'static str,
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    fn spawn(name: &'static str, mut cmd: Command, log: PathBuf) -> Daemon {
        let program = cmd.get_program().to_string_lossy().into_owned();
        require_tool(&program);
        let out = std::fs::File::create(&log).unwrap();
        let err = out.try_clone().unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", describe_command(&cmd)));
        Daemon {
            name,
            child: Some(child),
            log,
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Polls `ready` until it returns true; panics with the daemon's log if it exits or the
    /// deadline passes.
    fn wait_ready(&mut self, mut ready: impl FnMut() -> bool) {
        let deadline = Instant::now() + DAEMON_READY_TIMEOUT;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "{} exited during startup ({status}); log:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            if ready() {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "{} not ready after {DAEMON_READY_TIMEOUT:?}; log:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM by PID, wait with a deadline, then SIGKILL.
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if child.try_wait().ok().flatten().is_none() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let deadline = Instant::now() + DAEMON_STOP_TIMEOUT;
            while child.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    eprintln!(
                        "{} (pid {}) ignored SIGTERM for {DAEMON_STOP_TIMEOUT:?}: SIGKILL",
                        self.name,
                        child.id()
                    );
                    let _ = child.kill();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An HTTP/1.0 GET over a unix socket; true on a 200 response.
fn unix_http_ok(sock: &Path, path: &str) -> bool {
    let Ok(mut s) = UnixStream::connect(sock) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
    if s.write_all(format!("GET {path} HTTP/1.0\r\nHost: docker\r\n\r\n").as_bytes())
        .is_err()
    {
        return false;
    }
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    resp.starts_with("HTTP/1.0 200") || resp.starts_with("HTTP/1.1 200")
}

// ---------------------------------------------------------------------------------------------
// dockerd
// ---------------------------------------------------------------------------------------------

/// A private Docker daemon: `--data-root`, `--exec-root`, pidfile and socket in its temp dir,
/// vfs storage, no iptables, no bridge. Its managed containerd lives under the same dirs.
pub struct Dockerd {
    daemon: Daemon,
    /// `unix://DIR/docker.sock`.
    pub host: String,
    /// Docker client config dir (empty: no credential helpers from `~/.docker`).
    client_config: PathBuf,
    dir: TempDir,
}

impl Dockerd {
    /// Starts dockerd with `insecure-registries: ["127.0.0.0/8"]` and no mirrors.
    pub fn start() -> Dockerd {
        Dockerd::start_with(&[], &["127.0.0.0/8"])
    }

    /// Starts dockerd with the given `registry-mirrors` (e.g. `http://127.0.0.1:PORT`) and
    /// `insecure-registries`; waits for `GET /_ping` to answer 200.
    pub fn start_with(mirrors: &[&str], insecure_registries: &[&str]) -> Dockerd {
        for tool in [DOCKERD, DOCKER, CONTAINERD, RUNC] {
            require_tool(tool);
        }
        // Short path: dockerd's managed containerd puts unix sockets under exec-root.
        let dir = tempfile::Builder::new()
            .prefix("dkd")
            .tempdir_in("/tmp")
            .unwrap();
        let d = dir.path();
        for sub in ["root", "exec", "client"] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        let daemon_json = serde_json::json!({
            "registry-mirrors": mirrors,
            "insecure-registries": insecure_registries,
            "log-level": "info",
        });
        std::fs::write(
            d.join("daemon.json"),
            serde_json::to_vec_pretty(&daemon_json).unwrap(),
        )
        .unwrap();
        let sock = d.join("docker.sock");
        let host = format!("unix://{}", sock.display());
        let mut cmd = Command::new(DOCKERD);
        loopback_proxy_env(&mut cmd);
        cmd.arg("--data-root")
            .arg(d.join("root"))
            .arg("--exec-root")
            .arg(d.join("exec"))
            .arg("--pidfile")
            .arg(d.join("pid"))
            .arg("-H")
            .arg(&host)
            .args([
                "--storage-driver=vfs",
                "--iptables=false",
                "--ip6tables=false",
                "--bridge=none",
                "--ip-masq=false",
            ])
            .arg("--config-file")
            .arg(d.join("daemon.json"));
        let mut daemon = Daemon::spawn("dockerd", cmd, d.join("dockerd.log"));
        daemon.wait_ready(|| unix_http_ok(&sock, "/_ping"));
        Dockerd {
            daemon,
            host,
            client_config: d.join("client"),
            dir,
        }
    }

    /// The daemon's temp dir.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// dockerd's log so far.
    pub fn log(&self) -> String {
        self.daemon.log_text()
    }

    /// A `docker ARGS` command aimed at this daemon.
    pub fn docker_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(DOCKER);
        loopback_proxy_env(&mut cmd);
        cmd.env("DOCKER_HOST", &self.host)
            .env("DOCKER_CONFIG", &self.client_config)
            .args(args);
        cmd
    }

    /// Runs docker without judging the exit status.
    pub fn try_docker(&self, args: &[&str]) -> CmdOutput {
        exec(&mut self.docker_command(args), COMMAND_TIMEOUT)
    }

    /// Runs docker; panics with stderr (and the daemon log tail) on failure; returns stdout.
    pub fn docker(&self, args: &[&str]) -> String {
        let out = self.try_docker(args);
        if !out.success() {
            panic!(
                "{}\n--- dockerd log (tail) ---\n{}",
                out.describe("failed"),
                tail(&self.log(), 60)
            );
        }
        out.stdout_str()
    }
}

fn tail(text: &str, lines: usize) -> String {
    let v: Vec<&str> = text.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

// ---------------------------------------------------------------------------------------------
// containerd
// ---------------------------------------------------------------------------------------------

/// A private containerd: own `root`, `state`, gRPC/ttrpc sockets, CRI disabled.
pub struct Containerd {
    daemon: Daemon,
    /// gRPC socket path.
    pub address: PathBuf,
    /// Namespace the `ctr` helpers use.
    pub namespace: String,
    /// `overlayfs` when containerd's overlayfs plugin loaded here, else `native`.
    pub snapshotter: String,
    dir: TempDir,
}

impl Containerd {
    /// Starts containerd and waits until `ctr version` reaches it.
    pub fn start() -> Containerd {
        for tool in [CONTAINERD, CTR, RUNC, "/usr/bin/containerd-shim-runc-v2"] {
            require_tool(tool);
        }
        let dir = tempfile::Builder::new()
            .prefix("ctd")
            .tempdir_in("/tmp")
            .unwrap();
        let d = dir.path();
        let address = d.join("c.sock");
        let config = format!(
            r#"version = 2
root = {root:?}
state = {state:?}
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = {grpc:?}

[ttrpc]
  address = {ttrpc:?}

[debug]
  address = ""
  level = "info"

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = {opt:?}
"#,
            root = d.join("root").display().to_string(),
            state = d.join("state").display().to_string(),
            grpc = address.display().to_string(),
            ttrpc = d.join("c.sock.ttrpc").display().to_string(),
            opt = d.join("opt").display().to_string(),
        );
        std::fs::write(d.join("config.toml"), config).unwrap();
        let mut cmd = Command::new(CONTAINERD);
        loopback_proxy_env(&mut cmd);
        cmd.arg("--config").arg(d.join("config.toml"));
        let mut daemon = Daemon::spawn("containerd", cmd, d.join("containerd.log"));
        let probe_address = address.clone();
        daemon.wait_ready(|| {
            probe_address.exists()
                && Command::new(CTR)
                    .arg("--address")
                    .arg(&probe_address)
                    .arg("--timeout")
                    .arg("2s")
                    .arg("version")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false)
        });
        let mut c = Containerd {
            daemon,
            address,
            namespace: "berth-test".to_string(),
            snapshotter: String::new(),
            dir,
        };
        c.snapshotter = c.pick_snapshotter();
        c
    }

    /// containerd checks overlayfs with a trial mount when the plugin loads; use it if it
    /// loaded (`ok`), else fall back to `native`. `BERTH_TEST_SNAPSHOTTER` forces one.
    fn pick_snapshotter(&self) -> String {
        if let Ok(forced) = std::env::var("BERTH_TEST_SNAPSHOTTER") {
            if !forced.is_empty() {
                return forced;
            }
        }
        let plugins = self.ctr(&["plugins", "ls"]);
        let overlay_ok = plugins.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() >= 4
                && f[0] == "io.containerd.snapshotter.v1"
                && f[1] == "overlayfs"
                && f[f.len() - 1] == "ok"
        });
        if overlay_ok { "overlayfs" } else { "native" }.to_string()
    }

    /// The daemon's temp dir.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// containerd's log so far.
    pub fn log(&self) -> String {
        self.daemon.log_text()
    }

    /// A `ctr --address SOCK --namespace NS ARGS` command.
    pub fn ctr_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(CTR);
        loopback_proxy_env(&mut cmd);
        cmd.arg("--address")
            .arg(&self.address)
            .arg("--namespace")
            .arg(&self.namespace)
            .args(args);
        cmd
    }

    /// Runs ctr without judging the exit status.
    pub fn try_ctr(&self, args: &[&str]) -> CmdOutput {
        exec(&mut self.ctr_command(args), COMMAND_TIMEOUT)
    }

    /// Runs ctr; panics with stderr (and the daemon log tail) on failure; returns stdout.
    pub fn ctr(&self, args: &[&str]) -> String {
        let out = self.try_ctr(args);
        if !out.success() {
            panic!(
                "{}\n--- containerd log (tail) ---\n{}",
                out.describe("failed"),
                tail(&self.log(), 60)
            );
        }
        out.stdout_str()
    }
}

// ---------------------------------------------------------------------------------------------
// docker-registry (CNCF distribution 2.8), the reference peer
// ---------------------------------------------------------------------------------------------

/// Debian's `docker-registry` on a loopback port with filesystem storage and deletes enabled.
pub struct DistributionRegistry {
    daemon: Daemon,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    dir: TempDir,
}

impl DistributionRegistry {
    /// Starts the registry and waits for `GET /v2/` to answer 200.
    pub fn start() -> DistributionRegistry {
        require_tool(DOCKER_REGISTRY);
        let dir = tempfile::Builder::new().prefix("dreg").tempdir().unwrap();
        let d = dir.path();
        // Ephemeral port: bind, read, release (the registry binds it right after).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let config = format!(
            "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
            d.join("data").display()
        );
        std::fs::write(d.join("config.yml"), config).unwrap();
        let mut cmd = Command::new(DOCKER_REGISTRY);
        cmd.arg("serve").arg(d.join("config.yml"));
        let mut daemon = Daemon::spawn("docker-registry", cmd, d.join("registry.log"));
        let probe = addr.clone();
        daemon.wait_ready(|| tcp_http_ok(&probe, "/v2/"));
        DistributionRegistry { daemon, addr, dir }
    }

    pub fn log(&self) -> String {
        self.daemon.log_text()
    }
}

/// An HTTP/1.0 GET over TCP; true on a 200 response.
pub fn tcp_http_ok(addr: &str, path: &str) -> bool {
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .is_err()
    {
        return false;
    }
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    resp.starts_with("HTTP/1.0 200") || resp.starts_with("HTTP/1.1 200")
}
