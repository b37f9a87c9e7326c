//! Maps a request path to a route; rejects malformed and traversal paths before any handler runs.

use crate::error::{Error, Result};

/// What a request addresses. Names and references are raw path text; handlers validate them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `GET /v2/`.
    Base,
    /// `/v2/_catalog`.
    Catalog,
    /// `/v2/NAME/blobs/DIGEST`.
    Blob {
        /// Repository name as written (`REGISTRY/IMAGE`, or a mirror path).
        name: String,
        /// Digest as written.
        digest: String,
    },
    /// `/v2/NAME/blobs/uploads/`.
    UploadStart {
        /// Repository name as written (`REGISTRY/IMAGE`, or a mirror path).
        name: String,
    },
    /// `/v2/NAME/blobs/uploads/ID`.
    Upload {
        /// Repository name as written (`REGISTRY/IMAGE`, or a mirror path).
        name: String,
        /// Upload session id.
        id: String,
    },
    /// `/v2/NAME/manifests/REFERENCE`.
    Manifest {
        /// Repository name as written (`REGISTRY/IMAGE`, or a mirror path).
        name: String,
        /// Tag or digest as written.
        reference: String,
    },
    /// `/v2/NAME/tags/list`.
    Tags {
        /// Repository name as written (`REGISTRY/IMAGE`, or a mirror path).
        name: String,
    },
    /// `/v2/NAME/referrers/DIGEST`.
    Referrers {
        /// Repository name as written (`REGISTRY/IMAGE`, or a mirror path).
        name: String,
        /// Subject digest as written.
        digest: String,
    },
    /// `/healthz`.
    Health,
    /// `/readyz`.
    Ready,
    /// `/metrics`.
    Metrics,
    /// `/service/token`: the Docker token endpoint.
    Token,
    /// `/api/v1/...`: the management API (the path is parsed by `api/`).
    Api,
    /// `/internal/v1/fetches/DIGEST`: another node streaming a cold fetch this node holds.
    PeerFetch {
        /// Digest as written.
        digest: String,
    },
}

impl Route {
    /// Low-cardinality label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Route::Base => "base",
            Route::Catalog => "catalog",
            Route::Blob { .. } => "blob",
            Route::UploadStart { .. } | Route::Upload { .. } => "upload",
            Route::Manifest { .. } => "manifest",
            Route::Tags { .. } => "tags",
            Route::Referrers { .. } => "referrers",
            Route::Health => "healthz",
            Route::Ready => "readyz",
            Route::Metrics => "metrics",
            Route::Token => "token",
            Route::Api => "api",
            Route::PeerFetch { .. } => "peer_fetch",
        }
    }
}

/// Where a node asks another for the bytes of a cold fetch it holds (`DIGEST` follows).
pub const PEER_FETCH_PATH: &str = "/internal/v1/fetches/";

/// Parses a request path (without query).
pub fn route(path: &str) -> Result<Route> {
    match path {
        "/healthz" => return Ok(Route::Health),
        "/readyz" => return Ok(Route::Ready),
        "/metrics" => return Ok(Route::Metrics),
        "/v2" | "/v2/" => return Ok(Route::Base),
        "/v2/_catalog" => return Ok(Route::Catalog),
        "/service/token" => return Ok(Route::Token),
        "/api/v1" => return Ok(Route::Api),
        p if p.starts_with("/api/v1/") => return Ok(Route::Api),
        p if p.starts_with(PEER_FETCH_PATH) => {
            return Ok(Route::PeerFetch {
                digest: p[PEER_FETCH_PATH.len()..].to_string(),
            });
        }
        _ => {}
    }
    let Some(rest) = path.strip_prefix("/v2/") else {
        return Err(Error::NotFound(format!("no such endpoint: {path}")));
    };
    // Upload start is the one route with a trailing slash.
    let (rest, trailing_slash) = match rest.strip_suffix('/') {
        Some(r) => (r, true),
        None => (rest, false),
    };
    let segments: Vec<&str> = rest.split('/').collect();
    for s in &segments {
        if s.is_empty() || *s == "." || *s == ".." || s.contains('%') || s.contains('\\') {
            return Err(Error::NameInvalid(format!(
                "malformed path {path:?}: empty, dot or encoded segments are not allowed"
            )));
        }
    }
    let n = segments.len();
    let name = |upto: usize| -> Result<String> {
        if upto == 0 {
            Err(Error::NameInvalid(format!(
                "missing repository name in {path:?}"
            )))
        } else {
            Ok(segments[..upto].join("/"))
        }
    };
    let tail = |k: usize| segments.get(n.wrapping_sub(k)).copied().unwrap_or("");
    if trailing_slash {
        if n >= 2 && tail(2) == "blobs" && tail(1) == "uploads" {
            return Ok(Route::UploadStart { name: name(n - 2)? });
        }
        return Err(Error::NotFound(format!("no such endpoint: {path}")));
    }
    if n >= 3 && tail(3) == "blobs" && tail(2) == "uploads" {
        return Ok(Route::Upload {
            name: name(n - 3)?,
            id: tail(1).to_string(),
        });
    }
    if n >= 2 && tail(2) == "tags" && tail(1) == "list" {
        return Ok(Route::Tags { name: name(n - 2)? });
    }
    if n >= 2 {
        let reference = tail(1).to_string();
        match tail(2) {
            "manifests" => {
                return Ok(Route::Manifest {
                    name: name(n - 2)?,
                    reference,
                })
            }
            "blobs" if reference == "uploads" => {
                return Ok(Route::UploadStart { name: name(n - 2)? })
            }
            "blobs" => {
                return Ok(Route::Blob {
                    name: name(n - 2)?,
                    digest: reference,
                })
            }
            "referrers" => {
                return Ok(Route::Referrers {
                    name: name(n - 2)?,
                    digest: reference,
                })
            }
            _ => {}
        }
    }
    Err(Error::NotFound(format!("no such endpoint: {path}")))
}

/// The value of a query parameter, percent-decoded; the first occurrence wins.
pub fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| {
            percent_encoding::percent_decode_str(&v.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned()
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(route("/v2/").unwrap(), Route::Base);
        assert_eq!(
            route("/v2/lib/a/b/manifests/v1").unwrap(),
            Route::Manifest {
                name: "lib/a/b".into(),
                reference: "v1".into()
            }
        );
        assert_eq!(
            route("/v2/lib/blobs/x/blobs/uploads/").unwrap(),
            Route::UploadStart {
                name: "lib/blobs/x".into()
            }
        );
        assert_eq!(
            route("/v2/lib/a/blobs/uploads/abc").unwrap(),
            Route::Upload {
                name: "lib/a".into(),
                id: "abc".into()
            }
        );
        assert_eq!(
            route("/v2/lib/a/tags/list").unwrap(),
            Route::Tags {
                name: "lib/a".into()
            }
        );
        assert!(matches!(
            route("/v2/lib/a/referrers/sha256:x").unwrap(),
            Route::Referrers { .. }
        ));
        assert!(matches!(
            route("/v2/lib/a/blobs/sha256:x").unwrap(),
            Route::Blob { .. }
        ));
    }

    #[test]
    fn rejects_traversal_and_unknown() {
        for p in [
            "/v2/lib/../a/manifests/v1",
            "/v2/lib//a/manifests/v1",
            "/v2/lib/%2e%2e/manifests/v1",
            "/v2/./manifests/x",
        ] {
            assert!(matches!(route(p), Err(Error::NameInvalid(_))), "{p}");
        }
        assert!(matches!(
            route("/v2/manifests/x"),
            Err(Error::NameInvalid(_))
        ));
        assert!(matches!(route("/v3/x"), Err(Error::NotFound(_))));
        assert!(matches!(route("/v2/a/b/unknown"), Err(Error::NotFound(_))));
    }

    #[test]
    fn query() {
        assert_eq!(
            query_param(Some("n=2&last=a%2Fb"), "last").as_deref(),
            Some("a/b")
        );
        assert_eq!(query_param(Some("digest"), "digest").as_deref(), Some(""));
        assert_eq!(query_param(None, "n"), None);
    }
}
