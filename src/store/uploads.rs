//! Resumable upload sessions over the blob store's named writes: each session is the write
//! `Pending::Upload(id)`, its checkpoint holds the repository and the hasher state, so a session
//! resumed after a restart keeps hashing instead of starting over.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::blobs::{hash_read, BlobStore, HashingWrite, Pending, PendingKind};
use crate::oci::digest::{Algorithm, Verifier};

/// One upload session; lock it to append. It holds no open file: a request opens the write,
/// appends, and closes it again, so idle sessions cost no file descriptor.
pub struct Session {
    /// Session id (the `<uuid>` of its URL).
    pub id: String,
    /// Repository it belongs to.
    pub repo: String,
    /// Byte count and hasher state at the last chunk handed back (kept while a request's
    /// writer is out, so a request dropped mid-chunk leaves them as they were); `None` once
    /// the session was removed (committed, cancelled or expired).
    progress: Option<Progress>,
    /// Set when the session was removed while others waited for its lock.
    gone: bool,
    key: Pending,
    blobs: Arc<dyn BlobStore>,
}

/// Where an upload stands: bytes received and the hash of those bytes.
#[derive(Clone)]
pub struct Progress {
    /// Bytes received.
    pub written: u64,
    /// Hash of those bytes.
    pub verifier: Verifier,
}

/// What a session's checkpoint holds besides its offset.
#[derive(Serialize, Deserialize)]
struct SavedState {
    repo: String,
    hasher: String,
}

impl Session {
    /// Bytes received as of the last chunk handed back.
    pub fn offset(&self) -> u64 {
        self.progress.as_ref().map_or(0, |p| p.written)
    }

    /// Whether the session was removed (committed, cancelled or expired) while a request waited.
    pub fn is_gone(&self) -> bool {
        self.gone
    }

    /// Where the upload stands, if it is still open.
    pub fn progress(&self) -> Option<&Progress> {
        self.progress.as_ref()
    }

    /// The blob store's name of the session's bytes.
    pub fn key(&self) -> &Pending {
        &self.key
    }

    /// Opens the session's write for this request, positioned at the offset; give it back with
    /// [`Session::put_back`] (or [`Session::roll_back`]). The caller holds the session's lock
    /// for the whole request. `None` when the session is gone.
    pub async fn take_writer(&mut self) -> io::Result<Option<HashingWrite>> {
        if self.gone {
            return Ok(None);
        }
        let Some(progress) = self.progress.clone() else {
            return Ok(None);
        };
        let (mut write, _) = self.blobs.open_pending(&self.key).await?;
        // A crash, a failed chunk or a request dropped mid-chunk may have left bytes past the
        // offset: they do not count.
        if write.written() != progress.written {
            write.truncate(progress.written).await?;
        }
        Ok(Some(HashingWrite::new(write, progress.verifier)))
    }

    /// Takes a writer back: its count and hash become the session's, saved as its checkpoint;
    /// the write is closed.
    pub async fn put_back(&mut self, mut writer: HashingWrite) -> io::Result<()> {
        let saved = self.checkpoint(&mut writer).await;
        self.progress = Some(Progress {
            written: writer.written(),
            verifier: writer.verifier,
        });
        saved
    }

    /// Takes a writer back but returns to `to` (a chunk that did not match its range): the
    /// write is cut back, the hasher state restored.
    pub async fn roll_back(&mut self, mut writer: HashingWrite, to: Progress) -> io::Result<()> {
        let cut = writer.rewind(to.written, to.verifier.clone()).await;
        self.progress = Some(to);
        cut?;
        self.checkpoint(&mut writer).await
    }

    async fn checkpoint(&self, writer: &mut HashingWrite) -> io::Result<()> {
        let state = SavedState {
            repo: self.repo.clone(),
            hasher: hex::encode(writer.verifier.save()),
        };
        let state = serde_json::to_vec(&state).map_err(io::Error::other)?;
        writer.inner.checkpoint(state).await
    }
}

/// Handle to a session shared by concurrent requests.
pub type SessionRef = Arc<tokio::sync::Mutex<Session>>;

/// Caps on open sessions (plain numbers: the store knows no config).
#[derive(Debug, Clone, Copy)]
pub struct Caps {
    /// Sessions in total.
    pub total: usize,
    /// Sessions per repository.
    pub per_repository: usize,
    /// Sessions untouched for this long do not count: they are expired before a refusal.
    pub expiry: Duration,
}

/// Why a session could not be started.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    /// A cap is reached by live sessions.
    #[error("{0}")]
    TooMany(String),
    /// Storage failure.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// A known session: its repository, and its state once a request loaded it.
struct Entry {
    repo: String,
    loaded: Option<SessionRef>,
}

/// All upload sessions of this node.
pub struct Uploads {
    blobs: Arc<dyn BlobStore>,
    sessions: Mutex<HashMap<String, Entry>>,
}

impl Uploads {
    /// Indexes the sessions the blob store holds (for the caps).
    pub async fn open(blobs: Arc<dyn BlobStore>) -> io::Result<Uploads> {
        let mut sessions = HashMap::new();
        for pending in blobs.list_pending(PendingKind::Upload).await? {
            let Pending::Upload(id) = pending.key else {
                continue;
            };
            let state = pending
                .checkpoint
                .and_then(|c| serde_json::from_slice::<SavedState>(&c.state).ok());
            if let Some(state) = state {
                let entry = Entry {
                    repo: state.repo,
                    loaded: None,
                };
                sessions.insert(id.to_string(), entry);
            }
        }
        Ok(Uploads {
            blobs,
            sessions: Mutex::new(sessions),
        })
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        // The map is only touched by short, non-panicking sections: recover it after a panic.
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Open sessions: in total and for `repo`.
    pub fn count(&self, repo: &str) -> (usize, usize) {
        let map = self.sessions();
        let mine = map.values().filter(|e| e.repo == repo).count();
        (map.len(), mine)
    }

    fn over(&self, repo: &str, caps: Caps) -> Option<String> {
        let (total, mine) = self.count(repo);
        if mine >= caps.per_repository {
            Some(format!(
                "repository {repo} has {mine} open upload sessions, the most allowed \
                 (limits.max_uploads_per_repository); finish or cancel one, or wait for it to expire"
            ))
        } else if total >= caps.total {
            Some(format!(
                "the registry has {total} open upload sessions, the most allowed \
                 (limits.max_uploads); try again later"
            ))
        } else {
            None
        }
    }

    /// Starts a session for `repo`, within the caps. At a cap, sessions idle for longer than
    /// `caps.expiry` are expired first, so dead sessions never hold a cap.
    pub async fn create(&self, repo: &str, caps: Caps) -> Result<SessionRef, CreateError> {
        if self.over(repo, caps).is_some() {
            let removed = self.expire(caps.expiry).await?;
            if removed > 0 {
                tracing::info!(removed, "expired upload sessions removed at the cap");
            }
            if let Some(why) = self.over(repo, caps) {
                return Err(CreateError::TooMany(why));
            }
        }
        let id = uuid::Uuid::new_v4();
        let mut session = Session {
            id: id.to_string(),
            repo: repo.to_string(),
            progress: None,
            gone: false,
            key: Pending::Upload(id),
            blobs: self.blobs.clone(),
        };
        let (write, _) = self.blobs.open_pending(&session.key).await?;
        let write = HashingWrite::new(write, Verifier::new(Algorithm::Sha256));
        if let Err(e) = session.put_back(write).await {
            let _ = self.blobs.remove_pending(&session.key).await;
            return Err(e.into());
        }
        let session = Arc::new(tokio::sync::Mutex::new(session));
        self.sessions().insert(
            id.to_string(),
            Entry {
                repo: repo.to_string(),
                loaded: Some(session.clone()),
            },
        );
        Ok(session)
    }

    /// Finds a session, loading it from the store after a restart. `None` if unknown or
    /// malformed.
    pub async fn get(&self, id: &str) -> io::Result<Option<SessionRef>> {
        let Ok(uuid) = uuid::Uuid::parse_str(id) else {
            return Ok(None);
        };
        if let Some(s) = self.sessions().get(id).and_then(|e| e.loaded.clone()) {
            return Ok(Some(s));
        }
        let Some(session) = self.load(uuid).await? else {
            return Ok(None);
        };
        let repo = session.repo.clone();
        let session = Arc::new(tokio::sync::Mutex::new(session));
        let mut map = self.sessions();
        let entry = map
            .entry(id.to_string())
            .or_insert(Entry { repo, loaded: None });
        Ok(Some(entry.loaded.get_or_insert(session).clone()))
    }

    /// Rebuilds a session from the store. When the checkpoint's offset matches the bytes held,
    /// its hasher state is used; otherwise (killed between a write and the checkpoint) the
    /// bytes are hashed again.
    async fn load(&self, id: uuid::Uuid) -> io::Result<Option<Session>> {
        let key = Pending::Upload(id);
        let Some(pending) = self.blobs.stat_pending(&key).await? else {
            return Ok(None);
        };
        let Some(checkpoint) = pending.checkpoint else {
            return Ok(None);
        };
        let Ok(state) = serde_json::from_slice::<SavedState>(&checkpoint.state) else {
            return Ok(None);
        };
        let len = pending.info.size;
        let saved = hex::decode(&state.hasher)
            .ok()
            .and_then(|b| Verifier::restore(&b));
        let verifier = match saved {
            Some(v) if checkpoint.offset == len => v,
            _ => {
                let Some(read) = self.blobs.read_pending(&key, 0, Some(len)).await? else {
                    // Removed (expired, cancelled) since the stat.
                    return Ok(None);
                };
                hash_read(read, Verifier::new(Algorithm::Sha256)).await?
            }
        };
        Ok(Some(Session {
            id: id.to_string(),
            repo: state.repo,
            progress: Some(Progress {
                written: len,
                verifier,
            }),
            gone: false,
            key,
            blobs: self.blobs.clone(),
        }))
    }

    /// Ends a locked session and deletes its bytes (after commit or cancel); requests waiting
    /// for its lock then find it gone.
    pub async fn remove(&self, session: &mut Session) -> io::Result<()> {
        session.gone = true;
        session.progress = None;
        self.sessions().remove(&session.id);
        self.blobs.remove_pending(&session.key).await.map(drop)
    }

    /// Commits a locked session's bytes as the blob `digest` (the caller verified them) and
    /// ends the session. When the commit fails (a full disk at `fsync`), the session stays,
    /// complete, for another attempt.
    pub async fn commit(
        &self,
        session: &mut Session,
        digest: &crate::oci::digest::Digest,
    ) -> io::Result<()> {
        let before = session.progress.clone();
        let Some(writer) = session.take_writer().await? else {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("upload {} was completed or cancelled", session.id),
            ));
        };
        if let Err(e) = writer.inner.commit(digest).await {
            session.progress = before;
            return Err(e);
        }
        session.gone = true;
        session.progress = None;
        self.sessions().remove(&session.id);
        Ok(())
    }

    /// Removes sessions untouched for `max_age` that no request is using; returns how many.
    pub async fn expire(&self, max_age: Duration) -> io::Result<usize> {
        let mut removed = 0;
        let now = SystemTime::now();
        for pending in self.blobs.list_pending(PendingKind::Upload).await? {
            let Pending::Upload(uuid) = pending.key else {
                continue;
            };
            let id = uuid.to_string();
            if now
                .duration_since(pending.info.modified)
                .unwrap_or_default()
                <= max_age
            {
                continue;
            }
            let loaded = self.sessions().get(&id).and_then(|e| e.loaded.clone());
            match loaded {
                Some(session) => {
                    // In use right now (a long PATCH): not idle, whatever its state's age.
                    let Ok(mut s) = session.try_lock() else {
                        continue;
                    };
                    self.remove(&mut s).await?;
                }
                None => {
                    self.sessions().remove(&id);
                    self.blobs.remove_pending(&pending.key).await?;
                }
            }
            removed += 1;
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::digest::Digest;
    use crate::store::fs::FsBlobStore;
    use bytes::Bytes;
    use std::fs;
    use std::path::{Path, PathBuf};

    const CAPS: Caps = Caps {
        total: 8,
        per_repository: 2,
        expiry: Duration::from_secs(3600),
    };

    fn store(dir: &Path) -> (Arc<FsBlobStore>, Arc<dyn BlobStore>) {
        let fs = Arc::new(FsBlobStore::open(dir).unwrap());
        (fs.clone(), fs)
    }

    async fn uploads(dir: &Path) -> (Arc<FsBlobStore>, Uploads) {
        let (fs, blobs) = store(dir);
        (fs, Uploads::open(blobs).await.unwrap())
    }

    async fn append(s: &mut Session, bytes: &'static [u8]) {
        let mut w = s.take_writer().await.unwrap().unwrap();
        w.write(Bytes::from_static(bytes)).await.unwrap();
        s.put_back(w).await.unwrap();
    }

    fn data_path(fs: &FsBlobStore, s: &Session) -> PathBuf {
        fs.pending_path(s.key())
    }

    fn open_fds_on(path: &Path) -> usize {
        fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| fs::read_link(e.ok()?.path()).ok())
            .filter(|target| target == path)
            .count()
    }

    #[tokio::test]
    async fn session_survives_restart_with_hasher_state() {
        let dir = tempfile::tempdir().unwrap();
        let (_, uploads) = self::uploads(dir.path()).await;
        let s = uploads.create("r/a", CAPS).await.unwrap();
        let id = {
            let mut s = s.lock().await;
            append(&mut s, b"hello ").await;
            s.id.clone()
        };
        drop(uploads);
        let (_, uploads) = self::uploads(dir.path()).await;
        assert_eq!(
            uploads.count("r/a"),
            (1, 1),
            "sessions on disk count after a restart"
        );
        let s = uploads.get(&id).await.unwrap().unwrap();
        let mut s = s.lock().await;
        assert_eq!(s.offset(), 6);
        assert_eq!(s.repo, "r/a");
        append(&mut s, b"world").await;
        assert_eq!(
            s.progress().unwrap().verifier.current(),
            Digest::sha256(b"hello world")
        );
    }

    #[tokio::test]
    async fn bytes_written_after_the_last_save_are_rehashed() {
        let dir = tempfile::tempdir().unwrap();
        let (fs, uploads) = self::uploads(dir.path()).await;
        let s = uploads.create("r/a", CAPS).await.unwrap();
        let id = {
            let mut s = s.lock().await;
            append(&mut s, b"abc").await;
            // Killed after writing more bytes but before the checkpoint.
            let data = data_path(&fs, &s);
            let mut f = fs::OpenOptions::new().append(true).open(data).unwrap();
            std::io::Write::write_all(&mut f, b"def").unwrap();
            s.id.clone()
        };
        drop((s, uploads));
        let (_, uploads) = self::uploads(dir.path()).await;
        let s = uploads.get(&id).await.unwrap().unwrap();
        let s = s.lock().await;
        assert_eq!(s.offset(), 6);
        assert_eq!(
            s.progress().unwrap().verifier.current(),
            Digest::sha256(b"abcdef")
        );
        assert!(uploads.get("not-a-uuid").await.unwrap().is_none());
        assert!(uploads
            .get(&uuid::Uuid::new_v4().to_string())
            .await
            .unwrap()
            .is_none());
    }

    #[tokio::test]
    async fn an_idle_session_holds_no_file_descriptor() {
        let dir = tempfile::tempdir().unwrap();
        let (fs, uploads) = self::uploads(dir.path()).await;
        let s = uploads.create("r/a", CAPS).await.unwrap();
        let mut s = s.lock().await;
        let data = data_path(&fs, &s);
        assert_eq!(open_fds_on(&data), 0, "a new session keeps its file closed");
        let mut w = s.take_writer().await.unwrap().unwrap();
        assert_eq!(open_fds_on(&data), 1, "a request's writer opens it");
        w.write(Bytes::from_static(b"abc")).await.unwrap();
        s.put_back(w).await.unwrap();
        assert_eq!(open_fds_on(&data), 0, "and closes it when handed back");
        assert_eq!(s.offset(), 3);
    }

    /// A request dropped while it holds the writer (its client's connection went away and the
    /// server dropped the handler) leaves the session at its last good offset and hash: the
    /// next request goes on from there. Before, the session's state left with the writer: its
    /// offset read 0 and every later chunk was refused as "completed or cancelled".
    #[tokio::test]
    async fn a_writer_dropped_mid_chunk_leaves_the_session_usable() {
        let dir = tempfile::tempdir().unwrap();
        let (fs, uploads) = self::uploads(dir.path()).await;
        let s = uploads.create("r/a", CAPS).await.unwrap();
        let mut s = s.lock().await;
        append(&mut s, b"good ").await;
        let mut w = s.take_writer().await.unwrap().unwrap();
        w.write(Bytes::from_static(b"half a chunk")).await.unwrap();
        drop(w);
        assert_eq!(s.offset(), 5, "the last good offset");
        assert!(s.progress().is_some() && !s.is_gone());
        append(&mut s, b"rest").await;
        assert_eq!(fs::read(data_path(&fs, &s)).unwrap(), b"good rest");
        assert_eq!(
            s.progress().unwrap().verifier.current(),
            Digest::sha256(b"good rest")
        );
    }

    #[tokio::test]
    async fn a_rolled_back_chunk_leaves_the_last_good_offset_and_hash() {
        let dir = tempfile::tempdir().unwrap();
        let (fs, uploads) = self::uploads(dir.path()).await;
        let s = uploads.create("r/a", CAPS).await.unwrap();
        let mut s = s.lock().await;
        append(&mut s, b"good ").await;
        let good = s.progress().unwrap().clone();
        let mut w = s.take_writer().await.unwrap().unwrap();
        w.write(Bytes::from_static(b"half a chunk")).await.unwrap();
        s.roll_back(w, good).await.unwrap();
        assert_eq!(s.offset(), 5);
        assert_eq!(fs::metadata(data_path(&fs, &s)).unwrap().len(), 5);
        append(&mut s, b"rest").await;
        assert_eq!(fs::read(data_path(&fs, &s)).unwrap(), b"good rest");
        assert_eq!(
            s.progress().unwrap().verifier.current(),
            Digest::sha256(b"good rest")
        );
        let d = Digest::sha256(b"good rest");
        uploads.commit(&mut s, &d).await.unwrap();
        assert!(s.is_gone());
        assert_eq!(uploads.count("r/a"), (0, 0));
        assert!(!data_path(&fs, &s).exists(), "the session's files are gone");
        let blobs: Arc<dyn BlobStore> = fs;
        assert_eq!(
            blobs.read_small(&d, 100).await.unwrap().unwrap(),
            &b"good rest"[..]
        );
    }

    #[tokio::test]
    async fn caps_refuse_live_sessions_and_expire_dead_ones_first() {
        let dir = tempfile::tempdir().unwrap();
        let (fs, uploads) = self::uploads(dir.path()).await;
        let a = uploads.create("r/a", CAPS).await.unwrap();
        let _b = uploads.create("r/a", CAPS).await.unwrap();
        match uploads.create("r/a", CAPS).await {
            Err(CreateError::TooMany(why)) => assert!(why.contains("r/a"), "{why}"),
            other => panic!("third session in r/a: {:?}", other.map(|_| ())),
        }
        // Another repository still has room.
        let other = uploads.create("r/b", CAPS).await.unwrap();
        // A session in use is never expired, even when its state is old.
        let old = SystemTime::now() - Duration::from_secs(7200);
        for s in [&a, &other] {
            let data = data_path(&fs, &*s.lock().await);
            for f in [data.clone(), data.with_file_name("state")] {
                fs::File::options()
                    .write(true)
                    .open(f)
                    .unwrap()
                    .set_modified(old)
                    .unwrap();
            }
        }
        let held = a.lock().await;
        assert_eq!(
            uploads.expire(CAPS.expiry).await.unwrap(),
            1,
            "only r/b's idle one"
        );
        drop(held);
        assert!(other.lock().await.is_gone());
        // At the cap, the now idle and old session of r/a is expired to make room.
        let c = uploads.create("r/a", CAPS).await.unwrap();
        assert!(a.lock().await.is_gone());
        assert_eq!(uploads.count("r/a"), (2, 2));
        drop(c);
    }
}
