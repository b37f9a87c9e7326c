//! Copies artifacts from an endpoint to this berth (pull mode): what a pull rule selects is
//! found through the endpoint's catalog and tag lists; each manifest is fetched by digest and
//! checked against it, an index's children first; each blob this berth lacks is fetched once
//! per execution, hashed as it is written and committed only under the digest it matched
//! (never a partial blob visible), then linked; a blob the node already holds is linked
//! without a fetch. A fetch cut short goes on with `Range` from what was written, within the
//! execution. Artifacts land through the same store path as pushes (quota, protection, events
//! with operator `replication`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use http::{HeaderMap, HeaderValue, Method, StatusCode};

use super::link::{local, Copied, CopyError, CopyResult, Link, Retry, Settings, ACCEPT_ALL};
use super::rule::{Filter, Rule};
use crate::cache::upstream::{Source, UpstreamError, UpstreamRequest};
use crate::events::{EventKind, Happened};
use crate::http::egress;
use crate::oci::digest::{Digest, Verifier};
use crate::oci::manifest;
use crate::oci::reference::RepoName;
use crate::store::blobs::{hash_read, HashingWrite, Pending, Pieces};
use crate::store::meta::Refers;
use crate::App;

/// Deepest nesting of indexes followed.
const MAX_DEPTH: usize = 4;

/// Repositories and tags read per page of the endpoint's lists.
const PAGE: usize = 1000;

/// Most repositories and tags a pull rule reads from an endpoint in one execution.
const MAX_LISTED: usize = 100_000;

/// Bytes of a blob gathered before one write (and one hashing step), as uploads do.
const WRITE_CHUNK: usize = 2 << 20;

/// The operator of what a pull writes here.
const OPERATOR: &str = "replication";

/// One execution's copies from one endpoint.
pub struct Fetcher {
    app: Arc<App>,
    link: Link,
}

impl Fetcher {
    /// A fetcher for `rule` from its endpoint through `client`.
    pub fn new(
        app: Arc<App>,
        rule: &Rule,
        client: Arc<Source>,
        settings: Settings,
        stop: Arc<AtomicBool>,
    ) -> Fetcher {
        Fetcher {
            app,
            link: Link::new(rule, client, settings, stop),
        }
    }

    /// Reads a list answer (`_catalog`, `tags/list`) page by page: every `field` entry.
    async fn list(&self, first: String, repo: &str, field: &str) -> CopyResult<Vec<String>> {
        #[derive(serde::Deserialize)]
        struct Page {
            #[serde(default)]
            repositories: Option<Vec<String>>,
            #[serde(default)]
            tags: Option<Vec<String>>,
        }
        let mut out: Vec<String> = Vec::new();
        let mut path = first;
        loop {
            let mut r = self
                .link
                .call(Method::GET, path.clone(), repo, HeaderMap::new(), false)
                .await?;
            let body = egress::read_capped(&mut r, 16 << 20, self.link.deadline())
                .await
                .map_err(|e| CopyError::Endpoint(UpstreamError::Unreachable(e.to_string())))?;
            let page: Page = serde_json::from_slice(&body).map_err(|e| {
                CopyError::Endpoint(UpstreamError::Refused(format!("list {path}: {e}")))
            })?;
            let items = if field == "tags" {
                page.tags
            } else {
                page.repositories
            }
            .unwrap_or_default();
            let Some(last) = items.last().cloned() else {
                break;
            };
            let full = items.len() >= PAGE;
            out.extend(items);
            if !full || out.len() >= MAX_LISTED {
                break;
            }
            let base = path.split('?').next().unwrap_or_default().to_string();
            path = format!("{base}?n={PAGE}&last={last}");
        }
        Ok(out)
    }

    /// What travels with artifact `digest` of the endpoint's `src`: its referrers (where the
    /// endpoint has the referrers API) and cosign's tags, as (digest, tags).
    pub async fn followers(
        &self,
        src: &str,
        digest: &Digest,
    ) -> CopyResult<Vec<(Digest, Vec<String>)>> {
        #[derive(serde::Deserialize)]
        struct Index {
            #[serde(default)]
            manifests: Vec<manifest::Descriptor>,
        }
        let mut out = Vec::new();
        let path = format!("{src}/referrers/{digest}");
        match self
            .link
            .call(Method::GET, path, src, HeaderMap::new(), false)
            .await
        {
            Ok(mut r) => {
                let body = egress::read_capped(&mut r, 4 << 20, self.link.deadline())
                    .await
                    .map_err(|e| CopyError::Endpoint(UpstreamError::Unreachable(e.to_string())))?;
                if let Ok(index) = serde_json::from_slice::<Index>(&body) {
                    out.extend(index.manifests.into_iter().map(|d| (d.digest, Vec::new())));
                }
            }
            Err(CopyError::Endpoint(e)) if e.is_not_found() => {}
            Err(e) => return Err(e),
        }
        for suffix in crate::oci::reference::COSIGN_SUFFIXES {
            let tag = format!("sha256-{}{suffix}", digest.hex());
            if let Some(d) = self.link.manifest_digest(src, &tag, false).await? {
                out.push((d, vec![tag]));
            }
        }
        Ok(out)
    }

    /// What the rule selects at the endpoint: (remote repository, image, digest, tags).
    pub async fn gather(
        &self,
        rule: &Rule,
        filter: &Filter,
    ) -> CopyResult<Vec<(String, String, Digest, Vec<String>)>> {
        let repos = self
            .list(format!("_catalog?n={PAGE}"), "", "repositories")
            .await?;
        let mut units = Vec::new();
        for repo in repos {
            let image = if rule.registry.is_empty() {
                repo.as_str()
            } else {
                match repo
                    .strip_prefix(rule.registry.as_str())
                    .and_then(|r| r.strip_prefix('/'))
                {
                    Some(i) => i,
                    None => continue,
                }
            };
            if !filter.image(image) {
                continue;
            }
            let tags = self
                .list(format!("{repo}/tags/list?n={PAGE}"), &repo, "tags")
                .await?;
            let mut by_digest: std::collections::BTreeMap<Digest, Vec<String>> = Default::default();
            for tag in tags.into_iter().filter(|t| filter.tag(t)) {
                if let Some(d) = self.link.manifest_digest(&repo, &tag, false).await? {
                    by_digest.entry(d).or_default().push(tag);
                }
            }
            for (d, tags) in by_digest {
                units.push((repo.clone(), image.to_string(), d, tags));
            }
        }
        Ok(units)
    }

    /// Copies artifact `digest` of the endpoint's `src` into `dest` here with its tree, then
    /// points `tags` at it (a tag here that points elsewhere moves only with `override_tags`;
    /// a protected one never).
    pub async fn artifact(
        &self,
        src: &str,
        dest: &str,
        digest: &Digest,
        tags: &[String],
        override_tags: bool,
    ) -> CopyResult<Copied> {
        let repo = RepoName::parse(dest).map_err(local)?;
        let registry = self.app.store.registry(repo.registry()).ok_or_else(|| {
            local(format!(
                "registry {:?} does not exist here",
                repo.registry()
            ))
        })?;
        if registry.kind == crate::config::RegistryKind::Cache {
            return Err(local(format!(
                "registry {:?} is a cache registry: replication writes into normal ones",
                repo.registry()
            )));
        }
        let mut copied = Copied::default();
        let sent = AtomicU64::new(0);
        self.tree(src, &repo, digest, 0, &mut copied, &sent).await?;
        let meta = &self.app.store.meta;
        let record = meta
            .artifact(dest, digest)
            .await?
            .ok_or_else(|| local(format!("{dest}@{digest} vanished before its tags")))?;
        for tag in tags {
            match meta.tag(dest, tag).await? {
                Some(d) if d == *digest => continue,
                Some(_) if !override_tags => {
                    tracing::info!(rule = %self.link.rule, repository = %dest, %tag, "tag left as it is here (override is off)");
                    continue;
                }
                _ => {}
            }
            crate::registry::manifests::refuse_protected_tag(&self.app, &repo, tag, "replication")
                .await
                .map_err(local)?;
            if !meta.tag_artifact(dest, digest, tag).await? {
                return Err(local(format!("{dest}@{digest} vanished before its tag")));
            }
            copied.tags += 1;
            let what = (record.media_type.as_str(), record.size);
            self.emit(EventKind::CreateTag, dest, digest, Some(tag), what);
        }
        copied.bytes = sent.into_inner();
        Ok(copied)
    }

    fn emit(
        &self,
        kind: EventKind,
        repo: &str,
        digest: &Digest,
        tag: Option<&str>,
        what: (&str, u64),
    ) {
        self.app.events.emit(Happened {
            kind,
            operator: OPERATOR,
            repository: repo,
            tag,
            digest: digest.as_str(),
            media_type: what.0,
            size: what.1,
        });
    }

    fn tree<'a>(
        &'a self,
        src: &'a str,
        dest: &'a RepoName,
        digest: &'a Digest,
        depth: usize,
        copied: &'a mut Copied,
        sent: &'a AtomicU64,
    ) -> futures_util::future::BoxFuture<'a, CopyResult<()>> {
        Box::pin(async move {
            let meta = &self.app.store.meta;
            if meta.artifact(dest.as_str(), digest).await?.is_some() {
                return Ok(());
            }
            let mut headers = HeaderMap::new();
            headers.insert(http::header::ACCEPT, HeaderValue::from_static(ACCEPT_ALL));
            let path = format!("{src}/manifests/{digest}");
            let mut r = self
                .link
                .call(Method::GET, path, src, headers, false)
                .await?;
            let content_type = r
                .headers()
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(|v| v.split(';').next().unwrap_or(v).trim().to_string());
            let limit = self.app.config.limits.max_manifest_bytes;
            let bytes: Bytes = egress::read_capped(&mut r, limit, self.link.deadline())
                .await
                .map_err(|e| {
                    CopyError::Endpoint(UpstreamError::Refused(format!("manifest {digest}: {e}")))
                })?;
            if Digest::of(digest.algorithm(), &bytes) != *digest {
                return Err(CopyError::Endpoint(UpstreamError::Refused(format!(
                    "the endpoint sent other bytes for manifest {digest}"
                ))));
            }
            sent.fetch_add(bytes.len() as u64, Ordering::Relaxed);
            let parsed = manifest::parse(&bytes, content_type.as_deref())
                .map_err(|e| local(format!("manifest {digest}: {e}")))?;
            if depth < MAX_DEPTH {
                for child in &parsed.children {
                    self.tree(src, dest, &child.digest, depth + 1, copied, sent)
                        .await?;
                }
            }
            let blobs: Vec<_> = parsed
                .blobs
                .iter()
                .map(|d| self.blob(src, dest, d, sent))
                .collect();
            futures_util::stream::iter(blobs)
                .buffer_unordered(self.link.concurrency)
                .try_collect::<Vec<()>>()
                .await?;
            crate::registry::quota::check(&self.app, dest.as_str(), bytes.len() as u64)
                .await
                .map_err(local)?;
            crate::serve::manifests::store(
                &self.app,
                dest.as_str(),
                digest,
                &bytes,
                &parsed,
                None,
                &Refers::of(&parsed),
            )
            .await
            .map_err(local)?;
            copied.manifests += 1;
            let what = (parsed.media_type.as_str(), bytes.len() as u64);
            self.emit(EventKind::PushArtifact, dest.as_str(), digest, None, what);
            Ok(())
        })
    }

    /// Makes `dest` here link blob `digest`: linked already, linked from what the node holds,
    /// or fetched.
    async fn blob(
        &self,
        src: &str,
        dest: &RepoName,
        digest: &Digest,
        sent: &AtomicU64,
    ) -> CopyResult<()> {
        let _one_at_a_time = self.link.one_at_a_time(digest).await;
        let store = &self.app.store;
        if store.meta.blob_link(dest.as_str(), digest).await?.is_some() {
            return Ok(());
        }
        let fetched = match store.blobs.stat(digest).await? {
            Some(_) => None,
            None => Some(self.fetch(src, dest, digest, sent).await?),
        };
        // Held from commit to link: a collection never deletes the blob in between.
        let _hold = store.gate.hold(digest).await;
        if let Some(write) = fetched {
            write.inner.commit(digest).await?;
        }
        let size = store
            .blobs
            .stat(digest)
            .await?
            .ok_or_else(|| local(format!("blob {digest} was collected meanwhile")))?
            .size;
        store.meta.link_blob(dest.as_str(), digest, size).await?;
        Ok(())
    }

    /// Fetches blob `digest` from the endpoint: hashed as written, durable and matching its
    /// digest when it returns (the caller commits it); a cut fetch goes on with `Range` from
    /// what was written.
    async fn fetch(
        &self,
        src: &str,
        dest: &RepoName,
        digest: &Digest,
        sent: &AtomicU64,
    ) -> CopyResult<HashingWrite> {
        let store = &self.app.store;
        // One partial file per rule and digest: an attempt goes on from the previous one's.
        let key = Pending::Temp(uuid::Uuid::from_bytes(partial_id(&self.link.rule, digest)));
        let (inner, _) = store.blobs.open_pending(&key).await?;
        let held = inner.written();
        let verifier = if held > 0 {
            match store.blobs.read_pending(&key, 0, Some(held)).await? {
                Some(read) => hash_read(read, Verifier::new(digest.algorithm())).await?,
                None => Verifier::new(digest.algorithm()),
            }
        } else {
            Verifier::new(digest.algorithm())
        };
        let mut write = HashingWrite::new(inner, verifier);
        let mut retry = Retry::default();
        loop {
            match self.fetch_once(src, digest, &mut write, sent).await {
                Ok(()) => break,
                Err(CopyError::Endpoint(e)) if e.is_transient() => {
                    self.link.again(&mut retry, e, "blob fetch", digest).await?;
                }
                Err(e) => return Err(e),
            }
        }
        let got = write.verifier.clone().finish();
        if got != *digest {
            let _ = write.inner.abort().await;
            return Err(CopyError::Endpoint(UpstreamError::Refused(format!(
                "the endpoint sent blob {digest} with digest {got}; discarded"
            ))));
        }
        crate::registry::quota::check(&self.app, dest.as_str(), write.written())
            .await
            .map_err(local)?;
        write.inner.sync().await?;
        Ok(write)
    }

    /// One GET of the blob from what `write` holds on.
    async fn fetch_once(
        &self,
        src: &str,
        digest: &Digest,
        write: &mut HashingWrite,
        sent: &AtomicU64,
    ) -> CopyResult<()> {
        let from = write.written();
        let mut headers = HeaderMap::new();
        if from > 0 {
            headers.insert(
                http::header::RANGE,
                HeaderValue::from_str(&format!("bytes={from}-")).map_err(local)?,
            );
        }
        let req = UpstreamRequest::new(Method::GET, format!("{src}/blobs/{digest}"), src, headers);
        let mut r = self.link.send(&req).await?;
        if from > 0 && r.status() != StatusCode::PARTIAL_CONTENT {
            // The endpoint ignored the range: start over.
            write.rewind(0, Verifier::new(digest.algorithm())).await?;
        }
        let cap = self.link.client.max_blob_bytes();
        let bandwidth = self.link.bandwidth();
        let timeout = self.link.settings.request_timeout;
        // Pieces gathered for one large write; what was gathered is written whatever ends the
        // body, so the write's count and hash always agree with what arrived.
        let mut pieces = Pieces::default();
        let mut received = 0u64;
        let outcome = loop {
            let chunk = self
                .link
                .unless_stopped(async {
                    match tokio::time::timeout(timeout, r.chunk()).await {
                        Err(_) => Err(CopyError::Endpoint(UpstreamError::TimedOut(
                            "blob stalled".into(),
                        ))),
                        Ok(Err(e)) => Err(CopyError::Endpoint(UpstreamError::Unreachable(
                            egress::error_chain(&e.without_url()),
                        ))),
                        Ok(Ok(c)) => Ok(c),
                    }
                })
                .await;
            let chunk = match chunk {
                Ok(Some(c)) => c,
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            };
            if write.written() + (pieces.len() + chunk.len()) as u64 > cap {
                break Err(CopyError::Endpoint(UpstreamError::Refused(format!(
                    "blob {digest} is longer than pull_through.max_blob_bytes"
                ))));
            }
            if let Some(b) = &bandwidth {
                b.take(chunk.len() as u64).await;
            }
            received += chunk.len() as u64;
            pieces.push(chunk);
            if pieces.len() >= WRITE_CHUNK {
                if let Err(e) = write.write(pieces.take()).await {
                    break Err(e.into());
                }
            }
        };
        let written = write.write(pieces).await;
        sent.fetch_add(received, Ordering::Relaxed);
        self.link.count(received);
        written?;
        outcome
    }
}

/// The partial file's id of a rule's fetch of a blob.
fn partial_id(rule: &str, digest: &Digest) -> [u8; 16] {
    let d = Digest::sha256(format!("replication\0{rule}\0{digest}").as_bytes());
    let mut id = [0u8; 16];
    // A sha256 digest's hex always decodes; its first 16 bytes name the file.
    let _ = hex::decode_to_slice(&d.hex()[..32], &mut id);
    id
}
