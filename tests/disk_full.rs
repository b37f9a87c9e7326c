//! A real full disk (issue 9, item 10): the data directory on an 32 MiB tmpfs, filled up by a
//! file next to it. Pushes that hit ENOSPC answer 507 naming the cause, leave no temp file, keep
//! a chunked session at its last good offset; the server goes on serving; `/readyz` and
//! `berth_storage_free_bytes` tell the free space. Its own test binary, so the process-wide
//! metrics recorder holds only this test's values. Needs root for the mount (CI runs as root);
//! skipped with a printed reason otherwise.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::metrics::metric_sample;
use common::server::{config_for, error_of, header, sha256};
use reqwest::{Client, StatusCode};

struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
}

fn free(dir: &Path) -> u64 {
    let st = rustix::fs::statvfs(dir).unwrap();
    st.f_bavail * st.f_frsize
}

fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(29).wrapping_add(seed))
        .collect()
}

#[tokio::test]
async fn a_full_disk_answers_507_leaks_nothing_and_the_session_resumes() {
    if !is_root() {
        eprintln!("skipped: mounting a tmpfs needs root (CI runs as root)");
        return;
    }
    let mnt = tempfile::tempdir().unwrap();
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=32m", "tmpfs"])
        .arg(mnt.path())
        .status()
        .unwrap();
    assert!(status.success(), "mount tmpfs");
    let _mounted = Mounted(mnt.path().to_path_buf());
    let config = config_for(
        mnt.path(),
        "[[registry]]\nname = \"library\"\n[limits]\nmin_free_bytes = 4194304\n",
    );
    let data_dir = config.data_dir.clone();
    let server = berth::Server::start(config).await.unwrap();
    let base = format!("http://{}", server.local_addrs()[0].0);
    let client = Client::new();
    let url = |p: &str| format!("{base}{p}");

    assert_eq!(
        client.get(url("/readyz")).send().await.unwrap().status(),
        StatusCode::OK
    );

    // A chunked upload with its first MiB in.
    let blob = data(3 << 20, 1);
    let r = client
        .post(url("/v2/library/a/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    let loc = header(&r, "location");
    let r = client
        .patch(url(&loc))
        .header("content-range", format!("0-{}", (1 << 20) - 1))
        .body(blob[..1 << 20].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);

    // Fill the volume, leaving 512 KiB.
    let filler = mnt.path().join("filler");
    let fill = free(mnt.path()) - (512 << 10);
    std::fs::write(&filler, vec![0u8; fill as usize]).unwrap();

    // Not ready below the floor, with the reason; the gauge shows the free bytes.
    let r = client.get(url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    let why = r.text().await.unwrap();
    assert!(why.contains("below limits.min_free_bytes"), "{why}");
    let text = client
        .get(url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let gauge = metric_sample(&text, "berth_storage_free_bytes", &[]).expect("gauge exported");
    assert!(gauge < (4 << 20) as f64, "free bytes gauge {gauge}");

    // A monolithic push that does not fit: 507, the cause named, no temp file left.
    let big = data(2 << 20, 2);
    let r = client
        .post(url(&format!(
            "/v2/library/a/blobs/uploads/?digest={}",
            sha256(&big)
        )))
        .body(big.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::INSUFFICIENT_STORAGE);
    let (code, message) = error_of(r).await;
    assert_eq!(code, "UNKNOWN");
    assert!(message.contains("no space left on device"), "{message}");
    assert!(
        message.contains(&data_dir.display().to_string()),
        "{message}"
    );
    assert_eq!(
        std::fs::read_dir(data_dir.join("tmp")).unwrap().count(),
        0,
        "temp file left"
    );

    // A chunk that does not fit: 507, the session stays at its last good offset.
    let r = client
        .patch(url(&loc))
        .header("content-range", format!("{}-{}", 1 << 20, blob.len() - 1))
        .body(blob[1 << 20..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::INSUFFICIENT_STORAGE);
    assert!(error_of(r).await.1.contains("no space left on device"));
    let r = client.get(url(&loc)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(header(&r, "range"), format!("0-{}", (1 << 20) - 1));

    // The server goes on serving.
    assert_eq!(
        client.get(url("/healthz")).send().await.unwrap().status(),
        StatusCode::OK
    );
    assert_eq!(
        client.get(url("/v2/")).send().await.unwrap().status(),
        StatusCode::OK
    );

    // Space is back: ready again, the session resumes from its offset and verifies.
    std::fs::remove_file(&filler).unwrap();
    assert_eq!(
        client.get(url("/readyz")).send().await.unwrap().status(),
        StatusCode::OK
    );
    let r = client
        .patch(url(&loc))
        .header("content-range", format!("{}-{}", 1 << 20, blob.len() - 1))
        .body(blob[1 << 20..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let r = client
        .put(url(&format!("{loc}?digest={}", sha256(&blob))))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let got = client
        .get(url(&format!("/v2/library/a/blobs/{}", sha256(&blob))))
        .send()
        .await
        .unwrap();
    assert_eq!(got.bytes().await.unwrap(), blob[..]);
    let r = client
        .post(url(&format!(
            "/v2/library/a/blobs/uploads/?digest={}",
            sha256(&big)
        )))
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    server.shutdown().await;
}

/// `/readyz` says not ready while the blob store takes no writes (here its temp directory is
/// covered by a read-only tmpfs, which refuses root too), and ready again once it does.
#[tokio::test]
async fn readyz_is_not_ready_while_the_blob_store_takes_no_writes() {
    if !is_root() {
        eprintln!("skipped: mounting a tmpfs needs root (CI runs as root)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = berth::Server::start(config_for(dir.path(), "[limits]\nmin_free_bytes = 0\n"))
        .await
        .unwrap();
    let ready = format!("http://{}/readyz", server.local_addrs()[0].0);
    let client = Client::new();
    let readyz = || async { client.get(&ready).send().await.unwrap() };
    assert_eq!(readyz().await.status(), StatusCode::OK);
    let tmp = dir.path().join("data").join("tmp");
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "ro,size=1m", "tmpfs"])
        .arg(&tmp)
        .status()
        .unwrap();
    assert!(
        status.success(),
        "mount a read-only tmpfs on {}",
        tmp.display()
    );
    let mounted = Mounted(tmp.clone());
    let r = readyz().await;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    let why = r.text().await.unwrap();
    assert!(why.contains("takes no writes"), "{why}");
    drop(mounted);
    assert_eq!(readyz().await.status(), StatusCode::OK);
    server.shutdown().await;
}
