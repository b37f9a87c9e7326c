//! The `berth` command: `serve`, `check-config`, and admin commands (one file per noun).
//!
//! Every admin command has one implementation: a call of the management API. With `--server`
//! the call goes over HTTP to a running server; without it, to the same API handlers in this
//! process, on the data directory (locked first) as its operator. Both modes run the same
//! operation, so they cannot diverge.

/// `println!` that ignores a closed stdout (`berth ... | head`) instead of panicking.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

mod backup;
mod cache;
mod gc;
mod images;
mod jobs;
mod key;
mod policy;
pub mod prefetch;
mod registry;
pub mod remote;
mod replication;
pub mod stats;
mod status;
mod user;
mod webhooks;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use bytes::Bytes;
use clap::{Parser, Subcommand};
use http::{HeaderMap, Method};
use http_body_util::BodyExt;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::api::views::Paged;
use crate::auth::Principal;
use crate::config::Config;
use crate::http::req::Req;
use crate::App;
use remote::Remote;

#[derive(Parser)]
#[command(name = "berth", version, about = "berth: an edge container registry")]
struct Cli {
    /// Config file (TOML); embedded defaults when absent.
    #[arg(long, short, global = true, env = "BERTH_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory (overrides the config's data_dir).
    #[arg(long, global = true, env = "BERTH_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Act through this running server's management API (e.g. http://127.0.0.1:5000) instead
    /// of the data directory; cache stats and prefetch read from it too.
    #[arg(long, global = true)]
    server: Option<String>,
    /// Access Key ID for --server (Basic credentials).
    #[arg(long, global = true, env = "BERTH_ACCESS_KEY")]
    access_key: Option<String>,
    /// Secret Key for --server.
    #[arg(long, global = true, env = "BERTH_SECRET_KEY", hide_env_values = true)]
    secret_key: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the registry server.
    Serve,
    /// Manage registries (namespaces): on the data directory (stop the server first), or
    /// through a running server with --server.
    #[command(subcommand)]
    Registry(registry::RegistryCommand),
    /// Manage image caches (source registries) and the cached content.
    #[command(subcommand)]
    Cache(cache::CacheCommand),
    /// Manage users (the first admin: `berth --server URL user create root --admin` on a
    /// server without users prints its first key).
    #[command(subcommand)]
    User(user::UserCommand),
    /// Manage users' access keys (the credentials of `docker login` and of --server).
    #[command(subcommand)]
    Key(key::KeyCommand),
    /// List and delete images (repositories) of a registry.
    #[command(subcommand)]
    Image(images::ImageCommand),
    /// List, set (create or move) and delete tags of an image without the Docker CLI.
    #[command(subcommand)]
    Tag(images::TagCommand),
    /// Manage a registry's webhook policies (list, create, delete, send a test event).
    #[command(subcommand)]
    Webhook(webhooks::WebhookCommand),
    /// A registry's cleanup: policies (what to keep), schedule, runs and dry runs, history.
    #[command(subcommand)]
    Cleanup(policy::CleanupCommand),
    /// A registry's protection policies: tags no push, tag deletion or artifact deletion can
    /// change (412).
    #[command(subcommand)]
    Protect(policy::ProtectCommand),
    /// Garbage collection of the blobs no image references (online; on a schedule, daily by
    /// default): run now or as a dry run, schedule, executions, history.
    #[command(subcommand)]
    Gc(gc::GcCommand),
    /// Replication to other regions or registries: endpoints, rules (by image and tag
    /// patterns; on push, on a schedule or by hand), runs with progress, executions, history,
    /// stop.
    #[command(subcommand)]
    Replication(replication::ReplicationCommand),
    /// Check the config for everything `serve` would refuse (values, TLS files, image cache
    /// URLs, registry references, mirror rules); print the effective config as TOML with
    /// secrets redacted, every problem on stderr; exit 1 when there is one.
    CheckConfig,
    /// Make a running server (--server) re-read its TLS certificates and apply what can change
    /// at run time from its config file (registries, image caches, log filter); the same as
    /// SIGHUP (`systemctl reload berth`).
    Reload {
        /// As one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// What a node runs and what its sources are doing: version, uptime, storage, counts, and
    /// per image cache its last success, last error and consecutive failures (admin; through
    /// --server, or on the data directory).
    Status {
        /// As one JSON object (the answer of GET /api/v1/status).
        #[arg(long)]
        json: bool,
    },
    /// Copy the node's registries, image caches, users, keys, webhooks, images and blobs into
    /// DIR while it serves (--server; admin), or from its stopped data directory. A later run
    /// into the same DIR fetches only the blobs it lacks. DIR holds secrets: it is made 0700.
    Backup {
        /// The backup directory (created).
        dir: PathBuf,
        /// Lines asked from the server per call (1 to 10000).
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u16).range(1..=10000))]
        page_lines: u16,
        /// The result as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Make a new data directory (--config's data_dir or --data-dir; it must hold no berth
    /// data) from a backup DIR, the server stopped. What the backup lacks (blobs deleted while
    /// it ran) is left out and named; every tag restored pulls completely.
    Restore {
        /// The backup directory.
        dir: PathBuf,
        /// The result as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Bring the metadata's schema up to this berth's version and print it ([metadata] kind =
    /// "postgres"; `serve` does it at start too). Other nodes may keep serving: one node
    /// migrates at a time, and a database newer than this berth is refused.
    Migrate {
        /// The result as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Copy this node's data (the data_dir, [storage] and [metadata] of --config or
    /// --data-dir; the server stopped) into the storage and metadata another config names, e.g.
    /// an S3 bucket and a PostgreSQL database for several nodes. Every blob is checked against
    /// its digest as it is copied; the target must hold nothing yet. The source is only read.
    MigrateStore {
        /// The config of the target (its data_dir, [storage] and [metadata]).
        #[arg(long)]
        to: PathBuf,
        /// The result as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Print version, git commit, target and build profile.
    Version {
        /// As one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// What `berth version` prints.
#[derive(Serialize)]
struct VersionInfo {
    version: &'static str,
    commit: &'static str,
    target: &'static str,
    profile: &'static str,
}

const VERSION_INFO: VersionInfo = VersionInfo {
    version: crate::metrics::VERSION,
    commit: crate::metrics::COMMIT,
    target: env!("BERTH_TARGET"),
    profile: env!("BERTH_PROFILE"),
};

/// Where an admin command acts: the data directory (the API in this process), or a server's
/// management API over HTTP.
pub struct Place {
    rt: tokio::runtime::Runtime,
    target: Target,
    config: Config,
    server: Option<String>,
}

enum Target {
    /// Not opened yet: commands that only talk to a server (stats, prefetch) never lock it.
    Local(std::sync::OnceLock<Arc<App>>),
    Remote(Remote),
}

impl Place {
    fn of(
        config: Config,
        server: Option<String>,
        key: Option<(String, String)>,
    ) -> Result<Place, String> {
        let target = match &server {
            None => Target::Local(std::sync::OnceLock::new()),
            Some(url) => Target::Remote(Remote::new(url, key)?),
        };
        Ok(Place {
            rt: runtime()?,
            target,
            config,
            server,
        })
    }

    /// The data directory's server state, opened (and locked) on first use.
    fn app(&self, cell: &std::sync::OnceLock<Arc<App>>) -> Result<Arc<App>, String> {
        if let Some(app) = cell.get() {
            return Ok(app.clone());
        }
        let dir = &self.config.data_dir;
        // Never create a data directory by accident (a missing --config would otherwise make
        // an empty one in the working directory and answer as if it were the server's).
        if !crate::store::holds_data(dir) {
            return Err(format!(
                "{} holds no berth data: point --config at the server's config file (or --data-dir at its data directory), or --server at a running server; `berth serve` creates a new data directory",
                dir.display()
            ));
        }
        let app = self
            .rt
            .block_on(App::open(self.config.clone(), false))
            .map_err(|e| e.to_string())?;
        let app = Arc::new(app);
        Ok(cell.get_or_init(|| app).clone())
    }

    /// `METHOD /api/v1{path}` without a body; the API's answer as its view, or the API's error.
    pub fn call<T: DeserializeOwned>(&self, method: Method, path: &str) -> Result<T, String> {
        self.exchange(method, path, None)
    }

    /// `METHOD /api/v1{path}` with a JSON body (one of the API's request views).
    pub fn send<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: &impl Serialize,
    ) -> Result<T, String> {
        let body = serde_json::to_vec(body).map_err(err)?;
        self.exchange(method, path, Some(Bytes::from(body)))
    }

    /// `METHOD /api/v1{path}` whose answer has no body (204).
    pub fn call_no_content(&self, method: Method, path: &str) -> Result<(), String> {
        self.answer(method, path, None).map(|_| ())
    }

    fn exchange<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<T, String> {
        let (what, answer) = self.answer(method.clone(), path, body)?;
        serde_json::from_slice(&answer)
            .map_err(|e| format!("{method} {what}: unexpected answer: {e}"))
    }

    /// What was called (for messages) and the bytes of a successful answer.
    fn answer(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<(String, Bytes), String> {
        Ok(match &self.target {
            Target::Remote(r) => (
                r.url(path),
                self.rt.block_on(r.call(method.clone(), path, body))?,
            ),
            Target::Local(cell) => {
                let app = self.app(cell)?;
                (
                    format!("/api/v1{path}"),
                    self.rt
                        .block_on(local_call(&app, method.clone(), path, body))?,
                )
            }
        })
    }

    /// Waits (the data directory's background work, a cleanup, goes on meanwhile).
    pub fn sleep(&self, d: std::time::Duration) {
        self.rt.block_on(async { tokio::time::sleep(d).await });
    }

    /// Streams the answer of `GET /api/v1{path}` into `sink`, piece by piece; `Ok(false)` when
    /// the answer is 404 (nothing written).
    pub fn download(
        &self,
        path: &str,
        sink: &mut (dyn FnMut(&[u8]) -> std::io::Result<()> + Send),
    ) -> Result<bool, String> {
        let stall = std::time::Duration::from_secs(60);
        match &self.target {
            Target::Remote(r) => self.rt.block_on(r.download(path, stall, sink)),
            Target::Local(cell) => {
                let app = self.app(cell)?;
                self.rt.block_on(async {
                    let response = local_response(&app, Method::GET, path, None).await?;
                    match response.status() {
                        http::StatusCode::NOT_FOUND => return Ok(false),
                        s if !s.is_success() => {
                            return Err(format!("GET /api/v1{path}: {s}"));
                        }
                        _ => {}
                    }
                    let mut body = response.into_body();
                    while let Some(frame) = body.frame().await {
                        if let Ok(data) = frame.map_err(err)?.into_data() {
                            sink(&data).map_err(err)?;
                        }
                    }
                    Ok(true)
                })
            }
        }
    }

    /// Every item of a paginated list.
    pub fn list_all<T: DeserializeOwned>(&self, path: &str) -> Result<Vec<T>, String> {
        let sep = if path.contains('?') { '&' } else { '?' };
        let mut items = Vec::new();
        for page in 1.. {
            let v: Paged<T> = self.call(
                Method::GET,
                &format!("{path}{sep}page={page}&page_size=500"),
            )?;
            let done = v.items.is_empty();
            items.extend(v.items);
            if done || items.len() >= v.total {
                break;
            }
        }
        Ok(items)
    }

    /// Base URL of the server that stats and prefetch read: `--server`, else the config's
    /// first listener.
    fn server_url(&self) -> String {
        self.server.clone().unwrap_or_else(|| {
            let l = &self.config.listen[0];
            let scheme = if l.tls_cert.is_some() {
                "https"
            } else {
                "http"
            };
            format!("{scheme}://{}", l.addr)
        })
    }
}

/// Runs one management API request in this process, as the data directory's operator; the
/// bytes of a successful answer, or the API's error message.
async fn local_call(
    app: &Arc<App>,
    method: Method,
    path: &str,
    body: Option<Bytes>,
) -> Result<Bytes, String> {
    let full = format!("/api/v1{path}");
    let response = local_response(app, method.clone(), path, body).await?;
    let status = response.status();
    let bytes = response
        .into_body()
        .collect()
        .await
        .map_err(err)?
        .to_bytes();
    if status.is_success() {
        return Ok(bytes);
    }
    // An OCI error reads as its message alone (the local operator knows what they called).
    Err(remote::error_message(&bytes)
        .unwrap_or_else(|| format!("{method} {full}: {status}: {}", remote::error_text(&bytes))))
}

/// The answer of one management API request run in this process, as the data directory's
/// operator (its body not read yet).
async fn local_response(
    app: &Arc<App>,
    method: Method,
    path: &str,
    body: Option<Bytes>,
) -> Result<http::Response<crate::http::body::Body>, String> {
    let (path, query) = match path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path, None),
    };
    let headers = HeaderMap::new();
    let req = Req {
        method: &method,
        query,
        headers: &headers,
        principal: &Principal::Operator,
        public: false,
    };
    let bytes = body.unwrap_or_default();
    let full = format!("/api/v1{path}");
    crate::api::dispatch(app, &full, req, http_body_util::Full::new(bytes))
        .await
        .map_err(|e| e.to_string())
}

/// The `berth` command line.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // Commands that need no configuration work whatever the config says.
    match &cli.command {
        Command::Version { json } => {
            let v = &VERSION_INFO;
            if *json {
                outln!("{}", serde_json::to_string(v).unwrap_or_default());
            } else {
                outln!(
                    "berth {} (commit {}, {}, {} build)",
                    v.version,
                    v.commit,
                    v.target,
                    v.profile
                );
            }
            return ExitCode::SUCCESS;
        }
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            let mut script = Vec::new();
            clap_complete::generate(*shell, &mut command, "berth", &mut script);
            // A closed pipe (`| head`) is not an error worth a panic.
            let _ = std::io::Write::write_all(&mut std::io::stdout(), &script);
            return ExitCode::SUCCESS;
        }
        _ => {}
    }
    if matches!(cli.command, Command::CheckConfig) {
        return check_config(cli.config.as_deref(), cli.data_dir);
    }
    let mut config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("berth: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(dir) = cli.data_dir {
        config.data_dir = dir;
    }
    let key = match (cli.access_key, cli.secret_key) {
        (Some(id), Some(secret)) => Some((id, secret)),
        (None, None) => None,
        _ => {
            eprintln!("berth: --access-key and --secret-key go together");
            return ExitCode::from(2);
        }
    };
    let place = |config| Place::of(config, cli.server, key);
    let result = match cli.command {
        Command::Serve => serve(config),
        Command::CheckConfig => Ok(()),
        Command::Registry(cmd) => place(config).and_then(|p| registry::run(&p, cmd)),
        Command::Cache(cmd) => place(config).and_then(|p| cache::run(&p, cmd)),
        Command::User(cmd) => place(config).and_then(|p| user::run(&p, cmd)),
        Command::Key(cmd) => place(config).and_then(|p| key::run(&p, cmd)),
        Command::Image(cmd) => place(config).and_then(|p| images::run_image(&p, cmd)),
        Command::Tag(cmd) => place(config).and_then(|p| images::run_tag(&p, cmd)),
        Command::Webhook(cmd) => place(config).and_then(|p| webhooks::run(&p, cmd)),
        Command::Cleanup(cmd) => place(config).and_then(|p| policy::run_cleanup(&p, cmd)),
        Command::Protect(cmd) => place(config).and_then(|p| policy::run_protect(&p, cmd)),
        Command::Gc(cmd) => place(config).and_then(|p| gc::run(&p, cmd)),
        Command::Replication(cmd) => place(config).and_then(|p| replication::run(&p, cmd)),
        Command::Reload { json } => place(config).and_then(|p| reload(&p, json)),
        Command::Status { json } => place(config).and_then(|p| status::run(&p, json)),
        Command::Backup {
            dir,
            page_lines,
            json,
        } => place(config).and_then(|p| backup::backup(&p, &dir, page_lines.into(), json)),
        Command::Restore { dir, json } => {
            place(config).and_then(|p| backup::restore(&p, &dir, json))
        }
        Command::Migrate { json } => place(config).and_then(|p| migrate(&p, json)),
        Command::MigrateStore { to, json } => {
            place(config).and_then(|p| backup::migrate_store(&p, &to, json))
        }
        Command::Version { .. } | Command::Completions { .. } => Ok(()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("berth: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `berth migrate`: the metadata schema, migrated forward.
fn migrate(place: &Place, json: bool) -> Result<(), String> {
    use crate::store::meta::MetadataSettings;
    let MetadataSettings::Postgres(pg) = &place.config.metadata else {
        if json {
            return print_json(&serde_json::json!({"backend": "sled", "migrated": false}));
        }
        outln!("metadata in sled (the data directory): nothing to migrate; berth keeps its format at start");
        return Ok(());
    };
    let (applied, known) = place.rt.block_on(async {
        let meta = crate::store::meta::postgres::PostgresMeta::open(pg)
            .await
            .map_err(|e| e.to_string())?;
        meta.schema_version().await.map_err(|e| e.to_string())
    })?;
    if json {
        return print_json(&serde_json::json!({
            "backend": "postgres",
            "version": applied,
            "newest_known": known,
        }));
    }
    outln!("metadata schema in PostgreSQL at version {applied} (this berth knows up to {known})");
    Ok(())
}

/// `berth reload`: asks a running server; a data directory has nothing to reload.
fn reload(place: &Place, json: bool) -> Result<(), String> {
    if place.server.is_none() {
        return Err(
            "reload acts on a running server: give --server URL (or send it SIGHUP: `systemctl reload berth`)"
                .into(),
        );
    }
    let report: crate::reload::ReloadReport = place.call(Method::POST, "/reload")?;
    if json {
        return print_json(&report);
    }
    for c in &report.certificates {
        match &c.error {
            None => outln!("certificate of {} re-read from {}", c.listen, c.cert),
            Some(e) => outln!("certificate of {} kept: {e}", c.listen),
        }
    }
    outln!("config: {}", report.config);
    for a in &report.applied {
        outln!("applied: {a}");
    }
    for r in &report.restart_needed {
        outln!("changed, applies at the next restart: {r}");
    }
    for p in &report.problems {
        eprintln!("berth: {p}");
    }
    let failed =
        !report.problems.is_empty() || report.certificates.iter().any(|c| c.error.is_some());
    if failed {
        return Err("the reload was not complete (see above); what is in use did not change where it failed".into());
    }
    Ok(())
}

/// `berth check-config`: every problem at once, then the effective config.
fn check_config(path: Option<&std::path::Path>, data_dir: Option<PathBuf>) -> ExitCode {
    let mut config = match Config::read(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("berth: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(dir) = data_dir {
        config.data_dir = dir;
    }
    let mut problems = config.problems();
    for l in &config.listen {
        if let (Some(cert), Some(key)) = (&l.tls_cert, &l.tls_key) {
            if let Err(e) = crate::http::tls::CertFiles::load(cert, key) {
                problems.push(format!("listen {}: {e}", l.addr));
            }
        }
    }
    let plan = crate::start_problems(&config, None);
    problems.extend(plan.errors);
    match config.to_redacted_toml() {
        Ok(text) => outln!("{text}"),
        Err(e) => problems.push(format!("cannot print the config as TOML: {e}")),
    }
    for w in &plan.warnings {
        eprintln!("berth: warning: {w}");
    }
    if problems.is_empty() {
        eprintln!("berth: config is valid");
        return ExitCode::SUCCESS;
    }
    eprintln!("berth: {} problem(s) in the config:", problems.len());
    for p in &problems {
        eprintln!("  - {p}");
    }
    ExitCode::FAILURE
}

fn init_logging(filter: &str, format: crate::config::LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A reload may change the filter (not the format).
    fn hook<L, S>(handle: tracing_subscriber::reload::Handle<L, S>) -> crate::reload::LogFilterHook
    where
        L: From<tracing_subscriber::EnvFilter> + Send + Sync + 'static,
        S: Send + Sync + 'static,
    {
        Box::new(move |filter: &str| {
            let parsed =
                tracing_subscriber::EnvFilter::try_new(filter).map_err(|e| e.to_string())?;
            handle.reload(parsed).map_err(|e| e.to_string())
        })
    }
    match format {
        crate::config::LogFormat::Text => {
            let builder = builder
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_filter_reloading();
            crate::reload::set_log_filter_hook(hook(builder.reload_handle()));
            builder.init()
        }
        crate::config::LogFormat::Json => {
            let builder = builder
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_filter_reloading();
            crate::reload::set_log_filter_hook(hook(builder.reload_handle()));
            builder.init()
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("berth")
        .build()
        .map_err(|e| e.to_string())
}

fn serve(config: Config) -> Result<(), String> {
    init_logging(&config.log, config.log_format);
    runtime()?.block_on(async move {
        // Handlers first: a SIGTERM that comes right after "ready" (systemd, a test) must stop
        // the server cleanly, not kill it by the default action.
        let signals = Signals::install()?;
        let data_dir = config.data_dir.clone();
        let server = crate::Server::start(config)
            .await
            .map_err(|e| e.to_string())?;
        for (addr, tls) in server.local_addrs() {
            let scheme = if *tls { "https" } else { "http" };
            outln!("berth listening on {scheme}://{addr}");
            tracing::info!(%addr, tls, data_dir = %data_dir.display(), "listening");
        }
        outln!("berth ready");
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
        signals.wait(server.app()).await;
        tracing::info!("shutting down: no new connections, finishing open requests");
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
        server.shutdown().await;
        tracing::info!("stopped");
        Ok(())
    })
}

/// The signals `serve` handles, installed before the server starts.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Signals, String> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate()).map_err(|e| format!("SIGTERM handler: {e}"))?,
            int: signal(SignalKind::interrupt()).map_err(|e| format!("SIGINT handler: {e}"))?,
            hup: signal(SignalKind::hangup()).map_err(|e| format!("SIGHUP handler: {e}"))?,
        })
    }

    /// Waits for SIGTERM or SIGINT; SIGHUP reloads meanwhile.
    async fn wait(mut self, app: &Arc<crate::App>) {
        loop {
            tokio::select! {
                _ = self.term.recv() => return,
                _ = self.int.recv() => return,
                _ = self.hup.recv() => {
                    tracing::info!("SIGHUP: reloading");
                    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Reloading]);
                    let report = crate::reload::reload(app).await;
                    tracing::info!(applied = ?report.applied, restart_needed = ?report.restart_needed, problems = ?report.problems, "reload done");
                    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
                }
            }
        }
    }
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

fn print_json(v: &impl serde::Serialize) -> Result<(), String> {
    outln!("{}", serde_json::to_string_pretty(v).map_err(err)?);
    Ok(())
}

/// An optional text field of a view, `-` when absent.
fn text(v: &Option<String>) -> &str {
    v.as_deref().unwrap_or("-")
}
