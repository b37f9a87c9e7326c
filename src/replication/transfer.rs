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
//!   [`super::link::STOP_POLL`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use serde::{Deserialize, Serialize};

use super::link::{local, Copied, CopyError, CopyResult, Link, Retry, Settings};
use crate::cache::upstream::{BodySource, Source, UpstreamError, UpstreamRequest};
use crate::oci::digest::{Digest, Verifier};
use crate::oci::manifest;
use crate::store::blobs::hash_read;
use crate::store::meta::{now_ms, Records};
use crate::App;

/// Deepest nesting of indexes followed (an index of indexes of manifests is 2).
const MAX_DEPTH: usize = 4;

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

/// One execution's copies to one endpoint.
pub struct Transfer {
    app: Arc<App>,
    link: Link,
    blob_slots: tokio::sync::Semaphore,
    /// Destination repositories known to hold each blob (what a mount can lend from).
    holders: parking_lot::Mutex<HashMap<Digest, Vec<String>>>,
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
        let link = Link::new(rule, client, settings, stop);
        Transfer {
            resume: Records::new(app.store.meta.clone(), RESUME),
            blob_slots: tokio::sync::Semaphore::new(link.concurrency),
            holders: Default::default(),
            app,
            link,
        }
    }

    /// Drops this endpoint's resume points older than [`RESUME_KEEP`] (uploads given up: the
    /// blob was deleted here, or the rule changed); how many went.
    pub async fn prune_resume_points(&self) -> CopyResult<usize> {
        let cutoff = now_ms().saturating_sub(RESUME_KEEP.as_millis() as u64);
        let mut removed = 0;
        // Keys come back below the prefix: `repository \0 digest`.
        let endpoint = self.link.endpoint.as_str();
        for (rest, point) in self.resume.list(&[endpoint]).await? {
            if point.saved_ms < cutoff {
                let mut key = vec![endpoint];
                key.extend(rest.split('\0'));
                self.resume.remove(&key).await?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Whether the destination repository holds blob `digest`.
    async fn remote_blob(&self, repo: &str, digest: &Digest) -> CopyResult<bool> {
        let path = format!("{repo}/blobs/{digest}");
        match self
            .link
            .call(Method::HEAD, path, repo, HeaderMap::new(), true)
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
        self.link.send_retrying(&req).await?;
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
        self.link.stopped()?;
        let mut copied = Copied::default();
        let mut todo = Vec::new();
        for tag in tags {
            match self.link.manifest_digest(dest, tag, true).await? {
                Some(d) if d == *digest => {}
                Some(_) if !override_tags => {
                    tracing::info!(endpoint = %self.link.endpoint, repository = %dest, %tag, "tag left as it is at the destination (override is off)");
                }
                _ => todo.push(tag.clone()),
            }
        }
        let sent = AtomicU64::new(0);
        let (media_type, bytes) = self.tree(src, dest, digest, 0, &mut copied, &sent).await?;
        for tag in &todo {
            self.link.stopped()?;
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
                .ok_or_else(|| local(format!("{src}@{digest} is no longer here")))?;
            let limit = self.app.config.limits.max_manifest_bytes as u64;
            let bytes = self
                .app
                .store
                .blobs
                .read_small(digest, limit)
                .await?
                .ok_or_else(|| local(format!("manifest {digest} has no bytes here")))?;
            if self
                .link
                .manifest_digest(dest, digest.as_str(), true)
                .await?
                == Some(digest.clone())
            {
                return Ok((record.media_type, bytes));
            }
            let parsed = manifest::parse(&bytes, Some(&record.media_type))
                .map_err(|e| local(format!("manifest {digest}: {e}")))?;
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
                .buffer_unordered(self.link.concurrency)
                .try_collect::<Vec<()>>()
                .await?;
            self.link.stopped()?;
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
        let _one_at_a_time = self.link.one_at_a_time(digest).await;
        let holders = self.holders.lock().get(digest).cloned().unwrap_or_default();
        if holders.iter().any(|r| r == dest) {
            return Ok(());
        }
        let done = |this: &Transfer| {
            this.holders
                .lock()
                .entry(digest.clone())
                .or_default()
                .push(dest.to_string());
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
            let r = self.link.send_retrying(&req).await?;
            if r.status() == StatusCode::CREATED {
                tracing::debug!(endpoint = %self.link.endpoint, %digest, %from, to = %dest, "blob mounted");
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
                    local(format!(
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
            .read_bytes(digest, 0, None)
            .await?
            .ok_or_else(|| local(format!("blob {digest} is gone")))?;
        let actual = hash_read(read, Verifier::new(digest.algorithm()))
            .await?
            .finish();
        if actual != *digest {
            tracing::error!(%digest, %actual, "a stored blob does not match its digest: not replicated");
            return Err(local(format!(
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
        Ok(self.link.client.v2_path(loc)?)
    }

    fn resume_key<'a>(&'a self, dest: &'a str, digest: &'a Digest) -> [&'a str; 3] {
        [self.link.endpoint.as_str(), dest, digest.as_str()]
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
        let mut retry = Retry::default();
        loop {
            self.link.stopped()?;
            match self
                .upload_once(dest, digest, size, &mut session, sent)
                .await
            {
                Ok(()) => {
                    self.resume.remove(&key).await?;
                    return Ok(());
                }
                // A destination that stands elsewhere (416) or forgot the session (404) is
                // asked again by the next attempt.
                Err(CopyError::Endpoint(e))
                    if e.is_transient()
                        || matches!(&e, UpstreamError::Status { status, .. } if *status == StatusCode::RANGE_NOT_SATISFIABLE || *status == StatusCode::NOT_FOUND) =>
                {
                    self.link
                        .again(&mut retry, e, "blob upload", digest)
                        .await?;
                }
                Err(e) => return Err(e),
            }
        }
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
                .link
                .call(Method::GET, location.clone(), dest, HeaderMap::new(), true)
                .await
            {
                Ok(r) => {
                    offset = acknowledged(r.headers());
                    *session = Some(self.location(&r).unwrap_or(location));
                }
                Err(CopyError::Endpoint(e)) if e.is_not_found() => {
                    tracing::info!(endpoint = %self.link.endpoint, repository = %dest, %digest, "the destination forgot the upload; starting over");
                    *session = None;
                }
                Err(e) => return Err(e),
            }
        }
        let mut location = match session.clone() {
            Some(l) => l,
            None => {
                let path = format!("{dest}/blobs/uploads/");
                let r = self
                    .link
                    .call(Method::POST, path, dest, HeaderMap::new(), true)
                    .await?;
                let l = self.location(&r)?;
                *session = Some(l.clone());
                l
            }
        };
        if offset > 0 {
            tracing::info!(endpoint = %self.link.endpoint, repository = %dest, %digest, offset, size, "resuming the upload where the destination stands");
        }
        while offset < size {
            let end = (offset + self.link.settings.chunk_bytes).min(size);
            let r = self.chunk(dest, &location, digest, offset, end, sent).await;
            let r = match r {
                Ok(r) => r,
                Err(CopyError::Endpoint(e)) if matches!(&e, UpstreamError::Status { status, .. } if *status == StatusCode::RANGE_NOT_SATISFIABLE) =>
                {
                    // The destination stands elsewhere than we thought: ask it again next
                    // attempt; a session that keeps refusing is dropped for a fresh one.
                    tracing::info!(endpoint = %self.link.endpoint, %digest, offset, "chunk refused as out of range");
                    if offset == 0 {
                        *session = None;
                        self.resume.remove(&key).await?;
                    }
                    return Err(CopyError::Endpoint(e));
                }
                Err(CopyError::Endpoint(e)) if e.is_not_found() => {
                    // The destination no longer has the session: the next attempt starts a new
                    // one (asking the old one's offset again would only repeat the refusal).
                    tracing::info!(endpoint = %self.link.endpoint, %digest, offset, "upload session gone at the destination; starting over");
                    *session = None;
                    self.resume.remove(&key).await?;
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
        self.link.send(&req).await?;
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
            HeaderValue::from_str(&range).map_err(local)?,
        );
        headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(len));
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        // The body is made again for the one repeat a 401 may ask for (each time read anew
        // from the store, local file or object storage); bytes are counted as they leave.
        let counter = Arc::new(AtomicU64::new(0));
        let bandwidth = self.link.bandwidth();
        let make: BodySource = {
            let (counter, store, digest) = (
                counter.clone(),
                self.app.store.blobs.clone(),
                digest.clone(),
            );
            Arc::new(move || {
                let (counter, bandwidth) = (counter.clone(), bandwidth.clone());
                let pieces = crate::store::blobs::pieces(store.clone(), digest.clone(), start, len)
                    .then(move |piece| {
                        let (counter, bandwidth) = (counter.clone(), bandwidth.clone());
                        async move {
                            let piece = piece?;
                            if let Some(b) = &bandwidth {
                                b.take(piece.len() as u64).await;
                            }
                            counter.fetch_add(piece.len() as u64, Ordering::Relaxed);
                            Ok::<Bytes, std::io::Error>(piece)
                        }
                    });
                reqwest::Body::wrap_stream(pieces)
            })
        };
        let mut req = UpstreamRequest::new(Method::PATCH, location.to_string(), dest, headers);
        req.push = true;
        req.body = Some(make);
        let result = self.link.send(&req).await;
        let out = counter.load(Ordering::Relaxed);
        sent.fetch_add(out, Ordering::Relaxed);
        self.link.count(out);
        result
    }
}

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
