//! A rule's executions (DESIGN.md 9 "Jobs"): a task per artifact with a history row (copied,
//! skipped, failed; bytes), stop, at most one execution per rule. By hand or on its schedule an
//! execution takes every artifact the rule selects; on events it takes what was pushed since
//! the last one: the dispatcher gathers pushes per rule while an execution runs and starts the
//! next with all of them (coalesced), so one busy or slow endpoint never holds back another
//! rule's work.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;

use super::link::{Copied, CopyError};
use super::pull::Fetcher;
use super::rule::{Filter, Mode, Rule};
use super::transfer::Transfer;
use super::{Pushed, Signal};
use crate::error::{Error, Result};
use crate::jobs::executions::{Counts, Execution, HistoryRow, Run, Start, StartError, Trigger};
use crate::oci::digest::Digest;
use crate::oci::reference::{cosign_subject, COSIGN_SUFFIXES};
use crate::store::meta::now_ms;
use crate::App;

/// Executions kept per rule: the newest this many...
const KEEP_EXECUTIONS: usize = 50;
/// ...none older than this.
const KEEP_FOR: Duration = Duration::from_secs(90 * 24 * 3600);

/// Repositories read per page when a rule runs in full.
const PAGE: usize = 1000;

/// Most referrers of one artifact that travel with it.
const MAX_REFERRERS: usize = 1000;

/// Pushes gathered per rule while its execution runs; beyond, the next execution runs in full.
const MAX_PENDING: usize = 10_000;

/// One artifact to copy: a task.
#[derive(Debug, Clone)]
struct Unit {
    /// The repository copied from (here in push mode, at the endpoint in pull mode).
    repository: String,
    image: String,
    digest: Digest,
    tags: Vec<String>,
    /// When the event that named it happened (event executions), for the lag metric.
    event_ms: Option<u64>,
}

fn conflict(e: StartError) -> Error {
    match e {
        StartError::AlreadyRunning { .. } => Error::Conflict(e.to_string()),
        StartError::Meta(m) => m.into(),
    }
}

fn start_of(rule: &Rule, trigger: Trigger, operator: &str) -> Start {
    Start {
        kind: "replication".into(),
        scope: rule.scope(),
        trigger,
        dry_run: false,
        operator: operator.to_string(),
    }
}

/// Starts a rule's execution over everything it selects (by hand, or its schedule); 409 while
/// one runs.
pub async fn start(
    app: &Arc<App>,
    name: &str,
    trigger: Trigger,
    operator: &str,
) -> Result<Execution> {
    let rule = app
        .replication
        .rule(name)
        .await?
        .ok_or_else(|| Error::NotFound(format!("replication rule {name:?} does not exist")))?;
    let run = app
        .jobs
        .start(start_of(&rule, trigger, operator))
        .await
        .map_err(conflict)?;
    let started = run.execution().clone();
    tracing::info!(execution = %started.id, rule = %name, endpoint = %rule.endpoint, trigger = ?trigger, %operator, "replication started");
    let app2 = app.clone();
    app.job_runtime.spawn(async move {
        execute(app2, rule, run, None).await;
    });
    Ok(started)
}

/// Publishes a REPLICATION event of an execution (when it starts, and when it ends).
fn announce(app: &App, rule: &Rule, e: &Execution) {
    let status = serde_json::to_value(e.status)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    app.events.publish(crate::events::Event {
        kind: crate::events::EventKind::Replication,
        time_ms: now_ms(),
        operator: e.operator.clone(),
        registry: rule.registry.clone(),
        repository: String::new(),
        tag: None,
        digest: String::new(),
        media_type: String::new(),
        size: e.counts.bytes,
        job: Some(crate::events::JobInfo {
            name: rule.name.clone(),
            execution: e.id.clone(),
            status,
            examined: e.counts.examined,
            acted: e.counts.acted,
            failed: e.counts.failed,
            bytes: e.counts.bytes,
        }),
    });
}

/// Runs an execution to its end and records it.
async fn execute(
    app: Arc<App>,
    rule: Rule,
    mut run: Run,
    pushed: Option<Vec<(Pushed, BTreeSet<String>, u64)>>,
) {
    let id = run.execution().id.clone();
    announce(&app, &rule, run.execution());
    let outcome = copy_all(&app, &rule, &mut run, pushed).await;
    let error = outcome.err().map(|e| e.to_string());
    if let Some(e) = &error {
        tracing::warn!(execution = %id, rule = %rule.name, error = %e, "replication failed");
    }
    match run.finish(error).await {
        Ok(e) => {
            tracing::info!(execution = %id, rule = %rule.name, status = ?e.status, artifacts = e.counts.examined, copied = e.counts.acted, failed = e.counts.failed, bytes = e.counts.bytes, "replication ended");
            announce(&app, &rule, &e);
        }
        Err(e) => {
            tracing::error!(execution = %id, error = %e, "could not record the end of a replication")
        }
    }
    if let Err(e) = app
        .jobs
        .prune(&rule.scope(), KEEP_EXECUTIONS, KEEP_FOR)
        .await
    {
        tracing::warn!(rule = %rule.name, error = %e, "could not prune old replication executions");
    }
}

async fn copy_all(
    app: &Arc<App>,
    rule: &Rule,
    run: &mut Run,
    pushed: Option<Vec<(Pushed, BTreeSet<String>, u64)>>,
) -> Result<()> {
    let filter = rule.filter().map_err(Error::BadRequest)?;
    let client = app
        .replication
        .endpoints
        .client(&rule.endpoint)
        .await
        .map_err(|e| Error::BadRequest(e.to_string()))?;
    let mover = match rule.mode {
        Mode::Push => Mover::Push(Transfer::new(
            app.clone(),
            rule,
            client,
            app.replication.settings,
            run.stop_flag(),
        )),
        Mode::Pull => Mover::Pull(Fetcher::new(
            app.clone(),
            rule,
            client,
            app.replication.settings,
            run.stop_flag(),
        )),
    };
    if let Mover::Push(t) = &mover {
        match t.prune_resume_points().await {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(rule = %rule.name, endpoint = %rule.endpoint, n, "stale upload resume points dropped")
            }
            Err(e) => {
                tracing::warn!(rule = %rule.name, error = %e, "could not prune upload resume points")
            }
        }
    }
    let units = match (&mover, pushed) {
        (Mover::Pull(f), _) => f
            .gather(rule, &filter)
            .await
            .map_err(|e| Error::Upstream(format!("listing the endpoint: {e}")))?
            .into_iter()
            .map(|(repository, image, digest, tags)| Unit {
                repository,
                image,
                digest,
                tags,
                event_ms: None,
            })
            .collect(),
        (Mover::Push(_), None) => gather(app, rule, &filter).await?,
        (Mover::Push(_), Some(p)) => from_events(app, rule, &filter, p).await?,
    };
    let mover = &mover;
    let mut results = futures_util::stream::iter(units)
        .map(|unit| async move {
            let started = std::time::Instant::now();
            let outcome = copy_unit(app, rule, mover, &unit).await;
            (unit, outcome, started.elapsed())
        })
        .buffer_unordered(rule.concurrency as usize);
    while let Some((unit, outcome, took)) = results.next().await {
        let (counts, error, action) = match &outcome {
            Ok(c) if c.manifests + c.tags > 0 => (
                Counts {
                    examined: 1,
                    acted: 1,
                    failed: 0,
                    bytes: c.bytes,
                },
                None,
                "copied",
            ),
            Ok(c) => (
                Counts {
                    examined: 1,
                    bytes: c.bytes,
                    ..Counts::default()
                },
                None,
                "skipped",
            ),
            Err(CopyError::Stopped) => continue,
            Err(e) => (
                Counts {
                    examined: 1,
                    failed: 1,
                    ..Counts::default()
                },
                Some(e.to_string()),
                "failed",
            ),
        };
        let labels = [
            ("rule", rule.name.clone()),
            ("endpoint", rule.endpoint.clone()),
            ("result", action.to_string()),
        ];
        metrics::counter!("berth_replication_artifacts_total", &labels).increment(1);
        if let (Some(at), "copied" | "skipped") = (unit.event_ms, action) {
            let lag = now_ms().saturating_sub(at) as f64 / 1000.0;
            metrics::gauge!("berth_replication_event_lag_seconds", "rule" => rule.name.clone())
                .set(lag);
        }
        if let Some(e) = &error {
            tracing::warn!(rule = %rule.name, repository = %unit.repository, digest = %unit.digest, error = %e, "artifact not replicated");
        }
        let row = HistoryRow::new(
            format!("{}@{}", unit.repository, unit.digest),
            unit.tags.clone(),
            action,
            counts.bytes,
        );
        let what = format!("{}@{}", unit.repository, unit.digest);
        run.task_timed(&what, counts, error, vec![row], Some(took))
            .await?;
    }
    Ok(())
}

/// What moves artifacts: to the endpoint, or from it.
enum Mover {
    Push(Transfer),
    Pull(Fetcher),
}

impl Mover {
    async fn artifact(
        &self,
        src: &str,
        dest: &str,
        digest: &Digest,
        tags: &[String],
        override_tags: bool,
    ) -> std::result::Result<Copied, CopyError> {
        match self {
            Mover::Push(t) => t.artifact(src, dest, digest, tags, override_tags).await,
            Mover::Pull(f) => f.artifact(src, dest, digest, tags, override_tags).await,
        }
    }

    /// Referrers and cosign tags of an artifact of the side copied from.
    async fn followers(
        &self,
        app: &App,
        src: &str,
        digest: &Digest,
    ) -> std::result::Result<Vec<(Digest, Vec<String>)>, CopyError> {
        if let Mover::Pull(f) = self {
            return f.followers(src, digest).await;
        }
        let meta = &app.store.meta;
        let mut out: Vec<(Digest, Vec<String>)> = meta
            .referrers(src, digest, None, MAX_REFERRERS)
            .await?
            .into_iter()
            .map(|r| (r.digest, Vec::new()))
            .collect();
        for suffix in COSIGN_SUFFIXES {
            let tag = format!("sha256-{}{suffix}", digest.hex());
            if let Some(d) = meta.tag(src, &tag).await? {
                out.push((d, vec![tag]));
            }
        }
        Ok(out)
    }
}

/// Copies a unit with its referrers and cosign tags.
async fn copy_unit(
    app: &App,
    rule: &Rule,
    mover: &Mover,
    unit: &Unit,
) -> std::result::Result<Copied, CopyError> {
    let dest = rule.destination(&unit.image);
    let mut copied = mover
        .artifact(
            &unit.repository,
            &dest,
            &unit.digest,
            &unit.tags,
            rule.override_tags,
        )
        .await?;
    if !rule.copy_referrers {
        return Ok(copied);
    }
    for (d, tags) in mover.followers(app, &unit.repository, &unit.digest).await? {
        let c = mover
            .artifact(&unit.repository, &dest, &d, &tags, true)
            .await?;
        copied.add(c);
    }
    Ok(copied)
}

/// The image part of a repository of `registry`, if it is one of its.
fn image_of<'a>(registry: &str, repository: &'a str) -> Option<&'a str> {
    repository
        .strip_prefix(registry)
        .and_then(|r| r.strip_prefix('/'))
}

/// Whether a tag is one the rule copies on its own: it passes the filter, and cosign's tags
/// travel with their subject instead when referrers are copied.
fn takes_tag(rule: &Rule, filter: &Filter, tag: &str) -> bool {
    if rule.copy_referrers && cosign_subject(tag).is_some() {
        return false;
    }
    filter.tag(tag)
}

/// Every tagged artifact the rule selects, an artifact with all its selected tags.
async fn gather(app: &App, rule: &Rule, filter: &Filter) -> Result<Vec<Unit>> {
    let meta = &app.store.meta;
    let mut units = Vec::new();
    let mut last: Option<String> = None;
    loop {
        let page = meta
            .repositories(Some(&rule.registry), last.as_deref(), PAGE)
            .await?;
        for repository in &page {
            let Some(image) = image_of(&rule.registry, repository) else {
                continue;
            };
            if !filter.image(image) {
                continue;
            }
            let mut by_digest: BTreeMap<Digest, Vec<String>> = BTreeMap::new();
            for (tag, digest) in meta.tagged(repository).await? {
                if takes_tag(rule, filter, &tag) {
                    by_digest.entry(digest).or_default().push(tag);
                }
            }
            units.extend(by_digest.into_iter().map(|(digest, tags)| Unit {
                repository: repository.clone(),
                image: image.to_string(),
                digest,
                tags,
                event_ms: None,
            }));
        }
        if page.len() < PAGE {
            break;
        }
        last = page.last().cloned();
    }
    Ok(units)
}

/// The units of pushes: the artifact with the pushed tags the rule takes, or (pushed by digest)
/// a referrer whose subject travels under this rule. An artifact whose tags the rule does not
/// take is left alone.
async fn from_events(
    app: &App,
    rule: &Rule,
    filter: &Filter,
    pushed: Vec<(Pushed, BTreeSet<String>, u64)>,
) -> Result<Vec<Unit>> {
    let meta = &app.store.meta;
    let mut units = Vec::new();
    for (p, tags, at) in pushed {
        let Some(image) = image_of(&rule.registry, &p.repository) else {
            continue;
        };
        if !filter.image(image) {
            continue;
        }
        let Ok(digest) = Digest::parse(&p.digest) else {
            continue;
        };
        let Some(record) = meta.artifact(&p.repository, &digest).await? else {
            continue; // deleted since
        };
        // Tags as they are now (one may have moved on since the event).
        let mut now = Vec::new();
        for t in &tags {
            if meta.tag(&p.repository, t).await?.as_ref() == Some(&digest) {
                now.push(t.clone());
            }
        }
        let cosign = now.iter().any(|t| cosign_subject(t).is_some());
        let taken: Vec<String> = now
            .iter()
            .filter(|t| takes_tag(rule, filter, t))
            .cloned()
            .collect();
        let follows = rule.copy_referrers && (record.subject.is_some() || cosign);
        if taken.is_empty() && !follows {
            continue;
        }
        let tags = if follows && taken.is_empty() {
            now
        } else {
            taken
        };
        units.push(Unit {
            repository: p.repository.clone(),
            image: image.to_string(),
            digest,
            tags,
            event_ms: Some(at),
        });
    }
    Ok(units)
}

/// What the dispatcher keeps per rule.
#[derive(Default)]
struct RuleQueue {
    running: bool,
    /// Pushes since the running execution took its own, with their tags and first event time.
    pending: BTreeMap<Pushed, (BTreeSet<String>, u64)>,
    /// Pushes were lost: the next execution runs in full.
    full: bool,
}

/// The event dispatcher: gathers pushes per rule and runs one execution per rule at a time,
/// each with every push gathered before it started. Ends when `stop` turns true.
pub async fn dispatch(app: Arc<App>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let Some(mut rx) = app.replication.take_receiver() else {
        return;
    };
    let mut queues: HashMap<String, RuleQueue> = HashMap::new();
    loop {
        let signal = tokio::select! {
            _ = stop.changed() => return,
            s = rx.recv() => match s { Some(s) => s, None => return },
        };
        let mut consider = Vec::new();
        if app.replication.take_lost() {
            tracing::warn!(
                "replication events were dropped on a full queue: event rules run in full next"
            );
            for r in app.replication.rules().await.unwrap_or_default() {
                if r.enabled && r.trigger == super::rule::TriggerKind::Event {
                    queues.entry(r.name.clone()).or_default().full = true;
                    consider.push(r.name);
                }
            }
        }
        consider.push(match signal {
            Signal::Pushed {
                rule,
                what,
                tag,
                at_ms,
            } => {
                let q = queues.entry(rule.clone()).or_default();
                if q.pending.len() >= MAX_PENDING && !q.pending.contains_key(&what) {
                    q.full = true;
                } else {
                    let e = q
                        .pending
                        .entry(what)
                        .or_insert_with(|| (BTreeSet::new(), at_ms));
                    e.0.extend(tag);
                }
                rule
            }
            Signal::Done(rule) => {
                queues.entry(rule.clone()).or_default().running = false;
                rule
            }
        });
        for name in consider {
            let Some(q) = queues.get_mut(&name) else {
                continue;
            };
            if q.running || (q.pending.is_empty() && !q.full) {
                continue;
            }
            q.running = true;
            let pushed: Vec<_> = std::mem::take(&mut q.pending)
                .into_iter()
                .map(|(p, (tags, at))| (p, tags, at))
                .collect();
            let full = std::mem::take(&mut q.full);
            let app2 = app.clone();
            app.job_runtime.spawn(async move {
                run_on_events(&app2, &name, (!full).then_some(pushed)).await;
                app2.replication.signal(Signal::Done(name)).await;
            });
        }
    }
}

/// An event execution: waits while a manual or scheduled one of the rule runs.
async fn run_on_events(
    app: &Arc<App>,
    name: &str,
    pushed: Option<Vec<(Pushed, BTreeSet<String>, u64)>>,
) {
    let rule = match app.replication.rule(name).await {
        Ok(Some(r)) if r.enabled && r.mode == Mode::Push => r,
        Ok(_) => return,
        Err(e) => {
            return tracing::warn!(rule = %name, error = %e, "could not read a replication rule")
        }
    };
    let run = loop {
        match app
            .jobs
            .start(start_of(&rule, Trigger::Event, "event"))
            .await
        {
            Ok(run) => break run,
            Err(StartError::AlreadyRunning { .. }) => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => {
                return tracing::warn!(rule = %name, error = %e, "event replication did not start")
            }
        }
    };
    tracing::info!(execution = %run.execution().id, rule = %name, artifacts = pushed.as_ref().map(Vec::len), "replication started on events");
    execute(app.clone(), rule, run, pushed).await;
}
