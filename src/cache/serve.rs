//! Serving rules of a cache registry: manifests by tag revalidated with `HEAD` (the DESIGN.md 5
//! table), digests immutable, blobs from the store or the single-flight fetch.

use std::time::{Duration, Instant};

use bytes::BytesMut;
use http::{header, HeaderMap, HeaderValue, Method, Response, StatusCode};

use std::sync::Arc;

use super::fetch::{Direct, Fetch, Joined};
use super::health::{self, ErrorKind};
use super::peer;
use super::upstream::{UpstreamError, UpstreamRequest};
use super::{CacheTarget, Outcome};
use crate::error::{Error, Result};
use crate::http::body::Body;
use crate::http::req::{set, Req};
use crate::oci::digest::Digest;
use crate::oci::manifest;
use crate::oci::reference::Reference;
use crate::serve::manifests::manifest_key;
use crate::serve::{blobs, manifests};
use crate::store::meta::Refers;
use crate::App;

const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

fn outcome(
    app: &App,
    t: &CacheTarget,
    mut r: Response<Body>,
    outcome: &'static str,
) -> Response<Body> {
    let registry = app.cache.label(t.repo.registry());
    metrics::counter!("berth_cache_requests_total", "registry" => registry, "outcome" => outcome)
        .increment(1);
    r.extensions_mut().insert(Outcome { registry, outcome });
    if let Some(ns) = &t.ns {
        set(&mut r, "oci-namespace", ns);
    }
    r
}

/// Maps a source failure with no local copy to the client's error.
fn upstream_error(t: &CacheTarget, e: UpstreamError) -> Error {
    let source = t.source.name();
    match e {
        UpstreamError::Status {
            status,
            retry_after,
            ..
        } if status == StatusCode::TOO_MANY_REQUESTS => Error::TooManyRequests {
            message: format!(
                "source {source:?} is rate limiting and {} is not cached",
                t.repo
            ),
            retry_after,
        },
        other => Error::Upstream(format!("image cache {source:?}: {other}")),
    }
}

/// `GET`/`HEAD` of a manifest in a cache registry.
pub async fn manifest(
    app: &App,
    t: &CacheTarget,
    reference: &str,
    head: bool,
) -> Result<Response<Body>> {
    let local = t.repo.as_str();
    match manifests::readable_reference(reference)? {
        Reference::Digest(d) => {
            let hot = app.manifests.get(&manifest_key(local, reference)).is_some();
            if hot || app.store.meta.artifact(local, &d).await?.is_some() {
                let r = manifests::get(app, &t.repo, reference, head).await?;
                return Ok(outcome(app, t, r, "hit"));
            }
            fetch_manifest(app, t, d.as_str(), Some(&d), None).await?;
            let r = manifests::get(app, &t.repo, reference, head).await?;
            Ok(outcome(app, t, r, "miss"))
        }
        Reference::Tag(tag) => manifest_by_tag(app, t, &tag, head).await,
    }
}

async fn manifest_by_tag(
    app: &App,
    t: &CacheTarget,
    tag: &str,
    head: bool,
) -> Result<Response<Body>> {
    let local = t.repo.as_str();
    let key = manifest_key(local, tag);
    let ttl = t.source.config.revalidate_ttl;
    let serve_local = |label| async move {
        let r = manifests::get(app, &t.repo, tag, head).await?;
        Ok(outcome(app, t, r, label))
    };
    let fresh = |since: Option<Instant>| {
        app.cache
            .validated
            .get(&key)
            .is_some_and(|at| since.is_none_or(|s| at >= s))
    };
    // A TTL longer than the machine's uptime has no earliest instant: anything validated counts.
    if !ttl.is_zero()
        && fresh(Instant::now().checked_sub(ttl))
        && (app.manifests.get(&key).is_some() || app.store.meta.tag(local, tag).await?.is_some())
    {
        return serve_local("hit").await;
    }
    let asked_at = Instant::now();
    let lock = app
        .cache
        .revalidating
        .get_with(key.clone(), Default::default);
    let _turn = lock.lock().await;
    let local_digest = app.store.meta.tag(local, tag).await?;
    if fresh(Some(asked_at)) && local_digest.is_some() {
        return serve_local("coalesced").await;
    }
    let deadline = Instant::now() + app.config.pull_through.revalidate_timeout;
    let mut headers = HeaderMap::new();
    headers.insert(header::ACCEPT, HeaderValue::from_static(MANIFEST_ACCEPT));
    let req = UpstreamRequest::new(
        Method::HEAD,
        format!("{}/manifests/{tag}", t.upstream),
        &t.upstream,
        headers,
    );
    match t.source.send(&req, deadline).await {
        Ok(response) => {
            let source_digest = response
                .headers()
                .get("docker-content-digest")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| Digest::parse(v).ok());
            if source_digest.is_some() && source_digest == local_digest {
                app.cache.validated.insert(key, Instant::now());
                return serve_local("revalidated").await;
            }
            let reference = source_digest
                .as_ref()
                .map_or(tag.to_string(), |d| d.to_string());
            match fetch_manifest(app, t, &reference, source_digest.as_ref(), Some(tag)).await {
                Ok(()) => {
                    app.cache.validated.insert(key, Instant::now());
                    serve_local("miss").await
                }
                Err(e) if local_digest.is_some() => {
                    tracing::warn!(source = %t.source.name(), repo = %t.repo, tag, error = %e, "source manifest fetch failed; serving the cached copy");
                    health::count_stale(t.source.name());
                    serve_local("stale").await
                }
                Err(e) => Err(e),
            }
        }
        Err(e) if e.is_not_found() => {
            // The source deleted it: stop serving the tag.
            if app.store.meta.delete_tag(local, tag).await?.is_some() {
                app.store.meta.flush().await?;
            }
            Err(Error::ManifestUnknown(format!(
                "{tag} is not at the source of {}",
                t.repo
            )))
        }
        Err(e) if local_digest.is_some() => {
            tracing::warn!(source = %t.source.name(), repo = %t.repo, tag, error = %e, "source unavailable; serving the cached copy");
            health::count_stale(t.source.name());
            serve_local("stale").await
        }
        Err(e) => Err(upstream_error(t, e)),
    }
}

/// Fetches a manifest from the source and stores it byte-for-byte (with its tag), before any of
/// its blobs: clients skip layers they hold, so waiting for blobs would lose images and tags.
async fn fetch_manifest(
    app: &App,
    t: &CacheTarget,
    reference: &str,
    expect: Option<&Digest>,
    tag: Option<&str>,
) -> Result<()> {
    let deadline = Instant::now()
        + app
            .config
            .pull_through
            .revalidate_timeout
            .max(Duration::from_secs(30));
    let mut headers = HeaderMap::new();
    headers.insert(header::ACCEPT, HeaderValue::from_static(MANIFEST_ACCEPT));
    let req = UpstreamRequest::new(
        Method::GET,
        format!("{}/manifests/{reference}", t.upstream),
        &t.upstream,
        headers,
    );
    let response = match t.source.send_with_retries(&req, deadline).await {
        Ok(r) => r,
        Err(e) if e.is_not_found() => {
            return Err(Error::ManifestUnknown(format!(
                "{reference} is not at the source of {}",
                t.repo
            )))
        }
        Err(e) => return Err(upstream_error(t, e)),
    };
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or("").trim().to_string());
    let limit = app.config.limits.max_manifest_bytes;
    // The source's failures are counted and kept in its health; the answer, once read and
    // checked whole, is its success.
    let failed = |kind: ErrorKind, why: String| {
        t.source.record_failure(kind, &why);
        Error::Upstream(format!("image cache {:?}: {why}", t.source.name()))
    };
    let mut response = response;
    let mut bytes = BytesMut::new();
    loop {
        let chunk = tokio::time::timeout_at(deadline.into(), response.chunk())
            .await
            .map_err(|_| failed(ErrorKind::Timeout, "source manifest timed out".into()))?
            .map_err(|e| {
                let kind = if e.is_timeout() {
                    ErrorKind::Timeout
                } else {
                    ErrorKind::Connect
                };
                let why = format!(
                    "source manifest body: {}",
                    crate::http::egress::error_chain(&e.without_url())
                );
                failed(kind, why)
            })?;
        let Some(chunk) = chunk else { break };
        if bytes.len() + chunk.len() > limit {
            return Err(failed(
                ErrorKind::Refused,
                format!("source manifest exceeds {limit} bytes"),
            ));
        }
        bytes.extend_from_slice(&chunk);
    }
    let bytes = bytes.freeze();
    let digest = match expect {
        Some(d) => {
            let actual = Digest::of(d.algorithm(), &bytes);
            if &actual != d {
                return Err(failed(
                    ErrorKind::DigestMismatch,
                    format!("source sent a manifest with digest {actual} for {d}"),
                ));
            }
            actual
        }
        None => Digest::sha256(&bytes),
    };
    let content_type = content_type.filter(|c| manifest::is_manifest_media_type(c));
    let parsed = manifest::parse(&bytes, content_type.as_deref()).map_err(|e| {
        failed(
            ErrorKind::Refused,
            format!("source sent a manifest berth cannot store: {e}"),
        )
    })?;
    t.source.record_success();
    // A cached manifest's blobs come from the source when asked for: nothing to require.
    let refers = Refers::default();
    manifests::store(app, t.repo.as_str(), &digest, &bytes, &parsed, tag, &refers).await?;
    tracing::debug!(repo = %t.repo, %digest, tag, "manifest cached");
    Ok(())
}

/// `GET`/`HEAD` of a blob in a cache registry.
pub async fn blob(
    app: &App,
    t: &CacheTarget,
    digest: &str,
    req: &Req<'_>,
    head: bool,
) -> Result<Response<Body>> {
    let d = Digest::parse(digest)?;
    let local = t.repo.as_str();
    // Whether a fetch for this very repository is in flight (still streaming, or committed and
    // about to link it): the source already vouched for it here. Asked only off the hit path.
    let mut linked = app.store.meta.blob_link(local, &d).await?.is_some();
    let ours = !linked && app.cache.fetches.will_link(&d, local);
    // Whether the source vouched for the blob in this repository.
    let mut vouched = false;
    if !linked && !ours {
        let held = app.store.blobs.stat(&d).await?.map(|i| i.size);
        if held.is_some() || app.cache.fetches.is_inflight(&d) {
            // Held (or being fetched) for another repository: the source must confirm this one
            // has it too, or a private repository's blob would be readable under any name.
            vouch(app, t, &d).await?;
            vouched = true;
            if let Some(size) = held {
                linked = link_if_stored(app, local, &d, size).await?;
            }
        }
    }
    // A fetch that was ours may have committed and linked it meanwhile.
    if linked || (ours && app.store.meta.blob_link(local, &d).await?.is_some()) {
        let r = blobs::get(app, &t.repo, digest, req, head).await?;
        count_served(app, t, &r);
        return Ok(outcome(app, t, r, "hit"));
    }
    if head && !ours {
        return head_at_source(app, t, &d).await;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let (fetch, joined, direct) = loop {
        let holder = match app
            .cache
            .fetches
            .join_or_start(&app.store, &t.source, &t.upstream, local, &d)
            .await?
        {
            Joined::Here(fetch, joined, direct) => break (fetch, joined, direct),
            Joined::Elsewhere(holder) => holder,
        };
        if head {
            return head_at_source(app, t, &d).await;
        }
        // A fetch held for another repository elsewhere: the same rule as above.
        if holder.repo != local && !vouched {
            vouch(app, t, &d).await?;
            vouched = true;
        }
        if let Some(r) = from_elsewhere(app, t, &d, &holder, req).await? {
            return Ok(r);
        }
        if Instant::now() >= deadline {
            return Err(Error::Upstream(format!(
                "image cache {:?}: the node fetching {d} neither streamed nor committed it within 60 s",
                t.source.name()
            )));
        }
        peer::pause(deadline).await;
    };
    let range = req.headers.get(header::RANGE);
    let r = match fetch_response(&fetch, direct, range, head).await {
        Ok(r) => r,
        Err(Stopped::NotFound) => return Err(not_at_source(t, &d)),
        Err(Stopped::Failed(why)) => {
            return Err(Error::Upstream(format!(
                "image cache {:?}: {why}",
                t.source.name()
            )))
        }
        Err(Stopped::Range(e)) => return Err(e),
    };
    if head {
        return Ok(outcome(app, t, r, "coalesced"));
    }
    count_served(app, t, &r);
    Ok(outcome(
        app,
        t,
        r,
        if joined { "coalesced" } else { "miss" },
    ))
}

/// Serves a blob that another node fetches: streamed from it, or from the bucket once it is
/// committed there; `None` when neither is possible yet (the holder is gone or between
/// attempts) and the lease must be asked again.
async fn from_elsewhere(
    app: &App,
    t: &CacheTarget,
    d: &Digest,
    holder: &peer::Holder,
    req: &Req<'_>,
) -> Result<Option<Response<Body>>> {
    let local = t.repo.as_str();
    let cluster = app
        .cache
        .fetches
        .cluster
        .as_ref()
        .ok_or_else(|| Error::Internal("a fetch lease without a cluster".into()))?;
    let range = req.headers.get(header::RANGE);
    if let Some(answer) = cluster.ask(holder, d, local, range).await {
        let r = peer::relay(answer, d, range)?;
        count_served(app, t, &r);
        return Ok(Some(outcome(app, t, r, "coalesced")));
    }
    // Committed meanwhile: the source vouched for it here (the holder fetched it for this
    // repository, or the HEAD above), so link it and serve it from the bucket.
    if let Some(info) = app.store.blobs.stat(d).await? {
        if link_if_stored(app, local, d, info.size).await? {
            let r = blobs::get(app, &t.repo, d.as_str(), req, false).await?;
            count_served(app, t, &r);
            return Ok(Some(outcome(app, t, r, "coalesced")));
        }
    }
    Ok(None)
}

/// The source confirms it has the blob in this repository. An unreachable or failing source
/// confirms nothing: access beats availability here (unlike manifests, which this repository
/// held before).
async fn vouch(app: &App, t: &CacheTarget, d: &Digest) -> Result<()> {
    match source_head(app, t, d).await {
        Ok(_) => Ok(()),
        Err(e) if e.is_not_found() => Err(not_at_source(t, d)),
        Err(e) => Err(upstream_error(t, e)),
    }
}

/// Links a stored blob into `repo`, unless a collection deleted it meanwhile; whether it did.
async fn link_if_stored(app: &App, repo: &str, d: &Digest, size: u64) -> Result<bool> {
    let _hold = app.store.gate.hold(d).await;
    if app.store.blobs.stat(d).await?.is_none() {
        return Ok(false);
    }
    app.store.meta.link_blob(repo, d, size).await?;
    Ok(true)
}

fn not_at_source(t: &CacheTarget, d: &Digest) -> Error {
    Error::BlobUnknown(format!("{d} is not at the source of {}", t.repo))
}

/// Why a fetch gave no response.
pub enum Stopped {
    /// The source has no such blob.
    NotFound,
    /// The fetch failed; why.
    Failed(String),
    /// The client's range does not fit the blob.
    Range(Error),
}

/// The response for a fetch in flight, once the source told its size: the client's range of
/// it, streamed as it is written.
pub async fn fetch_response(
    fetch: &Arc<Fetch>,
    direct: Option<Direct>,
    range: Option<&HeaderValue>,
    head: bool,
) -> std::result::Result<Response<Body>, Stopped> {
    let d = &fetch.digest;
    let size = match fetch.size(Instant::now() + Duration::from_secs(60)).await {
        Ok(size) => size,
        Err(p) if p.not_found => return Err(Stopped::NotFound),
        Err(p) => {
            return Err(Stopped::Failed(match p.phase {
                super::fetch::Phase::Failed(w) => w.to_string(),
                _ => "source did not answer within 60 s".into(),
            }))
        }
    };
    if head {
        return Ok(blobs::blob_response(Body::Empty, d, size, None));
    }
    let range = blobs::parse_range(range, size).map_err(Stopped::Range)?;
    let (start, len) = range.map_or((0, size), |r| (r.start, r.len));
    let body = if len == 0 {
        Body::Empty
    } else {
        fetch.body(start, len, direct)
    };
    Ok(blobs::blob_response(body, d, size, range))
}

/// `GET /internal/v1/fetches/DIGEST?repo=REPO` from another node: the bytes of this node's
/// fetch of the blob as they arrive (the client's `Range` applies), linked into `REPO` too once
/// committed; a bare 404 with [`peer::NO_FETCH_HEADER`] when this node fetches no such blob.
pub async fn peer_fetch(
    app: &App,
    digest: &str,
    query: Option<&str>,
    headers: &HeaderMap,
) -> Result<Response<Body>> {
    let Some(cluster) = &app.cache.fetches.cluster else {
        return Err(Error::NotFound("not part of a cluster".into()));
    };
    let repo = crate::http::router::query_param(query, "repo").unwrap_or_default();
    if !cluster.verify(headers, digest, &repo) {
        return Err(Error::Denied(
            "a peer request without a valid node signature".into(),
        ));
    }
    let d = Digest::parse(digest)?;
    let Some(fetch) = app.cache.fetches.local(&d) else {
        return Ok(peer::no_fetch());
    };
    if !repo.is_empty() {
        fetch.link_also(&repo);
    }
    match fetch_response(&fetch, None, headers.get(header::RANGE), false).await {
        Ok(r) => Ok(r),
        Err(Stopped::NotFound) => Err(Error::BlobUnknown(format!("{d} is not at the source"))),
        Err(Stopped::Failed(why)) => Err(Error::Upstream(why)),
        Err(Stopped::Range(e)) => Err(e),
    }
}

fn count_served(app: &App, t: &CacheTarget, r: &Response<Body>) {
    let bytes = r.body().len().unwrap_or(0);
    if bytes > 0 {
        let registry = app.cache.label(t.repo.registry());
        metrics::counter!("berth_cache_blob_bytes_served_total", "registry" => registry)
            .increment(bytes);
    }
}

async fn source_head(app: &App, t: &CacheTarget, d: &Digest) -> Result<u64, UpstreamError> {
    let deadline = Instant::now() + app.config.pull_through.revalidate_timeout;
    let req = UpstreamRequest::new(
        Method::HEAD,
        format!("{}/blobs/{d}", t.upstream),
        &t.upstream,
        HeaderMap::new(),
    );
    let response = t.source.send_with_retries(&req, deadline).await?;
    Ok(response
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .unwrap_or(0))
}

/// `HEAD` of a blob not cached yet: the source answers (a 404 there must reach the client,
/// or chained caches break).
async fn head_at_source(app: &App, t: &CacheTarget, d: &Digest) -> Result<Response<Body>> {
    match source_head(app, t, d).await {
        Ok(size) => {
            let r = blobs::blob_response(Body::Empty, d, size, None);
            Ok(outcome(app, t, r, "miss"))
        }
        Err(e) if e.is_not_found() => Err(not_at_source(t, d)),
        Err(e) => Err(upstream_error(t, e)),
    }
}
