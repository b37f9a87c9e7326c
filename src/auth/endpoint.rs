//! `/service/token`: the Docker token endpoint (GET with Basic credentials, and the OAuth2
//! password grant that containerd POSTs).

use std::net::IpAddr;
use std::sync::Arc;

use http::{Method, Response, StatusCode};
use hyper::body::Incoming;

use super::token::Access;
use super::{Action, Principal};
use crate::cache::Target;
use crate::error::{Error, Result};
use crate::http::body::Body;
use crate::registry::{json_response, Req};
use crate::App;

/// Values of every `name=` pair in a query or form body, percent-decoded.
fn params(text: Option<&str>, name: &str) -> Vec<String> {
    text.unwrap_or("")
        .split('&')
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (k == name).then(|| {
                percent_encoding::percent_decode_str(&v.replace('+', " "))
                    .decode_utf8_lossy()
                    .into_owned()
            })
        })
        .collect()
}

/// Handles `GET` and `POST /service/token`.
pub async fn token(
    app: &Arc<App>,
    req: Req<'_>,
    body: Incoming,
    client: IpAddr,
) -> Result<Response<Body>> {
    let (principal, scopes) = match *req.method {
        Method::GET => {
            if matches!(req.principal, Principal::Token(_)) {
                return Err(Error::unauthorized(
                    "the token endpoint takes an access key (Basic credentials), not a token",
                    None,
                ));
            }
            (req.principal.clone(), params(req.query, "scope"))
        }
        Method::POST => {
            let form = crate::registry::manifests::read_limited(body, 64 * 1024).await?;
            let form = String::from_utf8_lossy(&form);
            let form = Some(form.as_ref());
            let one = |name: &str| params(form, name).into_iter().next();
            let principal = match one("grant_type").as_deref() {
                Some("password") => {
                    let (Some(id), Some(secret)) = (one("username"), one("password")) else {
                        return Err(Error::BadRequest(
                            "grant_type=password needs username and password".into(),
                        ));
                    };
                    Principal::User(app.auth.login(&id, &secret, client).await?)
                }
                Some(other) => {
                    return Err(Error::BadRequest(format!(
                        "unsupported grant_type {other:?} (berth issues no refresh tokens; use password)"
                    )))
                }
                None => return Err(Error::BadRequest("missing grant_type".into())),
            };
            (principal, params(form, "scope"))
        }
        _ => return Err(Error::MethodNotAllowed(req.method.to_string())),
    };
    let requested: Vec<Access> = scopes
        .iter()
        .flat_map(|s| s.split(' '))
        .filter_map(Access::parse)
        .collect();
    let access = grant(app, &principal, requested);
    let lifetime = app.auth.config.token_lifetime;
    let sub = match &principal {
        Principal::User(u) => u.name.clone(),
        _ => String::new(),
    };
    let (token, claims) = app.auth.keys.issue(&sub, access, lifetime);
    crate::metrics::token_issued();
    let issued_at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(claims.iat);
    let body = serde_json::json!({
        "token": token,
        "access_token": token,
        "expires_in": lifetime.as_secs(),
        "issued_at": humantime::format_rfc3339_seconds(issued_at).to_string(),
    });
    Ok(json_response(StatusCode::OK, body.to_string()))
}

/// The requested scopes intersected with what the principal may do. A repository name is
/// resolved the way `/v2/` resolves it (cache registries, mirror mode), and granted under the
/// name the client asked for.
pub fn grant(app: &App, principal: &Principal, requested: Vec<Access>) -> Vec<Access> {
    let mut out = Vec::new();
    for want in requested {
        let actions: Vec<String> = match want.kind.as_str() {
            "repository" => {
                let local = match app.cache.resolve(&app.store, &want.name, None) {
                    Ok(Target::Origin(r)) => r.as_str().to_string(),
                    Ok(Target::Cache(t)) => t.repo.as_str().to_string(),
                    Err(_) => continue,
                };
                let mut wanted: Vec<&str> = want.actions.iter().map(String::as_str).collect();
                if wanted.contains(&"*") {
                    wanted = vec!["pull", "push", "delete"];
                }
                wanted
                    .into_iter()
                    .filter(|a| {
                        let action = match *a {
                            "pull" => Action::Pull(&local),
                            "push" => Action::Push(&local),
                            "delete" => Action::Delete(&local),
                            _ => return false,
                        };
                        app.auth.check(&app.store, principal, action).is_ok()
                    })
                    .map(str::to_string)
                    .collect()
            }
            "registry" if want.name == "catalog" => {
                if app
                    .auth
                    .check(&app.store, principal, Action::Catalog)
                    .is_ok()
                {
                    vec!["*".into()]
                } else {
                    vec![]
                }
            }
            _ => continue,
        };
        if !actions.is_empty() {
            out.push(Access { actions, ..want });
        }
    }
    out
}
