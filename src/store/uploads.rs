//! Resumable upload sessions: `DATA/uploads/<uuid>/{data,state}`, with the hasher state saved so a
//! session resumed after a restart keeps hashing instead of starting over.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::blobs::{explain, BlobWriter};
use crate::oci::digest::{Algorithm, Verifier};

/// One upload session; lock it to append. It holds no open file: a request opens the data
/// file, appends, and closes it again, so idle sessions cost no file descriptor.
pub struct Session {
    /// Session id (the `<uuid>` of its URL).
    pub id: String,
    /// Repository it belongs to.
    pub repo: String,
    /// Byte count and hasher state; `None` while a request's writer holds them, or once the
    /// session was removed (committed, cancelled or expired).
    progress: Option<Progress>,
    /// Set when the session was removed while others waited for its lock.
    gone: bool,
    dir: PathBuf,
}

/// Where an upload stands: bytes received and the hash of those bytes.
#[derive(Clone)]
pub struct Progress {
    /// Bytes received.
    pub written: u64,
    /// Hash of those bytes.
    pub verifier: Verifier,
}

#[derive(Serialize, Deserialize)]
struct SavedState {
    repo: String,
    offset: u64,
    hasher: String,
}

impl Session {
    /// Bytes received so far (while a writer is out: the offset it started from is unknown here,
    /// callers hold the session's lock for the whole request, so they never see that state).
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

    /// Path of the data file.
    pub fn data_path(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Opens the data file for this request and hands out a writer positioned at the offset;
    /// give it back with [`Session::put_back`]. `None` when the session is gone or a writer is
    /// already out. Blocking (one `open`).
    pub fn take_writer(&mut self) -> io::Result<Option<BlobWriter>> {
        if self.gone {
            return Ok(None);
        }
        let Some(progress) = self.progress.take() else {
            return Ok(None);
        };
        let path = self.data_path();
        let file = match OpenOptions::new().append(true).open(&path) {
            Ok(f) => f,
            Err(e) => {
                self.progress = Some(progress);
                return Err(explain(e, &path));
            }
        };
        // A crash or a failed chunk may have left bytes past the offset: they do not count.
        if file.metadata()?.len() != progress.written {
            file.set_len(progress.written)?;
        }
        Ok(Some(BlobWriter {
            file,
            path,
            written: progress.written,
            verifier: progress.verifier,
        }))
    }

    /// Takes a writer back: its count and hash become the session's; its file is closed.
    pub fn put_back(&mut self, writer: BlobWriter) {
        self.progress = Some(Progress {
            written: writer.written,
            verifier: writer.verifier,
        });
    }

    /// Takes a writer back but returns to `to` (a chunk that did not match its range): the file
    /// is cut back, the hasher state restored.
    pub fn roll_back(&mut self, mut writer: BlobWriter, to: Progress) -> io::Result<()> {
        let cut = writer.rewind(to.written);
        self.progress = Some(to);
        cut
    }

    /// Persists offset and hasher state (atomically replacing the previous state).
    pub fn save(&self) -> io::Result<()> {
        let Some(p) = &self.progress else {
            return Ok(());
        };
        let state = SavedState {
            repo: self.repo.clone(),
            offset: p.written,
            hasher: hex::encode(p.verifier.save()),
        };
        let tmp = self.dir.join("state.tmp");
        fs::write(&tmp, serde_json::to_vec(&state).map_err(io::Error::other)?)
            .map_err(|e| explain(e, &tmp))?;
        fs::rename(tmp, self.dir.join("state"))
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
    root: PathBuf,
    sessions: Mutex<HashMap<String, Entry>>,
}

impl Uploads {
    /// Opens (creating) `DATA/uploads` and indexes the sessions found there (for the caps).
    pub fn open(data_dir: &Path) -> io::Result<Uploads> {
        let root = data_dir.join("uploads");
        fs::create_dir_all(&root)?;
        let mut sessions = HashMap::new();
        for entry in fs::read_dir(&root)? {
            let entry = entry?;
            let id = entry.file_name().to_string_lossy().into_owned();
            if uuid::Uuid::parse_str(&id).is_err() {
                continue;
            }
            let state = fs::read(entry.path().join("state"))
                .ok()
                .and_then(|b| serde_json::from_slice::<SavedState>(&b).ok());
            if let Some(state) = state {
                let entry = Entry {
                    repo: state.repo,
                    loaded: None,
                };
                sessions.insert(id, entry);
            }
        }
        Ok(Uploads {
            root,
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
    pub fn create(&self, repo: &str, caps: Caps) -> Result<SessionRef, CreateError> {
        if self.over(repo, caps).is_some() {
            let removed = self.expire(caps.expiry)?;
            if removed > 0 {
                tracing::info!(removed, "expired upload sessions removed at the cap");
            }
            if let Some(why) = self.over(repo, caps) {
                return Err(CreateError::TooMany(why));
            }
        }
        let id = uuid::Uuid::new_v4().to_string();
        let dir = self.root.join(&id);
        fs::create_dir(&dir).map_err(|e| explain(e, &dir))?;
        let path = dir.join("data");
        let created = OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(&path)
            .map_err(|e| explain(e, &path));
        let session = Session {
            id: id.clone(),
            repo: repo.to_string(),
            progress: Some(Progress {
                written: 0,
                verifier: Verifier::new(Algorithm::Sha256),
            }),
            gone: false,
            dir,
        };
        if let Err(e) = created.and_then(|_| session.save()) {
            let _ = fs::remove_dir_all(&session.dir);
            return Err(e.into());
        }
        let session = Arc::new(tokio::sync::Mutex::new(session));
        self.sessions().insert(
            id,
            Entry {
                repo: repo.to_string(),
                loaded: Some(session.clone()),
            },
        );
        Ok(session)
    }

    /// Finds a session, loading it from disk after a restart. `None` if unknown or malformed.
    pub fn get(&self, id: &str) -> io::Result<Option<SessionRef>> {
        if uuid::Uuid::parse_str(id).is_err() {
            return Ok(None);
        }
        if let Some(s) = self.sessions().get(id).and_then(|e| e.loaded.clone()) {
            return Ok(Some(s));
        }
        let dir = self.root.join(id);
        let Some(session) = load(id, &dir)? else {
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

    /// Ends a locked session and deletes its files (after commit or cancel); requests waiting
    /// for its lock then find it gone.
    pub fn remove(&self, session: &mut Session) -> io::Result<()> {
        session.gone = true;
        session.progress = None;
        self.sessions().remove(&session.id);
        match fs::remove_dir_all(&session.dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Removes sessions whose state was not touched for `max_age` and that no request is using;
    /// returns how many. Blocking.
    pub fn expire(&self, max_age: Duration) -> io::Result<usize> {
        let mut removed = 0;
        let now = SystemTime::now();
        for entry in fs::read_dir(&self.root)? {
            let entry = entry?;
            let id = entry.file_name().to_string_lossy().into_owned();
            let touched = fs::metadata(entry.path().join("state"))
                .and_then(|m| m.modified())
                .or_else(|_| entry.metadata().and_then(|m| m.modified()))?;
            if now.duration_since(touched).unwrap_or_default() <= max_age {
                continue;
            }
            let loaded = self.sessions().get(&id).and_then(|e| e.loaded.clone());
            match loaded {
                Some(session) => {
                    // In use right now (a long PATCH): not idle, whatever its state's age.
                    let Ok(mut s) = session.try_lock() else {
                        continue;
                    };
                    self.remove(&mut s)?;
                }
                None => {
                    self.sessions().remove(&id);
                    match fs::remove_dir_all(entry.path()) {
                        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                        _ => {}
                    }
                }
            }
            removed += 1;
        }
        Ok(removed)
    }
}

/// Rebuilds a session from disk. When the saved offset matches the data file the saved hasher
/// state is used; otherwise (killed between a write and the state save) the file is rehashed.
fn load(id: &str, dir: &Path) -> io::Result<Option<Session>> {
    let state: SavedState = match fs::read(dir.join("state")) {
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(s) => s,
            Err(_) => return Ok(None),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let path = dir.join("data");
    let len = match fs::metadata(&path) {
        Ok(m) => m.len(),
        // Removed (expired, cancelled) between the state read and here.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let saved = hex::decode(&state.hasher)
        .ok()
        .and_then(|b| Verifier::restore(&b));
    let verifier = match saved {
        Some(v) if state.offset == len => v,
        _ => hash_file(&path, Algorithm::Sha256)?,
    };
    Ok(Some(Session {
        id: id.to_string(),
        repo: state.repo,
        progress: Some(Progress {
            written: len,
            verifier,
        }),
        gone: false,
        dir: dir.to_path_buf(),
    }))
}

/// Hashes a whole file (an upload resumed without usable state, or finished with another algorithm).
pub fn hash_file(path: &Path, algorithm: Algorithm) -> io::Result<Verifier> {
    let mut v = Verifier::new(algorithm);
    let mut f = File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(v);
        }
        v.update(&buf[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::digest::Digest;

    const CAPS: Caps = Caps {
        total: 8,
        per_repository: 2,
        expiry: Duration::from_secs(3600),
    };

    fn append(s: &mut Session, bytes: &[u8]) {
        let mut w = s.take_writer().unwrap().unwrap();
        w.write(bytes).unwrap();
        s.put_back(w);
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
        let uploads = Uploads::open(dir.path()).unwrap();
        let s = uploads.create("r/a", CAPS).unwrap();
        let id = {
            let mut s = s.lock().await;
            append(&mut s, b"hello ");
            s.save().unwrap();
            s.id.clone()
        };
        drop(uploads);
        let uploads = Uploads::open(dir.path()).unwrap();
        assert_eq!(
            uploads.count("r/a"),
            (1, 1),
            "sessions on disk count after a restart"
        );
        let s = uploads.get(&id).unwrap().unwrap();
        let mut s = s.lock().await;
        assert_eq!(s.offset(), 6);
        assert_eq!(s.repo, "r/a");
        append(&mut s, b"world");
        assert_eq!(
            s.progress().unwrap().verifier.current(),
            Digest::sha256(b"hello world")
        );
    }

    #[tokio::test]
    async fn bytes_written_after_the_last_save_are_rehashed() {
        let dir = tempfile::tempdir().unwrap();
        let uploads = Uploads::open(dir.path()).unwrap();
        let s = uploads.create("r/a", CAPS).unwrap();
        let id = {
            let mut s = s.lock().await;
            append(&mut s, b"abc");
            s.save().unwrap();
            append(&mut s, b"def"); // killed before save
            s.id.clone()
        };
        drop((s, uploads));
        let uploads = Uploads::open(dir.path()).unwrap();
        let s = uploads.get(&id).unwrap().unwrap();
        let s = s.lock().await;
        assert_eq!(s.offset(), 6);
        assert_eq!(
            s.progress().unwrap().verifier.current(),
            Digest::sha256(b"abcdef")
        );
        assert!(uploads.get("not-a-uuid").unwrap().is_none());
    }

    #[tokio::test]
    async fn an_idle_session_holds_no_file_descriptor() {
        let dir = tempfile::tempdir().unwrap();
        let uploads = Uploads::open(dir.path()).unwrap();
        let s = uploads.create("r/a", CAPS).unwrap();
        let mut s = s.lock().await;
        let data = s.data_path();
        assert_eq!(open_fds_on(&data), 0, "a new session keeps its file closed");
        let mut w = s.take_writer().unwrap().unwrap();
        assert_eq!(open_fds_on(&data), 1, "a request's writer opens it");
        w.write(b"abc").unwrap();
        s.put_back(w);
        assert_eq!(open_fds_on(&data), 0, "and closes it when handed back");
        assert_eq!(s.offset(), 3);
    }

    #[tokio::test]
    async fn a_rolled_back_chunk_leaves_the_last_good_offset_and_hash() {
        let dir = tempfile::tempdir().unwrap();
        let uploads = Uploads::open(dir.path()).unwrap();
        let s = uploads.create("r/a", CAPS).unwrap();
        let mut s = s.lock().await;
        append(&mut s, b"good ");
        let good = s.progress().unwrap().clone();
        let mut w = s.take_writer().unwrap().unwrap();
        w.write(b"half a chunk").unwrap();
        s.roll_back(w, good).unwrap();
        assert_eq!(s.offset(), 5);
        assert_eq!(fs::metadata(s.data_path()).unwrap().len(), 5);
        append(&mut s, b"rest");
        assert_eq!(fs::read(s.data_path()).unwrap(), b"good rest");
        assert_eq!(
            s.progress().unwrap().verifier.current(),
            Digest::sha256(b"good rest")
        );
    }

    #[tokio::test]
    async fn caps_refuse_live_sessions_and_expire_dead_ones_first() {
        let dir = tempfile::tempdir().unwrap();
        let uploads = Uploads::open(dir.path()).unwrap();
        let a = uploads.create("r/a", CAPS).unwrap();
        let _b = uploads.create("r/a", CAPS).unwrap();
        match uploads.create("r/a", CAPS) {
            Err(CreateError::TooMany(why)) => assert!(why.contains("r/a"), "{why}"),
            other => panic!("third session in r/a: {:?}", other.map(|_| ())),
        }
        // Another repository still has room.
        let other = uploads.create("r/b", CAPS).unwrap();
        // A session in use is never expired, even when its state is old.
        let old = SystemTime::now() - Duration::from_secs(7200);
        for s in [&a, &other] {
            let dir = s.lock().await.dir.clone();
            File::options()
                .write(true)
                .open(dir.join("state"))
                .unwrap()
                .set_modified(old)
                .unwrap();
        }
        let held = a.lock().await;
        assert_eq!(
            uploads.expire(CAPS.expiry).unwrap(),
            1,
            "only r/b's idle one"
        );
        drop(held);
        assert!(other.lock().await.is_gone());
        // At the cap, the now idle and old session of r/a is expired to make room.
        let c = uploads.create("r/a", CAPS).unwrap();
        assert!(a.lock().await.is_gone());
        assert_eq!(uploads.count("r/a"), (2, 2));
        drop(c);
    }
}
