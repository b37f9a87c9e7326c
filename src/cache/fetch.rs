//! Single-flight tee fetch of a blob from the source.
//!
//! One task per blob writes the source's bytes to a partial file and publishes how many are in it
//! on a `watch`; clients stream from that file up to the published length: as file regions that
//! a plain HTTP/1.1 connection sends with `sendfile`, as pieces read here for any other. The
//! client that starts the fetch on such another connection (TLS, HTTP/2) takes the bytes from
//! memory instead, as they go to be written, while it keeps up. The same shape gives "N
//! clients, 1 fetch", "the fetch goes on when the client leaves", "Range on a cold blob" and
//! "resume after the budget" (the partial file and its hasher state stay; the next fetch asks
//! the source for the rest with `Range`).

use std::collections::HashMap;
use std::io;
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::{Duration, Instant, SystemTime};

use http::{HeaderMap, HeaderValue, Method, StatusCode};
use tokio::sync::{mpsc, watch};

use super::health::ErrorKind;
use super::peer::{Cluster, Holder};
use super::upstream::{Source, UpstreamError, UpstreamRequest};
use crate::http::body::{read_piece, Body, Piece, Streamed, READ_CHUNK};
use crate::http::pool::Gather;
use crate::oci::digest::{Digest, Verifier};
use crate::store::blobs::{
    BlobRead, BlobStore, BlobWrite, Checkpoint, FileRegion, HashingWrite, Pending, PendingKind,
    Pieces, Pipeline,
};
use crate::store::meta::HeldLease;
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
    blobs: Arc<dyn BlobStore>,
    progress: watch::Sender<Progress>,
    /// Repositories to link the blob into once committed.
    link_to: Mutex<Vec<String>>,
    /// The fetch lease, on a node that shares its bucket with others.
    lease: Option<Arc<HeldLease>>,
}

impl Fetch {
    /// Links the blob into `repo` too once committed (a joiner asked for it there).
    pub fn link_also(&self, repo: &str) {
        let mut repos = self.link_to.lock();
        if !repos.iter().any(|r| r == repo) {
            repos.push(repo.to_string());
        }
    }

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

    /// A response body of `len` bytes from `start`, from the partial file as it grows; with
    /// `direct` (the starter of the fetch, asking from byte 0), fed the bytes the fetch holds in
    /// memory while it keeps up, unless its connection sends files: the bytes are in the page
    /// cache once written, and `sendfile` hands them to the socket without the copy that
    /// writing them from memory costs.
    pub fn body(self: &Arc<Self>, start: u64, len: u64, direct: Option<Direct>) -> Body {
        let (tx, body) = Streamed::channel(len);
        let reader = Reader {
            tx,
            regions: crate::http::body::sends_files(),
            stall: crate::http::body::deadlines().stall,
        };
        let direct = direct
            .filter(|_| start == 0 && !reader.regions)
            .map(|d| d.0);
        tokio::spawn(stream(self.clone(), start, len, direct, reader));
        body
    }
}

/// The bytes of a new fetch as it hands them to be written and hashed, for the
/// client that started it: it reads them from memory instead of reading them back. A client
/// that falls more than [`DIRECT_QUEUE`] writes behind is cut off the feed and goes on from
/// the file.
pub struct Direct(mpsc::Receiver<Pieces>);

/// Writes (of about [`WRITE_PIECE`] bytes) queued for the direct reader.
const DIRECT_QUEUE: usize = 2;

/// Bytes a reader took from the fetch's memory instead of the partial file, counted once.
struct FedFromMemory(u64);

impl Drop for FedFromMemory {
    fn drop(&mut self) {
        if self.0 > 0 {
            metrics::counter!("berth_cache_direct_bytes_total").increment(self.0);
        }
    }
}

/// Bytes asked of a streaming backend per read while following a fetch (passed on as they
/// come, never held whole).
const STREAM_SPAN: u64 = 64 << 20;

/// Longest a reader waits for the next bytes of a running fetch.
const READER_STALL: Duration = Duration::from_secs(300);

/// Where a reader's pieces go: its response body.
struct Reader {
    tx: mpsc::Sender<io::Result<Piece>>,
    /// Its connection sends file regions itself (`sendfile`, with its own stall deadline):
    /// file bytes go as regions. Other connections get bytes read here, so that a client that
    /// stops reading holds no open file once `stall` has passed (an HTTP/2 stream held by flow
    /// control is never polled: only this task sees the stall).
    regions: bool,
    /// The request's `send_stall_timeout`.
    stall: Duration,
}

impl Reader {
    /// Room for one more piece; `None` when the client went away or took nothing for `stall`.
    /// A connection that sends regions may take longer over one (a region can be hundreds of
    /// MiB for a slow client): its own stall deadline cuts it, and then the body goes away.
    async fn room(&self) -> Option<mpsc::Permit<'_, io::Result<Piece>>> {
        if self.regions {
            return self.tx.reserve().await.ok();
        }
        match tokio::time::timeout(self.stall, self.tx.reserve()).await {
            Ok(Ok(permit)) => Some(permit),
            Ok(Err(_)) => None,
            Err(_) => {
                tracing::info!(
                    stall_s = self.stall.as_secs(),
                    "response cut: the client stopped reading a blob being fetched"
                );
                None
            }
        }
    }

    /// Hands on a piece; false when the client went away or stalled.
    async fn send(&self, piece: Piece) -> bool {
        match self.room().await {
            Some(permit) => {
                permit.send(Ok(piece));
                true
            }
            None => false,
        }
    }

    /// Ends the body in an error.
    async fn fail(&self, e: io::Error) {
        if let Some(permit) = self.room().await {
            permit.send(Err(e));
        }
    }
}

async fn stream(
    fetch: Arc<Fetch>,
    start: u64,
    len: u64,
    mut direct: Option<mpsc::Receiver<Pieces>>,
    reader: Reader,
) {
    let mut rx = fetch.subscribe();
    let end = start + len;
    let mut pos = start;
    // The file the fetch writes, once a read gave it: later bytes are read through it.
    let mut held: Option<FileRegion> = None;
    let mut fed = FedFromMemory(0);
    while pos < end {
        if let Some(feed) = &mut direct {
            let pieces = match tokio::time::timeout(READER_STALL, feed.recv()).await {
                Ok(Some(pieces)) => pieces,
                // Fell behind, or the fetch ended: the file has the rest.
                Ok(None) => {
                    direct = None;
                    continue;
                }
                Err(_) => {
                    let why = "source sent nothing for 300 s";
                    return reader.fail(io::Error::other(why)).await;
                }
            };
            for piece in pieces.as_slice() {
                // The blob's last byte waits for the digest (below, from the file).
                let piece = if pos + piece.len() as u64 >= end {
                    direct = None;
                    piece.slice(..(end - 1 - pos) as usize)
                } else {
                    piece.clone()
                };
                if piece.is_empty() {
                    break;
                }
                let n = piece.len() as u64;
                if !reader.send(Piece::Bytes(piece)).await {
                    return; // the client went away or stopped reading
                }
                pos += n;
                fed.0 += n;
            }
            continue;
        }
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
            // Everything readable is asked for at once: a file region holds no memory and is
            // read a piece at a time where it must be read (later bytes come through the
            // handle of the first read). A backend that streams (object storage) is asked for
            // long spans, each read a request, passed on as they come.
            let span = if held.is_some() {
                u64::MAX
            } else {
                STREAM_SPAN
            };
            let n = (readable.min(end) - pos).min(span);
            let sent = match follow(&fetch, &mut held, pos, n, &reader).await {
                Ok(sent) => sent,
                Err(e) => return reader.fail(e).await,
            };
            if sent == 0 {
                return; // the client went away
            }
            pos += sent;
            continue;
        }
        let stop = match &p.phase {
            Phase::Running => None,
            Phase::Done => Some("blob ended before the announced size".to_string()),
            Phase::Failed(why) => Some(format!("source fetch stopped: {why}")),
        };
        if let Some(why) = stop {
            return reader.fail(io::Error::other(why)).await;
        }
        if tokio::time::timeout(READER_STALL, rx.changed())
            .await
            .is_err()
        {
            let why = "source sent nothing for 300 s";
            return reader.fail(io::Error::other(why)).await;
        }
    }
}

/// Sends bytes `[pos, pos + n)` of a running or finished fetch to a reader; how many were sent
/// (0: the reader went away). Bytes come from the write in progress (through the file handle
/// of the first read, when the backend gave one), or from the committed blob once the write is
/// gone. A backend whose write's pieces go at commit (object storage) can fail a read of them
/// that raced the commit: the blob, published before they go, has the rest.
async fn follow(
    fetch: &Fetch,
    held: &mut Option<FileRegion>,
    pos: u64,
    n: u64,
    reader: &Reader,
) -> io::Result<u64> {
    let finished = matches!(fetch.progress.borrow().phase, Phase::Done);
    let read = match held {
        Some(file) => BlobRead::Local(file.span(pos, n)),
        // Committed: the write's key may be another fetch's by now (the blob collected and
        // asked for again), so its bytes come from the blob.
        None if finished => committed(fetch, pos, n).await?,
        None => {
            let key = Pending::Fetch(fetch.digest.clone());
            let pending = match fetch.blobs.read_pending(&key, pos, Some(n)).await {
                Ok(pending) => pending,
                Err(_) if fetch.blobs.stat(&fetch.digest).await?.is_some() => None,
                Err(e) => return Err(e),
            };
            let read = match pending {
                Some(read) => read,
                None => committed(fetch, pos, n).await?,
            };
            if let BlobRead::Local(region) = &read {
                *held = Some(region.clone());
            }
            read
        }
    };
    match send(read, reader).await? {
        (sent, None) => Ok(sent),
        (sent, Some(e)) => {
            if fetch.blobs.stat(&fetch.digest).await?.is_none() {
                return Err(e);
            }
            let rest = committed(fetch, pos + sent, n - sent).await?;
            match send(rest, reader).await? {
                (more, None) => Ok(sent + more),
                (_, Some(e)) => Err(e),
            }
        }
    }
}

/// Bytes `[pos, pos + n)` of the committed blob of a fetch.
async fn committed(fetch: &Fetch, pos: u64, n: u64) -> io::Result<BlobRead> {
    fetch
        .blobs
        .read_bytes(&fetch.digest, pos, Some(n))
        .await?
        .ok_or_else(|| io::Error::other("fetched blob is gone from the store"))
}

/// Sends a read to a reader: how many bytes went (0 with no error: the reader went away or
/// stopped reading), and the error that stopped a read partway. A file region goes as it is to
/// a connection that sends files, and is read a piece at a time for any other.
async fn send(read: BlobRead, reader: &Reader) -> io::Result<(u64, Option<io::Error>)> {
    match read {
        BlobRead::Local(region) if reader.regions => {
            let sent = region.len();
            Ok(if reader.send(Piece::Region(region)).await {
                (sent, None)
            } else {
                (0, None)
            })
        }
        BlobRead::Local(region) => {
            let mut sent = 0;
            while sent < region.len() {
                let Some(permit) = reader.room().await else {
                    return Ok((0, None));
                };
                let at = region.offset() + sent;
                let want = (region.len() - sent).min(READ_CHUNK as u64) as usize;
                match read_piece(region.file().clone(), at, want).await {
                    Ok(piece) => {
                        sent += piece.len() as u64;
                        permit.send(Ok(Piece::Bytes(piece)));
                    }
                    Err(e) => return Ok((sent, Some(e))),
                }
            }
            Ok((sent, None))
        }
        BlobRead::Stream { mut bytes, .. } => {
            use futures_util::StreamExt;
            let mut sent = 0;
            while let Some(piece) = bytes.next().await {
                let piece = match piece {
                    Ok(piece) => piece,
                    Err(e) => return Ok((sent, Some(e))),
                };
                sent += piece.len() as u64;
                if !reader.send(Piece::Bytes(piece)).await {
                    return Ok((0, None));
                }
            }
            Ok((sent, None))
        }
        BlobRead::Redirect { .. } => Err(io::Error::other("a fetch cannot be followed at a URL")),
    }
}

/// Blob fetches of this node: the in-flight map; their bytes are the blob store's writes
/// `Pending::Fetch(digest)`.
pub struct Fetches {
    blobs: Arc<dyn BlobStore>,
    /// The other nodes sharing the bucket, if any: a fetch takes the blob's lease first.
    pub cluster: Option<Arc<Cluster>>,
    inflight: Mutex<HashMap<Digest, Arc<Fetch>>>,
    /// Held while a fetch is looked up, opened and entered into the map: two requests never
    /// open the same write at once.
    opening: tokio::sync::Mutex<()>,
}

impl Fetches {
    /// Fetches over `blobs`.
    pub fn new(blobs: Arc<dyn BlobStore>, cluster: Option<Arc<Cluster>>) -> Fetches {
        Fetches {
            blobs,
            cluster,
            inflight: Mutex::new(HashMap::new()),
            opening: tokio::sync::Mutex::new(()),
        }
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

    /// The fetch of `digest` in flight on this node.
    pub fn local(&self, digest: &Digest) -> Option<Arc<Fetch>> {
        self.inflight.lock().get(digest).cloned()
    }

    /// Digests being fetched (garbage collection must leave them alone).
    pub fn inflight_digests(&self) -> Vec<Digest> {
        self.inflight.lock().keys().cloned().collect()
    }

    /// Joins the fetch of `digest` or starts one: here (the fetch, whether it was joined, and
    /// for a fetch started here from byte 0, its bytes as they are written), or on the node
    /// that holds the blob's fetch lease.
    pub async fn join_or_start(
        self: &Arc<Self>,
        store: &Arc<Store>,
        source: &Arc<Source>,
        upstream_repo: &str,
        local_repo: &str,
        digest: &Digest,
    ) -> io::Result<Joined> {
        let join = |map: &HashMap<Digest, Arc<Fetch>>| {
            map.get(digest).map(|f| {
                f.link_also(local_repo);
                Joined::Here(f.clone(), true, None)
            })
        };
        if let Some(joined) = join(&self.inflight.lock()) {
            return Ok(joined);
        }
        let _opening = self.opening.lock().await;
        if let Some(joined) = join(&self.inflight.lock()) {
            return Ok(joined);
        }
        let lease = match &self.cluster {
            None => None,
            Some(cluster) => match cluster.take(&*store.meta, digest, local_repo).await {
                Ok(Ok(lease)) => Some(Arc::new(lease)),
                Ok(Err(holder)) => return Ok(Joined::Elsewhere(holder)),
                Err(e) => return Err(io::Error::other(format!("fetch lease: {e}"))),
            },
        };
        // In the map before the write is opened: a node that found the lease taken asks this
        // one at once, and finds the fetch.
        let (progress, _) = watch::channel(Progress {
            size: None,
            written: 0,
            phase: Phase::Running,
            not_found: false,
            verified: false,
        });
        let fetch = Arc::new(Fetch {
            digest: digest.clone(),
            blobs: self.blobs.clone(),
            progress,
            link_to: Mutex::new(vec![local_repo.to_string()]),
            lease: lease.clone(),
        });
        {
            let mut map = self.inflight.lock();
            map.insert(digest.clone(), fetch.clone());
            metrics::gauge!("berth_inflight_fetches").set(map.len() as f64);
        }
        if let Some(lease) = lease {
            let mut progress = fetch.subscribe();
            let ended = async move {
                let _ = progress.wait_for(|p| p.phase != Phase::Running).await;
            };
            tokio::spawn(lease.keep(store.meta.clone(), ended, || {}));
        }
        let opened = match self
            .blobs
            .open_pending(&Pending::Fetch(digest.clone()))
            .await
        {
            Ok((write, checkpoint)) => resume(write, checkpoint, digest).await,
            Err(e) => Err(e),
        };
        let write = match opened {
            Ok(write) => write,
            Err(e) => {
                self.finish(digest);
                let why = format!("cannot open the partial blob: {e}");
                fetch
                    .progress
                    .send_modify(|p| p.phase = Phase::Failed(why.into()));
                return Err(e);
            }
        };
        let written = write.written();
        fetch.progress.send_modify(|p| p.written = written);
        let (feed, direct) = if written == 0 {
            let (tx, rx) = mpsc::channel(DIRECT_QUEUE);
            (Some(tx), Some(Direct(rx)))
        } else {
            (None, None)
        };
        let job = Job {
            fetches: self.clone(),
            described: None,
            cap: 0,
            feed,
            pipe: Pipeline::new(write).on_written({
                // Readers follow the file as it is written; the hash runs a piece behind.
                let fetch = fetch.clone();
                Arc::new(move |written| fetch.progress.send_modify(|p| p.written = written))
            }),
            store: store.clone(),
            source: source.clone(),
            upstream_repo: upstream_repo.to_string(),
            fetch: fetch.clone(),
        };
        tokio::spawn(job.run());
        Ok(Joined::Here(fetch, false, direct))
    }

    fn finish(&self, digest: &Digest) {
        let mut map = self.inflight.lock();
        map.remove(digest);
        metrics::gauge!("berth_inflight_fetches").set(map.len() as f64);
    }

    /// Removes partial fetches untouched for `max_age` (not those being fetched); returns
    /// bytes freed.
    pub async fn expire_partials(&self, max_age: Duration) -> io::Result<u64> {
        let mut freed = 0;
        let now = SystemTime::now();
        for partial in self.blobs.list_pending(PendingKind::Fetch).await? {
            let Pending::Fetch(digest) = &partial.key else {
                continue;
            };
            if self.is_inflight(digest) {
                continue;
            }
            let age = now
                .duration_since(partial.info.modified)
                .unwrap_or_default();
            if age > max_age && self.blobs.remove_pending(&partial.key).await? {
                freed += partial.info.size;
            }
        }
        Ok(freed)
    }
}

/// Where the fetch of a blob runs.
pub enum Joined {
    /// On this node: the fetch, whether it was joined, and the starter's direct feed.
    Here(Arc<Fetch>, bool, Option<Direct>),
    /// On another node, which holds the blob's fetch lease.
    Elsewhere(Holder),
}

/// Goes on from a partial fetch when its checkpoint holds a usable hasher state for at most
/// the bytes it has (the bytes after it are cut); otherwise starts over from zero.
async fn resume(
    mut write: Box<dyn BlobWrite>,
    checkpoint: Option<Checkpoint>,
    digest: &Digest,
) -> io::Result<HashingWrite> {
    let usable = checkpoint.and_then(|c| {
        let v = Verifier::restore(&c.state)?;
        (c.offset <= write.written() && v.algorithm() == digest.algorithm())
            .then_some((c.offset, v))
    });
    let (offset, verifier) = usable.unwrap_or((0, Verifier::new(digest.algorithm())));
    if write.written() != offset {
        write.truncate(offset).await?;
    }
    Ok(HashingWrite::new(write, verifier))
}

/// Bytes handed to the source reader's writer: large enough to keep per-piece overhead low,
/// small enough that readers see bytes promptly.
const WRITE_PIECE: usize = 1 << 20;

struct Job {
    fetches: Arc<Fetches>,
    /// The blob's size as a cached manifest of a repository it is fetched for describes it.
    described: Option<u64>,
    /// Most bytes the blob may have in the current attempt (the smaller of the source's
    /// announced size and the described size, else `pull_through.max_blob_bytes`).
    cap: u64,
    /// The starter's direct feed, until it falls behind.
    feed: Option<mpsc::Sender<Pieces>>,
    /// The partial blob, hashed as it is written, one piece in flight.
    pipe: Pipeline,
    store: Arc<Store>,
    source: Arc<Source>,
    upstream_repo: String,
    fetch: Arc<Fetch>,
}

/// How a fetch attempt ended.
enum Ended {
    Complete,
    Retry(UpstreamError),
    Fatal(String, bool),
    Budget,
    /// Another node took the fetch lease: the partial blob is its now.
    LeaseLost,
}

/// What becomes of the partial blob when a fetch stops.
enum Leftover {
    /// Kept with its hasher state for the next fetch to resume.
    Keep,
    /// Removed.
    Discard,
    /// Left as it is: another node writes it now.
    Leave,
}

impl Job {
    async fn run(mut self) {
        let repos = self.fetch.link_to.lock().clone();
        self.described = described_size(&self.store, &repos, &self.fetch.digest).await;
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
                Ended::Retry(e) => break Err((e.to_string(), e.is_not_found(), Leftover::Keep)),
                Ended::Budget => {
                    metrics::counter!("berth_cache_budget_expiries_total").increment(1);
                    break Err((
                        format!("fetch budget of {budget:?} spent; the next request resumes"),
                        false,
                        Leftover::Keep,
                    ));
                }
                Ended::Fatal(why, not_found) => break Err((why, not_found, Leftover::Discard)),
                Ended::LeaseLost => {
                    break Err((
                        "another node took the fetch lease".into(),
                        false,
                        Leftover::Leave,
                    ))
                }
                Ended::Complete => {
                    break self
                        .commit()
                        .await
                        .map_err(|e| (e, false, Leftover::Discard))
                }
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
                self.source.record_success();
                self.fetch.progress.send_modify(|p| p.phase = Phase::Done);
                self.fetches.finish(&self.fetch.digest);
            }
            Err((why, not_found, leftover)) => {
                match leftover {
                    Leftover::Keep => self.save_state().await,
                    Leftover::Discard => self.discard().await,
                    Leftover::Leave => drop(self.pipe.take()),
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
        let req = UpstreamRequest::new(
            Method::GET,
            format!("{}/blobs/{}", self.upstream_repo, self.fetch.digest),
            &self.upstream_repo,
            headers,
        );
        let response = match self.source.send(&req, deadline).await {
            Ok(r) => r,
            // Counted and kept in the source's health by `send`.
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
                    let why = "source answered Range with an unexpected Content-Range";
                    self.source.record_failure(ErrorKind::Refused, why);
                    return Ended::Fatal(why.into(), false);
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
        let mut buf = Gather::default();
        // Bytes of the blob held once this chunk is in: a source that sends more than the blob
        // can have is cut off at once, whatever its Content-Length said.
        let mut received = self.fetch.progress.borrow().written;
        loop {
            let chunk = match tokio::time::timeout_at(deadline.into(), response.chunk()).await {
                Err(_) => {
                    self.source.record_failure(
                        ErrorKind::Timeout,
                        &format!(
                            "blob {} not received within the fetch budget",
                            self.fetch.digest
                        ),
                    );
                    return match self.flush(&mut buf).await {
                        Ok(()) => Ended::Budget,
                        Err(e) => Ended::Fatal(e, false),
                    };
                }
                Ok(Err(e)) => {
                    let timed_out = e.is_timeout();
                    let text = format!(
                        "blob {} body: {}",
                        self.fetch.digest,
                        super::upstream::error_chain(&e.without_url())
                    );
                    let broken = if timed_out {
                        UpstreamError::TimedOut(text)
                    } else {
                        UpstreamError::Unreachable(text)
                    };
                    self.source.record_error(&broken);
                    let flushed = self.flush(&mut buf).await;
                    return match flushed {
                        Ok(()) => Ended::Retry(broken),
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
            if self.fetch.lease.as_ref().is_some_and(|l| l.is_lost()) {
                let _ = self.settle().await;
                return Ended::LeaseLost;
            }
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
                let why = format!(
                    "source sent more than {} bytes for {}: stopped and discarded",
                    self.cap, self.fetch.digest
                );
                self.source.record_failure(ErrorKind::Refused, &why);
                return Ended::Fatal(why, false);
            }
            buf.push(&chunk);
            // Hand a piece to the writer and keep reading the source while it is written and
            // hashed; readers see it once it is in the file.
            if buf.len() >= WRITE_PIECE {
                if let Err(e) = self.submit(buf.take()).await {
                    return Ended::Fatal(e, false);
                }
            }
        }
    }

    /// Waits until every piece handed on is written and hashed (readers saw each written
    /// piece as it went in: the pipeline publishes the length, see `Fetches::join_or_start`).
    async fn settle(&mut self) -> Result<(), String> {
        self.pipe
            .settle()
            .await
            .map_err(|e| format!("cannot write partial blob: {e}"))
    }

    /// Hands `data` on to be written, then hashed, once the writer has room.
    async fn submit(&mut self, data: Pieces) -> Result<(), String> {
        if data.is_empty() {
            return Ok(());
        }
        // The starter is fed a piece as it goes to be written and hashed, not after: its
        // bytes go out while the piece is written (the blob's last byte still waits for the
        // digest, see `stream`).
        if let Some(feed) = &self.feed {
            if feed.try_send(data.clone()).is_err() {
                // Behind by a whole queue, or gone: it reads the file from here on.
                self.feed = None;
            }
        }
        self.pipe
            .submit(data)
            .await
            .map_err(|e| format!("cannot write partial blob: {e}"))
    }

    /// Writes what is buffered and waits until everything is in the file.
    async fn flush(&mut self, buf: &mut Gather) -> Result<(), String> {
        self.submit(buf.take()).await?;
        self.settle().await
    }

    async fn commit(&mut self) -> Result<(), String> {
        let p = self.fetch.progress.borrow().clone();
        if let Some(size) = p.size {
            if p.written != size {
                self.discard().await;
                let why = format!(
                    "source sent {} bytes of {size} for {}",
                    p.written, self.fetch.digest
                );
                self.source.record_failure(ErrorKind::Connect, &why);
                return Err(why);
            }
        }
        let write = self.pipe.take().map_err(|e| e.to_string())?;
        let actual = write.verifier.current();
        if actual != self.fetch.digest {
            self.pipe = Pipeline::new(write);
            self.discard().await;
            metrics::counter!("berth_cache_digest_mismatches_total").increment(1);
            let why = format!(
                "source sent content with digest {actual}, not {}: discarded",
                self.fetch.digest
            );
            self.source.record_failure(ErrorKind::DigestMismatch, &why);
            return Err(why);
        }
        self.fetch.progress.send_modify(|p| p.verified = true);
        // Held from commit to links: a collection never deletes the blob in between.
        let _hold = self.store.gate.hold(&self.fetch.digest).await;
        if let Err(e) = write.inner.commit(&self.fetch.digest).await {
            self.discard().await;
            return Err(format!("cannot commit blob: {e}"));
        }
        // Size known here even if the source never said it.
        self.fetch
            .progress
            .send_modify(|p| p.size = Some(p.written));
        let repos = std::mem::take(&mut *self.fetch.link_to.lock());
        for repo in repos {
            self.store
                .meta
                .link_blob(&repo, &self.fetch.digest, p.written)
                .await
                .map_err(|e| e.to_string())?;
        }
        self.store.meta.flush().await.map_err(|e| e.to_string())
    }

    /// Keeps the partial blob and its hasher state for the next fetch to resume.
    async fn save_state(&mut self) {
        if let Err(e) = self.pipe.settle().await {
            tracing::warn!(error = %e, "cannot finish the partial fetch's last write");
        }
        let Ok(mut write) = self.pipe.take() else {
            return;
        };
        let state = write.verifier.save();
        let saved = match write.inner.sync().await {
            Ok(()) => write.inner.checkpoint(state).await,
            Err(e) => Err(e),
        };
        if let Err(e) = saved {
            tracing::warn!(error = %e, "cannot save partial fetch state; it will restart from zero");
        }
    }

    /// Removes the partial blob.
    async fn discard(&mut self) {
        // Errors of the last writes do not matter: the file goes.
        let _ = self.pipe.settle().await;
        let removed = match self.pipe.take() {
            Ok(write) => write.inner.abort().await,
            Err(_) => self
                .fetch
                .blobs
                .remove_pending(&Pending::Fetch(self.fetch.digest.clone()))
                .await
                .map(drop),
        };
        if let Err(e) = removed {
            tracing::warn!(digest = %self.fetch.digest, error = %e, "cannot remove a partial fetch");
        }
    }
}

/// Manifests of a repository scanned for a blob's described size (a cache repository holds a
/// few tags' worth).
const MAX_MANIFESTS_SCANNED: usize = 256;

/// The size that a manifest held in one of `repos` gives for `digest` (as config, layer or
/// artifact blob), if any.
async fn described_size(store: &Store, repos: &[String], digest: &Digest) -> Option<u64> {
    for repo in repos {
        let Ok(artifacts) = store
            .meta
            .artifacts(repo, None, MAX_MANIFESTS_SCANNED)
            .await
        else {
            continue;
        };
        for (manifest, record) in &artifacts {
            if record.size > 4 << 20 {
                continue;
            }
            if let Ok(Some(bytes)) = store.blobs.read_small(manifest, 4 << 20).await {
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
    use bytes::Bytes;

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

    #[tokio::test]
    async fn stale_partials_are_removed_and_resumable_state_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let blobs: Arc<dyn BlobStore> =
            Arc::new(crate::store::fs::FsBlobStore::open(dir.path()).unwrap());
        let fetches = Fetches::new(blobs.clone(), None);
        let d = Digest::sha256(b"whole blob");
        let key = Pending::Fetch(d.clone());
        // A partial with saved hasher state resumes where it stopped; bytes past it are cut.
        let (mut w, _) = blobs.open_pending(&key).await.unwrap();
        let mut v = Verifier::new(d.algorithm());
        v.update(b"whole");
        w.write(Bytes::from_static(b"whole").into()).await.unwrap();
        w.checkpoint(v.save()).await.unwrap();
        w.write(Bytes::from_static(b" bl").into()).await.unwrap();
        drop(w);
        let (w, checkpoint) = blobs.open_pending(&key).await.unwrap();
        let mut resumed = resume(w, checkpoint, &d).await.unwrap();
        assert_eq!(resumed.written(), 5);
        resumed.write(Bytes::from_static(b" blob")).await.unwrap();
        assert_eq!(resumed.verifier.current(), d);
        drop(resumed);
        // Without usable state it starts over.
        let (mut w, _) = blobs.open_pending(&key).await.unwrap();
        w.checkpoint(b"not a hasher".to_vec()).await.unwrap();
        let (w, checkpoint) = blobs.open_pending(&key).await.unwrap();
        assert_eq!(resume(w, checkpoint, &d).await.unwrap().written(), 0);
        let (mut w, _) = blobs.open_pending(&key).await.unwrap();
        w.write(Bytes::from_static(b"whole").into()).await.unwrap();
        drop(w);
        assert_eq!(
            fetches
                .expire_partials(Duration::from_secs(3600))
                .await
                .unwrap(),
            0,
            "young: kept"
        );
        assert_eq!(fetches.expire_partials(Duration::ZERO).await.unwrap(), 5);
        assert!(blobs.stat_pending(&key).await.unwrap().is_none());
    }
}
