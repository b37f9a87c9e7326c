//! `berth webhook list|create|delete|test`: a registry's webhook policies from the command line.

use super::remote::seg;
use super::{print_json, Place};
use crate::events::views::{DeliveryView, WebhookList, WebhookView};
use crate::events::webhooks::{WebhookKind, WebhookSpec};
use crate::events::EventKind;
use clap::Subcommand;
use http::Method;

#[derive(Subcommand)]
pub enum WebhookCommand {
    /// List a registry's webhook policies.
    List {
        /// Registry.
        registry: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Create a policy: POST the registry's events to a URL.
    Create {
        /// Registry.
        registry: String,
        /// Name, unique within the registry.
        #[arg(long)]
        name: String,
        /// `http://` or `https://` URL the events are POSTed to.
        #[arg(long)]
        target: String,
        /// Event kinds, comma-separated (PUSH_ARTIFACT, PULL_ARTIFACT, DELETE_ARTIFACT,
        /// CREATE_TAG, DELETE_TAG, ...).
        #[arg(long, value_delimiter = ',', required = true, value_parser = event_kind)]
        events: Vec<EventKind>,
        /// Payload format: http (berth's JSON event) or slack.
        #[arg(long, default_value = "http", value_parser = webhook_kind)]
        kind: WebhookKind,
        /// Read an HMAC-SHA256 signing secret from stdin (one line).
        #[arg(long)]
        secret_stdin: bool,
    },
    /// Delete a policy.
    Delete {
        /// Registry.
        registry: String,
        /// Policy id.
        id: String,
    },
    /// Send a test event to a policy's target now and print the delivery.
    Test {
        /// Registry.
        registry: String,
        /// Policy id.
        id: String,
    },
}

/// Parses a value the way the API's JSON does (the same names, one source of truth).
fn by_serde<T: serde::de::DeserializeOwned>(text: &str, what: &str) -> Result<T, String> {
    serde_json::from_value(serde_json::Value::String(text.trim().to_string()))
        .map_err(|e| format!("{text:?} is not {what}: {e}"))
}

fn event_kind(text: &str) -> Result<EventKind, String> {
    by_serde(&text.to_ascii_uppercase(), "an event kind")
}

fn webhook_kind(text: &str) -> Result<WebhookKind, String> {
    by_serde(text, "a webhook kind (http, slack)")
}

fn hooks(registry: &str) -> String {
    format!("/registries/{}/webhooks", seg(registry))
}

pub fn run(place: &Place, cmd: WebhookCommand) -> Result<(), String> {
    match cmd {
        WebhookCommand::List { registry, json } => {
            let list: WebhookList = place.call(Method::GET, &hooks(&registry))?;
            if json {
                return print_json(&list.items);
            }
            for w in &list.items {
                let events: Vec<String> = w
                    .events
                    .iter()
                    .map(|e| {
                        serde_json::to_string(e)
                            .unwrap_or_default()
                            .replace('"', "")
                    })
                    .collect();
                outln!(
                    "{}  {:<20} {:<8} {} [{}]",
                    w.id,
                    w.name,
                    if w.enabled { "enabled" } else { "disabled" },
                    w.target,
                    events.join(",")
                );
            }
        }
        WebhookCommand::Create {
            registry,
            name,
            target,
            events,
            kind,
            secret_stdin,
        } => {
            let secret = if secret_stdin {
                let mut s = String::new();
                std::io::stdin()
                    .read_line(&mut s)
                    .map_err(|e| e.to_string())?;
                Some(s.trim_end_matches(['\n', '\r']).to_string())
            } else {
                None
            };
            let spec = WebhookSpec {
                name,
                events,
                target,
                kind,
                auth_header: None,
                secret,
                enabled: true,
            };
            let w: WebhookView = place.send(Method::POST, &hooks(&registry), &spec)?;
            outln!(
                "created webhook {} ({}) of registry {registry}",
                w.id,
                w.name
            );
        }
        WebhookCommand::Delete { registry, id } => {
            place.call_no_content(
                Method::DELETE,
                &format!("{}/{}", hooks(&registry), seg(&id)),
            )?;
            outln!("deleted webhook {id} of registry {registry}");
        }
        WebhookCommand::Test { registry, id } => {
            let path = format!("{}/{}/test", hooks(&registry), seg(&id));
            let d: DeliveryView = place.call(Method::POST, &path)?;
            match (&d.http_status, &d.last_error) {
                (Some(status), None) => outln!("test event delivered: HTTP {status}"),
                (status, error) => {
                    return Err(format!(
                        "test event not delivered (HTTP {}): {}",
                        status.map_or("-".into(), |s| s.to_string()),
                        error.as_deref().unwrap_or("no answer")
                    ))
                }
            }
        }
    }
    Ok(())
}
