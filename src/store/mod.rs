//! Bytes and records on this node: blob files, upload sessions, sled metadata, the registries
//! map. No HTTP type and no configuration here.

pub mod blobs;
#[cfg(test)]
mod conformance;
pub mod fs;
pub mod lock;
pub mod meta;
pub mod uploads;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use blobs::BlobStore;
use meta::{Meta, RegistryRecord};

/// Last-pull times gathered in memory and written to sled in batches.
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
    pub fn flush(&self, meta: &Meta) -> Result<usize, sled::Error> {
        let batch: Vec<(Arc<str>, u64)> = std::mem::take(&mut *self.pending.lock())
            .into_iter()
            .collect();
        if !batch.is_empty() {
            meta.record_pulls(&batch)?;
        }
        Ok(batch.len())
    }
}

/// Everything stored on this node.
pub struct Store {
    /// Blob bytes and writes in progress.
    pub blobs: Arc<dyn BlobStore>,
    /// Metadata.
    pub meta: Meta,
    /// Upload sessions.
    pub uploads: uploads::Uploads,
    /// Pull times waiting to be written.
    pub pulls: PullRecorder,
    /// Registries by name, shared: every `/v2/` request looks one up, and an `Arc` clone is
    /// cheaper than cloning the record's strings.
    registries: RwLock<HashMap<String, Arc<RegistryRecord>>>,
}

impl Store {
    /// Opens the data directory.
    pub async fn open(data_dir: &Path) -> Result<Store, crate::error::Error> {
        // Metadata first: it takes the data directory's lock.
        let meta = Meta::open(data_dir)?;
        let blobs: Arc<dyn BlobStore> = Arc::new(fs::FsBlobStore::open(data_dir)?);
        let registries = meta
            .registries()?
            .into_iter()
            .map(|r| (r.name.clone(), Arc::new(r)))
            .collect();
        Ok(Store {
            uploads: uploads::Uploads::open(blobs.clone()).await?,
            blobs,
            meta,
            pulls: PullRecorder::default(),
            registries: RwLock::new(registries),
        })
    }

    /// A registry by name (in memory; the server is the only writer while it runs).
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

    /// Creates or updates a registry.
    pub fn put_registry(&self, record: RegistryRecord) -> Result<(), sled::Error> {
        self.meta.put_registry(&record)?;
        self.registries
            .write()
            .insert(record.name.clone(), Arc::new(record));
        Ok(())
    }

    /// Deletes a registry and everything recorded under it (sled and the in-memory map).
    pub fn remove_registry(&self, name: &str) -> Result<(), sled::Error> {
        self.meta.delete_registry(name)?;
        self.registries.write().remove(name);
        Ok(())
    }
}
