//! The `berth` command: `serve`, and admin subcommands acting on the data directory.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use berth::config::{Config, RegistryKind};
use berth::store::meta::{now_ms, Meta, RegistryRecord};

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
            println!("{config:#?}");
            Ok(())
        }
        Command::Registry(cmd) => registry(&config, cmd),
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

fn serve(config: Config) -> Result<(), String> {
    init_logging(&config.log);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("berth")
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async move {
        let data_dir = config.data_dir.clone();
        let server = berth::Server::start(config)
            .await
            .map_err(|e| e.to_string())?;
        for (addr, tls) in server.local_addrs() {
            let scheme = if *tls { "https" } else { "http" };
            println!("berth listening on {scheme}://{addr}");
            tracing::info!(%addr, tls, data_dir = %data_dir.display(), "listening");
        }
        println!("berth ready");
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

fn open_meta(config: &Config) -> Result<Meta, String> {
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|e| format!("{}: {e}", config.data_dir.display()))?;
    Meta::open(&config.data_dir).map_err(|e| {
        format!(
            "cannot open metadata in {}: {e} (is `berth serve` running on this data directory? stop it first)",
            config.data_dir.display()
        )
    })
}

fn registry(config: &Config, cmd: RegistryCommand) -> Result<(), String> {
    let meta = open_meta(config)?;
    match cmd {
        RegistryCommand::Create { name, kind } => {
            berth::oci::reference::validate_registry_name(&name).map_err(|e| e.to_string())?;
            if meta.registry(&name).map_err(|e| e.to_string())?.is_some() {
                return Err(format!("registry {name:?} already exists"));
            }
            meta.put_registry(&RegistryRecord {
                name: name.clone(),
                kind,
                created_ms: now_ms(),
                cache: None,
            })
            .map_err(|e| e.to_string())?;
            meta.flush_blocking().map_err(|e| e.to_string())?;
            println!("created registry {name} ({kind})");
        }
        RegistryCommand::List { json } => {
            let regs = meta.registries().map_err(|e| e.to_string())?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&regs).map_err(|e| e.to_string())?
                );
            } else {
                println!("{:<32} {:<8} REPOSITORIES", "NAME", "TYPE");
                for r in regs {
                    let repos = meta
                        .repositories(Some(&r.name), None, usize::MAX)
                        .map_err(|e| e.to_string())?
                        .len();
                    println!("{:<32} {:<8} {}", r.name, r.kind, repos);
                }
            }
        }
        RegistryCommand::Delete { name, force } => {
            if meta.registry(&name).map_err(|e| e.to_string())?.is_none() {
                return Err(format!("registry {name:?} does not exist"));
            }
            let repos = meta
                .repositories(Some(&name), None, usize::MAX)
                .map_err(|e| e.to_string())?;
            if !repos.is_empty() && !force {
                return Err(format!(
                    "registry {name:?} still holds {} repositories (e.g. {}); use --force to delete them too",
                    repos.len(),
                    repos[0]
                ));
            }
            meta.delete_registry(&name).map_err(|e| e.to_string())?;
            meta.flush_blocking().map_err(|e| e.to_string())?;
            println!("deleted registry {name}");
        }
    }
    Ok(())
}
