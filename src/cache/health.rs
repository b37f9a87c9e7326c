//! What each source is doing: request and error counters by source and kind, and the health
//! kept in memory for `GET /api/v1/status` (last success, last error, consecutive failures).
//!
//! Updated once per finished source request (never per chunk of a blob): a small lock held for
//! a few assignments.

use std::time::SystemTime;

use parking_lot::Mutex;

use super::upstream::UpstreamError;

/// What a source request was for (label `kind` of `berth_upstream_requests_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// `/v2/REPO/manifests/REF` (GET or HEAD).
    Manifest,
    /// `/v2/REPO/blobs/DIGEST` (GET or HEAD).
    Blob,
    /// `/v2/REPO/tags/list`.
    Tags,
    /// The token endpoint of a Bearer challenge.
    Token,
    /// ECR's `GetAuthorizationToken`.
    EcrAuth,
    /// Any other path below `/v2/`.
    Other,
}

impl RequestKind {
    /// The kind of a request for `path` (what follows `/v2/`).
    pub fn of_path(path: &str) -> RequestKind {
        let path = path.split('?').next().unwrap_or(path);
        if path.contains("/manifests/") {
            RequestKind::Manifest
        } else if path.contains("/blobs/") {
            RequestKind::Blob
        } else if path.ends_with("/tags/list") {
            RequestKind::Tags
        } else {
            RequestKind::Other
        }
    }

    /// Its label.
    pub fn label(self) -> &'static str {
        match self {
            RequestKind::Manifest => "manifest",
            RequestKind::Blob => "blob",
            RequestKind::Tags => "tags",
            RequestKind::Token => "token",
            RequestKind::EcrAuth => "ecr_auth",
            RequestKind::Other => "other",
        }
    }
}

/// Why a source request failed (label `kind` of `berth_upstream_errors_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// No connection, or the connection broke (also mid-body, or a body shorter than announced).
    Connect,
    /// No answer (or no more bytes) before the deadline or the fetch budget.
    Timeout,
    /// A 4xx answer other than 404 (a 404 is the source's answer, not its failure); 401/403
    /// after the credential exchange are `auth`.
    Client,
    /// A 5xx answer.
    Server,
    /// Content with another digest than asked for.
    DigestMismatch,
    /// Credentials missing or refused, or the credential exchange failed.
    Auth,
    /// berth refused what the source sent or asked for: a redirect or token realm the egress
    /// policy denies, a redirect loop, an answer over its size cap, a manifest it cannot parse.
    Refused,
}

impl ErrorKind {
    /// Its label.
    pub fn label(self) -> &'static str {
        match self {
            ErrorKind::Connect => "connect",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Client => "4xx",
            ErrorKind::Server => "5xx",
            ErrorKind::DigestMismatch => "digest_mismatch",
            ErrorKind::Auth => "auth",
            ErrorKind::Refused => "refused",
        }
    }

    /// The kind of an [`UpstreamError`].
    pub fn of(e: &UpstreamError) -> ErrorKind {
        match e {
            UpstreamError::Unreachable(_) => ErrorKind::Connect,
            UpstreamError::TimedOut(_) => ErrorKind::Timeout,
            UpstreamError::Status { status, .. } if status.is_server_error() => ErrorKind::Server,
            UpstreamError::Status { .. } => ErrorKind::Client,
            UpstreamError::Auth(_) => ErrorKind::Auth,
            UpstreamError::Refused(_) => ErrorKind::Refused,
        }
    }
}

/// The last error of a source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastError {
    /// When.
    pub at: SystemTime,
    /// Its kind.
    pub kind: ErrorKind,
    /// What happened.
    pub message: String,
}

/// A source's health as last seen.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HealthSnapshot {
    /// The last request the source answered.
    pub last_success: Option<SystemTime>,
    /// The last failure.
    pub last_error: Option<LastError>,
    /// Failures since the last success.
    pub consecutive_failures: u64,
}

/// A source's health, shared by the source's requests (kept across rebuilds of the source).
#[derive(Debug, Default)]
pub struct Health {
    state: Mutex<HealthSnapshot>,
}

impl Health {
    /// The source answered: resets the consecutive failures.
    pub fn success(&self) {
        let mut s = self.state.lock();
        s.last_success = Some(SystemTime::now());
        s.consecutive_failures = 0;
    }

    /// A request failed; returns the consecutive failures including this one.
    pub fn failure(&self, kind: ErrorKind, message: &str) -> u64 {
        let mut s = self.state.lock();
        s.last_error = Some(LastError {
            at: SystemTime::now(),
            kind,
            message: message.to_string(),
        });
        s.consecutive_failures += 1;
        s.consecutive_failures
    }

    /// What it is now.
    pub fn snapshot(&self) -> HealthSnapshot {
        self.state.lock().clone()
    }
}

/// Counts a request to source `source` (`berth_upstream_requests_total{source,kind}`).
pub fn count_request(source: &str, kind: RequestKind) {
    metrics::counter!("berth_upstream_requests_total", "source" => source.to_string(), "kind" => kind.label())
        .increment(1);
}

/// Counts a failed request (`berth_upstream_errors_total{source,kind}`).
pub fn count_error(source: &str, kind: ErrorKind) {
    metrics::counter!("berth_upstream_errors_total", "source" => source.to_string(), "kind" => kind.label())
        .increment(1);
}

/// Counts a cached copy served because the source failed (`berth_cache_stale_total{source}`).
pub fn count_stale(source: &str) {
    metrics::counter!("berth_cache_stale_total", "source" => source.to_string()).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    #[test]
    fn kinds_and_failures() {
        assert_eq!(
            RequestKind::of_path("library/a/manifests/v1"),
            RequestKind::Manifest
        );
        assert_eq!(RequestKind::of_path("a/blobs/sha256:00"), RequestKind::Blob);
        assert_eq!(RequestKind::of_path("a/tags/list?n=5"), RequestKind::Tags);
        assert_eq!(RequestKind::of_path(""), RequestKind::Other);
        let status = |s| UpstreamError::Status {
            status: s,
            retry_after: None,
            message: String::new(),
        };
        assert_eq!(
            ErrorKind::of(&status(StatusCode::BAD_GATEWAY)).label(),
            "5xx"
        );
        assert_eq!(
            ErrorKind::of(&status(StatusCode::TOO_MANY_REQUESTS)).label(),
            "4xx"
        );
        let h = Health::default();
        assert_eq!(h.failure(ErrorKind::Timeout, "slow"), 1);
        assert_eq!(h.failure(ErrorKind::Connect, "refused"), 2);
        let s = h.snapshot();
        assert_eq!(s.consecutive_failures, 2);
        assert_eq!(s.last_error.as_ref().unwrap().message, "refused");
        h.success();
        let s = h.snapshot();
        assert_eq!(s.consecutive_failures, 0);
        assert!(s.last_success.is_some() && s.last_error.is_some());
    }
}
