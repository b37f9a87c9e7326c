//! Replication between two berth regions on loopback (and to Debian's docker-registry in
//! tests/real_clients.rs): rules by hand and on push events, filters, destinations, skips,
//! referrers, dedup by mount, resume after a cut link, stop, bandwidth limit, API refusals.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth::auth::Role;
use common::registry::Client as Registry;
use common::server::{sha256, TestServer, OCI_MANIFEST};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

/// A destination region with auth on; the access key of its replication user.
async fn destination() -> (TestServer, (String, String)) {
    let b = TestServer::start("").await;
    let key = b.user("replicator", Role::Admin, &[]);
    (b, key)
}

/// Adds endpoint `name` on `a` for `url` with `key`.
async fn endpoint(a: &TestServer, name: &str, url: &str, key: &(String, String)) {
    let (st, body) = a
        .api(
            Method::POST,
            "/replication/endpoints",
            Some(json!({"name": name, "url": url, "username": key.0, "password": key.1})),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{body}");
    assert_eq!(body["credentials"], true);
    assert!(
        !body.to_string().contains(&key.1),
        "the secret is never shown: {body}"
    );
}

/// Adds a rule on `a`, which must accept it.
async fn add_rule(a: &TestServer, rule: Value) {
    let (st, body) = a.api(Method::POST, "/replication/rules", Some(rule)).await;
    assert_eq!(st, StatusCode::CREATED, "{body}");
}

/// Runs rule `name` by hand and waits for its end; the execution.
async fn run(a: &TestServer, name: &str) -> Value {
    let (st, e) = a
        .api(
            Method::POST,
            &format!("/replication/rules/{name}/executions"),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{e}");
    wait(a, name, e["id"].as_str().unwrap()).await
}

async fn wait(a: &TestServer, rule: &str, id: &str) -> Value {
    let path = format!("/replication/rules/{rule}/executions/{id}");
    for _ in 0..1200 {
        let (st, e) = a.api(Method::GET, &path, None).await;
        assert_eq!(st, StatusCode::OK, "{e}");
        if e["status"] != "running" {
            return e;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{path} still running after 60 s");
}

async fn history(a: &TestServer, rule: &str, id: &str) -> Vec<Value> {
    let (_, h) = a
        .api(
            Method::GET,
            &format!("/replication/rules/{rule}/executions/{id}/history"),
            None,
        )
        .await;
    h["items"].as_array().unwrap().clone()
}

#[tokio::test]
async fn a_manual_rule_copies_what_its_filters_select_and_skips_it_the_second_time() {
    let (b, key) = destination().await;
    let a = TestServer::start("").await;
    let src = Registry::over(a.client.clone(), &a.base);
    let shared = vec![7u8; 300_000];
    let v1 = src.image("library/app", "v1", "one", &shared).await;
    src.manifest("library/app", "v1.1", OCI_MANIFEST, &v1).await;
    src.image("library/app", "latest", "latest", &shared).await;
    src.image("library/other", "v1", "other", &shared).await;
    src.image("library/app/sub", "v2", "sub", &shared).await;
    endpoint(&a, "eu", &b.base, &key).await;
    add_rule(&a, json!({"name": "apps", "endpoint": "eu", "registry": "library",
                    "images": "{app,app/**}", "tags": "v*", "dest_namespace": "library", "flatten": 0})).await;
    let e = run(&a, "apps").await;
    assert_eq!(e["status"], "succeeded", "{e}");
    assert_eq!(
        e["counts"]["examined"], 2,
        "app:v1 (with v1.1) and app/sub:v2: {e}"
    );
    assert_eq!(e["counts"]["acted"], 2, "{e}");
    let dst = Registry::new(&b.base, Some(key.clone()));
    assert_eq!(dst.pull_all("library/app", "v1").await, v1);
    assert_eq!(dst.pull_all("library/app", "v1.1").await, v1);
    dst.pull_all("library/app/sub", "v2").await;
    assert!(
        dst.pull_manifest("library/app", "latest").await.is_none(),
        "latest is filtered out"
    );
    assert!(
        dst.pull_manifest("library/other", "v1").await.is_none(),
        "other is filtered out"
    );
    let rows = history(&a, "apps", e["id"].as_str().unwrap()).await;
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|r| r["action"] == "copied"), "{rows:?}");
    let bytes = e["counts"]["bytes"].as_u64().unwrap();
    assert!(
        bytes >= 300_000,
        "the shared layer was sent once at least: {bytes}"
    );
    assert!(
        bytes < 2 * 300_000,
        "and only once (mounted for the second image): {bytes}"
    );

    // Again: everything is there. A resume point a week old (an upload given up) is dropped
    // by the run; a fresh one stays.
    let meta = a.app().store.meta.clone();
    for (digest, saved_ms) in [
        ("sha256:old", 1u64),
        ("sha256:new", berth::store::meta::now_ms()),
    ] {
        let point =
            json!({"location": "library/app/blobs/uploads/x", "offset": 1, "saved_ms": saved_ms});
        meta.record_put(
            berth::replication::transfer::RESUME,
            &format!("eu\0library/app\0{digest}"),
            serde_json::to_vec(&point).unwrap(),
        )
        .await
        .unwrap();
    }
    let again = run(&a, "apps").await;
    let kept = meta
        .record_list(berth::replication::transfer::RESUME, "eu\0", None, 10)
        .await
        .unwrap();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert!(kept[0].0.ends_with("sha256:new"), "{:?}", kept[0].0);
    assert_eq!(again["status"], "succeeded");
    assert_eq!(again["counts"]["acted"], 0, "{again}");
    assert_eq!(again["counts"]["bytes"], 0, "{again}");
    let rows = history(&a, "apps", again["id"].as_str().unwrap()).await;
    assert!(rows.iter().all(|r| r["action"] == "skipped"), "{rows:?}");

    // A deletion at the source leaves the destination alone.
    let d = sha256(&v1);
    let r = src
        .req(Method::DELETE, &format!("/v2/library/app/manifests/{d}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    run(&a, "apps").await;
    assert_eq!(dst.pull_all("library/app", "v1").await, v1);
}

#[tokio::test]
async fn an_event_rule_copies_a_push_within_seconds_and_referrers_follow_their_subject() {
    let (b, key) = destination().await;
    let a = TestServer::start("").await;
    endpoint(&a, "eu", &b.base, &key).await;
    add_rule(
        &a,
        json!({"name": "on-push", "endpoint": "eu", "registry": "library",
                    "trigger": "event", "dest_namespace": "library", "flatten": 1}),
    )
    .await;
    let src = Registry::over(a.client.clone(), &a.base);
    let pushed_at = Instant::now();
    let m = src.image("library/team/web", "1.0", "web", b"base").await;
    let dst = Registry::new(&b.base, Some(key.clone()));
    let mut seen = None;
    for _ in 0..200 {
        if let Some(got) = dst.pull_manifest("library/web", "1.0").await {
            seen = Some(got);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if seen.is_none() {
        let (_, list) = a
            .api(Method::GET, "/replication/rules/on-push/executions", None)
            .await;
        panic!("not at library/web after 10 s; executions: {list}");
    }
    assert_eq!(seen.as_deref(), Some(&m[..]), "flattened to library/web");
    assert!(pushed_at.elapsed() < Duration::from_secs(10));
    dst.pull_all("library/web", "1.0").await;

    // A signature: an OCI referrer of the image and a cosign tag.
    let subject = sha256(&m);
    let sig_config = src.blob("library/team/web", b"{}").await;
    let sig_layer = src.blob("library/team/web", b"signature").await;
    let referrer = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.dev.cosign.artifact.sig.v1+json",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": sig_config, "size": 2},
        "layers": [{"mediaType": "application/vnd.dev.cosign.simplesigning.v1+json", "digest": sig_layer, "size": 9}],
        "subject": {"mediaType": OCI_MANIFEST, "digest": subject, "size": m.len()},
    }))
    .unwrap();
    let rd = src
        .manifest(
            "library/team/web",
            &sha256(&referrer),
            OCI_MANIFEST,
            &referrer,
        )
        .await;
    let cosign_tag = format!("sha256-{}.sig", subject.trim_start_matches("sha256:"));
    let tagged_sig = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sig_config, "size": 2},
        "layers": [{"mediaType": "application/vnd.dev.cosign.simplesigning.v1+json", "digest": sig_layer, "size": 9}],
    }))
    .unwrap();
    src.manifest("library/team/web", &cosign_tag, OCI_MANIFEST, &tagged_sig)
        .await;
    let mut both = false;
    for _ in 0..200 {
        let by_digest = dst.pull_manifest("library/web", &rd).await;
        let by_tag = dst.pull_manifest("library/web", &cosign_tag).await;
        if by_digest.is_some() && by_tag.is_some() {
            both = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        both,
        "the referrer and the cosign tag reached the destination"
    );
    let r: Value = dst
        .get(&format!("/v2/library/web/referrers/{subject}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(r["manifests"][0]["digest"], rd.as_str(), "{r}");

    // Executions of event rules are listed with their trigger.
    let (_, list) = a
        .api(Method::GET, "/replication/rules/on-push/executions", None)
        .await;
    let items = list["items"].as_array().unwrap();
    assert!(!items.is_empty());
    assert!(items.iter().all(|e| e["trigger"] == "event"), "{list}");
}

/// A TCP relay that counts the bytes going to its upstream and can cut every connection.
struct CutRelay {
    addr: std::net::SocketAddr,
    /// Bytes sent to the upstream.
    up_bytes: Arc<AtomicU64>,
    /// Bytes the upstream answered.
    down_bytes: Arc<AtomicU64>,
    cut: Arc<AtomicBool>,
}

impl CutRelay {
    async fn start(upstream: std::net::SocketAddr) -> CutRelay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up_bytes = Arc::new(AtomicU64::new(0));
        let down_bytes = Arc::new(AtomicU64::new(0));
        let cut = Arc::new(AtomicBool::new(false));
        let (count, down, cut2) = (up_bytes.clone(), down_bytes.clone(), cut.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                if cut2.load(Ordering::Acquire) {
                    continue; // refused while the link is down
                }
                let (count, down, cut) = (count.clone(), down.clone(), cut2.clone());
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (mut cr, mut cw) = client.split();
                    let (mut sr, mut sw) = server.split();
                    let up = pipe(&mut cr, &mut sw, Some(&count), &cut);
                    let down = pipe(&mut sr, &mut cw, Some(&down), &cut);
                    tokio::select! { _ = up => {}, _ = down => {} }
                });
            }
        });
        CutRelay {
            addr,
            up_bytes,
            down_bytes,
            cut,
        }
    }
}

/// Copies `from` to `to` until either ends or `cut` is set, counting into `count`.
async fn pipe(
    from: &mut (impl tokio::io::AsyncRead + Unpin),
    to: &mut (impl tokio::io::AsyncWrite + Unpin),
    count: Option<&AtomicU64>,
    cut: &AtomicBool,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    while !cut.load(Ordering::Acquire) {
        let n = match tokio::time::timeout(Duration::from_millis(50), from.read(&mut buf)).await {
            Err(_) => continue,
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(n)) => n,
        };
        if let Some(c) = count {
            c.fetch_add(n as u64, Ordering::Relaxed);
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Pushes one large random layer as an image `repo:tag`; its size.
async fn push_big(src: &Registry, repo: &str, tag: &str, size: usize) -> (Vec<u8>, u64) {
    let mut layer = vec![0u8; size];
    let mut x: u64 = 0x9e3779b97f4a7c15;
    for b in layer.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let layer_d = src.blob(repo, &layer).await;
    let config = src.blob(repo, b"{\"big\":true}").await;
    let body = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": 12},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_d, "size": size}],
    }))
    .unwrap();
    src.manifest(repo, tag, OCI_MANIFEST, &body).await;
    (body, size as u64)
}

#[tokio::test]
async fn a_cut_link_and_a_stop_resume_from_the_destination_offset() {
    let (b, key) = destination().await;
    let relay = CutRelay::start(b.addr().parse().unwrap()).await;
    let chunk: u64 = 1 << 20;
    let a = TestServer::start(&format!(
        "[replication]\nchunk_bytes = {chunk}\nattempts = 3\nrequest_timeout = \"5s\"\n"
    ))
    .await;
    let src = Registry::over(a.client.clone(), &a.base);
    let (manifest, size) = push_big(&src, "library/big", "v1", 24 << 20).await;
    endpoint(&a, "eu", &format!("http://{}", relay.addr), &key).await;
    // 4 MB/s: the copy takes about 6 s, time enough to cut it.
    add_rule(
        &a,
        json!({"name": "big", "endpoint": "eu", "registry": "library",
                    "bandwidth_limit": 4_000_000, "concurrency": 1}),
    )
    .await;

    // A stop in the middle, then a new execution.
    let (_, e) = a
        .api(Method::POST, "/replication/rules/big/executions", None)
        .await;
    let id = e["id"].as_str().unwrap().to_string();
    while relay.up_bytes.load(Ordering::Relaxed) < 6 << 20 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let asked = Instant::now();
    let (st, _) = a
        .api(
            Method::POST,
            &format!("/replication/rules/big/executions/{id}/stop"),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::ACCEPTED);
    let stopped = wait(&a, "big", &id).await;
    assert_eq!(stopped["status"], "stopped", "{stopped}");
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "stopped within a second or so: {:?}",
        asked.elapsed()
    );
    let at_stop = relay.up_bytes.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        relay.up_bytes.load(Ordering::Relaxed) - at_stop < 64 * 1024,
        "nothing more is sent after the stop"
    );

    // The next execution goes on; the link is cut in its middle and comes back.
    let (_, e) = a
        .api(Method::POST, "/replication/rules/big/executions", None)
        .await;
    let id = e["id"].as_str().unwrap().to_string();
    while relay.up_bytes.load(Ordering::Relaxed) < at_stop + (6 << 20) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    relay.cut.store(true, Ordering::Release);
    tokio::time::sleep(Duration::from_millis(700)).await;
    relay.cut.store(false, Ordering::Release);
    let done = wait(&a, "big", &id).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["counts"]["acted"], 1, "{done}");
    let dst = Registry::new(&b.base, Some(key.clone()));
    assert_eq!(dst.pull_all("library/big", "v1").await, manifest);
    let total = relay.up_bytes.load(Ordering::Relaxed);
    // Request heads and the small blobs and manifest take a few KiB; what was cut is sent again
    // only from the last acknowledged chunk: at most two chunks (one per interruption) more.
    assert!(
        total <= size + 2 * chunk + 256 * 1024,
        "sent {total} bytes for a blob of {size} (chunk {chunk})"
    );

    // This region restarts in the middle of a copy; the next execution goes on from the
    // destination's offset (the resume point survived in the metadata).
    let mut a = a;
    let src = Registry::over(a.client.clone(), &a.base);
    let (manifest2, size2) = push_big(&src, "library/big2", "v1", 16 << 20).await;
    let start = relay.up_bytes.load(Ordering::Relaxed);
    let (_, e) = a
        .api(Method::POST, "/replication/rules/big/executions", None)
        .await;
    let id = e["id"].as_str().unwrap().to_string();
    while relay.up_bytes.load(Ordering::Relaxed) < start + (6 << 20) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a.restart().await;
    let (_, e) = a
        .api(
            Method::GET,
            &format!("/replication/rules/big/executions/{id}"),
            None,
        )
        .await;
    assert_eq!(e["status"], "interrupted", "{e}");
    let again = run(&a, "big").await;
    assert_eq!(again["status"], "succeeded", "{again}");
    let (_, tasks) = a
        .api(
            Method::GET,
            &format!(
                "/replication/rules/big/executions/{}/tasks",
                again["id"].as_str().unwrap()
            ),
            None,
        )
        .await;
    assert_eq!(again["counts"]["failed"], 0, "{tasks}");
    assert_eq!(dst.pull_all("library/big2", "v1").await, manifest2);
    let sent = relay.up_bytes.load(Ordering::Relaxed) - start;
    assert!(
        sent <= size2 + chunk + 256 * 1024,
        "sent {sent} bytes for a blob of {size2} across a restart (chunk {chunk})"
    );
}

#[tokio::test]
async fn rules_and_endpoints_are_checked_and_admin_only() {
    let a = TestServer::start("").await;
    let bad = |b: Value| async {
        let (st, body) = a.api(Method::POST, "/replication/rules", Some(b)).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{body}");
        body["errors"][0]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    assert!(
        bad(json!({"name": "r", "endpoint": "nowhere", "registry": "library"}))
            .await
            .contains("does not exist")
    );
    let (st, _) = a
        .api(
            Method::POST,
            "/replication/endpoints",
            Some(json!({"name": "x", "url": "not a url"})),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    let (st, _) = a
        .api(
            Method::POST,
            "/replication/endpoints",
            Some(json!({"name": "eu", "url": "http://127.0.0.1:9"})),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED);
    let (st, t) = a
        .api(Method::POST, "/replication/endpoints/eu/test", None)
        .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(t["ok"], false, "{t}");
    assert!(bad(
        json!({"name": "r", "endpoint": "eu", "registry": "library", "trigger": "schedule"})
    )
    .await
    .starts_with("schedule"));
    add_rule(
        &a,
        json!({"name": "r", "endpoint": "eu", "registry": "library"}),
    )
    .await;
    let (st, _) = a
        .api(Method::DELETE, "/replication/endpoints/eu", None)
        .await;
    assert_eq!(st, StatusCode::CONFLICT, "a rule uses it");
    // With auth on, a non-admin cannot see or change replication.
    let (id, secret) = a.user("dev", Role::ImageUploader, &["library"]);
    let r = reqwest::Client::new()
        .get(a.url("/api/v1/replication/rules"))
        .basic_auth(id, Some(secret))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn a_pull_rule_copies_from_another_region_with_referrers_and_skips_the_second_time() {
    // The other region holds the images; this one pulls them.
    let (other, key) = destination().await;
    let up = Registry::new(&other.base, Some(key.clone()));
    let web = up
        .image("library/team/web", "v1", "web", b"base layer")
        .await;
    up.image("library/team/web", "dev", "dev", b"base layer")
        .await;
    let api_m = up
        .image("library/team/api", "v2", "api", b"base layer")
        .await;
    up.image("library/other", "v1", "other", b"base layer")
        .await;
    let subject = sha256(&web);
    let sig_config = up.blob("library/team/web", b"{}").await;
    let referrer = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "artifactType": "application/spdx+json",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": sig_config, "size": 2},
        "layers": [{"mediaType": "application/vnd.oci.empty.v1+json", "digest": sig_config, "size": 2}],
        "subject": {"mediaType": OCI_MANIFEST, "digest": subject, "size": web.len()},
    }))
    .unwrap();
    let rd = up
        .manifest(
            "library/team/web",
            &sha256(&referrer),
            OCI_MANIFEST,
            &referrer,
        )
        .await;

    let here = TestServer::start("").await;
    endpoint(&here, "hub", &other.base, &key).await;
    add_rule(
        &here,
        json!({"name": "from-hub", "mode": "pull", "endpoint": "hub", "registry": "library",
                    "images": "team/**", "tags": "v*"}),
    )
    .await;
    let e = run(&here, "from-hub").await;
    assert_eq!(e["status"], "succeeded", "{e}");
    assert_eq!(e["counts"]["acted"], 2, "{e}");
    let local = Registry::over(here.client.clone(), &here.base);
    assert_eq!(local.pull_all("library/team/web", "v1").await, web);
    assert_eq!(local.pull_all("library/team/api", "v2").await, api_m);
    assert!(local
        .pull_manifest("library/team/web", "dev")
        .await
        .is_none());
    assert!(local.pull_manifest("library/other", "v1").await.is_none());
    assert_eq!(
        local.pull_manifest("library/team/web", &rd).await.unwrap(),
        referrer
    );
    let again = run(&here, "from-hub").await;
    assert_eq!(again["counts"]["acted"], 0, "{again}");
    assert_eq!(again["counts"]["bytes"], 0, "{again}");
    // Pull rules cannot be event-triggered (the endpoint's pushes are not seen here).
    let (st, _) = here
        .api(
            Method::POST,
            "/replication/rules",
            Some(
                json!({"name": "bad", "mode": "pull", "endpoint": "hub", "registry": "library",
                    "trigger": "event"}),
            ),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
}

/// Debian's docker-registry (distribution 2.8) as a foreign destination and source: chunked
/// uploads with `Content-Range`, an index with its platform manifests, namespace and flatten,
/// skips; then a pull rule brings the images back into a second berth.
#[tokio::test]
async fn a_foreign_registry_is_a_destination_and_a_source() {
    use common::clients::DistributionRegistry;
    use common::server::OCI_INDEX;

    let dist = tokio::task::spawn_blocking(DistributionRegistry::start)
        .await
        .unwrap();
    let a = TestServer::start("[replication]\nchunk_bytes = 1048576\n").await;
    let src = Registry::over(a.client.clone(), &a.base);
    let (big, _) = push_big(&src, "library/team/big", "v1", (3 << 20) + 12345).await;
    let amd = src
        .image("library/team/multi", "amd-only", "amd", b"shared base")
        .await;
    let arm = src
        .image("library/team/multi", "arm-only", "arm", b"shared base")
        .await;
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": sha256(&amd), "size": amd.len(), "platform": {"os": "linux", "architecture": "amd64"}},
            {"mediaType": OCI_MANIFEST, "digest": sha256(&arm), "size": arm.len(), "platform": {"os": "linux", "architecture": "arm64"}},
        ],
    }))
    .unwrap();
    src.manifest("library/team/multi", "v2", OCI_INDEX, &index)
        .await;
    let url = format!("http://{}", dist.addr);
    let (st, body) = a
        .api(
            Method::POST,
            "/replication/endpoints",
            Some(json!({"name": "dist", "url": url})),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{body}");
    let (st, t) = a
        .api(Method::POST, "/replication/endpoints/dist/test", None)
        .await;
    assert_eq!((st, &t["ok"]), (StatusCode::OK, &json!(true)), "{t}");
    add_rule(&a, json!({"name": "to-dist", "endpoint": "dist", "registry": "library",
                    "images": "team/**", "tags": "v*", "dest_namespace": "mirror/eu", "flatten": 1})).await;
    let e = run(&a, "to-dist").await;
    assert_eq!(
        e["status"],
        "succeeded",
        "{e}; registry log:\n{}",
        dist.log()
    );
    assert_eq!(e["counts"]["acted"], 2, "{e}");
    let there = Registry::new(&url, None);
    assert_eq!(there.pull_all("mirror/eu/big", "v1").await, big);
    assert_eq!(there.pull_all("mirror/eu/multi", "v2").await, index);
    let again = run(&a, "to-dist").await;
    assert_eq!(again["counts"]["acted"], 0, "{again}");

    // And back: a pull rule from the foreign registry into another berth.
    let b = TestServer::start("[[registry]]\nname = \"mirror\"\n").await;
    let (st, _) = b
        .api(
            Method::POST,
            "/replication/endpoints",
            Some(json!({"name": "dist", "url": url})),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED);
    add_rule(
        &b,
        json!({"name": "from-dist", "mode": "pull", "endpoint": "dist", "registry": "mirror"}),
    )
    .await;
    let e = run(&b, "from-dist").await;
    assert_eq!(e["status"], "succeeded", "{e}");
    assert_eq!(e["counts"]["acted"], 2, "{e}");
    let local = Registry::over(b.client.clone(), &b.base);
    assert_eq!(local.pull_all("mirror/eu/big", "v1").await, big);
    assert_eq!(local.pull_all("mirror/eu/multi", "v2").await, index);
}

/// Twenty images sharing three base layers: each base layer crosses the wire once, to the
/// first repository that needs it, and is mounted into the others; pulling them back fetches
/// each once.
#[tokio::test]
async fn shared_base_layers_travel_once_per_execution() {
    let (b, key) = destination().await;
    let relay = CutRelay::start(b.addr().parse().unwrap()).await;
    let a = TestServer::start("").await;
    let src = Registry::over(a.client.clone(), &a.base);
    let bases: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i + 1; 1 << 20]).collect();
    let base_ds: Vec<String> = bases
        .iter()
        .map(|b| src.blob("library/base", b))
        .collect::<futures_util::future::JoinAll<_>>()
        .await;
    for i in 0..20 {
        let repo = format!("library/svc{i:02}");
        let config = format!("{{\"svc\":{i}}}").into_bytes();
        let config_d = src.blob(&repo, &config).await;
        let mut layers = Vec::new();
        for (b, d) in bases.iter().zip(&base_ds) {
            src.blob(&repo, b).await; // linked into this repository (stored once)
            layers.push(json!({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": b.len()}));
        }
        let m = serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_d, "size": config.len()},
            "layers": layers,
        }))
        .unwrap();
        src.manifest(&repo, "v1", OCI_MANIFEST, &m).await;
    }
    endpoint(&a, "eu", &format!("http://{}", relay.addr), &key).await;
    add_rule(
        &a,
        json!({"name": "svcs", "endpoint": "eu", "registry": "library", "images": "svc*"}),
    )
    .await;
    let e = run(&a, "svcs").await;
    assert_eq!(e["counts"]["acted"], 20, "{e}");
    let base_bytes = 3u64 << 20;
    let sent = relay.up_bytes.load(Ordering::Relaxed);
    assert!(sent >= base_bytes, "{sent}");
    // Besides the bases, 20 configs and manifests and the requests' heads: well under 1 MiB.
    assert!(
        sent < base_bytes + (1 << 20),
        "each base layer sent once: {sent} bytes"
    );
    let dst = Registry::new(&b.base, Some(key.clone()));
    for i in [0, 7, 19] {
        dst.pull_all(&format!("library/svc{i:02}"), "v1").await;
    }

    // Pulled back into a third region through the relay: each base fetched once.
    let c = TestServer::start("").await;
    endpoint(&c, "eu", &format!("http://{}", relay.addr), &key).await;
    add_rule(&c, json!({"name": "back", "mode": "pull", "endpoint": "eu", "registry": "library", "images": "svc*"})).await;
    let before = relay.down_bytes.load(Ordering::Relaxed);
    let e = run(&c, "back").await;
    assert_eq!(e["counts"]["acted"], 20, "{e}");
    let fetched = relay.down_bytes.load(Ordering::Relaxed) - before;
    assert!(
        (base_bytes..base_bytes + (1 << 20)).contains(&fetched),
        "each base layer fetched once: {fetched} bytes"
    );
}

/// A destination that accepts connections and never answers does not hold back a rule to a
/// healthy one, on events or by hand; a rule's bandwidth limit holds.
#[tokio::test]
async fn a_stalled_endpoint_does_not_delay_another_and_the_bandwidth_limit_holds() {
    let (b, key) = destination().await;
    let stall = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let stall_addr = stall.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((c, _)) = stall.accept().await {
            held.push(c); // read nothing, answer nothing
        }
    });
    let a = TestServer::start("[replication]\nrequest_timeout = \"60s\"\n").await;
    endpoint(&a, "stuck", &format!("http://{stall_addr}"), &key).await;
    endpoint(&a, "eu", &b.base, &key).await;
    for (name, ep) in [("to-stuck", "stuck"), ("to-eu", "eu")] {
        add_rule(
            &a,
            json!({"name": name, "endpoint": ep, "registry": "library", "trigger": "event"}),
        )
        .await;
    }
    let src = Registry::over(a.client.clone(), &a.base);
    let m = src.image("library/app", "v1", "one", b"base").await;
    let dst = Registry::new(&b.base, Some(key.clone()));
    let t = Instant::now();
    let mut got = None;
    while got.is_none() && t.elapsed() < Duration::from_secs(10) {
        got = dst.pull_manifest("library/app", "v1").await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        got,
        Some(m),
        "the healthy endpoint got the push while the other stalls"
    );
    let (_, list) = a
        .api(Method::GET, "/replication/rules/to-stuck/executions", None)
        .await;
    assert_eq!(list["items"][0]["status"], "running", "{list}");

    // 20 MB/s on a 48 MB blob: about 2.4 s. The rate is measured on the wire, between the
    // first and the last MiB of the blob (what comes before, the local hash and the HEADs, is
    // not the limiter's).
    let (_, size) = push_big(&src, "library/big", "v1", 48_000_000).await;
    let relay = CutRelay::start(b.addr().parse().unwrap()).await;
    endpoint(&a, "eu-wire", &format!("http://{}", relay.addr), &key).await;
    add_rule(
        &a,
        json!({"name": "limited", "endpoint": "eu-wire", "registry": "library", "images": "big",
                    "bandwidth_limit": 20_000_000}),
    )
    .await;
    let (st, e) = a
        .api(Method::POST, "/replication/rules/limited/executions", None)
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{e}");
    let (mut first, mut last) = (None, None);
    let mib = 1u64 << 20;
    let t = Instant::now();
    while last.is_none() && t.elapsed() < Duration::from_secs(30) {
        let sent = relay.up_bytes.load(Ordering::Relaxed);
        if first.is_none() && sent >= mib {
            first = Some((Instant::now(), sent));
        }
        if sent >= size - mib {
            last = Some((Instant::now(), sent));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let e = wait(&a, "limited", e["id"].as_str().unwrap()).await;
    assert_eq!(e["status"], "succeeded", "{e}");
    let ((t0, b0), (t1, b1)) = (first.unwrap(), last.unwrap());
    let secs = (t1 - t0).as_secs_f64();
    let rate = (b1 - b0) as f64 / secs;
    eprintln!("bandwidth limit 20 MB/s: measured {rate:.0} bytes/s over {secs} s");
    assert!(
        (18e6..22e6).contains(&rate),
        "{rate} bytes/s over {secs} s for a limit of 20 MB/s"
    );
}

/// A scheduled rule runs when its cron falls due (one scheduler tick, as the scheduler's loop
/// makes every 15 s); a disabled one and a manual one do not.
#[tokio::test]
async fn scheduled_rules_run_when_due() {
    let (b, key) = destination().await;
    let a = TestServer::start("").await;
    a.push_image("library/app", "v1", "one").await;
    endpoint(&a, "eu", &b.base, &key).await;
    let every_minute = json!({"type": "custom", "cron": "* * * * *"});
    for (name, trigger, enabled) in [
        ("cron", "schedule", true),
        ("off", "schedule", false),
        ("hand", "manual", true),
    ] {
        add_rule(
            &a,
            json!({"name": name, "endpoint": "eu", "registry": "library",
                        "trigger": trigger, "schedule": every_minute, "enabled": enabled}),
        )
        .await;
    }
    let now = std::time::SystemTime::now();
    berth::scheduler::start_due(&a.app(), now - Duration::from_secs(120), now).await;
    let executions = |rule: &'static str| {
        let a = &a;
        async move {
            let (_, list) = a
                .api(
                    Method::GET,
                    &format!("/replication/rules/{rule}/executions"),
                    None,
                )
                .await;
            list["items"].as_array().unwrap().clone()
        }
    };
    let ran = executions("cron").await;
    assert_eq!(ran.len(), 1, "{ran:?}");
    assert_eq!(ran[0]["trigger"], "schedule");
    assert_eq!(ran[0]["operator"], "schedule");
    wait(&a, "cron", ran[0]["id"].as_str().unwrap()).await;
    assert!(executions("off").await.is_empty());
    assert!(executions("hand").await.is_empty());
    let dst = Registry::new(&b.base, Some(key));
    dst.pull_all("library/app", "v1").await;
}

/// A blob damaged on this node's disk is never sent: its artifact's task fails saying so, and
/// the destination does not get the image.
#[tokio::test]
async fn a_damaged_local_blob_is_not_replicated() {
    let (b, key) = destination().await;
    let a = TestServer::start("").await;
    let src = Registry::over(a.client.clone(), &a.base);
    let layer = vec![42u8; 100_000];
    let m = src.image("library/app", "v1", "one", &layer).await;
    let layer_d = sha256(&layer);
    let digest = berth::oci::digest::Digest::parse(&layer_d).unwrap();
    assert!(a.holds_blob(&digest));
    let hex = digest.hex();
    let path = a
        .dir
        .path()
        .join("data/blobs/sha256")
        .join(&hex[..2])
        .join(hex);
    let mut damaged = std::fs::read(&path).unwrap();
    damaged[500] ^= 0xff;
    std::fs::write(&path, damaged).unwrap();
    endpoint(&a, "eu", &b.base, &key).await;
    add_rule(
        &a,
        json!({"name": "r", "endpoint": "eu", "registry": "library"}),
    )
    .await;
    let e = run(&a, "r").await;
    assert_eq!(e["counts"]["failed"], 1, "{e}");
    let (_, tasks) = a
        .api(
            Method::GET,
            &format!(
                "/replication/rules/r/executions/{}/tasks",
                e["id"].as_str().unwrap()
            ),
            None,
        )
        .await;
    let error = tasks["items"][0]["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(error.contains("other bytes"), "{tasks}");
    let dst = Registry::new(&b.base, Some(key));
    assert!(dst.pull_manifest("library/app", "v1").await.is_none());
    let r = dst.get(&format!("/v2/library/app/blobs/{layer_d}")).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    drop(m);
}

/// A node whose blobs are in object storage (and whose clients are sent presigned URLs)
/// replicates too: blobs are read from the bucket, hashed and sent in chunks.
#[tokio::test]
async fn a_node_on_object_storage_replicates_from_its_bucket() {
    let s3 = berth::testbed::S3Server::start().await;
    let (b, key) = destination().await;
    let a = TestServer::start(&format!("{}redirect = true\n", s3.storage_toml("a"))).await;
    let src = Registry::over(a.client.clone(), &a.base);
    let layer: Vec<u8> = (0..3_000_000).map(|i| (i % 241) as u8).collect();
    let m = src.image("library/app", "v1", "one", &layer).await;
    endpoint(&a, "eu", &b.base, &key).await;
    add_rule(
        &a,
        json!({"name": "from-bucket", "endpoint": "eu", "registry": "library"}),
    )
    .await;
    let e = run(&a, "from-bucket").await;
    assert_eq!(e["status"], "succeeded", "{e}");
    let dst = Registry::new(&b.base, Some(key));
    assert_eq!(dst.pull_all("library/app", "v1").await, m);
}
