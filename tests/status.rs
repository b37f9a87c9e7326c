//! What the sources are doing: `berth_upstream_requests_total` / `berth_upstream_errors_total`
//! by source and kind, `berth_cache_stale_total` by source, the per-source health of
//! `GET /api/v1/status` (admin only) and `berth status --json` through a running server.
//!
//! Each test names its own image cache: the metrics recorder is shared by the whole binary.

mod common;

use std::time::{Duration, Instant};

use berth::auth::Role;
use common::doubles::{FaultRelay, StaticRegistry};
use common::process::berth_bin;
use common::server::*;
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION};
use reqwest::{Client, StatusCode};
use serde_json::Value;

struct Setup {
    _source: StaticRegistry,
    relay: FaultRelay,
    edge: TestServer,
    /// The image cache (the `source` label).
    name: &'static str,
    layer_digest: String,
    /// Access Key ID and Secret Key of the admin `root`.
    admin: (String, String),
}

const MANIFEST: &str = "/v2/hub/library/app/manifests/v1";

/// A static source behind a fault relay, an edge with image cache `name` on it (cache registry
/// `hub`) and `options` in its `[[image_cache]]` table, and an admin whose credentials the
/// edge's client sends.
async fn setup(name: &'static str, options: &str) -> Setup {
    let source = StaticRegistry::start();
    let layer: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let image = source.put_image("library/app", "v1", &[&layer]);
    let relay = FaultRelay::start(&source.url());
    let toml = format!(
        "[pull_through]\nrevalidate_timeout = \"1s\"\n[[image_cache]]\nname = \"{name}\"\nkind = \"registry\"\nurl = \"{}\"\nrevalidate_ttl = \"0s\"\n{options}\n[[registry]]\nname = \"hub\"\ntype = \"cache\"\ncache = \"{name}\"\n",
        relay.url()
    );
    let mut edge = TestServer::start(&toml).await;
    let admin = edge.user("root", Role::Admin, &[]);
    edge.client = authorized(&admin);
    Setup {
        _source: source,
        relay,
        edge,
        name,
        layer_digest: image.layer_digests[0].clone(),
        admin,
    }
}

fn basic((id, secret): &(String, String)) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"))
    )
}

fn authorized(key: &(String, String)) -> Client {
    let mut h = HeaderMap::new();
    h.insert(AUTHORIZATION, HeaderValue::from_str(&basic(key)).unwrap());
    Client::builder().default_headers(h).build().unwrap()
}

impl Setup {
    async fn errors(&self, kind: &str) -> f64 {
        let labels = [("source", self.name), ("kind", kind)];
        self.edge
            .metric("berth_upstream_errors_total", &labels)
            .await
    }

    async fn requests(&self, kind: &str) -> f64 {
        let labels = [("source", self.name), ("kind", kind)];
        self.edge
            .metric("berth_upstream_requests_total", &labels)
            .await
    }

    /// Polls until the errors of `kind` exceed `before` (the blob fetch records its failure
    /// in its own task); the count then.
    async fn errors_above(&self, kind: &str, before: f64) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let now = self.errors(kind).await;
            if now > before || Instant::now() > deadline {
                return now;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// This source's entry of `GET /api/v1/status`.
    async fn source_status(&self) -> Value {
        let r = self.edge.get("/api/v1/status").await;
        assert_eq!(r.status(), StatusCode::OK);
        let v: Value = r.json().await.unwrap();
        v["sources"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == self.name)
            .unwrap_or_else(|| panic!("no source {} in {v}", self.name))
            .clone()
    }

    fn blob_path(&self) -> String {
        format!("/v2/hub/library/app/blobs/{}", self.layer_digest)
    }
}

/// Asserts that the source's status shows `failures` consecutive failures and a last error of
/// `kind`.
fn assert_failing(status: &Value, failures: u64, kind: &str) {
    assert_eq!(
        status["consecutive_failures"], failures,
        "consecutive failures: {status}"
    );
    assert_eq!(status["last_error"]["kind"], kind, "{status}");
    assert!(
        !status["last_error"]["message"]
            .as_str()
            .unwrap_or("")
            .is_empty(),
        "{status}"
    );
    assert!(status["last_error"]["at"].is_string(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_kind_is_counted_by_source_and_kept_in_the_status_until_a_success() {
    let s = setup("st-kinds", "").await;
    let fresh = s.source_status().await;
    assert_eq!(fresh["loaded"], true, "{fresh}");
    assert_eq!(fresh["kind"], "registry");
    assert_eq!(fresh["url"], s.relay.url());
    assert_eq!(fresh["consecutive_failures"], 0);
    assert!(fresh["last_success"].is_null() && fresh["last_error"].is_null());
    let mut failures = 0;

    // 5xx: nothing cached, the source answers 500.
    let before = s.errors("5xx").await;
    s.relay.status(500, None, None);
    assert_eq!(s.edge.get(MANIFEST).await.status(), StatusCode::BAD_GATEWAY);
    s.relay.clear_faults();
    assert_eq!(s.errors("5xx").await, before + 1.0, "5xx counted once");
    failures += 1;
    assert_failing(&s.source_status().await, failures, "5xx");

    // 4xx (not 404): the source answers 403.
    let before = s.errors("4xx").await;
    s.relay.status(403, None, None);
    assert!(!s.edge.get(MANIFEST).await.status().is_success());
    s.relay.clear_faults();
    assert_eq!(s.errors("4xx").await, before + 1.0, "4xx counted once");
    failures += 1;
    assert_failing(&s.source_status().await, failures, "4xx");

    // connect: the source refuses connections.
    let before = s.errors("connect").await;
    s.relay.set_reachable(false);
    assert_eq!(s.edge.get(MANIFEST).await.status(), StatusCode::BAD_GATEWAY);
    s.relay.set_reachable(true);
    assert_eq!(s.errors("connect").await, before + 1.0, "connect counted");
    failures += 1;
    assert_failing(&s.source_status().await, failures, "connect");

    // timeout: no answer within pull_through.revalidate_timeout (1 s).
    let before = s.errors("timeout").await;
    s.relay.latency(Duration::from_secs(4));
    assert_eq!(s.edge.get(MANIFEST).await.status(), StatusCode::BAD_GATEWAY);
    s.relay.clear_faults();
    assert_eq!(s.errors("timeout").await, before + 1.0, "timeout counted");
    failures += 1;
    assert_failing(&s.source_status().await, failures, "timeout");

    // digest_mismatch: the source corrupts the blob.
    let before = s.errors("digest_mismatch").await;
    s.relay.corrupt_at(1000);
    let r = s.edge.get(&s.blob_path()).await;
    assert!(
        r.bytes().await.is_err(),
        "a corrupt blob never ends normally"
    );
    assert_eq!(
        s.errors_above("digest_mismatch", before).await,
        before + 1.0,
        "digest mismatch counted"
    );
    s.relay.clear_faults();
    failures += 1;
    assert_failing(&s.source_status().await, failures, "digest_mismatch");

    // A success resets the consecutive failures; the last error stays for the record.
    let manifests_before = s.requests("manifest").await;
    let r = s.edge.get(MANIFEST).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(
        s.requests("manifest").await >= manifests_before + 2.0,
        "HEAD and GET of the manifest are source requests"
    );
    let healthy = s.source_status().await;
    assert_eq!(healthy["consecutive_failures"], 0, "{healthy}");
    assert!(healthy["last_success"].is_string(), "{healthy}");
    assert_eq!(healthy["last_error"]["kind"], "digest_mismatch");
    // The blob, fetched whole and verified, is a success too.
    let blobs_before = s.requests("blob").await;
    let body = s.edge.get(&s.blob_path()).await.bytes().await.unwrap();
    assert_eq!(sha256(&body), s.layer_digest);
    assert!(s.requests("blob").await > blobs_before);
    assert_eq!(s.source_status().await["consecutive_failures"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_serve_is_counted_by_source() {
    let s = setup("st-stale", "").await;
    assert_eq!(s.edge.get(MANIFEST).await.status(), StatusCode::OK);
    let stale = [("source", s.name)];
    let before = s.edge.metric("berth_cache_stale_total", &stale).await;
    s.relay.set_reachable(false);
    let r = s.edge.get(MANIFEST).await;
    assert_eq!(r.status(), StatusCode::OK, "the cached copy");
    s.relay.set_reachable(true);
    assert_eq!(
        s.edge.metric("berth_cache_stale_total", &stale).await,
        before + 1.0
    );
    assert_failing(&s.source_status().await, 1, "connect");
    // Every metric of this behaviour carries # HELP.
    let text = s.edge.get("/metrics").await.text().await.unwrap();
    for name in [
        "berth_upstream_requests_total",
        "berth_upstream_errors_total",
        "berth_cache_stale_total",
    ] {
        assert!(
            text.contains(&format!("# HELP {name} ")),
            "{name} has no HELP"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_is_for_admins_only() {
    let s = setup("st-admin", "").await;
    let anonymous = Client::new()
        .get(s.edge.url("/api/v1/status"))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    let viewer = s.edge.user("ann", Role::Viewer, &["hub"]);
    let r = authorized(&viewer)
        .get(s.edge.url("/api/v1/status"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_eq!(error_code(r).await, "DENIED");
    let r = s.edge.get("/api/v1/status").await;
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert!(v["commit"].is_string() && v["started"].is_string(), "{v}");
    assert!(v["uptime_seconds"].is_u64(), "{v}");
    assert!(
        v["storage"]["volume_free_bytes"].as_u64().unwrap() > 0,
        "{v}"
    );
    assert!(
        v["storage"]["volume_used_bytes"].as_u64().unwrap() > 0,
        "{v}"
    );
    assert_eq!(v["counts"]["users"], 2, "{v}");
    assert_eq!(v["counts"]["registries"], 2, "library and hub: {v}");
    assert_eq!(v["counts"]["image_caches"], 1, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn berth_status_json_through_a_running_server() {
    let s = setup("st-cli", "").await;
    s.relay.status(503, None, None);
    assert_eq!(s.edge.get(MANIFEST).await.status(), StatusCode::BAD_GATEWAY);
    s.relay.clear_faults();
    let (url, (id, secret)) = (s.edge.base.clone(), s.admin.clone());
    let run = move |json: bool| {
        let (url, id, secret) = (url.clone(), id.clone(), secret.clone());
        tokio::task::spawn_blocking(move || {
            let mut cmd = std::process::Command::new(berth_bin());
            cmd.env_remove("BERTH_ACCESS_KEY")
                .env_remove("BERTH_SECRET_KEY")
                .args([
                    "--server",
                    &url,
                    "--access-key",
                    &id,
                    "--secret-key",
                    &secret,
                ])
                .arg("status");
            if json {
                cmd.arg("--json");
            }
            let out = cmd.output().unwrap();
            (
                out.status.success(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        })
    };
    let (ok, out, err) = run(true).await.unwrap();
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&out).expect("berth status --json prints JSON");
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    let source = v["sources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == "st-cli")
        .unwrap_or_else(|| panic!("{v}"))
        .clone();
    assert_failing(&source, 1, "5xx");
    let (ok, out, err) = run(false).await.unwrap();
    assert!(ok, "{err}");
    assert!(
        out.contains("source st-cli (registry") && out.contains("1 consecutive failures"),
        "{out}"
    );
    // Without credentials: refused, and said so.
    let url = s.edge.base.clone();
    let (ok, _, err) = tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new(berth_bin())
            .env_remove("BERTH_ACCESS_KEY")
            .env_remove("BERTH_SECRET_KEY")
            .args(["--server", &url, "status", "--json"])
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap();
    assert!(!ok, "status needs an admin");
    assert!(!err.is_empty());
}

#[test]
fn berth_status_on_the_data_directory() {
    use common::process::BerthProcess;
    let dir = tempfile::tempdir().unwrap();
    let toml = "[[image_cache]]\nname = \"st-local\"\nkind = \"registry\"\nurl = \"https://registry.example\"\n[[registry]]\nname = \"hub\"\ntype = \"cache\"\ncache = \"st-local\"\n";
    BerthProcess::start_in(dir.path(), toml).kill();
    let out = std::process::Command::new(berth_bin())
        .env_remove("BERTH_ACCESS_KEY")
        .env_remove("BERTH_SECRET_KEY")
        .arg("--config")
        .arg(dir.path().join("config.toml"))
        .args(["status", "--json"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["counts"]["image_caches"], 1, "{v}");
    let source = &v["sources"][0];
    assert_eq!(source["name"], "st-local", "{v}");
    assert_eq!(source["loaded"], true, "{v}");
    assert_eq!(source["consecutive_failures"], 0, "{v}");
    assert_eq!(
        v["storage"]["data_dir"],
        dir.path().join("data").display().to_string()
    );
}

/// An unreachable source is a WARN line that names the source (the daemon's log is where an
/// operator looks first).
#[test]
fn an_unreachable_source_is_a_warn_line_naming_it() {
    use std::io::{BufRead, BufReader, Read};
    let dir = tempfile::tempdir().unwrap();
    // A port nothing listens on: connections are refused.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = format!(
        "data_dir = {:?}\n[[listen]]\naddr = \"127.0.0.1:0\"\n[[image_cache]]\nname = \"st-warn\"\nkind = \"registry\"\nurl = \"http://127.0.0.1:{port}\"\n[[registry]]\nname = \"hub\"\ntype = \"cache\"\ncache = \"st-warn\"\nanonymous_pull = true\n",
        dir.path().join("data")
    );
    let path = dir.path().join("config.toml");
    std::fs::write(&path, config).unwrap();
    let mut child = std::process::Command::new(berth_bin())
        .args(["serve", "--config"])
        .arg(&path)
        .env("RUST_LOG", "warn")
        .env_remove("BERTH_LOG_FORMAT")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let logged = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let mut addr = None;
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        if let Some(rest) = line.strip_prefix("berth listening on http://") {
            addr.get_or_insert_with(|| rest.trim().to_string());
        }
        if line.trim() == "berth ready" {
            break;
        }
    }
    let addr = addr.expect("a plain-http listener");
    let status = common::block(async {
        reqwest::get(format!("http://{addr}/v2/hub/library/app/manifests/v1"))
            .await
            .unwrap()
            .status()
    });
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    let _ = child.kill();
    let _ = child.wait();
    let log = logged.join().unwrap();
    assert!(
        log.lines().any(|l| l.contains("WARN")
            && l.contains("source unreachable")
            && l.contains("source=st-warn")),
        "no WARN line naming the source:\n{log}"
    );
}
