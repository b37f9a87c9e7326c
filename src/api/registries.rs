//! `/api/v1/registries[/{registry}]`: list, create, read, change and delete registries.

use http::{Response, StatusCode};
use serde::Deserialize;

use super::page::{matches_q, Page};
use super::views::{RegistryDeleted, RegistryUsageView, RegistryView};
use super::{json, Ctx};
use crate::auth::Action;
use crate::config::RegistryKind;
use crate::error::{Error, Result};
use crate::http::body::Body;
use crate::store::meta::{MetaStore, RegistryRecord};
use crate::App;

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// The view of a registry, with a note when its image cache is not loaded yet.
pub async fn registry_view(app: &App, r: &RegistryRecord) -> Result<RegistryView> {
    let images = app
        .store
        .meta
        .repositories(Some(&r.name), None, usize::MAX)
        .await?
        .len();
    let mut v = RegistryView::of(r, images);
    let usage = app.store.meta.registry_usage(&r.name).await?;
    v.usage = Some(RegistryUsageView {
        bytes: usage.bytes,
        blobs: usage.blobs,
        shared_blobs: app.store.meta.shared_blobs(&r.name).await?,
        artifacts: usage.artifacts,
    });
    if let Some(c) = &r.cache {
        if app.cache.source(c).is_none() {
            v.note = Some(format!(
                "image cache {c:?} is not loaded (its source could not be built: see the server log): this registry answers errors until it is fixed"
            ));
        }
    }
    Ok(v)
}

/// A registry the caller may see: hidden ones on a public listener are absent, like unknown ones.
pub fn visible(ctx: &Ctx<'_>, name: &str) -> Result<RegistryRecord> {
    let unknown = || Error::NotFound(format!("registry {name:?} does not exist"));
    let r = ctx.app.store.registry(name).ok_or_else(unknown)?;
    ctx.req.visible(&r).map_err(|_| unknown())?;
    Ok(RegistryRecord::clone(&r))
}

/// `GET /api/v1/registries?q=&page=&page_size=`.
pub async fn list(ctx: &Ctx<'_>) -> Result<Response<Body>> {
    ctx.check(Action::Read(None))?;
    let q = ctx.query("q");
    let app = ctx.app;
    let mut regs: Vec<RegistryRecord> = app
        .store
        .registries()
        .into_iter()
        .filter(|r| ctx.req.shows(r))
        .filter(|r| app.auth.can_read(&app.store, ctx.req.principal, &r.name))
        .filter(|r| matches_q(&q, &r.name))
        .collect();
    regs.sort_by(|a, b| a.name.cmp(&b.name));
    let page = Page::of(ctx)?;
    let (total, regs) = page.slice(regs);
    let mut shown = Vec::with_capacity(regs.len());
    for r in regs {
        shown.push(registry_view(app, &r).await?);
    }
    page.envelope(ctx, total, shown)
}

/// `GET /api/v1/registries/{registry}`.
pub async fn get(ctx: &Ctx<'_>, name: &str) -> Result<Response<Body>> {
    ctx.check(Action::Read(Some(name)))?;
    let r = visible(ctx, name)?;
    json(StatusCode::OK, &registry_view(ctx.app, &r).await?)
}

pub use super::views::NewRegistry;

async fn check_kind(app: &App, kind: RegistryKind, cache: Option<&str>) -> Result<()> {
    kind_matches_cache(&*app.store.meta, kind, cache)
        .await
        .map_err(Error::BadRequest)
}

/// Checks a registry's type against the image cache it names .
async fn kind_matches_cache(
    meta: &dyn MetaStore,
    kind: RegistryKind,
    cache: Option<&str>,
) -> Result<(), String> {
    let exists = match (kind, cache) {
        (RegistryKind::Cache, Some(c)) => meta.image_cache(c).await.map_err(err)?.is_some(),
        _ => true,
    };
    match (kind, cache) {
        (RegistryKind::Cache, None) => Err(
            "a registry of type cache needs the image cache it serves (--cache, or \"cache\" in the API)"
                .into(),
        ),
        (RegistryKind::Normal, Some(_)) => {
            Err("only registries of type cache name an image cache".into())
        }
        (RegistryKind::Cache, Some(c)) if !exists => Err(
            format!("image cache {c:?} does not exist (create it with `berth cache create {c} ...`)"),
        ),
        _ => Ok(()),
    }
}

/// `POST /api/v1/registries`.
pub async fn create(ctx: &Ctx<'_>, body: NewRegistry) -> Result<Response<Body>> {
    ctx.check(Action::Manage(None))?;
    crate::oci::reference::validate_registry_name(&body.name)?;
    let app = ctx.app;
    if app.store.registry(&body.name).is_some() {
        return Err(Error::Conflict(format!(
            "registry {:?} already exists",
            body.name
        )));
    }
    check_kind(app, body.kind, body.cache.as_deref()).await?;
    let mirror = app.config.mirror.registry.as_deref();
    if mirror.is_some_and(|m| m != body.name) && body.name == crate::config::SHADOWING_NAMESPACE {
        return Err(Error::Conflict(format!(
            "registry {:?} would shadow the mirror: Docker daemons ask their mirror for every official image as {}/NAME, which would reach this registry instead of mirror registry {:?}, and the daemons would fall back to Docker Hub without a word; choose another name",
            body.name,
            crate::config::SHADOWING_NAMESPACE,
            mirror.unwrap_or_default()
        )));
    }
    let record = body.record();
    app.store.put_registry(record.clone()).await?;
    default_cleanup(app, &record).await?;
    app.store.meta.flush().await?;
    json(StatusCode::CREATED, &registry_view(app, &record).await?)
}

/// Body of `PATCH /api/v1/registries/{registry}`: only the fields given change.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryPatch {
    /// New type.
    #[serde(rename = "type")]
    pub kind: Option<RegistryKind>,
    /// New image cache (cache registries).
    pub cache: Option<String>,
    /// Reachable on public listeners.
    pub public_uri: Option<bool>,
    /// Pull without credentials.
    pub anonymous_pull: Option<bool>,
    /// New quota in bytes (0: none).
    pub quota_bytes: Option<u64>,
}

/// `PATCH /api/v1/registries/{registry}`. Visibility and anonymous pull are settings of the
/// registry (its admins may change them); type and image cache change what the registry is,
/// so they need an admin of every registry.
pub async fn patch(ctx: &Ctx<'_>, name: &str, body: RegistryPatch) -> Result<Response<Body>> {
    // A registry's admins must not raise their own quota: that is an admin of everything's.
    let structural = body.kind.is_some() || body.cache.is_some() || body.quota_bytes.is_some();
    ctx.check(Action::Manage(if structural { None } else { Some(name) }))?;
    let app = ctx.app;
    let mut r = visible(ctx, name)?;
    if structural && declared_in_config(app, name) {
        return Err(Error::Conflict(format!(
            "registry {name:?} is declared in the config file, which sets its type, image cache and quota at every start: change it there"
        )));
    }
    if let Some(kind) = body.kind {
        r.kind = kind;
        if kind == RegistryKind::Normal {
            r.cache = None;
        }
    }
    if let Some(c) = body.cache {
        r.cache = Some(c);
    }
    check_kind(app, r.kind, r.cache.as_deref()).await?;
    if let Some(p) = body.public_uri {
        r.public_uri = p;
    }
    if let Some(a) = body.anonymous_pull {
        r.anonymous_pull = a;
    }
    if let Some(q) = body.quota_bytes {
        r.quota_bytes = (q > 0).then_some(q);
    }
    app.store.put_registry(r.clone()).await?;
    default_cleanup(app, &r).await?;
    app.store.meta.flush().await?;
    json(StatusCode::OK, &registry_view(app, &r).await?)
}

/// A cache registry gets the default cleanup unless it has policies or a schedule.
async fn default_cleanup(app: &App, r: &RegistryRecord) -> Result<()> {
    if r.kind == RegistryKind::Cache {
        let days = crate::scheduler::default_days(app.config.pull_through.cleanup_unpulled_after);
        app.policies.default_cache_cleanup(&r.name, days).await?;
    }
    Ok(())
}

fn declared_in_config(app: &App, name: &str) -> bool {
    app.config.registry.iter().any(|r| r.name == name)
}

/// `DELETE /api/v1/registries/{registry}?force=true`: refused while it holds images unless forced.
pub async fn delete(ctx: &Ctx<'_>, name: &str) -> Result<Response<Body>> {
    ctx.check(Action::Manage(None))?;
    let app = ctx.app.clone();
    visible(ctx, name)?;
    if declared_in_config(&app, name) {
        return Err(Error::Conflict(format!(
            "registry {name:?} is declared in the config file and would come back at the next start: remove it there"
        )));
    }
    let force = ctx.query("force").is_some_and(|v| v == "true" || v == "1");
    let repos = app
        .store
        .meta
        .repositories(Some(name), None, usize::MAX)
        .await?;
    if !repos.is_empty() && !force {
        return Err(Error::Conflict(format!(
            "registry {name:?} still holds {} images (e.g. {}); delete with ?force=true to remove them too",
            repos.len(),
            repos[0]
        )));
    }
    let images = repos.len();
    let owned = name.to_string();
    // A task of its own: a client that goes away does not stop the deletion halfway.
    tokio::spawn(async move {
        // The metadata tells the hot manifest cache and the registries map: a registry
        // created again under this name never serves the old manifests.
        app.store.remove_registry(&owned).await?;
        let policies = app.policies.remove_registry(&owned).await?;
        if policies > 0 {
            tracing::info!(registry = %owned, policies, "cleanup and protection policies of the deleted registry removed");
        }
        let hooks = app.events.webhooks.remove_registry(&owned).await?;
        if hooks > 0 {
            tracing::info!(registry = %owned, policies = hooks, "webhook policies of the deleted registry removed");
        }
        app.store.meta.flush().await?;
        Ok::<_, Error>(())
    })
    .await
    .map_err(|e| Error::Internal(format!("registry deletion task: {e}")))??;
    json(
        StatusCode::OK,
        &RegistryDeleted {
            deleted_images: images,
            name: name.to_string(),
        },
    )
}
