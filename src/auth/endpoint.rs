//! `/service/token`: the Docker token endpoint (GET with Basic credentials, and the OAuth2
//! password grant that containerd POSTs).

use std::net::IpAddr;
use std::sync::Arc;

use crate::http::req::RequestBody;
use http::{Method, Response, StatusCode};

use super::token::Access;
use super::{Action, Principal};
use crate::error::{Error, Result};
use crate::http::body::Body;
use crate::http::req::{json_response, Req};
use crate::store::meta::RegistryRecord;
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

/// How the caller resolves a repository name of a scope, exactly as `/v2/` will resolve it on
/// the same listener: the local repository and its registry, or `None` when the name resolves
/// to nothing there (no such registry, or hidden from the listener).
pub type Resolver<'a> = &'a (dyn Fn(&str) -> Option<(String, Arc<RegistryRecord>)> + Sync);

/// Handles `GET` and `POST /service/token`.
pub async fn token(
    app: &Arc<App>,
    req: Req<'_>,
    body: impl RequestBody,
    client: IpAddr,
    resolve: Resolver<'_>,
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
            let form = crate::http::req::read_limited(body, 64 * 1024).await?;
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
    let access = grant(app, &principal, requested, resolve);
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
/// resolved by `resolve`, the resolution of `/v2/` (cache registries, mirror mode), and granted
/// under the name it resolves to: `/v2/` checks tokens against that name and nothing else, so a
/// token can never reach what the name did not resolve to when it was issued.
pub fn grant(
    app: &App,
    principal: &Principal,
    requested: Vec<Access>,
    resolve: Resolver<'_>,
) -> Vec<Access> {
    let mut out = Vec::new();
    for want in requested {
        let mut name = want.name.clone();
        let actions: Vec<String> = match want.kind.as_str() {
            "repository" => {
                let Some((local, registry)) = resolve(&want.name) else {
                    continue;
                };
                name.clone_from(&local);
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
                        app.auth
                            .check_in(Some(&registry), principal, action)
                            .is_ok()
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
            out.push(Access {
                actions,
                name,
                ..want
            });
        }
    }
    out
}
