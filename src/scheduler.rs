//! Runs background jobs when their schedules say (UTC): each registry's cleanup
//! (`policy::run`), garbage collection (`jobs::gc`, daily unless set otherwise) and scheduled
//! replication rules (`replication::run`). Gives every
//! cache registry the default cleanup (artifacts not pulled for
//! `pull_through.cleanup_unpulled_after`, daily) unless it has policies or a schedule of its
//! own.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use crate::config::RegistryKind;
use crate::jobs::executions::Trigger;
use crate::App;

/// How often schedules are looked at: cron has minutes.
const TICK: Duration = Duration::from_secs(15);

/// The default cleanup's N: the configured age in whole days, rounded up (at least 1).
pub fn default_days(unpulled_after: Duration) -> u32 {
    let day = 24 * 3600;
    u32::try_from(unpulled_after.as_secs().div_ceil(day).max(1)).unwrap_or(u32::MAX)
}

/// Gives every cache registry without policies or schedule the default cleanup.
pub async fn default_cache_cleanups(app: &App) -> crate::error::Result<()> {
    let days = default_days(app.config.pull_through.cleanup_unpulled_after);
    for r in app.store.registries() {
        if r.kind == RegistryKind::Cache
            && app.policies.default_cache_cleanup(&r.name, days).await?
        {
            tracing::info!(registry = %r.name, days, "default cleanup set: artifacts not pulled for {days} days go, daily at 00:00 UTC");
        }
    }
    Ok(())
}

/// The scheduler: every due cleanup starts (one at a time per registry; a run still going at
/// the next due time makes that one skip, with a log line).
pub async fn run(app: Arc<App>, mut stop: watch::Receiver<bool>) {
    if let Err(e) = default_cache_cleanups(&app).await {
        tracing::error!(error = %e, "could not set the default cleanup of cache registries");
    }
    let mut checked = SystemTime::now();
    let mut tick = tokio::time::interval(TICK);
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {}
        }
        let now = SystemTime::now();
        start_due(&app, checked, now).await;
        checked = now;
        take_over(&app).await;
    }
}

/// Where nodes share the metadata: executions whose node died (their scope's lease ran out)
/// are marked interrupted and started again here, with the same job, trigger and dry-run
/// setting; answers the scopes started (`gc`, `replication/RULE`, `cleanup/REGISTRY`).
pub async fn take_over(app: &Arc<App>) -> Vec<String> {
    let mut started = Vec::new();
    if !app.store.meta.shared() {
        return started;
    }
    let why = "the node running it stopped (its lease ran out): taken over by another node";
    let orphans = match app.jobs.orphans(why).await {
        Ok(o) => o,
        Err(e) => {
            tracing::warn!(error = %e, "could not look for executions of nodes that stopped");
            return started;
        }
    };
    for e in orphans {
        let operator = format!("takeover of {}", e.id);
        let outcome = match e.scope.split_once('/') {
            _ if e.scope == crate::jobs::gc::SCOPE => {
                let busy = app.cache.fetches.inflight_digests();
                app.gc().start(e.trigger, e.dry_run, &operator, busy).await
            }
            Some(("cleanup", registry)) => {
                crate::policy::run::start(app, registry, e.trigger, e.dry_run, &operator).await
            }
            Some(("replication", rule)) => {
                crate::replication::run::start(app, rule, e.trigger, &operator).await
            }
            _ => {
                tracing::warn!(execution = %e.id, scope = %e.scope, "execution of a stopped node interrupted; not started again (it runs per node)");
                continue;
            }
        };
        match outcome {
            Ok(new) => {
                tracing::warn!(execution = %e.id, scope = %e.scope, new = %new.id, "execution of a stopped node taken over");
                started.push(e.scope);
            }
            Err(err) => {
                tracing::warn!(execution = %e.id, scope = %e.scope, error = %err, "execution of a stopped node interrupted; starting it again failed")
            }
        }
    }
    started
}

/// Starts every job whose schedule falls due after `since` and at or before `now` (one tick of
/// the scheduler): garbage collection, replication rules, registries' cleanups; answers the
/// jobs this node started (`gc`, `replication/RULE`, `cleanup/REGISTRY`).
pub async fn start_due(app: &Arc<App>, since: SystemTime, now: SystemTime) -> Vec<String> {
    let mut started = Vec::new();
    let schedules = match app.policies.schedules().await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "could not read cleanup schedules");
            return started;
        }
    };
    let claims = Claims {
        meta: app.store.meta.clone(),
    };
    // Due here and not taken by another node sharing the metadata.
    let due = |job: String, schedule: &crate::jobs::schedule::Schedule| {
        let at = schedule.due_at(since, now);
        let claims = &claims;
        async move {
            match at {
                Some(at) => claims.take(&job, at).await,
                None => false,
            }
        }
    };
    match crate::jobs::gc::settings(app.store.meta.clone()).await {
        Ok(gc) if due("gc".into(), &gc.schedule).await => {
            let busy = app.cache.fetches.inflight_digests();
            match app
                .gc()
                .start(Trigger::Schedule, false, "schedule", busy)
                .await
            {
                Ok(_) => started.push("gc".to_string()),
                Err(e) => tracing::warn!(error = %e, "scheduled garbage collection did not start"),
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "could not read the garbage collection schedule"),
    }
    match app.replication.rules().await {
        Ok(rules) => {
            for r in rules {
                if r.enabled
                    && r.trigger == crate::replication::rule::TriggerKind::Schedule
                    && due(format!("replication/{}", r.name), &r.schedule).await
                {
                    match crate::replication::run::start(
                        app,
                        &r.name,
                        Trigger::Schedule,
                        "schedule",
                    )
                    .await
                    {
                        Ok(_) => started.push(format!("replication/{}", r.name)),
                        Err(e) => {
                            tracing::warn!(rule = %r.name, error = %e, "scheduled replication did not start")
                        }
                    }
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not read replication rules"),
    }
    for (registry, schedule) in schedules {
        if app.store.registry(&registry).is_none()
            || !due(format!("cleanup/{registry}"), &schedule).await
        {
            continue;
        }
        match crate::policy::run::start(app, &registry, Trigger::Schedule, false, "schedule").await
        {
            Ok(e) => {
                tracing::debug!(%registry, execution = %e.id, "scheduled cleanup started");
                started.push(format!("cleanup/{registry}"));
            }
            Err(e) => tracing::warn!(%registry, error = %e, "scheduled cleanup did not start"),
        }
    }
    started
}

/// Runs of scheduled jobs taken, in the metadata: when several nodes share it, each due run
/// is started by the one node whose claim was created first.
struct Claims {
    meta: std::sync::Arc<dyn crate::store::meta::MetaStore>,
}

/// The tree of claims: `JOB \0 DUE_MS` (zero-padded, so a job's claims list in time order).
const CLAIMS: &str = "schedule_claims";

/// Claims older than this are removed when their job is claimed again.
const CLAIMS_KEPT: Duration = Duration::from_secs(7 * 24 * 3600);

impl Claims {
    /// Whether this node takes the run of `job` due at `at` (a metadata failure: no, and
    /// said in the log; the next due time tries again).
    async fn take(&self, job: &str, at: SystemTime) -> bool {
        let ms = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64)
        };
        let key = format!("{job}\0{:020}", ms(at));
        let value = serde_json::json!({"claimed_ms": crate::store::meta::now_ms()});
        match self
            .meta
            .record_create(CLAIMS, &key, value.to_string().into_bytes())
            .await
        {
            Ok(true) => {
                self.prune(job, ms(at).saturating_sub(CLAIMS_KEPT.as_millis() as u64))
                    .await;
                true
            }
            Ok(false) => {
                tracing::debug!(job, "scheduled run taken by another node");
                false
            }
            Err(e) => {
                tracing::warn!(job, error = %e, "scheduled run not claimed: not started");
                false
            }
        }
    }

    /// Removes the claims of `job` due before `before_ms`.
    async fn prune(&self, job: &str, before_ms: u64) {
        let prefix = format!("{job}\0");
        let old = match self.meta.record_list(CLAIMS, &prefix, None, 100).await {
            Ok(old) => old,
            Err(_) => return,
        };
        for (due, _) in old {
            if due.parse::<u64>().is_ok_and(|d| d < before_ms) {
                let _ = self
                    .meta
                    .record_remove(CLAIMS, &format!("{prefix}{due}"))
                    .await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::default_days;
    use std::time::Duration;

    #[test]
    fn the_default_age_is_whole_days_rounded_up() {
        let h = |hours: u64| Duration::from_secs(hours * 3600);
        for (age, days) in [
            (h(0), 1),
            (h(1), 1),
            (h(24), 1),
            (h(25), 2),
            (h(36), 2),
            (h(168), 7),
        ] {
            assert_eq!(default_days(age), days, "{age:?}");
        }
    }
}
