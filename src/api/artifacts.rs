//! Artifacts of an image: `/api/v1/registries/{registry}/images/{image}/artifacts[/{digest}]`,
//! with what a listing needs to be useful: tags, total size, platforms, signed, push and pull times.

use std::collections::{HashMap, HashSet};

use http::{Response, StatusCode};
use serde_json::Value;

use super::images::existing_repo;
use super::page::Page;
use super::views::{ArtifactDeleted, ArtifactView};
use super::{json, rfc3339, Ctx};
use crate::auth::Action;
use crate::error::{Error, Result};
use crate::http::body::Body;
use crate::oci::digest::Digest;
use crate::store::meta::ArtifactRecord;
use crate::store::Store;

/// Config blobs larger than this are not read for their platform (real ones are a few KiB).
const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

async fn read_json(store: &Store, digest: &Digest, limit: u64) -> Option<Value> {
    let bytes = store.blobs.read_small(digest, limit).await.ok()??;
    serde_json::from_slice(&bytes).ok()
}

fn descriptor_size(d: &Value) -> u64 {
    d["size"].as_u64().unwrap_or(0)
}

fn platform_text(p: &Value) -> Option<String> {
    let os = p["os"].as_str()?;
    let arch = p["architecture"].as_str()?;
    Some(match p["variant"].as_str() {
        Some(v) => format!("{os}/{arch}/{v}"),
        None => format!("{os}/{arch}"),
    })
}

/// Size of the blobs an image manifest references (config and layers).
fn blobs_size(manifest: &Value) -> u64 {
    let layers: u64 = manifest["layers"]
        .as_array()
        .map_or(0, |l| l.iter().map(descriptor_size).sum());
    descriptor_size(&manifest["config"]) + layers
}

/// Total size (manifest and what it references) and platforms of an artifact.
async fn size_and_platforms(
    store: &Store,
    repo: &str,
    record: &ArtifactRecord,
    digest: &Digest,
) -> (u64, Vec<String>) {
    // Manifests were bounded by limits.max_manifest_bytes when pushed.
    let limit = u64::MAX;
    let Some(manifest) = read_json(store, digest, limit).await else {
        return (record.size, Vec::new());
    };
    if let Some(children) = manifest["manifests"].as_array() {
        // An index: its own bytes, each child manifest and the child's blobs.
        let mut size = record.size;
        let mut platforms = Vec::new();
        for child in children {
            let Some(d) = child["digest"].as_str().and_then(|d| Digest::parse(d).ok()) else {
                continue;
            };
            // The stored record's size, not the descriptor's claim (pushes do not check it).
            size += match store.meta.artifact(repo, &d).await.ok().flatten() {
                Some(r) => r.size,
                None => descriptor_size(child),
            };
            if let Some(child_manifest) = read_json(store, &d, limit).await {
                size += blobs_size(&child_manifest);
            }
            if let Some(p) = platform_text(&child["platform"]) {
                platforms.push(p);
            }
        }
        return (size, platforms);
    }
    let config = match manifest["config"]["digest"]
        .as_str()
        .and_then(|d| Digest::parse(d).ok())
    {
        Some(d) => read_json(store, &d, MAX_CONFIG_BYTES).await,
        None => None,
    };
    let platforms = config
        .and_then(|config| platform_text(&config))
        .into_iter()
        .collect();
    (record.size + blobs_size(&manifest), platforms)
}

/// The cosign signature tag of a digest: `sha256:abc` → `sha256-abc.sig`.
pub fn cosign_tag(digest: &Digest) -> String {
    format!("{}.sig", digest.as_str().replacen(':', "-", 1))
}

/// The view of one artifact.
pub async fn artifact_view(
    store: &Store,
    repo: &str,
    digest: &Digest,
    record: &ArtifactRecord,
    tags: &[String],
    all_tags: &HashSet<String>,
) -> Result<ArtifactView> {
    let (size, platforms) = size_and_platforms(store, repo, record, digest).await;
    let signed = all_tags.contains(&cosign_tag(digest))
        || !store
            .meta
            .referrers(repo, digest, None, 1)
            .await?
            .is_empty();
    let last_pull = store.meta.last_pull(repo, digest).await?;
    Ok(ArtifactView {
        artifact_type: record.artifact_type.clone(),
        digest: digest.to_string(),
        last_pull: last_pull.map(rfc3339),
        manifest_size: record.size,
        media_type: record.media_type.clone(),
        platforms,
        pushed: rfc3339(record.pushed_ms),
        signed,
        size,
        subject: record.subject.as_ref().map(|s| s.to_string()),
        tags: tags.to_vec(),
    })
}

/// Tags grouped by the digest they point at.
type TagsByDigest = HashMap<Digest, Vec<String>>;

/// Tags of a repository grouped by the digest they point at, and the set of all its tags.
async fn tag_map(store: &Store, repo: &str) -> Result<(TagsByDigest, HashSet<String>)> {
    let mut by_digest: HashMap<Digest, Vec<String>> = HashMap::new();
    let mut all = HashSet::new();
    for t in store.meta.tags(repo, None, usize::MAX).await? {
        if let Some(d) = store.meta.tag(repo, &t).await? {
            by_digest.entry(d).or_default().push(t.clone());
        }
        all.insert(t);
    }
    Ok((by_digest, all))
}

/// `GET .../artifacts?media_type=&tagged=true|false`, newest push first.
pub async fn list(ctx: &Ctx<'_>, registry: &str, image: &str) -> Result<Response<Body>> {
    let (_, repo) = existing_repo(ctx, registry, image, Action::Read(Some(registry))).await?;
    let page = Page::of(ctx)?;
    let media_type = ctx.query("media_type").filter(|m| !m.is_empty());
    let tagged = match ctx.query("tagged").as_deref() {
        None | Some("") => None,
        Some("true") => Some(true),
        Some("false") => Some(false),
        Some(other) => {
            return Err(Error::BadRequest(format!(
                "tagged={other:?}: expected true or false"
            )))
        }
    };
    let store = &ctx.app.store;
    // Pulls are batched in memory; write them so last_pull is current.
    store.pulls.flush(&*store.meta).await?;
    let (by_digest, all_tags) = tag_map(store, repo.as_str()).await?;
    let mut artifacts: Vec<(Digest, ArtifactRecord)> = store
        .meta
        .artifacts(repo.as_str(), None, usize::MAX)
        .await?
        .into_iter()
        .filter(|(_, a)| media_type.as_ref().is_none_or(|m| *m == a.media_type))
        .filter(|(d, _)| tagged.is_none_or(|t| by_digest.contains_key(d) == t))
        .collect();
    artifacts.sort_by(|a, b| b.1.pushed_ms.cmp(&a.1.pushed_ms).then(a.0.cmp(&b.0)));
    let (total, artifacts) = page.slice(artifacts);
    let mut shown = Vec::with_capacity(artifacts.len());
    for (d, a) in &artifacts {
        let tags = by_digest.get(d).map(Vec::as_slice).unwrap_or(&[]);
        shown.push(artifact_view(store, repo.as_str(), d, a, tags, &all_tags).await?);
    }
    page.envelope(ctx, total, shown)
}

/// `GET .../artifacts/{digest}`.
pub async fn get(
    ctx: &Ctx<'_>,
    registry: &str,
    image: &str,
    digest: &str,
) -> Result<Response<Body>> {
    let (_, repo) = existing_repo(ctx, registry, image, Action::Read(Some(registry))).await?;
    let digest = Digest::parse(digest)?;
    let store = &ctx.app.store;
    store.pulls.flush(&*store.meta).await?;
    let record = store
        .meta
        .artifact(repo.as_str(), &digest)
        .await?
        .ok_or_else(|| Error::ManifestUnknown(format!("artifact {digest} is not in {repo}")))?;
    let (by_digest, all_tags) = tag_map(store, repo.as_str()).await?;
    let tags = by_digest.get(&digest).map(Vec::as_slice).unwrap_or(&[]);
    let v = artifact_view(store, repo.as_str(), &digest, &record, tags, &all_tags).await?;
    json(StatusCode::OK, &v)
}

/// `DELETE .../artifacts/{digest}`: the artifact and every tag pointing at it.
pub async fn delete(
    ctx: &Ctx<'_>,
    registry: &str,
    image: &str,
    digest: &str,
) -> Result<Response<Body>> {
    let full = format!("{registry}/{image}");
    let (_, repo) = existing_repo(ctx, registry, image, Action::Delete(&full)).await?;
    let digest = Digest::parse(digest)?;
    let removed = crate::registry::manifests::remove(
        ctx.app,
        &repo,
        &crate::oci::reference::Reference::Digest(digest.clone()),
        ctx.req.principal.name(),
    )
    .await?;
    let tags = removed.tags;
    json(
        StatusCode::OK,
        &ArtifactDeleted {
            deleted_tags: tags,
            digest: digest.to_string(),
        },
    )
}
