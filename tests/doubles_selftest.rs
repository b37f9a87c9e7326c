//! Self-tests of the upstream doubles in `tests/common/doubles.rs`, with plain reqwest.

mod common;

use std::time::{Duration, Instant};

use base64::Engine as _;
use common::doubles::*;
use futures_util::StreamExt as _;
use reqwest::{Client, StatusCode};

fn client() -> Client {
    Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// Deterministic pseudo-random bytes.
fn blob(len: usize, seed: u8) -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9 ^ seed as u32;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// Reads a body chunk by chunk until it ends or fails: (bytes received, error if any).
async fn read_body(resp: reqwest::Response) -> (Vec<u8>, Option<reqwest::Error>) {
    let mut out = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(b) => out.extend_from_slice(&b),
            Err(e) => return (out, Some(e)),
        }
    }
    (out, None)
}

fn header(resp: &reqwest::Response, name: &str) -> String {
    resp.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

fn basic(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

/// Parses `Bearer k="v",k2="v2"` into pairs.
fn challenge_params(value: &str) -> Vec<(String, String)> {
    let rest = value.split_once(' ').map(|x| x.1).unwrap_or("");
    rest.split("\",")
        .filter_map(|p| {
            let (k, v) = p.split_once('=')?;
            Some((k.trim().to_string(), v.trim_matches('"').to_string()))
        })
        .collect()
}

fn param(params: &[(String, String)], key: &str) -> Option<String> {
    params
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.clone())
}

// ---------------------------------------------------------------------------------------------
// StaticRegistry + FaultRelay
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn static_registry_serves_blobs_manifests_ranges() {
    let up = StaticRegistry::start();
    let img = up.put_image("library/app", "v1", &[&blob(1000, 1), &blob(10, 2)]);
    let c = client();
    let r = c.get(format!("{}/v2/", up.url())).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = c
        .head(format!("{}/v2/library/app/manifests/v1", up.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "docker-content-digest"), img.manifest_digest);
    assert_eq!(header(&r, "content-type"), OCI_MANIFEST);
    assert_eq!(header(&r, "content-length"), img.manifest.len().to_string());
    let r = c
        .get(format!(
            "{}/v2/library/app/manifests/{}",
            up.url(),
            img.manifest_digest
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap(), img.manifest);
    let blob_url = format!("{}/v2/library/app/blobs/{}", up.url(), img.layer_digests[0]);
    let r = c
        .get(&blob_url)
        .header("range", "bytes=10-19")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(header(&r, "content-range"), "bytes 10-19/1000");
    assert_eq!(r.bytes().await.unwrap().as_ref(), &blob(1000, 1)[10..20]);
    let r = c
        .get(&blob_url)
        .header("range", "bytes=5000-")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 416);
    let r = c
        .get(format!("{}/v2/library/app/tags/list", up.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["tags"][0],
        "v1"
    );
    up.delete_tag("library/app", "v1");
    let r = c
        .get(format!("{}/v2/library/app/manifests/v1", up.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(up.requests_matching("GET", "/blobs/"), 2);
}

#[tokio::test]
async fn relay_passes_through_headers_body_and_counts() {
    let up = StaticRegistry::start();
    let data = blob(3 << 20, 3);
    let digest = up.put_blob("r", data.clone());
    let relay = FaultRelay::start(&up.url());
    let c = client();
    let url = format!("{}/v2/r/blobs/{digest}?ns=docker.io", relay.url());
    let r = c
        .get(&url)
        .header("authorization", "Bearer abc")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "docker-content-digest"), digest);
    assert_eq!(header(&r, "content-length"), data.len().to_string());
    assert_eq!(r.bytes().await.unwrap().as_ref(), &data[..]);
    // Query and Authorization reached the upstream.
    let seen = up.traffic().requests();
    assert_eq!(seen[0].query.as_deref(), Some("ns=docker.io"));
    assert_eq!(seen[0].authorization.as_deref(), Some("Bearer abc"));

    let r = c.head(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-length"), data.len().to_string());

    let r = c
        .get(&url)
        .header("range", "bytes=100-")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().await.unwrap().as_ref(), &data[100..]);

    assert_eq!(relay.requests_matching("GET", "/blobs/"), 2);
    assert_eq!(relay.requests_matching("HEAD", "/blobs/"), 1);
    assert_eq!(relay.requests_matching("*", "/v2/r/"), 3);
    assert_eq!(
        relay.bytes_sent_matching("/blobs/"),
        (2 * data.len() - 100) as u64
    );
    assert_eq!(relay.ranges_seen("/blobs/"), vec!["bytes=100-".to_string()]);
    assert_eq!(
        relay.traffic().statuses_matching("*", "/blobs/"),
        vec![200, 200, 206]
    );
    relay.reset_counters();
    assert_eq!(relay.requests_matching("*", ""), 0);
    assert_eq!(relay.bytes_sent_matching(""), 0);
}

#[tokio::test]
async fn relay_streams_without_buffering() {
    // upstream relay stalls after 64 KiB; a pass-through relay in front must still deliver
    // those bytes (it cannot be buffering the whole body).
    let up = StaticRegistry::start();
    let data = blob(1 << 20, 4);
    let digest = up.put_blob("r", data.clone());
    let stalling = FaultRelay::start(&up.url());
    stalling.stall_after(65536);
    let front = FaultRelay::start(&stalling.url());
    let r = client()
        .get(format!("{}/v2/r/blobs/{digest}", front.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut stream = r.bytes_stream();
    let mut got = Vec::new();
    while got.len() < 65536 {
        let chunk = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("first 64 KiB arrive while the source is stalled")
            .unwrap()
            .unwrap();
        got.extend_from_slice(&chunk);
    }
    assert_eq!(got, data[..65536]);
    // Nothing more while stalled.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), stream.next())
            .await
            .is_err()
    );
    assert_eq!(stalling.stalled_count(), 1);
    assert_eq!(front.bytes_sent_matching("/blobs/"), 65536);
    // Release: the rest flows through both relays.
    stalling.release_stalled();
    while let Some(chunk) = stream.next().await {
        got.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(got, data);
    assert!(wait_until(Duration::from_secs(2), || stalling.stalled_count() == 0).await);
}

#[tokio::test]
async fn relay_status_faults_times_retry_after_and_path_filter() {
    let up = StaticRegistry::start();
    let img = up.put_image("lib/x", "v1", &[&blob(100, 5)]);
    let relay = FaultRelay::start(&up.url());
    relay.set_match("/blobs/");
    relay.status(503, None, Some(1));
    let c = client();
    let blob_url = format!("{}/v2/lib/x/blobs/{}", relay.url(), img.layer_digests[0]);
    let manifest_url = format!("{}/v2/lib/x/manifests/v1", relay.url());
    // Manifests do not match the filter.
    assert_eq!(c.get(&manifest_url).send().await.unwrap().status(), 200);
    let r = c.get(&blob_url).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "UNAVAILABLE");
    // times = 1: the next one passes through.
    let r = c.get(&blob_url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().as_ref(), &blob(100, 5)[..]);
    assert!(relay.faults().is_empty());
    assert_eq!(
        up.requests_matching("GET", "/blobs/"),
        1,
        "the 503 never reached upstream"
    );

    relay.status(429, Some(7), None);
    for _ in 0..2 {
        let r = c.get(&blob_url).send().await.unwrap();
        assert_eq!(r.status(), 429);
        assert_eq!(header(&r, "retry-after"), "7");
        assert_eq!(
            r.json::<serde_json::Value>().await.unwrap()["errors"][0]["code"],
            "TOOMANYREQUESTS"
        );
    }
    relay.match_all();
    relay.status(404, None, None);
    let r = c.head(&manifest_url).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let r = c.get(&manifest_url).send().await.unwrap();
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["errors"][0]["code"],
        "MANIFEST_UNKNOWN"
    );
    relay.status(500, None, None);
    assert_eq!(c.get(&manifest_url).send().await.unwrap().status(), 500);
    relay.clear_faults();
    assert_eq!(c.get(&manifest_url).send().await.unwrap().status(), 200);

    // Per-rule scope: only HEAD manifests, twice.
    relay.inject(
        FaultRule::new(Fault::Status {
            code: 503,
            retry_after: None,
        })
        .path("/manifests/")
        .method("HEAD")
        .times(2),
    );
    assert_eq!(c.get(&manifest_url).send().await.unwrap().status(), 200);
    assert_eq!(c.head(&manifest_url).send().await.unwrap().status(), 503);
    assert_eq!(c.head(&manifest_url).send().await.unwrap().status(), 503);
    assert_eq!(c.head(&manifest_url).send().await.unwrap().status(), 200);
}

#[tokio::test]
async fn relay_reset_after_gives_incomplete_body() {
    let up = StaticRegistry::start();
    let data = blob(500_000, 6);
    let digest = up.put_blob("r", data.clone());
    let relay = FaultRelay::start(&up.url());
    relay.inject(
        FaultRule::new(Fault::ResetAfter(123_457))
            .path("/blobs/")
            .times(1),
    );
    let url = format!("{}/v2/r/blobs/{digest}", relay.url());
    let r = client().get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-length"), "500000");
    let (got, err) = read_body(r).await;
    let err = err.expect("the body must fail");
    assert!(
        err.is_body() || err.is_decode() || err.is_request(),
        "{err:?}"
    );
    assert_eq!(got.len(), 123_457, "exactly the first N bytes arrive");
    assert_eq!(got, data[..123_457]);
    assert_eq!(relay.bytes_sent_matching("/blobs/"), 123_457);
    // A resume with Range then passes (the rule was used up).
    let r = client()
        .get(&url)
        .header("range", "bytes=123457-")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().await.unwrap().as_ref(), &data[123_457..]);
    assert_eq!(
        relay.ranges_seen("/blobs/"),
        vec!["bytes=123457-".to_string()]
    );
    // reqwest's whole-body reader errors too.
    relay.reset_after(10);
    assert!(client()
        .get(&url)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .is_err());
}

#[tokio::test]
async fn relay_reset_after_delivers_exactly_n_bytes_to_a_slow_reader() {
    // The client pauses while the relay reaches the reset point with the socket full: hyper
    // still holds unflushed bytes then, and the relay must wait for them to reach the socket
    // before closing. Several N around the loopback buffer capacity.
    let up = StaticRegistry::start();
    let data = blob(12 << 20, 17);
    let digest = up.put_blob("r", data.clone());
    let mut tasks = Vec::new();
    for k in 1..=10u64 {
        let n = k * (1 << 20) / 2 + 7 * k;
        let relay = FaultRelay::start(&up.url());
        relay.reset_after(n);
        let url = format!("{}/v2/r/blobs/{digest}", relay.url());
        let data = data.clone();
        tasks.push(tokio::spawn(async move {
            let r = client().get(&url).send().await.unwrap();
            // Wait until the relay reached the reset point or is blocked by the full socket.
            let mut last = (u64::MAX, Instant::now());
            let settled = wait_until(Duration::from_secs(10), || {
                let sent = relay.bytes_sent_matching("/blobs/");
                if sent != last.0 {
                    last = (sent, Instant::now());
                }
                sent == n || last.1.elapsed() > Duration::from_millis(300)
            })
            .await;
            assert!(settled);
            tokio::time::sleep(Duration::from_millis(200)).await;
            let (got, err) = read_body(r).await;
            assert!(err.is_some());
            assert_eq!(got.len() as u64, n, "N = {n}");
            assert_eq!(got, data[..n as usize]);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test]
async fn relay_stall_after_hangs_until_released_or_dropped() {
    let up = StaticRegistry::start();
    let data = blob(200_000, 7);
    let digest = up.put_blob("r", data.clone());
    let relay = FaultRelay::start(&up.url());
    relay.stall_after(1000);
    let url = format!("{}/v2/r/blobs/{digest}", relay.url());
    let r = client().get(&url).send().await.unwrap();
    let mut stream = r.bytes_stream();
    let mut got = Vec::new();
    while got.len() < 1000 {
        got.extend_from_slice(&stream.next().await.unwrap().unwrap());
    }
    assert_eq!(got.len(), 1000);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), stream.next())
            .await
            .is_err()
    );
    assert!(wait_until(Duration::from_secs(2), || relay.stalled_count() == 1).await);
    // Dropping the relay drops the connection: the client sees the body end in an error.
    drop(relay);
    let next = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("connection closed on drop");
    assert!(matches!(next, Some(Err(_))), "{next:?}");
}

#[tokio::test]
async fn relay_corrupt_flips_exactly_one_byte() {
    let up = StaticRegistry::start();
    let data = blob(300_000, 8);
    let digest = up.put_blob("r", data.clone());
    let relay = FaultRelay::start(&up.url());
    relay.corrupt_at(200_001);
    let got = client()
        .get(format!("{}/v2/r/blobs/{digest}", relay.url()))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(got.len(), data.len());
    let diffs: Vec<usize> = (0..data.len()).filter(|&i| got[i] != data[i]).collect();
    assert_eq!(diffs, vec![200_001]);
    assert_eq!(got[200_001], data[200_001] ^ 0xFF);
}

#[tokio::test]
async fn relay_ignore_range_serves_whole_body() {
    let up = StaticRegistry::start();
    let data = blob(50_000, 9);
    let digest = up.put_blob("r", data.clone());
    let relay = FaultRelay::start(&up.url());
    relay.ignore_range();
    let r = client()
        .get(format!("{}/v2/r/blobs/{digest}", relay.url()))
        .header("range", "bytes=1000-")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().len(), data.len());
    assert_eq!(
        relay.ranges_seen("/blobs/"),
        vec!["bytes=1000-".to_string()]
    );
    assert_eq!(
        up.traffic().requests()[0].range,
        None,
        "upstream saw no Range"
    );
}

#[tokio::test]
async fn relay_throttle_and_latency() {
    let up = StaticRegistry::start();
    let data = blob(200_000, 10);
    let digest = up.put_blob("r", data.clone());
    let relay = FaultRelay::start(&up.url());
    let url = format!("{}/v2/r/blobs/{digest}", relay.url());
    relay.throttle(1_000_000); // 200 KB at 1 MB/s: ~200 ms
    let t = Instant::now();
    let got = client()
        .get(&url)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let el = t.elapsed();
    assert_eq!(got.as_ref(), &data[..]);
    assert!(
        el >= Duration::from_millis(180),
        "throttled body took {el:?}"
    );
    assert!(el < Duration::from_secs(3), "{el:?}");
    relay.clear_faults();
    relay.latency(Duration::from_millis(300));
    let t = Instant::now();
    let r = client().head(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(t.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn relay_unreachable_and_back() {
    let up = StaticRegistry::start();
    let relay = FaultRelay::start(&up.url());
    let c = client();
    let url = format!("{}/v2/", relay.url());
    assert_eq!(c.get(&url).send().await.unwrap().status(), 200);
    relay.set_reachable(false);
    let err = c.get(&url).send().await.unwrap_err();
    assert!(err.is_connect() || err.is_request(), "{err:?}");
    // Fresh clients are refused at connect.
    assert!(
        wait_until(Duration::from_secs(2), || std::net::TcpStream::connect(
            relay.addr()
        )
        .is_err())
        .await
    );
    relay.set_reachable(true);
    assert_eq!(client().get(&url).send().await.unwrap().status(), 200);
    // Upstream down: the relay answers 502.
    drop(up);
    let r = client().get(&url).send().await.unwrap();
    assert_eq!(r.status(), 502);
}

// ---------------------------------------------------------------------------------------------
// TokenAuthFront
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn token_front_anonymous_flow_and_scope_binding() {
    let up = StaticRegistry::start();
    let img = up.put_image("library/alpine", "3", &[&blob(64, 11)]);
    up.put_image("library/other", "1", &[&blob(64, 12)]);
    let hub = TokenAuthFront::start(&up.url());
    let c = client();
    let murl = format!("{}/v2/library/alpine/manifests/3", hub.url());

    let r = c.get(&murl).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let ch = header(&r, "www-authenticate");
    assert!(ch.starts_with("Bearer "), "{ch}");
    let p = challenge_params(&ch);
    assert_eq!(param(&p, "realm").unwrap(), hub.realm());
    assert_eq!(param(&p, "service").unwrap(), "registry.docker.io");
    assert_eq!(
        param(&p, "scope").unwrap(),
        "repository:library/alpine:pull"
    );

    // /v2/ challenge has no scope.
    let r = c.get(format!("{}/v2/", hub.url())).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(!header(&r, "www-authenticate").contains("scope="));

    let tok: serde_json::Value = c
        .get(hub.realm())
        .query(&[
            ("service", "registry.docker.io"),
            ("scope", "repository:library/alpine:pull"),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = tok["token"].as_str().unwrap().to_string();
    assert_eq!(tok["access_token"], tok["token"]);
    assert_eq!(tok["expires_in"], 300);
    let issued = tok["issued_at"].as_str().unwrap();
    assert!(
        issued.len() == 20 && issued.ends_with('Z') && issued.as_bytes()[10] == b'T',
        "{issued}"
    );

    let r = c.get(&murl).bearer_auth(&token).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), img.manifest);
    assert_eq!(
        up.traffic().requests()[0].authorization,
        None,
        "the front strips Authorization before upstream"
    );
    let r = c
        .get(format!("{}/v2/", hub.url()))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // Token for alpine does not cover library/other.
    let r = c
        .get(format!("{}/v2/library/other/manifests/1", hub.url()))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let ch = header(&r, "www-authenticate");
    assert!(
        ch.contains("scope=\"repository:library/other:pull\""),
        "{ch}"
    );
    assert!(ch.contains("error=\"insufficient_scope\""), "{ch}");
    // Anonymous gets no push.
    let r = c
        .post(format!("{}/v2/library/alpine/blobs/uploads/", hub.url()))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(header(&r, "www-authenticate").contains("repository:library/alpine:pull,push"));
    // Unknown token.
    let r = c.get(&murl).bearer_auth("forged").send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(header(&r, "www-authenticate").contains("invalid_token"));
    // Wrong service.
    let r = c
        .get(hub.realm())
        .query(&[
            ("service", "other"),
            ("scope", "repository:library/alpine:pull"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    assert_eq!(hub.token_requests(), 2);
    assert_eq!(hub.token_requests_for("repository:library/alpine:pull"), 2);
    assert_eq!(hub.token_rejections(), 1);
    assert!(hub.challenges() >= 5);
    hub.revoke_tokens();
    assert_eq!(
        c.get(&murl)
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
}

#[tokio::test]
async fn token_front_credentials_and_expiry() {
    let up = StaticRegistry::start();
    up.put_image("acme/app", "v1", &[&blob(64, 13)]);
    let hub = TokenAuthFront::start_with(
        &up.url(),
        TokenAuthConfig {
            credentials: Some(("alice".into(), "pat-123".into())),
            allow_anonymous: false,
            expires_in: 2,
            ..TokenAuthConfig::default()
        },
    );
    let c = client();
    let q = [
        ("service", "registry.docker.io"),
        ("scope", "repository:acme/app:pull"),
    ];
    let r = c.get(hub.realm()).query(&q).send().await.unwrap();
    assert_eq!(r.status(), 401, "anonymous refused");
    let r = c
        .get(hub.realm())
        .query(&q)
        .basic_auth("alice", Some("wrong"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "wrong password refused");
    let r = c
        .get(hub.realm())
        .query(&q)
        .basic_auth("bob", Some("pat-123"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "wrong user refused");
    let tok: serde_json::Value = c
        .get(hub.realm())
        .query(&q)
        .basic_auth("alice", Some("pat-123"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(tok["expires_in"], 2);
    let token = tok["token"].as_str().unwrap().to_string();
    let murl = format!("{}/v2/acme/app/manifests/v1", hub.url());
    assert_eq!(
        c.get(&murl)
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(hub.token_requests(), 4);
    assert_eq!(hub.token_rejections(), 3);
    // Expires after 2 s.
    let c2 = c.clone();
    let (m2, t2) = (murl.clone(), token.clone());
    let expired = tokio::time::timeout(Duration::from_secs(5), async move {
        loop {
            if c2.get(&m2).bearer_auth(&t2).send().await.unwrap().status()
                == StatusCode::UNAUTHORIZED
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(expired.is_ok(), "token still accepted after expires_in");
    // Authenticated users get push too.
    let tok: serde_json::Value = c
        .get(hub.realm())
        .query(&[
            ("service", "registry.docker.io"),
            ("scope", "repository:acme/app:pull,push"),
        ])
        .basic_auth("alice", Some("pat-123"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let r = c
        .post(format!("{}/v2/acme/app/blobs/uploads/", hub.url()))
        .bearer_auth(tok["token"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405, "auth passed; StaticRegistry is read-only");
}

// ---------------------------------------------------------------------------------------------
// ECR
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn ecr_verifies_sigv4_and_mints_passwords() {
    let up = StaticRegistry::start();
    let img = up.put_image("team/svc", "v1", &[&blob(5000, 14)]);
    let ecr = EcrDouble::start(&up.url());
    let cfg = ecr.config();
    let c = client();

    // Wrong secret.
    let r = ecr
        .get_authorization_token(&cfg.access_key_id, "not-the-secret")
        .await;
    assert_eq!(r.status(), 403);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["__type"], "InvalidSignatureException");
    // Unknown access key.
    let r = ecr
        .get_authorization_token("AKIAUNKNOWN000000000", &cfg.secret_access_key)
        .await;
    assert_eq!(r.status(), 403);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["__type"],
        "UnrecognizedClientException"
    );
    // Unsigned.
    let r = c
        .post(format!("{}/", ecr.api_url()))
        .header("x-amz-target", ECR_GET_AUTHORIZATION_TOKEN)
        .header("content-type", "application/x-amz-json-1.1")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // Signed for another region.
    let url = format!("{}/", ecr.api_url());
    let host = ecr.api_url().trim_start_matches("http://").to_string();
    let hdrs = [
        ("content-type", "application/x-amz-json-1.1"),
        ("x-amz-target", ECR_GET_AUTHORIZATION_TOKEN),
        ("host", host.as_str()),
    ];
    let signed = sigv4_sign(
        "POST",
        &url,
        &hdrs,
        b"{}",
        &cfg.access_key_id,
        &cfg.secret_access_key,
        "eu-west-3",
        "ecr",
        std::time::SystemTime::now(),
    );
    let mut rb = c.post(&url).body("{}");
    for (k, v) in hdrs.iter().filter(|h| h.0 != "host") {
        rb = rb.header(*k, *v);
    }
    for (k, v) in &signed {
        rb = rb.header(k, v);
    }
    assert_eq!(rb.send().await.unwrap().status(), 403);
    // Tampered body after signing.
    let signed = sigv4_sign(
        "POST",
        &url,
        &hdrs,
        b"{}",
        &cfg.access_key_id,
        &cfg.secret_access_key,
        &cfg.region,
        "ecr",
        std::time::SystemTime::now(),
    );
    let mut rb = c.post(&url).body("{\"registryIds\":[\"1\"]}");
    for (k, v) in hdrs.iter().filter(|h| h.0 != "host") {
        rb = rb.header(*k, *v);
    }
    for (k, v) in &signed {
        rb = rb.header(k, v);
    }
    assert_eq!(rb.send().await.unwrap().status(), 403);
    assert_eq!(ecr.signature_failures(), 5);
    assert_eq!(ecr.token_calls(), 0);

    // Correct signature.
    let r = ecr
        .get_authorization_token(&cfg.access_key_id, &cfg.secret_access_key)
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-type"), "application/x-amz-json-1.1");
    let body: serde_json::Value = r.json().await.unwrap();
    let data = &body["authorizationData"][0];
    assert_eq!(data["proxyEndpoint"], ecr.registry_url());
    let expires_at = data["expiresAt"].as_f64().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (expires_at - now - 12.0 * 3600.0).abs() < 60.0,
        "{expires_at} vs {now}"
    );
    let decoded = String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(data["authorizationToken"].as_str().unwrap())
            .unwrap(),
    )
    .unwrap();
    let password1 = decoded
        .strip_prefix("AWS:")
        .expect("AWS:password")
        .to_string();
    assert_eq!(ecr.token_calls(), 1);

    // Registry: no auth / wrong password → 401 Basic challenge.
    let murl = format!("{}/v2/team/svc/manifests/v1", ecr.registry_url());
    let r = c.get(&murl).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        header(&r, "www-authenticate"),
        format!(
            "Basic realm=\"{}/\",service=\"ecr.amazonaws.com\"",
            ecr.registry_url()
        )
    );
    assert_eq!(
        c.get(&murl)
            .basic_auth("AWS", Some("nope"))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(
        c.get(&murl)
            .basic_auth("other", Some(&password1))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    let r = c
        .get(&murl)
        .basic_auth("AWS", Some(&password1))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), img.manifest);

    // A second call mints another password; the first stays valid.
    let r = ecr
        .get_authorization_token(&cfg.access_key_id, &cfg.secret_access_key)
        .await;
    let body: serde_json::Value = r.json().await.unwrap();
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(
            body["authorizationData"][0]["authorizationToken"]
                .as_str()
                .unwrap(),
        )
        .unwrap();
    let password2 = String::from_utf8(decoded).unwrap()[4..].to_string();
    assert_ne!(password1, password2);
    assert_eq!(ecr.valid_passwords(), 2);
    assert_eq!(
        c.get(&murl)
            .basic_auth("AWS", Some(&password1))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        c.get(&murl)
            .basic_auth("AWS", Some(&password2))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    // Blob redirect to a pre-signed object store URL that refuses Authorization.
    ecr.redirect_blobs(true);
    let burl = format!(
        "{}/v2/team/svc/blobs/{}",
        ecr.registry_url(),
        img.layer_digests[0]
    );
    let r = c
        .get(&burl)
        .basic_auth("AWS", Some(&password2))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 307);
    let location = header(&r, "location");
    assert!(
        location.starts_with(&ecr.object_store().url()),
        "{location}"
    );
    let r = c
        .get(&location)
        .basic_auth("AWS", Some(&password2))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(ecr.object_store().rejected_with_auth(), 1);
    let r = c
        .get(&location)
        .header("range", "bytes=0-99")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(header(&r, "docker-content-digest"), "");
    assert_eq!(r.bytes().await.unwrap().as_ref(), &blob(5000, 14)[..100]);
    assert_eq!(
        c.get(format!(
            "{}&x=1",
            location.replace("Signature=", "Signature=00")
        ))
        .send()
        .await
        .unwrap()
        .status(),
        403
    );

    // Expiry.
    ecr.expire_passwords();
    assert_eq!(
        c.get(&murl)
            .basic_auth("AWS", Some(&password2))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    ecr.set_token_validity(Duration::from_millis(1500));
    let body: serde_json::Value = ecr
        .get_authorization_token(&cfg.access_key_id, &cfg.secret_access_key)
        .await
        .json()
        .await
        .unwrap();
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(
            body["authorizationData"][0]["authorizationToken"]
                .as_str()
                .unwrap(),
        )
        .unwrap();
    let password3 = String::from_utf8(decoded).unwrap()[4..].to_string();
    assert_eq!(
        c.get(&murl)
            .basic_auth("AWS", Some(&password3))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let (c2, m2) = (c.clone(), murl.clone());
    let expired = tokio::time::timeout(Duration::from_secs(5), async move {
        while c2
            .get(&m2)
            .basic_auth("AWS", Some(&password3))
            .send()
            .await
            .unwrap()
            .status()
            != StatusCode::UNAUTHORIZED
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        expired.is_ok(),
        "password still accepted after its validity"
    );
    assert_eq!(ecr.token_calls(), 3);
}

#[tokio::test]
async fn ecr_accepts_sdk_style_signature_with_extra_signed_headers() {
    // A client that also signs content-length and x-amz-content-sha256 (as some SDKs do).
    let up = StaticRegistry::start();
    let ecr = EcrDouble::start_with(
        &up.url(),
        EcrConfig {
            region: "ap-south-1".into(),
            ..EcrConfig::default()
        },
    );
    let cfg = ecr.config();
    let url = format!("{}/", ecr.api_url());
    let host = ecr.api_url().trim_start_matches("http://").to_string();
    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(b"{}"));
    let hdrs = [
        ("content-type", "application/x-amz-json-1.1"),
        ("x-amz-target", ECR_GET_AUTHORIZATION_TOKEN),
        ("content-length", "2"),
        ("x-amz-content-sha256", sha.as_str()),
        ("host", host.as_str()),
    ];
    let signed = sigv4_sign(
        "POST",
        &url,
        &hdrs,
        b"{}",
        &cfg.access_key_id,
        &cfg.secret_access_key,
        &cfg.region,
        "ecr",
        std::time::SystemTime::now(),
    );
    let auth = &signed.iter().find(|h| h.0 == "authorization").unwrap().1;
    assert!(
        auth.contains(
            "content-length;content-type;host;x-amz-content-sha256;x-amz-date;x-amz-target"
        ),
        "{auth}"
    );
    let mut rb = client().post(&url).body("{}");
    for (k, v) in hdrs
        .iter()
        .filter(|h| h.0 != "host" && h.0 != "content-length")
    {
        rb = rb.header(*k, *v);
    }
    for (k, v) in &signed {
        rb = rb.header(k, v);
    }
    let r = rb.send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    assert_eq!(ecr.token_calls(), 1);
}

// ---------------------------------------------------------------------------------------------
// BasicAuthFront
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn basic_front_accepts_and_rejects() {
    let up = StaticRegistry::start();
    let img = up.put_image("proj/app", "v1", &[&blob(64, 15)]);
    let c = client();
    let key = "{\n  \"type\": \"service_account\",\n  \"private_key\": \"-----BEGIN PRIVATE KEY-----\\nabc\"\n}";
    let gcr = BasicAuthFront::json_key(&up.url(), key);
    let quay = BasicAuthFront::quay(&up.url(), "org+robot", "QUAYTOKEN");
    for (front, user, pass) in [(&gcr, "_json_key", key), (&quay, "org+robot", "QUAYTOKEN")] {
        let murl = format!("{}/v2/proj/app/manifests/v1", front.url());
        let r = c.get(&murl).send().await.unwrap();
        assert_eq!(r.status(), 401);
        assert_eq!(
            header(&r, "www-authenticate"),
            "Basic realm=\"berth-basic-front\""
        );
        assert_eq!(
            c.get(&murl)
                .header("authorization", basic(user, "bad"))
                .send()
                .await
                .unwrap()
                .status(),
            401
        );
        let r = c
            .get(&murl)
            .header("authorization", basic(user, pass))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.bytes().await.unwrap(), img.manifest);
        assert_eq!(front.accepted(), 1);
        assert_eq!(front.rejected(), 2);
        assert_eq!(front.requests_matching("GET", "/manifests/"), 3);
    }
    quay.set_credentials("org+robot", "ROTATED");
    let murl = format!("{}/v2/proj/app/manifests/v1", quay.url());
    assert_eq!(
        c.get(&murl)
            .header("authorization", basic("org+robot", "QUAYTOKEN"))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(
        c.get(&murl)
            .header("authorization", basic("org+robot", "ROTATED"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

// ---------------------------------------------------------------------------------------------
// distribution with htpasswd, behind a relay (Authorization and pushes forwarded)
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn htpasswd_registry_through_relay() {
    let reg = tokio::task::spawn_blocking(|| HtpasswdRegistry::start("alice", "s3cret"))
        .await
        .unwrap();
    let relay = FaultRelay::start(&reg.url());
    let c = client();
    let r = c.get(format!("{}/v2/", relay.url())).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(header(&r, "www-authenticate"), "Basic realm=\"berth-test\"");
    let auth = reg.basic_auth_header();
    assert_eq!(
        c.get(format!("{}/v2/", relay.url()))
            .header("authorization", &auth)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        c.get(format!("{}/v2/", relay.url()))
            .basic_auth("alice", Some("wrong"))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );

    // Push a blob through the relay: POST, then PUT to the Location it returns.
    let data = blob(2 << 20, 16);
    let digest = sha256_digest(&data);
    let r = c
        .post(format!("{}/v2/team/app/blobs/uploads/", relay.url()))
        .header("authorization", &auth)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let location = header(&r, "location");
    assert!(
        location.starts_with(&relay.url()),
        "Location points at the relay: {location}"
    );
    let sep = if location.contains('?') { '&' } else { '?' };
    let r = c
        .put(format!("{location}{sep}digest={digest}"))
        .header("authorization", &auth)
        .header("content-type", "application/octet-stream")
        .header("content-length", data.len().to_string())
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    // Read it back with a Range, then whole.
    let burl = format!("{}/v2/team/app/blobs/{digest}", relay.url());
    let r = c
        .get(&burl)
        .header("authorization", &auth)
        .header("range", "bytes=0-9")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().await.unwrap().as_ref(), &data[..10]);
    let r = c
        .get(&burl)
        .header("authorization", &auth)
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap().as_ref(), &data[..]);
    assert_eq!(c.get(&burl).send().await.unwrap().status(), 401);
    assert_eq!(relay.ranges_seen("/blobs/"), vec!["bytes=0-9".to_string()]);
    assert!(relay
        .traffic()
        .requests()
        .iter()
        .any(|r| r.method == "PUT" && r.authorization.as_deref() == Some(auth.as_str())));
    tokio::task::spawn_blocking(move || drop(reg))
        .await
        .unwrap();
}

#[tokio::test]
async fn static_registry_loads_an_oci_layout() {
    let dir = tempfile::tempdir().unwrap();
    let idx = tokio::task::spawn_blocking({
        let p = dir.path().to_path_buf();
        move || common::oci_layout::build_multiarch_index(&p, "multi", 1000)
    })
    .await
    .unwrap();
    let up = StaticRegistry::start();
    let tags = up.put_layout("library/multi", dir.path());
    assert_eq!(tags, vec![("multi".to_string(), idx.index.digest.clone())]);
    let c = client();
    let r = c
        .get(format!("{}/v2/library/multi/manifests/multi", up.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "docker-content-digest"), idx.index.digest);
    assert_eq!(header(&r, "content-type"), idx.index.media_type);
    for d in idx.all_digests() {
        let kind = if idx.images.iter().any(|i| i.manifest.digest == d) || d == idx.index.digest {
            "manifests"
        } else {
            "blobs"
        };
        let r = c
            .head(format!("{}/v2/library/multi/{kind}/{d}", up.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{kind} {d}");
    }
}
