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
    ///
    /// All or nothing: when the write fails (a full disk), the file is cut back to `written`
    /// and the hasher restored, so count, file and hash still agree and the writer can go on
    /// from its last good offset. A full disk is reported as `StorageFull` naming the file.
    pub fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        use std::io::Write;
        let before = self.verifier.clone();
        let outcome = if bytes.len() < 256 * 1024 {
            self.file
                .write_all(bytes)
                .map(|()| self.verifier.update(bytes))
        } else {
            let (file, verifier) = (&mut self.file, &mut self.verifier);
            std::thread::scope(|s| {
                s.spawn(|| verifier.update(bytes));
                file.write_all(bytes)
            })
        };
        if let Err(e) = outcome {
            self.verifier = before;
            if let Err(cut) = self.rewind(self.written) {
                // Bytes past `written` do not count: sessions cut them when they next open.
                tracing::warn!(path = %self.path.display(), error = %cut, "could not cut a failed write back");
            }
            return Err(explain(e, &self.path));
        }
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// Cuts the file back to `len` bytes and puts the write position there (append-mode files
    /// write at the end anyway). The caller restores the matching hasher state and count.
    pub fn rewind(&mut self, len: u64) -> io::Result<()> {
        use std::io::{Seek, SeekFrom};
        self.file.set_len(len)?;
        self.file.seek(SeekFrom::Start(len))?;
        Ok(())
    }
}

/// Rewords a full-disk error so that the client and the log see the cause and the place.
pub fn explain(e: io::Error, path: &std::path::Path) -> io::Error {
    if e.kind() == io::ErrorKind::StorageFull {
        io::Error::new(
            io::ErrorKind::StorageFull,
            format!(
                "no space left on device: the data directory's volume is full (writing {})",
                path.display()
            ),
        )
    } else {
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::digest::Algorithm;

    /// `/dev/full` fails every write with ENOSPC: the writer's count and hash stay at the last
    /// good write and the error names the cause and the file.
    #[test]
    fn a_full_disk_leaves_the_writer_at_its_last_good_offset() {
        let path = std::path::PathBuf::from("/dev/full");
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let mut w = BlobWriter {
            file,
            path,
            written: 5,
            verifier: Verifier::new(Algorithm::Sha256),
        };
        w.verifier.update(b"hello");
        for size in [10, 1 << 20] {
            let e = w.write(&vec![1u8; size]).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::StorageFull);
            assert!(e.to_string().contains("no space left on device"), "{e}");
            assert!(e.to_string().contains("/dev/full"), "{e}");
            assert_eq!(w.written, 5);
            assert_eq!(w.verifier.current(), Digest::sha256(b"hello"));
        }
    }
}
