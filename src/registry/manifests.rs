//! Manifests: `GET`/`HEAD` served from the hot cache, `PUT` with validation, `DELETE` by tag or digest.

use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use hyper::body::Incoming;

use super::{empty, set, Req};
use crate::error::{Error, Result};
use crate::events::{EventKind, Happened};
use crate::http::body::Body;
use crate::http::req::read_limited;
use crate::oci::digest::Digest;
use crate::oci::manifest::{self, Descriptor};
use crate::oci::reference::{Reference, RepoName};
use crate::store::meta::{now_ms, ArtifactRecord, Meta};
use crate::store::{manifest_key, ManifestEntry};
use crate::App;

/// `GET`/`HEAD /v2/NAME/manifests/REFERENCE`.
pub async fn get(
    app: &App,
    repo: &RepoName,
    reference: &str,
    head: bool,
) -> Result<Response<Body>> {
    let key = manifest_key(repo.as_str(), reference);
    let entry = match app.store.cached_manifest(&key) {
        Some(e) => e,
        None => {
            let generation = app.store.generation();
            let entry = load(app, repo, &readable_reference(reference)?).await?;
            app.store.cache_manifest(generation, key, entry.clone());
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
        Reference::Tag(t) => app.store.meta.tag(repo.as_str(), t)?.ok_or_else(unknown)?,
        Reference::Digest(d) => d.clone(),
    };
    let record = app
        .store
        .meta
        .artifact(repo.as_str(), &digest)?
        .ok_or_else(unknown)?;
    let blobs = app.store.blobs.clone();
    let wanted = digest.clone();
    // Manifests are bounded by the manifest limit when they are stored.
    let bytes = tokio::task::spawn_blocking(move || blobs.read_small(&wanted, u64::MAX))
        .await
        .map_err(|e| Error::Internal(e.to_string()))??;
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
        digest_header: HeaderValue::from_str(digest.as_str()).expect("digests are header-safe"),
        subject_header: subject
            .map(|s| HeaderValue::from_str(s.as_str()).expect("digests are header-safe")),
        pull_key: Meta::pull_key(repo.as_str(), &digest),
        digest,
        bytes,
    }
}

/// `PUT /v2/NAME/manifests/REFERENCE`.
pub async fn put(
    app: &App,
    repo: &RepoName,
    reference: &str,
    req: &Req<'_>,
    body: Incoming,
) -> Result<Response<Body>> {
    let reference = Reference::parse(reference)?;
    let limit = app.config.limits.max_manifest_bytes;
    if let Some(len) = req
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
    {
        if len > limit as u64 {
            return Err(Error::ManifestTooLarge { size: len, limit });
        }
    }
    let content_type = req
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or("").trim())
        .filter(|v| !v.is_empty());
    let bytes = read_limited(body, limit).await?;
    let parsed = manifest::parse(&bytes, content_type)?;
    let digest = match &reference {
        Reference::Digest(d) => {
            let actual = Digest::of(d.algorithm(), &bytes);
            if &actual != d {
                return Err(Error::DigestInvalid(format!(
                    "manifest body has digest {actual}, not {d}"
                )));
            }
            actual
        }
        Reference::Tag(_) => Digest::sha256(&bytes),
    };
    let meta = &app.store.meta;
    for blob in &parsed.blobs {
        if meta.blob_link(repo.as_str(), blob)?.is_none() {
            return Err(Error::ManifestBlobUnknown(blob.to_string()));
        }
    }
    for child in &parsed.children {
        if meta.artifact(repo.as_str(), &child.digest)?.is_none() {
            return Err(Error::ManifestBlobUnknown(child.digest.to_string()));
        }
    }
    let tag = match &reference {
        Reference::Tag(t) => Some(&**t),
        Reference::Digest(_) => None,
    };
    store(app, repo.as_str(), &digest, &bytes, &parsed, tag).await?;
    let pushed = |kind, tag| Happened {
        kind,
        operator: req.principal.name(),
        repository: repo.as_str(),
        tag,
        digest: digest.as_str(),
        media_type: &parsed.media_type,
        size: bytes.len() as u64,
    };
    app.events.emit(pushed(EventKind::PushArtifact, tag));
    if tag.is_some() {
        app.events.emit(pushed(EventKind::CreateTag, tag));
    }
    tracing::debug!(%repo, %reference, %digest, media_type = %parsed.media_type, "manifest stored");
    let mut r = empty(StatusCode::CREATED);
    set(
        &mut r,
        header::LOCATION,
        &format!("/v2/{repo}/manifests/{digest}"),
    );
    set(&mut r, "docker-content-digest", digest.as_str());
    if let Some(subject) = &parsed.subject {
        set(&mut r, "oci-subject", subject.digest.as_str());
    }
    Ok(r)
}

/// Stores verified manifest bytes and records the artifact, its tag and its referrer entry;
/// durable and visible (caches invalidated) when it returns.
pub async fn store(
    app: &App,
    repo: &str,
    digest: &Digest,
    bytes: &Bytes,
    parsed: &manifest::ParsedManifest,
    tag: Option<&str>,
) -> Result<()> {
    let blobs = app.store.blobs.clone();
    let (d, b) = (digest.clone(), bytes.clone());
    tokio::task::spawn_blocking(move || blobs.put(&d, &b))
        .await
        .map_err(|e| Error::Internal(e.to_string()))??;
    let record = ArtifactRecord {
        media_type: parsed.media_type.clone(),
        size: bytes.len() as u64,
        pushed_ms: now_ms(),
        artifact_type: parsed.artifact_type.clone(),
        subject: parsed.subject.as_ref().map(|s| s.digest.clone()),
    };
    let referrer = Descriptor {
        media_type: parsed.media_type.clone(),
        digest: digest.clone(),
        size: bytes.len() as u64,
        artifact_type: parsed.artifact_type.clone(),
        annotations: parsed.annotations.clone(),
        platform: None,
        urls: None,
    };
    app.store
        .meta
        .put_artifact(repo, digest, &record, tag, Some(&referrer))?;
    app.store.meta.flush().await?;
    if let Some(tag) = tag {
        app.store.invalidate_manifest(repo, tag);
    }
    app.store.invalidate_manifest(repo, digest.as_str());
    Ok(())
}

/// What a removal took away.
pub struct Removed {
    /// The artifact the reference named.
    pub digest: Digest,
    /// Tags removed (the tag itself, or every tag of a removed artifact).
    pub tags: Vec<String>,
}

/// `DELETE /v2/NAME/manifests/REFERENCE`: a tag removes the tag; a digest removes the artifact
/// and every tag pointing at it. `operator` is who asked (for the events).
pub async fn delete(
    app: &App,
    repo: &RepoName,
    reference: &str,
    operator: &str,
) -> Result<Response<Body>> {
    remove(app, repo, &Reference::parse(reference)?, operator).await?;
    Ok(empty(StatusCode::ACCEPTED))
}

/// Removes a tag, or an artifact with its tags (the one removal of `/v2/` and `/api/v1/`):
/// invalidates the hot cache, drops an emptied repository from the catalog, flushes, then
/// publishes DELETE_TAG / DELETE_ARTIFACT.
pub async fn remove(
    app: &App,
    repo: &RepoName,
    reference: &Reference,
    operator: &str,
) -> Result<Removed> {
    let meta = &app.store.meta;
    let unknown = || Error::ManifestUnknown(format!("{reference} is not in {repo}"));
    let registry = repo.registry();
    let publish = |kind, tag: Option<&str>, digest: &Digest, record: &Option<ArtifactRecord>| {
        let (media_type, size) = record
            .as_ref()
            .map_or(("", 0), |r| (r.media_type.as_str(), r.size));
        app.events.emit(Happened {
            kind,
            operator,
            repository: repo.as_str(),
            tag,
            digest: digest.as_str(),
            media_type,
            size,
        });
    };
    match reference {
        Reference::Tag(t) => {
            let digest = meta.delete_tag(repo.as_str(), t)?.ok_or_else(unknown)?;
            app.store.invalidate_manifest(repo.as_str(), t);
            meta.flush().await?;
            if app.events.wants(EventKind::DeleteTag, registry) {
                let record = meta.artifact(repo.as_str(), &digest)?;
                publish(EventKind::DeleteTag, Some(t), &digest, &record);
            }
            Ok(Removed {
                digest,
                tags: vec![t.to_string()],
            })
        }
        Reference::Digest(d) => {
            // Read before deleting: the events carry the media type and size.
            let record = meta.artifact(repo.as_str(), d)?;
            let tags = meta
                .delete_artifact(repo.as_str(), d)?
                .ok_or_else(unknown)?;
            app.store.invalidate_manifest(repo.as_str(), d.as_str());
            for t in &tags {
                app.store.invalidate_manifest(repo.as_str(), t);
            }
            meta.remove_repo_if_empty(repo.as_str())?;
            meta.flush().await?;
            publish(EventKind::DeleteArtifact, None, d, &record);
            // The artifact's tags went with it.
            for t in &tags {
                publish(EventKind::DeleteTag, Some(t), d, &record);
            }
            Ok(Removed {
                digest: d.clone(),
                tags,
            })
        }
    }
}
