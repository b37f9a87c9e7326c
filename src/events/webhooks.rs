//! Webhook policies per registry: validation, persistence, the in-memory snapshot of enabled
//! policies that `wants` and the dispatcher read, and reads of the delivery log.
//!
//! Flow (see `delivery.rs`): the dispatcher takes events from the bus, matches them against the
//! enabled policies of their registry, and puts one job per policy into that policy's bounded
//! queue. One worker per policy delivers its jobs in order, retrying with exponential backoff.
//! Every delivery is in the persisted log; a pending one also has its event in the outbox tree,
//! so a restart re-enqueues it instead of losing it. Payloads are built in `payload.rs`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{Event, EventKind};
use crate::config::WebhookConfig;
use crate::error::{Error, Result};
use crate::http::egress::{EgressError, EgressPolicy};
use crate::store::meta::{now_ms, Change, MetaStore, Records};

/// The tree of webhook policies.
const POLICIES: &str = "webhook_policies";

/// The sequence delivery numbers come from (shared by every node of a shared metadata store).
pub(super) const DELIVERY_IDS: &str = "webhook_deliveries";

/// Payload format of a policy's target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WebhookKind {
    /// berth's JSON event (signed with HMAC-SHA256 when a secret is set).
    #[default]
    Http,
    /// A Slack incoming-webhook message.
    Slack,
}

/// A webhook policy of one registry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WebhookPolicy {
    /// Identifier (a simple UUID).
    pub id: String,
    /// Registry whose events it receives.
    pub registry: String,
    /// Name, unique within the registry.
    pub name: String,
    /// Event kinds it subscribes to.
    pub events: Vec<EventKind>,
    /// URL the events are POSTed to.
    pub target: String,
    /// Payload format.
    pub kind: WebhookKind,
    /// `Authorization` header value sent with each delivery (never shown by the API).
    pub auth_header: Option<String>,
    /// HMAC-SHA256 key of the `X-Berth-Signature-256` header (never shown by the API).
    pub secret: Option<String>,
    /// Disabled policies receive nothing.
    pub enabled: bool,
    /// Creation time, Unix milliseconds.
    pub created_ms: u64,
}

impl WebhookPolicy {
    /// The policy as the API shows it: credentials are reduced to whether they are set.
    pub fn view(&self) -> super::views::WebhookView {
        super::views::WebhookView::of(self)
    }
}

/// A new policy, as posted to the API.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSpec {
    /// Name, unique within the registry.
    pub name: String,
    /// Event kinds (at least one).
    pub events: Vec<EventKind>,
    /// `http://` or `https://` URL.
    pub target: String,
    /// Payload format (default `http`).
    #[serde(default)]
    pub kind: WebhookKind,
    /// `Authorization` header value to send.
    #[serde(default)]
    pub auth_header: Option<String>,
    /// HMAC key.
    #[serde(default)]
    pub secret: Option<String>,
    /// Default true.
    #[serde(default = "crate::config::yes")]
    pub enabled: bool,
}

/// A change to a policy: absent fields stay as they are; an empty `auth_header` or `secret`
/// removes it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookPatch {
    /// New name.
    pub name: Option<String>,
    /// New event kinds.
    pub events: Option<Vec<EventKind>>,
    /// New target URL.
    pub target: Option<String>,
    /// New payload format.
    pub kind: Option<WebhookKind>,
    /// New `Authorization` value; `""` removes it.
    pub auth_header: Option<String>,
    /// New HMAC key; `""` removes it.
    pub secret: Option<String>,
    /// Enable or disable.
    pub enabled: Option<bool>,
}

/// State of a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryStatus {
    /// Queued or being retried.
    Pending,
    /// The target answered 2xx.
    Delivered,
    /// Attempts exhausted, or the target is unusable.
    Failed,
    /// The policy's queue was full.
    Dropped,
}

/// One entry of a policy's delivery log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Delivery {
    /// Identifier, increasing with creation (process restarts included).
    pub id: u64,
    /// The policy it belongs to.
    pub policy_id: String,
    /// Kind of the event delivered.
    pub event: EventKind,
    /// Where it stands.
    pub status: DeliveryStatus,
    /// Attempts made so far.
    pub attempts: u32,
    /// HTTP status of the last answer.
    pub http_status: Option<u16>,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
    /// Creation time, Unix milliseconds.
    pub created_ms: u64,
    /// Last change, Unix milliseconds.
    pub updated_ms: u64,
}

/// Enabled policies per registry, shared read-only by the dispatcher and `wants`.
type Active = HashMap<String, Vec<Arc<WebhookPolicy>>>;

/// The in-memory copy of the policies: it follows every change of the policy records through
/// the metadata's change notifications (this node's API, the CLI, or another node), never
/// only the changes this process made.
pub(super) struct Snapshot {
    /// Every policy by record key (`registry \0 id`).
    all: Mutex<BTreeMap<String, Arc<WebhookPolicy>>>,
    pub(super) active: RwLock<Arc<Active>>,
    /// Fast path of `wants(PullArtifact)`: false while no enabled policy subscribes to pulls.
    pub(super) any_pull: AtomicBool,
    /// Bumped on every policy change; the dispatcher drops queues of deleted policies.
    pub(super) changed: watch::Sender<u64>,
}

impl Snapshot {
    fn new() -> Snapshot {
        Snapshot {
            all: Mutex::new(BTreeMap::new()),
            active: RwLock::new(Arc::new(HashMap::new())),
            any_pull: AtomicBool::new(false),
            changed: watch::channel(0).0,
        }
    }

    /// A policy record changed (`value`: its new bytes, `None`: removed).
    fn apply(&self, key: &str, value: Option<&[u8]>) {
        let mut all = self.all.lock();
        match value.map(serde_json::from_slice::<WebhookPolicy>) {
            Some(Ok(p)) => {
                all.insert(key.to_string(), Arc::new(p));
            }
            Some(Err(e)) => {
                tracing::error!(key = %key.replace('\0', "/"), error = %e, "unreadable webhook policy record ignored");
                all.remove(key);
            }
            None => {
                all.remove(key);
            }
        }
        self.publish(&all);
    }

    /// Policies read at open (changes notified meanwhile win).
    fn load(&self, loaded: Vec<(String, WebhookPolicy)>) {
        let mut all = self.all.lock();
        for (key, p) in loaded {
            all.entry(key).or_insert_with(|| Arc::new(p));
        }
        self.publish(&all);
    }

    /// Every policy read again (after lost changes): the loaded ones, and no other.
    fn replace(&self, loaded: Vec<(String, WebhookPolicy)>) {
        let mut all = self.all.lock();
        *all = loaded.into_iter().map(|(k, p)| (k, Arc::new(p))).collect();
        self.publish(&all);
    }

    fn publish(&self, all: &BTreeMap<String, Arc<WebhookPolicy>>) {
        let mut active: Active = HashMap::new();
        let mut any_pull = false;
        for p in all.values().filter(|p| p.enabled) {
            any_pull |= p.events.contains(&EventKind::PullArtifact);
            active
                .entry(p.registry.clone())
                .or_default()
                .push(p.clone());
        }
        *self.active.write() = Arc::new(active);
        self.any_pull.store(any_pull, Ordering::Release);
        self.changed.send_modify(|v| *v += 1);
    }
}

/// Webhook policies, their delivery log and their delivery.
pub struct Webhooks {
    pub(super) config: WebhookConfig,
    /// Key `registry \0 id`.
    pub(super) policies: Records<WebhookPolicy>,
    /// Key `policy_id \0 delivery id (20 digits)`: key order is creation order.
    pub(super) log: Records<Delivery>,
    /// Events of pending deliveries, same keys as `log`.
    pub(super) outbox: Records<Event>,
    /// Where nodes share the metadata: the node whose queue holds each pending delivery, same
    /// keys as `outbox` (another node takes them over once that node is gone).
    pub(super) owners: Records<String>,
    /// This process among the nodes.
    pub(super) node: String,
    /// At least the next delivery number (the floor of [`DELIVERY_IDS`]: numbers given
    /// before it existed).
    pub(super) next_id: AtomicU64,
    /// The metadata (for delivery numbers).
    pub(super) meta: Arc<dyn MetaStore>,
    /// Enabled policies, following the store.
    pub(super) snapshot: Arc<Snapshot>,
    /// Serializes policy changes made here (name uniqueness).
    pub(super) changes: tokio::sync::Mutex<()>,
    /// Log length per policy and the length at which to trim it next.
    pub(super) log_len: Mutex<HashMap<String, (usize, usize)>>,
    pub(super) queue_depth: AtomicI64,
    pub(super) client: reqwest::Client,
    /// Where targets may be (`[egress]`): checked at creation and again at each delivery,
    /// where the client's resolver applies it to the resolved address.
    pub(super) egress: Arc<EgressPolicy>,
}

pub(super) fn seq(id: u64) -> String {
    format!("{id:020}")
}

/// Checks a target URL without DNS: http(s), a host, a port in `allowed` (empty allows any),
/// and an IP-literal host (in any spelling) against the egress policy.
pub(super) fn check_target(
    target: &str,
    allowed: &[u16],
    policy: &EgressPolicy,
) -> Result<reqwest::Url> {
    let url = reqwest::Url::parse(target)
        .map_err(|e| Error::BadRequest(format!("webhook target {target:?} is not a URL: {e}")))?;
    policy
        .check_url(&url, allowed, "webhooks.allowed_ports")
        .map_err(|e| target_refused(target, e))?;
    Ok(url)
}

fn target_refused(target: &str, e: EgressError) -> Error {
    Error::BadRequest(match e {
        EgressError::Scheme(_) => {
            format!("webhook target {target:?} must be an http:// or https:// URL")
        }
        EgressError::NoHost => format!("webhook target {target:?} has no host"),
        EgressError::Port { port, allowed, .. } => format!(
            "webhook target port {port} is not allowed (webhooks.allowed_ports: {allowed:?})"
        ),
        denied @ EgressError::Denied { .. } => {
            format!("webhook target {target:?} is refused: {denied}")
        }
    })
}

fn check_header(value: &Option<String>) -> Result<()> {
    if let Some(v) = value {
        http::HeaderValue::from_str(v).map_err(|_| {
            Error::BadRequest("auth_header is not a valid HTTP header value".into())
        })?;
    }
    Ok(())
}

fn check_events(events: &mut Vec<EventKind>) -> Result<()> {
    let mut seen = HashSet::new();
    events.retain(|k| seen.insert(*k));
    if events.is_empty() {
        return Err(Error::BadRequest(
            "a webhook policy needs at least one event".into(),
        ));
    }
    Ok(())
}

fn non_empty(v: Option<String>) -> Option<String> {
    v.filter(|s| !s.is_empty())
}

impl Webhooks {
    /// Opens the policy, log and outbox trees, with the default egress policy.
    pub async fn open(meta: &Arc<dyn MetaStore>, config: &WebhookConfig) -> Result<Webhooks> {
        Webhooks::open_with(meta, config, Arc::new(EgressPolicy::default())).await
    }

    /// Opens the policy, log and outbox trees; targets must pass `egress`.
    pub async fn open_with(
        meta: &Arc<dyn MetaStore>,
        config: &WebhookConfig,
        egress: Arc<EgressPolicy>,
    ) -> Result<Webhooks> {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .dns_resolver(egress.resolver(Vec::new()))
            .connect_timeout(config.timeout)
            .user_agent(concat!("berth-webhooks/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::Internal(format!("webhook HTTP client: {e}")))?;
        let log: Records<Delivery> = Records::new(meta.clone(), "webhook_deliveries");
        let last = log.list(&[]).await?.into_iter().map(|(_, d)| d.id).max();
        let w = Webhooks {
            config: config.clone(),
            policies: Records::new(meta.clone(), POLICIES),
            log,
            outbox: Records::new(meta.clone(), "webhook_outbox"),
            owners: Records::new(meta.clone(), "webhook_outbox_owners"),
            node: uuid::Uuid::new_v4().simple().to_string(),
            next_id: AtomicU64::new(last.map_or(1, |l| l + 1)),
            meta: meta.clone(),
            snapshot: Arc::new(Snapshot::new()),
            changes: tokio::sync::Mutex::new(()),
            log_len: Mutex::new(HashMap::new()),
            queue_depth: AtomicI64::new(0),
            client,
            egress,
        };
        // Subscribed before the first read: no change falls between the two. The subscriber
        // holds the snapshot weakly: a dropped `Webhooks` leaves nothing behind that matters.
        let snapshot = Arc::downgrade(&w.snapshot);
        meta.subscribe(Box::new(move |change| {
            if let Change::Record { tree, key, value } = change {
                if tree == POLICIES {
                    if let Some(s) = snapshot.upgrade() {
                        s.apply(key, value);
                    }
                }
            }
        }));
        let reloaded = Arc::downgrade(&w.snapshot);
        crate::store::meta::reload_on_lost(meta, move |meta| {
            let snapshot = reloaded.clone();
            async move {
                match Records::<WebhookPolicy>::new(meta, POLICIES)
                    .list(&[])
                    .await
                {
                    Ok(all) => {
                        if let Some(s) = snapshot.upgrade() {
                            s.replace(all);
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "webhook policies not read again after lost changes")
                    }
                }
            }
        });
        w.snapshot.load(w.policies.list(&[]).await?);
        Ok(w)
    }

    /// Whether an enabled policy of `registry` subscribes to `kind`. Pull checks cost one
    /// atomic load while no policy anywhere subscribes to pulls.
    pub fn wants(&self, kind: EventKind, registry: &str) -> bool {
        if kind == EventKind::PullArtifact && !self.snapshot.any_pull.load(Ordering::Acquire) {
            return false;
        }
        self.snapshot
            .active
            .read()
            .get(registry)
            .is_some_and(|ps| ps.iter().any(|p| p.events.contains(&kind)))
    }

    pub(super) fn matching(&self, event: &Event) -> Vec<Arc<WebhookPolicy>> {
        let active = self.snapshot.active.read().clone();
        active
            .get(&event.registry)
            .map(|ps| {
                ps.iter()
                    .filter(|p| p.events.contains(&event.kind))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    async fn name_taken(&self, registry: &str, name: &str, except: Option<&str>) -> Result<bool> {
        Ok(self
            .policies
            .list(&[registry])
            .await?
            .iter()
            .any(|(_, p)| p.name == name && Some(p.id.as_str()) != except))
    }

    /// Creates a policy.
    pub async fn create(&self, registry: &str, spec: WebhookSpec) -> Result<WebhookPolicy> {
        let WebhookSpec {
            name,
            mut events,
            target,
            kind,
            auth_header,
            secret,
            enabled,
        } = spec;
        let name = name.trim().to_string();
        if name.is_empty() {
            return Err(Error::BadRequest("webhook name must not be empty".into()));
        }
        check_events(&mut events)?;
        check_target(&target, &self.config.allowed_ports, &self.egress)?;
        let auth_header = non_empty(auth_header);
        check_header(&auth_header)?;
        let _guard = self.changes.lock().await;
        if self.name_taken(registry, &name, None).await? {
            return Err(Error::Conflict(format!(
                "registry {registry:?} already has a webhook named {name:?}"
            )));
        }
        let policy = WebhookPolicy {
            id: uuid::Uuid::new_v4().simple().to_string(),
            registry: registry.to_string(),
            name,
            events,
            target,
            kind,
            auth_header,
            secret: non_empty(secret),
            enabled,
            created_ms: now_ms(),
        };
        // The snapshot follows through the change notification.
        self.policies.put(&[registry, &policy.id], &policy).await?;
        Ok(policy)
    }

    /// Checks a target as [`create`](Self::create) and [`update`](Self::update) do, and also
    /// where its host name resolves now (a name that resolves only to denied addresses is
    /// refused; one that does not resolve yet is accepted, and checked again at delivery).
    pub async fn check_destination(&self, target: &str) -> Result<()> {
        let url = check_target(target, &self.config.allowed_ports, &self.egress)?;
        self.egress
            .check_resolved(&url, &self.config.allowed_ports, "webhooks.allowed_ports")
            .await
            .map_err(|e| target_refused(target, e))
    }

    /// Policies of a registry, by name.
    pub async fn list(&self, registry: &str) -> Result<Vec<WebhookPolicy>> {
        let mut all: Vec<WebhookPolicy> = self
            .policies
            .list(&[registry])
            .await?
            .into_iter()
            .map(|(_, p)| p)
            .collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(all)
    }

    /// One policy.
    pub async fn get(&self, registry: &str, id: &str) -> Result<WebhookPolicy> {
        self.policies
            .get(&[registry, id])
            .await?
            .ok_or_else(|| Error::NotFound(format!("registry {registry:?} has no webhook {id:?}")))
    }

    /// Changes a policy.
    pub async fn update(
        &self,
        registry: &str,
        id: &str,
        patch: WebhookPatch,
    ) -> Result<WebhookPolicy> {
        let _guard = self.changes.lock().await;
        let mut p = self.get(registry, id).await?;
        if let Some(name) = patch.name {
            let name = name.trim().to_string();
            if name.is_empty() {
                return Err(Error::BadRequest("webhook name must not be empty".into()));
            }
            if self.name_taken(registry, &name, Some(id)).await? {
                return Err(Error::Conflict(format!(
                    "registry {registry:?} already has a webhook named {name:?}"
                )));
            }
            p.name = name;
        }
        if let Some(mut events) = patch.events {
            check_events(&mut events)?;
            p.events = events;
        }
        if let Some(target) = patch.target {
            check_target(&target, &self.config.allowed_ports, &self.egress)?;
            p.target = target;
        }
        if let Some(kind) = patch.kind {
            p.kind = kind;
        }
        if let Some(h) = patch.auth_header {
            let h = non_empty(Some(h));
            check_header(&h)?;
            p.auth_header = h;
        }
        if let Some(s) = patch.secret {
            p.secret = non_empty(Some(s));
        }
        if let Some(enabled) = patch.enabled {
            p.enabled = enabled;
        }
        self.policies.put(&[registry, id], &p).await?;
        Ok(p)
    }

    /// Deletes a policy with its delivery log; its queued deliveries are discarded.
    pub async fn delete(&self, registry: &str, id: &str) -> Result<()> {
        let _guard = self.changes.lock().await;
        self.policies
            .remove(&[registry, id])
            .await?
            .ok_or_else(|| {
                Error::NotFound(format!("registry {registry:?} has no webhook {id:?}"))
            })?;
        self.forget(id).await
    }

    /// Deletes every policy of a registry (the registry is being deleted); returns how many.
    pub async fn remove_registry(&self, registry: &str) -> Result<usize> {
        let _guard = self.changes.lock().await;
        let policies = self.policies.list(&[registry]).await?;
        for (id, _) in &policies {
            self.forget(id).await?;
        }
        self.policies.remove_prefix(&[registry]).await?;
        Ok(policies.len())
    }

    async fn forget(&self, id: &str) -> Result<()> {
        self.log.remove_prefix(&[id]).await?;
        self.outbox.remove_prefix(&[id]).await?;
        self.owners.remove_prefix(&[id]).await?;
        self.log_len.lock().remove(id);
        Ok(())
    }

    /// The newest `limit` deliveries of a policy, newest first.
    pub async fn deliveries(
        &self,
        registry: &str,
        id: &str,
        limit: usize,
    ) -> Result<Vec<Delivery>> {
        self.get(registry, id).await?;
        let mut all: Vec<Delivery> = self
            .log
            .list(&[id])
            .await?
            .into_iter()
            .map(|(_, d)| d)
            .collect();
        all.reverse();
        all.truncate(limit.min(self.config.log_keep));
        Ok(all)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::events::payload::{http_payload, signature, slack_payload};
    use crate::events::Happened;

    fn config() -> WebhookConfig {
        WebhookConfig {
            retry_initial: Duration::from_millis(100),
            retry_max: Duration::from_millis(700),
            ..WebhookConfig::default()
        }
    }

    fn spec(name: &str, target: &str) -> WebhookSpec {
        WebhookSpec {
            name: name.into(),
            events: vec![EventKind::PushArtifact, EventKind::PushArtifact],
            target: target.into(),
            kind: WebhookKind::Http,
            auth_header: Some("Bearer x".into()),
            secret: Some("s3cret".into()),
            enabled: true,
        }
    }

    #[tokio::test]
    async fn events_backoff_doubles_up_to_the_maximum() {
        let dir = tempfile::tempdir().unwrap();
        let meta = crate::store::meta::open(dir.path()).unwrap();
        let w = Webhooks::open(&meta, &config()).await.unwrap();
        let delays: Vec<u64> = (1..=5).map(|n| w.backoff(n).as_millis() as u64).collect();
        assert_eq!(delays, [100, 200, 400, 700, 700]);
    }

    #[tokio::test]
    async fn events_policy_validation_and_view() {
        let dir = tempfile::tempdir().unwrap();
        let meta = crate::store::meta::open(dir.path()).unwrap();
        let w = Webhooks::open(&meta, &config()).await.unwrap();
        let p = w
            .create("lib", spec("a", "https://hooks.example/x"))
            .await
            .unwrap();
        assert_eq!(p.events, [EventKind::PushArtifact], "duplicates removed");
        let view = serde_json::to_string(&p.view()).unwrap();
        assert!(
            !view.contains("s3cret") && !view.contains("Bearer x"),
            "{view}"
        );
        assert!(p.view().secret_set);
        assert!(matches!(
            w.create("lib", spec("a", "https://hooks.example/y")).await,
            Err(Error::Conflict(_))
        ));
        let e = w
            .create("lib", spec("b", "http://hooks.example:9000/"))
            .await
            .unwrap_err();
        assert!(
            matches!(&e, Error::BadRequest(m) if m.contains("9000") && m.contains("[80, 88, 443, 8443]")),
            "{e}"
        );
        for bad in ["ftp://x/", "not a url", "file:///etc/passwd", "http://:80/"] {
            assert!(matches!(
                w.create("lib", spec("c", bad)).await,
                Err(Error::BadRequest(_))
            ));
        }
        let mut none = spec("d", "https://hooks.example/");
        none.events.clear();
        assert!(matches!(
            w.create("lib", none).await,
            Err(Error::BadRequest(_))
        ));
        assert!(w.wants(EventKind::PushArtifact, "lib"));
        assert!(!w.wants(EventKind::PullArtifact, "lib"));
        assert!(!w.wants(EventKind::PushArtifact, "other"));
        let p = w
            .update(
                "lib",
                &p.id,
                WebhookPatch {
                    enabled: Some(false),
                    secret: Some(String::new()),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert!(!p.enabled && p.secret.is_none());
        assert!(!w.wants(EventKind::PushArtifact, "lib"));
        assert_eq!(w.remove_registry("lib").await.unwrap(), 1);
        assert!(w.list("lib").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn events_log_is_trimmed_and_ids_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let meta = crate::store::meta::open(dir.path()).unwrap();
        let cfg = WebhookConfig {
            log_keep: 5,
            ..config()
        };
        let w = Webhooks::open(&meta, &cfg).await.unwrap();
        let p = w
            .create("lib", spec("a", "https://hooks.example/"))
            .await
            .unwrap();
        for _ in 0..20 {
            let mut d = w.new_delivery(&p.id, EventKind::PushArtifact).await;
            d.status = DeliveryStatus::Delivered;
            w.append(&d).await.unwrap();
        }
        let log = w.deliveries("lib", &p.id, 100).await.unwrap();
        assert_eq!(log.len(), 5);
        assert_eq!(log[0].id, 20, "newest first");
        assert!(w.log.list(&[&p.id]).await.unwrap().len() <= 6);
        drop(w);
        let w = Webhooks::open(&meta, &cfg).await.unwrap();
        assert_eq!(w.new_delivery(&p.id, EventKind::PushArtifact).await.id, 21);
    }

    #[tokio::test]
    async fn events_snapshot_follows_policy_changes_made_below_it() {
        let dir = tempfile::tempdir().unwrap();
        let meta = crate::store::meta::open(dir.path()).unwrap();
        let w = Webhooks::open(&meta, &config()).await.unwrap();
        let changed = w.snapshot.changed.subscribe();
        let p = w
            .create("lib", spec("a", "https://hooks.example/x"))
            .await
            .unwrap();
        assert!(w.wants(EventKind::PushArtifact, "lib"));
        assert!(changed.has_changed().unwrap(), "the dispatcher is told");
        // The same record changed in the store by someone else (the CLI, another node): the
        // snapshot follows without this `Webhooks` doing anything.
        let mut pulls = p.clone();
        pulls.events = vec![EventKind::PullArtifact];
        meta.record_put(
            POLICIES,
            &format!("lib\0{}", p.id),
            serde_json::to_vec(&pulls).unwrap(),
        )
        .await
        .unwrap();
        assert!(!w.wants(EventKind::PushArtifact, "lib"));
        assert!(w.wants(EventKind::PullArtifact, "lib"));
        let other = WebhookPolicy {
            id: "other".into(),
            registry: "team".into(),
            ..pulls.clone()
        };
        meta.record_put(POLICIES, "team\0other", serde_json::to_vec(&other).unwrap())
            .await
            .unwrap();
        assert_eq!(
            w.matching(&Event::now(&crate::events::Happened {
                kind: EventKind::PullArtifact,
                operator: "x",
                repository: "team/app",
                tag: None,
                digest: "sha256:ab",
                media_type: "m",
                size: 1,
            }))
            .len(),
            1
        );
        meta.record_remove(POLICIES, &format!("lib\0{}", p.id))
            .await
            .unwrap();
        assert!(!w.wants(EventKind::PullArtifact, "lib"));
        assert!(w.wants(EventKind::PullArtifact, "team"));
        // A reopened `Webhooks` reads what is stored.
        drop(w);
        let w = Webhooks::open(&meta, &config()).await.unwrap();
        assert!(w.wants(EventKind::PullArtifact, "team"));
        assert!(!w.wants(EventKind::PullArtifact, "lib"));
    }

    #[test]
    fn events_signature_is_hmac_sha256_hex() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn events_payloads() {
        let e = Event::now(&Happened {
            kind: EventKind::PushArtifact,
            operator: "alice",
            repository: "lib/app",
            tag: Some("1.0"),
            digest: "sha256:ab",
            media_type: "application/vnd.oci.image.manifest.v1+json",
            size: 42,
        });
        let p = http_payload(&e);
        assert_eq!(p["type"], "PUSH_ARTIFACT");
        assert_eq!(p["event_data"]["resource_url"], "lib/app:1.0");
        assert_eq!(p["event_data"]["registry"], "lib");
        assert!(p["occur_at"].as_str().unwrap().ends_with('Z'));
        let s = slack_payload(&e);
        assert!(s["text"]
            .as_str()
            .unwrap()
            .contains("PUSH_ARTIFACT lib/app:1.0 by alice"));
    }
}
