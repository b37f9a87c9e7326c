//! berth: an edge container registry: origin registry, pull-through cache and replication worker.
//!
//! Data flows one way: listener → router → behaviour → store (DESIGN.md 3).

pub mod config;
pub mod error;
pub mod http;
pub mod metrics;
pub mod oci;
pub mod registry;
pub mod store;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;

use config::Config;
use store::meta::{now_ms, RegistryRecord};
use store::Store;

/// Shared state of a running server: configuration and store.
pub struct App {
    /// The configuration it started with.
    pub config: Config,
    /// Everything stored.
    pub store: Store,
    /// Random per-process prefix of request ids.
    pub boot_id: u32,
    /// Set once every listener is bound.
    pub ready: AtomicBool,
}

/// A failure to start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Store could not be opened.
    #[error("cannot open data directory {dir}: {source}")]
    Store {
        dir: std::path::PathBuf,
        source: error::Error,
    },
    /// A listener could not be bound or its TLS files loaded.
    #[error("{0}")]
    Listen(String),
}

/// A running server.
pub struct Server {
    app: Arc<App>,
    addrs: Vec<(SocketAddr, bool)>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

/// Creates registries declared in the config (the config wins over a stored type).
pub fn apply_registry_config(store: &Store, config: &Config) -> Result<(), error::Error> {
    for r in &config.registry {
        match store.registry(&r.name) {
            Some(existing) if existing.kind == r.kind => {}
            existing => {
                if let Some(e) = &existing {
                    tracing::warn!(registry = %r.name, from = %e.kind, to = %r.kind, "registry type changed by config");
                }
                store.put_registry(RegistryRecord {
                    name: r.name.clone(),
                    kind: r.kind,
                    created_ms: existing.map_or_else(now_ms, |e| e.created_ms),
                })?;
            }
        }
    }
    Ok(())
}

impl Server {
    /// Opens the store, creates configured registries, binds every listener and starts serving.
    pub async fn start(config: Config) -> Result<Server, StartError> {
        crate::metrics::init();
        let store_err = |source| StartError::Store {
            dir: config.data_dir.clone(),
            source,
        };
        let store = Store::open(&config.data_dir, &config).map_err(store_err)?;
        apply_registry_config(&store, &config).map_err(store_err)?;
        let mut bound = Vec::new();
        for l in &config.listen {
            bound.push(http::server::bind(l).await.map_err(StartError::Listen)?);
        }
        let app = Arc::new(App {
            config,
            store,
            boot_id: rand_u32(),
            ready: AtomicBool::new(false),
        });
        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        let addrs = bound.iter().map(|b| (b.addr, b.tls.is_some())).collect();
        let grace = app.config.shutdown_grace;
        for b in bound {
            tasks.spawn(http::server::serve(app.clone(), b, stop_rx.clone(), grace));
        }
        tasks.spawn(housekeeping(app.clone(), stop_rx));
        app.ready.store(true, Ordering::Release);
        Ok(Server {
            app,
            addrs,
            stop,
            tasks,
        })
    }

    /// Bound addresses and whether each is TLS.
    pub fn local_addrs(&self) -> &[(SocketAddr, bool)] {
        &self.addrs
    }

    /// Shared state (tests and admin tasks).
    pub fn app(&self) -> &Arc<App> {
        &self.app
    }

    /// Stops accepting, lets open requests finish within the grace period, flushes metadata.
    pub async fn shutdown(mut self) {
        self.app.ready.store(false, Ordering::Release);
        let _ = self.stop.send(true);
        while self.tasks.join_next().await.is_some() {}
        if let Err(e) = self.app.store.pulls.flush(&self.app.store.meta) {
            tracing::error!(error = %e, "could not write last-pull times");
        }
        if let Err(e) = self.app.store.meta.flush().await {
            tracing::error!(error = %e, "could not flush metadata");
        }
    }
}

/// Periodic work: batched last-pull writes (1 s), expired uploads and storage size (5 min).
async fn housekeeping(app: Arc<App>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = app.store.pulls.flush(&app.store.meta) {
            tracing::error!(error = %e, "could not write last-pull times");
        }
        if n.is_multiple_of(300) {
            let app = app.clone();
            let _ = tokio::task::spawn_blocking(move || {
                match app.store.uploads.expire(app.config.limits.upload_expiry) {
                    Ok(0) => {}
                    Ok(k) => tracing::info!(removed = k, "expired upload sessions removed"),
                    Err(e) => tracing::warn!(error = %e, "could not expire upload sessions"),
                }
                if let Ok(blobs) = app.store.blobs.list() {
                    crate::metrics::storage_bytes(blobs.iter().map(|(_, s)| s).sum());
                }
            })
            .await;
        }
        n += 1;
    }
}

fn rand_u32() -> u32 {
    let id = uuid::Uuid::new_v4();
    u32::from_le_bytes(id.as_bytes()[..4].try_into().expect("4 bytes"))
}
