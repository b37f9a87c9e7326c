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
    tokio::spawn(async move {
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
        }
        if !self.dry_run {
            meta.flush().await?;
        }
        Ok(())
    }

    /// Selects and (unless dry) deletes in one image.
    async fn image(&self, repo: &str, image: &str) -> Result<ImageDone> {
        let meta = &self.app.store.meta;
        let records = meta.artifacts(repo, None, usize::MAX).await?;
        let mut tags_of: HashMap<Digest, Vec<String>> = HashMap::new();
        for tag in meta.tags(repo, None, usize::MAX).await? {
            if let Some(d) = meta.tag(repo, &tag).await? {
                tags_of.entry(d).or_default().push(tag);
            }
        }
        let mut artifacts = Vec::with_capacity(records.len());
        let mut by_digest: HashMap<Digest, ArtifactRecord> = HashMap::new();
        for (digest, record) in records {
            let tags = tags_of.remove(&digest).unwrap_or_default();
            let mut pulled_ms = meta.last_pull(repo, &digest).await?;
            if self.cache {
                // A cache artifact arrives through a pull.
                pulled_ms = Some(pulled_ms.unwrap_or(0).max(record.pushed_ms));
            }
            let children = if manifest::is_index_media_type(&record.media_type) {
                self.references(&digest).await?.1
            } else {
                Vec::new()
            };
            let subject = record
                .subject
                .clone()
                .or_else(|| tags.iter().find_map(|t| cosign_subject(t)));
            let protected = tags
                .iter()
                .any(|t| self.protections.iter().any(|p| p.protects(image, t)));
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
        let selection = select(&self.policies, image, &artifacts, now_ms());
        let mut counts = Counts {
            examined: artifacts.len() as u64,
            ..Counts::default()
        };
        let mut rows = Vec::new();
        let action = if self.dry_run {
            "would_delete"
        } else {
            "deleted"
        };
        let mut deleted = Vec::new();
        for (digest, tags) in &selection.deleted {
            let record = by_digest.get(digest);
            let size = record.map_or(0, |r| r.size);
            if !self.dry_run {
                match meta.delete_artifact(repo, digest).await? {
                    Some(_) => {}
                    // Deleted meanwhile by someone else: nothing to do or to report.
                    None => continue,
                }
                self.announce(repo, digest, tags, record);
                deleted.push(digest.clone());
            }
            counts.acted += 1;
            counts.bytes += size;
            rows.push(HistoryRow::new(
                format!("{repo}@{digest}"),
                tags.clone(),
                action,
                size,
            ));
        }
        if !deleted.is_empty() {
            self.unlink_orphans(repo, &deleted, &selection.kept.keys().collect::<Vec<_>>())
                .await?;
            meta.remove_repo_if_empty(repo).await?;
        }
        Ok(ImageDone { counts, rows })
    }

    /// Unlinks from `repo` the blobs and child manifests the deleted artifacts referred to
    /// that no kept artifact refers to.
    async fn unlink_orphans(&self, repo: &str, deleted: &[Digest], kept: &[&Digest]) -> Result<()> {
        let mut orphans: HashSet<Digest> = HashSet::new();
        for d in deleted {
            let (blobs, children) = self.references(d).await?;
            orphans.extend(blobs);
            orphans.extend(children);
        }
        for d in kept {
            let (blobs, children) = self.references(d).await?;
            for b in blobs.iter().chain(&children) {
                orphans.remove(b);
            }
            orphans.remove(*d);
        }
        let meta = &self.app.store.meta;
        for blob in orphans {
            meta.unlink_blob(repo, &blob).await?;
        }
        Ok(())
    }

    /// The blobs and child manifests a stored manifest refers to (none when it cannot be read:
    /// nothing is unlinked on a guess).
    async fn references(&self, digest: &Digest) -> Result<(Vec<Digest>, Vec<Digest>)> {
        let limit = self.app.config.limits.max_manifest_bytes as u64;
        let Some(bytes) = self.app.store.blobs.read_small(digest, limit).await? else {
            return Ok((Vec::new(), Vec::new()));
        };
        Ok(match manifest::parse(&bytes, None) {
            Ok(p) => (p.blobs, p.children.into_iter().map(|c| c.digest).collect()),
            Err(_) => (Vec::new(), Vec::new()),
        })
    }

    /// DELETE_ARTIFACT, DELETE_TAG for each tag, and CLEANUP for what a real run deleted.
    fn announce(
        &self,
        repo: &str,
        digest: &Digest,
        tags: &[String],
        record: Option<&ArtifactRecord>,
    ) {
        let (media_type, size) = record.map_or(("", 0), |r| (r.media_type.as_str(), r.size));
        let happened = |kind, tag| Happened {
            kind,
            operator: "cleanup",
            repository: repo,
            tag,
            digest: digest.as_str(),
            media_type,
            size,
        };
        let events = &self.app.events;
        events.emit(happened(EventKind::Cleanup, None));
        events.emit(happened(EventKind::DeleteArtifact, None));
        for t in tags {
            events.emit(happened(EventKind::DeleteTag, Some(t)));
        }
    }
}

/// The artifact a cosign tag (`sha256-HEX.sig`, `.att`, `.sbom`) belongs to.
fn cosign_subject(tag: &str) -> Option<Digest> {
    let hex = tag.strip_prefix("sha256-")?;
    let hex = [".sig", ".att", ".sbom"]
        .iter()
        .find_map(|s| hex.strip_suffix(s))?;
    Digest::parse(&format!("sha256:{hex}")).ok()
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
