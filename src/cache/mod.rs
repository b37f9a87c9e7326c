//! Image-cache behaviour: cache-type registries served from a source registry, as a thin layer
//! over the local store (DESIGN.md 2, 5, 6).

pub mod credentials;
pub mod evict;
pub mod fetch;
pub mod health;
pub mod peer;
pub mod serve;
pub mod sweep;
pub mod upstream;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::{Config, RegistryKind};
use crate::error::{Error, Result};
use crate::http::router::query_param;
use crate::oci::reference::RepoName;
use crate::store::meta::{MetaStore, RegistryRecord};
use crate::store::Store;
use fetch::Fetches;
use upstream::Source;

/// The cache outcome of a request, carried in response extensions for the log line and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Cache registry.
    pub registry: &'static str,
    /// `hit`, `miss`, `revalidated`, `stale` or `coalesced`.
    pub outcome: &'static str,
}

/// State of all image caches on this node.
pub struct Cache {
    /// The source of each image cache, rebuilt when one is created, changed or deleted.
    sources: parking_lot::RwLock<HashMap<String, Arc<Source>>>,
    /// What every source is built with.
    pull_through: crate::config::PullThrough,
    egress: Arc<crate::http::egress::EgressPolicy>,
    /// Blob fetches in flight and partial files.
    pub fetches: Arc<Fetches>,
    /// When each `repo\0tag` was last revalidated against its source.
    validated: moka::sync::Cache<String, Instant>,
    /// One revalidation per tag at a time; the others wait and reuse its answer.
    revalidating: moka::sync::Cache<String, Arc<tokio::sync::Mutex<()>>>,
    /// Registry names interned for metric labels.
    labels: parking_lot::Mutex<HashMap<String, &'static str>>,
    mirror: Option<String>,
    /// What each image cache's source is doing, kept across rebuilds of its source.
    health: parking_lot::Mutex<HashMap<String, Arc<health::Health>>>,
}

/// Where a request with a repository name goes.
pub enum Target {
    /// A normal registry's repository.
    Origin(RepoName),
    /// A cache registry.
    Cache(CacheTarget),
}

impl Target {
    /// The local repository it addresses.
    pub fn repo(&self) -> &RepoName {
        match self {
            Target::Origin(repo) => repo,
            Target::Cache(t) => &t.repo,
        }
    }
}

/// A request for a cache registry.
pub struct CacheTarget {
    /// Local repository: `CACHEREG/UPSTREAM-PATH`.
    pub repo: RepoName,
    /// Repository at the source.
    pub upstream: String,
    /// The source.
    pub source: Arc<Source>,
    /// containerd's `ns`, echoed as `OCI-Namespace`.
    pub ns: Option<String>,
    /// Reached through `[mirror]` (the name has no registry prefix): what a Docker daemon asks
    /// its mirror, which falls back to Docker Hub without a word when refused.
    pub via_mirror: bool,
}

impl Cache {
    /// Builds the sources of every image cache the store knows.
    pub async fn open(config: &Config, store: &Store) -> std::result::Result<Cache, String> {
        let cluster = peer::Cluster::open(config, &store.meta)
            .await?
            .map(Arc::new);
        let cache = Cache {
            sources: Default::default(),
            pull_through: config.pull_through.clone(),
            egress: Arc::new(crate::http::egress::EgressPolicy::from_config(config)),
            fetches: Arc::new(Fetches::new(store.blobs.clone(), cluster)),
            validated: moka::sync::Cache::builder().max_capacity(100_000).build(),
            revalidating: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_idle(Duration::from_secs(60))
                .build(),
            labels: Default::default(),
            mirror: config.mirror.registry.clone(),
            health: Default::default(),
        };
        for record in store.meta.image_caches().await.map_err(|e| e.to_string())? {
            cache.load(&*store.meta, &record.name).await?;
        }
        Ok(cache)
    }

    /// (Re)builds the source of an image cache from what is stored, or forgets it when it is
    /// gone: a cache created, changed or deleted at run time applies to the next request.
    pub async fn load(&self, meta: &dyn MetaStore, name: &str) -> std::result::Result<(), String> {
        let Some(record) = meta.image_cache(name).await.map_err(|e| e.to_string())? else {
            self.sources.write().remove(name);
            self.health.lock().remove(name);
            return Ok(());
        };
        let credentials = meta.credentials(name).await.map_err(|e| e.to_string())?;
        let c = crate::config::ImageCacheConfig::from_records(record, credentials);
        let health = self
            .health
            .lock()
            .entry(name.to_string())
            .or_default()
            .clone();
        let source = Source::build(c, &self.pull_through, self.egress.clone())?.with_health(health);
        self.sources
            .write()
            .insert(name.to_string(), Arc::new(source));
        Ok(())
    }

    /// The source of an image cache.
    pub fn source(&self, name: &str) -> Option<Arc<Source>> {
        self.sources.read().get(name).cloned()
    }

    /// The health of an image cache's source as last seen (`None`: never built).
    pub fn health(&self, name: &str) -> Option<health::HealthSnapshot> {
        self.health.lock().get(name).map(|h| h.snapshot())
    }

    /// A `'static` label for a registry name (registries are few and long-lived).
    pub fn label(&self, registry: &str) -> &'static str {
        let mut labels = self.labels.lock();
        if let Some(l) = labels.get(registry) {
            return l;
        }
        let l: &'static str = Box::leak(registry.to_string().into_boxed_str());
        labels.insert(registry.to_string(), l);
        l
    }

    /// Resolves a request's repository name: by `?ns=`, by registry prefix, or by the mirror.
    pub fn resolve(&self, store: &Store, name: &str, query: Option<&str>) -> Result<Target> {
        if let Some(ns) = query_param(query, "ns") {
            let sources = self.sources.read();
            let serves = |r: &RegistryRecord| {
                r.cache
                    .as_deref()
                    .and_then(|c| sources.get(c))
                    .is_some_and(|s| s.serves_host(&ns))
            };
            let by_ns = store.find_registry(serves).and_then(|r| {
                let source = sources.get(r.cache.as_deref()?)?.clone();
                Some((r.name.clone(), source))
            });
            drop(sources);
            if let Some((registry, source)) = by_ns {
                return cache_target(&registry, source, name, Some(ns));
            }
        }
        let first = name.split('/').next().unwrap_or("");
        if let Some(r) = store.registry(first) {
            if r.kind == RegistryKind::Normal {
                return Ok(Target::Origin(RepoName::parse(name)?));
            }
            let rest = name.split_once('/').map(|(_, rest)| rest).unwrap_or("");
            if rest.is_empty() {
                return Err(Error::NameInvalid(format!(
                    "{name:?}: expected {first}/UPSTREAM-PATH"
                )));
            }
            let source = self.registry_source(&r.name, r.cache.as_deref())?;
            return cache_target(&r.name, source, rest, None);
        }
        if let Some(mirror) = &self.mirror {
            if let Some(r) = store.registry(mirror) {
                let source = self.registry_source(&r.name, r.cache.as_deref())?;
                let mut target = cache_target(&r.name, source, name, None)?;
                if let Target::Cache(t) = &mut target {
                    t.via_mirror = true;
                }
                return Ok(target);
            }
        }
        // Neither a registry nor a mirror path: validate, then report the missing registry.
        RepoName::parse(name)?;
        Err(crate::http::req::no_such_registry(first))
    }

    fn registry_source(&self, registry: &str, cache: Option<&str>) -> Result<Arc<Source>> {
        cache.and_then(|c| self.source(c)).ok_or_else(|| {
            Error::Internal(format!(
                "cache registry {registry:?} names no known image cache"
            ))
        })
    }
}

fn cache_target(
    registry: &str,
    source: Arc<Source>,
    path: &str,
    ns: Option<String>,
) -> Result<Target> {
    let upstream = source.upstream_repo(path);
    let repo = RepoName::parse(&format!("{registry}/{upstream}"))?;
    Ok(Target::Cache(CacheTarget {
        repo,
        upstream,
        source,
        ns,
        via_mirror: false,
    }))
}

/// Re-export for handlers.
pub use serve::{blob, manifest};
