//! Response bodies: empty, in-memory bytes, or a file streamed by positioned reads on the blocking pool.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Frame, SizeHint};
use tokio::sync::mpsc;

/// Size of one positioned read of a blob file.
pub const READ_CHUNK: usize = 1 << 20;

/// A response body. An enum rather than a boxed stream so the hot paths stay explicit and a
/// zero-copy variant can be added without touching handlers.
pub enum Body {
    /// No bytes.
    Empty,
    /// Bytes in memory (manifests, JSON).
    Full(Option<Bytes>),
    /// Pieces of a file read ahead by a blocking task; `remaining` is exact.
    File {
        /// Pieces, at most one queued (back-pressure bounds memory per stream).
        rx: mpsc::Receiver<io::Result<Bytes>>,
        /// Bytes still to come.
        remaining: u64,
    },
}

impl Body {
    /// A body from bytes.
    pub fn full(bytes: impl Into<Bytes>) -> Body {
        Body::Full(Some(bytes.into()))
    }

    /// Streams `len` bytes of `file` from `offset`: a blocking-pool loop of 1 MiB `pread`s
    /// into fresh buffers, one piece ahead of the client. Stops when the client goes away.
    pub fn file(file: std::fs::File, offset: u64, len: u64) -> Body {
        use std::os::unix::fs::FileExt;
        let (tx, rx) = mpsc::channel(1);
        tokio::task::spawn_blocking(move || {
            let mut pos = offset;
            let end = offset + len;
            while pos < end {
                let want = ((end - pos) as usize).min(READ_CHUNK);
                let mut buf = BytesMut::zeroed(want);
                let piece = match file.read_at(&mut buf, pos) {
                    Ok(0) => Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "blob file shorter than recorded",
                    )),
                    Ok(n) => {
                        buf.truncate(n);
                        pos += n as u64;
                        Ok(buf.freeze())
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => Err(e),
                };
                let failed = piece.is_err();
                if tx.blocking_send(piece).is_err() || failed {
                    return;
                }
            }
        });
        Body::File { rx, remaining: len }
    }

    /// Exact length, when known.
    pub fn len(&self) -> Option<u64> {
        match self {
            Body::Empty => Some(0),
            Body::Full(b) => Some(b.as_ref().map_or(0, |b| b.len() as u64)),
            Body::File { remaining, .. } => Some(*remaining),
        }
    }

    /// Whether the body is known to be empty.
    pub fn is_empty(&self) -> bool {
        self.len() == Some(0)
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match self.get_mut() {
            Body::Empty => Poll::Ready(None),
            Body::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Body::File { rx, remaining } => {
                if *remaining == 0 {
                    return Poll::Ready(None);
                }
                match rx.poll_recv(cx) {
                    Poll::Ready(Some(Ok(bytes))) => {
                        *remaining = remaining.saturating_sub(bytes.len() as u64);
                        Poll::Ready(Some(Ok(Frame::data(bytes))))
                    }
                    Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
                    Poll::Ready(None) => Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "blob reader stopped early",
                    )))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Empty => true,
            Body::Full(b) => b.is_none(),
            Body::File { remaining, .. } => *remaining == 0,
        }
    }

    fn size_hint(&self) -> SizeHint {
        self.len().map(SizeHint::with_exact).unwrap_or_default()
    }
}
