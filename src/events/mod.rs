//! The in-process event bus: behaviours publish what happened (push, pull, delete, tags...);
//! webhooks (and later scan, replication and cleanup) consume it. Publishing never waits.

pub mod api;
pub mod delivery;
pub mod payload;
pub mod views;
pub mod webhooks;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Kinds of events (DESIGN.md 9 names; the tag events are berth's own).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum EventKind {
    /// A manifest was pushed.
    PushArtifact,
    /// A manifest was pulled (GET, not HEAD).
    PullArtifact,
    /// An artifact was deleted.
    DeleteArtifact,
    /// A tag was created or moved.
    CreateTag,
    /// A tag was deleted.
    DeleteTag,
    /// A cleanup deleted an artifact (DELETE_ARTIFACT and DELETE_TAG follow it).
    Cleanup,
    /// A replication execution ended (its size: the bytes it copied).
    Replication,
}

impl EventKind {
    /// The wire name (`PUSH_ARTIFACT`...), as in payloads and the `X-Berth-Event` header.
    pub fn as_str(&self) -> &'static str {
        match self {
            EventKind::PushArtifact => "PUSH_ARTIFACT",
            EventKind::PullArtifact => "PULL_ARTIFACT",
            EventKind::DeleteArtifact => "DELETE_ARTIFACT",
            EventKind::CreateTag => "CREATE_TAG",
            EventKind::DeleteTag => "DELETE_TAG",
            EventKind::Cleanup => "CLEANUP",
            EventKind::Replication => "REPLICATION",
        }
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Something that happened to an artifact.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Event {
    /// What happened.
    #[serde(rename = "type")]
    pub kind: EventKind,
    /// When, Unix milliseconds.
    pub time_ms: u64,
    /// Who did it (user name, or `anonymous`).
    pub operator: String,
    /// Registry (first path segment).
    pub registry: String,
    /// Repository (`REGISTRY/IMAGE`).
    pub repository: String,
    /// Tag, when the event concerns one.
    pub tag: Option<String>,
    /// Artifact digest.
    pub digest: String,
    /// Manifest media type.
    pub media_type: String,
    /// Manifest size in bytes.
    pub size: u64,
    /// For a job's event (REPLICATION): the job and its execution's counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<JobInfo>,
}

/// A job's execution as its events tell it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobInfo {
    /// The job (a replication rule's name).
    pub name: String,
    /// Its execution's id.
    pub execution: String,
    /// `running` when it starts; `succeeded`, `failed` or `stopped` when it ends.
    pub status: String,
    /// Artifacts looked at.
    pub examined: u64,
    /// Artifacts acted on (copied).
    pub acted: u64,
    /// Artifacts that failed.
    pub failed: u64,
    /// Bytes moved.
    pub bytes: u64,
}

/// What just happened, borrowed from the request that did it; it becomes an [`Event`] (owned,
/// timestamped) only when someone listens.
#[derive(Debug, Clone, Copy)]
pub struct Happened<'a> {
    /// What happened.
    pub kind: EventKind,
    /// Who did it.
    pub operator: &'a str,
    /// Repository (`REGISTRY/IMAGE`).
    pub repository: &'a str,
    /// Tag, when the event concerns one.
    pub tag: Option<&'a str>,
    /// Artifact digest.
    pub digest: &'a str,
    /// Manifest media type.
    pub media_type: &'a str,
    /// Manifest size in bytes.
    pub size: u64,
}

impl Happened<'_> {
    /// The registry: the repository's first segment.
    pub fn registry(&self) -> &str {
        self.repository.split('/').next().unwrap_or(self.repository)
    }
}

impl Event {
    /// The event of what happened, timestamped now.
    pub fn now(h: &Happened<'_>) -> Event {
        Event {
            kind: h.kind,
            time_ms: crate::store::meta::now_ms(),
            operator: h.operator.to_string(),
            registry: h.registry().to_string(),
            repository: h.repository.to_string(),
            tag: h.tag.map(str::to_string),
            digest: h.digest.to_string(),
            media_type: h.media_type.to_string(),
            size: h.size,
            job: None,
        }
    }
}

/// Events waiting for their consumers; more are dropped (and counted) rather than slowing the
/// request that published them.
pub const BUS_CAPACITY: usize = 10_000;

/// A consumer of events besides webhooks (replication's event triggers). It is told each event
/// it wants on the publisher's thread, so [`Listener::hear`] must not block: it queues.
pub trait Listener: Send + Sync {
    /// Whether it wants events of `kind` in `registry` (asked before an event is built).
    fn wants(&self, kind: EventKind, registry: &str) -> bool;
    /// Takes an event it wants.
    fn hear(&self, event: &Event);
}

/// The bus: a bounded queue from publishers to the dispatcher task, and the webhook policies
/// that consume it; other listeners hear events as they are published.
pub struct Events {
    tx: tokio::sync::mpsc::Sender<Event>,
    rx: parking_lot::Mutex<Option<tokio::sync::mpsc::Receiver<Event>>>,
    /// Webhook policies, their delivery log and delivery.
    pub webhooks: Arc<webhooks::Webhooks>,
    listeners: parking_lot::RwLock<Vec<Arc<dyn Listener>>>,
}

impl Events {
    /// A bus feeding `webhooks`.
    pub fn new(webhooks: webhooks::Webhooks) -> Events {
        let (tx, rx) = tokio::sync::mpsc::channel(BUS_CAPACITY);
        Events {
            tx,
            rx: parking_lot::Mutex::new(Some(rx)),
            webhooks: Arc::new(webhooks),
            listeners: Default::default(),
        }
    }

    /// Adds a listener.
    pub fn listen(&self, listener: Arc<dyn Listener>) {
        self.listeners.write().push(listener);
    }

    /// Publishes an event without waiting: listeners that want it hear it; a full bus drops
    /// it for the webhooks and counts it.
    pub fn publish(&self, event: Event) {
        for l in self.listeners.read().iter() {
            if l.wants(event.kind, &event.registry) {
                l.hear(&event);
            }
        }
        self.to_webhooks(event);
    }

    fn to_webhooks(&self, event: Event) {
        if let Err(e) = self.tx.try_send(event) {
            metrics::counter!("berth_events_dropped_total").increment(1);
            tracing::warn!(error = %e, "event bus full: event dropped");
        }
    }

    /// Whether any consumer listens to `kind` in `registry`: publishers of frequent events
    /// (pulls) check it first so that building the event costs nothing when nobody listens.
    pub fn wants(&self, kind: EventKind, registry: &str) -> bool {
        self.webhooks.wants(kind, registry)
            || self
                .listeners
                .read()
                .iter()
                .any(|l| l.wants(kind, registry))
    }

    /// Publishes what happened if an enabled policy listens for it in its registry; otherwise
    /// builds nothing (the hot manifest GET pays one check).
    pub fn emit(&self, h: Happened<'_>) {
        let hooked = self.webhooks.wants(h.kind, h.registry());
        let listeners = self.listeners.read();
        let mut event = None;
        for l in listeners.iter().filter(|l| l.wants(h.kind, h.registry())) {
            l.hear(event.get_or_insert_with(|| Event::now(&h)));
        }
        if hooked {
            self.to_webhooks(event.unwrap_or_else(|| Event::now(&h)));
        }
    }

    /// The receiving end, taken once by the dispatcher.
    pub fn take_receiver(&self) -> Option<tokio::sync::mpsc::Receiver<Event>> {
        self.rx.lock().take()
    }

    /// Starts the dispatcher (and the delivery workers) until `stop` turns true; `None` when
    /// the receiver was already taken.
    pub fn start(
        &self,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
        let rx = self.take_receiver()?;
        Some(delivery::dispatch(self.webhooks.clone(), rx, stop))
    }
}
