//! A registry's storage quota: a push that would take the registry past `quota_bytes` is
//! refused with 403 DENIED naming its usage and the limit. A push is checked by the bytes it
//! brings, before berth knows whether another image of the registry holds them already (the
//! usage counts each blob once); concurrent pushes may together pass the limit by what they
//! carry at once.

use crate::error::{Error, Result};
use crate::App;

/// Refuses `adding` more bytes in the registry of the repository `repo` when they would pass
/// its quota.
pub async fn check(app: &App, repo: &str, adding: u64) -> Result<()> {
    let registry = repo.split('/').next().unwrap_or(repo);
    let Some(limit) = app.store.registry(registry).and_then(|r| r.quota_bytes) else {
        return Ok(());
    };
    let used = app.store.meta.registry_usage(registry).await?.bytes;
    if used.saturating_add(adding) <= limit {
        return Ok(());
    }
    tracing::warn!(%repo, used, adding, limit, "push refused: past the registry's storage quota");
    Err(Error::Denied(format!(
        "registry {registry} is over its storage quota: {used} bytes stored + {adding} bytes pushed > {limit} bytes allowed (delete images, or raise quota_bytes)"
    )))
}
