//! Bytes and records on this node: the blob seam, upload sessions, the metadata seam, the
//! registries map. No HTTP type and no configuration here.

pub mod blobs;
#[cfg(test)]
mod conformance;
pub mod fs;
pub mod gc;
pub mod lock;
pub mod meta;
pub mod s3;
pub mod uploads;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use blobs::BlobStore;
use meta::{Change, MetaResult, MetaStore, RegistryRecord};

/// The registries map: every `/v2/` request looks one up.
type RegistryMap = Arc<RwLock<HashMap<String, Arc<RegistryRecord>>>>;

/// Last-pull times gathered in memory and written to the metadata store in batches.
#[derive(Default)]
pub struct PullRecorder {
    pending: Mutex<HashMap<Arc<str>, u64>>,
}

impl PullRecorder {
    /// Notes a pull now (cheap: an `Arc` clone and a map insert).
    pub fn record(&self, key: &Arc<str>) {
        let now = meta::now_ms();
        self.pending.lock().insert(key.clone(), now);
    }

    /// Writes what was gathered since the last call.
    pub async fn flush(&self, meta: &dyn MetaStore) -> MetaResult<usize> {
        let batch: Vec<(Arc<str>, u64)> = std::mem::take(&mut *self.pending.lock())
            .into_iter()
            .collect();
        if !batch.is_empty() {
            meta.record_pulls(&batch).await?;
        }
        Ok(batch.len())
    }
}

/// Everything stored on this node.
pub struct Store {
    /// Blob bytes and writes in progress.
    pub blobs: Arc<dyn BlobStore>,
    /// Metadata.
    pub meta: Arc<dyn MetaStore>,
    /// Upload sessions.
    pub uploads: uploads::Uploads,
    /// Pull times waiting to be written.
    pub pulls: PullRecorder,
    /// Where garbage collection and the writers that make blobs referenced meet.
    pub gate: Arc<gc::BlobGate>,
    /// Registries by name, shared: every `/v2/` request looks one up, and an `Arc` clone is
    /// cheaper than cloning the record's strings. A copy of the metadata that follows its
    /// changes ([`Change::Registry`]), whoever makes them.
    registries: RegistryMap,
    /// The data directory's lock, when the metadata backend does not hold it.
    _lock: Option<lock::DataDirLock>,
}

/// Whether a directory holds berth's data (its metadata), as opposed to nothing or something
/// else: admin commands refuse to open anything but a data directory `serve` made.
pub fn holds_data(data_dir: &Path) -> bool {
    data_dir.join("meta").is_dir()
}

/// Where blob bytes live (`[storage]` in the configuration, tagged by `kind`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum BlobBackend {
    /// Under the data directory (`blobs/`, `uploads/`, `partial/`, `tmp/`). A struct variant:
    /// serde lets a unit one take unknown keys.
    Filesystem {},
    /// In an S3-compatible bucket; writes in progress are spooled under `DATA/tmp/s3-spool`.
    S3(Box<s3::S3Settings>),
}

impl Default for BlobBackend {
    fn default() -> Self {
        BlobBackend::Filesystem {}
    }
}

impl BlobBackend {
    /// Opens the blob store of `data_dir`.
    pub async fn open(&self, data_dir: &Path) -> std::io::Result<Arc<dyn BlobStore>> {
        Ok(match self {
            BlobBackend::Filesystem {} => Arc::new(fs::FsBlobStore::open(data_dir)?),
            BlobBackend::S3(settings) => {
                let spool = data_dir.join("tmp").join("s3-spool");
                Arc::new(s3::S3BlobStore::open(settings, &spool).await?)
            }
        })
    }
}

impl Store {
    /// Opens the data directory, blobs on the filesystem.
    pub async fn open(data_dir: &Path) -> Result<Store, crate::error::Error> {
        Store::open_with(
            data_dir,
            &BlobBackend::Filesystem {},
            &meta::MetadataSettings::Sled,
        )
        .await
    }

    /// Opens the data directory, blobs where `backend` says and metadata where `metadata`
    /// says.
    pub async fn open_with(
        data_dir: &Path,
        backend: &BlobBackend,
        metadata: &meta::MetadataSettings,
    ) -> Result<Store, crate::error::Error> {
        // Metadata first: it takes the data directory's lock.
        let (meta, lock) = meta::open_with(data_dir, metadata).await?;
        let mut store = Store::with_backend(data_dir, meta, backend).await?;
        store._lock = lock;
        Ok(store)
    }

    /// Opens the blobs of a data directory over a metadata store already open (the data
    /// directory's lock taken), on the filesystem.
    pub async fn with_meta(
        data_dir: &Path,
        meta: Arc<dyn MetaStore>,
    ) -> Result<Store, crate::error::Error> {
        Store::with_backend(data_dir, meta, &BlobBackend::Filesystem {}).await
    }

    /// Opens the blobs where `backend` says over a metadata store already open.
    pub async fn with_backend(
        data_dir: &Path,
        meta: Arc<dyn MetaStore>,
        backend: &BlobBackend,
    ) -> Result<Store, crate::error::Error> {
        let blobs = backend.open(data_dir).await?;
        let registries = RegistryMap::default();
        // Subscribed before the first read: no change falls between the two.
        meta.subscribe(follow_registries(&registries));
        let reloaded = registries.clone();
        meta::reload_on_lost(&meta, move |meta| {
            let map = reloaded.clone();
            async move {
                match meta.registries().await {
                    Ok(all) => {
                        *map.write() = all
                            .into_iter()
                            .map(|r| (r.name.clone(), Arc::new(r)))
                            .collect();
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "registries not read again after lost changes")
                    }
                }
            }
        });
        let loaded = meta.registries().await?;
        {
            let mut map = registries.write();
            for r in loaded {
                map.entry(r.name.clone()).or_insert_with(|| Arc::new(r));
            }
        }
        Ok(Store {
            _lock: None,
            uploads: uploads::Uploads::open(blobs.clone()).await?,
            blobs,
            meta,
            pulls: PullRecorder::default(),
            gate: Default::default(),
            registries,
        })
    }

    /// A registry by name (in memory, following every change of the metadata).
    pub fn registry(&self, name: &str) -> Option<Arc<RegistryRecord>> {
        self.registries.read().get(name).cloned()
    }

    /// The first registry matching `pred` (under the read lock: no clones on a miss).
    pub fn find_registry(
        &self,
        mut pred: impl FnMut(&RegistryRecord) -> bool,
    ) -> Option<Arc<RegistryRecord>> {
        self.registries.read().values().find(|r| pred(r)).cloned()
    }

    /// All registries (in memory).
    pub fn registries(&self) -> Vec<RegistryRecord> {
        self.registries
            .read()
            .values()
            .map(|r| RegistryRecord::clone(r))
            .collect()
    }

    /// Creates or updates a registry (the map follows through the change notification).
    pub async fn put_registry(&self, record: RegistryRecord) -> MetaResult<()> {
        self.meta.put_registry(&record).await
    }

    /// Deletes a registry and everything recorded under it (the map follows).
    pub async fn remove_registry(&self, name: &str) -> MetaResult<()> {
        self.meta.delete_registry(name).await
    }
}

/// A subscriber that keeps `map` equal to the registries of the metadata.
fn follow_registries(map: &RegistryMap) -> meta::Subscriber {
    let map = map.clone();
    Box::new(move |change| {
        if let Change::Registry { name, record } = change {
            let mut map = map.write();
            match record {
                Some(r) => {
                    map.insert(name.to_owned(), Arc::new(r.clone()));
                }
                None => {
                    map.remove(name);
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_registries_map_follows_changes_made_below_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        let record = RegistryRecord {
            name: "lib".into(),
            kind: meta::RegistryKind::Normal,
            created_ms: 1,
            cache: None,
            public_uri: true,
            anonymous_pull: false,
            quota_bytes: None,
        };
        // Written through the metadata seam, as another node's change would arrive.
        store.meta.put_registry(&record).await.unwrap();
        assert!(!store.registry("lib").unwrap().anonymous_pull);
        let mut open = record.clone();
        open.anonymous_pull = true;
        store.meta.put_registry(&open).await.unwrap();
        assert!(store.registry("lib").unwrap().anonymous_pull);
        store.meta.delete_registry("lib").await.unwrap();
        assert!(store.registry("lib").is_none());
        assert!(store.registries().is_empty());
    }
}
