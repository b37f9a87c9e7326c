//! The management API (`/api/v1/...`): path matching against one route table, JSON in and out,
//! every operation behind the one authorization check (`Auth::check`).

pub mod artifacts;
pub mod backup;
pub mod caches;
pub mod gc;
pub mod images;
pub mod jobs;
pub mod page;
pub mod policies;
pub mod registries;
pub mod replication;
pub mod status;
pub mod users;
pub mod views;

use std::sync::Arc;

use http::{Method, Response, StatusCode};
use serde::de::DeserializeOwned;

use crate::auth::Principal;
use crate::error::{Error, Result};
use crate::http::body::Body;
use crate::http::req::{json_response, Req, RequestBody};
use crate::App;

/// The OpenAPI 3.0 description of every route in [`ROUTES`].
pub const OPENAPI: &str = include_str!("openapi.json");

/// Largest JSON request body accepted.
const MAX_BODY: usize = 1024 * 1024;

/// One path template of the API and the methods it serves.
#[derive(Debug)]
pub struct ApiRoute {
    /// Template below `/api/v1`, with `{param}` segments.
    pub template: &'static str,
    /// Methods served.
    pub methods: &'static [&'static str],
    /// Served by another behaviour (webhooks: `crate::events::api`), not by this module.
    pub delegated: bool,
}

const fn r(template: &'static str, methods: &'static [&'static str]) -> ApiRoute {
    ApiRoute {
        template,
        methods,
        delegated: false,
    }
}

const fn delegated(template: &'static str, methods: &'static [&'static str]) -> ApiRoute {
    ApiRoute {
        template,
        methods,
        delegated: true,
    }
}

/// Every route of the API. The dispatcher matches only these, and the OpenAPI test compares
/// this table with `openapi.json` both ways, so the document cannot drift from the router.
pub const ROUTES: &[ApiRoute] = &[
    r("/openapi.json", &["GET"]),
    r("/registries", &["GET", "POST"]),
    r("/registries/{registry}", &["GET", "PATCH", "DELETE"]),
    r("/registries/{registry}/images", &["GET"]),
    r("/registries/{registry}/images/{image}", &["DELETE"]),
    r("/registries/{registry}/images/{image}/artifacts", &["GET"]),
    r(
        "/registries/{registry}/images/{image}/artifacts/{digest}",
        &["GET", "DELETE"],
    ),
    r(
        "/registries/{registry}/images/{image}/tags",
        &["GET", "POST"],
    ),
    r(
        "/registries/{registry}/images/{image}/tags/{tag}",
        &["DELETE"],
    ),
    r("/registries/{registry}/cleanup-policies", &["GET", "POST"]),
    r(
        "/registries/{registry}/cleanup-policies/{id}",
        &["GET", "PATCH", "DELETE"],
    ),
    r(
        "/registries/{registry}/protection-policies",
        &["GET", "POST"],
    ),
    r(
        "/registries/{registry}/protection-policies/{id}",
        &["GET", "PATCH", "DELETE"],
    ),
    r("/registries/{registry}/cleanup", &["GET", "PUT"]),
    r(
        "/registries/{registry}/cleanup/executions",
        &["GET", "POST"],
    ),
    r("/registries/{registry}/cleanup/executions/{id}", &["GET"]),
    r(
        "/registries/{registry}/cleanup/executions/{id}/stop",
        &["POST"],
    ),
    r(
        "/registries/{registry}/cleanup/executions/{id}/tasks",
        &["GET"],
    ),
    r(
        "/registries/{registry}/cleanup/executions/{id}/history",
        &["GET"],
    ),
    r("/gc", &["GET", "PUT"]),
    r("/gc/executions", &["GET", "POST"]),
    r("/gc/executions/{id}", &["GET"]),
    r("/gc/executions/{id}/stop", &["POST"]),
    r("/gc/executions/{id}/tasks", &["GET"]),
    r("/gc/executions/{id}/history", &["GET"]),
    r("/cache/eviction/executions", &["GET"]),
    r("/cache/eviction/executions/{id}", &["GET"]),
    r("/cache/eviction/executions/{id}/stop", &["POST"]),
    r("/cache/eviction/executions/{id}/tasks", &["GET"]),
    r("/cache/eviction/executions/{id}/history", &["GET"]),
    r("/replication/endpoints", &["GET", "POST"]),
    r("/replication/endpoints/{name}", &["GET", "PUT", "DELETE"]),
    r("/replication/endpoints/{name}/test", &["POST"]),
    r("/replication/rules", &["GET", "POST"]),
    r("/replication/rules/{name}", &["GET", "PUT", "DELETE"]),
    r("/replication/rules/{name}/executions", &["GET", "POST"]),
    r("/replication/rules/{name}/executions/{id}", &["GET"]),
    r("/replication/rules/{name}/executions/{id}/stop", &["POST"]),
    r("/replication/rules/{name}/executions/{id}/tasks", &["GET"]),
    r(
        "/replication/rules/{name}/executions/{id}/history",
        &["GET"],
    ),
    r("/image-caches", &["GET", "POST"]),
    r("/image-caches/{name}", &["GET", "PATCH", "DELETE"]),
    r("/users", &["GET", "POST"]),
    r("/users/{name}", &["GET", "PATCH", "DELETE"]),
    r("/users/{name}/keys", &["GET", "POST"]),
    r("/users/{name}/keys/{id}", &["DELETE"]),
    r("/cache/prune", &["POST"]),
    r("/reload", &["POST"]),
    r("/status", &["GET"]),
    r("/backup", &["GET"]),
    r("/backup/blobs/{digest}", &["GET"]),
    delegated("/registries/{registry}/webhooks", &["GET", "POST"]),
    delegated(
        "/registries/{registry}/webhooks/{id}",
        &["GET", "PATCH", "DELETE"],
    ),
    delegated("/registries/{registry}/webhooks/{id}/test", &["POST"]),
    delegated("/registries/{registry}/webhooks/{id}/deliveries", &["GET"]),
];

/// Finds the route of a path below `/api/v1` and its percent-decoded parameters.
///
/// Parameters are single segments: image names, which contain `/`, arrive percent-encoded
/// (`team%2Fapp`) and are decoded here, after splitting.
pub fn match_route(rest: &str) -> Result<(&'static ApiRoute, Vec<String>)> {
    let segments: Vec<&str> = rest.trim_start_matches('/').split('/').collect();
    'routes: for route in ROUTES {
        let parts: Vec<&str> = route.template.trim_start_matches('/').split('/').collect();
        if parts.len() != segments.len() {
            continue;
        }
        let mut params = Vec::new();
        for (part, seg) in parts.iter().zip(&segments) {
            if part.starts_with('{') {
                let value = percent_encoding::percent_decode_str(seg)
                    .decode_utf8()
                    .map_err(|_| Error::BadRequest(format!("path segment {seg:?} is not UTF-8")))?;
                if value.is_empty() {
                    continue 'routes;
                }
                params.push(value.into_owned());
            } else if part != seg {
                continue 'routes;
            }
        }
        return Ok((route, params));
    }
    Err(Error::NotFound(format!(
        "no such endpoint: /api/v1{rest} (see /api/v1/openapi.json)"
    )))
}

/// Runs the handler of an `/api/v1/...` request (`path` is the raw request path).
pub async fn dispatch(
    app: &Arc<App>,
    path: &str,
    req: Req<'_>,
    body: impl RequestBody,
) -> Result<Response<Body>> {
    let rest = path.strip_prefix("/api/v1").unwrap_or(path);
    let (route, params) = match_route(rest)?;
    // The management API is not scope-based: a bearer token stands for its user, whose current
    // role decides (on /v2/ the token's repository scopes decide).
    let principal = match req.principal {
        Principal::Token(claims) if claims.sub.is_empty() => Principal::Anonymous,
        Principal::Token(claims) => match app.auth.users.user(&claims.sub) {
            Some(user) => Principal::User(Arc::new(user)),
            None => {
                return Err(Error::unauthorized(
                    &format!("the user {:?} of this token no longer exists", claims.sub),
                    None,
                ))
            }
        },
        other => other.clone(),
    };
    let req = Req {
        principal: &principal,
        ..req
    };
    let m = req.method;
    if !route.methods.contains(&m.as_str()) {
        return Err(Error::MethodNotAllowed(format!(
            "{m} (allowed on {}: {})",
            route.template,
            route.methods.join(", ")
        )));
    }
    if route.delegated {
        // `/registries/{registry}/webhooks[/{id}[/test|/deliveries]]`: the events behaviour.
        let segments: Vec<&str> = rest.trim_start_matches('/').split('/').skip(3).collect();
        return crate::events::api::handle(app, &params[0], &segments, req, body).await;
    }
    let p = |i: usize| params[i].as_str();
    let ctx = Ctx { app, req, path };
    match (route.template, m.clone()) {
        ("/openapi.json", Method::GET) => Ok(json_response(StatusCode::OK, OPENAPI.into())),
        ("/registries", Method::GET) => registries::list(&ctx).await,
        ("/registries", Method::POST) => registries::create(&ctx, json_body(body).await?).await,
        ("/registries/{registry}", Method::GET) => registries::get(&ctx, p(0)).await,
        ("/registries/{registry}", Method::PATCH) => {
            registries::patch(&ctx, p(0), json_body(body).await?).await
        }
        ("/registries/{registry}", Method::DELETE) => registries::delete(&ctx, p(0)).await,
        ("/registries/{registry}/images", Method::GET) => images::list(&ctx, p(0)).await,
        ("/registries/{registry}/images/{image}", Method::DELETE) => {
            images::delete(&ctx, p(0), p(1)).await
        }
        ("/registries/{registry}/images/{image}/artifacts", Method::GET) => {
            artifacts::list(&ctx, p(0), p(1)).await
        }
        ("/registries/{registry}/images/{image}/artifacts/{digest}", Method::GET) => {
            artifacts::get(&ctx, p(0), p(1), p(2)).await
        }
        ("/registries/{registry}/images/{image}/artifacts/{digest}", Method::DELETE) => {
            artifacts::delete(&ctx, p(0), p(1), p(2)).await
        }
        ("/registries/{registry}/images/{image}/tags", Method::GET) => {
            images::tags(&ctx, p(0), p(1)).await
        }
        ("/registries/{registry}/images/{image}/tags", Method::POST) => {
            images::put_tag(&ctx, p(0), p(1), json_body(body).await?).await
        }
        ("/registries/{registry}/images/{image}/tags/{tag}", Method::DELETE) => {
            images::delete_tag(&ctx, p(0), p(1), p(2)).await
        }
        ("/registries/{registry}/cleanup-policies", Method::GET) => {
            policies::list_cleanup(&ctx, p(0)).await
        }
        ("/registries/{registry}/cleanup-policies", Method::POST) => {
            policies::create_cleanup(&ctx, p(0), json_body(body).await?).await
        }
        ("/registries/{registry}/cleanup-policies/{id}", Method::GET) => {
            policies::get_cleanup(&ctx, p(0), p(1)).await
        }
        ("/registries/{registry}/cleanup-policies/{id}", Method::PATCH) => {
            policies::patch_cleanup(&ctx, p(0), p(1), json_body(body).await?).await
        }
        ("/registries/{registry}/cleanup-policies/{id}", Method::DELETE) => {
            policies::delete_cleanup(&ctx, p(0), p(1)).await
        }
        ("/registries/{registry}/protection-policies", Method::GET) => {
            policies::list_protection(&ctx, p(0)).await
        }
        ("/registries/{registry}/protection-policies", Method::POST) => {
            policies::create_protection(&ctx, p(0), json_body(body).await?).await
        }
        ("/registries/{registry}/protection-policies/{id}", Method::GET) => {
            policies::get_protection(&ctx, p(0), p(1)).await
        }
        ("/registries/{registry}/protection-policies/{id}", Method::PATCH) => {
            policies::patch_protection(&ctx, p(0), p(1), json_body(body).await?).await
        }
        ("/registries/{registry}/protection-policies/{id}", Method::DELETE) => {
            policies::delete_protection(&ctx, p(0), p(1)).await
        }
        ("/registries/{registry}/cleanup", Method::GET) => policies::get_settings(&ctx, p(0)).await,
        ("/registries/{registry}/cleanup", Method::PUT) => {
            policies::put_settings(&ctx, p(0), json_body(body).await?).await
        }
        ("/registries/{registry}/cleanup/executions", Method::GET) => {
            policies::executions(&ctx, p(0)).await
        }
        ("/registries/{registry}/cleanup/executions", Method::POST) => {
            policies::run(&ctx, p(0), json_body(body).await?).await
        }
        ("/registries/{registry}/cleanup/executions/{id}", Method::GET) => {
            policies::get_execution(&ctx, p(0), p(1)).await
        }
        ("/registries/{registry}/cleanup/executions/{id}/stop", Method::POST) => {
            policies::stop(&ctx, p(0), p(1)).await
        }
        ("/registries/{registry}/cleanup/executions/{id}/tasks", Method::GET) => {
            policies::tasks(&ctx, p(0), p(1)).await
        }
        ("/registries/{registry}/cleanup/executions/{id}/history", Method::GET) => {
            policies::history(&ctx, p(0), p(1)).await
        }
        ("/gc", Method::GET) => gc::get_settings(&ctx).await,
        ("/gc", Method::PUT) => gc::put_settings(&ctx, json_body(body).await?).await,
        ("/replication/endpoints", Method::GET) => replication::list_endpoints(&ctx).await,
        ("/replication/endpoints", Method::POST) => {
            replication::create_endpoint(&ctx, json_body(body).await?).await
        }
        ("/replication/endpoints/{name}", Method::GET) => {
            replication::get_endpoint(&ctx, p(0)).await
        }
        ("/replication/endpoints/{name}", Method::PUT) => {
            replication::put_endpoint(&ctx, p(0), json_body(body).await?).await
        }
        ("/replication/endpoints/{name}", Method::DELETE) => {
            replication::delete_endpoint(&ctx, p(0)).await
        }
        ("/replication/endpoints/{name}/test", Method::POST) => {
            replication::test_endpoint(&ctx, p(0)).await
        }
        ("/replication/rules", Method::GET) => replication::list_rules(&ctx).await,
        ("/replication/rules", Method::POST) => {
            replication::create_rule(&ctx, json_body(body).await?).await
        }
        ("/replication/rules/{name}", Method::GET) => replication::get_rule(&ctx, p(0)).await,
        ("/replication/rules/{name}", Method::PUT) => {
            replication::put_rule(&ctx, p(0), json_body(body).await?).await
        }
        ("/replication/rules/{name}", Method::DELETE) => replication::delete_rule(&ctx, p(0)).await,
        ("/replication/rules/{name}/executions", Method::GET) => {
            replication::executions(&ctx, p(0)).await
        }
        ("/replication/rules/{name}/executions", Method::POST) => {
            replication::run(&ctx, p(0)).await
        }
        ("/replication/rules/{name}/executions/{id}", Method::GET) => {
            replication::get_execution(&ctx, p(0), p(1)).await
        }
        ("/replication/rules/{name}/executions/{id}/stop", Method::POST) => {
            replication::stop(&ctx, p(0), p(1)).await
        }
        ("/replication/rules/{name}/executions/{id}/tasks", Method::GET) => {
            replication::tasks(&ctx, p(0), p(1)).await
        }
        ("/replication/rules/{name}/executions/{id}/history", Method::GET) => {
            replication::history(&ctx, p(0), p(1)).await
        }
        ("/gc/executions", Method::GET) => gc::executions(&ctx).await,
        ("/cache/eviction/executions", Method::GET) => gc::evictions(&ctx).await,
        ("/cache/eviction/executions/{id}", Method::GET) => gc::get_eviction(&ctx, p(0)).await,
        ("/cache/eviction/executions/{id}/stop", Method::POST) => {
            gc::stop_eviction(&ctx, p(0)).await
        }
        ("/cache/eviction/executions/{id}/tasks", Method::GET) => {
            gc::eviction_tasks(&ctx, p(0)).await
        }
        ("/cache/eviction/executions/{id}/history", Method::GET) => {
            gc::eviction_history(&ctx, p(0)).await
        }
        ("/gc/executions", Method::POST) => gc::run(&ctx, json_body(body).await?).await,
        ("/gc/executions/{id}", Method::GET) => gc::get_execution(&ctx, p(0)).await,
        ("/gc/executions/{id}/stop", Method::POST) => gc::stop(&ctx, p(0)).await,
        ("/gc/executions/{id}/tasks", Method::GET) => gc::tasks(&ctx, p(0)).await,
        ("/gc/executions/{id}/history", Method::GET) => gc::history(&ctx, p(0)).await,
        ("/image-caches", Method::GET) => caches::list(&ctx).await,
        ("/image-caches", Method::POST) => caches::create(&ctx, json_body(body).await?).await,
        ("/image-caches/{name}", Method::GET) => caches::get(&ctx, p(0)).await,
        ("/image-caches/{name}", Method::PATCH) => {
            caches::patch(&ctx, p(0), json_body(body).await?).await
        }
        ("/image-caches/{name}", Method::DELETE) => caches::delete(&ctx, p(0)).await,
        ("/cache/prune", Method::POST) => caches::prune(&ctx, json_body(body).await?).await,
        ("/reload", Method::POST) => {
            ctx.check(crate::auth::Action::Manage(None))?;
            json(StatusCode::OK, &crate::reload::reload(ctx.app).await)
        }
        ("/status", Method::GET) => status::get(&ctx).await,
        ("/backup", Method::GET) => backup::lines(&ctx).await,
        ("/backup/blobs/{digest}", Method::GET) => backup::blob(&ctx, p(0)).await,
        ("/users", Method::GET) => users::list(&ctx).await,
        ("/users", Method::POST) => users::create(&ctx, json_body(body).await?).await,
        ("/users/{name}", Method::GET) => users::get(&ctx, p(0)).await,
        ("/users/{name}", Method::PATCH) => users::patch(&ctx, p(0), json_body(body).await?).await,
        ("/users/{name}", Method::DELETE) => users::delete(&ctx, p(0)).await,
        ("/users/{name}/keys", Method::GET) => users::keys(&ctx, p(0)).await,
        ("/users/{name}/keys", Method::POST) => users::create_key(&ctx, p(0)).await,
        ("/users/{name}/keys/{id}", Method::DELETE) => users::revoke_key(&ctx, p(0), p(1)).await,
        _ => Err(Error::Internal(format!(
            "route {} {} is in the table but has no handler",
            m, route.template
        ))),
    }
}

/// What every handler needs: the app, the request's parts and its raw path (for `Link`).
pub struct Ctx<'a> {
    /// Shared state.
    pub app: &'a Arc<App>,
    /// Request parts.
    pub req: Req<'a>,
    /// Raw request path.
    pub path: &'a str,
}

impl Ctx<'_> {
    /// The one authorization check.
    pub fn check(&self, action: crate::auth::Action<'_>) -> Result<()> {
        self.app
            .auth
            .check(&self.app.store, self.req.principal, action)
    }

    /// A query parameter, percent-decoded.
    pub fn query(&self, name: &str) -> Option<String> {
        crate::http::router::query_param(self.req.query, name)
    }
}

/// Reads a JSON body; a malformed one is a 400 carrying serde's message. An empty body reads as
/// `{}`, so endpoints whose fields are all optional accept a bare POST.
pub async fn json_body<T: DeserializeOwned>(body: impl RequestBody) -> Result<T> {
    let bytes = crate::http::req::read_limited(body, MAX_BODY)
        .await
        .map_err(|e| match e {
            Error::ManifestTooLarge { limit, .. } => {
                Error::BadRequest(format!("request body larger than {limit} bytes"))
            }
            other => other,
        })?;
    let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        &bytes
    };
    serde_json::from_slice(bytes).map_err(|e| Error::BadRequest(format!("invalid JSON body: {e}")))
}

/// A JSON response of a serializable value.
pub fn json<T: serde::Serialize>(status: StatusCode, value: &T) -> Result<Response<Body>> {
    let body = serde_json::to_string(value).map_err(|e| Error::Internal(e.to_string()))?;
    Ok(json_response(status, body))
}

/// RFC 3339 text of a Unix-ms time.
pub fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn document_routes() -> Vec<(String, Vec<String>)> {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).expect("openapi.json parses");
        assert_eq!(doc["openapi"].as_str().unwrap_or("").get(..2), Some("3."));
        doc["paths"]
            .as_object()
            .expect("paths")
            .iter()
            .map(|(path, item)| {
                let mut methods: Vec<String> = item
                    .as_object()
                    .expect("path item")
                    .keys()
                    .filter(|k| {
                        ["get", "post", "put", "patch", "delete", "head"].contains(&k.as_str())
                    })
                    .map(|k| k.to_ascii_uppercase())
                    .collect();
                methods.sort();
                (path.clone(), methods)
            })
            .collect()
    }

    #[test]
    fn openapi_documents_exactly_the_routes_served() {
        let doc = document_routes();
        for route in ROUTES {
            let full = format!("/api/v1{}", route.template);
            let mut methods: Vec<String> = route.methods.iter().map(|m| m.to_string()).collect();
            methods.sort();
            let documented = doc.iter().find(|(p, _)| *p == full);
            assert_eq!(
                documented.map(|(_, m)| m),
                Some(&methods),
                "{full}: router and openapi.json disagree"
            );
        }
        for (path, _) in &doc {
            assert!(
                ROUTES
                    .iter()
                    .any(|r| format!("/api/v1{}", r.template) == *path),
                "{path} is documented but not routed"
            );
        }
    }

    #[test]
    fn image_names_are_one_encoded_segment() {
        let (route, params) = match_route("/registries/lib/images/team%2Fapp/tags").unwrap();
        assert_eq!(route.template, "/registries/{registry}/images/{image}/tags");
        assert_eq!(params, ["lib", "team/app"]);
        assert!(matches!(
            match_route("/registries/lib/images/team/app/tags"),
            Err(Error::NotFound(_))
        ));
        assert!(matches!(
            match_route("/registries//images"),
            Err(Error::NotFound(_))
        ));
        assert!(matches!(match_route("/nope"), Err(Error::NotFound(_))));
    }
}
