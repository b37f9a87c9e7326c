//! Test support shared by the unit and the integration tests: real servers on loopback that
//! the shared backends are tested against (a PostgreSQL cluster from Debian's packages, which
//! `scripts/test.sh` installs). Not used by berth itself.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A PostgreSQL cluster of this test process: started on first use on a free loopback port in
/// a directory of its own, stopped when the process exits (parent-death signal), its directory
/// removed by the next test process that starts one.
pub struct PostgresCluster {
    port: u16,
    databases: AtomicU32,
}

/// The directory name prefix of clusters (with the owning process id after it).
const DIR_PREFIX: &str = "berth-test-pg-";

/// The cluster of this process (started on first call). Panics with what to do when
/// PostgreSQL is not installed.
pub fn postgres() -> &'static PostgresCluster {
    static CLUSTER: OnceLock<PostgresCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| PostgresCluster::start().unwrap_or_else(|e| panic!("{e}")))
}

/// The directory of PostgreSQL's programs (`initdb`, `postgres`) of the newest version
/// installed.
fn postgres_bin() -> Result<PathBuf, String> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|_| {
            "PostgreSQL is not installed (/usr/lib/postgresql is missing): run scripts/test.sh, \
             which installs Debian's postgresql"
                .to_string()
        })?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            Some((v, e.path().join("bin")))
        })
        .filter(|(_, bin)| bin.join("postgres").exists())
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, bin)| bin)
        .ok_or_else(|| "no PostgreSQL server under /usr/lib/postgresql".into())
}

/// The uid and gid of the `postgres` user (PostgreSQL refuses to run as root).
fn postgres_user() -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.first() == Some(&"postgres") && fields.len() > 3)
            .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))
            .flatten()
    })
}

/// Removes cluster directories whose process is gone.
fn remove_stale_dirs(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for e in entries.filter_map(|e| e.ok()) {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(DIR_PREFIX)) else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl PostgresCluster {
    fn start() -> Result<PostgresCluster, String> {
        let bin = postgres_bin()?;
        let tmp = std::env::temp_dir();
        remove_stale_dirs(&tmp);
        let dir = tmp.join(format!("{DIR_PREFIX}{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let user = (rustix::process::getuid().is_root())
            .then(postgres_user)
            .flatten();
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
                .map_err(|e| format!("chown {}: {e}", dir.display()))?;
        }
        let as_user = |cmd: &mut Command| {
            if let Some((uid, gid)) = user {
                use std::os::unix::process::CommandExt;
                cmd.uid(uid).gid(gid);
            }
        };
        let data = dir.join("data");
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .args(["-A", "trust", "-U", "berth", "--no-sync", "-E", "UTF8"])
            .args(["--locale", "C", "-D"])
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        as_user(&mut initdb);
        let out = initdb
            .output()
            .map_err(|e| format!("initdb could not start: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let port = free_port();
        // A watcher shell stops the server (immediate shutdown) once this process is gone:
        // nothing of a test run outlives it.
        let mut server = Command::new("sh");
        server
            .arg("-c")
            .arg(
                r#"owner=$1; shift; "$@" & pg=$!
                   while [ -d /proc/$owner ] && kill -0 $pg 2>/dev/null; do sleep 0.5; done
                   kill -QUIT $pg 2>/dev/null; wait $pg"#,
            )
            .arg("watch")
            .arg(std::process::id().to_string())
            .arg(bin.join("postgres"))
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-k"])
            .arg(&dir)
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
            .args(["-c", "full_page_writes=off", "-c", "max_connections=300"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("log")).map_err(|e| e.to_string())?);
        as_user(&mut server);
        let _watcher: Child = server
            .spawn()
            .map_err(|e| format!("postgres could not start: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(dir.join("log")).unwrap_or_default();
                return Err(format!("postgres did not listen within 30 s: {log}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(PostgresCluster {
            port,
            databases: AtomicU32::new(0),
        })
    }

    /// The loopback port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Creates an empty database and answers its URL.
    pub async fn database(&self) -> String {
        let n = self.databases.fetch_add(1, Ordering::Relaxed);
        let name = format!("t{}_{n}", std::process::id());
        let admin = format!(
            "host=127.0.0.1 port={} user=berth dbname=postgres",
            self.port
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        let client = loop {
            match tokio_postgres::connect(&admin, tokio_postgres::NoTls).await {
                Ok((client, connection)) => {
                    tokio::spawn(connection);
                    break client;
                }
                // Listening, but maybe still starting up.
                Err(e) if Instant::now() > deadline => panic!("postgres: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create a test database");
        format!("postgres://berth@127.0.0.1:{}/{name}", self.port)
    }
}

/// An `s3s-fs` (the S3 server the tests run against, installed by `scripts/test.sh`) on a free
/// loopback port over a fresh directory holding the bucket [`S3Server::BUCKET`], killed on drop.
pub struct S3Server {
    child: Child,
    port: u16,
    root: PathBuf,
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn s3s_fs_binary() -> PathBuf {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("s3s-fs"))
            .find(|p| p.is_file())
    });
    let in_cargo = std::env::var_os("HOME")
        .map(|home| PathBuf::from(home).join(".cargo/bin/s3s-fs"))
        .filter(|p| p.is_file());
    on_path.or(in_cargo).unwrap_or_else(|| {
        panic!(
            "s3s-fs (the S3 server these tests run against) is not installed: run \
             scripts/test.sh, or `cargo install s3s-fs --version 0.14.1 --features binary --locked`"
        )
    })
}

impl S3Server {
    /// The bucket it holds.
    pub const BUCKET: &'static str = "berth";
    /// Its access key id.
    pub const ACCESS_KEY: &'static str = "berth-test-key";
    /// Its secret key.
    pub const SECRET_KEY: &'static str = "berth-test-secret";

    /// Starts one and waits until it listens.
    pub async fn start() -> S3Server {
        static SERVERS: AtomicU32 = AtomicU32::new(0);
        let root = std::env::temp_dir().join(format!(
            "berth-test-s3-{}-{}",
            std::process::id(),
            SERVERS.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join(Self::BUCKET)).expect("the bucket's directory");
        let port = free_port();
        let child = Command::new(s3s_fs_binary())
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args([
                "--access-key",
                Self::ACCESS_KEY,
                "--secret-key",
                Self::SECRET_KEY,
            ])
            .arg(&root)
            .stdout(Stdio::null())
            .spawn()
            .expect("s3s-fs starts");
        let server = S3Server { child, port, root };
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                Instant::now() < deadline,
                "s3s-fs did not listen on port {port} within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        server
    }

    /// Its endpoint URL.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// A `[storage]` table for berth over its bucket, keys under `prefix`.
    pub fn storage_toml(&self, prefix: &str) -> String {
        format!(
            "[storage]\nkind = \"s3\"\nendpoint = {:?}\nbucket = {:?}\nprefix = {prefix:?}\n\
             access_key_id = {:?}\nsecret_access_key = {:?}\npart_bytes = 5242880\n",
            self.endpoint(),
            Self::BUCKET,
            Self::ACCESS_KEY,
            Self::SECRET_KEY
        )
    }

    /// Whether the bucket holds an object at `key` (s3s-fs keeps an object as a file at its
    /// key).
    pub fn holds(&self, key: &str) -> bool {
        self.root.join(Self::BUCKET).join(key).is_file()
    }
}
