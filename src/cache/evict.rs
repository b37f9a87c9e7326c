//! Cache eviction (issue 12 item 6): with `pull_through.cache_max_size` set, when what the
//! cache registries hold together (their linked blobs and manifests, as the metadata counts
//! them) passes `evict_high_percent` of the cap, the least recently pulled cache artifacts go,
//! each with its platform manifests and referrers, until it holds at most `evict_low_percent`;
//! protected artifacts never. Garbage collection then frees the disk. An execution (scope
//! `evict`) records what went.

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::RegistryKind;
use crate::error::{Error, Result};
use crate::jobs::executions::{Counts, Execution, Run, Start, StartError, Trigger};
use crate::oci::digest::Digest;
use crate::policy::cleanup::units;
use crate::policy::run::{delete, gather, Remover};
use crate::store::meta::ArtifactRecord;
use crate::App;

/// The scope of eviction's executions.
pub const SCOPE: &str = "evict";

/// Bytes the cache registries hold together.
pub async fn cache_bytes(app: &App) -> Result<u64> {
    let mut total = 0;
    for r in app.store.registries() {
        if r.kind == RegistryKind::Cache {
            total += app.store.meta.registry_usage(&r.name).await?.bytes;
        }
    }
    Ok(total)
}

/// The cap and the two watermarks in bytes, if a cap is set.
async fn watermarks(app: &App) -> Result<Option<(u64, u64, u64)>> {
    let pt = &app.config.pull_through;
    let Some(cap) = pt.cache_max_size else {
        return Ok(None);
    };
    let dir = app.config.data_dir.clone();
    let volume = tokio::task::spawn_blocking(move || crate::store::fs::volume_size(&dir))
        .await
        .map_err(|e| Error::Internal(format!("volume size task: {e}")))?
        .map_err(Error::Io)?;
    let cap = cap.bytes(volume);
    let share = |percent: u8| cap / 100 * u64::from(percent);
    Ok(Some((
        cap,
        share(pt.evict_high_percent),
        share(pt.evict_low_percent),
    )))
}

/// Starts an eviction when the cache is above its high watermark (none runs already); the
/// execution it started.
pub async fn check(app: &Arc<App>) -> Result<Option<Execution>> {
    let Some((cap, high, low)) = watermarks(app).await? else {
        return Ok(None);
    };
    let held = cache_bytes(app).await?;
    if held <= high {
        return Ok(None);
    }
    let run = match app
        .jobs
        .start(Start {
            kind: "eviction".into(),
            scope: SCOPE.into(),
            trigger: Trigger::Event,
            dry_run: false,
            operator: "eviction".into(),
        })
        .await
    {
        Ok(run) => run,
        Err(StartError::AlreadyRunning { .. }) => return Ok(None),
        Err(StartError::Meta(e)) => return Err(e.into()),
    };
    let started = run.execution().clone();
    tracing::warn!(execution = %started.id, held, cap, high, low, "the cache is above its high watermark: evicting the least recently pulled");
    let app = app.clone();
    let runtime = app.job_runtime.clone();
    runtime.spawn(async move {
        match evict(&app, run, low).await {
            Ok(e) => {
                let now = cache_bytes(&app).await.unwrap_or_default();
                tracing::info!(execution = %e.id, artifacts = e.counts.acted, held = now, low, "eviction ended");
                // The unlinked blobs' disk space comes back with garbage collection.
                let busy = app.cache.fetches.inflight_digests();
                if let Err(e) = app
                    .gc()
                    .start(Trigger::Event, false, "eviction", busy)
                    .await
                {
                    tracing::info!(error = %e, "garbage collection after the eviction did not start");
                }
            }
            Err(e) => tracing::error!(error = %e, "eviction could not record its end"),
        }
    });
    Ok(Some(started))
}

/// One evictable unit: where it is, when it was last pulled, what it is made of.
struct Candidate {
    last_pulled: u64,
    repo: String,
    members: Vec<(Digest, Vec<String>)>,
    records: HashMap<Digest, ArtifactRecord>,
}

async fn evict(app: &App, mut run: Run, low: u64) -> Result<Execution> {
    let outcome = evict_units(app, &mut run, low).await;
    Ok(run.finish(outcome.err().map(|e| e.to_string())).await?)
}

async fn evict_units(app: &App, run: &mut Run, low: u64) -> Result<()> {
    app.store.pulls.flush(&*app.store.meta).await?;
    let mut candidates = Vec::new();
    for r in app.store.registries() {
        if r.kind != RegistryKind::Cache {
            continue;
        }
        let protections = app.policies.protections(&r.name);
        for repo in app
            .store
            .meta
            .repositories(Some(&r.name), None, usize::MAX)
            .await?
        {
            let image = repo
                .strip_prefix(&format!("{}/", r.name))
                .unwrap_or(&repo)
                .to_string();
            let (artifacts, records) = gather(app, &repo, &image, true, &protections).await?;
            for unit in units(&artifacts) {
                let members: Vec<_> = unit.members.iter().map(|&i| &artifacts[i]).collect();
                if members.iter().any(|a| a.protected) {
                    continue;
                }
                let last_pulled = members
                    .iter()
                    .filter_map(|a| a.pulled_ms)
                    .max()
                    .unwrap_or(0);
                let records = members
                    .iter()
                    .filter_map(|a| Some((a.digest.clone(), records.get(&a.digest)?.clone())))
                    .collect();
                candidates.push(Candidate {
                    last_pulled,
                    repo: repo.clone(),
                    members: members
                        .iter()
                        .map(|a| (a.digest.clone(), a.tags.clone()))
                        .collect(),
                    records,
                });
            }
        }
    }
    candidates.sort_by_key(|c| c.last_pulled);
    for c in candidates {
        if run.stopping() || cache_bytes(app).await? <= low {
            break;
        }
        let rows = delete(app, &c.repo, &c.members, &c.records, Remover::Eviction).await?;
        metrics::counter!("berth_cache_evicted_artifacts_total").increment(rows.len() as u64);
        let counts = Counts {
            examined: c.members.len() as u64,
            acted: rows.len() as u64,
            failed: 0,
            bytes: rows.iter().filter_map(|r| r.size).sum(),
        };
        run.task(&c.repo, counts, None, rows).await?;
    }
    app.store.meta.flush().await?;
    Ok(())
}
