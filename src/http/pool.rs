//! Buffers reused across streams: a blob read or a request body lands in a buffer that was
//! used before (no fresh allocation, no page faults per piece once the pool is warm), handed
//! out as `Bytes` whose last drop gives the buffer back.

use bytes::Bytes;
use parking_lot::Mutex;

use super::body::READ_CHUNK;
use crate::store::blobs::Pieces;

/// Pieces of blob files read for the user-space path (TLS, HTTP/2, `sendfile = false`).
pub static READS: Pool = Pool::new(READ_CHUNK, 32);

/// Size of a buffer a request body is received into by the HTTP/1.1 driver (`http::h1`).
pub const RECEIVE_CHUNK: usize = 1 << 20;

/// Request bodies received by the HTTP/1.1 driver (pushes).
pub static RECEIVES: Pool = Pool::new(RECEIVE_CHUNK, 16);

/// Free buffers of one size. Beyond `keep` free ones, returned buffers are freed: enough for the
/// streams of a busy node without holding memory after a burst.
pub struct Pool {
    size: usize,
    keep: usize,
    free: Mutex<Vec<Box<[u8]>>>,
}

impl Pool {
    const fn new(size: usize, keep: usize) -> Pool {
        Pool {
            size,
            keep,
            free: Mutex::new(Vec::new()),
        }
    }

    /// A free buffer, or a new one when none is free.
    pub fn take(&'static self) -> Pooled {
        let bytes = self
            .free
            .lock()
            .pop()
            .unwrap_or_else(|| vec![0u8; self.size].into_boxed_slice());
        Pooled {
            bytes,
            len: 0,
            pool: self,
        }
    }
}

/// A buffer from a pool; its first `len` bytes are valid.
pub struct Pooled {
    /// The whole buffer.
    pub bytes: Box<[u8]>,
    /// Bytes filled.
    pub len: usize,
    pool: &'static Pool,
}

impl Pooled {
    /// The filled bytes as `Bytes`, without a copy: the buffer goes back to its pool when the
    /// last of them is dropped.
    pub fn freeze(self) -> Bytes {
        Bytes::from_owner(self)
    }

    /// Whether every byte of the buffer is filled.
    pub fn is_full(&self) -> bool {
        self.len == self.bytes.len()
    }
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let mut free = self.pool.free.lock();
        if free.len() < self.pool.keep {
            free.push(std::mem::take(&mut self.bytes));
        }
    }
}

/// Pieces of a stream copied into pooled buffers as they arrive: a source's small frames
/// (tens of KiB, on fresh allocations) become whole [`RECEIVE_CHUNK`] buffers that are written,
/// hashed and sent on while still in the CPU's cache, and the frames' memory is free again at
/// once. Copying a frame that just arrived costs less than writing and hashing it later from
/// memory it has left the cache for.
#[derive(Default)]
pub struct Gather {
    full: Pieces,
    fill: Option<Pooled>,
}

impl Gather {
    /// Copies `piece` in.
    pub fn push(&mut self, mut piece: &[u8]) {
        while !piece.is_empty() {
            let fill = self.fill.get_or_insert_with(|| RECEIVES.take());
            let n = (fill.bytes.len() - fill.len).min(piece.len());
            fill.bytes[fill.len..fill.len + n].copy_from_slice(&piece[..n]);
            fill.len += n;
            piece = &piece[n..];
            if fill.is_full() {
                if let Some(full) = self.fill.take() {
                    self.full.push(full.freeze());
                }
            }
        }
    }

    /// Bytes held.
    pub fn len(&self) -> usize {
        self.full.len() + self.fill.as_ref().map_or(0, |f| f.len)
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Everything held, the partly filled buffer included.
    pub fn take(&mut self) -> Pieces {
        if let Some(fill) = self.fill.take().filter(|f| f.len > 0) {
            self.full.push(fill.freeze());
        }
        self.full.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_when_their_bytes_are_dropped() {
        let mut a = READS.take();
        a.bytes[0] = 42;
        a.len = 1;
        let ptr = a.bytes.as_ptr();
        let bytes = a.freeze();
        let slice = bytes.slice(0..1);
        drop(bytes);
        assert_eq!(&slice[..], &[42], "a slice keeps the buffer alive");
        drop(slice);
        // Tests of this binary share the pool: ours is among the free buffers now.
        assert!(READS.free.lock().iter().any(|b| b.as_ptr() == ptr));
        let r = RECEIVES.take();
        assert_eq!(r.bytes.len(), RECEIVE_CHUNK, "each pool has its size");
    }

    #[test]
    fn gathered_pieces_come_out_in_whole_buffers_and_in_order() {
        let mut g = Gather::default();
        let data: Vec<u8> = (0..RECEIVE_CHUNK * 2 + 100).map(|i| i as u8).collect();
        for piece in data.chunks(70_000) {
            g.push(piece);
        }
        assert_eq!(g.len(), data.len());
        let out = g.take();
        let out = out.as_slice();
        assert_eq!(out.len(), 3);
        assert_eq!(out[0].len(), RECEIVE_CHUNK);
        assert_eq!(out.concat(), data);
        assert!(g.is_empty() && g.take().is_empty());
    }
}
