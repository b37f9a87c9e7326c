//! Lifecycle benchmarks (issue 12), in one berth process on a temp dir:
//!
//! - a cleanup dry run and a real run over 100,000 artifacts in 1,000 images (a policy keeps
//!   the 10 most recently pushed of each: the real run deletes 90,000), against the targets of
//!   5 s and 30 s;
//! - manifest GET (by tag, one client on loopback) p99 while the real run goes, against its
//!   p99 measured just before (target: at most 2x);
//! - garbage collection of 10,000 unreferenced blobs, against 10 s.
//!
//! `cargo bench --bench lifecycle` (`IMAGES=` and `PER_IMAGE=` and `BLOBS=` change the sizes).
//! Under `cargo test` (no `--bench` argument) it runs small sizes as a smoke test.

use std::sync::Arc;
use std::time::{Duration, Instant};

use berth::config::Config;
use berth::jobs::executions::{Execution, Status, Trigger};
use berth::oci::digest::Digest;
use berth::policy::book::CleanupSpec;
use berth::policy::cleanup::{RuleKind, TagMode};
use berth::store::meta::{now_ms, ArtifactRecord, Refers};
use berth::App;
use bytes::Bytes;

fn size(name: &str, full: usize, smoke: usize, bench: bool) -> usize {
    if !bench {
        return smoke;
    }
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(full)
}

/// Waits for an execution to end; its record.
async fn ended(app: &App, scope: &str, id: &str) -> Execution {
    loop {
        let e = app.jobs.execution(scope, id).await.unwrap().unwrap();
        if e.status != Status::Running {
            assert_eq!(e.status, Status::Succeeded, "{e:?}");
            return e;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Fills `images` images of `per_image` tagged artifacts each, pushed one second apart.
async fn fill(app: &App, images: usize, per_image: usize) {
    let meta = &app.store.meta;
    let config = Bytes::from_static(b"{}");
    let config_digest = Digest::sha256(&config);
    app.store.blobs.put(&config_digest, config).await.unwrap();
    let start = now_ms() - (per_image as u64 + 1) * 1000;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..images {
        let meta = meta.clone();
        let blobs = app.store.blobs.clone();
        let config_digest = config_digest.clone();
        tasks.spawn(async move {
            let repo = format!("bench/img{i}");
            meta.link_blob(&repo, &config_digest, 2).await.unwrap();
            for j in 0..per_image {
                let body = serde_json::to_vec(&serde_json::json!({
                    "schemaVersion": 2,
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest.as_str(), "size": 2},
                    "layers": [],
                    "annotations": {"n": format!("{i}-{j}")},
                }))
                .unwrap();
                let digest = Digest::sha256(&body);
                let record = ArtifactRecord {
                    media_type: "application/vnd.oci.image.manifest.v1+json".into(),
                    size: body.len() as u64,
                    pushed_ms: start + j as u64 * 1000,
                    artifact_type: None,
                    subject: None,
                };
                blobs.put(&digest, Bytes::from(body)).await.unwrap();
                meta.put_artifact(&repo, &digest, &record, Some(&format!("t{j}")), None, &Refers::default())
                    .await
                    .unwrap()
                    .unwrap();
            }
        });
        if tasks.len() >= 8 {
            tasks.join_next().await.unwrap().unwrap();
        }
    }
    while let Some(t) = tasks.join_next().await {
        t.unwrap();
    }
    meta.flush().await.unwrap();
}

/// Manifest GETs of one tag, one after another, until `stop`; the latencies. At least one GET
/// is made: a run shorter than the task's start (the small sizes of `cargo test`) still has a
/// latency to report.
async fn get_loop(url: String, stop: Arc<std::sync::atomic::AtomicBool>) -> Vec<Duration> {
    let client = reqwest::Client::new();
    let mut out = Vec::new();
    while out.is_empty() || !stop.load(std::sync::atomic::Ordering::Acquire) {
        let t = Instant::now();
        let r = client
            .get(&url)
            .header("accept", "application/vnd.oci.image.manifest.v1+json")
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{}", r.status());
        r.bytes().await.unwrap();
        out.push(t.elapsed());
    }
    out
}

fn p99(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[(v.len() * 99 / 100).min(v.len() - 1)]
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let images = size("IMAGES", 1000, 10, bench);
    let per_image = size("PER_IMAGE", 100, 20, bench);
    let blobs = size("BLOBS", 10_000, 100, bench);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let dir = tempfile::tempdir().unwrap();
        let config = Config::from_toml(&format!(
            "data_dir = {:?}\nlog = \"warn\"\n[[listen]]\naddr = \"127.0.0.1:0\"\n[[registry]]\nname = \"bench\"\n[pull_through]\ngc_grace = \"0s\"\n",
            dir.path().join("data")
        ))
        .unwrap();
        let server = berth::Server::start(config).await.unwrap();
        let app = server.app().clone();
        let base = format!("http://{}", server.local_addrs()[0].0);
        let t = Instant::now();
        fill(&app, images, per_image).await;
        println!(
            "filled {} artifacts in {images} images in {:.1} s",
            images * per_image,
            t.elapsed().as_secs_f64()
        );
        app.policies
            .create_cleanup(
                "bench",
                CleanupSpec {
                    images: String::new(),
                    tags: String::new(),
                    tag_mode: TagMode::Matching,
                    rule: RuleKind::LatestPushed,
                    n: Some(10),
                    enabled: true,
                },
            )
            .await
            .unwrap();
        let scope = berth::policy::run::scope("bench");
        let mut rows = Vec::new();
        for dry_run in [true, false] {
            let url = format!("{base}/v2/bench/img0/manifests/t{}", per_image - 1);
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let quiet = tokio::spawn(get_loop(url.clone(), stop.clone()));
            tokio::time::sleep(Duration::from_millis(if bench { 2000 } else { 100 })).await;
            stop.store(true, std::sync::atomic::Ordering::Release);
            let before = p99(quiet.await.unwrap());
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let during = tokio::spawn(get_loop(url, stop.clone()));
            let t = Instant::now();
            let e = berth::policy::run::start(&app, "bench", Trigger::Manual, dry_run, "bench")
                .await
                .unwrap();
            let e = ended(&app, &scope, &e.id).await;
            let took = t.elapsed();
            stop.store(true, std::sync::atomic::Ordering::Release);
            let while_running = p99(during.await.unwrap());
            assert_eq!(e.counts.acted as usize, images * per_image.saturating_sub(10));
            rows.push((
                if dry_run { "cleanup dry run" } else { "cleanup real run" },
                took,
                if dry_run { 5.0 } else { 30.0 },
                e.counts.acted,
                before,
                while_running,
            ));
        }
        // Garbage: first the manifests the real run deleted, then `blobs` blobs of 1 KiB.
        let collect = |app: Arc<App>| async move {
            let t = Instant::now();
            let e = app.gc().start(Trigger::Manual, false, "bench", Vec::new()).await.unwrap();
            let e = ended(&app, berth::jobs::gc::SCOPE, &e.id).await;
            (t.elapsed(), e.counts.acted)
        };
        let (manifests_gc, manifests_gone) = collect(app.clone()).await;
        for i in 0..blobs {
            let bytes = Bytes::from(format!("{i:01024}"));
            app.store.blobs.put(&Digest::sha256(&bytes), bytes).await.unwrap();
        }
        let (gc, gone) = collect(app.clone()).await;
        println!();
        println!("| row | items | time | target | share of target | manifest GET p99 before / during | ratio (target <= 2x) |");
        println!("| --- | --- | --- | --- | --- | --- | --- |");
        for (name, took, target, acted, before, during) in rows {
            println!(
                "| {name} ({} artifacts) | {acted} deleted | {:.2} s | {target} s | {:.2} | {:.2} ms / {:.2} ms | {:.2}x |",
                images * per_image,
                took.as_secs_f64(),
                took.as_secs_f64() / target,
                before.as_secs_f64() * 1e3,
                during.as_secs_f64() * 1e3,
                during.as_secs_f64() / before.as_secs_f64()
            );
        }
        println!(
            "| garbage collection of the deleted manifests | {manifests_gone} deleted | {:.2} s | | | | |",
            manifests_gc.as_secs_f64(),
        );
        println!(
            "| garbage collection ({blobs} unreferenced blobs of 1 KiB) | {gone} deleted | {:.2} s | 10 s | {:.2} | | |",
            gc.as_secs_f64(),
            gc.as_secs_f64() / 10.0
        );
        assert_eq!(gone as usize, blobs);
        server.shutdown().await;
    });
}
