//! Filesystem blob backend: `DATA/blobs/<algo>/<2 hex>/<hex>`, written to `DATA/tmp` then renamed.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use super::blobs::{explain, BlobStore, BlobWriter, OpenBlob};
use crate::oci::digest::{Algorithm, Digest, Verifier};

/// Blob store on a local filesystem.
pub struct FsBlobStore {
    blobs: PathBuf,
    tmp: PathBuf,
}

impl FsBlobStore {
    /// Opens (creating) the blob and temp directories under `data_dir`, emptying leftovers in tmp.
    pub fn open(data_dir: &Path) -> io::Result<FsBlobStore> {
        let blobs = data_dir.join("blobs");
        let tmp = data_dir.join("tmp");
        fs::create_dir_all(&blobs)?;
        // Whatever sits in tmp was never committed: a crash interrupted it.
        if tmp.exists() {
            fs::remove_dir_all(&tmp)?;
        }
        fs::create_dir_all(&tmp)?;
        Ok(FsBlobStore { blobs, tmp })
    }

    /// Path of a committed blob.
    pub fn path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.blobs
            .join(digest.algorithm().as_str())
            .join(&hex[..2])
            .join(hex)
    }

    /// Moves a complete file into place and makes the rename durable.
    pub fn commit_file(&self, file: &File, from: &Path, digest: &Digest) -> io::Result<()> {
        file.sync_data().map_err(|e| explain(e, from))?;
        let dest = self.path(digest);
        let dir = dest.parent().expect("blob path has a parent");
        fs::create_dir_all(dir).map_err(|e| explain(e, dir))?;
        if dest.exists() {
            // Same content already committed (content addressing): drop ours.
            let _ = fs::remove_file(from);
            return Ok(());
        }
        fs::rename(from, &dest)?;
        File::open(dir)?.sync_all()
    }
}

/// Bytes an unprivileged writer may still use on the volume holding `dir` (statvfs
/// `f_bavail * f_frsize`). Blocking.
pub fn free_bytes(dir: &Path) -> io::Result<u64> {
    let st = rustix::fs::statvfs(dir)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

impl BlobStore for FsBlobStore {
    fn stat(&self, digest: &Digest) -> io::Result<Option<u64>> {
        match fs::metadata(self.path(digest)) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn open(&self, digest: &Digest) -> io::Result<Option<OpenBlob>> {
        match File::open(self.path(digest)) {
            Ok(file) => {
                let len = file.metadata()?.len();
                Ok(Some(OpenBlob { file, len }))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn writer(&self, verifier: Verifier) -> io::Result<BlobWriter> {
        let path = self.tmp.join(uuid::Uuid::new_v4().to_string());
        let file = OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(&path)
            .map_err(|e| explain(e, &path))?;
        Ok(BlobWriter {
            file,
            path,
            written: 0,
            verifier,
        })
    }

    fn commit(&self, writer: BlobWriter, digest: &Digest) -> io::Result<()> {
        self.commit_file(&writer.file, &writer.path, digest)
    }

    fn put(&self, digest: &Digest, bytes: &[u8]) -> io::Result<()> {
        if self.stat(digest)?.is_some() {
            return Ok(());
        }
        let mut w = self.writer(Verifier::new(digest.algorithm()))?;
        let path = w.path.clone();
        let done = w.write(bytes).and_then(|()| self.commit(w, digest));
        if done.is_err() {
            // Nothing half-written stays behind (a full disk must not fill up further).
            let _ = fs::remove_file(path);
        }
        done
    }

    fn remove(&self, digest: &Digest) -> io::Result<bool> {
        match fs::remove_file(self.path(digest)) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn list(&self) -> io::Result<Vec<(Digest, u64)>> {
        let mut out = Vec::new();
        for algo in [Algorithm::Sha256, Algorithm::Sha512] {
            let dir = self.blobs.join(algo.as_str());
            let Ok(prefixes) = fs::read_dir(&dir) else {
                continue;
            };
            for prefix in prefixes {
                for entry in fs::read_dir(prefix?.path())? {
                    let entry = entry?;
                    let name = entry.file_name();
                    let text = format!("{}:{}", algo.as_str(), name.to_string_lossy());
                    if let Ok(d) = Digest::parse(&text) {
                        out.push((d, entry.metadata()?.len()));
                    }
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_makes_visible_and_tmp_is_cleared_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobStore::open(dir.path()).unwrap();
        let d = Digest::sha256(b"abc");
        let mut w = store.writer(Verifier::new(Algorithm::Sha256)).unwrap();
        w.write(b"abc").unwrap();
        assert!(store.open(&d).unwrap().is_none(), "visible before commit");
        let tmp_path = w.path.clone();
        assert_eq!(w.verifier.current(), d);
        store.commit(w, &d).unwrap();
        assert_eq!(store.stat(&d).unwrap(), Some(3));
        assert!(!tmp_path.exists());
        // A leftover temp file from a crash is removed at the next open.
        let mut w = store.writer(Verifier::new(Algorithm::Sha256)).unwrap();
        w.write(b"partial").unwrap();
        drop(w);
        let store = FsBlobStore::open(dir.path()).unwrap();
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        assert_eq!(store.list().unwrap(), vec![(d, 3)]);
    }
}
