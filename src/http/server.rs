//! Listeners (plain and rustls), connection serving, per-request logging and metrics, graceful shutdown.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{header, HeaderValue, Request, Response, StatusCode};

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::body::{with_deadlines, Body, BodyDeadlines};
use super::deadline::{ConnState, Deadlined, InFlight};
use super::finish::{Abort, Finish};
use super::router::{route, Route};
use crate::auth::Principal;
use crate::config::{Exposure, Listen};
use crate::error::Error;
use crate::http::req::{Req, RequestBody};
use crate::App;

/// A bound listener.
pub struct Bound {
    /// The socket.
    pub listener: TcpListener,
    /// Its local address (with the real port when 0 was asked).
    pub addr: SocketAddr,
    /// TLS acceptor when the listener has a certificate.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// That certificate, re-read on reload.
    pub cert: Option<Arc<super::tls::CertFiles>>,
    /// Public or private.
    pub exposure: Exposure,
    /// Private listeners: networks allowed to connect (empty: any).
    pub allow: Vec<ipnet::IpNet>,
    /// Plain listener: HTTP/1.1 requests without a body are driven by `h1` (blob bodies with
    /// `sendfile`).
    pub sendfile: bool,
}

/// What a request's connection tells about it.
#[derive(Debug, Clone, Copy)]
pub struct Conn {
    /// Client address.
    pub peer: SocketAddr,
    /// Exposure of the listener it came through.
    pub exposure: Exposure,
    /// Whether it is TLS (for the token realm URL).
    pub tls: bool,
}

/// Binds a listener and loads its certificate.
pub async fn bind(l: &Listen) -> Result<Bound, String> {
    let listener = TcpListener::bind(l.addr)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", l.addr))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let cert = match (&l.tls_cert, &l.tls_key) {
        (Some(cert), Some(key)) => Some(super::tls::CertFiles::load(cert, key)?),
        _ => None,
    };
    let tls = cert.as_ref().map(|c| c.acceptor()).transpose()?;
    Ok(Bound {
        listener,
        addr,
        tls,
        cert,
        exposure: l.exposure,
        allow: l.allow.clone(),
        sendfile: l.sendfile,
    })
}

/// Accepts connections until `stop` flips, then lets open connections finish within `grace`.
pub async fn serve(app: Arc<App>, bound: Bound, mut stop: watch::Receiver<bool>, grace: Duration) {
    let graceful = GracefulShutdown::new();
    let limits = &app.config.limits;
    let conn_limits = super::deadline::Limits {
        first_byte: limits.first_byte_timeout,
        idle: limits.idle_timeout,
        stall: limits.send_stall_timeout,
    };
    let body_deadlines = BodyDeadlines {
        idle: limits.body_idle_timeout,
        stall: limits.send_stall_timeout,
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // hyper's header timer starts when h1 waits for a request head, idle time included: the
    // deadline layer enforces the first-request and idle deadlines, this is only a backstop.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.idle_timeout.max(limits.first_byte_timeout))
        .max_buf_size(limits.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(limits.h2_keep_alive))
        .keep_alive_timeout(limits.h2_keep_alive)
        .max_header_list_size(limits.max_header_bytes as u32);
    let builder = Arc::new(builder);
    let max_head = limits.max_header_bytes.max(8192);
    // Connections driven by `h1` (hyper's graceful shutdown only knows its own).
    let driven = tokio_util::task::TaskTracker::new();
    let open = Arc::new(AtomicUsize::new(0));
    let mut refusals = Refusals::default();
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.changed() => break,
            accepted = bound.listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let ip = peer.ip().to_canonical();
        if !bound.allow.is_empty() && !bound.allow.iter().any(|net| net.contains(&ip)) {
            tracing::warn!(%peer, listener = %bound.addr, "connection refused: address not in the listener's allow list");
            crate::metrics::connection_refused();
            continue;
        }
        let Some(slot) = OpenConnection::take(&open, app.config.limits.max_connections) else {
            // Closed at once rather than left waiting in accept: the accept loop keeps draining
            // the kernel's queue (whose entries would time out unseen), the client learns at
            // once and retries or falls back (a Docker daemon goes to its next mirror), and the
            // refusal is counted. The deadlines free slots held by idle or silent clients.
            drop(stream);
            refusals.note(peer, bound.addr, app.config.limits.max_connections);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let state = ConnState::new(conn_limits);
        let stream = Deadlined::new(stream, state.clone());
        let app = app.clone();
        let conn = Conn {
            peer,
            exposure: bound.exposure,
            tls: bound.tls.is_some(),
        };
        let svc = {
            let (app, state) = (app.clone(), state.clone());
            service_fn(move |req| {
                let app = app.clone();
                let request = state.begin();
                async move {
                    let response = with_deadlines(body_deadlines, handle(app, req, conn)).await;
                    Ok::<_, Infallible>(Tracked::new(response, request))
                }
            })
        };
        match &bound.tls {
            None if bound.sendfile => {
                let (builder, watcher, stop) = (builder.clone(), graceful.watcher(), stop.clone());
                driven.spawn(async move {
                    let _slot = slot;
                    let handler = |req| with_deadlines(body_deadlines, handle(app.clone(), req, conn));
                    let io = match super::h1::drive(stream, &state, max_head, stop, handler).await {
                        Ok(super::h1::Ended::Closed) => return,
                        Ok(super::h1::Ended::Handover(io)) => io,
                        Err(e) => return tracing::debug!(%peer, error = %e, "connection ended with an error"),
                    };
                    let conn = builder.serve_connection(TokioIo::new(io), svc).into_owned();
                    if let Err(e) = watcher.watch(conn).await {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                });
            }
            None => {
                let conn = builder
                    .serve_connection(TokioIo::new(stream), svc)
                    .into_owned();
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    let _slot = slot;
                    if let Err(e) = conn.await {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                });
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                let builder = builder.clone();
                let watcher = graceful.watcher();
                tokio::spawn(async move {
                    let _slot = slot;
                    // The handshake reads through the deadline layer: a handshake that stalls
                    // fails at the first-byte deadline.
                    let tls = match acceptor.accept(stream).await {
                        Ok(tls) => tls,
                        Err(e) => return tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    };
                    let conn = builder
                        .serve_connection(TokioIo::new(tls), svc)
                        .into_owned();
                    if let Err(e) = watcher.watch(conn).await {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                });
            }
        }
    }
    drop(bound.listener);
    driven.close();
    // Driven connections close between requests once `stop` flips; those handed to hyper live
    // in driven tasks and need hyper's signal: both at once.
    let drained = async {
        tokio::join!(driven.wait(), graceful.shutdown());
    };
    if tokio::time::timeout(grace, drained).await.is_err() {
        tracing::warn!(grace = ?grace, "shutdown grace expired with connections still open");
    }
}

/// One open connection of a listener, counted against `limits.max_connections` and in the
/// `berth_open_connections` gauge until dropped.
struct OpenConnection(Arc<AtomicUsize>);

impl OpenConnection {
    fn take(open: &Arc<AtomicUsize>, max: usize) -> Option<OpenConnection> {
        open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .ok()?;
        crate::metrics::connection_opened();
        Some(OpenConnection(open.clone()))
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
        crate::metrics::connection_closed();
    }
}

/// Refusals at the connection cap: each counted, logged at most every 10 s (a flood must not
/// flood the log too).
#[derive(Default)]
struct Refusals {
    since_log: u64,
    logged: Option<Instant>,
}

impl Refusals {
    fn note(&mut self, peer: SocketAddr, listener: SocketAddr, max: usize) {
        crate::metrics::connection_over_limit();
        self.since_log += 1;
        if self
            .logged
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(10))
        {
            tracing::warn!(
                %peer,
                %listener,
                max_connections = max,
                refused = self.since_log,
                "connection closed at once: the listener has limits.max_connections open"
            );
            self.since_log = 0;
            self.logged = Some(Instant::now());
        }
    }
}

/// A response body that keeps its request counted as in flight (no idle deadline on the
/// connection) until hyper has sent it or dropped it.
struct Tracked {
    body: Body,
    _request: InFlight,
    /// Logged and counted when hyper drops the body (sent, or cut short).
    finish: Finish,
}

impl Tracked {
    fn new((response, finish): (Response<Body>, Finish), request: InFlight) -> Response<Tracked> {
        response.map(|body| Tracked {
            body,
            _request: request,
            finish,
        })
    }
}

impl http_body::Body for Tracked {
    type Data = bytes::Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, std::io::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                this.finish
                    .sent(frame.data_ref().map_or(0, |d| d.len() as u64));
            }
            Poll::Ready(Some(Err(_))) => this.finish.abort(Abort::BodyError),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Whether `probe` answers without an error within `within`; else why not.
async fn answers<T, E: std::fmt::Display>(
    probe: impl std::future::Future<Output = Result<T, E>>,
    within: std::time::Duration,
) -> Result<(), String> {
    match tokio::time::timeout(within, probe).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {} ms", within.as_millis())),
    }
}

/// How long `/readyz` waits for the metadata store to answer.
const READY_PROBE: std::time::Duration = std::time::Duration::from_secs(2);

/// `/readyz`: started, the metadata answers a read, the blob store takes a write, and the data
/// volume has at least `limits.min_free_bytes` free.
async fn readiness(app: &App) -> Response<Body> {
    if !app.ready.load(Ordering::Acquire) {
        return text(StatusCode::SERVICE_UNAVAILABLE, "starting\n");
    }
    // A wedged metadata store (its blocking pool full, its files gone) fails here, not at the
    // next push.
    if let Err(why) = answers(app.store.meta.registries(), READY_PROBE).await {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: the metadata store does not answer a read: {why}\n"),
        );
    }
    if let Err(e) = writable(app).await {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "not ready: the blob store of {} takes no writes: {e}\n",
                app.config.data_dir.display()
            ),
        );
    }
    let floor = app.config.limits.min_free_bytes;
    match free_bytes(app).await {
        Ok(free) if free >= floor => text(StatusCode::OK, "ready\n"),
        Ok(free) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "not ready: {free} bytes free on the volume of the data directory {}, below limits.min_free_bytes ({floor})\n",
                app.config.data_dir.display()
            ),
        ),
        Err(e) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "not ready: cannot read the free space of the data directory {}: {e}\n",
                app.config.data_dir.display()
            ),
        ),
    }
}

/// Whether the blob store takes a write: one byte written to a one-shot write, then dropped (a
/// read-only or failing volume is caught before a push is).
async fn writable(app: &App) -> std::io::Result<()> {
    use crate::store::blobs::Pending;
    let (mut probe, _) = app
        .store
        .blobs
        .open_pending(&Pending::Temp(uuid::Uuid::new_v4()))
        .await?;
    let written = probe.write(bytes::Bytes::from_static(b"r").into()).await;
    let removed = probe.abort().await;
    written.and(removed)
}

/// Free bytes (for unprivileged users) of the data directory's volume; also sets the
/// `berth_storage_free_bytes` gauge.
async fn free_bytes(app: &App) -> std::io::Result<u64> {
    let dir = app.config.data_dir.clone();
    let free = tokio::task::spawn_blocking(move || crate::store::fs::free_bytes(&dir))
        .await
        .map_err(std::io::Error::other)??;
    crate::metrics::storage_free_bytes(free);
    Ok(free)
}

static REQUEST_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Serves one request: route, dispatch, map errors, add common headers. The request is logged
/// and counted when the returned [`Finish`] is dropped, after its body ended.
pub async fn handle(
    app: Arc<App>,
    req: Request<impl RequestBody>,
    conn: Conn,
) -> (Response<Body>, Finish) {
    let peer = conn.peer;
    let started = Instant::now();
    let request_id = format!(
        "{:08x}-{:x}",
        app.boot_id,
        REQUEST_COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let (parts, body) = req.into_parts();
    let path = parts.uri.path();
    let routed = route(path);
    let label = routed.as_ref().map(Route::label).unwrap_or("unknown");
    // Kept outside the match so the log line borrows its name (no per-request copy).
    let mut principal: Option<Principal> = None;
    let result = match routed {
        Err(e) => Err(e),
        Ok(Route::Health) => Ok(text(StatusCode::OK, "ok\n")),
        Ok(Route::Ready) => Ok(readiness(&app).await),
        Ok(Route::Metrics) => {
            if let Err(e) = free_bytes(&app).await {
                tracing::warn!(error = %e, "cannot read the data volume's free space");
            }
            crate::metrics::upload_sessions(app.store.uploads.count("").0);
            match app.store.meta.usage().await {
                Ok(usage) => crate::metrics::registry_usage(&usage),
                Err(e) => tracing::warn!(error = %e, "cannot read the registries' usage"),
            }
            let mut r = text(StatusCode::OK, crate::metrics::render());
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            Ok(r)
        }
        // Nodes sign these with a key they share; no user is involved.
        Ok(Route::PeerFetch { digest }) if parts.method == http::Method::GET => {
            crate::cache::serve::peer_fetch(&app, &digest, parts.uri.query(), &parts.headers).await
        }
        Ok(Route::PeerFetch { .. }) => Err(Error::MethodNotAllowed(
            "the peer fetch endpoint takes GET only".into(),
        )),
        Ok(route) => match principal_of(&app, &parts.headers, peer.ip(), &route).await {
            Err(e) => Err(e),
            Ok(who) => {
                let req = Req {
                    method: &parts.method,
                    query: parts.uri.query(),
                    headers: &parts.headers,
                    principal: principal.insert(who),
                    public: conn.exposure == Exposure::Public,
                };
                match route {
                    Route::Token => crate::dispatch::token(&app, req, body, peer.ip()).await,
                    Route::Api => crate::api::dispatch(&app, path, req, body).await,
                    route => crate::dispatch::v2(&app, route, req, body).await,
                }
            }
        },
    };
    let (mut response, error) = match result {
        Ok(r) => (r, None),
        Err(e) => (error_response(&e), Some(e)),
    };
    if let Some(Error::Unauthorized {
        scope,
        insufficient,
        ..
    }) = &error
    {
        let host = parts
            .headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map_or_else(|| conn.peer.to_string(), str::to_string);
        let base = format!("{}://{host}", if conn.tls { "https" } else { "http" });
        let challenge = if label == "token" {
            format!("Basic realm=\"{}\"", app.auth.config.service)
        } else {
            app.auth.challenge(&base, scope.as_deref(), *insufficient)
        };
        if let Ok(v) = HeaderValue::from_str(&challenge) {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, v);
        }
    }
    let status = response.status();
    let h = response.headers_mut();
    h.insert(
        "docker-distribution-api-version",
        HeaderValue::from_static("registry/2.0"),
    );
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        h.insert("x-request-id", v);
    }
    let expected = if parts.method == http::Method::HEAD {
        0
    } else {
        response.body().len().unwrap_or(0)
    };
    let finish = Finish {
        request_id,
        peer,
        user: principal
            .as_ref()
            .map_or(String::new(), |p| p.name().to_string()),
        label,
        status,
        cache: response
            .extensions()
            .get::<crate::cache::Outcome>()
            .map_or("", |o| o.outcome),
        error: error.map(|e| (e.to_string(), e.is_server_fault())),
        started,
        expected,
        sent: 0,
        blob: label == "blob" && status.is_success(),
        aborted: None,
        path: path.to_string(),
        ns: crate::http::router::query_param(parts.uri.query(), "ns").unwrap_or_default(),
        user_agent: parts
            .headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string(),
        method: parts.method,
    };
    (response, finish)
}

/// Who sent the request. While auth is not enforced, credentials that do not check out (a CI
/// job that always logs in, a key from another server) are ignored instead of turning an open
/// registry into a refusing one; the token endpoint still says they are wrong.
async fn principal_of(
    app: &Arc<App>,
    headers: &http::HeaderMap,
    client: std::net::IpAddr,
    route: &Route,
) -> Result<Principal, Error> {
    match app.auth.authenticate(headers, client).await {
        Err(Error::Unauthorized { .. }) if !app.auth.enforced() && *route != Route::Token => {
            Ok(Principal::Anonymous)
        }
        other => other,
    }
}

fn text(status: StatusCode, body: impl Into<bytes::Bytes>) -> Response<Body> {
    let mut r = Response::new(Body::full(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

/// The OCI error response for an error.
pub fn error_response(e: &Error) -> Response<Body> {
    let body = e.body();
    let mut r = Response::new(Body::full(body));
    *r.status_mut() = e.status();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some((name, value)) = e.header() {
        if let Ok(v) = HeaderValue::from_str(&value) {
            r.headers_mut().insert(name, v);
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_probe_that_errs_or_hangs_is_not_an_answer() {
        let ok = answers(async { Ok::<_, String>(()) }, Duration::from_millis(50)).await;
        assert_eq!(ok, Ok(()));
        let failed = answers(
            async { Err::<(), _>("sled: I/O error") },
            Duration::from_millis(50),
        );
        assert_eq!(failed.await, Err("sled: I/O error".to_string()));
        let hung = answers(
            std::future::pending::<Result<(), String>>(),
            Duration::from_millis(50),
        );
        assert_eq!(hung.await, Err("no answer within 50 ms".to_string()));
    }
}
