//! Blob deletion in origin registries (reads are served by `serve::blobs`).

use http::{Response, StatusCode};

use super::empty;
use crate::error::{Error, Result};
use crate::http::body::Body;
use crate::oci::digest::Digest;
use crate::oci::reference::RepoName;
use crate::App;

/// `DELETE /v2/NAME/blobs/DIGEST`: unlinks the blob from the repository; bytes no repository
/// links any more are removed by garbage collection.
pub async fn delete(app: &App, repo: &RepoName, digest: &str) -> Result<Response<Body>> {
    let digest = Digest::parse(digest)?;
    if !app.store.meta.unlink_blob(repo.as_str(), &digest).await? {
        return Err(Error::BlobUnknown(format!("{digest} is not in {repo}")));
    }
    app.store.meta.flush().await?;
    Ok(empty(StatusCode::ACCEPTED))
}
