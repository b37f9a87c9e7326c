//! Replication rules (DESIGN.md 9 "Replication"), decided without I/O: which images and tags a
//! rule takes, where each lands at the destination, and the checks a rule must pass to be
//! stored. The same record is the config's `[[replication.rule]]`, the API's body and what the
//! metadata holds.

use serde::{Deserialize, Serialize};

use crate::jobs::schedule::Schedule;
use crate::oci::reference::{validate_registry_name, RepoName};
use crate::policy::cleanup::TagMode;
use crate::policy::pattern::Pattern;

/// Which way a rule copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// From this berth to the endpoint.
    #[default]
    Push,
    /// From the endpoint to this berth.
    Pull,
}

/// What starts a rule's executions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TriggerKind {
    /// Only by hand.
    #[default]
    Manual,
    /// Each push or tag creation in the source registry (push mode only).
    Event,
    /// The rule's `schedule`.
    Schedule,
}

fn yes() -> bool {
    true
}

fn default_concurrency() -> u32 {
    4
}

/// Most blobs one rule copies at once.
pub const MAX_CONCURRENCY: u32 = 32;

/// Most rules stored.
pub const MAX_RULES: usize = 100;

/// A replication rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Its name: unique, `[a-z0-9._-]`, also the scope of its executions.
    pub name: String,
    /// Push or pull.
    #[serde(default)]
    pub mode: Mode,
    /// The endpoint it copies to (push) or from (pull).
    pub endpoint: String,
    /// The registry copied from: on this berth (push), or the endpoint's first path segment
    /// (pull; empty: the whole endpoint).
    pub registry: String,
    /// Images (the repository below the registry), a doublestar pattern; empty: all.
    #[serde(default)]
    pub images: String,
    /// Tags, a doublestar pattern; empty: all.
    #[serde(default)]
    pub tags: String,
    /// Whether `tags` names what is copied or what is not.
    #[serde(default)]
    pub tag_mode: TagMode,
    /// The first segment of the destination repository (a registry at a berth destination, any
    /// namespace elsewhere, may contain `/`); empty: the source registry's name.
    #[serde(default)]
    pub dest_namespace: String,
    /// Keep only the last N segments of the image path below the namespace (0: keep it all).
    #[serde(default)]
    pub flatten: u32,
    /// What starts it.
    #[serde(default)]
    pub trigger: TriggerKind,
    /// Its schedule, when `trigger` is `schedule`.
    #[serde(default = "no_schedule")]
    pub schedule: Schedule,
    /// Move a destination tag that points at another artifact.
    #[serde(default = "yes", rename = "override")]
    pub override_tags: bool,
    /// Copy an artifact's referrers (signatures, SBOMs) and cosign tags with it.
    #[serde(default = "yes")]
    pub copy_referrers: bool,
    /// A disabled rule starts nothing.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Bytes per second the rule may send or receive in all (0: no limit).
    #[serde(default)]
    pub bandwidth_limit: u64,
    /// Blobs in flight at once.
    #[serde(default = "default_concurrency")]
    pub concurrency: u32,
}

fn no_schedule() -> Schedule {
    Schedule::None
}

impl Rule {
    /// Checks the rule on its own (the endpoint's existence is checked by the caller). Names
    /// the field at fault.
    pub fn check(&self) -> Result<(), String> {
        if self.name.is_empty()
            || self.name.len() > 64
            || !self
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        {
            return Err(format!(
                "name {:?}: 1 to 64 of a-z, 0-9, '.', '_', '-'",
                self.name
            ));
        }
        if self.endpoint.is_empty() {
            return Err("endpoint: required".into());
        }
        if self.mode == Mode::Push || !self.registry.is_empty() {
            validate_registry_name(&self.registry)
                .map_err(|e| format!("registry {:?}: {e}", self.registry))?;
        }
        Pattern::new(&self.images).map_err(|e| format!("images: {e}"))?;
        Pattern::new(&self.tags).map_err(|e| format!("tags: {e}"))?;
        if !self.dest_namespace.is_empty() {
            RepoName::parse(&format!("{}/x", self.dest_namespace))
                .map_err(|e| format!("dest_namespace {:?}: {e}", self.dest_namespace))?;
        }
        if self.mode == Mode::Pull && self.registry.is_empty() && self.dest_namespace.is_empty() {
            return Err("dest_namespace: required in pull mode when registry is empty (the registry here that receives)".into());
        }
        if self.mode == Mode::Pull && self.trigger == TriggerKind::Event {
            return Err("trigger: event works in push mode only (an endpoint's pushes are not seen here); use schedule".into());
        }
        match (self.trigger, self.schedule.cron()) {
            (_, Err(e)) => return Err(format!("schedule: {e}")),
            (TriggerKind::Schedule, Ok(None)) => {
                return Err("schedule: required when trigger is schedule".into())
            }
            _ => {}
        }
        if !(1..=MAX_CONCURRENCY).contains(&self.concurrency) {
            return Err(format!("concurrency: 1 to {MAX_CONCURRENCY}"));
        }
        if self.bandwidth_limit != 0 && self.bandwidth_limit < 64 * 1024 {
            return Err("bandwidth_limit: 0 (none) or at least 65536 bytes/s".into());
        }
        Ok(())
    }

    /// The rule's filters, compiled.
    pub fn filter(&self) -> Result<Filter, String> {
        Ok(Filter {
            images: Pattern::new(&self.images).map_err(|e| format!("images: {e}"))?,
            tags: Pattern::new(&self.tags).map_err(|e| format!("tags: {e}"))?,
            tag_mode: self.tag_mode,
        })
    }

    /// The scope of its executions.
    pub fn scope(&self) -> String {
        scope(&self.name)
    }

    /// Where an image of the source lands: the destination namespace (or the source registry's
    /// name) and the image path, flattened to its last `flatten` segments.
    pub fn destination(&self, image: &str) -> String {
        let namespace = if self.dest_namespace.is_empty() {
            self.registry.as_str()
        } else {
            self.dest_namespace.as_str()
        };
        let segments: Vec<&str> = image.split('/').collect();
        let keep = match self.flatten as usize {
            0 => segments.len(),
            n => n.min(segments.len()),
        };
        let path = segments[segments.len() - keep..].join("/");
        if namespace.is_empty() {
            path
        } else {
            format!("{namespace}/{path}")
        }
    }
}

/// The scope of a rule's executions.
pub fn scope(rule: &str) -> String {
    format!("replication/{rule}")
}

/// A rule's image and tag filters.
#[derive(Debug, Clone)]
pub struct Filter {
    images: Pattern,
    tags: Pattern,
    tag_mode: TagMode,
}

impl Filter {
    /// Whether the rule takes the image (the path below the registry).
    pub fn image(&self, image: &str) -> bool {
        self.images.matches(image)
    }

    /// Whether the rule takes a tag.
    pub fn tag(&self, tag: &str) -> bool {
        self.tags.matches(tag) == (self.tag_mode == TagMode::Matching)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule() -> Rule {
        serde_json::from_value(serde_json::json!({
            "name": "r", "endpoint": "eu", "registry": "team"
        }))
        .unwrap()
    }

    #[test]
    fn defaults_are_push_manual_override_with_referrers() {
        let r = rule();
        assert_eq!(r.mode, Mode::Push);
        assert_eq!(r.trigger, TriggerKind::Manual);
        assert!(r.override_tags && r.copy_referrers && r.enabled);
        assert_eq!(r.concurrency, 4);
        assert!(r.check().is_ok());
    }

    #[test]
    fn destinations_keep_replace_and_flatten() {
        let mut r = rule();
        for (ns, flatten, image, want) in [
            ("", 0, "app/web", "team/app/web"),
            ("mirror", 0, "app/web", "mirror/app/web"),
            ("eu/mirror", 0, "app/web", "eu/mirror/app/web"),
            ("", 1, "app/web", "team/web"),
            ("", 1, "web", "team/web"),
            ("mirror", 2, "a/b/c/d", "mirror/c/d"),
            ("mirror", 9, "a/b", "mirror/a/b"),
        ] {
            r.dest_namespace = ns.into();
            r.flatten = flatten;
            assert_eq!(r.destination(image), want, "{ns:?} {flatten} {image}");
        }
    }

    #[test]
    fn filters_match_and_exclude() {
        let mut r = rule();
        r.images = "app/*".into();
        r.tags = "v*".into();
        let f = r.filter().unwrap();
        assert!(f.image("app/web") && !f.image("app/web/x") && !f.image("lib"));
        assert!(f.tag("v1") && !f.tag("latest") && !f.tag(""));
        r.tag_mode = TagMode::Excluding;
        let f = r.filter().unwrap();
        assert!(!f.tag("v1") && f.tag("latest") && f.tag(""));
        r.images = "**".into();
        r.tags = "{1.?,latest}".into();
        r.tag_mode = TagMode::Matching;
        let f = r.filter().unwrap();
        assert!(f.image("a/b/c") && f.tag("1.0") && !f.tag("1.01") && f.tag("latest"));
    }

    #[test]
    fn checks_name_the_field() {
        let bad = |f: &dyn Fn(&mut Rule)| {
            let mut r = rule();
            f(&mut r);
            r.check().unwrap_err()
        };
        assert!(bad(&|r| r.name = "Bad Name".into()).starts_with("name"));
        assert!(bad(&|r| r.endpoint.clear()).starts_with("endpoint"));
        assert!(bad(&|r| r.registry = "UP".into()).starts_with("registry"));
        assert!(bad(&|r| r.images = "[".into()).starts_with("images"));
        assert!(bad(&|r| r.trigger = TriggerKind::Schedule).starts_with("schedule"));
        assert!(
            bad(&|r| r.schedule = Schedule::Custom("61 * * * *".into())).starts_with("schedule")
        );
        assert!(bad(&|r| {
            r.mode = Mode::Pull;
            r.trigger = TriggerKind::Event
        })
        .starts_with("trigger"));
        assert!(bad(&|r| r.concurrency = 0).starts_with("concurrency"));
        assert!(bad(&|r| r.bandwidth_limit = 10).starts_with("bandwidth_limit"));
        assert!(bad(&|r| r.dest_namespace = "Bad//ns".into()).starts_with("dest_namespace"));
    }
}
