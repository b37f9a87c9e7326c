//! What both directions of a copy share: one execution's link to its endpoint (the client,
//! the deadlines, the stop flag, the bandwidth limit, one copy of a blob at a time, retries
//! with backoff), and the errors and counts of a copy.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderValue, Method};

use super::limit::Bandwidth;
use super::rule::Rule;
use crate::cache::upstream::{Source, UpstreamError, UpstreamRequest};
use crate::oci::digest::Digest;

/// How often a transfer in flight looks at the stop flag.
pub const STOP_POLL: Duration = Duration::from_millis(100);

/// Longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Every manifest type berth stores, for `HEAD` and `GET` at an endpoint.
pub const ACCEPT_ALL: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json";

/// Why a copy failed.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// The endpoint failed or refused.
    #[error("endpoint: {0}")]
    Endpoint(#[from] UpstreamError),
    /// This berth could not read or write what it holds.
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

/// A local failure with its reason.
pub fn local(e: impl std::fmt::Display) -> CopyError {
    CopyError::Local(e.to_string())
}

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

/// What one artifact's copy did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Copied {
    /// Blob and manifest bytes sent or received.
    pub bytes: u64,
    /// Manifests put (0: the destination had everything).
    pub manifests: u64,
    /// Tags set or moved.
    pub tags: u64,
}

impl Copied {
    /// Adds what another copy did.
    pub fn add(&mut self, other: Copied) {
        self.bytes += other.bytes;
        self.manifests += other.manifests;
        self.tags += other.tags;
    }
}

/// Where a blob's attempts stand.
pub struct Retry {
    failed: u32,
    backoff: Duration,
}

impl Default for Retry {
    fn default() -> Retry {
        Retry {
            failed: 0,
            backoff: Duration::from_millis(500),
        }
    }
}

/// One execution's link to its endpoint.
pub struct Link {
    /// The rule's name (metrics, logs).
    pub rule: String,
    /// The endpoint's name (metrics, logs, resume points).
    pub endpoint: String,
    /// The endpoint's client.
    pub client: Arc<Source>,
    /// How blobs travel.
    pub settings: Settings,
    /// Blobs (and artifacts) in flight at once.
    pub concurrency: usize,
    bandwidth: Option<Arc<Bandwidth>>,
    stop: Arc<AtomicBool>,
    busy: parking_lot::Mutex<HashMap<Digest, Arc<tokio::sync::Mutex<()>>>>,
}

impl Link {
    /// The link of an execution of `rule` through `client`.
    pub fn new(
        rule: &Rule,
        client: Arc<Source>,
        settings: Settings,
        stop: Arc<AtomicBool>,
    ) -> Link {
        Link {
            rule: rule.name.clone(),
            endpoint: rule.endpoint.clone(),
            client,
            settings,
            concurrency: rule.concurrency.max(1) as usize,
            bandwidth: (rule.bandwidth_limit > 0)
                .then(|| Arc::new(Bandwidth::new(rule.bandwidth_limit))),
            stop,
            busy: Default::default(),
        }
    }

    /// The deadline of a request starting now.
    pub fn deadline(&self) -> Instant {
        Instant::now() + self.settings.request_timeout
    }

    /// `Stopped` once a stop was asked.
    pub fn stopped(&self) -> CopyResult<()> {
        if self.stop.load(Ordering::Acquire) {
            Err(CopyError::Stopped)
        } else {
            Ok(())
        }
    }

    /// Runs `f` until it ends or a stop is asked (then `f` is dropped: a request in flight is
    /// aborted, its connection closed).
    pub async fn unless_stopped<T>(
        &self,
        f: impl std::future::Future<Output = CopyResult<T>>,
    ) -> CopyResult<T> {
        let watch = async {
            while !self.stop.load(Ordering::Acquire) {
                tokio::time::sleep(STOP_POLL).await;
            }
        };
        tokio::select! {
            r = f => r,
            () = watch => Err(CopyError::Stopped),
        }
    }

    /// Sends a request once (bodies, chunks: their caller decides what a failure means).
    pub async fn send(&self, req: &UpstreamRequest<'_>) -> CopyResult<reqwest::Response> {
        let r = self
            .unless_stopped(async { Ok(self.client.send(req, self.deadline()).await) })
            .await?;
        Ok(r?)
    }

    /// Sends a request, retrying what is worth a retry (`Retry-After` honoured).
    pub async fn send_retrying(&self, req: &UpstreamRequest<'_>) -> CopyResult<reqwest::Response> {
        let r = self
            .unless_stopped(async { Ok(self.client.send_with_retries(req, self.deadline()).await) })
            .await?;
        Ok(r?)
    }

    /// A request without body, retried; `push` asks for push rights.
    pub async fn call(
        &self,
        method: Method,
        path: String,
        repo: &str,
        headers: HeaderMap,
        push: bool,
    ) -> CopyResult<reqwest::Response> {
        let mut req = UpstreamRequest::new(method, path, repo, headers);
        req.push = push;
        self.send_retrying(&req).await
    }

    /// The digest manifest `reference` of the endpoint's `repo` has (`HEAD`), `None` on 404.
    pub async fn manifest_digest(
        &self,
        repo: &str,
        reference: &str,
        push: bool,
    ) -> CopyResult<Option<Digest>> {
        let mut headers = HeaderMap::new();
        headers.insert(http::header::ACCEPT, HeaderValue::from_static(ACCEPT_ALL));
        let path = format!("{repo}/manifests/{reference}");
        match self.call(Method::HEAD, path, repo, headers, push).await {
            Ok(r) => Ok(r
                .headers()
                .get("docker-content-digest")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| Digest::parse(v).ok())),
            Err(CopyError::Endpoint(e)) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Holds blob `digest` for this execution: one copy of a blob at a time.
    pub async fn one_at_a_time(&self, digest: &Digest) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = self.busy.lock().entry(digest.clone()).or_default().clone();
        lock.lock_owned().await
    }

    /// The bandwidth limit shared by the execution's streams, if the rule has one.
    pub fn bandwidth(&self) -> Option<Arc<Bandwidth>> {
        self.bandwidth.clone()
    }

    /// Counts blob bytes that crossed the link.
    pub fn count(&self, bytes: u64) {
        metrics::counter!(
            "berth_replication_bytes_total",
            "rule" => self.rule.clone(),
            "endpoint" => self.endpoint.clone()
        )
        .increment(bytes);
    }

    /// After a failed attempt at `what`: waits for its `Retry-After` or the doubling backoff
    /// (a stop ends the wait), or gives the error back when the attempts are used up.
    pub async fn again(
        &self,
        retry: &mut Retry,
        e: UpstreamError,
        what: &str,
        digest: &Digest,
    ) -> CopyResult<()> {
        retry.failed += 1;
        if retry.failed >= self.settings.attempts {
            return Err(CopyError::Endpoint(e));
        }
        let wait = e.retry_after().unwrap_or(retry.backoff);
        tracing::info!(rule = %self.rule, endpoint = %self.endpoint, %digest, attempt = retry.failed + 1, ?wait, error = %e, "{what} resumes");
        self.unless_stopped(async {
            tokio::time::sleep(wait).await;
            Ok(())
        })
        .await?;
        retry.backoff = (retry.backoff * 2).min(MAX_BACKOFF);
        Ok(())
    }
}
