//! The policies of each registry, kept as records (DESIGN.md 9): cleanup policies (what a
//! cleanup keeps), protection policies (tags that must not change) and the registry's cleanup
//! schedule. Protection is asked on every manifest push and delete, so the enabled protection
//! policies are also held compiled in memory, replaced on every change made here.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::RwLock;
use serde::{Deserialize, Serialize};

use super::cleanup::{Policy, Rule, RuleKind, TagMode};
use super::pattern::Pattern;
use crate::error::{Error, Result};
use crate::jobs::schedule::{Schedule, ScheduleSettings};
use crate::store::meta::{now_ms, MetaStore, Records};

const CLEANUP: &str = "cleanup_policies";
const PROTECTION: &str = "protection_policies";
const SETTINGS: &str = "cleanup_settings";

/// Most policies of each kind a registry holds (Harbor's rule limit).
pub const MAX_PER_REGISTRY: usize = 15;

/// A cleanup policy of one registry: among the artifacts of the images its image pattern
/// matches, with a tag its tag filter selects, it keeps what its rule names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CleanupPolicy {
    /// Identifier (a simple UUID).
    pub id: String,
    /// The registry it belongs to.
    pub registry: String,
    /// Image names below the registry (doublestar; empty: every image).
    pub images: String,
    /// Tags (doublestar; empty: every tag; an untagged artifact is the empty string).
    pub tags: String,
    /// Whether the tag pattern selects what it matches or what it does not.
    pub tag_mode: TagMode,
    /// What it keeps.
    pub rule: RuleKind,
    /// The rule's N (a count or days); none for `always`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<u32>,
    /// Disabled policies keep nothing and cover no image.
    pub enabled: bool,
    /// Creation time, Unix ms.
    pub created_ms: u64,
}

/// A new cleanup policy, as posted to the API.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CleanupSpec {
    /// Image pattern (default: every image).
    #[serde(default)]
    pub images: String,
    /// Tag pattern (default: every tag, untagged included).
    #[serde(default)]
    pub tags: String,
    /// `matching` (default) or `excluding`.
    #[serde(default)]
    pub tag_mode: TagMode,
    /// The rule.
    pub rule: RuleKind,
    /// Its N.
    #[serde(default)]
    pub n: Option<u32>,
    /// Default true.
    #[serde(default = "crate::config::yes")]
    pub enabled: bool,
}

/// A change to a cleanup policy: absent fields stay.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CleanupPatch {
    /// New image pattern.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub images: Option<String>,
    /// New tag pattern.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<String>,
    /// New tag mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag_mode: Option<TagMode>,
    /// New rule (give `n` with it when it needs one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<RuleKind>,
    /// New N.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<u32>,
    /// Enable or disable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
}

/// A protection policy of one registry: the tags its tag pattern matches, in the images its
/// image pattern matches, cannot be overwritten or deleted, nor can their artifacts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProtectionPolicy {
    /// Identifier (a simple UUID).
    pub id: String,
    /// The registry it belongs to.
    pub registry: String,
    /// Image names below the registry (doublestar; empty: every image).
    pub images: String,
    /// Tags (doublestar; empty: every tag).
    pub tags: String,
    /// Disabled policies protect nothing.
    pub enabled: bool,
    /// Creation time, Unix ms.
    pub created_ms: u64,
}

/// A new protection policy, as posted to the API.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProtectionSpec {
    /// Image pattern (default: every image).
    #[serde(default)]
    pub images: String,
    /// Tag pattern (default: every tag).
    #[serde(default)]
    pub tags: String,
    /// Default true.
    #[serde(default = "crate::config::yes")]
    pub enabled: bool,
}

/// A change to a protection policy: absent fields stay.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProtectionPatch {
    /// New image pattern.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub images: Option<String>,
    /// New tag pattern.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<String>,
    /// Enable or disable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
}

/// An enabled protection policy, compiled.
#[derive(Debug, Clone)]
pub struct Protection {
    /// Its id.
    pub id: String,
    /// Images.
    pub images: Pattern,
    /// Tags.
    pub tags: Pattern,
}

impl Protection {
    /// Whether it protects `tag` of `image`.
    pub fn protects(&self, image: &str, tag: &str) -> bool {
        self.images.matches(image) && self.tags.matches(tag)
    }

    /// The refusal of a change to `tag` of `repository` (412 `DENIED`).
    pub fn refusal(&self, what: &str, repository: &str, tag: &str) -> Error {
        Error::Protected(format!(
            "{what}: tag {tag:?} of {repository} is protected by protection policy {} (images {:?}, tags {:?}); disable or change that policy first",
            self.id,
            self.images.as_str(),
            self.tags.as_str()
        ))
    }
}

/// The policies of every registry.
pub struct Policies {
    cleanup: Records<CleanupPolicy>,
    protection: Records<ProtectionPolicy>,
    settings: Records<ScheduleSettings>,
    /// Enabled protection policies by registry.
    protected: RwLock<HashMap<String, Arc<Vec<Protection>>>>,
    /// Serializes changes (the limit and duplicate checks).
    changes: tokio::sync::Mutex<()>,
}

fn bad(e: impl std::fmt::Display) -> Error {
    Error::BadRequest(e.to_string())
}

fn not_found(kind: &str, registry: &str, id: &str) -> Error {
    Error::NotFound(format!(
        "{kind} policy {id:?} of registry {registry:?} does not exist"
    ))
}

impl CleanupPolicy {
    /// The policy, compiled for [`super::cleanup::select`].
    pub fn compile(&self) -> Result<Policy> {
        Ok(Policy {
            id: self.id.clone(),
            enabled: self.enabled,
            images: Pattern::new(&self.images).map_err(bad)?,
            tags: Pattern::new(&self.tags).map_err(bad)?,
            tag_mode: self.tag_mode,
            rule: Rule::of(self.rule, self.n).map_err(Error::BadRequest)?,
        })
    }

    fn same_selection(&self, other: &CleanupPolicy) -> bool {
        (&self.images, &self.tags, self.tag_mode, self.rule, self.n)
            == (
                &other.images,
                &other.tags,
                other.tag_mode,
                other.rule,
                other.n,
            )
    }
}

impl ProtectionPolicy {
    fn compile(&self) -> Result<Protection> {
        Ok(Protection {
            id: self.id.clone(),
            images: Pattern::new(&self.images).map_err(bad)?,
            tags: Pattern::new(&self.tags).map_err(bad)?,
        })
    }
}

impl Policies {
    /// Opens the policies and compiles the enabled protection policies.
    pub async fn open(meta: Arc<dyn MetaStore>) -> Result<Policies> {
        let policies = Policies {
            cleanup: Records::new(meta.clone(), CLEANUP),
            protection: Records::new(meta.clone(), PROTECTION),
            settings: Records::new(meta, SETTINGS),
            protected: Default::default(),
            changes: Default::default(),
        };
        let mut registries: Vec<String> = policies
            .protection
            .list(&[])
            .await?
            .into_iter()
            .map(|(_, p)| p.registry)
            .collect();
        registries.dedup();
        for r in registries {
            policies.refresh_protection(&r).await?;
        }
        Ok(policies)
    }

    /// The cleanup policies of a registry, oldest first.
    pub async fn cleanup_policies(&self, registry: &str) -> Result<Vec<CleanupPolicy>> {
        let mut list: Vec<CleanupPolicy> = self
            .cleanup
            .list(&[registry])
            .await?
            .into_iter()
            .map(|(_, p)| p)
            .collect();
        list.sort_by(|a, b| a.created_ms.cmp(&b.created_ms).then(a.id.cmp(&b.id)));
        Ok(list)
    }

    /// One cleanup policy.
    pub async fn cleanup_policy(&self, registry: &str, id: &str) -> Result<CleanupPolicy> {
        self.cleanup
            .get(&[registry, id])
            .await?
            .ok_or_else(|| not_found("cleanup", registry, id))
    }

    /// Adds a cleanup policy: at most [`MAX_PER_REGISTRY`], no duplicate selection.
    pub async fn create_cleanup(&self, registry: &str, spec: CleanupSpec) -> Result<CleanupPolicy> {
        let policy = CleanupPolicy {
            id: uuid::Uuid::new_v4().simple().to_string(),
            registry: registry.to_string(),
            images: spec.images,
            tags: spec.tags,
            tag_mode: spec.tag_mode,
            rule: spec.rule,
            n: spec.n,
            enabled: spec.enabled,
            created_ms: now_ms(),
        };
        self.save_cleanup(policy, true).await
    }

    /// Changes a cleanup policy.
    pub async fn update_cleanup(
        &self,
        registry: &str,
        id: &str,
        patch: CleanupPatch,
    ) -> Result<CleanupPolicy> {
        let mut p = self.cleanup_policy(registry, id).await?;
        if let Some(v) = patch.images {
            p.images = v;
        }
        if let Some(v) = patch.tags {
            p.tags = v;
        }
        if let Some(v) = patch.tag_mode {
            p.tag_mode = v;
        }
        if let Some(v) = patch.rule {
            p.rule = v;
            if v == RuleKind::Always {
                p.n = None;
            }
        }
        if let Some(v) = patch.n {
            p.n = Some(v);
        }
        if let Some(v) = patch.enabled {
            p.enabled = v;
        }
        self.save_cleanup(p, false).await
    }

    async fn save_cleanup(&self, p: CleanupPolicy, new: bool) -> Result<CleanupPolicy> {
        p.compile()?;
        let _guard = self.changes.lock().await;
        let others: Vec<CleanupPolicy> = self
            .cleanup_policies(&p.registry)
            .await?
            .into_iter()
            .filter(|o| o.id != p.id)
            .collect();
        if new && others.len() >= MAX_PER_REGISTRY {
            return Err(Error::Conflict(format!(
                "registry {:?} has {MAX_PER_REGISTRY} cleanup policies, the most it may have: delete or change one",
                p.registry
            )));
        }
        if let Some(o) = others.iter().find(|o| o.same_selection(&p)) {
            return Err(Error::Conflict(format!(
                "cleanup policy {} of registry {:?} has the same images, tags and rule",
                o.id, p.registry
            )));
        }
        self.cleanup.put(&[&p.registry, &p.id], &p).await?;
        Ok(p)
    }

    /// Removes a cleanup policy.
    pub async fn delete_cleanup(&self, registry: &str, id: &str) -> Result<()> {
        let _guard = self.changes.lock().await;
        self.cleanup
            .remove(&[registry, id])
            .await?
            .map(|_| ())
            .ok_or_else(|| not_found("cleanup", registry, id))
    }

    /// The registry's cleanup schedule (none stored: only by hand).
    pub async fn cleanup_settings(&self, registry: &str) -> Result<ScheduleSettings> {
        Ok(self
            .settings
            .get(&[registry])
            .await?
            .unwrap_or(ScheduleSettings::NONE))
    }

    /// Sets the registry's cleanup schedule, checked.
    pub async fn set_cleanup_settings(
        &self,
        registry: &str,
        settings: ScheduleSettings,
    ) -> Result<ScheduleSettings> {
        let settings = settings.checked().map_err(bad)?;
        self.settings.put(&[registry], &settings).await?;
        Ok(settings)
    }

    /// Every stored cleanup schedule, by registry.
    pub async fn schedules(&self) -> Result<Vec<(String, Schedule)>> {
        Ok(self
            .settings
            .list(&[])
            .await?
            .into_iter()
            .map(|(registry, s)| (registry, s.schedule))
            .collect())
    }

    /// Gives a cache registry that has no cleanup policy and no schedule the default cleanup:
    /// artifacts not pulled for `days` go, daily. Returns whether it did.
    pub async fn default_cache_cleanup(&self, registry: &str, days: u32) -> Result<bool> {
        if self.settings.get(&[registry]).await?.is_some()
            || !self.cleanup_policies(registry).await?.is_empty()
        {
            return Ok(false);
        }
        self.create_cleanup(
            registry,
            CleanupSpec {
                images: String::new(),
                tags: String::new(),
                tag_mode: TagMode::Matching,
                rule: RuleKind::PulledWithinDays,
                n: Some(days),
                enabled: true,
            },
        )
        .await?;
        self.settings
            .put(
                &[registry],
                &ScheduleSettings {
                    schedule: Schedule::Daily,
                },
            )
            .await?;
        Ok(true)
    }

    /// The protection policies of a registry, oldest first.
    pub async fn protection_policies(&self, registry: &str) -> Result<Vec<ProtectionPolicy>> {
        let mut list: Vec<ProtectionPolicy> = self
            .protection
            .list(&[registry])
            .await?
            .into_iter()
            .map(|(_, p)| p)
            .collect();
        list.sort_by(|a, b| a.created_ms.cmp(&b.created_ms).then(a.id.cmp(&b.id)));
        Ok(list)
    }

    /// One protection policy.
    pub async fn protection_policy(&self, registry: &str, id: &str) -> Result<ProtectionPolicy> {
        self.protection
            .get(&[registry, id])
            .await?
            .ok_or_else(|| not_found("protection", registry, id))
    }

    /// Adds a protection policy: at most [`MAX_PER_REGISTRY`], no duplicate image and tag
    /// patterns.
    pub async fn create_protection(
        &self,
        registry: &str,
        spec: ProtectionSpec,
    ) -> Result<ProtectionPolicy> {
        let p = ProtectionPolicy {
            id: uuid::Uuid::new_v4().simple().to_string(),
            registry: registry.to_string(),
            images: spec.images,
            tags: spec.tags,
            enabled: spec.enabled,
            created_ms: now_ms(),
        };
        self.save_protection(p, true).await
    }

    /// Changes a protection policy.
    pub async fn update_protection(
        &self,
        registry: &str,
        id: &str,
        patch: ProtectionPatch,
    ) -> Result<ProtectionPolicy> {
        let mut p = self.protection_policy(registry, id).await?;
        if let Some(v) = patch.images {
            p.images = v;
        }
        if let Some(v) = patch.tags {
            p.tags = v;
        }
        if let Some(v) = patch.enabled {
            p.enabled = v;
        }
        self.save_protection(p, false).await
    }

    async fn save_protection(&self, p: ProtectionPolicy, new: bool) -> Result<ProtectionPolicy> {
        p.compile()?;
        let _guard = self.changes.lock().await;
        let others: Vec<ProtectionPolicy> = self
            .protection_policies(&p.registry)
            .await?
            .into_iter()
            .filter(|o| o.id != p.id)
            .collect();
        if new && others.len() >= MAX_PER_REGISTRY {
            return Err(Error::Conflict(format!(
                "registry {:?} has {MAX_PER_REGISTRY} protection policies, the most it may have: delete or change one",
                p.registry
            )));
        }
        if let Some(o) = others
            .iter()
            .find(|o| (&o.images, &o.tags) == (&p.images, &p.tags))
        {
            return Err(Error::Conflict(format!(
                "protection policy {} of registry {:?} has the same images and tags",
                o.id, p.registry
            )));
        }
        self.protection.put(&[&p.registry, &p.id], &p).await?;
        self.refresh_protection(&p.registry).await?;
        Ok(p)
    }

    /// Removes a protection policy.
    pub async fn delete_protection(&self, registry: &str, id: &str) -> Result<()> {
        let _guard = self.changes.lock().await;
        self.protection
            .remove(&[registry, id])
            .await?
            .ok_or_else(|| not_found("protection", registry, id))?;
        self.refresh_protection(registry).await
    }

    async fn refresh_protection(&self, registry: &str) -> Result<()> {
        let mut compiled = Vec::new();
        for p in self.protection_policies(registry).await? {
            if p.enabled {
                compiled.push(p.compile()?);
            }
        }
        let mut map = self.protected.write();
        if compiled.is_empty() {
            map.remove(registry);
        } else {
            map.insert(registry.to_string(), Arc::new(compiled));
        }
        Ok(())
    }

    /// The enabled protection policies of a registry.
    pub fn protections(&self, registry: &str) -> Arc<Vec<Protection>> {
        self.protected
            .read()
            .get(registry)
            .cloned()
            .unwrap_or_default()
    }

    /// The first enabled protection policy that protects `tag` of `image` in `registry`.
    pub fn protecting(&self, registry: &str, image: &str, tag: &str) -> Option<Protection> {
        let protections = self.protected.read().get(registry).cloned()?;
        protections.iter().find(|p| p.protects(image, tag)).cloned()
    }

    /// Removes every policy and the schedule of a deleted registry; returns how many policies
    /// went.
    pub async fn remove_registry(&self, registry: &str) -> Result<usize> {
        let _guard = self.changes.lock().await;
        let n = self.cleanup.remove_prefix(&[registry]).await?
            + self.protection.remove_prefix(&[registry]).await?;
        self.settings.remove(&[registry]).await?;
        self.protected.write().remove(registry);
        Ok(n)
    }
}
