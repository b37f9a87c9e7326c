//! The blob-store seam: content-addressed bytes, visible only once complete and verified, and
//! the named writes in progress that become blobs (upload sessions, the cache's fetches).
//!
//! Every backend passes the suite in `store::conformance`. What a backend hands back never
//! names a path: a read is a local file region (sendable without copying), a stream, or a
//! redirect; a write is a [`BlobWrite`] that commits under a digest or goes away.

use std::fs::File;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::{Bytes, BytesMut};
use futures_util::stream::{Stream, StreamExt};

use crate::oci::digest::{Digest, Verifier};

/// Size and age of a blob or of a write in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobInfo {
    /// Length in bytes.
    pub size: u64,
    /// Last change (commit time of a blob, last write of a pending one).
    pub modified: SystemTime,
}

/// A span of a local file holding blob bytes: an opaque handle for positioned reads, so the
/// HTTP layer can send it without copying it through user space first.
#[derive(Clone)]
pub struct FileRegion {
    file: Arc<File>,
    offset: u64,
    len: u64,
}

impl FileRegion {
    /// A region of `file`.
    pub fn new(file: Arc<File>, offset: u64, len: u64) -> FileRegion {
        FileRegion { file, offset, len }
    }

    /// The open file (positioned reads only: the handle is shared).
    pub fn file(&self) -> &Arc<File> {
        &self.file
    }

    /// First byte of the region in the file.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Length of the region.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the region is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Another span of the same file. A pending write's file keeps growing while the region
    /// is held: followers of a fetch reach new bytes through the handle they already have.
    pub fn span(&self, offset: u64, len: u64) -> FileRegion {
        FileRegion {
            file: self.file.clone(),
            offset,
            len,
        }
    }

    /// Reads the whole region into memory (bounded by the caller). Blocking.
    fn read_all(&self) -> io::Result<Bytes> {
        use std::os::unix::fs::FileExt;
        let mut bytes = BytesMut::zeroed(usize::try_from(self.len).map_err(io::Error::other)?);
        self.file.read_exact_at(&mut bytes, self.offset)?;
        Ok(bytes.freeze())
    }
}

/// Bytes of a stream backend.
pub type ByteStream = Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send>>;

/// What a read gives: bytes [offset, offset + len) of a blob.
pub enum BlobRead {
    /// In a local file.
    Local(FileRegion),
    /// As a stream of exactly `len` bytes.
    Stream {
        /// Length of the stream.
        len: u64,
        /// The bytes.
        bytes: ByteStream,
    },
    /// At a URL the client may fetch itself (a presigned object-storage URL).
    Redirect {
        /// Where.
        url: String,
        /// Length of the blob.
        len: u64,
    },
}

impl BlobRead {
    /// Collects the bytes (`None` for a redirect), at most `limit` of them.
    pub async fn collect(self, limit: u64) -> io::Result<Option<Bytes>> {
        match self {
            BlobRead::Local(region) if region.len > limit => Err(too_long(limit)),
            BlobRead::Local(region) => tokio::task::spawn_blocking(move || region.read_all())
                .await
                .map_err(io::Error::other)?
                .map(Some),
            BlobRead::Stream { len, .. } if len > limit => Err(too_long(limit)),
            BlobRead::Stream { len, mut bytes } => {
                let mut out = BytesMut::new();
                while let Some(piece) = bytes.next().await {
                    out.extend_from_slice(&piece?);
                    if out.len() as u64 > len {
                        return Err(io::Error::other("blob stream longer than announced"));
                    }
                }
                Ok(Some(out.freeze()))
            }
            BlobRead::Redirect { .. } => Ok(None),
        }
    }
}

fn too_long(limit: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("blob longer than the {limit} bytes allowed here"),
    )
}

/// The name of a write in progress: what makes it resumable.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Pending {
    /// An upload session (its id).
    Upload(uuid::Uuid),
    /// The cache's fetch of a blob from its source.
    Fetch(Digest),
    /// A one-shot write (monolithic upload, manifest): never resumed, gone after a restart.
    Temp(uuid::Uuid),
}

/// The kinds of [`Pending`] names, for listings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PendingKind {
    /// Upload sessions.
    Upload,
    /// Cache fetches.
    Fetch,
}

/// Where a write stood at its last checkpoint: the offset and the caller's state (a hasher's,
/// a session's record) saved with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// Bytes durable at the checkpoint.
    pub offset: u64,
    /// The caller's state.
    pub state: Vec<u8>,
}

/// A write in progress, as listed.
#[derive(Debug, Clone)]
pub struct PendingInfo {
    /// Its name.
    pub key: Pending,
    /// Bytes held and last change.
    pub info: BlobInfo,
    /// Its last checkpoint, if any.
    pub checkpoint: Option<Checkpoint>,
}

/// Where blob bytes live. Content becomes visible under a digest only through
/// [`BlobWrite::commit`], after the caller matched the digest: a reader never sees a partly
/// written blob, after any crash. Listings are in lexical order of the digest's text.
#[async_trait::async_trait]
pub trait BlobStore: Send + Sync + 'static {
    /// Size and age of a committed blob.
    async fn stat(&self, digest: &Digest) -> io::Result<Option<BlobInfo>>;
    /// Bytes `[offset, offset + len)` of a committed blob (`len: None`: to its end). An
    /// `offset` past the end is an error.
    async fn read(
        &self,
        digest: &Digest,
        offset: u64,
        len: Option<u64>,
    ) -> io::Result<Option<BlobRead>>;
    /// Stores small content (a manifest) whose digest the caller computed.
    async fn put(&self, digest: &Digest, bytes: Bytes) -> io::Result<()>;
    /// Deletes a committed blob; whether it existed.
    async fn delete(&self, digest: &Digest) -> io::Result<bool>;
    /// Up to `limit` committed blobs whose digests sort after `after`, in lexical order.
    async fn list(
        &self,
        after: Option<&Digest>,
        limit: usize,
    ) -> io::Result<Vec<(Digest, BlobInfo)>>;

    /// Opens the write `key`, creating it empty when absent. The writer stands after the
    /// bytes the write durably holds; its last checkpoint comes with it. The caller decides
    /// whether to go on from there or to cut back to the checkpoint.
    async fn open_pending(
        &self,
        key: &Pending,
    ) -> io::Result<(Box<dyn BlobWrite>, Option<Checkpoint>)>;
    /// Bytes `[offset, offset + len)` of a write in progress (a fetch's followers, a rehash).
    async fn read_pending(
        &self,
        key: &Pending,
        offset: u64,
        len: Option<u64>,
    ) -> io::Result<Option<BlobRead>>;
    /// Writes in progress of one kind, with their last checkpoint.
    async fn list_pending(&self, kind: PendingKind) -> io::Result<Vec<PendingInfo>>;
    /// Size, age and last checkpoint of a write in progress, if it exists.
    async fn stat_pending(&self, key: &Pending) -> io::Result<Option<PendingInfo>>;
    /// Deletes a write in progress and its checkpoint; whether it existed.
    async fn remove_pending(&self, key: &Pending) -> io::Result<bool>;

    /// [`BlobStore::read`] for berth's own use (a hash, a copy sent elsewhere): the bytes,
    /// never a redirect. A backend that answers reads with redirects overrides it.
    async fn read_bytes(
        &self,
        digest: &Digest,
        offset: u64,
        len: Option<u64>,
    ) -> io::Result<Option<BlobRead>> {
        self.read(digest, offset, len).await
    }

    /// The whole content of a small blob (a manifest, an image config), or `None` when absent.
    /// Blobs are streamed; only bounded ones are read whole: longer than `limit` is an error.
    async fn read_small(&self, digest: &Digest, limit: u64) -> io::Result<Option<Bytes>> {
        match self.read_bytes(digest, 0, None).await? {
            Some(read) => read.collect(limit).await,
            None => Ok(None),
        }
    }
}

/// A write in progress. Writes append and are all or nothing: after a failure (a full disk)
/// the write still holds exactly the bytes before it and can go on from there.
#[async_trait::async_trait]
pub trait BlobWrite: Send + Sync {
    /// Its name.
    fn key(&self) -> &Pending;
    /// Bytes it holds.
    fn written(&self) -> u64;
    /// Appends `pieces`, in order (one large write: the pieces are not copied together first).
    async fn write(&mut self, pieces: Pieces) -> io::Result<()>;
    /// Cuts back to `len` bytes (a chunk that did not match its range).
    async fn truncate(&mut self, len: u64) -> io::Result<()>;
    /// Makes the bytes written so far durable.
    async fn sync(&mut self) -> io::Result<()>;
    /// Saves `state` with the count of bytes written, replacing the last checkpoint. The
    /// bytes themselves are durable only after [`BlobWrite::sync`]: after a crash without it,
    /// the write may hold fewer bytes than its checkpoint says, and the caller must then not
    /// trust the state (uploads rehash, fetches start over).
    async fn checkpoint(&mut self, state: Vec<u8>) -> io::Result<()>;
    /// Makes the bytes the blob `digest` (the caller verified them), durably; the write and
    /// its checkpoint are gone. On an error the write stays as it was, to retry or remove.
    async fn commit(self: Box<Self>, digest: &Digest) -> io::Result<()>;
    /// Deletes the write and its checkpoint.
    async fn abort(self: Box<Self>) -> io::Result<()>;
}

/// Pieces of bytes gathered for one large write, as they arrived (request body frames, a
/// source's chunks): never copied into one buffer.
#[derive(Debug, Clone, Default)]
pub struct Pieces {
    pieces: Vec<Bytes>,
    len: usize,
}

impl Pieces {
    /// Adds a piece (empty ones are dropped).
    pub fn push(&mut self, piece: Bytes) {
        if !piece.is_empty() {
            self.len += piece.len();
            self.pieces.push(piece);
        }
    }

    /// Bytes gathered.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing was gathered.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The pieces.
    pub fn as_slice(&self) -> &[Bytes] {
        &self.pieces
    }

    /// Takes what was gathered, leaving this empty.
    pub fn take(&mut self) -> Pieces {
        std::mem::take(self)
    }
}

impl From<Bytes> for Pieces {
    fn from(piece: Bytes) -> Pieces {
        let mut p = Pieces::default();
        p.push(piece);
        p
    }
}

/// A write with the hash of its bytes, hashed on the blocking pool while the backend writes
/// (SHA-256 and the copy into the page cache each take about as long).
pub struct HashingWrite {
    /// The write.
    pub inner: Box<dyn BlobWrite>,
    /// Hash of the bytes written.
    pub verifier: Verifier,
}

impl HashingWrite {
    /// Pairs a write with the hash of what it holds.
    pub fn new(inner: Box<dyn BlobWrite>, verifier: Verifier) -> HashingWrite {
        HashingWrite { inner, verifier }
    }

    /// Bytes written.
    pub fn written(&self) -> u64 {
        self.inner.written()
    }

    /// Appends and hashes; on failure neither count nor hash moved.
    pub async fn write(&mut self, pieces: impl Into<Pieces>) -> io::Result<()> {
        let pieces = pieces.into();
        if pieces.is_empty() {
            return Ok(());
        }
        let mut verifier = self.verifier.clone();
        let for_hash = pieces.clone();
        let hashing = tokio::task::spawn_blocking(move || {
            for piece in for_hash.as_slice() {
                verifier.update(piece);
            }
            verifier
        });
        let (written, hashed) = tokio::join!(self.inner.write(pieces), hashing);
        let hashed = hashed.map_err(io::Error::other)?;
        written?;
        self.verifier = hashed;
        Ok(())
    }

    /// Cuts back to `to` (its count and the hash of its bytes).
    pub async fn rewind(&mut self, to: u64, verifier: Verifier) -> io::Result<()> {
        self.inner.truncate(to).await?;
        self.verifier = verifier;
        Ok(())
    }
}

/// A [`HashingWrite`] run as stages that each work on their own piece: the caller gathers the
/// next piece while a task writes the one before and another task hashes the one before that
/// (each write and each hash a call on the blocking pool). SHA-256 and the copy into the page
/// cache each take about as long, so neither waits for the other, and a written piece is
/// readable (see `on_written`) before it is hashed. Only written pieces are hashed: after
/// [`Pipeline::settle`], count and hash agree even when a write failed. At most
/// [`Pipeline::DEPTH`] pieces are held between the stages.
pub struct Pipeline {
    idle: Option<HashingWrite>,
    running: Option<Stages>,
    on_written: Option<OnWritten>,
}

/// Told the count of bytes written after each write.
pub type OnWritten = Arc<dyn Fn(u64) + Send + Sync>;

/// The stages of a running [`Pipeline`].
struct Stages {
    pieces: tokio::sync::mpsc::Sender<Pieces>,
    writer: tokio::task::JoinHandle<(Box<dyn BlobWrite>, io::Result<()>)>,
    hasher: tokio::task::JoinHandle<Result<Verifier, tokio::task::JoinError>>,
}

impl Pipeline {
    /// Pieces held between the caller and the hash at most: one queued for the writer, one
    /// being written, one queued for the hasher, and two being hashed (a hash call also takes
    /// the piece written while it waited).
    pub const DEPTH: usize = 5;

    /// Starts with an idle write.
    pub fn new(write: HashingWrite) -> Pipeline {
        Pipeline {
            idle: Some(write),
            running: None,
            on_written: None,
        }
    }

    /// Calls `on_written` with the count of bytes written after each write (before the
    /// piece is hashed).
    pub fn on_written(mut self, on_written: OnWritten) -> Pipeline {
        self.on_written = Some(on_written);
        self
    }

    /// Waits until every piece is written and hashed. A storage error keeps the write, its
    /// count and hash still in step (the failed piece is in neither).
    pub async fn settle(&mut self) -> io::Result<()> {
        let Some(stages) = self.running.take() else {
            return Ok(());
        };
        drop(stages.pieces);
        let written = stages.writer.await;
        let hashed = stages.hasher.await;
        let (inner, outcome) = written.map_err(|e| {
            io::Error::other(format!("blob write task failed and took its writer: {e}"))
        })?;
        let verifier = hashed.and_then(|hashed| hashed).map_err(|e| {
            io::Error::other(format!("blob hash task failed and took its writer: {e}"))
        })?;
        self.idle = Some(HashingWrite { inner, verifier });
        outcome
    }

    /// Hands `pieces` to be written then hashed, once the writer has room. A failed write
    /// shows here or at [`Pipeline::settle`].
    pub async fn submit(&mut self, pieces: impl Into<Pieces>) -> io::Result<()> {
        let pieces = pieces.into();
        if pieces.is_empty() {
            return Ok(());
        }
        let stages = match &mut self.running {
            Some(stages) => stages,
            stopped => {
                let write = self.idle.take().ok_or_else(writer_lost)?;
                stopped.insert(start(write, self.on_written.clone()))
            }
        };
        if stages.pieces.send(pieces).await.is_ok() {
            return Ok(());
        }
        // The writer stopped on an error: settling gives it.
        self.settle().await?;
        Err(io::Error::other("blob writer stopped"))
    }

    /// The idle write, after [`Pipeline::settle`].
    pub fn take(&mut self) -> io::Result<HashingWrite> {
        self.idle.take().ok_or_else(writer_lost)
    }
}

fn writer_lost() -> io::Error {
    io::Error::other("blob writer lost to a failed write task")
}

/// Starts the writer and the hasher of a [`Pipeline`] on `write`.
fn start(write: HashingWrite, on_written: Option<OnWritten>) -> Stages {
    use tokio::sync::mpsc;
    let HashingWrite {
        mut inner,
        mut verifier,
    } = write;
    let (pieces, mut to_write) = mpsc::channel::<Pieces>(1);
    let (to_hash, mut hashing) = mpsc::channel::<Pieces>(1);
    let writer = tokio::spawn(async move {
        while let Some(pieces) = to_write.recv().await {
            if let Err(e) = inner.write(pieces.clone()).await {
                return (inner, Err(e));
            }
            if let Some(tell) = &on_written {
                tell(inner.written());
            }
            if to_hash.send(pieces).await.is_err() {
                // Only a panicked hasher drops its end; `settle` reports it.
                break;
            }
        }
        (inner, Ok(()))
    });
    // A task, with each piece hashed on the blocking pool: a thread parked waiting for the
    // next piece would hold a place in the pool, and with as many streams as the pool has
    // threads the writes (on the pool too) could never run.
    let hasher = tokio::spawn(async move {
        while let Some(first) = hashing.recv().await {
            // What else was written meanwhile goes in the same call: one hop fewer.
            let mut batch = vec![first];
            while let Ok(more) = hashing.try_recv() {
                batch.push(more);
            }
            verifier = tokio::task::spawn_blocking(move || {
                for piece in batch.iter().flat_map(Pieces::as_slice) {
                    verifier.update(piece);
                }
                verifier
            })
            .await?;
        }
        Ok::<_, tokio::task::JoinError>(verifier)
    });
    Stages {
        pieces,
        writer,
        hasher,
    }
}

/// Rewords a full-disk error so that the client and the log see the cause and the place.
pub fn explain(e: io::Error, what: &dyn std::fmt::Display) -> io::Error {
    if e.kind() == io::ErrorKind::StorageFull {
        io::Error::new(
            io::ErrorKind::StorageFull,
            format!(
                "no space left on device: the data directory's volume is full (writing {what})"
            ),
        )
    } else {
        e
    }
}

/// Hashes what a read gives (an upload finished under another algorithm, a session whose
/// checkpoint cannot be trusted).
pub async fn hash_read(read: BlobRead, mut verifier: Verifier) -> io::Result<Verifier> {
    match read {
        BlobRead::Local(region) => tokio::task::spawn_blocking(move || {
            use std::os::unix::fs::FileExt;
            let mut buf = vec![0u8; 1 << 20];
            let (mut at, end) = (region.offset, region.offset + region.len);
            while at < end {
                let want = ((end - at) as usize).min(buf.len());
                let n = region.file.read_at(&mut buf[..want], at)?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "blob file shorter than its region",
                    ));
                }
                verifier.update(&buf[..n]);
                at += n as u64;
            }
            Ok(verifier)
        })
        .await
        .map_err(io::Error::other)?,
        BlobRead::Stream { mut bytes, .. } => {
            while let Some(piece) = bytes.next().await {
                verifier.update(&piece?);
            }
            Ok(verifier)
        }
        BlobRead::Redirect { .. } => Err(io::Error::other("cannot hash a redirect")),
    }
}

/// Bytes `[start, start + len)` of a stored blob as pieces: a local file read a piece at a
/// time, or the stream of an object store.
pub fn pieces(
    store: Arc<dyn BlobStore>,
    digest: Digest,
    start: u64,
    len: u64,
) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> + Send + 'static {
    let opened = async move {
        let read = match store.read_bytes(&digest, start, Some(len)).await {
            Ok(Some(read)) => read,
            Ok(None) => return Err(std::io::Error::other(format!("blob {digest} is gone"))),
            Err(e) => return Err(e),
        };
        Ok(match read {
            BlobRead::Local(region) => {
                file_stream(region.file().clone(), region.offset(), region.len())
            }
            BlobRead::Stream { bytes, .. } => bytes,
            BlobRead::Redirect { .. } => {
                return Err(std::io::Error::other("a blob read gave a redirect"))
            }
        })
    };
    futures_util::stream::once(opened).flat_map(|opened| match opened {
        Ok(pieces) => pieces,
        Err(e) => futures_util::stream::once(async move { Err(e) }).boxed(),
    })
}

/// Reads `[at, at + len)` of a file on the blocking pool.
pub(crate) async fn read_file(file: Arc<File>, at: u64, len: u64) -> io::Result<Bytes> {
    tokio::task::spawn_blocking(move || {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; usize::try_from(len).map_err(io::Error::other)?];
        file.read_exact_at(&mut buf, at)?;
        Ok(Bytes::from(buf))
    })
    .await
    .map_err(io::Error::other)?
}

/// Bytes read from a file at a time by [`file_stream`].
const FILE_READ_BYTES: u64 = 1 << 20;

/// A file's range as a stream, a megabyte at a time.
pub(crate) fn file_stream(file: Arc<File>, start: u64, len: u64) -> ByteStream {
    use futures_util::StreamExt;
    futures_util::stream::try_unfold((file, start, start + len), |(file, at, end)| async move {
        if at >= end {
            return Ok(None);
        }
        let n = FILE_READ_BYTES.min(end - at);
        let bytes = read_file(file.clone(), at, n).await?;
        Ok(Some((bytes, (file, at + n, end))))
    })
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::digest::Algorithm;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;
    use tokio::sync::Semaphore;

    /// A write held in memory that fails its `fail_at`-th write (counting from 1) and waits
    /// for a permit of `gate` before each write.
    struct Recorded {
        key: Pending,
        bytes: Vec<u8>,
        writes: usize,
        fail_at: usize,
        gate: Arc<Semaphore>,
    }

    #[async_trait::async_trait]
    impl BlobWrite for Recorded {
        fn key(&self) -> &Pending {
            &self.key
        }
        fn written(&self) -> u64 {
            self.bytes.len() as u64
        }
        async fn write(&mut self, pieces: Pieces) -> io::Result<()> {
            self.gate
                .acquire()
                .await
                .map_err(io::Error::other)?
                .forget();
            self.writes += 1;
            if self.writes == self.fail_at {
                return Err(io::Error::other("disk full"));
            }
            for piece in pieces.as_slice() {
                self.bytes.extend_from_slice(piece);
            }
            Ok(())
        }
        async fn truncate(&mut self, len: u64) -> io::Result<()> {
            self.bytes.truncate(len as usize);
            Ok(())
        }
        async fn sync(&mut self) -> io::Result<()> {
            Ok(())
        }
        async fn checkpoint(&mut self, _: Vec<u8>) -> io::Result<()> {
            Ok(())
        }
        async fn commit(self: Box<Self>, _: &Digest) -> io::Result<()> {
            Ok(())
        }
        async fn abort(self: Box<Self>) -> io::Result<()> {
            Ok(())
        }
    }

    fn pipeline(fail_at: usize, gate: Arc<Semaphore>) -> Pipeline {
        let write = Recorded {
            key: Pending::Temp(uuid::Uuid::new_v4()),
            bytes: Vec::new(),
            writes: 0,
            fail_at,
            gate,
        };
        Pipeline::new(HashingWrite::new(
            Box::new(write),
            Verifier::new(Algorithm::Sha256),
        ))
    }

    fn piece(i: u8) -> Bytes {
        Bytes::from(vec![i; 1000 + i as usize])
    }

    fn digest_of(pieces: &[Bytes]) -> Digest {
        let mut v = Verifier::new(Algorithm::Sha256);
        pieces.iter().for_each(|p| v.update(p));
        v.finish()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pipeline_writes_then_hashes_every_piece_in_order_and_tells_each_write() {
        let told = Arc::new(AtomicU64::new(0));
        let counts = told.clone();
        let mut pipe = pipeline(0, Arc::new(Semaphore::new(Semaphore::MAX_PERMITS))).on_written(
            Arc::new(move |n| {
                // Counts only grow.
                assert!(n > counts.swap(n, Ordering::SeqCst));
            }),
        );
        let pieces: Vec<Bytes> = (0..20).map(piece).collect();
        for p in &pieces[..10] {
            pipe.submit(p.clone()).await.unwrap();
        }
        // Settling in between leaves the write idle, and the next piece starts the stages
        // again on it (a lost write would fail that submit).
        pipe.settle().await.unwrap();
        for p in &pieces[10..] {
            pipe.submit(p.clone()).await.unwrap();
        }
        pipe.settle().await.unwrap();
        let write = pipe.take().unwrap();
        let total: u64 = pieces.iter().map(|p| p.len() as u64).sum();
        assert_eq!(write.written(), total);
        assert_eq!(told.load(Ordering::SeqCst), total);
        assert_eq!(write.verifier.current(), digest_of(&pieces));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn after_a_failed_write_count_and_hash_agree_and_nothing_later_is_written() {
        let mut pipe = pipeline(3, Arc::new(Semaphore::new(Semaphore::MAX_PERMITS)));
        let pieces: Vec<Bytes> = (0..8).map(piece).collect();
        let mut failed = false;
        for p in &pieces {
            if pipe.submit(p.clone()).await.is_err() {
                failed = true;
                break;
            }
        }
        let settled = pipe.settle().await;
        assert!(failed || settled.is_err(), "the failed write is reported");
        let write = pipe.take().unwrap();
        let kept = &pieces[..2];
        assert_eq!(
            write.written(),
            kept.iter().map(|p| p.len() as u64).sum::<u64>()
        );
        assert_eq!(write.verifier.current(), digest_of(kept));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pipeline_holds_a_bounded_number_of_pieces() {
        // Nothing is written until the gate opens: the writer takes one piece and waits, one
        // more waits in its queue, and the next submit waits for room.
        let gate = Arc::new(Semaphore::new(0));
        let mut pipe = pipeline(0, gate.clone());
        let pieces: Vec<Bytes> = (0..4).map(piece).collect();
        for p in &pieces[..2] {
            pipe.submit(p.clone()).await.unwrap();
        }
        let third =
            tokio::time::timeout(Duration::from_millis(300), pipe.submit(pieces[2].clone()));
        assert!(third.await.is_err(), "a third piece waits for the writer");
        gate.add_permits(Semaphore::MAX_PERMITS >> 1);
        pipe.submit(pieces[3].clone()).await.unwrap();
        pipe.settle().await.unwrap();
        let write = pipe.take().unwrap();
        // The third piece's submit was abandoned before it was queued.
        let sent = [pieces[0].clone(), pieces[1].clone(), pieces[3].clone()];
        assert_eq!(write.verifier.current(), digest_of(&sent));
    }

    #[test]
    fn pipelines_hold_no_blocking_thread_while_they_wait_for_a_piece() {
        // More streams than the blocking pool has threads: a stage parked on the pool while it
        // waits for its next piece would leave no thread for the writes, and nothing would move.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .max_blocking_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let store = crate::store::fs::FsBlobStore::open(dir.path()).unwrap();
            let mut pipes = Vec::new();
            for _ in 0..3 {
                let (w, _) = store
                    .open_pending(&Pending::Temp(uuid::Uuid::new_v4()))
                    .await
                    .unwrap();
                pipes.push(Pipeline::new(HashingWrite::new(
                    w,
                    Verifier::new(Algorithm::Sha256),
                )));
            }
            let pieces: Vec<Bytes> = (0..4).map(piece).collect();
            let run = async {
                for p in &pieces {
                    for pipe in &mut pipes {
                        pipe.submit(p.clone()).await.unwrap();
                    }
                }
                for pipe in &mut pipes {
                    pipe.settle().await.unwrap();
                }
            };
            tokio::time::timeout(Duration::from_secs(20), run)
                .await
                .expect("every stream was written and hashed");
            for mut pipe in pipes {
                let write = pipe.take().unwrap();
                assert_eq!(write.verifier.current(), digest_of(&pieces));
                write.inner.abort().await.unwrap();
            }
        });
    }
}
