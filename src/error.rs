//! The one error type of request handling and the single place that maps it to an OCI code and HTTP status.

use http::StatusCode;

use crate::oci::digest::DigestError;
use crate::oci::manifest::ManifestError;
use crate::oci::reference::ReferenceError;

/// Everything a request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Blob not in the repository.
    #[error("blob unknown to registry: {0}")]
    BlobUnknown(String),
    /// Upload session not found (or belongs to another repository).
    #[error("upload session unknown: {0}")]
    BlobUploadUnknown(String),
    /// Upload request malformed.
    #[error("blob upload invalid: {0}")]
    BlobUploadInvalid(String),
    /// Digest malformed or content does not match it.
    #[error("{0}")]
    DigestInvalid(String),
    /// Manifest references a blob or manifest the repository lacks.
    #[error("manifest references unknown blob {0}")]
    ManifestBlobUnknown(String),
    /// Manifest body rejected.
    #[error("manifest invalid: {0}")]
    ManifestInvalid(String),
    /// Manifest bigger than the limit.
    #[error("manifest of {size} bytes exceeds the limit of {limit} bytes")]
    ManifestTooLarge {
        /// Bytes received (or announced).
        size: u64,
        /// The limit.
        limit: usize,
    },
    /// Manifest (tag or digest) not found.
    #[error("manifest unknown: {0}")]
    ManifestUnknown(String),
    /// Name breaks the grammar, or the path is malformed.
    #[error("{0}")]
    NameInvalid(String),
    /// Registry or repository not known.
    #[error("{0}")]
    NameUnknown(String),
    /// Content length does not match.
    #[error("{0}")]
    SizeInvalid(String),
    /// Tag grammar.
    #[error("{0}")]
    TagInvalid(String),
    /// `n` or `last` unusable.
    #[error("{0}")]
    PaginationInvalid(String),
    /// Chunk out of order or byte range not satisfiable; carries the header to send.
    #[error("requested range not satisfiable: {message}")]
    RangeNotSatisfiable {
        /// What was asked and what there is.
        message: String,
        /// `Range` (uploads) or `Content-Range` (blob reads) header to return.
        header: (http::HeaderName, String),
    },
    /// Operation not allowed on this resource.
    #[error("{0}")]
    Denied(String),
    /// A protection policy forbids the change (412, code `DENIED`): the message names it.
    #[error("{0}")]
    Protected(String),
    /// Credentials missing or not accepted, or a token without the needed scope; answered with a
    /// `WWW-Authenticate` challenge (built by the HTTP layer, which knows the host).
    #[error("{message}")]
    Unauthorized {
        /// Why.
        message: String,
        /// Scope the challenge should ask for.
        scope: Option<String>,
        /// A valid token lacked the scope (`error="insufficient_scope"`).
        insufficient: bool,
    },
    /// The resource exists already, or the change conflicts with its state.
    #[error("{0}")]
    Conflict(String),
    /// Operation not supported.
    #[error("{0}")]
    Unsupported(String),
    /// No route.
    #[error("{0}")]
    NotFound(String),
    /// Request headers or body not acceptable.
    #[error("{0}")]
    BadRequest(String),
    /// Method not allowed on this route.
    #[error("method {0} not allowed here")]
    MethodNotAllowed(String),
    /// The source registry failed and nothing usable is cached.
    #[error("{0}")]
    Upstream(String),
    /// The source is rate limiting and nothing usable is cached.
    #[error("{message}")]
    TooManyRequests {
        /// Why.
        message: String,
        /// When to try again (`Retry-After`).
        retry_after: Option<std::time::Duration>,
    },
    /// Storage or metadata failure.
    #[error("storage error: {0}")]
    Io(std::io::Error),
    /// The data volume is full (ENOSPC); the message names the path being written.
    #[error("insufficient storage: {0}")]
    StorageFull(String),
    /// Metadata store failure.
    #[error("metadata error: {0}")]
    Meta(#[from] crate::store::meta::MetaError),
    /// A broken invariant that is berth's fault.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Result of request handling.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// OCI error code.
    pub fn code(&self) -> &'static str {
        match self {
            Error::BlobUnknown(_) => "BLOB_UNKNOWN",
            Error::BlobUploadUnknown(_) => "BLOB_UPLOAD_UNKNOWN",
            Error::BlobUploadInvalid(_) | Error::RangeNotSatisfiable { .. } => {
                "BLOB_UPLOAD_INVALID"
            }
            Error::DigestInvalid(_) => "DIGEST_INVALID",
            Error::ManifestBlobUnknown(_) => "MANIFEST_BLOB_UNKNOWN",
            Error::ManifestInvalid(_) | Error::ManifestTooLarge { .. } => "MANIFEST_INVALID",
            Error::ManifestUnknown(_) => "MANIFEST_UNKNOWN",
            Error::NameInvalid(_) => "NAME_INVALID",
            Error::NameUnknown(_) | Error::NotFound(_) => "NAME_UNKNOWN",
            Error::SizeInvalid(_) => "SIZE_INVALID",
            Error::TagInvalid(_) => "TAG_INVALID",
            Error::PaginationInvalid(_) => "PAGINATION_NUMBER_INVALID",
            Error::Denied(_) | Error::Protected(_) => "DENIED",
            Error::Unauthorized {
                insufficient: true, ..
            } => "DENIED",
            Error::Unauthorized { .. } => "UNAUTHORIZED",
            Error::Conflict(_) => "CONFLICT",
            Error::Unsupported(_) | Error::MethodNotAllowed(_) | Error::BadRequest(_) => {
                "UNSUPPORTED"
            }
            Error::TooManyRequests { .. } => "TOOMANYREQUESTS",
            Error::Upstream(_)
            | Error::Io(_)
            | Error::StorageFull(_)
            | Error::Meta(_)
            | Error::Internal(_) => "UNKNOWN",
        }
    }

    /// HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            Error::BlobUnknown(_)
            | Error::BlobUploadUnknown(_)
            | Error::ManifestUnknown(_)
            | Error::NameUnknown(_)
            | Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::BlobUploadInvalid(_)
            | Error::DigestInvalid(_)
            | Error::ManifestBlobUnknown(_)
            | Error::ManifestInvalid(_)
            | Error::NameInvalid(_)
            | Error::SizeInvalid(_)
            | Error::TagInvalid(_)
            | Error::PaginationInvalid(_)
            | Error::BadRequest(_) => StatusCode::BAD_REQUEST,
            Error::ManifestTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Error::RangeNotSatisfiable { .. } => StatusCode::RANGE_NOT_SATISFIABLE,
            Error::Denied(_) => StatusCode::FORBIDDEN,
            Error::Protected(_) => StatusCode::PRECONDITION_FAILED,
            Error::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            Error::Conflict(_) => StatusCode::CONFLICT,
            Error::Unsupported(_) => StatusCode::METHOD_NOT_ALLOWED,
            Error::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Error::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            Error::Upstream(_) => StatusCode::BAD_GATEWAY,
            Error::StorageFull(_) => StatusCode::INSUFFICIENT_STORAGE,
            Error::Io(_) | Error::Meta(_) | Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Extra header the response must carry, if any.
    pub fn header(&self) -> Option<(http::HeaderName, String)> {
        match self {
            Error::RangeNotSatisfiable { header, .. } => Some(header.clone()),
            Error::TooManyRequests {
                retry_after: Some(after),
                ..
            } => Some((
                http::header::RETRY_AFTER,
                after.as_secs().max(1).to_string(),
            )),
            _ => None,
        }
    }

    /// The OCI error body `{"errors":[{"code","message","detail"}]}`.
    pub fn body(&self) -> String {
        let detail = match self {
            Error::ManifestBlobUnknown(d) => serde_json::json!({ "digest": d }),
            Error::ManifestTooLarge { size, limit } => {
                serde_json::json!({ "size": size, "limit": limit })
            }
            _ => serde_json::Value::Null,
        };
        serde_json::json!({
            "errors": [{ "code": self.code(), "message": self.to_string(), "detail": detail }]
        })
        .to_string()
    }

    /// Whether this is berth's fault (logged at error level) rather than the client's or the source's.
    pub fn is_server_fault(&self) -> bool {
        self.status().is_server_error() && !matches!(self, Error::Upstream(_))
    }
}

impl Error {
    /// A 401 with a challenge for `scope`.
    pub fn unauthorized(message: &str, scope: Option<String>) -> Error {
        Error::Unauthorized {
            message: message.to_string(),
            scope,
            insufficient: false,
        }
    }
}

impl From<crate::auth::users::UserError> for Error {
    fn from(e: crate::auth::users::UserError) -> Self {
        use crate::auth::users::UserError as U;
        match e {
            U::InvalidName(_) | U::TooManyKeys(_) => Error::BadRequest(e.to_string()),
            U::Exists(_) | U::LastAdmin(_) => Error::Conflict(e.to_string()),
            U::UnknownUser(_) | U::UnknownKey { .. } => Error::NotFound(e.to_string()),
            U::Meta(m) => Error::Meta(m),
            U::Hash(h) => Error::Internal(h),
        }
    }
}

/// A full disk is its own answer (507 naming the cause); every other I/O error is a 500.
impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::StorageFull {
            Error::StorageFull(e.to_string())
        } else {
            Error::Io(e)
        }
    }
}

impl From<ReferenceError> for Error {
    fn from(e: ReferenceError) -> Self {
        match e {
            ReferenceError::Name { .. } => Error::NameInvalid(e.to_string()),
            ReferenceError::Tag(_) => Error::TagInvalid(e.to_string()),
            ReferenceError::Digest(d) => d.into(),
        }
    }
}

impl From<DigestError> for Error {
    fn from(e: DigestError) -> Self {
        Error::DigestInvalid(e.to_string())
    }
}

impl From<ManifestError> for Error {
    fn from(e: ManifestError) -> Self {
        Error::ManifestInvalid(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_codes_and_statuses() {
        let e = Error::ManifestBlobUnknown("sha256:x".into());
        assert_eq!(
            (e.code(), e.status().as_u16()),
            ("MANIFEST_BLOB_UNKNOWN", 400)
        );
        assert!(e.body().contains("\"digest\":\"sha256:x\""));
        let e: Error = ReferenceError::Tag("-x".into()).into();
        assert_eq!(e.code(), "TAG_INVALID");
        let e = Error::ManifestTooLarge { size: 5, limit: 4 };
        assert_eq!((e.code(), e.status().as_u16()), ("MANIFEST_INVALID", 413));
        let full = std::io::Error::new(
            std::io::ErrorKind::StorageFull,
            "no space left on device in the data directory /d",
        );
        let e: Error = full.into();
        assert_eq!((e.code(), e.status().as_u16()), ("UNKNOWN", 507));
        assert!(e
            .body()
            .contains("no space left on device in the data directory /d"));
        let e: Error = std::io::Error::other("x").into();
        assert_eq!(e.status().as_u16(), 500);
    }
}
