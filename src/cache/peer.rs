//! One source fetch per cold blob across nodes that share a database and a bucket.
//!
//! The node that takes a blob's fetch lease (`fetch/DIGEST` in the metadata store) fetches it
//! from the source into the shared bucket, as a single node does; a node whose client asks for
//! the blob meanwhile finds the lease taken and streams the bytes from the holder's partial
//! file over `GET /internal/v1/fetches/DIGEST` (signed with a key every node shares), or from
//! the bucket once the holder committed it. A holder that dies stops renewing its lease; once
//! it expires the next node takes it and resumes from the checkpoint in the bucket.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, KeyInit, Mac};
use http::{header, HeaderMap, HeaderValue, Response, StatusCode};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::error::{Error, Result};
use crate::http::body::{Body, Piece, Streamed};
use crate::http::router::PEER_FETCH_PATH;
use crate::oci::digest::Digest;
use crate::store::meta::{HeldLease, MetaResult, MetaStore};

/// How long a signed peer request stays good (clocks of nodes differ a little).
const SIGNATURE_LIFETIME: Duration = Duration::from_secs(60);

/// The secret the peer requests are signed with, among the secrets every node shares.
const PEER_KEY: &str = "peer_key";

/// The header on a holder's 404 that says it fetches no such blob (as opposed to the source's
/// 404 for the blob, which travels as `BLOB_UNKNOWN`).
pub const NO_FETCH_HEADER: &str = "berth-peer-fetch";

/// Who holds a fetch lease, as stored in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// The holding node (random per process).
    pub node: String,
    /// Where other nodes reach it; none: they wait for the bucket.
    pub url: Option<String>,
    /// The local repository it fetches for (the source vouched for the blob there).
    pub repo: String,
}

/// This node among the others that share its metadata and bucket.
pub struct Cluster {
    node: String,
    url: OnceLock<Option<String>>,
    configured_url: Option<String>,
    key: Vec<u8>,
    client: reqwest::Client,
}

impl Cluster {
    /// The cluster this node is part of: `None` unless both metadata and blobs are shared
    /// (PostgreSQL and a bucket); a single node needs no lease.
    pub async fn open(
        config: &crate::config::Config,
        meta: &Arc<dyn MetaStore>,
    ) -> std::result::Result<Option<Cluster>, String> {
        let shared_blobs = matches!(config.storage, crate::store::BlobBackend::S3(_));
        if !meta.shared() || !shared_blobs {
            return Ok(None);
        }
        let key = crate::store::meta::shared_secret(meta, PEER_KEY, None)
            .await
            .map_err(|e| format!("the peer key: {e}"))?;
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .pool_idle_timeout(Duration::from_secs(30))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("the peer client: {e}"))?;
        Ok(Some(Cluster {
            node: uuid::Uuid::new_v4().simple().to_string(),
            url: OnceLock::new(),
            configured_url: config
                .cluster
                .advertise_url
                .as_ref()
                .map(|u| u.trim_end_matches('/').to_string()),
            key,
            client,
        }))
    }

    /// Settles where peers reach this node, once its listeners are bound: the configured
    /// `cluster.advertise_url`, else the first listener when it is bound to a specific address.
    pub fn advertise(&self, bound: &[(SocketAddr, bool)]) {
        let url = self.configured_url.clone().or_else(|| {
            let (addr, tls) = bound.first()?;
            (!addr.ip().is_unspecified())
                .then(|| format!("{}://{addr}", if *tls { "https" } else { "http" }))
        });
        if url.is_none() {
            tracing::warn!("cluster.advertise_url is not set and the first listener is on every address: other nodes wait for this node's cold fetches to finish instead of streaming them");
        }
        let _ = self.url.set(url);
    }

    /// The lease of `digest`'s fetch for `repo`: `Ok` with the holder text this node holds it
    /// under, or `Err` with the node that holds it.
    pub async fn take(
        &self,
        meta: &dyn MetaStore,
        digest: &Digest,
        repo: &str,
    ) -> MetaResult<std::result::Result<HeldLease, Holder>> {
        let me = Holder {
            node: self.node.clone(),
            url: self.url.get().cloned().flatten(),
            repo: repo.to_string(),
        };
        let text = serde_json::to_string(&me).expect("a holder serializes");
        let lease = match HeldLease::take(meta, lease_name(digest), text).await? {
            Ok(held) => return Ok(Ok(held)),
            Err(other) => other,
        };
        match serde_json::from_str::<Holder>(&lease.holder) {
            Ok(other) => Ok(Err(other)),
            // Not one of ours (a newer berth's?): wait for it like for a node with no URL.
            Err(_) => Ok(Err(Holder {
                node: lease.holder,
                url: None,
                repo: String::new(),
            })),
        }
    }

    /// The MAC of a request for `digest` into `repo`, good until `expires`.
    fn mac(&self, digest: &str, repo: &str, expires: u64) -> Hmac<sha2::Sha256> {
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&self.key).expect("HMAC takes any key");
        mac.update(format!("{digest}\n{repo}\n{expires}").as_bytes());
        mac
    }

    fn signature(&self, digest: &str, repo: &str, expires: u64) -> String {
        hex::encode(self.mac(digest, repo, expires).finalize().into_bytes())
    }

    /// Whether a peer request for `digest` and `repo` carries a good signature.
    pub fn verify(&self, headers: &HeaderMap, digest: &str, repo: &str) -> bool {
        let Some((expires, sig)) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("BerthPeer "))
            .and_then(|v| v.split_once('.'))
        else {
            return false;
        };
        let Ok(expires) = expires.parse::<u64>() else {
            return false;
        };
        if expires < unix_now() || expires > unix_now() + 2 * SIGNATURE_LIFETIME.as_secs() {
            return false;
        }
        let Ok(sig) = hex::decode(sig) else {
            return false;
        };
        self.mac(digest, repo, expires).verify_slice(&sig).is_ok()
    }

    /// Asks `holder` for the bytes of `digest` its fetch has (for `repo`, with the client's
    /// `Range`): the holder's answer, or `None` when it fetches no such blob (any more) or
    /// cannot be reached.
    pub async fn ask(
        &self,
        holder: &Holder,
        digest: &Digest,
        repo: &str,
        range: Option<&HeaderValue>,
    ) -> Option<reqwest::Response> {
        let url = holder.url.as_deref()?;
        let expires = unix_now() + SIGNATURE_LIFETIME.as_secs();
        let sig = self.signature(digest.as_str(), repo, expires);
        let mut req = self
            .client
            .get(format!("{url}{PEER_FETCH_PATH}{digest}"))
            .query(&[("repo", repo)])
            .header(header::AUTHORIZATION, format!("BerthPeer {expires}.{sig}"));
        if let Some(range) = range {
            req = req.header(header::RANGE, range.clone());
        }
        // The holder answers once the source told it the size.
        match tokio::time::timeout(Duration::from_secs(60), req.send()).await {
            Ok(Ok(r))
                if r.status() == StatusCode::NOT_FOUND
                    && r.headers().contains_key(NO_FETCH_HEADER) =>
            {
                None
            }
            Ok(Ok(r)) => Some(r),
            Ok(Err(e)) => {
                tracing::warn!(%digest, node = url, error = %crate::http::egress::error_chain(&e), "the node fetching a blob cannot be reached; waiting for its lease to end");
                None
            }
            Err(_) => {
                tracing::warn!(%digest, node = url, "the node fetching a blob did not answer within 60 s");
                None
            }
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn lease_name(digest: &Digest) -> String {
    format!("fetch/{digest}")
}

/// A response for a client of this node from a holder's answer: the holder's status, length
/// and range, its body streamed through; an error when the holder failed or its answer does not
/// fit the client's range.
pub fn relay(
    answer: reqwest::Response,
    digest: &Digest,
    range: Option<&HeaderValue>,
) -> Result<Response<Body>> {
    let status = answer.status();
    if status == StatusCode::NOT_FOUND {
        return Err(Error::BlobUnknown(format!("{digest} is not at the source")));
    }
    if !(status == StatusCode::OK || status == StatusCode::PARTIAL_CONTENT) {
        return Err(Error::Upstream(format!(
            "the node fetching {digest} answered {status}"
        )));
    }
    let size = if status == StatusCode::OK {
        answer.content_length()
    } else {
        answer
            .headers()
            .get(header::CONTENT_RANGE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit_once('/'))
            .and_then(|(_, total)| total.parse().ok())
    }
    .ok_or_else(|| Error::Upstream(format!("the node fetching {digest} sent no size")))?;
    let range = crate::serve::blobs::parse_range(range, size)?;
    let len = range.map_or(size, |r| r.len);
    if answer.content_length() != Some(len) {
        return Err(Error::Upstream(format!(
            "the node fetching {digest} sent a length other than asked"
        )));
    }
    let (tx, body) = Streamed::channel(len);
    tokio::spawn(pass_on(answer, len, tx));
    metrics::counter!("berth_cache_peer_streams_total").increment(1);
    Ok(crate::serve::blobs::blob_response(
        body, digest, size, range,
    ))
}

/// Longest the holder may send nothing (it waits on the source as its own clients do).
const STALL: Duration = Duration::from_secs(300);

async fn pass_on(mut answer: reqwest::Response, len: u64, tx: mpsc::Sender<io::Result<Piece>>) {
    let mut sent = 0u64;
    while sent < len {
        let chunk = match tokio::time::timeout(STALL, answer.chunk()).await {
            Ok(Ok(Some(c))) => c,
            Ok(Ok(None)) => {
                let _ = tx
                    .send(Err(io::Error::other(
                        "the node fetching the blob stopped early",
                    )))
                    .await;
                return;
            }
            Ok(Err(e)) => {
                let why = format!(
                    "the node fetching the blob: {}",
                    crate::http::egress::error_chain(&e)
                );
                let _ = tx.send(Err(io::Error::other(why))).await;
                return;
            }
            Err(_) => {
                let _ = tx
                    .send(Err(io::Error::other(
                        "the node fetching the blob sent nothing for 300 s",
                    )))
                    .await;
                return;
            }
        };
        sent += chunk.len() as u64;
        metrics::counter!("berth_cache_peer_bytes_total").increment(chunk.len() as u64);
        if tx.send(Ok(Piece::Bytes(chunk))).await.is_err() {
            return; // the client went away
        }
    }
}

/// The holder's 404 for a blob it does not fetch (no body: only nodes read it).
pub fn no_fetch() -> Response<Body> {
    let mut r = Response::new(Body::Empty);
    *r.status_mut() = StatusCode::NOT_FOUND;
    r.headers_mut()
        .insert(NO_FETCH_HEADER, HeaderValue::from_static("none"));
    r
}

/// Waits a little before asking the lease again (a holder finishing, or one that cannot be
/// reached and whose lease runs out).
pub async fn pause(deadline: Instant) {
    let now = Instant::now();
    tokio::time::sleep((deadline.saturating_duration_since(now)).min(Duration::from_millis(50)))
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(key: &[u8]) -> Cluster {
        Cluster {
            node: "n".into(),
            url: OnceLock::new(),
            configured_url: None,
            key: key.to_vec(),
            client: reqwest::Client::new(),
        }
    }

    fn signed(c: &Cluster, digest: &str, repo: &str, expires: u64) -> HeaderMap {
        let mut h = HeaderMap::new();
        let v = format!("BerthPeer {expires}.{}", c.signature(digest, repo, expires));
        h.insert(header::AUTHORIZATION, v.parse().unwrap());
        h
    }

    #[test]
    fn peer_requests_are_good_for_their_blob_and_repository_only_and_not_for_long() {
        let c = cluster(&[7; 32]);
        let soon = unix_now() + 30;
        let h = signed(&c, "sha256:aa", "hub/app", soon);
        assert!(c.verify(&h, "sha256:aa", "hub/app"));
        assert!(!c.verify(&h, "sha256:bb", "hub/app"), "another blob");
        assert!(
            !c.verify(&h, "sha256:aa", "hub/other"),
            "another repository"
        );
        assert!(
            !cluster(&[8; 32]).verify(&h, "sha256:aa", "hub/app"),
            "another key"
        );
        let past = signed(&c, "sha256:aa", "hub/app", unix_now() - 1);
        assert!(!c.verify(&past, "sha256:aa", "hub/app"), "expired");
        let far = signed(&c, "sha256:aa", "hub/app", unix_now() + 3600);
        assert!(!c.verify(&far, "sha256:aa", "hub/app"), "good for too long");
        assert!(
            !c.verify(&HeaderMap::new(), "sha256:aa", "hub/app"),
            "unsigned"
        );
    }

    #[test]
    fn a_node_advertises_its_configured_url_or_a_specific_listener() {
        let any: SocketAddr = "0.0.0.0:5000".parse().unwrap();
        let one: SocketAddr = "10.0.0.11:5000".parse().unwrap();
        let c = cluster(&[1; 32]);
        c.advertise(&[(one, true)]);
        assert_eq!(c.url.get(), Some(&Some("https://10.0.0.11:5000".into())));
        let c = cluster(&[1; 32]);
        c.advertise(&[(any, false)]);
        assert_eq!(c.url.get(), Some(&None), "every address: no URL to give");
        let mut c = cluster(&[1; 32]);
        c.configured_url = Some("http://node-a.internal:5000".into());
        c.advertise(&[(any, false)]);
        assert_eq!(
            c.url.get(),
            Some(&Some("http://node-a.internal:5000".into()))
        );
    }
}
