//! `GET /api/v1/backup` and `GET /api/v1/backup/blobs/{digest}` (admin): a backup's lines page
//! by page, and the blobs they name, read while the server runs (`berth backup DIR`).

use http::{Response, StatusCode};

use super::{json, Ctx};
use crate::auth::Action;
use crate::backup::export;
use crate::error::{Error, Result};
use crate::http::body::Body;
use crate::oci::digest::Digest;

/// Lines per page when the caller names no limit, and the most it may ask for.
const PAGE: usize = 1000;
const MAX_PAGE: usize = 10_000;

/// `GET /api/v1/backup?cursor=C&limit=N`.
pub async fn lines(ctx: &Ctx<'_>) -> Result<Response<Body>> {
    ctx.check(Action::Manage(None))?;
    let limit = match ctx.query("limit") {
        None => PAGE,
        Some(n) => n
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_PAGE).contains(n))
            .ok_or_else(|| {
                Error::BadRequest(format!(
                    "limit {n:?}: a number of lines from 1 to {MAX_PAGE}"
                ))
            })?,
    };
    let cursor = ctx.query("cursor");
    let page = export::page(&*ctx.app.store.meta, cursor.as_deref(), limit)
        .await
        .map_err(|e| Error::BadRequest(e.to_string()))??;
    json(StatusCode::OK, &page)
}

/// `GET /api/v1/backup/blobs/{digest}`: any blob of the store, whatever links it (the backup
/// copies each once); not a pull (no pull time is recorded).
pub async fn blob(ctx: &Ctx<'_>, digest: &str) -> Result<Response<Body>> {
    ctx.check(Action::Manage(None))?;
    let digest = Digest::parse(digest)?;
    let unknown = || Error::BlobUnknown(format!("{digest} is not in the store"));
    crate::serve::blobs::stored(ctx.app, &digest, &ctx.req, false, unknown).await
}
