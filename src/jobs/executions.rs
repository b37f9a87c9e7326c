//! Executions of background work (DESIGN.md 9 "Jobs"): an execution of a kind of job for a
//! scope (a policy, or garbage collection), made of tasks (one per image or unit of work), each
//! with history rows (what it did to each artifact). At most one execution per scope runs at
//! once; a running one can be stopped (its work checks [`Run::stopping`] between units); one
//! that was running when the process ended is marked interrupted when the next one opens the
//! store, never left running. Records live in the metadata seam, so the API pages them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::store::meta::{now_ms, HeldLease, MetaResult, MetaStore, Records, LEASE_TTL};

/// What started an execution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// An operator, by hand.
    Manual,
    /// Its schedule.
    Schedule,
    /// An event (a push).
    Event,
}

/// Where an execution stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Under way.
    Running,
    /// Every task done.
    Succeeded,
    /// It ended on an error.
    Failed,
    /// Stopped on request.
    Stopped,
    /// The process ended while it ran.
    Interrupted,
}

/// Counts an execution or a task keeps as it goes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Units (images, artifacts) looked at.
    pub examined: u64,
    /// Units acted on (deleted, copied...; in a dry run: that would be).
    pub acted: u64,
    /// Units that failed.
    pub failed: u64,
    /// Bytes concerned.
    pub bytes: u64,
}

impl Counts {
    fn add(&mut self, other: &Counts) {
        self.examined += other.examined;
        self.acted += other.acted;
        self.failed += other.failed;
        self.bytes += other.bytes;
    }
}

/// One execution.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Execution {
    /// Its id (sorts newest first within its scope).
    pub id: String,
    /// The kind of job (`cleanup`, `gc`...).
    pub kind: String,
    /// What it runs for: at most one running execution per scope.
    pub scope: String,
    /// What started it.
    pub trigger: Trigger,
    /// A dry run changes nothing.
    pub dry_run: bool,
    /// Who started it (an operator's name, `schedule`).
    pub operator: String,
    /// Where it stands.
    pub status: Status,
    /// Why it failed or was interrupted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Start, Unix ms.
    pub started_ms: u64,
    /// End, Unix ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_ms: Option<u64>,
    /// Tasks finished so far.
    pub tasks: u64,
    /// Sums of its tasks' counts.
    pub counts: Counts,
}

/// One task of an execution.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    /// Its number in the execution (from 1).
    pub seq: u64,
    /// What it worked on (an image).
    pub unit: String,
    /// Succeeded or failed.
    pub status: Status,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What it counted.
    pub counts: Counts,
    /// How long it took, when its work measured it (a replication's artifact).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
}

/// What a task did to one artifact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryRow {
    /// The task's number.
    pub task: u64,
    /// The artifact (repository and digest).
    pub artifact: String,
    /// Its tags when it was acted on.
    pub tags: Vec<String>,
    /// What was done (`deleted`, `would_delete`).
    pub action: String,
    /// Bytes concerned (a manifest's, a blob's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
}

impl HistoryRow {
    /// A row (its task number is set when the task is recorded).
    pub fn new(artifact: String, tags: Vec<String>, action: &str, size: u64) -> HistoryRow {
        HistoryRow {
            task: 0,
            artifact,
            tags,
            action: action.to_string(),
            size: Some(size),
        }
    }
}

/// An execution that could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Another execution of the scope runs.
    #[error("execution {running} of {scope} is still running: stop it or wait for it")]
    AlreadyRunning {
        /// The scope.
        scope: String,
        /// The running execution's id.
        running: String,
    },
    /// The metadata failed.
    #[error(transparent)]
    Meta(#[from] crate::store::meta::MetaError),
}

/// What a new execution is.
#[derive(Debug, Clone)]
pub struct Start {
    /// Kind of job.
    pub kind: String,
    /// Its scope.
    pub scope: String,
    /// What started it.
    pub trigger: Trigger,
    /// A dry run.
    pub dry_run: bool,
    /// Who started it.
    pub operator: String,
}

const EXECUTIONS: &str = "job_executions";
const TASKS: &str = "job_tasks";
const HISTORY: &str = "job_history";

/// A running execution's id and stop flag.
type Running = (String, Arc<AtomicBool>);

/// The executions of this node.
#[derive(Clone)]
pub struct Jobs {
    executions: Records<Execution>,
    tasks: Records<Task>,
    history: Records<HistoryRow>,
    /// Running executions by scope, with their stop flags.
    running: Arc<parking_lot::Mutex<HashMap<String, Running>>>,
    /// The store, when other nodes share it: an execution holds its scope's lease there
    /// (one at a time across the nodes; taken over when its node dies).
    shared: Option<Arc<dyn MetaStore>>,
    /// This process among the nodes (lease holders are `NODE EXECUTION-ID`).
    node: String,
    /// One look for orphans at a time on this node.
    looking: Arc<tokio::sync::Mutex<()>>,
}

/// In the holder of a scope's lease taken for a moment to look at an execution that may be an
/// orphan.
const ORPHAN_CHECK: &str = "orphan-check";

/// The lease of a scope's running execution.
fn lease_name(scope: &str) -> String {
    format!("execution/{scope}")
}

/// An execution under way: its work records tasks, checks [`Run::stopping`] between units and
/// ends with [`Run::finish`].
pub struct Run {
    jobs: Jobs,
    execution: Execution,
    stop: Arc<AtomicBool>,
    /// Dropped when the run ends: its lease is released.
    _lease: Option<tokio::sync::oneshot::Sender<()>>,
}

/// The id of an execution started at `ms`: newest first in key order, unique.
fn execution_id(ms: u64) -> String {
    format!(
        "{:016x}{}",
        u64::MAX - ms,
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// A task's key part: numbers in key order.
fn seq_key(seq: u64) -> String {
    format!("{seq:016x}")
}

impl Jobs {
    /// Opens the executions; those still marked running (the process ended under them) become
    /// interrupted; where other nodes share the store, only those whose node is gone (their
    /// scope's lease ran out).
    pub async fn open(meta: Arc<dyn MetaStore>) -> MetaResult<Jobs> {
        let jobs = Jobs {
            executions: Records::new(meta.clone(), EXECUTIONS),
            tasks: Records::new(meta.clone(), TASKS),
            history: Records::new(meta.clone(), HISTORY),
            running: Default::default(),
            shared: meta.shared().then_some(meta),
            node: uuid::Uuid::new_v4().simple().to_string(),
            looking: Default::default(),
        };
        let why = "the process ended while it ran";
        for e in jobs.orphans(why).await? {
            tracing::warn!(execution = %e.id, scope = %e.scope, "execution interrupted by the end of its process");
        }
        Ok(jobs)
    }

    /// Marks interrupted (with `why`) every execution recorded as running that no process runs:
    /// not this one, and, where nodes share the store, no other (its scope's lease is free or
    /// ran out). Answers them as they were, for a caller that starts them again.
    pub async fn orphans(&self, why: &str) -> MetaResult<Vec<Execution>> {
        let _one = self.looking.lock().await;
        let mut found = Vec::new();
        for (key, e) in self.executions.list(&[]).await? {
            if e.status != Status::Running
                || self
                    .running
                    .lock()
                    .get(&e.scope)
                    .is_some_and(|(id, _)| *id == e.id)
            {
                continue;
            }
            if let Some(meta) = &self.shared {
                // Held by a live node: its own. Otherwise this node holds it while it marks.
                // Unique: two lookers on one node must not both hold it.
                let probe = format!(
                    "{} orphan-check {}",
                    self.node,
                    uuid::Uuid::new_v4().simple()
                );
                let name = lease_name(&e.scope);
                if meta.lease_take(&name, &probe, LEASE_TTL).await?.holder != probe {
                    continue;
                }
                // It may have ended between the listing and the lease.
                let (scope, id) = key.split_once('\0').unwrap_or(("", &key));
                let still = self.executions.get(&[scope, id]).await;
                let marked = match still {
                    Ok(Some(now)) if now.status == Status::Running => {
                        self.interrupt(&key, now, why).await.map(|()| true)
                    }
                    Ok(_) => Ok(false),
                    Err(e) => Err(e),
                };
                meta.lease_release(&name, &probe).await?;
                if !marked? {
                    continue;
                }
            } else {
                self.interrupt(&key, e.clone(), why).await?;
            }
            found.push(e);
        }
        Ok(found)
    }

    async fn interrupt(&self, key: &str, mut e: Execution, why: &str) -> MetaResult<()> {
        e.status = Status::Interrupted;
        e.error = Some(why.into());
        e.ended_ms = Some(now_ms());
        let (scope, id) = key.split_once('\0').unwrap_or(("", key));
        self.executions.put(&[scope, id], &e).await
    }

    /// Starts an execution, unless one of its scope runs.
    pub async fn start(&self, start: Start) -> Result<Run, StartError> {
        let started_ms = now_ms();
        let id = execution_id(started_ms);
        let stop = Arc::new(AtomicBool::new(false));
        {
            let mut running = self.running.lock();
            if let Some((running, _)) = running.get(&start.scope) {
                return Err(StartError::AlreadyRunning {
                    scope: start.scope,
                    running: running.clone(),
                });
            }
            running.insert(start.scope.clone(), (id.clone(), stop.clone()));
        }
        let lease = match self.take_lease(&start.scope, &id, &stop).await {
            Ok(lease) => lease,
            Err(e) => {
                self.running.lock().remove(&start.scope);
                return Err(e);
            }
        };
        let execution = Execution {
            id,
            kind: start.kind,
            scope: start.scope,
            trigger: start.trigger,
            dry_run: start.dry_run,
            operator: start.operator,
            status: Status::Running,
            error: None,
            started_ms,
            ended_ms: None,
            tasks: 0,
            counts: Counts::default(),
        };
        if let Err(e) = self.save(&execution).await {
            self.running.lock().remove(&execution.scope);
            return Err(e.into());
        }
        Ok(Run {
            jobs: self.clone(),
            execution,
            stop,
            _lease: lease,
        })
    }

    /// Where nodes share the store: the scope's lease, renewed until the run ends (then
    /// released); a run whose lease another node took is asked to stop.
    async fn take_lease(
        &self,
        scope: &str,
        id: &str,
        stop: &Arc<AtomicBool>,
    ) -> Result<Option<tokio::sync::oneshot::Sender<()>>, StartError> {
        let Some(meta) = &self.shared else {
            return Ok(None);
        };
        let holder = format!("{} {id}", self.node);
        let mut tries = 0;
        let held = loop {
            match HeldLease::take(&**meta, lease_name(scope), holder.clone()).await? {
                Ok(held) => break held,
                // A node looking for orphans holds it for a moment (one read, one write).
                Err(other) if other.holder.contains(ORPHAN_CHECK) && tries < 50 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(other) => {
                    let running = other.holder.split_once(' ').map_or("", |(_, id)| id);
                    return Err(StartError::AlreadyRunning {
                        scope: scope.to_string(),
                        running: running.to_string(),
                    });
                }
            }
        };
        let (ended, done) = tokio::sync::oneshot::channel::<()>();
        let stop = stop.clone();
        tokio::spawn(Arc::new(held).keep(
            meta.clone(),
            async move {
                let _ = done.await;
            },
            move || stop.store(true, Ordering::Release),
        ));
        Ok(Some(ended))
    }

    /// Asks the running execution `id` to stop; whether it runs here.
    pub fn stop(&self, id: &str) -> bool {
        let running = self.running.lock();
        match running.values().find(|(running, _)| running == id) {
            Some((_, flag)) => {
                flag.store(true, Ordering::Release);
                true
            }
            None => false,
        }
    }

    /// Executions of a scope, newest first, after the id `after`, at most `limit`.
    pub async fn executions(
        &self,
        scope: &str,
        after: Option<&str>,
        limit: usize,
    ) -> MetaResult<Vec<Execution>> {
        Ok(self
            .executions
            .list_page(&[scope], after, limit)
            .await?
            .into_iter()
            .map(|(_, e)| e)
            .collect())
    }

    /// One execution.
    pub async fn execution(&self, scope: &str, id: &str) -> MetaResult<Option<Execution>> {
        self.executions.get(&[scope, id]).await
    }

    /// Tasks of an execution in order, after task number `after`, at most `limit`.
    pub async fn tasks(&self, id: &str, after: Option<u64>, limit: usize) -> MetaResult<Vec<Task>> {
        let after = after.map(seq_key);
        Ok(self
            .tasks
            .list_page(&[id], after.as_deref(), limit)
            .await?
            .into_iter()
            .map(|(_, t)| t)
            .collect())
    }

    /// History rows of an execution in order (a page: after the row key `after`), with their
    /// keys.
    pub async fn history(
        &self,
        id: &str,
        after: Option<&str>,
        limit: usize,
    ) -> MetaResult<Vec<(String, HistoryRow)>> {
        self.history.list_page(&[id], after, limit).await
    }

    /// Keeps the `keep` newest executions of a scope that ended, and none older than `max_age`;
    /// removes the others with their tasks and history. Returns how many went.
    pub async fn prune(&self, scope: &str, keep: usize, max_age: Duration) -> MetaResult<usize> {
        let cutoff = now_ms().saturating_sub(max_age.as_millis() as u64);
        let mut ended = 0;
        let mut removed = 0;
        for (id, e) in self.executions.list(&[scope]).await? {
            if e.status == Status::Running {
                continue;
            }
            ended += 1;
            if ended > keep || e.started_ms < cutoff {
                self.tasks.remove_prefix(&[&id]).await?;
                self.history.remove_prefix(&[&id]).await?;
                self.executions.remove(&[scope, &id]).await?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    async fn save(&self, e: &Execution) -> MetaResult<()> {
        self.executions.put(&[&e.scope, &e.id], e).await
    }
}

impl Run {
    /// The execution as it stands.
    pub fn execution(&self) -> &Execution {
        &self.execution
    }

    /// The stop flag, for work that checks it away from the run.
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// Whether a stop was asked: the work ends at the next unit.
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Records a finished task with its history rows; the execution's counts follow, so its
    /// progress shows while it runs.
    pub async fn task(
        &mut self,
        unit: &str,
        counts: Counts,
        error: Option<String>,
        rows: Vec<HistoryRow>,
    ) -> MetaResult<()> {
        self.task_timed(unit, counts, error, rows, None).await
    }

    /// [`Run::task`] with how long the task took.
    pub async fn task_timed(
        &mut self,
        unit: &str,
        counts: Counts,
        error: Option<String>,
        rows: Vec<HistoryRow>,
        duration: Option<Duration>,
    ) -> MetaResult<()> {
        let seq = self.execution.tasks + 1;
        let id = self.execution.id.clone();
        let rows = rows
            .into_iter()
            .enumerate()
            .map(|(n, mut row)| {
                row.task = seq;
                (vec![id.clone(), format!("{}{n:08x}", seq_key(seq))], row)
            })
            .collect();
        self.jobs.history.put_many(rows).await?;
        let task = Task {
            seq,
            unit: unit.to_string(),
            status: if error.is_some() {
                Status::Failed
            } else {
                Status::Succeeded
            },
            error,
            counts,
            duration_ms: duration.map(|d| d.as_millis() as u64),
        };
        self.jobs.tasks.put(&[&id, &seq_key(seq)], &task).await?;
        self.execution.tasks = seq;
        self.execution.counts.add(&counts);
        self.jobs.save(&self.execution).await
    }

    /// Ends the execution: failed with `error`, stopped if a stop was asked, else succeeded.
    pub async fn finish(mut self, error: Option<String>) -> MetaResult<Execution> {
        self.execution.status = match (&error, self.stopping()) {
            (Some(_), _) => Status::Failed,
            (None, true) => Status::Stopped,
            (None, false) => Status::Succeeded,
        };
        self.execution.error = error;
        self.execution.ended_ms = Some(now_ms());
        let saved = self.jobs.save(&self.execution).await;
        self.jobs.running.lock().remove(&self.execution.scope);
        saved.map(|()| self.execution.clone())
    }
}

impl Drop for Run {
    /// A run dropped without [`Run::finish`] (its task panicked or was cancelled) frees its
    /// scope; its record stays running until the next open marks it interrupted.
    fn drop(&mut self) {
        let mut running = self.jobs.running.lock();
        if running
            .get(&self.execution.scope)
            .is_some_and(|(id, _)| *id == self.execution.id)
        {
            running.remove(&self.execution.scope);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(scope: &str) -> Start {
        Start {
            kind: "cleanup".into(),
            scope: scope.into(),
            trigger: Trigger::Manual,
            dry_run: false,
            operator: "root".into(),
        }
    }

    fn counts(acted: u64) -> Counts {
        Counts {
            examined: 2,
            acted,
            failed: 0,
            bytes: 10 * acted,
        }
    }

    #[tokio::test]
    async fn one_execution_per_scope_with_tasks_history_and_progress() {
        let dir = tempfile::tempdir().unwrap();
        let meta = crate::store::meta::open(dir.path()).unwrap();
        let jobs = Jobs::open(meta).await.unwrap();
        let mut run = jobs.start(start("cleanup:lib:p1")).await.unwrap();
        let again = jobs.start(start("cleanup:lib:p1")).await;
        assert!(matches!(again, Err(StartError::AlreadyRunning { .. })));
        let other = jobs.start(start("cleanup:lib:p2")).await.unwrap();
        run.task(
            "lib/app",
            counts(1),
            None,
            vec![HistoryRow::new(
                "lib/app@sha256:aa".into(),
                vec!["v1".into()],
                "deleted",
                10,
            )],
        )
        .await
        .unwrap();
        // Progress is visible while it runs.
        let id = run.execution().id.clone();
        let seen = jobs
            .execution("cleanup:lib:p1", &id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (seen.status, seen.tasks, seen.counts.acted),
            (Status::Running, 1, 1)
        );
        run.task(
            "lib/db",
            counts(0),
            Some("blob store failed".into()),
            vec![],
        )
        .await
        .unwrap();
        let done = run.finish(None).await.unwrap();
        assert_eq!(done.status, Status::Succeeded);
        assert_eq!(done.counts.bytes, 10);
        assert!(done.ended_ms.is_some());
        let tasks = jobs.tasks(&id, None, 10).await.unwrap();
        assert_eq!(tasks.len(), 2);
        assert_eq!(tasks[1].status, Status::Failed);
        assert_eq!(
            jobs.tasks(&id, Some(1), 10).await.unwrap().len(),
            1,
            "paged"
        );
        let history = jobs.history(&id, None, 10).await.unwrap();
        assert_eq!(history[0].1.tags, ["v1"]);
        // The scope is free again.
        jobs.start(start("cleanup:lib:p1"))
            .await
            .unwrap()
            .finish(None)
            .await
            .unwrap();
        let listed = jobs.executions("cleanup:lib:p1", None, 10).await.unwrap();
        assert_eq!(listed.len(), 2);
        assert!(listed[0].started_ms >= listed[1].started_ms, "newest first");
        drop(other);
    }

    #[tokio::test]
    async fn a_stop_ends_the_run_as_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = Jobs::open(crate::store::meta::open(dir.path()).unwrap())
            .await
            .unwrap();
        let run = jobs.start(start("gc")).await.unwrap();
        let id = run.execution().id.clone();
        assert!(!run.stopping());
        assert!(jobs.stop(&id));
        assert!(!jobs.stop("no-such-execution"));
        assert!(run.stopping());
        assert_eq!(run.finish(None).await.unwrap().status, Status::Stopped);
        assert!(!jobs.stop(&id), "it no longer runs");
    }

    #[tokio::test]
    async fn a_run_left_running_by_the_process_is_interrupted_at_the_next_open() {
        let dir = tempfile::tempdir().unwrap();
        let id = {
            let meta = crate::store::meta::open(dir.path()).unwrap();
            let jobs = Jobs::open(meta.clone()).await.unwrap();
            let run = jobs.start(start("gc")).await.unwrap();
            let id = run.execution().id.clone();
            // The process dies under it: no finish, so its record stays running.
            drop(run);
            meta.flush().await.unwrap();
            drop(jobs);
            id
        };
        // sled's flusher may hold the directory's lock a moment after the store is dropped.
        let mut tries = 0;
        let meta = loop {
            match crate::store::meta::open(dir.path()) {
                Ok(m) => break m,
                Err(e) if tries < 100 => {
                    tries += 1;
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(e) => panic!("the data directory stays locked: {e}"),
            }
        };
        let jobs = Jobs::open(meta).await.unwrap();
        let e = jobs.execution("gc", &id).await.unwrap().unwrap();
        assert_eq!(e.status, Status::Interrupted);
        assert!(e.ended_ms.is_some() && e.error.is_some());
        jobs.start(start("gc")).await.expect("the scope is free");
    }

    #[tokio::test]
    async fn history_is_kept_by_count_and_age() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = Jobs::open(crate::store::meta::open(dir.path()).unwrap())
            .await
            .unwrap();
        let mut ids = Vec::new();
        for _ in 0..4 {
            let mut run = jobs.start(start("p")).await.unwrap();
            run.task(
                "img",
                counts(1),
                None,
                vec![HistoryRow::new("a".into(), vec![], "deleted", 1)],
            )
            .await
            .unwrap();
            ids.push(run.finish(None).await.unwrap().id);
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let running = jobs.start(start("p")).await.unwrap();
        assert_eq!(
            jobs.prune("p", 2, Duration::from_secs(3600)).await.unwrap(),
            2
        );
        let left: Vec<String> = jobs
            .executions("p", None, 10)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(
            left.len(),
            3,
            "the running one and the two newest that ended"
        );
        assert!(left.contains(&ids[3]) && left.contains(&ids[2]) && !left.contains(&ids[0]));
        assert!(
            jobs.tasks(&ids[0], None, 10).await.unwrap().is_empty(),
            "its tasks went too"
        );
        assert!(jobs.history(&ids[0], None, 10).await.unwrap().is_empty());
        // By age: nothing that ended is younger than 0 s.
        assert_eq!(jobs.prune("p", 10, Duration::ZERO).await.unwrap(), 2);
        running.finish(None).await.unwrap();
    }
}
