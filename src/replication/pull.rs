//! Copies artifacts from an endpoint to this berth (pull mode): what a pull rule selects is
//! found through the endpoint's catalog and tag lists; each manifest is fetched by digest and
//! checked against it, an index's children first; each blob this berth lacks is fetched once
//! per execution, hashed as it is written and committed only under the digest it matched
//! (never a partial blob visible), then linked; a blob the node already holds is linked
//! without a fetch. A fetch cut short goes on with `Range` from what was written, within the
//! execution. Artifacts land through the same store path as pushes (quota, protection, events
//! with operator `replication`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use http::{HeaderMap, HeaderValue, Method, StatusCode};

use super::limit::Bandwidth;
use super::rule::{Filter, Rule};
use super::transfer::{unless_stopped, Copied, CopyError, CopyResult, Settings, ACCEPT_ALL};
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

/// The operator of what a pull writes here.
const OPERATOR: &str = "replication";

/// One execution's copies from one endpoint.
pub struct Fetcher {
    app: Arc<App>,
    rule: String,
    endpoint: String,
    client: Arc<Source>,
    settings: Settings,
    bandwidth: Option<Bandwidth>,
    concurrency: usize,
    blobs: parking_lot::Mutex<HashMap<Digest, Arc<tokio::sync::Mutex<()>>>>,
    stop: Arc<AtomicBool>,
}

fn local(e: impl std::fmt::Display) -> CopyError {
    CopyError::Local(e.to_string())
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
            rule: rule.name.clone(),
            endpoint: rule.endpoint.clone(),
            client,
            settings,
            bandwidth: (rule.bandwidth_limit > 0).then(|| Bandwidth::new(rule.bandwidth_limit)),
            concurrency: rule.concurrency.max(1) as usize,
            blobs: Default::default(),
            stop,
        }
    }

    fn deadline(&self) -> Instant {
        Instant::now() + self.settings.request_timeout
    }

    async fn call(
        &self,
        method: Method,
        path: String,
        repo: &str,
        headers: HeaderMap,
    ) -> CopyResult<reqwest::Response> {
        let req = UpstreamRequest::new(method, path, repo, headers);
        let r = unless_stopped(&self.stop, async {
            Ok(self.client.send_with_retries(&req, self.deadline()).await)
        })
        .await?;
        Ok(r?)
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
                .call(Method::GET, path.clone(), repo, HeaderMap::new())
                .await?;
            let body = egress::read_capped(&mut r, 16 << 20, self.deadline())
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

    /// The digest a tag of the endpoint's repository points at.
    async fn tag_digest(&self, repo: &str, tag: &str) -> CopyResult<Option<Digest>> {
        let mut headers = HeaderMap::new();
        headers.insert(http::header::ACCEPT, HeaderValue::from_static(ACCEPT_ALL));
        match self
            .call(
                Method::HEAD,
                format!("{repo}/manifests/{tag}"),
                repo,
                headers,
            )
            .await
        {
            Ok(r) => Ok(r
                .headers()
                .get("docker-content-digest")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| Digest::parse(v).ok())),
            Err(CopyError::Endpoint(e)) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
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
        match self
            .call(
                Method::GET,
                format!("{src}/referrers/{digest}"),
                src,
                HeaderMap::new(),
            )
            .await
        {
            Ok(mut r) => {
                let body = egress::read_capped(&mut r, 4 << 20, self.deadline())
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
            if let Some(d) = self.tag_digest(src, &tag).await? {
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
                if let Some(d) = self.tag_digest(&repo, &tag).await? {
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
                    tracing::info!(rule = %self.rule, repository = %dest, %tag, "tag left as it is here (override is off)");
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
            let mut r = self
                .call(
                    Method::GET,
                    format!("{src}/manifests/{digest}"),
                    src,
                    headers,
                )
                .await?;
            let content_type = r
                .headers()
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(|v| v.split(';').next().unwrap_or(v).trim().to_string());
            let limit = self.app.config.limits.max_manifest_bytes;
            let bytes: Bytes = egress::read_capped(&mut r, limit, self.deadline())
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
                .buffer_unordered(self.concurrency)
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
        let busy = self.blobs.lock().entry(digest.clone()).or_default().clone();
        let _one_at_a_time = busy.lock().await;
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
        let key = Pending::Temp(uuid::Uuid::from_bytes(partial_id(&self.rule, digest)));
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
        let mut backoff = Duration::from_millis(500);
        let mut last = None;
        for attempt in 1..=self.settings.attempts {
            if attempt > 1 {
                let wait = last
                    .as_ref()
                    .and_then(|e: &UpstreamError| e.retry_after())
                    .unwrap_or(backoff);
                unless_stopped(&self.stop, async {
                    tokio::time::sleep(wait).await;
                    Ok(())
                })
                .await?;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
            match self.fetch_once(src, digest, &mut write, sent).await {
                Ok(()) => {
                    let got = write.verifier.clone().finish();
                    if got != *digest {
                        let _ = write.inner.abort().await;
                        return Err(CopyError::Endpoint(UpstreamError::Refused(format!(
                            "the endpoint sent blob {digest} with digest {got}; discarded"
                        ))));
                    }
                    let size = write.written();
                    crate::registry::quota::check(&self.app, dest.as_str(), size)
                        .await
                        .map_err(local)?;
                    write.inner.sync().await?;
                    return Ok(write);
                }
                Err(CopyError::Endpoint(e)) if e.is_transient() => {
                    tracing::info!(rule = %self.rule, endpoint = %self.endpoint, %digest, attempt, held = write.written(), error = %e, "blob fetch resumes");
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(CopyError::Endpoint(last.unwrap_or_else(|| {
            UpstreamError::Unreachable("no attempt made".into())
        })))
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
        let mut r = unless_stopped(&self.stop, async {
            Ok(self.client.send(&req, self.deadline()).await)
        })
        .await??;
        if from > 0 && r.status() != StatusCode::PARTIAL_CONTENT {
            // The endpoint ignored the range: start over.
            write.rewind(0, Verifier::new(digest.algorithm())).await?;
        }
        let cap = self.client.max_blob_bytes();
        loop {
            let chunk = unless_stopped(&self.stop, async {
                match tokio::time::timeout(self.settings.request_timeout, r.chunk()).await {
                    Err(_) => Err(CopyError::Endpoint(UpstreamError::TimedOut(
                        "blob stalled".into(),
                    ))),
                    Ok(Err(e)) => Err(CopyError::Endpoint(UpstreamError::Unreachable(
                        egress::error_chain(&e.without_url()),
                    ))),
                    Ok(Ok(c)) => Ok(c),
                }
            })
            .await?;
            let Some(chunk) = chunk else {
                return Ok(());
            };
            if write.written() + chunk.len() as u64 > cap {
                return Err(CopyError::Endpoint(UpstreamError::Refused(format!(
                    "blob {digest} is longer than pull_through.max_blob_bytes"
                ))));
            }
            if let Some(b) = &self.bandwidth {
                b.take(chunk.len() as u64).await;
            }
            let n = chunk.len() as u64;
            write.write(Pieces::from(chunk)).await?;
            sent.fetch_add(n, Ordering::Relaxed);
            metrics::counter!(
                "berth_replication_bytes_total",
                "rule" => self.rule.clone(),
                "endpoint" => self.endpoint.clone()
            )
            .increment(n);
        }
    }
}

/// The partial file's id of a rule's fetch of a blob.
fn partial_id(rule: &str, digest: &Digest) -> [u8; 16] {
    let d = Digest::sha256(format!("replication\0{rule}\0{digest}").as_bytes());
    let mut id = [0u8; 16];
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(&d.hex()[2 * i..2 * i + 2], 16).unwrap_or(0);
    }
    id
}
