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
    }
}

/// Starts every job whose schedule falls due after `since` and at or before `now` (one tick of
/// the scheduler): garbage collection, replication rules, registries' cleanups.
pub async fn start_due(app: &Arc<App>, since: SystemTime, now: SystemTime) {
    let schedules = match app.policies.schedules().await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "could not read cleanup schedules");
            return;
        }
    };
    let due = |schedule: &crate::jobs::schedule::Schedule| schedule.due_between(since, now);
    match crate::jobs::gc::settings(app.store.meta.clone()).await {
        Ok(gc) if due(&gc.schedule) => {
            let busy = app.cache.fetches.inflight_digests();
            if let Err(e) = app
                .gc()
                .start(Trigger::Schedule, false, "schedule", busy)
                .await
            {
                tracing::warn!(error = %e, "scheduled garbage collection did not start");
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
                    && due(&r.schedule)
                {
                    if let Err(e) =
                        crate::replication::run::start(app, &r.name, Trigger::Schedule, "schedule")
                            .await
                    {
                        tracing::warn!(rule = %r.name, error = %e, "scheduled replication did not start");
                    }
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not read replication rules"),
    }
    for (registry, schedule) in schedules {
        if !due(&schedule) {
            continue;
        }
        if app.store.registry(&registry).is_none() {
            continue;
        }
        match crate::policy::run::start(app, &registry, Trigger::Schedule, false, "schedule").await
        {
            Ok(e) => tracing::debug!(%registry, execution = %e.id, "scheduled cleanup started"),
            Err(e) => tracing::warn!(%registry, error = %e, "scheduled cleanup did not start"),
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
