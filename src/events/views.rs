//! The typed views of the webhook API (`/api/v1/registries/{registry}/webhooks[...]`): what
//! [`crate::events::api`] answers and what a client of the API reads (re-exported by
//! `crate::api::views` with the other resources). Fields are in alphabetical order, the order
//! these objects had when they were built as `serde_json::Value` maps.

use serde::{Deserialize, Serialize};

use super::webhooks::{Delivery, DeliveryStatus, WebhookKind, WebhookPolicy};
use super::EventKind;

/// A webhook policy (`/registries/{registry}/webhooks[/{id}]`): credentials are reduced to
/// whether they are set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WebhookView {
    /// An `Authorization` header is sent with each delivery.
    pub auth_header_set: bool,
    /// Creation time, Unix milliseconds.
    pub created_ms: u64,
    /// Disabled policies receive nothing.
    pub enabled: bool,
    /// Event kinds it subscribes to.
    pub events: Vec<EventKind>,
    /// Identifier.
    pub id: String,
    /// Payload format.
    pub kind: WebhookKind,
    /// Name, unique within the registry.
    pub name: String,
    /// Registry whose events it receives.
    pub registry: String,
    /// Deliveries are signed (`X-Berth-Signature-256`).
    pub secret_set: bool,
    /// URL the events are POSTed to.
    pub target: String,
}

impl WebhookView {
    /// The view of a policy.
    pub fn of(p: &WebhookPolicy) -> WebhookView {
        WebhookView {
            auth_header_set: p.auth_header.is_some(),
            created_ms: p.created_ms,
            enabled: p.enabled,
            events: p.events.clone(),
            id: p.id.clone(),
            kind: p.kind,
            name: p.name.clone(),
            registry: p.registry.clone(),
            secret_set: p.secret.is_some(),
            target: p.target.clone(),
        }
    }
}

/// Answer of `GET /registries/{registry}/webhooks`: every policy (not paged).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WebhookList {
    /// The policies.
    pub items: Vec<WebhookView>,
    /// How many.
    pub total: usize,
}

/// One entry of a policy's delivery log (`.../deliveries`, and the answer of `.../test`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeliveryView {
    /// Attempts made so far.
    pub attempts: u32,
    /// Creation time, Unix milliseconds.
    pub created_ms: u64,
    /// Kind of the event delivered.
    pub event: EventKind,
    /// HTTP status of the last answer (`null`: none yet).
    pub http_status: Option<u16>,
    /// Identifier, increasing with creation.
    pub id: u64,
    /// Why the last attempt failed (`null`: it did not).
    pub last_error: Option<String>,
    /// The policy it belongs to.
    pub policy_id: String,
    /// Where it stands.
    pub status: DeliveryStatus,
    /// Last change, Unix milliseconds.
    pub updated_ms: u64,
}

impl DeliveryView {
    /// The view of a delivery log entry.
    pub fn of(d: &Delivery) -> DeliveryView {
        DeliveryView {
            attempts: d.attempts,
            created_ms: d.created_ms,
            event: d.event,
            http_status: d.http_status,
            id: d.id,
            last_error: d.last_error.clone(),
            policy_id: d.policy_id.clone(),
            status: d.status,
            updated_ms: d.updated_ms,
        }
    }
}

/// Answer of `GET .../webhooks/{id}/deliveries`: newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeliveryList {
    /// The entries.
    pub items: Vec<DeliveryView>,
}
