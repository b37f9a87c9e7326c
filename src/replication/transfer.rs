//! Copies artifacts from this berth to an endpoint (push mode), as DESIGN.md 9 and the
//! replication issue lay out:
//!
//! - manifests by digest, an index's children first, then the index, then its tags: the
//!   destination never shows a tag whose blobs are missing;
//! - per blob: `HEAD` at the destination (present: skipped), else a cross-repository mount from
//!   a repository this execution already gave it to, else an upload;
//! - one copy of a blob at a time per execution (single flight): a second repository that needs
//!   it waits and mounts it;
//! - uploads go in chunks of `replication.chunk_bytes` with `Content-Range`; the session's
//!   location and offset are saved after each acknowledged chunk, so a cut link, a restart of
//!   either side or a stop resumes, in the next attempt or the next execution, from the offset
//!   the destination reports (`GET` on the location);
//! - a blob is hashed here before it is sent (the destination checks the digest at the end);
//! - every byte passes the rule's bandwidth limit; a stop aborts a transfer in flight within
//!   [`STOP_POLL`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use serde::{Deserialize, Serialize};

use super::limit::Bandwidth;
use crate::cache::upstream::{BodySource, Source, UpstreamError, UpstreamRequest};
use crate::oci::digest::Digest;
use crate::oci::digest::Verifier;
use crate::oci::manifest;
use crate::store::blobs::{hash_read, BlobRead};
use crate::store::meta::{now_ms, Records};
use crate::App;

/// How often a transfer in flight looks at the stop flag.
pub const STOP_POLL: Duration = Duration::from_millis(100);

/// Deepest nesting of indexes followed (an index of indexes of manifests is 2).
const MAX_DEPTH: usize = 4;

/// Why a copy failed.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// The endpoint failed or refused.
    #[error("endpoint: {0}")]
    Endpoint(#[from] UpstreamError),
    /// This berth could not read what it holds.
    #[error("local: {0}")]
    Local(String),
    /// A stop was asked.
    #[error("stopped")]
    Stopped,
}

impl From<std::io::Error> for CopyError {
    fn from(e: std::io::Error) -> CopyError {
        CopyError::Local(e.to_string())
    }
}

impl From<crate::store::meta::MetaError> for CopyError {
    fn from(e: crate::store::meta::MetaError) -> CopyError {
        CopyError::Local(e.to_string())
    }
}

/// What a copy step gives.
pub type CopyResult<T> = Result<T, CopyError>;

/// Where an upload to an endpoint stood at its last acknowledged chunk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResumePoint {
    /// The upload's location, after `/v2/`.
    pub location: String,
    /// Bytes the destination acknowledged.
    pub offset: u64,
    /// When it was saved, Unix ms.
    pub saved_ms: u64,
}

/// Where resume points are kept: `endpoint \0 repository \0 digest`.
pub const RESUME: &str = "replication_uploads";

/// Resume points older than this are dropped (the destination forgot such sessions long ago).
const RESUME_KEEP: Duration = Duration::from_secs(7 * 24 * 3600);

/// How blobs travel: from `[replication]`.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Bytes per PATCH.
    pub chunk_bytes: u64,
    /// Attempts per blob or manifest.
    pub attempts: u32,
    /// Deadline of one request.
    pub request_timeout: Duration,
}

/// What the execution knows of a blob.
#[derive(Default)]
struct BlobState {
    /// Held while the blob is being copied: one copy at a time.
    busy: Arc<tokio::sync::Mutex<()>>,
    /// Destination repositories known to hold it.
    at: Vec<String>,
}

/// What one artifact's copy did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Copied {
    /// Blob and manifest bytes sent.
    pub bytes: u64,
    /// Manifests put (0: the destination had everything).
    pub manifests: u64,
    /// Tags set or moved.
    pub tags: u64,
}

/// One execution's copies to one endpoint.
pub struct Transfer {
    app: Arc<App>,
    rule: String,
    endpoint: String,
    client: Arc<Source>,
    settings: Settings,
    bandwidth: Option<Arc<Bandwidth>>,
    blob_slots: tokio::sync::Semaphore,
    concurrency: usize,
    blobs: parking_lot::Mutex<HashMap<Digest, BlobState>>,
    stop: Arc<AtomicBool>,
    resume: Records<ResumePoint>,
}

impl Transfer {
    /// A transfer for `rule` to its endpoint through `client`.
    pub fn new(
        app: Arc<App>,
        rule: &super::rule::Rule,
        client: Arc<Source>,
        settings: Settings,
        stop: Arc<AtomicBool>,
    ) -> Transfer {
        let resume = Records::new(app.store.meta.clone(), RESUME);
        let concurrency = rule.concurrency.max(1) as usize;
        Transfer {
            app,
            rule: rule.name.clone(),
            endpoint: rule.endpoint.clone(),
            client,
            settings,
            bandwidth: (rule.bandwidth_limit > 0)
                .then(|| Arc::new(Bandwidth::new(rule.bandwidth_limit))),
            blob_slots: tokio::sync::Semaphore::new(concurrency),
            concurrency,
            blobs: Default::default(),
            stop,
            resume,
        }
    }

    /// Drops this endpoint's resume points older than [`RESUME_KEEP`] (uploads given up: the
    /// blob was deleted here, or the rule changed); how many went.
    pub async fn prune_resume_points(&self) -> CopyResult<usize> {
        let cutoff = now_ms().saturating_sub(RESUME_KEEP.as_millis() as u64);
        let mut removed = 0;
        // Keys come back below the prefix: `repository \0 digest`.
        for (rest, point) in self.resume.list(&[&self.endpoint]).await? {
            if point.saved_ms < cutoff {
                let mut key = vec![self.endpoint.as_str()];
                key.extend(rest.split('\0'));
                self.resume.remove(&key).await?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    fn stopped(&self) -> CopyResult<()> {
        if self.stop.load(Ordering::Acquire) {
            Err(CopyError::Stopped)
        } else {
            Ok(())
        }
    }

    /// Runs `f` until it ends or a stop is asked.
    async fn unless_stopped<T>(
        &self,
        f: impl std::future::Future<Output = CopyResult<T>>,
    ) -> CopyResult<T> {
        unless_stopped(&self.stop, f).await
    }

    fn deadline(&self) -> Instant {
        Instant::now() + self.settings.request_timeout
    }

    /// Sends a request without body, retrying what is worth a retry.
    async fn call(
        &self,
        method: Method,
        path: String,
        repo: &str,
        headers: HeaderMap,
    ) -> CopyResult<reqwest::Response> {
        let mut req = UpstreamRequest::new(method, path, repo, headers);
        req.push = true;
        let r = self
            .unless_stopped(async {
                Ok(self.client.send_with_retries(&req, self.deadline()).await)
            })
            .await?;
        Ok(r?)
    }

    /// Whether the destination repository holds manifest `reference`; its digest if so.
    async fn remote_manifest(&self, repo: &str, reference: &str) -> CopyResult<Option<Digest>> {
        let mut headers = HeaderMap::new();
        headers.insert(http::header::ACCEPT, HeaderValue::from_static(ACCEPT_ALL));
        match self
            .call(
                Method::HEAD,
                format!("{repo}/manifests/{reference}"),
                repo,
                headers,
            )
            .await
        {
            Ok(r) => Ok(r
                .headers()
                .get("docker-content-digest")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| Digest::parse(v).ok())),
            Err(CopyError::Endpoint(e)) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Whether the destination repository holds blob `digest`.
    async fn remote_blob(&self, repo: &str, digest: &Digest) -> CopyResult<bool> {
        match self
            .call(
                Method::HEAD,
                format!("{repo}/blobs/{digest}"),
                repo,
                HeaderMap::new(),
            )
            .await
        {
            Ok(_) => Ok(true),
            Err(CopyError::Endpoint(e)) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        bytes: Bytes,
        sent: &AtomicU64,
    ) -> CopyResult<()> {
        let mut headers = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(media_type) {
            headers.insert(http::header::CONTENT_TYPE, v);
        }
        let len = bytes.len() as u64;
        let mut req = UpstreamRequest::new(
            Method::PUT,
            format!("{repo}/manifests/{reference}"),
            repo,
            headers,
        );
        req.push = true;
        req.body = Some(Arc::new(move || reqwest::Body::from(bytes.clone())));
        self.unless_stopped(async {
            Ok(self.client.send_with_retries(&req, self.deadline()).await)
        })
        .await??;
        sent.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }

    /// Copies the artifact `digest` of `src` to `dest` with its tree (children, blobs), unless
    /// the destination has it; then points `tags` at it (only those absent there, or all when
    /// `override_tags`). Returns what it sent.
    pub async fn artifact(
        &self,
        src: &str,
        dest: &str,
        digest: &Digest,
        tags: &[String],
        override_tags: bool,
    ) -> CopyResult<Copied> {
        self.stopped()?;
        let mut copied = Copied::default();
        let mut todo = Vec::new();
        for tag in tags {
            match self.remote_manifest(dest, tag).await? {
                Some(d) if d == *digest => {}
                Some(_) if !override_tags => {
                    tracing::info!(endpoint = %self.endpoint, repository = %dest, %tag, "tag left as it is at the destination (override is off)");
                }
                _ => todo.push(tag.clone()),
            }
        }
        let sent = AtomicU64::new(0);
        let (media_type, bytes) = self.tree(src, dest, digest, 0, &mut copied, &sent).await?;
        for tag in &todo {
            self.stopped()?;
            self.put_manifest(dest, tag, &media_type, bytes.clone(), &sent)
                .await?;
            copied.tags += 1;
        }
        copied.bytes = sent.into_inner();
        Ok(copied)
    }

    /// Copies manifest `digest` and what it refers to; returns its media type and bytes.
    fn tree<'a>(
        &'a self,
        src: &'a str,
        dest: &'a str,
        digest: &'a Digest,
        depth: usize,
        copied: &'a mut Copied,
        sent: &'a AtomicU64,
    ) -> futures_util::future::BoxFuture<'a, CopyResult<(String, Bytes)>> {
        Box::pin(async move {
            let record = self
                .app
                .store
                .meta
                .artifact(src, digest)
                .await?
                .ok_or_else(|| CopyError::Local(format!("{src}@{digest} is no longer here")))?;
            let limit = self.app.config.limits.max_manifest_bytes as u64;
            let bytes = self
                .app
                .store
                .blobs
                .read_small(digest, limit)
                .await?
                .ok_or_else(|| CopyError::Local(format!("manifest {digest} has no bytes here")))?;
            if self.remote_manifest(dest, digest.as_str()).await? == Some(digest.clone()) {
                return Ok((record.media_type, bytes));
            }
            let parsed = manifest::parse(&bytes, Some(&record.media_type))
                .map_err(|e| CopyError::Local(format!("manifest {digest}: {e}")))?;
            if depth < MAX_DEPTH {
                for child in &parsed.children {
                    self.tree(src, dest, &child.digest, depth + 1, copied, sent)
                        .await?;
                }
            }
            let blobs: Vec<_> = parsed
                .blobs
                .iter()
                .map(|d| self.blob(src, dest, d, sent))
                .collect();
            futures_util::stream::iter(blobs)
                .buffer_unordered(self.concurrency)
                .try_collect::<Vec<()>>()
                .await?;
            self.stopped()?;
            self.put_manifest(
                dest,
                digest.as_str(),
                &record.media_type,
                bytes.clone(),
                sent,
            )
            .await?;
            copied.manifests += 1;
            Ok((record.media_type, bytes))
        })
    }

    /// Makes the destination repository hold blob `digest`: skipped, mounted or uploaded.
    async fn blob(
        &self,
        src: &str,
        dest: &str,
        digest: &Digest,
        sent: &AtomicU64,
    ) -> CopyResult<()> {
        let busy = self
            .blobs
            .lock()
            .entry(digest.clone())
            .or_default()
            .busy
            .clone();
        let _one_at_a_time = busy.lock().await;
        let holders = self
            .blobs
            .lock()
            .get(digest)
            .map(|s| s.at.clone())
            .unwrap_or_default();
        if holders.iter().any(|r| r == dest) {
            return Ok(());
        }
        let done = |this: &Transfer| {
            if let Some(s) = this.blobs.lock().get_mut(digest) {
                s.at.push(dest.to_string());
            }
        };
        if self.remote_blob(dest, digest).await? {
            done(self);
            return Ok(());
        }
        let mut session = None;
        if let Some(from) = holders.first() {
            let mut req = UpstreamRequest::new(
                Method::POST,
                format!("{dest}/blobs/uploads/?mount={digest}&from={from}"),
                dest,
                HeaderMap::new(),
            );
            req.push = true;
            req.mount_from = Some(from);
            let r = self
                .unless_stopped(async {
                    Ok(self.client.send_with_retries(&req, self.deadline()).await)
                })
                .await??;
            if r.status() == StatusCode::CREATED {
                tracing::debug!(endpoint = %self.endpoint, %digest, %from, to = %dest, "blob mounted");
                done(self);
                return Ok(());
            }
            session = Some(self.location(&r)?);
        }
        // An origin repository links its blobs; a cache registry's hold what was fetched.
        let size = match self.app.store.meta.blob_link(src, digest).await? {
            Some(size) => size,
            None => self
                .app
                .store
                .blobs
                .stat(digest)
                .await?
                .ok_or_else(|| {
                    CopyError::Local(format!(
                        "blob {digest} of {src} is not on this node (a cache registry holds only what was pulled)"
                    ))
                })?
                .size,
        };
        let _slot = self
            .blob_slots
            .acquire()
            .await
            .map_err(|_| CopyError::Stopped)?;
        self.verify_local(digest).await?;
        self.upload(dest, digest, size, session, sent).await?;
        done(self);
        Ok(())
    }

    /// Hashes the blob this node holds before any byte of it leaves (the destination checks
    /// the digest again at the end): a blob damaged on this disk is never sent, and its task
    /// fails saying so.
    async fn verify_local(&self, digest: &Digest) -> CopyResult<()> {
        let read = self
            .app
            .store
            .blobs
            .read(digest, 0, None)
            .await?
            .ok_or_else(|| CopyError::Local(format!("blob {digest} is gone")))?;
        let actual = hash_read(read, Verifier::new(digest.algorithm()))
            .await?
            .finish();
        if actual != *digest {
            tracing::error!(%digest, %actual, "a stored blob does not match its digest: not replicated");
            return Err(CopyError::Local(format!(
                "the blob stored here as {digest} has other bytes (they hash to {actual}): not sent"
            )));
        }
        Ok(())
    }

    fn location(&self, r: &reqwest::Response) -> CopyResult<String> {
        let loc = r
            .headers()
            .get(http::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| {
                CopyError::Endpoint(UpstreamError::Refused(
                    "upload answer without Location".into(),
                ))
            })?;
        Ok(self.client.v2_path(loc)?)
    }

    fn resume_key<'a>(&'a self, dest: &'a str, digest: &'a Digest) -> [&'a str; 3] {
        [self.endpoint.as_str(), dest, digest.as_str()]
    }

    /// Uploads blob `digest` of `size` bytes to `dest`, going on from a saved session when
    /// there is one.
    async fn upload(
        &self,
        dest: &str,
        digest: &Digest,
        size: u64,
        mut session: Option<String>,
        sent: &AtomicU64,
    ) -> CopyResult<()> {
        let key = self.resume_key(dest, digest);
        if session.is_none() {
            session = self.resume.get(&key).await?.map(|p| p.location);
        }
        let mut backoff = Duration::from_millis(500);
        let mut last_error = None;
        for attempt in 1..=self.settings.attempts {
            self.stopped()?;
            if attempt > 1 {
                let wait = last_error
                    .as_ref()
                    .and_then(|e: &UpstreamError| e.retry_after())
                    .unwrap_or(backoff);
                tracing::info!(endpoint = %self.endpoint, repository = %dest, %digest, attempt, ?wait, error = ?last_error.as_ref().map(ToString::to_string), "blob upload resumes");
                self.unless_stopped(async {
                    tokio::time::sleep(wait).await;
                    Ok(())
                })
                .await?;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
            match self
                .upload_once(dest, digest, size, &mut session, sent)
                .await
            {
                Ok(()) => {
                    self.resume.remove(&key).await?;
                    return Ok(());
                }
                Err(CopyError::Endpoint(e)) => {
                    if !e.is_transient()
                        && !matches!(&e, UpstreamError::Status { status, .. } if *status == StatusCode::RANGE_NOT_SATISFIABLE || *status == StatusCode::NOT_FOUND)
                    {
                        return Err(CopyError::Endpoint(e));
                    }
                    last_error = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(CopyError::Endpoint(last_error.unwrap_or_else(|| {
            UpstreamError::Unreachable("no attempt made".into())
        })))
    }

    /// One attempt: learn the offset, send the chunks after it, close with the digest.
    async fn upload_once(
        &self,
        dest: &str,
        digest: &Digest,
        size: u64,
        session: &mut Option<String>,
        sent: &AtomicU64,
    ) -> CopyResult<()> {
        let key = self.resume_key(dest, digest);
        let mut offset = 0;
        if let Some(location) = session.clone() {
            match self
                .call(Method::GET, location.clone(), dest, HeaderMap::new())
                .await
            {
                Ok(r) => {
                    offset = acknowledged(r.headers());
                    *session = Some(self.location(&r).unwrap_or(location));
                }
                Err(CopyError::Endpoint(e)) if e.is_not_found() => {
                    tracing::info!(endpoint = %self.endpoint, repository = %dest, %digest, "the destination forgot the upload; starting over");
                    *session = None;
                }
                Err(e) => return Err(e),
            }
        }
        let mut location = match session.clone() {
            Some(l) => l,
            None => {
                let r = self
                    .call(
                        Method::POST,
                        format!("{dest}/blobs/uploads/"),
                        dest,
                        HeaderMap::new(),
                    )
                    .await?;
                let l = self.location(&r)?;
                *session = Some(l.clone());
                l
            }
        };
        if offset > 0 {
            tracing::info!(endpoint = %self.endpoint, repository = %dest, %digest, offset, size, "resuming the upload where the destination stands");
        }
        while offset < size {
            let end = (offset + self.settings.chunk_bytes).min(size);
            let r = self.chunk(dest, &location, digest, offset, end, sent).await;
            let r = match r {
                Ok(r) => r,
                Err(CopyError::Endpoint(e)) if matches!(&e, UpstreamError::Status { status, .. } if *status == StatusCode::RANGE_NOT_SATISFIABLE) =>
                {
                    // The destination stands elsewhere than we thought: ask it again next
                    // attempt; a session that keeps refusing is dropped for a fresh one.
                    tracing::info!(endpoint = %self.endpoint, %digest, offset, "chunk refused as out of range");
                    if offset == 0 {
                        *session = None;
                        self.resume.remove(&key).await?;
                    }
                    return Err(CopyError::Endpoint(e));
                }
                Err(e) => return Err(e),
            };
            offset = end;
            location = self.location(&r).unwrap_or(location);
            *session = Some(location.clone());
            self.resume
                .put(
                    &key,
                    &ResumePoint {
                        location: location.clone(),
                        offset,
                        saved_ms: now_ms(),
                    },
                )
                .await?;
        }
        let sep = if location.contains('?') { '&' } else { '?' };
        let mut headers = HeaderMap::new();
        headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        let mut req = UpstreamRequest::new(
            Method::PUT,
            format!("{location}{sep}digest={digest}"),
            dest,
            headers,
        );
        req.push = true;
        self.unless_stopped(async { Ok(self.client.send(&req, self.deadline()).await) })
            .await??;
        Ok(())
    }

    /// Sends bytes `[start, end)` of the blob as one PATCH, streamed from the blob file
    /// through the bandwidth limit.
    async fn chunk(
        &self,
        dest: &str,
        location: &str,
        digest: &Digest,
        start: u64,
        end: u64,
        sent: &AtomicU64,
    ) -> CopyResult<reqwest::Response> {
        let len = end - start;
        let mut headers = HeaderMap::new();
        let range = format!("{start}-{}", end - 1);
        headers.insert(
            http::header::CONTENT_RANGE,
            HeaderValue::from_str(&range).map_err(|e| CopyError::Local(e.to_string()))?,
        );
        headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(len));
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        let file = match self.app.store.blobs.read(digest, start, Some(len)).await? {
            Some(BlobRead::Local(region)) => region,
            Some(_) => {
                return Err(CopyError::Local(
                    "replication reads local blob files only".into(),
                ))
            }
            None => return Err(CopyError::Local(format!("blob {digest} is gone"))),
        };
        // The body is made again for the one repeat a 401 may ask for; bytes are counted as
        // they leave.
        let counter = Arc::new(AtomicU64::new(0));
        let bandwidth = self.bandwidth.clone();
        let make: BodySource = {
            let counter = counter.clone();
            Arc::new(move || {
                let region = file.clone();
                let counter = counter.clone();
                let bandwidth = bandwidth.clone();
                let pieces = futures_util::stream::unfold(0u64, move |at| {
                    let region = region.clone();
                    let counter = counter.clone();
                    let bandwidth = bandwidth.clone();
                    async move {
                        if at >= region.len() {
                            return None;
                        }
                        let want = (region.len() - at) as usize;
                        let piece = crate::http::body::read_piece(
                            region.file().clone(),
                            region.offset() + at,
                            want,
                        )
                        .await;
                        match piece {
                            Ok(p) => {
                                if let Some(b) = &bandwidth {
                                    b.take(p.len() as u64).await;
                                }
                                counter.fetch_add(p.len() as u64, Ordering::Relaxed);
                                let next = at + p.len() as u64;
                                Some((Ok::<Bytes, std::io::Error>(p), next))
                            }
                            Err(e) => Some((Err(e), u64::MAX)),
                        }
                    }
                });
                reqwest::Body::wrap_stream(pieces)
            })
        };
        let mut req = UpstreamRequest::new(Method::PATCH, location.to_string(), dest, headers);
        req.push = true;
        req.body = Some(make);
        let result = self
            .unless_stopped(async { Ok(self.client.send(&req, self.deadline()).await) })
            .await;
        let out = counter.load(Ordering::Relaxed);
        sent.fetch_add(out, Ordering::Relaxed);
        metrics::counter!(
            "berth_replication_bytes_total",
            "rule" => self.rule.clone(),
            "endpoint" => self.endpoint.clone()
        )
        .increment(out);
        Ok(result??)
    }
}

/// Runs `f` until it ends or `stop` is set (then `f` is dropped: a request in flight is
/// aborted, its connection closed).
pub async fn unless_stopped<T>(
    stop: &AtomicBool,
    f: impl std::future::Future<Output = CopyResult<T>>,
) -> CopyResult<T> {
    let watch = async {
        while !stop.load(Ordering::Acquire) {
            tokio::time::sleep(STOP_POLL).await;
        }
    };
    tokio::select! {
        r = f => r,
        () = watch => Err(CopyError::Stopped),
    }
}

/// Every manifest type berth stores, for `HEAD` and `GET` at the destination.
pub const ACCEPT_ALL: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json";

/// The bytes an upload's `Range: 0-N` says the destination holds (`0-0` is read as none: it is
/// what registries answer for an empty upload, and starting over costs at most one byte).
fn acknowledged(headers: &HeaderMap) -> u64 {
    headers
        .get(http::header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().strip_prefix("bytes=").or(Some(v.trim())))
        .and_then(|v| v.split_once('-'))
        .and_then(|(_, end)| end.parse::<u64>().ok())
        .map_or(0, |end| if end == 0 { 0 } else { end + 1 })
}

#[cfg(test)]
mod tests {
    use super::acknowledged;
    use http::{HeaderMap, HeaderValue};

    #[test]
    fn ranges_read_as_acknowledged_bytes() {
        let of = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(http::header::RANGE, HeaderValue::from_str(v).unwrap());
            acknowledged(&h)
        };
        assert_eq!(of("0-0"), 0);
        assert_eq!(of("0-99"), 100);
        assert_eq!(of("bytes=0-8388607"), 8 << 20);
        assert_eq!(of("junk"), 0);
        assert_eq!(acknowledged(&HeaderMap::new()), 0);
    }
}
