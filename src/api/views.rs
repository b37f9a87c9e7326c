//! The typed views of the management API: one struct per resource, what a handler answers and
//! what the CLI reads back (from the handlers in this process on a data directory, or over HTTP
//! from `--server`), so both sides share one type and cannot drift apart. Request bodies the CLI
//! sends are here too.
//!
//! The wire format is the API's contract (`openapi.json`): optional fields the API has always
//! sent as `null` stay `null` (no `skip_serializing_if`), fields that appear only in some answers
//! (`note`, `applies`, `keys`, `secret`) are omitted when absent. Fields are declared in
//! alphabetical order, which is the order these objects had when they were built as
//! `serde_json::Value` maps, so the bytes on the wire did not change either.

use serde::{Deserialize, Serialize};

use crate::auth::users::{KeyRecord, UserRecord};
use crate::auth::Role;
use crate::config::{ImageCacheConfig, RegistryKind};
use crate::store::meta::RegistryRecord;

use super::rfc3339;

pub use crate::events::views::{DeliveryList, DeliveryView, WebhookList, WebhookView};

/// One page of a list: `{"items","page","page_size","total"}` (`Link: rel="next"` when more
/// pages follow).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Paged<T> {
    /// The items of this page.
    pub items: Vec<T>,
    /// 1-based page number.
    pub page: usize,
    /// Items per page.
    pub page_size: usize,
    /// Items of every page.
    pub total: usize,
}

/// A registry (`/registries[/{registry}]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegistryView {
    /// Anyone may pull without credentials.
    pub anonymous_pull: bool,
    /// Cache registries: the image cache they serve (`null` otherwise).
    pub cache: Option<String>,
    /// Creation time, RFC 3339.
    pub created: String,
    /// Images (repositories) it holds.
    pub image_count: usize,
    /// Name.
    pub name: String,
    /// Why the registry does not serve yet (its image cache was defined after the start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// Reachable on public listeners.
    pub public_uri: bool,
    /// `normal` or `cache`.
    #[serde(rename = "type")]
    pub kind: RegistryKind,
}

impl RegistryView {
    /// The view of a stored registry holding `image_count` images (no note).
    pub fn of(r: &RegistryRecord, image_count: usize) -> RegistryView {
        RegistryView {
            anonymous_pull: r.anonymous_pull,
            cache: r.cache.clone(),
            created: rfc3339(r.created_ms),
            image_count,
            name: r.name.clone(),
            note: None,
            public_uri: r.public_uri,
            kind: r.kind,
        }
    }
}

/// Body of `POST /registries`: the fields of a `[[registry]]` table, with its defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewRegistry {
    /// First path segment of every image in it.
    pub name: String,
    /// `normal` (push and pull) or `cache` (pull-through).
    #[serde(rename = "type", default)]
    pub kind: RegistryKind,
    /// For `type = "cache"`: the image cache it serves.
    #[serde(default)]
    pub cache: Option<String>,
    /// Reachable on public listeners (false: only on private ones).
    #[serde(default = "crate::config::yes")]
    pub public_uri: bool,
    /// Anyone may pull without credentials.
    #[serde(default)]
    pub anonymous_pull: bool,
}

impl NewRegistry {
    /// The record of the registry this body creates (created now).
    pub fn record(&self) -> RegistryRecord {
        RegistryRecord {
            name: self.name.clone(),
            kind: self.kind,
            created_ms: crate::store::meta::now_ms(),
            cache: self.cache.clone(),
            public_uri: self.public_uri,
            anonymous_pull: self.anonymous_pull,
        }
    }
}

/// Answer of `DELETE /registries/{registry}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegistryDeleted {
    /// Images whose records were removed with it.
    pub deleted_images: usize,
    /// Name.
    pub name: String,
}

/// An image cache (`/image-caches[/{name}]`): credentials are reduced to a description
/// (`user u, password set`), never shown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageCacheView {
    /// When a change takes effect (answers of create and update).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applies: Option<String>,
    /// `anonymous`, `user U`, `user U, password set`, `password set` or `file PATH`.
    pub credentials: String,
    /// Fetch budget, humantime text.
    pub fetch_budget: String,
    /// Source kind.
    pub kind: String,
    /// Whether the running server has built its source (else: from the next restart on).
    pub loaded: bool,
    /// Name.
    pub name: String,
    /// Revalidation TTL, humantime text.
    pub revalidate_ttl: String,
    /// Source URL.
    pub url: String,
}

impl ImageCacheView {
    /// The view of an image cache definition, `loaded` or not by the running server (no
    /// `applies`).
    pub fn of(c: &ImageCacheConfig, loaded: bool) -> ImageCacheView {
        let credentials = match (&c.credentials_file, &c.username, &c.password) {
            (Some(f), _, _) => format!("file {}", f.display()),
            (None, Some(u), Some(_)) => format!("user {u}, password set"),
            (None, Some(u), None) => format!("user {u}"),
            (None, None, Some(_)) => "password set".into(),
            (None, None, None) => "anonymous".into(),
        };
        ImageCacheView {
            applies: None,
            credentials,
            fetch_budget: humantime::format_duration(c.fetch_budget).to_string(),
            kind: c.kind.to_string(),
            loaded,
            name: c.name.clone(),
            revalidate_ttl: humantime::format_duration(c.revalidate_ttl).to_string(),
            url: c.url.clone(),
        }
    }
}

/// Answer of `DELETE /image-caches/{name}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageCacheDeleted {
    /// When the deletion takes effect.
    pub applies: String,
    /// Name.
    pub name: String,
}

/// Body of `POST /cache/prune`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Prune {
    /// Report only.
    #[serde(default)]
    pub dry_run: bool,
    /// Age since the last pull, e.g. `7d` (default: `pull_through.cleanup_unpulled_after`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unpulled_for: Option<String>,
}

/// Answer of `POST /cache/prune`: what was (or, dry, would be) removed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PruneReport {
    /// Artifacts of cache registries not pulled for long enough.
    pub artifacts: Vec<PrunedArtifact>,
    /// Blobs nothing references any more.
    pub blobs: Vec<PrunedBlob>,
    /// Bytes of those blobs.
    pub bytes: u64,
    /// Whether nothing was removed.
    pub dry_run: bool,
}

/// An artifact in a [`PruneReport`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrunedArtifact {
    /// Its digest.
    pub digest: String,
    /// Last pull, RFC 3339.
    pub last_pull: String,
    /// Its repository.
    pub repository: String,
    /// Tags that pointed at it.
    pub tags: Vec<String>,
}

/// A blob in a [`PruneReport`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrunedBlob {
    /// Its digest.
    pub digest: String,
    /// Its size in bytes.
    pub size: u64,
}

impl PruneReport {
    /// The view of a sweep report.
    pub fn of(report: &crate::cache::sweep::SweepReport, dry_run: bool) -> PruneReport {
        PruneReport {
            artifacts: report
                .artifacts
                .iter()
                .map(|(repo, digest, tags, last)| PrunedArtifact {
                    digest: digest.clone(),
                    last_pull: rfc3339(*last),
                    repository: repo.clone(),
                    tags: tags.clone(),
                })
                .collect(),
            blobs: report
                .blobs
                .iter()
                .map(|(digest, size)| PrunedBlob {
                    digest: digest.clone(),
                    size: *size,
                })
                .collect(),
            bytes: report.bytes(),
            dry_run,
        }
    }
}

/// An image (repository) of a registry (`/registries/{registry}/images`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageView {
    /// Artifacts (manifests) it holds.
    pub artifact_count: usize,
    /// Latest push, RFC 3339 (`null`: none recorded).
    pub last_push: Option<String>,
    /// Name inside the registry.
    pub name: String,
    /// Full repository name (`registry/name`).
    pub repository: String,
    /// Tags it holds.
    pub tag_count: usize,
}

/// Answer of `DELETE /registries/{registry}/images/{image}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageDeleted {
    /// Artifacts removed.
    pub deleted_artifacts: usize,
    /// Tags removed.
    pub deleted_tags: usize,
    /// Full repository name.
    pub repository: String,
}

/// A tag (`/registries/{registry}/images/{image}/tags`, and the answer of deleting one).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TagView {
    /// Digest it points at (`null` in a list when it vanished meanwhile).
    pub digest: Option<String>,
    /// Tag.
    pub name: String,
}

/// Body of `POST /registries/{registry}/images/{image}/tags`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewTag {
    /// Tag name.
    pub tag: String,
    /// Digest of an artifact already in the image.
    pub digest: String,
}

/// Answer of `POST /registries/{registry}/images/{image}/tags`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TagSet {
    /// Digest it points at now.
    pub digest: String,
    /// Tag.
    pub name: String,
    /// Digest it pointed at before (`null`: a new tag).
    pub previous: Option<String>,
}

/// An artifact (`/registries/{registry}/images/{image}/artifacts[/{digest}]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArtifactView {
    /// Artifact type (or `null`).
    pub artifact_type: Option<String>,
    /// Digest.
    pub digest: String,
    /// Last pull, RFC 3339 (`null`: never pulled).
    pub last_pull: Option<String>,
    /// Manifest length in bytes.
    pub manifest_size: u64,
    /// Manifest media type.
    pub media_type: String,
    /// `os/arch[/variant]` of each platform it holds.
    pub platforms: Vec<String>,
    /// Push time, RFC 3339.
    pub pushed: String,
    /// Whether a cosign signature tag or a referrer points at it.
    pub signed: bool,
    /// Total size: manifest and everything it references.
    pub size: u64,
    /// Subject digest (`null`: none).
    pub subject: Option<String>,
    /// Tags pointing at it.
    pub tags: Vec<String>,
}

/// Answer of `DELETE .../artifacts/{digest}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArtifactDeleted {
    /// Tags removed with it.
    pub deleted_tags: Vec<String>,
    /// Digest.
    pub digest: String,
}

/// A user (`/users[/{name}]`): keys counted; listed (without secrets) only by `GET /users/{name}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserView {
    /// Creation time, RFC 3339.
    pub created: String,
    /// Access keys of the user.
    pub key_count: usize,
    /// The keys themselves (`GET /users/{name}` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<Vec<KeyView>>,
    /// Login name.
    pub name: String,
    /// Registries the role covers (empty: all).
    pub registries: Vec<String>,
    /// Role.
    pub role: Role,
}

impl UserView {
    /// The view of a user with `key_count` keys (no key list).
    pub fn of(u: &UserRecord, key_count: usize) -> UserView {
        UserView {
            created: rfc3339(u.created_ms),
            key_count,
            keys: None,
            name: u.name.clone(),
            registries: u.registries.clone(),
            role: u.role,
        }
    }
}

/// Body of `POST /users`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewUser {
    /// Login name.
    pub name: String,
    /// admin, viewer or image_uploader.
    pub role: Role,
    /// Registries the role covers; empty or absent: all.
    #[serde(default)]
    pub registries: Vec<String>,
}

/// Answer of `DELETE /users/{name}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserDeleted {
    /// Login name.
    pub name: String,
}

/// An access key: id, age and whether it is due for rotation; the secret only in the answer
/// that creates it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyView {
    /// Whole days since its creation.
    pub age_days: u64,
    /// Creation time, RFC 3339.
    pub created: String,
    /// Access Key ID.
    pub id: String,
    /// Older than the rotation age.
    pub rotation_due: bool,
    /// The secret (`POST /users/{name}/keys` only: the one time it is shown).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// Owner.
    pub user: String,
}

impl KeyView {
    /// The view of a key (never its secret or hash).
    pub fn of(k: &KeyRecord) -> KeyView {
        KeyView {
            age_days: k.age().as_secs() / 86_400,
            created: rfc3339(k.created_ms),
            id: k.id.clone(),
            rotation_due: k.is_old(),
            secret: None,
            user: k.user.clone(),
        }
    }
}

/// Answer of `DELETE /users/{name}/keys/{id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyRevoked {
    /// Access Key ID.
    pub id: String,
    /// Owner.
    pub user: String,
}
