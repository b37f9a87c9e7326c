//! `berth backup DIR` and `berth restore DIR` end to end: a backup taken while the server runs,
//! the data directory wiped, restored, and every image pulled byte-identical with the same
//! access key; a backup taken while images are pushed and deleted restores only images that
//! pull completely; a second backup fetches only what is new; damaged and cut-short backups.

mod common;

use std::path::Path;

use common::process::BerthProcess;
use common::registry::Client;
use common::server::{sha256, OCI_INDEX, OCI_MANIFEST};
use reqwest::StatusCode;
use serde_json::{json, Value};

const REGISTRIES: &str = "[[registry]]\nname = \"library\"\n[[registry]]\nname = \"team\"\n";

/// `berth ARGS` (never the caller's own key variables): (success, stdout, stderr).
fn berth(args: &[&str]) -> (bool, String, String) {
    common::process::run_berth(args, &[])
}

/// The first admin through the running server; its (id, secret).
fn bootstrap_admin(url: &str) -> (String, String) {
    let (ok, out, e) = berth(&[
        "--server", url, "user", "create", "root", "--admin", "--json",
    ]);
    assert!(ok, "{out}{e}");
    let v: Value = serde_json::from_str(&out).unwrap();
    let key = &v["first_key"];
    (
        key["id"].as_str().unwrap().to_string(),
        key["secret"].as_str().unwrap().to_string(),
    )
}

fn with_key<'a>(url: &'a str, key: &'a (String, String), args: &[&'a str]) -> Vec<&'a str> {
    let mut all = vec![
        "--server",
        url,
        "--access-key",
        key.0.as_str(),
        "--secret-key",
        key.1.as_str(),
    ];
    all.extend_from_slice(args);
    all
}

fn json_of(out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// Stops the server, wipes its data directory and restores `backup` into it; the restore's
/// JSON report.
fn wipe_and_restore(server: &mut BerthProcess, backup: &Path) -> Value {
    assert!(server.terminate(), "berth stops cleanly");
    let data = server.dir.join("data");
    std::fs::remove_dir_all(&data).unwrap();
    let (ok, out, e) = berth(&[
        "--data-dir",
        data.to_str().unwrap(),
        "restore",
        backup.to_str().unwrap(),
        "--json",
    ]);
    assert!(ok, "{out}{e}");
    json_of(&out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_wipe_restore_and_every_image_pulls_byte_identical() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = BerthProcess::start_in(dir.path(), REGISTRIES);
    let url = server.url();
    let open = Client::new(&url, None);
    let shared = b"a base layer shared by every image".to_vec();
    let v1 = open.image("library/app", "v1", "one", &shared).await;
    open.image("library/app", "v2", "two", &shared).await;
    open.image("team/tool", "latest", "tool", &shared).await;
    // A multi-arch index over two images pushed by digest.
    let amd = open.image("library/multi", "amd64", "amd", &shared).await;
    let arm = open.image("library/multi", "arm64", "arm", &shared).await;
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": sha256(&amd), "size": amd.len(), "platform": {"architecture": "amd64", "os": "linux"}},
            {"mediaType": OCI_MANIFEST, "digest": sha256(&arm), "size": arm.len(), "platform": {"architecture": "arm64", "os": "linux"}},
        ],
    }))
    .unwrap();
    open.manifest("library/multi", "multi", OCI_INDEX, &index)
        .await;
    // A signature-like referrer of v1, untagged.
    let empty = open.blob("library/app", b"{}").await;
    let referrer = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.dev.cosign.artifact.sig.v1+json",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2},
        "layers": [{"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2}],
        "subject": {"mediaType": OCI_MANIFEST, "digest": sha256(&v1), "size": v1.len()},
    }))
    .unwrap();
    let referrer_digest = sha256(&referrer);
    open.manifest("library/app", &referrer_digest, OCI_MANIFEST, &referrer)
        .await;

    // Auth turns on with the first admin; the backup is taken with its key, online.
    let key = bootstrap_admin(&url);
    let client = Client::new(&url, Some(key.clone()));
    // A backup carries every secret: only an admin reads it.
    let (ok, _, e) = berth(&with_key(
        &url,
        &key,
        &["user", "create", "ro", "--role", "viewer"],
    ));
    assert!(ok, "{e}");
    let (ok, out, e) = berth(&with_key(&url, &key, &["key", "create", "ro", "--json"]));
    assert!(ok, "{e}");
    let ro = json_of(&out);
    let viewer = Client::new(
        &url,
        Some((
            ro["id"].as_str().unwrap().into(),
            ro["secret"].as_str().unwrap().into(),
        )),
    );
    let blob = sha256(&shared);
    for path in [
        "/api/v1/backup".to_string(),
        format!("/api/v1/backup/blobs/{blob}"),
    ] {
        assert_eq!(
            viewer.get(&path).await.status(),
            StatusCode::FORBIDDEN,
            "{path}"
        );
        assert_eq!(
            Client::new(&url, None).get(&path).await.status(),
            StatusCode::UNAUTHORIZED
        );
    }
    let before = client.served().await;
    assert_eq!(
        before.len(),
        6,
        "{:?}",
        before.iter().map(|(r, t, _)| (r, t)).collect::<Vec<_>>()
    );
    let catalog = client.list("/v2/_catalog", "repositories").await;
    let backup = dir.path().join("backup");
    let (ok, out, e) = berth(&with_key(
        &url,
        &key,
        &["backup", backup.to_str().unwrap(), "--json"],
    ));
    assert!(ok, "{out}{e}");
    let report = json_of(&out);
    assert_eq!(report["registries"], 2);
    assert_eq!(
        report["records"], 5,
        "two users, two keys, the token signing key: {report}"
    );
    assert_eq!(report["tags"], 6);
    assert_eq!(report["artifacts"], 7, "{report}");
    assert_eq!(report["repositories"], 3);
    assert_eq!(report["missing"], json!([]));
    assert_eq!(report["fetched"], report["blobs"]);
    // A backup holds secrets (image cache credentials, key hashes): its owner's only.
    let mode = |p: &Path| {
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(p).unwrap().permissions())
            & 0o777
    };
    assert_eq!(mode(&backup), 0o700);
    assert_eq!(mode(&backup.join("berth-backup.jsonl")), 0o600);

    // A second run fetches nothing it has.
    let (ok, out, e) = berth(&with_key(
        &url,
        &key,
        &["backup", backup.to_str().unwrap(), "--json"],
    ));
    assert!(ok, "{out}{e}");
    let again = json_of(&out);
    assert_eq!(again["fetched"], 0, "{again}");
    assert_eq!(again["kept"], report["blobs"]);

    let restored = wipe_and_restore(&mut server, &backup);
    assert_eq!(restored["tags"], 6, "{restored}");
    assert_eq!(restored["artifacts"], 7);
    assert_eq!(restored["dropped_tags"], json!([]));
    assert_eq!(restored["dropped_artifacts"], json!([]));
    let server = BerthProcess::start_in(dir.path(), REGISTRIES);
    // The same key works (users and keys came back); anonymous callers are still refused.
    let client = Client::new(&server.url(), Some(key.clone()));
    let anonymous = Client::new(&server.url(), None);
    assert_eq!(
        anonymous.get("/v2/library/app/tags/list").await.status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        client.served().await,
        before,
        "every tag pulls byte-identical"
    );
    assert_eq!(client.list("/v2/_catalog", "repositories").await, catalog);
    let referrers: Value = client
        .get(&format!("/v2/library/app/referrers/{}", sha256(&v1)))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        referrers["manifests"][0]["digest"], referrer_digest,
        "the referrers index came back: {referrers}"
    );
    assert!(client
        .pull_manifest("library/app", &referrer_digest)
        .await
        .is_some());
}

/// Images pushed and deleted while the backup runs (one line per page, so the walk interleaves
/// with the writes): whatever the backup caught, every tag the restore brings back pulls
/// completely, and the images no writer touched are all there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_racing_pushes_and_deletes_restores_only_whole_images() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = BerthProcess::start_in(dir.path(), REGISTRIES);
    let url = server.url();
    let open = Client::new(&url, None);
    let shared = b"shared by the churn".to_vec();
    for i in 0..5 {
        open.image(
            "library/stable",
            &format!("s{i}"),
            &format!("stable{i}"),
            &shared,
        )
        .await;
    }
    for i in 0..20 {
        open.image(
            "library/churn",
            &format!("c{i}"),
            &format!("churn{i}"),
            &shared,
        )
        .await;
    }
    let key = bootstrap_admin(&url);
    let client = Client::new(&url, Some(key.clone()));
    let stable_before: Vec<_> = client
        .served()
        .await
        .into_iter()
        .filter(|(r, _, _)| r == "library/stable")
        .collect();

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let churn = {
        let (client, stop, shared) = (client.clone(), stop.clone(), shared.clone());
        tokio::spawn(async move {
            let mut i = 20;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let body = client
                    .image(
                        "library/churn",
                        &format!("c{i}"),
                        &format!("churn{i}"),
                        &shared,
                    )
                    .await;
                // Delete an older image by digest (its tags go with it).
                let old = client
                    .pull_manifest("library/churn", &format!("c{}", i - 20))
                    .await;
                if let Some(old) = old {
                    let r = client
                        .req(
                            reqwest::Method::DELETE,
                            &format!("/v2/library/churn/manifests/{}", sha256(&old)),
                        )
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), StatusCode::ACCEPTED);
                }
                drop(body);
                i += 1;
            }
            i - 20
        })
    };
    let backup = dir.path().join("backup");
    let args: Vec<String> = with_key(
        &url,
        &key,
        &[
            "backup",
            backup.to_str().unwrap(),
            "--page-lines",
            "1",
            "--json",
        ],
    )
    .into_iter()
    .map(String::from)
    .collect();
    let (ok, out, e) = tokio::task::spawn_blocking(move || {
        berth(&args.iter().map(String::as_str).collect::<Vec<_>>())
    })
    .await
    .unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let rounds = churn.await.unwrap();
    assert!(ok, "{out}{e}");
    assert!(
        rounds > 0,
        "the writer pushed and deleted while the backup ran"
    );

    let restored = wipe_and_restore(&mut server, &backup);
    let server = BerthProcess::start_in(dir.path(), REGISTRIES);
    let client = Client::new(&server.url(), Some(key));
    let after = client.served().await; // pulls every tag completely, or panics
    let stable_after: Vec<_> = after
        .iter()
        .filter(|(r, _, _)| r == "library/stable")
        .cloned()
        .collect();
    assert_eq!(stable_after, stable_before, "{restored}");
    assert!(
        after.iter().any(|(r, _, _)| r == "library/churn"),
        "some of the churn was caught: {restored}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_cut_short_and_misdirected_restores() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = BerthProcess::start_in(dir.path(), REGISTRIES);
    let url = server.url();
    let open = Client::new(&url, None);
    let shared = b"shared".to_vec();
    open.image("library/app", "v1", "one", &shared).await;
    let v2 = open.image("library/app", "v2", "two", &shared).await;
    let data = dir.path().join("data");

    // The data directory is locked by the running server: the offline backup says where to go.
    let backup = dir.path().join("backup");
    let (ok, _, e) = berth(&[
        "--data-dir",
        data.to_str().unwrap(),
        "backup",
        backup.to_str().unwrap(),
    ]);
    assert!(!ok && e.contains("--server"), "{e}");
    // Online, without credentials on an open server: fine (auth is off until the first user).
    let (ok, out, e) = berth(&["--server", &url, "backup", backup.to_str().unwrap()]);
    assert!(ok && out.contains(" 2 tags "), "{out}{e}");
    // A restore is never run against a server, nor into a data directory that holds data.
    let (ok, _, e) = berth(&["--server", &url, "restore", backup.to_str().unwrap()]);
    assert!(!ok && e.contains("stop the server"), "{e}");
    assert!(server.terminate());
    let (ok, _, e) = berth(&[
        "--data-dir",
        data.to_str().unwrap(),
        "restore",
        backup.to_str().unwrap(),
    ]);
    assert!(!ok && e.contains("holds berth data already"), "{e}");
    // The offline backup of the stopped data directory is the same copy.
    let offline = dir.path().join("offline");
    let (ok, out, e) = berth(&[
        "--data-dir",
        data.to_str().unwrap(),
        "backup",
        offline.to_str().unwrap(),
        "--json",
    ]);
    assert!(ok, "{out}{e}");
    assert_eq!(json_of(&out)["tags"], 2);

    // v2's own layer damaged in the backup: v2 is left out and named, v1 comes back whole.
    let m: Value = serde_json::from_slice(&v2).unwrap();
    let layer = m["layers"][1]["digest"].as_str().unwrap();
    let hex = layer.trim_start_matches("sha256:");
    let file = backup.join("blobs/sha256").join(&hex[..2]).join(hex);
    std::fs::write(&file, b"not the layer").unwrap();
    let fresh = dir.path().join("fresh");
    let (ok, out, e) = berth(&[
        "--data-dir",
        fresh.to_str().unwrap(),
        "restore",
        backup.to_str().unwrap(),
        "--json",
    ]);
    assert!(ok, "{out}{e}");
    let report = json_of(&out);
    assert_eq!(report["missing_blobs"], json!([layer]), "{report}");
    assert_eq!(
        report["dropped_tags"],
        json!(["library/app:v2"]),
        "{report}"
    );
    assert_eq!(report["tags"], 1);
    let restored_dir = tempfile::tempdir().unwrap();
    std::fs::rename(&fresh, restored_dir.path().join("data")).unwrap();
    let restored = BerthProcess::start_in(restored_dir.path(), REGISTRIES);
    let client = Client::new(&restored.url(), None);
    let tags = client.every_tag().await;
    assert_eq!(tags, vec![("library/app".to_string(), "v1".to_string())]);
    client.pull_all("library/app", "v1").await;
    drop(restored);

    // A lines file cut short (no end line) is refused, and nothing is restored.
    let lines = backup.join("berth-backup.jsonl");
    let text = std::fs::read_to_string(&lines).unwrap();
    let cut: Vec<&str> = text.lines().collect();
    std::fs::write(&lines, cut[..cut.len() - 1].join("\n")).unwrap();
    let other = dir.path().join("other");
    let (ok, _, e) = berth(&[
        "--data-dir",
        other.to_str().unwrap(),
        "restore",
        backup.to_str().unwrap(),
    ]);
    assert!(!ok && e.contains("incomplete"), "{e}");
    assert!(!other.join("meta").exists(), "nothing was written");
    let (ok, _, e) = berth(&[
        "--data-dir",
        other.to_str().unwrap(),
        "restore",
        dir.path().to_str().unwrap(),
    ]);
    assert!(!ok && e.contains("holds no backup"), "{e}");
}
