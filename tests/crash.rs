//! Crash safety and shutdown of the real binary: SIGKILL in the middle of pushes, then restart;
//! SIGTERM while a download is in flight.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::process::BerthProcess;
use common::server::{header, image_manifest, sha256, OCI_MANIFEST};
use reqwest::{Client, StatusCode};

fn blob(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Chunked push of a blob and a manifest for it; returns the digests once the server said 201.
async fn push(client: &Client, base: &str, repo: &str, seed: u64) -> Option<(String, String)> {
    let data = blob(seed, 3 * 1024 * 1024 + (seed as usize % 1000));
    let d = sha256(&data);
    let r = client
        .post(format!("{base}/v2/{repo}/blobs/uploads/"))
        .send()
        .await
        .ok()?;
    let loc = header(&r, "location");
    let mut offset = 0;
    for chunk in data.chunks(512 * 1024) {
        let r = client
            .patch(format!("{base}{loc}"))
            .header(
                "content-range",
                format!("{offset}-{}", offset + chunk.len() - 1),
            )
            .body(chunk.to_vec())
            .send()
            .await
            .ok()?;
        if r.status() != StatusCode::ACCEPTED {
            return None;
        }
        offset += chunk.len();
    }
    let r = client
        .put(format!("{base}{loc}?digest={d}"))
        .send()
        .await
        .ok()?;
    if r.status() != StatusCode::CREATED {
        return None;
    }
    let m = image_manifest(&d, data.len() as u64, &d, data.len() as u64);
    let r = client
        .put(format!("{base}/v2/{repo}/manifests/s{seed}"))
        .header("content-type", OCI_MANIFEST)
        .body(m.clone())
        .send()
        .await
        .ok()?;
    (r.status() == StatusCode::CREATED).then(|| (d, sha256(&m)))
}

/// Every file in the blob store hashes to its name.
fn assert_store_consistent(data_dir: &std::path::Path) {
    let root = data_dir.join("blobs/sha256");
    let Ok(prefixes) = std::fs::read_dir(&root) else {
        return;
    };
    for p in prefixes {
        for f in std::fs::read_dir(p.unwrap().path()).unwrap() {
            let f = f.unwrap();
            let bytes = std::fs::read(f.path()).unwrap();
            assert_eq!(
                sha256(&bytes),
                format!("sha256:{}", f.file_name().to_string_lossy()),
                "a committed blob does not match its digest"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_pushes_loses_nothing_acknowledged_and_serves_nothing_partial() {
    let dir = tempfile::tempdir().unwrap();
    let registries = "[[registry]]\nname = \"library\"\n";
    let client = Client::new();
    let done: Arc<Mutex<Vec<(String, String, u64)>>> = Arc::default();
    let mut seed = 0u64;
    let mut interrupted = Vec::new();

    for round in 0..3 {
        let mut berth = BerthProcess::start_in(dir.path(), registries);
        let base = berth.url();
        // An upload that will be interrupted on purpose: first chunk only.
        let first = blob(1000 + round, 256 * 1024);
        let r = client
            .post(format!("{base}/v2/library/resume/blobs/uploads/"))
            .send()
            .await
            .unwrap();
        let loc = header(&r, "location");
        let r = client
            .patch(format!("{base}{loc}"))
            .header("content-range", format!("0-{}", first.len() - 1))
            .body(first)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::ACCEPTED);
        interrupted.push((loc, 1000 + round));
        // Pushers running until the kill.
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let (client, base, done) = (client.clone(), base.clone(), done.clone());
            let start = seed;
            seed += 1000;
            tasks.push(tokio::spawn(async move {
                for s in start.. {
                    match push(&client, &base, "library/app", s).await {
                        Some((b, m)) => done.lock().unwrap().push((b, m, s)),
                        None => return,
                    }
                }
            }));
        }
        let before = done.lock().unwrap().len();
        let deadline = Instant::now() + Duration::from_secs(30);
        while done.lock().unwrap().len() < before + 3 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        berth.kill();
        for t in tasks {
            let _ = t.await;
        }
    }
    assert!(
        done.lock().unwrap().len() >= 9,
        "pushes completed before the kills"
    );

    let berth = BerthProcess::start_in(dir.path(), registries);
    let base = berth.url();
    assert_store_consistent(&dir.path().join("data"));
    // Every acknowledged push is there, byte-exact.
    let acknowledged = done.lock().unwrap().clone();
    for (blob_digest, manifest_digest, s) in acknowledged.iter() {
        let r = client
            .get(format!("{base}/v2/library/app/blobs/{blob_digest}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(sha256(&r.bytes().await.unwrap()), *blob_digest);
        let r = client
            .get(format!("{base}/v2/library/app/manifests/s{s}"))
            .send()
            .await
            .unwrap();
        assert_eq!(header(&r, "docker-content-digest"), *manifest_digest);
    }
    // Each interrupted chunked upload resumes where the server says it stands.
    for (loc, s) in interrupted {
        let r = client.get(format!("{base}{loc}")).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::NO_CONTENT);
        let range = header(&r, "range");
        let have: usize = range.split('-').nth(1).unwrap().parse::<usize>().unwrap() + 1;
        assert_eq!(have, 256 * 1024);
        let mut first = blob(s, 256 * 1024);
        let rest = blob(s + 7, 256 * 1024);
        let r = client
            .patch(format!("{base}{loc}"))
            .header("content-range", format!("{have}-{}", have + rest.len() - 1))
            .body(rest.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::ACCEPTED);
        first.extend_from_slice(&rest);
        let r = client
            .put(format!("{base}{loc}?digest={}", sha256(&first)))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED, "resumed upload commits");
        let got = client
            .get(format!("{base}/v2/library/resume/blobs/{}", sha256(&first)))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert_eq!(sha256(&got), sha256(&first));
    }
    // Nothing left in tmp from the interrupted monolithic writes.
    assert_eq!(
        std::fs::read_dir(dir.path().join("data/tmp"))
            .unwrap()
            .count(),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_an_inflight_download_finish() {
    let dir = tempfile::tempdir().unwrap();
    let mut berth = BerthProcess::start_in(dir.path(), "[[registry]]\nname = \"library\"\n");
    let base = berth.url();
    let client = Client::new();
    let data = blob(42, 32 * 1024 * 1024);
    let d = sha256(&data);
    let r = client
        .post(format!("{base}/v2/library/big/blobs/uploads/?digest={d}"))
        .body(data)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let mut r = client
        .get(format!("{base}/v2/library/big/blobs/{d}"))
        .send()
        .await
        .unwrap();
    let mut hasher = Vec::with_capacity(32 * 1024 * 1024);
    let first = r.chunk().await.unwrap().unwrap();
    hasher.extend_from_slice(&first);
    // Stop the server while the client still has ~32 MiB to read.
    berth.signal_term();
    // Shutdown has started once a new request gets no answer: poll for that with a deadline
    // (the download above is still in flight meanwhile).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let probe = Client::new()
            .get(format!("{base}/v2/"))
            .timeout(Duration::from_secs(1))
            .send()
            .await;
        if probe.is_err() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "new requests still served 10 s after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // No new connections once shutdown started.
    let fresh = Client::new()
        .get(format!("{base}/v2/"))
        .timeout(Duration::from_secs(2))
        .send()
        .await;
    assert!(
        fresh.is_err(),
        "a new connection was accepted after SIGTERM"
    );
    while let Some(c) = r.chunk().await.unwrap() {
        hasher.extend_from_slice(&c);
    }
    assert_eq!(
        sha256(&hasher),
        d,
        "the in-flight download completed intact"
    );
    assert!(
        berth.wait_exit(Duration::from_secs(10)),
        "berth exited cleanly after SIGTERM"
    );
}
