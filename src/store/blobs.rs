//! The blob-store seam: content-addressed bytes, visible only once complete and verified.

use std::fs::File;
use std::io;

use crate::oci::digest::{Digest, Verifier};

/// An open, committed blob ready for positioned reads.
pub struct OpenBlob {
    /// The file; read with `read_at` (pread), never seeked, so one handle serves any range.
    pub file: File,
    /// Length in bytes.
    pub len: u64,
}

/// Where blob bytes live. Backends must guarantee that `open` never returns a partially written
/// blob: content becomes visible only through `commit`, after it matched its digest.
pub trait BlobStore: Send + Sync + 'static {
    /// Size of a committed blob.
    fn stat(&self, digest: &Digest) -> io::Result<Option<u64>>;
    /// Opens a committed blob.
    fn open(&self, digest: &Digest) -> io::Result<Option<OpenBlob>>;
    /// Starts writing a new blob into a private temp file.
    fn writer(&self, verifier: Verifier) -> io::Result<BlobWriter>;
    /// Makes a fully written blob visible under `digest`; the caller has checked the digest.
    fn commit(&self, writer: BlobWriter, digest: &Digest) -> io::Result<()>;
    /// Stores small content (manifests) directly; hashes are computed by the caller.
    fn put(&self, digest: &Digest, bytes: &[u8]) -> io::Result<()>;
    /// Deletes a committed blob (garbage collection).
    fn remove(&self, digest: &Digest) -> io::Result<bool>;
    /// Every committed blob (garbage collection and storage accounting).
    fn list(&self) -> io::Result<Vec<(Digest, u64)>>;

    /// The whole content of a small blob (a manifest or an image config), or `None` when it is
    /// absent or longer than `limit`: blobs are streamed, only bounded ones are read whole.
    /// Blocking.
    fn read_small(&self, digest: &Digest, limit: u64) -> io::Result<Option<bytes::Bytes>> {
        use std::os::unix::fs::FileExt;
        let Some(blob) = self.open(digest)? else {
            return Ok(None);
        };
        if blob.len > limit {
            return Ok(None);
        }
        let mut bytes = bytes::BytesMut::zeroed(blob.len as usize);
        blob.file.read_exact_at(&mut bytes, 0)?;
        Ok(Some(bytes.freeze()))
    }
}

/// A blob being written: bytes go to a file and through the hasher in one pass.
pub struct BlobWriter {
    /// Destination (a temp file, or an upload session's data file).
    pub file: File,
    /// Path of `file`.
    pub path: std::path::PathBuf,
    /// Bytes written so far.
    pub written: u64,
    /// Hash of the bytes written so far.
    pub verifier: Verifier,
}

impl BlobWriter {
    /// Appends bytes and hashes them; large pieces are hashed on a second thread while this
    /// one writes (SHA-256 and the page-cache copy each take about as long).
    pub fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        use std::io::Write;
        if bytes.len() < 256 * 1024 {
            self.file.write_all(bytes)?;
            self.verifier.update(bytes);
        } else {
            let (file, verifier) = (&mut self.file, &mut self.verifier);
            std::thread::scope(|s| {
                s.spawn(|| verifier.update(bytes));
                file.write_all(bytes)
            })?;
        }
        self.written += bytes.len() as u64;
        Ok(())
    }
}
