//! Plain HTTP/1.1 connections driven by berth itself, so that a blob body goes from its file
//! to the socket with `sendfile(2)` instead of through user space (nginx's and distribution's
//! way; hyper cannot hand its connection to the kernel in the middle of a response).
//!
//! The driver reads request heads (parsed by `httparse`, the parser hyper itself uses) and
//! answers every request that has no body, GET and HEAD, through the same handler as hyper's
//! connections: the same routing, authorization, logging and metrics. A response whose body is
//! a local file region is sent with `sendfile`; any other body is written as it comes, its
//! file regions (a cache fetch's partial file) with `sendfile` too. Handlers learn that their
//! connection sends files (`body::sends_files`): a fetch's first client then follows the file
//! rather than taking the bytes from memory.
//!
//! Blob uploads with a `Content-Length` (POST, PATCH and PUT under `/blobs/uploads/`) are
//! driven too: the handler reads the body straight from the socket, in reads of up to 1 MiB
//! into pooled buffers ([`Inbound`]), instead of through hyper's connection task, its channel
//! and its fresh buffer per read. A handler that answers before reading the whole body (a
//! refusal) closes the connection after its answer, lingering briefly so the client reads it.
//!
//! The first request it does not take (another request with a body, chunked bodies, an
//! upgrade, `Expect`, HTTP/2's preface, anything it cannot parse) hands the connection to hyper
//! for the rest of its life, with the bytes already read replayed first: the API, manifests and
//! h2c keep hyper's implementation.
//!
//! Framing: every response carries `Content-Length` (all of berth's bodies have an exact
//! length); a body that fails midway closes the connection, so a client never takes a short
//! body for a whole one. Pipelined requests are read from the bytes after the head and
//! answered in order. Deadlines: reads go through the connection's deadline layer (first
//! request, keep-alive idle); writes too (stall), and `sendfile` waits for the socket at most
//! `send_stall_timeout`.

use std::future::Future;
use std::io::{self, Write as _};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::{Buf, Bytes, BytesMut};
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http::{Uri, Version};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, watch};
use tokio::time::Sleep;

use super::body::{sending_files, Body, Piece};
use super::deadline::{ConnState, Deadlined};
use super::finish::{Abort, Finish};
use super::pool::{Pooled, RECEIVES};
use crate::store::blobs::FileRegion;

/// Most bytes one `sendfile` call may move, so one fast client cannot hold a worker thread for
/// long (the socket's buffer usually stops it well before).
const SENDFILE_MAX: u64 = 4 << 20;

/// Most headers in a request head the driver parses; more hand the request to hyper.
const MAX_HEADERS: usize = 64;

/// A body piece shorter than a buffer waits at most this long for more bytes before it goes
/// to the handler (a slow client's bytes still arrive, within its body idle deadline).
const PIECE_WAIT: Duration = Duration::from_millis(50);

/// After an answer that left part of a request body unread, the connection reads and drops
/// what the client still sends for at most this long (and [`LINGER_BYTES`]) before it closes,
/// so the client reads the answer rather than a reset.
const LINGER: Duration = Duration::from_secs(1);

/// Most bytes dropped while lingering.
const LINGER_BYTES: u64 = 16 << 20;

/// How a driven connection ended.
pub enum Ended {
    /// Closed (by the client, a deadline, `Connection: close`, shutdown or a failed body).
    Closed,
    /// A request the driver does not take: hyper serves the connection from here on.
    Handover(Rewind<Deadlined<TcpStream>>),
}

/// Serves requests on a plain connection until it closes or must go to hyper. `handle`
/// answers one request (the same handler as hyper's connections).
pub async fn drive<H, F>(
    mut io: Deadlined<TcpStream>,
    state: &Arc<ConnState>,
    max_head: usize,
    mut stop: watch::Receiver<bool>,
    mut handle: H,
) -> io::Result<Ended>
where
    H: FnMut(Request<Inbound>) -> F,
    F: Future<Output = (Response<Body>, Finish)>,
{
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        let (request, keep_alive, body_len) = loop {
            if !buf.is_empty() {
                match parse(&buf) {
                    Parsed::Partial if buf.len() < max_head => {}
                    Parsed::Partial | Parsed::Foreign => {
                        return Ok(Ended::Handover(Rewind::new(buf.freeze(), io)))
                    }
                    Parsed::Request {
                        request,
                        len,
                        keep_alive,
                        body_len,
                    } => {
                        buf.advance(len);
                        break (*request, keep_alive, body_len);
                    }
                }
            } else if *stop.borrow() {
                return Ok(Ended::Closed);
            }
            let read = tokio::select! {
                biased;
                _ = stop.changed(), if buf.is_empty() => return Ok(Ended::Closed),
                read = io.read_buf(&mut buf) => read?,
            };
            if read == 0 {
                return Ok(Ended::Closed);
            }
        };
        let head_only = request.method() == Method::HEAD;
        // HTTP/1.0 keeps a connection only when the answer says so (ab -k, old proxies).
        let persist = match (keep_alive, request.version() == Version::HTTP_10) {
            (false, _) => Persist::Close,
            (true, false) => Persist::Keep,
            (true, true) => Persist::KeepAnnounced,
        };
        let in_flight = state.begin();
        let (response, mut finish, body_read) = if body_len == 0 {
            let (response, finish) =
                sending_files(handle(request.map(|()| Inbound::empty()))).await;
            (response, finish, true)
        } else {
            let (back, returned) = oneshot::channel();
            let body = Inbound::new(Flow::new(io, buf, body_len, back));
            let (response, finish) = sending_files(handle(request.map(|()| body))).await;
            // The handler's future owned the body and is done: the body was dropped.
            let returned = returned
                .await
                .map_err(|_| io::Error::other("a request body outlived its handler"))?;
            (io, buf) = (returned.io, returned.rest);
            (response, finish, returned.whole)
        };
        let persist = if body_read { persist } else { Persist::Close };
        let stall = state.stall();
        let written =
            write_response(&mut io, response, &mut finish, head_only, persist, stall).await;
        drop(finish);
        drop(in_flight);
        let intact = written?;
        if !body_read {
            linger(&mut io).await;
            return Ok(Ended::Closed);
        }
        if !keep_alive || !intact {
            let _ = io.shutdown().await;
            return Ok(Ended::Closed);
        }
    }
}

/// Ends a connection whose client may still be sending a body nobody reads: the answer is
/// already written; the write side is shut, then what arrives is read and dropped for a short
/// while, so closing does not reset the connection before the client has read the answer.
async fn linger(io: &mut Deadlined<TcpStream>) {
    let _ = io.shutdown().await;
    let mut scratch = vec![0u8; 64 * 1024];
    let mut dropped = 0u64;
    let _ = tokio::time::timeout(LINGER, async {
        while dropped < LINGER_BYTES {
            match io.read(&mut scratch).await {
                Ok(0) | Err(_) => break,
                Ok(n) => dropped += n as u64,
            }
        }
    })
    .await;
}

/// What a request body gives back to its connection when it is dropped.
struct Returned {
    io: Deadlined<TcpStream>,
    /// Bytes read past the body (pipelined requests).
    rest: BytesMut,
    /// Whether the body was read to its end (the connection's framing is intact).
    whole: bool,
}

/// A request body as the driver hands it to the handler: empty, or read from the connection.
pub struct Inbound {
    flow: Option<Box<Flow>>,
}

/// A body being read from its connection: first the bytes that came with the head, then the
/// socket, each read into a pooled buffer of [`super::pool::RECEIVE_CHUNK`] bytes; a full
/// buffer becomes one piece without a copy.
struct Flow {
    io: Deadlined<TcpStream>,
    /// Bytes read with the head: the body's first bytes, then any pipelined request.
    head_rest: BytesMut,
    /// Body bytes not read from the socket or `head_rest` yet.
    unread: u64,
    /// Read from the socket, not handed on yet.
    fill: Option<Pooled>,
    /// Armed when the socket has nothing more for a partly filled buffer.
    wait: Option<Pin<Box<Sleep>>>,
    /// A read failed or the client closed: handed on after the bytes before it.
    failure: Option<io::Error>,
    /// The failure was handed on; the body is over.
    broken: bool,
    /// Body bytes handed to the handler.
    received: u64,
    back: oneshot::Sender<Returned>,
}

impl Flow {
    fn new(
        io: Deadlined<TcpStream>,
        head_rest: BytesMut,
        len: u64,
        back: oneshot::Sender<Returned>,
    ) -> Flow {
        Flow {
            io,
            head_rest,
            unread: len,
            fill: None,
            wait: None,
            failure: None,
            broken: false,
            received: 0,
            back,
        }
    }

    fn filled(&self) -> usize {
        self.fill.as_ref().map_or(0, |b| b.len)
    }

    /// The filled part of the buffer: the buffer itself when at least half full, else a copy
    /// (a slow client's small pieces must not each hold a whole buffer).
    fn hand_on(&mut self) -> Bytes {
        self.wait = None;
        let Some(mut buf) = self.fill.take() else {
            return Bytes::new();
        };
        self.received += buf.len as u64;
        if buf.len * 2 >= buf.bytes.len() {
            return buf.freeze();
        }
        let piece = Bytes::copy_from_slice(&buf.bytes[..buf.len]);
        buf.len = 0;
        self.fill = Some(buf);
        piece
    }

    fn poll_piece(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Bytes>>> {
        if self.broken {
            return Poll::Ready(None);
        }
        if self.unread > 0 && !self.head_rest.is_empty() {
            let n = self.unread.min(self.head_rest.len() as u64) as usize;
            self.unread -= n as u64;
            self.received += n as u64;
            return Poll::Ready(Some(Ok(self.head_rest.split_to(n).freeze())));
        }
        loop {
            if self.failure.is_some() || self.unread == 0 {
                if self.filled() > 0 {
                    return Poll::Ready(Some(Ok(self.hand_on())));
                }
                return Poll::Ready(self.failure.take().map(|e| {
                    self.broken = true;
                    Err(e)
                }));
            }
            let buf = self.fill.get_or_insert_with(|| RECEIVES.take());
            if buf.is_full() {
                return Poll::Ready(Some(Ok(self.hand_on())));
            }
            let room =
                (buf.bytes.len() - buf.len).min(usize::try_from(self.unread).unwrap_or(usize::MAX));
            let mut read = ReadBuf::new(&mut buf.bytes[buf.len..buf.len + room]);
            match Pin::new(&mut self.io).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) if read.filled().is_empty() => {
                    self.failure = Some(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!(
                            "the client closed the connection {} bytes before the end of the body",
                            self.unread
                        ),
                    ));
                }
                Poll::Ready(Ok(())) => {
                    let n = read.filled().len();
                    buf.len += n;
                    self.unread -= n as u64;
                }
                Poll::Ready(Err(e)) => self.failure = Some(e),
                Poll::Pending => {
                    if buf.len == 0 {
                        return Poll::Pending;
                    }
                    let wait = self
                        .wait
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep(PIECE_WAIT)));
                    if wait.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    return Poll::Ready(Some(Ok(self.hand_on())));
                }
            }
        }
    }
}

impl Inbound {
    fn empty() -> Inbound {
        Inbound { flow: None }
    }

    fn new(flow: Flow) -> Inbound {
        Inbound {
            flow: Some(Box::new(flow)),
        }
    }
}

impl Drop for Inbound {
    fn drop(&mut self) {
        let Some(flow) = self.flow.take() else {
            return;
        };
        let flow = *flow;
        let whole =
            flow.unread == 0 && flow.filled() == 0 && !flow.broken && flow.failure.is_none();
        if flow.received > 0 {
            crate::metrics::driven_body_bytes(flow.received);
        }
        let _ = flow.back.send(Returned {
            io: flow.io,
            rest: flow.head_rest,
            whole,
        });
    }
}

impl http_body::Body for Inbound {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, io::Error>>> {
        let Some(flow) = self.get_mut().flow.as_deref_mut() else {
            return Poll::Ready(None);
        };
        flow.poll_piece(cx)
            .map(|piece| piece.map(|r| r.map(http_body::Frame::data)))
    }

    fn is_end_stream(&self) -> bool {
        self.flow
            .as_deref()
            .is_none_or(|f| f.broken || (f.unread == 0 && f.filled() == 0))
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self.flow.as_deref() {
            Some(f) if !f.broken => http_body::SizeHint::with_exact(f.unread + f.filled() as u64),
            _ => http_body::SizeHint::with_exact(0),
        }
    }
}

impl super::req::RequestBody for Inbound {
    type Failure = io::Error;
}

enum Parsed {
    /// The head is not complete yet.
    Partial,
    /// Not a request the driver takes: hyper's.
    Foreign,
    /// A request the driver takes: `len` bytes of head, then `body_len` bytes of body.
    Request {
        request: Box<Request<()>>,
        len: usize,
        keep_alive: bool,
        body_len: u64,
    },
}

fn parse(buf: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut head = httparse::Request::new(&mut headers);
    let len = match head.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Foreign,
    };
    let method = match head.method {
        Some("GET") => Method::GET,
        Some("HEAD") => Method::HEAD,
        Some("POST") => Method::POST,
        Some("PATCH") => Method::PATCH,
        Some("PUT") => Method::PUT,
        _ => return Parsed::Foreign,
    };
    // Bodies are taken for blob uploads only (the bytes worth a driver of their own).
    let takes_body = method != Method::GET && method != Method::HEAD;
    if takes_body && !head.path.is_some_and(|p| p.contains("/blobs/uploads/")) {
        return Parsed::Foreign;
    }
    let mut body_len = None;
    let (version, mut keep_alive) = match head.version {
        Some(1) => (Version::HTTP_11, true),
        Some(0) => (Version::HTTP_10, false),
        _ => return Parsed::Foreign,
    };
    let Some(uri) = head.path.and_then(|p| Uri::try_from(p).ok()) else {
        return Parsed::Foreign;
    };
    let mut map = HeaderMap::with_capacity(head.headers.len());
    for h in head.headers.iter() {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_bytes(h.value),
        ) else {
            return Parsed::Foreign;
        };
        if name == header::CONTENT_LENGTH {
            // One length, digits only; anything else (a list, a second differing header) is
            // hyper's to refuse.
            let Some(n) = std::str::from_utf8(value.as_bytes())
                .ok()
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<u64>().ok())
            else {
                return Parsed::Foreign;
            };
            if body_len.is_some_and(|len| len != n) || (n > 0 && !takes_body) {
                return Parsed::Foreign;
            }
            body_len = Some(n);
        } else if name == header::TRANSFER_ENCODING
            || name == header::UPGRADE
            || name == header::EXPECT
        {
            return Parsed::Foreign;
        } else if name == header::CONNECTION {
            for token in value.to_str().unwrap_or("").split(',') {
                let token = token.trim();
                if token.eq_ignore_ascii_case("close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    keep_alive = true;
                } else if token.eq_ignore_ascii_case("upgrade") {
                    return Parsed::Foreign;
                }
            }
        }
        map.append(name, value);
    }
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    *request.headers_mut() = map;
    Parsed::Request {
        request: Box::new(request),
        len,
        keep_alive,
        body_len: body_len.unwrap_or(0),
    }
}

/// What the connection does after a response, and what the response says about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Persist {
    /// Closed after it: `Connection: close`.
    Close,
    /// Kept (HTTP/1.1's default: nothing to say).
    Keep,
    /// Kept, and said so: `Connection: keep-alive` (HTTP/1.0 asked for it).
    KeepAnnounced,
}

/// Whether a response of this status has no body and no length (RFC 9110).
fn bodiless(status: StatusCode) -> bool {
    status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
}

/// The status line and headers, with `Content-Length`, `Date` and, when the connection ends
/// after this response, `Connection: close`.
fn head_bytes(parts: &http::response::Parts, len: u64, persist: Persist) -> Vec<u8> {
    let mut head = Vec::with_capacity(512);
    let status = parts.status;
    let _ = write!(
        head,
        "HTTP/1.1 {} {}\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    // No length on a 1xx or 204 (RFC 9110 8.6), whatever the handler set: hyper drops it too.
    let lengthless = status.is_informational() || status == StatusCode::NO_CONTENT;
    for (name, value) in &parts.headers {
        if lengthless && name == header::CONTENT_LENGTH {
            continue;
        }
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    if !bodiless(status) && !parts.headers.contains_key(header::CONTENT_LENGTH) {
        let _ = write!(head, "content-length: {len}\r\n");
    }
    let _ = write!(
        head,
        "date: {}\r\n",
        httpdate::fmt_http_date(SystemTime::now())
    );
    match persist {
        Persist::Close => head.extend_from_slice(b"connection: close\r\n"),
        Persist::KeepAnnounced => head.extend_from_slice(b"connection: keep-alive\r\n"),
        Persist::Keep => {}
    }
    head.extend_from_slice(b"\r\n");
    head
}

/// Writes a response, noting in `finish` the bytes handed to the socket and why a body ended
/// early; whether the connection's framing is intact (a body that failed midway leaves it
/// broken: the connection must close).
async fn write_response(
    io: &mut Deadlined<TcpStream>,
    response: Response<Body>,
    finish: &mut Finish,
    head_only: bool,
    persist: Persist,
    stall: Duration,
) -> io::Result<bool> {
    let (parts, mut body) = response.into_parts();
    let len = body.len().unwrap_or(0);
    let mut head = head_bytes(&parts, len, persist);
    let written = async {
        if head_only || bodiless(parts.status) {
            return io.write_all(&head).await.map(|()| true);
        }
        match body {
            Body::Empty | Body::Full(None) => io.write_all(&head).await?,
            Body::Full(Some(bytes)) => {
                head.extend_from_slice(&bytes);
                io.write_all(&head).await?;
                finish.sent(bytes.len() as u64);
            }
            Body::Region { region, stall } => {
                io.write_all(&head).await?;
                send_region(io.get_ref(), &region, stall, finish).await?;
            }
            Body::Streamed(ref mut pieces) => {
                io.write_all(&head).await?;
                while let Some(piece) = pieces.next_piece().await {
                    match piece {
                        Ok(Piece::Bytes(data)) => {
                            io.write_all(&data).await?;
                            finish.sent(data.len() as u64);
                        }
                        Ok(Piece::Region(region)) => {
                            send_region(io.get_ref(), &region, stall, finish).await?
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, sent = finish.sent, len, "response body failed; closing the connection");
                            finish.abort(Abort::BodyError);
                            return Ok(false);
                        }
                    }
                }
            }
        }
        Ok(true)
    }
    .await;
    if let Err(e) = &written {
        finish.abort(if e.kind() == io::ErrorKind::TimedOut {
            Abort::Stalled
        } else {
            Abort::ClientGone
        });
    }
    written
}

/// Sends a file region to the socket with `sendfile`, waiting for the socket to take more at
/// most `stall` at a time.
async fn send_region(
    socket: &TcpStream,
    region: &FileRegion,
    stall: Duration,
    finish: &mut Finish,
) -> io::Result<()> {
    let mut offset = region.offset();
    let end = offset + region.len();
    let mut moved_total = 0u64;
    let outcome = loop {
        if offset >= end {
            break Ok(());
        }
        let want = (end - offset).min(SENDFILE_MAX) as usize;
        let moved = socket.try_io(Interest::WRITABLE, || {
            rustix::fs::sendfile(socket, region.file(), Some(&mut offset), want)
                .map_err(io::Error::from)
        });
        match moved {
            Ok(0) => {
                break Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "blob file shorter than its length",
                ))
            }
            Ok(n) => {
                moved_total += n as u64;
                // Let other tasks of this worker run between large moves.
                tokio::task::consume_budget().await;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                match tokio::time::timeout(stall, socket.writable()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => break Err(e),
                    Err(_) => {
                        tracing::info!(
                            sent = moved_total,
                            len = region.len(),
                            stall_s = stall.as_secs(),
                            "response cut: the client stopped reading"
                        );
                        break Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "client read nothing for the send stall deadline",
                        ));
                    }
                }
            }
            Err(e) => break Err(e),
        }
    };
    finish.sent(moved_total);
    if moved_total > 0 {
        crate::metrics::sendfile_bytes(moved_total);
    }
    outcome
}

/// A connection whose first bytes were already read: they are read again first.
pub struct Rewind<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Rewind<S> {
    fn new(prefix: Bytes, inner: S) -> Rewind<S> {
        Rewind { prefix, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(text: &str) -> (Request<()>, usize, bool) {
        match parse(text.as_bytes()) {
            Parsed::Request {
                request,
                len,
                keep_alive,
                ..
            } => (*request, len, keep_alive),
            Parsed::Partial => panic!("partial: {text:?}"),
            Parsed::Foreign => panic!("foreign: {text:?}"),
        }
    }

    fn foreign(text: &str) -> bool {
        matches!(parse(text.as_bytes()), Parsed::Foreign)
    }

    #[test]
    fn bodiless_gets_and_heads_are_taken_the_rest_goes_to_hyper() {
        let head = "GET /v2/a/blobs/x?n=1 HTTP/1.1\r\nHost: h\r\nRange: bytes=0-1\r\n\r\n";
        let (r, len, keep) = request(&format!("{head}GET /next"));
        assert_eq!(
            (r.method(), r.uri().path(), r.uri().query()),
            (&Method::GET, "/v2/a/blobs/x", Some("n=1"))
        );
        assert_eq!(r.headers()["range"], "bytes=0-1");
        assert_eq!(
            len,
            head.len(),
            "the head ends before the pipelined request"
        );
        assert!(keep);
        let (_, _, keep) = request("HEAD / HTTP/1.1\r\nConnection: close\r\n\r\n");
        assert!(!keep);
        let (_, _, keep) = request("GET / HTTP/1.0\r\n\r\n");
        assert!(!keep, "HTTP/1.0 closes unless asked");
        let (_, _, keep) = request("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n");
        assert!(keep);
        assert!(request("GET / HTTP/1.1\r\nContent-Length: 0\r\n\r\n").2);
        assert!(matches!(
            parse(b"GET / HTTP/1.1\r\nHost: h\r\n"),
            Parsed::Partial
        ));
        let push = "PATCH /v2/a/blobs/uploads/u HTTP/1.1\r\nContent-Length: 5\r\n\r\n";
        assert!(matches!(
            parse(format!("{push}hello").as_bytes()),
            Parsed::Request { body_len: 5, len, .. } if len == push.len()
        ));
        assert!(
            matches!(
                parse(b"POST /v2/a/blobs/uploads/ HTTP/1.1\r\n\r\n"),
                Parsed::Request { body_len: 0, .. }
            ),
            "no length and no chunks: no body (RFC 9112 6.3)"
        );
        for other in [
            "POST /v2/a/tokens HTTP/1.1\r\n\r\n",
            "PUT /v2/a/manifests/latest HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
            "PATCH /v2/a/blobs/uploads/u HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "PATCH /v2/a/blobs/uploads/u HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
            "PATCH /v2/a/blobs/uploads/u HTTP/1.1\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
            "PATCH /v2/a/blobs/uploads/u HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
            "GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n",
            "GET / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "garbage\r\n\r\n",
        ] {
            assert!(foreign(other), "{other:?}");
        }
    }

    #[test]
    fn heads_carry_length_date_and_close() {
        let mut r = Response::new(());
        r.headers_mut().insert("x-a", HeaderValue::from_static("b"));
        let (parts, ()) = r.into_parts();
        let text = String::from_utf8(head_bytes(&parts, 12, Persist::Close)).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 200 OK\r\nx-a: b\r\ncontent-length: 12\r\ndate: "),
            "{text}"
        );
        assert!(text.ends_with("connection: close\r\n\r\n"), "{text}");
        let mut r = Response::new(());
        *r.status_mut() = StatusCode::NO_CONTENT;
        r.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        let (parts, ()) = r.into_parts();
        let text = String::from_utf8(head_bytes(&parts, 0, Persist::Keep)).unwrap();
        assert!(
            !text.contains("content-length") && !text.contains("connection"),
            "{text}"
        );
        let text = String::from_utf8(head_bytes(&parts, 0, Persist::KeepAnnounced)).unwrap();
        assert!(text.ends_with("connection: keep-alive\r\n\r\n"), "{text}");
    }
}
