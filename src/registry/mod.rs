//! Origin-registry behaviour: the OCI Distribution API over the local store.

pub mod blobs;
pub mod lists;
pub mod manifests;
pub mod receive;
pub mod uploads;

use http::{HeaderMap, HeaderValue, Method, Response, StatusCode};
use hyper::body::Incoming;

use crate::auth::{Action, Principal};
use crate::cache::{CacheTarget, Target};
use crate::error::{Error, Result};
use crate::events::{EventKind, Happened};
use crate::http::body::Body;
use crate::http::router::Route;
use crate::oci::reference::RepoName;
use crate::store::meta::RegistryRecord;
use crate::App;

/// A request's parts that handlers read.
pub struct Req<'a> {
    /// Method.
    pub method: &'a Method,
    /// Raw query string.
    pub query: Option<&'a str>,
    /// Headers.
    pub headers: &'a HeaderMap,
    /// Who is asking.
    pub principal: &'a Principal,
    /// Whether the request came through a public listener (hides `public_uri = false` registries).
    pub public: bool,
}

impl Req<'_> {
    /// Refuses registries hidden from public listeners as if they did not exist.
    pub fn visible(&self, registry: &RegistryRecord) -> Result<()> {
        if self.public && !registry.public_uri {
            return Err(Error::NameUnknown(format!(
                "registry {:?} does not exist",
                registry.name
            )));
        }
        Ok(())
    }
}

/// The authorization action of a `/v2/` request on a repository.
fn action<'a>(route: &Route, method: &Method, repo: &'a str) -> Action<'a> {
    match (route, method) {
        (_, &Method::GET | &Method::HEAD) => Action::Pull(repo),
        (Route::Upload { .. } | Route::UploadStart { .. }, _) => Action::Push(repo),
        (_, &Method::DELETE) => Action::Delete(repo),
        _ => Action::Push(repo),
    }
}

/// Runs the handler of a `/v2/` route.
pub async fn dispatch(
    app: &App,
    route: Route,
    req: Req<'_>,
    body: Incoming,
) -> Result<Response<Body>> {
    let m = req.method;
    let name = match &route {
        Route::Base if m == Method::GET || m == Method::HEAD => {
            app.auth.check(&app.store, req.principal, Action::Ping)?;
            return Ok(json_response(StatusCode::OK, "{}".into()));
        }
        Route::Catalog if m == Method::GET => return lists::catalog(app, &req),
        Route::Blob { name, .. }
        | Route::UploadStart { name }
        | Route::Upload { name, .. }
        | Route::Manifest { name, .. }
        | Route::Tags { name }
        | Route::Referrers { name, .. } => name,
        _ => return Err(Error::MethodNotAllowed(m.to_string())),
    };
    let target = match app.cache.resolve(&app.store, name, req.query) {
        Ok(t) => t,
        // Without credentials, a missing registry looks like any other refusal: anonymous
        // callers do not learn which registries exist.
        Err(Error::NameUnknown(_))
            if app.auth.enforced() && matches!(req.principal, Principal::Anonymous) =>
        {
            return Err(Error::unauthorized(
                "authentication required",
                action(&route, m, name).scope(),
            ))
        }
        Err(e) => return Err(e),
    };
    let repo = match &target {
        Target::Origin(repo) => repo,
        Target::Cache(t) => &t.repo,
    };
    if let Some(r) = app.store.registry(repo.registry()) {
        req.visible(&r)?;
    }
    let checked = app
        .auth
        .check(&app.store, req.principal, action(&route, m, repo.as_str()));
    // Tokens name the repository as the client knows it (mirror mode has no registry prefix).
    match checked {
        Err(_) if matches!(req.principal, Principal::Token(_)) && name != repo.as_str() => app
            .auth
            .check(&app.store, req.principal, action(&route, m, name))?,
        other => other?,
    }
    match target {
        Target::Origin(repo) => origin(app, route, &repo, req, body).await,
        Target::Cache(t) => cached(app, route, &t, req).await,
    }
}

async fn origin(
    app: &App,
    route: Route,
    repo: &RepoName,
    req: Req<'_>,
    body: Incoming,
) -> Result<Response<Body>> {
    let m = req.method;
    match route {
        Route::Blob { digest, .. } => match *m {
            Method::GET => blobs::get(app, repo, &digest, &req, false),
            Method::HEAD => blobs::get(app, repo, &digest, &req, true),
            Method::DELETE => blobs::delete(app, repo, &digest).await,
            _ => Err(Error::MethodNotAllowed(m.to_string())),
        },
        Route::UploadStart { .. } if m == Method::POST => {
            uploads::start(app, repo, &req, body).await
        }
        Route::Upload { id, .. } => match *m {
            Method::GET => uploads::status(app, repo, &id).await,
            Method::PATCH => uploads::patch(app, repo, &id, &req, body).await,
            Method::PUT => uploads::finish(app, repo, &id, &req, body).await,
            Method::DELETE => uploads::cancel(app, repo, &id).await,
            _ => Err(Error::MethodNotAllowed(m.to_string())),
        },
        Route::Manifest { reference, .. } => match *m {
            Method::GET => {
                let r = manifests::get(app, repo, &reference, false).await?;
                publish_pull(app, repo, &reference, &r, req.principal);
                Ok(r)
            }
            Method::HEAD => manifests::get(app, repo, &reference, true).await,
            Method::PUT => manifests::put(app, repo, &reference, &req, body).await,
            Method::DELETE => manifests::delete(app, repo, &reference, req.principal.name()).await,
            _ => Err(Error::MethodNotAllowed(m.to_string())),
        },
        Route::Tags { .. } if m == Method::GET => lists::tags(app, repo, &req),
        Route::Referrers { digest, .. } if m == Method::GET => {
            lists::referrers(app, repo, &digest, &req)
        }
        _ => Err(Error::MethodNotAllowed(m.to_string())),
    }
}

/// Cache registries: reads go through the cache; pushes, tag creation and signing are refused;
/// deletes act on the local copy.
async fn cached(app: &App, route: Route, t: &CacheTarget, req: Req<'_>) -> Result<Response<Body>> {
    let m = req.method;
    let denied = || {
        Err(Error::Denied(format!(
            "registry {:?} is a pull-through cache of {:?}: push, tagging and signing are not allowed",
            t.repo.registry(),
            t.source.name()
        )))
    };
    match route {
        Route::Blob { digest, .. } => match *m {
            Method::GET => crate::cache::blob(app, t, &digest, &req, false).await,
            Method::HEAD => crate::cache::blob(app, t, &digest, &req, true).await,
            Method::DELETE => denied(),
            _ => Err(Error::MethodNotAllowed(m.to_string())),
        },
        Route::UploadStart { .. } | Route::Upload { .. } => denied(),
        Route::Manifest { reference, .. } => match *m {
            Method::GET => {
                let r = crate::cache::manifest(app, t, &reference, false).await?;
                publish_pull(app, &t.repo, &reference, &r, req.principal);
                Ok(r)
            }
            Method::HEAD => crate::cache::manifest(app, t, &reference, true).await,
            Method::DELETE => {
                manifests::delete(app, &t.repo, &reference, req.principal.name()).await
            }
            Method::PUT => denied(),
            _ => Err(Error::MethodNotAllowed(m.to_string())),
        },
        Route::Tags { .. } if m == Method::GET => lists::tags(app, &t.repo, &req),
        Route::Referrers { digest, .. } if m == Method::GET => {
            lists::referrers(app, &t.repo, &digest, &req)
        }
        _ => Err(Error::MethodNotAllowed(m.to_string())),
    }
}

/// Publishes PULL_ARTIFACT for a served manifest GET, from the response headers. The hot
/// manifest GET pays one atomic load (and nothing else) while no policy subscribes to pulls.
fn publish_pull(
    app: &App,
    repo: &RepoName,
    reference: &str,
    r: &Response<Body>,
    principal: &Principal,
) {
    if !app.events.wants(EventKind::PullArtifact, repo.registry()) {
        return;
    }
    let h = r.headers();
    let text = |name: &str| h.get(name).and_then(|v| v.to_str().ok()).unwrap_or("");
    app.events.emit(Happened {
        kind: EventKind::PullArtifact,
        operator: principal.name(),
        repository: repo.as_str(),
        tag: (!reference.contains(':')).then_some(reference),
        digest: text("docker-content-digest"),
        media_type: text("content-type"),
        size: text("content-length").parse().unwrap_or(0),
    });
}

impl App {
    /// Validates a repository name and checks that its registry exists (any type).
    pub fn repo(&self, name: &str) -> Result<RepoName> {
        let repo = RepoName::parse(name)?;
        if self.store.registry(repo.registry()).is_none() {
            return Err(Error::NameUnknown(format!(
                "registry {:?} does not exist (create it with `berth registry create {}`)",
                repo.registry(),
                repo.registry()
            )));
        }
        Ok(repo)
    }
}

/// A JSON response.
pub fn json_response(status: StatusCode, body: String) -> Response<Body> {
    let mut r = Response::new(Body::full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// An empty response with a status.
pub fn empty(status: StatusCode) -> Response<Body> {
    let mut r = Response::new(Body::Empty);
    *r.status_mut() = status;
    r.headers_mut()
        .insert(http::header::CONTENT_LENGTH, HeaderValue::from_static("0"));
    r
}

/// Sets a header from text known to be a valid header value (paths, digests, numbers).
pub fn set(r: &mut Response<Body>, name: impl http::header::IntoHeaderName, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        r.headers_mut().insert(name, v);
    }
}
