//! Blob uploads: monolithic, POST+PUT, chunked PATCH with `Content-Range`, status, cancel, mount.

use http::{header, Response, StatusCode};
use hyper::body::Incoming;

use super::receive::receive;
use super::{empty, set, Req};
use crate::error::{Error, Result};
use crate::http::body::Body;
use crate::http::router::query_param;
use crate::oci::digest::{Digest, Verifier};
use crate::oci::reference::RepoName;
use crate::store::uploads::{hash_file, SessionRef};
use crate::App;

fn location(repo: &RepoName, id: &str) -> String {
    format!("/v2/{repo}/blobs/uploads/{id}")
}

/// `Range` header value for `offset` bytes received (`0-0` when empty, as clients expect).
fn range_value(offset: u64) -> String {
    format!("0-{}", offset.saturating_sub(1))
}

fn session_response(status: StatusCode, repo: &RepoName, id: &str, offset: u64) -> Response<Body> {
    let mut r = empty(status);
    set(&mut r, header::LOCATION, &location(repo, id));
    set(&mut r, header::RANGE, &range_value(offset));
    set(&mut r, "docker-upload-uuid", id);
    r
}

fn created(repo: &RepoName, digest: &Digest) -> Response<Body> {
    let mut r = empty(StatusCode::CREATED);
    set(
        &mut r,
        header::LOCATION,
        &format!("/v2/{repo}/blobs/{digest}"),
    );
    set(&mut r, "docker-content-digest", digest.as_str());
    r
}

fn content_length(req: &Req<'_>) -> Result<Option<u64>> {
    req.headers
        .get(header::CONTENT_LENGTH)
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| Error::BadRequest("Content-Length is not a number".into()))
        })
        .transpose()
}

/// Parses `Content-Range: START-END` (also with a `bytes ` or `bytes=` prefix).
fn content_range(req: &Req<'_>) -> Result<Option<(u64, u64)>> {
    let Some(v) = req.headers.get(header::CONTENT_RANGE) else {
        return Ok(None);
    };
    let text = v.to_str().unwrap_or("");
    let spec = text
        .trim()
        .trim_start_matches("bytes")
        .trim_start_matches(['=', ' ']);
    let spec = spec.split('/').next().unwrap_or("");
    let parsed = spec
        .split_once('-')
        .and_then(|(a, b)| Some((a.trim().parse::<u64>().ok()?, b.trim().parse::<u64>().ok()?)));
    match parsed {
        Some((start, end)) if end >= start => Ok(Some((start, end))),
        _ => Err(Error::BlobUploadInvalid(format!(
            "malformed Content-Range {text:?}"
        ))),
    }
}

/// `POST /v2/NAME/blobs/uploads/`: mount, monolithic upload, or a new session. `lender` is
/// the repository of `?from=` when the caller may pull it (the dispatcher decides); without
/// one, a mount request gets a session as if the blob existed nowhere.
pub async fn start(
    app: &App,
    repo: &RepoName,
    req: &Req<'_>,
    body: Incoming,
    lender: Option<&RepoName>,
) -> Result<Response<Body>> {
    if let Some(mount) = query_param(req.query, "mount") {
        let digest = Digest::parse(&mount)?;
        if let Some(from) = lender {
            if let Some(size) = app.store.meta.blob_link(from.as_str(), &digest)? {
                app.store.meta.link_blob(repo.as_str(), &digest, size)?;
                app.store.meta.flush().await?;
                tracing::debug!(%repo, %digest, %from, "blob mounted");
                return Ok(created(repo, &digest));
            }
        }
    }
    if let Some(digest) = query_param(req.query, "digest") {
        let digest = Digest::parse(&digest)?;
        let writer = app.store.blobs.writer(Verifier::new(digest.algorithm()))?;
        let (writer, outcome) = receive(body, writer, content_length(req)?).await;
        let writer = writer.ok_or_else(|| Error::Internal("blob writer lost".into()))?;
        if let Err(e) = outcome {
            let _ = std::fs::remove_file(&writer.path);
            return Err(e);
        }
        let size = writer.written;
        let actual = writer.verifier.current();
        if actual != digest {
            let _ = std::fs::remove_file(&writer.path);
            return Err(Error::DigestInvalid(format!(
                "uploaded content has digest {actual}, not {digest}"
            )));
        }
        let blobs = app.store.blobs.clone();
        let d = digest.clone();
        tokio::task::spawn_blocking(move || blobs.commit(writer, &d))
            .await
            .map_err(|e| Error::Internal(e.to_string()))??;
        app.store.meta.link_blob(repo.as_str(), &digest, size)?;
        app.store.meta.flush().await?;
        return Ok(created(repo, &digest));
    }
    let session = app.store.uploads.create(repo.as_str())?;
    let mut s = session.lock().await;
    let id = s.id.clone();
    if content_length(req)?.unwrap_or(0) > 0 {
        append(app, &mut s, body, None).await?;
    }
    Ok(session_response(
        StatusCode::ACCEPTED,
        repo,
        &id,
        s.offset(),
    ))
}

async fn session(app: &App, repo: &RepoName, id: &str) -> Result<SessionRef> {
    let Some(session) = app.store.uploads.get(id)? else {
        return Err(Error::BlobUploadUnknown(format!(
            "upload {id} does not exist in {repo}"
        )));
    };
    if session.lock().await.repo != repo.as_str() {
        return Err(Error::BlobUploadUnknown(format!(
            "upload {id} does not exist in {repo}"
        )));
    }
    Ok(session)
}

/// Appends a body to a locked session, enforcing `Content-Range` order, then saves its state.
async fn append(
    app: &App,
    s: &mut crate::store::uploads::Session,
    body: Incoming,
    range: Option<(u64, u64)>,
) -> Result<()> {
    let offset = s.offset();
    let mut limit = None;
    if let Some((start, end)) = range {
        if start != offset {
            return Err(Error::RangeNotSatisfiable {
                message: format!("chunk starts at {start} but the upload has {offset} bytes"),
                header: (header::RANGE, range_value(offset)),
            });
        }
        limit = Some(end - start + 1);
    }
    let writer = s
        .writer
        .take()
        .ok_or_else(|| Error::BlobUploadUnknown(format!("upload {} already completed", s.id)))?;
    let (writer, outcome) = receive(body, writer, limit).await;
    match writer {
        Some(w) => {
            s.writer = Some(w);
            s.save()?;
        }
        None => {
            let id = s.id.clone();
            app.store.uploads.remove(&id)?;
        }
    }
    outcome
}

/// `PATCH /v2/NAME/blobs/uploads/ID`.
pub async fn patch(
    app: &App,
    repo: &RepoName,
    id: &str,
    req: &Req<'_>,
    body: Incoming,
) -> Result<Response<Body>> {
    let session = session(app, repo, id).await?;
    let range = content_range(req)?;
    if let (Some((start, end)), Some(len)) = (range, content_length(req)?) {
        if len != end - start + 1 {
            return Err(Error::BlobUploadInvalid(format!(
                "Content-Range {start}-{end} does not match Content-Length {len}"
            )));
        }
    }
    let mut s = session.lock().await;
    append(app, &mut s, body, range).await?;
    Ok(session_response(StatusCode::ACCEPTED, repo, id, s.offset()))
}

/// `PUT /v2/NAME/blobs/uploads/ID?digest=`: last chunk (optional), verify, commit.
pub async fn finish(
    app: &App,
    repo: &RepoName,
    id: &str,
    req: &Req<'_>,
    body: Incoming,
) -> Result<Response<Body>> {
    let digest = query_param(req.query, "digest")
        .ok_or_else(|| Error::DigestInvalid("PUT to an upload needs ?digest=".into()))?;
    let digest = Digest::parse(&digest)?;
    let session = session(app, repo, id).await?;
    let mut s = session.lock().await;
    let range = content_range(req)?;
    if range.is_some() || content_length(req)?.unwrap_or(0) > 0 {
        append(app, &mut s, body, range).await?;
    }
    let writer = s
        .writer
        .take()
        .ok_or_else(|| Error::BlobUploadUnknown(format!("upload {} already completed", s.id)))?;
    let size = writer.written;
    let actual = if writer.verifier.algorithm() == digest.algorithm() {
        writer.verifier.current()
    } else {
        // Rare: a digest algorithm other than the session's; hash the file once more.
        let path = writer.path.clone();
        let algo = digest.algorithm();
        tokio::task::spawn_blocking(move || hash_file(&path, algo).map(Verifier::finish))
            .await
            .map_err(|e| Error::Internal(e.to_string()))??
    };
    if actual != digest {
        drop(writer);
        app.store.uploads.remove(id)?;
        return Err(Error::DigestInvalid(format!(
            "uploaded content has digest {actual}, not {digest}; the upload was discarded"
        )));
    }
    let fs = app.store.fs.clone();
    let d = digest.clone();
    tokio::task::spawn_blocking(move || fs.commit_file(&writer.file, &writer.path, &d))
        .await
        .map_err(|e| Error::Internal(e.to_string()))??;
    app.store.uploads.remove(id)?;
    app.store.meta.link_blob(repo.as_str(), &digest, size)?;
    app.store.meta.flush().await?;
    Ok(created(repo, &digest))
}

/// `GET /v2/NAME/blobs/uploads/ID`: 204 with the current `Range`.
pub async fn status(app: &App, repo: &RepoName, id: &str) -> Result<Response<Body>> {
    let session = session(app, repo, id).await?;
    let offset = session.lock().await.offset();
    Ok(session_response(StatusCode::NO_CONTENT, repo, id, offset))
}

/// `DELETE /v2/NAME/blobs/uploads/ID`.
pub async fn cancel(app: &App, repo: &RepoName, id: &str) -> Result<Response<Body>> {
    let session = session(app, repo, id).await?;
    let _held = session.lock().await;
    app.store.uploads.remove(id)?;
    Ok(empty(StatusCode::NO_CONTENT))
}
