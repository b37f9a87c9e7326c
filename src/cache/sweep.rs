//! The by-hand prune of cache registries (`berth cache prune`, `POST /api/v1/cache/prune`):
//! artifacts not pulled for a while are removed, then the blobs nothing references any more
//! are garbage-collected (through the collector's gate, `jobs::gc`). Scheduled cleanups are
//! the registries' cleanup policies (`policy::run`).

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use crate::config::RegistryKind;
use crate::oci::digest::Digest;
use crate::oci::manifest;
use crate::store::meta::now_ms;
use crate::store::Store;

/// What a sweep removed (or, dry, would remove).
#[derive(Debug, Default, serde::Serialize)]
pub struct SweepReport {
    /// Artifacts: repository, digest, tags, last pull (Unix ms).
    pub artifacts: Vec<(String, String, Vec<String>, u64)>,
    /// Blobs: digest and size.
    pub blobs: Vec<(String, u64)>,
    /// Unreferenced blobs kept because they are younger than the grace period: count, bytes.
    pub kept_young: (usize, u64),
}

impl SweepReport {
    /// Bytes of the blobs removed.
    pub fn bytes(&self) -> u64 {
        self.blobs.iter().map(|(_, s)| s).sum()
    }
}

async fn manifest_refs(store: &Store, digest: &Digest) -> Vec<Digest> {
    // Artifacts are manifests, bounded by the manifest limit when they were stored.
    let Ok(Some(bytes)) = store.blobs.read_small(digest, u64::MAX).await else {
        return Vec::new();
    };
    match manifest::parse(&bytes, None) {
        Ok(p) => p
            .blobs
            .into_iter()
            .chain(p.children.into_iter().map(|c| c.digest))
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Publishes DELETE_ARTIFACT for what a real (not dry) sweep removed; the operator is
/// `cleanup`. The records are gone by then, so media type and size are not known.
pub fn announce(events: &crate::events::Events, report: &SweepReport) {
    for (repository, digest, tags, _) in &report.artifacts {
        let removed = |kind, tag| crate::events::Happened {
            kind,
            operator: "cleanup",
            repository,
            tag,
            digest,
            media_type: "",
            size: 0,
        };
        events.emit(removed(crate::events::EventKind::DeleteArtifact, None));
        for t in tags {
            events.emit(removed(crate::events::EventKind::DeleteTag, Some(t)));
        }
    }
}

/// Removes cache-registry artifacts whose last pull (or arrival, if never pulled) is older than
/// `unpulled_for`, unlinks their blobs, and deletes blobs no repository references.
/// `busy` are digests being fetched, never touched; blob files younger than `gc_grace` are kept
/// too (an upload or fetch may be about to link them).
pub async fn sweep(
    store: &Store,
    unpulled_for: Duration,
    gc_grace: Duration,
    busy: &[Digest],
    dry_run: bool,
) -> Result<SweepReport, crate::error::Error> {
    let meta = &store.meta;
    let unpulled_ms = u64::try_from(unpulled_for.as_millis()).unwrap_or(u64::MAX);
    let cutoff = now_ms().saturating_sub(unpulled_ms);
    let mut report = SweepReport::default();
    let mut referenced: HashSet<Digest> = busy.iter().cloned().collect();
    for registry in meta.registries().await? {
        for repo in meta
            .repositories(Some(&registry.name), None, usize::MAX)
            .await?
        {
            let artifacts = meta.artifacts(&repo, None, usize::MAX).await?;
            if registry.kind == RegistryKind::Normal {
                referenced.extend(artifacts.into_iter().map(|(d, _)| d));
                referenced.extend(meta.linked_blobs(&repo, None, usize::MAX).await?);
                continue;
            }
            let mut kept = HashSet::new();
            // A dry run names the tags a removal would take (a real one gets them from it).
            let mut tags_of: std::collections::HashMap<Digest, Vec<String>> = Default::default();
            if dry_run {
                for tag in meta.tags(&repo, None, usize::MAX).await? {
                    if let Some(d) = meta.tag(&repo, &tag).await? {
                        tags_of.entry(d).or_default().push(tag);
                    }
                }
            }
            for (digest, record) in artifacts {
                let last = meta
                    .last_pull(&repo, &digest)
                    .await?
                    .unwrap_or(record.pushed_ms);
                if last > cutoff {
                    kept.extend(manifest_refs(store, &digest).await);
                    kept.insert(digest);
                    continue;
                }
                let tags = if dry_run {
                    tags_of.remove(&digest).unwrap_or_default()
                } else {
                    meta.delete_artifact(&repo, &digest)
                        .await?
                        .unwrap_or_default()
                };
                report
                    .artifacts
                    .push((repo.clone(), digest.to_string(), tags, last));
            }
            if !dry_run {
                for blob in meta.linked_blobs(&repo, None, usize::MAX).await? {
                    if !kept.contains(&blob) {
                        meta.unlink_blob(&repo, &blob).await?;
                    }
                }
                meta.remove_repo_if_empty(&repo).await?;
            }
            referenced.extend(kept);
        }
    }
    if !dry_run {
        // The blobs go through garbage collection's gate: never one a push is linking.
        let collected = crate::jobs::gc::collect(store, gc_grace, busy, false, &|| false).await?;
        report.kept_young = collected.kept_young;
        report.blobs = collected
            .blobs
            .into_iter()
            .map(|(d, size)| (d.to_string(), size))
            .collect();
        store.meta.flush().await?;
        return Ok(report);
    }
    // A dry run changed no link: what the real run would leave referenced is `referenced`.
    let now = SystemTime::now();
    let mut after: Option<Digest> = None;
    loop {
        let page = store.blobs.list(after.as_ref(), 1000).await?;
        let Some((last, _)) = page.last() else {
            break;
        };
        after = Some(last.clone());
        for (digest, info) in page {
            if referenced.contains(&digest) {
                continue;
            }
            let young = now.duration_since(info.modified).unwrap_or_default() < gc_grace;
            if young {
                report.kept_young.0 += 1;
                report.kept_young.1 += info.size;
                continue;
            }
            report.blobs.push((digest.to_string(), info.size));
        }
    }
    Ok(report)
}
