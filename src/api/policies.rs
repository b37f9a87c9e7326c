//! `/api/v1/registries/{registry}/cleanup-policies`, `/protection-policies` and `/cleanup`:
//! a registry's policies, its cleanup schedule, and the executions of its cleanup (run now or
//! as a dry run, stop, tasks, history). Reading takes read rights on the registry; changing and
//! running take its admin.

use http::{Response, StatusCode};
use serde::{Deserialize, Serialize};

use super::jobs::{self, RunRequest};
use super::registries::visible;
use super::{json, Ctx};
use crate::auth::Action;
use crate::error::{Error, Result};
use crate::http::body::Body;
use crate::http::req::empty;
use crate::jobs::executions::Trigger;
use crate::jobs::schedule::{Schedule, ScheduleSettings};
use crate::policy::book::{
    CleanupPatch, CleanupPolicy, CleanupSpec, ProtectionPatch, ProtectionPolicy, ProtectionSpec,
};
use crate::policy::run::scope;

/// A list of policies.
#[derive(Debug, Serialize, Deserialize)]
pub struct PolicyList<T> {
    /// The policies, oldest first.
    pub items: Vec<T>,
}

/// A job's schedule and when it runs next.
#[derive(Debug, Serialize, Deserialize)]
pub struct ScheduleView {
    /// The schedule.
    pub schedule: Schedule,
    /// The next five run times (RFC 3339, UTC).
    pub next_runs: Vec<String>,
}

/// Checks the caller may do `action` on a registry it can see.
fn allowed(ctx: &Ctx<'_>, registry: &str, manage: bool) -> Result<()> {
    ctx.check(if manage {
        Action::Manage(Some(registry))
    } else {
        Action::Read(Some(registry))
    })?;
    visible(ctx, registry).map(|_| ())
}

async fn flushed<T: Serialize>(
    ctx: &Ctx<'_>,
    status: StatusCode,
    value: &T,
) -> Result<Response<Body>> {
    ctx.app.store.meta.flush().await?;
    json(status, value)
}

/// `GET …/cleanup-policies`.
pub async fn list_cleanup(ctx: &Ctx<'_>, registry: &str) -> Result<Response<Body>> {
    allowed(ctx, registry, false)?;
    let items = ctx.app.policies.cleanup_policies(registry).await?;
    json(StatusCode::OK, &PolicyList { items })
}

/// `POST …/cleanup-policies`.
pub async fn create_cleanup(
    ctx: &Ctx<'_>,
    registry: &str,
    spec: CleanupSpec,
) -> Result<Response<Body>> {
    allowed(ctx, registry, true)?;
    let p: CleanupPolicy = ctx.app.policies.create_cleanup(registry, spec).await?;
    tracing::info!(%registry, policy = %p.id, operator = %ctx.req.principal.name(), "cleanup policy created");
    flushed(ctx, StatusCode::CREATED, &p).await
}

/// `GET …/cleanup-policies/{id}`.
pub async fn get_cleanup(ctx: &Ctx<'_>, registry: &str, id: &str) -> Result<Response<Body>> {
    allowed(ctx, registry, false)?;
    json(
        StatusCode::OK,
        &ctx.app.policies.cleanup_policy(registry, id).await?,
    )
}

/// `PATCH …/cleanup-policies/{id}`.
pub async fn patch_cleanup(
    ctx: &Ctx<'_>,
    registry: &str,
    id: &str,
    patch: CleanupPatch,
) -> Result<Response<Body>> {
    allowed(ctx, registry, true)?;
    let p = ctx.app.policies.update_cleanup(registry, id, patch).await?;
    flushed(ctx, StatusCode::OK, &p).await
}

/// `DELETE …/cleanup-policies/{id}`.
pub async fn delete_cleanup(ctx: &Ctx<'_>, registry: &str, id: &str) -> Result<Response<Body>> {
    allowed(ctx, registry, true)?;
    ctx.app.policies.delete_cleanup(registry, id).await?;
    ctx.app.store.meta.flush().await?;
    Ok(empty(StatusCode::NO_CONTENT))
}

/// `GET …/protection-policies`.
pub async fn list_protection(ctx: &Ctx<'_>, registry: &str) -> Result<Response<Body>> {
    allowed(ctx, registry, false)?;
    let items = ctx.app.policies.protection_policies(registry).await?;
    json(StatusCode::OK, &PolicyList { items })
}

/// `POST …/protection-policies`.
pub async fn create_protection(
    ctx: &Ctx<'_>,
    registry: &str,
    spec: ProtectionSpec,
) -> Result<Response<Body>> {
    allowed(ctx, registry, true)?;
    let p: ProtectionPolicy = ctx.app.policies.create_protection(registry, spec).await?;
    tracing::info!(%registry, policy = %p.id, operator = %ctx.req.principal.name(), "protection policy created");
    flushed(ctx, StatusCode::CREATED, &p).await
}

/// `GET …/protection-policies/{id}`.
pub async fn get_protection(ctx: &Ctx<'_>, registry: &str, id: &str) -> Result<Response<Body>> {
    allowed(ctx, registry, false)?;
    json(
        StatusCode::OK,
        &ctx.app.policies.protection_policy(registry, id).await?,
    )
}

/// `PATCH …/protection-policies/{id}`.
pub async fn patch_protection(
    ctx: &Ctx<'_>,
    registry: &str,
    id: &str,
    patch: ProtectionPatch,
) -> Result<Response<Body>> {
    allowed(ctx, registry, true)?;
    let p = ctx
        .app
        .policies
        .update_protection(registry, id, patch)
        .await?;
    flushed(ctx, StatusCode::OK, &p).await
}

/// `DELETE …/protection-policies/{id}`.
pub async fn delete_protection(ctx: &Ctx<'_>, registry: &str, id: &str) -> Result<Response<Body>> {
    allowed(ctx, registry, true)?;
    ctx.app.policies.delete_protection(registry, id).await?;
    ctx.app.store.meta.flush().await?;
    Ok(empty(StatusCode::NO_CONTENT))
}

impl ScheduleView {
    /// A schedule with its next five run times.
    pub fn of(schedule: Schedule) -> Result<ScheduleView> {
        let next_runs = match schedule.cron() {
            Ok(Some(cron)) => cron
                .next_runs(std::time::SystemTime::now(), 5)
                .into_iter()
                .map(|t| humantime::format_rfc3339_seconds(t).to_string())
                .collect(),
            Ok(None) => Vec::new(),
            Err(e) => return Err(Error::Internal(format!("stored schedule: {e}"))),
        };
        Ok(ScheduleView {
            schedule,
            next_runs,
        })
    }
}

/// `GET …/cleanup`: the schedule and the next run times.
pub async fn get_settings(ctx: &Ctx<'_>, registry: &str) -> Result<Response<Body>> {
    allowed(ctx, registry, false)?;
    let settings = ctx.app.policies.cleanup_settings(registry).await?;
    json(StatusCode::OK, &ScheduleView::of(settings.schedule)?)
}

/// `PUT …/cleanup`: sets the schedule (`{"schedule": {"type": "custom", "cron": "..."}}`).
pub async fn put_settings(
    ctx: &Ctx<'_>,
    registry: &str,
    settings: ScheduleSettings,
) -> Result<Response<Body>> {
    allowed(ctx, registry, true)?;
    let s = ctx
        .app
        .policies
        .set_cleanup_settings(registry, settings)
        .await?;
    ctx.app.store.meta.flush().await?;
    json(StatusCode::OK, &ScheduleView::of(s.schedule)?)
}

/// `POST …/cleanup/executions`: runs the cleanup now (or a dry run); 202 with the execution.
pub async fn run(ctx: &Ctx<'_>, registry: &str, body: RunRequest) -> Result<Response<Body>> {
    allowed(ctx, registry, true)?;
    let e = crate::policy::run::start(
        ctx.app,
        registry,
        Trigger::Manual,
        body.dry_run,
        ctx.req.principal.name(),
    )
    .await?;
    jobs::started(e)
}

/// `GET …/cleanup/executions?cursor=&limit=`: newest first.
pub async fn executions(ctx: &Ctx<'_>, registry: &str) -> Result<Response<Body>> {
    allowed(ctx, registry, false)?;
    jobs::executions(ctx, &scope(registry)).await
}

/// `GET …/cleanup/executions/{id}`: progress while it runs.
pub async fn get_execution(ctx: &Ctx<'_>, registry: &str, id: &str) -> Result<Response<Body>> {
    allowed(ctx, registry, false)?;
    jobs::get(ctx, &scope(registry), id).await
}

/// `POST …/cleanup/executions/{id}/stop`.
pub async fn stop(ctx: &Ctx<'_>, registry: &str, id: &str) -> Result<Response<Body>> {
    allowed(ctx, registry, true)?;
    jobs::stop(ctx, &scope(registry), id).await
}

/// `GET …/cleanup/executions/{id}/tasks?cursor=&limit=`: one per image, in order.
pub async fn tasks(ctx: &Ctx<'_>, registry: &str, id: &str) -> Result<Response<Body>> {
    allowed(ctx, registry, false)?;
    jobs::tasks(ctx, &scope(registry), id).await
}

/// `GET …/cleanup/executions/{id}/history?cursor=&limit=`: what each task did to each artifact.
pub async fn history(ctx: &Ctx<'_>, registry: &str, id: &str) -> Result<Response<Body>> {
    allowed(ctx, registry, false)?;
    jobs::history(ctx, &scope(registry), id).await
}
