//! The `berth` command: `serve`, and admin subcommands acting on the data directory or on a
//! running server.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use berth::admin;
use berth::config::{Config, ImageCacheConfig, RegistryKind, SourceKind};

/// `println!` that ignores a closed stdout (`berth ... | head`) instead of panicking.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

#[derive(Parser)]
#[command(name = "berth", version, about = "berth: an edge container registry")]
struct Cli {
    /// Config file (TOML); embedded defaults when absent.
    #[arg(long, short, global = true, env = "BERTH_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory (overrides the config's data_dir).
    #[arg(long, global = true, env = "BERTH_DATA_DIR")]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the registry server.
    Serve,
    /// Manage registries (namespaces). Acts on the data directory: stop the server first.
    #[command(subcommand)]
    Registry(RegistryCommand),
    /// Manage image caches (source registries) and the cached content.
    #[command(subcommand)]
    Cache(CacheCommand),
    /// Print the effective configuration (defaults merged with the file) and exit.
    CheckConfig,
}

#[derive(Subcommand)]
enum RegistryCommand {
    /// Create a registry.
    Create {
        /// Name: the first path segment of its images.
        name: String,
        /// normal (push and pull) or cache (pull-through).
        #[arg(long = "type", default_value = "normal")]
        kind: RegistryKind,
        /// For --type cache: the image cache it serves.
        #[arg(long)]
        cache: Option<String>,
    },
    /// List registries.
    List {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Delete a registry and its images' records.
    Delete {
        /// Name.
        name: String,
        /// Delete even if it still has repositories.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Args)]
struct SourceArgs {
    /// Source URL (https://hub.docker.com, https://ACCOUNT.dkr.ecr.REGION.amazonaws.com, ...).
    #[arg(long)]
    url: Option<String>,
    /// User (ECR: access key id; GCR: _json_key; Quay: account_name).
    #[arg(long)]
    username: Option<String>,
    /// Read the password/secret from standard input (keeps it out of shell history).
    #[arg(long)]
    password_stdin: bool,
    /// File with the credentials (JSON: username/password, GCR key, or Quay robot).
    #[arg(long)]
    credentials_file: Option<PathBuf>,
    /// Budget of one caching blob fetch (e.g. 200s).
    #[arg(long, value_parser = humantime::parse_duration)]
    fetch_budget: Option<Duration>,
    /// Serve a tag revalidated within this time without asking the source (e.g. 30s).
    #[arg(long, value_parser = humantime::parse_duration)]
    revalidate_ttl: Option<Duration>,
    /// ECR region (default: from the URL).
    #[arg(long)]
    region: Option<String>,
    /// ECR API endpoint (VPC interface endpoint).
    #[arg(long)]
    ecr_endpoint: Option<String>,
}

#[derive(Subcommand)]
enum CacheCommand {
    /// Define a source registry.
    Create {
        /// Name that cache registries refer to.
        name: String,
        /// dockerhub, ecr, acr, gcr, harbor, quay or registry.
        #[arg(long)]
        kind: SourceKind,
        #[command(flatten)]
        source: SourceArgs,
    },
    /// List image caches (credentials are never printed).
    List {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Change an image cache (restart the server to apply).
    Update {
        /// Name.
        name: String,
        /// New kind.
        #[arg(long)]
        kind: Option<SourceKind>,
        #[command(flatten)]
        source: SourceArgs,
    },
    /// Delete an image cache (refused while a registry uses it).
    Delete {
        /// Name.
        name: String,
    },
    /// Remove cached artifacts not pulled for a while and the blobs nothing references.
    Prune {
        /// Show what would be removed, remove nothing.
        #[arg(long)]
        dry_run: bool,
        /// Age since the last pull (default: pull_through.cleanup_unpulled_after).
        #[arg(long, value_parser = humantime::parse_duration)]
        unpulled_for: Option<Duration>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Hit ratio and bytes saved since the server started (reads its /metrics).
    Stats {
        /// Server URL (default: the first listener of the config).
        #[arg(long)]
        server: Option<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Warm the cache: pull CACHEREG/PATH:TAG (all platforms, or one) through a running server.
    Prefetch {
        /// References, e.g. docker/library/nginx:1.27.
        #[arg(required = true)]
        references: Vec<String>,
        /// Only this platform of a multi-arch image (os/arch[/variant]).
        #[arg(long)]
        platform: Option<admin::prefetch::Platform>,
        /// Server URL (default: the first listener of the config).
        #[arg(long)]
        server: Option<String>,
        /// Machine-readable output (no progress bar).
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
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
    let result = match cli.command {
        Command::Serve => serve(config),
        Command::CheckConfig => {
            outln!("{config:#?}");
            Ok(())
        }
        Command::Registry(cmd) => registry(&config, cmd),
        Command::Cache(cmd) => cache(&config, cmd),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("berth: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("berth")
        .build()
        .map_err(|e| e.to_string())
}

fn serve(config: Config) -> Result<(), String> {
    init_logging(&config.log);
    runtime()?.block_on(async move {
        let data_dir = config.data_dir.clone();
        let server = berth::Server::start(config)
            .await
            .map_err(|e| e.to_string())?;
        for (addr, tls) in server.local_addrs() {
            let scheme = if *tls { "https" } else { "http" };
            outln!("berth listening on {scheme}://{addr}");
            tracing::info!(%addr, tls, data_dir = %data_dir.display(), "listening");
        }
        outln!("berth ready");
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
        wait_for_signal().await;
        tracing::info!("shutting down: no new connections, finishing open requests");
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
        server.shutdown().await;
        tracing::info!("stopped");
        Ok(())
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

fn registry(config: &Config, cmd: RegistryCommand) -> Result<(), String> {
    let meta = admin::open_meta(config)?;
    match cmd {
        RegistryCommand::Create { name, kind, cache } => {
            admin::create_registry(&meta, &name, kind, cache)?;
            outln!("created registry {name} ({kind})");
        }
        RegistryCommand::List { json } => {
            let regs = meta.registries().map_err(err)?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&regs).map_err(err)?);
            } else {
                outln!(
                    "{:<32} {:<8} {:<20} REPOSITORIES",
                    "NAME",
                    "TYPE",
                    "IMAGE CACHE"
                );
                for r in regs {
                    let repos = meta
                        .repositories(Some(&r.name), None, usize::MAX)
                        .map_err(err)?
                        .len();
                    outln!(
                        "{:<32} {:<8} {:<20} {}",
                        r.name,
                        r.kind,
                        r.cache.as_deref().unwrap_or("-"),
                        repos
                    );
                }
            }
        }
        RegistryCommand::Delete { name, force } => {
            if meta.registry(&name).map_err(err)?.is_none() {
                return Err(format!("registry {name:?} does not exist"));
            }
            let repos = meta
                .repositories(Some(&name), None, usize::MAX)
                .map_err(err)?;
            if !repos.is_empty() && !force {
                return Err(format!(
                    "registry {name:?} still holds {} repositories (e.g. {}); use --force to delete them too",
                    repos.len(),
                    repos[0]
                ));
            }
            meta.delete_registry(&name).map_err(err)?;
            meta.flush_blocking().map_err(err)?;
            outln!("deleted registry {name}");
        }
    }
    Ok(())
}

fn read_password_stdin() -> Result<String, String> {
    let mut s = String::new();
    std::io::stdin().read_line(&mut s).map_err(err)?;
    Ok(s.trim_end_matches(['\n', '\r']).to_string())
}

fn apply_source_args(c: &mut ImageCacheConfig, a: SourceArgs) -> Result<(), String> {
    if let Some(u) = a.url {
        c.url = u;
    }
    if let Some(u) = a.username {
        c.username = Some(u);
    }
    if a.password_stdin {
        c.password = Some(read_password_stdin()?);
    }
    if let Some(f) = a.credentials_file {
        c.credentials_file = Some(f);
    }
    if let Some(b) = a.fetch_budget {
        c.fetch_budget = b;
    }
    if let Some(t) = a.revalidate_ttl {
        c.revalidate_ttl = t;
    }
    if let Some(r) = a.region {
        c.region = Some(r);
    }
    if let Some(e) = a.ecr_endpoint {
        c.ecr_endpoint = Some(e);
    }
    Ok(())
}

fn server_url(config: &Config, server: Option<String>) -> String {
    server.unwrap_or_else(|| {
        let l = &config.listen[0];
        let scheme = if l.tls_cert.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", l.addr)
    })
}

fn cache(config: &Config, cmd: CacheCommand) -> Result<(), String> {
    match cmd {
        CacheCommand::Create { name, kind, source } => {
            let meta = admin::open_meta(config)?;
            let url = source.url.clone().ok_or("--url is required")?;
            let mut c = ImageCacheConfig::new(&name, kind, &url);
            apply_source_args(&mut c, source)?;
            admin::put_image_cache(&meta, config, c, false)?;
            outln!("created image cache {name} ({kind}); use it with `berth registry create NAME --type cache --cache {name}`");
        }
        CacheCommand::Update { name, kind, source } => {
            let meta = admin::open_meta(config)?;
            let mut c = meta
                .image_cache(&name)
                .map_err(err)?
                .ok_or_else(|| format!("image cache {name:?} does not exist"))?;
            if let Some(k) = kind {
                c.kind = k;
            }
            apply_source_args(&mut c, source)?;
            admin::put_image_cache(&meta, config, c, true)?;
            outln!("updated image cache {name} (restart berth to apply)");
        }
        CacheCommand::List { json } => {
            let meta = admin::open_meta(config)?;
            let caches: Vec<_> = meta
                .image_caches()
                .map_err(err)?
                .iter()
                .map(admin::describe_image_cache)
                .collect();
            if json {
                outln!("{}", serde_json::to_string_pretty(&caches).map_err(err)?);
            } else {
                outln!("{:<20} {:<10} {:<45} CREDENTIALS", "NAME", "KIND", "URL");
                for c in caches {
                    outln!(
                        "{:<20} {:<10} {:<45} {}",
                        c["name"].as_str().unwrap_or(""),
                        c["kind"].as_str().unwrap_or(""),
                        c["url"].as_str().unwrap_or(""),
                        c["credentials"].as_str().unwrap_or("")
                    );
                }
            }
        }
        CacheCommand::Delete { name } => {
            let meta = admin::open_meta(config)?;
            admin::delete_image_cache(&meta, &name)?;
            outln!("deleted image cache {name}");
        }
        CacheCommand::Prune {
            dry_run,
            unpulled_for,
            json,
        } => {
            let store = berth::store::Store::open(&config.data_dir, config).map_err(|e| {
                format!(
                    "cannot open {}: {e} (stop `berth serve` first)",
                    config.data_dir.display()
                )
            })?;
            let age = unpulled_for.unwrap_or(config.pull_through.cleanup_unpulled_after);
            let report =
                berth::cache::sweep::sweep(&store, age, config.pull_through.gc_grace, &[], dry_run)
                    .map_err(err)?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&report).map_err(err)?);
            } else {
                let verb = if dry_run { "would remove" } else { "removed" };
                for (repo, digest, _, last) in &report.artifacts {
                    outln!(
                        "{verb} {repo}@{digest} (last pulled {})",
                        humantime::format_rfc3339_seconds(
                            std::time::UNIX_EPOCH + Duration::from_millis(*last)
                        )
                    );
                }
                outln!(
                    "{verb} {} artifacts and {} blobs ({} bytes)",
                    report.artifacts.len(),
                    report.blobs.len(),
                    report.bytes()
                );
            }
        }
        CacheCommand::Stats { server, json } => {
            let url = server_url(config, server);
            let stats = runtime()?.block_on(admin::stats::fetch(&url))?;
            if json {
                outln!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "registries": stats.registries,
                        "upstream_bytes": stats.upstream_bytes,
                        "hit_ratio": stats.hit_ratio(),
                        "bytes_saved": stats.bytes_saved(),
                    }))
                    .map_err(err)?
                );
            } else {
                outln!("since the server at {url} started:");
                for (name, r) in &stats.registries {
                    let outcomes: Vec<String> =
                        r.outcomes.iter().map(|(o, n)| format!("{o}={n}")).collect();
                    outln!(
                        "  {name:<20} {}  served {} bytes",
                        outcomes.join(" "),
                        r.bytes_served
                    );
                }
                outln!(
                    "  hit ratio {:.1}%, fetched {} bytes from sources, saved {} bytes",
                    stats.hit_ratio() * 100.0,
                    stats.upstream_bytes,
                    stats.bytes_saved()
                );
            }
        }
        CacheCommand::Prefetch {
            references,
            platform,
            server,
            json,
        } => {
            let url = server_url(config, server);
            let bar = if json {
                indicatif::ProgressBar::hidden()
            } else {
                indicatif::ProgressBar::new(0).with_style(
                    indicatif::ProgressStyle::with_template(
                        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                    )
                    .map_err(err)?
                    .progress_chars("=> "),
                )
            };
            let rt = runtime()?;
            let mut failed = 0;
            for r in &references {
                bar.set_message(r.clone());
                match rt.block_on(admin::prefetch::prefetch(&url, r, platform.as_ref(), &bar)) {
                    Ok(rep) if json => outln!(
                        "{}",
                        serde_json::json!({"reference": r, "manifests": rep.manifests, "blobs": rep.blobs, "bytes": rep.bytes})
                    ),
                    Ok(rep) => bar.println(format!(
                        "{r}: {} manifests, {} blobs, {} bytes",
                        rep.manifests, rep.blobs, rep.bytes
                    )),
                    Err(e) => {
                        failed += 1;
                        bar.println(format!("{r}: failed: {e}"));
                    }
                }
            }
            bar.finish_and_clear();
            if failed > 0 {
                return Err(format!(
                    "{failed} of {} references failed",
                    references.len()
                ));
            }
        }
    }
    Ok(())
}
