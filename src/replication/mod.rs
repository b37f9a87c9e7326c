//! Replication (DESIGN.md 9): rules that copy images between this berth and endpoints (another
//! berth region, any OCI registry) by glob filters, on push events, on a schedule or by hand,
//! as executions of the job system (a task per artifact, history, stop).
//!
//! - `rule`: what a rule takes and where it lands (no I/O);
//! - `endpoint`: endpoints, their credentials and clients;
//! - `transfer`: the copy of one artifact, resumable;
//! - `run`: executions, and the event dispatcher that coalesces pushes per rule.

pub mod endpoint;
pub mod limit;
pub mod link;
pub mod pull;
pub mod rule;
pub mod run;
pub mod transfer;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;

use crate::config::ReplicationConfig;
use crate::events::{Event, EventKind, Listener};
use crate::http::egress::EgressPolicy;
use crate::store::meta::{MetaResult, MetaStore, Records};
use endpoint::Endpoints;
use rule::{Rule, TriggerKind};

const RULES: &str = "replication_rules";

/// An artifact an event names: its repository and digest, with the tags it was given.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pushed {
    /// Repository (`REGISTRY/IMAGE`).
    pub repository: String,
    /// Digest.
    pub digest: String,
}

/// What the event dispatcher is told.
#[derive(Debug)]
pub enum Signal {
    /// A push for an event rule.
    Pushed {
        /// The rule.
        rule: String,
        /// What was pushed.
        what: Pushed,
        /// Its tag, if any.
        tag: Option<String>,
        /// When, Unix ms.
        at_ms: u64,
    },
    /// A rule's execution ended.
    Done(String),
}

/// Signals waiting for the dispatcher; beyond, events are dropped and every event rule runs in
/// full at its next execution.
pub const SIGNALS: usize = 10_000;

/// Replication's rules, endpoints and event queue.
pub struct Replication {
    /// The endpoints.
    pub endpoints: Endpoints,
    rules: Records<Rule>,
    /// Enabled event rules by source registry (what the event listener asks, without I/O).
    event_rules: RwLock<HashMap<String, Vec<String>>>,
    signals: tokio::sync::mpsc::Sender<Signal>,
    receiver: parking_lot::Mutex<Option<tokio::sync::mpsc::Receiver<Signal>>>,
    /// Set when a signal was dropped on a full queue.
    lost: AtomicBool,
    /// How blobs travel.
    pub settings: link::Settings,
}

/// Why a rule could not be stored.
#[derive(Debug, thiserror::Error)]
pub enum RuleError {
    /// Refused, with the reason.
    #[error("{0}")]
    Invalid(String),
    /// The metadata failed.
    #[error(transparent)]
    Meta(#[from] crate::store::meta::MetaError),
}

impl Replication {
    /// Opens the rules and endpoints stored in `meta`.
    pub async fn open(
        meta: Arc<dyn MetaStore>,
        config: &ReplicationConfig,
        egress: Arc<EgressPolicy>,
    ) -> MetaResult<Replication> {
        let (tx, rx) = tokio::sync::mpsc::channel(SIGNALS);
        let r = Replication {
            endpoints: Endpoints::open(meta.clone(), &config.allowed_ports, egress),
            rules: Records::new(meta, RULES),
            event_rules: RwLock::default(),
            signals: tx,
            receiver: parking_lot::Mutex::new(Some(rx)),
            lost: AtomicBool::new(false),
            settings: link::Settings {
                chunk_bytes: config.chunk_bytes,
                attempts: config.attempts,
                request_timeout: config.request_timeout,
            },
        };
        r.refresh().await?;
        Ok(r)
    }

    /// Creates the endpoints and rules of the config (the config wins over what is stored).
    pub async fn apply(&self, config: &ReplicationConfig) -> Result<(), String> {
        for e in &config.endpoint {
            self.endpoints
                .put(e.clone())
                .await
                .map_err(|err| format!("[[replication.endpoint]] {:?}: {err}", e.name))?;
        }
        for r in &config.rule {
            self.put(r.clone())
                .await
                .map_err(|err| format!("[[replication.rule]] {:?}: {err}", r.name))?;
        }
        Ok(())
    }

    async fn refresh(&self) -> MetaResult<()> {
        let mut by_registry: HashMap<String, Vec<String>> = HashMap::new();
        for (_, r) in self.rules.list(&[]).await? {
            if r.enabled && r.trigger == TriggerKind::Event {
                by_registry
                    .entry(r.registry.clone())
                    .or_default()
                    .push(r.name);
            }
        }
        *self.event_rules.write() = by_registry;
        Ok(())
    }

    /// Creates or replaces a rule after checking it and its endpoint.
    pub async fn put(&self, rule: Rule) -> Result<Rule, RuleError> {
        rule.check().map_err(RuleError::Invalid)?;
        if self.endpoints.get(&rule.endpoint).await?.is_none() {
            return Err(RuleError::Invalid(format!(
                "endpoint: {:?} does not exist",
                rule.endpoint
            )));
        }
        let exists = self.rules.get(&[&rule.name]).await?.is_some();
        if !exists && self.rules.list(&[]).await?.len() >= rule::MAX_RULES {
            return Err(RuleError::Invalid(format!(
                "at most {} rules",
                rule::MAX_RULES
            )));
        }
        self.rules.put(&[&rule.name], &rule).await?;
        self.refresh().await?;
        Ok(rule)
    }

    /// Every rule, by name.
    pub async fn rules(&self) -> MetaResult<Vec<Rule>> {
        Ok(self
            .rules
            .list(&[])
            .await?
            .into_iter()
            .map(|(_, r)| r)
            .collect())
    }

    /// One rule.
    pub async fn rule(&self, name: &str) -> MetaResult<Option<Rule>> {
        self.rules.get(&[name]).await
    }

    /// Deletes a rule; whether it existed. Its executions stay in the history.
    pub async fn remove(&self, name: &str) -> MetaResult<bool> {
        let existed = self.rules.remove(&[name]).await?.is_some();
        self.refresh().await?;
        Ok(existed)
    }

    /// Rules that use an endpoint.
    pub async fn rules_of(&self, endpoint: &str) -> MetaResult<Vec<String>> {
        Ok(self
            .rules()
            .await?
            .into_iter()
            .filter(|r| r.endpoint == endpoint)
            .map(|r| r.name)
            .collect())
    }

    /// The dispatcher's end of the event queue (taken once).
    pub fn take_receiver(&self) -> Option<tokio::sync::mpsc::Receiver<Signal>> {
        self.receiver.lock().take()
    }

    /// Tells the dispatcher (an execution's end must reach it: it waits for room).
    pub async fn signal(&self, s: Signal) {
        let _ = self.signals.send(s).await;
    }

    /// Whether events were dropped since the last call.
    pub fn take_lost(&self) -> bool {
        self.lost.swap(false, Ordering::AcqRel)
    }
}

impl Listener for Replication {
    fn wants(&self, kind: EventKind, registry: &str) -> bool {
        matches!(kind, EventKind::PushArtifact | EventKind::CreateTag)
            && self.event_rules.read().contains_key(registry)
    }

    fn hear(&self, event: &Event) {
        let rules = self.event_rules.read();
        for rule in rules.get(&event.registry).into_iter().flatten() {
            let signal = Signal::Pushed {
                rule: rule.clone(),
                what: Pushed {
                    repository: event.repository.clone(),
                    digest: event.digest.clone(),
                },
                tag: event.tag.clone(),
                at_ms: event.time_ms,
            };
            if self.signals.try_send(signal).is_err() {
                self.lost.store(true, Ordering::Release);
                metrics::counter!("berth_replication_events_dropped_total").increment(1);
            }
        }
    }
}
