//! `GET /api/v1/status` (admin): version, uptime, storage, counts, and what every image cache's
//! source is doing (last success, last error, consecutive failures).

use std::time::SystemTime;

use http::{Response, StatusCode};

use super::caches::stored;
use super::views::{SourceStatus, StatusCounts, StatusView, StorageStatus};
use super::{json, Ctx};
use crate::auth::Action;
use crate::error::{Error, Result};
use crate::http::body::Body;

/// `GET /api/v1/status`.
pub async fn get(ctx: &Ctx<'_>) -> Result<Response<Body>> {
    ctx.check(Action::Manage(None))?;
    let app = ctx.app;
    let meta = &*app.store.meta;
    let mut sources = Vec::new();
    for record in meta.image_caches().await? {
        let c = stored(meta, record).await?;
        let loaded = app.cache.source(&c.name).is_some();
        let health = app.cache.health(&c.name);
        sources.push(SourceStatus::of(&c, loaded, health.as_ref()));
    }
    sources.sort_by(|a, b| a.name.cmp(&b.name));
    let dir = app.config.data_dir.clone();
    let (free, used) = tokio::task::spawn_blocking(move || crate::store::fs::volume_bytes(&dir))
        .await
        .map_err(|e| Error::Internal(e.to_string()))?
        .map_err(|e| {
            Error::Internal(format!(
                "cannot read the volume of the data directory {}: {e}",
                app.config.data_dir.display()
            ))
        })?;
    crate::metrics::storage_free_bytes(free);
    let started = crate::metrics::process_start();
    let view = StatusView {
        commit: crate::metrics::COMMIT.to_string(),
        counts: StatusCounts {
            image_caches: sources.len(),
            registries: app.store.registries().len(),
            users: app.auth.users.list().await?.len(),
        },
        sources,
        started: humantime::format_rfc3339_seconds(started).to_string(),
        storage: StorageStatus {
            blob_bytes: crate::metrics::storage_bytes_counted(),
            data_dir: app.config.data_dir.display().to_string(),
            volume_free_bytes: free,
            volume_used_bytes: used,
        },
        uptime_seconds: SystemTime::now()
            .duration_since(started)
            .unwrap_or_default()
            .as_secs(),
        version: crate::metrics::VERSION.to_string(),
    };
    json(StatusCode::OK, &view)
}
