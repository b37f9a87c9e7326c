//! The `berth` CLI end to end: registries, image caches, users and keys on the data directory,
//! the same through a running server's API (`--server`), prefetch and stats, prune after a stop.

mod common;

use std::process::Command;

use common::process::{berth_bin, BerthProcess};
use common::server::{header, image_manifest, sha256, OCI_MANIFEST};
use reqwest::StatusCode;

/// `DIR/data` as `berth serve` made it (admin commands refuse a directory without berth data).
fn served_data_dir(dir: &std::path::Path) -> std::path::PathBuf {
    BerthProcess::start_in(dir, "").kill();
    dir.join("data")
}

fn berth(data: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    berth_env(data, args, &[])
}

/// `berth` with extra environment variables (credentials by env); never the caller's own
/// BERTH_ACCESS_KEY / BERTH_SECRET_KEY.
fn berth_env(
    data: &std::path::Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> (bool, String, String) {
    let data = data.to_str().expect("a UTF-8 temp path");
    let all: Vec<&str> = ["--data-dir", data]
        .into_iter()
        .chain(args.iter().copied())
        .collect();
    common::process::run_berth(&all, env)
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
    let data = served_data_dir(dir.path());
    let (ok, _, e) = berth(&data, &["registry", "create", "hub", "--type", "cache"]);
    assert!(!ok && e.contains("--cache"), "{e}");
    let mut create = Command::new(berth_bin())
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
    let (ok, out, e) = berth(&data, &["cache", "evictions", "--json"]);
    assert!(ok && out.trim() == "[]", "no eviction yet: {out}{e}");
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
    assert_eq!(report["digest"], sha256(&manifest).as_str());
    assert!(report["seconds"].is_number() && report.get("error").is_none());
    // Without a terminal: one line per reference (digest, bytes, seconds), each failure on
    // stderr with its reason; --json prints failures too. (Before, a progress bar with no
    // terminal printed nothing at all.)
    let prefetch = |extra: &[&str]| {
        let mut args = vec!["cache", "prefetch", "--server", edge.url().leak()];
        args.extend_from_slice(extra);
        args.extend(["hub/library/app:v1", "hub/library/nothing:v1"]);
        berth(&data, &args)
    };
    let (ok, out, e) = prefetch(&[]);
    assert!(!ok, "{out}{e}");
    let line = format!("hub/library/app:v1 {} 300002 bytes ", sha256(&manifest));
    assert!(out.starts_with(&line) && out.lines().count() == 1, "{out}");
    assert!(
        e.contains("hub/library/nothing:v1 failed") && e.contains("404"),
        "{e}"
    );
    let (ok, out, _) = prefetch(&["--json"]);
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(!ok && lines.len() == 2, "{out}");
    assert_eq!(lines[1]["reference"], "hub/library/nothing:v1");
    assert!(lines[1]["error"].as_str().unwrap().contains("404"), "{out}");
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
    // The layer GET above, plus the two prefetches after the first (both from the cache).
    assert_eq!(stats["bytes_saved"], 300_000 + 2 * 300_002, "{stats}");
    assert!(edge.terminate());

    // Prune offline: nothing is old enough by default; everything when asked. A dry run names
    // the tags it would remove.
    let (ok, out, e) = berth(&data, &["cache", "prune", "--dry-run"]);
    assert!(ok && out.contains("would remove 0 artifacts"), "{out}{e}");
    let (ok, out, e) = berth(
        &data,
        &["cache", "prune", "--dry-run", "--unpulled-for", "0s"],
    );
    assert!(
        ok && out.contains("would remove hub/library/app@") && out.contains("(tags v1;"),
        "{out}{e}"
    );
    let (ok, out, e) = berth(&data, &["cache", "prune", "--unpulled-for", "0s", "--json"]);
    assert!(ok, "{e}");
    let pruned: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(pruned["artifacts"].as_array().unwrap().len(), 1, "{pruned}");
    // berth serve's own config says gc_grace = 0s; the CLI here runs on defaults (1 h grace),
    // so the freshly written blobs stay, and the report says so.
    assert_eq!(pruned["blobs"].as_array().unwrap().len(), 0, "{pruned}");
    assert!(pruned["kept_for_grace"].as_u64().unwrap() >= 2, "{pruned}");
    let (ok, out, e) = berth(&data, &["cache", "prune", "--dry-run", "--grace", "1h"]);
    assert!(
        ok && out.contains("younger than the grace period"),
        "{out}{e}"
    );
    let (ok, out, e) = berth(&data, &["cache", "prune", "--grace", "0s", "--json"]);
    assert!(ok, "{e}");
    let pruned: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(pruned["blobs"].as_array().unwrap().len() >= 2, "{pruned}");
    assert_eq!(pruned["kept_for_grace"], 0, "{pruned}");
}

/// `--server` without a scheme, and a server that is not there, are named as such.
#[test]
fn server_errors_name_their_cause() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (ok, _, e) = berth(&data, &["--server", "127.0.0.1:5000", "registry", "list"]);
    assert!(
        !ok && e.contains("not an http:// or https:// URL") && e.contains("http://127.0.0.1:5000"),
        "{e}"
    );
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server = format!("http://127.0.0.1:{port}");
    let (ok, _, e) = berth(&data, &["--server", &server, "registry", "list"]);
    assert!(
        !ok && e.to_lowercase().contains("connection refused"),
        "{e}"
    );
}

/// The value after `label` on a line of `berth key create` output.
fn field(out: &str, label: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix(label))
        .unwrap_or_else(|| panic!("no {label:?} in {out}"))
        .trim()
        .to_string()
}

fn json_of(out: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_and_keys_on_the_data_dir_then_login() {
    let dir = tempfile::tempdir().unwrap();
    let data = served_data_dir(dir.path());
    // The first admin is created offline: there is no default password.
    let (ok, out, e) = berth(&data, &["user", "create", "root", "--admin"]);
    assert!(ok && out.contains("created user root (admin)"), "{out}{e}");
    let (ok, _, e) = berth(&data, &["user", "create", "root"]);
    assert!(!ok && e.contains("already exists"), "{e}");
    let (ok, _, e) = berth(
        &data,
        &[
            "user",
            "create",
            "ci",
            "--role",
            "image_uploader",
            "--registry",
            "library",
        ],
    );
    assert!(ok, "{e}");
    let (ok, _, e) = berth(&data, &["user", "create", "x", "--role", "wizard"]);
    assert!(!ok && e.contains("unknown role"), "{e}");
    let (ok, out, _) = berth(&data, &["user", "list", "--json"]);
    assert!(ok);
    let users = json_of(&out);
    assert_eq!(users[0]["name"], "ci");
    assert_eq!(users[0]["role"], "image_uploader");
    assert_eq!(users[0]["registries"], serde_json::json!(["library"]));
    assert_eq!(users[1]["role"], "admin");
    let (ok, out, _) = berth(&data, &["user", "list"]);
    assert!(
        ok && out.contains("(all)") && out.contains("image_uploader"),
        "{out}"
    );

    // A key: printed once, with the warning; listings never show the secret.
    let (ok, out, e) = berth(&data, &["key", "create", "root"]);
    assert!(ok, "{e}");
    assert!(e.contains("not shown again"), "{e}");
    let id = field(&out, "Access Key ID:");
    let secret = field(&out, "Secret Key:");
    assert_eq!(secret.len(), 40);
    let (ok, out, _) = berth(&data, &["key", "list", "root", "--json"]);
    assert!(ok && !out.contains(&secret));
    let keys = json_of(&out);
    assert_eq!(keys[0]["id"], id.as_str());
    assert_eq!(keys[0]["rotation_due"], false);
    let (ok, out, _) = berth(&data, &["key", "list", "root"]);
    assert!(ok && out.contains(&id) && out.contains("0d"), "{out}");
    let (ok, out, e) = berth(&data, &["key", "create", "ci", "--json"]);
    assert!(ok, "{e}");
    let ci_key = json_of(&out)["id"].as_str().unwrap().to_string();
    let (ok, _, e) = berth(&data, &["key", "revoke", "ci", &ci_key]);
    assert!(ok, "{e}");
    let (ok, _, e) = berth(&data, &["key", "revoke", "ci", &ci_key]);
    assert!(!ok && e.contains("no access key"), "{e}");
    let (ok, _, e) = berth(&data, &["user", "delete", "root"]);
    assert!(!ok && e.contains("last admin"), "{e}");
    let (ok, _, e) = berth(&data, &["user", "delete", "ci"]);
    assert!(ok, "{e}");

    // The server started on that directory requires the key, and accepts it.
    let server = BerthProcess::start_in(dir.path(), "");
    let client = reqwest::Client::new();
    let url = format!("{}/v2/", server.url());
    let r = client.get(&url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = client
        .get(&url)
        .basic_auth(&id, Some(&secret))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_commands_through_a_running_server() {
    let dir = tempfile::tempdir().unwrap();
    let data = served_data_dir(dir.path());
    assert!(berth(&data, &["user", "create", "root", "--admin"]).0);
    let (ok, out, e) = berth(&data, &["key", "create", "root", "--json"]);
    assert!(ok, "{e}");
    let key = json_of(&out);
    let (id, secret) = (key["id"].as_str().unwrap(), key["secret"].as_str().unwrap());
    let server = BerthProcess::start_in(dir.path(), "");
    let url = server.url();
    let remote = |args: &[&str]| {
        let mut all = vec![
            "--server",
            url.as_str(),
            "--access-key",
            id,
            "--secret-key",
            secret,
        ];
        all.extend_from_slice(args);
        berth(&data, &all)
    };

    // Without credentials the API refuses and the CLI says how to give them; env works.
    let (ok, _, e) = berth(&data, &["--server", &url, "user", "list"]);
    assert!(
        !ok && e.contains("401") && e.contains("--access-key"),
        "{e}"
    );
    let (ok, out, e) = berth_env(
        &data,
        &["--server", &url, "user", "list", "--json"],
        &[("BERTH_ACCESS_KEY", id), ("BERTH_SECRET_KEY", secret)],
    );
    assert!(ok, "{e}");
    assert_eq!(json_of(&out)[0]["name"], "root");

    // Users and keys.
    let (ok, _, e) = remote(&["user", "create", "ci", "--role", "viewer"]);
    assert!(ok, "{e}");
    let (ok, _, e) = remote(&["user", "create", "ci"]);
    assert!(
        !ok && e.contains("409") && e.contains("already exists"),
        "{e}"
    );
    let (ok, out, _) = remote(&["user", "list", "--json"]);
    assert!(ok);
    assert_eq!(json_of(&out)[0]["role"], "viewer");
    let (ok, out, e) = remote(&["key", "create", "ci"]);
    assert!(ok && e.contains("not shown again"), "{e}");
    let ci_id = field(&out, "Access Key ID:");
    let ci_secret = field(&out, "Secret Key:");
    let r = reqwest::Client::new()
        .get(format!("{url}/v2/"))
        .basic_auth(&ci_id, Some(&ci_secret))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::OK,
        "a key made through the API logs in"
    );
    let (ok, out, _) = remote(&["key", "list", "ci", "--json"]);
    assert!(ok && !out.contains(&ci_secret));
    assert_eq!(json_of(&out)[0]["id"], ci_id.as_str());
    // A viewer's key is refused by the API's one check.
    let (ok, _, e) = berth(
        &data,
        &[
            "--server",
            &url,
            "--access-key",
            &ci_id,
            "--secret-key",
            &ci_secret,
            "user",
            "list",
        ],
    );
    assert!(!ok && e.contains("403"), "{e}");
    let (ok, _, e) = remote(&["key", "revoke", "ci", &ci_id]);
    assert!(ok, "{e}");
    let (ok, out, _) = remote(&["key", "list", "ci", "--json"]);
    assert!(ok && json_of(&out).as_array().unwrap().is_empty(), "{out}");
    // Without --server, commands act on the data directory, which the running server holds.
    let (ok, _, e) = berth(&data, &["user", "list"]);
    assert!(!ok && e.contains("stop it first"), "{e}");

    // Registries.
    let (ok, _, e) = remote(&[
        "registry",
        "create",
        "team",
        "--anonymous-pull",
        "--private",
    ]);
    assert!(ok, "{e}");
    let (ok, out, _) = remote(&["registry", "list", "--json"]);
    assert!(ok);
    let regs = json_of(&out);
    assert_eq!(
        regs.as_array().unwrap().len(),
        0,
        "private registries are hidden on a public listener: {regs}"
    );
    let (ok, _, e) = remote(&["registry", "create", "pub"]);
    assert!(ok, "{e}");
    let (ok, out, _) = remote(&["registry", "list"]);
    assert!(ok && out.contains("pub") && !out.contains("team"), "{out}");
    let (ok, _, e) = remote(&["registry", "delete", "pub"]);
    assert!(ok, "{e}");
    let (ok, _, e) = remote(&["registry", "delete", "pub"]);
    assert!(!ok && e.contains("404"), "{e}");

    // Image caches and prune.
    let (ok, _, e) = remote(&[
        "cache",
        "create",
        "up",
        "--kind",
        "registry",
        "--url",
        "http://127.0.0.1:9",
    ]);
    assert!(ok, "{e}");
    let (ok, _, e) = remote(&["cache", "update", "up", "--fetch-budget", "30s"]);
    assert!(ok, "{e}");
    let (ok, out, _) = remote(&["cache", "list", "--json"]);
    assert!(ok);
    let caches = json_of(&out);
    assert_eq!(caches[0]["fetch_budget"], "30s");
    let (ok, _, e) = remote(&[
        "registry", "create", "hub", "--type", "cache", "--cache", "up",
    ]);
    // The image cache created a moment ago is loaded already: no note about a restart.
    assert!(ok && !e.contains("restart"), "{e}");
    let (ok, _, e) = remote(&["cache", "delete", "up"]);
    assert!(!ok && e.contains("hub"), "{e}");
    let (ok, out, e) = remote(&[
        "cache",
        "prune",
        "--dry-run",
        "--unpulled-for",
        "1d",
        "--json",
    ]);
    assert!(ok, "{e}");
    assert_eq!(json_of(&out)["dry_run"], true);
    let (ok, out, e) = remote(&["cache", "prune"]);
    assert!(ok && out.contains("removed 0 artifacts"), "{out}{e}");

    let (ok, _, e) = remote(&["user", "delete", "ci"]);
    assert!(ok, "{e}");
    let (ok, _, e) = remote(&["user", "delete", "root"]);
    assert!(!ok && e.contains("last admin"), "{e}");
}

/// The data directory is locked before anything in it is touched: a data-directory command
/// next to a running server fails with a clear message and leaves the server's in-flight upload
/// alone (before, `cache prune` emptied the temp directory first and broke the upload).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_dir_commands_next_to_a_running_server_touch_nothing() {
    let s = common::server::TestServer::start("").await;
    let data = s.dir.path().join("data");
    let blob = vec![7u8; 256 * 1024];
    let digest = sha256(&blob);
    // A monolithic upload whose body arrives in two halves, the CLI running in between.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(1);
    let body = reqwest::Body::wrap_stream(tokio_stream_from(rx));
    let upload = s
        .client
        .post(s.url(&format!("/v2/library/app/blobs/uploads/?digest={digest}")))
        .body(body)
        .send();
    let upload = tokio::spawn(upload);
    tx.send(Ok(blob[..128 * 1024].to_vec())).await.unwrap();
    // Wait until the server has written the first half into its temp directory.
    let tmp = data.join("tmp");
    assert!(
        common::doubles::wait_until(std::time::Duration::from_secs(10), || {
            std::fs::read_dir(&tmp).is_ok_and(|mut d| d.next().is_some())
        })
        .await,
        "the upload never reached the temp directory"
    );
    for args in [
        &["cache", "prune", "--dry-run"][..],
        &["registry", "list"][..],
        &["user", "list"][..],
    ] {
        let (ok, _, err) = berth(&data, args);
        assert!(!ok, "{args:?} ran next to the server");
        assert!(
            err.contains("in use by another berth process"),
            "{args:?}: {err}"
        );
    }
    tx.send(Ok(blob[128 * 1024..].to_vec())).await.unwrap();
    drop(tx);
    let r = upload.await.unwrap().unwrap();
    assert_eq!(
        r.status(),
        StatusCode::CREATED,
        "{}",
        r.text().await.unwrap()
    );
    let got = s.get(&format!("/v2/library/app/blobs/{digest}")).await;
    assert_eq!(got.bytes().await.unwrap().as_ref(), blob.as_slice());
}

/// A stream of body pieces from a channel.
fn tokio_stream_from(
    rx: tokio::sync::mpsc::Receiver<Result<Vec<u8>, std::io::Error>>,
) -> impl futures_util::Stream<Item = Result<Vec<u8>, std::io::Error>> {
    futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
}

/// Webhook targets on loopback (refused by default) for a test receiver.
const HOOKS_TO_LOOPBACK: &str =
    "[webhooks]\nallowed_ports = []\n[egress]\nallowed_networks = [\"127.0.0.0/8\"]\n";

/// Data-directory mode runs the management API's own operations: deleting a registry there
/// drops its webhook policies too (before, the data-directory path forgot them and a registry
/// created later under the same name inherited the old webhooks).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_dir_registry_delete_is_the_api_delete() {
    let dir = tempfile::tempdir().unwrap();
    let data = served_data_dir(dir.path());
    assert!(berth(&data, &["registry", "create", "team"]).0);
    let mut server = BerthProcess::start_in(dir.path(), HOOKS_TO_LOOPBACK);
    let client = reqwest::Client::new();
    let hooks = format!("{}/api/v1/registries/team/webhooks", server.url());
    let r = client
        .post(&hooks)
        .json(&serde_json::json!({"name": "ci", "events": ["PUSH_ARTIFACT"], "target": "http://127.0.0.1:9/hook", "kind": "http"}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::CREATED,
        "{}",
        r.text().await.unwrap()
    );
    assert!(server.terminate());
    let (ok, out, e) = berth(&data, &["registry", "delete", "team"]);
    assert!(ok && out.contains("deleted registry team"), "{out}{e}");
    assert!(berth(&data, &["registry", "create", "team"]).0);
    let server = BerthProcess::start_in(dir.path(), HOOKS_TO_LOOPBACK);
    let hooks = format!("{}/api/v1/registries/team/webhooks", server.url());
    let v: serde_json::Value = client
        .get(&hooks)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["total"], 0, "{v}");
}

/// Which trees of a data directory's metadata hold `needle` (read with the server stopped).
fn trees_holding(data: &std::path::Path, needle: &[u8]) -> Vec<String> {
    // sled's flusher thread lets go of the file lock a moment after the last handle (of the
    // previous call, or of berth) is dropped: open once it has.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let db = loop {
        match sled::open(data.join("meta")) {
            Ok(db) => break db,
            Err(e) if std::time::Instant::now() < deadline && e.to_string().contains("lock") => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            Err(e) => panic!("{e}"),
        }
    };
    let mut found = Vec::new();
    for name in db.tree_names() {
        let tree = db.open_tree(&name).unwrap();
        if tree
            .iter()
            .values()
            .any(|v| v.unwrap().windows(needle.len()).any(|w| w == needle))
        {
            found.push(String::from_utf8_lossy(&name).into_owned());
        }
    }
    drop(db);
    // The next berth command must find the database unlocked: wait for sled's flusher to let go.
    let file = std::fs::File::open(data.join("meta").join("db")).unwrap();
    while rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
        assert!(std::time::Instant::now() < deadline, "sled kept its lock");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    rustix::fs::flock(&file, rustix::fs::FlockOperation::Unlock).unwrap();
    found
}

/// An image cache's secret is a record of its own (the `credentials` tree): the definition that
/// listing and showing image caches read holds none. Before, the whole definition with its
/// password was one record in `image_caches`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_cache_secrets_are_a_record_of_their_own() {
    let dir = tempfile::tempdir().unwrap();
    let data = served_data_dir(dir.path());
    let mut create = Command::new(berth_bin())
        .arg("--data-dir")
        .arg(&data)
        .args([
            "cache",
            "create",
            "up",
            "--kind",
            "registry",
            "--url",
            "https://registry.example",
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
        .write_all(b"pw-8d1f2c\n")
        .unwrap();
    assert!(create.wait().unwrap().success());
    assert_eq!(trees_holding(&data, b"pw-8d1f2c"), ["credentials"]);
    assert!(trees_holding(&data, b"registry.example").contains(&"image_caches".to_string()));
    // Changing the definition keeps the credentials; the server still reads both.
    let (ok, _, e) = berth(&data, &["cache", "update", "up", "--revalidate-ttl", "30s"]);
    assert!(ok, "{e}");
    assert_eq!(trees_holding(&data, b"pw-8d1f2c"), ["credentials"]);
    let (ok, out, e) = berth(&data, &["cache", "list", "--json"]);
    assert!(ok, "{e}");
    let v = json_of(&out);
    assert_eq!(v[0]["credentials"], "user bot, password set", "{out}");
    assert_eq!(v[0]["revalidate_ttl"], "30s", "{out}");
    assert!(!out.contains("pw-8d1f2c"));
    let (ok, _, e) = berth(&data, &["cache", "delete", "up"]);
    assert!(ok, "{e}");
    assert!(
        trees_holding(&data, b"pw-8d1f2c").is_empty(),
        "deleted with its image cache"
    );
}

/// The CLI reads what the API answers through the API's own view types: an answer of another
/// shape (another program on that port, a server of another version) is an error naming the
/// call, never a table of `-` or an access key printed without its secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_that_are_not_the_api_views_are_errors() {
    use common::doubles::{full_body, LoopbackServer};
    let other = LoopbackServer::start(|req| async move {
        let body = if req.uri().path().ends_with("/keys") {
            r#"{"id":"BKX","user":"ann","created":"2026-01-01T00:00:00Z","age_days":0,"rotation_due":false}"#
        } else {
            r#"{"items":[{"nom":"shop"}],"total":1,"page":1,"page_size":500}"#
        };
        http::Response::builder()
            .header("content-type", "application/json")
            .body(full_body(body))
            .unwrap()
    });
    let dir = tempfile::tempdir().unwrap();
    let data = served_data_dir(dir.path());
    let server = other.url();
    let (ok, out, e) = berth(&data, &["--server", &server, "registry", "list"]);
    assert!(!ok, "printed {out}");
    assert!(
        e.contains("/api/v1/registries")
            && e.contains("unexpected answer")
            && e.contains("missing field"),
        "{e}"
    );
    let (ok, out, e) = berth(&data, &["--server", &server, "key", "create", "ann"]);
    assert!(!ok && !out.contains("Secret Key"), "printed {out}");
    assert!(e.contains("BKX") && e.contains("no secret"), "{e}");
}

/// `berth check-config` prints the effective configuration, never an image cache's password
/// (before, `Debug` of the image cache definition printed it).
#[test]
fn check_config_never_prints_a_source_password() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("berth.toml");
    std::fs::write(
        &file,
        "[[image_cache]]\nname = \"up\"\nkind = \"registry\"\nurl = \"https://registry.example\"\nusername = \"bot\"\npassword = \"cfg-pw-77a1\"\n",
    )
    .unwrap();
    let out = Command::new(berth_bin())
        .arg("--config")
        .arg(&file)
        .arg("check-config")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("registry.example") && text.contains("bot"),
        "{text}"
    );
    assert!(text.contains("<redacted>"), "{text}");
    assert!(!text.contains("cfg-pw-77a1"), "{text}");
}

/// `berth version` names the build; `berth completions SHELL` prints a script; neither needs a
/// usable config or data directory.
#[test]
fn version_and_completions_need_nothing_but_the_binary() {
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.toml");
    std::fs::write(&broken, "this is = not [valid").unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(berth_bin())
            .env("BERTH_CONFIG", &broken)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (ok, text) = run(&["version"]);
    assert!(ok, "{text}");
    assert!(
        text.starts_with(&format!("berth {} (commit ", env!("CARGO_PKG_VERSION"))),
        "{text}"
    );
    let (ok, json) = run(&["version", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(ok);
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    for key in ["commit", "target", "profile"] {
        assert!(v[key].as_str().is_some_and(|s| !s.is_empty()), "{json}");
    }
    for shell in ["bash", "zsh", "fish"] {
        let (ok, script) = run(&["completions", shell]);
        assert!(
            ok && script.contains("berth") && script.contains("check-config"),
            "{shell}"
        );
    }
    let (ok, _) = run(&["completions", "tcsh"]);
    assert!(!ok, "an unknown shell is refused");
}

/// `log_format = "json"`: every line berth writes to stderr is one JSON object, and a request's
/// line carries its fields (method, path, status, bytes, user agent, `ns`...).
#[test]
fn json_logs_are_one_object_per_line_with_the_request_fields() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\nlog = \"info\"\nlog_format = \"json\"\n[[listen]]\naddr = \"127.0.0.1:0\"\n",
            dir.path().join("data")
        ),
    )
    .unwrap();
    let mut child = Command::new(berth_bin())
        .args(["serve", "--config"])
        .arg(&config)
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut addr = None;
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        if let Some(rest) = line.strip_prefix("berth listening on http://") {
            addr.get_or_insert(rest.trim().to_string());
        }
        if line.trim() == "berth ready" {
            break;
        }
    }
    let addr = addr.expect("a plain listener");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let status = rt.block_on(async {
        reqwest::Client::new()
            .get(format!(
                "http://{addr}/v2/library/app/tags/list?ns=docker.io"
            ))
            .header("user-agent", "json-log-test/1.0")
            .send()
            .await
            .unwrap()
            .status()
    });
    // SIGTERM: berth shuts down and its stderr ends.
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    let _ = child.wait();
    let events: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let request = events
        .iter()
        .find(|e| e["user_agent"] == "json-log-test/1.0")
        .unwrap_or_else(|| panic!("no request line in {stderr}"));
    assert_eq!(request["method"], "GET");
    assert_eq!(request["path"], "/v2/library/app/tags/list");
    assert_eq!(request["ns"], "docker.io");
    assert_eq!(request["status"], status.as_u16());
    assert!(request["request_id"]
        .as_str()
        .is_some_and(|s| !s.is_empty()));
    // Durations are integers of microseconds.
    assert!(
        request["us"].is_u64() && request["bytes"].is_u64(),
        "{request}"
    );
    assert!(
        request["timestamp"].is_string() && request["level"].is_string(),
        "{request}"
    );
}

/// `berth check-config` finds everything `serve` would refuse, lists every problem at once and
/// exits 1; it prints the effective config as TOML (before: Rust debug output, and only the
/// first problem of a config that did not validate).
#[test]
fn check_config_lists_every_problem_and_prints_toml() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("berth.toml");
    let check = |text: &str| {
        std::fs::write(&file, text).unwrap();
        let out = Command::new(berth_bin())
            .arg("--config")
            .arg(&file)
            .arg("check-config")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = check(
        "log = \"info,berth=loud[[\"\n\
         [[listen]]\naddr = \"127.0.0.1:5000\"\n\
         [[listen]]\naddr = \"127.0.0.1:5000\"\ntls_cert = \"/nonexistent/cert.pem\"\ntls_key = \"/nonexistent/key.pem\"\n\
         [[image_cache]]\nname = \"up\"\nkind = \"dockerhub\"\nurl = \"https://registry-1.docker.io\"\n\
         [[image_cache]]\nname = \"bad\"\nkind = \"registry\"\nurl = \"not a url\"\n\
         [[registry]]\nname = \"library\"\n\
         [[registry]]\nname = \"docker\"\ntype = \"cache\"\ncache = \"upp\"\n\
         [[registry]]\nname = \"Bad\"\n\
         [mirror]\nregistry = \"docker\"\n",
    );
    assert_eq!(code, Some(1), "{err}");
    for problem in [
        "127.0.0.1:5000: the same address is declared twice",
        "is not a log filter",
        "cannot read tls_cert /nonexistent/cert.pem",
        "\"bad\": bad url",
        "registry \"library\" shadows the mirror",
        "registry \"Bad\"",
        "6 problem(s)",
    ] {
        assert!(err.contains(problem), "{problem:?} not in {err}");
    }
    // A reference the data directory may resolve is a warning, not a problem.
    assert!(
        err.contains("warning: registry \"docker\" serves image cache \"upp\""),
        "{err}"
    );
    let shown: toml::Value = toml::from_str(&out).expect("stdout is TOML");
    assert_eq!(shown["listen"].as_array().unwrap().len(), 2);
    // The mirror's registry shows its effective anonymous pull.
    let docker = &shown["registry"].as_array().unwrap()[1];
    assert_eq!(docker["anonymous_pull"].as_bool(), Some(true), "{out}");

    let (code, out, err) = check("[[registry]]\nname = \"team\"\n");
    assert_eq!(code, Some(0), "{err}");
    let shown: toml::Value = toml::from_str(&out).expect("stdout is TOML");
    assert_eq!(shown["registry"][0]["name"].as_str(), Some("team"));
    assert_eq!(shown["limits"]["max_connections"].as_integer(), Some(4096));
}

/// An admin command pointed at a directory without berth data (a missing `--config` defaults
/// to ./berth-data) refuses and creates nothing (before, it made an empty data directory and
/// answered from it as if it were the server's).
#[test]
fn admin_commands_never_create_a_data_directory() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nothing-here");
    let (ok, _, e) = berth(&missing, &["registry", "list"]);
    assert!(!ok, "{e}");
    assert!(
        e.contains(&missing.display().to_string())
            && e.contains("holds no berth data")
            && e.contains("--config"),
        "{e}"
    );
    assert!(
        !missing.exists(),
        "the command created {}",
        missing.display()
    );
    // An existing directory that is not a data directory is left as it was.
    let other = dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    let (ok, _, _) = berth(&other, &["user", "create", "root", "--admin"]);
    assert!(!ok);
    assert_eq!(std::fs::read_dir(&other).unwrap().count(), 0);
}

/// The first admin is created through a running server, and its first key comes in the same
/// answer (before: auth turned on with that user, and `key create` then needed a key nobody
/// had, so bootstrapping took the server down).
#[test]
fn the_first_admin_is_bootstrapped_through_a_running_server() {
    let dir = tempfile::tempdir().unwrap();
    let server = BerthProcess::start_in(dir.path(), "");
    let url = server.url();
    let data = dir.path().join("data");
    // Not an admin of everything: nobody could manage the server after it.
    let (ok, _, e) = berth(
        &data,
        &[
            "--server",
            &url,
            "user",
            "create",
            "ci",
            "--role",
            "image_uploader",
        ],
    );
    assert!(!ok && e.contains("must be an admin"), "{e}");
    let (ok, out, e) = berth(
        &data,
        &["--server", &url, "user", "create", "root", "--admin"],
    );
    assert!(ok && out.contains("the server's first"), "{out}{e}");
    let (id, secret) = (field(&out, "Access Key ID:"), field(&out, "Secret Key:"));
    // Auth is on now: anonymous callers are refused, the first key works.
    let (ok, _, e) = berth(
        &data,
        &["--server", &url, "user", "create", "other", "--admin"],
    );
    assert!(!ok, "{e}");
    let with_key = |args: &[&str]| {
        let mut all = vec![
            "--server",
            url.as_str(),
            "--access-key",
            id.as_str(),
            "--secret-key",
            secret.as_str(),
        ];
        all.extend_from_slice(args);
        berth(&data, &all)
    };
    let (ok, out, e) = with_key(&["key", "create", "root", "--json"]);
    assert!(ok && json_of(&out)["secret"].is_string(), "{out}{e}");
    // Later users come without a key.
    let (ok, out, e) = with_key(&["user", "create", "ci", "--role", "image_uploader"]);
    assert!(ok && out.contains("berth key create ci"), "{out}{e}");
}

/// The CLI has nouns for what the API already had: images, tags and webhooks (before, only
/// curl against /api/v1 could list images, move a tag or manage webhooks).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_tags_and_webhooks_from_the_cli() {
    use common::doubles::{empty_body, LoopbackServer};
    let receiver = LoopbackServer::start(|_req| async move {
        http::Response::builder()
            .status(200)
            .body(empty_body())
            .unwrap()
    });
    let dir = tempfile::tempdir().unwrap();
    let server = BerthProcess::start_in(
        dir.path(),
        &format!("[[registry]]\nname = \"lib\"\n{HOOKS_TO_LOOPBACK}"),
    );
    let url = server.url();
    let client = reqwest::Client::new();
    let mut digests = Vec::new();
    for data in [b"{}".to_vec(), b"layer".to_vec()] {
        let d = sha256(&data);
        let r = client
            .post(format!("{url}/v2/lib/team/app/blobs/uploads/?digest={d}"))
            .body(data.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
        digests.push((d, data.len() as u64));
    }
    let manifest = image_manifest(&digests[0].0, digests[0].1, &digests[1].0, digests[1].1);
    let r = client
        .put(format!("{url}/v2/lib/team/app/manifests/v1"))
        .header("content-type", OCI_MANIFEST)
        .body(manifest.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let digest = sha256(&manifest);
    let data = dir.path().join("data");
    let cli = |args: &[&str]| {
        let mut all = vec!["--server", url.as_str()];
        all.extend_from_slice(args);
        berth(&data, &all)
    };

    let (ok, out, e) = cli(&["image", "list", "lib", "--json"]);
    assert!(ok, "{e}");
    let images = json_of(&out);
    assert_eq!(images[0]["name"], "team/app", "{out}");
    assert_eq!(images[0]["tag_count"], 1, "{out}");
    let (ok, out, e) = cli(&["tag", "set", "lib", "team/app", "stable", &digest]);
    assert!(ok && out.contains("created tag stable"), "{out}{e}");
    let (ok, out, e) = cli(&["tag", "list", "lib", "team/app"]);
    assert!(
        ok && out.contains("stable") && out.contains(&digest),
        "{out}{e}"
    );
    let (ok, out, e) = cli(&["tag", "delete", "lib", "team/app", "v1"]);
    assert!(ok && out.contains("deleted tag v1"), "{out}{e}");
    let (ok, out, e) = cli(&["tag", "set", "lib", "team/app", "x", "sha256:00"]);
    assert!(!ok, "{out}{e}");

    let target = format!("{}/hook", receiver.url());
    let (ok, out, e) = cli(&[
        "webhook",
        "create",
        "lib",
        "--name",
        "ci",
        "--target",
        &target,
        "--events",
        "push_artifact,DELETE_TAG",
    ]);
    assert!(ok && out.contains("created webhook"), "{out}{e}");
    let (ok, out, e) = cli(&["webhook", "list", "lib", "--json"]);
    assert!(ok, "{e}");
    let hooks = json_of(&out);
    assert_eq!(
        hooks[0]["events"],
        serde_json::json!(["PUSH_ARTIFACT", "DELETE_TAG"])
    );
    let id = hooks[0]["id"].as_str().unwrap().to_string();
    let (ok, out, e) = cli(&["webhook", "test", "lib", &id]);
    assert!(ok && out.contains("HTTP 200"), "{out}{e}");
    let (ok, out, e) = cli(&["webhook", "delete", "lib", &id]);
    assert!(ok && out.contains("deleted webhook"), "{out}{e}");
    let (ok, out, _) = cli(&["webhook", "list", "lib", "--json"]);
    assert!(ok && json_of(&out) == serde_json::json!([]), "{out}");
    let (ok, _, e) = cli(&[
        "webhook", "create", "lib", "--name", "x", "--target", &target, "--events", "NOPE",
    ]);
    assert!(!ok && e.contains("not an event kind"), "{e}");

    let (ok, out, e) = cli(&["image", "delete", "lib", "team/app"]);
    assert!(ok && out.contains("deleted image lib/team/app"), "{out}{e}");
}
