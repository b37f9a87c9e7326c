//! Blob reads from the store: `GET`/`HEAD` with `Range`, for origin and cache registries alike.

use http::{header, HeaderValue, Response, StatusCode};

use crate::error::{Error, Result};
use crate::http::body::Body;
use crate::http::req::{set, Req};
use crate::oci::digest::Digest;
use crate::oci::reference::RepoName;
use crate::store::blobs::BlobRead;
use crate::App;

/// A byte range `[start, start+len)` asked for by a `Range` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    /// First byte.
    pub start: u64,
    /// Number of bytes.
    pub len: u64,
}

/// Parses `Range: bytes=…` against a size. `Ok(None)`: serve the whole blob (no header, or a
/// form berth ignores as RFC 9110 allows: multiple ranges, other units, bad syntax).
pub fn parse_range(header: Option<&HeaderValue>, size: u64) -> Result<Option<ByteRange>> {
    let Some(spec) = header
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.trim().strip_prefix("bytes="))
    else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return Ok(None);
    };
    let unsatisfiable = || Error::RangeNotSatisfiable {
        message: format!("range {spec:?} is outside the blob of {size} bytes"),
        header: (header::CONTENT_RANGE, format!("bytes */{size}")),
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit());
    let range = match (a.parse::<u64>().ok(), b.parse::<u64>().ok()) {
        (Some(start), end) if digits(a) && (b.is_empty() || end.is_some()) => {
            if start >= size {
                return Err(unsatisfiable());
            }
            let last = end.unwrap_or(u64::MAX).min(size - 1);
            if last < start {
                return Ok(None);
            }
            ByteRange {
                start,
                len: last - start + 1,
            }
        }
        (None, Some(suffix)) if a.is_empty() => {
            if suffix == 0 || size == 0 {
                return Err(unsatisfiable());
            }
            let len = suffix.min(size);
            ByteRange {
                start: size - len,
                len,
            }
        }
        _ => return Ok(None),
    };
    Ok(Some(range))
}

/// `GET`/`HEAD /v2/NAME/blobs/DIGEST`.
pub async fn get(
    app: &App,
    repo: &RepoName,
    digest: &str,
    req: &Req<'_>,
    head: bool,
) -> Result<Response<Body>> {
    let digest = Digest::parse(digest)?;
    if app
        .store
        .meta
        .blob_link(repo.as_str(), &digest)
        .await?
        .is_none()
    {
        return Err(Error::BlobUnknown(format!("{digest} is not in {repo}")));
    }
    let missing = || {
        tracing::error!(%repo, %digest, "blob linked but missing from the store");
        Error::BlobUnknown(format!("{digest} is not in {repo}"))
    };
    stored(app, &digest, req, head, missing).await
}

/// The response for a blob of the store, whoever checked that the caller may read it (`Range`
/// served, a redirect passed on); `missing` is the error when the store lacks it.
pub async fn stored(
    app: &App,
    digest: &Digest,
    req: &Req<'_>,
    head: bool,
    missing: impl Fn() -> Error,
) -> Result<Response<Body>> {
    let read = app
        .store
        .blobs
        .read(digest, 0, None)
        .await?
        .ok_or_else(&missing)?;
    let size = match &read {
        BlobRead::Local(region) => region.len(),
        BlobRead::Stream { len, .. } => *len,
        BlobRead::Redirect { url, len } => return Ok(redirect(url, *len, digest, head)),
    };
    let range = parse_range(req.headers.get(header::RANGE), size)?;
    let (start, len) = range.map_or((0, size), |r| (r.start, r.len));
    let body = if head || len == 0 {
        Body::Empty
    } else {
        match read {
            BlobRead::Local(region) => Body::file(region.span(start, len)),
            BlobRead::Stream { len: all, bytes } if len == all => Body::stream(bytes, len),
            _ => match app.store.blobs.read(digest, start, Some(len)).await? {
                Some(BlobRead::Local(region)) => Body::file(region),
                Some(BlobRead::Stream { bytes, .. }) => Body::stream(bytes, len),
                Some(BlobRead::Redirect { url, len }) => {
                    return Ok(redirect(&url, len, digest, head))
                }
                None => return Err(missing()),
            },
        }
    };
    Ok(blob_response(body, digest, size, range))
}

/// A blob the backend hands out at a URL of its own (a presigned object-storage URL): the
/// client fetches it there, as distribution's redirect mode does.
fn redirect(url: &str, len: u64, digest: &Digest, head: bool) -> Response<Body> {
    if !head {
        crate::metrics::blob_bytes_redirected(len);
    }
    let mut r = Response::new(Body::Empty);
    *r.status_mut() = StatusCode::TEMPORARY_REDIRECT;
    set(&mut r, header::LOCATION, url);
    set(&mut r, "docker-content-digest", digest.as_str());
    r
}

/// A blob response: status (200/206) and headers for `range` of a blob of `size` bytes.
pub fn blob_response(
    body: Body,
    digest: &Digest,
    size: u64,
    range: Option<ByteRange>,
) -> Response<Body> {
    let (status, start, len) = match range {
        Some(r) => (StatusCode::PARTIAL_CONTENT, r.start, r.len),
        None => (StatusCode::OK, 0, size),
    };
    let mut r = Response::new(body);
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    set(&mut r, "docker-content-digest", digest.as_str());
    set(&mut r, header::ETAG, &format!("\"{digest}\""));
    set(&mut r, header::CACHE_CONTROL, "max-age=31536000");
    if range.is_some() {
        set(
            &mut r,
            header::CONTENT_RANGE,
            &format!("bytes {}-{}/{}", start, start + len - 1, size),
        );
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str, size: u64) -> Result<Option<ByteRange>> {
        parse_range(Some(&HeaderValue::from_str(s).unwrap()), size)
    }

    #[test]
    fn ranges() {
        assert_eq!(
            r("bytes=0-9", 100).unwrap(),
            Some(ByteRange { start: 0, len: 10 })
        );
        assert_eq!(
            r("bytes=90-", 100).unwrap(),
            Some(ByteRange { start: 90, len: 10 })
        );
        assert_eq!(
            r("bytes=90-500", 100).unwrap(),
            Some(ByteRange { start: 90, len: 10 })
        );
        assert_eq!(
            r("bytes=-10", 100).unwrap(),
            Some(ByteRange { start: 90, len: 10 })
        );
        assert_eq!(
            r("bytes=-500", 100).unwrap(),
            Some(ByteRange { start: 0, len: 100 })
        );
        assert!(r("bytes=100-", 100).is_err());
        assert!(r("bytes=-0", 100).is_err());
        assert_eq!(r("bytes=0-1,5-6", 100).unwrap(), None);
        assert_eq!(r("items=0-1", 100).unwrap(), None);
        assert_eq!(r("bytes=5-1", 100).unwrap(), None);
        assert_eq!(r("bytes=x-1", 100).unwrap(), None);
    }
}
