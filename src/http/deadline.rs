//! Deadlines as a layer around each connection's socket (the linkerd2-proxy way): the stream
//! that hyper (h1 or h2) and rustls read and write fails its pending read or write once a
//! deadline passes, and the protocol stack above closes the connection. One layer covers plain
//! h1, h2c, TLS and the TLS handshake alike.
//!
//! - No request in flight and none served yet: the connection must deliver a request head
//!   within `first_byte` of its accept (a socket that sends nothing, a TLS handshake that stalls,
//!   an h2 preface followed by nothing).
//! - No request in flight after one was served: the connection may idle for `idle` (h1
//!   keep-alive, an h2 connection without streams, whatever pings it exchanges).
//! - A write that makes no progress for `stall` (a client that stopped reading while its
//!   socket buffer is full) fails.
//!
//! While a request is in flight a pending read is not an error by itself (hyper keeps a read
//! open to notice a client that goes away while the handler works); request bodies have their
//! own idle deadline where they are read (`body::next_frame`).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// The deadlines of one connection.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// From accept to the first request head.
    pub first_byte: Duration,
    /// With no request in flight, after the last one finished.
    pub idle: Duration,
    /// A write that makes no progress.
    pub stall: Duration,
}

/// What the connection's requests tell its socket layer.
pub struct ConnState {
    limits: Limits,
    accepted: Instant,
    inflight: AtomicUsize,
    served: AtomicBool,
    /// Milliseconds after `accepted` when the last request in flight finished.
    idle_since_ms: AtomicU64,
    /// The read waiting with no deadline while requests were in flight, woken when the last
    /// one ends so it arms the idle deadline.
    reader: Mutex<Option<Waker>>,
}

impl ConnState {
    /// State of a connection accepted now.
    pub fn new(limits: Limits) -> Arc<ConnState> {
        Arc::new(ConnState {
            limits,
            accepted: Instant::now(),
            inflight: AtomicUsize::new(0),
            served: AtomicBool::new(false),
            idle_since_ms: AtomicU64::new(0),
            reader: Mutex::new(None),
        })
    }

    /// Longest a write may make no progress (`limits.send_stall_timeout`).
    pub fn stall(&self) -> Duration {
        self.limits.stall
    }

    /// A request reached the service; the guard ends it (drop it with the response body).
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.served.store(true, Ordering::Release);
        self.inflight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    /// When a pending read must fail, if it must.
    fn read_deadline(&self) -> Option<Instant> {
        if self.inflight.load(Ordering::Acquire) > 0 {
            return None;
        }
        if !self.served.load(Ordering::Acquire) {
            return Some(self.accepted + self.limits.first_byte);
        }
        let since = Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire));
        Some(self.accepted + since + self.limits.idle)
    }

    fn park_reader(&self, waker: &Waker) {
        let mut slot = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        match slot.as_ref() {
            Some(w) if w.will_wake(waker) => {}
            _ => *slot = Some(waker.clone()),
        }
    }
}

/// One request in flight on a connection; dropping it (with the response body) ends it.
pub struct InFlight(Arc<ConnState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let state = &self.0;
        let ms = state.accepted.elapsed().as_millis() as u64;
        state.idle_since_ms.store(ms, Ordering::Release);
        if state.inflight.fetch_sub(1, Ordering::AcqRel) == 1 {
            let waker = state
                .reader
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            if let Some(w) = waker {
                w.wake();
            }
        }
    }
}

/// A socket whose reads and writes fail after the connection's deadlines.
pub struct Deadlined<S> {
    inner: S,
    state: Arc<ConnState>,
    read_timer: Pin<Box<Sleep>>,
    write_timer: Pin<Box<Sleep>>,
    /// Whether a write is waiting (its timer armed).
    write_waiting: bool,
}

impl<S> Deadlined<S> {
    /// Wraps a freshly accepted socket.
    pub fn new(inner: S, state: Arc<ConnState>) -> Deadlined<S> {
        let far = Instant::now() + Duration::from_secs(86400 * 365);
        Deadlined {
            inner,
            state,
            read_timer: Box::pin(tokio::time::sleep_until(far)),
            write_timer: Box::pin(tokio::time::sleep_until(far)),
            write_waiting: false,
        }
    }

    /// The socket itself (for `sendfile`, which the driver bounds with its own stall wait).
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// After a write-side poll: arm the stall timer on the first `Pending`, fail once it fires,
    /// disarm on progress.
    fn write_outcome<T>(
        &mut self,
        cx: &mut Context<'_>,
        r: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match r {
            Poll::Pending => {
                if !self.write_waiting {
                    self.write_waiting = true;
                    let at = Instant::now() + self.state.limits.stall;
                    self.write_timer.as_mut().reset(at);
                }
                match self.write_timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "client read nothing for {} s (limits.send_stall_timeout)",
                            self.state.limits.stall.as_secs()
                        ),
                    ))),
                    Poll::Pending => Poll::Pending,
                }
            }
            ready => {
                self.write_waiting = false;
                ready
            }
        }
    }
}

use std::future::Future as _;

impl<S: AsyncRead + Unpin> AsyncRead for Deadlined<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Pending => {}
            ready => return ready,
        }
        let Some(deadline) = this.state.read_deadline() else {
            // A request is in flight: wait without a deadline, but be woken when it ends.
            this.state.park_reader(cx.waker());
            // It may have ended between the check and the parking.
            if this.state.read_deadline().is_none() {
                return Poll::Pending;
            }
            cx.waker().wake_by_ref();
            return Poll::Pending;
        };
        this.state.park_reader(cx.waker());
        if this.read_timer.deadline() != deadline {
            this.read_timer.as_mut().reset(deadline);
        }
        match this.read_timer.as_mut().poll(cx) {
            Poll::Ready(()) => {
                let (what, limit) = if this.state.served.load(Ordering::Acquire) {
                    ("idle with no request", this.state.limits.idle)
                } else {
                    ("no request", this.state.limits.first_byte)
                };
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connection closed: {what} for {} s", limit.as_secs()),
                )))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Deadlined<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.write_outcome(cx, r)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.write_outcome(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_flush(cx);
        this.write_outcome(cx, r)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.write_outcome(cx, r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const LIMITS: Limits = Limits {
        first_byte: Duration::from_millis(100),
        idle: Duration::from_millis(150),
        stall: Duration::from_millis(100),
    };

    #[tokio::test]
    async fn a_silent_connection_fails_at_the_first_byte_deadline() {
        let (server, _client) = tokio::io::duplex(64);
        let mut io = Deadlined::new(server, ConnState::new(LIMITS));
        let mut buf = [0u8; 8];
        let started = Instant::now();
        let e = io.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(e.to_string().contains("no request"), "{e}");
        assert!(started.elapsed() >= LIMITS.first_byte);
    }

    #[tokio::test]
    async fn no_read_deadline_while_a_request_is_in_flight_then_the_idle_one() {
        let (server, mut client) = tokio::io::duplex(64);
        let state = ConnState::new(LIMITS);
        let mut io = Deadlined::new(server, state.clone());
        client.write_all(b"GET").await.unwrap();
        let mut buf = [0u8; 3];
        io.read_exact(&mut buf).await.unwrap();
        let request = state.begin();
        let read = tokio::spawn(async move {
            let mut buf = [0u8; 8];
            let e = io.read(&mut buf).await.unwrap_err();
            (e, Instant::now())
        });
        // Several times both deadlines with the request in flight: the read still waits.
        tokio::time::sleep(LIMITS.idle * 4).await;
        assert!(
            !read.is_finished(),
            "a read failed while a request was in flight"
        );
        let ended = Instant::now();
        drop(request);
        let (e, failed_at) = read.await.unwrap();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(e.to_string().contains("idle"), "{e}");
        assert!(failed_at - ended >= LIMITS.idle);
    }

    #[tokio::test]
    async fn a_write_that_makes_no_progress_fails_after_the_stall_deadline() {
        let (server, _client) = tokio::io::duplex(16);
        let state = ConnState::new(LIMITS);
        let _request = state.begin();
        let mut io = Deadlined::new(server, state);
        let e = io.write_all(&[7u8; 64]).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(e.to_string().contains("send_stall_timeout"), "{e}");
    }
}
