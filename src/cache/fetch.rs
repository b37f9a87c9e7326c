//! Single-flight tee fetch of a blob from the source.
//!
//! One task per blob writes the source's bytes to a partial file and publishes how many are in it
//! on a `watch`; every client, the first included, streams from that file up to the published
//! length. The same shape gives "N clients, 1 fetch", "the fetch goes on when the client leaves",
//! "Range on a cold blob" and "resume after the budget" (the partial file and its hasher state
//! stay; the next fetch asks the source for the rest with `Range`).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use tokio::sync::{mpsc, watch};

use super::upstream::{Source, UpstreamError, UpstreamRequest};
use crate::http::body::{Body, READ_CHUNK};
use crate::oci::digest::{Digest, Verifier};
use crate::store::Store;

/// Where a fetch stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Bytes are arriving.
    Running,
    /// Verified and committed to the blob store.
    Done,
    /// Stopped; the message says why. A partial file may remain for the next fetch to resume.
    Failed(Arc<str>),
}

/// What readers see of a fetch.
#[derive(Debug, Clone)]
pub struct Progress {
    /// Blob size, once the source told it.
    pub size: Option<u64>,
    /// Bytes in the partial file (a reader may read up to here).
    pub written: u64,
    /// Phase.
    pub phase: Phase,
    /// Whether the source's 404 ended it.
    pub not_found: bool,
    /// The bytes matched the digest (readers may have the last byte; the commit may still run).
    pub verified: bool,
}

/// One blob fetch in flight.
pub struct Fetch {
    /// The blob.
    pub digest: Digest,
    file: Arc<File>,
    progress: watch::Sender<Progress>,
    /// Repositories to link the blob into once committed.
    link_to: Mutex<Vec<String>>,
}

impl Fetch {
    /// A receiver of progress.
    pub fn subscribe(&self) -> watch::Receiver<Progress> {
        self.progress.subscribe()
    }

    /// Waits until the size is known (or the fetch failed), at most until `deadline`.
    pub async fn size(&self, deadline: Instant) -> Result<u64, Progress> {
        let mut rx = self.subscribe();
        loop {
            let p = rx.borrow_and_update().clone();
            if let Some(size) = p.size {
                return Ok(size);
            }
            if p.phase != Phase::Running {
                return Err(p);
            }
            if tokio::time::timeout_at(deadline.into(), rx.changed())
                .await
                .is_err()
            {
                return Err(p);
            }
        }
    }

    /// A response body of `len` bytes from `start`, read from the partial file as it grows.
    pub fn body(self: &Arc<Self>, start: u64, len: u64) -> Body {
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(stream(self.clone(), start, len, tx));
        Body::File { rx, remaining: len }
    }
}

/// Longest a reader waits for the next bytes of a running fetch.
const READER_STALL: Duration = Duration::from_secs(300);

async fn stream(fetch: Arc<Fetch>, start: u64, len: u64, tx: mpsc::Sender<io::Result<Bytes>>) {
    let mut rx = fetch.subscribe();
    let end = start + len;
    let mut pos = start;
    while pos < end {
        let p = rx.borrow_and_update().clone();
        // The last byte is released only once the digest matched: a corrupt blob always ends
        // in an error, never in a complete-looking response. Durability (fsync, rename) is the
        // store's concern and does not hold clients back.
        let readable = match (&p.phase, p.size) {
            _ if p.verified => p.written,
            (Phase::Done, _) => p.written,
            (_, Some(size)) => p.written.min(size.saturating_sub(1)),
            (_, None) => p.written,
        };
        if readable > pos {
            let Ok(slot) = tx.reserve().await else { return };
            let n = (readable.min(end) - pos).min(READ_CHUNK as u64) as usize;
            let piece = crate::http::body::read_piece(fetch.file.clone(), pos, n).await;
            match piece {
                Ok(bytes) => {
                    pos += bytes.len() as u64;
                    slot.send(Ok(bytes));
                }
                Err(e) => return slot.send(Err(e)),
            }
            continue;
        }
        let stop = match &p.phase {
            Phase::Running => None,
            Phase::Done => Some("blob ended before the announced size".to_string()),
            Phase::Failed(why) => Some(format!("source fetch stopped: {why}")),
        };
        if let Some(why) = stop {
            let _ = tx.send(Err(io::Error::other(why))).await;
            return;
        }
        if tokio::time::timeout(READER_STALL, rx.changed())
            .await
            .is_err()
        {
            let _ = tx
                .send(Err(io::Error::other("source sent nothing for 300 s")))
                .await;
            return;
        }
    }
}

/// Blob fetches of this node: the in-flight map and the partial files.
pub struct Fetches {
    partial_dir: PathBuf,
    inflight: Mutex<HashMap<Digest, Arc<Fetch>>>,
}

fn partial_name(d: &Digest) -> String {
    format!("{}-{}", d.algorithm().as_str(), d.hex())
}

impl Fetches {
    /// Opens (creating) `DATA/partial`.
    pub fn open(data_dir: &Path) -> io::Result<Fetches> {
        let partial_dir = data_dir.join("partial");
        std::fs::create_dir_all(&partial_dir)?;
        Ok(Fetches {
            partial_dir,
            inflight: Mutex::new(HashMap::new()),
        })
    }

    /// Whether `digest` is being fetched.
    pub fn is_inflight(&self, digest: &Digest) -> bool {
        self.inflight.lock().contains_key(digest)
    }

    /// Whether a fetch of `digest` is in flight that will link it into `repo` when it commits
    /// (the source was asked for it under that repository).
    pub fn will_link(&self, digest: &Digest, repo: &str) -> bool {
        self.inflight
            .lock()
            .get(digest)
            .is_some_and(|f| f.link_to.lock().iter().any(|r| r == repo))
    }

    /// Digests being fetched (garbage collection must leave them alone).
    pub fn inflight_digests(&self) -> Vec<Digest> {
        self.inflight.lock().keys().cloned().collect()
    }

    /// Joins the fetch of `digest` or starts one. Returns the fetch and whether it was joined.
    pub fn join_or_start(
        self: &Arc<Self>,
        store: &Arc<Store>,
        source: &Arc<Source>,
        upstream_repo: &str,
        local_repo: &str,
        digest: &Digest,
    ) -> io::Result<(Arc<Fetch>, bool)> {
        let mut map = self.inflight.lock();
        if let Some(f) = map.get(digest) {
            f.link_to.lock().push(local_repo.to_string());
            return Ok((f.clone(), true));
        }
        let path = self.partial_dir.join(partial_name(digest));
        let (file, resume) = open_partial(&path, digest)?;
        let (written, verifier) = resume;
        let (progress, _) = watch::channel(Progress {
            size: None,
            written,
            phase: Phase::Running,
            not_found: false,
            verified: false,
        });
        let fetch = Arc::new(Fetch {
            digest: digest.clone(),
            file: Arc::new(file),
            progress,
            link_to: Mutex::new(vec![local_repo.to_string()]),
        });
        map.insert(digest.clone(), fetch.clone());
        metrics::gauge!("berth_inflight_fetches").set(map.len() as f64);
        drop(map);
        let job = Job {
            fetches: self.clone(),
            described: None,
            cap: 0,
            pending: None,
            store: store.clone(),
            source: source.clone(),
            upstream_repo: upstream_repo.to_string(),
            fetch: fetch.clone(),
            path,
            verifier,
        };
        tokio::spawn(job.run());
        Ok((fetch, false))
    }

    fn finish(&self, digest: &Digest) {
        let mut map = self.inflight.lock();
        map.remove(digest);
        metrics::gauge!("berth_inflight_fetches").set(map.len() as f64);
    }

    /// Removes partial files untouched for `max_age` (not those being fetched); returns bytes freed.
    pub fn expire_partials(&self, max_age: Duration) -> io::Result<u64> {
        let busy: Vec<String> = self.inflight_digests().iter().map(partial_name).collect();
        let mut freed = 0;
        for entry in std::fs::read_dir(&self.partial_dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let stem = name.trim_end_matches(".state");
            if busy.iter().any(|b| b == stem) {
                continue;
            }
            let meta = entry.metadata()?;
            let age = SystemTime::now()
                .duration_since(meta.modified()?)
                .unwrap_or_default();
            if age > max_age {
                freed += meta.len();
                std::fs::remove_file(entry.path())?;
            }
        }
        Ok(freed)
    }
}

/// Opens the partial file, resuming when its saved hasher state matches its length.
fn open_partial(path: &Path, digest: &Digest) -> io::Result<(File, (u64, Verifier))> {
    let state_path = path.with_extension("state");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)?;
    let len = file.metadata()?.len();
    if len > 0 {
        if let Ok(state) = std::fs::read(&state_path) {
            if let (Some(offset), Some(v)) = (
                state
                    .get(..8)
                    .and_then(|b| b.try_into().ok())
                    .map(u64::from_be_bytes),
                state.get(8..).and_then(Verifier::restore),
            ) {
                if offset <= len && v.algorithm() == digest.algorithm() {
                    file.set_len(offset)?;
                    return Ok((file, (offset, v)));
                }
            }
        }
    }
    file.set_len(0)?;
    let _ = std::fs::remove_file(&state_path);
    Ok((file, (0, Verifier::new(digest.algorithm()))))
}

/// Bytes handed to the source reader's writer: large enough to keep per-piece overhead low,
/// small enough that readers see bytes promptly.
const WRITE_PIECE: usize = 1 << 20;

/// A piece being written and hashed.
struct Piece {
    hash: tokio::task::JoinHandle<Verifier>,
    write: tokio::task::JoinHandle<io::Result<()>>,
    len: u64,
}

struct Job {
    fetches: Arc<Fetches>,
    /// The blob's size as a cached manifest of a repository it is fetched for describes it.
    described: Option<u64>,
    /// Most bytes the blob may have in the current attempt (the smaller of the source's
    /// announced size and the described size, else `pull_through.max_blob_bytes`).
    cap: u64,
    pending: Option<Piece>,
    store: Arc<Store>,
    source: Arc<Source>,
    upstream_repo: String,
    fetch: Arc<Fetch>,
    path: PathBuf,
    verifier: Verifier,
}

/// How a fetch attempt ended.
enum Ended {
    Complete,
    Retry(UpstreamError),
    Fatal(String, bool),
    Budget,
}

impl Job {
    async fn run(mut self) {
        let repos = self.fetch.link_to.lock().clone();
        let (store, digest) = (self.store.clone(), self.fetch.digest.clone());
        self.described =
            tokio::task::spawn_blocking(move || described_size(&store, &repos, &digest))
                .await
                .ok()
                .flatten();
        let budget = self.source.config.fetch_budget;
        let deadline = Instant::now() + budget;
        let started_at = self.fetch.progress.borrow().written;
        let mut backoff = Duration::from_millis(200);
        let outcome = loop {
            match self.attempt(deadline).await {
                Ended::Retry(e)
                    if Instant::now() + e.retry_after().unwrap_or(backoff) < deadline =>
                {
                    let wait = e.retry_after().unwrap_or(backoff);
                    tracing::warn!(digest = %self.fetch.digest, cache = %self.source.name(), error = %e, ?wait, "blob fetch interrupted; resuming with Range");
                    tokio::time::sleep(wait).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
                Ended::Retry(e) => break Err((e.to_string(), e.is_not_found(), true)),
                Ended::Budget => {
                    metrics::counter!("berth_cache_budget_expiries_total").increment(1);
                    break Err((
                        format!("fetch budget of {budget:?} spent; the next request resumes"),
                        false,
                        true,
                    ));
                }
                Ended::Fatal(why, not_found) => break Err((why, not_found, false)),
                Ended::Complete => break self.commit().await.map_err(|e| (e, false, false)),
            }
        };
        let fetched = self
            .fetch
            .progress
            .borrow()
            .written
            .saturating_sub(started_at);
        match outcome {
            Ok(()) => {
                tracing::info!(digest = %self.fetch.digest, cache = %self.source.name(), bytes = fetched, "blob cached");
                self.fetch.progress.send_modify(|p| p.phase = Phase::Done);
                self.fetches.finish(&self.fetch.digest);
            }
            Err((why, not_found, keep_partial)) => {
                if keep_partial {
                    self.save_state();
                } else {
                    self.discard();
                }
                tracing::warn!(digest = %self.fetch.digest, cache = %self.source.name(), error = %why, "blob fetch stopped");
                // Leave the in-flight map before readers learn of the failure: a request that
                // follows their error starts a fresh fetch instead of joining this failed one.
                self.fetches.finish(&self.fetch.digest);
                self.fetch.progress.send_modify(|p| {
                    p.phase = Phase::Failed(why.into());
                    p.not_found = not_found;
                });
            }
        }
    }

    async fn attempt(&mut self, deadline: Instant) -> Ended {
        let offset = self.fetch.progress.borrow().written;
        let mut headers = HeaderMap::new();
        if offset > 0 {
            if let Ok(v) = HeaderValue::from_str(&format!("bytes={offset}-")) {
                headers.insert(http::header::RANGE, v);
            }
        }
        let req = UpstreamRequest {
            method: Method::GET,
            path: format!("{}/blobs/{}", self.upstream_repo, self.fetch.digest),
            repo: &self.upstream_repo,
            headers,
        };
        let response = match self.source.send(&req, deadline).await {
            Ok(r) => r,
            Err(e) if e.is_transient() => return Ended::Retry(e),
            Err(e) => return Ended::Fatal(e.to_string(), e.is_not_found()),
        };
        // Skip bytes already held when the source ignored Range and sent the whole blob.
        let mut skip = 0u64;
        let size = if response.status() == StatusCode::PARTIAL_CONTENT {
            let total = response
                .headers()
                .get(http::header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| {
                    let (range, total) = v.trim_start_matches("bytes ").split_once('/')?;
                    let start: u64 = range.split('-').next()?.parse().ok()?;
                    (start == offset).then(|| total.parse::<u64>().ok())?
                });
            match total {
                Some(t) => Some(t),
                None => {
                    return Ended::Fatal(
                        "source answered Range with an unexpected Content-Range".into(),
                        false,
                    )
                }
            }
        } else {
            skip = offset;
            response.content_length()
        };
        // The most the blob can have: the smaller of what the source announces and what a cached
        // manifest describes; where neither is known, `pull_through.max_blob_bytes`.
        self.cap = match (size, self.described) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b).unwrap_or_else(|| self.source.max_blob_bytes()),
        };
        if let Some(size) = size {
            self.fetch.progress.send_modify(|p| p.size = Some(size));
        }
        self.pump(response, skip, deadline).await
    }

    async fn pump(
        &mut self,
        mut response: reqwest::Response,
        mut skip: u64,
        deadline: Instant,
    ) -> Ended {
        let mut buf = BytesMut::new();
        // Bytes of the blob held once this chunk is in: a source that sends more than the blob
        // can have is cut off at once, whatever its Content-Length said.
        let mut received = self.fetch.progress.borrow().written;
        loop {
            let chunk = match tokio::time::timeout_at(deadline.into(), response.chunk()).await {
                Err(_) => {
                    return match self.flush(&mut buf).await {
                        Ok(()) => Ended::Budget,
                        Err(e) => Ended::Fatal(e, false),
                    };
                }
                Ok(Err(e)) => {
                    let flushed = self.flush(&mut buf).await;
                    return match flushed {
                        Ok(()) => Ended::Retry(UpstreamError::Unreachable(
                            super::upstream::error_chain(&e.without_url()),
                        )),
                        Err(e) => Ended::Fatal(e, false),
                    };
                }
                Ok(Ok(None)) => {
                    if let Err(e) = self.flush(&mut buf).await {
                        return Ended::Fatal(e, false);
                    }
                    return Ended::Complete;
                }
                Ok(Ok(Some(c))) => c,
            };
            let mut chunk = chunk;
            if skip > 0 {
                let n = skip.min(chunk.len() as u64) as usize;
                skip -= n as u64;
                chunk = chunk.slice(n..);
            }
            metrics::counter!("berth_upstream_fetch_bytes_total").increment(chunk.len() as u64);
            received += chunk.len() as u64;
            if received > self.cap {
                let _ = self.settle().await;
                metrics::counter!("berth_cache_oversized_fetches_total").increment(1);
                return Ended::Fatal(
                    format!(
                        "source sent more than {} bytes for {}: stopped and discarded",
                        self.cap, self.fetch.digest
                    ),
                    false,
                );
            }
            buf.extend_from_slice(&chunk);
            // Hand a piece to the writer and keep reading the source while it is written and
            // hashed; readers see it once it is in the file.
            if buf.len() >= WRITE_PIECE {
                if let Err(e) = self.submit(buf.split().freeze()).await {
                    return Ended::Fatal(e, false);
                }
            }
        }
    }

    /// Waits for the piece in flight (written and hashed, on two blocking tasks at once), then
    /// publishes the new length.
    async fn settle(&mut self) -> Result<(), String> {
        let Some(piece) = self.pending.take() else {
            return Ok(());
        };
        let (hashed, written) = tokio::join!(piece.hash, piece.write);
        self.verifier = hashed.map_err(|e| e.to_string())?;
        written
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("cannot write partial blob: {e}"))?;
        self.fetch.progress.send_modify(|p| p.written += piece.len);
        Ok(())
    }

    /// Starts writing and hashing `data` after the piece in flight has settled.
    async fn submit(&mut self, data: Bytes) -> Result<(), String> {
        self.settle().await?;
        if data.is_empty() {
            return Ok(());
        }
        let offset = self.fetch.progress.borrow().written;
        let file = self.fetch.file.clone();
        let mut verifier = std::mem::replace(
            &mut self.verifier,
            Verifier::new(self.fetch.digest.algorithm()),
        );
        let for_hash = data.clone();
        let len = data.len() as u64;
        self.pending = Some(Piece {
            hash: tokio::task::spawn_blocking(move || {
                verifier.update(&for_hash);
                verifier
            }),
            write: tokio::task::spawn_blocking(move || {
                use std::os::unix::fs::FileExt;
                file.write_all_at(&data, offset)
            }),
            len,
        });
        Ok(())
    }

    /// Writes what is buffered and waits until everything is in the file.
    async fn flush(&mut self, buf: &mut BytesMut) -> Result<(), String> {
        self.submit(buf.split().freeze()).await?;
        self.settle().await
    }

    async fn commit(&mut self) -> Result<(), String> {
        let p = self.fetch.progress.borrow().clone();
        if let Some(size) = p.size {
            if p.written != size {
                self.discard();
                return Err(format!("source sent {} bytes of {size}", p.written));
            }
        }
        let actual = self.verifier.current();
        if actual != self.fetch.digest {
            self.discard();
            metrics::counter!("berth_cache_digest_mismatches_total").increment(1);
            return Err(format!(
                "source sent content with digest {actual}, not {}: discarded",
                self.fetch.digest
            ));
        }
        self.fetch.progress.send_modify(|p| p.verified = true);
        let (fs, file, path, digest) = (
            self.store.fs.clone(),
            self.fetch.file.clone(),
            self.path.clone(),
            self.fetch.digest.clone(),
        );
        tokio::task::spawn_blocking(move || fs.commit_file(&file, &path, &digest))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("cannot commit blob: {e}"))?;
        let _ = std::fs::remove_file(self.path.with_extension("state"));
        // Size known here even if the source never said it.
        self.fetch
            .progress
            .send_modify(|p| p.size = Some(p.written));
        let repos = std::mem::take(&mut *self.fetch.link_to.lock());
        for repo in repos {
            self.store
                .meta
                .link_blob(&repo, &self.fetch.digest, p.written)
                .map_err(|e| e.to_string())?;
        }
        self.store.meta.flush().await.map_err(|e| e.to_string())
    }

    fn save_state(&self) {
        let written = self.fetch.progress.borrow().written;
        let mut state = written.to_be_bytes().to_vec();
        state.extend(self.verifier.save());
        let _ = self.fetch.file.sync_data();
        if let Err(e) = std::fs::write(self.path.with_extension("state"), state) {
            tracing::warn!(error = %e, "cannot save partial fetch state; it will restart from zero");
        }
    }

    fn discard(&self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_file(self.path.with_extension("state"));
    }
}

/// Manifests of a repository scanned for a blob's described size (a cache repository holds a
/// few tags' worth).
const MAX_MANIFESTS_SCANNED: usize = 256;

/// The size that a manifest held in one of `repos` gives for `digest` (as config, layer or
/// artifact blob), if any.
fn described_size(store: &Store, repos: &[String], digest: &Digest) -> Option<u64> {
    for repo in repos {
        let Ok(artifacts) = store.meta.artifacts(repo) else {
            continue;
        };
        for (manifest, record) in artifacts.iter().take(MAX_MANIFESTS_SCANNED) {
            if record.size > 4 << 20 {
                continue;
            }
            if let Ok(Some(bytes)) = store.blobs.read_small(manifest, 4 << 20) {
                if let Some(size) = descriptor_size(&bytes, digest) {
                    return Some(size);
                }
            }
        }
    }
    None
}

/// The size of `digest`'s descriptor in an image or artifact manifest.
fn descriptor_size(manifest: &[u8], digest: &Digest) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct Desc {
        digest: Option<String>,
        size: Option<u64>,
    }
    #[derive(serde::Deserialize)]
    struct Manifest {
        config: Option<Desc>,
        #[serde(default)]
        layers: Vec<Desc>,
        #[serde(default)]
        blobs: Vec<Desc>,
    }
    let m: Manifest = serde_json::from_slice(manifest).ok()?;
    m.config
        .into_iter()
        .chain(m.layers)
        .chain(m.blobs)
        .find(|d| d.digest.as_deref() == Some(digest.as_str()))?
        .size
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn described_sizes_come_from_config_layers_and_blobs() {
        let layer = Digest::sha256(b"layer");
        let config = Digest::sha256(b"config");
        let m = format!(
            r#"{{"schemaVersion":2,"config":{{"digest":"{config}","size":6}},"layers":[{{"digest":"{layer}","size":5}}]}}"#
        );
        assert_eq!(descriptor_size(m.as_bytes(), &layer), Some(5));
        assert_eq!(descriptor_size(m.as_bytes(), &config), Some(6));
        assert_eq!(descriptor_size(m.as_bytes(), &Digest::sha256(b"x")), None);
        assert_eq!(descriptor_size(b"not json", &layer), None);
    }

    #[test]
    fn stale_partials_are_removed_and_resumable_state_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let fetches = Fetches::open(dir.path()).unwrap();
        let d = Digest::sha256(b"whole blob");
        let path = dir.path().join("partial").join(partial_name(&d));
        // A partial with saved hasher state resumes where it stopped.
        let mut v = Verifier::new(d.algorithm());
        v.update(b"whole");
        std::fs::write(&path, b"whole").unwrap();
        let mut state = 5u64.to_be_bytes().to_vec();
        state.extend(v.save());
        std::fs::write(path.with_extension("state"), state).unwrap();
        let (_, (offset, mut resumed)) = open_partial(&path, &d).unwrap();
        assert_eq!(offset, 5);
        resumed.update(b" blob");
        assert_eq!(resumed.finish(), d);
        // Without state it starts over.
        std::fs::remove_file(path.with_extension("state")).unwrap();
        assert_eq!(open_partial(&path, &d).unwrap().1 .0, 0);
        std::fs::write(&path, b"whole").unwrap();
        assert_eq!(
            fetches.expire_partials(Duration::from_secs(3600)).unwrap(),
            0,
            "young: kept"
        );
        assert_eq!(fetches.expire_partials(Duration::ZERO).unwrap(), 5);
        assert!(!path.exists());
    }
}
