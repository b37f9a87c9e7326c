//! In-process loopback doubles of the upstream services a pull-through cache talks to.
//!
//! Every double listens on its own ephemeral `127.0.0.1` port, keeps counters the tests can
//! read, and stops when dropped (its listener and every open connection are torn down).
//! Constructors are synchronous and work from `#[test]` and `#[tokio::test]` alike: the
//! doubles run on a private multi-thread tokio runtime owned by this module, so a test that
//! blocks its own thread (e.g. running skopeo) never starves them.
//!
//! * [`StaticRegistry`]: a tiny read-only OCI registry (blobs with `Range`, manifests, tags)
//!   whose content the test sets directly; the cheapest upstream.
//! * [`FaultRelay`]: a streaming reverse proxy with runtime-switchable faults (status codes,
//!   stalls, resets, throttling, latency, corruption, ignored `Range`) and traffic counters.
//! * [`TokenAuthFront`]: Docker Hub style bearer-token auth (a registry front plus its token
//!   server).
//! * [`EcrDouble`]: an ECR API endpoint that verifies SigV4-signed `GetAuthorizationToken`
//!   calls, plus a registry front accepting `Basic AWS:<password>`.
//! * [`BasicAuthFront`]: a fixed user/password basic-auth front (ACR / GCR `_json_key` /
//!   Harbor / Quay).
//! * [`HtpasswdRegistry`]: Debian's `docker-registry` (distribution 2.8) with htpasswd basic
//!   auth over plain HTTP.
//!
//! The fronts can also send blob GETs to a pre-signed "object store" URL on another port
//! ([`TokenAuthFront::redirect_blobs`] etc.) that rejects requests carrying `Authorization`,
//! like S3 behind ECR and the CDN behind Docker Hub.
//!
//! Traffic is recorded in a [`Traffic`] per double: every request (method, path, query, Range,
//! Authorization, final status) and the response body bytes sent per path.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::convert::Infallible;
use std::future::Future;
use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt as _};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt as _, Full, StreamBody};
use hyper::body::{Body as _, Frame, Incoming};
use sha2::{Digest as _, Sha256};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

// =============================================================================================
// Runtime, bodies, server helper
// =============================================================================================

/// Error type of double response bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Response body type every double handler returns.
pub type DoubleBody = UnsyncBoxBody<Bytes, BoxError>;

/// The private runtime all doubles run on (2 workers, created on first use, never shut down).
fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("test-doubles")
            .enable_all()
            .build()
            .expect("test doubles runtime")
    })
}

/// A body holding `bytes`.
pub fn full_body(bytes: impl Into<Bytes>) -> DoubleBody {
    Full::new(bytes.into())
        .map_err(|e: Infallible| match e {})
        .boxed_unsync()
}

/// An empty body.
pub fn empty_body() -> DoubleBody {
    full_body(Bytes::new())
}

type HandlerFuture = Pin<Box<dyn Future<Output = Response<DoubleBody>> + Send>>;
type Handler = Arc<dyn Fn(Request<Incoming>) -> HandlerFuture + Send + Sync>;

/// A minimal hyper server (HTTP/1.1 and h2c) on an ephemeral `127.0.0.1` port, running on
/// this module's runtime. Dropping it closes the listener and every open connection.
pub struct LoopbackServer {
    addr: SocketAddr,
    handler: Handler,
    down: Arc<AtomicBool>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl LoopbackServer {
    /// Binds `127.0.0.1:0` and serves `handler` until dropped.
    pub fn start<F, Fut>(handler: F) -> LoopbackServer
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<DoubleBody>> + Send + 'static,
    {
        let handler: Handler = Arc::new(move |req| Box::pin(handler(req)) as HandlerFuture);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().unwrap();
        let down = Arc::new(AtomicBool::new(false));
        let task = spawn_accept_loop(listener, handler.clone(), down.clone());
        LoopbackServer {
            addr,
            handler,
            down,
            task: Mutex::new(Some(task)),
        }
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT` (no trailing slash).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Closes the listener (new connections are refused) and drops open connections; requests
    /// that still arrive on a kept-alive connection in the meantime get the connection closed
    /// without a response.
    pub fn stop(&self) {
        self.down.store(true, Ordering::SeqCst);
        if let Some(task) = self.task.lock().unwrap().take() {
            task.abort();
        }
    }

    /// Listens again on the same port after [`stop`](Self::stop) (retries the bind for up to
    /// 5 s while the old listener closes).
    pub fn restart(&self) {
        let mut task = self.task.lock().unwrap();
        if task.is_some() {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match std::net::TcpListener::bind(self.addr) {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("cannot re-bind {}: {e}", self.addr),
            }
        };
        self.down.store(false, Ordering::SeqCst);
        *task = Some(spawn_accept_loop(
            listener,
            self.handler.clone(),
            self.down.clone(),
        ));
    }

    /// False between [`stop`](Self::stop) and [`restart`](Self::restart).
    pub fn is_up(&self) -> bool {
        !self.down.load(Ordering::SeqCst)
    }
}

impl Drop for LoopbackServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Per-connection write state, visible to handlers through the request extensions: lets a
/// `ResetAfter` fault wait until every byte hyper buffered reached the socket before closing.
#[derive(Debug)]
struct ConnWriteState {
    /// The last write attempt found the socket full.
    blocked: AtomicBool,
    /// When the last successful write happened.
    last_write: Mutex<Instant>,
}

/// A TCP stream that records its write state in a [`ConnWriteState`].
struct TrackedIo {
    inner: tokio::net::TcpStream,
    state: Arc<ConnWriteState>,
}

impl TrackedIo {
    fn note(&self, r: &std::task::Poll<std::io::Result<usize>>) {
        match r {
            std::task::Poll::Pending => self.state.blocked.store(true, Ordering::SeqCst),
            std::task::Poll::Ready(Ok(_)) => {
                self.state.blocked.store(false, Ordering::SeqCst);
                *self.state.last_write.lock().unwrap() = Instant::now();
            }
            std::task::Poll::Ready(Err(_)) => self.state.blocked.store(false, Ordering::SeqCst),
        }
    }
}

impl tokio::io::AsyncRead for TrackedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for TrackedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.note(&r);
        r
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.note(&r);
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Waits (≤ 10 s) until the connection has written everything hyper buffered: not blocked on
/// a full socket and no write for 50 ms. Without connection state: 100 ms.
async fn wait_drained(conn: Option<&Arc<ConnWriteState>>) {
    let Some(conn) = conn else {
        tokio::time::sleep(Duration::from_millis(100)).await;
        return;
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let quiet = conn.last_write.lock().unwrap().elapsed() >= Duration::from_millis(50);
        if (quiet && !conn.blocked.load(Ordering::SeqCst)) || Instant::now() > deadline {
            return;
        }
    }
}

fn spawn_accept_loop(
    listener: std::net::TcpListener,
    handler: Handler,
    down: Arc<AtomicBool>,
) -> JoinHandle<()> {
    listener
        .set_nonblocking(true)
        .expect("nonblocking listener");
    runtime().spawn(async move {
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("test double: cannot register listener: {e}");
                return;
            }
        };
        // Connection tasks live in this set: aborting the accept task drops the set, which
        // aborts every connection (stalled responses included).
        let mut conns = JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let _ = stream.set_nodelay(true);
                        let handler = handler.clone();
                        let down = down.clone();
                        let state = Arc::new(ConnWriteState {
                            blocked: AtomicBool::new(false),
                            last_write: Mutex::new(Instant::now()),
                        });
                        let io = TrackedIo { inner: stream, state: state.clone() };
                        conns.spawn(async move {
                            let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                                let handler = handler.clone();
                                let down = down.clone();
                                req.extensions_mut().insert(state.clone());
                                async move {
                                    if down.load(Ordering::SeqCst) {
                                        return Err::<Response<DoubleBody>, std::io::Error>(std::io::Error::other("test double is down"));
                                    }
                                    Ok(handler(req).await)
                                }
                            });
                            let _ = hyper_util::server::conn::auto::Builder::new(
                                hyper_util::rt::TokioExecutor::new(),
                            )
                            .serve_connection(hyper_util::rt::TokioIo::new(io), service)
                            .await;
                        });
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                },
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
    })
}

// =============================================================================================
// Polling helpers
// =============================================================================================

/// Polls `cond` every 10 ms until it is true (→ true) or `timeout` passes (→ false).
pub async fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Blocking version of [`wait_until`] for synchronous tests.
pub fn wait_until_blocking(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

// =============================================================================================
// Traffic counters
// =============================================================================================

/// One request a double received.
#[derive(Clone, Debug)]
pub struct RequestRecord {
    /// Sequence number within its [`Traffic`].
    pub id: u64,
    /// `GET`, `HEAD`, ...
    pub method: String,
    /// Path without the query.
    pub path: String,
    /// Raw query string, if any.
    pub query: Option<String>,
    /// The `Range` header as received.
    pub range: Option<String>,
    /// The `Authorization` header as received.
    pub authorization: Option<String>,
    /// Status of the response head, once sent (`None` while waiting for upstream).
    pub status: Option<u16>,
}

/// Request log and body byte counters of one double (shared with its handlers).
#[derive(Default)]
pub struct Traffic {
    next_id: AtomicU64,
    log: Mutex<Vec<RequestRecord>>,
    bytes: Mutex<HashMap<String, u64>>,
}

fn method_matches(pattern: &str, method: &str) -> bool {
    pattern.is_empty() || pattern == "*" || pattern.eq_ignore_ascii_case(method)
}

impl Traffic {
    fn begin(&self, parts: &http::request::Parts) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        self.log.lock().unwrap().push(RequestRecord {
            id,
            method: parts.method.as_str().to_string(),
            path: parts.uri.path().to_string(),
            query: parts.uri.query().map(str::to_string),
            range: header_string(&parts.headers, header::RANGE),
            authorization: header_string(&parts.headers, header::AUTHORIZATION),
            status: None,
        });
        id
    }

    fn finish(&self, id: u64, status: u16) {
        let mut log = self.log.lock().unwrap();
        if let Some(r) = log.iter_mut().rev().find(|r| r.id == id) {
            r.status = Some(status);
        }
    }

    fn add_bytes(&self, path: &str, n: u64) {
        *self
            .bytes
            .lock()
            .unwrap()
            .entry(path.to_string())
            .or_default() += n;
    }

    /// Every request since the last reset, in arrival order.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.log.lock().unwrap().clone()
    }

    /// Requests whose method is `method` (`"*"` or `""`: any; case-insensitive) and whose
    /// path contains `path_contains`.
    pub fn requests_matching(&self, method: &str, path_contains: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|r| method_matches(method, &r.method) && r.path.contains(path_contains))
            .count()
    }

    /// Final statuses of the matching requests, in arrival order (0 while still pending).
    pub fn statuses_matching(&self, method: &str, path_contains: &str) -> Vec<u16> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|r| method_matches(method, &r.method) && r.path.contains(path_contains))
            .map(|r| r.status.unwrap_or(0))
            .collect()
    }

    /// Response body bytes sent for paths containing `path_contains`.
    pub fn bytes_sent_matching(&self, path_contains: &str) -> u64 {
        self.bytes
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| p.contains(path_contains))
            .map(|(_, n)| *n)
            .sum()
    }

    /// `Range` header values received on paths containing `path_contains`, in order.
    pub fn ranges_seen(&self, path_contains: &str) -> Vec<String> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.path.contains(path_contains))
            .filter_map(|r| r.range.clone())
            .collect()
    }

    /// `(method, path, range)` for every request that carried a `Range` header.
    pub fn range_log(&self) -> Vec<(String, String, String)> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter_map(|r| {
                r.range
                    .clone()
                    .map(|range| (r.method.clone(), r.path.clone(), range))
            })
            .collect()
    }

    /// Forgets all requests and byte counts.
    pub fn reset(&self) {
        self.log.lock().unwrap().clear();
        self.bytes.lock().unwrap().clear();
    }
}

// =============================================================================================
// Small HTTP helpers
// =============================================================================================

fn header_string(h: &HeaderMap, name: impl header::AsHeaderName) -> Option<String> {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

fn response(
    status: u16,
    headers: &[(&str, String)],
    body: impl Into<Bytes>,
) -> Response<DoubleBody> {
    let mut resp = Response::new(full_body(body));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    for (k, v) in headers {
        if let (Ok(k), Ok(v)) = (HeaderName::try_from(*k), HeaderValue::try_from(v.as_str())) {
            resp.headers_mut().append(k, v);
        }
    }
    resp
}

fn json_response(status: u16, value: serde_json::Value) -> Response<DoubleBody> {
    response(
        status,
        &[("content-type", "application/json".to_string())],
        serde_json::to_vec(&value).unwrap(),
    )
}

/// An OCI error response `{"errors":[{"code","message","detail"}]}`.
fn oci_error(status: u16, code: &str, message: &str) -> Response<DoubleBody> {
    let mut r = json_response(
        status,
        serde_json::json!({"errors":[{"code": code, "message": message, "detail": null}]}),
    );
    r.headers_mut().insert(
        "docker-distribution-api-version",
        HeaderValue::from_static("registry/2.0"),
    );
    r
}

/// `sha256:<hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

fn random_hex(bytes: usize) -> String {
    let mut v = vec![0u8; bytes];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut v);
    hex::encode(v)
}

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// `(user, password)` from an `Authorization: Basic …` header.
fn basic_credentials(h: &HeaderMap) -> Option<(String, String)> {
    let v = header_string(h, header::AUTHORIZATION)?;
    let (scheme, rest) = v.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(rest.trim())
        .ok()?;
    let s = String::from_utf8(raw).ok()?;
    let (u, p) = s.split_once(':')?;
    Some((u.to_string(), p.to_string()))
}

fn bearer_token(h: &HeaderMap) -> Option<String> {
    let v = header_string(h, header::AUTHORIZATION)?;
    let (scheme, rest) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| rest.trim().to_string())
}

fn percent_decode(s: &str) -> String {
    let hex = |c: Option<&u8>| c.and_then(|c| (*c as char).to_digit(16)).map(|d| d as u8);
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => match (hex(b.get(i + 1)), hex(b.get(i + 2))) {
                (Some(h), Some(l)) => {
                    out.push(h * 16 + l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_query(q: Option<&str>) -> Vec<(String, String)> {
    q.unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

/// Splits `/v2/NAME/(manifests|blobs|tags)/REST` into `(NAME, kind, REST)`.
fn repo_route(path: &str) -> Option<(String, &'static str, String)> {
    let rest = path.strip_prefix("/v2/")?;
    let mut best: Option<(usize, &'static str)> = None;
    for (marker, kind) in [
        ("/manifests/", "manifests"),
        ("/blobs/", "blobs"),
        ("/tags/", "tags"),
    ] {
        if let Some(pos) = rest.rfind(marker) {
            if best.is_none_or(|(b, _)| pos > b) {
                best = Some((pos, kind));
            }
        }
    }
    let (pos, kind) = best?;
    if pos == 0 {
        return None;
    }
    let name = rest[..pos].to_string();
    let tail = rest[pos + kind.len() + 2..].to_string();
    Some((name, kind, tail))
}

// ---- dates ----------------------------------------------------------------------------------

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = (if y >= 0 { y } else { y - 399 }) / 400;
    let yoe = y - era * 400;
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719468;
    let era = (if z >= 0 { z } else { z - 146096 }) / 146097;
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = (if mp < 10 { mp + 3 } else { mp - 9 }) as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// `2024-01-02T03:04:05Z` for `t` (UTC, whole seconds).
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
    let (y, m, d) = civil_from_days(secs.div_euclid(86400));
    let s = secs.rem_euclid(86400);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

/// Parses a SigV4 `x-amz-date` (`20240102T030405Z`).
fn parse_amz_date(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d) = (num(0..4)?, num(4..6)?, num(6..8)?);
    let (h, mi, se) = (num(9..11)?, num(11..13)?, num(13..15)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let secs = days_from_civil(y, mo as u32, d as u32) * 86400 + h * 3600 + mi * 60 + se;
    Some(UNIX_EPOCH + Duration::from_secs(secs.try_into().ok()?))
}

// =============================================================================================
// Upstream forwarding and body shaping
// =============================================================================================

const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
];

fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(&name.as_str())
}

/// An upstream base URL and the client used to reach it (no redirects followed, no proxies,
/// no decompression: bytes pass through untouched).
#[derive(Clone)]
struct Upstream {
    base: String,
    client: reqwest::Client,
}

impl Upstream {
    fn new(base: &str) -> Upstream {
        Upstream {
            base: base.trim_end_matches('/').to_string(),
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .no_proxy()
                .connect_timeout(Duration::from_secs(5))
                .build()
                .expect("upstream client"),
        }
    }

    /// Forwards method, path+query, headers (minus hop-by-hop and `drop`) and the streamed
    /// body. The `Host` header is kept, so an upstream registry builds `Location` URLs that
    /// point back at the front.
    async fn send(
        &self,
        parts: &http::request::Parts,
        path_and_query: &str,
        body: Option<Incoming>,
        drop: &[HeaderName],
    ) -> Result<reqwest::Response, reqwest::Error> {
        let url = format!("{}{}", self.base, path_and_query);
        let mut headers = HeaderMap::new();
        for (name, value) in parts.headers.iter() {
            if is_hop_by_hop(name) || drop.contains(name) {
                continue;
            }
            headers.append(name.clone(), value.clone());
        }
        let mut rb = self
            .client
            .request(parts.method.clone(), url)
            .headers(headers);
        if let Some(body) = body {
            let no_body =
                parts.method == Method::GET || parts.method == Method::HEAD || body.is_end_stream();
            if !no_body {
                rb = rb.body(reqwest::Body::wrap_stream(
                    http_body_util::BodyDataStream::new(body),
                ));
            }
        }
        rb.send().await
    }
}

/// Body faults applied to one response.
#[derive(Clone, Copy, Debug, Default)]
struct BodyPlan {
    stall_after: Option<u64>,
    reset_after: Option<u64>,
    throttle: Option<u64>,
    corrupt_at: Option<u64>,
}

/// Stall bookkeeping shared by a relay and its streams.
struct StallControl {
    release: watch::Receiver<u64>,
    stalled: Arc<AtomicUsize>,
}

struct DecOnDrop(Arc<AtomicUsize>);
impl Drop for DecOnDrop {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

struct Shaper {
    upstream: Pin<Box<dyn Stream<Item = Result<Bytes, reqwest::Error>> + Send>>,
    pending: Bytes,
    sent: u64,
    plan: BodyPlan,
    traffic: Arc<Traffic>,
    path: String,
    stall: Option<StallControl>,
    conn: Option<Arc<ConnWriteState>>,
    started: Instant,
    done: bool,
}

impl Shaper {
    async fn wait_release(&mut self) {
        match &mut self.stall {
            Some(ctl) => {
                ctl.stalled.fetch_add(1, Ordering::SeqCst);
                let _guard = DecOnDrop(ctl.stalled.clone());
                if ctl.release.changed().await.is_err() {
                    futures_util::future::pending::<()>().await;
                }
            }
            None => futures_util::future::pending::<()>().await,
        }
    }

    async fn next_frame(&mut self) -> Option<Result<Frame<Bytes>, BoxError>> {
        loop {
            if self.done {
                return None;
            }
            if let Some(r) = self.plan.reset_after {
                if self.sent >= r {
                    self.done = true;
                    // Let hyper flush the bytes already handed over, then fail the body: hyper
                    // closes the connection before the announced length (or final chunk).
                    wait_drained(self.conn.as_ref()).await;
                    return Some(Err("FaultRelay: reset_after fault".into()));
                }
            }
            if let Some(s) = self.plan.stall_after {
                if self.sent >= s {
                    self.wait_release().await;
                    self.plan.stall_after = None;
                    continue;
                }
            }
            if self.pending.is_empty() {
                match self.upstream.next().await {
                    None => {
                        self.done = true;
                        return None;
                    }
                    Some(Err(e)) => {
                        // Upstream broke off: pass the breakage on, after the bytes so far.
                        self.done = true;
                        wait_drained(self.conn.as_ref()).await;
                        return Some(Err(Box::new(e)));
                    }
                    Some(Ok(b)) => {
                        self.pending = b;
                        continue;
                    }
                }
            }
            let mut take = self.pending.len() as u64;
            for limit in [self.plan.reset_after, self.plan.stall_after]
                .into_iter()
                .flatten()
            {
                if limit > self.sent {
                    take = take.min(limit - self.sent);
                }
            }
            if let Some(bps) = self.plan.throttle {
                take = take.min((bps / 20).max(1));
            }
            let mut chunk = self.pending.split_to(take as usize);
            if let Some(off) = self.plan.corrupt_at {
                if off >= self.sent && off < self.sent + take {
                    let mut m = BytesMut::from(&chunk[..]);
                    m[(off - self.sent) as usize] ^= 0xFF;
                    chunk = m.freeze();
                }
            }
            if let Some(bps) = self.plan.throttle {
                let due = self.started
                    + Duration::from_secs_f64((self.sent + take) as f64 / bps.max(1) as f64);
                tokio::time::sleep_until(due.into()).await;
            }
            self.sent += take;
            self.traffic.add_bytes(&self.path, take);
            return Some(Ok(Frame::data(chunk)));
        }
    }
}

/// Builds the client-facing response from an upstream response: status and headers (minus
/// hop-by-hop; `Location` values under the upstream base are rewritten to `self_base`), and a
/// streamed, counted, optionally faulted body.
/// How a relayed body is shaped and counted.
struct BodyShape {
    plan: BodyPlan,
    traffic: Arc<Traffic>,
    path: String,
    stall: Option<StallControl>,
    conn: Option<Arc<ConnWriteState>>,
}

fn relay_response(
    resp: reqwest::Response,
    upstream_base: &str,
    self_base: &str,
    strip: &[HeaderName],
    shape: BodyShape,
) -> Response<DoubleBody> {
    let BodyShape {
        plan,
        traffic,
        path,
        stall,
        conn,
    } = shape;
    let status = resp.status();
    let mut headers = HeaderMap::new();
    for (name, value) in resp.headers().iter() {
        if is_hop_by_hop(name) || strip.contains(name) {
            continue;
        }
        if name == header::LOCATION {
            if let Ok(v) = value.to_str() {
                if let Some(rest) = v.strip_prefix(upstream_base) {
                    if let Ok(nv) = HeaderValue::try_from(format!("{self_base}{rest}")) {
                        headers.append(name.clone(), nv);
                        continue;
                    }
                }
            }
        }
        headers.append(name.clone(), value.clone());
    }
    let shaper = Shaper {
        upstream: Box::pin(resp.bytes_stream()),
        pending: Bytes::new(),
        sent: 0,
        plan,
        traffic,
        path,
        stall,
        conn,
        started: Instant::now(),
        done: false,
    };
    let stream = futures_util::stream::unfold(shaper, |mut s| async move {
        let item = s.next_frame().await?;
        Some((item, s))
    });
    let mut out = Response::new(StreamBody::new(stream).boxed_unsync());
    *out.status_mut() = status;
    *out.headers_mut() = headers;
    out
}

fn bad_gateway(e: &reqwest::Error) -> Response<DoubleBody> {
    oci_error(
        502,
        "UNAVAILABLE",
        &format!("test double: upstream failed: {e}"),
    )
}

// =============================================================================================
// FaultRelay
// =============================================================================================

/// A fault a [`FaultRelay`] can inject.
#[derive(Clone, Debug, PartialEq)]
pub enum Fault {
    /// Answer with this status and an OCI error JSON body (plus `Retry-After: secs` if set)
    /// without contacting upstream.
    Status {
        /// HTTP status, e.g. 404, 429, 500, 503.
        code: u16,
        /// Value of `Retry-After` in seconds.
        retry_after: Option<u64>,
    },
    /// Forward the first N response body bytes, then send nothing more (connection stays
    /// open) until [`FaultRelay::release_stalled`] or the relay is dropped.
    StallAfter(u64),
    /// Forward the first N response body bytes, then close the connection (the client sees
    /// an incomplete body).
    ResetAfter(u64),
    /// Pace the response body at this many bytes per second.
    Throttle(u64),
    /// Wait this long before the response head.
    Latency(Duration),
    /// Flip (XOR 0xFF) the response body byte at this offset.
    CorruptAt(u64),
    /// Strip `Range` and `If-Range` from the forwarded request (a source that ignores Range).
    IgnoreRange,
}

impl Fault {
    fn kind(&self) -> u8 {
        match self {
            Fault::Status { .. } => 0,
            Fault::StallAfter(_) => 1,
            Fault::ResetAfter(_) => 2,
            Fault::Throttle(_) => 3,
            Fault::Latency(_) => 4,
            Fault::CorruptAt(_) => 5,
            Fault::IgnoreRange => 6,
        }
    }
}

/// A fault with its scope: which requests it applies to and how many times.
#[derive(Clone, Debug)]
pub struct FaultRule {
    /// The fault.
    pub fault: Fault,
    /// Path substring this rule applies to; `None`: the relay's default filter
    /// ([`FaultRelay::set_match`]).
    pub path_contains: Option<String>,
    /// Method this rule applies to (`None`: any).
    pub method: Option<Method>,
    /// Remaining matching requests this rule applies to (`None`: forever). A rule that
    /// reaches 0 is removed.
    pub times: Option<usize>,
}

impl FaultRule {
    /// A rule for `fault` on every request that passes the relay's default filter, forever.
    pub fn new(fault: Fault) -> FaultRule {
        FaultRule {
            fault,
            path_contains: None,
            method: None,
            times: None,
        }
    }
    /// Restricts the rule to paths containing `substr` (`""`: all paths).
    pub fn path(mut self, substr: &str) -> FaultRule {
        self.path_contains = Some(substr.to_string());
        self
    }
    /// Restricts the rule to one method, e.g. `"GET"`.
    pub fn method(mut self, method: &str) -> FaultRule {
        self.method = Some(Method::from_bytes(method.as_bytes()).expect("valid method"));
        self
    }
    /// Applies the rule to the next `n` matching requests only.
    pub fn times(mut self, n: usize) -> FaultRule {
        self.times = Some(n);
        self
    }
}

#[derive(Default)]
struct FaultState {
    rules: Vec<FaultRule>,
    /// Default path filter; `None`: all paths.
    default_path: Option<String>,
}

#[derive(Default)]
struct RequestPlan {
    status: Option<(u16, Option<u64>)>,
    latency: Option<Duration>,
    ignore_range: bool,
    body: BodyPlan,
}

struct RelayInner {
    upstream: Upstream,
    self_url: OnceLock<String>,
    faults: Mutex<FaultState>,
    traffic: Arc<Traffic>,
    release_tx: watch::Sender<u64>,
    stalled: Arc<AtomicUsize>,
}

impl RelayInner {
    /// Picks the rules that apply to this request (first rule of each kind wins) and consumes
    /// one use of each. A status fault short-circuits: only it (and latency) is consumed.
    fn plan_for(&self, method: &Method, path: &str) -> RequestPlan {
        let mut st = self.faults.lock().unwrap();
        let default_path = st.default_path.clone();
        let matches = |r: &FaultRule| {
            if r.times == Some(0) {
                return false;
            }
            if let Some(m) = &r.method {
                if m != method {
                    return false;
                }
            }
            match r.path_contains.as_ref().or(default_path.as_ref()) {
                Some(p) => path.contains(p.as_str()),
                None => true,
            }
        };
        let mut chosen: Vec<usize> = Vec::new();
        let mut kinds_seen = HashSet::new();
        let status_idx = st
            .rules
            .iter()
            .position(|r| matches!(r.fault, Fault::Status { .. }) && matches(r));
        for (i, r) in st.rules.iter().enumerate() {
            if !matches(r) || !kinds_seen.insert(r.fault.kind()) {
                continue;
            }
            let keep = match (&r.fault, status_idx) {
                (Fault::Status { .. }, _) => true,
                (Fault::Latency(_), _) => true,
                (_, Some(_)) => false,
                (_, None) => true,
            };
            if keep {
                chosen.push(i);
            }
        }
        let mut plan = RequestPlan::default();
        for &i in &chosen {
            let r = &mut st.rules[i];
            match &r.fault {
                Fault::Status { code, retry_after } => plan.status = Some((*code, *retry_after)),
                Fault::StallAfter(n) => plan.body.stall_after = Some(*n),
                Fault::ResetAfter(n) => plan.body.reset_after = Some(*n),
                Fault::Throttle(n) => plan.body.throttle = Some(*n),
                Fault::Latency(d) => plan.latency = Some(*d),
                Fault::CorruptAt(n) => plan.body.corrupt_at = Some(*n),
                Fault::IgnoreRange => plan.ignore_range = true,
            }
            if let Some(t) = &mut r.times {
                *t = t.saturating_sub(1);
            }
        }
        st.rules.retain(|r| r.times != Some(0));
        plan
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<DoubleBody> {
        let (mut parts, body) = req.into_parts();
        let conn = parts.extensions.get::<Arc<ConnWriteState>>().cloned();
        let path = parts.uri.path().to_string();
        let id = self.traffic.begin(&parts);
        let plan = self.plan_for(&parts.method, &path);
        if let Some(d) = plan.latency {
            tokio::time::sleep(d).await;
        }
        if let Some((code, retry_after)) = plan.status {
            self.traffic.finish(id, code);
            return fault_status_response(code, retry_after, &path);
        }
        if plan.ignore_range {
            parts.headers.remove(header::RANGE);
            parts.headers.remove(header::IF_RANGE);
        }
        let pq = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into());
        match self.upstream.send(&parts, &pq, Some(body), &[]).await {
            Err(e) => {
                self.traffic.finish(id, 502);
                bad_gateway(&e)
            }
            Ok(resp) => {
                self.traffic.finish(id, resp.status().as_u16());
                let stall = StallControl {
                    release: self.release_tx.subscribe(),
                    stalled: self.stalled.clone(),
                };
                relay_response(
                    resp,
                    &self.upstream.base,
                    self.self_url.get().map(String::as_str).unwrap_or(""),
                    &[],
                    BodyShape {
                        plan: plan.body,
                        traffic: self.traffic.clone(),
                        path,
                        stall: Some(stall),
                        conn,
                    },
                )
            }
        }
    }
}

fn fault_status_response(code: u16, retry_after: Option<u64>, path: &str) -> Response<DoubleBody> {
    let oci_code = match code {
        401 => "UNAUTHORIZED",
        403 => "DENIED",
        404 if path.contains("/manifests/") => "MANIFEST_UNKNOWN",
        404 if path.contains("/blobs/") => "BLOB_UNKNOWN",
        404 => "NAME_UNKNOWN",
        429 => "TOOMANYREQUESTS",
        500..=599 => "UNAVAILABLE",
        _ => "UNKNOWN",
    };
    let mut r = oci_error(
        code,
        oci_code,
        &format!("FaultRelay: injected status {code}"),
    );
    if let Some(s) = retry_after {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(s));
    }
    r
}

/// A streaming reverse proxy in front of an upstream base URL, with runtime-switchable faults.
///
/// It forwards method, path+query, headers (`Authorization`, `Range`, `Host` included) and
/// the request body, and streams the response back chunk by chunk. Faults apply to requests
/// whose path contains the default filter ([`set_match`](Self::set_match); initially all
/// paths) or a rule's own filter ([`inject`](Self::inject)).
///
/// ```ignore
/// let relay = FaultRelay::start(&upstream.url());
/// relay.set_match("/blobs/");
/// relay.status(503, None, Some(1));   // first blob request: 503, then pass through
/// relay.inject(FaultRule::new(Fault::ResetAfter(4096)).method("GET").times(1));
/// ```
pub struct FaultRelay {
    server: LoopbackServer,
    inner: Arc<RelayInner>,
}

impl FaultRelay {
    /// Starts a relay in front of `upstream` (e.g. `http://127.0.0.1:5000`), no faults.
    pub fn start(upstream: &str) -> FaultRelay {
        let (release_tx, _) = watch::channel(0u64);
        let inner = Arc::new(RelayInner {
            upstream: Upstream::new(upstream),
            self_url: OnceLock::new(),
            faults: Mutex::new(FaultState::default()),
            traffic: Arc::new(Traffic::default()),
            release_tx,
            stalled: Arc::new(AtomicUsize::new(0)),
        });
        let h = inner.clone();
        let server = LoopbackServer::start(move |req| h.clone().handle(req));
        let _ = inner.self_url.set(server.url());
        FaultRelay { server, inner }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// `127.0.0.1:PORT` (for registry names such as `127.0.0.1:PORT/library/x`).
    pub fn host(&self) -> String {
        self.server.addr().to_string()
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// The upstream base URL.
    pub fn upstream(&self) -> &str {
        &self.inner.upstream.base
    }

    // ---- fault switches ----

    /// Default path filter for rules without their own: only paths containing `substr` get
    /// faults. `""` or `"all"`: every path (the initial setting).
    pub fn set_match(&self, substr: &str) {
        self.inner.faults.lock().unwrap().default_path = match substr {
            "" | "all" => None,
            s => Some(s.to_string()),
        };
    }

    /// Same as `set_match("all")`.
    pub fn match_all(&self) {
        self.set_match("all");
    }

    /// Appends a rule (rules of the same kind are tried in order; the first matching wins).
    pub fn inject(&self, rule: FaultRule) {
        self.inner.faults.lock().unwrap().rules.push(rule);
    }

    /// Replaces every rule of the same kind as `fault` with a new default-scoped rule.
    fn set_fault(&self, fault: Fault, times: Option<usize>) {
        let mut st = self.inner.faults.lock().unwrap();
        let kind = fault.kind();
        st.rules.retain(|r| r.fault.kind() != kind);
        st.rules.push(FaultRule {
            fault,
            path_contains: None,
            method: None,
            times,
        });
    }

    /// Answer matching requests with `code` (and `Retry-After: secs`) and an OCI error body,
    /// without contacting upstream; `times: Some(n)`: only the next n matching requests.
    pub fn status(&self, code: u16, retry_after_secs: Option<u64>, times: Option<usize>) {
        self.set_fault(
            Fault::Status {
                code,
                retry_after: retry_after_secs,
            },
            times,
        );
    }

    /// Forward `bytes` response body bytes, then hang (see [`Fault::StallAfter`]).
    pub fn stall_after(&self, bytes: u64) {
        self.set_fault(Fault::StallAfter(bytes), None);
    }

    /// Forward `bytes` response body bytes, then close the connection.
    pub fn reset_after(&self, bytes: u64) {
        self.set_fault(Fault::ResetAfter(bytes), None);
    }

    /// Pace response bodies at `bytes_per_sec`.
    pub fn throttle(&self, bytes_per_sec: u64) {
        self.set_fault(Fault::Throttle(bytes_per_sec), None);
    }

    /// Delay every matching response head by `d`.
    pub fn latency(&self, d: Duration) {
        self.set_fault(Fault::Latency(d), None);
    }

    /// Flip the response body byte at `offset`.
    pub fn corrupt_at(&self, offset: u64) {
        self.set_fault(Fault::CorruptAt(offset), None);
    }

    /// Strip `Range`/`If-Range` from forwarded requests (upstream answers 200 with the whole
    /// body). The received `Range` is still logged.
    pub fn ignore_range(&self) {
        self.set_fault(Fault::IgnoreRange, None);
    }

    /// Removes every rule (does not resume already stalled responses: see
    /// [`release_stalled`](Self::release_stalled)).
    pub fn clear_faults(&self) {
        self.inner.faults.lock().unwrap().rules.clear();
    }

    /// The rules still active (exhausted `times` rules are gone).
    pub fn faults(&self) -> Vec<FaultRule> {
        self.inner.faults.lock().unwrap().rules.clone()
    }

    /// Resumes every response currently stalled by a `StallAfter` fault (they then continue
    /// with the rest of the body).
    pub fn release_stalled(&self) {
        self.inner.release_tx.send_modify(|v| *v += 1);
    }

    /// Responses currently stalled.
    pub fn stalled_count(&self) -> usize {
        self.inner.stalled.load(Ordering::SeqCst)
    }

    /// `false`: close the listener (connections refused, open ones dropped); `true`: listen
    /// again on the same port. Simulates an unreachable source.
    pub fn set_reachable(&self, reachable: bool) {
        if reachable {
            self.server.restart()
        } else {
            self.server.stop()
        }
    }

    // ---- counters ----

    /// The full traffic log.
    pub fn traffic(&self) -> &Traffic {
        &self.inner.traffic
    }

    /// Requests with `method` (`"*"`: any) whose path contains `path_contains`.
    pub fn requests_matching(&self, method: &str, path_contains: &str) -> usize {
        self.inner.traffic.requests_matching(method, path_contains)
    }

    /// Response body bytes the relay sent for paths containing `path_contains`.
    pub fn bytes_sent_matching(&self, path_contains: &str) -> u64 {
        self.inner.traffic.bytes_sent_matching(path_contains)
    }

    /// `Range` headers received on paths containing `path_contains`, in order.
    pub fn ranges_seen(&self, path_contains: &str) -> Vec<String> {
        self.inner.traffic.ranges_seen(path_contains)
    }

    /// Clears the request log and byte counters (faults are kept).
    pub fn reset_counters(&self) {
        self.inner.traffic.reset()
    }
}

// =============================================================================================
// Object store (pre-signed redirect target)
// =============================================================================================

struct ObjectStoreInner {
    upstream: Upstream,
    signatures: Mutex<HashSet<String>>,
    traffic: Arc<Traffic>,
    rejected_with_auth: AtomicUsize,
}

/// The redirect target of a front's blob GETs (S3 / CDN style): serves
/// `/v2/NAME/blobs/DIGEST?X-Amz-…&X-Amz-Signature=…` from the front's upstream, answers
/// 400 to requests that carry `Authorization` (as S3 does for pre-signed URLs) and 403 to an
/// unknown signature. Its responses carry no `Docker-Content-Digest`.
pub struct ObjectStore {
    server: LoopbackServer,
    inner: Arc<ObjectStoreInner>,
}

impl ObjectStore {
    fn start(upstream: Upstream) -> ObjectStore {
        let inner = Arc::new(ObjectStoreInner {
            upstream,
            signatures: Mutex::new(HashSet::new()),
            traffic: Arc::new(Traffic::default()),
            rejected_with_auth: AtomicUsize::new(0),
        });
        let h = inner.clone();
        let server = LoopbackServer::start(move |req| {
            let h = h.clone();
            async move { object_store_handle(h, req).await }
        });
        ObjectStore { server, inner }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// Requests received.
    pub fn traffic(&self) -> &Traffic {
        &self.inner.traffic
    }

    /// Requests rejected because they carried an `Authorization` header.
    pub fn rejected_with_auth(&self) -> usize {
        self.inner.rejected_with_auth.load(Ordering::SeqCst)
    }

    /// A pre-signed URL for `path` (`/v2/NAME/blobs/DIGEST`).
    fn presign(&self, path: &str) -> String {
        let sig = random_hex(32);
        self.inner.signatures.lock().unwrap().insert(sig.clone());
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        format!(
            "{}{path}?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Date={now}&X-Amz-Expires=1200&X-Amz-SignedHeaders=host&X-Amz-Signature={sig}",
            self.url()
        )
    }
}

fn s3_error(status: u16, code: &str, message: &str) -> Response<DoubleBody> {
    response(
        status,
        &[("content-type", "application/xml".to_string())],
        format!("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{message}</Message></Error>"),
    )
}

async fn object_store_handle(
    inner: Arc<ObjectStoreInner>,
    req: Request<Incoming>,
) -> Response<DoubleBody> {
    let (parts, _body) = req.into_parts();
    let id = inner.traffic.begin(&parts);
    let path = parts.uri.path().to_string();
    let resp = if parts.headers.contains_key(header::AUTHORIZATION) {
        inner.rejected_with_auth.fetch_add(1, Ordering::SeqCst);
        s3_error(
            400,
            "InvalidArgument",
            "Only one auth mechanism allowed; only the X-Amz-Algorithm query parameter, Signature query string parameter or the Authorization header should be specified",
        )
    } else if parts.method != Method::GET && parts.method != Method::HEAD {
        s3_error(
            405,
            "MethodNotAllowed",
            "The specified method is not allowed against this resource.",
        )
    } else {
        let sig = parse_query(parts.uri.query())
            .into_iter()
            .find(|(k, _)| k == "X-Amz-Signature")
            .map(|(_, v)| v)
            .unwrap_or_default();
        if !inner.signatures.lock().unwrap().contains(&sig) {
            s3_error(
                403,
                "SignatureDoesNotMatch",
                "The request signature we calculated does not match the signature you provided.",
            )
        } else {
            match inner.upstream.send(&parts, &path, None, &[]).await {
                Err(e) => bad_gateway(&e),
                Ok(resp) => {
                    let strip = [HeaderName::from_static("docker-content-digest")];
                    let mut r = relay_response(
                        resp,
                        &inner.upstream.base,
                        "",
                        &strip,
                        BodyShape {
                            plan: BodyPlan::default(),
                            traffic: inner.traffic.clone(),
                            path,
                            stall: None,
                            conn: None,
                        },
                    );
                    r.headers_mut().insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/octet-stream"),
                    );
                    r
                }
            }
        }
    };
    inner.traffic.finish(id, resp.status().as_u16());
    resp
}

// =============================================================================================
// Front core (shared by the auth fronts)
// =============================================================================================

struct FrontCore {
    upstream: Upstream,
    self_url: OnceLock<String>,
    traffic: Arc<Traffic>,
    challenges: AtomicUsize,
    accepted: AtomicUsize,
    redirect_blobs: AtomicBool,
    store: ObjectStore,
}

impl FrontCore {
    fn new(upstream: &str) -> Arc<FrontCore> {
        let upstream = Upstream::new(upstream);
        Arc::new(FrontCore {
            store: ObjectStore::start(upstream.clone()),
            upstream,
            self_url: OnceLock::new(),
            traffic: Arc::new(Traffic::default()),
            challenges: AtomicUsize::new(0),
            accepted: AtomicUsize::new(0),
            redirect_blobs: AtomicBool::new(false),
        })
    }

    /// Runs `auth` (None: allowed; Some(resp): the challenge) and proxies allowed requests
    /// upstream without their `Authorization` header (or redirects blob GETs to the object
    /// store when enabled).
    async fn serve(
        self: Arc<Self>,
        req: Request<Incoming>,
        auth: impl FnOnce(&http::request::Parts) -> Option<Response<DoubleBody>>,
    ) -> Response<DoubleBody> {
        let (parts, body) = req.into_parts();
        let id = self.traffic.begin(&parts);
        let path = parts.uri.path().to_string();
        if let Some(challenge) = auth(&parts) {
            self.challenges.fetch_add(1, Ordering::SeqCst);
            self.traffic.finish(id, challenge.status().as_u16());
            return challenge;
        }
        self.accepted.fetch_add(1, Ordering::SeqCst);
        if self.redirect_blobs.load(Ordering::SeqCst) && parts.method == Method::GET {
            if let Some((_, "blobs", rest)) = repo_route(&path) {
                if rest.starts_with("sha256:") || rest.starts_with("sha512:") {
                    let location = self.store.presign(&path);
                    self.traffic.finish(id, 307);
                    return response(307, &[("location", location)], Bytes::new());
                }
            }
        }
        let pq = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into());
        match self
            .upstream
            .send(&parts, &pq, Some(body), &[header::AUTHORIZATION])
            .await
        {
            Err(e) => {
                self.traffic.finish(id, 502);
                bad_gateway(&e)
            }
            Ok(resp) => {
                self.traffic.finish(id, resp.status().as_u16());
                relay_response(
                    resp,
                    &self.upstream.base,
                    self.self_url.get().map(String::as_str).unwrap_or(""),
                    &[],
                    BodyShape {
                        plan: BodyPlan::default(),
                        traffic: self.traffic.clone(),
                        path,
                        stall: None,
                        conn: None,
                    },
                )
            }
        }
    }
}

// =============================================================================================
// TokenAuthFront (Docker Hub)
// =============================================================================================

/// Configuration of a [`TokenAuthFront`].
#[derive(Clone, Debug)]
pub struct TokenAuthConfig {
    /// `service` in the challenge and the one the token server accepts
    /// (default `registry.docker.io`).
    pub service: String,
    /// Basic credentials the token server accepts (`None`: no user exists).
    pub credentials: Option<(String, String)>,
    /// Whether a token request without credentials gets a (pull-only) token (default true).
    pub allow_anonymous: bool,
    /// `expires_in` of issued tokens, in seconds (default 300); tokens are rejected after it.
    pub expires_in: u64,
}

impl Default for TokenAuthConfig {
    fn default() -> Self {
        TokenAuthConfig {
            service: "registry.docker.io".into(),
            credentials: None,
            allow_anonymous: true,
            expires_in: 300,
        }
    }
}

struct Grant {
    /// `(type, name, actions)`, e.g. `("repository", "library/x", ["pull"])`.
    access: Vec<(String, String, Vec<String>)>,
    expires: Instant,
}

struct TokenInner {
    config: Mutex<TokenAuthConfig>,
    realm: OnceLock<String>,
    tokens: Mutex<HashMap<String, Grant>>,
    token_requests: AtomicUsize,
    token_rejections: AtomicUsize,
    per_scope: Mutex<HashMap<String, usize>>,
    core: Arc<FrontCore>,
}

impl TokenInner {
    fn challenge(&self, scope: Option<&str>, error: Option<&str>) -> Response<DoubleBody> {
        let service = self.config.lock().unwrap().service.clone();
        let mut v = format!(
            "Bearer realm=\"{}\",service=\"{service}\"",
            self.realm.get().unwrap()
        );
        if let Some(s) = scope {
            v.push_str(&format!(",scope=\"{s}\""));
        }
        if let Some(e) = error {
            v.push_str(&format!(",error=\"{e}\""));
        }
        let mut r = oci_error(401, "UNAUTHORIZED", "authentication required");
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::try_from(v).unwrap());
        r
    }

    /// None when the request may pass, else the 401 challenge.
    fn check(&self, parts: &http::request::Parts) -> Option<Response<DoubleBody>> {
        let path = parts.uri.path();
        let need: Option<(String, &str, String)> = repo_route(path).map(|(name, _, _)| {
            if parts.method == Method::GET || parts.method == Method::HEAD {
                (format!("repository:{name}:pull"), "pull", name)
            } else {
                (format!("repository:{name}:pull,push"), "push", name)
            }
        });
        let scope = need.as_ref().map(|(s, _, _)| s.as_str());
        let Some(token) = bearer_token(&parts.headers) else {
            return Some(self.challenge(scope, None));
        };
        let tokens = self.tokens.lock().unwrap();
        let Some(grant) = tokens.get(&token).filter(|g| g.expires > Instant::now()) else {
            return Some(self.challenge(scope, Some("invalid_token")));
        };
        let Some((_, action, name)) = &need else {
            return None; // /v2/, _catalog: any valid token
        };
        let covered = grant.access.iter().any(|(t, n, actions)| {
            t == "repository" && n == name && actions.iter().any(|a| a == action || a == "*")
        });
        if covered {
            None
        } else {
            Some(self.challenge(scope, Some("insufficient_scope")))
        }
    }

    fn token_endpoint(&self, parts: &http::request::Parts) -> Response<DoubleBody> {
        self.token_requests.fetch_add(1, Ordering::SeqCst);
        let reject = |status: u16, msg: &str| {
            self.token_rejections.fetch_add(1, Ordering::SeqCst);
            json_response(status, serde_json::json!({"details": msg}))
        };
        if parts.method != Method::GET || parts.uri.path() != "/token" {
            return reject(404, "not found (the token double serves GET /token only)");
        }
        let query = parse_query(parts.uri.query());
        let scopes: Vec<String> = query
            .iter()
            .filter(|(k, _)| k == "scope")
            .flat_map(|(_, v)| v.split(' ').map(str::to_string).collect::<Vec<_>>())
            .filter(|s| !s.is_empty())
            .collect();
        {
            let mut per = self.per_scope.lock().unwrap();
            if scopes.is_empty() {
                *per.entry(String::new()).or_default() += 1;
            }
            for s in &scopes {
                *per.entry(s.clone()).or_default() += 1;
            }
        }
        let config = self.config.lock().unwrap().clone();
        let service = query
            .iter()
            .find(|(k, _)| k == "service")
            .map(|(_, v)| v.as_str());
        if service != Some(config.service.as_str()) {
            return reject(
                400,
                &format!("invalid service {service:?}, expected {:?}", config.service),
            );
        }
        let authenticated = match basic_credentials(&parts.headers) {
            Some((u, p)) => match &config.credentials {
                Some((cu, cp)) if *cu == u && *cp == p => true,
                _ => return reject(401, "incorrect username or password"),
            },
            None if config.allow_anonymous => false,
            None => return reject(401, "authentication required"),
        };
        let mut access = Vec::new();
        for s in &scopes {
            let Some((type_name, actions)) = s.rsplit_once(':') else {
                return reject(400, &format!("invalid scope {s:?}"));
            };
            let Some((t, n)) = type_name.split_once(':') else {
                return reject(400, &format!("invalid scope {s:?}"));
            };
            let granted: Vec<String> = actions
                .split(',')
                .filter(|a| authenticated || *a == "pull")
                .map(str::to_string)
                .collect();
            access.push((t.to_string(), n.to_string(), granted));
        }
        let token = random_hex(24);
        self.tokens.lock().unwrap().insert(
            token.clone(),
            Grant {
                access,
                expires: Instant::now() + Duration::from_secs(config.expires_in),
            },
        );
        json_response(
            200,
            serde_json::json!({
                "token": token,
                "access_token": token,
                "expires_in": config.expires_in,
                "issued_at": rfc3339(SystemTime::now()),
            }),
        )
    }
}

/// A Docker Hub style registry front (bearer tokens) plus its token server.
///
/// Requests without a valid token get 401 with
/// `WWW-Authenticate: Bearer realm="http://127.0.0.1:TOKENPORT/token",service="registry.docker.io",scope="repository:NAME:pull"`
/// (no `scope` for `/v2/`; `pull,push` for writes; `,error="invalid_token"` /
/// `,error="insufficient_scope"` when a token was sent but is unknown, expired or does not
/// cover the repository). `GET /token?service=…&scope=…` checks Basic credentials (if sent
/// they must match; if absent, `allow_anonymous` decides), grants the requested actions
/// (anonymous: `pull` only) and answers `{"token","access_token","expires_in","issued_at"}`.
/// Allowed requests are proxied upstream without `Authorization`.
pub struct TokenAuthFront {
    front: LoopbackServer,
    token_server: LoopbackServer,
    inner: Arc<TokenInner>,
}

impl TokenAuthFront {
    /// Anonymous pulls allowed, no user, tokens valid 300 s.
    pub fn start(upstream: &str) -> TokenAuthFront {
        TokenAuthFront::start_with(upstream, TokenAuthConfig::default())
    }

    /// With an explicit configuration.
    pub fn start_with(upstream: &str, config: TokenAuthConfig) -> TokenAuthFront {
        let inner = Arc::new(TokenInner {
            config: Mutex::new(config),
            realm: OnceLock::new(),
            tokens: Mutex::new(HashMap::new()),
            token_requests: AtomicUsize::new(0),
            token_rejections: AtomicUsize::new(0),
            per_scope: Mutex::new(HashMap::new()),
            core: FrontCore::new(upstream),
        });
        let t = inner.clone();
        let token_server = LoopbackServer::start(move |req: Request<Incoming>| {
            let t = t.clone();
            async move {
                let (parts, _) = req.into_parts();
                t.token_endpoint(&parts)
            }
        });
        let _ = inner.realm.set(format!("{}/token", token_server.url()));
        let f = inner.clone();
        let front = LoopbackServer::start(move |req| {
            let f = f.clone();
            async move {
                let core = f.core.clone();
                core.serve(req, |parts| f.check(parts)).await
            }
        });
        let _ = inner.core.self_url.set(front.url());
        TokenAuthFront {
            front,
            token_server,
            inner,
        }
    }

    /// Registry URL `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        self.front.url()
    }

    /// `127.0.0.1:PORT` of the registry front.
    pub fn host(&self) -> String {
        self.front.addr().to_string()
    }

    /// Token server base URL `http://127.0.0.1:TOKENPORT`.
    pub fn token_server_url(&self) -> String {
        self.token_server.url()
    }

    /// The realm in challenges: `http://127.0.0.1:TOKENPORT/token`.
    pub fn realm(&self) -> String {
        self.inner.realm.get().unwrap().clone()
    }

    /// The `service` value.
    pub fn service(&self) -> String {
        self.inner.config.lock().unwrap().service.clone()
    }

    /// Token requests received (including rejected ones).
    pub fn token_requests(&self) -> usize {
        self.inner.token_requests.load(Ordering::SeqCst)
    }

    /// Token requests rejected (bad credentials, anonymous not allowed, bad service/scope).
    pub fn token_rejections(&self) -> usize {
        self.inner.token_rejections.load(Ordering::SeqCst)
    }

    /// Token requests that asked for exactly `scope` (e.g. `repository:library/x:pull`;
    /// `""`: requests without a scope).
    pub fn token_requests_for(&self, scope: &str) -> usize {
        self.inner
            .per_scope
            .lock()
            .unwrap()
            .get(scope)
            .copied()
            .unwrap_or(0)
    }

    /// Every scope requested so far with its count.
    pub fn token_scopes(&self) -> BTreeMap<String, usize> {
        self.inner
            .per_scope
            .lock()
            .unwrap()
            .clone()
            .into_iter()
            .collect()
    }

    /// 401 challenges the registry front sent.
    pub fn challenges(&self) -> usize {
        self.inner.core.challenges.load(Ordering::SeqCst)
    }

    /// Requests the front let through.
    pub fn accepted(&self) -> usize {
        self.inner.core.accepted.load(Ordering::SeqCst)
    }

    /// Registry front traffic (every request, challenged or not).
    pub fn traffic(&self) -> &Traffic {
        &self.inner.core.traffic
    }

    /// Front requests with `method` (`"*"`: any) whose path contains `path_contains`.
    pub fn requests_matching(&self, method: &str, path_contains: &str) -> usize {
        self.inner
            .core
            .traffic
            .requests_matching(method, path_contains)
    }

    /// Changes `expires_in` for tokens issued from now on.
    pub fn set_expires_in(&self, secs: u64) {
        self.inner.config.lock().unwrap().expires_in = secs;
    }

    /// Changes the accepted credentials (`None`: no user).
    pub fn set_credentials(&self, credentials: Option<(&str, &str)>) {
        self.inner.config.lock().unwrap().credentials =
            credentials.map(|(u, p)| (u.to_string(), p.to_string()));
    }

    /// Allows or refuses anonymous token requests.
    pub fn set_allow_anonymous(&self, allow: bool) {
        self.inner.config.lock().unwrap().allow_anonymous = allow;
    }

    /// Invalidates every token issued so far (the front answers `invalid_token`).
    pub fn revoke_tokens(&self) {
        self.inner.tokens.lock().unwrap().clear();
    }

    /// Sends blob GETs (after auth) as 307 to a pre-signed [`ObjectStore`] URL.
    pub fn redirect_blobs(&self, on: bool) {
        self.inner.core.redirect_blobs.store(on, Ordering::SeqCst);
    }

    /// The redirect target of blob GETs.
    pub fn object_store(&self) -> &ObjectStore {
        &self.inner.core.store
    }
}

// =============================================================================================
// ECR
// =============================================================================================

/// Configuration of an [`EcrDouble`].
#[derive(Clone, Debug)]
pub struct EcrConfig {
    /// The IAM access key id the API accepts.
    pub access_key_id: String,
    /// Its secret.
    pub secret_access_key: String,
    /// The region the signature must be scoped to.
    pub region: String,
    /// Validity of minted passwords (default 12 h).
    pub token_validity: Duration,
}

impl Default for EcrConfig {
    fn default() -> Self {
        EcrConfig {
            access_key_id: "AKIAIOSFODNN7BERTHTS".into(),
            secret_access_key: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYBERTHTESTKEY".into(),
            region: "us-east-1".into(),
            token_validity: Duration::from_secs(12 * 3600),
        }
    }
}

/// The `X-Amz-Target` of `GetAuthorizationToken`.
pub const ECR_GET_AUTHORIZATION_TOKEN: &str =
    "AmazonEC2ContainerRegistry_V20150921.GetAuthorizationToken";

struct EcrInner {
    config: Mutex<EcrConfig>,
    passwords: Mutex<HashMap<String, SystemTime>>,
    api_calls: AtomicUsize,
    token_calls: AtomicUsize,
    signature_failures: AtomicUsize,
    registry_url: OnceLock<String>,
    core: Arc<FrontCore>,
}

fn aws_error(status: u16, kind: &str, message: &str) -> Response<DoubleBody> {
    response(
        status,
        &[
            ("content-type", "application/x-amz-json-1.1".to_string()),
            ("x-amzn-requestid", random_hex(16)),
        ],
        serde_json::to_vec(&serde_json::json!({"__type": kind, "message": message})).unwrap(),
    )
}

/// Verifies a SigV4 `Authorization` header against `config` by re-signing the same request
/// (same time, same signed headers) with aws-sigv4. Err: `(status, __type, message)`.
fn verify_sigv4(
    parts: &http::request::Parts,
    body: &[u8],
    config: &EcrConfig,
    service: &str,
) -> Result<(), (u16, &'static str, String)> {
    let auth = header_string(&parts.headers, header::AUTHORIZATION).ok_or((
        403,
        "MissingAuthenticationTokenException",
        "Missing Authentication Token".to_string(),
    ))?;
    let rest = auth.strip_prefix("AWS4-HMAC-SHA256 ").ok_or((
        400,
        "IncompleteSignatureException",
        format!("Unsupported authorization scheme in {auth:?}"),
    ))?;
    let mut fields = HashMap::new();
    for f in rest.split(',') {
        if let Some((k, v)) = f.trim().split_once('=') {
            fields.insert(k.trim().to_string(), v.trim().to_string());
        }
    }
    let incomplete = |what: &str| {
        (
            400,
            "IncompleteSignatureException",
            format!("Authorization header requires '{what}' parameter"),
        )
    };
    let credential = fields
        .get("Credential")
        .ok_or_else(|| incomplete("Credential"))?;
    let signed_headers = fields
        .get("SignedHeaders")
        .ok_or_else(|| incomplete("SignedHeaders"))?;
    let signature = fields
        .get("Signature")
        .ok_or_else(|| incomplete("Signature"))?;
    let cred: Vec<&str> = credential.split('/').collect();
    if cred.len() != 5 {
        return Err((
            400,
            "IncompleteSignatureException",
            format!("malformed Credential {credential:?}"),
        ));
    }
    let (akid, date, region, svc, term) = (cred[0], cred[1], cred[2], cred[3], cred[4]);
    if akid != config.access_key_id {
        return Err((
            403,
            "UnrecognizedClientException",
            "The security token included in the request is invalid.".into(),
        ));
    }
    if region != config.region || svc != service || term != "aws4_request" {
        return Err((
            403,
            "InvalidSignatureException",
            format!("Credential should be scoped to a valid region and service: got {region}/{svc}/{term}, expected {}/{service}/aws4_request", config.region),
        ));
    }
    let amz_date = header_string(&parts.headers, "x-amz-date").ok_or((
        400,
        "IncompleteSignatureException",
        "missing x-amz-date header".to_string(),
    ))?;
    let time = parse_amz_date(&amz_date).ok_or((
        400,
        "IncompleteSignatureException",
        format!("malformed x-amz-date {amz_date:?}"),
    ))?;
    if !amz_date.starts_with(date) {
        return Err((
            403,
            "InvalidSignatureException",
            format!("Credential date {date} does not match x-amz-date {amz_date}"),
        ));
    }
    let now = SystemTime::now();
    let skew = now
        .duration_since(time)
        .or_else(|_| time.duration_since(now))
        .unwrap_or_default();
    if skew > Duration::from_secs(15 * 60) {
        return Err((
            403,
            "InvalidSignatureException",
            format!("Signature expired: {amz_date} is more than 15 minutes from now"),
        ));
    }
    let names: Vec<&str> = signed_headers.split(';').collect();
    if !names.contains(&"host") || !names.contains(&"x-amz-date") {
        return Err((
            403,
            "InvalidSignatureException",
            "SignedHeaders must include host and x-amz-date".into(),
        ));
    }
    let mut headers: Vec<(String, String)> = Vec::new();
    for n in &names {
        if *n == "x-amz-date" {
            continue;
        }
        for v in parts.headers.get_all(*n) {
            headers.push((n.to_string(), v.to_str().unwrap_or("").to_string()));
        }
    }
    let host = header_string(&parts.headers, header::HOST).ok_or((
        400,
        "IncompleteSignatureException",
        "missing Host header".to_string(),
    ))?;
    let pq = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let url = format!("http://{host}{pq}");
    let refs: Vec<(&str, &str)> = headers
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    let expected = sigv4_signature(
        parts.method.as_str(),
        &url,
        &refs,
        body,
        akid,
        &config.secret_access_key,
        region,
        service,
        time,
        true,
    )
    .map_err(|e| (400, "IncompleteSignatureException", e))?;
    if expected.1 != *signature {
        return Err((
            403,
            "InvalidSignatureException",
            "The request signature we calculated does not match the signature you provided. Check your AWS Secret Access Key and signing method. Consult the service documentation for details.".into(),
        ));
    }
    Ok(())
}

/// SigV4-signs a request with aws-sigv4. Returns the headers to add (`x-amz-date`,
/// `authorization`) and the signature. `sign_all_headers`: sign exactly `headers` (+ host,
/// x-amz-date) instead of aws-sigv4's default exclusions.
#[allow(clippy::too_many_arguments)]
fn sigv4_signature(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    access_key_id: &str,
    secret: &str,
    region: &str,
    service: &str,
    time: SystemTime,
    sign_all_headers: bool,
) -> Result<(Vec<(String, String)>, String), String> {
    use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
    let identity =
        aws_credential_types::Credentials::new(access_key_id, secret, None, None, "test-doubles")
            .into();
    let mut settings = SigningSettings::default();
    if sign_all_headers {
        settings.excluded_headers = None;
    }
    let params = aws_sigv4::sign::v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name(service)
        .time(time)
        .settings(settings)
        .build()
        .map_err(|e| e.to_string())?
        .into();
    let signable = SignableRequest::new(
        method,
        url,
        headers.iter().copied(),
        SignableBody::Bytes(body),
    )
    .map_err(|e| e.to_string())?;
    let (instructions, signature) = sign(signable, &params)
        .map_err(|e| e.to_string())?
        .into_parts();
    let out = instructions
        .headers()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Ok((out, signature))
}

/// Signs a request as an AWS SDK would (aws-sigv4 defaults) and returns the headers to add
/// (`x-amz-date`, `authorization`). `headers` are the request's own headers to sign (e.g.
/// `content-type`, `x-amz-target`); `host` is taken from `url`.
#[allow(clippy::too_many_arguments)]
pub fn sigv4_sign(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    access_key_id: &str,
    secret: &str,
    region: &str,
    service: &str,
    time: SystemTime,
) -> Vec<(String, String)> {
    sigv4_signature(
        method,
        url,
        headers,
        body,
        access_key_id,
        secret,
        region,
        service,
        time,
        false,
    )
    .expect("sigv4 signing")
    .0
}

impl EcrInner {
    async fn api(self: Arc<Self>, req: Request<Incoming>) -> Response<DoubleBody> {
        self.api_calls.fetch_add(1, Ordering::SeqCst);
        let (parts, body) = req.into_parts();
        let body = match body.collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => return aws_error(400, "SerializationException", "cannot read body"),
        };
        if parts.method != Method::POST || parts.uri.path() != "/" {
            return aws_error(404, "UnknownOperationException", "POST / only");
        }
        let config = self.config.lock().unwrap().clone();
        if let Err((status, kind, message)) = verify_sigv4(&parts, &body, &config, "ecr") {
            self.signature_failures.fetch_add(1, Ordering::SeqCst);
            return aws_error(status, kind, &message);
        }
        let target = header_string(&parts.headers, "x-amz-target").unwrap_or_default();
        if target != ECR_GET_AUTHORIZATION_TOKEN {
            return aws_error(
                400,
                "UnknownOperationException",
                &format!("unknown operation {target:?}"),
            );
        }
        let ct = header_string(&parts.headers, header::CONTENT_TYPE).unwrap_or_default();
        if !ct.starts_with("application/x-amz-json-1.1") {
            return aws_error(
                400,
                "SerializationException",
                &format!("unexpected content-type {ct:?}"),
            );
        }
        if serde_json::from_slice::<serde_json::Value>(&body)
            .map(|v| !v.is_object())
            .unwrap_or(true)
        {
            return aws_error(400, "SerializationException", "body must be a JSON object");
        }
        self.token_calls.fetch_add(1, Ordering::SeqCst);
        let password = random_hex(48);
        let expires = SystemTime::now() + config.token_validity;
        self.passwords
            .lock()
            .unwrap()
            .insert(password.clone(), expires);
        let expires_at = (expires.duration_since(UNIX_EPOCH).unwrap().as_millis() as f64) / 1000.0;
        let body = serde_json::json!({
            "authorizationData": [{
                "authorizationToken": b64(format!("AWS:{password}").as_bytes()),
                "expiresAt": expires_at,
                "proxyEndpoint": self.registry_url.get().unwrap(),
            }]
        });
        response(
            200,
            &[
                ("content-type", "application/x-amz-json-1.1".to_string()),
                ("x-amzn-requestid", random_hex(16)),
            ],
            serde_json::to_vec(&body).unwrap(),
        )
    }

    fn check(&self, parts: &http::request::Parts) -> Option<Response<DoubleBody>> {
        let ok = basic_credentials(&parts.headers)
            .filter(|(u, _)| u == "AWS")
            .and_then(|(_, p)| self.passwords.lock().unwrap().get(&p).copied())
            .is_some_and(|exp| exp > SystemTime::now());
        if ok {
            return None;
        }
        Some(response(
            401,
            &[
                (
                    "www-authenticate",
                    format!(
                        "Basic realm=\"{}/\",service=\"ecr.amazonaws.com\"",
                        self.registry_url.get().unwrap()
                    ),
                ),
                ("content-type", "text/plain; charset=utf-8".to_string()),
            ],
            "Not Authorized\n",
        ))
    }
}

/// An ECR double: a SigV4-verifying API endpoint and a registry front.
///
/// API: `POST /` with `X-Amz-Target: AmazonEC2ContainerRegistry_V20150921.GetAuthorizationToken`,
/// `Content-Type: application/x-amz-json-1.1`, body `{}`, signed for service `ecr` in the
/// configured region. The signature is checked by recomputing it with aws-sigv4 over the same
/// method, URL, signed headers, body and `x-amz-date` (±15 min skew allowed). Failures: 403
/// `UnrecognizedClientException` (unknown key id), 403 `InvalidSignatureException` (wrong
/// secret, region, service, expired), 403 `MissingAuthenticationTokenException`. Success:
/// `{"authorizationData":[{"authorizationToken": base64("AWS:"+password), "expiresAt": <epoch
/// secs, float>, "proxyEndpoint": "http://127.0.0.1:REGPORT"}]}`; each call mints a new
/// password, older ones stay valid until their own expiry.
///
/// Registry: proxies upstream only with `Authorization: Basic base64(AWS:password)` for a
/// currently valid password, else 401
/// `WWW-Authenticate: Basic realm="http://127.0.0.1:REGPORT/",service="ecr.amazonaws.com"`.
pub struct EcrDouble {
    api: LoopbackServer,
    registry: LoopbackServer,
    inner: Arc<EcrInner>,
}

impl EcrDouble {
    /// With [`EcrConfig::default`].
    pub fn start(upstream: &str) -> EcrDouble {
        EcrDouble::start_with(upstream, EcrConfig::default())
    }

    /// With an explicit configuration.
    pub fn start_with(upstream: &str, config: EcrConfig) -> EcrDouble {
        let inner = Arc::new(EcrInner {
            config: Mutex::new(config),
            passwords: Mutex::new(HashMap::new()),
            api_calls: AtomicUsize::new(0),
            token_calls: AtomicUsize::new(0),
            signature_failures: AtomicUsize::new(0),
            registry_url: OnceLock::new(),
            core: FrontCore::new(upstream),
        });
        let a = inner.clone();
        let api = LoopbackServer::start(move |req| a.clone().api(req));
        let r = inner.clone();
        let registry = LoopbackServer::start(move |req| {
            let r = r.clone();
            async move {
                let core = r.core.clone();
                core.serve(req, |parts| r.check(parts)).await
            }
        });
        let _ = inner.registry_url.set(registry.url());
        let _ = inner.core.self_url.set(registry.url());
        EcrDouble {
            api,
            registry,
            inner,
        }
    }

    /// API endpoint URL `http://127.0.0.1:APIPORT` (POST `/`).
    pub fn api_url(&self) -> String {
        self.api.url()
    }

    /// Registry URL `http://127.0.0.1:REGPORT` (also the `proxyEndpoint`).
    pub fn registry_url(&self) -> String {
        self.registry.url()
    }

    /// `127.0.0.1:REGPORT`.
    pub fn registry_host(&self) -> String {
        self.registry.addr().to_string()
    }

    /// The current configuration (key id, secret, region, validity).
    pub fn config(&self) -> EcrConfig {
        self.inner.config.lock().unwrap().clone()
    }

    /// Successful `GetAuthorizationToken` calls.
    pub fn token_calls(&self) -> usize {
        self.inner.token_calls.load(Ordering::SeqCst)
    }

    /// All calls to the API endpoint.
    pub fn api_calls(&self) -> usize {
        self.inner.api_calls.load(Ordering::SeqCst)
    }

    /// API calls rejected for their signature/credentials.
    pub fn signature_failures(&self) -> usize {
        self.inner.signature_failures.load(Ordering::SeqCst)
    }

    /// Registry requests answered 401.
    pub fn registry_auth_failures(&self) -> usize {
        self.inner.core.challenges.load(Ordering::SeqCst)
    }

    /// Registry requests let through.
    pub fn registry_accepted(&self) -> usize {
        self.inner.core.accepted.load(Ordering::SeqCst)
    }

    /// Registry traffic.
    pub fn traffic(&self) -> &Traffic {
        &self.inner.core.traffic
    }

    /// Registry requests with `method` (`"*"`: any) whose path contains `path_contains`.
    pub fn requests_matching(&self, method: &str, path_contains: &str) -> usize {
        self.inner
            .core
            .traffic
            .requests_matching(method, path_contains)
    }

    /// Validity of passwords minted from now on.
    pub fn set_token_validity(&self, d: Duration) {
        self.inner.config.lock().unwrap().token_validity = d;
    }

    /// Expires every password minted so far (the registry answers 401 until a new call).
    pub fn expire_passwords(&self) {
        self.inner.passwords.lock().unwrap().clear();
    }

    /// Passwords currently valid.
    pub fn valid_passwords(&self) -> usize {
        let now = SystemTime::now();
        self.inner
            .passwords
            .lock()
            .unwrap()
            .values()
            .filter(|e| **e > now)
            .count()
    }

    /// Sends blob GETs (after auth) as 307 to a pre-signed [`ObjectStore`] URL, as ECR does.
    pub fn redirect_blobs(&self, on: bool) {
        self.inner.core.redirect_blobs.store(on, Ordering::SeqCst);
    }

    /// The redirect target of blob GETs.
    pub fn object_store(&self) -> &ObjectStore {
        &self.inner.core.store
    }

    /// Test convenience: a SigV4-signed `GetAuthorizationToken` call with the given
    /// credentials (region from the config), as the AWS SDK sends it.
    pub async fn get_authorization_token(
        &self,
        access_key_id: &str,
        secret: &str,
    ) -> reqwest::Response {
        let region = self.config().region;
        let url = format!("{}/", self.api_url());
        let host = self.api.addr().to_string();
        let headers = [
            ("content-type", "application/x-amz-json-1.1"),
            ("x-amz-target", ECR_GET_AUTHORIZATION_TOKEN),
            ("host", host.as_str()),
        ];
        let signed = sigv4_sign(
            "POST",
            &url,
            &headers,
            b"{}",
            access_key_id,
            secret,
            &region,
            "ecr",
            SystemTime::now(),
        );
        let mut rb = reqwest::Client::builder()
            .no_proxy()
            .build()
            .unwrap()
            .post(&url)
            .body("{}");
        for (k, v) in headers.iter().filter(|(k, _)| *k != "host") {
            rb = rb.header(*k, *v);
        }
        for (k, v) in signed {
            rb = rb.header(k, v);
        }
        rb.send().await.expect("ECR API request")
    }
}

// =============================================================================================
// BasicAuthFront
// =============================================================================================

struct BasicInner {
    credentials: Mutex<(String, String)>,
    realm: String,
    core: Arc<FrontCore>,
}

/// A registry front with fixed Basic credentials (ACR admin user, GCR `_json_key`, Harbor,
/// Quay `account_name`/`docker_cli_password`). Wrong or missing credentials: 401 with
/// `WWW-Authenticate: Basic realm="berth-basic-front"` and an OCI `UNAUTHORIZED` body.
/// Allowed requests are proxied upstream without `Authorization`.
pub struct BasicAuthFront {
    server: LoopbackServer,
    inner: Arc<BasicInner>,
}

impl BasicAuthFront {
    /// Accepts exactly `user` / `password`.
    pub fn start(upstream: &str, user: &str, password: &str) -> BasicAuthFront {
        let inner = Arc::new(BasicInner {
            credentials: Mutex::new((user.to_string(), password.to_string())),
            realm: "berth-basic-front".into(),
            core: FrontCore::new(upstream),
        });
        let i = inner.clone();
        let server = LoopbackServer::start(move |req| {
            let i = i.clone();
            async move {
                let core = i.core.clone();
                core.serve(req, |parts| i.check(parts)).await
            }
        });
        let _ = inner.core.self_url.set(server.url());
        BasicAuthFront { server, inner }
    }

    /// Quay: user `account_name`, password `docker_cli_password`.
    pub fn quay(upstream: &str, account_name: &str, docker_cli_password: &str) -> BasicAuthFront {
        BasicAuthFront::start(upstream, account_name, docker_cli_password)
    }

    /// GCR / Artifact Registry: user `_json_key`, password = the service-account key JSON.
    pub fn json_key(upstream: &str, key_json: &str) -> BasicAuthFront {
        BasicAuthFront::start(upstream, "_json_key", key_json)
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        self.server.addr().to_string()
    }

    /// Replaces the accepted credentials (credential rotation).
    pub fn set_credentials(&self, user: &str, password: &str) {
        *self.inner.credentials.lock().unwrap() = (user.to_string(), password.to_string());
    }

    /// Requests let through.
    pub fn accepted(&self) -> usize {
        self.inner.core.accepted.load(Ordering::SeqCst)
    }

    /// Requests answered 401.
    pub fn rejected(&self) -> usize {
        self.inner.core.challenges.load(Ordering::SeqCst)
    }

    /// Front traffic.
    pub fn traffic(&self) -> &Traffic {
        &self.inner.core.traffic
    }

    /// Requests with `method` (`"*"`: any) whose path contains `path_contains`.
    pub fn requests_matching(&self, method: &str, path_contains: &str) -> usize {
        self.inner
            .core
            .traffic
            .requests_matching(method, path_contains)
    }

    /// Sends blob GETs (after auth) as 307 to a pre-signed [`ObjectStore`] URL.
    pub fn redirect_blobs(&self, on: bool) {
        self.inner.core.redirect_blobs.store(on, Ordering::SeqCst);
    }

    /// The redirect target of blob GETs.
    pub fn object_store(&self) -> &ObjectStore {
        &self.inner.core.store
    }
}

impl BasicInner {
    fn check(&self, parts: &http::request::Parts) -> Option<Response<DoubleBody>> {
        let expected = self.credentials.lock().unwrap().clone();
        if basic_credentials(&parts.headers).as_ref() == Some(&expected) {
            return None;
        }
        let mut r = oci_error(401, "UNAUTHORIZED", "authentication required");
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::try_from(format!("Basic realm=\"{}\"", self.realm)).unwrap(),
        );
        Some(r)
    }
}

// =============================================================================================
// StaticRegistry
// =============================================================================================

#[derive(Default)]
struct RepoData {
    blobs: HashMap<String, Bytes>,
    /// digest → (media type, bytes)
    manifests: HashMap<String, (String, Bytes)>,
    tags: BTreeMap<String, String>,
}

struct StaticInner {
    repos: Mutex<HashMap<String, RepoData>>,
    traffic: Arc<Traffic>,
}

/// An image [`StaticRegistry::put_image`] stored.
#[derive(Clone, Debug)]
pub struct StaticImage {
    /// Repository name.
    pub repo: String,
    /// Tag.
    pub tag: String,
    /// Manifest bytes as served.
    pub manifest: Bytes,
    /// Its digest.
    pub manifest_digest: String,
    /// Config blob digest.
    pub config_digest: String,
    /// Layer digests, in manifest order.
    pub layer_digests: Vec<String>,
}

/// Media type of OCI image manifests.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// A tiny read-only registry whose content the test sets directly: `GET /v2/`, blobs
/// (GET/HEAD, single `Range` → 206 with `Content-Range`, unsatisfiable → 416), manifests by
/// tag or digest (GET/HEAD, `Docker-Content-Digest`, stored media type), tags list. Writes
/// get 405. The cheapest upstream for cache tests; put a [`FaultRelay`] in front for faults.
pub struct StaticRegistry {
    server: LoopbackServer,
    inner: Arc<StaticInner>,
}

impl StaticRegistry {
    /// An empty registry.
    pub fn start() -> StaticRegistry {
        let inner = Arc::new(StaticInner {
            repos: Mutex::new(HashMap::new()),
            traffic: Arc::new(Traffic::default()),
        });
        let i = inner.clone();
        let server = LoopbackServer::start(move |req| {
            let i = i.clone();
            async move { static_handle(i, req) }
        });
        StaticRegistry { server, inner }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        self.server.addr().to_string()
    }

    /// Stores a blob in `repo`; returns its `sha256:` digest.
    pub fn put_blob(&self, repo: &str, data: impl Into<Bytes>) -> String {
        let data = data.into();
        let digest = sha256_digest(&data);
        self.inner
            .repos
            .lock()
            .unwrap()
            .entry(repo.to_string())
            .or_default()
            .blobs
            .insert(digest.clone(), data);
        digest
    }

    /// Stores a manifest (byte for byte) with its media type, tagged `tag` if given; returns
    /// its digest. Re-tagging moves the tag.
    pub fn put_manifest(
        &self,
        repo: &str,
        tag: Option<&str>,
        media_type: &str,
        bytes: impl Into<Bytes>,
    ) -> String {
        let bytes = bytes.into();
        let digest = sha256_digest(&bytes);
        let mut repos = self.inner.repos.lock().unwrap();
        let r = repos.entry(repo.to_string()).or_default();
        r.manifests
            .insert(digest.clone(), (media_type.to_string(), bytes));
        if let Some(t) = tag {
            r.tags.insert(t.to_string(), digest.clone());
        }
        digest
    }

    /// Stores an OCI image (config + the given layers as uncompressed-tar layers; the bytes
    /// need not be real tars, so such an image cannot be run) tagged `tag`.
    pub fn put_image(&self, repo: &str, tag: &str, layers: &[&[u8]]) -> StaticImage {
        let layer_digests: Vec<String> = layers
            .iter()
            .map(|l| self.put_blob(repo, l.to_vec()))
            .collect();
        let config = serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": layer_digests},
            "history": [{"created_by": format!("test double {repo}:{tag}")}],
        });
        let config_bytes = serde_json::to_vec(&config).unwrap();
        let config_size = config_bytes.len();
        let config_digest = self.put_blob(repo, config_bytes);
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size},
            "layers": layers.iter().zip(&layer_digests).map(|(l, d)| serde_json::json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": l.len()
            })).collect::<Vec<_>>(),
        });
        let manifest = Bytes::from(serde_json::to_vec_pretty(&manifest).unwrap());
        let manifest_digest = self.put_manifest(repo, Some(tag), OCI_MANIFEST, manifest.clone());
        StaticImage {
            repo: repo.into(),
            tag: tag.into(),
            manifest,
            manifest_digest,
            config_digest,
            layer_digests,
        }
    }

    /// Loads an OCI image layout directory (e.g. from `oci_layout::build_image`) into
    /// `repo`: every blob; every JSON blob with a manifest/index `mediaType` also as a
    /// manifest; tags from `index.json`'s `org.opencontainers.image.ref.name`. Returns
    /// `(tag, digest)` pairs.
    pub fn put_layout(&self, repo: &str, layout: &Path) -> Vec<(String, String)> {
        let dir = layout.join("blobs/sha256");
        for entry in
            std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        {
            let data = std::fs::read(entry.unwrap().path()).unwrap();
            let mt = serde_json::from_slice::<serde_json::Value>(&data)
                .ok()
                .and_then(|v| {
                    v.get("mediaType")
                        .and_then(|m| m.as_str())
                        .map(str::to_string)
                })
                .filter(|m| m.contains("manifest") || m.contains("index"));
            if let Some(mt) = mt {
                self.put_manifest(repo, None, &mt, data.clone());
            }
            self.put_blob(repo, data);
        }
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
        let mut out = Vec::new();
        for m in index["manifests"].as_array().cloned().unwrap_or_default() {
            let digest = m["digest"].as_str().unwrap_or_default().to_string();
            if let Some(tag) = m["annotations"]["org.opencontainers.image.ref.name"].as_str() {
                self.tag(repo, tag, &digest);
                out.push((tag.to_string(), digest));
            }
        }
        out
    }

    /// Points `tag` at an existing manifest `digest`.
    pub fn tag(&self, repo: &str, tag: &str, digest: &str) {
        self.inner
            .repos
            .lock()
            .unwrap()
            .entry(repo.to_string())
            .or_default()
            .tags
            .insert(tag.to_string(), digest.to_string());
    }

    /// Removes a tag; true if it existed.
    pub fn delete_tag(&self, repo: &str, tag: &str) -> bool {
        self.inner
            .repos
            .lock()
            .unwrap()
            .get_mut(repo)
            .is_some_and(|r| r.tags.remove(tag).is_some())
    }

    /// Removes a manifest and the tags pointing at it; true if it existed.
    pub fn delete_manifest(&self, repo: &str, digest: &str) -> bool {
        let mut repos = self.inner.repos.lock().unwrap();
        let Some(r) = repos.get_mut(repo) else {
            return false;
        };
        r.tags.retain(|_, d| d != digest);
        r.manifests.remove(digest).is_some()
    }

    /// Removes a blob; true if it existed.
    pub fn delete_blob(&self, repo: &str, digest: &str) -> bool {
        self.inner
            .repos
            .lock()
            .unwrap()
            .get_mut(repo)
            .is_some_and(|r| r.blobs.remove(digest).is_some())
    }

    /// Traffic log.
    pub fn traffic(&self) -> &Traffic {
        &self.inner.traffic
    }

    /// Requests with `method` (`"*"`: any) whose path contains `path_contains`.
    pub fn requests_matching(&self, method: &str, path_contains: &str) -> usize {
        self.inner.traffic.requests_matching(method, path_contains)
    }
}

/// Parses a single-range `bytes=` header against `len`: Ok(None) = no/ignored range,
/// Ok(Some((start, end_inclusive))), Err(()) = unsatisfiable.
fn parse_range(range: &str, len: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(spec) = range.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((a, b)) = spec.split_once('-') else {
        return Ok(None);
    };
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() {
        let n: u64 = b.parse().map_err(|_| ())?;
        if n == 0 || len == 0 {
            return Err(());
        }
        return Ok(Some((len.saturating_sub(n), len - 1)));
    }
    let start: u64 = a.parse().map_err(|_| ())?;
    if start >= len {
        return Err(());
    }
    let end = if b.is_empty() {
        len - 1
    } else {
        let e: u64 = b.parse().map_err(|_| ())?;
        if e < start {
            return Err(());
        }
        e.min(len - 1)
    };
    Ok(Some((start, end)))
}

fn static_handle(inner: Arc<StaticInner>, req: Request<Incoming>) -> Response<DoubleBody> {
    let (parts, _) = req.into_parts();
    let id = inner.traffic.begin(&parts);
    let path = parts.uri.path().to_string();
    let resp = static_route(&inner, &parts, &path);
    inner.traffic.finish(id, resp.status().as_u16());
    if parts.method == Method::GET {
        if let Some(len) = resp.body().size_hint().exact() {
            inner.traffic.add_bytes(&path, len);
        }
    }
    resp
}

fn static_route(
    inner: &StaticInner,
    parts: &http::request::Parts,
    path: &str,
) -> Response<DoubleBody> {
    let api = (
        "docker-distribution-api-version",
        "registry/2.0".to_string(),
    );
    if parts.method != Method::GET && parts.method != Method::HEAD {
        return oci_error(405, "UNSUPPORTED", "StaticRegistry is read-only");
    }
    if path == "/v2/" || path == "/v2" {
        return response(
            200,
            &[api, ("content-type", "application/json".into())],
            "{}",
        );
    }
    let Some((name, kind, rest)) = repo_route(path) else {
        return oci_error(404, "NOT_FOUND", "unknown route");
    };
    let repos = inner.repos.lock().unwrap();
    let Some(repo) = repos.get(&name) else {
        return oci_error(404, "NAME_UNKNOWN", "repository name not known to registry");
    };
    match kind {
        "tags" if rest == "list" => {
            let tags: Vec<&String> = repo.tags.keys().collect();
            let mut r = json_response(200, serde_json::json!({"name": name, "tags": tags}));
            r.headers_mut().insert(
                "docker-distribution-api-version",
                HeaderValue::from_static("registry/2.0"),
            );
            r
        }
        "manifests" => {
            let digest = if rest.contains(':') {
                rest.clone()
            } else {
                match repo.tags.get(&rest) {
                    Some(d) => d.clone(),
                    None => return oci_error(404, "MANIFEST_UNKNOWN", "manifest unknown"),
                }
            };
            let Some((mt, bytes)) = repo.manifests.get(&digest) else {
                return oci_error(404, "MANIFEST_UNKNOWN", "manifest unknown");
            };
            response(
                200,
                &[
                    api,
                    ("content-type", mt.clone()),
                    ("docker-content-digest", digest.clone()),
                    ("etag", format!("\"{digest}\"")),
                    ("content-length", bytes.len().to_string()),
                ],
                if parts.method == Method::HEAD {
                    Bytes::new()
                } else {
                    bytes.clone()
                },
            )
        }
        "blobs" => {
            let Some(data) = repo.blobs.get(&rest) else {
                return oci_error(404, "BLOB_UNKNOWN", "blob unknown to registry");
            };
            let len = data.len() as u64;
            let mut headers = vec![
                api,
                ("content-type", "application/octet-stream".to_string()),
                ("docker-content-digest", rest.clone()),
                ("accept-ranges", "bytes".to_string()),
                ("etag", format!("\"{rest}\"")),
            ];
            let range = header_string(&parts.headers, header::RANGE);
            let (status, body) = match range.as_deref().map(|r| parse_range(r, len)) {
                Some(Err(())) => {
                    headers.push(("content-range", format!("bytes */{len}")));
                    return response(416, &headers, Bytes::new());
                }
                Some(Ok(Some((s, e)))) => {
                    headers.push(("content-range", format!("bytes {s}-{e}/{len}")));
                    (206, data.slice(s as usize..=e as usize))
                }
                _ => (200, data.clone()),
            };
            headers.push(("content-length", body.len().to_string()));
            let body = if parts.method == Method::HEAD {
                Bytes::new()
            } else {
                body
            };
            response(status, &headers, body)
        }
        _ => oci_error(404, "NOT_FOUND", "unknown route"),
    }
}

// =============================================================================================
// HtpasswdRegistry (Debian's docker-registry with basic auth)
// =============================================================================================

/// Debian's apache2-utils `htpasswd`.
pub const HTPASSWD: &str = "/usr/bin/htpasswd";

/// Debian's `docker-registry` (distribution 2.8) with htpasswd basic auth on plain HTTP on
/// loopback, filesystem storage in a temp dir, deletes enabled. distribution 2.8.2 accepts
/// htpasswd over plain HTTP; the file must hold bcrypt entries (`htpasswd -B`; `$apr1$` MD5
/// lines are refused as "authentication failure"). Unauthenticated requests get 401
/// `WWW-Authenticate: Basic realm="berth-test"`. Stopped by PID on drop.
pub struct HtpasswdRegistry {
    child: Option<Child>,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    /// The accepted user.
    pub user: String,
    /// Its password.
    pub password: String,
    dir: tempfile::TempDir,
}

impl HtpasswdRegistry {
    /// Writes a bcrypt htpasswd entry with `htpasswd -Bbn` (Debian package apache2-utils),
    /// starts the registry and waits (≤ 30 s) for `GET /v2/` to answer 401.
    pub fn start(user: &str, password: &str) -> HtpasswdRegistry {
        for (tool, pkg) in [
            (HTPASSWD, "apache2-utils"),
            ("/usr/bin/docker-registry", "docker-registry"),
        ] {
            if !Path::new(tool).exists() {
                panic!("required tool {tool} is missing: install Debian package `{pkg}` (apt-get update && apt-get install -y {pkg})");
            }
        }
        let dir = tempfile::Builder::new()
            .prefix("dreg-auth")
            .tempdir()
            .unwrap();
        let d = dir.path();
        let out = Command::new(HTPASSWD)
            .args(["-Bbn", user, password])
            .output()
            .expect("run htpasswd");
        assert!(
            out.status.success(),
            "htpasswd -Bbn failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::write(d.join("htpasswd"), &out.stdout).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let config = format!(
            "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {data}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n  secret: berth-test-secret\nauth:\n  htpasswd:\n    realm: berth-test\n    path: {htpasswd}\n",
            data = d.join("data").display(),
            htpasswd = d.join("htpasswd").display(),
        );
        std::fs::write(d.join("config.yml"), config).unwrap();
        let log = std::fs::File::create(d.join("registry.log")).unwrap();
        let child = Command::new("/usr/bin/docker-registry")
            .arg("serve")
            .arg(d.join("config.yml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start docker-registry");
        let mut reg = HtpasswdRegistry {
            child: Some(child),
            addr,
            user: user.into(),
            password: password.into(),
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = reg.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "docker-registry exited during startup ({status}); log:\n{}",
                    reg.log()
                );
            }
            if http_status_line(&reg.addr, "/v2/").is_some_and(|l| l.contains(" 401")) {
                break;
            }
            if Instant::now() > deadline {
                panic!("docker-registry not ready after 30 s; log:\n{}", reg.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        reg
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `user:password`, e.g. for `skopeo --creds` / `--dest-creds`.
    pub fn creds(&self) -> String {
        format!("{}:{}", self.user, self.password)
    }

    /// The value of an `Authorization: Basic …` header for the user.
    pub fn basic_auth_header(&self) -> String {
        format!("Basic {}", b64(self.creds().as_bytes()))
    }

    /// The htpasswd file.
    pub fn htpasswd_path(&self) -> PathBuf {
        self.dir.path().join("htpasswd")
    }

    /// The registry's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }
}

impl Drop for HtpasswdRegistry {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.wait();
        }
    }
}

/// The status line of `GET path` over HTTP/1.0, if the server answers.
fn http_status_line(addr: &str, path: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .ok()?;
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    resp.lines().next().map(str::to_string)
}
