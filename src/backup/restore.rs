//! Restores a backup directory into a data directory: registries, image caches and records
//! first, then per repository its blobs (each checked by digest as it is copied in), its
//! artifacts (each only when its repository holds everything the manifest refers to) and last
//! its tags (each only when its artifact came back). What the backup lacks is dropped and
//! counted, so a restored registry never serves a tag it cannot pull completely.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;
use tokio::io::AsyncBufReadExt;

use super::{blob_path, BackupError, Line, FORMAT, LINES_FILE};
use crate::oci::digest::{Digest, Verifier};
use crate::oci::manifest;
use crate::store::blobs::{HashingWrite, Pending};
use crate::store::meta::{pull_key, ArtifactRecord, Missing, Refers, RegistryKind};
use crate::store::Store;

/// What a restore brought back, and what it dropped.
#[derive(Debug, Default, Serialize)]
pub struct RestoreReport {
    /// Registries.
    pub registries: usize,
    /// Image caches.
    pub image_caches: usize,
    /// Typed records (users, keys, webhooks...).
    pub records: usize,
    /// Repositories with at least one artifact.
    pub repositories: usize,
    /// Artifacts.
    pub artifacts: usize,
    /// Tags.
    pub tags: usize,
    /// Blobs copied into the store.
    pub blobs: usize,
    /// Their bytes.
    pub blob_bytes: u64,
    /// Blobs the backup lacks or holds with other bytes than their digest (deleted while the
    /// backup ran, or damaged since).
    pub missing_blobs: Vec<String>,
    /// Artifacts left out because a blob or child manifest is missing.
    pub dropped_artifacts: Vec<String>,
    /// Tags left out because their artifact is missing.
    pub dropped_tags: Vec<String>,
}

/// One repository's lines, gathered while reading (they come together).
#[derive(Default)]
struct RepoLines {
    tags: Vec<(String, Digest)>,
    artifacts: Vec<(Digest, ArtifactRecord, Option<u64>)>,
    blobs: Vec<(Digest, u64)>,
}

/// A backup directory whose lines file is complete and of this format ([`check`]).
pub struct Checked(PathBuf);

/// Checks that `dir` holds a complete backup of this format, before anything is written.
pub async fn check(dir: &Path) -> Result<Checked, BackupError> {
    check_complete(&dir.join(LINES_FILE)).await?;
    Ok(Checked(dir.to_path_buf()))
}

/// Restores a checked backup into `store` (a new data directory: the caller checks that it
/// held nothing). Manifests longer than `max_manifest` bytes are refused, as a push would be.
pub async fn restore(
    backup: &Checked,
    store: &Store,
    max_manifest: usize,
) -> Result<RestoreReport, BackupError> {
    let dir = backup.0.as_path();
    let path = dir.join(LINES_FILE);
    let mut r = Restorer::new(BlobSource::Dir(dir), store, max_manifest);
    let mut lines = open_lines(&path).await?;
    let mut n = 0usize;
    while let Some(text) = lines.next_line().await.map_err(|e| io_err(&path, e))? {
        n += 1;
        if text.trim().is_empty() {
            continue;
        }
        let line: Line = serde_json::from_str(&text).map_err(|e| BackupError::Format {
            path: path.clone(),
            why: format!("line {n}: {e}"),
        })?;
        r.feed(line).await.map_err(|e| match e {
            Fed::Record(why) => BackupError::Format {
                path: path.clone(),
                why: format!("line {n}: {why}"),
            },
            Fed::Failed(e) => e,
        })?;
    }
    r.finish().await
}

/// Copies what one store holds into another that holds nothing yet (`berth migrate-store`):
/// the lines a backup would hold, read in pages through the metadata seam, restored as from a
/// backup, each blob copied and checked by digest as it goes.
pub async fn migrate(
    from: &Store,
    to: &Store,
    max_manifest: usize,
) -> Result<RestoreReport, BackupError> {
    let mut r = Restorer::new(BlobSource::Store(from), to, max_manifest);
    let mut cursor: Option<String> = None;
    loop {
        let page = super::export::page(&*from.meta, cursor.as_deref(), 1000)
            .await
            .map_err(|e| BackupError::Store(crate::error::Error::Internal(e.to_string())))??;
        for line in page.lines {
            r.feed(line).await.map_err(|e| match e {
                Fed::Record(why) => {
                    BackupError::Store(crate::error::Error::Internal(format!("a record: {why}")))
                }
                Fed::Failed(e) => e,
            })?;
        }
        match page.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    r.finish().await
}

/// Why a line was not taken.
enum Fed {
    /// A typed record whose value does not serialize.
    Record(String),
    /// The store or the source failed.
    Failed(BackupError),
}

impl From<BackupError> for Fed {
    fn from(e: BackupError) -> Self {
        Fed::Failed(e)
    }
}

impl From<crate::store::meta::MetaError> for Fed {
    fn from(e: crate::store::meta::MetaError) -> Self {
        Fed::Failed(e.into())
    }
}

fn io_err(path: &Path, source: io::Error) -> BackupError {
    BackupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

async fn open_lines(
    path: &Path,
) -> Result<tokio::io::Lines<tokio::io::BufReader<tokio::fs::File>>, BackupError> {
    let file = tokio::fs::File::open(path)
        .await
        .map_err(|e| io_err(path, e))?;
    Ok(tokio::io::BufReader::new(file).lines())
}

/// Refuses a lines file that does not start with a header of this format and end with the end
/// line (a copy cut short, or one written by a newer berth).
async fn check_complete(path: &Path) -> Result<(), BackupError> {
    let format = |why: String| BackupError::Format {
        path: path.to_path_buf(),
        why,
    };
    let mut lines = open_lines(path).await?;
    let mut first = true;
    let mut last = String::new();
    while let Some(text) = lines.next_line().await.map_err(|e| io_err(path, e))? {
        if text.trim().is_empty() {
            continue;
        }
        if first {
            match serde_json::from_str::<Line>(&text) {
                Ok(Line::Header { format: FORMAT, .. }) => {}
                Ok(Line::Header { format: f, berth, .. }) => {
                    return Err(format(format!(
                        "backup format {f} (written by berth {berth}); this berth reads format {FORMAT}"
                    )))
                }
                _ => return Err(format("the first line is not a backup header".into())),
            }
            first = false;
        }
        last = text;
    }
    match serde_json::from_str::<Line>(&last) {
        Ok(Line::End {}) => Ok(()),
        _ if first => Err(format("empty: not a backup".into())),
        _ => Err(format(
            "incomplete: the backup was cut short (no end line); take it again".into(),
        )),
    }
}

/// Where the blobs of a restore come from.
enum BlobSource<'a> {
    /// A backup directory (`blobs/ALGO/XX/HEX`).
    Dir(&'a Path),
    /// Another store (a migration).
    Store(&'a Store),
}

struct Restorer<'a> {
    from: BlobSource<'a>,
    store: &'a Store,
    /// The repository whose lines are being gathered (they come together).
    current: Option<(String, RepoLines)>,
    max_manifest: usize,
    kinds: HashMap<String, RegistryKind>,
    /// Blobs in the store (copied in by this restore).
    present: HashSet<Digest>,
    /// Blobs the backup lacks or holds damaged.
    absent: HashSet<Digest>,
    report: RestoreReport,
}

impl<'a> Restorer<'a> {
    fn new(from: BlobSource<'a>, store: &'a Store, max_manifest: usize) -> Restorer<'a> {
        Restorer {
            from,
            store,
            current: None,
            max_manifest,
            kinds: HashMap::new(),
            present: HashSet::new(),
            absent: HashSet::new(),
            report: RestoreReport::default(),
        }
    }

    /// Takes one line: registries, image caches and records go in at once; a repository's
    /// lines are gathered and restored together when the next line is not one of them.
    async fn feed(&mut self, line: Line) -> Result<(), Fed> {
        let store = self.store;
        let repo = match &line {
            Line::Tag { repo, .. } | Line::Artifact { repo, .. } | Line::Blob { repo, .. } => {
                Some(repo.clone())
            }
            _ => None,
        };
        if self.current.as_ref().map(|(r, _)| r) != repo.as_ref() {
            if let Some((name, group)) = self.current.take() {
                self.repository(&name, group).await?;
            }
            self.current = repo.map(|name| (name, RepoLines::default()));
        }
        match line {
            Line::Header { .. } | Line::End {} => {}
            Line::Registry { record } => {
                self.kinds.insert(record.name.clone(), record.kind);
                store
                    .put_registry(record)
                    .await
                    .map_err(BackupError::from)?;
                self.report.registries += 1;
            }
            Line::ImageCache {
                record,
                credentials,
            } => {
                store
                    .meta
                    .put_image_cache(&record, credentials.as_ref())
                    .await?;
                self.report.image_caches += 1;
            }
            Line::Record { tree, key, value } => {
                let bytes = serde_json::to_vec(&value).map_err(|e| Fed::Record(e.to_string()))?;
                store.meta.record_put(&tree, &key, bytes).await?;
                self.report.records += 1;
            }
            Line::Tag { tag, digest, .. } => self.group().tags.push((tag, digest)),
            Line::Artifact {
                digest,
                record,
                last_pull_ms,
                ..
            } => self.group().artifacts.push((digest, record, last_pull_ms)),
            Line::Blob { digest, size, .. } => self.group().blobs.push((digest, size)),
        }
        Ok(())
    }

    fn group(&mut self) -> &mut RepoLines {
        &mut self
            .current
            .as_mut()
            .expect("a repository line opens its group")
            .1
    }

    /// Restores the last repository and makes everything durable; what was done.
    async fn finish(mut self) -> Result<RestoreReport, BackupError> {
        if let Some((name, group)) = self.current.take() {
            self.repository(&name, group).await?;
        }
        self.store.meta.flush().await?;
        Ok(self.report)
    }

    /// A repository: blobs, then artifacts, then tags.
    async fn repository(&mut self, repo: &str, lines: RepoLines) -> Result<(), BackupError> {
        let meta = self.store.meta.clone();
        for (digest, size) in &lines.blobs {
            if self.ensure(digest).await? {
                meta.link_blob(repo, digest, *size).await?;
            }
        }
        // A cache registry's manifests come without their blobs (fetched when asked for);
        // an origin registry's need everything they name, as at push.
        let origin = self.kinds.get(registry_of(repo)) != Some(&RegistryKind::Cache);
        let mut waiting: BTreeMap<Digest, (ArtifactRecord, Option<u64>)> = BTreeMap::new();
        for (digest, record, pulled) in lines.artifacts {
            waiting.insert(digest, (record, pulled));
        }
        let mut restored = Vec::new();
        let mut dropped = Vec::new();
        // Index children sort anywhere: go round until a round restores nothing more.
        loop {
            let mut progress = false;
            let mut still = BTreeMap::new();
            for (digest, (record, pulled)) in std::mem::take(&mut waiting) {
                match self.artifact(repo, &digest, &record, origin).await? {
                    Ok(()) => {
                        progress = true;
                        restored.push((digest, pulled));
                    }
                    Err(Missing::Manifest(_)) => {
                        still.insert(digest, (record, pulled));
                    }
                    Err(Missing::Blob(_)) => dropped.push(digest),
                }
            }
            waiting = still;
            if !progress || waiting.is_empty() {
                break;
            }
        }
        dropped.extend(waiting.into_keys());
        for digest in dropped {
            tracing::warn!(%repo, %digest, "artifact not restored: a blob or child manifest is not in the backup");
            self.report
                .dropped_artifacts
                .push(format!("{repo}@{digest}"));
        }
        if !restored.is_empty() {
            self.report.repositories += 1;
        }
        self.report.artifacts += restored.len();
        let pulls: Vec<(Arc<str>, u64)> = restored
            .iter()
            .filter_map(|(d, pulled)| pulled.map(|t| (pull_key(repo, d), t)))
            .collect();
        if !pulls.is_empty() {
            meta.record_pulls(&pulls).await?;
        }
        for (tag, digest) in lines.tags {
            if meta.tag_artifact(repo, &digest, &tag).await? {
                self.report.tags += 1;
            } else {
                tracing::warn!(%repo, %tag, %digest, "tag not restored: its artifact is not in the backup");
                self.report.dropped_tags.push(format!("{repo}:{tag}"));
            }
        }
        Ok(())
    }

    /// Records one artifact, its manifest copied in and parsed; what it lacks, if anything.
    async fn artifact(
        &mut self,
        repo: &str,
        digest: &Digest,
        record: &ArtifactRecord,
        origin: bool,
    ) -> Result<Result<(), Missing>, BackupError> {
        if !self.ensure(digest).await? {
            return Ok(Err(Missing::Blob(digest.clone())));
        }
        let bytes = self
            .store
            .blobs
            .read_small(digest, self.max_manifest as u64)
            .await
            .map_err(|e| BackupError::Store(e.into()))?
            .ok_or_else(|| {
                BackupError::Store(crate::error::Error::Internal(format!(
                    "manifest {digest} vanished from the store during the restore"
                )))
            })?;
        let parsed = manifest::parse(&bytes, Some(&record.media_type))
            .map_err(|e| BackupError::Store(e.into()))?;
        let refers = if origin {
            Refers::of(&parsed)
        } else {
            Refers::default()
        };
        let referrer = parsed.descriptor(digest, bytes.len() as u64);
        Ok(self
            .store
            .meta
            .put_artifact(repo, digest, record, None, Some(&referrer), &refers)
            .await?)
    }

    /// Whether the blob is in the store, copying it in from the backup (checked against its
    /// digest) the first time.
    async fn ensure(&mut self, digest: &Digest) -> Result<bool, BackupError> {
        if self.present.contains(digest) {
            return Ok(true);
        }
        if self.absent.contains(digest) {
            return Ok(false);
        }
        let (copied, place) = match &self.from {
            BlobSource::Dir(dir) => {
                let path = blob_path(dir, digest);
                let copied = match tokio::fs::File::open(&path).await {
                    Ok(file) => {
                        let pieces = tokio_util::io::ReaderStream::with_capacity(file, 1 << 20);
                        copy_in(self.store, pieces, digest).await
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(e),
                };
                (copied.map_err(|e| io_err(&path, e))?, path)
            }
            BlobSource::Store(from) => {
                let place = PathBuf::from(format!("the source store's blob {digest}"));
                let copied = match from.blobs.stat(digest).await {
                    Ok(Some(info)) => {
                        let pieces = crate::store::blobs::pieces(
                            from.blobs.clone(),
                            digest.clone(),
                            0,
                            info.size,
                        );
                        copy_in(self.store, pieces, digest).await
                    }
                    Ok(None) => Ok(None),
                    Err(e) => Err(e),
                };
                (copied.map_err(|e| io_err(&place, e))?, place)
            }
        };
        match copied {
            Some(size) => {
                self.present.insert(digest.clone());
                self.report.blobs += 1;
                self.report.blob_bytes += size;
                Ok(true)
            }
            None => {
                tracing::warn!(%digest, from = %place.display(), "blob missing, or its bytes do not match its digest");
                self.absent.insert(digest.clone());
                self.report.missing_blobs.push(digest.to_string());
                Ok(false)
            }
        }
    }
}

/// The registry of a repository (its first segment).
fn registry_of(repo: &str) -> &str {
    repo.split('/').next().unwrap_or(repo)
}

/// Copies a blob's bytes into the store as `digest`; its size, or `None` when they are other
/// bytes (nothing is committed then).
async fn copy_in(
    store: &Store,
    pieces: impl futures_util::Stream<Item = io::Result<bytes::Bytes>>,
    digest: &Digest,
) -> io::Result<Option<u64>> {
    use futures_util::StreamExt;
    let (write, _) = store
        .blobs
        .open_pending(&Pending::Temp(uuid::Uuid::new_v4()))
        .await?;
    let mut write = HashingWrite::new(write, Verifier::new(digest.algorithm()));
    let copied = async {
        futures_util::pin_mut!(pieces);
        while let Some(piece) = pieces.next().await {
            write.write(piece?).await?;
        }
        Ok::<_, io::Error>(())
    }
    .await;
    if let Err(e) = copied {
        write.inner.abort().await?;
        return Err(e);
    }
    if &write.verifier.current() != digest {
        write.inner.abort().await?;
        return Ok(None);
    }
    let size = write.written();
    write.inner.commit(digest).await?;
    Ok(Some(size))
}
