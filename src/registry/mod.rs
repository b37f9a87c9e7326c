//! Origin-registry behaviour: the OCI Distribution API over the local store.

pub mod blobs;
pub mod lists;
pub mod manifests;
pub mod receive;
pub mod uploads;

use http::{HeaderMap, HeaderValue, Method, Response, StatusCode};
use hyper::body::Incoming;

use crate::config::RegistryKind;
use crate::error::{Error, Result};
use crate::http::body::Body;
use crate::http::router::Route;
use crate::oci::reference::RepoName;
use crate::App;

/// A request's parts that handlers read.
pub struct Req<'a> {
    /// Method.
    pub method: &'a Method,
    /// Raw query string.
    pub query: Option<&'a str>,
    /// Headers.
    pub headers: &'a HeaderMap,
}

/// Runs the handler of a `/v2/` route.
pub async fn dispatch(
    app: &App,
    route: Route,
    req: Req<'_>,
    body: Incoming,
) -> Result<Response<Body>> {
    let m = req.method;
    match route {
        Route::Base if m == Method::GET || m == Method::HEAD => {
            Ok(json_response(StatusCode::OK, "{}".into()))
        }
        Route::Catalog if m == Method::GET => lists::catalog(app, &req),
        Route::Blob { name, digest } => {
            let repo = app.repo(&name)?;
            match *m {
                Method::GET => blobs::get(app, &repo, &digest, &req, false),
                Method::HEAD => blobs::get(app, &repo, &digest, &req, true),
                Method::DELETE => blobs::delete(app, &repo, &digest).await,
                _ => Err(Error::MethodNotAllowed(m.to_string())),
            }
        }
        Route::UploadStart { name } if m == Method::POST => {
            let repo = app.writable_repo(&name)?;
            uploads::start(app, &repo, &req, body).await
        }
        Route::Upload { name, id } => {
            let repo = app.repo(&name)?;
            match *m {
                Method::GET => uploads::status(app, &repo, &id).await,
                Method::PATCH => uploads::patch(app, &repo, &id, &req, body).await,
                Method::PUT => uploads::finish(app, &repo, &id, &req, body).await,
                Method::DELETE => uploads::cancel(app, &repo, &id).await,
                _ => Err(Error::MethodNotAllowed(m.to_string())),
            }
        }
        Route::Manifest { name, reference } => {
            let repo = app.repo(&name)?;
            match *m {
                Method::GET => manifests::get(app, &repo, &reference, false).await,
                Method::HEAD => manifests::get(app, &repo, &reference, true).await,
                Method::PUT => {
                    app.ensure_writable(&repo)?;
                    manifests::put(app, &repo, &reference, &req, body).await
                }
                Method::DELETE => manifests::delete(app, &repo, &reference).await,
                _ => Err(Error::MethodNotAllowed(m.to_string())),
            }
        }
        Route::Tags { name } if m == Method::GET => lists::tags(app, &app.repo(&name)?, &req),
        Route::Referrers { name, digest } if m == Method::GET => {
            lists::referrers(app, &app.repo(&name)?, &digest, &req)
        }
        _ => Err(Error::MethodNotAllowed(m.to_string())),
    }
}

impl App {
    /// Validates a repository name and checks that its registry exists.
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

    /// Like [`App::repo`], and refuses writes into cache registries.
    pub fn writable_repo(&self, name: &str) -> Result<RepoName> {
        let repo = self.repo(name)?;
        self.ensure_writable(&repo)?;
        Ok(repo)
    }

    /// Refuses writes into cache registries.
    pub fn ensure_writable(&self, repo: &RepoName) -> Result<()> {
        match self.store.registry(repo.registry()).map(|r| r.kind) {
            Some(RegistryKind::Cache) => Err(Error::Denied(format!(
                "registry {:?} is a pull-through cache: push is not allowed",
                repo.registry()
            ))),
            _ => Ok(()),
        }
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
