//! The `berth` command: `serve`, and admin subcommands acting on the data directory or on a
//! running server.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use reqwest::Method;
use serde_json::{json, Value};

use berth::admin;
use berth::admin::remote::{seg, Remote};
use berth::auth::Role;
use berth::config::{Config, ImageCacheConfig, RegistryConfig, RegistryKind, SourceKind};

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
    Registry(RegistryCommand),
    /// Manage image caches (source registries) and the cached content.
    #[command(subcommand)]
    Cache(CacheCommand),
    /// Manage users (the first admin: `berth user create root --admin` on the data directory).
    #[command(subcommand)]
    User(UserCommand),
    /// Manage users' access keys (the credentials of `docker login` and of --server).
    #[command(subcommand)]
    Key(KeyCommand),
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
        /// Hide it from public listeners (public_uri = false).
        #[arg(long)]
        private: bool,
        /// Let anyone pull without credentials.
        #[arg(long)]
        anonymous_pull: bool,
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
    /// Hit ratio and bytes saved since the server started (reads the /metrics of --server,
    /// default: the first listener of the config).
    Stats {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Warm the cache: pull CACHEREG/PATH:TAG (all platforms, or one) through a running server
    /// (--server, default: the first listener of the config).
    Prefetch {
        /// References, e.g. docker/library/nginx:1.27.
        #[arg(required = true)]
        references: Vec<String>,
        /// Only this platform of a multi-arch image (os/arch[/variant]).
        #[arg(long)]
        platform: Option<admin::prefetch::Platform>,
        /// Machine-readable output (no progress bar).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum UserCommand {
    /// Create a user.
    Create {
        /// Login name (lowercase letters, digits, - _ .).
        name: String,
        /// admin, viewer or image_uploader (default viewer).
        #[arg(long, conflicts_with = "admin")]
        role: Option<Role>,
        /// Shorthand for --role admin.
        #[arg(long)]
        admin: bool,
        /// Limit the role to this registry (repeat for more; default: all registries).
        #[arg(long = "registry")]
        registries: Vec<String>,
    },
    /// List users.
    List {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Delete a user and their keys (never the last admin of every registry).
    Delete {
        /// Name.
        name: String,
    },
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Create an access key; its secret is printed this once.
    Create {
        /// Owner.
        user: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// List a user's keys with their age; keys older than 90 days are flagged for rotation.
    List {
        /// Owner.
        user: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key.
    Revoke {
        /// Owner.
        user: String,
        /// Access Key ID.
        id: String,
    },
}

/// Where an admin command acts: the data directory, or a server's management API.
enum Place {
    Local,
    Remote(tokio::runtime::Runtime, Remote),
}

impl Place {
    fn of(server: Option<&str>, key: Option<(String, String)>) -> Result<Place, String> {
        match server {
            None => Ok(Place::Local),
            Some(url) => Ok(Place::Remote(runtime()?, Remote::new(url, key)?)),
        }
    }
}

/// Runs an API call of remote mode.
fn call(place: &Place, method: Method, path: &str, body: Option<Value>) -> Result<Value, String> {
    match place {
        Place::Remote(rt, r) => rt.block_on(r.call(method, path, body)),
        Place::Local => Err("internal: API call without --server".into()),
    }
}

/// Every item of an API list in remote mode.
fn list_all(place: &Place, path: &str) -> Result<Vec<Value>, String> {
    match place {
        Place::Remote(rt, r) => rt.block_on(r.list_all(path)),
        Place::Local => Err("internal: API call without --server".into()),
    }
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
    let key = match (cli.access_key, cli.secret_key) {
        (Some(id), Some(secret)) => Some((id, secret)),
        (None, None) => None,
        _ => {
            eprintln!("berth: --access-key and --secret-key go together");
            return ExitCode::from(2);
        }
    };
    let server = cli.server.as_deref();
    let result = match cli.command {
        Command::Serve => serve(config),
        Command::CheckConfig => {
            outln!("{config:#?}");
            Ok(())
        }
        Command::Registry(cmd) => Place::of(server, key).and_then(|p| registry(&config, &p, cmd)),
        Command::Cache(cmd) => Place::of(server, key).and_then(|p| cache(&config, &p, server, cmd)),
        Command::User(cmd) => Place::of(server, key).and_then(|p| user(&config, &p, cmd)),
        Command::Key(cmd) => Place::of(server, key).and_then(|p| access_key(&config, &p, cmd)),
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

fn print_json(v: &impl serde::Serialize) -> Result<(), String> {
    outln!("{}", serde_json::to_string_pretty(v).map_err(err)?);
    Ok(())
}

fn text<'a>(v: &'a Value, field: &str) -> &'a str {
    v[field].as_str().unwrap_or("-")
}

fn print_registries(regs: &[Value], json: bool) -> Result<(), String> {
    if json {
        return print_json(&regs);
    }
    outln!(
        "{:<32} {:<8} {:<20} {:<8} {:<10} IMAGES",
        "NAME",
        "TYPE",
        "IMAGE CACHE",
        "PUBLIC",
        "ANON PULL"
    );
    for r in regs {
        outln!(
            "{:<32} {:<8} {:<20} {:<8} {:<10} {}",
            text(r, "name"),
            text(r, "type"),
            text(r, "cache"),
            r["public_uri"].to_string(),
            r["anonymous_pull"].to_string(),
            r["image_count"]
        );
    }
    Ok(())
}

fn registry(config: &Config, place: &Place, cmd: RegistryCommand) -> Result<(), String> {
    if let Place::Remote(..) = place {
        return match cmd {
            RegistryCommand::Create {
                name,
                kind,
                cache,
                private,
                anonymous_pull,
            } => {
                let body = json!({"name": name, "type": kind, "cache": cache,
                    "public_uri": !private, "anonymous_pull": anonymous_pull});
                let r = call(place, Method::POST, "/registries", Some(body))?;
                outln!("created registry {name} ({kind})");
                if let Some(note) = r["note"].as_str() {
                    eprintln!("berth: note: {note}");
                }
                Ok(())
            }
            RegistryCommand::List { json } => {
                print_registries(&list_all(place, "/registries")?, json)
            }
            RegistryCommand::Delete { name, force } => {
                let path = format!("/registries/{}?force={force}", seg(&name));
                call(place, Method::DELETE, &path, None)?;
                outln!("deleted registry {name}");
                Ok(())
            }
        };
    }
    let meta = admin::open_meta(config)?;
    match cmd {
        RegistryCommand::Create {
            name,
            kind,
            cache,
            private,
            anonymous_pull,
        } => {
            admin::create_registry(
                &meta,
                &RegistryConfig {
                    name: name.clone(),
                    kind,
                    cache,
                    public_uri: !private,
                    anonymous_pull,
                },
            )?;
            outln!("created registry {name} ({kind})");
        }
        RegistryCommand::List { json } => {
            let regs = meta
                .registries()
                .map_err(err)?
                .iter()
                .map(|r| admin::registry_json(&meta, r).map_err(err))
                .collect::<Result<Vec<_>, _>>()?;
            print_registries(&regs, json)?;
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

fn print_users(users: &[Value], json: bool) -> Result<(), String> {
    if json {
        return print_json(&users);
    }
    outln!(
        "{:<24} {:<16} {:<30} {:<5} CREATED",
        "NAME",
        "ROLE",
        "REGISTRIES",
        "KEYS"
    );
    for u in users {
        let regs: Vec<&str> = u["registries"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let regs = if regs.is_empty() {
            "(all)".to_string()
        } else {
            regs.join(",")
        };
        outln!(
            "{:<24} {:<16} {:<30} {:<5} {}",
            text(u, "name"),
            text(u, "role"),
            regs,
            u["key_count"].to_string(),
            text(u, "created")
        );
    }
    Ok(())
}

fn user(config: &Config, place: &Place, cmd: UserCommand) -> Result<(), String> {
    match cmd {
        UserCommand::Create {
            name,
            role,
            admin,
            registries,
        } => {
            // Least privilege unless asked: a user is a viewer by default.
            let role = if admin {
                Role::Admin
            } else {
                role.unwrap_or(Role::Viewer)
            };
            let body = json!({"name": name, "role": role, "registries": registries});
            match place {
                Place::Local => {
                    let meta = admin::open_meta(config)?;
                    admin::users::create_user(&meta, &name, role, registries)?;
                }
                Place::Remote(..) => {
                    call(place, Method::POST, "/users", Some(body))?;
                }
            }
            outln!("created user {name} ({role}); give them a key with `berth key create {name}`");
        }
        UserCommand::List { json } => {
            let users = match place {
                Place::Local => admin::users::list_users(&admin::open_meta(config)?)?,
                Place::Remote(..) => list_all(place, "/users")?,
            };
            print_users(&users, json)?;
        }
        UserCommand::Delete { name } => {
            match place {
                Place::Local => admin::users::delete_user(&admin::open_meta(config)?, &name)?,
                Place::Remote(..) => {
                    call(
                        place,
                        Method::DELETE,
                        &format!("/users/{}", seg(&name)),
                        None,
                    )?;
                }
            }
            outln!("deleted user {name} and their keys");
        }
    }
    Ok(())
}

fn access_key(config: &Config, place: &Place, cmd: KeyCommand) -> Result<(), String> {
    match cmd {
        KeyCommand::Create { user, json } => {
            let key = match place {
                Place::Local => admin::users::create_key(&admin::open_meta(config)?, &user)?,
                Place::Remote(..) => call(
                    place,
                    Method::POST,
                    &format!("/users/{}/keys", seg(&user)),
                    None,
                )?,
            };
            if json {
                print_json(&key)?;
            } else {
                outln!("Access Key ID: {}", text(&key, "id"));
                outln!("Secret Key:    {}", text(&key, "secret"));
            }
            eprintln!(
                "berth: store the secret key now: it is not shown again (revoke the key and create another if it is lost)"
            );
        }
        KeyCommand::List { user, json } => {
            let keys = match place {
                Place::Local => admin::users::list_keys(&admin::open_meta(config)?, &user)?,
                Place::Remote(..) => list_all(place, &format!("/users/{}/keys", seg(&user)))?,
            };
            if json {
                return print_json(&keys);
            }
            outln!(
                "{:<22} {:<22} {:>8}  ROTATE",
                "ACCESS KEY ID",
                "CREATED",
                "AGE"
            );
            for k in &keys {
                let rotate = if k["rotation_due"] == true {
                    "yes: older than 90 days"
                } else {
                    "no"
                };
                outln!(
                    "{:<22} {:<22} {:>7}d  {rotate}",
                    text(k, "id"),
                    text(k, "created"),
                    k["age_days"].to_string()
                );
            }
        }
        KeyCommand::Revoke { user, id } => {
            match place {
                Place::Local => admin::users::revoke_key(&admin::open_meta(config)?, &user, &id)?,
                Place::Remote(..) => {
                    let path = format!("/users/{}/keys/{}", seg(&user), seg(&id));
                    call(place, Method::DELETE, &path, None)?;
                }
            }
            outln!("revoked access key {id} of {user}");
        }
    }
    Ok(())
}

fn read_password_stdin() -> Result<String, String> {
    let mut s = String::new();
    std::io::stdin().read_line(&mut s).map_err(err)?;
    Ok(s.trim_end_matches(['\n', '\r']).to_string())
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

/// The change the command line asks for (`cache create` and `cache update`, local or remote).
fn source_patch(kind: Option<SourceKind>, a: SourceArgs) -> Result<admin::CachePatch, String> {
    let human = |d: Duration| humantime::format_duration(d).to_string();
    Ok(admin::CachePatch {
        kind,
        url: a.url,
        username: a.username,
        password: if a.password_stdin {
            Some(read_password_stdin()?)
        } else {
            None
        },
        credentials_file: a.credentials_file,
        fetch_budget: a.fetch_budget.map(human),
        revalidate_ttl: a.revalidate_ttl.map(human),
        region: a.region,
        ecr_endpoint: a.ecr_endpoint,
    })
}

fn print_caches(caches: &[Value], json: bool) -> Result<(), String> {
    if json {
        return print_json(&caches);
    }
    outln!("{:<20} {:<10} {:<45} CREDENTIALS", "NAME", "KIND", "URL");
    for c in caches {
        outln!(
            "{:<20} {:<10} {:<45} {}",
            text(c, "name"),
            text(c, "kind"),
            text(c, "url"),
            text(c, "credentials")
        );
    }
    Ok(())
}

fn print_prune(report: &Value, json: bool) -> Result<(), String> {
    if json {
        return print_json(report);
    }
    let verb = if report["dry_run"] == true {
        "would remove"
    } else {
        "removed"
    };
    let none = Vec::new();
    let artifacts = report["artifacts"].as_array().unwrap_or(&none);
    for a in artifacts {
        outln!(
            "{verb} {}@{} (last pulled {})",
            text(a, "repository"),
            text(a, "digest"),
            text(a, "last_pull")
        );
    }
    outln!(
        "{verb} {} artifacts and {} blobs ({} bytes)",
        artifacts.len(),
        report["blobs"].as_array().map_or(0, Vec::len),
        report["bytes"]
    );
    Ok(())
}

fn cache(
    config: &Config,
    place: &Place,
    server: Option<&str>,
    cmd: CacheCommand,
) -> Result<(), String> {
    let server = server.map(str::to_string);
    if let Place::Remote(..) = place {
        match cmd {
            CacheCommand::Create { name, kind, source } => {
                let url = source.url.clone().ok_or("--url is required")?;
                let mut c = ImageCacheConfig::new(&name, kind, &url);
                source_patch(None, source)?.apply(&mut c)?;
                let body = serde_json::to_value(&c).map_err(err)?;
                call(place, Method::POST, "/image-caches", Some(body))?;
                outln!("created image cache {name} ({kind}); it serves after the server restarts");
                return Ok(());
            }
            CacheCommand::Update { name, kind, source } => {
                let body = serde_json::to_value(source_patch(kind, source)?).map_err(err)?;
                let path = format!("/image-caches/{}", seg(&name));
                call(place, Method::PATCH, &path, Some(body))?;
                outln!("updated image cache {name} (restart berth to apply)");
                return Ok(());
            }
            CacheCommand::List { json } => {
                return print_caches(&list_all(place, "/image-caches")?, json)
            }
            CacheCommand::Delete { name } => {
                let path = format!("/image-caches/{}", seg(&name));
                call(place, Method::DELETE, &path, None)?;
                outln!("deleted image cache {name}");
                return Ok(());
            }
            CacheCommand::Prune {
                dry_run,
                unpulled_for,
                json,
            } => {
                let mut body = json!({ "dry_run": dry_run });
                if let Some(d) = unpulled_for {
                    body["unpulled_for"] = humantime::format_duration(d).to_string().into();
                }
                let report = call(place, Method::POST, "/cache/prune", Some(body))?;
                return print_prune(&report, json);
            }
            // Stats and prefetch always talk to a server.
            cmd => return cache(config, &Place::Local, server.as_deref(), cmd),
        }
    }
    match cmd {
        CacheCommand::Create { name, kind, source } => {
            let meta = admin::open_meta(config)?;
            let url = source.url.clone().ok_or("--url is required")?;
            let mut c = ImageCacheConfig::new(&name, kind, &url);
            source_patch(None, source)?.apply(&mut c)?;
            admin::put_image_cache(&meta, config, c, false)?;
            outln!("created image cache {name} ({kind}); use it with `berth registry create NAME --type cache --cache {name}`");
        }
        CacheCommand::Update { name, kind, source } => {
            let meta = admin::open_meta(config)?;
            let mut c = meta
                .image_cache(&name)
                .map_err(err)?
                .ok_or_else(|| format!("image cache {name:?} does not exist"))?;
            source_patch(kind, source)?.apply(&mut c)?;
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
            print_caches(&caches, json)?;
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
            print_prune(&berth::api::caches::prune_json(&report, dry_run), json)?;
        }
        CacheCommand::Stats { json } => {
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
