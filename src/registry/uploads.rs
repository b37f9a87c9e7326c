//! Blob uploads: monolithic, POST+PUT, chunked PATCH with `Content-Range`, status, cancel, mount.

use crate::http::req::RequestBody;
use http::{header, Response, StatusCode};

use super::quota;
use super::receive::receive;
use super::{empty, set, Req};
use crate::error::{Error, Result};
use crate::http::body::Body;
use crate::http::router::query_param;
use crate::oci::digest::{Digest, Verifier};
use crate::oci::reference::RepoName;
use crate::store::blobs::{hash_read, HashingWrite, Pending};
use crate::store::uploads::{Caps, CreateError, Session, SessionRef};
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
    body: impl RequestBody,
    lender: Option<&RepoName>,
) -> Result<Response<Body>> {
    if let Some(mount) = query_param(req.query, "mount") {
        let digest = Digest::parse(&mount)?;
        if let Some(from) = lender {
            if let Some(size) = app.store.meta.blob_link(from.as_str(), &digest).await? {
                quota::check(app, repo.as_str(), size).await?;
                app.store
                    .meta
                    .link_blob(repo.as_str(), &digest, size)
                    .await?;
                app.store.meta.flush().await?;
                tracing::debug!(%repo, %digest, %from, "blob mounted");
                return Ok(created(repo, &digest));
            }
        }
    }
    if let Some(digest) = query_param(req.query, "digest") {
        let digest = Digest::parse(&digest)?;
        let length = content_length(req)?;
        // Refused before a byte is read when the length says so.
        quota::check(app, repo.as_str(), length.unwrap_or(0)).await?;
        let (write, _) = app
            .store
            .blobs
            .open_pending(&Pending::Temp(uuid::Uuid::new_v4()))
            .await?;
        let key = write.key().clone();
        let writer = HashingWrite::new(write, Verifier::new(digest.algorithm()));
        let (writer, outcome) = receive(body, writer, length).await;
        let checked = match (&writer, outcome) {
            (Some(w), Ok(())) => check_monolithic(w, length, &digest),
            (_, Err(e)) => Err(e),
            (None, Ok(())) => Err(Error::Internal("blob writer lost".into())),
        };
        let writer = match (writer, checked) {
            (Some(w), Ok(())) => w,
            (writer, checked) => {
                // Whatever went wrong, the bytes go at once (a full disk must not fill further).
                discard(app, writer, &key).await;
                return Err(checked
                    .err()
                    .unwrap_or_else(|| Error::Internal("blob writer lost".into())));
            }
        };
        let size = writer.written();
        if length.is_none() {
            if let Err(e) = quota::check(app, repo.as_str(), size).await {
                discard(app, Some(writer), &key).await;
                return Err(e);
            }
        }
        // Held from commit to link: a collection never deletes the blob in between.
        let _hold = app.store.gate.hold(&digest).await;
        if let Err(e) = writer.inner.commit(&digest).await {
            discard(app, None, &key).await;
            return Err(e.into());
        }
        app.store
            .meta
            .link_blob(repo.as_str(), &digest, size)
            .await?;
        app.store.meta.flush().await?;
        return Ok(created(repo, &digest));
    }
    let limits = &app.config.limits;
    let caps = Caps {
        total: limits.max_uploads,
        per_repository: limits.max_uploads_per_repository,
        expiry: limits.upload_expiry,
    };
    let session = match app.store.uploads.create(repo.as_str(), caps).await {
        Ok(s) => s,
        Err(CreateError::TooMany(message)) => {
            tracing::warn!(%repo, reason = %message, "upload session refused");
            return Err(Error::TooManyRequests {
                message,
                retry_after: None,
            });
        }
        Err(CreateError::Io(e)) => return Err(e.into()),
    };
    let mut s = session.lock().await;
    let id = s.id.clone();
    if !body.is_end_stream() {
        append(app, &mut s, body, None, content_length(req)?).await?;
    }
    Ok(session_response(
        StatusCode::ACCEPTED,
        repo,
        &id,
        s.offset(),
    ))
}

/// Checks a monolithic body against its announced length and digest.
fn check_monolithic(writer: &HashingWrite, length: Option<u64>, digest: &Digest) -> Result<()> {
    let size = writer.written();
    if let Some(length) = length.filter(|&l| l != size) {
        return Err(Error::SizeInvalid(format!(
            "body has {size} bytes, Content-Length said {length}"
        )));
    }
    let actual = writer.verifier.current();
    if actual != *digest {
        return Err(Error::DigestInvalid(format!(
            "uploaded content has digest {actual}, not {digest}"
        )));
    }
    Ok(())
}

/// Removes a failed one-shot write's bytes.
async fn discard(app: &App, writer: Option<HashingWrite>, key: &Pending) {
    let removed = match writer {
        Some(w) => w.inner.abort().await,
        None => app.store.blobs.remove_pending(key).await.map(drop),
    };
    if let Err(e) = removed {
        tracing::warn!(?key, error = %e, "could not remove a failed upload's bytes");
    }
}

async fn session(app: &App, repo: &RepoName, id: &str) -> Result<SessionRef> {
    let Some(session) = app.store.uploads.get(id).await? else {
        return Err(Error::BlobUploadUnknown(format!(
            "upload {id} does not exist in {repo}"
        )));
    };
    let known = {
        let s = session.lock().await;
        s.repo == repo.as_str() && !s.is_gone()
    };
    if !known {
        return Err(Error::BlobUploadUnknown(format!(
            "upload {id} does not exist in {repo}"
        )));
    }
    Ok(session)
}

fn gone(s: &Session) -> Error {
    Error::BlobUploadUnknown(format!("upload {} was completed or cancelled", s.id))
}

/// Appends a body to a locked session, then saves its state. A chunk with `Content-Range` must
/// start at the session's offset (else 416) and is all or nothing: unless exactly the announced
/// bytes arrive, the session returns to where it stood. A chunk without one keeps every byte
/// that arrived. Either way a storage failure (a full disk) leaves the session at its last good
/// offset, so the client can resume from there.
async fn append(
    app: &App,
    s: &mut Session,
    body: impl RequestBody,
    range: Option<(u64, u64)>,
    length: Option<u64>,
) -> Result<()> {
    let offset = s.offset();
    let mut expect = length;
    if let Some((start, end)) = range {
        if start != offset {
            return Err(Error::RangeNotSatisfiable {
                message: format!("chunk starts at {start} but the upload has {offset} bytes"),
                header: (header::RANGE, range_value(offset)),
            });
        }
        expect = Some(end - start + 1);
    }
    // The session's bytes and this chunk's, before a byte of it is read when its length is known.
    quota::check(app, &s.repo, offset + expect.unwrap_or(0)).await?;
    let before = s.progress().cloned().ok_or_else(|| gone(s))?;
    let writer = s.take_writer().await?.ok_or_else(|| gone(s))?;
    let (writer, outcome) = receive(body, writer, expect).await;
    let Some(writer) = writer else {
        // A write task panicked with the hasher state: the session cannot go on.
        app.store.uploads.remove(s).await?;
        return outcome;
    };
    let got = writer.written() - offset;
    let outcome = match (outcome, range) {
        (Ok(()), Some((start, end))) if Some(got) != expect => {
            Err(Error::BlobUploadInvalid(format!(
                "Content-Range {start}-{end} announced {} bytes but the body had {got}",
                end - start + 1
            )))
        }
        (Err(Error::SizeInvalid(_)), Some((start, end))) => Err(Error::BlobUploadInvalid(format!(
            "the body has more bytes than Content-Range {start}-{end} announced"
        ))),
        (outcome, _) => outcome,
    };
    if range.is_some() && outcome.is_err() {
        s.roll_back(writer, before).await?;
        tracing::info!(upload = %s.id, offset, "chunk discarded, the upload stays at its offset");
    } else {
        s.put_back(writer).await?;
    }
    outcome
}

/// `PATCH /v2/NAME/blobs/uploads/ID`.
pub async fn patch(
    app: &App,
    repo: &RepoName,
    id: &str,
    req: &Req<'_>,
    body: impl RequestBody,
) -> Result<Response<Body>> {
    let session = session(app, repo, id).await?;
    let range = content_range(req)?;
    let length = content_length(req)?;
    if let (Some((start, end)), Some(len)) = (range, length) {
        if len != end - start + 1 {
            return Err(Error::BlobUploadInvalid(format!(
                "Content-Range {start}-{end} does not match Content-Length {len}"
            )));
        }
    }
    let mut s = session.lock().await;
    append(app, &mut s, body, range, length).await?;
    Ok(session_response(StatusCode::ACCEPTED, repo, id, s.offset()))
}

/// `PUT /v2/NAME/blobs/uploads/ID?digest=`: last chunk (optional, with or without a length),
/// verify, commit.
pub async fn finish(
    app: &App,
    repo: &RepoName,
    id: &str,
    req: &Req<'_>,
    body: impl RequestBody,
) -> Result<Response<Body>> {
    let digest = query_param(req.query, "digest")
        .ok_or_else(|| Error::DigestInvalid("PUT to an upload needs ?digest=".into()))?;
    let digest = Digest::parse(&digest)?;
    let session = session(app, repo, id).await?;
    let mut s = session.lock().await;
    if s.is_gone() {
        return Err(gone(&s));
    }
    let range = content_range(req)?;
    if range.is_some() || !body.is_end_stream() {
        append(app, &mut s, body, range, content_length(req)?).await?;
    }
    let progress = s.progress().cloned().ok_or_else(|| gone(&s))?;
    let size = progress.written;
    let actual = if progress.verifier.algorithm() == digest.algorithm() {
        progress.verifier.current()
    } else {
        // Rare: a digest algorithm other than the session's; hash the bytes once more.
        let read = app
            .store
            .blobs
            .read_pending(s.key(), 0, Some(size))
            .await?
            .ok_or_else(|| gone(&s))?;
        hash_read(read, Verifier::new(digest.algorithm()))
            .await?
            .finish()
    };
    if actual != digest {
        app.store.uploads.remove(&mut s).await?;
        return Err(Error::DigestInvalid(format!(
            "uploaded content has digest {actual}, not {digest}; the upload was discarded"
        )));
    }
    // Past the quota (a chunk without a length took it there): the session stays, complete,
    // for a PUT after space is freed.
    quota::check(app, repo.as_str(), size).await?;
    // Held from commit to link: a collection never deletes the blob in between.
    let _hold = app.store.gate.hold(&digest).await;
    // Not committed (a full disk at fsync): the session stays, complete, for another PUT.
    app.store.uploads.commit(&mut s, &digest).await?;
    app.store
        .meta
        .link_blob(repo.as_str(), &digest, size)
        .await?;
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
    let mut s = session.lock().await;
    if s.is_gone() {
        return Err(gone(&s));
    }
    app.store.uploads.remove(&mut s).await?;
    Ok(empty(StatusCode::NO_CONTENT))
}
