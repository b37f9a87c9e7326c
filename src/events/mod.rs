//! The in-process event bus: behaviours publish what happened (push, pull, delete, tags...);
//! webhooks (and later scan, replication and cleanup) consume it. Publishing never waits.

pub mod webhooks;

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
}

/// Events waiting for their consumers; more are dropped (and counted) rather than slowing the
/// request that published them.
pub const BUS_CAPACITY: usize = 10_000;

/// The bus: a bounded queue from publishers to the dispatcher task.
pub struct Events {
    tx: tokio::sync::mpsc::Sender<Event>,
    rx: std::sync::Mutex<Option<tokio::sync::mpsc::Receiver<Event>>>,
}

impl Default for Events {
    fn default() -> Self {
        let (tx, rx) = tokio::sync::mpsc::channel(BUS_CAPACITY);
        Events {
            tx,
            rx: std::sync::Mutex::new(Some(rx)),
        }
    }
}

impl Events {
    /// Publishes an event without waiting; a full bus drops it and counts it.
    pub fn publish(&self, event: Event) {
        if let Err(e) = self.tx.try_send(event) {
            metrics::counter!("berth_events_dropped_total").increment(1);
            tracing::warn!(error = %e, "event bus full: event dropped");
        }
    }

    /// The receiving end, taken once by the dispatcher.
    pub fn take_receiver(&self) -> Option<tokio::sync::mpsc::Receiver<Event>> {
        self.rx.lock().unwrap().take()
    }
}
