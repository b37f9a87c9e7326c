//! Metadata in sled: registries, repositories, blob links, artifacts, tags, referrers, pull times.
//!
//! Keys are `repo \0 …`: names and tags cannot contain NUL, so a prefix scan of `repo\0` is
//! exactly one repository and byte order is lexical order (what tag lists and the catalog need).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::oci::digest::Digest;
use crate::oci::manifest::Descriptor;

/// Type of a registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RegistryKind {
    /// Push and pull.
    #[default]
    Normal,
    /// Pull-through cache of a source registry; push refused.
    Cache,
}

impl std::fmt::Display for RegistryKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RegistryKind::Normal => "normal",
            RegistryKind::Cache => "cache",
        })
    }
}

impl std::str::FromStr for RegistryKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "normal" => Ok(RegistryKind::Normal),
            "cache" => Ok(RegistryKind::Cache),
            other => Err(format!(
                "unknown registry type {other:?} (expected normal or cache)"
            )),
        }
    }
}

/// Kind of a source registry (decides the endpoint and the credential flow).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// Docker Hub (`hub.docker.com` → `registry-1.docker.io`, tokens from `auth.docker.io`).
    Dockerhub,
    /// Amazon ECR (SigV4 `GetAuthorizationToken`, then basic auth).
    Ecr,
    /// Azure Container Registry.
    Acr,
    /// Google Container Registry / Artifact Registry (`_json_key`).
    Gcr,
    /// Harbor.
    Harbor,
    /// Quay (`account_name` / `docker_cli_password`).
    Quay,
    /// Any OCI Distribution registry.
    Registry,
}

impl std::fmt::Display for SourceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = serde_json::to_value(self).ok();
        f.write_str(s.as_ref().and_then(|v| v.as_str()).unwrap_or("registry"))
    }
}

impl std::str::FromStr for SourceKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        serde_json::from_value(serde_json::Value::String(s.to_string())).map_err(|_| {
            format!(
                "unknown image cache kind {s:?} (dockerhub, ecr, acr, gcr, harbor, quay, registry)"
            )
        })
    }
}

fn yes() -> bool {
    true
}

/// A registry (namespace) record. Built by its caller (the config's `[[registry]]` tables, the
/// management API): the store knows no configuration type.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegistryRecord {
    /// Name (first path segment).
    pub name: String,
    /// normal or cache.
    pub kind: RegistryKind,
    /// Creation time, Unix milliseconds.
    pub created_ms: u64,
    /// Cache registries: the image cache they serve.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<String>,
    /// Reachable on public listeners.
    #[serde(default = "yes")]
    pub public_uri: bool,
    /// Anyone may pull without credentials.
    #[serde(default)]
    pub anonymous_pull: bool,
}

impl RegistryRecord {
    /// Whether both records have the same settings (everything but name and creation time).
    pub fn same_settings(&self, other: &RegistryRecord) -> bool {
        self.kind == other.kind
            && self.cache == other.cache
            && self.public_uri == other.public_uri
            && self.anonymous_pull == other.anonymous_pull
    }
}

/// An image cache (a source registry that cache registries pull through). Its credentials
/// are a record of their own ([`CredentialRecord`], in the `credentials` tree under the same
/// name), so that listing or showing image caches never reads a secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageCacheRecord {
    /// Name that cache registries refer to; also the key of its credential record.
    pub name: String,
    /// Source kind.
    pub kind: SourceKind,
    /// Source URL as the user knows it (`https://hub.docker.com`, ...).
    pub endpoint: String,
    /// How it is fetched from.
    pub settings: ImageCacheSettings,
}

/// Settings of an image cache other than its identity and its credentials.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageCacheSettings {
    /// How long one caching blob fetch may run before it stops and resumes later.
    #[serde(with = "millis")]
    pub fetch_budget_ms: Duration,
    /// A tag revalidated within this time is served without asking the source.
    #[serde(with = "millis")]
    pub revalidate_ttl_ms: Duration,
    /// ECR: region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// ECR: API endpoint for GetAuthorizationToken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ecr_endpoint: Option<String>,
}

/// The credentials of an image cache, kept apart from its definition. `Debug` never shows the
/// password.
#[derive(Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CredentialRecord {
    /// User (ECR: access key id; GCR: `_json_key`; Quay: account_name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Password or token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// File holding the credentials instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_file: Option<PathBuf>,
}

impl CredentialRecord {
    /// Whether it holds nothing (an anonymous source needs no record).
    pub fn is_empty(&self) -> bool {
        self.username.is_none() && self.password.is_none() && self.credentials_file.is_none()
    }
}

impl std::fmt::Debug for CredentialRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialRecord")
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("credentials_file", &self.credentials_file)
            .finish()
    }
}

/// Durations as whole milliseconds in records.
mod millis {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

/// The shape image caches had in the `image_caches` tree before credentials became a record of
/// their own (one JSON object with the credentials inline, durations as humantime text). Read
/// once, at open, by [`Meta::migrate_image_caches`].
#[derive(Deserialize)]
struct LegacyImageCache {
    name: String,
    kind: SourceKind,
    url: String,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    credentials_file: Option<PathBuf>,
    #[serde(default)]
    fetch_budget: Option<String>,
    #[serde(default)]
    revalidate_ttl: Option<String>,
    #[serde(default)]
    region: Option<String>,
    #[serde(default)]
    ecr_endpoint: Option<String>,
}

/// What the legacy shape defaulted `fetch_budget` to.
const LEGACY_FETCH_BUDGET: Duration = Duration::from_secs(200);

impl LegacyImageCache {
    fn split(self) -> MetaResult<(ImageCacheRecord, CredentialRecord)> {
        let duration = |field: &str, text: Option<String>, default: Duration| match text {
            None => Ok(default),
            Some(t) => humantime::parse_duration(&t).map_err(|e| {
                sled::Error::Unsupported(format!(
                    "image cache {:?}: stored {field} {t:?} is not a duration: {e}",
                    self.name
                ))
            }),
        };
        let settings = ImageCacheSettings {
            fetch_budget_ms: duration(
                "fetch_budget",
                self.fetch_budget.clone(),
                LEGACY_FETCH_BUDGET,
            )?,
            revalidate_ttl_ms: duration(
                "revalidate_ttl",
                self.revalidate_ttl.clone(),
                Duration::ZERO,
            )?,
            region: self.region,
            ecr_endpoint: self.ecr_endpoint,
        };
        Ok((
            ImageCacheRecord {
                name: self.name,
                kind: self.kind,
                endpoint: self.url,
                settings,
            },
            CredentialRecord {
                username: self.username,
                password: self.password,
                credentials_file: self.credentials_file,
            },
        ))
    }
}

/// A sled tree of JSON records of one type, keyed by text (`a \0 b` for compound keys).
pub struct Records<T> {
    tree: sled::Tree,
    _type: std::marker::PhantomData<fn() -> T>,
}

impl<T: Serialize + for<'de> Deserialize<'de>> Records<T> {
    /// Stores a record.
    pub fn put(&self, key: &[&str], value: &T) -> MetaResult<()> {
        self.tree.insert(self::key(key), json(value))?;
        Ok(())
    }

    /// One record.
    pub fn get(&self, key: &[&str]) -> MetaResult<Option<T>> {
        self.tree
            .get(self::key(key))?
            .map(|v| from_json(&v))
            .transpose()
    }

    /// Removes a record; returns it.
    pub fn remove(&self, key: &[&str]) -> MetaResult<Option<T>> {
        self.tree
            .remove(self::key(key))?
            .map(|v| from_json(&v))
            .transpose()
    }

    /// Records whose key starts with the parts `prefix` (all records for `&[]`), in key order,
    /// with the rest of their key.
    pub fn list(&self, prefix: &[&str]) -> MetaResult<Vec<(String, T)>> {
        let p = if prefix.is_empty() {
            Vec::new()
        } else {
            self::prefix(prefix)
        };
        self.tree
            .scan_prefix(&p)
            .map(|item| {
                let (k, v) = item?;
                Ok((tail_str(&k, p.len()), from_json(&v)?))
            })
            .collect()
    }

    /// Removes every record under the key parts `prefix`; returns how many.
    pub fn remove_prefix(&self, prefix: &[&str]) -> MetaResult<usize> {
        let mut n = 0;
        for k in self.tree.scan_prefix(self::prefix(prefix)).keys() {
            self.tree.remove(k?)?;
            n += 1;
        }
        Ok(n)
    }
}

/// One artifact (manifest) in a repository.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArtifactRecord {
    /// Manifest media type.
    pub media_type: String,
    /// Manifest length in bytes.
    pub size: u64,
    /// Push time, Unix milliseconds.
    pub pushed_ms: u64,
    /// Artifact type (or config media type).
    #[serde(default)]
    pub artifact_type: Option<String>,
    /// Subject digest, for the referrers index.
    #[serde(default)]
    pub subject: Option<Digest>,
}

/// The sled database and its trees.
pub struct Meta {
    db: sled::Db,
    /// Group commit: writes announced, writes known durable, one flusher at a time.
    announced: std::sync::atomic::AtomicU64,
    durable: std::sync::atomic::AtomicU64,
    flusher: tokio::sync::Mutex<()>,
    registries: sled::Tree,
    image_caches: sled::Tree,
    /// Credentials of image caches, keyed by image cache name.
    credentials: sled::Tree,
    repos: sled::Tree,
    blob_links: sled::Tree,
    artifacts: sled::Tree,
    tags: sled::Tree,
    referrers: sled::Tree,
    pulls: sled::Tree,
    /// Striped per-repository locks: the records of one push or one delete (artifact, tags,
    /// referrer, catalog entry) change together, never interleaved with another writer of the
    /// same repository, so a tag never points at an artifact that is gone.
    repo_locks: Box<[parking_lot::Mutex<()>]>,
    /// This process's hold on the data directory.
    _lock: super::lock::DataDirLock,
    /// Told of every change to registries, artifacts and tags.
    subscribers: parking_lot::RwLock<Vec<Subscriber>>,
}

/// What changed in the metadata: in-memory caches above the store (hot manifests) subscribe
/// with [`Meta::subscribe`] and drop what the change makes stale. Notified synchronously, after
/// the write and before the writer returns, so a client that reads its own write never sees the
/// old state from a cache.
#[derive(Debug, Clone, Copy)]
pub enum Change<'a> {
    /// A tag was set, moved or removed.
    Tag {
        /// Repository.
        repo: &'a str,
        /// Tag.
        tag: &'a str,
    },
    /// An artifact was recorded or removed.
    Artifact {
        /// Repository.
        repo: &'a str,
        /// Its digest.
        digest: &'a Digest,
    },
    /// A registry and possibly everything under it changed.
    Registry {
        /// Its name.
        name: &'a str,
    },
}

/// A subscriber to metadata changes.
pub type Subscriber = Box<dyn Fn(Change<'_>) + Send + Sync>;

/// Stripes of [`Meta`]'s repository locks.
const REPO_LOCK_STRIPES: usize = 64;

/// A metadata failure.
pub type MetaResult<T> = Result<T, sled::Error>;

fn key(parts: &[&str]) -> Vec<u8> {
    let mut k = Vec::with_capacity(parts.iter().map(|p| p.len() + 1).sum());
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            k.push(0);
        }
        k.extend_from_slice(p.as_bytes());
    }
    k
}

fn prefix(parts: &[&str]) -> Vec<u8> {
    let mut k = key(parts);
    k.push(0);
    k
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("metadata records serialize")
}

fn from_json<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> MetaResult<T> {
    serde_json::from_slice(bytes)
        .map_err(|e| sled::Error::Unsupported(format!("corrupt metadata record: {e}")))
}

fn tail_str(k: &[u8], prefix_len: usize) -> String {
    String::from_utf8_lossy(&k[prefix_len..]).into_owned()
}

/// Unix time now, in milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Meta {
    /// Opens (creating) `DATA/meta`.
    pub fn open(data_dir: &std::path::Path) -> MetaResult<Meta> {
        // Before anything in the directory is read or changed (the blob store empties its temp
        // directory when it opens, which must never happen under a running server).
        let lock = super::lock::DataDirLock::acquire(data_dir)
            .map_err(|e| sled::Error::Io(std::io::Error::other(e)))?;
        let db = sled::Config::new()
            .path(data_dir.join("meta"))
            .cache_capacity(64 * 1024 * 1024)
            .open()?;
        let meta = Meta {
            registries: db.open_tree("registries")?,
            image_caches: db.open_tree("image_caches")?,
            credentials: db.open_tree("credentials")?,
            repos: db.open_tree("repos")?,
            blob_links: db.open_tree("blob_links")?,
            artifacts: db.open_tree("artifacts")?,
            tags: db.open_tree("tags")?,
            referrers: db.open_tree("referrers")?,
            pulls: db.open_tree("pulls")?,
            db,
            announced: Default::default(),
            durable: Default::default(),
            flusher: Default::default(),
            _lock: lock,
            subscribers: Default::default(),
            repo_locks: (0..REPO_LOCK_STRIPES)
                .map(|_| parking_lot::Mutex::new(()))
                .collect(),
        };
        meta.migrate_image_caches()?;
        Ok(meta)
    }

    /// Rewrites image caches stored in the legacy shape (credentials inline) as an
    /// [`ImageCacheRecord`] and a [`CredentialRecord`], each pair in one transaction; records
    /// already in the current shape are left alone, so running it again changes nothing.
    fn migrate_image_caches(&self) -> MetaResult<()> {
        let mut migrated = 0;
        for item in self.image_caches.iter() {
            let (key, value) = item?;
            if serde_json::from_slice::<ImageCacheRecord>(&value).is_ok() {
                continue;
            }
            let legacy: LegacyImageCache = from_json(&value)?;
            let (record, credentials) = legacy.split()?;
            // An anonymous source gets no credential record (as `put_image_cache` stores it).
            let credentials = (!credentials.is_empty()).then(|| json(&credentials));
            let record = json(&record);
            self.image_cache_transaction(|caches, creds| {
                caches.insert(key.clone(), record.clone())?;
                match &credentials {
                    Some(c) => creds.insert(key.clone(), c.clone())?,
                    None => creds.remove(key.clone())?,
                };
                Ok(())
            })?;
            tracing::info!(
                image_cache = %String::from_utf8_lossy(&key),
                "image cache record migrated: its credentials are now a record of their own"
            );
            migrated += 1;
        }
        if migrated > 0 {
            self.db.flush()?;
        }
        Ok(())
    }

    /// Adds a subscriber to every later change.
    pub fn subscribe(&self, subscriber: Subscriber) {
        self.subscribers.write().push(subscriber);
    }

    fn notify(&self, change: Change<'_>) {
        for s in self.subscribers.read().iter() {
            s(change);
        }
    }

    /// The write lock of a repository. Held only across sled calls (no I/O awaits); a panic
    /// while it is held poisons nothing: the next writer takes it over.
    fn lock_repo(&self, repo: &str) -> parking_lot::MutexGuard<'_, ()> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        repo.hash(&mut h);
        let stripe = (h.finish() % REPO_LOCK_STRIPES as u64) as usize;
        self.repo_locks[stripe].lock()
    }

    /// A tree of typed records owned by a behaviour (users, keys, webhooks, deliveries...).
    pub fn records<T>(&self, name: &str) -> MetaResult<Records<T>> {
        Ok(Records {
            tree: self.db.open_tree(name)?,
            _type: std::marker::PhantomData,
        })
    }

    /// Makes every write so far durable (called before a client is told a write succeeded).
    ///
    /// Group commit: concurrent callers share one fsync. sled's own `flush_async` is not used:
    /// it deadlocks under concurrent writers (sled issue 1308); a blocking flush on the blocking
    /// pool does not.
    pub async fn flush(&self) -> MetaResult<()> {
        use std::sync::atomic::Ordering;
        let mine = self.announced.fetch_add(1, Ordering::AcqRel) + 1;
        let _turn = self.flusher.lock().await;
        if self.durable.load(Ordering::Acquire) >= mine {
            return Ok(());
        }
        let target = self.announced.load(Ordering::Acquire);
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.flush())
            .await
            .map_err(|e| sled::Error::Unsupported(format!("flush task: {e}")))??;
        self.durable.store(target, Ordering::Release);
        Ok(())
    }

    /// Blocking flush (CLI, shutdown).
    pub fn flush_blocking(&self) -> MetaResult<()> {
        self.db.flush().map(|_| ())
    }

    // --- registries ---

    /// Creates or updates a registry record.
    pub fn put_registry(&self, r: &RegistryRecord) -> MetaResult<()> {
        self.registries.insert(r.name.as_bytes(), json(r))?;
        Ok(())
    }

    /// All registries, by name.
    pub fn registries(&self) -> MetaResult<Vec<RegistryRecord>> {
        self.registries
            .iter()
            .values()
            .map(|v| from_json(&v?))
            .collect()
    }

    /// One registry.
    pub fn registry(&self, name: &str) -> MetaResult<Option<RegistryRecord>> {
        self.registries
            .get(name)?
            .map(|v| from_json(&v))
            .transpose()
    }

    /// Deletes a registry and everything recorded under it.
    pub fn delete_registry(&self, name: &str) -> MetaResult<()> {
        let p = format!("{name}/");
        for tree in [
            &self.repos,
            &self.blob_links,
            &self.artifacts,
            &self.tags,
            &self.referrers,
            &self.pulls,
        ] {
            for k in tree.scan_prefix(p.as_bytes()).keys() {
                tree.remove(k?)?;
            }
        }
        self.registries.remove(name)?;
        self.notify(Change::Registry { name });
        Ok(())
    }

    // --- image caches ---

    /// Creates or replaces an image cache with its credentials (none: an anonymous source),
    /// both in one transaction.
    pub fn put_image_cache(
        &self,
        c: &ImageCacheRecord,
        credentials: Option<&CredentialRecord>,
    ) -> MetaResult<()> {
        let record = json(c);
        let credentials = credentials.filter(|c| !c.is_empty()).map(json);
        self.image_cache_transaction(|caches, creds| {
            caches.insert(c.name.as_bytes(), record.clone())?;
            match &credentials {
                Some(v) => creds.insert(c.name.as_bytes(), v.clone())?,
                None => creds.remove(c.name.as_bytes())?,
            };
            Ok(())
        })
    }

    /// Runs `f` as one sled transaction over the image cache and credential trees (retried by
    /// sled on conflict, so `f` must be repeatable).
    fn image_cache_transaction<A>(
        &self,
        f: impl Fn(
            &sled::transaction::TransactionalTree,
            &sled::transaction::TransactionalTree,
        ) -> sled::transaction::ConflictableTransactionResult<A, sled::Error>,
    ) -> MetaResult<A> {
        use sled::transaction::TransactionError;
        use sled::Transactional;
        (&self.image_caches, &self.credentials)
            .transaction(|(caches, creds)| f(caches, creds))
            .map_err(|e| match e {
                TransactionError::Abort(e) | TransactionError::Storage(e) => e,
            })
    }

    /// All image caches, by name.
    pub fn image_caches(&self) -> MetaResult<Vec<ImageCacheRecord>> {
        self.image_caches
            .iter()
            .values()
            .map(|v| from_json(&v?))
            .collect()
    }

    /// One image cache.
    pub fn image_cache(&self, name: &str) -> MetaResult<Option<ImageCacheRecord>> {
        self.image_caches
            .get(name)?
            .map(|v| from_json(&v))
            .transpose()
    }

    /// The credentials of an image cache (`None`: anonymous, or no such image cache).
    pub fn credentials(&self, image_cache: &str) -> MetaResult<Option<CredentialRecord>> {
        self.credentials
            .get(image_cache)?
            .map(|v| from_json(&v))
            .transpose()
    }

    /// Deletes an image cache and its credentials.
    pub fn delete_image_cache(&self, name: &str) -> MetaResult<bool> {
        self.image_cache_transaction(|caches, creds| {
            creds.remove(name.as_bytes())?;
            Ok(caches.remove(name.as_bytes())?.is_some())
        })
    }

    // --- repositories ---

    /// Repositories (of one registry, or all), lexically after `last`, at most `n`.
    pub fn repositories(
        &self,
        registry: Option<&str>,
        last: Option<&str>,
        n: usize,
    ) -> MetaResult<Vec<String>> {
        let registry_prefix = registry.map(|r| format!("{r}/"));
        let mut lower = registry_prefix.clone().unwrap_or_default().into_bytes();
        if let Some(l) = last {
            let mut after = l.as_bytes().to_vec();
            after.push(0);
            lower = lower.max(after);
        }
        let mut out = Vec::new();
        for k in self.repos.range(lower..).keys() {
            let name = tail_str(&k?, 0);
            if out.len() == n
                || registry_prefix
                    .as_ref()
                    .is_some_and(|p| !name.starts_with(p))
            {
                break;
            }
            out.push(name);
        }
        Ok(out)
    }

    /// Whether the repository has any artifact.
    pub fn repo_exists(&self, repo: &str) -> MetaResult<bool> {
        self.repos.contains_key(repo)
    }

    // --- blob links ---

    /// Records that `repo` holds a blob.
    pub fn link_blob(&self, repo: &str, digest: &Digest, size: u64) -> MetaResult<()> {
        self.blob_links
            .insert(key(&[repo, digest.as_str()]), &size.to_be_bytes())?;
        Ok(())
    }

    /// Size of a blob if `repo` links it.
    pub fn blob_link(&self, repo: &str, digest: &Digest) -> MetaResult<Option<u64>> {
        Ok(self
            .blob_links
            .get(key(&[repo, digest.as_str()]))?
            .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes)))
    }

    /// Removes a blob link; false if there was none.
    pub fn unlink_blob(&self, repo: &str, digest: &Digest) -> MetaResult<bool> {
        Ok(self
            .blob_links
            .remove(key(&[repo, digest.as_str()]))?
            .is_some())
    }

    // --- artifacts and tags ---

    /// Records a pushed manifest: artifact, optional tag, referrer entry, repository.
    pub fn put_artifact(
        &self,
        repo: &str,
        digest: &Digest,
        record: &ArtifactRecord,
        tag: Option<&str>,
        referrer: Option<&Descriptor>,
    ) -> MetaResult<()> {
        let _repo = self.lock_repo(repo);
        self.repos.insert(repo, &record.pushed_ms.to_be_bytes())?;
        let artifact_key = key(&[repo, digest.as_str()]);
        // Keep the first push time of an artifact pushed again (e.g. under a new tag).
        if !self.artifacts.contains_key(&artifact_key)? {
            self.artifacts.insert(artifact_key, json(record))?;
        }
        if let Some(tag) = tag {
            self.tags.insert(key(&[repo, tag]), digest.as_str())?;
        }
        if let (Some(subject), Some(desc)) = (&record.subject, referrer) {
            self.referrers
                .insert(key(&[repo, subject.as_str(), digest.as_str()]), json(desc))?;
        }
        self.notify(Change::Artifact { repo, digest });
        if let Some(tag) = tag {
            self.notify(Change::Tag { repo, tag });
        }
        Ok(())
    }

    /// An artifact record.
    pub fn artifact(&self, repo: &str, digest: &Digest) -> MetaResult<Option<ArtifactRecord>> {
        self.artifacts
            .get(key(&[repo, digest.as_str()]))?
            .map(|v| from_json(&v))
            .transpose()
    }

    /// Deletes an artifact, its tags and its referrer entry; returns the removed tags, or `None`
    /// if the artifact did not exist.
    pub fn delete_artifact(&self, repo: &str, digest: &Digest) -> MetaResult<Option<Vec<String>>> {
        let _repo = self.lock_repo(repo);
        let Some(record) = self.artifacts.remove(key(&[repo, digest.as_str()]))? else {
            return Ok(None);
        };
        let record: ArtifactRecord = from_json(&record)?;
        let mut removed = Vec::new();
        let p = prefix(&[repo]);
        for item in self.tags.scan_prefix(&p) {
            let (k, v) = item?;
            if v.as_ref() == digest.as_str().as_bytes() {
                removed.push(tail_str(&k, p.len()));
                self.tags.remove(k)?;
            }
        }
        if let Some(subject) = record.subject {
            self.referrers
                .remove(key(&[repo, subject.as_str(), digest.as_str()]))?;
        }
        self.pulls.remove(key(&[repo, digest.as_str()]))?;
        self.notify(Change::Artifact { repo, digest });
        for tag in &removed {
            self.notify(Change::Tag { repo, tag });
        }
        Ok(Some(removed))
    }

    /// Every artifact of a repository with its digest.
    pub fn artifacts(&self, repo: &str) -> MetaResult<Vec<(Digest, ArtifactRecord)>> {
        let p = prefix(&[repo]);
        let mut out = Vec::new();
        for item in self.artifacts.scan_prefix(&p) {
            let (k, v) = item?;
            if let Ok(d) = Digest::parse(&tail_str(&k, p.len())) {
                out.push((d, from_json(&v)?));
            }
        }
        Ok(out)
    }

    /// Blobs linked by a repository.
    pub fn linked_blobs(&self, repo: &str) -> MetaResult<Vec<Digest>> {
        let p = prefix(&[repo]);
        self.blob_links
            .scan_prefix(&p)
            .keys()
            .filter_map(|k| match k {
                Ok(k) => Digest::parse(&tail_str(&k, p.len())).ok().map(Ok),
                Err(e) => Some(Err(e)),
            })
            .collect()
    }

    /// Removes a repository from the catalog (when its last artifact is gone).
    pub fn remove_repo_if_empty(&self, repo: &str) -> MetaResult<bool> {
        let _repo = self.lock_repo(repo);
        if self.artifacts.scan_prefix(prefix(&[repo])).next().is_some() {
            return Ok(false);
        }
        Ok(self.repos.remove(repo)?.is_some())
    }

    /// Digest a tag points at.
    pub fn tag(&self, repo: &str, tag: &str) -> MetaResult<Option<Digest>> {
        Ok(self
            .tags
            .get(key(&[repo, tag]))?
            .and_then(|v| Digest::parse(&String::from_utf8_lossy(&v)).ok()))
    }

    /// Points an existing artifact's tag at it (creating or moving the tag); `false`, with
    /// nothing changed, when the artifact is not there (deleted meanwhile).
    pub fn tag_artifact(&self, repo: &str, digest: &Digest, tag: &str) -> MetaResult<bool> {
        let _repo = self.lock_repo(repo);
        if !self.artifacts.contains_key(key(&[repo, digest.as_str()]))? {
            return Ok(false);
        }
        self.tags.insert(key(&[repo, tag]), digest.as_str())?;
        self.notify(Change::Tag { repo, tag });
        Ok(true)
    }

    /// Removes a tag; returns the digest it pointed at.
    pub fn delete_tag(&self, repo: &str, tag: &str) -> MetaResult<Option<Digest>> {
        let removed = self.tags.remove(key(&[repo, tag]))?;
        if removed.is_some() {
            self.notify(Change::Tag { repo, tag });
        }
        Ok(removed.and_then(|v| Digest::parse(&String::from_utf8_lossy(&v)).ok()))
    }

    /// Tags of a repository, lexically after `last`, at most `n`.
    pub fn tags(&self, repo: &str, last: Option<&str>, n: usize) -> MetaResult<Vec<String>> {
        let p = prefix(&[repo]);
        let mut end = p.clone();
        if let Some(last) = end.last_mut() {
            *last = 1;
        }
        let start = match last {
            Some(l) => {
                let mut s = key(&[repo, l]);
                s.push(0);
                s
            }
            None => p.clone(),
        };
        self.tags
            .range(start..end)
            .keys()
            .take(n)
            .map(|k| k.map(|k| tail_str(&k, p.len())))
            .collect()
    }

    /// Referrers of `subject` in `repo`.
    pub fn referrers(&self, repo: &str, subject: &Digest) -> MetaResult<Vec<Descriptor>> {
        self.referrers
            .scan_prefix(prefix(&[repo, subject.as_str()]))
            .values()
            .map(|v| from_json(&v?))
            .collect()
    }

    // --- pull times ---

    /// Writes a batch of last-pull times (`repo\0digest` → Unix ms).
    pub fn record_pulls(&self, batch: &[(std::sync::Arc<str>, u64)]) -> MetaResult<()> {
        let mut b = sled::Batch::default();
        for (k, t) in batch {
            b.insert(k.as_bytes(), &t.to_be_bytes());
        }
        self.pulls.apply_batch(b)
    }

    /// Last-pull time of an artifact, Unix ms.
    pub fn last_pull(&self, repo: &str, digest: &Digest) -> MetaResult<Option<u64>> {
        Ok(self
            .pulls
            .get(key(&[repo, digest.as_str()]))?
            .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes)))
    }

    /// The key under which pulls of an artifact are recorded.
    pub fn pull_key(repo: &str, digest: &Digest) -> std::sync::Arc<str> {
        String::from_utf8(key(&[repo, digest.as_str()]))
            .expect("keys are utf-8")
            .into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(subject: Option<Digest>) -> ArtifactRecord {
        ArtifactRecord {
            media_type: "m".into(),
            size: 1,
            pushed_ms: now_ms(),
            artifact_type: None,
            subject,
        }
    }

    /// What `Meta::put_image_cache` stored before credentials were a record of their own: the
    /// whole `ImageCacheConfig` as JSON (durations as humantime text, absent options omitted).
    fn legacy_image_cache(name: &str, password: &str) -> String {
        format!(
            r#"{{"name":"{name}","kind":"ecr","url":"https://1.dkr.ecr.eu-west-1.amazonaws.com","username":"AKID","password":"{password}","fetch_budget":"3m 20s","revalidate_ttl":"30s","region":"eu-west-1"}}"#
        )
    }

    #[test]
    fn legacy_image_caches_open_with_their_credentials_as_a_record_of_their_own() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::open(dir.path().join("meta")).unwrap();
            let caches = db.open_tree("image_caches").unwrap();
            caches
                .insert("ecr", legacy_image_cache("ecr", "s3cret").as_bytes())
                .unwrap();
            caches
                .insert(
                    "anon",
                    &br#"{"name":"anon","kind":"registry","url":"https://r.example","fetch_budget":"200s","revalidate_ttl":"0s"}"#[..],
                )
                .unwrap();
            db.flush().unwrap();
        }
        for round in 0..2 {
            // Opened twice: the migration runs once and changes nothing the second time.
            let m = Meta::open(dir.path()).unwrap();
            let names: Vec<String> = m
                .image_caches()
                .unwrap()
                .into_iter()
                .map(|c| c.name)
                .collect();
            assert_eq!(names, ["anon", "ecr"], "round {round}");
            let ecr = m.image_cache("ecr").unwrap().unwrap();
            assert_eq!(ecr.kind, SourceKind::Ecr);
            assert_eq!(ecr.endpoint, "https://1.dkr.ecr.eu-west-1.amazonaws.com");
            assert_eq!(ecr.settings.fetch_budget_ms, Duration::from_secs(200));
            assert_eq!(ecr.settings.revalidate_ttl_ms, Duration::from_secs(30));
            assert_eq!(ecr.settings.region.as_deref(), Some("eu-west-1"));
            let creds = m.credentials("ecr").unwrap().unwrap();
            assert_eq!(creds.username.as_deref(), Some("AKID"));
            assert_eq!(creds.password.as_deref(), Some("s3cret"));
            let shown = format!("{creds:?}");
            assert!(
                !shown.contains("s3cret") && shown.contains("redacted"),
                "{shown}"
            );
            assert_eq!(m.credentials("anon").unwrap(), None, "anonymous: no record");
            // The definition itself holds no secret any more.
            let raw = m.image_caches.get("ecr").unwrap().unwrap();
            assert!(!String::from_utf8_lossy(&raw).contains("s3cret"));
        }
        let m = Meta::open(dir.path()).unwrap();
        assert!(m.delete_image_cache("anon").unwrap());
        assert!(m.delete_image_cache("ecr").unwrap());
        assert!(
            m.credentials("ecr").unwrap().is_none(),
            "deleted with its image cache"
        );
    }

    #[test]
    fn putting_an_image_cache_replaces_its_credentials_in_one_step() {
        let dir = tempfile::tempdir().unwrap();
        let m = Meta::open(dir.path()).unwrap();
        let record = ImageCacheRecord {
            name: "up".into(),
            kind: SourceKind::Registry,
            endpoint: "https://r.example".into(),
            settings: ImageCacheSettings {
                fetch_budget_ms: Duration::from_secs(200),
                revalidate_ttl_ms: Duration::ZERO,
                region: None,
                ecr_endpoint: None,
            },
        };
        let creds = CredentialRecord {
            username: Some("u".into()),
            password: Some("p".into()),
            credentials_file: None,
        };
        m.put_image_cache(&record, Some(&creds)).unwrap();
        assert_eq!(m.credentials("up").unwrap(), Some(creds));
        // Anonymous now: the old credentials do not linger.
        m.put_image_cache(&record, Some(&CredentialRecord::default()))
            .unwrap();
        assert_eq!(m.credentials("up").unwrap(), None);
        assert_eq!(m.image_cache("up").unwrap(), Some(record));
    }

    #[test]
    fn writers_of_one_repository_wait_for_its_lock() {
        let dir = tempfile::tempdir().unwrap();
        let meta = std::sync::Arc::new(Meta::open(dir.path()).unwrap());
        let d = Digest::sha256(b"m");
        meta.put_artifact("r/a", &d, &rec(None), Some("v1"), None)
            .unwrap();
        let held = meta.lock_repo("r/a");
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let writer = {
            let (meta, d) = (meta.clone(), d.clone());
            std::thread::spawn(move || {
                let tags = meta.delete_artifact("r/a", &d).unwrap();
                done_tx.send(tags).unwrap();
            })
        };
        // While a push of the repository holds its lock, a delete cannot slip in between.
        assert!(done_rx
            .recv_timeout(std::time::Duration::from_millis(200))
            .is_err());
        assert!(meta.artifact("r/a", &d).unwrap().is_some());
        drop(held);
        assert_eq!(
            done_rx
                .recv_timeout(std::time::Duration::from_secs(10))
                .unwrap(),
            Some(vec!["v1".to_string()])
        );
        writer.join().unwrap();
        assert!(
            !meta.tag_artifact("r/a", &d, "v2").unwrap(),
            "deleted: not tagged"
        );
    }

    #[test]
    fn tags_page_lexically_and_stay_inside_the_repo() {
        let dir = tempfile::tempdir().unwrap();
        let m = Meta::open(dir.path()).unwrap();
        let d = Digest::sha256(b"m");
        for t in ["b", "a", "c"] {
            m.put_artifact("r/x", &d, &rec(None), Some(t), None)
                .unwrap();
        }
        m.put_artifact("r/x2", &d, &rec(None), Some("zz"), None)
            .unwrap();
        m.put_artifact("r/x/y", &d, &rec(None), Some("yy"), None)
            .unwrap();
        assert_eq!(m.tags("r/x", None, 10).unwrap(), ["a", "b", "c"]);
        assert_eq!(m.tags("r/x", Some("a"), 1).unwrap(), ["b"]);
        assert_eq!(m.tags("r/x", Some("c"), 10).unwrap(), Vec::<String>::new());
        assert_eq!(
            m.repositories(None, None, 10).unwrap(),
            ["r/x", "r/x/y", "r/x2"]
        );
        assert_eq!(m.repositories(None, Some("r/x"), 1).unwrap(), ["r/x/y"]);
        assert_eq!(m.repositories(Some("r"), None, 10).unwrap().len(), 3);
        assert_eq!(m.delete_artifact("r/x", &d).unwrap().unwrap().len(), 3);
        assert!(m.tags("r/x", None, 10).unwrap().is_empty());
    }

    #[test]
    fn referrers_follow_their_artifact() {
        let dir = tempfile::tempdir().unwrap();
        let m = Meta::open(dir.path()).unwrap();
        let subject = Digest::sha256(b"s");
        let referrer = Digest::sha256(b"r");
        let desc = Descriptor {
            media_type: "m".into(),
            digest: referrer.clone(),
            size: 1,
            artifact_type: Some("t".into()),
            annotations: None,
            platform: None,
            urls: None,
        };
        m.put_artifact(
            "r/x",
            &referrer,
            &rec(Some(subject.clone())),
            None,
            Some(&desc),
        )
        .unwrap();
        assert_eq!(m.referrers("r/x", &subject).unwrap(), vec![desc]);
        m.delete_artifact("r/x", &referrer).unwrap();
        assert!(m.referrers("r/x", &subject).unwrap().is_empty());
        m.delete_registry("r").unwrap();
    }
}
