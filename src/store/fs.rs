//! Filesystem blob backend.
//!
//! - blobs: `DATA/blobs/<algo>/<2 hex>/<hex>`, renamed into place after `fsync`, directory
//!   synced after the rename;
//! - upload sessions: `DATA/uploads/<uuid>/data` with their checkpoint in `state`;
//! - the cache's fetches: `DATA/partial/<algo>-<hex>` with their checkpoint in `<…>.state`;
//! - one-shot writes: `DATA/tmp/<uuid>`, emptied at open (never committed: a crash interrupted
//!   them).
//!
//! A checkpoint file is the offset (8 bytes, big-endian) followed by the caller's state,
//! replaced atomically (written aside, then renamed).

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;

use super::blobs::{
    explain, BlobInfo, BlobRead, BlobStore, BlobWrite, Checkpoint, FileRegion, Pending,
    PendingInfo, PendingKind, Pieces,
};
use crate::oci::digest::{Algorithm, Digest};

/// Blob store on a local filesystem.
pub struct FsBlobStore {
    layout: Arc<Layout>,
    /// Digests `put` stored or found here, and not deleted since: putting the same small blob
    /// again (a manifest pushed under another tag) is then answered without a trip to the
    /// blocking pool.
    known: moka::sync::Cache<Digest, ()>,
}

/// Digests remembered by `put` (about 100 bytes each).
const KNOWN_PUTS: u64 = 100_000;

struct Layout {
    blobs: PathBuf,
    tmp: PathBuf,
    uploads: PathBuf,
    partial: PathBuf,
}

impl Layout {
    fn blob(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.blobs
            .join(digest.algorithm().as_str())
            .join(&hex[..2])
            .join(hex)
    }

    /// The data file of a pending write and where its checkpoint goes.
    fn pending(&self, key: &Pending) -> (PathBuf, PathBuf) {
        match key {
            Pending::Upload(id) => {
                let dir = self.uploads.join(id.to_string());
                (dir.join("data"), dir.join("state"))
            }
            Pending::Fetch(d) => {
                let data = self.partial.join(partial_name(d));
                let state = data.with_extension("state");
                (data, state)
            }
            Pending::Temp(id) => {
                let data = self.tmp.join(id.to_string());
                let state = data.with_extension("state");
                (data, state)
            }
        }
    }
}

fn partial_name(d: &Digest) -> String {
    format!("{}-{}", d.algorithm().as_str(), d.hex())
}

fn not_found<T>(r: io::Result<T>) -> io::Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(io::Error::other)?
}

fn info(meta: &fs::Metadata) -> BlobInfo {
    BlobInfo {
        size: meta.len(),
        modified: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
    }
}

/// The region `[offset, offset + len)` of an open file of `size` bytes.
fn region(file: File, size: u64, offset: u64, len: Option<u64>) -> io::Result<BlobRead> {
    if offset > size {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("read at {offset} past the end of a blob of {size} bytes"),
        ));
    }
    let len = len.map_or(size - offset, |l| l.min(size - offset));
    Ok(BlobRead::Local(FileRegion::new(
        Arc::new(file),
        offset,
        len,
    )))
}

fn open_region(path: &Path, offset: u64, len: Option<u64>) -> io::Result<Option<BlobRead>> {
    let Some(file) = not_found(File::open(path))? else {
        return Ok(None);
    };
    let size = file.metadata()?.len();
    region(file, size, offset, len).map(Some)
}

fn read_checkpoint(path: &Path) -> io::Result<Option<Checkpoint>> {
    let Some(bytes) = not_found(fs::read(path))? else {
        return Ok(None);
    };
    let offset = bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes);
    Ok(offset.map(|offset| Checkpoint {
        offset,
        state: bytes[8..].to_vec(),
    }))
}

impl FsBlobStore {
    /// Opens (creating) the directories under `data_dir`, emptying leftovers in tmp.
    pub fn open(data_dir: &Path) -> io::Result<FsBlobStore> {
        let layout = Layout {
            blobs: data_dir.join("blobs"),
            tmp: data_dir.join("tmp"),
            uploads: data_dir.join("uploads"),
            partial: data_dir.join("partial"),
        };
        // Whatever sits in tmp was never committed: a crash interrupted it.
        if layout.tmp.exists() {
            fs::remove_dir_all(&layout.tmp)?;
        }
        for dir in [&layout.blobs, &layout.tmp, &layout.uploads, &layout.partial] {
            fs::create_dir_all(dir)?;
        }
        Ok(FsBlobStore {
            layout: Arc::new(layout),
            known: moka::sync::Cache::new(KNOWN_PUTS),
        })
    }

    /// The data file of a pending write (the store's own unit tests look at it).
    #[cfg(test)]
    pub(crate) fn pending_path(&self, key: &Pending) -> PathBuf {
        self.layout.pending(key).0
    }

    fn list_blobs(
        &self,
        after: Option<&Digest>,
        limit: usize,
    ) -> io::Result<Vec<(Digest, BlobInfo)>> {
        let after = after.map(|d| d.as_str().to_string());
        let mut out = Vec::new();
        let mut algos = [Algorithm::Sha256, Algorithm::Sha512];
        algos.sort_by_key(|a| a.as_str());
        for algo in algos {
            let Some(prefixes) = not_found(fs::read_dir(self.layout.blobs.join(algo.as_str())))?
            else {
                continue;
            };
            let mut prefixes: Vec<(String, PathBuf)> = prefixes
                .filter_map(|e| e.ok())
                .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
                .collect();
            prefixes.sort();
            for (prefix, dir) in prefixes {
                // A whole directory sorts before `after`: skip it unread.
                let last_possible = format!("{}:{prefix}\u{10FFFF}", algo.as_str());
                if after
                    .as_deref()
                    .is_some_and(|a| last_possible.as_str() <= a)
                {
                    continue;
                }
                let mut names: Vec<(String, fs::DirEntry)> = fs::read_dir(&dir)?
                    .filter_map(|e| e.ok())
                    .map(|e| {
                        (
                            format!("{}:{}", algo.as_str(), e.file_name().to_string_lossy()),
                            e,
                        )
                    })
                    .filter(|(text, _)| after.as_deref().is_none_or(|a| text.as_str() > a))
                    .collect();
                names.sort_by(|a, b| a.0.cmp(&b.0));
                for (text, entry) in names {
                    let Ok(digest) = Digest::parse(&text) else {
                        continue;
                    };
                    let Some(meta) = not_found(entry.metadata())? else {
                        continue;
                    };
                    out.push((digest, info(&meta)));
                    if out.len() >= limit {
                        return Ok(out);
                    }
                }
            }
        }
        Ok(out)
    }

    fn list_pending_now(&self, kind: PendingKind) -> io::Result<Vec<PendingInfo>> {
        let mut out = Vec::new();
        let dir = match kind {
            PendingKind::Upload => &self.layout.uploads,
            PendingKind::Fetch => &self.layout.partial,
        };
        for entry in fs::read_dir(dir)? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            let key = match kind {
                PendingKind::Upload => match uuid::Uuid::parse_str(&name) {
                    Ok(id) => Pending::Upload(id),
                    Err(_) => continue,
                },
                PendingKind::Fetch => {
                    let Some((algo, hex)) = name.split_once('-') else {
                        continue;
                    };
                    match Digest::parse(&format!("{algo}:{hex}")) {
                        Ok(d) => Pending::Fetch(d),
                        Err(_) => continue,
                    }
                }
            };
            out.extend(stat_pending_files(&self.layout, key)?);
        }
        Ok(out)
    }
}

/// Bytes an unprivileged writer may still use on the volume holding `dir` (statvfs
/// `f_bavail * f_frsize`). Blocking.
pub fn free_bytes(dir: &Path) -> io::Result<u64> {
    Ok(volume_bytes(dir)?.0)
}

/// Free (for unprivileged writers) and used bytes of the volume holding `dir` (statvfs:
/// `f_bavail * f_frsize` as [`free_bytes`], `(f_blocks - f_bfree) * f_frsize`). Blocking.
pub fn volume_bytes(dir: &Path) -> io::Result<(u64, u64)> {
    let st = rustix::fs::statvfs(dir)?;
    let used = st.f_blocks.saturating_sub(st.f_bfree);
    Ok((
        st.f_bavail.saturating_mul(st.f_frsize),
        used.saturating_mul(st.f_frsize),
    ))
}

/// Size of the volume holding `dir` (statvfs `f_blocks * f_frsize`). Blocking.
pub fn volume_size(dir: &Path) -> io::Result<u64> {
    let st = rustix::fs::statvfs(dir)?;
    Ok(st.f_blocks.saturating_mul(st.f_frsize))
}

fn stat_pending_files(layout: &Layout, key: Pending) -> io::Result<Option<PendingInfo>> {
    let (data, state) = layout.pending(&key);
    let data_meta = not_found(fs::metadata(&data))?;
    let state_meta = not_found(fs::metadata(&state))?;
    let Some(data_meta) = data_meta else {
        // A checkpoint without data (killed between the two removals): drop it.
        if state_meta.is_some() {
            let _ = fs::remove_file(&state);
        }
        return Ok(None);
    };
    let mut info = info(&data_meta);
    if let Some(modified) = state_meta.and_then(|m| m.modified().ok()) {
        info.modified = info.modified.max(modified);
    }
    Ok(Some(PendingInfo {
        checkpoint: read_checkpoint(&state)?,
        key,
        info,
    }))
}

/// Where a checkpoint is written before it replaces the last one (left behind only by a
/// crash in between).
fn aside(state: &Path) -> PathBuf {
    state.with_extension("saving")
}

fn remove_pending_files(layout: &Layout, key: &Pending) -> io::Result<bool> {
    let (data, state) = layout.pending(key);
    let existed = not_found(fs::remove_file(&data))?.is_some();
    not_found(fs::remove_file(&state))?;
    // A partial fetch's checkpoint sits beside other fetches' files, not in a directory of
    // its own: a crash's half-written one would stay forever.
    not_found(fs::remove_file(aside(&state)))?;
    if let Pending::Upload(_) = key {
        if let Some(dir) = data.parent() {
            not_found(fs::remove_dir_all(dir))?;
        }
    }
    Ok(existed)
}

#[async_trait::async_trait]
impl BlobStore for FsBlobStore {
    async fn stat(&self, digest: &Digest) -> io::Result<Option<BlobInfo>> {
        let path = self.layout.blob(digest);
        blocking(move || Ok(not_found(fs::metadata(path))?.map(|m| info(&m)))).await
    }

    async fn read(
        &self,
        digest: &Digest,
        offset: u64,
        len: Option<u64>,
    ) -> io::Result<Option<BlobRead>> {
        let path = self.layout.blob(digest);
        blocking(move || open_region(&path, offset, len)).await
    }

    async fn put(&self, digest: &Digest, bytes: Bytes) -> io::Result<()> {
        if self.known.contains_key(digest) {
            return Ok(());
        }
        if self.stat(digest).await?.is_some() {
            self.known.insert(digest.clone(), ());
            return Ok(());
        }
        let (mut w, _) = self
            .open_pending(&Pending::Temp(uuid::Uuid::new_v4()))
            .await?;
        if let Err(e) = w.write(bytes.into()).await {
            // Nothing half-written stays behind (a full disk must not fill up further).
            let _ = w.abort().await;
            return Err(e);
        }
        w.commit(digest).await?;
        self.known.insert(digest.clone(), ());
        Ok(())
    }

    async fn delete(&self, digest: &Digest) -> io::Result<bool> {
        // Forgotten before and after the removal: a put racing it stats the file again. (A put
        // that found the file just before it went is the race any check-then-skip has; the
        // collector that deletes blobs must not race pushes of what it deletes.)
        self.known.invalidate(digest);
        let path = self.layout.blob(digest);
        let removed = blocking(move || Ok(not_found(fs::remove_file(path))?.is_some())).await;
        self.known.invalidate(digest);
        removed
    }

    async fn list(
        &self,
        after: Option<&Digest>,
        limit: usize,
    ) -> io::Result<Vec<(Digest, BlobInfo)>> {
        let me = FsBlobStore {
            layout: self.layout.clone(),
            known: self.known.clone(),
        };
        let after = after.cloned();
        blocking(move || me.list_blobs(after.as_ref(), limit)).await
    }

    async fn open_pending(
        &self,
        key: &Pending,
    ) -> io::Result<(Box<dyn BlobWrite>, Option<Checkpoint>)> {
        let layout = self.layout.clone();
        let key = key.clone();
        blocking(move || {
            let (data, state) = layout.pending(&key);
            if let Some(dir) = data.parent() {
                fs::create_dir_all(dir).map_err(|e| explain(e, &dir.display()))?;
            }
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .open(&data)
                .map_err(|e| explain(e, &data.display()))?;
            let written = file.metadata()?.len();
            let checkpoint = read_checkpoint(&state)?;
            let w: Box<dyn BlobWrite> = Box::new(FsWrite {
                key,
                file: Arc::new(file),
                data,
                state,
                written,
                layout,
            });
            Ok((w, checkpoint))
        })
        .await
    }

    async fn read_pending(
        &self,
        key: &Pending,
        offset: u64,
        len: Option<u64>,
    ) -> io::Result<Option<BlobRead>> {
        let (data, _) = self.layout.pending(key);
        blocking(move || open_region(&data, offset, len)).await
    }

    async fn list_pending(&self, kind: PendingKind) -> io::Result<Vec<PendingInfo>> {
        let me = FsBlobStore {
            layout: self.layout.clone(),
            known: self.known.clone(),
        };
        blocking(move || me.list_pending_now(kind)).await
    }

    async fn stat_pending(&self, key: &Pending) -> io::Result<Option<PendingInfo>> {
        let layout = self.layout.clone();
        let key = key.clone();
        blocking(move || stat_pending_files(&layout, key)).await
    }

    async fn remove_pending(&self, key: &Pending) -> io::Result<bool> {
        let layout = self.layout.clone();
        let key = key.clone();
        blocking(move || remove_pending_files(&layout, &key)).await
    }
}

/// Writes `pieces` at `at` with as few `pwritev` calls as the kernel allows (no copy into one
/// buffer first).
pub(super) fn write_all_at(file: &File, pieces: &[Bytes], mut at: u64) -> io::Result<()> {
    let (mut index, mut skip) = (0, 0);
    while index < pieces.len() {
        let slices: Vec<io::IoSlice<'_>> = std::iter::once(&pieces[index][skip..])
            .chain(pieces[index + 1..].iter().map(|p| &p[..]))
            .take(1024)
            .map(io::IoSlice::new)
            .collect();
        let mut n = match rustix::io::pwritev(file, &slices, at) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        };
        at += n as u64;
        while n > 0 {
            let left = pieces[index].len() - skip;
            if n >= left {
                n -= left;
                (index, skip) = (index + 1, 0);
            } else {
                skip += n;
                n = 0;
            }
        }
    }
    Ok(())
}

/// Writes at least this large start their writeback at once (smaller ones are left to the
/// kernel until the commit's `fdatasync`).
const WRITEBACK_MIN: u64 = 1 << 20;

/// Starts writing `[at, at + len)` of `file` to its disk without waiting
/// (`sync_file_range(2)`, `SYNC_FILE_RANGE_WRITE`): a large blob goes to the disk while it is
/// still being received, so the `fdatasync` at its commit only waits for the last pieces
/// instead of writing the whole blob then (the kernel's own writeback starts only past its
/// dirty threshold, gigabytes on a large machine). Advisory: a file system without it (tmpfs
/// answers nothing to do) or an error changes nothing; the commit's `fdatasync` is what makes
/// the blob durable and reports write errors.
pub(super) fn start_writeback(file: &File, at: u64, len: u64) -> bool {
    use std::os::fd::AsRawFd;
    let (Ok(at), Ok(len)) = (i64::try_from(at), i64::try_from(len)) else {
        return false;
    };
    // SAFETY: sync_file_range reads no memory of ours: it takes a descriptor, kept open by the
    // borrowed `File` for the whole call, and three integers. Neither rustix nor nix wraps it.
    #[allow(unsafe_code)]
    let done =
        unsafe { libc::sync_file_range(file.as_raw_fd(), at, len, libc::SYNC_FILE_RANGE_WRITE) };
    done == 0
}

/// A write in progress on the filesystem: positioned writes at `written`, so a failed write is
/// cut back and the file, the count and the caller's hash stay in step.
struct FsWrite {
    key: Pending,
    file: Arc<File>,
    data: PathBuf,
    state: PathBuf,
    written: u64,
    layout: Arc<Layout>,
}

#[async_trait::async_trait]
impl BlobWrite for FsWrite {
    fn key(&self) -> &Pending {
        &self.key
    }

    fn written(&self) -> u64 {
        self.written
    }

    async fn write(&mut self, pieces: Pieces) -> io::Result<()> {
        let (file, path, at) = (self.file.clone(), self.data.clone(), self.written);
        let len = pieces.len() as u64;
        blocking(move || {
            if let Err(e) = write_all_at(&file, pieces.as_slice(), at) {
                if let Err(cut) = file.set_len(at) {
                    // Bytes past `written` do not count: the next open cuts them.
                    tracing::warn!(path = %path.display(), error = %cut, "could not cut a failed write back");
                }
                return Err(explain(e, &path.display()));
            }
            if len >= WRITEBACK_MIN {
                start_writeback(&file, at, len);
            }
            Ok(())
        })
        .await?;
        self.written += len;
        Ok(())
    }

    async fn truncate(&mut self, len: u64) -> io::Result<()> {
        let file = self.file.clone();
        blocking(move || file.set_len(len)).await?;
        self.written = self.written.min(len);
        Ok(())
    }

    async fn sync(&mut self) -> io::Result<()> {
        let (file, data) = (self.file.clone(), self.data.clone());
        blocking(move || file.sync_data().map_err(|e| explain(e, &data.display()))).await
    }

    async fn checkpoint(&mut self, state: Vec<u8>) -> io::Result<()> {
        let path = self.state.clone();
        let mut saved = self.written.to_be_bytes().to_vec();
        saved.extend(state);
        blocking(move || {
            let aside = aside(&path);
            fs::write(&aside, saved).map_err(|e| explain(e, &aside.display()))?;
            fs::rename(aside, path)
        })
        .await
    }

    async fn commit(self: Box<Self>, digest: &Digest) -> io::Result<()> {
        let dest = self.layout.blob(digest);
        blocking(move || {
            let from = &self.data;
            self.file
                .sync_data()
                .map_err(|e| explain(e, &from.display()))?;
            let dir = dest
                .parent()
                .ok_or_else(|| io::Error::other("blob path without a parent"))?;
            fs::create_dir_all(dir).map_err(|e| explain(e, &dir.display()))?;
            if dest.exists() {
                // Same content already committed (content addressing): drop ours.
                remove_pending_files(&self.layout, &self.key)?;
                return Ok(());
            }
            fs::rename(from, &dest)?;
            File::open(dir)?.sync_all()?;
            remove_pending_files(&self.layout, &self.key)?;
            Ok(())
        })
        .await
    }

    async fn abort(self: Box<Self>) -> io::Result<()> {
        blocking(move || remove_pending_files(&self.layout, &self.key).map(drop)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::digest::Verifier;
    use crate::store::blobs::HashingWrite;

    /// `/dev/full` fails every write with ENOSPC: the write's count and hash stay at the last
    /// good write and the error names the cause and the file.
    #[tokio::test]
    async fn a_full_disk_leaves_the_write_at_its_last_good_offset() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobStore::open(dir.path()).unwrap();
        let data = PathBuf::from("/dev/full");
        let file = OpenOptions::new().write(true).open(&data).unwrap();
        let inner = FsWrite {
            key: Pending::Temp(uuid::Uuid::new_v4()),
            file: Arc::new(file),
            state: data.with_extension("state"),
            data,
            written: 5,
            layout: store.layout.clone(),
        };
        let mut hello = Verifier::new(Algorithm::Sha256);
        hello.update(b"hello");
        let mut w = HashingWrite::new(Box::new(inner), hello);
        for size in [10, 1 << 20] {
            let e = w.write(Bytes::from(vec![1u8; size])).await.unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::StorageFull);
            assert!(e.to_string().contains("no space left on device"), "{e}");
            assert!(e.to_string().contains("/dev/full"), "{e}");
            assert_eq!(w.written(), 5);
            assert_eq!(w.verifier.current(), Digest::sha256(b"hello"));
        }
    }

    /// The writeback call is accepted for a written range of a file on a real file system
    /// (wrong arguments would be EINVAL), and refused for a descriptor that is no file.
    #[test]
    fn writeback_starts_for_a_written_range() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)
            .unwrap();
        write_all_at(&file, &[Bytes::from(vec![7u8; 3 << 20])], 0).unwrap();
        assert!(start_writeback(&file, 1 << 20, 2 << 20));
        file.sync_data().unwrap();
        let (r, _w) = std::io::pipe().unwrap();
        let pipe = File::from(std::os::fd::OwnedFd::from(r));
        assert!(
            !start_writeback(&pipe, 0, 1),
            "a pipe has no pages to write"
        );
    }

    #[tokio::test]
    async fn removing_a_partial_fetch_removes_a_checkpoint_a_crash_left_half_written() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobStore::open(dir.path()).unwrap();
        let key = Pending::Fetch(Digest::sha256(b"x"));
        let (mut w, _) = store.open_pending(&key).await.unwrap();
        w.write(Bytes::from_static(b"x").into()).await.unwrap();
        drop(w);
        let (_, state) = store.layout.pending(&key);
        fs::write(aside(&state), b"half").unwrap();
        assert!(store.remove_pending(&key).await.unwrap());
        assert_eq!(fs::read_dir(dir.path().join("partial")).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn one_shot_writes_are_cleared_on_open_and_partials_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobStore::open(dir.path()).unwrap();
        let (mut temp, _) = store
            .open_pending(&Pending::Temp(uuid::Uuid::new_v4()))
            .await
            .unwrap();
        temp.write(Bytes::from_static(b"partial").into())
            .await
            .unwrap();
        let fetch = Pending::Fetch(Digest::sha256(b"x"));
        let (mut w, _) = store.open_pending(&fetch).await.unwrap();
        w.write(Bytes::from_static(b"x").into()).await.unwrap();
        w.checkpoint(b"state".to_vec()).await.unwrap();
        drop((temp, w));
        let store = FsBlobStore::open(dir.path()).unwrap();
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        let kept = store.list_pending(PendingKind::Fetch).await.unwrap();
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].key, fetch);
        assert_eq!(
            kept[0].checkpoint,
            Some(Checkpoint {
                offset: 1,
                state: b"state".to_vec()
            })
        );
    }
}
