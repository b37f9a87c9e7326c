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
    /// Most bytes its images may store (absent: no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota_bytes: Option<u64>,
    /// `normal` or `cache`.
    #[serde(rename = "type")]
    pub kind: RegistryKind,
    /// What it stores (bytes and blobs each counted once however many of its images share
    /// them, how many of those other registries hold too, artifacts), kept by the writes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<RegistryUsageView>,
}

/// What a registry stores (`usage` in its view).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryUsageView {
    /// Bytes of its distinct blobs and manifests (a layer its images share counts once).
    pub bytes: u64,
    /// Its distinct blobs and manifests.
    pub blobs: u64,
    /// Of those, how many another registry holds too (deleting this one does not free them).
    pub shared_blobs: u64,
    /// Its artifacts (manifests, per repository).
    pub artifacts: u64,
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
            quota_bytes: r.quota_bytes,
            kind: r.kind,
            usage: None,
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
    /// Most bytes its images may store (none or 0: no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota_bytes: Option<u64>,
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
            quota_bytes: self.quota_bytes.filter(|q| *q > 0),
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
    /// Whether the running server has built its source (false: it could not, the log says why).
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

/// A change to an image cache: only the fields given change. The body of the API's PATCH, and
/// what `berth cache create|update` send. `Debug` never shows the password.
#[derive(Default, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct CachePatch {
    /// Source kind.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<crate::config::SourceKind>,
    /// Source URL.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// User.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Password or token (write-only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// Credentials file on the server.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credentials_file: Option<std::path::PathBuf>,
    /// Fetch budget, e.g. `200s`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fetch_budget: Option<String>,
    /// Revalidation TTL, e.g. `30s`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revalidate_ttl: Option<String>,
    /// ECR region.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// ECR API endpoint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ecr_endpoint: Option<String>,
}

impl std::fmt::Debug for CachePatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachePatch")
            .field("kind", &self.kind)
            .field("url", &self.url)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("credentials_file", &self.credentials_file)
            .field("fetch_budget", &self.fetch_budget)
            .field("revalidate_ttl", &self.revalidate_ttl)
            .field("region", &self.region)
            .field("ecr_endpoint", &self.ecr_endpoint)
            .finish()
    }
}

impl CachePatch {
    /// Applies the given fields; a duration that does not parse is refused with its field name.
    pub fn apply(self, c: &mut ImageCacheConfig) -> Result<(), String> {
        let duration = |field: &str, text: &str| {
            humantime::parse_duration(text)
                .map_err(|e| format!("{field}: {text:?} is not a duration: {e}"))
        };
        if let Some(k) = self.kind {
            c.kind = k;
        }
        if let Some(u) = self.url {
            c.url = u;
        }
        if let Some(u) = self.username {
            c.username = Some(u);
        }
        if let Some(p) = self.password {
            c.password = Some(p);
        }
        if let Some(f) = self.credentials_file {
            c.credentials_file = Some(f);
        }
        if let Some(b) = self.fetch_budget {
            c.fetch_budget = duration("fetch_budget", &b)?;
        }
        if let Some(t) = self.revalidate_ttl {
            c.revalidate_ttl = duration("revalidate_ttl", &t)?;
        }
        if let Some(r) = self.region {
            c.region = Some(r);
        }
        if let Some(e) = self.ecr_endpoint {
            c.ecr_endpoint = Some(e);
        }
        Ok(())
    }
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
    /// Unreferenced blobs younger than this are kept, e.g. `10m` (default:
    /// `pull_through.gc_grace`; an upload or fetch may be about to reference them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace: Option<String>,
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
    /// Unreferenced blobs kept because they are younger than the grace period.
    pub kept_for_grace: usize,
    /// Bytes of those.
    pub kept_for_grace_bytes: u64,
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
            kept_for_grace: report.kept_young.0,
            kept_for_grace_bytes: report.kept_young.1,
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
    /// The first admin's first access key, secret included, in the answer that created it
    /// on a server that had no user (the caller could not create one afterwards: auth turns
    /// on with that user).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_key: Option<KeyView>,
}

impl UserView {
    /// The view of a user with `key_count` keys (no key list).
    pub fn of(u: &UserRecord, key_count: usize) -> UserView {
        UserView {
            created: rfc3339(u.created_ms),
            first_key: None,
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
/// that creates it (and never in `Debug`).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
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

impl std::fmt::Debug for KeyView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyView")
            .field("age_days", &self.age_days)
            .field("created", &self.created)
            .field("id", &self.id)
            .field("rotation_due", &self.rotation_due)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("user", &self.user)
            .finish()
    }
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

/// Answer of `GET /status`: what this node runs and what its sources are doing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusView {
    /// Git commit berth was built from.
    pub commit: String,
    /// How many of each thing the node holds.
    pub counts: StatusCounts,
    /// One entry per image cache, by name.
    pub sources: Vec<SourceStatus>,
    /// When the process started, RFC 3339.
    pub started: String,
    /// The data directory and its volume.
    pub storage: StorageStatus,
    /// Seconds since the start.
    pub uptime_seconds: u64,
    /// berth's version.
    pub version: String,
}

/// Counts of `GET /status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusCounts {
    /// Image caches (sources) defined.
    pub image_caches: usize,
    /// Registries (normal and cache).
    pub registries: usize,
    /// Users.
    pub users: usize,
}

/// Storage of `GET /status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StorageStatus {
    /// Bytes of the committed blobs at the last count (every 5 minutes; `null` before the
    /// first).
    pub blob_bytes: Option<u64>,
    /// The data directory.
    pub data_dir: String,
    /// Bytes an unprivileged writer may still use on its volume (`limits.min_free_bytes` is
    /// compared with this).
    pub volume_free_bytes: u64,
    /// Bytes used on its volume (by anything).
    pub volume_used_bytes: u64,
}

/// One source in `GET /status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceStatus {
    /// Failed source requests since the last success.
    pub consecutive_failures: u64,
    /// Source kind.
    pub kind: String,
    /// The last failure (`null`: none since the start).
    pub last_error: Option<SourceError>,
    /// The last answer of the source, RFC 3339 with milliseconds (`null`: none since the
    /// start).
    pub last_success: Option<String>,
    /// Whether the running server has built its source.
    pub loaded: bool,
    /// Image cache name.
    pub name: String,
    /// Source URL.
    pub url: String,
}

/// The last failure of a source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceError {
    /// When, RFC 3339 with milliseconds.
    pub at: String,
    /// `connect`, `timeout`, `4xx`, `5xx`, `digest_mismatch`, `auth` or `refused` (the `kind`
    /// of `berth_upstream_errors_total`).
    pub kind: String,
    /// What happened.
    pub message: String,
}

impl SourceStatus {
    /// The status of image cache `c`, `loaded` or not, with its source's health.
    pub fn of(
        c: &ImageCacheConfig,
        loaded: bool,
        health: Option<&crate::cache::health::HealthSnapshot>,
    ) -> SourceStatus {
        let at = |t: std::time::SystemTime| humantime::format_rfc3339_millis(t).to_string();
        SourceStatus {
            consecutive_failures: health.map_or(0, |h| h.consecutive_failures),
            kind: c.kind.to_string(),
            last_error: health
                .and_then(|h| h.last_error.as_ref())
                .map(|e| SourceError {
                    at: at(e.at),
                    kind: e.kind.label().to_string(),
                    message: e.message.clone(),
                }),
            last_success: health.and_then(|h| h.last_success).map(at),
            loaded,
            name: c.name.clone(),
            url: c.url.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The view serializes to exactly the bytes of the `serde_json::json!` the handler built
    /// before views existed (`old`, copied from that code), and reads back as itself.
    fn same_bytes<T>(view: &T, old: serde_json::Value)
    where
        T: Serialize + for<'de> Deserialize<'de> + PartialEq + std::fmt::Debug,
    {
        let text = serde_json::to_string(view).unwrap();
        assert_eq!(text, old.to_string());
        assert_eq!(&serde_json::from_str::<T>(&text).unwrap(), view);
    }

    #[test]
    fn views_keep_the_bytes_the_handlers_sent_before() {
        let r = RegistryRecord {
            name: "hub".into(),
            kind: RegistryKind::Cache,
            created_ms: 1_700_000_000_000,
            cache: Some("up".into()),
            public_uri: false,
            anonymous_pull: true,
            quota_bytes: None,
        };
        let old = |r: &RegistryRecord| {
            json!({
                "name": r.name, "type": r.kind, "cache": r.cache, "public_uri": r.public_uri,
                "anonymous_pull": r.anonymous_pull, "created": rfc3339(r.created_ms),
                "image_count": 3,
            })
        };
        same_bytes(&RegistryView::of(&r, 3), old(&r));
        let mut noted = RegistryView::of(&r, 3);
        noted.note = Some("later".into());
        let mut v = old(&r);
        v["note"] = "later".into();
        same_bytes(&noted, v);
        let normal = RegistryRecord {
            kind: RegistryKind::Normal,
            cache: None,
            ..r.clone()
        };
        same_bytes(&RegistryView::of(&normal, 3), old(&normal));
        same_bytes(
            &RegistryDeleted {
                deleted_images: 2,
                name: "hub".into(),
            },
            json!({ "name": "hub", "deleted_images": 2 }),
        );

        let mut c = ImageCacheConfig::new("up", crate::config::SourceKind::Quay, "https://q.io");
        c.username = Some("bot".into());
        c.password = Some("s3cret".into());
        let mut view = ImageCacheView::of(&c, true);
        view.applies = Some("immediately".into());
        same_bytes(
            &view,
            json!({
                "name": "up", "kind": "quay", "url": "https://q.io",
                "credentials": "user bot, password set", "fetch_budget": "3m 20s",
                "revalidate_ttl": "0s", "loaded": true,
                "applies": "immediately",
            }),
        );
        assert!(!serde_json::to_string(&view).unwrap().contains("s3cret"));
        same_bytes(
            &ImageCacheDeleted {
                applies: "x".into(),
                name: "up".into(),
            },
            json!({ "name": "up", "applies": "x" }),
        );

        let report = crate::cache::sweep::SweepReport {
            artifacts: vec![(
                "hub/a".into(),
                "sha256:ab".into(),
                vec!["v1".into()],
                1_700_000_000_000,
            )],
            blobs: vec![("sha256:cd".into(), 7), ("sha256:ef".into(), 5)],
            kept_young: (1, 3),
        };
        same_bytes(
            &PruneReport::of(&report, true),
            json!({
                "dry_run": true,
                "artifacts": [{ "repository": "hub/a", "digest": "sha256:ab", "tags": ["v1"],
                    "last_pull": rfc3339(1_700_000_000_000) }],
                "blobs": [{ "digest": "sha256:cd", "size": 7 }, { "digest": "sha256:ef", "size": 5 }],
                "bytes": 12, "kept_for_grace": 1, "kept_for_grace_bytes": 3,
            }),
        );

        same_bytes(
            &ImageView {
                artifact_count: 2,
                last_push: None,
                name: "app".into(),
                repository: "lib/app".into(),
                tag_count: 1,
            },
            json!({ "name": "app", "repository": "lib/app", "artifact_count": 2, "tag_count": 1,
                "last_push": Option::<String>::None }),
        );
        same_bytes(
            &ImageDeleted {
                deleted_artifacts: 2,
                deleted_tags: 3,
                repository: "lib/app".into(),
            },
            json!({ "repository": "lib/app", "deleted_artifacts": 2, "deleted_tags": 3 }),
        );
        same_bytes(
            &TagView {
                digest: None,
                name: "v1".into(),
            },
            json!({ "name": "v1", "digest": Option::<String>::None }),
        );
        same_bytes(
            &TagSet {
                digest: "sha256:ab".into(),
                name: "v1".into(),
                previous: None,
            },
            json!({ "name": "v1", "digest": "sha256:ab", "previous": Option::<String>::None }),
        );
        same_bytes(
            &ArtifactView {
                artifact_type: None,
                digest: "sha256:ab".into(),
                last_pull: Some("2023-11-14T22:13:20Z".into()),
                manifest_size: 10,
                media_type: "m".into(),
                platforms: vec!["linux/amd64".into()],
                pushed: "2023-11-14T22:13:20Z".into(),
                signed: false,
                size: 99,
                subject: None,
                tags: vec!["v1".into()],
            },
            json!({
                "digest": "sha256:ab", "media_type": "m", "artifact_type": Option::<String>::None,
                "tags": ["v1"], "size": 99, "manifest_size": 10, "pushed": "2023-11-14T22:13:20Z",
                "last_pull": "2023-11-14T22:13:20Z", "platforms": ["linux/amd64"],
                "signed": false, "subject": Option::<String>::None,
            }),
        );
        same_bytes(
            &ArtifactDeleted {
                deleted_tags: vec!["v1".into()],
                digest: "sha256:ab".into(),
            },
            json!({ "digest": "sha256:ab", "deleted_tags": ["v1"] }),
        );

        let u = UserRecord {
            name: "ann".into(),
            role: Role::ImageUploader,
            registries: vec!["lib".into()],
            created_ms: 1_700_000_000_000,
        };
        let k = KeyRecord {
            id: "BK1".into(),
            user: "ann".into(),
            secret_hash: "$argon2id$x".into(),
            created_ms: 1_700_000_000_000,
        };
        let old_key = json!({
            "id": k.id, "user": k.user, "created": rfc3339(k.created_ms),
            "age_days": k.age().as_secs() / 86_400, "rotation_due": k.is_old(),
        });
        let mut user = UserView::of(&u, 1);
        let mut old_user = json!({
            "name": u.name, "role": u.role, "registries": u.registries,
            "created": rfc3339(u.created_ms), "key_count": 1,
        });
        same_bytes(&user, old_user.clone());
        user.keys = Some(vec![KeyView::of(&k)]);
        old_user["keys"] = json!([old_key.clone()]);
        same_bytes(&user, old_user);
        let mut created = KeyView::of(&k);
        created.secret = Some("shown-once".into());
        let mut old_created = old_key;
        old_created["secret"] = "shown-once".into();
        same_bytes(&created, old_created);
        assert!(!format!("{created:?}").contains("shown-once"));
        let patch = CachePatch {
            password: Some("patch-secret".into()),
            ..CachePatch::default()
        };
        assert!(!format!("{patch:?}").contains("patch-secret"));
        same_bytes(
            &KeyRevoked {
                id: "BK1".into(),
                user: "ann".into(),
            },
            json!({ "id": "BK1", "user": "ann" }),
        );
        same_bytes(
            &UserDeleted { name: "ann".into() },
            json!({ "name": "ann" }),
        );

        same_bytes(
            &Paged {
                items: vec![TagView {
                    digest: Some("sha256:ab".into()),
                    name: "v1".into(),
                }],
                page: 2,
                page_size: 1,
                total: 5,
            },
            json!({
                "items": [{ "name": "v1", "digest": "sha256:ab" }],
                "total": 5, "page": 2, "page_size": 1,
            }),
        );
    }

    #[test]
    fn webhook_views_keep_their_bytes_and_hide_credentials() {
        use crate::events::webhooks::{Delivery, DeliveryStatus, WebhookKind, WebhookPolicy};
        use crate::events::EventKind;
        let p = WebhookPolicy {
            id: "id1".into(),
            registry: "lib".into(),
            name: "n".into(),
            events: vec![EventKind::PushArtifact],
            target: "https://hooks.example/x".into(),
            kind: WebhookKind::Slack,
            auth_header: Some("Bearer hidden".into()),
            secret: None,
            enabled: true,
            created_ms: 5,
        };
        same_bytes(
            &p.view(),
            json!({
                "id": p.id, "registry": p.registry, "name": p.name, "events": p.events,
                "target": p.target, "kind": p.kind, "auth_header_set": true,
                "secret_set": false, "enabled": true, "created_ms": 5,
            }),
        );
        assert!(!serde_json::to_string(&p.view()).unwrap().contains("hidden"));
        let d = Delivery {
            id: 9,
            policy_id: "id1".into(),
            event: EventKind::PushArtifact,
            status: DeliveryStatus::Failed,
            attempts: 3,
            http_status: None,
            last_error: Some("refused".into()),
            created_ms: 1,
            updated_ms: 2,
        };
        same_bytes(&DeliveryView::of(&d), serde_json::to_value(&d).unwrap());
        same_bytes(
            &DeliveryList {
                items: vec![DeliveryView::of(&d)],
            },
            json!({ "items": [d] }),
        );
        same_bytes(
            &WebhookList {
                items: vec![p.view()],
                total: 1,
            },
            json!({ "items": [p.view()], "total": 1 }),
        );
    }

    /// The fields of a view's JSON.
    fn keys<T: Serialize>(view: &T) -> Vec<String> {
        let mut k: Vec<String> = serde_json::to_value(view)
            .unwrap()
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        k.sort();
        k
    }

    #[test]
    fn openapi_documents_every_field_of_every_view() {
        let doc: serde_json::Value = serde_json::from_str(super::super::OPENAPI).unwrap();
        let schema = |name: &str| -> Vec<String> {
            let mut k: Vec<String> = doc["components"]["schemas"][name]["properties"]
                .as_object()
                .unwrap_or_else(|| panic!("openapi.json has no schema {name}"))
                .keys()
                .cloned()
                .collect();
            k.sort();
            k
        };
        let r = RegistryRecord {
            name: "r".into(),
            kind: RegistryKind::Normal,
            created_ms: 0,
            cache: None,
            public_uri: true,
            anonymous_pull: false,
            quota_bytes: None,
        };
        let mut registry = RegistryView::of(&r, 0);
        registry.note = Some("n".into());
        registry.usage = Some(Default::default());
        registry.quota_bytes = Some(1);
        assert_eq!(keys(&registry), schema("Registry"));
        assert_eq!(keys(&RegistryUsageView::default()), schema("RegistryUsage"));
        let mut cache = ImageCacheView::of(
            &ImageCacheConfig::new("c", crate::config::SourceKind::Registry, "https://r"),
            false,
        );
        cache.applies = Some("a".into());
        assert_eq!(keys(&cache), schema("ImageCache"));
        let image = ImageView {
            artifact_count: 0,
            last_push: None,
            name: "i".into(),
            repository: "r/i".into(),
            tag_count: 0,
        };
        assert_eq!(keys(&image), schema("Image"));
        let artifact = ArtifactView {
            artifact_type: None,
            digest: "d".into(),
            last_pull: None,
            manifest_size: 0,
            media_type: "m".into(),
            platforms: vec![],
            pushed: "p".into(),
            signed: false,
            size: 0,
            subject: None,
            tags: vec![],
        };
        assert_eq!(keys(&artifact), schema("Artifact"));
        let tag = TagView {
            digest: None,
            name: "t".into(),
        };
        assert_eq!(keys(&tag), schema("Tag"));
        let set = TagSet {
            digest: "d".into(),
            name: "t".into(),
            previous: None,
        };
        assert_eq!(keys(&set), schema("TagChange"));
        let report = PruneReport::of(&crate::cache::sweep::SweepReport::default(), false);
        assert_eq!(keys(&report), schema("PruneReport"));
        assert_eq!(
            keys(&Prune {
                dry_run: true,
                unpulled_for: Some("1d".into()),
                grace: Some("10m".into()),
            }),
            schema("Prune")
        );
        let paged = Paged::<TagView> {
            items: vec![],
            page: 1,
            page_size: 1,
            total: 0,
        };
        assert_eq!(keys(&paged), schema("Page"));
        let u = UserRecord {
            name: "u".into(),
            role: Role::Viewer,
            registries: vec![],
            created_ms: 0,
        };
        let k = KeyRecord {
            id: "k".into(),
            user: "u".into(),
            secret_hash: "h".into(),
            created_ms: 0,
        };
        let mut user = UserView::of(&u, 1);
        user.keys = Some(vec![KeyView::of(&k)]);
        user.first_key = Some(KeyView::of(&k));
        assert_eq!(keys(&user), schema("User"));
        assert_eq!(keys(&KeyView::of(&k)), schema("Key"));
        let p = crate::events::webhooks::WebhookPolicy {
            id: "i".into(),
            registry: "r".into(),
            name: "n".into(),
            events: vec![],
            target: "https://t".into(),
            kind: crate::events::webhooks::WebhookKind::Http,
            auth_header: None,
            secret: None,
            enabled: true,
            created_ms: 0,
        };
        assert_eq!(keys(&p.view()), schema("Webhook"));
        let d = crate::events::webhooks::Delivery {
            id: 1,
            policy_id: "i".into(),
            event: crate::events::EventKind::PushArtifact,
            status: crate::events::webhooks::DeliveryStatus::Pending,
            attempts: 0,
            http_status: None,
            last_error: None,
            created_ms: 0,
            updated_ms: 0,
        };
        assert_eq!(keys(&DeliveryView::of(&d)), schema("Delivery"));
        let list = WebhookList {
            items: vec![],
            total: 0,
        };
        assert_eq!(keys(&list), schema("WebhookList"));
        assert_eq!(
            keys(&DeliveryList { items: vec![] }),
            schema("DeliveryList")
        );
        let health = crate::cache::health::HealthSnapshot {
            last_success: Some(std::time::SystemTime::now()),
            last_error: Some(crate::cache::health::LastError {
                at: std::time::SystemTime::now(),
                kind: crate::cache::health::ErrorKind::Server,
                message: "m".into(),
            }),
            consecutive_failures: 1,
        };
        let source = SourceStatus::of(
            &ImageCacheConfig::new("c", crate::config::SourceKind::Registry, "https://r"),
            true,
            Some(&health),
        );
        assert_eq!(keys(&source), schema("SourceStatus"));
        assert_eq!(
            keys(source.last_error.as_ref().unwrap()),
            schema("SourceError")
        );
        let status = StatusView {
            commit: "c".into(),
            counts: StatusCounts {
                image_caches: 1,
                registries: 1,
                users: 0,
            },
            sources: vec![source],
            started: "s".into(),
            storage: StorageStatus {
                blob_bytes: None,
                data_dir: "d".into(),
                volume_free_bytes: 0,
                volume_used_bytes: 0,
            },
            uptime_seconds: 0,
            version: "v".into(),
        };
        assert_eq!(keys(&status), schema("Status"));
        assert_eq!(keys(&status.counts), schema("StatusCounts"));
        assert_eq!(keys(&status.storage), schema("StorageStatus"));
    }
}
