//! Listings: tags (`n`/`last` pagination with `Link`), the catalog, and the referrers API.

use http::{header, Response, StatusCode};

use super::{json_response, set, Req};
use crate::error::{Error, Result};
use crate::http::body::Body;
use crate::http::router::query_param;
use crate::oci::digest::Digest;
use crate::oci::manifest::OCI_INDEX;
use crate::oci::reference::RepoName;
use crate::App;

/// Page size from `n`: default when absent, clamped to the configured maximum.
fn page_size(app: &App, req: &Req<'_>) -> Result<usize> {
    match query_param(req.query, "n") {
        None => Ok(app.config.limits.default_page_size),
        Some(n) => n
            .parse::<usize>()
            .map(|n| n.min(app.config.limits.max_page_size))
            .map_err(|_| {
                Error::PaginationInvalid(format!("n={n:?} is not a non-negative integer"))
            }),
    }
}

/// Adds `Link: <path?n=N&last=LAST>; rel="next"` when a page is full and more may follow.
fn link_next(r: &mut Response<Body>, path: &str, n: usize, last: &str) {
    let last = percent_encoding::utf8_percent_encode(last, percent_encoding::NON_ALPHANUMERIC);
    set(
        r,
        header::LINK,
        &format!("<{path}?n={n}&last={last}>; rel=\"next\""),
    );
}

/// `GET /v2/NAME/tags/list`.
pub async fn tags(app: &App, repo: &RepoName, req: &Req<'_>) -> Result<Response<Body>> {
    let n = page_size(app, req)?;
    let last = query_param(req.query, "last");
    let meta = &app.store.meta;
    if !meta.repo_exists(repo.as_str()).await? {
        return Err(Error::NameUnknown(format!(
            "repository {repo} has no artifacts"
        )));
    }
    let mut tags = meta
        .tags(repo.as_str(), last.as_deref(), n.saturating_add(1))
        .await?;
    let more = tags.len() > n;
    tags.truncate(n);
    let body = serde_json::json!({ "name": repo.as_str(), "tags": tags }).to_string();
    let mut r = json_response(StatusCode::OK, body);
    if more {
        if let Some(last) = tags.last() {
            link_next(&mut r, &format!("/v2/{repo}/tags/list"), n, last);
        }
    }
    Ok(r)
}

/// `GET /v2/_catalog`.
pub async fn catalog(app: &App, req: &Req<'_>) -> Result<Response<Body>> {
    app.auth
        .check(&app.store, req.principal, crate::auth::Action::Catalog)?;
    let n = page_size(app, req)?;
    let mut last = query_param(req.query, "last");
    // Only repositories of registries the caller may read and that this listener shows.
    let mut shown = std::collections::HashMap::new();
    let mut visible = |repo: &str| {
        let registry = repo.split('/').next().unwrap_or(repo).to_string();
        *shown.entry(registry.clone()).or_insert_with(|| {
            app.store.registry(&registry).is_some_and(|r| {
                req.visible(&r).is_ok() && app.auth.can_read(&app.store, req.principal, &r.name)
            })
        })
    };
    let want = n.saturating_add(1);
    let mut repos = Vec::new();
    loop {
        let page = app
            .store
            .meta
            .repositories(None, last.as_deref(), want.max(100))
            .await?;
        let exhausted = page.len() < want.max(100);
        last = page.last().cloned();
        repos.extend(page.into_iter().filter(|r| visible(r)));
        if exhausted || repos.len() >= want {
            break;
        }
    }
    repos.truncate(want);
    let more = repos.len() > n;
    repos.truncate(n);
    let body = serde_json::json!({ "repositories": repos }).to_string();
    let mut r = json_response(StatusCode::OK, body);
    if more {
        if let Some(last) = repos.last() {
            link_next(&mut r, "/v2/_catalog", n, last);
        }
    }
    Ok(r)
}

/// `GET /v2/NAME/referrers/DIGEST[?artifactType=]`: an OCI index of the manifests whose
/// `subject` is DIGEST (empty, not 404, when there are none).
pub async fn referrers(
    app: &App,
    repo: &RepoName,
    digest: &str,
    req: &Req<'_>,
) -> Result<Response<Body>> {
    let subject = Digest::parse(digest)?;
    let filter = query_param(req.query, "artifactType");
    let mut manifests = app
        .store
        .meta
        .referrers(repo.as_str(), &subject, None, usize::MAX)
        .await?;
    if let Some(t) = &filter {
        manifests.retain(|d| d.artifact_type.as_deref() == Some(t.as_str()));
    }
    let body = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": manifests,
    })
    .to_string();
    let mut r = json_response(StatusCode::OK, body);
    set(&mut r, header::CONTENT_TYPE, OCI_INDEX);
    if filter.is_some() {
        set(&mut r, "oci-filters-applied", "artifactType");
    }
    Ok(r)
}
