//! Image caches (`/api/v1/image-caches[/{name}]`) and the cache prune (`/api/v1/cache/prune`).
//!
//! Creating, changing or deleting an image cache stores it and rebuilds (or drops) its source
//! client before the response: the next request through a cache registry uses it. Prune runs
//! the same sweep as the periodic cleanup, live.

use std::time::Duration;

use http::{Response, StatusCode};

use super::page::{matches_q, Page};
use super::views::{ImageCacheDeleted, ImageCacheView, PruneReport};
use super::{json, Ctx};
use crate::auth::Action;
use crate::config::{Config, ImageCacheConfig};
use crate::error::{Error, Result};
use crate::http::body::Body;
use crate::store::meta::{ImageCacheRecord, MetaStore};
use crate::App;

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// When changes to image caches apply.
const APPLIES: &str = "immediately";

fn cache_view(app: &App, c: &ImageCacheConfig) -> ImageCacheView {
    ImageCacheView::of(c, app.cache.source(&c.name).is_some())
}

/// A stored image cache with its credentials, as a definition.
pub async fn stored(meta: &dyn MetaStore, record: ImageCacheRecord) -> Result<ImageCacheConfig> {
    let credentials = meta.credentials(&record.name).await?;
    Ok(ImageCacheConfig::from_records(record, credentials))
}

async fn existing(app: &App, name: &str) -> Result<ImageCacheConfig> {
    let meta = &*app.store.meta;
    let record = meta
        .image_cache(name)
        .await?
        .ok_or_else(|| Error::NotFound(format!("image cache {name:?} does not exist")))?;
    stored(meta, record).await
}

fn not_declared(app: &App, name: &str) -> Result<()> {
    if app.config.image_cache.iter().any(|c| c.name == name) {
        return Err(Error::Conflict(format!(
            "image cache {name:?} is declared in the config file, which wins at every start: change it there"
        )));
    }
    Ok(())
}

/// `GET /api/v1/image-caches?q=` (credentials are never returned, only whether they are set).
pub async fn list(ctx: &Ctx<'_>) -> Result<Response<Body>> {
    ctx.check(Action::Read(None))?;
    let q = ctx.query("q");
    let meta = &*ctx.app.store.meta;
    let caches: Vec<ImageCacheRecord> = meta
        .image_caches()
        .await?
        .into_iter()
        .filter(|c| matches_q(&q, &c.name))
        .collect();
    let page = Page::of(ctx)?;
    let (total, caches) = page.slice(caches);
    let mut shown = Vec::with_capacity(caches.len());
    for c in caches {
        shown.push(cache_view(ctx.app, &stored(meta, c).await?));
    }
    page.envelope(ctx, total, shown)
}

/// `GET /api/v1/image-caches/{name}`.
pub async fn get(ctx: &Ctx<'_>, name: &str) -> Result<Response<Body>> {
    ctx.check(Action::Read(None))?;
    json(
        StatusCode::OK,
        &cache_view(ctx.app, &existing(ctx.app, name).await?),
    )
}

/// Validates and stores a definition (the checks of `berth cache create/update`).
async fn put(ctx: &Ctx<'_>, cache: ImageCacheConfig, replace: bool) -> Result<ImageCacheView> {
    put_image_cache(
        &*ctx.app.store.meta,
        &ctx.app.config,
        cache.clone(),
        replace,
    )
    .await
    .map_err(Error::BadRequest)?;
    ctx.app
        .cache
        .load(&*ctx.app.store.meta, &cache.name)
        .await
        .map_err(Error::Internal)?;
    let mut v = cache_view(ctx.app, &cache);
    v.applies = Some(APPLIES.into());
    Ok(v)
}

/// `POST /api/v1/image-caches`: body as a `[[image_cache]]` table in JSON.
pub async fn create(ctx: &Ctx<'_>, body: ImageCacheConfig) -> Result<Response<Body>> {
    ctx.check(Action::Manage(None))?;
    crate::oci::reference::validate_registry_name(&body.name)?;
    if ctx.app.store.meta.image_cache(&body.name).await?.is_some() {
        return Err(Error::Conflict(format!(
            "image cache {:?} already exists",
            body.name
        )));
    }
    json(StatusCode::CREATED, &put(ctx, body, false).await?)
}

pub use super::views::CachePatch;

/// Creates or replaces an image cache, after checking it builds a usable source.
pub async fn put_image_cache(
    meta: &dyn MetaStore,
    config: &Config,
    cache: ImageCacheConfig,
    replace: bool,
) -> Result<(), String> {
    crate::oci::reference::validate_registry_name(&cache.name).map_err(err)?;
    let exists = meta.image_cache(&cache.name).await.map_err(err)?.is_some();
    match (exists, replace) {
        (true, false) => {
            return Err(format!(
                "image cache {:?} already exists (use `berth cache update`)",
                cache.name
            ))
        }
        (false, true) => return Err(format!("image cache {:?} does not exist", cache.name)),
        _ => {}
    }
    crate::cache::upstream::Source::new(cache.clone(), &config.pull_through.allowed_ports)?;
    let (record, credentials) = cache.to_records();
    meta.put_image_cache(&record, Some(&credentials))
        .await
        .map_err(err)?;
    meta.flush().await.map_err(err)
}

/// Registries that serve an image cache.
pub async fn registries_using(meta: &dyn MetaStore, name: &str) -> Result<Vec<String>, String> {
    Ok(meta
        .registries()
        .await
        .map_err(err)?
        .into_iter()
        .filter(|r| r.cache.as_deref() == Some(name))
        .map(|r| r.name)
        .collect())
}

fn duration(field: &str, text: &str) -> Result<Duration> {
    humantime::parse_duration(text)
        .map_err(|e| Error::BadRequest(format!("{field}: {text:?} is not a duration: {e}")))
}

/// `PATCH /api/v1/image-caches/{name}`.
pub async fn patch(ctx: &Ctx<'_>, name: &str, body: CachePatch) -> Result<Response<Body>> {
    ctx.check(Action::Manage(None))?;
    let mut c = existing(ctx.app, name).await?;
    not_declared(ctx.app, name)?;
    body.apply(&mut c).map_err(Error::BadRequest)?;
    json(StatusCode::OK, &put(ctx, c, true).await?)
}

/// `DELETE /api/v1/image-caches/{name}`: refused while a registry uses it (naming it).
pub async fn delete(ctx: &Ctx<'_>, name: &str) -> Result<Response<Body>> {
    ctx.check(Action::Manage(None))?;
    existing(ctx.app, name).await?;
    not_declared(ctx.app, name)?;
    let users = registries_using(&*ctx.app.store.meta, name)
        .await
        .map_err(Error::Internal)?;
    if !users.is_empty() {
        return Err(Error::Conflict(format!(
            "image cache {name:?} is used by registry {} (delete or change that registry first)",
            users.join(", ")
        )));
    }
    ctx.app.store.meta.delete_image_cache(name).await?;
    ctx.app.store.meta.flush().await?;
    ctx.app
        .cache
        .load(&*ctx.app.store.meta, name)
        .await
        .map_err(Error::Internal)?;
    json(
        StatusCode::OK,
        &ImageCacheDeleted {
            applies: APPLIES.into(),
            name: name.to_string(),
        },
    )
}

pub use super::views::Prune;

/// `POST /api/v1/cache/prune`: cache-registry artifacts not pulled for a while, then blobs
/// nothing references (fetches in flight are left alone).
pub async fn prune(ctx: &Ctx<'_>, body: Prune) -> Result<Response<Body>> {
    ctx.check(Action::Manage(None))?;
    let app = ctx.app.clone();
    let age = match &body.unpulled_for {
        Some(t) => duration("unpulled_for", t)?,
        None => app.config.pull_through.cleanup_unpulled_after,
    };
    let dry_run = body.dry_run;
    // Pull times are batched in memory; a pull just now must count.
    app.store.pulls.flush(&*app.store.meta).await?;
    let busy = app.cache.fetches.inflight_digests();
    let gc_grace = match &body.grace {
        Some(t) => duration("grace", t)?,
        None => app.config.pull_through.gc_grace,
    };
    let report = crate::cache::sweep::sweep(&app.store, age, gc_grace, &busy, dry_run).await?;
    if !dry_run {
        crate::cache::sweep::announce(&ctx.app.events, &report);
    }
    json(StatusCode::OK, &PruneReport::of(&report, dry_run))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SourceKind;

    fn source(name: &str) -> ImageCacheConfig {
        ImageCacheConfig {
            username: Some("u".into()),
            password: Some("s3cret".into()),
            ..ImageCacheConfig::new(name, SourceKind::Registry, "https://registry.example")
        }
    }

    #[tokio::test]
    async fn image_cache_definitions_are_checked_and_never_shown_with_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            data_dir: dir.path().to_path_buf(),
            ..Config::default()
        };
        let meta = crate::store::meta::Meta::open(dir.path()).unwrap();
        put_image_cache(&meta, &config, source("up"), false)
            .await
            .unwrap();
        assert!(put_image_cache(&meta, &config, source("up"), false)
            .await
            .is_err());
        assert!(put_image_cache(&meta, &config, source("nope"), true)
            .await
            .is_err());
        let up = stored(&meta, meta.image_cache("up").await.unwrap().unwrap())
            .await
            .unwrap();
        let shown = serde_json::to_string(&ImageCacheView::of(&up, false)).unwrap();
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("user u, password set"), "{shown}");
        let mut bad = source("bad");
        bad.url = "not a url".into();
        assert!(put_image_cache(&meta, &config, bad, false).await.is_err());
        assert!(registries_using(&meta, "up").await.unwrap().is_empty());
    }
}
