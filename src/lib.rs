//! berth: an edge container registry: origin registry, pull-through cache and replication worker.
//!
//! Data flows one way: listener → dispatch → behaviour → store (DESIGN.md 3).

// No unsafe code but one system call no safe crate wraps (`store::fs::start_writeback`).
#![deny(unsafe_code)]
#![deny(missing_docs)]
#![deny(clippy::unwrap_used)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod api;
pub mod auth;
pub mod backup;
pub mod cache;
pub mod cli;
pub mod config;
pub mod dispatch;
pub mod durations;
pub mod error;
pub mod events;
pub mod http;
pub mod jobs;
pub mod metrics;
pub mod oci;
pub mod policy;
pub mod registry;
pub mod reload;
pub mod replication;
pub mod scheduler;
pub mod serve;
pub mod store;
#[doc(hidden)]
pub mod testbed;

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
    pub store: Arc<Store>,
    /// Hot manifests, kept current by the metadata's change notifications.
    pub manifests: Arc<serve::manifests::ManifestCache>,
    /// Image caches and their fetches.
    pub cache: cache::Cache,
    /// Users, keys, tokens and the authorization check.
    pub auth: Arc<auth::Auth>,
    /// The event bus.
    pub events: events::Events,
    /// Cleanup and protection policies.
    pub policies: Arc<policy::book::Policies>,
    /// Executions of background jobs.
    pub jobs: jobs::executions::Jobs,
    /// Replication rules, endpoints and the event queue.
    pub replication: Arc<replication::Replication>,
    /// Where background jobs run (at a lower CPU priority).
    pub job_runtime: Arc<jobs::runtime::JobRuntime>,
    /// Random per-process prefix of request ids.
    pub boot_id: u32,
    /// Set once every listener is bound.
    pub ready: AtomicBool,
    /// The listeners' certificates, for reloads.
    pub reloadable: reload::Reloadable,
}

/// A failure to start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Store could not be opened.
    #[error("cannot open data directory {dir}: {source}")]
    Store {
        /// The data directory.
        dir: std::path::PathBuf,
        /// Why it could not be opened.
        source: error::Error,
    },
    /// A listener, TLS file or image cache definition is unusable.
    #[error("{0}")]
    Listen(String),
    /// The config leads to a state `serve` refuses (nothing was written).
    #[error("config refused, nothing was changed in the data directory:\n  - {}", .0.join("\n  - "))]
    Config(Vec<String>),
}

/// A running server.
pub struct Server {
    app: Arc<App>,
    addrs: Vec<(SocketAddr, bool)>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

/// What `serve` would refuse in the registries and image caches a config leads to (see
/// [`Config::plan_problems`]), and image caches whose source cannot be built: start, reload and
/// `check-config` ask this one question.
pub fn start_problems(config: &Config, stored: Option<&config::Stored>) -> config::Problems {
    let mut problems = config.plan_problems(stored);
    for c in &config.image_cache {
        if let Err(e) = cache::upstream::Source::new(c.clone(), &config.pull_through.allowed_ports)
        {
            problems.errors.push(e);
        }
    }
    problems
}

/// Creates image caches and registries declared in the config (the config wins over what is
/// stored), after checking the state this leads to: a refused config changes nothing stored.
pub async fn apply_config(store: &Store, config: &Config) -> Result<(), StartError> {
    let store_err = |source: error::Error| StartError::Store {
        dir: config.data_dir.clone(),
        source,
    };
    let stored = config::Stored {
        registries: store.registries().iter().map(|r| (*r).clone()).collect(),
        image_caches: store
            .meta
            .image_caches()
            .await
            .map_err(|e| store_err(e.into()))?
            .into_iter()
            .map(|c| c.name)
            .collect(),
    };
    let checked = start_problems(config, Some(&stored));
    for w in &checked.warnings {
        tracing::warn!("{w}");
    }
    let problems = checked.errors;
    if !problems.is_empty() {
        return Err(StartError::Config(problems));
    }
    for c in &config.image_cache {
        let (record, credentials) = c.to_records();
        store
            .meta
            .put_image_cache(&record, Some(&credentials))
            .await
            .map_err(|e| store_err(e.into()))?;
    }
    for r in &config.registry {
        let declared = config.registry_record(r);
        match store.registry(&r.name) {
            Some(existing) if existing.same_settings(&declared) => {}
            existing => {
                if let Some(e) = &existing {
                    tracing::warn!(registry = %r.name, from = %e.kind, to = %r.kind, "registry changed by config");
                }
                store
                    .put_registry(RegistryRecord {
                        created_ms: existing.map_or_else(now_ms, |e| e.created_ms),
                        ..declared
                    })
                    .await
                    .map_err(|e| store_err(e.into()))?;
            }
        }
    }
    if let Some(m) = config
        .mirror
        .registry
        .as_deref()
        .and_then(|m| store.registry(m))
    {
        if !m.anonymous_pull && config.auth.mode != config::AuthMode::Off {
            tracing::warn!(registry = %m.name, "the mirror registry does not allow anonymous pull: Docker daemons that do not log in to their mirror fall back to Docker Hub without a word");
        }
    }
    store.meta.flush().await.map_err(|e| store_err(e.into()))?;
    Ok(())
}

impl App {
    /// Garbage collection of this node's blobs.
    pub fn gc(&self) -> jobs::gc::Collector {
        jobs::gc::Collector {
            store: self.store.clone(),
            jobs: self.jobs.clone(),
            grace: self.config.pull_through.gc_grace,
            runtime: self.job_runtime.clone(),
        }
    }

    /// Opens a data directory with its configuration: store (taking the directory's lock),
    /// image caches, users and keys, webhook policies; no listener, no background work. With
    /// `apply`, registries and image caches declared in the config are created or updated first
    /// (the server does; the CLI on a data directory does not).
    pub async fn open(config: Config, apply: bool) -> Result<App, StartError> {
        let store_err = |source| StartError::Store {
            dir: config.data_dir.clone(),
            source,
        };
        let store = Store::open_with(&config.data_dir, &config.storage, &config.metadata)
            .await
            .map_err(store_err)?;
        if apply {
            apply_config(&store, &config).await?;
        }
        let cache = cache::Cache::open(&config, &store)
            .await
            .map_err(StartError::Listen)?;
        let auth = auth::Auth::open(&store, &config.data_dir, &config.auth)
            .await
            .map_err(store_err)?;
        let egress = Arc::new(http::egress::EgressPolicy::from_config(&config));
        let webhooks =
            events::webhooks::Webhooks::open_with(&store.meta, &config.webhooks, egress.clone())
                .await
                .map_err(store_err)?;
        let replication = Arc::new(
            replication::Replication::open(store.meta.clone(), &config.replication, egress)
                .await
                .map_err(|e| store_err(e.into()))?,
        );
        if apply {
            replication
                .apply(&config.replication)
                .await
                .map_err(|e| StartError::Config(vec![e]))?;
        }
        let policies = policy::book::Policies::open(store.meta.clone())
            .await
            .map_err(store_err)?;
        let jobs = jobs::executions::Jobs::open(store.meta.clone())
            .await
            .map_err(|e| store_err(e.into()))?;
        let manifests = Arc::new(serve::manifests::ManifestCache::new(
            config.memory.manifest_bytes,
            store.meta.refresh(),
        ));
        let subscriber = manifests.clone();
        store
            .meta
            .subscribe(Box::new(move |change| subscriber.forget(change)));
        let events = events::Events::new(webhooks);
        events.listen(replication.clone());
        Ok(App {
            config,
            manifests,
            store: Arc::new(store),
            cache,
            auth: Arc::new(auth),
            events,
            replication,
            policies: Arc::new(policies),
            jobs,
            job_runtime: Arc::new(
                jobs::runtime::JobRuntime::start().map_err(|e| {
                    StartError::Listen(format!("cannot start the jobs' runtime: {e}"))
                })?,
            ),
            boot_id: rand_u32(),
            ready: AtomicBool::new(false),
            reloadable: Default::default(),
        })
    }
}

impl Server {
    /// Opens the store, creates configured registries, binds every listener and starts serving.
    pub async fn start(config: Config) -> Result<Server, StartError> {
        crate::metrics::init();
        let app = Arc::new(App::open(config, true).await?);
        let mut bound = Vec::new();
        for l in &app.config.listen {
            let b = http::server::bind(l).await.map_err(StartError::Listen)?;
            if let Some(cert) = &b.cert {
                app.reloadable
                    .add_certificate(l.addr.to_string(), cert.clone());
            }
            bound.push(b);
        }
        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        let addrs: Vec<_> = bound.iter().map(|b| (b.addr, b.tls.is_some())).collect();
        if let Some(cluster) = &app.cache.fetches.cluster {
            cluster.advertise(&addrs);
        }
        let grace = app.config.shutdown_grace;
        for b in bound {
            tasks.spawn(http::server::serve(app.clone(), b, stop_rx.clone(), grace));
        }
        if let Some(dispatcher) = app.events.start(stop_rx.clone()) {
            tasks.spawn(dispatcher);
        }
        tasks.spawn(housekeeping(app.clone(), stop_rx.clone()));
        tasks.spawn(replication::run::dispatch(app.clone(), stop_rx.clone()));
        tasks.spawn(scheduler::run(app.clone(), stop_rx));
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
        // Jobs hold the server's state: they stop here, not when it is dropped (which they
        // would prevent).
        self.app.job_runtime.stop().await;
        if let Err(e) = self.app.store.pulls.flush(&*self.app.store.meta).await {
            tracing::error!(error = %e, "could not write last-pull times");
        }
        match tokio::time::timeout(Duration::from_secs(10), self.app.store.meta.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "could not flush metadata"),
            Err(_) => tracing::error!("metadata flush did not finish within 10 s; exiting anyway"),
        }
    }
}

/// Bytes of every committed blob, a page at a time.
async fn stored_bytes(blobs: &dyn store::blobs::BlobStore) -> std::io::Result<u64> {
    let (mut total, mut after) = (0, None);
    loop {
        let page = blobs.list(after.as_ref(), 1000).await?;
        let Some((last, _)) = page.last() else {
            return Ok(total);
        };
        after = Some(last.clone());
        total += page.iter().map(|(_, i)| i.size).sum::<u64>();
    }
}

/// Periodic work: batched last-pull writes (1 s); expired uploads, stale partial fetches and
/// storage size (5 min); the cache's size against its cap (`pull_through.evict_interval`).
/// Cleanups and garbage collection run on their own schedules (`scheduler`).
async fn housekeeping(app: Arc<App>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = app.store.pulls.flush(&*app.store.meta).await {
            tracing::error!(error = %e, "could not write last-pull times");
        }
        let evict_every = app.config.pull_through.evict_interval.as_secs().max(1);
        if n > 0 && n.is_multiple_of(evict_every) {
            if let Err(e) = cache::evict::check(&app).await {
                tracing::warn!(error = %e, "could not check the cache's size against its cap");
            }
        }
        if n.is_multiple_of(300) {
            match app
                .store
                .uploads
                .expire(app.config.limits.upload_expiry)
                .await
            {
                Ok(0) => {}
                Ok(k) => tracing::info!(removed = k, "expired upload sessions removed"),
                Err(e) => tracing::warn!(error = %e, "could not expire upload sessions"),
            }
            let max_age = app.config.pull_through.partial_max_age;
            match app.cache.fetches.expire_partials(max_age).await {
                Ok(0) => {}
                Ok(bytes) => tracing::info!(bytes, "stale partial fetches removed"),
                Err(e) => tracing::warn!(error = %e, "could not expire partial fetches"),
            }
            match stored_bytes(&*app.store.blobs).await {
                Ok(bytes) => crate::metrics::storage_bytes(bytes),
                Err(e) => tracing::warn!(error = %e, "could not list blobs for the storage size"),
            }
        }
        n += 1;
    }
}

fn rand_u32() -> u32 {
    let id = uuid::Uuid::new_v4();
    u32::from_le_bytes(id.as_bytes()[..4].try_into().expect("4 bytes"))
}
