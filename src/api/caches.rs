//! Image caches (`/api/v1/image-caches[/{name}]`) and the cache prune (`/api/v1/cache/prune`).
//!
//! Image cache definitions are stored at once but the running server builds its source clients
//! at start: creating, changing or deleting one takes effect at the next restart (responses say
//! so). Prune runs the same sweep as the periodic cleanup, live.

use std::time::Duration;

use http::{Response, StatusCode};
use serde::Deserialize;

use super::page::{matches_q, Page};
use super::{blocking, json, Ctx};
use crate::admin;
use crate::auth::Action;
use crate::config::ImageCacheConfig;
use crate::error::{Error, Result};
use crate::http::body::Body;
use crate::App;

/// When changes to image caches apply.
const APPLIES: &str = "at the next restart of the server";

fn cache_json(app: &App, c: &ImageCacheConfig) -> serde_json::Value {
    let mut v = admin::describe_image_cache(c);
    v["loaded"] = app.cache.source(&c.name).is_some().into();
    v
}

fn existing(app: &App, name: &str) -> Result<ImageCacheConfig> {
    app.store
        .meta
        .image_cache(name)?
        .ok_or_else(|| Error::NotFound(format!("image cache {name:?} does not exist")))
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
pub fn list(ctx: &Ctx<'_>) -> Result<Response<Body>> {
    ctx.check(Action::Read(None))?;
    let q = ctx.query("q");
    let caches: Vec<ImageCacheConfig> = ctx
        .app
        .store
        .meta
        .image_caches()?
        .into_iter()
        .filter(|c| matches_q(&q, &c.name))
        .collect();
    Page::of(ctx)?.respond(ctx, caches, |c| Ok(cache_json(ctx.app, &c)))
}

/// `GET /api/v1/image-caches/{name}`.
pub fn get(ctx: &Ctx<'_>, name: &str) -> Result<Response<Body>> {
    ctx.check(Action::Read(None))?;
    json(
        StatusCode::OK,
        &cache_json(ctx.app, &existing(ctx.app, name)?),
    )
}

/// Validates and stores a definition (the checks of `berth cache create/update`).
async fn put(ctx: &Ctx<'_>, cache: ImageCacheConfig, replace: bool) -> Result<serde_json::Value> {
    let app = ctx.app.clone();
    let stored = cache.clone();
    blocking(move || {
        admin::put_image_cache(&app.store.meta, &app.config, stored, replace)
            .map_err(Error::BadRequest)
    })
    .await?;
    let mut v = cache_json(ctx.app, &cache);
    v["applies"] = APPLIES.into();
    Ok(v)
}

/// `POST /api/v1/image-caches`: body as a `[[image_cache]]` table in JSON.
pub async fn create(ctx: &Ctx<'_>, body: ImageCacheConfig) -> Result<Response<Body>> {
    ctx.check(Action::Manage(None))?;
    crate::oci::reference::validate_registry_name(&body.name)?;
    if ctx.app.store.meta.image_cache(&body.name)?.is_some() {
        return Err(Error::Conflict(format!(
            "image cache {:?} already exists",
            body.name
        )));
    }
    json(StatusCode::CREATED, &put(ctx, body, false).await?)
}

/// Body of `PATCH /api/v1/image-caches/{name}`: only the fields given change.
pub use crate::admin::CachePatch;

fn duration(field: &str, text: &str) -> Result<Duration> {
    humantime::parse_duration(text)
        .map_err(|e| Error::BadRequest(format!("{field}: {text:?} is not a duration: {e}")))
}

/// `PATCH /api/v1/image-caches/{name}`.
pub async fn patch(ctx: &Ctx<'_>, name: &str, body: CachePatch) -> Result<Response<Body>> {
    ctx.check(Action::Manage(None))?;
    let mut c = existing(ctx.app, name)?;
    not_declared(ctx.app, name)?;
    body.apply(&mut c).map_err(Error::BadRequest)?;
    json(StatusCode::OK, &put(ctx, c, true).await?)
}

/// `DELETE /api/v1/image-caches/{name}`: refused while a registry uses it (naming it).
pub async fn delete(ctx: &Ctx<'_>, name: &str) -> Result<Response<Body>> {
    ctx.check(Action::Manage(None))?;
    existing(ctx.app, name)?;
    not_declared(ctx.app, name)?;
    let users = admin::registries_using(&ctx.app.store.meta, name).map_err(Error::Internal)?;
    if !users.is_empty() {
        return Err(Error::Conflict(format!(
            "image cache {name:?} is used by registry {} (delete or change that registry first)",
            users.join(", ")
        )));
    }
    ctx.app.store.meta.delete_image_cache(name)?;
    ctx.app.store.meta.flush().await?;
    json(
        StatusCode::OK,
        &serde_json::json!({ "name": name, "applies": APPLIES }),
    )
}

/// Body of `POST /api/v1/cache/prune`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Prune {
    /// Report only.
    #[serde(default)]
    pub dry_run: bool,
    /// Age since the last pull, e.g. `7d` (default: `pull_through.cleanup_unpulled_after`).
    pub unpulled_for: Option<String>,
}

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
    let report = blocking(move || {
        // Pull times are batched in memory; a pull just now must count.
        app.store.pulls.flush(&app.store.meta)?;
        let busy = app.cache.fetches.inflight_digests();
        crate::cache::sweep::sweep(
            &app.store,
            age,
            app.config.pull_through.gc_grace,
            &busy,
            dry_run,
        )
    })
    .await?;
    if !dry_run {
        crate::cache::sweep::announce(&ctx.app.events, &report);
    }
    json(StatusCode::OK, &prune_json(&report, dry_run))
}

/// The JSON of a sweep report (also printed by `berth cache prune --json` on the data dir).
pub fn prune_json(report: &crate::cache::sweep::SweepReport, dry_run: bool) -> serde_json::Value {
    let artifacts: Vec<_> = report
        .artifacts
        .iter()
        .map(|(repo, digest, tags, last)| {
            serde_json::json!({
                "repository": repo,
                "digest": digest,
                "tags": tags,
                "last_pull": super::rfc3339(*last),
            })
        })
        .collect();
    let blobs: Vec<_> = report
        .blobs
        .iter()
        .map(|(d, s)| serde_json::json!({ "digest": d, "size": s }))
        .collect();
    serde_json::json!({
        "dry_run": dry_run,
        "artifacts": artifacts,
        "blobs": blobs,
        "bytes": report.bytes(),
    })
}
