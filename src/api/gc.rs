//! `/api/v1/gc[...]`: garbage collection's schedule and executions (run now or as a dry run,
//! stop, tasks, history), and `/api/v1/cache/eviction/executions[...]`, the cache's evictions
//! under its size cap, which free space the same way. An admin of every registry's: blobs are
//! shared by all of them.

use http::{Response, StatusCode};

use super::jobs::{self, RunRequest};
use super::policies::ScheduleView;
use super::{json, Ctx};
use crate::auth::Action;
use crate::error::Result;
use crate::http::body::Body;
use crate::jobs::executions::Trigger;
use crate::jobs::gc::SCOPE;
use crate::jobs::schedule::ScheduleSettings;

fn admin(ctx: &Ctx<'_>) -> Result<()> {
    ctx.check(Action::Manage(None))
}

/// `GET /gc`: the schedule and the next run times.
pub async fn get_settings(ctx: &Ctx<'_>) -> Result<Response<Body>> {
    admin(ctx)?;
    let s = crate::jobs::gc::settings(ctx.app.store.meta.clone()).await?;
    json(StatusCode::OK, &ScheduleView::of(s.schedule)?)
}

/// `PUT /gc`: sets the schedule.
pub async fn put_settings(ctx: &Ctx<'_>, settings: ScheduleSettings) -> Result<Response<Body>> {
    admin(ctx)?;
    let settings = crate::jobs::gc::set_settings(ctx.app.store.meta.clone(), settings).await?;
    ctx.app.store.meta.flush().await?;
    json(StatusCode::OK, &ScheduleView::of(settings.schedule)?)
}

/// `POST /gc/executions`: collects now (or a dry run); 202 with the execution.
pub async fn run(ctx: &Ctx<'_>, body: RunRequest) -> Result<Response<Body>> {
    admin(ctx)?;
    let busy = ctx.app.cache.fetches.inflight_digests();
    let e = ctx
        .app
        .gc()
        .start(
            Trigger::Manual,
            body.dry_run,
            ctx.req.principal.name(),
            busy,
        )
        .await?;
    jobs::started(e)
}

/// `GET /gc/executions`.
pub async fn executions(ctx: &Ctx<'_>) -> Result<Response<Body>> {
    admin(ctx)?;
    jobs::executions(ctx, SCOPE).await
}

/// `GET /gc/executions/{id}`.
pub async fn get_execution(ctx: &Ctx<'_>, id: &str) -> Result<Response<Body>> {
    admin(ctx)?;
    jobs::get(ctx, SCOPE, id).await
}

/// `POST /gc/executions/{id}/stop`.
pub async fn stop(ctx: &Ctx<'_>, id: &str) -> Result<Response<Body>> {
    admin(ctx)?;
    jobs::stop(ctx, SCOPE, id).await
}

/// `GET /gc/executions/{id}/tasks`.
pub async fn tasks(ctx: &Ctx<'_>, id: &str) -> Result<Response<Body>> {
    admin(ctx)?;
    jobs::tasks(ctx, SCOPE, id).await
}

/// `GET /gc/executions/{id}/history`.
pub async fn history(ctx: &Ctx<'_>, id: &str) -> Result<Response<Body>> {
    admin(ctx)?;
    jobs::history(ctx, SCOPE, id).await
}

/// `GET /cache/eviction/executions`: evictions under `pull_through.cache_max_size`, newest
/// first (they start by themselves when the cache passes its cap).
pub async fn evictions(ctx: &Ctx<'_>) -> Result<Response<Body>> {
    admin(ctx)?;
    jobs::executions(ctx, crate::cache::evict::SCOPE).await
}

/// `GET /cache/eviction/executions/{id}`.
pub async fn get_eviction(ctx: &Ctx<'_>, id: &str) -> Result<Response<Body>> {
    admin(ctx)?;
    jobs::get(ctx, crate::cache::evict::SCOPE, id).await
}

/// `POST /cache/eviction/executions/{id}/stop`.
pub async fn stop_eviction(ctx: &Ctx<'_>, id: &str) -> Result<Response<Body>> {
    admin(ctx)?;
    jobs::stop(ctx, crate::cache::evict::SCOPE, id).await
}

/// `GET /cache/eviction/executions/{id}/tasks`.
pub async fn eviction_tasks(ctx: &Ctx<'_>, id: &str) -> Result<Response<Body>> {
    admin(ctx)?;
    jobs::tasks(ctx, crate::cache::evict::SCOPE, id).await
}

/// `GET /cache/eviction/executions/{id}/history`: what it evicted.
pub async fn eviction_history(ctx: &Ctx<'_>, id: &str) -> Result<Response<Body>> {
    admin(ctx)?;
    jobs::history(ctx, crate::cache::evict::SCOPE, id).await
}
