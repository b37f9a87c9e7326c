//! The sled backend of the metadata seam: one sled tree per kind of record under
//! `DATA/meta`. Every call runs on tokio's blocking pool (sled blocks on I/O and on its own
//! locks), never on a worker; flushes share one group commit.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::usage::UsageBook;
use super::{
    from_json, json, key, prefix, prefix_end, tail_str, ArtifactRecord, Change, CredentialRecord,
    ImageCacheRecord, ImageCacheSettings, Lease, MetaError, MetaResult, MetaStore, Missing, Refers,
    RegistryRecord, SourceKind, Subscriber, Usage,
};
use crate::oci::digest::Digest;
use crate::oci::manifest::Descriptor;

impl From<sled::Error> for MetaError {
    fn from(e: sled::Error) -> MetaError {
        match e {
            sled::Error::Io(e) => MetaError::Io(e),
            e @ sled::Error::Corruption { .. } => MetaError::Corrupt(e.to_string()),
            other => MetaError::Backend(other.to_string()),
        }
    }
}

/// The shape image caches had in the `image_caches` tree before credentials became a record of
/// their own (one JSON object with the credentials inline, durations as humantime text). Read
/// once, at open, by `Trees::migrate_image_caches`.
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
                MetaError::Corrupt(format!(
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

/// The sled backend of [`MetaStore`]: it holds the data directory's lock while open.
pub struct SledMeta {
    inner: Arc<Trees>,
}

/// The sled database and its trees, with synchronous (blocking) operations.
struct Trees {
    db: sled::Db,
    /// Group commit: flush requests announced (each after its writes), how many of them a flush
    /// covered, one flusher at a time.
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
    _lock: crate::store::lock::DataDirLock,
    /// Told of every change to registries, artifacts and tags.
    subscribers: parking_lot::RwLock<Vec<Subscriber>>,
    /// Storage per registry, counted at open and kept by every link and artifact written or
    /// removed.
    usage: parking_lot::Mutex<UsageBook>,
}

/// The trees of registries, image caches and repositories (typed records live in others).
/// A lease as kept in the `leases` tree (one process holds a sled store: its clock is the
/// store's).
#[derive(serde::Serialize, Deserialize)]
struct StoredLease {
    holder: String,
    expires_ms: u64,
}

const FIXED_TREES: [&str; 11] = [
    "sequences",
    "leases",
    "registries",
    "image_caches",
    "credentials",
    "repos",
    "blob_links",
    "artifacts",
    "tags",
    "referrers",
    "pulls",
];

/// Stripes of the repository locks.
const REPO_LOCK_STRIPES: usize = 64;

impl SledMeta {
    /// Waits until the flush request `mine` is covered, flushing (on the blocking pool) when
    /// no flush under way covers it.
    async fn flushed(&self, mine: u64) -> MetaResult<()> {
        let _turn = self.inner.flusher.lock().await;
        if self.inner.durable.load(Ordering::Acquire) >= mine {
            return Ok(());
        }
        self.run(move |t| t.flush_covering(mine)).await
    }

    /// Opens (creating) `DATA/meta`, after taking the data directory's lock.
    pub fn open(data_dir: &std::path::Path) -> MetaResult<SledMeta> {
        Ok(SledMeta {
            inner: Arc::new(Trees::open(data_dir)?),
        })
    }

    /// Runs `f` on the blocking pool.
    async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Trees) -> MetaResult<R> + Send + 'static,
    ) -> MetaResult<R> {
        let trees = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&trees))
            .await
            .map_err(|e| MetaError::Backend(format!("metadata task: {e}")))?
    }
}

impl Trees {
    /// Announces a flush request (after the caller's writes); [`SledMeta::flushed`] waits for it.
    fn announce(&self) -> u64 {
        self.announced.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Announces a flush request and, when no flush is under way, flushes right here on the
    /// blocking thread that just wrote: a manifest push then costs one trip to the blocking
    /// pool instead of two, and concurrent pushes still share a flush (they find it under way
    /// and wait for the next).
    fn flush_if_idle(&self) -> MetaResult<u64> {
        let mine = self.announce();
        if let Ok(_turn) = self.flusher.try_lock() {
            self.flush_covering(mine)?;
        }
        Ok(mine)
    }

    /// Flushes unless request `mine` is covered already, covering every request announced so
    /// far. The caller holds the flusher's turn.
    fn flush_covering(&self, mine: u64) -> MetaResult<()> {
        if self.durable.load(Ordering::Acquire) >= mine {
            return Ok(());
        }
        let target = self.announced.load(Ordering::Acquire);
        self.db.flush()?;
        self.durable.store(target, Ordering::Release);
        Ok(())
    }

    /// Opens (creating) `DATA/meta`.
    fn open(data_dir: &std::path::Path) -> MetaResult<Trees> {
        // Before anything in the directory is read or changed (the blob store empties its temp
        // directory when it opens, which must never happen under a running server).
        let lock = crate::store::lock::DataDirLock::acquire(data_dir)?;
        let db = sled::Config::new()
            .path(data_dir.join("meta"))
            .cache_capacity(64 * 1024 * 1024)
            .open()?;
        let meta = Trees {
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
            usage: Default::default(),
            repo_locks: (0..REPO_LOCK_STRIPES)
                .map(|_| parking_lot::Mutex::new(()))
                .collect(),
        };
        meta.migrate_image_caches()?;
        meta.count_usage()?;
        Ok(meta)
    }

    /// Counts what every registry holds from the stored blob links and artifacts.
    fn count_usage(&self) -> MetaResult<()> {
        let mut book = UsageBook::default();
        for item in self.blob_links.iter() {
            let (k, v) = item?;
            if let Some((repo, digest)) = split_key(&k) {
                let size = v.as_ref().try_into().map(u64::from_be_bytes).unwrap_or(0);
                book.hold(repo, &digest, size, false);
            }
        }
        for item in self.artifacts.iter() {
            let (k, v) = item?;
            if let Some((repo, digest)) = split_key(&k) {
                let record: ArtifactRecord = from_json(&v)?;
                book.hold(repo, &digest, record.size, true);
            }
        }
        *self.usage.lock() = book;
        Ok(())
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

    fn notify(&self, change: Change<'_>) {
        for s in self.subscribers.read().iter() {
            s(change);
        }
    }

    /// The write lock of a repository. Held only across sled calls on the blocking pool (no
    /// awaits); a panic while it is held poisons nothing: the next writer takes it over.
    fn lock_repo(&self, repo: &str) -> parking_lot::MutexGuard<'_, ()> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        repo.hash(&mut h);
        let stripe = (h.finish() % REPO_LOCK_STRIPES as u64) as usize;
        self.repo_locks[stripe].lock()
    }

    // --- registries ---

    fn put_registry(&self, r: &RegistryRecord) -> MetaResult<()> {
        self.registries.insert(r.name.as_bytes(), json(r))?;
        self.notify(Change::Registry {
            name: &r.name,
            record: Some(r),
        });
        Ok(())
    }

    fn registries(&self) -> MetaResult<Vec<RegistryRecord>> {
        all_json(&self.registries)
    }

    fn registry(&self, name: &str) -> MetaResult<Option<RegistryRecord>> {
        get_json(&self.registries, name)
    }

    fn delete_registry(&self, name: &str) -> MetaResult<()> {
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
        self.usage.lock().forget(name);
        self.notify(Change::Registry { name, record: None });
        Ok(())
    }

    // --- image caches ---

    fn put_image_cache(
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
        use sled::Transactional;
        (&self.image_caches, &self.credentials)
            .transaction(|(caches, creds)| f(caches, creds))
            .map_err(transaction_error)
    }

    fn image_caches(&self) -> MetaResult<Vec<ImageCacheRecord>> {
        all_json(&self.image_caches)
    }

    fn image_cache(&self, name: &str) -> MetaResult<Option<ImageCacheRecord>> {
        get_json(&self.image_caches, name)
    }

    fn credentials(&self, image_cache: &str) -> MetaResult<Option<CredentialRecord>> {
        get_json(&self.credentials, image_cache)
    }

    fn delete_image_cache(&self, name: &str) -> MetaResult<bool> {
        self.image_cache_transaction(|caches, creds| {
            creds.remove(name.as_bytes())?;
            Ok(caches.remove(name.as_bytes())?.is_some())
        })
    }

    // --- repositories ---

    fn repositories(
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

    fn repo_exists(&self, repo: &str) -> MetaResult<bool> {
        Ok(self.repos.contains_key(repo)?)
    }

    fn remove_repo_if_empty(&self, repo: &str) -> MetaResult<bool> {
        let _repo = self.lock_repo(repo);
        if self.artifacts.scan_prefix(prefix(&[repo])).next().is_some() {
            return Ok(false);
        }
        Ok(self.repos.remove(repo)?.is_some())
    }

    // --- blob links ---

    fn link_blob(&self, repo: &str, digest: &Digest, size: u64) -> MetaResult<()> {
        // The count changes with the link, under one lock: a concurrent unlink of the same link
        // cannot be counted before the link it removes.
        let mut usage = self.usage.lock();
        let old = self
            .blob_links
            .insert(key(&[repo, digest.as_str()]), &size.to_be_bytes())?;
        if old.is_none() {
            usage.hold(repo, digest, size, false);
        }
        Ok(())
    }

    fn blob_link(&self, repo: &str, digest: &Digest) -> MetaResult<Option<u64>> {
        Ok(self
            .blob_links
            .get(key(&[repo, digest.as_str()]))?
            .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes)))
    }

    fn unlink_blob(&self, repo: &str, digest: &Digest) -> MetaResult<bool> {
        let mut usage = self.usage.lock();
        let removed = self
            .blob_links
            .remove(key(&[repo, digest.as_str()]))?
            .is_some();
        if removed {
            usage.release(repo, digest, false);
        }
        Ok(removed)
    }

    fn referenced(&self) -> MetaResult<std::collections::HashSet<Digest>> {
        let mut out = std::collections::HashSet::new();
        for tree in [&self.blob_links, &self.artifacts] {
            for k in tree.iter().keys() {
                if let Some((_, d)) = split_key(&k?) {
                    out.insert(d);
                }
            }
        }
        Ok(out)
    }

    fn linked_blobs(
        &self,
        repo: &str,
        after: Option<&Digest>,
        limit: usize,
    ) -> MetaResult<Vec<Digest>> {
        let p = prefix(&[repo]);
        let mut out = Vec::new();
        for k in page(&self.blob_links, &p, after.map(Digest::as_str)).keys() {
            if out.len() >= limit {
                break;
            }
            if let Ok(d) = Digest::parse(&tail_str(&k?, p.len())) {
                out.push(d);
            }
        }
        Ok(out)
    }

    // --- artifacts and tags ---

    fn put_artifact(
        &self,
        repo: &str,
        digest: &Digest,
        record: &ArtifactRecord,
        tag: Option<&str>,
        referrer: Option<&Descriptor>,
        refers: &Refers,
    ) -> MetaResult<Result<(), Missing>> {
        let _repo = self.lock_repo(repo);
        // Checked under the lock with the writes (one trip to the blocking pool, not one per
        // reference).
        for blob in &refers.blobs {
            if !self.blob_links.contains_key(key(&[repo, blob.as_str()]))? {
                return Ok(Err(Missing::Blob(blob.clone())));
            }
        }
        for manifest in &refers.manifests {
            if !self
                .artifacts
                .contains_key(key(&[repo, manifest.as_str()]))?
            {
                return Ok(Err(Missing::Manifest(manifest.clone())));
            }
        }
        let pushed = record.pushed_ms.to_be_bytes();
        let artifact_key = key(&[repo, digest.as_str()]);
        let artifact = json(record);
        let tag_key = tag.map(|t| key(&[repo, t]));
        let referrer_entry = match (&record.subject, referrer) {
            (Some(subject), Some(desc)) => {
                Some((key(&[repo, subject.as_str(), digest.as_str()]), json(desc)))
            }
            _ => None,
        };
        // Under the repository's lock, in an order that never shows a reader a tag without its
        // artifact, even after a crash between two inserts: the tag goes last. (A multi-tree
        // sled transaction here made 16 concurrent pushes of one repository 3x slower.)
        self.repos.insert(repo.as_bytes(), &pushed[..])?;
        // Keep the first push time of an artifact pushed again (e.g. under a new tag).
        if self.artifacts.get(&artifact_key)?.is_none() {
            self.artifacts
                .insert(artifact_key.as_slice(), artifact.as_slice())?;
            self.usage.lock().hold(repo, digest, record.size, true);
        }
        if let Some((k, v)) = &referrer_entry {
            self.referrers.insert(k.as_slice(), v.as_slice())?;
        }
        if let Some(k) = &tag_key {
            self.tags.insert(k.as_slice(), digest.as_str().as_bytes())?;
        }
        self.notify(Change::Artifact { repo, digest });
        if let Some(tag) = tag {
            self.notify(Change::Tag { repo, tag });
        }
        Ok(Ok(()))
    }

    fn artifact(&self, repo: &str, digest: &Digest) -> MetaResult<Option<ArtifactRecord>> {
        get_json(&self.artifacts, key(&[repo, digest.as_str()]))
    }

    fn delete_artifact(&self, repo: &str, digest: &Digest) -> MetaResult<Option<Vec<String>>> {
        // Other writers of the repository wait: the tags found here are all the artifact has.
        let _repo = self.lock_repo(repo);
        let artifact_key = key(&[repo, digest.as_str()]);
        let Some(record) = self.artifacts.get(&artifact_key)? else {
            return Ok(None);
        };
        let record: ArtifactRecord = from_json(&record)?;
        let mut removed = Vec::new();
        let mut tag_keys = Vec::new();
        let p = prefix(&[repo]);
        for item in self.tags.scan_prefix(&p) {
            let (k, v) = item?;
            if v.as_ref() == digest.as_str().as_bytes() {
                removed.push(tail_str(&k, p.len()));
                tag_keys.push(k);
            }
        }
        let referrer_key = record
            .subject
            .as_ref()
            .map(|subject| key(&[repo, subject.as_str(), digest.as_str()]));
        // Under the repository's lock, tags first and the artifact last: a reader (or a crash
        // between two removals) never leaves a tag of the artifact without the artifact.
        for k in &tag_keys {
            self.tags.remove(k)?;
        }
        if let Some(k) = &referrer_key {
            self.referrers.remove(k.as_slice())?;
        }
        self.pulls.remove(artifact_key.as_slice())?;
        self.artifacts.remove(artifact_key.as_slice())?;
        self.usage.lock().release(repo, digest, true);
        self.notify(Change::Artifact { repo, digest });
        for tag in &removed {
            self.notify(Change::Tag { repo, tag });
        }
        Ok(Some(removed))
    }

    fn artifacts(
        &self,
        repo: &str,
        after: Option<&Digest>,
        limit: usize,
    ) -> MetaResult<Vec<(Digest, ArtifactRecord)>> {
        let p = prefix(&[repo]);
        let mut out = Vec::new();
        for item in page(&self.artifacts, &p, after.map(Digest::as_str)) {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item?;
            if let Ok(d) = Digest::parse(&tail_str(&k, p.len())) {
                out.push((d, from_json(&v)?));
            }
        }
        Ok(out)
    }

    fn tagged(&self, repo: &str) -> MetaResult<Vec<(String, Digest)>> {
        let p = prefix(&[repo]);
        let mut out = Vec::new();
        for item in self.tags.scan_prefix(&p) {
            let (k, v) = item?;
            if let Ok(d) = Digest::parse(&String::from_utf8_lossy(&v)) {
                out.push((tail_str(&k, p.len()), d));
            }
        }
        Ok(out)
    }

    fn last_pulls(&self, repo: &str) -> MetaResult<std::collections::HashMap<Digest, u64>> {
        let p = prefix(&[repo]);
        let mut out = std::collections::HashMap::new();
        for item in self.pulls.scan_prefix(&p) {
            let (k, v) = item?;
            let at = v.as_ref().try_into().ok().map(u64::from_be_bytes);
            if let (Ok(d), Some(at)) = (Digest::parse(&tail_str(&k, p.len())), at) {
                out.insert(d, at);
            }
        }
        Ok(out)
    }

    fn tag(&self, repo: &str, tag: &str) -> MetaResult<Option<Digest>> {
        Ok(self
            .tags
            .get(key(&[repo, tag]))?
            .and_then(|v| Digest::parse(&String::from_utf8_lossy(&v)).ok()))
    }

    fn tag_artifact(&self, repo: &str, digest: &Digest, tag: &str) -> MetaResult<bool> {
        let _repo = self.lock_repo(repo);
        if !self.artifacts.contains_key(key(&[repo, digest.as_str()]))? {
            return Ok(false);
        }
        self.tags.insert(key(&[repo, tag]), digest.as_str())?;
        self.notify(Change::Tag { repo, tag });
        Ok(true)
    }

    fn delete_tag(&self, repo: &str, tag: &str) -> MetaResult<Option<Digest>> {
        let _repo = self.lock_repo(repo);
        let removed = self.tags.remove(key(&[repo, tag]))?;
        if removed.is_some() {
            self.notify(Change::Tag { repo, tag });
        }
        Ok(removed.and_then(|v| Digest::parse(&String::from_utf8_lossy(&v)).ok()))
    }

    fn tags(&self, repo: &str, last: Option<&str>, n: usize) -> MetaResult<Vec<String>> {
        let p = prefix(&[repo]);
        let mut out = Vec::new();
        for k in page(&self.tags, &p, last).keys() {
            if out.len() >= n {
                break;
            }
            out.push(tail_str(&k?, p.len()));
        }
        Ok(out)
    }

    fn referrers(
        &self,
        repo: &str,
        subject: &Digest,
        after: Option<&Digest>,
        limit: usize,
    ) -> MetaResult<Vec<Descriptor>> {
        let p = prefix(&[repo, subject.as_str()]);
        let mut out = Vec::new();
        for v in page(&self.referrers, &p, after.map(Digest::as_str)).values() {
            if out.len() >= limit {
                break;
            }
            out.push(from_json(&v?)?);
        }
        Ok(out)
    }

    // --- pull times ---

    fn record_pulls(&self, batch: &[(Arc<str>, u64)]) -> MetaResult<()> {
        let mut b = sled::Batch::default();
        for (k, t) in batch {
            b.insert(k.as_bytes(), &t.to_be_bytes());
        }
        Ok(self.pulls.apply_batch(b)?)
    }

    fn last_pull(&self, repo: &str, digest: &Digest) -> MetaResult<Option<u64>> {
        Ok(self
            .pulls
            .get(key(&[repo, digest.as_str()]))?
            .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes)))
    }

    // --- typed records ---

    fn record_put_many(&self, tree: &str, entries: Vec<(String, Vec<u8>)>) -> MetaResult<()> {
        let t = self.db.open_tree(tree)?;
        let mut batch = sled::Batch::default();
        for (key, value) in &entries {
            batch.insert(key.as_bytes(), value.as_slice());
        }
        t.apply_batch(batch)?;
        for (key, value) in &entries {
            self.notify(Change::Record {
                tree,
                key,
                value: Some(value.as_slice()),
            });
        }
        Ok(())
    }

    fn record_put(&self, tree: &str, key: &str, value: Vec<u8>) -> MetaResult<()> {
        self.db.open_tree(tree)?.insert(key, value.as_slice())?;
        self.notify(Change::Record {
            tree,
            key,
            value: Some(value.as_slice()),
        });
        Ok(())
    }

    fn record_create(&self, tree: &str, key: &str, value: Vec<u8>) -> MetaResult<bool> {
        let created = self
            .db
            .open_tree(tree)?
            .compare_and_swap(key, None as Option<&[u8]>, Some(value.as_slice()))?
            .is_ok();
        if created {
            self.notify(Change::Record {
                tree,
                key,
                value: Some(value.as_slice()),
            });
        }
        Ok(created)
    }

    fn sequence_next(&self, name: &str, floor: u64) -> MetaResult<u64> {
        let next = self
            .db
            .open_tree("sequences")?
            .update_and_fetch(name, |old| {
                let old = old
                    .and_then(|v| v.try_into().ok())
                    .map_or(0, u64::from_be_bytes);
                Some((old.max(floor) + 1).to_be_bytes().to_vec())
            })?
            .and_then(|v| v.as_ref().try_into().ok())
            .map(u64::from_be_bytes)
            .ok_or_else(|| MetaError::Corrupt(format!("sequence {name} unreadable")))?;
        Ok(next)
    }

    fn record_get(&self, tree: &str, key: &str) -> MetaResult<Option<Vec<u8>>> {
        Ok(self.db.open_tree(tree)?.get(key)?.map(|v| v.to_vec()))
    }

    fn record_remove(&self, tree: &str, key: &str) -> MetaResult<Option<Vec<u8>>> {
        let removed = self.db.open_tree(tree)?.remove(key)?;
        if removed.is_some() {
            self.notify(Change::Record {
                tree,
                key,
                value: None,
            });
        }
        Ok(removed.map(|v| v.to_vec()))
    }

    fn record_list(
        &self,
        tree: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> MetaResult<Vec<(String, Vec<u8>)>> {
        let t = self.db.open_tree(tree)?;
        let mut out = Vec::new();
        for item in page(&t, prefix.as_bytes(), after) {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item?;
            out.push((tail_str(&k, prefix.len()), v.to_vec()));
        }
        Ok(out)
    }

    fn lease_take(&self, name: &str, holder: &str, ttl: Duration) -> MetaResult<Lease> {
        let leases = self.db.open_tree("leases")?;
        loop {
            let now = super::now_ms();
            let old = leases.get(name)?;
            let current = old
                .as_deref()
                .and_then(|v| serde_json::from_slice::<StoredLease>(v).ok());
            if let Some(l) = &current {
                if l.holder != holder && l.expires_ms > now {
                    return Ok(Lease {
                        holder: l.holder.clone(),
                        remaining: Duration::from_millis(l.expires_ms - now),
                    });
                }
            }
            let taken = StoredLease {
                holder: holder.to_string(),
                expires_ms: now + ttl.as_millis() as u64,
            };
            let new = serde_json::to_vec(&taken).map_err(|e| MetaError::Backend(e.to_string()))?;
            if leases.compare_and_swap(name, old, Some(new))?.is_ok() {
                return Ok(Lease {
                    holder: taken.holder,
                    remaining: ttl,
                });
            }
        }
    }

    fn lease_release(&self, name: &str, holder: &str) -> MetaResult<()> {
        let leases = self.db.open_tree("leases")?;
        if let Some(old) = leases.get(name)? {
            let held =
                serde_json::from_slice::<StoredLease>(&old).is_ok_and(|l| l.holder == holder);
            if held {
                // Lost to a taker in between: theirs stays.
                let _ = leases.compare_and_swap(name, Some(old), None as Option<&[u8]>)?;
            }
        }
        Ok(())
    }

    fn record_trees(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .db
            .tree_names()
            .iter()
            .map(|n| String::from_utf8_lossy(n).into_owned())
            .filter(|n| !FIXED_TREES.contains(&n.as_str()) && !n.starts_with("__sled"))
            .collect();
        names.sort();
        names
    }

    fn record_remove_prefix(&self, tree: &str, prefix: &str) -> MetaResult<usize> {
        let t = self.db.open_tree(tree)?;
        let mut n = 0;
        for k in t.scan_prefix(prefix).keys() {
            let k = k?;
            if t.remove(&k)?.is_some() {
                n += 1;
                self.notify(Change::Record {
                    tree,
                    key: &String::from_utf8_lossy(&k),
                    value: None,
                });
            }
        }
        Ok(n)
    }
}

/// Entries of `tree` under `prefix` whose rest of key sorts after `after` (all of them for
/// `None`), in key order.
/// One JSON record of a tree.
fn get_json<T: for<'de> serde::Deserialize<'de>>(
    tree: &sled::Tree,
    key: impl AsRef<[u8]>,
) -> MetaResult<Option<T>> {
    tree.get(key)?.map(|v| from_json(&v)).transpose()
}

/// Every JSON record of a tree, in key order.
/// The repository and digest of a `repo \0 digest` key.
fn split_key(k: &[u8]) -> Option<(&str, Digest)> {
    let text = std::str::from_utf8(k).ok()?;
    let (repo, digest) = text.split_once('\0')?;
    Some((repo, Digest::parse(digest).ok()?))
}

fn all_json<T: for<'de> serde::Deserialize<'de>>(tree: &sled::Tree) -> MetaResult<Vec<T>> {
    tree.iter().values().map(|v| from_json(&v?)).collect()
}

fn page(tree: &sled::Tree, prefix: &[u8], after: Option<&str>) -> sled::Iter {
    use std::ops::Bound;
    let lower = match after {
        Some(a) => {
            let mut k = prefix.to_vec();
            k.extend_from_slice(a.as_bytes());
            Bound::Excluded(k)
        }
        None => Bound::Included(prefix.to_vec()),
    };
    let upper = match prefix_end(prefix) {
        Some(end) => Bound::Excluded(end),
        None => Bound::Unbounded,
    };
    tree.range::<Vec<u8>, _>((lower, upper))
}

fn transaction_error(e: sled::transaction::TransactionError<sled::Error>) -> MetaError {
    use sled::transaction::TransactionError;
    match e {
        TransactionError::Abort(e) | TransactionError::Storage(e) => e.into(),
    }
}

#[async_trait::async_trait]
impl MetaStore for SledMeta {
    fn subscribe(&self, subscriber: Subscriber) {
        self.inner.subscribers.write().push(subscriber);
    }

    /// Group commit: concurrent callers share one fsync. sled's own `flush_async` is not used:
    /// it deadlocks under concurrent writers (sled issue 1308); a blocking flush on the
    /// blocking pool does not.
    async fn flush(&self) -> MetaResult<()> {
        let mine = self.inner.announce();
        self.flushed(mine).await
    }

    async fn put_registry(&self, record: &RegistryRecord) -> MetaResult<()> {
        let record = record.clone();
        self.run(move |t| t.put_registry(&record)).await
    }

    async fn registries(&self) -> MetaResult<Vec<RegistryRecord>> {
        self.run(|t| t.registries()).await
    }

    async fn registry(&self, name: &str) -> MetaResult<Option<RegistryRecord>> {
        let name = name.to_owned();
        self.run(move |t| t.registry(&name)).await
    }

    async fn delete_registry(&self, name: &str) -> MetaResult<()> {
        let name = name.to_owned();
        self.run(move |t| t.delete_registry(&name)).await
    }

    async fn put_image_cache(
        &self,
        record: &ImageCacheRecord,
        credentials: Option<&CredentialRecord>,
    ) -> MetaResult<()> {
        let (record, credentials) = (record.clone(), credentials.cloned());
        self.run(move |t| t.put_image_cache(&record, credentials.as_ref()))
            .await
    }

    async fn image_caches(&self) -> MetaResult<Vec<ImageCacheRecord>> {
        self.run(|t| t.image_caches()).await
    }

    async fn image_cache(&self, name: &str) -> MetaResult<Option<ImageCacheRecord>> {
        let name = name.to_owned();
        self.run(move |t| t.image_cache(&name)).await
    }

    async fn credentials(&self, image_cache: &str) -> MetaResult<Option<CredentialRecord>> {
        let name = image_cache.to_owned();
        self.run(move |t| t.credentials(&name)).await
    }

    async fn delete_image_cache(&self, name: &str) -> MetaResult<bool> {
        let name = name.to_owned();
        self.run(move |t| t.delete_image_cache(&name)).await
    }

    async fn repositories(
        &self,
        registry: Option<&str>,
        last: Option<&str>,
        n: usize,
    ) -> MetaResult<Vec<String>> {
        let (registry, last) = (registry.map(str::to_owned), last.map(str::to_owned));
        self.run(move |t| t.repositories(registry.as_deref(), last.as_deref(), n))
            .await
    }

    async fn repo_exists(&self, repo: &str) -> MetaResult<bool> {
        let repo = repo.to_owned();
        self.run(move |t| t.repo_exists(&repo)).await
    }

    async fn remove_repo_if_empty(&self, repo: &str) -> MetaResult<bool> {
        let repo = repo.to_owned();
        self.run(move |t| t.remove_repo_if_empty(&repo)).await
    }

    async fn link_blob(&self, repo: &str, digest: &Digest, size: u64) -> MetaResult<()> {
        let (repo, digest) = (repo.to_owned(), digest.clone());
        self.run(move |t| t.link_blob(&repo, &digest, size)).await
    }

    async fn blob_link(&self, repo: &str, digest: &Digest) -> MetaResult<Option<u64>> {
        let (repo, digest) = (repo.to_owned(), digest.clone());
        self.run(move |t| t.blob_link(&repo, &digest)).await
    }

    async fn unlink_blob(&self, repo: &str, digest: &Digest) -> MetaResult<bool> {
        let (repo, digest) = (repo.to_owned(), digest.clone());
        self.run(move |t| t.unlink_blob(&repo, &digest)).await
    }

    async fn referenced(&self) -> MetaResult<std::collections::HashSet<Digest>> {
        self.run(|t| t.referenced()).await
    }

    async fn linked_blobs(
        &self,
        repo: &str,
        after: Option<&Digest>,
        limit: usize,
    ) -> MetaResult<Vec<Digest>> {
        let (repo, after) = (repo.to_owned(), after.cloned());
        self.run(move |t| t.linked_blobs(&repo, after.as_ref(), limit))
            .await
    }

    async fn put_artifact(
        &self,
        repo: &str,
        digest: &Digest,
        record: &ArtifactRecord,
        tag: Option<&str>,
        referrer: Option<&Descriptor>,
        refers: &Refers,
    ) -> MetaResult<Result<(), Missing>> {
        let (repo, digest, record) = (repo.to_owned(), digest.clone(), record.clone());
        let (tag, referrer, refers) = (tag.map(str::to_owned), referrer.cloned(), refers.clone());
        let (put, mine) = self
            .run(move |t| {
                let put = t.put_artifact(
                    &repo,
                    &digest,
                    &record,
                    tag.as_deref(),
                    referrer.as_ref(),
                    &refers,
                )?;
                Ok((put, t.flush_if_idle()?))
            })
            .await?;
        self.flushed(mine).await?;
        Ok(put)
    }

    async fn artifact(&self, repo: &str, digest: &Digest) -> MetaResult<Option<ArtifactRecord>> {
        let (repo, digest) = (repo.to_owned(), digest.clone());
        self.run(move |t| t.artifact(&repo, &digest)).await
    }

    async fn delete_artifact(
        &self,
        repo: &str,
        digest: &Digest,
    ) -> MetaResult<Option<Vec<String>>> {
        let (repo, digest) = (repo.to_owned(), digest.clone());
        self.run(move |t| t.delete_artifact(&repo, &digest)).await
    }

    async fn delete_artifacts(
        &self,
        repo: &str,
        digests: &[Digest],
    ) -> MetaResult<Vec<Option<Vec<String>>>> {
        let (repo, digests) = (repo.to_owned(), digests.to_vec());
        self.run(move |t| {
            digests
                .iter()
                .map(|d| t.delete_artifact(&repo, d))
                .collect()
        })
        .await
    }

    async fn artifacts(
        &self,
        repo: &str,
        after: Option<&Digest>,
        limit: usize,
    ) -> MetaResult<Vec<(Digest, ArtifactRecord)>> {
        let (repo, after) = (repo.to_owned(), after.cloned());
        self.run(move |t| t.artifacts(&repo, after.as_ref(), limit))
            .await
    }

    async fn tag(&self, repo: &str, tag: &str) -> MetaResult<Option<Digest>> {
        let (repo, tag) = (repo.to_owned(), tag.to_owned());
        self.run(move |t| t.tag(&repo, &tag)).await
    }

    async fn tag_artifact(&self, repo: &str, digest: &Digest, tag: &str) -> MetaResult<bool> {
        let (repo, digest, tag) = (repo.to_owned(), digest.clone(), tag.to_owned());
        self.run(move |t| t.tag_artifact(&repo, &digest, &tag))
            .await
    }

    async fn delete_tag(&self, repo: &str, tag: &str) -> MetaResult<Option<Digest>> {
        let (repo, tag) = (repo.to_owned(), tag.to_owned());
        self.run(move |t| t.delete_tag(&repo, &tag)).await
    }

    async fn tagged(&self, repo: &str) -> MetaResult<Vec<(String, Digest)>> {
        let repo = repo.to_owned();
        self.run(move |t| t.tagged(&repo)).await
    }

    async fn last_pulls(&self, repo: &str) -> MetaResult<std::collections::HashMap<Digest, u64>> {
        let repo = repo.to_owned();
        self.run(move |t| t.last_pulls(&repo)).await
    }

    async fn record_put_many(&self, tree: &str, entries: Vec<(String, Vec<u8>)>) -> MetaResult<()> {
        let tree = tree.to_owned();
        self.run(move |t| t.record_put_many(&tree, entries)).await
    }

    async fn tags(&self, repo: &str, last: Option<&str>, n: usize) -> MetaResult<Vec<String>> {
        let (repo, last) = (repo.to_owned(), last.map(str::to_owned));
        self.run(move |t| t.tags(&repo, last.as_deref(), n)).await
    }

    async fn referrers(
        &self,
        repo: &str,
        subject: &Digest,
        after: Option<&Digest>,
        limit: usize,
    ) -> MetaResult<Vec<Descriptor>> {
        let (repo, subject, after) = (repo.to_owned(), subject.clone(), after.cloned());
        self.run(move |t| t.referrers(&repo, &subject, after.as_ref(), limit))
            .await
    }

    async fn record_pulls(&self, batch: &[(Arc<str>, u64)]) -> MetaResult<()> {
        let batch = batch.to_vec();
        self.run(move |t| t.record_pulls(&batch)).await
    }

    async fn last_pull(&self, repo: &str, digest: &Digest) -> MetaResult<Option<u64>> {
        let (repo, digest) = (repo.to_owned(), digest.clone());
        self.run(move |t| t.last_pull(&repo, &digest)).await
    }

    async fn record_put(&self, tree: &str, key: &str, value: Vec<u8>) -> MetaResult<()> {
        let (tree, key) = (tree.to_owned(), key.to_owned());
        self.run(move |t| t.record_put(&tree, &key, value)).await
    }

    async fn record_create(&self, tree: &str, key: &str, value: Vec<u8>) -> MetaResult<bool> {
        let (tree, key) = (tree.to_owned(), key.to_owned());
        self.run(move |t| t.record_create(&tree, &key, value)).await
    }

    async fn sequence_next(&self, name: &str, floor: u64) -> MetaResult<u64> {
        let name = name.to_owned();
        self.run(move |t| t.sequence_next(&name, floor)).await
    }

    async fn record_get(&self, tree: &str, key: &str) -> MetaResult<Option<Vec<u8>>> {
        let (tree, key) = (tree.to_owned(), key.to_owned());
        self.run(move |t| t.record_get(&tree, &key)).await
    }

    async fn lease_take(&self, name: &str, holder: &str, ttl: Duration) -> MetaResult<Lease> {
        let (name, holder) = (name.to_owned(), holder.to_owned());
        self.run(move |t| t.lease_take(&name, &holder, ttl)).await
    }

    async fn lease_release(&self, name: &str, holder: &str) -> MetaResult<()> {
        let (name, holder) = (name.to_owned(), holder.to_owned());
        self.run(move |t| t.lease_release(&name, &holder)).await
    }

    async fn record_remove(&self, tree: &str, key: &str) -> MetaResult<Option<Vec<u8>>> {
        let (tree, key) = (tree.to_owned(), key.to_owned());
        self.run(move |t| t.record_remove(&tree, &key)).await
    }

    async fn record_list(
        &self,
        tree: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> MetaResult<Vec<(String, Vec<u8>)>> {
        let (tree, prefix, after) = (tree.to_owned(), prefix.to_owned(), after.map(str::to_owned));
        self.run(move |t| t.record_list(&tree, &prefix, after.as_deref(), limit))
            .await
    }

    async fn record_remove_prefix(&self, tree: &str, prefix: &str) -> MetaResult<usize> {
        let (tree, prefix) = (tree.to_owned(), prefix.to_owned());
        self.run(move |t| t.record_remove_prefix(&tree, &prefix))
            .await
    }

    async fn usage(&self) -> MetaResult<Vec<(String, Usage)>> {
        Ok(self.inner.usage.lock().usage())
    }

    async fn registry_usage(&self, registry: &str) -> MetaResult<Usage> {
        Ok(self.inner.usage.lock().of(registry))
    }

    async fn shared_blobs(&self, registry: &str) -> MetaResult<u64> {
        Ok(self.inner.usage.lock().shared_blobs(registry))
    }

    async fn record_trees(&self) -> MetaResult<Vec<String>> {
        self.run(|t| Ok(t.record_trees())).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::meta::now_ms;

    fn rec(subject: Option<Digest>) -> ArtifactRecord {
        ArtifactRecord {
            media_type: "m".into(),
            size: 1,
            pushed_ms: now_ms(),
            artifact_type: None,
            subject,
        }
    }

    /// The usage counted when the store opens is the usage the writes kept.
    #[test]
    fn usage_counted_at_open_equals_usage_kept_by_the_writes() {
        let dir = tempfile::tempdir().unwrap();
        let kept = {
            let m = Trees::open(dir.path()).unwrap();
            let (layer, other, man) = (
                Digest::sha256(b"l"),
                Digest::sha256(b"o"),
                Digest::sha256(b"m"),
            );
            for repo in ["r/a", "r/b", "s/c"] {
                m.link_blob(repo, &layer, 7).unwrap();
                m.put_artifact(repo, &man, &rec(None), Some("t"), None, &Refers::default())
                    .unwrap()
                    .unwrap();
            }
            m.link_blob("r/a", &other, 3).unwrap();
            m.unlink_blob("r/b", &layer).unwrap();
            m.delete_artifact("s/c", &man).unwrap();
            let kept = m.usage.lock().usage();
            assert_eq!(kept[0].1.bytes, 11);
            m.db.flush().unwrap();
            kept
        };
        let reopened = Trees::open(dir.path()).unwrap();
        assert_eq!(reopened.usage.lock().usage(), kept);
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
            let m = Trees::open(dir.path()).unwrap();
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
        let m = Trees::open(dir.path()).unwrap();
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
        let m = Trees::open(dir.path()).unwrap();
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
        let meta = std::sync::Arc::new(Trees::open(dir.path()).unwrap());
        let d = Digest::sha256(b"m");
        meta.put_artifact("r/a", &d, &rec(None), Some("v1"), None, &Refers::default())
            .unwrap()
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
        let m = Trees::open(dir.path()).unwrap();
        let d = Digest::sha256(b"m");
        for t in ["b", "a", "c"] {
            m.put_artifact("r/x", &d, &rec(None), Some(t), None, &Refers::default())
                .unwrap()
                .unwrap();
        }
        m.put_artifact("r/x2", &d, &rec(None), Some("zz"), None, &Refers::default())
            .unwrap()
            .unwrap();
        m.put_artifact(
            "r/x/y",
            &d,
            &rec(None),
            Some("yy"),
            None,
            &Refers::default(),
        )
        .unwrap()
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
        let m = Trees::open(dir.path()).unwrap();
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
            &Refers::default(),
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            m.referrers("r/x", &subject, None, usize::MAX).unwrap(),
            vec![desc]
        );
        m.delete_artifact("r/x", &referrer).unwrap();
        assert!(m
            .referrers("r/x", &subject, None, usize::MAX)
            .unwrap()
            .is_empty());
        m.delete_registry("r").unwrap();
    }

    #[tokio::test]
    async fn calls_run_on_the_blocking_pool_not_on_the_callers_thread() {
        // A current-thread runtime: its one worker is this thread. Subscribers are called on
        // the thread that wrote, so they tell where the sled calls ran.
        let dir = tempfile::tempdir().unwrap();
        let meta = SledMeta::open(dir.path()).unwrap();
        let threads = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let sink = threads.clone();
        meta.subscribe(Box::new(move |_| {
            sink.lock().push(std::thread::current().id())
        }));
        let d = Digest::sha256(b"m");
        meta.put_artifact("r/a", &d, &rec(None), Some("v1"), None, &Refers::default())
            .await
            .unwrap()
            .unwrap();
        meta.delete_artifact("r/a", &d).await.unwrap();
        let here = std::thread::current().id();
        let seen = threads.lock().clone();
        assert_eq!(seen.len(), 4, "artifact and tag, twice");
        assert!(
            seen.iter().all(|t| *t != here),
            "a sled call ran on the async worker"
        );
    }
}
