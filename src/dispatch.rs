//! The one request path of `/v2/`: resolve the name a client wrote to what it addresses on this
//! listener (an origin repository, or a cache registry and its upstream path, after `?ns=` and
//! mirror routing), authorize the operation on *that*, then hand the request to `registry::` or
//! `cache::`. Nothing about a registry is revealed before authorization has run: a registry that
//! does not exist, one hidden from this listener and one the caller may not use all answer alike.

use std::sync::Arc;

use crate::http::req::RequestBody;
use http::{Method, Response, StatusCode};

use crate::auth::{Action, Principal};
use crate::cache::{CacheTarget, Target};
use crate::error::{Error, Result};
use crate::events::{EventKind, Happened};
use crate::http::body::Body;
use crate::http::req::{json_response, no_such_registry, shown, Req};
use crate::http::router::{query_param, Route};
use crate::oci::reference::RepoName;
use crate::registry::{blobs, lists, manifests, uploads};
use crate::serve;
use crate::store::meta::RegistryRecord;
use crate::App;

/// What a repository operation is, independent of the name it acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Read and download.
    Pull,
    /// Upload, tag, mount into.
    Push,
    /// Remove.
    Delete,
}

impl Op {
    /// The authorization action of this operation on a repository.
    pub fn on(self, repo: &str) -> Action<'_> {
        match self {
            Op::Pull => Action::Pull(repo),
            Op::Push => Action::Push(repo),
            Op::Delete => Action::Delete(repo),
        }
    }

    fn of(route: &Route, method: &Method) -> Op {
        match (route, method) {
            (_, &Method::GET | &Method::HEAD) => Op::Pull,
            (Route::Upload { .. } | Route::UploadStart { .. }, _) => Op::Push,
            (_, &Method::DELETE) => Op::Delete,
            _ => Op::Push,
        }
    }
}

/// What a repository name resolves to as seen through one listener.
pub struct Resolution<'n> {
    /// Where requests for it go, when it resolves at all (even to a hidden registry).
    target: Option<Target>,
    /// The name as written, for names that resolve to nothing.
    written: &'n str,
    /// The registry's record, when it exists and this listener shows it.
    pub registry: Option<Arc<RegistryRecord>>,
}

/// Resolves a repository name the way every `/v2/` request and the token endpoint do: by
/// `?ns=`, by registry prefix, or by the mirror. `public` says whether the listener is public
/// (hidden registries then resolve to nothing visible). Errors only for malformed names.
pub fn resolve<'n>(
    app: &App,
    public: bool,
    name: &'n str,
    query: Option<&str>,
) -> Result<Resolution<'n>> {
    let target = match app.cache.resolve(&app.store, name, query) {
        Ok(target) => Some(target),
        Err(Error::NameUnknown(_)) => None,
        Err(e) => return Err(e),
    };
    let registry = target
        .as_ref()
        .and_then(|t| app.store.registry(t.repo().registry()))
        .filter(|r| shown(public, r));
    Ok(Resolution {
        target,
        written: name,
        registry,
    })
}

impl Resolution<'_> {
    /// The repository authorization is decided on: the resolved local name
    /// (`CACHEREG/UPSTREAM-PATH` for cache registries), or the name as written when it resolves
    /// to nothing.
    pub fn repo(&self) -> &str {
        self.target
            .as_ref()
            .map_or(self.written, |t| t.repo().as_str())
    }

    /// Authorizes `op` on what the name resolved to (never on the name as written), then gives
    /// the target, or the error of a registry that does not exist (or is hidden here: the same).
    pub fn authorize(self, app: &App, principal: &Principal, op: Op) -> Result<Target> {
        app.auth
            .check_in(self.registry.as_deref(), principal, op.on(self.repo()))?;
        match (self.target, self.registry) {
            (Some(target), Some(_)) => Ok(target),
            (target, _) => {
                let repo = target.as_ref().map_or(self.written, |t| t.repo().as_str());
                Err(no_such_registry(repo.split('/').next().unwrap_or(repo)))
            }
        }
    }
}

/// Runs a `/v2/` request.
pub async fn v2(
    app: &App,
    route: Route,
    req: Req<'_>,
    body: impl RequestBody,
) -> Result<Response<Body>> {
    let m = req.method;
    let name = match &route {
        Route::Base if m == Method::GET || m == Method::HEAD => {
            app.auth.check(&app.store, req.principal, Action::Ping)?;
            return Ok(json_response(StatusCode::OK, "{}".into()));
        }
        Route::Catalog if m == Method::GET => return lists::catalog(app, &req).await,
        Route::Blob { name, .. }
        | Route::UploadStart { name }
        | Route::Upload { name, .. }
        | Route::Manifest { name, .. }
        | Route::Tags { name }
        | Route::Referrers { name, .. } => name,
        _ => return Err(Error::MethodNotAllowed(m.to_string())),
    };
    let resolution = resolve(app, req.public, name, req.query)?;
    // Mirror mode only: the name is kept for the WARN line.
    let asked = MirrorAsk::of(app, &resolution, &req).map(|a| (a, name.to_string()));
    let answer = match resolution.authorize(app, req.principal, Op::of(&route, m)) {
        Ok(Target::Origin(repo)) => origin(app, route, &repo, req, body).await,
        Ok(Target::Cache(t)) => cached(app, route, &t, req).await,
        Err(e) => Err(e),
    };
    if let (Some((asked, name)), Err(e)) = (&asked, &answer) {
        asked.refused(name, e);
    }
    answer
}

/// A request a Docker daemon may have sent to its mirror: refusals of these are invisible to
/// the daemon's user (it falls back to Docker Hub), so each gets a WARN line and a count.
enum MirrorAsk {
    /// Routed to the mirror's cache registry (no registry prefix).
    Mirror,
    /// From a Docker daemon, to a normal registry whose name may shadow a Docker Hub
    /// namespace (mirror mode on).
    Shadowed(String),
}

impl MirrorAsk {
    fn of(app: &App, resolution: &Resolution<'_>, req: &Req<'_>) -> Option<MirrorAsk> {
        app.config.mirror.registry.as_ref()?;
        match &resolution.target {
            Some(Target::Cache(t)) if t.via_mirror => Some(MirrorAsk::Mirror),
            Some(Target::Origin(repo)) => {
                let daemon = req
                    .headers
                    .get(http::header::USER_AGENT)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|ua| ua.starts_with("docker/"));
                daemon.then(|| MirrorAsk::Shadowed(repo.registry().to_string()))
            }
            _ => None,
        }
    }

    fn refused(&self, name: &str, e: &Error) {
        let status = e.status();
        let label = match status.as_u16() {
            401 => "401",
            403 => "403",
            404 => "404",
            _ => return,
        };
        match self {
            MirrorAsk::Mirror => {
                tracing::warn!(repo = name, %status, code = e.code(), error = %e, "mirror request refused: a Docker daemon falls back to Docker Hub without telling its user");
                metrics::counter!("berth_mirror_refused_total", "status" => label, "reason" => "mirror").increment(1);
            }
            MirrorAsk::Shadowed(registry) => {
                tracing::warn!(repo = name, %status, code = e.code(), registry = %registry, "a Docker daemon was refused by a normal registry while mirror mode is on: if it asked its mirror for a Docker Hub image, registry {registry:?} shadows that Docker Hub namespace and the daemon fell back to Docker Hub");
                metrics::counter!("berth_mirror_refused_total", "status" => label, "reason" => "shadowed").increment(1);
            }
        }
    }
}

/// `GET`/`POST /service/token`: scopes resolve by [`resolve`], as `/v2/` will resolve them on
/// this listener.
pub async fn token(
    app: &Arc<App>,
    req: Req<'_>,
    body: impl RequestBody,
    client: std::net::IpAddr,
) -> Result<Response<Body>> {
    let public = req.public;
    let resolver = |name: &str| {
        let r = resolve(app, public, name, None).ok()?;
        let registry = r.registry.clone()?;
        Some((r.repo().to_string(), registry))
    };
    crate::auth::endpoint::token(app, req, body, client, &resolver).await
}

/// The repository a cross-repository mount may take the blob from: `from` as it resolves on
/// this listener, when the caller may pull it. Anything else is `None`, and the client gets an
/// upload session exactly as for a blob that exists nowhere: the answer reveals nothing about
/// other repositories.
fn mount_source(app: &App, req: &Req<'_>) -> Option<RepoName> {
    let from = query_param(req.query, "from")?;
    query_param(req.query, "mount")?;
    let resolution = resolve(app, req.public, &from, None).ok()?;
    match resolution.authorize(app, req.principal, Op::Pull).ok()? {
        Target::Origin(repo) => Some(repo),
        Target::Cache(t) => Some(t.repo),
    }
}

async fn origin(
    app: &App,
    route: Route,
    repo: &RepoName,
    req: Req<'_>,
    body: impl RequestBody,
) -> Result<Response<Body>> {
    let m = req.method;
    match route {
        Route::Blob { digest, .. } => match *m {
            Method::GET => serve::blobs::get(app, repo, &digest, &req, false).await,
            Method::HEAD => serve::blobs::get(app, repo, &digest, &req, true).await,
            Method::DELETE => blobs::delete(app, repo, &digest).await,
            _ => Err(Error::MethodNotAllowed(m.to_string())),
        },
        Route::UploadStart { .. } if m == Method::POST => {
            let lender = mount_source(app, &req);
            uploads::start(app, repo, &req, body, lender.as_ref()).await
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
                let r = serve::manifests::get(app, repo, &reference, false).await?;
                publish_pull(app, repo, &reference, &r, req.principal);
                Ok(r)
            }
            Method::HEAD => serve::manifests::get(app, repo, &reference, true).await,
            Method::PUT => manifests::put(app, repo, &reference, &req, body).await,
            Method::DELETE => manifests::delete(app, repo, &reference, req.principal.name()).await,
            _ => Err(Error::MethodNotAllowed(m.to_string())),
        },
        Route::Tags { .. } if m == Method::GET => lists::tags(app, repo, &req).await,
        Route::Referrers { digest, .. } if m == Method::GET => {
            lists::referrers(app, repo, &digest, &req).await
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
        Route::Tags { .. } if m == Method::GET => lists::tags(app, &t.repo, &req).await,
        Route::Referrers { digest, .. } if m == Method::GET => {
            lists::referrers(app, &t.repo, &digest, &req).await
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
