//! The executions of any background job, by scope: paged lists, one execution with its
//! progress, stop, tasks and history (cleanup: `cleanup/REGISTRY`; garbage collection: `gc`).
//! The caller authorizes first.

use http::{Response, StatusCode};
use serde::{Deserialize, Serialize};

use super::{json, rfc3339, Ctx};
use crate::error::{Error, Result};
use crate::http::body::Body;
use crate::jobs::executions::{Execution, HistoryRow, Task};

/// Default and largest page of executions, tasks and history rows.
const DEFAULT_LIMIT: usize = 50;
const MAX_LIMIT: usize = 1000;

/// Body of a request that starts an execution.
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
    /// The view of an execution.
    pub fn of(execution: Execution) -> ExecutionView {
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

/// 202 with a started execution.
pub fn started(execution: Execution) -> Result<Response<Body>> {
    json(StatusCode::ACCEPTED, &ExecutionView::of(execution))
}

/// The executions of `scope`, newest first (`?cursor=&limit=`).
pub async fn executions(ctx: &Ctx<'_>, scope: &str) -> Result<Response<Body>> {
    let limit = limit(ctx)?;
    let cursor = ctx.query("cursor");
    let items = ctx
        .app
        .jobs
        .executions(scope, cursor.as_deref(), limit)
        .await?;
    let next = (items.len() == limit)
        .then(|| items.last().map(|e| e.id.clone()))
        .flatten();
    let items = items.into_iter().map(ExecutionView::of).collect();
    json(StatusCode::OK, &Paged { items, next })
}

async fn execution(ctx: &Ctx<'_>, scope: &str, id: &str) -> Result<Execution> {
    ctx.app
        .jobs
        .execution(scope, id)
        .await?
        .ok_or_else(|| Error::NotFound(format!("execution {id:?} of {scope} does not exist")))
}

/// One execution: its progress while it runs.
pub async fn get(ctx: &Ctx<'_>, scope: &str, id: &str) -> Result<Response<Body>> {
    json(
        StatusCode::OK,
        &ExecutionView::of(execution(ctx, scope, id).await?),
    )
}

/// Stops a running execution after the unit it is on (202); one that ended is answered as it
/// is (200), so a stop can be repeated.
pub async fn stop(ctx: &Ctx<'_>, scope: &str, id: &str) -> Result<Response<Body>> {
    let e = execution(ctx, scope, id).await?;
    if !ctx.app.jobs.stop(&e.id) {
        return json(StatusCode::OK, &ExecutionView::of(e));
    }
    tracing::info!(%scope, execution = %id, operator = %ctx.req.principal.name(), "stop asked");
    json(StatusCode::ACCEPTED, &ExecutionView::of(e))
}

/// The tasks of an execution in order (`?cursor=&limit=`).
pub async fn tasks(ctx: &Ctx<'_>, scope: &str, id: &str) -> Result<Response<Body>> {
    execution(ctx, scope, id).await?;
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

/// What an execution did to each unit (`?cursor=&limit=`).
pub async fn history(ctx: &Ctx<'_>, scope: &str, id: &str) -> Result<Response<Body>> {
    execution(ctx, scope, id).await?;
    let limit = limit(ctx)?;
    let cursor = ctx.query("cursor");
    let rows = ctx.app.jobs.history(id, cursor.as_deref(), limit).await?;
    let next = (rows.len() == limit)
        .then(|| rows.last().map(|(k, _)| k.clone()))
        .flatten();
    let items: Vec<HistoryRow> = rows.into_iter().map(|(_, r)| r).collect();
    json(StatusCode::OK, &Paged { items, next })
}
