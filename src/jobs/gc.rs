//! Online garbage collection of blobs (DESIGN.md 9): the blob files that no image links and no
//! artifact is, older than the grace time, are deleted while the node serves. Safe against
//! pushes and cache fetches through the store's gate (`store::gc`): candidates are marked
//! *before* references are read, so a writer that links one in between un-marks it and the
//! claim before the deletion fails; a writer that comes during a deletion waits for it and
//! writes the blob anew. Uploads and fetches in flight are pending files, never candidates.
//!
//! As a job: one execution (scope `gc`) per run, by hand, as a dry run or on its schedule
//! (daily by default), with a task per thousand blobs and a history row per blob.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::executions::{Counts, Execution, HistoryRow, Run, Start, StartError, Trigger};
use super::schedule::{Schedule, ScheduleSettings};
use crate::error::{Error, Result};
use crate::oci::digest::Digest;
use crate::store::meta::{MetaResult, MetaStore, Records};
use crate::store::Store;

/// The scope of garbage collection's executions (one at a time).
pub const SCOPE: &str = "gc";

/// Blobs per task (and per page of the blob listing).
const PER_TASK: usize = 1000;

/// What a collection deleted (or, dry, would delete).
#[derive(Debug, Default)]
pub struct Collected {
    /// Blobs with their sizes.
    pub blobs: Vec<(Digest, u64)>,
    /// Unreferenced blobs kept because they are younger than the grace time: count, bytes.
    pub kept_young: (usize, u64),
}

/// Collects the blobs nothing references: the whole mark, reference and sweep cycle.
/// `busy` (digests being fetched) are never candidates; `stopping` is asked between deletions.
pub async fn collect(
    store: &Store,
    grace: Duration,
    busy: &[Digest],
    dry_run: bool,
    stopping: &(dyn Fn() -> bool + Sync),
) -> Result<Collected> {
    let outcome = cycle(store, grace, busy, dry_run, stopping).await;
    // Marks left by a failed or stopped cycle must not outlive it. (A by-hand prune may
    // overlap a scheduled collection: either's clearing can only make the other's claims
    // fail, so that it deletes less, never a blob a writer took back.)
    store.gate.clear_marks();
    outcome
}

async fn cycle(
    store: &Store,
    grace: Duration,
    busy: &[Digest],
    dry_run: bool,
    stopping: &(dyn Fn() -> bool + Sync),
) -> Result<Collected> {
    let busy: HashSet<&Digest> = busy.iter().collect();
    let now = SystemTime::now();
    let mut out = Collected::default();
    // 1. Candidates, marked before any reference is read.
    let mut candidates: Vec<(Digest, u64)> = Vec::new();
    let mut after: Option<Digest> = None;
    loop {
        let page = store.blobs.list(after.as_ref(), PER_TASK).await?;
        let Some((last, _)) = page.last() else {
            break;
        };
        after = Some(last.clone());
        for (digest, info) in page {
            if busy.contains(&digest) {
                continue;
            }
            if now.duration_since(info.modified).unwrap_or_default() < grace {
                out.kept_young.0 += 1;
                out.kept_young.1 += info.size;
                continue;
            }
            if dry_run || store.gate.mark(&digest) {
                candidates.push((digest, info.size));
            }
        }
    }
    // 2. What is referenced now: every link and every artifact.
    let referenced = store.meta.referenced().await?;
    candidates.retain(|(d, _)| {
        let kept = referenced.contains(d);
        if kept && !dry_run {
            store.gate.unmark(d);
        }
        !kept
    });
    // 3. Each candidate a writer did not take back meanwhile goes.
    for (digest, size) in candidates {
        if stopping() {
            break;
        }
        if dry_run {
            out.blobs.push((digest, size));
            continue;
        }
        if !store.gate.claim(&digest) {
            continue;
        }
        let deleted = store.blobs.delete(&digest).await;
        store.gate.deleted(&digest);
        if deleted? {
            metrics::counter!("berth_gc_deleted_blobs_total").increment(1);
            metrics::counter!("berth_gc_deleted_bytes_total").increment(size);
            out.blobs.push((digest, size));
        }
    }
    Ok(out)
}

fn settings_records(meta: Arc<dyn MetaStore>) -> Records<ScheduleSettings> {
    Records::new(meta, "gc_settings")
}

/// The schedule of garbage collection: daily when never set.
pub async fn settings(meta: Arc<dyn MetaStore>) -> MetaResult<ScheduleSettings> {
    Ok(settings_records(meta)
        .get(&[SCOPE])
        .await?
        .unwrap_or(ScheduleSettings {
            schedule: Schedule::Daily,
        }))
}

/// Sets the schedule of garbage collection, checked.
pub async fn set_settings(
    meta: Arc<dyn MetaStore>,
    settings: ScheduleSettings,
) -> Result<ScheduleSettings> {
    let settings = settings
        .checked()
        .map_err(|e| Error::BadRequest(e.to_string()))?;
    settings_records(meta).put(&[SCOPE], &settings).await?;
    Ok(settings)
}

/// Executions kept: the newest this many, none older than 90 days.
const KEEP_EXECUTIONS: usize = 50;
const KEEP_FOR: Duration = Duration::from_secs(90 * 24 * 3600);

/// What a garbage collection needs from the running node.
#[derive(Clone)]
pub struct Collector {
    /// The store.
    pub store: Arc<Store>,
    /// The executions.
    pub jobs: super::executions::Jobs,
    /// Grace time.
    pub grace: Duration,
    /// Where the collection runs.
    pub runtime: Arc<super::runtime::JobRuntime>,
}

impl Collector {
    /// Starts a collection in the background (`busy`: digests being fetched); the execution as
    /// it started. Refused (409) while one runs.
    pub async fn start(
        &self,
        trigger: Trigger,
        dry_run: bool,
        operator: &str,
        busy: Vec<Digest>,
    ) -> Result<Execution> {
        let run = self
            .jobs
            .start(Start {
                kind: "gc".into(),
                scope: SCOPE.into(),
                trigger,
                dry_run,
                operator: operator.to_string(),
            })
            .await
            .map_err(|e| match e {
                StartError::AlreadyRunning { .. } => Error::Conflict(e.to_string()),
                StartError::Meta(m) => m.into(),
            })?;
        let started = run.execution().clone();
        tracing::info!(execution = %started.id, dry_run, ?trigger, %operator, grace = ?self.grace, "garbage collection started");
        let this = self.clone();
        self.runtime.spawn(async move {
            match this.run(run, &busy).await {
                Ok(e) => {
                    tracing::info!(execution = %e.id, status = ?e.status, blobs = e.counts.acted, bytes = e.counts.bytes, "garbage collection ended")
                }
                Err(e) => {
                    tracing::error!(error = %e, "garbage collection could not record its end")
                }
            }
            if let Err(e) = this.jobs.prune(SCOPE, KEEP_EXECUTIONS, KEEP_FOR).await {
                tracing::warn!(error = %e, "could not prune old garbage collection executions");
            }
        });
        Ok(started)
    }

    async fn run(&self, mut run: Run, busy: &[Digest]) -> Result<Execution> {
        let dry_run = run.execution().dry_run;
        let stop = run.stop_flag();
        let stopping = move || stop.load(std::sync::atomic::Ordering::Acquire);
        let collected = collect(&self.store, self.grace, busy, dry_run, &stopping).await;
        let outcome = match collected {
            Ok(c) => record(&mut run, c, dry_run).await,
            Err(e) => Err(e),
        };
        Ok(run.finish(outcome.err().map(|e| e.to_string())).await?)
    }
}

/// The tasks and history rows of what a collection did.
async fn record(run: &mut Run, collected: Collected, dry_run: bool) -> Result<()> {
    let action = if dry_run { "would_delete" } else { "deleted" };
    let (young, young_bytes) = collected.kept_young;
    if collected.blobs.is_empty() {
        let counts = Counts {
            examined: young as u64,
            ..Counts::default()
        };
        run.task("blobs", counts, None, Vec::new()).await?;
        return Ok(());
    }
    for (n, chunk) in collected.blobs.chunks(PER_TASK).enumerate() {
        let counts = Counts {
            examined: chunk.len() as u64,
            acted: chunk.len() as u64,
            failed: 0,
            bytes: chunk.iter().map(|(_, s)| s).sum(),
        };
        let rows = chunk
            .iter()
            .map(|(d, size)| HistoryRow::new(d.to_string(), Vec::new(), action, *size))
            .collect();
        let unit = format!("blobs {}-{}", n * PER_TASK + 1, n * PER_TASK + chunk.len());
        run.task(&unit, counts, None, rows).await?;
    }
    if young > 0 {
        tracing::info!(
            blobs = young,
            bytes = young_bytes,
            "unreferenced blobs younger than the grace time kept"
        );
    }
    Ok(())
}
