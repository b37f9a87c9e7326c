//! Images and tags of a registry: `/api/v1/registries/{registry}/images[/{image}[/tags...]]`.

use http::{Response, StatusCode};

use super::page::{matches_q, Page};
use super::registries::visible;
use super::views::{ImageDeleted, ImageView, TagSet, TagView};
use super::{json, rfc3339, Ctx};
use crate::auth::Action;
use crate::config::RegistryKind;
use crate::error::{Error, Result};
use crate::events::{EventKind, Happened};
use crate::http::body::Body;
use crate::oci::digest::Digest;
use crate::oci::reference::{validate_tag, Reference, RepoName};
use crate::store::meta::RegistryRecord;

/// Authorizes `action`, then resolves a visible registry and a valid repository name in it.
pub fn repo(
    ctx: &Ctx<'_>,
    registry: &str,
    image: &str,
    action: Action<'_>,
) -> Result<(RegistryRecord, RepoName)> {
    ctx.check(action)?;
    let r = visible(ctx, registry)?;
    let repo = RepoName::parse(&format!("{registry}/{image}"))?;
    Ok((r, repo))
}

/// Like [`repo`], and the repository must hold artifacts.
pub async fn existing_repo(
    ctx: &Ctx<'_>,
    registry: &str,
    image: &str,
    action: Action<'_>,
) -> Result<(RegistryRecord, RepoName)> {
    let (r, repo) = repo(ctx, registry, image, action)?;
    if !ctx.app.store.meta.repo_exists(repo.as_str()).await? {
        return Err(Error::NameUnknown(format!("image {repo} does not exist")));
    }
    Ok((r, repo))
}

/// `GET /api/v1/registries/{registry}/images?q=`: name, artifact and tag counts, last push.
pub async fn list(ctx: &Ctx<'_>, registry: &str) -> Result<Response<Body>> {
    ctx.check(Action::Read(Some(registry)))?;
    visible(ctx, registry)?;
    let q = ctx.query("q");
    let meta = &ctx.app.store.meta;
    let prefix = format!("{registry}/");
    let images: Vec<String> = meta
        .repositories(Some(registry), None, usize::MAX)
        .await?
        .into_iter()
        .filter_map(|repo| repo.strip_prefix(&prefix).map(str::to_string))
        .filter(|image| matches_q(&q, image))
        .collect();
    let page = Page::of(ctx)?;
    let (total, images) = page.slice(images);
    let mut shown = Vec::with_capacity(images.len());
    for image in images {
        let repo = format!("{prefix}{image}");
        let artifacts = meta.artifacts(&repo, None, usize::MAX).await?;
        let tags = meta.tags(&repo, None, usize::MAX).await?.len();
        let last_push = artifacts.iter().map(|(_, a)| a.pushed_ms).max();
        shown.push(ImageView {
            artifact_count: artifacts.len(),
            last_push: last_push.map(rfc3339),
            name: image,
            repository: repo,
            tag_count: tags,
        });
    }
    page.envelope(ctx, total, shown)
}

/// `DELETE /api/v1/registries/{registry}/images/{image}`: every artifact and tag of the image,
/// and its blob links (so garbage collection can reclaim blobs no other image uses).
pub async fn delete(ctx: &Ctx<'_>, registry: &str, image: &str) -> Result<Response<Body>> {
    let full = format!("{registry}/{image}");
    let (_, repo) = existing_repo(ctx, registry, image, Action::Delete(&full)).await?;
    // All or nothing: an image with a protected tag keeps every artifact.
    crate::registry::manifests::refuse_protected_artifact(ctx.app, &repo, None).await?;
    let meta = &ctx.app.store.meta;
    let (mut artifacts, mut tags) = (0, 0);
    for (digest, _) in meta.artifacts(repo.as_str(), None, usize::MAX).await? {
        let removed = crate::registry::manifests::remove(
            ctx.app,
            &repo,
            &Reference::Digest(digest),
            ctx.req.principal.name(),
        )
        .await?;
        artifacts += 1;
        tags += removed.tags.len();
    }
    // Unlinked blobs become garbage for the collector unless another image links them.
    for blob in meta.linked_blobs(repo.as_str(), None, usize::MAX).await? {
        meta.unlink_blob(repo.as_str(), &blob).await?;
    }
    meta.remove_repo_if_empty(repo.as_str()).await?;
    meta.flush().await?;
    json(
        StatusCode::OK,
        &ImageDeleted {
            deleted_artifacts: artifacts,
            deleted_tags: tags,
            repository: repo.to_string(),
        },
    )
}

/// A doublestar glob (DESIGN.md 9): `*` stays inside one path component, `**` crosses them.
pub fn glob(pattern: &str) -> Result<crate::policy::pattern::Pattern> {
    crate::policy::pattern::Pattern::new(pattern).map_err(|e| Error::BadRequest(e.to_string()))
}

/// `GET /api/v1/registries/{registry}/images/{image}/tags?pattern=GLOB`.
pub async fn tags(ctx: &Ctx<'_>, registry: &str, image: &str) -> Result<Response<Body>> {
    let (_, repo) = existing_repo(ctx, registry, image, Action::Read(Some(registry))).await?;
    let matcher = match ctx.query("pattern").filter(|p| !p.is_empty()) {
        Some(p) => Some(glob(&p)?),
        None => None,
    };
    let meta = &ctx.app.store.meta;
    let tags: Vec<String> = meta
        .tags(repo.as_str(), None, usize::MAX)
        .await?
        .into_iter()
        .filter(|t| matcher.as_ref().is_none_or(|m| m.matches(t)))
        .collect();
    let page = Page::of(ctx)?;
    let (total, tags) = page.slice(tags);
    let mut shown = Vec::with_capacity(tags.len());
    for t in tags {
        let digest = meta.tag(repo.as_str(), &t).await?;
        shown.push(TagView {
            digest: digest.map(|d| d.to_string()),
            name: t,
        });
    }
    page.envelope(ctx, total, shown)
}

pub use super::views::NewTag;

/// `POST /api/v1/registries/{registry}/images/{image}/tags`: creates or moves a tag onto an
/// existing artifact; refused in cache registries, whose tags mirror the source.
pub async fn put_tag(
    ctx: &Ctx<'_>,
    registry: &str,
    image: &str,
    body: NewTag,
) -> Result<Response<Body>> {
    let full = format!("{registry}/{image}");
    let (r, repo) = repo(ctx, registry, image, Action::Push(&full))?;
    if r.kind == RegistryKind::Cache {
        return Err(Error::Denied(format!(
            "registry {registry:?} is a pull-through cache: its tags follow the source and cannot be set"
        )));
    }
    validate_tag(&body.tag)?;
    let digest = Digest::parse(&body.digest)?;
    let meta = &ctx.app.store.meta;
    let unknown = || Error::ManifestUnknown(format!("artifact {digest} is not in {repo}"));
    let record = meta
        .artifact(repo.as_str(), &digest)
        .await?
        .ok_or_else(unknown)?;
    crate::registry::manifests::refuse_protected_tag(
        ctx.app,
        &repo,
        &body.tag,
        "tag change refused",
    )
    .await?;
    let previous = meta.tag(repo.as_str(), &body.tag).await?;
    // Checked again under the repository's lock: a delete racing this request wins cleanly.
    if !meta.tag_artifact(repo.as_str(), &digest, &body.tag).await? {
        return Err(unknown());
    }
    meta.flush().await?;
    ctx.app.events.emit(Happened {
        kind: EventKind::CreateTag,
        operator: ctx.req.principal.name(),
        repository: repo.as_str(),
        tag: Some(&body.tag),
        digest: digest.as_str(),
        media_type: &record.media_type,
        size: record.size,
    });
    let status = if previous.is_some() {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    json(
        status,
        &TagSet {
            digest: digest.to_string(),
            name: body.tag,
            previous: previous.map(|d| d.to_string()),
        },
    )
}

/// `DELETE /api/v1/registries/{registry}/images/{image}/tags/{tag}`: the artifact stays.
pub async fn delete_tag(
    ctx: &Ctx<'_>,
    registry: &str,
    image: &str,
    tag: &str,
) -> Result<Response<Body>> {
    let full = format!("{registry}/{image}");
    let (_, repo) = existing_repo(ctx, registry, image, Action::Delete(&full)).await?;
    validate_tag(tag)?;
    let digest = crate::registry::manifests::remove(
        ctx.app,
        &repo,
        &Reference::Tag(tag.into()),
        ctx.req.principal.name(),
    )
    .await?
    .digest;
    json(
        StatusCode::OK,
        &TagView {
            digest: Some(digest.to_string()),
            name: tag.to_string(),
        },
    )
}
