//! `/api/v1/registries/{registry}/webhooks[...]`: webhook policies, test sends, delivery log.

use std::sync::Arc;

use http::{Method, Response, StatusCode};
use serde::de::DeserializeOwned;

use super::views::{DeliveryList, DeliveryView, WebhookList};
use super::webhooks::{WebhookPatch, WebhookSpec};
use crate::auth::Action;
use crate::error::{Error, Result};
use crate::http::body::Body;
use crate::http::req::{empty, json_response, Req, RequestBody};
use crate::http::router::query_param;
use crate::App;

/// Largest JSON body accepted.
const MAX_BODY: usize = 64 * 1024;

/// Default and largest `limit` of the delivery log listing.
const DEFAULT_LIMIT: usize = 50;

async fn read_json<T: DeserializeOwned>(body: impl RequestBody) -> Result<T> {
    let bytes = match crate::http::req::read_limited(body, MAX_BODY).await {
        Ok(b) => b,
        Err(Error::ManifestTooLarge { .. }) => {
            return Err(Error::BadRequest(format!(
                "request body larger than {MAX_BODY} bytes"
            )))
        }
        Err(Error::ManifestInvalid(m)) => return Err(Error::BadRequest(m)),
        Err(e) => return Err(e),
    };
    serde_json::from_slice(&bytes).map_err(|e| Error::BadRequest(format!("invalid JSON: {e}")))
}

fn json<T: serde::Serialize>(status: StatusCode, value: &T) -> Result<Response<Body>> {
    let body = serde_json::to_string(value).map_err(|e| Error::Internal(e.to_string()))?;
    Ok(json_response(status, body))
}

/// Serves a request under `/api/v1/registries/{registry}/webhooks`; `rest` is the path after
/// it (`[]`, `[id]`, `[id, "test"]`, `[id, "deliveries"]`).
pub async fn handle(
    app: &Arc<App>,
    registry: &str,
    rest: &[&str],
    req: Req<'_>,
    body: impl RequestBody,
) -> Result<Response<Body>> {
    let m = req.method;
    let action = if m == Method::GET || m == Method::HEAD {
        Action::Read(Some(registry))
    } else {
        Action::Manage(Some(registry))
    };
    app.auth.check(&app.store, req.principal, action)?;
    let record = app
        .store
        .registry(registry)
        .ok_or_else(|| Error::NotFound(format!("registry {registry:?} does not exist")))?;
    req.visible(&record)
        .map_err(|_| Error::NotFound(format!("registry {registry:?} does not exist")))?;
    let w = &app.events.webhooks;
    let rest: Vec<&str> = rest.iter().copied().filter(|s| !s.is_empty()).collect();
    match (m, rest.as_slice()) {
        (&Method::GET, []) => {
            let items: Vec<_> = w.list(registry).await?.iter().map(|p| p.view()).collect();
            let total = items.len();
            json(StatusCode::OK, &WebhookList { items, total })
        }
        (&Method::POST, []) => {
            let spec: WebhookSpec = read_json(body).await?;
            w.check_destination(&spec.target).await?;
            let p = w.create(registry, spec).await?;
            app.store.meta.flush().await?;
            json(StatusCode::CREATED, &p.view())
        }
        (&Method::GET, [id]) => json(StatusCode::OK, &w.get(registry, id).await?.view()),
        (&Method::PATCH, [id]) => {
            let patch: WebhookPatch = read_json(body).await?;
            if let Some(target) = &patch.target {
                w.check_destination(target).await?;
            }
            let p = w.update(registry, id, patch).await?;
            app.store.meta.flush().await?;
            json(StatusCode::OK, &p.view())
        }
        (&Method::DELETE, [id]) => {
            w.delete(registry, id).await?;
            app.store.meta.flush().await?;
            Ok(empty(StatusCode::NO_CONTENT))
        }
        (&Method::POST, [id, "test"]) => {
            let d = w.test(registry, id, req.principal.name()).await?;
            json(StatusCode::OK, &DeliveryView::of(&d))
        }
        (&Method::GET, [id, "deliveries"]) => {
            let limit = match query_param(req.query, "limit") {
                None => DEFAULT_LIMIT,
                Some(l) => l.parse::<usize>().map_err(|_| {
                    Error::BadRequest(format!("limit must be a non-negative integer, not {l:?}"))
                })?,
            };
            let items = w.deliveries(registry, id, limit).await?;
            let items = items.iter().map(DeliveryView::of).collect();
            json(StatusCode::OK, &DeliveryList { items })
        }
        (_, [] | [_] | [_, "test" | "deliveries"]) => Err(Error::MethodNotAllowed(m.to_string())),
        _ => Err(Error::NotFound(format!(
            "no such webhook endpoint: {}",
            rest.join("/")
        ))),
    }
}
