//! The log line and the metrics of a request, written when its response body ends (sent
//! whole, or cut short), so that duration and bytes say what really happened: an 8 MB blob
//! GET is logged when its last byte left, with the bytes that left.

use std::time::Instant;

use http::{Method, StatusCode};

/// Why a response body ended before all of its bytes were sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Abort {
    /// The client went away (or the connection failed under the body).
    ClientGone,
    /// The client stopped reading for `send_stall_timeout`.
    Stalled,
    /// The body itself failed (a read of the store, a source fetch).
    BodyError,
}

impl Abort {
    fn label(self) -> &'static str {
        match self {
            Abort::ClientGone => "client_gone",
            Abort::Stalled => "stalled",
            Abort::BodyError => "body_error",
        }
    }
}

/// One request, from its arrival to the end of its response body; dropping it writes the log
/// line and the metrics.
pub struct Finish {
    /// Request id (also sent as `X-Request-Id`).
    pub request_id: String,
    /// Client address.
    pub peer: std::net::SocketAddr,
    /// Who made the request (empty: anonymous or unknown).
    pub user: String,
    /// Method.
    pub method: Method,
    /// Path (no query).
    pub path: String,
    /// The `ns` query parameter (the registry a mirror request named), or empty.
    pub ns: String,
    /// The client's `User-Agent`, or empty.
    pub user_agent: String,
    /// Route label.
    pub label: &'static str,
    /// Status sent.
    pub status: StatusCode,
    /// The cache's outcome (`hit`, `miss`...), or empty.
    pub cache: &'static str,
    /// The error answered, and whether it is the server's fault.
    pub error: Option<(String, bool)>,
    /// Arrival.
    pub started: Instant,
    /// Bytes the body announced (0 for HEAD).
    pub expected: u64,
    /// Bytes handed to the connection so far.
    pub sent: u64,
    /// Whether the bytes count as blob bytes served.
    pub blob: bool,
    /// Set when the body ended early for a known reason.
    pub aborted: Option<Abort>,
}

impl Finish {
    /// Notes bytes handed to the connection.
    pub fn sent(&mut self, n: u64) {
        self.sent += n;
    }

    /// Notes why the body ended early.
    pub fn abort(&mut self, why: Abort) {
        self.aborted.get_or_insert(why);
    }
}

impl Drop for Finish {
    fn drop(&mut self) {
        let elapsed = self.started.elapsed();
        crate::metrics::request(&self.method, self.label, self.status, elapsed);
        crate::metrics::response_bytes(self.sent);
        if self.blob && self.sent > 0 {
            crate::metrics::blob_bytes_served(self.sent);
        }
        let aborted = match self.aborted {
            Some(why) => Some(why),
            None if self.sent < self.expected => Some(Abort::ClientGone),
            None => None,
        };
        let aborted = aborted.map(Abort::label);
        if let Some(reason) = aborted {
            crate::metrics::response_aborted(reason);
        }
        // An integer (a float prints as 0.08700000000000001 and parses differently per tool).
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let (request_id, peer, user, method) =
            (&self.request_id, self.peer, &self.user, &self.method);
        let (path, status, bytes, cache) =
            (&self.path, self.status.as_u16(), self.sent, self.cache);
        let (ns, user_agent) = (&self.ns, &self.user_agent);
        let aborted = aborted.unwrap_or("");
        match &self.error {
            Some((e, true)) => tracing::error!(
                request_id, %peer, user, %method, path, ns, user_agent, status, bytes, us, cache, aborted, error = %e, "request failed"
            ),
            Some((e, false)) => tracing::info!(
                request_id, %peer, user, %method, path, ns, user_agent, status, bytes, us, cache, aborted, error = %e, "request refused"
            ),
            None if !aborted.is_empty() => tracing::info!(
                request_id, %peer, user, %method, path, ns, user_agent, status, bytes, us, cache, aborted, "request cut short"
            ),
            None => tracing::info!(
                request_id, %peer, user, %method, path, ns, user_agent, status, bytes, us, cache, "request"
            ),
        }
    }
}
