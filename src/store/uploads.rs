//! Resumable upload sessions: `DATA/uploads/<uuid>/{data,state}`, with the hasher state saved so a
//! session resumed after a restart keeps hashing instead of starting over.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::blobs::BlobWriter;
use crate::oci::digest::{Algorithm, Verifier};

/// One upload session; lock it to append.
pub struct Session {
    /// Session id (the `<uuid>` of its URL).
    pub id: String,
    /// Repository it belongs to.
    pub repo: String,
    /// Data file, hasher and byte count; `None` while a blocking write holds it.
    pub writer: Option<BlobWriter>,
    dir: PathBuf,
}

#[derive(Serialize, Deserialize)]
struct SavedState {
    repo: String,
    offset: u64,
    hasher: String,
}

impl Session {
    /// Bytes received so far.
    pub fn offset(&self) -> u64 {
        self.writer.as_ref().map_or(0, |w| w.written)
    }

    /// Persists offset and hasher state (atomically replacing the previous state).
    pub fn save(&self) -> io::Result<()> {
        let Some(w) = &self.writer else { return Ok(()) };
        let state = SavedState {
            repo: self.repo.clone(),
            offset: w.written,
            hasher: hex::encode(w.verifier.save()),
        };
        let tmp = self.dir.join("state.tmp");
        fs::write(&tmp, serde_json::to_vec(&state).map_err(io::Error::other)?)?;
        fs::rename(tmp, self.dir.join("state"))
    }
}

/// Handle to a session shared by concurrent requests.
pub type SessionRef = Arc<tokio::sync::Mutex<Session>>;

/// All upload sessions of this node.
pub struct Uploads {
    root: PathBuf,
    live: Mutex<HashMap<String, SessionRef>>,
}

impl Uploads {
    /// Opens (creating) `DATA/uploads`.
    pub fn open(data_dir: &Path) -> io::Result<Uploads> {
        let root = data_dir.join("uploads");
        fs::create_dir_all(&root)?;
        Ok(Uploads {
            root,
            live: Mutex::new(HashMap::new()),
        })
    }

    /// Starts a session for `repo`.
    pub fn create(&self, repo: &str) -> io::Result<SessionRef> {
        let id = uuid::Uuid::new_v4().to_string();
        let dir = self.root.join(&id);
        fs::create_dir(&dir)?;
        let path = dir.join("data");
        let file = OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(&path)?;
        let session = Session {
            id: id.clone(),
            repo: repo.to_string(),
            writer: Some(BlobWriter {
                file,
                path,
                written: 0,
                verifier: Verifier::new(Algorithm::Sha256),
            }),
            dir,
        };
        session.save()?;
        let session = Arc::new(tokio::sync::Mutex::new(session));
        self.live.lock().unwrap().insert(id, session.clone());
        Ok(session)
    }

    /// Finds a session, loading it from disk after a restart. `None` if unknown or malformed.
    pub fn get(&self, id: &str) -> io::Result<Option<SessionRef>> {
        if uuid::Uuid::parse_str(id).is_err() {
            return Ok(None);
        }
        if let Some(s) = self.live.lock().unwrap().get(id) {
            return Ok(Some(s.clone()));
        }
        let dir = self.root.join(id);
        let Some(session) = load(id, &dir)? else {
            return Ok(None);
        };
        let session = Arc::new(tokio::sync::Mutex::new(session));
        let mut live = self.live.lock().unwrap();
        Ok(Some(live.entry(id.to_string()).or_insert(session).clone()))
    }

    /// Forgets a session and deletes its files (after commit or cancel).
    pub fn remove(&self, id: &str) -> io::Result<()> {
        self.live.lock().unwrap().remove(id);
        match fs::remove_dir_all(self.root.join(id)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Removes sessions whose state was not touched for `max_age`; returns how many.
    pub fn expire(&self, max_age: Duration) -> io::Result<usize> {
        let mut removed = 0;
        let now = SystemTime::now();
        for entry in fs::read_dir(&self.root)? {
            let entry = entry?;
            let touched = fs::metadata(entry.path().join("state"))
                .and_then(|m| m.modified())
                .or_else(|_| entry.metadata().and_then(|m| m.modified()))?;
            if now.duration_since(touched).unwrap_or_default() > max_age {
                self.remove(&entry.file_name().to_string_lossy())?;
                removed += 1;
            }
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
    let file = OpenOptions::new().append(true).read(true).open(&path)?;
    let len = file.metadata()?.len();
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
        writer: Some(BlobWriter {
            file,
            path,
            written: len,
            verifier,
        }),
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

    #[tokio::test]
    async fn session_survives_restart_with_hasher_state() {
        let dir = tempfile::tempdir().unwrap();
        let uploads = Uploads::open(dir.path()).unwrap();
        let s = uploads.create("r/a").unwrap();
        let id = {
            let mut s = s.lock().await;
            s.writer.as_mut().unwrap().write(b"hello ").unwrap();
            s.save().unwrap();
            s.id.clone()
        };
        drop(uploads);
        let uploads = Uploads::open(dir.path()).unwrap();
        let s = uploads.get(&id).unwrap().unwrap();
        let mut s = s.lock().await;
        assert_eq!(s.offset(), 6);
        assert_eq!(s.repo, "r/a");
        let w = s.writer.as_mut().unwrap();
        w.write(b"world").unwrap();
        assert_eq!(w.verifier.current(), Digest::sha256(b"hello world"));
    }

    #[tokio::test]
    async fn bytes_written_after_the_last_save_are_rehashed() {
        let dir = tempfile::tempdir().unwrap();
        let uploads = Uploads::open(dir.path()).unwrap();
        let s = uploads.create("r/a").unwrap();
        let id = {
            let mut s = s.lock().await;
            s.writer.as_mut().unwrap().write(b"abc").unwrap();
            s.save().unwrap();
            s.writer.as_mut().unwrap().write(b"def").unwrap(); // killed before save
            s.id.clone()
        };
        drop((s, uploads));
        let uploads = Uploads::open(dir.path()).unwrap();
        let s = uploads.get(&id).unwrap().unwrap();
        let s = s.lock().await;
        assert_eq!(s.offset(), 6);
        assert_eq!(
            s.writer.as_ref().unwrap().verifier.current(),
            Digest::sha256(b"abcdef")
        );
        assert!(uploads.get("not-a-uuid").unwrap().is_none());
    }
}
