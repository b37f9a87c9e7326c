//! Response bodies: empty, in-memory bytes, or a file streamed by positioned reads into pooled
//! buffers (from the page cache on the stream's task, from the disk on the blocking pool).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::sync::mpsc;

use crate::store::blobs::{ByteStream, FileRegion};

/// The deadlines of one request's bodies (`limits.body_idle_timeout`, `limits.send_stall_timeout`).
#[derive(Debug, Clone, Copy)]
pub struct BodyDeadlines {
    /// Longest a request body may send nothing.
    pub idle: Duration,
    /// Longest a response body may wait for a client that does not read.
    pub stall: Duration,
}

impl Default for BodyDeadlines {
    fn default() -> Self {
        BodyDeadlines {
            idle: Duration::from_secs(30),
            stall: Duration::from_secs(60),
        }
    }
}

tokio::task_local! {
    /// Set by the server around each request's handler, so every body read and written on its
    /// behalf (blobs, manifests, JSON, token forms) has the configured deadlines without
    /// threading them through every handler.
    static DEADLINES: BodyDeadlines;
}

/// Runs a request handler with its body deadlines.
pub async fn with_deadlines<F: Future>(deadlines: BodyDeadlines, f: F) -> F::Output {
    DEADLINES.scope(deadlines, f).await
}

/// The deadlines of the request being handled (defaults outside a request).
pub fn deadlines() -> BodyDeadlines {
    DEADLINES.try_with(|d| *d).unwrap_or_default()
}

tokio::task_local! {
    /// Set by `http::h1` around the handlers it drives: their connection sends file regions
    /// itself (`sendfile`), so bytes that are in a file already go out cheaper from the file
    /// than from memory.
    static SENDS_FILES: ();
}

/// Runs a request handler whose connection sends file regions with `sendfile`.
pub async fn sending_files<F: Future>(f: F) -> F::Output {
    SENDS_FILES.scope((), f).await
}

/// Whether the request being handled is answered by a connection that sends file regions
/// without copying them ([`Piece::Region`]).
pub fn sends_files() -> bool {
    SENDS_FILES.try_with(|_| ()).is_ok()
}

/// Why a request body stopped before its end.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The client sent nothing for the idle deadline.
    #[error("client sent nothing for {} s in the middle of the request body", .0.as_secs())]
    Stalled(Duration),
    /// The connection failed or the body was malformed.
    #[error("request body ended early: {0}")]
    Broken(String),
}

/// The next frame of a request body, failing when the client sends nothing for the request's
/// idle deadline (a client that stalls mid-body must not hold a task, a buffer or a session).
pub async fn next_frame(
    body: &mut impl super::req::RequestBody,
) -> Option<Result<Frame<Bytes>, BodyError>> {
    let idle = deadlines().idle;
    match tokio::time::timeout(idle, body.frame()).await {
        Err(_) => Some(Err(BodyError::Stalled(idle))),
        Ok(frame) => frame.map(|f| f.map_err(|e| BodyError::Broken(e.to_string()))),
    }
}

/// Size of one positioned read of a blob file (and of a pooled buffer). With one piece in
/// hyper's write buffer and one being read, a stream holds about 512 KiB: 64 concurrent 64 MiB
/// streams peaked at 46 MiB RSS (68 MiB with 20 MB/s clients) against 110/142 MiB with 512 KiB
/// pieces on fresh allocations, while one stream still ran at 1.5-2.0 GB/s on loopback
/// (DESIGN.md 10 suggests ~1 MiB; memory decided). Plain HTTP/1.1 sends blob files with
/// `sendfile` and never reads them here.
pub const READ_CHUNK: usize = 256 * 1024;

/// A response body. An enum rather than a boxed stream so the hot paths stay explicit and a
/// zero-copy variant can be added without touching handlers.
pub enum Body {
    /// No bytes.
    Empty,
    /// Bytes in memory (manifests, JSON).
    Full(Option<Bytes>),
    /// A region of a local file not read yet: a plain HTTP/1.1 connection sends it with
    /// `sendfile` (`http::h1`); hyper's connections read it in pieces (it becomes `Streamed` at the
    /// first poll).
    Region {
        /// The bytes.
        region: FileRegion,
        /// The request's `send_stall_timeout`.
        stall: Duration,
    },
    /// Pieces handed on by a task as it gets them: a file read ahead, a backend's stream, a
    /// cache fetch as it grows.
    Streamed(Streamed),
}

/// A body's next bytes, as the task that produces them hands them on.
pub enum Piece {
    /// Bytes in memory.
    Bytes(Bytes),
    /// A region of a local file, not read, for a connection that sends files itself
    /// ([`sends_files`]): the HTTP/1.1 driver sends it with `sendfile`. Producers hand regions
    /// to no other connection: one queued for hyper would hold its file open however long the
    /// client stalls (an HTTP/2 stream held by flow control is never polled).
    Region(FileRegion),
}

impl Piece {
    fn len(&self) -> u64 {
        match self {
            Piece::Bytes(b) => b.len() as u64,
            Piece::Region(r) => r.len(),
        }
    }
}

/// The pieces of a [`Body::Streamed`]: at most one queued (back-pressure bounds memory per
/// stream, and a region holds no memory at all); `remaining` is exact.
pub struct Streamed {
    rx: mpsc::Receiver<io::Result<Piece>>,
    remaining: u64,
}

impl Streamed {
    /// A body of exactly `len` bytes and the sender its producer hands the pieces to. The
    /// producer stops when the send fails (the client went away); a producer that stops early
    /// ends the body in an error.
    pub fn channel(len: u64) -> (mpsc::Sender<io::Result<Piece>>, Body) {
        let (tx, rx) = mpsc::channel(1);
        let body = Body::Streamed(Streamed { rx, remaining: len });
        (tx, body)
    }

    /// The next piece as its producer handed it (the HTTP/1.1 driver, which sends regions
    /// itself); `None` after the last byte.
    pub async fn next_piece(&mut self) -> Option<io::Result<Piece>> {
        if self.remaining == 0 {
            return None;
        }
        let received = self.rx.recv().await;
        Some(self.count(received))
    }

    /// The next bytes, for hyper's connections.
    fn poll_bytes(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Bytes>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let received = match self.rx.poll_recv(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(received) => received,
        };
        Poll::Ready(Some(match self.count(received) {
            Ok(Piece::Bytes(bytes)) => Ok(bytes),
            Ok(Piece::Region(_)) => Err(io::Error::other(
                "a file region was handed to a connection that cannot send it",
            )),
            Err(e) => Err(e),
        }))
    }

    /// Takes what the producer handed on off the bytes still to come: a producer that stopped
    /// early or sent more than the length ends the body in an error.
    fn count(&mut self, received: Option<io::Result<Piece>>) -> io::Result<Piece> {
        let piece = match received {
            Some(piece) => piece?,
            None => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "blob reader stopped early",
                ))
            }
        };
        if piece.len() > self.remaining {
            self.remaining = 0;
            return Err(io::Error::other("blob reader sent more than its length"));
        }
        self.remaining -= piece.len();
        Ok(piece)
    }
}

impl Body {
    /// A body from bytes.
    pub fn full(bytes: impl Into<Bytes>) -> Body {
        Body::Full(Some(bytes.into()))
    }

    /// The bytes of a file region, with the request's stall deadline.
    pub fn file(region: FileRegion) -> Body {
        Body::Region {
            region,
            stall: deadlines().stall,
        }
    }

    /// Streams a region: positioned reads of 256 KiB into pooled buffers ([`read_piece`]), one
    /// piece ahead of the client. The channel slot is reserved before each
    /// read, so a slow client holds neither memory nor a blocking thread; the loop ends when the
    /// client goes away, or when it stops reading for `stall`: then the file is closed and the
    /// body ends in an error, which makes hyper close the connection (h1) or reset the stream
    /// (h2).
    fn read_ahead(region: FileRegion, stall: Duration) -> Body {
        let (tx, body) = Streamed::channel(region.len());
        let (file, offset, len) = (region.file().clone(), region.offset(), region.len());
        tokio::spawn(async move {
            let end = offset + len;
            let mut pos = offset;
            while pos < end {
                let slot = match tokio::time::timeout(stall, tx.reserve()).await {
                    Ok(Ok(slot)) => slot,
                    Ok(Err(_)) => return,
                    Err(_) => {
                        return tracing::info!(
                            sent = pos - offset,
                            len,
                            stall_s = stall.as_secs(),
                            "response cut: the client stopped reading"
                        );
                    }
                };
                let want = ((end - pos) as usize).min(READ_CHUNK);
                let piece = read_piece(file.clone(), pos, want).await;
                match piece {
                    Ok(bytes) => {
                        pos += bytes.len() as u64;
                        slot.send(Ok(Piece::Bytes(bytes)));
                    }
                    Err(e) => return slot.send(Err(e)),
                }
            }
        });
        body
    }

    /// Streams `len` bytes from a backend's stream, one piece ahead of the client, with the
    /// same stall deadline as [`Body::file`]. A stream that ends early or runs long ends the
    /// body in an error (the client never takes a short blob for a whole one).
    pub fn stream(mut bytes: ByteStream, len: u64) -> Body {
        use futures_util::StreamExt;
        let (tx, body) = Streamed::channel(len);
        let stall = deadlines().stall;
        tokio::spawn(async move {
            let mut sent = 0u64;
            while sent < len {
                let Ok(Ok(slot)) = tokio::time::timeout(stall, tx.reserve()).await else {
                    return;
                };
                let piece = match bytes.next().await {
                    Some(Ok(p)) if sent + p.len() as u64 <= len => p,
                    Some(Ok(_)) => {
                        return slot
                            .send(Err(io::Error::other("blob stream longer than its length")))
                    }
                    Some(Err(e)) => return slot.send(Err(e)),
                    None => {
                        return slot.send(Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "blob stream ended before its length",
                        )))
                    }
                };
                sent += piece.len() as u64;
                slot.send(Ok(Piece::Bytes(piece)));
            }
        });
        body
    }

    /// Exact length, when known.
    pub fn len(&self) -> Option<u64> {
        match self {
            Body::Empty => Some(0),
            Body::Full(b) => Some(b.as_ref().map_or(0, |b| b.len() as u64)),
            Body::Region { region, .. } => Some(region.len()),
            Body::Streamed(pieces) => Some(pieces.remaining),
        }
    }

    /// Whether the body is known to be empty.
    pub fn is_empty(&self) -> bool {
        self.len() == Some(0)
    }
}

/// One positioned read of up to `want` bytes (at most [`READ_CHUNK`]) at `at` into a buffer
/// from the pool (no fresh allocation and no page faults per piece once the pool is warm; the
/// buffer goes back when the last `Bytes` of it is dropped). Bytes in the page cache are copied
/// at once on the calling task (`preadv2` with `RWF_NOWAIT`, which never waits for the disk), as
/// `sendfile` copies on the connection's task: no hop to a blocking thread and back per piece,
/// which cost more CPU than the copy itself (task switches were 44 % of a user-space stream's
/// samples). Only what must come from the disk is read on the blocking pool.
pub async fn read_piece(
    file: std::sync::Arc<std::fs::File>,
    at: u64,
    want: usize,
) -> io::Result<Bytes> {
    let want = want.min(READ_CHUNK);
    let mut buf = super::pool::READS.take();
    buf.len = read_cached(&file, &mut buf.bytes[..want], at);
    if buf.len == want {
        return Ok(buf.freeze());
    }
    tokio::task::spawn_blocking(move || {
        use std::os::unix::fs::FileExt;
        while buf.len < want {
            match file.read_at(&mut buf.bytes[buf.len..want], at + buf.len as u64) {
                Ok(0) => break,
                Ok(n) => buf.len += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if buf.len == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "blob file shorter than recorded",
            ));
        }
        Ok(buf.freeze())
    })
    .await
    .unwrap_or_else(|e| Err(io::Error::other(e)))
}

/// Reads what the page cache holds of `[at, at + buf.len())` without waiting for the disk;
/// how many bytes it read (0 when nothing was cached, at the end of the file, or where the
/// file system cannot read without waiting).
fn read_cached(file: &std::fs::File, buf: &mut [u8], at: u64) -> usize {
    use rustix::io::{preadv2, ReadWriteFlags};
    let mut filled = 0;
    while filled < buf.len() {
        let mut slices = [io::IoSliceMut::new(&mut buf[filled..])];
        match preadv2(
            file,
            &mut slices,
            at + filled as u64,
            ReadWriteFlags::NOWAIT,
        ) {
            Ok(0) | Err(_) => break,
            Ok(n) => filled += n,
        }
    }
    filled
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        if let Body::Region { region, stall } = this {
            if region.is_empty() {
                return Poll::Ready(None);
            }
            *this = Body::read_ahead(region.clone(), *stall);
        }
        match this {
            Body::Empty | Body::Region { .. } => Poll::Ready(None),
            Body::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Body::Streamed(pieces) => pieces.poll_bytes(cx).map(|b| b.map(|b| b.map(Frame::data))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Empty => true,
            Body::Full(b) => b.is_none(),
            Body::Region { region, .. } => region.is_empty(),
            Body::Streamed(pieces) => pieces.remaining == 0,
        }
    }

    fn size_hint(&self) -> SizeHint {
        self.len().map(SizeHint::with_exact).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::stream;

    async fn collect(body: Body) -> Result<Vec<u8>, io::Error> {
        let mut out = Vec::new();
        let mut body = body;
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame?.into_data() {
                out.extend_from_slice(&data);
            }
        }
        Ok(out)
    }

    fn pieces(parts: &[&'static [u8]]) -> ByteStream {
        let items: Vec<io::Result<Bytes>> =
            parts.iter().map(|p| Ok(Bytes::from_static(p))).collect();
        Box::pin(stream::iter(items))
    }

    /// A piece comes whole whether its pages are cached (read on the task) or not (dropped from
    /// the page cache first: read on the blocking pool), and a read past the end is an error.
    #[tokio::test]
    async fn pieces_read_whole_from_the_page_cache_or_from_the_disk() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        let data: Vec<u8> = (0..READ_CHUNK * 2).map(|i| (i * 31 % 251) as u8).collect();
        std::fs::File::create(&path)
            .unwrap()
            .write_all(&data)
            .unwrap();
        let file = std::sync::Arc::new(std::fs::File::open(&path).unwrap());
        let cached = read_piece(file.clone(), 1000, READ_CHUNK).await.unwrap();
        assert_eq!(&cached[..], &data[1000..1000 + READ_CHUNK]);
        file.sync_all().unwrap();
        rustix::fs::fadvise(&*file, 0, None, rustix::fs::Advice::DontNeed).unwrap();
        let from_disk = read_piece(file.clone(), READ_CHUNK as u64, READ_CHUNK)
            .await
            .unwrap();
        assert_eq!(&from_disk[..], &data[READ_CHUNK..]);
        let tail = read_piece(file.clone(), (2 * READ_CHUNK - 10) as u64, READ_CHUNK)
            .await
            .unwrap();
        assert_eq!(
            &tail[..],
            &data[2 * READ_CHUNK - 10..],
            "a short piece at the end"
        );
        let past = read_piece(file, (2 * READ_CHUNK) as u64, 10)
            .await
            .unwrap_err();
        assert_eq!(past.kind(), io::ErrorKind::UnexpectedEof);
    }

    /// A body passes its producer's bytes on in order, and ends in an error when the producer
    /// stops early, sends more than the length, or hands a file region to hyper (regions are
    /// for connections that send them).
    #[tokio::test]
    async fn streamed_bodies_are_exactly_their_bytes_or_an_error() {
        let (tx, body) = Streamed::channel(5);
        tokio::spawn(async move {
            for part in [&b"abc"[..], b"yz"] {
                tx.send(Ok(Piece::Bytes(Bytes::from_static(part))))
                    .await
                    .unwrap();
            }
        });
        assert_eq!(collect(body).await.unwrap(), b"abcyz");

        let (tx, body) = Streamed::channel(5);
        tx.send(Ok(Piece::Bytes(Bytes::from_static(b"abc"))))
            .await
            .unwrap();
        drop(tx);
        let short = collect(body).await.unwrap_err();
        assert_eq!(short.kind(), io::ErrorKind::UnexpectedEof, "{short}");

        let (tx, body) = Streamed::channel(2);
        tx.send(Ok(Piece::Bytes(Bytes::from_static(b"abc"))))
            .await
            .unwrap();
        let long = collect(body).await.unwrap_err();
        assert!(long.to_string().contains("more than"), "{long}");

        let dir = tempfile::tempdir().unwrap();
        let file = std::fs::File::create(dir.path().join("blob")).unwrap();
        let region = FileRegion::new(std::sync::Arc::new(file), 0, 0);
        let (tx, body) = Streamed::channel(1);
        tx.send(Ok(Piece::Region(region.span(0, 1)))).await.unwrap();
        let refused = collect(body).await.unwrap_err();
        assert!(refused.to_string().contains("cannot send"), "{refused}");
    }

    /// A backend's stream is passed on when it has exactly its length, and ends the body in an
    /// error when it is shorter or longer (a client never takes it for the whole blob).
    #[tokio::test]
    async fn a_stream_body_is_exactly_its_length_or_an_error() {
        let whole = collect(Body::stream(pieces(&[b"hel", b"lo"]), 5))
            .await
            .unwrap();
        assert_eq!(whole, b"hello");
        let short = collect(Body::stream(pieces(&[b"hel"]), 5))
            .await
            .unwrap_err();
        assert_eq!(short.kind(), io::ErrorKind::UnexpectedEof);
        let long = collect(Body::stream(pieces(&[b"hel", b"lo!"]), 5))
            .await
            .unwrap_err();
        assert!(long.to_string().contains("longer"), "{long}");
    }
}
