//! The `berth` CLI end to end: registries and image caches on the data directory, prefetch and
//! stats against a running server, prune after it stops.

mod common;

use std::process::Command;

use common::process::BerthProcess;
use common::server::{header, image_manifest, sha256, OCI_MANIFEST};
use reqwest::StatusCode;

fn berth(data: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_berth"))
        .arg("--data-dir")
        .arg(data)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_cache_lifecycle_prefetch_stats_and_prune() {
    // A source with one image.
    let up_dir = tempfile::tempdir().unwrap();
    let upstream = BerthProcess::start_in(up_dir.path(), "[[registry]]\nname = \"library\"\n");
    let client = reqwest::Client::new();
    let base = upstream.url();
    let layer = vec![7u8; 300_000];
    let mut digests = Vec::new();
    for data in [b"{}".to_vec(), layer.clone()] {
        let d = sha256(&data);
        let r = client
            .post(format!("{base}/v2/library/app/blobs/uploads/?digest={d}"))
            .body(data.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
        digests.push((d, data.len() as u64));
    }
    let manifest = image_manifest(&digests[0].0, digests[0].1, &digests[1].0, digests[1].1);
    let r = client
        .put(format!("{base}/v2/library/app/manifests/v1"))
        .header("content-type", OCI_MANIFEST)
        .body(manifest.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);

    // Define the source and a cache registry with the CLI.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (ok, _, e) = berth(&data, &["registry", "create", "hub", "--type", "cache"]);
    assert!(!ok && e.contains("--cache"), "{e}");
    let mut create = Command::new(env!("CARGO_BIN_EXE_berth"))
        .arg("--data-dir")
        .arg(&data)
        .args([
            "cache",
            "create",
            "up",
            "--kind",
            "registry",
            "--url",
            &base,
            "--username",
            "bot",
            "--password-stdin",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    create
        .stdin
        .take()
        .unwrap()
        .write_all(b"hunter2\n")
        .unwrap();
    assert!(create.wait().unwrap().success());
    let (ok, out, _) = berth(&data, &["cache", "list"]);
    assert!(
        ok && out.contains("up") && out.contains("user bot, password set"),
        "{out}"
    );
    assert!(!out.contains("hunter2"), "credentials are never printed");
    let (ok, _, e) = berth(
        &data,
        &[
            "registry", "create", "hub", "--type", "cache", "--cache", "up",
        ],
    );
    assert!(ok, "{e}");
    let (ok, _, e) = berth(&data, &["cache", "delete", "up"]);
    assert!(!ok && e.contains("registry hub"), "{e}");
    let (ok, out, _) = berth(&data, &["registry", "list", "--json"]);
    assert!(ok && out.contains("\"cache\": \"up\""), "{out}");

    // Serve, prefetch through it, then lose the source: the cache still serves.
    let mut edge = BerthProcess::start_in(dir.path(), "[pull_through]\ngc_grace = \"0s\"\n");
    let (ok, out, e) = berth(
        &data,
        &[
            "cache",
            "prefetch",
            "--server",
            &edge.url(),
            "--json",
            "hub/library/app:v1",
        ],
    );
    assert!(ok, "{e}");
    let report: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(report["blobs"], 2);
    assert_eq!(report["bytes"], 300_002);
    drop(upstream);
    let r = client
        .get(format!("{}/v2/hub/library/app/manifests/v1", edge.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(header(&r, "docker-content-digest"), sha256(&manifest));
    let r = client
        .get(format!(
            "{}/v2/hub/library/app/blobs/{}",
            edge.url(),
            digests[1].0
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap().len(), layer.len());
    let (ok, out, e) = berth(
        &data,
        &["cache", "stats", "--server", &edge.url(), "--json"],
    );
    assert!(ok, "{e}");
    let stats: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        stats["registries"]["hub"]["outcomes"]["stale"], 1,
        "{stats}"
    );
    assert!(stats["hit_ratio"].as_f64().unwrap() > 0.3, "{stats}");
    assert_eq!(stats["bytes_saved"], 300_000, "{stats}");
    assert!(edge.terminate());

    // Prune offline: nothing is old enough by default; everything when asked.
    let (ok, out, e) = berth(&data, &["cache", "prune", "--dry-run"]);
    assert!(ok && out.contains("would remove 0 artifacts"), "{out}{e}");
    let (ok, out, e) = berth(&data, &["cache", "prune", "--unpulled-for", "0s", "--json"]);
    assert!(ok, "{e}");
    let pruned: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(pruned["artifacts"].as_array().unwrap().len(), 1, "{pruned}");
    // berth serve's own config says gc_grace = 0s; the CLI here runs on defaults (1 h grace),
    // so the freshly written blobs stay.
    assert_eq!(pruned["blobs"].as_array().unwrap().len(), 0, "{pruned}");
}
