//! `berth cleanup ...` and `berth protect ...`: a registry's cleanup policies, schedule and
//! executions, and its protection policies, through the management API.

use clap::Subcommand;
use http::Method;

use super::jobs::{schedule_text, JobCommands};
use super::remote::seg;
use super::{print_json, Place};
use crate::api::policies::{PolicyList, ScheduleView};
use crate::policy::book::{
    CleanupPatch, CleanupPolicy, CleanupSpec, ProtectionPatch, ProtectionPolicy, ProtectionSpec,
};
use crate::policy::cleanup::{RuleKind, TagMode};

#[derive(Subcommand)]
pub enum CleanupCommand {
    /// List a registry's cleanup policies.
    List {
        /// Registry.
        registry: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Add a cleanup policy: among the artifacts of the images IMAGES matches with a tag TAGS
    /// selects, keep what RULE names. What no enabled policy keeps is deleted by a run.
    Add {
        /// Registry.
        registry: String,
        /// latest-pushed, latest-pulled, pushed-within-days, pulled-within-days or always.
        #[arg(long, value_parser = rule_kind)]
        rule: RuleKind,
        /// The rule's count or days.
        #[arg(long)]
        n: Option<u32>,
        /// Image pattern (doublestar; default: every image).
        #[arg(long, default_value = "")]
        images: String,
        /// Tag pattern (doublestar; default: every tag, untagged included).
        #[arg(long, default_value = "")]
        tags: String,
        /// The tag pattern selects the tags it does NOT match.
        #[arg(long)]
        exclude: bool,
        /// Create it disabled.
        #[arg(long)]
        disabled: bool,
    },
    /// Delete a cleanup policy.
    Remove {
        /// Registry.
        registry: String,
        /// Policy id.
        id: String,
    },
    /// Enable a cleanup policy.
    Enable {
        /// Registry.
        registry: String,
        /// Policy id.
        id: String,
    },
    /// Disable a cleanup policy.
    Disable {
        /// Registry.
        registry: String,
        /// Policy id.
        id: String,
    },
    /// Show the registry's cleanup schedule and next runs, or set it: none, hourly, daily,
    /// weekly or a cron expression in UTC ("0 3 * * SUN").
    Schedule {
        /// Registry.
        registry: String,
        /// The new schedule.
        schedule: Option<String>,
    },
    /// Run the registry's cleanup now (or a dry run), and follow it to its end.
    Run {
        /// Registry.
        registry: String,
        /// Select and report only; nothing is deleted.
        #[arg(long)]
        dry_run: bool,
        /// Start it and return at once.
        #[arg(long)]
        no_wait: bool,
        /// The ended execution and its history as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The registry's cleanup executions, newest first.
    Executions {
        /// Registry.
        registry: String,
        /// At most this many.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// What an execution did to each artifact.
    History {
        /// Registry.
        registry: String,
        /// Execution id.
        id: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Stop a running execution (after the image it is on).
    Stop {
        /// Registry.
        registry: String,
        /// Execution id.
        id: String,
    },
}

#[derive(Subcommand)]
pub enum ProtectCommand {
    /// List a registry's protection policies.
    List {
        /// Registry.
        registry: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Protect the tags TAGS matches in the images IMAGES matches: no push over them, no
    /// deletion of them or of their artifacts (412).
    Add {
        /// Registry.
        registry: String,
        /// Image pattern (doublestar; default: every image).
        #[arg(long, default_value = "")]
        images: String,
        /// Tag pattern (doublestar; default: every tag).
        #[arg(long, default_value = "")]
        tags: String,
        /// Create it disabled.
        #[arg(long)]
        disabled: bool,
    },
    /// Delete a protection policy.
    Remove {
        /// Registry.
        registry: String,
        /// Policy id.
        id: String,
    },
    /// Enable a protection policy.
    Enable {
        /// Registry.
        registry: String,
        /// Policy id.
        id: String,
    },
    /// Disable a protection policy.
    Disable {
        /// Registry.
        registry: String,
        /// Policy id.
        id: String,
    },
}

fn rule_kind(text: &str) -> Result<RuleKind, String> {
    serde_json::from_value(serde_json::Value::String(text.trim().replace('-', "_"))).map_err(
        |_| {
            format!(
                "{text:?} is not a rule (latest-pushed, latest-pulled, pushed-within-days, pulled-within-days, always)"
            )
        },
    )
}

fn rule_text(p: &CleanupPolicy) -> String {
    let n = p.n.unwrap_or(0);
    match p.rule {
        RuleKind::LatestPushed => format!("keep the {n} most recently pushed"),
        RuleKind::LatestPulled => format!("keep the {n} most recently pulled"),
        RuleKind::PushedWithinDays => format!("keep those pushed within {n} days"),
        RuleKind::PulledWithinDays => format!("keep those pulled within {n} days"),
        RuleKind::Always => "keep all".into(),
    }
}

fn or_all(pattern: &str) -> &str {
    if pattern.is_empty() {
        "**"
    } else {
        pattern
    }
}

/// The registry's cleanup as a job.
fn jobs<'a>(place: &'a Place, registry: &str) -> JobCommands<'a> {
    JobCommands {
        place,
        base: base(registry, "cleanup"),
        what: format!("cleanup of registry {registry}"),
        units: "images",
        acted: "deleted",
    }
}

fn base(registry: &str, what: &str) -> String {
    format!("/registries/{}/{what}", seg(registry))
}

fn enabled_text(enabled: bool) -> &'static str {
    if enabled {
        "enabled"
    } else {
        "disabled"
    }
}

pub fn run_cleanup(place: &Place, cmd: CleanupCommand) -> Result<(), String> {
    match cmd {
        CleanupCommand::List { registry, json } => {
            let list: PolicyList<CleanupPolicy> =
                place.call(Method::GET, &base(&registry, "cleanup-policies"))?;
            if json {
                return print_json(&list.items);
            }
            for p in &list.items {
                let mode = match p.tag_mode {
                    TagMode::Matching => "tags",
                    TagMode::Excluding => "tags except",
                };
                outln!(
                    "{}  {:<8} images {}  {mode} {}  {}",
                    p.id,
                    enabled_text(p.enabled),
                    or_all(&p.images),
                    or_all(&p.tags),
                    rule_text(p)
                );
            }
            let s: ScheduleView = place.call(Method::GET, &base(&registry, "cleanup"))?;
            outln!("schedule: {}", schedule_text(&s.schedule));
        }
        CleanupCommand::Add {
            registry,
            rule,
            n,
            images,
            tags,
            exclude,
            disabled,
        } => {
            let spec = CleanupSpec {
                images,
                tags,
                tag_mode: if exclude {
                    TagMode::Excluding
                } else {
                    TagMode::Matching
                },
                rule,
                n,
                enabled: !disabled,
            };
            let p: CleanupPolicy =
                place.send(Method::POST, &base(&registry, "cleanup-policies"), &spec)?;
            outln!(
                "created cleanup policy {} of registry {registry}: {}",
                p.id,
                rule_text(&p)
            );
        }
        CleanupCommand::Remove { registry, id } => {
            let path = format!("{}/{}", base(&registry, "cleanup-policies"), seg(&id));
            place.call_no_content(Method::DELETE, &path)?;
            outln!("deleted cleanup policy {id} of registry {registry}");
        }
        CleanupCommand::Enable { registry, id } => {
            set_enabled(place, &registry, &id, Kind::Cleanup, true)?
        }
        CleanupCommand::Disable { registry, id } => {
            set_enabled(place, &registry, &id, Kind::Cleanup, false)?
        }
        CleanupCommand::Schedule { registry, schedule } => {
            jobs(place, &registry).schedule(schedule)?
        }
        CleanupCommand::Run {
            registry,
            dry_run,
            no_wait,
            json,
        } => {
            let images = place
                .call::<crate::api::views::RegistryView>(
                    Method::GET,
                    &format!("/registries/{}", seg(&registry)),
                )
                .map(|r| r.image_count as u64)
                .unwrap_or(0);
            jobs(place, &registry).run(dry_run, no_wait, json, images)?
        }
        CleanupCommand::Executions {
            registry,
            limit,
            json,
        } => jobs(place, &registry).executions(limit, json)?,
        CleanupCommand::History { registry, id, json } => {
            jobs(place, &registry).history(&id, json)?
        }
        CleanupCommand::Stop { registry, id } => jobs(place, &registry).stop(&id)?,
    }
    Ok(())
}

/// Which policies a command acts on.
#[derive(Clone, Copy)]
enum Kind {
    Cleanup,
    Protection,
}

/// `enable` / `disable` of either kind of policy.
fn set_enabled(
    place: &Place,
    registry: &str,
    id: &str,
    kind: Kind,
    enable: bool,
) -> Result<(), String> {
    let (what, name) = match kind {
        Kind::Cleanup => ("cleanup-policies", "cleanup"),
        Kind::Protection => ("protection-policies", "protection"),
    };
    let path = format!("{}/{}", base(registry, what), seg(id));
    match kind {
        Kind::Cleanup => {
            let patch = CleanupPatch {
                enabled: Some(enable),
                ..CleanupPatch::default()
            };
            let _: CleanupPolicy = place.send(Method::PATCH, &path, &patch)?;
        }
        Kind::Protection => {
            let patch = ProtectionPatch {
                enabled: Some(enable),
                ..ProtectionPatch::default()
            };
            let _: ProtectionPolicy = place.send(Method::PATCH, &path, &patch)?;
        }
    }
    outln!(
        "{} {name} policy {id} of registry {registry}",
        enabled_text(enable)
    );
    Ok(())
}

pub fn run_protect(place: &Place, cmd: ProtectCommand) -> Result<(), String> {
    match cmd {
        ProtectCommand::List { registry, json } => {
            let list: PolicyList<ProtectionPolicy> =
                place.call(Method::GET, &base(&registry, "protection-policies"))?;
            if json {
                return print_json(&list.items);
            }
            for p in &list.items {
                outln!(
                    "{}  {:<8} images {}  tags {}",
                    p.id,
                    enabled_text(p.enabled),
                    or_all(&p.images),
                    or_all(&p.tags)
                );
            }
        }
        ProtectCommand::Add {
            registry,
            images,
            tags,
            disabled,
        } => {
            let spec = ProtectionSpec {
                images,
                tags,
                enabled: !disabled,
            };
            let p: ProtectionPolicy =
                place.send(Method::POST, &base(&registry, "protection-policies"), &spec)?;
            outln!(
                "created protection policy {} of registry {registry}: tags {} of images {}",
                p.id,
                or_all(&p.tags),
                or_all(&p.images)
            );
        }
        ProtectCommand::Remove { registry, id } => {
            let path = format!("{}/{}", base(&registry, "protection-policies"), seg(&id));
            place.call_no_content(Method::DELETE, &path)?;
            outln!("deleted protection policy {id} of registry {registry}");
        }
        ProtectCommand::Enable { registry, id } => {
            set_enabled(place, &registry, &id, Kind::Protection, true)?
        }
        ProtectCommand::Disable { registry, id } => {
            set_enabled(place, &registry, &id, Kind::Protection, false)?
        }
    }
    Ok(())
}
