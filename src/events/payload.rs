//! Webhook payloads: the berth JSON body, the Slack message, and the HMAC signature header.

use std::time::{Duration, UNIX_EPOCH};

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use super::Event;

fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// `REGISTRY/IMAGE:TAG`, or `REGISTRY/IMAGE@DIGEST` for untagged events.
fn resource_url(e: &Event) -> String {
    if let Some(j) = &e.job {
        return format!("{}/{}", j.name, j.execution);
    }
    match &e.tag {
        Some(t) => format!("{}:{t}", e.repository),
        None => format!("{}@{}", e.repository, e.digest),
    }
}

/// The JSON body of an `http` policy.
pub fn http_payload(e: &Event) -> serde_json::Value {
    if let Some(j) = &e.job {
        return serde_json::json!({
            "type": e.kind,
            "occur_at": rfc3339(e.time_ms),
            "operator": e.operator,
            "event_data": {
                "registry": e.registry,
                "job": j,
                "resource_url": resource_url(e),
            }
        });
    }
    serde_json::json!({
        "type": e.kind,
        "occur_at": rfc3339(e.time_ms),
        "operator": e.operator,
        "event_data": {
            "registry": e.registry,
            "repository": e.repository,
            "tag": e.tag,
            "digest": e.digest,
            "media_type": e.media_type,
            "size": e.size,
            "resource_url": resource_url(e),
        }
    })
}

/// The Slack incoming-webhook message of an event.
pub fn slack_payload(e: &Event) -> serde_json::Value {
    if let Some(j) = &e.job {
        let text = format!(
            "{} {} of {}: {} ({} copied, {} failed of {}, {} bytes) at {}",
            e.kind,
            j.execution,
            j.name,
            j.status,
            j.acted,
            j.failed,
            j.examined,
            j.bytes,
            rfc3339(e.time_ms)
        );
        return serde_json::json!({"text": text});
    }
    let text = format!(
        "{} {} by {} ({}, {} bytes) at {}",
        e.kind,
        resource_url(e),
        e.operator,
        e.digest,
        e.size,
        rfc3339(e.time_ms)
    );
    serde_json::json!({
        "text": text,
        "blocks": [{
            "type": "section",
            "text": {"type": "mrkdwn", "text": format!(
                "*{}* `{}`\nOperator: {}\nDigest: `{}`\nMedia type: {}\nSize: {} bytes",
                e.kind, resource_url(e), e.operator, e.digest, e.media_type, e.size
            )}
        }]
    })
}

/// `sha256=<hex HMAC-SHA256(secret, body)>`.
pub fn signature(secret: &str, body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret.as_bytes())
        .expect("HMAC takes keys of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}
