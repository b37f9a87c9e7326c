//! Online garbage collection (issue 12 item 5): a dry run names what a run deletes; a run
//! deletes the blobs no image links, and nothing a push or a cache fetch is writing; the GC
//! under fire: pushes that share layers with deleted images, pulls through a cache, and
//! collections with no grace time, round after round (`BERTH_GC_ROUNDS`, default 3;
//! `scripts/soak-gc.sh` runs many).

mod common;

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use common::registry::Client;
use common::server::{cache_toml, sha256, TestServer};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

/// Runs a collection (or a dry run) to its end; the ended execution and its history rows.
async fn collect(s: &TestServer, dry_run: bool) -> (Value, Vec<Value>) {
    let (status, started) = loop {
        let (status, body) = s
            .api(
                Method::POST,
                "/gc/executions",
                Some(json!({"dry_run": dry_run})),
            )
            .await;
        // One collection at a time: wait for a scheduled one to end.
        if status != StatusCode::CONFLICT {
            break (status, body);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status, StatusCode::ACCEPTED, "{started}");
    let path = format!("/gc/executions/{}", started["id"].as_str().unwrap());
    let ended = loop {
        let (_, e) = s.api(Method::GET, &path, None).await;
        if e["status"] != "running" {
            break e;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut rows = Vec::new();
    let mut cursor = String::new();
    loop {
        let (_, page) = s
            .api(
                Method::GET,
                &format!("{path}/history?limit=1000{cursor}"),
                None,
            )
            .await;
        rows.extend(page["items"].as_array().unwrap().iter().cloned());
        match page["next"].as_str() {
            Some(n) => cursor = format!("&cursor={n}"),
            None => break,
        }
    }
    (ended, rows)
}

/// Digests of the blob files the node holds.
async fn stored(s: &TestServer) -> BTreeSet<String> {
    let blobs = &s.server.as_ref().unwrap().app().store.blobs;
    let mut out = BTreeSet::new();
    let mut after = None;
    loop {
        let page = blobs.list(after.as_ref(), 1000).await.unwrap();
        let Some((last, _)) = page.last() else {
            return out;
        };
        after = Some(last.clone());
        out.extend(page.into_iter().map(|(d, _)| d.to_string()));
    }
}

/// Every digest a stored manifest is or refers to (blobs and index children).
async fn referenced_by_manifests(s: &TestServer) -> BTreeSet<String> {
    let app = s.server.as_ref().unwrap().app();
    let meta = &app.store.meta;
    let mut out = BTreeSet::new();
    for registry in meta.registries().await.unwrap() {
        for repo in meta
            .repositories(Some(&registry.name), None, usize::MAX)
            .await
            .unwrap()
        {
            for (digest, _) in meta.artifacts(&repo, None, usize::MAX).await.unwrap() {
                let bytes = app
                    .store
                    .blobs
                    .read_small(&digest, 1 << 20)
                    .await
                    .unwrap()
                    .unwrap();
                let parsed = berth::oci::manifest::parse(&bytes, None).unwrap();
                out.insert(digest.to_string());
                out.extend(parsed.blobs.iter().map(|d| d.to_string()));
                out.extend(parsed.children.iter().map(|c| c.digest.to_string()));
            }
        }
    }
    out
}

/// A dry run names exactly what the run then deletes: the blobs only a deleted image used;
/// what another image shares stays, and that image still pulls.
#[tokio::test]
async fn a_collection_deletes_what_no_image_links() {
    let s = TestServer::start("[pull_through]\ngc_grace = \"0s\"\n").await;
    let client = Client::over(s.client.clone(), &s.url(""));
    let gone = client
        .image("library/old", "v1", "old", b"shared base")
        .await;
    let kept = client
        .image("library/new", "v1", "new", b"shared base")
        .await;
    let (status, _) = s
        .api(Method::DELETE, "/registries/library/images/old", None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let expect: BTreeSet<String> = [
        sha256(&gone),
        sha256(b"{\"seed\":\"old\"}"),
        sha256(b"layer of old"),
    ]
    .into_iter()
    .collect();
    let names = |rows: &[Value], action: &str| -> BTreeSet<String> {
        rows.iter()
            .inspect(|r| assert_eq!(r["action"], action, "{r}"))
            .map(|r| r["artifact"].as_str().unwrap().to_string())
            .collect()
    };
    let (dry, rows) = collect(&s, true).await;
    assert_eq!(dry["status"], "succeeded", "{dry}");
    assert_eq!(names(&rows, "would_delete"), expect);
    assert!(
        stored(&s).await.is_superset(&expect),
        "a dry run deletes nothing"
    );
    let (real, rows) = collect(&s, false).await;
    assert_eq!(real["status"], "succeeded", "{real}");
    assert_eq!(names(&rows, "deleted"), expect);
    assert_eq!(real["counts"]["acted"], 3);
    assert!(stored(&s).await.is_disjoint(&expect));
    assert_eq!(client.pull_all("library/new", "v1").await, kept);
    // Nothing left to collect.
    let (again, rows) = collect(&s, false).await;
    assert_eq!(
        (again["counts"]["acted"].as_u64(), rows.len()),
        (Some(0), 0)
    );
    // The schedule: daily unless set.
    let (_, schedule) = s.api(Method::GET, "/gc", None).await;
    assert_eq!(schedule["schedule"]["type"], "daily", "{schedule}");
    let (status, set) = s
        .api(
            Method::PUT,
            "/gc",
            Some(json!({"schedule": {"type": "custom", "cron": "30 2 * * *"}})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        set["next_runs"][0]
            .as_str()
            .unwrap()
            .ends_with("T02:30:00Z"),
        "{set}"
    );
}

/// The GC under fire: while collections with no grace time run back to back, 8 clients push
/// images whose layers are those of images just deleted (and push deleted images again), and
/// 8 clients pull through a cache registry. Afterwards every acknowledged push pulls
/// completely (no "blob unknown"), and once the writers are done a last collection leaves no
/// blob that no manifest refers to.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gc_under_fire_loses_no_acknowledged_push() {
    let rounds: usize = std::env::var("BERTH_GC_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    let upstream = TestServer::start("").await;
    let up = Client::over(upstream.client.clone(), &upstream.url(""));
    for i in 0..8 {
        up.image(
            &format!("library/img{i}"),
            "v1",
            &format!("up{i}"),
            b"upstream base",
        )
        .await;
    }
    let edge = Arc::new(
        TestServer::start(&cache_toml(
            "registry",
            &upstream.base,
            "",
            "[pull_through]\ngc_grace = \"0s\"\n",
        ))
        .await,
    );
    let client = Client::over(edge.client.clone(), &edge.url(""));
    let shared = |k: usize| format!("shared layer {k}").into_bytes();
    let mut acknowledged: Vec<(String, Vec<u8>)> = Vec::new();
    for round in 0..rounds {
        // Images whose layers the pushers are about to push again, deleted while they do.
        for i in 0..8 {
            client
                .image(
                    &format!("library/old{i}"),
                    "v1",
                    &format!("old{i}"),
                    &shared(i % 4),
                )
                .await;
        }
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let collector = {
            let (edge, done) = (edge.clone(), done.clone());
            tokio::spawn(async move {
                for i in 0..8 {
                    let (status, _) = edge
                        .api(
                            Method::DELETE,
                            &format!("/registries/library/images/old{i}"),
                            None,
                        )
                        .await;
                    assert_eq!(status, StatusCode::OK);
                    collect(&edge, false).await;
                }
                while !done.load(std::sync::atomic::Ordering::Acquire) {
                    collect(&edge, false).await;
                }
            })
        };
        let mut writers = Vec::new();
        for i in 0..8 {
            let client = client.clone();
            let shared = shared(i % 4);
            writers.push(tokio::spawn(async move {
                let mut pushed = Vec::new();
                for k in 0..4 {
                    let repo = format!("library/new{i}-{round}-{k}");
                    let m = client
                        .image(&repo, "v1", &format!("new{i}-{round}-{k}"), &shared)
                        .await;
                    pushed.push((format!("{repo}:v1"), m));
                }
                // A deleted image pushed again: the same digests as blobs being collected.
                let repo = format!("library/again{i}-{round}");
                let m = client.image(&repo, "v1", &format!("old{i}"), &shared).await;
                pushed.push((format!("{repo}:v1"), m));
                pushed
            }));
        }
        let mut pullers = Vec::new();
        for i in 0..8 {
            let client = client.clone();
            pullers.push(tokio::spawn(async move {
                for _ in 0..3 {
                    client.pull_all(&format!("hub/library/img{i}"), "v1").await;
                }
            }));
        }
        for w in writers {
            acknowledged.extend(w.await.unwrap());
        }
        for p in pullers {
            p.await.unwrap();
        }
        done.store(true, std::sync::atomic::Ordering::Release);
        collector.await.unwrap();
        for (name, manifest) in &acknowledged {
            let (repo, tag) = name.rsplit_once(':').unwrap();
            assert_eq!(
                &client.pull_all(repo, tag).await,
                manifest,
                "round {round}: {name}"
            );
        }
    }
    let (ended, _) = collect(&edge, false).await;
    assert_eq!(ended["status"], "succeeded", "{ended}");
    let files = stored(&edge).await;
    let referenced = referenced_by_manifests(&edge).await;
    let unreferenced: Vec<&String> = files.difference(&referenced).collect();
    assert!(
        unreferenced.is_empty(),
        "blobs no manifest refers to: {unreferenced:?}"
    );
    let everything: HashSet<&String> = files.iter().collect();
    for (name, manifest) in &acknowledged {
        assert!(everything.contains(&sha256(manifest)), "{name}");
    }
}

/// Cache eviction (issue 12 item 6): a cache filled past its high watermark by pulls through a
/// loopback source falls to its low watermark; the most recently pulled images stay, served
/// with the source gone; a protected image stays however old; the disk space comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_brings_the_cache_down_to_its_low_watermark() {
    let upstream = TestServer::start("").await;
    let up = Client::over(upstream.client.clone(), &upstream.url(""));
    for i in 0..10 {
        let big = vec![i as u8; 100 * 1024];
        up.image(&format!("library/img{i}"), "v1", &format!("img{i}"), &big)
            .await;
    }
    // 10 images of ~100 KiB: a cap of 600 KiB, evicting above 90% down to 60% (three images).
    // The check runs here, not on its interval, so that it sees all ten.
    let edge = TestServer::start(&cache_toml(
        "registry",
        &upstream.base,
        "",
        "[pull_through]\ngc_grace = \"0s\"\ncache_max_size = 614400\nevict_high_percent = 90\nevict_low_percent = 60\nevict_interval = \"1h\"\n",
    ))
    .await;
    let (status, _) = edge
        .api(
            Method::POST,
            "/registries/hub/protection-policies",
            Some(json!({"images": "library/img0", "tags": "v1"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let client = Client::over(edge.client.clone(), &edge.url(""));
    let app = edge.server.as_ref().unwrap().app().clone();
    for i in 0..10 {
        client.pull_all(&format!("hub/library/img{i}"), "v1").await;
        // Pull times order the images.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (high, low) = (614400 / 100 * 90, 614400 / 100 * 60);
    let before = berth::cache::evict::cache_bytes(&app).await.unwrap();
    assert!(before > high, "{before} bytes cached, not above {high}");
    let started = berth::cache::evict::check(&app)
        .await
        .unwrap()
        .expect("an eviction starts");
    loop {
        let e = app
            .jobs
            .execution(berth::cache::evict::SCOPE, &started.id)
            .await
            .unwrap()
            .unwrap();
        if e.status != berth::jobs::executions::Status::Running {
            assert_eq!(
                e.status,
                berth::jobs::executions::Status::Succeeded,
                "{e:?}"
            );
            assert_eq!(e.counts.acted, 7, "img1 to img7 went: {e:?}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let held = berth::cache::evict::cache_bytes(&app).await.unwrap();
    assert!(
        held <= low,
        "the cache holds {held} bytes, above its low watermark {low}"
    );
    assert!(
        berth::cache::evict::check(&app).await.unwrap().is_none(),
        "below the high watermark now"
    );
    // The API lists the eviction and what it evicted.
    let list: serde_json::Value = edge
        .get("/api/v1/cache/eviction/executions")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list["items"][0]["id"], started.id.as_str(), "{list}");
    let history: serde_json::Value = edge
        .get(&format!(
            "/api/v1/cache/eviction/executions/{}/history",
            started.id
        ))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(history["items"].as_array().unwrap().len(), 7, "{history}");
    drop(upstream);
    // The newest and the protected are served from the edge alone; the others are gone.
    for i in [0, 8, 9] {
        client.pull_all(&format!("hub/library/img{i}"), "v1").await;
    }
    let meta = &app.store.meta;
    for i in 1..8 {
        let repo = format!("hub/library/img{i}");
        assert!(
            meta.artifacts(&repo, None, 10).await.unwrap().is_empty(),
            "{repo} was evicted"
        );
    }
    // Garbage collection after the eviction gives the disk back.
    let mut files = BTreeSet::new();
    for _ in 0..100 {
        files = stored(&edge).await;
        if files.is_subset(&referenced_by_manifests(&edge).await) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        files.is_subset(&referenced_by_manifests(&edge).await),
        "evicted blobs are collected"
    );
}
