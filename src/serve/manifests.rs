//! Manifests read from the store: `GET`/`HEAD` for origin and cache registries alike, from a
//! hot in-memory cache of ready responses that metadata changes invalidate.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Response};

use crate::error::{Error, Result};
use crate::http::body::Body;
use crate::oci::digest::Digest;
use crate::oci::manifest;
use crate::oci::reference::{Reference, RepoName};
use crate::store::meta::{now_ms, pull_key, ArtifactRecord, Change, Missing, Refers};
use crate::App;

/// A manifest ready to serve: everything a GET/HEAD response needs, prebuilt.
pub struct ManifestEntry {
    /// Digest of the bytes.
    pub digest: Digest,
    /// The manifest, byte-for-byte as pushed.
    pub bytes: Bytes,
    /// `Content-Type` value.
    pub content_type: HeaderValue,
    /// `Docker-Content-Digest` value.
    pub digest_header: HeaderValue,
    /// `OCI-Subject` value, if the manifest has a subject.
    pub subject_header: Option<HeaderValue>,
    /// Key under which its pulls are recorded.
    pub pull_key: Arc<str>,
}

/// Cache key of a manifest reference.
pub fn manifest_key(repo: &str, reference: &str) -> String {
    let mut k = String::with_capacity(repo.len() + reference.len() + 1);
    k.push_str(repo);
    k.push('\0');
    k.push_str(reference);
    k
}

/// Hot manifests by `repo\0reference` (tag or digest), bounded in bytes. Subscribed to the
/// metadata's changes ([`ManifestCache::forget`]), so no writer has to remember to invalidate it.
pub struct ManifestCache {
    entries: moka::sync::Cache<String, Arc<ManifestEntry>>,
    /// Bumped on every invalidation, so a load that raced with a write is not cached.
    generation: AtomicU64,
}

impl ManifestCache {
    /// A cache of at most `bytes` (keys and manifests, plus 256 bytes per entry), entries
    /// living at most `ttl` (a safety net where other nodes write: they tell of changes).
    pub fn new(bytes: u64, ttl: Option<std::time::Duration>) -> ManifestCache {
        let builder = moka::sync::Cache::builder().max_capacity(bytes);
        let builder = match ttl {
            Some(ttl) => builder.time_to_live(ttl),
            None => builder,
        };
        ManifestCache {
            entries: builder
                .weigher(|k: &String, v: &Arc<ManifestEntry>| {
                    (k.len() + v.bytes.len() + 256)
                        .try_into()
                        .unwrap_or(u32::MAX)
                })
                .build(),
            generation: AtomicU64::new(0),
        }
    }

    /// A cached manifest.
    pub fn get(&self, key: &str) -> Option<Arc<ManifestEntry>> {
        self.entries.get(key)
    }

    /// The invalidation generation; read it before loading what [`ManifestCache::insert`]
    /// caches.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Caches a manifest loaded at `generation`, unless a change invalidated anything since.
    pub fn insert(&self, generation: u64, key: String, entry: Arc<ManifestEntry>) {
        if self.generation() == generation {
            self.entries.insert(key, entry);
        }
    }

    /// Drops what a metadata change makes stale.
    pub fn forget(&self, change: Change<'_>) {
        // Records of other behaviours and a registry's settings say nothing about manifests.
        if matches!(
            change,
            Change::Record { .. }
                | Change::Registry {
                    record: Some(_),
                    ..
                }
        ) {
            return;
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
        match change {
            Change::Tag { repo, tag } => self.entries.invalidate(&manifest_key(repo, tag)),
            Change::Artifact { repo, digest } => self
                .entries
                .invalidate(&manifest_key(repo, digest.as_str())),
            Change::Registry { .. } | Change::Lost => self.entries.invalidate_all(),
            Change::Record { .. } => {}
        }
    }
}

fn digest_header(digest: &Digest) -> HeaderValue {
    // Digests are `algorithm:hex`, always a valid header value; the fallback is never used.
    HeaderValue::from_str(digest.as_str()).unwrap_or(HeaderValue::from_static(""))
}

/// `GET`/`HEAD /v2/NAME/manifests/REFERENCE`.
pub async fn get(
    app: &App,
    repo: &RepoName,
    reference: &str,
    head: bool,
) -> Result<Response<Body>> {
    let key = manifest_key(repo.as_str(), reference);
    let entry = match app.manifests.get(&key) {
        Some(e) => e,
        None => {
            let generation = app.manifests.generation();
            let entry = load(app, repo, &readable_reference(reference)?).await?;
            app.manifests.insert(generation, key, entry.clone());
            entry
        }
    };
    if !head {
        app.store.pulls.record(&entry.pull_key);
    }
    Ok(manifest_response(&entry, head))
}

/// The reference of a manifest `GET`/`HEAD`. Something that is neither a tag nor a digest
/// names no manifest: 404 `MANIFEST_UNKNOWN`, the only error the spec lists for a read (a `PUT`
/// keeps 400 `TAG_INVALID`/`DIGEST_INVALID`).
pub fn readable_reference(reference: &str) -> Result<Reference> {
    Reference::parse(reference).map_err(|e| {
        Error::ManifestUnknown(format!("{reference:?} is neither a tag nor a digest: {e}"))
    })
}

/// Builds a manifest response from a cache entry: header clones only, no parsing.
pub fn manifest_response(entry: &ManifestEntry, head: bool) -> Response<Body> {
    let mut r = if head {
        Response::new(Body::Empty)
    } else {
        Response::new(Body::Full(Some(entry.bytes.clone())))
    };
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, entry.content_type.clone());
    h.insert("docker-content-digest", entry.digest_header.clone());
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(entry.bytes.len()));
    h.insert(header::ETAG, entry.digest_header.clone());
    if let Some(s) = &entry.subject_header {
        h.insert("oci-subject", s.clone());
    }
    r
}

async fn load(app: &App, repo: &RepoName, reference: &Reference) -> Result<Arc<ManifestEntry>> {
    let unknown = || Error::ManifestUnknown(format!("{reference} is not in {repo}"));
    let digest = match reference {
        Reference::Tag(t) => app
            .store
            .meta
            .tag(repo.as_str(), t)
            .await?
            .ok_or_else(unknown)?,
        Reference::Digest(d) => d.clone(),
    };
    let record = app
        .store
        .meta
        .artifact(repo.as_str(), &digest)
        .await?
        .ok_or_else(unknown)?;
    // Manifests are bounded by the manifest limit when they are stored.
    let bytes = app.store.blobs.read_small(&digest, u64::MAX).await?;
    let Some(bytes) = bytes else {
        tracing::error!(%repo, %digest, "manifest recorded but its bytes are missing");
        return Err(unknown());
    };
    Ok(Arc::new(entry(
        repo,
        digest,
        bytes,
        &record.media_type,
        record.subject.as_ref(),
    )))
}

fn entry(
    repo: &RepoName,
    digest: Digest,
    bytes: Bytes,
    media_type: &str,
    subject: Option<&Digest>,
) -> ManifestEntry {
    ManifestEntry {
        content_type: HeaderValue::from_str(media_type)
            .unwrap_or(HeaderValue::from_static(manifest::OCI_MANIFEST)),
        digest_header: digest_header(&digest),
        subject_header: subject.map(digest_header),
        pull_key: pull_key(repo.as_str(), &digest),
        digest,
        bytes,
    }
}

/// Stores verified manifest bytes and records the artifact, its tag and its referrer entry;
/// durable and visible (the metadata's subscribers drop stale cached copies) when it returns.
pub async fn store(
    app: &App,
    repo: &str,
    digest: &Digest,
    bytes: &Bytes,
    parsed: &manifest::ParsedManifest,
    tag: Option<&str>,
    refers: &Refers,
) -> Result<()> {
    // Held from the bytes to the record: a collection never deletes them in between.
    let _hold = app.store.gate.hold(digest).await;
    app.store.blobs.put(digest, bytes.clone()).await?;
    let record = ArtifactRecord {
        media_type: parsed.media_type.clone(),
        size: bytes.len() as u64,
        pushed_ms: now_ms(),
        artifact_type: parsed.artifact_type.clone(),
        subject: parsed.subject.as_ref().map(|s| s.digest.clone()),
    };
    let referrer = parsed.descriptor(digest, bytes.len() as u64);
    app.store
        .meta
        .put_artifact(repo, digest, &record, tag, Some(&referrer), refers)
        .await?
        .map_err(|missing| {
            // The manifest's bytes stay behind unreferenced, as any orphan the sweep collects.
            let (Missing::Blob(d) | Missing::Manifest(d)) = missing;
            Error::ManifestBlobUnknown(d.to_string())
        })?;
    Ok(())
}
