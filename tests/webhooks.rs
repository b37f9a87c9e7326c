//! Webhooks end to end: an in-process berth delivering to a real receiver on loopback.

mod common;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth::events::webhooks::{Delivery, DeliveryStatus, WebhookKind, WebhookPolicy, WebhookSpec};
use berth::events::EventKind::{self, *};
use common::doubles::{empty_body, wait_until, LoopbackServer};
use common::server::*;
use hmac::{Hmac, KeyInit, Mac};
use http_body_util::BodyExt as _;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

/// Any port (receivers listen on ephemeral ones) and short retries.
/// Receivers run on loopback, which the egress policy refuses by default: these tests allow it
/// (tests/egress.rs checks the refusal).
const FAST: &str = "[egress]\nallowed_networks = [\"127.0.0.0/8\"]\n[webhooks]\nallowed_ports = []\nretry_initial = \"50ms\"\nretry_max = \"400ms\"\n";

/// One request the receiver got, and what it answered.
#[derive(Clone, Debug)]
struct Hit {
    headers: http::HeaderMap,
    body: Vec<u8>,
    json: Value,
    status: u16,
    at: Instant,
}

impl Hit {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

/// Answers scripted (status, Retry-After) pairs first, then 200; optionally slow.
#[derive(Default)]
struct Script {
    answers: Mutex<VecDeque<(u16, Option<u64>)>>,
    delay_ms: AtomicU64,
    hits: Mutex<Vec<Hit>>,
}

/// A webhook receiver on loopback.
struct Receiver {
    server: LoopbackServer,
    script: Arc<Script>,
}

impl Receiver {
    fn start() -> Receiver {
        let script = Arc::new(Script::default());
        let s = script.clone();
        let server = LoopbackServer::start(move |req| {
            let s = s.clone();
            async move {
                let (parts, body) = req.into_parts();
                let body = body
                    .collect()
                    .await
                    .map(|b| b.to_bytes().to_vec())
                    .unwrap_or_default();
                let delay = s.delay_ms.load(Ordering::SeqCst);
                if delay > 0 {
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                }
                let (status, retry_after) =
                    s.answers.lock().unwrap().pop_front().unwrap_or((200, None));
                s.hits.lock().unwrap().push(Hit {
                    headers: parts.headers,
                    json: serde_json::from_slice(&body).unwrap_or(Value::Null),
                    body,
                    status,
                    at: Instant::now(),
                });
                let mut r = http::Response::builder().status(status);
                if let Some(s) = retry_after {
                    r = r.header("retry-after", s.to_string());
                }
                r.body(empty_body()).unwrap()
            }
        });
        Receiver { server, script }
    }

    fn url(&self) -> String {
        format!("{}/hook", self.server.url())
    }

    fn hits(&self) -> Vec<Hit> {
        self.script.hits.lock().unwrap().clone()
    }

    /// Requests answered 2xx.
    fn delivered(&self) -> Vec<Hit> {
        self.hits()
            .into_iter()
            .filter(|h| (200..300).contains(&h.status))
            .collect()
    }
}

fn spec(name: &str, target: &str, events: &[EventKind]) -> WebhookSpec {
    WebhookSpec {
        name: name.into(),
        events: events.to_vec(),
        target: target.into(),
        kind: WebhookKind::Http,
        auth_header: None,
        secret: None,
        enabled: true,
    }
}

fn create(s: &TestServer, registry: &str, spec: WebhookSpec) -> WebhookPolicy {
    common::block(s.app().events.webhooks.create(registry, spec)).unwrap()
}

fn log(s: &TestServer, p: &WebhookPolicy) -> Vec<Delivery> {
    common::block(s.app().events.webhooks.deliveries(&p.registry, &p.id, 1000)).unwrap()
}

async fn wait(what: &str, cond: impl FnMut() -> bool) {
    assert!(
        wait_until(Duration::from_secs(15), cond).await,
        "timed out waiting for {what}"
    );
}

fn kinds(hits: &[Hit]) -> Vec<String> {
    hits.iter()
        .map(|h| h.json["type"].as_str().unwrap_or("?").to_string())
        .collect()
}

fn hmac_hex(secret: &str, body: &[u8]) -> String {
    let mut mac = <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// The value of a `berth_webhook_deliveries_total{result=...}` counter (0 when absent).
async fn delivery_metric(s: &TestServer, result: &str) -> f64 {
    s.metric("berth_webhook_deliveries_total", &[("result", result)])
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_pull_and_delete_events_carry_the_artifact() {
    let rx = Receiver::start();
    let s = TestServer::start(FAST).await;
    let mut sp = spec(
        "all",
        &rx.url(),
        &[
            PushArtifact,
            CreateTag,
            PullArtifact,
            DeleteTag,
            DeleteArtifact,
        ],
    );
    sp.secret = Some("s3cret".into());
    sp.auth_header = Some("Bearer hook-token".into());
    let p = create(&s, "library", sp);
    let (manifest, digest) = s.push_image("library/app", "1.0", "one").await;
    // HEAD is not a pull; the GET after it is.
    let r = s
        .req(Method::HEAD, "/v2/library/app/manifests/1.0")
        .await
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = s.get("/v2/library/app/manifests/1.0").await;
    assert_eq!(r.status(), StatusCode::OK);
    // A second tag, deleted by tag; then the artifact, deleted by digest (its tag goes with it).
    let r = s
        .put_manifest("library/app", "2.0", OCI_MANIFEST, &manifest)
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = s
        .req(Method::DELETE, "/v2/library/app/manifests/2.0")
        .await
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let r = s
        .req(
            Method::DELETE,
            &format!("/v2/library/app/manifests/{digest}"),
        )
        .await
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    wait("8 events", || rx.hits().len() >= 8).await;
    let hits = rx.hits();
    assert_eq!(
        kinds(&hits),
        [
            "PUSH_ARTIFACT",
            "CREATE_TAG",
            "PULL_ARTIFACT",
            "PUSH_ARTIFACT",
            "CREATE_TAG",
            "DELETE_TAG",
            "DELETE_ARTIFACT",
            "DELETE_TAG"
        ]
    );
    let tags: Vec<Value> = hits
        .iter()
        .map(|h| h.json["event_data"]["tag"].clone())
        .collect();
    assert_eq!(
        tags,
        [
            json!("1.0"),
            json!("1.0"),
            json!("1.0"),
            json!("2.0"),
            json!("2.0"),
            json!("2.0"),
            Value::Null,
            json!("1.0")
        ]
    );
    for h in &hits {
        let d = &h.json["event_data"];
        assert_eq!(d["registry"], "library");
        assert_eq!(d["repository"], "library/app");
        assert_eq!(d["digest"], digest.as_str());
        assert_eq!(d["media_type"], OCI_MANIFEST);
        assert_eq!(d["size"], manifest.len() as u64);
        let expected_url = match d["tag"].as_str() {
            Some(t) => format!("library/app:{t}"),
            None => format!("library/app@{digest}"),
        };
        assert_eq!(d["resource_url"], expected_url.as_str());
        assert_eq!(h.json["operator"], "anonymous");
        humantime::parse_rfc3339(h.json["occur_at"].as_str().unwrap()).unwrap();
        assert_eq!(h.header("content-type"), "application/json");
        assert_eq!(h.header("authorization"), "Bearer hook-token");
        assert_eq!(h.header("x-berth-event"), h.json["type"].as_str().unwrap());
        assert!(h.header("x-berth-delivery").parse::<u64>().is_ok());
        assert_eq!(
            h.header("x-berth-signature-256"),
            format!("sha256={}", hmac_hex("s3cret", &h.body)),
            "signature verifies with the secret"
        );
        assert_ne!(
            h.header("x-berth-signature-256"),
            format!("sha256={}", hmac_hex("other", &h.body))
        );
    }
    let ids: Vec<&str> = hits.iter().map(|h| h.header("x-berth-delivery")).collect();
    let unique: std::collections::HashSet<_> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "one delivery id per delivery");
    wait("the log to show 8 delivered", || {
        let l = log(&s, &p);
        l.len() == 8
            && l.iter()
                .all(|d| d.status == DeliveryStatus::Delivered && d.attempts == 1)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_registry_manifest_get_publishes_pull() {
    let upstream = TestServer::start("").await;
    let (manifest, digest) = upstream.push_image("library/app", "v1", "one").await;
    let rx = Receiver::start();
    let edge = TestServer::start(&cache_toml("registry", &upstream.base, "", FAST)).await;
    assert!(!edge.app().events.wants(PullArtifact, "hub"));
    create(&edge, "hub", spec("pulls", &rx.url(), &[PullArtifact]));
    assert!(edge.app().events.wants(PullArtifact, "hub"));
    assert!(!edge.app().events.wants(PullArtifact, "library"));
    let r = edge
        .req(Method::HEAD, "/v2/hub/library/app/manifests/v1")
        .await
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = edge.get("/v2/hub/library/app/manifests/v1").await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = edge
        .get(&format!("/v2/hub/library/app/manifests/{digest}"))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    wait("2 pulls", || rx.hits().len() >= 2).await;
    let hits = rx.hits();
    assert_eq!(kinds(&hits), ["PULL_ARTIFACT", "PULL_ARTIFACT"]);
    let (by_tag, by_digest) = (&hits[0].json["event_data"], &hits[1].json["event_data"]);
    assert_eq!(by_tag["registry"], "hub");
    assert_eq!(by_tag["repository"], "hub/library/app");
    assert_eq!(by_tag["tag"], "v1");
    assert_eq!(by_tag["digest"], digest.as_str());
    assert_eq!(by_tag["size"], manifest.len() as u64);
    assert_eq!(by_tag["media_type"], OCI_MANIFEST);
    assert_eq!(by_digest["tag"], Value::Null);
    assert_eq!(
        by_digest["resource_url"],
        format!("hub/library/app@{digest}").as_str()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_cleanup_publishes_deletions() {
    let upstream = TestServer::start("").await;
    let (_, digest) = upstream.push_image("library/app", "v1", "one").await;
    let rx = Receiver::start();
    let edge = TestServer::start(&cache_toml("registry", &upstream.base, "", FAST)).await;
    let policy = create(
        &edge,
        "hub",
        spec("gone", &rx.url(), &[DeleteArtifact, DeleteTag]),
    );
    let r = edge.get("/v2/hub/library/app/manifests/v1").await;
    assert_eq!(r.status(), StatusCode::OK);
    // A dry run announces nothing; the real prune announces what it removed.
    for dry_run in [true, false] {
        let r = edge
            .client
            .post(edge.url("/api/v1/cache/prune"))
            .json(&json!({"dry_run": dry_run, "unpulled_for": "0s"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{}", r.text().await.unwrap());
    }
    // Deliveries are logged in event order: once the real prune's two are delivered, anything
    // the dry run had announced would be in the log before them.
    wait("cleanup events", || {
        log(&edge, &policy)
            .iter()
            .filter(|d| d.status == DeliveryStatus::Delivered)
            .count()
            >= 2
    })
    .await;
    assert_eq!(
        log(&edge, &policy).len(),
        2,
        "the dry run announced nothing"
    );
    let hits = rx.hits();
    assert_eq!(kinds(&hits), ["DELETE_ARTIFACT", "DELETE_TAG"]);
    assert!(hits.iter().all(|h| h.json["operator"] == "cleanup"));
    assert_eq!(hits[0].json["event_data"]["digest"], digest.as_str());
    assert_eq!(hits[1].json["event_data"]["tag"], "v1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slack_policy_sends_a_readable_text() {
    let rx = Receiver::start();
    let s = TestServer::start(FAST).await;
    let mut sp = spec("slack", &rx.url(), &[PushArtifact]);
    sp.kind = WebhookKind::Slack;
    create(&s, "library", sp);
    let (_, digest) = s.push_image("library/app", "1.0", "one").await;
    wait("the slack message", || rx.hits().len() == 1).await;
    let h = &rx.hits()[0];
    let text = h.json["text"].as_str().expect("slack payload has text");
    assert!(text.contains("PUSH_ARTIFACT"), "{text}");
    assert!(text.contains("library/app:1.0"), "{text}");
    assert!(text.contains(&digest), "{text}");
    assert!(h.json["blocks"].is_array());
    assert_eq!(
        h.header("x-berth-signature-256"),
        "",
        "no secret, no signature"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_attempts_are_retried_until_delivered() {
    let rx = Receiver::start();
    rx.script
        .answers
        .lock()
        .unwrap()
        .extend([(500, None), (500, None)]);
    let s = TestServer::start(FAST).await;
    let p = create(&s, "library", spec("retry", &rx.url(), &[PushArtifact]));
    let retried_before = delivery_metric(&s, "retried").await;
    s.push_image("library/app", "1.0", "one").await;
    wait("delivery after two failures", || {
        log(&s, &p)
            .first()
            .is_some_and(|d| d.status == DeliveryStatus::Delivered)
    })
    .await;
    let d = &log(&s, &p)[0];
    assert_eq!((d.attempts, d.http_status), (3, Some(200)));
    assert_eq!(d.event, PushArtifact);
    let statuses: Vec<u16> = rx.hits().iter().map(|h| h.status).collect();
    assert_eq!(statuses, [500, 500, 200]);
    let hits = rx.hits();
    let same: Vec<&str> = hits.iter().map(|h| h.header("x-berth-delivery")).collect();
    assert!(
        same.iter().all(|id| *id == same[0]),
        "one delivery, retried"
    );
    assert!(delivery_metric(&s, "retried").await >= retried_before + 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_of_a_429_is_honoured() {
    let rx = Receiver::start();
    rx.script.answers.lock().unwrap().push_back((429, Some(1)));
    let s = TestServer::start(FAST).await;
    let p = create(&s, "library", spec("slowdown", &rx.url(), &[PushArtifact]));
    s.push_image("library/app", "1.0", "one").await;
    wait("delivery after a 429", || {
        log(&s, &p)
            .first()
            .is_some_and(|d| d.status == DeliveryStatus::Delivered)
    })
    .await;
    let hits = rx.hits();
    assert_eq!(hits.len(), 2);
    // The backoff alone would retry after 50 ms.
    let gap = hits[1].at - hits[0].at;
    assert!(gap >= Duration::from_millis(900), "retried after {gap:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_down_then_back_gets_everything_in_order() {
    let rx = Receiver::start();
    let s = TestServer::start(&format!("{FAST}max_attempts = 1000\n")).await;
    let p = create(&s, "library", spec("order", &rx.url(), &[PushArtifact]));
    rx.server.stop();
    const N: usize = 5;
    for i in 0..N {
        s.push_image("library/app", &format!("t{i}"), &format!("seed{i}"))
            .await;
    }
    wait("retries while the receiver is down", || {
        let l = log(&s, &p);
        l.len() == N && l.iter().any(|d| d.attempts >= 3)
    })
    .await;
    assert!(rx.hits().is_empty());
    rx.server.restart();
    wait("all deliveries", || rx.delivered().len() == N).await;
    let tags: Vec<String> = rx
        .delivered()
        .iter()
        .map(|h| h.json["event_data"]["tag"].as_str().unwrap().to_string())
        .collect();
    let expected: Vec<String> = (0..N).map(|i| format!("t{i}")).collect();
    assert_eq!(tags, expected, "in push order");
    wait("the log to show them delivered", || {
        log(&s, &p)
            .iter()
            .all(|d| d.status == DeliveryStatus::Delivered)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_drops_and_counts() {
    let rx = Receiver::start();
    let s = TestServer::start(&format!("{FAST}queue_size = 3\nmax_attempts = 1000\n")).await;
    let p = create(&s, "library", spec("bounded", &rx.url(), &[PushArtifact]));
    rx.server.stop();
    let dropped_before = delivery_metric(&s, "dropped").await;
    const N: usize = 8;
    for i in 0..N {
        s.push_image("library/app", &format!("t{i}"), &format!("seed{i}"))
            .await;
    }
    wait("every delivery logged", || log(&s, &p).len() == N).await;
    let l = log(&s, &p);
    let dropped = l
        .iter()
        .filter(|d| d.status == DeliveryStatus::Dropped)
        .count();
    let pending = l
        .iter()
        .filter(|d| d.status == DeliveryStatus::Pending)
        .count();
    // One in flight plus three queued at most.
    assert!(dropped >= N - 4, "{dropped} dropped of {N}: {l:?}");
    assert_eq!(dropped + pending, N);
    assert!(delivery_metric(&s, "dropped").await >= dropped_before + dropped as f64);
    // berth_webhook_queue_depth is a process-wide gauge that every server of this binary
    // writes: its value is checked in tests/webhook_queue_gauge.rs, a binary of its own.
    rx.server.restart();
    wait("the queued deliveries", || rx.delivered().len() == pending).await;
    let delivered_ids: Vec<u64> = rx
        .delivered()
        .iter()
        .map(|h| h.header("x-berth-delivery").parse().unwrap())
        .collect();
    let mut kept: Vec<u64> = l
        .iter()
        .filter(|d| d.status == DeliveryStatus::Pending)
        .map(|d| d.id)
        .collect();
    kept.sort();
    assert_eq!(delivered_ids, kept, "the queued ones, in order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_and_unsubscribed_policies_get_nothing() {
    let (off, other, on) = (Receiver::start(), Receiver::start(), Receiver::start());
    let s = TestServer::start(FAST).await;
    let mut disabled = spec("off", &off.url(), &[PushArtifact, CreateTag]);
    disabled.enabled = false;
    let p_off = create(&s, "library", disabled);
    let p_other = create(
        &s,
        "library",
        spec("deletes", &other.url(), &[DeleteArtifact]),
    );
    create(&s, "library", spec("on", &on.url(), &[PushArtifact]));
    s.push_image("library/app", "1.0", "one").await;
    // The dispatcher handles events in order: once the second push reached `on`, the first
    // one was routed to every matching policy long ago.
    s.push_image("library/app", "2.0", "two").await;
    wait("both pushes at the enabled policy", || on.hits().len() == 2).await;
    assert!(off.hits().is_empty() && other.hits().is_empty());
    assert!(log(&s, &p_off).is_empty());
    assert!(log(&s, &p_other).is_empty());
    // Pulls are not wanted by anyone: the manifest GET does not even build the event.
    assert!(!s.app().events.wants(PullArtifact, "library"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_port_outside_the_allowlist_is_refused() {
    // Default allow list: 80, 88, 443, 8443.
    let s = TestServer::start("").await;
    let r = s
        .client
        .post(hooks_url(&s, "library", ""))
        .json(&json!({"name": "x", "events": ["PUSH_ARTIFACT"], "target": "http://127.0.0.1:9000/hook"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let (_, message) = error_of(r).await;
    assert!(
        message.contains("9000") && message.contains("[80, 88, 443, 8443]"),
        "{message}"
    );
    let r = s
        .client
        .post(hooks_url(&s, "library", ""))
        .json(&json!({"name": "x", "events": ["PUSH_ARTIFACT"], "target": "https://hooks.example:8443/hook"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_api_manages_policies_and_sends_a_test_event() {
    let rx = Receiver::start();
    let s = TestServer::start(FAST).await;
    let c = &s.client;
    let r = c
        .post(hooks_url(&s, "library", ""))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = c
        .post(hooks_url(&s, "library", ""))
        .json(&json!({"name": "x", "events": [], "target": rx.url()}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let new = json!({
        "name": "ci", "events": ["PUSH_ARTIFACT", "DELETE_TAG"], "target": rx.url(),
        "secret": "s3cret", "auth_header": "Bearer abc"
    });
    let r = c
        .post(hooks_url(&s, "library", ""))
        .json(&new)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let text = r.text().await.unwrap();
    assert!(
        !text.contains("s3cret") && !text.contains("Bearer abc"),
        "{text}"
    );
    let view: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(view["secret_set"], true);
    assert_eq!(view["auth_header_set"], true);
    let id = view["id"].as_str().unwrap().to_string();
    let r = c
        .post(hooks_url(&s, "library", ""))
        .json(&new)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CONFLICT, "names are unique");
    let list: Value = c
        .get(hooks_url(&s, "library", ""))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["total"], 1);
    assert_eq!(list["items"][0]["name"], "ci");
    let r = c
        .get(hooks_url(&s, "library", &format!("/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    let r = c
        .post(hooks_url(&s, "library", &format!("/{id}/test")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let d: Value = r.json().await.unwrap();
    assert_eq!(d["status"], "delivered");
    assert_eq!(d["attempts"], 1);
    assert_eq!(d["http_status"], 200);
    let hits = rx.hits();
    assert_eq!(hits.len(), 1, "sent right away");
    assert_eq!(hits[0].header("x-berth-event"), "PUSH_ARTIFACT");
    assert_eq!(hits[0].json["operator"], "anonymous");
    assert_eq!(
        hits[0].header("x-berth-signature-256"),
        format!("sha256={}", hmac_hex("s3cret", &hits[0].body))
    );
    let r: Value = c
        .get(hooks_url(
            &s,
            "library",
            &format!("/{id}/deliveries?limit=10"),
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["items"][0]["id"], d["id"]);

    let r = c
        .patch(hooks_url(&s, "library", &format!("/{id}")))
        .json(&json!({"enabled": false, "name": "ci-off"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        (v["enabled"].clone(), v["name"].clone()),
        (json!(false), json!("ci-off"))
    );
    let r = c
        .patch(hooks_url(&s, "library", &format!("/{id}")))
        .json(&json!({"bogus": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = c
        .delete(hooks_url(&s, "library", &format!("/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r = c
        .get(hooks_url(&s, "library", &format!("/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = c.get(hooks_url(&s, "nosuch", "")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_deliveries_survive_a_restart() {
    let rx = Receiver::start();
    let mut s = TestServer::start(&format!("{FAST}max_attempts = 1000\n")).await;
    let p = create(&s, "library", spec("durable", &rx.url(), &[PushArtifact]));
    rx.server.stop();
    s.push_image("library/app", "a", "one").await;
    s.push_image("library/app", "b", "two").await;
    wait("both deliveries pending and tried", || {
        let l = log(&s, &p);
        l.len() == 2 && l.iter().any(|d| d.attempts >= 1)
    })
    .await;
    s.restart().await;
    let l = log(&s, &p);
    assert_eq!(l.len(), 2);
    assert!(
        l.iter().all(|d| d.status == DeliveryStatus::Pending),
        "{l:?}"
    );
    rx.server.restart();
    wait("delivery after the restart", || rx.delivered().len() == 2).await;
    let tags: Vec<String> = rx
        .delivered()
        .iter()
        .map(|h| h.json["event_data"]["tag"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(tags, ["a", "b"]);
    wait("the log to show them delivered", || {
        log(&s, &p)
            .iter()
            .all(|d| d.status == DeliveryStatus::Delivered)
    })
    .await;
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_receiver_does_not_slow_pushes() {
    const N: usize = 15;
    // Registry `other` has no policy: its pushes, interleaved with those to `library`, are the
    // baseline measured in the same conditions.
    let s = TestServer::start(&format!("[[registry]]\nname = \"other\"\n{FAST}")).await;
    let rx = Receiver::start();
    rx.script.delay_ms.store(2000, Ordering::SeqCst);
    create(
        &s,
        "library",
        spec("slow", &rx.url(), &[PushArtifact, CreateTag]),
    );
    s.push_image("other/warm", "up", "warm").await;
    s.push_image("library/warm", "up", "warm").await;
    let (mut without, mut with) = (Vec::new(), Vec::new());
    for i in 0..N {
        let t = Instant::now();
        s.push_image("other/plain", &format!("t{i}"), &format!("p{i}"))
            .await;
        without.push(t.elapsed());
        let t = Instant::now();
        s.push_image("library/hooked", &format!("t{i}"), &format!("h{i}"))
            .await;
        let took = t.elapsed();
        assert!(took < Duration::from_secs(1), "push {i} took {took:?}");
        with.push(took);
    }
    // The pushes outran the receiver: it answers one event per 2 s and each push made two
    // (PushArtifact and CreateTag), so most of them were still waiting for it when the last
    // push returned. A server that delivered before answering the push could not get here.
    let events = 2 * (N + 1);
    let answered = rx.hits().len();
    assert!(
        answered < events / 2,
        "{answered} of {events} events answered by a receiver taking 2 s each"
    );
    // The receiver really is called (and answers after 2 s).
    wait("the slow receiver's first answer", || !rx.hits().is_empty()).await;
    let (base, slow) = (median(without.clone()), median(with.clone()));
    println!(
        "median push (2 blobs + manifest), {N} each: without webhook {base:?}, with a receiver sleeping 2 s {slow:?}"
    );
    // Pushes to the registry with the slow receiver cost about what the others cost. A push that
    // waited for the receiver would take 2 s or more; the bound leaves room for a loaded 2-core
    // machine (5 times the baseline, and never less than 500 ms) and stays far below that.
    let bound = (base * 5).max(Duration::from_millis(500));
    assert!(
        slow < bound,
        "median push with a slow receiver {slow:?}, without webhook {base:?}: not within {bound:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_is_the_authenticated_user_and_viewers_cannot_manage() {
    use berth::auth::Role;
    let rx = Receiver::start();
    let s = TestServer::start(FAST).await;
    create(
        &s,
        "library",
        spec("ops", &rx.url(), &[PullArtifact, DeleteTag]),
    );
    s.push_image("library/app", "1.0", "one").await;
    let app = s.app();
    app.auth
        .users
        .create("alice", Role::Admin, Vec::new())
        .await
        .unwrap();
    let (key, secret) = app.auth.users.create_key("alice").await.unwrap();
    app.auth
        .users
        .create("victor", Role::Viewer, Vec::new())
        .await
        .unwrap();
    let (viewer_key, viewer_secret) = app.auth.users.create_key("victor").await.unwrap();
    assert!(app.auth.enforced());
    let r = s
        .client
        .get(s.url("/v2/library/app/manifests/1.0"))
        .basic_auth(&key.id, Some(&secret))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = s
        .client
        .delete(s.url("/v2/library/app/manifests/1.0"))
        .basic_auth(&key.id, Some(&secret))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    wait("pull and tag delete", || rx.hits().len() == 2).await;
    let hits = rx.hits();
    assert_eq!(kinds(&hits), ["PULL_ARTIFACT", "DELETE_TAG"]);
    assert!(hits.iter().all(|h| h.json["operator"] == "alice"));

    let r = s
        .client
        .get(hooks_url(&s, "library", ""))
        .basic_auth(&viewer_key.id, Some(&viewer_secret))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK, "viewers read policies");
    let r = s
        .client
        .post(hooks_url(&s, "library", ""))
        .basic_auth(&viewer_key.id, Some(&viewer_secret))
        .json(&json!({"name": "v", "events": ["PUSH_ARTIFACT"], "target": rx.url()}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        s.app().events.webhooks.list("library").await.unwrap().len(),
        1
    );
}

/// `/api/v1/registries/{registry}/webhooks{rest}` on the test server.
fn hooks_url(s: &TestServer, registry: &str, rest: &str) -> String {
    s.url(&format!("/api/v1/registries/{registry}/webhooks{rest}"))
}

/// A replication execution tells its start and its end with counts (REPLICATION), to the
/// policies of the registry it copies from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_executions_are_announced_with_their_counts() {
    let rx = Receiver::start();
    let s = TestServer::start(FAST).await;
    let region = TestServer::start("").await;
    let p = create(&s, "library", spec("repl", &rx.url(), &[Replication]));
    s.push_image("library/app", "v1", "one").await;
    let app = s.app();
    app.replication
        .endpoints
        .put(serde_json::from_value(json!({"name": "eu", "url": region.base})).unwrap())
        .await
        .unwrap();
    app.replication
        .put(
            serde_json::from_value(
                json!({"name": "to-eu", "endpoint": "eu", "registry": "library"}),
            )
            .unwrap(),
        )
        .await
        .unwrap();
    berth::replication::run::start(
        &app,
        "to-eu",
        berth::jobs::executions::Trigger::Manual,
        "ops",
    )
    .await
    .unwrap();
    wait("both replication events", || log(&s, &p).len() == 2).await;
    let hits = rx.delivered();
    assert_eq!(kinds(&hits), ["REPLICATION", "REPLICATION"]);
    let job = |i: usize| hits[i].json["event_data"]["job"].clone();
    assert_eq!(job(0)["status"], "running");
    assert_eq!(job(0)["name"], "to-eu");
    assert_eq!(job(1)["status"], "succeeded", "{}", hits[1].json);
    assert_eq!(job(1)["acted"], 1);
    assert_eq!(job(1)["examined"], 1);
    assert!(job(1)["bytes"].as_u64().unwrap() > 0);
    assert_eq!(hits[1].json["operator"], "ops");
}

/// Two nodes over one PostgreSQL database: a delivery pending on node A (its receiver down) is
/// A's while A lives, even when node B restarts (B used to queue it too: two deliveries); once
/// A stops, B takes it over and delivers it, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_delivery_is_its_nodes_while_it_lives_and_another_nodes_after() {
    let rx = Receiver::start();
    let url = berth::testbed::postgres().database().await;
    let config =
        format!("{FAST}max_attempts = 1000\n[metadata]\nkind = \"postgres\"\nurl = {url:?}\n");
    let mut a = TestServer::start(&config).await;
    let mut b = TestServer::start(&config).await;
    let p = create(&a, "library", spec("nodes", &rx.url(), &[PushArtifact]));
    rx.server.stop();
    a.push_image("library/app", "t0", "seed0").await;
    wait("node A retrying", || {
        log(&a, &p).first().is_some_and(|d| d.attempts >= 2)
    })
    .await;
    b.restart().await;
    rx.server.restart();
    wait("the delivery", || rx.delivered().len() == 1).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(rx.delivered().len(), 1, "delivered once, by node A");
    // Node A stops with a delivery pending: node B sends it.
    rx.server.stop();
    a.push_image("library/app", "t1", "seed1").await;
    wait("node A retrying t1", || {
        log(&a, &p)
            .iter()
            .any(|d| d.status == DeliveryStatus::Pending && d.attempts >= 2)
    })
    .await;
    a.server.take().unwrap().shutdown().await;
    rx.server.restart();
    wait("node B to send t1", || rx.delivered().len() == 2).await;
    let tags: Vec<String> = rx
        .delivered()
        .iter()
        .map(|h| h.json["event_data"]["tag"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(tags, ["t0", "t1"]);
    wait("the log to show both delivered", || {
        log(&b, &p)
            .iter()
            .all(|d| d.status == DeliveryStatus::Delivered)
    })
    .await;
}
