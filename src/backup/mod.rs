//! Backups: an online copy of a node's metadata and blobs into a directory, and the restore of
//! such a directory into a new data directory.
//!
//! A backup directory holds `berth-backup.jsonl` (one [`Line`] per line: a header, registries,
//! image caches with their credentials, typed records, then per repository its tags, artifacts
//! and blob links, and an end line) and `blobs/ALGO/XX/HEX` (each blob once). The lines are
//! read through the metadata seam in pages while the server runs ([`export::page`]), each
//! repository's referring records before what they refer to (tags, then artifacts, then blob
//! links, then the blobs): whatever is deleted meanwhile can only leave a reference without its
//! target, never the other way round, and [`restore`] drops such references. Every image a
//! restore brings back is therefore complete: all of its blobs and children, checked by
//! digest.

pub mod export;
pub mod restore;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::oci::digest::Digest;
use crate::store::meta::{ArtifactRecord, CredentialRecord, ImageCacheRecord, RegistryRecord};

pub use restore::{check, restore, Checked, RestoreReport};

/// Version of the backup format this build writes and reads.
pub const FORMAT: u32 = 1;

/// The lines file of a backup directory.
pub const LINES_FILE: &str = "berth-backup.jsonl";

/// One line of a backup.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Line {
    /// First line: what wrote it and when.
    Header {
        /// [`FORMAT`].
        format: u32,
        /// berth version that wrote it.
        berth: String,
        /// When the copy began, Unix ms.
        created_ms: u64,
    },
    /// A registry.
    Registry {
        /// Its record.
        record: RegistryRecord,
    },
    /// An image cache with its credentials (a backup holds secrets: keep it like the data
    /// directory).
    ImageCache {
        /// Its record.
        record: ImageCacheRecord,
        /// Its credentials, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        credentials: Option<CredentialRecord>,
    },
    /// A typed record (users, access keys, webhook policies and deliveries...).
    Record {
        /// Its tree.
        tree: String,
        /// Its key (parts joined by NUL).
        key: String,
        /// Its JSON value.
        value: serde_json::Value,
    },
    /// A tag of a repository.
    Tag {
        /// Repository.
        repo: String,
        /// Tag.
        tag: String,
        /// The artifact it points at.
        digest: Digest,
    },
    /// An artifact (its manifest is a blob of the backup).
    Artifact {
        /// Repository.
        repo: String,
        /// Manifest digest.
        digest: Digest,
        /// Its record (media type, size, push time, subject).
        record: ArtifactRecord,
        /// Last pull, Unix ms.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        last_pull_ms: Option<u64>,
    },
    /// A blob linked by a repository.
    Blob {
        /// Repository.
        repo: String,
        /// Blob digest.
        digest: Digest,
        /// Its size.
        size: u64,
    },
    /// Last line: the copy is complete.
    End {},
}

impl Line {
    /// The blob this line needs in the backup, with its size.
    pub fn needs(&self) -> Option<(&Digest, u64)> {
        match self {
            Line::Artifact { digest, record, .. } => Some((digest, record.size)),
            Line::Blob { digest, size, .. } => Some((digest, *size)),
            _ => None,
        }
    }
}

/// One page of a backup's lines, and where the next one starts (`None`: this page ends with
/// [`Line::End`]).
#[derive(Debug, Serialize, Deserialize)]
pub struct Page {
    /// The lines.
    pub lines: Vec<Line>,
    /// Cursor of the next page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// Where a blob lives in a backup directory.
pub fn blob_path(dir: &Path, digest: &Digest) -> PathBuf {
    let hex = digest.hex();
    dir.join("blobs")
        .join(digest.algorithm().as_str())
        .join(&hex[..2])
        .join(hex)
}

/// A failure to read or restore a backup.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The backup directory could not be read.
    #[error("{path}: {source}")]
    Io {
        /// What was read.
        path: PathBuf,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The lines file is not a complete backup this build reads.
    #[error("{path}: {why}")]
    Format {
        /// The lines file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The data directory failed.
    #[error(transparent)]
    Store(#[from] crate::error::Error),
}

impl From<crate::store::meta::MetaError> for BackupError {
    fn from(e: crate::store::meta::MetaError) -> Self {
        BackupError::Store(e.into())
    }
}
