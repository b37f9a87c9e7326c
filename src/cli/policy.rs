//! `berth cleanup ...` and `berth protect ...`: a registry's cleanup policies, schedule and
//! executions, and its protection policies, through the management API.

use std::io::IsTerminal;
use std::time::Duration;

use clap::Subcommand;
use http::Method;

use super::remote::seg;
use super::{print_json, Place};
use crate::api::policies::{CleanupView, ExecutionView, Paged, PolicyList, RunRequest};
use crate::jobs::executions::{HistoryRow, Status};
use crate::jobs::schedule::Schedule;
use crate::policy::book::{
    CleanupPatch, CleanupPolicy, CleanupSettings, CleanupSpec, ProtectionPatch, ProtectionPolicy,
    ProtectionSpec,
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

fn schedule_of(text: &str) -> Schedule {
    match text.trim().to_ascii_lowercase().as_str() {
        "none" => Schedule::None,
        "hourly" => Schedule::Hourly,
        "daily" => Schedule::Daily,
        "weekly" => Schedule::Weekly,
        _ => Schedule::Custom(text.trim().to_string()),
    }
}

fn schedule_text(s: &Schedule) -> String {
    match s {
        Schedule::None => "none (by hand only)".into(),
        Schedule::Hourly => "hourly".into(),
        Schedule::Daily => "daily (00:00 UTC)".into(),
        Schedule::Weekly => "weekly (Saturday 00:00 UTC)".into(),
        Schedule::Custom(c) => format!("cron {c:?} (UTC)"),
    }
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
            let s: CleanupView = place.call(Method::GET, &base(&registry, "cleanup"))?;
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
            let path = base(&registry, "cleanup");
            let view: CleanupView = match schedule {
                None => place.call(Method::GET, &path)?,
                Some(text) => place.send(
                    Method::PUT,
                    &path,
                    &CleanupSettings {
                        schedule: schedule_of(&text),
                    },
                )?,
            };
            outln!("schedule: {}", schedule_text(&view.schedule));
            for t in &view.next_runs {
                outln!("  next: {t}");
            }
        }
        CleanupCommand::Run {
            registry,
            dry_run,
            no_wait,
            json,
        } => run(place, &registry, dry_run, no_wait, json)?,
        CleanupCommand::Executions {
            registry,
            limit,
            json,
        } => {
            let path = format!(
                "{}?limit={}",
                base(&registry, "cleanup/executions"),
                limit.clamp(1, 1000)
            );
            let page: Paged<ExecutionView> = place.call(Method::GET, &path)?;
            if json {
                return print_json(&page.items);
            }
            for e in &page.items {
                outln!("{}", execution_line(e));
            }
        }
        CleanupCommand::History { registry, id, json } => {
            let rows = history(place, &registry, &id)?;
            if json {
                return print_json(&rows);
            }
            for r in &rows {
                outln!("{:<13} {} [{}]", r.action, r.artifact, r.tags.join(","));
            }
        }
        CleanupCommand::Stop { registry, id } => {
            let path = format!(
                "{}/{}/stop",
                base(&registry, "cleanup/executions"),
                seg(&id)
            );
            let _: ExecutionView = place.call(Method::POST, &path)?;
            outln!("stop asked: execution {id} ends after the image it is on");
        }
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

fn execution_line(e: &ExecutionView) -> String {
    let x = &e.execution;
    format!(
        "{}  {:<11} {:<8} {}{}  images {}  {} {}  failed {}  by {}{}",
        x.id,
        serde_json::to_string(&x.status)
            .unwrap_or_default()
            .replace('"', ""),
        serde_json::to_string(&x.trigger)
            .unwrap_or_default()
            .replace('"', ""),
        e.started,
        if x.dry_run { " (dry run)" } else { "" },
        x.tasks,
        if x.dry_run { "would delete" } else { "deleted" },
        x.counts.acted,
        x.counts.failed,
        x.operator,
        x.error
            .as_deref()
            .map(|e| format!("  error: {e}"))
            .unwrap_or_default()
    )
}

fn history(place: &Place, registry: &str, id: &str) -> Result<Vec<HistoryRow>, String> {
    let path = format!(
        "{}/{}/history",
        base(registry, "cleanup/executions"),
        seg(id)
    );
    let mut rows = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let page_path = match &cursor {
            Some(c) => format!("{path}?limit=1000&cursor={}", seg(c)),
            None => format!("{path}?limit=1000"),
        };
        let page: Paged<HistoryRow> = place.call(Method::GET, &page_path)?;
        rows.extend(page.items);
        match page.next {
            Some(next) => cursor = Some(next),
            None => return Ok(rows),
        }
    }
}

/// Starts a cleanup and, unless told not to, follows it: a progress line (a bar at a
/// terminal) until it ends, then what it deleted.
fn run(
    place: &Place,
    registry: &str,
    dry_run: bool,
    no_wait: bool,
    json: bool,
) -> Result<(), String> {
    let started: ExecutionView = place.send(
        Method::POST,
        &base(registry, "cleanup/executions"),
        &RunRequest { dry_run },
    )?;
    let id = started.execution.id.clone();
    if no_wait {
        outln!("started cleanup execution {id} of registry {registry}");
        return Ok(());
    }
    let images = place
        .call::<crate::api::views::RegistryView>(
            Method::GET,
            &format!("/registries/{}", seg(registry)),
        )
        .map(|r| r.image_count as u64)
        .unwrap_or(0);
    let bar = if json || !std::io::stderr().is_terminal() {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(images).with_style(
            indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} images  {msg}")
                .map_err(|e| e.to_string())?,
        )
    };
    let path = format!("{}/{}", base(registry, "cleanup/executions"), seg(&id));
    let ended = loop {
        let e: ExecutionView = place.call(Method::GET, &path)?;
        bar.set_position(e.execution.tasks);
        bar.set_message(format!("{} artifacts", e.execution.counts.acted));
        if e.execution.status != Status::Running {
            break e;
        }
        place.sleep(Duration::from_millis(200));
    };
    bar.finish_and_clear();
    let rows = history(place, registry, &id)?;
    if json {
        return print_json(&serde_json::json!({"execution": ended, "history": rows}));
    }
    for r in &rows {
        outln!("{:<13} {} [{}]", r.action, r.artifact, r.tags.join(","));
    }
    outln!("{}", execution_line(&ended));
    match ended.execution.status {
        Status::Succeeded | Status::Stopped => Ok(()),
        _ => Err(format!(
            "cleanup execution {id} ended {:?}{}",
            ended.execution.status,
            ended
                .execution
                .error
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        )),
    }
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
