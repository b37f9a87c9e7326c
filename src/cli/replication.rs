//! `berth replication endpoint|rule|run|executions|history|stop`: endpoints, rules and their
//! executions through the management API (an admin of every registry).

use clap::{Args, Subcommand};
use http::Method;

use super::jobs::{schedule_of, JobCommands};
use super::remote::seg;
use super::{print_json, Place};
use crate::api::replication::{EndpointView, TestView};
use crate::policy::cleanup::TagMode;
use crate::replication::endpoint::EndpointSpec;
use crate::replication::rule::{Mode, Rule, TriggerKind};
use crate::store::meta::{CredentialRecord, SourceKind};

#[derive(Subcommand)]
pub enum ReplicationCommand {
    /// Endpoints: another berth region or any OCI registry, with credentials.
    #[command(subcommand)]
    Endpoint(EndpointCommand),
    /// Rules: what is copied where, and when.
    #[command(subcommand)]
    Rule(RuleCommand),
    /// Run a rule now and follow it to its end (a bar at a terminal).
    Run {
        /// The rule.
        rule: String,
        /// Start it and return at once.
        #[arg(long)]
        no_wait: bool,
        /// The ended execution and its history as JSON.
        #[arg(long)]
        json: bool,
    },
    /// A rule's executions, newest first.
    Executions {
        /// The rule.
        rule: String,
        /// At most this many.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// What an execution did to each artifact (copied, skipped, failed).
    History {
        /// The rule.
        rule: String,
        /// Execution id.
        id: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Stop a running execution (transfers in flight are aborted; uploads resume next time).
    Stop {
        /// The rule.
        rule: String,
        /// Execution id.
        id: String,
    },
}

#[derive(Subcommand)]
pub enum EndpointCommand {
    /// List endpoints (never their secrets).
    List {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Add an endpoint, or replace one with --replace.
    Add(EndpointArgs),
    /// Try an endpoint's URL and credentials (GET /v2/).
    Test {
        /// Its name.
        name: String,
    },
    /// Delete an endpoint (refused while rules use it).
    Rm {
        /// Its name.
        name: String,
    },
}

#[derive(Args)]
pub struct EndpointArgs {
    /// Its name.
    name: String,
    /// Its URL (`https://eu.example.com:5000`).
    #[arg(long)]
    url: String,
    /// registry (another berth, any OCI registry), or dockerhub, ecr, acr, gcr, harbor, quay.
    #[arg(long, default_value = "registry")]
    kind: SourceKind,
    /// User (another berth: an access key id).
    #[arg(long)]
    username: Option<String>,
    /// Read the password (another berth: the key's secret) from standard input.
    #[arg(long)]
    password_stdin: bool,
    /// File with the credentials instead.
    #[arg(long)]
    credentials_file: Option<std::path::PathBuf>,
    /// Accept any TLS certificate.
    #[arg(long)]
    insecure: bool,
    /// CA certificates (PEM) trusted for it besides the system's.
    #[arg(long)]
    ca_file: Option<std::path::PathBuf>,
    /// Replace an existing endpoint of that name.
    #[arg(long)]
    replace: bool,
}

#[derive(Subcommand)]
pub enum RuleCommand {
    /// List rules.
    List {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Add a rule (push mode: this berth to the endpoint), or replace one with --replace.
    Add(RuleArgs),
    /// Delete a rule (its executions stay in the history).
    Rm {
        /// Its name.
        name: String,
    },
}

#[derive(Args)]
pub struct RuleArgs {
    /// Its name.
    name: String,
    /// The endpoint copied to.
    #[arg(long)]
    endpoint: String,
    /// The registry copied from.
    #[arg(long)]
    registry: String,
    /// Doublestar pattern of the images below the registry (default: all).
    #[arg(long, default_value = "")]
    images: String,
    /// Doublestar pattern of the tags (default: all).
    #[arg(long, default_value = "")]
    tags: String,
    /// Copy the tags the pattern does NOT match.
    #[arg(long)]
    exclude_tags: bool,
    /// First segment(s) of the destination repositories (default: the registry's name).
    #[arg(long, default_value = "")]
    dest_namespace: String,
    /// Keep only the last N segments of the image path at the destination (0: all).
    #[arg(long, default_value_t = 0)]
    flatten: u32,
    /// manual, event (each push) or schedule.
    #[arg(long, default_value = "manual")]
    trigger: String,
    /// With --trigger schedule: hourly, daily, weekly or a cron expression in UTC.
    #[arg(long)]
    schedule: Option<String>,
    /// Leave destination tags that point at another artifact as they are.
    #[arg(long)]
    no_override: bool,
    /// Do not copy referrers (signatures, SBOMs) with their subject.
    #[arg(long)]
    no_referrers: bool,
    /// Store it disabled.
    #[arg(long)]
    disabled: bool,
    /// Bytes per second for a whole execution (0: no limit).
    #[arg(long, default_value_t = 0)]
    bandwidth_limit: u64,
    /// Blobs in flight at once.
    #[arg(long, default_value_t = 4)]
    concurrency: u32,
    /// Replace an existing rule of that name.
    #[arg(long)]
    replace: bool,
}

fn trigger_of(text: &str) -> Result<TriggerKind, String> {
    serde_json::from_value(serde_json::Value::String(text.to_string()))
        .map_err(|_| format!("--trigger {text:?}: manual, event or schedule"))
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn jobs<'a>(place: &'a Place, rule: &str) -> JobCommands<'a> {
    JobCommands {
        place,
        base: format!("/replication/rules/{}", seg(rule)),
        what: format!("replication rule {rule}"),
        units: "artifacts",
        acted: "copied",
    }
}

pub fn run(place: &Place, cmd: ReplicationCommand) -> Result<(), String> {
    match cmd {
        ReplicationCommand::Endpoint(c) => endpoint(place, c),
        ReplicationCommand::Rule(c) => rule(place, c),
        ReplicationCommand::Run {
            rule,
            no_wait,
            json,
        } => jobs(place, &rule).run(false, no_wait, json, 0),
        ReplicationCommand::Executions { rule, limit, json } => {
            jobs(place, &rule).executions(limit, json)
        }
        ReplicationCommand::History { rule, id, json } => jobs(place, &rule).history(&id, json),
        ReplicationCommand::Stop { rule, id } => jobs(place, &rule).stop(&id),
    }
}

fn endpoint(place: &Place, cmd: EndpointCommand) -> Result<(), String> {
    match cmd {
        EndpointCommand::List { json } => {
            let list: Vec<EndpointView> = place.call(Method::GET, "/replication/endpoints")?;
            if json {
                return print_json(&list);
            }
            for e in &list {
                let x = &e.endpoint;
                outln!(
                    "{:<16} {:<9} {}  credentials {}{}",
                    x.name,
                    x.kind,
                    x.url,
                    yes_no(e.credentials),
                    if x.insecure {
                        "  (TLS not verified)"
                    } else {
                        ""
                    }
                );
            }
        }
        EndpointCommand::Add(a) => {
            let password = if a.password_stdin {
                Some(super::cache::read_password_stdin()?)
            } else {
                None
            };
            let spec = EndpointSpec {
                name: a.name.clone(),
                kind: a.kind,
                url: a.url,
                insecure: a.insecure,
                ca_file: a.ca_file,
                credentials: CredentialRecord {
                    username: a.username,
                    password,
                    credentials_file: a.credentials_file,
                },
            };
            let e: EndpointView = if a.replace {
                let path = format!("/replication/endpoints/{}", seg(&a.name));
                place.send(Method::PUT, &path, &spec)?
            } else {
                place.send(Method::POST, "/replication/endpoints", &spec)?
            };
            outln!(
                "endpoint {} ({}) {}",
                e.endpoint.name,
                e.endpoint.url,
                if a.replace { "replaced" } else { "added" }
            );
        }
        EndpointCommand::Test { name } => {
            let path = format!("/replication/endpoints/{}/test", seg(&name));
            let t: TestView = place.call(Method::POST, &path)?;
            match t.error {
                None => outln!("endpoint {name}: reachable, credentials accepted"),
                Some(e) => return Err(format!("endpoint {name}: {e}")),
            }
        }
        EndpointCommand::Rm { name } => {
            let path = format!("/replication/endpoints/{}", seg(&name));
            place.call_no_content(Method::DELETE, &path)?;
            outln!("endpoint {name} deleted");
        }
    }
    Ok(())
}

fn rule(place: &Place, cmd: RuleCommand) -> Result<(), String> {
    match cmd {
        RuleCommand::List { json } => {
            let list: Vec<Rule> = place.call(Method::GET, "/replication/rules")?;
            if json {
                return print_json(&list);
            }
            for r in &list {
                let all = |p: &str| {
                    if p.is_empty() {
                        "*all*".to_string()
                    } else {
                        p.to_string()
                    }
                };
                let when = match r.trigger {
                    TriggerKind::Schedule => super::jobs::schedule_text(&r.schedule),
                    t => serde_json::to_string(&t)
                        .unwrap_or_default()
                        .replace('"', ""),
                };
                outln!(
                    "{:<20} {} {}/{} tags {}{} -> {} as {}  {}{}",
                    r.name,
                    if r.enabled { "enabled " } else { "disabled" },
                    r.registry,
                    all(&r.images),
                    if r.tag_mode == TagMode::Excluding {
                        "except "
                    } else {
                        ""
                    },
                    all(&r.tags),
                    r.endpoint,
                    r.destination("IMAGE"),
                    when,
                    if r.bandwidth_limit > 0 {
                        format!("  limit {} B/s", r.bandwidth_limit)
                    } else {
                        String::new()
                    }
                );
            }
        }
        RuleCommand::Add(a) => {
            let trigger = trigger_of(&a.trigger)?;
            let schedule = match (&a.schedule, trigger) {
                (Some(s), _) => schedule_of(s),
                (None, _) => crate::jobs::schedule::Schedule::None,
            };
            let r = Rule {
                name: a.name.clone(),
                mode: Mode::Push,
                endpoint: a.endpoint,
                registry: a.registry,
                images: a.images,
                tags: a.tags,
                tag_mode: if a.exclude_tags {
                    TagMode::Excluding
                } else {
                    TagMode::Matching
                },
                dest_namespace: a.dest_namespace,
                flatten: a.flatten,
                trigger,
                schedule,
                override_tags: !a.no_override,
                copy_referrers: !a.no_referrers,
                enabled: !a.disabled,
                bandwidth_limit: a.bandwidth_limit,
                concurrency: a.concurrency,
            };
            let r: Rule = if a.replace {
                let path = format!("/replication/rules/{}", seg(&a.name));
                place.send(Method::PUT, &path, &r)?
            } else {
                place.send(Method::POST, "/replication/rules", &r)?
            };
            outln!(
                "rule {} {}: {} -> {}",
                r.name,
                if a.replace { "replaced" } else { "added" },
                r.registry,
                r.endpoint
            );
        }
        RuleCommand::Rm { name } => {
            let path = format!("/replication/rules/{}", seg(&name));
            place.call_no_content(Method::DELETE, &path)?;
            outln!("rule {name} deleted");
        }
    }
    Ok(())
}
