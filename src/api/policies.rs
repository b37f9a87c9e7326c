//! `/api/v1/registries/{registry}/cleanup-policies`, `/protection-policies` and `/cleanup`:
//! a registry's policies, its cleanup schedule, and the executions of its cleanup (run now or
//! as a dry run, stop, tasks, history). Reading takes read rights on the registry; changing and
//! running take its admin.

use http::{Response, StatusCode};
use serde::{Deserialize, Serialize};

use super::registries::visible;
use super::{json, rfc3339, Ctx};
use crate::auth::Action;
use crate::error::{Error, Result};
use crate::http::body::Body;
use crate::http::req::empty;
use crate::jobs::executions::{Execution, HistoryRow, Task, Trigger};
use crate::jobs::schedule::Schedule;
use crate::policy::book::{
    CleanupPatch, CleanupPolicy, CleanupSettings, CleanupSpec, ProtectionPatch, ProtectionPolicy,
    ProtectionSpec,
};
use crate::policy::run::scope;

/// Default and largest page of executions, tasks and history rows.
const DEFAULT_LIMIT: usize = 50;
const MAX_LIMIT: usize = 1000;

/// A list of policies.
#[derive(Debug, Serialize, Deserialize)]
pub struct PolicyList<T> {
    /// The policies, oldest first.
    pub items: Vec<T>,
}

/// A registry's cleanup schedule and when it runs next.
#[derive(Debug, Serialize, Deserialize)]
pub struct CleanupView {
    /// The schedule.
    pub schedule: Schedule,
    /// The next five run times (RFC 3339, UTC).
    pub next_runs: Vec<String>,
}

/// Body of `POST …/cleanup/executions`.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunRequest {
    /// Select and report only.
    #[serde(default)]
    pub dry_run: bool,
}

/// An execution as the API shows it.
#[derive(Debug, Serialize, Deserialize)]
pub struct ExecutionView {
    /// The execution.
    #[serde(flatten)]
    pub execution: Execution,
    /// Start, RFC 3339.
    pub started: String,
    /// End, RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended: Option<String>,
}

impl ExecutionView {
    fn of(execution: Execution) -> ExecutionView {
        ExecutionView {
            started: rfc3339(execution.started_ms),
            ended: execution.ended_ms.map(rfc3339),
            execution,
        }
    }
}

/// A page of items and the cursor of the next page.
#[derive(Debug, Serialize, Deserialize)]
pub struct Paged<T> {
    /// The items.
    pub items: Vec<T>,
    /// Pass as `cursor` for the next page; absent on the last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

fn limit(ctx: &Ctx<'_>) -> Result<usize> {
    match ctx.query("limit") {
        None => Ok(DEFAULT_LIMIT),
        Some(l) => match l.parse::<usize>() {
            Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
            _ => Err(Error::BadRequest(format!(
                "limit must be 1 to {MAX_LIMIT}, not {l:?}"
            ))),
        },
    }
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

fn cleanup_view(settings: CleanupSettings) -> Result<CleanupView> {
    let next_runs = match settings.schedule.cron() {
        Ok(Some(cron)) => cron
            .next_runs(std::time::SystemTime::now(), 5)
            .into_iter()
            .map(|t| humantime::format_rfc3339_seconds(t).to_string())
            .collect(),
        Ok(None) => Vec::new(),
        Err(e) => return Err(Error::Internal(format!("stored schedule: {e}"))),
    };
    Ok(CleanupView {
        schedule: settings.schedule,
        next_runs,
    })
}

/// `GET …/cleanup`: the schedule and the next run times.
pub async fn get_settings(ctx: &Ctx<'_>, registry: &str) -> Result<Response<Body>> {
    allowed(ctx, registry, false)?;
    let settings = ctx.app.policies.cleanup_settings(registry).await?;
    json(StatusCode::OK, &cleanup_view(settings)?)
}

/// `PUT …/cleanup`: sets the schedule (`{"schedule": {"type": "custom", "cron": "..."}}`).
pub async fn put_settings(
    ctx: &Ctx<'_>,
    registry: &str,
    settings: CleanupSettings,
) -> Result<Response<Body>> {
    allowed(ctx, registry, true)?;
    let s = ctx
        .app
        .policies
        .set_cleanup_settings(registry, settings)
        .await?;
    ctx.app.store.meta.flush().await?;
    json(StatusCode::OK, &cleanup_view(s)?)
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
    json(StatusCode::ACCEPTED, &ExecutionView::of(e))
}

/// `GET …/cleanup/executions?cursor=&limit=`: newest first.
pub async fn executions(ctx: &Ctx<'_>, registry: &str) -> Result<Response<Body>> {
    allowed(ctx, registry, false)?;
    let limit = limit(ctx)?;
    let cursor = ctx.query("cursor");
    let items = ctx
        .app
        .jobs
        .executions(&scope(registry), cursor.as_deref(), limit)
        .await?;
    let next = (items.len() == limit)
        .then(|| items.last().map(|e| e.id.clone()))
        .flatten();
    let items = items.into_iter().map(ExecutionView::of).collect();
    json(StatusCode::OK, &Paged { items, next })
}

async fn execution(ctx: &Ctx<'_>, registry: &str, id: &str) -> Result<Execution> {
    ctx.app
        .jobs
        .execution(&scope(registry), id)
        .await?
        .ok_or_else(|| {
            Error::NotFound(format!(
                "cleanup execution {id:?} of registry {registry:?} does not exist"
            ))
        })
}

/// `GET …/cleanup/executions/{id}`: progress while it runs.
pub async fn get_execution(ctx: &Ctx<'_>, registry: &str, id: &str) -> Result<Response<Body>> {
    allowed(ctx, registry, false)?;
    json(
        StatusCode::OK,
        &ExecutionView::of(execution(ctx, registry, id).await?),
    )
}

/// `POST …/cleanup/executions/{id}/stop`: the run ends after the image it is on (202); an
/// execution that already ended is answered as it is (200), so a stop can be repeated.
pub async fn stop(ctx: &Ctx<'_>, registry: &str, id: &str) -> Result<Response<Body>> {
    allowed(ctx, registry, true)?;
    let e = execution(ctx, registry, id).await?;
    if !ctx.app.jobs.stop(&e.id) {
        return json(StatusCode::OK, &ExecutionView::of(e));
    }
    tracing::info!(%registry, execution = %id, operator = %ctx.req.principal.name(), "cleanup stop asked");
    json(StatusCode::ACCEPTED, &ExecutionView::of(e))
}

/// `GET …/cleanup/executions/{id}/tasks?cursor=&limit=`: one per image, in order.
pub async fn tasks(ctx: &Ctx<'_>, registry: &str, id: &str) -> Result<Response<Body>> {
    allowed(ctx, registry, false)?;
    execution(ctx, registry, id).await?;
    let limit = limit(ctx)?;
    let after =
        match ctx.query("cursor") {
            None => None,
            Some(c) => Some(c.parse::<u64>().map_err(|_| {
                Error::BadRequest(format!("cursor must be a task number, not {c:?}"))
            })?),
        };
    let items: Vec<Task> = ctx.app.jobs.tasks(id, after, limit).await?;
    let next = (items.len() == limit)
        .then(|| items.last().map(|t| t.seq.to_string()))
        .flatten();
    json(StatusCode::OK, &Paged { items, next })
}

/// `GET …/cleanup/executions/{id}/history?cursor=&limit=`: what each task did to each artifact.
pub async fn history(ctx: &Ctx<'_>, registry: &str, id: &str) -> Result<Response<Body>> {
    allowed(ctx, registry, false)?;
    execution(ctx, registry, id).await?;
    let limit = limit(ctx)?;
    let cursor = ctx.query("cursor");
    let rows = ctx.app.jobs.history(id, cursor.as_deref(), limit).await?;
    let next = (rows.len() == limit)
        .then(|| rows.last().map(|(k, _)| k.clone()))
        .flatten();
    let items: Vec<HistoryRow> = rows.into_iter().map(|(_, r)| r).collect();
    json(StatusCode::OK, &Paged { items, next })
}
