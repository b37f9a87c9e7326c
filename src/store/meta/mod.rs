//! The metadata seam: registries, image caches and their credentials, repositories, blob
//! links, artifacts, tags, referrers, pull times, and typed records owned by behaviours (users,
//! keys, webhooks), behind the async [`MetaStore`] trait with its neutral [`MetaError`].
//!
//! Every backend passes the suite in `store::meta::conformance`; the one this node uses is
//! [`SledMeta`] (module `sled`). Keys are `repo \0 …`: names and tags cannot contain NUL, so a
//! prefix scan of `repo\0` is exactly one repository and byte order is lexical order (what tag
//! lists, the catalog and every paged listing need).

#[cfg(test)]
mod conformance;
pub mod postgres;
mod sled;
mod usage;

use std::path::PathBuf;
use std::sync::Arc;
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
    /// Most bytes its images may store (`None`: no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota_bytes: Option<u64>,
}

impl RegistryRecord {
    /// Whether both records have the same settings (everything but name and creation time).
    pub fn same_settings(&self, other: &RegistryRecord) -> bool {
        self.kind == other.kind
            && self.cache == other.cache
            && self.public_uri == other.public_uri
            && self.anonymous_pull == other.anonymous_pull
            && self.quota_bytes == other.quota_bytes
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

/// What changed in the metadata: in-memory copies above the store (hot manifests, the
/// registries map, the webhook snapshot) subscribe with [`MetaStore::subscribe`] and drop or
/// refresh what the change makes stale. Notified synchronously, after the write and before the
/// writer returns, so a client that reads its own write never sees the old state from a copy.
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
    /// A registry was created or changed (`record`: its new state) or deleted with everything
    /// under it (`record: None`).
    Registry {
        /// Its name.
        name: &'a str,
        /// What it is now, `None` when it is gone.
        record: Option<&'a RegistryRecord>,
    },
    /// A typed record was stored or removed (a removal of many tells each one).
    Record {
        /// Its tree (`users`, `webhook_policies`...).
        tree: &'a str,
        /// Its key (parts joined by NUL).
        key: &'a str,
        /// Its new bytes, `None` when it was removed.
        value: Option<&'a [u8]>,
    },
    /// Changes may have been missed (a shared backend lost its notification connection for a
    /// while): whatever was copied from the metadata may be stale.
    Lost,
}

/// A subscriber to metadata changes. Called on the writer's thread (for the sled backend, a
/// thread of the blocking pool): it must not block or call back into the store.
pub type Subscriber = Box<dyn Fn(Change<'_>) + Send + Sync>;

/// Runs `reload` on a task each time changes may have been lost ([`Change::Lost`]): what keeps
/// a full copy of some records in memory reads them all again. The store is held weakly by
/// the subscriber (it lives in the store).
pub fn reload_on_lost<F, Fut>(meta: &Arc<dyn MetaStore>, reload: F)
where
    F: Fn(Arc<dyn MetaStore>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let reload = Arc::new(reload);
    let weak = Arc::downgrade(meta);
    let on_lost = reload.clone();
    meta.subscribe(Box::new(move |change| {
        if matches!(change, Change::Lost) {
            if let Some(meta) = weak.upgrade() {
                tokio::spawn(on_lost(meta));
            }
        }
    }));
    // A safety net where other nodes write: a notice this node never got (however unlikely)
    // is stale for at most a period.
    if let Some(period) = meta.refresh() {
        let weak = Arc::downgrade(meta);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(period);
            every.tick().await;
            loop {
                every.tick().await;
                let Some(meta) = weak.upgrade() else { return };
                reload(meta).await;
            }
        });
    }
}

/// A metadata failure, whatever the backend.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// The backend could not read or write its storage.
    #[error("metadata I/O failed: {0}")]
    Io(#[from] std::io::Error),
    /// A stored record or key is not what its place holds.
    #[error("corrupt metadata record: {0}")]
    Corrupt(String),
    /// The data directory is held by another process, or cannot be locked.
    #[error(transparent)]
    Locked(#[from] crate::store::lock::LockError),
    /// The backend failed otherwise (a bug it reports, a task that died).
    #[error("metadata backend failed: {0}")]
    Backend(String),
}

/// A metadata result.
pub type MetaResult<T> = Result<T, MetaError>;

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

/// The first key after every key starting with `prefix` (`None`: no such key).
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// The text key of a typed record (parts joined by NUL).
fn key_text(parts: &[&str]) -> String {
    parts.join("\0")
}

/// The text prefix of typed records under `parts` (empty: every record).
fn prefix_text(parts: &[&str]) -> String {
    if parts.is_empty() {
        String::new()
    } else {
        let mut p = key_text(parts);
        p.push('\0');
        p
    }
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("metadata records serialize")
}

fn from_json<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> MetaResult<T> {
    serde_json::from_slice(bytes).map_err(|e| MetaError::Corrupt(e.to_string()))
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

/// The key under which pulls of an artifact are recorded ([`MetaStore::record_pulls`]).
pub fn pull_key(repo: &str, digest: &Digest) -> Arc<str> {
    key_text(&[repo, digest.as_str()]).into()
}

pub use self::sled::SledMeta;
pub use self::usage::Usage;

/// What a manifest refers to: a repository records the manifest only while it holds all of it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Refers {
    /// Blobs the repository must link (config and layers).
    pub blobs: Vec<Digest>,
    /// Manifests the repository must hold as artifacts (index children).
    pub manifests: Vec<Digest>,
}

impl Refers {
    /// Everything an origin registry's manifest needs its repository to hold.
    pub fn of(parsed: &crate::oci::manifest::ParsedManifest) -> Refers {
        Refers {
            blobs: parsed.blobs.clone(),
            manifests: parsed.children.iter().map(|c| c.digest.clone()).collect(),
        }
    }
}

/// Something a manifest refers to that its repository does not hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Missing {
    /// A blob not linked by the repository.
    Blob(Digest),
    /// A manifest that is not an artifact of the repository.
    Manifest(Digest),
}

/// The metadata backend of a data directory (today: sled under `DATA/meta`), opened after the
/// data directory's lock is taken.
pub type Meta = SledMeta;

/// Opens the metadata of a data directory as the seam the rest of berth uses.
pub fn open(data_dir: &std::path::Path) -> MetaResult<Arc<dyn MetaStore>> {
    Ok(Arc::new(SledMeta::open(data_dir)?))
}

/// Where a node keeps its metadata (`[metadata]`): sled in the data directory (the default),
/// or a PostgreSQL database several nodes share.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum MetadataSettings {
    /// sled under `DATA/meta`.
    #[default]
    Sled,
    /// A PostgreSQL database.
    Postgres(postgres::PostgresSettings),
}

/// Opens the metadata `settings` name. The data directory's lock is taken first either way:
/// the directory still holds this node's writes in progress.
pub async fn open_with(
    data_dir: &std::path::Path,
    settings: &MetadataSettings,
) -> MetaResult<(Arc<dyn MetaStore>, Option<crate::store::lock::DataDirLock>)> {
    match settings {
        MetadataSettings::Sled => Ok((open(data_dir)?, None)),
        MetadataSettings::Postgres(pg) => {
            let lock = crate::store::lock::DataDirLock::acquire(data_dir)?;
            let meta = postgres::PostgresMeta::open(pg).await?;
            Ok((Arc::new(meta), Some(lock)))
        }
    }
}

/// A lease as it stands: who holds it, and for how much longer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The holder's self-description (what it gave [`MetaStore::lease_take`]).
    pub holder: String,
    /// Time left before anyone may take it.
    pub remaining: Duration,
}

/// How long a lease lasts unless renewed: how long the other nodes wait before they take over
/// the work of a node that died.
pub const LEASE_TTL: Duration = Duration::from_secs(15);

/// How often a holder renews its lease.
const LEASE_RENEW: Duration = Duration::from_secs(5);

/// A lease this node holds while it does the work the lease names.
pub struct HeldLease {
    name: String,
    holder: String,
    /// Set when a renewal found another holder: the work must stop.
    lost: std::sync::atomic::AtomicBool,
}

impl HeldLease {
    /// Takes lease `name` for `holder` ([`LEASE_TTL`]): held, or who holds it.
    pub async fn take(
        meta: &dyn MetaStore,
        name: String,
        holder: String,
    ) -> MetaResult<Result<HeldLease, Lease>> {
        let lease = meta.lease_take(&name, &holder, LEASE_TTL).await?;
        if lease.holder != holder {
            return Ok(Err(lease));
        }
        Ok(Ok(HeldLease {
            name,
            holder,
            lost: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    /// Whether another node took the lease (this node failed to renew it in time).
    pub fn is_lost(&self) -> bool {
        self.lost.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Renews the lease every few seconds until `done` resolves, then releases it; calls
    /// `on_lost` and stops when another node took it.
    pub async fn keep(
        self: Arc<Self>,
        meta: Arc<dyn MetaStore>,
        done: impl std::future::Future<Output = ()>,
        on_lost: impl FnOnce(),
    ) {
        self.keep_every(LEASE_RENEW, meta, done, on_lost).await
    }

    async fn keep_every(
        self: Arc<Self>,
        renew: Duration,
        meta: Arc<dyn MetaStore>,
        done: impl std::future::Future<Output = ()>,
        on_lost: impl FnOnce(),
    ) {
        tokio::pin!(done);
        loop {
            tokio::select! {
                () = &mut done => break,
                () = tokio::time::sleep(renew) => {
                    match meta.lease_take(&self.name, &self.holder, LEASE_TTL).await {
                        Ok(l) if l.holder == self.holder => {}
                        Ok(_) => {
                            tracing::error!(lease = %self.name, "lease taken by another node; stopping what it covered");
                            self.lost.store(true, std::sync::atomic::Ordering::Relaxed);
                            on_lost();
                            return;
                        }
                        Err(e) => tracing::warn!(lease = %self.name, error = %e, "cannot renew a lease"),
                    }
                }
            }
        }
        if let Err(e) = meta.lease_release(&self.name, &self.holder).await {
            tracing::warn!(lease = %self.name, error = %e, "cannot release a lease; it expires by itself");
        }
    }
}

/// A secret of `name` that every node sharing `meta` finds the same: created on first use
/// from `adopt` (one a berth kept elsewhere before) or 32 random bytes, one creator winning
/// when nodes start together.
pub async fn shared_secret(
    meta: &Arc<dyn MetaStore>,
    name: &str,
    adopt: Option<Vec<u8>>,
) -> MetaResult<Vec<u8>> {
    /// As stored (a JSON record, as every record is).
    #[derive(Serialize, Deserialize)]
    struct StoredKey {
        /// The secret, base64 (named after its first use: the HS256 token key).
        hs256: String,
    }
    use base64::Engine;
    const SECRETS: &str = "secrets";
    let stored = |bytes: Option<Vec<u8>>| -> Option<Vec<u8>> {
        let key: StoredKey = serde_json::from_slice(&bytes?).ok()?;
        base64::engine::general_purpose::STANDARD
            .decode(key.hs256)
            .ok()
            .filter(|s| s.len() >= 32)
    };
    if let Some(secret) = stored(meta.record_get(SECRETS, name).await?) {
        return Ok(secret);
    }
    let candidate = adopt.filter(|s| s.len() >= 32).unwrap_or_else(|| {
        use argon2::password_hash::rand_core::{OsRng, RngCore};
        let mut s = vec![0u8; 32];
        OsRng.fill_bytes(&mut s);
        s
    });
    let record = StoredKey {
        hs256: base64::engine::general_purpose::STANDARD.encode(&candidate),
    };
    meta.record_create(SECRETS, name, json(&record)).await?;
    meta.flush().await?;
    stored(meta.record_get(SECRETS, name).await?)
        .ok_or_else(|| MetaError::Corrupt(format!("the secret record {name:?} is unreadable")))
}

/// Where metadata lives. Listings are in lexical (byte) order of their keys; those that can
/// grow without bound take a page (`after`: the last key of the previous page, `limit`).
/// Writes that change several records (put and delete of an artifact) run one at a time per
/// repository, in an order that never shows a tag without its artifact (to a reader, or
/// after a crash between two writes).
#[async_trait::async_trait]
pub trait MetaStore: Send + Sync + 'static {
    /// Adds a subscriber to every later change.
    fn subscribe(&self, subscriber: Subscriber);
    /// Makes every write so far durable (before a client is told a write succeeded).
    /// Concurrent callers may share one commit.
    async fn flush(&self) -> MetaResult<()>;

    // --- registries ---

    /// Creates or updates a registry record.
    async fn put_registry(&self, record: &RegistryRecord) -> MetaResult<()>;
    /// All registries, by name.
    async fn registries(&self) -> MetaResult<Vec<RegistryRecord>>;
    /// One registry.
    async fn registry(&self, name: &str) -> MetaResult<Option<RegistryRecord>>;
    /// Deletes a registry and everything recorded under it (repositories, blob links,
    /// artifacts, tags, referrers, pull times of `name/…`).
    async fn delete_registry(&self, name: &str) -> MetaResult<()>;

    // --- image caches ---

    /// Creates or replaces an image cache with its credentials (none or empty: an anonymous
    /// source, whose old credentials are removed), both in one step.
    async fn put_image_cache(
        &self,
        record: &ImageCacheRecord,
        credentials: Option<&CredentialRecord>,
    ) -> MetaResult<()>;
    /// All image caches, by name.
    async fn image_caches(&self) -> MetaResult<Vec<ImageCacheRecord>>;
    /// One image cache.
    async fn image_cache(&self, name: &str) -> MetaResult<Option<ImageCacheRecord>>;
    /// The credentials of an image cache (`None`: anonymous, or no such image cache).
    async fn credentials(&self, image_cache: &str) -> MetaResult<Option<CredentialRecord>>;
    /// Deletes an image cache and its credentials; whether it existed.
    async fn delete_image_cache(&self, name: &str) -> MetaResult<bool>;

    // --- repositories ---

    /// Repositories (of one registry, or all), lexically after `last`, at most `n`.
    async fn repositories(
        &self,
        registry: Option<&str>,
        last: Option<&str>,
        n: usize,
    ) -> MetaResult<Vec<String>>;
    /// Whether the repository is in the catalog.
    async fn repo_exists(&self, repo: &str) -> MetaResult<bool>;
    /// Removes a repository from the catalog when it has no artifact left; whether it did.
    async fn remove_repo_if_empty(&self, repo: &str) -> MetaResult<bool>;

    // --- blob links ---

    /// Records that `repo` holds a blob of `size` bytes.
    async fn link_blob(&self, repo: &str, digest: &Digest, size: u64) -> MetaResult<()>;
    /// Size of a blob if `repo` links it.
    async fn blob_link(&self, repo: &str, digest: &Digest) -> MetaResult<Option<u64>>;
    /// Removes a blob link; whether there was one.
    async fn unlink_blob(&self, repo: &str, digest: &Digest) -> MetaResult<bool>;
    /// Every digest some repository links or holds as an artifact, whether or not the
    /// repository is in the catalog yet (a push links its blobs before its manifest makes the
    /// repository): what garbage collection must keep.
    async fn referenced(&self) -> MetaResult<std::collections::HashSet<Digest>>;
    /// Blobs linked by a repository, lexically after `after`, at most `limit`.
    async fn linked_blobs(
        &self,
        repo: &str,
        after: Option<&Digest>,
        limit: usize,
    ) -> MetaResult<Vec<Digest>>;

    // --- artifacts, tags, referrers ---

    /// Records a pushed manifest, one writer of the repository at a time: checks that the
    /// repository holds everything in `refers` (answering the first thing missing and writing
    /// nothing), then writes the catalog entry, the artifact (the first push time of an
    /// artifact pushed again is kept), the referrer entry and last the optional tag. The check
    /// and the writes are one step so that nothing removed meanwhile is referred to. Durable
    /// when it returns (no `flush` needed after it).
    async fn put_artifact(
        &self,
        repo: &str,
        digest: &Digest,
        record: &ArtifactRecord,
        tag: Option<&str>,
        referrer: Option<&Descriptor>,
        refers: &Refers,
    ) -> MetaResult<Result<(), Missing>>;
    /// An artifact record.
    async fn artifact(&self, repo: &str, digest: &Digest) -> MetaResult<Option<ArtifactRecord>>;
    /// Deletes an artifact with its tags (first), referrer entry and pull time, one writer of
    /// the repository at a time; returns the removed tags, or `None` if the artifact did not
    /// exist.
    async fn delete_artifact(&self, repo: &str, digest: &Digest)
        -> MetaResult<Option<Vec<String>>>;
    /// [`MetaStore::delete_artifact`] of several artifacts of one repository (a cleanup's
    /// deletions in an image: one call), each as it would alone; the answers in order.
    async fn delete_artifacts(
        &self,
        repo: &str,
        digests: &[Digest],
    ) -> MetaResult<Vec<Option<Vec<String>>>> {
        let mut out = Vec::with_capacity(digests.len());
        for d in digests {
            out.push(self.delete_artifact(repo, d).await?);
        }
        Ok(out)
    }
    /// Artifacts of a repository with their digests, lexically after `after`, at most `limit`.
    async fn artifacts(
        &self,
        repo: &str,
        after: Option<&Digest>,
        limit: usize,
    ) -> MetaResult<Vec<(Digest, ArtifactRecord)>>;
    /// Digest a tag points at.
    async fn tag(&self, repo: &str, tag: &str) -> MetaResult<Option<Digest>>;
    /// Points a tag at an existing artifact (creating or moving it); `false`, with nothing
    /// changed, when the artifact is not there (deleted meanwhile).
    async fn tag_artifact(&self, repo: &str, digest: &Digest, tag: &str) -> MetaResult<bool>;
    /// Removes a tag; returns the digest it pointed at.
    async fn delete_tag(&self, repo: &str, tag: &str) -> MetaResult<Option<Digest>>;
    /// Tags of a repository, lexically after `last`, at most `n`.
    async fn tags(&self, repo: &str, last: Option<&str>, n: usize) -> MetaResult<Vec<String>>;
    /// Every tag of a repository with the artifact it points at, in tag order (what a cleanup
    /// reads per image: one call, not one per tag).
    async fn tagged(&self, repo: &str) -> MetaResult<Vec<(String, Digest)>> {
        let mut out = Vec::new();
        for t in self.tags(repo, None, usize::MAX).await? {
            if let Some(d) = self.tag(repo, &t).await? {
                out.push((t, d));
            }
        }
        Ok(out)
    }
    /// Referrers of `subject` in `repo`, by referrer digest lexically after `after`, at most
    /// `limit`.
    async fn referrers(
        &self,
        repo: &str,
        subject: &Digest,
        after: Option<&Digest>,
        limit: usize,
    ) -> MetaResult<Vec<Descriptor>>;

    // --- pull times ---

    /// Writes a batch of last-pull times ([`pull_key`] → Unix ms).
    async fn record_pulls(&self, batch: &[(Arc<str>, u64)]) -> MetaResult<()>;
    /// Last-pull time of an artifact, Unix ms.
    async fn last_pull(&self, repo: &str, digest: &Digest) -> MetaResult<Option<u64>>;
    /// Last-pull times of every artifact of a repository that was pulled (one call).
    async fn last_pulls(&self, repo: &str) -> MetaResult<std::collections::HashMap<Digest, u64>> {
        let mut out = std::collections::HashMap::new();
        for (d, _) in self.artifacts(repo, None, usize::MAX).await? {
            if let Some(t) = self.last_pull(repo, &d).await? {
                out.insert(d, t);
            }
        }
        Ok(out)
    }

    // --- typed records, as bytes ([`Records`] wraps them with serde) ---

    /// Stores a record of `tree` under `key`.
    async fn record_put(&self, tree: &str, key: &str, value: Vec<u8>) -> MetaResult<()>;
    /// Stores several records of `tree` (a job's history rows: one call per task).
    async fn record_put_many(&self, tree: &str, entries: Vec<(String, Vec<u8>)>) -> MetaResult<()> {
        for (key, value) in entries {
            self.record_put(tree, &key, value).await?;
        }
        Ok(())
    }
    /// Stores a record of `tree` under `key` unless one is there; whether it did (what a
    /// secret every node must share, or a lease, is created with: one creator wins).
    async fn record_create(&self, tree: &str, key: &str, value: Vec<u8>) -> MetaResult<bool>;
    /// The next number of the sequence `name`, above `floor` (numbers handed out before the
    /// sequence existed): unique across every node sharing the store, increasing.
    async fn sequence_next(&self, name: &str, floor: u64) -> MetaResult<u64>;
    /// Takes lease `name` for `holder` for `ttl` when it is free, expired or `holder`'s already
    /// (which renews it); the lease as it stands afterwards, whoever holds it. Expiry is
    /// measured on the store's clock (the database's, where nodes share one), so the nodes'
    /// clocks need not agree.
    async fn lease_take(&self, name: &str, holder: &str, ttl: Duration) -> MetaResult<Lease>;
    /// Ends lease `name` if `holder` holds it.
    async fn lease_release(&self, name: &str, holder: &str) -> MetaResult<()>;
    /// Whether other nodes share this store (and so its leases and records).
    fn shared(&self) -> bool {
        false
    }
    /// Where other nodes write: how often what a node keeps in memory of the records is read
    /// again anyway (a safety net under the change notices).
    fn refresh(&self) -> Option<Duration> {
        None
    }
    /// One record.
    async fn record_get(&self, tree: &str, key: &str) -> MetaResult<Option<Vec<u8>>>;
    /// Removes a record; returns it.
    async fn record_remove(&self, tree: &str, key: &str) -> MetaResult<Option<Vec<u8>>>;
    /// Records whose key starts with `prefix`, with the rest of their key, in key order: those
    /// whose rest sorts after `after`, at most `limit`.
    async fn record_list(
        &self,
        tree: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> MetaResult<Vec<(String, Vec<u8>)>>;
    /// Removes every record whose key starts with `prefix`; returns how many.
    async fn record_remove_prefix(&self, tree: &str, prefix: &str) -> MetaResult<usize>;
    /// What each registry holding anything stores, by name: its distinct blobs and manifests
    /// (each counted once per registry, however many of its repositories hold it) with their
    /// bytes, and its artifacts. Kept current by the writes (no scan).
    async fn usage(&self) -> MetaResult<Vec<(String, Usage)>>;
    /// What one registry stores (what a push is checked against its quota with).
    async fn registry_usage(&self, registry: &str) -> MetaResult<Usage>;
    /// How many of a registry's blobs and manifests another registry holds too.
    async fn shared_blobs(&self, registry: &str) -> MetaResult<u64>;
    /// Names of the trees that hold typed records (every tree `record_put` wrote to, and maybe
    /// empty ones), in lexical order: a backup copies them all without knowing their owners.
    async fn record_trees(&self) -> MetaResult<Vec<String>>;
}

/// The records of one type in one tree of a [`MetaStore`], as JSON, keyed by text (`a \0 b`
/// for compound keys).
pub struct Records<T> {
    meta: Arc<dyn MetaStore>,
    tree: Arc<str>,
    _type: std::marker::PhantomData<fn() -> T>,
}

impl<T> Clone for Records<T> {
    fn clone(&self) -> Self {
        Records {
            meta: self.meta.clone(),
            tree: self.tree.clone(),
            _type: std::marker::PhantomData,
        }
    }
}

impl<T: Serialize + for<'de> Deserialize<'de> + Send + Sync> Records<T> {
    /// The records of `tree`.
    pub fn new(meta: Arc<dyn MetaStore>, tree: &str) -> Records<T> {
        Records {
            meta,
            tree: tree.into(),
            _type: std::marker::PhantomData,
        }
    }

    /// The tree's name (what [`Change::Record`] names).
    pub fn tree(&self) -> &str {
        &self.tree
    }

    /// Stores a record.
    pub async fn put(&self, key: &[&str], value: &T) -> MetaResult<()> {
        let bytes = json(value);
        self.meta
            .record_put(&self.tree, &key_text(key), bytes)
            .await
    }

    /// Stores several records.
    pub async fn put_many(&self, entries: Vec<(Vec<String>, T)>) -> MetaResult<()> {
        let entries = entries
            .into_iter()
            .map(|(key, value)| {
                let parts: Vec<&str> = key.iter().map(String::as_str).collect();
                (key_text(&parts), json(&value))
            })
            .collect();
        self.meta.record_put_many(&self.tree, entries).await
    }

    /// One record.
    pub async fn get(&self, key: &[&str]) -> MetaResult<Option<T>> {
        self.meta
            .record_get(&self.tree, &key_text(key))
            .await?
            .map(|v| from_json(&v))
            .transpose()
    }

    /// Removes a record; returns it.
    pub async fn remove(&self, key: &[&str]) -> MetaResult<Option<T>> {
        self.meta
            .record_remove(&self.tree, &key_text(key))
            .await?
            .map(|v| from_json(&v))
            .transpose()
    }

    /// Records whose key starts with the parts `prefix` (all records for `&[]`), in key order,
    /// with the rest of their key.
    pub async fn list(&self, prefix: &[&str]) -> MetaResult<Vec<(String, T)>> {
        self.list_page(prefix, None, usize::MAX).await
    }

    /// A page of [`Records::list`]: records whose rest of key sorts after `after`, at most
    /// `limit`.
    pub async fn list_page(
        &self,
        prefix: &[&str],
        after: Option<&str>,
        limit: usize,
    ) -> MetaResult<Vec<(String, T)>> {
        self.meta
            .record_list(&self.tree, &prefix_text(prefix), after, limit)
            .await?
            .into_iter()
            .map(|(k, v)| Ok((k, from_json(&v)?)))
            .collect()
    }

    /// Removes every record under the key parts `prefix`; returns how many.
    pub async fn remove_prefix(&self, prefix: &[&str]) -> MetaResult<usize> {
        self.meta
            .record_remove_prefix(&self.tree, &prefix_text(prefix))
            .await
    }
}

#[cfg(test)]
mod lease_tests {
    use super::*;

    #[tokio::test]
    async fn a_kept_lease_is_renewed_released_at_the_end_and_reported_lost_when_taken() {
        let dir = tempfile::tempdir().unwrap();
        let meta = open(dir.path()).unwrap();
        let every = Duration::from_millis(20);
        // Renewed while the work runs, released when it ends.
        let held = Arc::new(
            HeldLease::take(&*meta, "l".into(), "a".into())
                .await
                .unwrap()
                .unwrap(),
        );
        let (end, ended) = tokio::sync::oneshot::channel::<()>();
        let keeper = tokio::spawn(held.clone().keep_every(
            every,
            meta.clone(),
            async move {
                let _ = ended.await;
            },
            || panic!("not lost"),
        ));
        tokio::time::sleep(every * 5).await;
        assert_eq!(
            meta.lease_take("l", "b", LEASE_TTL).await.unwrap().holder,
            "a"
        );
        drop(end);
        keeper.await.unwrap();
        assert!(!held.is_lost());
        assert_eq!(
            meta.lease_take("l", "b", LEASE_TTL).await.unwrap().holder,
            "b"
        );
        // Taken by another node meanwhile: reported lost, and that node's lease is left alone.
        meta.lease_release("l", "b").await.unwrap();
        let held = Arc::new(
            HeldLease::take(&*meta, "l".into(), "a".into())
                .await
                .unwrap()
                .unwrap(),
        );
        meta.lease_release("l", "a").await.unwrap();
        meta.lease_take("l", "c", LEASE_TTL).await.unwrap();
        let lost = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let told = lost.clone();
        held.clone()
            .keep_every(every, meta.clone(), std::future::pending(), move || {
                told.store(true, std::sync::atomic::Ordering::Relaxed)
            })
            .await;
        assert!(held.is_lost() && lost.load(std::sync::atomic::Ordering::Relaxed));
        assert_eq!(
            meta.lease_take("l", "a", LEASE_TTL).await.unwrap().holder,
            "c"
        );
    }
}
