//! What every job's commands share (`berth cleanup ...`, `berth gc ...`): the schedule, a run
//! followed to its end, the executions, a history, a stop. `base` is the job's API path
//! (`/registries/REGISTRY/cleanup`, `/gc`).

use std::io::IsTerminal;
use std::time::Duration;

use http::Method;

use super::remote::seg;
use super::{print_json, Place};
use crate::api::jobs::{ExecutionView, Paged, RunRequest};
use crate::api::policies::ScheduleView;
use crate::jobs::executions::{HistoryRow, Status};
use crate::jobs::schedule::{Schedule, ScheduleSettings};

/// One job's commands.
pub struct JobCommands<'a> {
    /// Where they act.
    pub place: &'a Place,
    /// The job's API path.
    pub base: String,
    /// What it is, for messages ("cleanup of registry lib").
    pub what: String,
    /// What its tasks work on ("images", "blobs").
    pub units: &'static str,
    /// What it does to them ("deleted", "copied").
    pub acted: &'static str,
}

/// A schedule as given on the command line: a preset or a cron expression.
pub fn schedule_of(text: &str) -> Schedule {
    match text.trim().to_ascii_lowercase().as_str() {
        "none" => Schedule::None,
        "hourly" => Schedule::Hourly,
        "daily" => Schedule::Daily,
        "weekly" => Schedule::Weekly,
        _ => Schedule::Custom(text.trim().to_string()),
    }
}

/// How a schedule reads.
pub fn schedule_text(s: &Schedule) -> String {
    match s {
        Schedule::None => "none (by hand only)".into(),
        Schedule::Hourly => "hourly".into(),
        Schedule::Daily => "daily (00:00 UTC)".into(),
        Schedule::Weekly => "weekly (Saturday 00:00 UTC)".into(),
        Schedule::Custom(c) => format!("cron {c:?} (UTC)"),
    }
}

fn name<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value)
        .unwrap_or_default()
        .replace('"', "")
}

fn row_line(r: &HistoryRow) -> String {
    let mut line = format!("{:<13} {}", r.action, r.artifact);
    if !r.tags.is_empty() {
        line.push_str(&format!(" [{}]", r.tags.join(",")));
    }
    if let Some(size) = r.size {
        line.push_str(&format!(" {size} bytes"));
    }
    line
}

impl JobCommands<'_> {
    fn executions_path(&self) -> String {
        format!("{}/executions", self.base)
    }

    /// Prints the schedule and its next runs, after setting it when `new` is given.
    pub fn schedule(&self, new: Option<String>) -> Result<(), String> {
        let view: ScheduleView = match new {
            None => self.place.call(Method::GET, &self.base)?,
            Some(text) => self.place.send(
                Method::PUT,
                &self.base,
                &ScheduleSettings {
                    schedule: schedule_of(&text),
                },
            )?,
        };
        outln!("schedule: {}", schedule_text(&view.schedule));
        for t in &view.next_runs {
            outln!("  next: {t}");
        }
        Ok(())
    }

    /// One line of an execution.
    fn line(&self, e: &ExecutionView) -> String {
        let x = &e.execution;
        format!(
            "{}  {:<11} {:<8} {}{}  {} {}  {} {} ({} bytes)  failed {}  by {}{}",
            x.id,
            name(&x.status),
            name(&x.trigger),
            e.started,
            if x.dry_run { " (dry run)" } else { "" },
            self.units,
            x.tasks,
            if x.dry_run {
                "would delete"
            } else {
                self.acted
            },
            x.counts.acted,
            x.counts.bytes,
            x.counts.failed,
            x.operator,
            x.error
                .as_deref()
                .map(|e| format!("  error: {e}"))
                .unwrap_or_default()
        )
    }

    /// Prints the newest `limit` executions.
    pub fn executions(&self, limit: usize, json: bool) -> Result<(), String> {
        let path = format!("{}?limit={}", self.executions_path(), limit.clamp(1, 1000));
        let page: Paged<ExecutionView> = self.place.call(Method::GET, &path)?;
        if json {
            return print_json(&page.items);
        }
        for e in &page.items {
            outln!("{}", self.line(e));
        }
        Ok(())
    }

    /// Every history row of an execution.
    fn rows(&self, id: &str) -> Result<Vec<HistoryRow>, String> {
        let path = format!("{}/{}/history", self.executions_path(), seg(id));
        let mut rows = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let page_path = match &cursor {
                Some(c) => format!("{path}?limit=1000&cursor={}", seg(c)),
                None => format!("{path}?limit=1000"),
            };
            let page: Paged<HistoryRow> = self.place.call(Method::GET, &page_path)?;
            rows.extend(page.items);
            match page.next {
                Some(next) => cursor = Some(next),
                None => return Ok(rows),
            }
        }
    }

    /// Prints what an execution did.
    pub fn history(&self, id: &str, json: bool) -> Result<(), String> {
        let rows = self.rows(id)?;
        if json {
            return print_json(&rows);
        }
        for r in &rows {
            outln!("{}", row_line(r));
        }
        Ok(())
    }

    /// Asks a running execution to stop.
    pub fn stop(&self, id: &str) -> Result<(), String> {
        let path = format!("{}/{}/stop", self.executions_path(), seg(id));
        let e: ExecutionView = self.place.call(Method::POST, &path)?;
        if e.execution.status == Status::Running {
            outln!("stop asked: execution {id} ends after the unit it is on");
        } else {
            outln!(
                "execution {id} is not running: {}",
                name(&e.execution.status)
            );
        }
        Ok(())
    }

    /// Starts a run and, unless told not to, follows it (a bar at a terminal, `total` units)
    /// to its end; then prints what it did. Fails when the run failed.
    pub fn run(&self, dry_run: bool, no_wait: bool, json: bool, total: u64) -> Result<(), String> {
        let started: ExecutionView = self.place.send(
            Method::POST,
            &self.executions_path(),
            &RunRequest { dry_run },
        )?;
        let id = started.execution.id.clone();
        if no_wait {
            outln!("started execution {id} of the {}", self.what);
            return Ok(());
        }
        let bar = if json || !std::io::stderr().is_terminal() {
            indicatif::ProgressBar::hidden()
        } else if total == 0 {
            // The number of units is known only to the run (a replication's artifacts).
            let template = format!("{{spinner}} {{pos}} {}  {{msg}}", self.units);
            let bar = indicatif::ProgressBar::new_spinner().with_style(
                indicatif::ProgressStyle::with_template(&template).map_err(|e| e.to_string())?,
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        } else {
            let template = format!("{{bar:30}} {{pos}}/{{len}} {}  {{msg}}", self.units);
            indicatif::ProgressBar::new(total).with_style(
                indicatif::ProgressStyle::with_template(&template).map_err(|e| e.to_string())?,
            )
        };
        let path = format!("{}/{}", self.executions_path(), seg(&id));
        let ended = loop {
            let e: ExecutionView = self.place.call(Method::GET, &path)?;
            bar.set_position(e.execution.tasks);
            bar.set_message(format!(
                "{} {}, {} bytes, {} failed",
                e.execution.counts.acted,
                self.acted,
                e.execution.counts.bytes,
                e.execution.counts.failed
            ));
            if e.execution.status != Status::Running {
                break e;
            }
            self.place.sleep(Duration::from_millis(200));
        };
        bar.finish_and_clear();
        let rows = self.rows(&id)?;
        if json {
            return print_json(&serde_json::json!({"execution": ended, "history": rows}));
        }
        for r in &rows {
            outln!("{}", row_line(r));
        }
        outln!("{}", self.line(&ended));
        match ended.execution.status {
            Status::Succeeded | Status::Stopped => Ok(()),
            status => Err(format!(
                "execution {id} of the {} ended {}{}",
                self.what,
                name(&status),
                ended
                    .execution
                    .error
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            )),
        }
    }
}
