//! Webhook delivery: the dispatcher that routes bus events to one bounded queue per policy,
//! the per-policy workers, attempts with backoff, and the persisted delivery log and outbox.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use super::payload::{http_payload, signature, slack_payload};
use super::webhooks::{
    check_target, seq, Delivery, DeliveryStatus, WebhookKind, WebhookPolicy, Webhooks, DELIVERY_IDS,
};
use super::{Event, EventKind, Happened};
use crate::error::Result;
use crate::store::meta::{now_ms, HeldLease, LEASE_TTL};

/// A delivery waiting in a policy's queue.
struct Job {
    delivery: Delivery,
    event: Event,
}

/// What one attempt came to.
struct Attempt {
    ok: bool,
    http_status: Option<u16>,
    error: Option<String>,
    retry_after: Option<Duration>,
    /// Retrying cannot help (port not allowed, redirect).
    permanent: bool,
}

/// Longest `Retry-After` honoured: a broken receiver must not park its queue for days.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

fn depth_gauge(depth: i64) {
    crate::metrics::webhook_queue_depth(depth.max(0) as u64);
}

/// Resolves when `stop` turns true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

impl Webhooks {
    /// Sends a sample event of the policy's first kind right away (once, no retry), logs the
    /// delivery and returns it. Works on disabled policies too: that is how one checks them.
    pub async fn test(&self, registry: &str, id: &str, operator: &str) -> Result<Delivery> {
        let policy = self.get(registry, id).await?;
        let kind = policy
            .events
            .first()
            .copied()
            .unwrap_or(EventKind::PushArtifact);
        let event = Event::now(&Happened {
            kind,
            operator,
            repository: &format!("{registry}/berth-webhook-test"),
            tag: Some("test"),
            digest: "sha256:0000000000000000000000000000000000000000000000000000000000000000",
            media_type: "application/vnd.oci.image.manifest.v1+json",
            size: 0,
        });
        let mut d = self.new_delivery(&policy.id, kind).await;
        d.attempts = 1;
        let a = self.attempt(&policy, &event, d.id).await;
        d.status = if a.ok {
            DeliveryStatus::Delivered
        } else {
            DeliveryStatus::Failed
        };
        d.http_status = a.http_status;
        d.last_error = a.error;
        d.updated_ms = now_ms();
        self.append(&d).await?;
        Ok(d)
    }

    /// A new delivery, with a number no other node hands out.
    pub(super) async fn new_delivery(&self, policy_id: &str, kind: EventKind) -> Delivery {
        let id = match self
            .meta
            .sequence_next(
                DELIVERY_IDS,
                self.next_id.load(Ordering::Relaxed).saturating_sub(1),
            )
            .await
        {
            Ok(id) => id,
            Err(e) => {
                // Recorded with a local number then (the record may not be written either).
                tracing::error!(error = %e, "no delivery number from the metadata");
                self.next_id.fetch_add(1, Ordering::Relaxed)
            }
        };
        self.next_id.fetch_max(id + 1, Ordering::Relaxed);
        Self::delivery(id, policy_id, kind)
    }

    /// A delivery numbered `id`.
    fn delivery(id: u64, policy_id: &str, kind: EventKind) -> Delivery {
        let now = now_ms();
        Delivery {
            id,
            policy_id: policy_id.to_string(),
            event: kind,
            status: DeliveryStatus::Pending,
            attempts: 0,
            http_status: None,
            last_error: None,
            created_ms: now,
            updated_ms: now,
        }
    }

    /// Adds a new entry to a policy's log and trims the log to about `log_keep` entries
    /// (pending ones are kept: their worker still writes them).
    pub(super) async fn append(&self, d: &Delivery) -> Result<()> {
        self.log.put(&[&d.policy_id, &seq(d.id)], d).await?;
        let keep = self.config.log_keep;
        // Trimming lists the log: it runs once the log has grown a tenth of `log_keep` past the
        // last trim, so the cost per delivery stays constant, also while many deliveries are
        // pending (they cannot be trimmed), and the log holds at most 110% of `log_keep` plus
        // the pending ones.
        let slack = (keep / 10).max(1);
        // The counts' lock is never held across a store call.
        let known = self.log_len.lock().get_mut(&d.policy_id).map(|entry| {
            entry.0 += 1;
            *entry
        });
        let (len, trim_at) = match known {
            Some(entry) => entry,
            None => {
                let n = self.log.list(&[&d.policy_id]).await?.len();
                let entry = (n, keep + slack);
                self.log_len.lock().insert(d.policy_id.clone(), entry);
                entry
            }
        };
        if len >= trim_at {
            let all = self.log.list(&[&d.policy_id]).await?;
            let mut excess = all.len().saturating_sub(keep);
            let mut left = all.len();
            for (k, old) in &all {
                if excess == 0 {
                    break;
                }
                if old.status != DeliveryStatus::Pending {
                    self.log.remove(&[&d.policy_id, k]).await?;
                    excess -= 1;
                    left -= 1;
                }
            }
            self.log_len
                .lock()
                .insert(d.policy_id.clone(), (left, left.max(keep) + slack));
        }
        Ok(())
    }

    async fn finish(&self, d: &Delivery) {
        let id = seq(d.id);
        let key = [d.policy_id.as_str(), id.as_str()];
        let recorded = match self.log.put(&key, d).await {
            Ok(()) => match self.outbox.remove(&key).await {
                Ok(_) if self.meta.shared() => self.owners.remove(&key).await.map(drop),
                other => other.map(drop),
            },
            Err(e) => Err(e),
        };
        if let Err(e) = recorded {
            tracing::error!(error = %e, delivery = d.id, "could not record webhook delivery");
        }
        let result = match d.status {
            DeliveryStatus::Delivered => "delivered",
            DeliveryStatus::Failed => "failed",
            DeliveryStatus::Dropped => "dropped",
            DeliveryStatus::Pending => return,
        };
        crate::metrics::webhook_delivery(result);
    }

    /// One POST of an event to a policy's target.
    async fn attempt(&self, policy: &WebhookPolicy, event: &Event, delivery_id: u64) -> Attempt {
        let fail = |error: String, permanent: bool| Attempt {
            ok: false,
            http_status: None,
            error: Some(error),
            retry_after: None,
            permanent,
        };
        // The allow list and the egress policy may have changed since the policy was created;
        // a host name is checked where it resolves now, by the client's resolver.
        let url = match check_target(&policy.target, &self.config.allowed_ports, &self.egress) {
            Ok(u) => u,
            Err(e) => return fail(e.to_string(), true),
        };
        let body = match policy.kind {
            WebhookKind::Http => http_payload(event),
            WebhookKind::Slack => slack_payload(event),
        }
        .to_string();
        let mut req = self
            .client
            .post(url)
            .timeout(self.config.timeout)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header("x-berth-event", event.kind.as_str())
            .header("x-berth-delivery", delivery_id.to_string());
        if let Some(h) = &policy.auth_header {
            req = req.header(http::header::AUTHORIZATION, h);
        }
        if let Some(s) = &policy.secret {
            req = req.header("x-berth-signature-256", signature(s, body.as_bytes()));
        }
        match req.body(body).send().await {
            Ok(r) => {
                let status = r.status();
                let retry_after = if status == http::StatusCode::TOO_MANY_REQUESTS
                    || status == http::StatusCode::SERVICE_UNAVAILABLE
                {
                    r.headers()
                        .get(http::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
                        .map(|s| Duration::from_secs(s).min(MAX_RETRY_AFTER))
                } else {
                    None
                };
                Attempt {
                    ok: status.is_success(),
                    http_status: Some(status.as_u16()),
                    error: (!status.is_success()).then(|| {
                        if status.is_redirection() {
                            format!("target answered {status}; webhooks do not follow redirects")
                        } else {
                            format!("target answered {status}")
                        }
                    }),
                    retry_after,
                    permanent: status.is_redirection(),
                }
            }
            Err(e) if e.is_timeout() => {
                fail(format!("no answer within {:?}", self.config.timeout), false)
            }
            Err(e) => fail(crate::http::egress::error_chain(&e), false),
        }
    }

    /// Delay before retry number `attempts` (1-based): `retry_initial` doubled per failure, at
    /// most `retry_max`.
    pub(super) fn backoff(&self, attempts: u32) -> Duration {
        let factor = 1u32 << attempts.saturating_sub(1).min(20);
        self.config
            .retry_initial
            .saturating_mul(factor)
            .min(self.config.retry_max)
    }

    /// Delivers one job with retries; returns when it is delivered, failed, or the server stops
    /// (the delivery then stays pending in the outbox for the next start).
    async fn deliver(&self, job: Job, registry: &str, stop: &mut watch::Receiver<bool>) {
        let Job {
            delivery: mut d,
            event,
        } = job;
        loop {
            let policy = match self.policies.get(&[registry, &d.policy_id]).await {
                Ok(Some(p)) if p.enabled => p,
                Ok(Some(_)) => {
                    d.status = DeliveryStatus::Failed;
                    d.last_error = Some("policy disabled before delivery".into());
                    d.updated_ms = now_ms();
                    return self.finish(&d).await;
                }
                // Deleted with its log: nothing to record.
                Ok(None) => return,
                Err(e) => {
                    d.status = DeliveryStatus::Failed;
                    d.last_error = Some(format!("cannot read policy: {e}"));
                    d.updated_ms = now_ms();
                    return self.finish(&d).await;
                }
            };
            d.attempts += 1;
            let a = tokio::select! {
                _ = stopped(stop) => return,
                a = self.attempt(&policy, &event, d.id) => a,
            };
            d.http_status = a.http_status;
            d.last_error = a.error;
            d.updated_ms = now_ms();
            if a.ok {
                d.status = DeliveryStatus::Delivered;
                return self.finish(&d).await;
            }
            if a.permanent || d.attempts >= self.config.max_attempts {
                d.status = DeliveryStatus::Failed;
                tracing::warn!(policy = %policy.id, target = %policy.target, delivery = d.id, attempts = d.attempts, error = ?d.last_error, "webhook delivery failed");
                return self.finish(&d).await;
            }
            crate::metrics::webhook_delivery("retried");
            if let Err(e) = self.log.put(&[&d.policy_id, &seq(d.id)], &d).await {
                tracing::error!(error = %e, delivery = d.id, "could not record webhook retry");
            }
            let delay = self
                .backoff(d.attempts)
                .max(a.retry_after.unwrap_or_default());
            tokio::select! {
                _ = stopped(stop) => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Records a new delivery for `policy` and queues it; a full queue records it as dropped.
    async fn enqueue(&self, policy: &WebhookPolicy, event: &Event, tx: &mpsc::Sender<Job>) {
        let mut d = self.new_delivery(&policy.id, event.kind).await;
        let permit = match tx.try_reserve() {
            Ok(p) => p,
            Err(_) => {
                d.status = DeliveryStatus::Dropped;
                d.last_error = Some(format!(
                    "queue full ({} deliveries waiting)",
                    self.config.queue_size
                ));
                tracing::warn!(policy = %policy.id, registry = %policy.registry, kind = %event.kind, "webhook queue full: delivery dropped");
                if let Err(e) = self.append(&d).await {
                    tracing::error!(error = %e, "could not record dropped webhook delivery");
                }
                crate::metrics::webhook_delivery("dropped");
                return;
            }
        };
        let key = [policy.id.as_str(), &seq(d.id)];
        let stored = match self.append(&d).await {
            Ok(()) => match self.outbox.put(&key, event).await {
                Ok(()) if self.meta.shared() => self.owners.put(&key, &self.node).await,
                other => other,
            }
            .map_err(crate::error::Error::from),
            Err(e) => Err(e),
        };
        if let Err(e) = stored {
            tracing::error!(error = %e, "could not record webhook delivery; sending it anyway");
        }
        depth_gauge(self.queue_depth.fetch_add(1, Ordering::Relaxed) + 1);
        permit.send(Job {
            delivery: d,
            event: event.clone(),
        });
    }

    /// Pending deliveries no live process queues, oldest first per policy: at start, those the
    /// previous run left; where nodes share the metadata, only those of nodes that are gone
    /// (their liveness lease `webhook-node/NODE` is free or ran out), which this node takes
    /// over (one node wins each dead node's lease while it moves them).
    async fn recover(&self) -> Result<Vec<(WebhookPolicy, Job)>> {
        let mut jobs = Vec::new();
        let policies: HashMap<String, WebhookPolicy> = self
            .policies
            .list(&[])
            .await?
            .into_iter()
            .map(|(_, p)| (p.id.clone(), p))
            .collect();
        let shared = self.meta.shared();
        // Each owner once: taken (its node is gone; we hold its lease while we move) or not.
        let owner_of: HashMap<String, String> = if shared {
            self.owners.list(&[]).await?.into_iter().collect()
        } else {
            HashMap::new()
        };
        let mut owners: HashMap<String, Option<String>> = HashMap::new();
        let mut taken = Vec::new();
        for (key, event) in self.outbox.list(&[]).await? {
            let Some((policy_id, id)) = key.split_once('\0') else {
                continue;
            };
            if shared {
                let owner = owner_of.get(&key).cloned().unwrap_or_default();
                if owner == self.node {
                    continue;
                }
                let probe = match owners.get(&owner) {
                    Some(probe) => probe.clone(),
                    None => {
                        let name = format!("webhook-node/{owner}");
                        let probe =
                            format!("{} takeover {}", self.node, uuid::Uuid::new_v4().simple());
                        let lease = self.meta.lease_take(&name, &probe, LEASE_TTL).await?;
                        let won = (lease.holder == probe).then_some(probe);
                        if won.is_some() {
                            taken.push((name, won.clone().unwrap_or_default()));
                        }
                        owners.insert(owner.clone(), won.clone());
                        won
                    }
                };
                if probe.is_none() {
                    continue; // a live node's
                }
                self.owners.put(&[policy_id, id], &self.node).await?;
            }
            let Some(policy) = policies.get(policy_id) else {
                self.outbox.remove(&[policy_id, id]).await?;
                continue;
            };
            let delivery = match self.log.get(&[policy_id, id]).await? {
                Some(d) => d,
                None => {
                    let Ok(n) = id.parse::<u64>() else { continue };
                    Self::delivery(n, policy_id, event.kind)
                }
            };
            jobs.push((policy.clone(), Job { delivery, event }));
        }
        for (name, probe) in taken {
            self.meta.lease_release(&name, &probe).await?;
        }
        Ok(jobs)
    }
}

/// Queues and workers of the dispatcher, one per policy.
struct Workers {
    queues: HashMap<String, mpsc::Sender<Job>>,
    tasks: JoinSet<()>,
}

impl Workers {
    fn queue(
        &mut self,
        w: &Arc<Webhooks>,
        policy: &WebhookPolicy,
        stop: &watch::Receiver<bool>,
    ) -> mpsc::Sender<Job> {
        if let Some(tx) = self.queues.get(&policy.id) {
            if !tx.is_closed() {
                return tx.clone();
            }
        }
        let (tx, rx) = mpsc::channel(w.config.queue_size.max(1));
        self.tasks
            .spawn(worker(w.clone(), policy.registry.clone(), rx, stop.clone()));
        self.queues.insert(policy.id.clone(), tx.clone());
        tx
    }
}

/// Delivers one policy's jobs in order until the queue closes or the server stops.
async fn worker(
    w: Arc<Webhooks>,
    registry: String,
    mut rx: mpsc::Receiver<Job>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let job = tokio::select! {
            _ = stopped(&mut stop) => return,
            job = rx.recv() => match job {
                Some(j) => j,
                None => return,
            },
        };
        depth_gauge(w.queue_depth.fetch_sub(1, Ordering::Relaxed) - 1);
        w.deliver(job, &registry, &mut stop).await;
        if *stop.borrow() {
            return;
        }
    }
}

/// The dispatcher: re-queues what the last run left pending, then routes bus events to the
/// policies' queues until `stop` turns true; the workers stop with it.
pub(crate) async fn dispatch(
    w: Arc<Webhooks>,
    mut rx: mpsc::Receiver<Event>,
    mut stop: watch::Receiver<bool>,
) {
    let mut workers = Workers {
        queues: HashMap::new(),
        tasks: JoinSet::new(),
    };
    // Where nodes share the metadata, this node is alive while it holds its lease: the others
    // leave its pending deliveries alone.
    if w.meta.shared() {
        let name = format!("webhook-node/{}", w.node);
        match HeldLease::take(&*w.meta, name, w.node.clone()).await {
            Ok(Ok(held)) => {
                let mut ended = stop.clone();
                tokio::spawn(Arc::new(held).keep(
                    w.meta.clone(),
                    async move {
                        let _ = ended.wait_for(|s| *s).await;
                    },
                    || {},
                ));
            }
            Ok(Err(_)) => tracing::error!(
                "this node's webhook lease is held by another: its id is not unique"
            ),
            Err(e) => {
                tracing::error!(error = %e, "cannot take this node's webhook lease: other nodes may send its pending deliveries too")
            }
        }
    }
    if requeue(&w, &mut workers, &mut stop).await {
        return shutdown(workers).await;
    }
    let mut takeover = tokio::time::interval(TAKEOVER_EVERY);
    takeover.tick().await;
    let mut changed = w.snapshot.changed.subscribe();
    loop {
        tokio::select! {
            _ = stopped(&mut stop) => break,
            c = changed.changed() => {
                if c.is_err() {
                    break;
                }
                // Close the queues of deleted or disabled policies: their workers end once the
                // queue is drained (and discard or fail what is left).
                let active = w.snapshot.active.read().clone();
                let live: HashSet<&str> = active.values().flatten().map(|p| p.id.as_str()).collect();
                workers.queues.retain(|id, _| live.contains(id.as_str()));
            }
            event = rx.recv() => {
                let Some(event) = event else { break };
                for policy in w.matching(&event) {
                    let tx = workers.queue(&w, &policy, &stop);
                    w.enqueue(&policy, &event, &tx).await;
                }
            }
            Some(_) = workers.tasks.join_next(), if !workers.tasks.is_empty() => {}
            _ = takeover.tick(), if w.meta.shared() => {
                if requeue(&w, &mut workers, &mut stop).await {
                    break;
                }
            }
        }
    }
    shutdown(workers).await;
}

/// How often a node looks for pending deliveries of nodes that are gone.
const TAKEOVER_EVERY: Duration = Duration::from_secs(5);

/// Queues the pending deliveries no live process queues ([`Webhooks::recover`]); whether the
/// server stopped meanwhile.
async fn requeue(
    w: &Arc<Webhooks>,
    workers: &mut Workers,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    match w.recover().await {
        Ok(jobs) => {
            if !jobs.is_empty() {
                tracing::info!(
                    deliveries = jobs.len(),
                    "queueing pending webhook deliveries of a previous run or of a node that is gone"
                );
            }
            for (policy, job) in jobs {
                let tx = workers.queue(w, &policy, stop);
                depth_gauge(w.queue_depth.fetch_add(1, Ordering::Relaxed) + 1);
                // Waits for room: these deliveries were accepted before, none may be dropped.
                tokio::select! {
                    _ = stopped(stop) => return true,
                    _ = tx.send(job) => {}
                }
            }
        }
        Err(e) => tracing::error!(error = %e, "could not read pending webhook deliveries"),
    }
    false
}

async fn shutdown(mut workers: Workers) {
    workers.queues.clear();
    while workers.tasks.join_next().await.is_some() {}
}
