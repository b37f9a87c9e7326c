//! Manifests of origin registries: `PUT` with validation, `DELETE` by tag or digest (reads are
//! served by `serve::manifests`).

use crate::http::req::RequestBody;
use http::{header, Response, StatusCode};

use super::{empty, set, Req};
use crate::error::{Error, Result};
use crate::events::{EventKind, Happened};
use crate::http::body::Body;
use crate::http::req::read_limited;
use crate::oci::digest::Digest;
use crate::oci::manifest;
use crate::oci::reference::{Reference, RepoName};
use crate::store::meta::{ArtifactRecord, Refers};
use crate::App;

/// `PUT /v2/NAME/manifests/REFERENCE`.
pub async fn put(
    app: &App,
    repo: &RepoName,
    reference: &str,
    req: &Req<'_>,
    body: impl RequestBody,
) -> Result<Response<Body>> {
    let reference = Reference::parse(reference)?;
    let limit = app.config.limits.max_manifest_bytes;
    if let Some(len) = req
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
    {
        if len > limit as u64 {
            return Err(Error::ManifestTooLarge { size: len, limit });
        }
    }
    let content_type = req
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or("").trim())
        .filter(|v| !v.is_empty());
    let bytes = read_limited(body, limit).await?;
    let parsed = manifest::parse(&bytes, content_type)?;
    let digest = match &reference {
        Reference::Digest(d) => {
            let actual = Digest::of(d.algorithm(), &bytes);
            if &actual != d {
                return Err(Error::DigestInvalid(format!(
                    "manifest body has digest {actual}, not {d}"
                )));
            }
            actual
        }
        Reference::Tag(_) => Digest::sha256(&bytes),
    };
    let tag = match &reference {
        Reference::Tag(t) => Some(&**t),
        Reference::Digest(_) => None,
    };
    if let Some(t) = tag {
        refuse_protected_tag(app, repo, t, "push refused").await?;
    }
    // The repository must hold every blob and child manifest, checked where the artifact is
    // recorded (one metadata step, so nothing removed meanwhile is referred to).
    let refers = Refers::of(&parsed);
    // A new manifest's bytes count against the quota; another tag for one it holds does not.
    if app
        .store
        .meta
        .artifact(repo.as_str(), &digest)
        .await?
        .is_none()
    {
        super::quota::check(app, repo.as_str(), bytes.len() as u64).await?;
    }
    crate::serve::manifests::store(app, repo.as_str(), &digest, &bytes, &parsed, tag, &refers)
        .await?;
    let pushed = |kind, tag| Happened {
        kind,
        operator: req.principal.name(),
        repository: repo.as_str(),
        tag,
        digest: digest.as_str(),
        media_type: &parsed.media_type,
        size: bytes.len() as u64,
    };
    app.events.emit(pushed(EventKind::PushArtifact, tag));
    if tag.is_some() {
        app.events.emit(pushed(EventKind::CreateTag, tag));
    }
    tracing::debug!(%repo, %reference, %digest, media_type = %parsed.media_type, "manifest stored");
    let mut r = empty(StatusCode::CREATED);
    set(
        &mut r,
        header::LOCATION,
        &format!("/v2/{repo}/manifests/{digest}"),
    );
    set(&mut r, "docker-content-digest", digest.as_str());
    if let Some(subject) = &parsed.subject {
        set(&mut r, "oci-subject", subject.digest.as_str());
    }
    Ok(r)
}

/// Refuses (412) a change to an existing tag that a protection policy protects: a push over it
/// (with any digest, the same one included), its deletion, or its artifact's.
pub async fn refuse_protected_tag(app: &App, repo: &RepoName, tag: &str, what: &str) -> Result<()> {
    let Some(p) = app.policies.protecting(repo.registry(), repo.image(), tag) else {
        return Ok(());
    };
    if app.store.meta.tag(repo.as_str(), tag).await?.is_none() {
        return Ok(());
    }
    tracing::warn!(repository = %repo, %tag, policy = %p.id, "{what}: the tag is protected");
    Err(p.refusal(what, repo.as_str(), tag))
}

/// Refuses (412) the deletion of an artifact that has a protected tag (`None`: of any artifact
/// of the repository, for deleting a whole image).
pub async fn refuse_protected_artifact(
    app: &App,
    repo: &RepoName,
    digest: Option<&Digest>,
) -> Result<()> {
    let protections = app.policies.protections(repo.registry());
    if protections.is_empty() {
        return Ok(());
    }
    for (tag, tagged) in app.store.meta.tagged(repo.as_str()).await? {
        let Some(p) = protections.iter().find(|p| p.protects(repo.image(), &tag)) else {
            continue;
        };
        if digest.is_none_or(|d| *d == tagged) {
            let what = format!("deletion of {tagged} refused");
            tracing::warn!(repository = %repo, %tag, digest = %tagged, policy = %p.id, "{what}: a tag of the artifact is protected");
            return Err(p.refusal(&what, repo.as_str(), &tag));
        }
    }
    Ok(())
}

/// What a removal took away.
pub struct Removed {
    /// The artifact the reference named.
    pub digest: Digest,
    /// Tags removed (the tag itself, or every tag of a removed artifact).
    pub tags: Vec<String>,
}

/// `DELETE /v2/NAME/manifests/REFERENCE`: a tag removes the tag; a digest removes the artifact
/// and every tag pointing at it. `operator` is who asked (for the events).
pub async fn delete(
    app: &App,
    repo: &RepoName,
    reference: &str,
    operator: &str,
) -> Result<Response<Body>> {
    remove(app, repo, &Reference::parse(reference)?, operator).await?;
    Ok(empty(StatusCode::ACCEPTED))
}

/// Removes a tag, or an artifact with its tags (the one removal of `/v2/` and `/api/v1/`):
/// invalidates the hot cache, drops an emptied repository from the catalog, flushes, then
/// publishes DELETE_TAG / DELETE_ARTIFACT.
pub async fn remove(
    app: &App,
    repo: &RepoName,
    reference: &Reference,
    operator: &str,
) -> Result<Removed> {
    let meta = &app.store.meta;
    let unknown = || Error::ManifestUnknown(format!("{reference} is not in {repo}"));
    let registry = repo.registry();
    let publish = |kind, tag: Option<&str>, digest: &Digest, record: &Option<ArtifactRecord>| {
        let (media_type, size) = record
            .as_ref()
            .map_or(("", 0), |r| (r.media_type.as_str(), r.size));
        app.events.emit(Happened {
            kind,
            operator,
            repository: repo.as_str(),
            tag,
            digest: digest.as_str(),
            media_type,
            size,
        });
    };
    match reference {
        Reference::Tag(t) => {
            refuse_protected_tag(app, repo, t, "tag deletion refused").await?;
            let digest = meta
                .delete_tag(repo.as_str(), t)
                .await?
                .ok_or_else(unknown)?;
            meta.flush().await?;
            if app.events.wants(EventKind::DeleteTag, registry) {
                let record = meta.artifact(repo.as_str(), &digest).await?;
                publish(EventKind::DeleteTag, Some(t), &digest, &record);
            }
            Ok(Removed {
                digest,
                tags: vec![t.to_string()],
            })
        }
        Reference::Digest(d) => {
            refuse_protected_artifact(app, repo, Some(d)).await?;
            // Read before deleting: the events carry the media type and size.
            let record = meta.artifact(repo.as_str(), d).await?;
            let tags = meta
                .delete_artifact(repo.as_str(), d)
                .await?
                .ok_or_else(unknown)?;
            meta.remove_repo_if_empty(repo.as_str()).await?;
            meta.flush().await?;
            publish(EventKind::DeleteArtifact, None, d, &record);
            // The artifact's tags went with it.
            for t in &tags {
                publish(EventKind::DeleteTag, Some(t), d, &record);
            }
            Ok(Removed {
                digest: d.clone(),
                tags,
            })
        }
    }
}
