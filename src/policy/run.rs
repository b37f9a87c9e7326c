//! A registry's cleanup as a job (DESIGN.md 9): one execution per run, one task per image, a
//! history row per artifact deleted (or, in a dry run, that would be). The selection is
//! [`super::cleanup::select`] over the policies as they were when the run started, so policies
//! changed during a run apply from the next one; protected artifacts are never deleted.
//!
//! A real run deletes each selected artifact with its tags, unlinks from the image the blobs
//! only deleted artifacts referred to, and drops an emptied image; the blobs themselves are
//! reclaimed by garbage collection when no image links them any more.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::book::Protection;
use super::cleanup::{select, Artifact, Policy};
use crate::config::RegistryKind;
use crate::error::{Error, Result};
use crate::events::{EventKind, Happened};
use crate::jobs::executions::{Counts, Execution, HistoryRow, Run, Start, Trigger};
use crate::oci::digest::Digest;
use crate::oci::manifest;
use crate::oci::reference::cosign_subject;
use crate::store::meta::{now_ms, ArtifactRecord};
use crate::App;

/// Executions of a registry's cleanup share this scope (one at a time).
pub fn scope(registry: &str) -> String {
    format!("cleanup/{registry}")
}

/// Executions and their history kept per registry: the newest this many...
const KEEP_EXECUTIONS: usize = 50;
/// ...none older than this.
const KEEP_FOR: std::time::Duration = std::time::Duration::from_secs(90 * 24 * 3600);

/// Starts a cleanup of `registry` in the background; returns the execution as it started.
/// Refused (409) while another cleanup of the registry runs.
pub async fn start(
    app: &Arc<App>,
    registry: &str,
    trigger: Trigger,
    dry_run: bool,
    operator: &str,
) -> Result<Execution> {
    let record = app
        .store
        .registry(registry)
        .ok_or_else(|| Error::NotFound(format!("registry {registry:?} does not exist")))?;
    let policies = app
        .policies
        .cleanup_policies(registry)
        .await?
        .iter()
        .map(|p| p.compile())
        .collect::<Result<Vec<Policy>>>()?;
    let protections = app.policies.protections(registry);
    let run = app
        .jobs
        .start(Start {
            kind: "cleanup".into(),
            scope: scope(registry),
            trigger,
            dry_run,
            operator: operator.to_string(),
        })
        .await
        .map_err(|e| match e {
            crate::jobs::executions::StartError::AlreadyRunning { .. } => {
                Error::Conflict(e.to_string())
            }
            crate::jobs::executions::StartError::Meta(m) => m.into(),
        })?;
    let started = run.execution().clone();
    tracing::info!(execution = %started.id, %registry, dry_run, trigger = ?trigger, %operator, policies = policies.len(), "cleanup started");
    let app = app.clone();
    let cleanup = Cleanup {
        app: app.clone(),
        registry: registry.to_string(),
        cache: record.kind == RegistryKind::Cache,
        policies,
        protections,
        dry_run,
    };
    let runtime = app.job_runtime.clone();
    runtime.spawn(async move {
        let ended = cleanup.run(run).await;
        match ended {
            Ok(e) => {
                tracing::info!(execution = %e.id, registry = %cleanup.registry, status = ?e.status, images = e.tasks, deleted = e.counts.acted, failed = e.counts.failed, "cleanup ended")
            }
            Err(e) => {
                tracing::error!(registry = %cleanup.registry, error = %e, "cleanup could not record its end")
            }
        }
        if let Err(e) = app
            .jobs
            .prune(&scope(&cleanup.registry), KEEP_EXECUTIONS, KEEP_FOR)
            .await
        {
            tracing::warn!(registry = %cleanup.registry, error = %e, "could not prune old cleanup executions");
        }
    });
    Ok(started)
}

struct Cleanup {
    app: Arc<App>,
    registry: String,
    cache: bool,
    policies: Vec<Policy>,
    protections: Arc<Vec<Protection>>,
    dry_run: bool,
}

/// What the cleanup did to one image: counts and history rows.
struct ImageDone {
    counts: Counts,
    rows: Vec<HistoryRow>,
}

impl Cleanup {
    /// Runs the cleanup and ends the execution: failed with the error that stopped it, if one
    /// did (never left running).
    async fn run(&self, mut run: Run) -> Result<Execution> {
        let outcome = self.images(&mut run).await;
        Ok(run.finish(outcome.err().map(|e| e.to_string())).await?)
    }

    async fn images(&self, run: &mut Run) -> Result<()> {
        let meta = &self.app.store.meta;
        // Pulls of the last second count.
        self.app.store.pulls.flush(&**meta).await?;
        let repos = meta
            .repositories(Some(&self.registry), None, usize::MAX)
            .await?;
        for repo in repos {
            if run.stopping() {
                break;
            }
            let image = repo
                .strip_prefix(&format!("{}/", self.registry))
                .unwrap_or(&repo)
                .to_string();
            match self.image(&repo, &image).await {
                Ok(done) => run.task(&image, done.counts, None, done.rows).await?,
                Err(e) => {
                    tracing::warn!(repository = %repo, error = %e, "cleanup of an image failed");
                    let counts = Counts {
                        failed: 1,
                        ..Counts::default()
                    };
                    run.task(&image, counts, Some(e.to_string()), Vec::new())
                        .await?
                }
            }
            // A long run shares the workers with the requests it must not delay. (Resting a
            // third of the time it works cost more run time than it won in p99:
            // benches/README.md, "Lifecycle".)
            tokio::task::yield_now().await;
        }
        if !self.dry_run {
            meta.flush().await?;
        }
        Ok(())
    }

    /// Selects and (unless dry) deletes in one image.
    async fn image(&self, repo: &str, image: &str) -> Result<ImageDone> {
        let (artifacts, records) =
            gather(&self.app, repo, image, self.cache, &self.protections).await?;
        let selection = select(&self.policies, image, &artifacts, now_ms());
        let mut counts = Counts {
            examined: artifacts.len() as u64,
            ..Counts::default()
        };
        let doomed: Vec<(Digest, Vec<String>)> = selection.deleted.into_iter().collect();
        let rows = if self.dry_run {
            doomed
                .into_iter()
                .map(|(digest, tags)| {
                    let size = records.get(&digest).map_or(0, |r| r.size);
                    HistoryRow::new(format!("{repo}@{digest}"), tags, "would_delete", size)
                })
                .collect()
        } else {
            let rows = delete(&self.app, repo, &doomed, &records, Remover::Cleanup).await?;
            metrics::counter!("berth_cleanup_deleted_artifacts_total").increment(rows.len() as u64);
            rows
        };
        counts.acted = rows.len() as u64;
        counts.bytes = rows.iter().filter_map(|r| r.size).sum();
        Ok(ImageDone { counts, rows })
    }
}

/// An image's artifacts as a selection sees them (tags, push and pull times, index children,
/// subject, protection), with their records. In a cache registry an artifact arrived through
/// a pull: its arrival counts as one.
pub async fn gather(
    app: &App,
    repo: &str,
    image: &str,
    cache: bool,
    protections: &[Protection],
) -> Result<(Vec<Artifact>, HashMap<Digest, ArtifactRecord>)> {
    let meta = &app.store.meta;
    let records = meta.artifacts(repo, None, usize::MAX).await?;
    let mut tags_of: HashMap<Digest, Vec<String>> = HashMap::new();
    for (tag, d) in meta.tagged(repo).await? {
        tags_of.entry(d).or_default().push(tag);
    }
    let mut pulls = meta.last_pulls(repo).await?;
    let mut artifacts = Vec::with_capacity(records.len());
    let mut by_digest: HashMap<Digest, ArtifactRecord> = HashMap::new();
    for (digest, record) in records {
        let tags = tags_of.remove(&digest).unwrap_or_default();
        let mut pulled_ms = pulls.remove(&digest);
        if cache {
            pulled_ms = Some(pulled_ms.unwrap_or(0).max(record.pushed_ms));
        }
        let children = if manifest::is_index_media_type(&record.media_type) {
            references(app, &digest).await?.1
        } else {
            Vec::new()
        };
        let subject = record
            .subject
            .clone()
            .or_else(|| tags.iter().find_map(|t| cosign_subject(t)));
        let protected = tags
            .iter()
            .any(|t| protections.iter().any(|p| p.protects(image, t)));
        artifacts.push(Artifact {
            digest: digest.clone(),
            tags,
            pushed_ms: record.pushed_ms,
            pulled_ms,
            children,
            subject,
            protected,
        });
        by_digest.insert(digest, record);
    }
    Ok((artifacts, by_digest))
}

/// Who deletes, for the events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Remover {
    /// A cleanup (CLEANUP, DELETE_ARTIFACT, DELETE_TAG; operator `cleanup`).
    Cleanup,
    /// The cache's eviction (DELETE_ARTIFACT, DELETE_TAG; operator `eviction`).
    Eviction,
}

/// Deletes artifacts of `repo` with their tags and announces it; unlinks the blobs and child
/// manifests only they referred to (what the repository still holds afterwards keeps its
/// own); drops an emptied repository. The history rows of what went (an artifact deleted
/// meanwhile by someone else is not one).
pub async fn delete(
    app: &App,
    repo: &str,
    doomed: &[(Digest, Vec<String>)],
    records: &HashMap<Digest, ArtifactRecord>,
    by: Remover,
) -> Result<Vec<HistoryRow>> {
    let meta = &app.store.meta;
    let mut rows = Vec::new();
    let mut orphans: HashSet<Digest> = HashSet::new();
    let digests: Vec<Digest> = doomed.iter().map(|(d, _)| d.clone()).collect();
    let answers = meta.delete_artifacts(repo, &digests).await?;
    let refs = references_of(app, &digests).await?;
    for (((digest, tags), answer), (blobs, children)) in doomed.iter().zip(answers).zip(refs) {
        // Deleted meanwhile by someone else: not this run's.
        if answer.is_none() {
            continue;
        }
        let record = records.get(digest);
        announce(app, by, repo, digest, tags, record);
        orphans.extend(blobs);
        orphans.extend(children);
        let size = record.map_or(0, |r| r.size);
        rows.push(HistoryRow::new(
            format!("{repo}@{digest}"),
            tags.clone(),
            "deleted",
            size,
        ));
    }
    if rows.is_empty() {
        return Ok(rows);
    }
    let remaining: Vec<Digest> = meta
        .artifacts(repo, None, usize::MAX)
        .await?
        .into_iter()
        .map(|(d, _)| d)
        .collect();
    for (d, (blobs, children)) in remaining.iter().zip(references_of(app, &remaining).await?) {
        for b in blobs.iter().chain(&children) {
            orphans.remove(b);
        }
        orphans.remove(d);
    }
    for blob in orphans {
        meta.unlink_blob(repo, &blob).await?;
    }
    meta.remove_repo_if_empty(repo).await?;
    Ok(rows)
}

/// [`references`] of several manifests, read a few at a time; in order.
async fn references_of(app: &App, digests: &[Digest]) -> Result<Vec<(Vec<Digest>, Vec<Digest>)>> {
    let mut out = Vec::with_capacity(digests.len());
    for chunk in digests.chunks(8) {
        let reads = chunk
            .iter()
            .cloned()
            .map(|d| async move { references(app, &d).await });
        out.extend(futures_util::future::try_join_all(reads).await?);
    }
    Ok(out)
}

/// The blobs and child manifests a stored manifest refers to (none when it cannot be read:
/// nothing is unlinked on a guess).
async fn references(app: &App, digest: &Digest) -> Result<(Vec<Digest>, Vec<Digest>)> {
    let limit = app.config.limits.max_manifest_bytes as u64;
    let Some(bytes) = app.store.blobs.read_small(digest, limit).await? else {
        return Ok((Vec::new(), Vec::new()));
    };
    Ok(match manifest::parse(&bytes, None) {
        Ok(p) => (p.blobs, p.children.into_iter().map(|c| c.digest).collect()),
        Err(_) => (Vec::new(), Vec::new()),
    })
}

/// DELETE_ARTIFACT and DELETE_TAG for each tag, after CLEANUP for a cleanup.
fn announce(
    app: &App,
    by: Remover,
    repo: &str,
    digest: &Digest,
    tags: &[String],
    record: Option<&ArtifactRecord>,
) {
    let (media_type, size) = record.map_or(("", 0), |r| (r.media_type.as_str(), r.size));
    let operator = match by {
        Remover::Cleanup => "cleanup",
        Remover::Eviction => "eviction",
    };
    let happened = |kind, tag| Happened {
        kind,
        operator,
        repository: repo,
        tag,
        digest: digest.as_str(),
        media_type,
        size,
    };
    if by == Remover::Cleanup {
        app.events.emit(happened(EventKind::Cleanup, None));
    }
    app.events.emit(happened(EventKind::DeleteArtifact, None));
    for t in tags {
        app.events.emit(happened(EventKind::DeleteTag, Some(t)));
    }
}

#[cfg(test)]
mod tests {
    use super::cosign_subject;

    #[test]
    fn cosign_tags_name_their_subject() {
        let hex = "a".repeat(64);
        for suffix in [".sig", ".att", ".sbom"] {
            let d = cosign_subject(&format!("sha256-{hex}{suffix}")).unwrap();
            assert_eq!(d.as_str(), format!("sha256:{hex}"));
        }
        assert!(cosign_subject(&format!("sha256-{hex}")).is_none());
        assert!(cosign_subject("sha256-abc.sig").is_none());
        assert!(cosign_subject("v1.sig").is_none());
    }
}
