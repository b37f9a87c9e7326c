//! A hostile source or webhook target cannot exhaust or misdirect the node (issue 9, items
//! 11–13): answers over their size caps are cut off, a blob longer than its size is stopped and
//! discarded, redirects are bounded and checked against the egress policy, foreign token realms
//! too, credentials never follow a redirect to another origin, webhook targets on loopback are
//! refused, and a source's error text reaches clients only as a short sanitised excerpt.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::doubles::{empty_body, full_body, wait_until, BoxError, DoubleBody, LoopbackServer};
use common::server::*;
use http::{HeaderMap, Response};
use http_body_util::{BodyExt as _, StreamBody};
use hyper::body::Frame;
use reqwest::StatusCode;
use serde_json::json;

const MIB: u64 = 1 << 20;

/// Most bytes a double may manage to write before berth hangs up on an answer over a cap of at
/// most a few MiB: the cap, plus what socket buffers and hyper hold.
const HANGUP_SLACK: u64 = 64 * MIB;

/// One request a double saw.
#[derive(Clone, Debug)]
struct Seen {
    method: String,
    path: String,
    headers: HeaderMap,
}

/// A scripted HTTP server on loopback that records every request.
struct Double {
    server: LoopbackServer,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Double {
    fn start(
        route: impl Fn(&http::request::Parts) -> Response<DoubleBody> + Send + Sync + 'static,
    ) -> Double {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let route = Arc::new(route);
        let server = LoopbackServer::start(move |req| {
            let (s, route) = (s.clone(), route.clone());
            async move {
                let (parts, _) = req.into_parts();
                s.lock().unwrap().push(Seen {
                    method: parts.method.to_string(),
                    path: parts
                        .uri
                        .path_and_query()
                        .map(|p| p.to_string())
                        .unwrap_or_default(),
                    headers: parts.headers.clone(),
                });
                route(&parts)
            }
        });
        Double { server, seen }
    }

    fn url(&self) -> String {
        self.server.url()
    }

    fn port(&self) -> u16 {
        self.server.addr().port()
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

fn answer(status: u16, headers: &[(&str, &str)], body: DoubleBody) -> Response<DoubleBody> {
    let mut r = Response::builder().status(status);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    r.body(body).unwrap()
}

/// A chunked body (no Content-Length) of `total` bytes made on the fly; `sent` counts the bytes
/// hyper took to write (it stops pulling once the peer hangs up).
fn endless(total: u64, sent: Arc<AtomicU64>) -> DoubleBody {
    let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
    let stream = futures_util::stream::unfold(0u64, move |pos| {
        let (chunk, sent) = (chunk.clone(), sent.clone());
        async move {
            if pos >= total {
                return None;
            }
            let n = (total - pos).min(chunk.len() as u64) as usize;
            sent.fetch_add(n as u64, Ordering::SeqCst);
            Some((
                Ok::<_, BoxError>(Frame::data(chunk.slice(..n))),
                pos + n as u64,
            ))
        }
    });
    StreamBody::new(stream).boxed_unsync()
}

/// An OCI image manifest with one config and one layer.
fn manifest_for(config: &[u8], layer: &[u8]) -> Vec<u8> {
    image_manifest(
        &sha256(config),
        config.len() as u64,
        &sha256(layer),
        layer.len() as u64,
    )
}

/// An edge whose cache registry `hub` pulls through `url`; `cache_options` go into the
/// `[[image_cache]]` table, `extra` after it.
async fn edge(url: &str, cache_options: &str, extra: &str) -> TestServer {
    TestServer::start(&cache_toml("registry", url, cache_options, extra)).await
}

const ALLOW_LOOPBACK: &str = "[egress]\nallowed_networks = [\"127.0.0.0/8\", \"::1/128\"]\n";

// ---------------------------------------------------------------------------------------------
// Item 11: bounded reads
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_answer_of_a_gibibyte_is_cut_at_the_cap() {
    let sent = Arc::new(AtomicU64::new(0));
    let s = sent.clone();
    let token = Double::start(move |_| {
        answer(
            200,
            &[("content-type", "application/json")],
            endless(1 << 30, s.clone()),
        )
    });
    // A realm on the source's own host (127.0.0.1), so the egress policy lets it through.
    let challenge = format!("Bearer realm=\"{}/token\",service=\"x\"", token.url());
    let source = Double::start(move |_| {
        answer(
            401,
            &[("www-authenticate", challenge.as_str())],
            empty_body(),
        )
    });
    let e = edge(&source.url(), "", "").await;
    let r = e.get("/v2/hub/app/manifests/v1").await;
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    let (code, message) = error_of(r).await;
    assert_eq!(code, "UNKNOWN");
    assert!(message.contains("1048576"), "{message}");
    let n = sent.load(Ordering::SeqCst);
    assert!(
        n < MIB + HANGUP_SLACK,
        "the token double wrote {n} bytes before berth hung up"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_body_of_a_gibibyte_is_not_read() {
    let sent = Arc::new(AtomicU64::new(0));
    let s = sent.clone();
    let source = Double::start(move |_| answer(403, &[], endless(1 << 30, s.clone())));
    let e = edge(&source.url(), "", "").await;
    let d = sha256(b"some manifest");
    let r = e.get(&format!("/v2/hub/app/manifests/{d}")).await;
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    let (_, message) = error_of(r).await;
    assert!(message.contains("403"), "{message}");
    let n = sent.load(Ordering::SeqCst);
    assert!(
        n < HANGUP_SLACK,
        "the source wrote {n} bytes of its error body before berth hung up"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_manifest_is_cut_at_max_manifest_bytes() {
    let sent = Arc::new(AtomicU64::new(0));
    let s = sent.clone();
    let source = Double::start(move |_| {
        answer(
            200,
            &[("content-type", OCI_MANIFEST)],
            endless(1 << 30, s.clone()),
        )
    });
    let e = edge(&source.url(), "", "").await;
    let d = sha256(b"some manifest");
    let r = e.get(&format!("/v2/hub/app/manifests/{d}")).await;
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    let (_, message) = error_of(r).await;
    assert!(message.contains("exceeds"), "{message}");
    let n = sent.load(Ordering::SeqCst);
    assert!(n < 4 * MIB + HANGUP_SLACK, "the source wrote {n} bytes");
}

/// A source for one image whose layer GET sends `bad` bytes (256 MiB, chunked) while `bad` is
/// set, the right bytes after.
struct BlobSource {
    double: Double,
    bad: Arc<AtomicBool>,
    /// The bad answer announces its 256 MiB in Content-Length.
    announce: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    layer: Vec<u8>,
    layer_digest: String,
}

fn blob_source() -> BlobSource {
    let config = b"{\"architecture\":\"amd64\",\"os\":\"linux\"}".to_vec();
    let layer: Vec<u8> = (0..MIB as usize).map(|i| (i % 251) as u8).collect();
    let manifest = Bytes::from(manifest_for(&config, &layer));
    let manifest_digest = sha256(&manifest);
    let layer_digest = sha256(&layer);
    let (bad, sent) = (Arc::new(AtomicBool::new(true)), Arc::new(AtomicU64::new(0)));
    let announce = Arc::new(AtomicBool::new(false));
    let a = announce.clone();
    let (b, s, l, ld) = (
        bad.clone(),
        sent.clone(),
        Bytes::from(layer.clone()),
        layer_digest.clone(),
    );
    let double = Double::start(move |p| {
        let path = p.uri.path();
        if path.ends_with("/manifests/v1")
            || path.ends_with(&format!("/manifests/{manifest_digest}"))
        {
            return answer(
                200,
                &[
                    ("content-type", OCI_MANIFEST),
                    ("docker-content-digest", manifest_digest.as_str()),
                ],
                full_body(manifest.clone()),
            );
        }
        if path.ends_with(&format!("/blobs/{ld}")) {
            if b.load(Ordering::SeqCst) {
                let length = (256 * MIB).to_string();
                let headers: &[(&str, &str)] = if a.load(Ordering::SeqCst) {
                    &[("content-length", length.as_str())]
                } else {
                    &[]
                };
                return answer(200, headers, endless(256 * MIB, s.clone()));
            }
            return answer(200, &[], full_body(l.clone()));
        }
        answer(404, &[], empty_body())
    });
    BlobSource {
        double,
        bad,
        announce,
        sent,
        layer,
        layer_digest,
    }
}

fn partials(e: &TestServer) -> Vec<String> {
    std::fs::read_dir(e.dir.path().join("data").join("partial"))
        .map(|d| {
            d.filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
                .collect()
        })
        .unwrap_or_default()
}

fn committed(e: &TestServer, digest: &str) -> bool {
    let d = berth::oci::digest::Digest::parse(digest).unwrap();
    e.holds_blob(&d)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_longer_than_its_descriptor_is_stopped_and_nothing_is_committed() {
    let src = blob_source();
    let e = edge(&src.double.url(), "", "").await;
    // The manifest is cached first: its descriptor gives the layer's size (1 MiB).
    let r = e.get("/v2/hub/app/manifests/v1").await;
    assert_eq!(r.status(), StatusCode::OK);
    let path = format!("/v2/hub/app/blobs/{}", src.layer_digest);
    let r = e.get(&path).await;
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    let (_, message) = error_of(r).await;
    assert!(message.contains("more than 1048576 bytes"), "{message}");
    let n = src.sent.load(Ordering::SeqCst);
    assert!(
        n < MIB + HANGUP_SLACK,
        "the source wrote {n} bytes of a 1 MiB blob before berth hung up"
    );
    assert!(!committed(&e, &src.layer_digest), "nothing committed");
    assert!(
        partials(&e).is_empty(),
        "partial discarded: {:?}",
        partials(&e)
    );
    // A good source afterwards: the right bytes.
    src.bad.store(false, Ordering::SeqCst);
    let r = e.get(&path).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.bytes().await.unwrap(), src.layer);
    // Readers get the last byte once the digest matched; the commit follows.
    assert!(
        wait_until(Duration::from_secs(30), || committed(&e, &src.layer_digest)).await,
        "the good fetch was committed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_content_length_beyond_the_descriptor_does_not_buy_more_bytes() {
    let src = blob_source();
    src.announce.store(true, Ordering::SeqCst);
    let e = edge(&src.double.url(), "", "").await;
    let r = e.get("/v2/hub/app/manifests/v1").await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = e
        .get(&format!("/v2/hub/app/blobs/{}", src.layer_digest))
        .await;
    // The announced size may reach the client before the bytes do; the body then breaks off
    // (never a complete-looking blob).
    let complete = r.status() == StatusCode::OK && r.bytes().await.is_ok();
    assert!(
        !complete,
        "a 256 MiB answer for a 1 MiB blob was served whole"
    );
    let n = src.sent.load(Ordering::SeqCst);
    assert!(n < MIB + HANGUP_SLACK, "the source wrote {n} bytes");
    assert!(
        wait_until(Duration::from_secs(30), || partials(&e).is_empty()).await,
        "partial discarded: {:?}",
        partials(&e)
    );
    assert!(!committed(&e, &src.layer_digest));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_of_unknown_size_stops_at_max_blob_bytes() {
    let src = blob_source();
    let e = edge(
        &src.double.url(),
        "",
        "[pull_through]\nmax_blob_bytes = 2097152\n",
    )
    .await;
    // No manifest cached and no Content-Length: only the configured maximum bounds it.
    let r = e
        .get(&format!("/v2/hub/app/blobs/{}", src.layer_digest))
        .await;
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    let (_, message) = error_of(r).await;
    assert!(message.contains("more than 2097152 bytes"), "{message}");
    let n = src.sent.load(Ordering::SeqCst);
    assert!(n < 2 * MIB + HANGUP_SLACK, "the source wrote {n} bytes");
    assert!(!committed(&e, &src.layer_digest));
    assert!(partials(&e).is_empty(), "{:?}", partials(&e));
}

// ---------------------------------------------------------------------------------------------
// Items 11 and 12: redirects
// ---------------------------------------------------------------------------------------------

/// A source that serves one manifest at `/manifests/real` (and by digest), redirects
/// `/manifests/own` there (same origin), `/manifests/loop` to itself, and
/// `/manifests/to-N` to `targets[N]`. With `basic`, every request needs those credentials.
fn redirecting_source(targets: Vec<String>, basic: Option<&'static str>) -> (Double, String) {
    let manifest = Bytes::from(manifest_for(b"cfg", b"layer"));
    let digest = sha256(&manifest);
    let d = digest.clone();
    let double = Double::start(move |p| {
        if let Some(expected) = basic {
            let auth = p
                .headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if auth != expected {
                return answer(
                    401,
                    &[("www-authenticate", "Basic realm=\"x\"")],
                    empty_body(),
                );
            }
        }
        let path = p.uri.path();
        let tail = path.rsplit('/').next().unwrap_or("");
        match tail {
            "own" => answer(302, &[("location", "/v2/app/manifests/real")], empty_body()),
            "loop" => answer(302, &[("location", path)], empty_body()),
            t if t.starts_with("to-") => {
                let i: usize = t[3..].parse().unwrap();
                answer(302, &[("location", targets[i].as_str())], empty_body())
            }
            t if t == "real" || t == d => answer(
                200,
                &[
                    ("content-type", OCI_MANIFEST),
                    ("docker-content-digest", d.as_str()),
                ],
                full_body(manifest.clone()),
            ),
            _ => answer(404, &[], empty_body()),
        }
    });
    (double, digest)
}

/// A redirect target that serves the manifest too (so a followed redirect would succeed).
fn target_double() -> Double {
    let manifest = Bytes::from(manifest_for(b"cfg", b"layer"));
    let digest = sha256(&manifest);
    Double::start(move |_| {
        answer(
            200,
            &[
                ("content-type", OCI_MANIFEST),
                ("docker-content-digest", digest.as_str()),
            ],
            full_body(manifest.clone()),
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_loop_ends_after_five_hops_with_a_clear_error() {
    let (source, _) = redirecting_source(vec![], None);
    let e = edge(&source.url(), "", "").await;
    let r = e.get("/v2/hub/app/manifests/loop").await;
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    let (_, message) = error_of(r).await;
    assert!(
        message.contains("redirected more than 5 times"),
        "{message}"
    );
    let hops = source
        .seen()
        .iter()
        .filter(|s| s.path.ends_with("/manifests/loop"))
        .count();
    assert_eq!(hops, 6, "the first request and five redirects");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_to_loopback_in_any_spelling_are_refused_and_to_the_source_itself_followed() {
    let target = target_double();
    let port = target.port();
    let spellings = vec![
        format!("http://127.0.0.1:{port}/v2/app/manifests/real"),
        format!("http://0x7f000001:{port}/v2/app/manifests/real"),
        format!("http://127.1:{port}/v2/app/manifests/real"),
        format!("http://[::1]:{port}/v2/app/manifests/real"),
        format!("http://[::ffff:127.0.0.1]:{port}/v2/app/manifests/real"),
        format!("http://localhost:{port}/v2/app/manifests/real"),
        "http://169.254.169.254/latest/meta-data/".to_string(),
        "file:///etc/passwd".to_string(),
    ];
    let (source, digest) = redirecting_source(spellings.clone(), None);
    let e = edge(&source.url(), "", "").await;
    for (i, to) in spellings.iter().enumerate() {
        let r = e.get(&format!("/v2/hub/app/manifests/to-{i}")).await;
        assert_eq!(r.status(), StatusCode::BAD_GATEWAY, "{to}");
        let (_, message) = error_of(r).await;
        assert!(
            message.contains("egress policy") && message.contains("\"up\""),
            "{to}: {message}"
        );
    }
    assert!(
        target.seen().is_empty(),
        "no redirect reached the target: {:?}",
        target.seen()
    );
    // The source's own scheme, host and port: followed.
    let r = e.get("/v2/hub/app/manifests/own").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "docker-content-digest"), digest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_go_to_the_source_and_never_to_a_redirect_target() {
    let target = target_double();
    // Another origin (a name for loopback), allowed by this test's egress exceptions.
    let away = format!("http://localhost:{}/v2/app/manifests/real", target.port());
    let basic = "Basic dXNlcjpwdw=="; // user:pw
    let (source, digest) = redirecting_source(vec![away], Some(basic));
    let e = edge(
        &source.url(),
        "username = \"user\"\npassword = \"pw\"",
        ALLOW_LOOPBACK,
    )
    .await;
    // A redirect within the source keeps the credentials (the source demands them).
    let r = e.get("/v2/hub/app/manifests/own").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "docker-content-digest"), digest);
    // A redirect to another origin is followed without them.
    let r = e.get("/v2/hub/app/manifests/to-0").await;
    assert_eq!(r.status(), StatusCode::OK);
    let seen = target.seen();
    assert!(!seen.is_empty(), "the redirect target was asked");
    for s in &seen {
        assert!(
            !s.headers.contains_key("authorization"),
            "{} {} carried credentials",
            s.method,
            s.path
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Item 12: token realms
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_realm_on_a_denied_host_is_refused() {
    let token = Double::start(|_| {
        answer(
            200,
            &[("content-type", "application/json")],
            full_body(r#"{"token":"t","expires_in":300}"#),
        )
    });
    for realm_host in ["localhost", "[::1]", "[::ffff:127.0.0.2]", "127.0.0.2"] {
        // The source is 127.0.0.1: these realms are other hosts, on loopback.
        let challenge = format!(
            "Bearer realm=\"http://{realm_host}:{}/token\",service=\"x\"",
            token.port()
        );
        let source = Double::start(move |_| {
            answer(
                401,
                &[("www-authenticate", challenge.as_str())],
                empty_body(),
            )
        });
        let e = edge(&source.url(), "username = \"user\"\npassword = \"pw\"", "").await;
        let r = e.get("/v2/hub/app/manifests/v1").await;
        assert_eq!(r.status(), StatusCode::BAD_GATEWAY, "{realm_host}");
        let (_, message) = error_of(r).await;
        assert!(
            message.contains("token realm") && message.contains("egress policy"),
            "{realm_host}: {message}"
        );
    }
    assert!(
        token.seen().is_empty(),
        "the denied realm was never asked (nor sent credentials)"
    );
}

// ---------------------------------------------------------------------------------------------
// Item 12: webhook targets
// ---------------------------------------------------------------------------------------------

fn hooks_url(s: &TestServer) -> String {
    s.url("/api/v1/registries/library/webhooks")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_targets_on_loopback_and_link_local_are_refused_at_creation() {
    let s = TestServer::start("[webhooks]\nallowed_ports = []\n").await;
    let own = s.addr();
    for target in [
        "http://127.0.0.1:9/hook".to_string(),
        "http://127.1:9/hook".to_string(),
        "http://0x7f000001:9/hook".to_string(),
        "http://2130706433:9/hook".to_string(),
        "http://[::1]:9/hook".to_string(),
        "http://[::ffff:127.0.0.1]:9/hook".to_string(),
        "http://localhost:9/hook".to_string(),
        "http://169.254.169.254/latest/meta-data/".to_string(),
        "http://[fe80::1]:9/hook".to_string(),
        "http://0.0.0.0:9/hook".to_string(),
        format!("http://{own}/api/v1/users"),
    ] {
        let r = s
            .client
            .post(hooks_url(&s))
            .json(&json!({"name": "x", "events": ["PUSH_ARTIFACT"], "target": target}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{target}");
        let (_, message) = error_of(r).await;
        assert!(message.contains("refused"), "{target}: {message}");
    }
    // A private address is fine (edge sites post to receivers on their LAN).
    let r = s
        .client
        .post(hooks_url(&s))
        .json(&json!({"name": "lan", "events": ["PUSH_ARTIFACT"], "target": "http://10.0.0.1:8080/hook"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let id = r.json::<serde_json::Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    // Moving it to loopback is refused too.
    let r = s
        .client
        .patch(format!("{}/{id}", hooks_url(&s)))
        .json(&json!({"target": "http://localhost:8080/hook"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_target_is_checked_again_where_it_resolves_at_delivery() {
    use berth::events::webhooks::{DeliveryStatus, WebhookKind, WebhookSpec, Webhooks};
    use berth::events::EventKind;
    use berth::http::egress::EgressPolicy;
    let dir = tempfile::tempdir().unwrap();
    let meta = berth::store::meta::open(dir.path()).unwrap();
    let config = berth::config::WebhookConfig {
        allowed_ports: vec![],
        ..Default::default()
    };
    // A receiver on loopback, which a node that allows loopback accepted as a target.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let target = format!(
        "http://localhost:{}/hook",
        listener.local_addr().unwrap().port()
    );
    let mut allowing = berth::config::Config::default();
    allowing.egress.allowed_networks =
        vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()];
    let id = {
        let w = Webhooks::open_with(
            &meta,
            &config,
            Arc::new(EgressPolicy::from_config(&allowing)),
        )
        .await
        .unwrap();
        w.check_destination(&target).await.unwrap();
        w.create(
            "library",
            WebhookSpec {
                name: "local".into(),
                events: vec![EventKind::PushArtifact],
                target: target.clone(),
                kind: WebhookKind::Http,
                auth_header: None,
                secret: None,
                enabled: true,
            },
        )
        .await
        .unwrap()
        .id
    };
    // The same policy under the default egress policy: the delivery is refused where the name
    // resolves, and nothing connects.
    let w = Webhooks::open(&meta, &config).await.unwrap();
    let d = w.test("library", &id, "tester").await.unwrap();
    assert_eq!(d.status, DeliveryStatus::Failed);
    let error = d.last_error.unwrap_or_default();
    assert!(error.contains("denied address"), "{error}");
    assert!(
        matches!(listener.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "no connection reached the receiver"
    );
}

// ---------------------------------------------------------------------------------------------
// Item 13: what clients see of a source's errors
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_error_body_is_echoed_only_as_a_short_sanitised_excerpt() {
    let mut body =
        b"denied: log in at https://admin:hunter2@internal.example/login \x1b[31m\r\n".to_vec();
    body.extend(std::iter::repeat_n(b'y', 10_000));
    let body = Bytes::from(body);
    let source = Double::start(move |_| answer(403, &[], full_body(body.clone())));
    let e = edge(&source.url(), "", "").await;
    let d = sha256(b"some manifest");
    let r = e.get(&format!("/v2/hub/app/manifests/{d}")).await;
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    let text = r.text().await.unwrap();
    assert!(
        !text.contains("hunter2") && !text.contains("admin:"),
        "{text}"
    );
    assert!(!text.contains("\\u001b") && !text.contains("\\r"), "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let message = v["errors"][0]["message"].as_str().unwrap();
    assert!(
        message.contains("\"up\"") && message.contains("403"),
        "{message}"
    );
    assert!(
        message.chars().count() < 320,
        "{} chars: {message}",
        message.len()
    );
    assert!(
        !message.contains("yyyyyyyyyy".repeat(25).as_str()),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_url_with_credentials_never_reaches_clients() {
    // Nothing listens there: the connection fails, and the error must not show the URL.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let e = edge(&format!("http://user:s3cr3t@127.0.0.1:{port}"), "", "").await;
    let r = e.get("/v2/hub/app/manifests/v1").await;
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    let text = r.text().await.unwrap();
    assert!(!text.contains("s3cr3t"), "{text}");
    assert!(text.contains("\\\"up\\\""), "{text}");
}
