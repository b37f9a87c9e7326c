//! `/api/v1/replication/...`: endpoints (credentials taken, never shown; a connection test),
//! rules, and each rule's executions (run now, stop, tasks, history). An admin of every
//! registry's: endpoints are shared, and a rule reads or writes a whole registry.

use http::{Response, StatusCode};
use serde::{Deserialize, Serialize};

use super::{jobs, json, Ctx};
use crate::auth::Action;
use crate::error::{Error, Result};
use crate::http::body::Body;
use crate::jobs::executions::Trigger;
use crate::replication::endpoint::{EndpointError, EndpointRecord, EndpointSpec};
use crate::replication::rule::{scope, Rule};
use crate::replication::RuleError;

fn admin(ctx: &Ctx<'_>) -> Result<()> {
    ctx.check(Action::Manage(None))
}

/// An endpoint as shown: never its secret.
#[derive(Debug, Serialize, Deserialize)]
pub struct EndpointView {
    /// The endpoint.
    #[serde(flatten)]
    pub endpoint: EndpointRecord,
    /// Whether credentials are stored for it.
    pub credentials: bool,
}

/// The answer of a connection test.
#[derive(Debug, Serialize, Deserialize)]
pub struct TestView {
    /// Whether the endpoint answered its API check with these credentials.
    pub ok: bool,
    /// Why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl From<EndpointError> for Error {
    fn from(e: EndpointError) -> Error {
        match e {
            EndpointError::Invalid(m) => Error::BadRequest(m),
            EndpointError::Unknown(_) => Error::NotFound(e.to_string()),
            EndpointError::Meta(m) => m.into(),
        }
    }
}

impl From<RuleError> for Error {
    fn from(e: RuleError) -> Error {
        match e {
            RuleError::Invalid(m) => Error::BadRequest(m),
            RuleError::Meta(m) => m.into(),
        }
    }
}

async fn view(ctx: &Ctx<'_>, endpoint: EndpointRecord) -> Result<EndpointView> {
    let credentials = ctx
        .app
        .replication
        .endpoints
        .has_credentials(&endpoint.name)
        .await?;
    Ok(EndpointView {
        endpoint,
        credentials,
    })
}

/// `GET /replication/endpoints`.
pub async fn list_endpoints(ctx: &Ctx<'_>) -> Result<Response<Body>> {
    admin(ctx)?;
    let mut out = Vec::new();
    for e in ctx.app.replication.endpoints.list().await? {
        out.push(view(ctx, e).await?);
    }
    json(StatusCode::OK, &out)
}

/// `POST /replication/endpoints`: 201, or 409 when the name is taken.
pub async fn create_endpoint(ctx: &Ctx<'_>, spec: EndpointSpec) -> Result<Response<Body>> {
    admin(ctx)?;
    let endpoints = &ctx.app.replication.endpoints;
    if endpoints.get(&spec.name).await?.is_some() {
        return Err(Error::Conflict(format!(
            "replication endpoint {:?} already exists",
            spec.name
        )));
    }
    let record = endpoints.put(spec).await?;
    tracing::info!(endpoint = %record.name, url = %record.url, operator = %ctx.req.principal.name(), "replication endpoint created");
    json(StatusCode::CREATED, &view(ctx, record).await?)
}

async fn endpoint(ctx: &Ctx<'_>, name: &str) -> Result<EndpointRecord> {
    ctx.app
        .replication
        .endpoints
        .get(name)
        .await?
        .ok_or_else(|| EndpointError::Unknown(name.to_string()).into())
}

/// `GET /replication/endpoints/{name}`.
pub async fn get_endpoint(ctx: &Ctx<'_>, name: &str) -> Result<Response<Body>> {
    admin(ctx)?;
    let e = endpoint(ctx, name).await?;
    json(StatusCode::OK, &view(ctx, e).await?)
}

/// `PUT /replication/endpoints/{name}`: replaces it (credentials included).
pub async fn put_endpoint(ctx: &Ctx<'_>, name: &str, spec: EndpointSpec) -> Result<Response<Body>> {
    admin(ctx)?;
    if spec.name != name {
        return Err(Error::BadRequest(format!(
            "name {:?} in the body is not {name:?} of the path",
            spec.name
        )));
    }
    endpoint(ctx, name).await?;
    let record = ctx.app.replication.endpoints.put(spec).await?;
    tracing::info!(endpoint = %name, operator = %ctx.req.principal.name(), "replication endpoint replaced");
    json(StatusCode::OK, &view(ctx, record).await?)
}

/// `DELETE /replication/endpoints/{name}`: 409 while rules use it.
pub async fn delete_endpoint(ctx: &Ctx<'_>, name: &str) -> Result<Response<Body>> {
    admin(ctx)?;
    endpoint(ctx, name).await?;
    let users = ctx.app.replication.rules_of(name).await?;
    if !users.is_empty() {
        return Err(Error::Conflict(format!(
            "replication endpoint {name:?} is used by rules {users:?}: delete or change them first"
        )));
    }
    ctx.app.replication.endpoints.remove(name).await?;
    tracing::info!(endpoint = %name, operator = %ctx.req.principal.name(), "replication endpoint deleted");
    Ok(crate::http::req::empty(StatusCode::NO_CONTENT))
}

/// `POST /replication/endpoints/{name}/test`.
pub async fn test_endpoint(ctx: &Ctx<'_>, name: &str) -> Result<Response<Body>> {
    admin(ctx)?;
    let outcome = ctx.app.replication.endpoints.test(name).await?;
    let view = TestView {
        ok: outcome.is_ok(),
        error: outcome.err().map(|e| e.to_string()),
    };
    json(StatusCode::OK, &view)
}

/// `GET /replication/rules`.
pub async fn list_rules(ctx: &Ctx<'_>) -> Result<Response<Body>> {
    admin(ctx)?;
    json(StatusCode::OK, &ctx.app.replication.rules().await?)
}

async fn rule(ctx: &Ctx<'_>, name: &str) -> Result<Rule> {
    ctx.app
        .replication
        .rule(name)
        .await?
        .ok_or_else(|| Error::NotFound(format!("replication rule {name:?} does not exist")))
}

/// `POST /replication/rules`: 201, or 409 when the name is taken.
pub async fn create_rule(ctx: &Ctx<'_>, body: Rule) -> Result<Response<Body>> {
    admin(ctx)?;
    if ctx.app.replication.rule(&body.name).await?.is_some() {
        return Err(Error::Conflict(format!(
            "replication rule {:?} already exists",
            body.name
        )));
    }
    let r = ctx.app.replication.put(body).await?;
    tracing::info!(rule = %r.name, endpoint = %r.endpoint, operator = %ctx.req.principal.name(), "replication rule created");
    json(StatusCode::CREATED, &r)
}

/// `GET /replication/rules/{name}`.
pub async fn get_rule(ctx: &Ctx<'_>, name: &str) -> Result<Response<Body>> {
    admin(ctx)?;
    json(StatusCode::OK, &rule(ctx, name).await?)
}

/// `PUT /replication/rules/{name}`: replaces it; a running execution goes on with the rule it
/// started with.
pub async fn put_rule(ctx: &Ctx<'_>, name: &str, body: Rule) -> Result<Response<Body>> {
    admin(ctx)?;
    if body.name != name {
        return Err(Error::BadRequest(format!(
            "name {:?} in the body is not {name:?} of the path",
            body.name
        )));
    }
    rule(ctx, name).await?;
    let r = ctx.app.replication.put(body).await?;
    tracing::info!(rule = %name, operator = %ctx.req.principal.name(), "replication rule replaced");
    json(StatusCode::OK, &r)
}

/// `DELETE /replication/rules/{name}`: its executions' history stays until pruned.
pub async fn delete_rule(ctx: &Ctx<'_>, name: &str) -> Result<Response<Body>> {
    admin(ctx)?;
    rule(ctx, name).await?;
    ctx.app.replication.remove(name).await?;
    tracing::info!(rule = %name, operator = %ctx.req.principal.name(), "replication rule deleted");
    Ok(crate::http::req::empty(StatusCode::NO_CONTENT))
}

/// `POST /replication/rules/{name}/executions`: runs it now; 202 with the execution.
pub async fn run(ctx: &Ctx<'_>, name: &str) -> Result<Response<Body>> {
    admin(ctx)?;
    let e =
        crate::replication::run::start(ctx.app, name, Trigger::Manual, ctx.req.principal.name())
            .await?;
    jobs::started(e)
}

/// `GET /replication/rules/{name}/executions`.
pub async fn executions(ctx: &Ctx<'_>, name: &str) -> Result<Response<Body>> {
    admin(ctx)?;
    jobs::executions(ctx, &scope(name)).await
}

/// `GET /replication/rules/{name}/executions/{id}`.
pub async fn get_execution(ctx: &Ctx<'_>, name: &str, id: &str) -> Result<Response<Body>> {
    admin(ctx)?;
    jobs::get(ctx, &scope(name), id).await
}

/// `POST /replication/rules/{name}/executions/{id}/stop`.
pub async fn stop(ctx: &Ctx<'_>, name: &str, id: &str) -> Result<Response<Body>> {
    admin(ctx)?;
    jobs::stop(ctx, &scope(name), id).await
}

/// `GET /replication/rules/{name}/executions/{id}/tasks`.
pub async fn tasks(ctx: &Ctx<'_>, name: &str, id: &str) -> Result<Response<Body>> {
    admin(ctx)?;
    jobs::tasks(ctx, &scope(name), id).await
}

/// `GET /replication/rules/{name}/executions/{id}/history`.
pub async fn history(ctx: &Ctx<'_>, name: &str, id: &str) -> Result<Response<Body>> {
    admin(ctx)?;
    jobs::history(ctx, &scope(name), id).await
}
