//! Several berth nodes over one PostgreSQL database (`[metadata] kind = "postgres"`): what one
//! node writes, every node acts on at once: users turn auth on everywhere, a token of one node
//! is good at every node, registries route everywhere, and a scheduled job runs on one node
//! only.

mod common;

use std::time::{Duration, Instant, SystemTime};

use common::doubles::FaultRelay;
use common::process::BerthProcess;
use common::registry::{chunked_upload, Client};
use common::server::TestServer;
use common::{clients, oci_layout};
use reqwest::{Method, StatusCode};
use serde_json::json;

fn metadata(url: &str) -> String {
    format!("[metadata]\nkind = \"postgres\"\nurl = {url:?}\n")
}

/// Nodes over one fresh database.
async fn nodes(n: usize, extra: &str) -> Vec<TestServer> {
    let url = berth::testbed::postgres().database().await;
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(TestServer::start(&format!("{}{extra}", metadata(&url))).await);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_one_node_writes_every_node_acts_on_at_once() {
    let ns = nodes(2, "").await;
    let (a, b) = (&ns[0], &ns[1]);
    // auth = auto: open until the first user exists, anywhere.
    assert_eq!(b.get("/v2/").await.status(), StatusCode::OK);
    let (id, secret) = a.user("root", berth::auth::Role::Admin, &[]);
    within_a_notice(
        "a user created on one node turns auth on at the others",
        || async { b.get("/v2/").await.status() == StatusCode::UNAUTHORIZED },
    )
    .await;
    // A token issued by node A is accepted by node B: one signing key in the database.
    let r = a
        .client
        .get(a.url("/service/token?service=berth&scope=repository:library/app:pull"))
        .basic_auth(&id, Some(&secret))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let token = r.json::<serde_json::Value>().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();
    let r = b
        .client
        .get(b.url("/v2/library/app/tags/list"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::NOT_FOUND,
        "token accepted, no such repository"
    );
    // A registry created through node B routes on node A at once.
    let r = b
        .client
        .post(b.url("/api/v1/registries"))
        .basic_auth(&id, Some(&secret))
        .json(&json!({"name": "team", "type": "normal"}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{:?}", r.text().await);
    within_a_notice("a registry created on node B routes on node A", || async {
        a.app().store.registry("team").is_some()
    })
    .await;
    // A user deleted through node B: node A refuses its key at once.
    let (bob, bob_secret) = a.user("bob", berth::auth::Role::Viewer, &[]);
    let as_bob = |s: &TestServer| {
        s.client
            .get(s.url("/v2/"))
            .basic_auth(&bob, Some(&bob_secret))
            .send()
    };
    assert_eq!(as_bob(a).await.unwrap().status(), StatusCode::OK);
    let r = b
        .client
        .delete(b.url("/api/v1/users/bob"))
        .basic_auth(&id, Some(&secret))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{:?}", r.text().await);
    within_a_notice("a user deleted on node B is refused by node A", || async {
        as_bob(a).await.unwrap().status() == StatusCode::UNAUTHORIZED
    })
    .await;
}

/// Another node learns of a change through PostgreSQL's NOTIFY, which is delivered after the
/// writer's commit (and so after its response): "at once" means within milliseconds, and a
/// second is the bound that fails the test.
async fn within_a_notice<F, Fut>(what: &str, mut holds: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !holds().await {
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{what}: not within a second"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    eprintln!("{what}: after {:?}", started.elapsed());
}

/// Gives registry `library` a cleanup schedule of every minute.
async fn clean_library_every_minute(s: &TestServer) {
    let every_minute = json!({"schedule": {"type": "custom", "cron": "* * * * *"}});
    let (status, body) = s
        .api(
            Method::PUT,
            "/registries/library/cleanup",
            Some(every_minute),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

async fn cleanup_executions(s: &TestServer) -> usize {
    let (status, list) = s
        .api(Method::GET, "/registries/library/cleanup/executions", None)
        .await;
    assert_eq!(status, StatusCode::OK, "{list}");
    list["items"].as_array().unwrap().len()
}

/// Every node's scheduler ticks over the same window at once; the nodes that started a run.
async fn tick_all(ns: &[TestServer], since: SystemTime, now: SystemTime) -> Vec<usize> {
    let ticks = ns.iter().map(|s| {
        let app = s.app();
        async move { berth::scheduler::start_due(&app, since, now).await }
    });
    futures_util::future::join_all(ticks)
        .await
        .iter()
        .enumerate()
        .filter(|(_, started)| started.iter().any(|j| j == "cleanup/library"))
        .map(|(i, _)| i)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_cleanup_runs_on_one_node_and_again_once_after_that_node_is_gone() {
    let mut ns = nodes(3, "").await;
    clean_library_every_minute(&ns[0]).await;
    let now = SystemTime::now();
    let ran = tick_all(&ns, now - Duration::from_secs(61), now).await;
    assert_eq!(ran.len(), 1, "one node ran it: {ran:?}");
    assert_eq!(cleanup_executions(&ns[1]).await, 1);
    // The run ends first (its node holds the scope's lease while it runs: a node stopped in
    // the middle of one leaves it to the takeover, tested below), then the node is gone; at
    // the next due time one of the others runs it, once.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, list) = ns[1]
            .api(Method::GET, "/registries/library/cleanup/executions", None)
            .await;
        if list["items"][0]["status"] != "running" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the first run did not end: {list}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    ns.remove(ran[0]).server.take().unwrap().shutdown().await;
    let later = now + Duration::from_secs(60);
    let ran = tick_all(&ns, now, later).await;
    assert_eq!(ran.len(), 1, "once more, on one node: {ran:?}");
    assert_eq!(cleanup_executions(&ns[0]).await, 2);
}

/// Three nodes over one bucket (`[storage] kind = "s3"`, a real s3s-fs) and one database: an
/// image pushed with skopeo to node 1 is pulled from node 2 by containerd and runs; a tag moved
/// on node 3 is what node 1 serves next; a chunked upload started on node 1 finishes on
/// node 2 and its blob reads whole from node 3.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_over_one_bucket_and_one_database_serve_as_one_registry() {
    let s3 = berth::testbed::S3Server::start().await;
    let ns = nodes(3, &s3.storage_toml("hub")).await;

    let layouts = tempfile::tempdir().unwrap();
    let layout = layouts.path().join("app");
    let img = oci_layout::build_image(&layout, "v1", 256 * 1024);
    let (src, dst) = (
        format!("oci:{}:v1", layout.display()),
        format!("docker://{}/library/app:v1", ns[0].addr()),
    );
    tokio::task::spawn_blocking(move || clients::skopeo_copy(&src, &dst, &[]))
        .await
        .unwrap();
    assert!(
        !ns[0].dir.path().join("data/blobs").exists()
            || std::fs::read_dir(ns[0].dir.path().join("data/blobs"))
                .unwrap()
                .next()
                .is_none(),
        "blobs went to the bucket, not to node 1's disk"
    );
    let name = format!("{}/library/app:v1", ns[1].addr());
    let out = tokio::task::spawn_blocking(move || {
        let ctd = clients::Containerd::start();
        ctd.ctr(&[
            "images",
            "pull",
            "--plain-http",
            "--snapshotter",
            &ctd.snapshotter,
            &name,
        ]);
        let id = clients::unique_name("berth-scale-out");
        ctd.ctr(&["run", "--rm", "--snapshotter", &ctd.snapshotter, &name, &id])
    })
    .await
    .unwrap();
    assert!(
        out.lines().any(|l| l.trim() == oci_layout::MARKER),
        "ctr run printed {out:?}"
    );

    // Node 1 serves the tag (and keeps its manifest in memory); node 3 moves it.
    let on = |i: usize| Client::over(reqwest::Client::new(), &ns[i].base);
    let digest_of = |r: &reqwest::Response| common::server::header(r, "docker-content-digest");
    let before = on(0)
        .req(Method::GET, "/v2/library/app/manifests/v1")
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .unwrap();
    assert_eq!(digest_of(&before), img.manifest.digest);
    let moved = on(2).image("library/app", "v1", "moved", b"base").await;
    let moved_digest = common::server::sha256(&moved);
    within_a_notice("a tag moved on node 3 is served by node 1", || async {
        let r = on(0)
            .req(Method::GET, "/v2/library/app/manifests/v1")
            .header("accept", "application/vnd.oci.image.manifest.v1+json")
            .send()
            .await
            .unwrap();
        digest_of(&r) == moved_digest
    })
    .await;

    // A chunked upload: begun on node 1, finished on node 2, read from node 3.
    let data: Vec<u8> = (0..(9 << 20)).map(|i| (i % 251) as u8).collect();
    let (node1, node2) = (on(0), on(1));
    let d = chunked_upload(&[&node1, &node2], "library/app", &data, 6 << 20).await;
    let r = on(2)
        .req(Method::GET, &format!("/v2/library/app/blobs/{d}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(
        r.bytes().await.unwrap() == data,
        "the blob reads whole from node 3"
    );
}

/// 32 cold GETs of one 256 MiB blob spread over three nodes at once: the source is asked once
/// (the node holding the blob's fetch lease fetches it into the bucket, the others stream it
/// from that node), and every client gets every byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cold_blob_asked_of_three_nodes_at_once_is_fetched_from_the_source_once() {
    use sha2::Digest as _;
    let source = TestServer::start("").await;
    let up = Client::over(source.client.clone(), &source.base);
    let layer: Vec<u8> = (0..256u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
    let digest = up.blob("library/app", &layer).await;
    drop(layer);
    let relay = FaultRelay::start(&source.base);
    // About two seconds at the source: every GET below arrives while the fetch runs.
    relay.set_match("/blobs/");
    relay.throttle(128 << 20);
    let s3 = berth::testbed::S3Server::start().await;
    let cache = format!(
        "[[image_cache]]\nname = \"up\"\nkind = \"registry\"\nurl = \"{}\"\n\
         [[registry]]\nname = \"hub\"\ntype = \"cache\"\ncache = \"up\"\n",
        relay.url()
    );
    let ns = nodes(3, &format!("{}{cache}", s3.storage_toml("hub"))).await;
    let started = Instant::now();
    let gets = (0..32).map(|i| {
        let node = &ns[i % 3];
        let (client, url) = (
            node.client.clone(),
            node.url(&format!("/v2/hub/library/app/blobs/{digest}")),
        );
        async move {
            let mut r = client.get(url).send().await.unwrap();
            if r.status() != StatusCode::OK {
                panic!("client {i}: {} {:?}", r.status(), r.text().await);
            }
            let mut hash = sha2::Sha256::new();
            let mut first_byte = None;
            let mut len = 0usize;
            loop {
                let chunk = match r.chunk().await {
                    Ok(Some(chunk)) => chunk,
                    Ok(None) => break,
                    Err(e) => panic!("client {i} after {len} bytes: {e:?}"),
                };
                first_byte.get_or_insert_with(|| started.elapsed());
                len += chunk.len();
                hash.update(&chunk);
            }
            (
                format!("sha256:{}", hex::encode(hash.finalize())),
                len,
                first_byte.unwrap(),
            )
        }
    });
    let got = futures_util::future::join_all(gets).await;
    for (i, (d, len, _)) in got.iter().enumerate() {
        assert_eq!((d, *len), (&digest, 256 << 20), "client {i}: every byte");
    }
    let mut firsts: Vec<Duration> = got.iter().map(|g| g.2).collect();
    firsts.sort();
    eprintln!(
        "32 clients over 3 nodes: first bytes from {:?} to {:?}, all done after {:?}",
        firsts[0],
        firsts[31],
        started.elapsed()
    );
    assert_eq!(
        relay.requests_matching("GET", &digest),
        1,
        "one fetch of the blob at the source"
    );
    assert_eq!(relay.bytes_sent_matching(&digest), 256 << 20);
    let metrics = ns[0].get("/metrics").await.text().await.unwrap();
    assert!(
        common::metrics::metric_value(&metrics, "berth_cache_peer_streams_total", &[]) >= 1.0,
        "the other nodes' clients streamed from the fetching node"
    );
    // The internal endpoint answers signed requests of nodes only.
    let r = ns[1]
        .client
        .get(ns[1].url(&format!(
            "/internal/v1/fetches/{digest}?repo=hub/library/app"
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    // Warm on every node, from the bucket.
    for node in &ns {
        let r = node
            .client
            .head(node.url(&format!("/v2/hub/library/app/blobs/{digest}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }
    assert_eq!(relay.requests_matching("GET", &digest), 1);
}

/// A node that held a blob's fetch lease and died (its URL refuses connections, its lease is
/// no longer renewed): the next node asked for the blob waits for the lease to run out, takes
/// it and fetches the blob itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_lease_of_a_dead_node_is_taken_over_once_it_runs_out() {
    let source = TestServer::start("").await;
    let up = Client::over(source.client.clone(), &source.base);
    let layer: Vec<u8> = (0..3u32 << 20).map(|i| (i % 241) as u8).collect();
    let digest = up.blob("library/app", &layer).await;
    let s3 = berth::testbed::S3Server::start().await;
    let cache = format!(
        "[[image_cache]]\nname = \"up\"\nkind = \"registry\"\nurl = \"{}\"\n\
         [[registry]]\nname = \"hub\"\ntype = \"cache\"\ncache = \"up\"\n",
        source.base
    );
    let ns = nodes(1, &format!("{}{cache}", s3.storage_toml("hub"))).await;
    let dead = berth::cache::peer::Holder {
        node: "dead".into(),
        url: Some("http://127.0.0.1:1".into()),
        repo: "hub/library/app".into(),
    };
    let lease = ns[0]
        .app()
        .store
        .meta
        .lease_take(
            &format!("fetch/{digest}"),
            &serde_json::to_string(&dead).unwrap(),
            Duration::from_secs(1),
        )
        .await
        .unwrap();
    assert_eq!(lease.holder, serde_json::to_string(&dead).unwrap());
    let started = Instant::now();
    let r = ns[0]
        .get(&format!("/v2/hub/library/app/blobs/{digest}"))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.bytes().await.unwrap() == layer, "every byte");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "served only once the dead node's lease ran out ({:?})",
        started.elapsed()
    );
}

/// Two berth processes over one bucket and one database; node 1 is killed with SIGKILL in the
/// middle of a blob's upload. The client's push fails there, nothing of it shows on node 2
/// (no blob under the digest, no tag), and the client's retry of the whole push on node 2
/// succeeds and pulls whole; node 1, started again on its data directory, serves it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_cut_by_a_killed_node_is_retried_on_another_and_nothing_half_written_shows() {
    let s3 = berth::testbed::S3Server::start().await;
    let url = berth::testbed::postgres().database().await;
    let extra = format!(
        "{}{}[[registry]]\nname = \"library\"\n",
        s3.storage_toml("hub"),
        metadata(&url)
    );
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut node1 = BerthProcess::start_in(d1.path(), &extra);
    let node2 = BerthProcess::start_in(d2.path(), &extra);
    let layer: Vec<u8> = (0..48u32 << 20).map(|i| (i * 13 % 253) as u8).collect();
    let digest = common::server::sha256(&layer);
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{}/v2/library/app/blobs/uploads/", node1.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let location = common::server::header(&r, "location");
    let location = if location.starts_with('/') {
        format!("{}{location}", node1.url())
    } else {
        location
    };
    // The body goes in 1 MiB pieces; node 1 dies after 16 MiB of them.
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Vec<u8>>>(2);
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|piece| (piece, rx))
    });
    let put = tokio::spawn(
        http.put(format!(
            "{location}{}digest={digest}",
            if location.contains('?') { '&' } else { '?' }
        ))
        .body(reqwest::Body::wrap_stream(body))
        .send(),
    );
    for piece in layer[..16 << 20].chunks(1 << 20) {
        tx.send(Ok(piece.to_vec())).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    node1.kill();
    for piece in layer[16 << 20..].chunks(1 << 20) {
        if tx.send(Ok(piece.to_vec())).await.is_err() {
            break;
        }
    }
    drop(tx);
    // An error (the connection died with the node), or an answer that is no success.
    if let Ok(r) = put.await.unwrap() {
        assert!(!r.status().is_success(), "a push to a killed node: {r:?}");
    }
    let on2 = Client::over(http.clone(), &node2.url());
    let head = |client: &Client| {
        client
            .req(Method::HEAD, &format!("/v2/library/app/blobs/{digest}"))
            .send()
    };
    assert_eq!(
        head(&on2).await.unwrap().status(),
        StatusCode::NOT_FOUND,
        "no blob under the digest from the cut push"
    );
    // The retry, on node 2.
    let manifest = on2.image("library/app", "v1", "killed", &layer).await;
    let r = on2
        .req(Method::GET, &format!("/v2/library/app/blobs/{digest}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.bytes().await.unwrap() == layer, "the layer reads whole");
    assert_eq!(
        on2.pull_manifest("library/app", "v1").await.unwrap(),
        manifest
    );
    // Node 1, back on its data directory, serves the retried push.
    let node1 = BerthProcess::start_in(d1.path(), &extra);
    let on1 = Client::over(http, &node1.url());
    assert_eq!(head(&on1).await.unwrap().status(), StatusCode::OK);
    assert_eq!(
        on1.pull_manifest("library/app", "v1").await.unwrap(),
        manifest
    );
}

/// A single node's data directory (filesystem and sled) moved into a bucket and a database
/// with `berth migrate-store --to CONFIG`: a node on the target serves every image
/// byte-identical to the same access key; the source still serves as before; a second run
/// into the target, which holds data now, is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_store_moves_a_single_node_into_a_bucket_and_a_database() {
    let registries = "[[registry]]\nname = \"library\"\n[[registry]]\nname = \"team\"\n";
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut single = BerthProcess::start_in(d1.path(), registries);
    let open = Client::new(&single.url(), None);
    let shared: Vec<u8> = (0..6u32 << 20).map(|i| (i % 239) as u8).collect();
    open.image("library/app", "v1", "one", &shared).await;
    open.image("library/app", "v2", "two", &shared).await;
    open.image("team/tool", "latest", "tool", &shared).await;
    let (ok, out, e) = common::process::run_berth(
        &[
            "--server",
            &single.url(),
            "user",
            "create",
            "root",
            "--admin",
            "--json",
        ],
        &[],
    );
    assert!(ok, "{out}{e}");
    let created: serde_json::Value = serde_json::from_str(&out).unwrap();
    let key = (
        created["first_key"]["id"].as_str().unwrap().to_string(),
        created["first_key"]["secret"].as_str().unwrap().to_string(),
    );
    let before = Client::new(&single.url(), Some(key.clone())).served().await;
    assert_eq!(before.len(), 3);
    assert!(single.terminate(), "berth stops cleanly");

    let s3 = berth::testbed::S3Server::start().await;
    let url = berth::testbed::postgres().database().await;
    let shared_toml = format!("{}{}", s3.storage_toml("hub"), metadata(&url));
    let target = d2.path().join("target.toml");
    std::fs::write(
        &target,
        format!("data_dir = {:?}\n{shared_toml}", d2.path().join("data")),
    )
    .unwrap();
    let source = d1.path().join("data");
    let migrate = || {
        common::process::run_berth(
            &[
                "--data-dir",
                source.to_str().unwrap(),
                "migrate-store",
                "--to",
                target.to_str().unwrap(),
                "--json",
            ],
            &[],
        )
    };
    let (ok, out, e) = migrate();
    assert!(ok, "{out}{e}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["tags"], 3, "{report}");
    assert_eq!(report["registries"], 2, "{report}");
    assert_eq!(report["missing_blobs"], json!([]), "{report}");
    assert_eq!(report["dropped_artifacts"], json!([]), "{report}");

    let mut node = BerthProcess::start_in(d2.path(), &format!("{shared_toml}{registries}"));
    assert_eq!(
        Client::new(&node.url(), Some(key.clone())).served().await,
        before,
        "the target serves every image byte-identical to the same key"
    );
    assert_eq!(
        Client::new(&node.url(), None).get("/v2/").await.status(),
        StatusCode::UNAUTHORIZED,
        "the users came along: auth is on"
    );
    assert!(node.terminate());
    let (ok, _, e) = migrate();
    assert!(!ok && e.contains("holds registries"), "{e}");
    let single = BerthProcess::start_in(d1.path(), registries);
    assert_eq!(
        Client::new(&single.url(), Some(key)).served().await,
        before,
        "the source is as it was"
    );
}

/// An execution holds its scope's lease in the database while it runs: another node neither
/// starts the same scope nor, when it (re)starts, marks the execution interrupted; once the
/// node running it is gone (its lease no longer held), the next node that looks marks it
/// interrupted and starts the job again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_execution_of_a_node_that_stopped_is_taken_over_by_another() {
    use berth::jobs::executions::{Start, Status, Trigger};
    let mut ns = nodes(2, "").await;
    clean_library_every_minute(&ns[0]).await;
    let start = || Start {
        kind: "cleanup".into(),
        scope: "cleanup/library".into(),
        trigger: Trigger::Manual,
        dry_run: false,
        operator: "root".into(),
    };
    let run = ns[0].app().jobs.start(start()).await.unwrap();
    let id = run.execution().id.clone();
    let refused = ns[1].app().jobs.start(start()).await.err().unwrap();
    assert!(refused.to_string().contains(&id), "{refused}");
    // Node B restarts: node A's running execution is left alone, and nobody takes it over.
    ns[1].restart().await;
    assert!(berth::scheduler::take_over(&ns[1].app()).await.is_empty());
    let status_of = |s: &TestServer, id: String| {
        let app = s.app();
        async move {
            app.jobs
                .execution("cleanup/library", &id)
                .await
                .unwrap()
                .unwrap()
        }
    };
    assert_eq!(status_of(&ns[1], id.clone()).await.status, Status::Running);
    // Node A goes away under it (the run ends unfinished, its lease is no longer held).
    drop(run);
    ns.remove(0).server.take().unwrap().shutdown().await;
    // Node B's scheduler looks every tick; the test looks too, whoever comes first.
    within_a_notice("the execution of a node that stopped is taken over", || {
        let (app, id) = (ns[0].app(), id.clone());
        async move {
            berth::scheduler::take_over(&app).await;
            let e = app.jobs.execution("cleanup/library", &id).await.unwrap();
            e.unwrap().status == Status::Interrupted
        }
    })
    .await;
    let old = status_of(&ns[0], id.clone()).await;
    assert_eq!(old.status, Status::Interrupted);
    assert!(old.error.unwrap().contains("taken over"));
    // The mark comes first, the new run right after it (by whichever look marked it: the
    // scheduler's tick or the test's): wait for the run, then look once more, which must not
    // start a second one.
    within_a_notice("the execution is started again", || async {
        takeovers(&ns[0], &id).await.0 > 0
    })
    .await;
    berth::scheduler::take_over(&ns[0].app()).await;
    let (n, list) = takeovers(&ns[0], &id).await;
    assert_eq!(n, 1, "taken over once: {list}");
}

/// How many executions of the library's cleanup were started as the takeover of `id`, and
/// the list they were counted in.
async fn takeovers(node: &TestServer, id: &str) -> (usize, serde_json::Value) {
    let (status, list) = node
        .api(Method::GET, "/registries/library/cleanup/executions", None)
        .await;
    assert_eq!(status, StatusCode::OK, "{list}");
    let n = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["operator"] == format!("takeover of {id}"))
        .count();
    (n, list)
}

/// What a node keeps in memory of the shared records is read again every `[metadata] refresh`
/// even when no notice comes: a tag changed in the database behind every node's back (no
/// NOTIFY) is served by a node that had the old manifest in memory within that period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_no_node_was_told_of_is_served_after_the_refresh_period() {
    let url = berth::testbed::postgres().database().await;
    let node = TestServer::start(&format!("{}refresh = \"3s\"\n", metadata(&url))).await;
    let on = Client::over(reqwest::Client::new(), &node.base);
    let v1 = on.image("library/app", "v1", "one", b"base").await;
    let v2 = on.image("library/app", "v2", "two", b"base").await;
    let served = || async { on.pull_manifest("library/app", "v1").await.unwrap() };
    assert_eq!(served().await, v1, "in memory now");
    let (db, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let moved = db
        .execute(
            "UPDATE tags SET digest = $1 WHERE repo = 'library/app' AND tag = 'v1'",
            &[&common::server::sha256(&v2)],
        )
        .await
        .unwrap();
    assert_eq!(moved, 1);
    assert_eq!(
        served().await,
        v1,
        "no notice: the copy in memory still answers"
    );
    let started = Instant::now();
    while served().await != v2 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "not read again within the refresh period"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `berth migrate` brings a fresh database to the schema this berth knows and says so; again,
/// it changes nothing; on sled it has nothing to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn berth_migrate_brings_the_database_schema_up_to_date() {
    let url = berth::testbed::postgres().database().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\n{}",
            dir.path().join("data"),
            metadata(&url)
        ),
    )
    .unwrap();
    for _ in 0..2 {
        let (ok, out, e) = common::process::run_berth(
            &["--config", config.to_str().unwrap(), "migrate", "--json"],
            &[],
        );
        assert!(ok, "{out}{e}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["backend"], "postgres");
        assert!(v["version"].as_i64().unwrap() >= 3, "{v}");
        assert_eq!(v["version"], v["newest_known"], "{v}");
    }
    let (ok, out, e) = common::process::run_berth(
        &[
            "--data-dir",
            dir.path().join("sled").to_str().unwrap(),
            "migrate",
        ],
        &[],
    );
    assert!(ok && out.contains("nothing to migrate"), "{out}{e}");
}
