//! Request plumbing shared by every behaviour: the parts of a request handlers read, small
//! response builders, and bounded reads of whole request bodies.

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode};
use hyper::body::Incoming;

use super::body::Body;
use crate::auth::Principal;
use crate::error::{Error, Result};
use crate::store::meta::RegistryRecord;

/// A request's parts that handlers read.
pub struct Req<'a> {
    /// Method.
    pub method: &'a Method,
    /// Raw query string.
    pub query: Option<&'a str>,
    /// Headers.
    pub headers: &'a HeaderMap,
    /// Who is asking.
    pub principal: &'a Principal,
    /// Whether the request came through a public listener (hides `public_uri = false` registries).
    pub public: bool,
}

impl Req<'_> {
    /// Refuses registries hidden from public listeners as if they did not exist.
    pub fn visible(&self, registry: &RegistryRecord) -> Result<()> {
        if self.shows(registry) {
            Ok(())
        } else {
            Err(no_such_registry(&registry.name))
        }
    }

    /// Whether this request's listener shows the registry.
    pub fn shows(&self, registry: &RegistryRecord) -> bool {
        shown(self.public, registry)
    }
}

/// Whether a listener (public or private) shows a registry: public listeners hide registries
/// created with `public_uri = false`.
pub fn shown(public: bool, registry: &RegistryRecord) -> bool {
    !public || registry.public_uri
}

/// The error for a registry that does not exist, or is hidden from the caller's listener:
/// the same text either way, so the answer tells nothing about hidden registries.
pub fn no_such_registry(name: &str) -> Error {
    Error::NameUnknown(format!(
        "registry {name:?} does not exist (create it with `berth registry create {name}`)"
    ))
}

/// A JSON response.
pub fn json_response(status: StatusCode, body: String) -> Response<Body> {
    let mut r = Response::new(Body::full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// An empty response with a status.
pub fn empty(status: StatusCode) -> Response<Body> {
    let mut r = Response::new(Body::Empty);
    *r.status_mut() = status;
    r.headers_mut()
        .insert(http::header::CONTENT_LENGTH, HeaderValue::from_static("0"));
    r
}

/// Sets a header from text known to be a valid header value (paths, digests, numbers).
pub fn set(r: &mut Response<Body>, name: impl http::header::IntoHeaderName, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        r.headers_mut().insert(name, v);
    }
}

/// A request body: hyper's `Incoming` from a connection, or bytes in memory (the CLI calls the
/// management API in-process on a data directory).
pub trait RequestBody: http_body::Body<Data = Bytes, Error = Self::Failure> + Unpin + Send {
    /// The body's error.
    type Failure: std::fmt::Display;
}

impl RequestBody for Incoming {
    type Failure = hyper::Error;
}

impl RequestBody for http_body_util::Full<Bytes> {
    type Failure = std::convert::Infallible;
}

/// Reads a whole request body of at most `limit` bytes (manifests, JSON, forms); a longer one
/// is refused as soon as it passes the limit, without reading the rest.
pub async fn read_limited(body: impl RequestBody, limit: usize) -> Result<Bytes> {
    let mut body = body;
    let mut buf = BytesMut::new();
    while let Some(frame) = crate::http::body::next_frame(&mut body).await {
        let frame = frame.map_err(|e| Error::ManifestInvalid(e.to_string()))?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > limit {
                return Err(Error::ManifestTooLarge {
                    size: (buf.len() + data.len()) as u64,
                    limit,
                });
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.freeze())
}
