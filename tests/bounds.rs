//! Every connection, body and upload session is bounded (issue 9, items 7-9): connection cap,
//! first-request and idle deadlines (h1 and h2c), stalled request and response bodies, upload
//! session caps and expiry, idle sessions without file descriptors, bodies without
//! `Content-Length` and `Content-Range` checked against the bytes that arrived.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::metrics::metric_value;
use common::server::{error_of, header, sha256, TestServer};
use reqwest::{Client, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Generous bound for something the server must do within a short configured deadline: the
/// test fails only if it never happens (or happens on today's 30 s or unbounded timers).
const WITHIN: Duration = Duration::from_secs(12);

/// Reads until the server closes the connection; returns what it sent. Panics if it stays open
/// past `WITHIN`.
async fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let deadline = Instant::now() + WITHIN;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Err(_) => panic!(
                "the server kept the connection open for {WITHIN:?}; it sent {:?}",
                String::from_utf8_lossy(&got[..got.len().min(300)])
            ),
            Ok(Ok(0)) | Ok(Err(_)) => return got,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// Polls `cond` until it holds; panics after `WITHIN`.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WITHIN;
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: not within {WITHIN:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// File descriptors of this process (servers run in-process) open on `path`.
fn fds_on(path: &Path) -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target == path)
        .count()
}

fn blob_path(s: &TestServer, digest: &str) -> PathBuf {
    let hex = digest.trim_start_matches("sha256:");
    s.dir
        .path()
        .join("data/blobs/sha256")
        .join(&hex[..2])
        .join(hex)
}

async fn start_upload(s: &TestServer, repo: &str) -> String {
    let r = s
        .client
        .post(s.url(&format!("/v2/{repo}/blobs/uploads/")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    header(&r, "location")
}

async fn upload_offset(s: &TestServer, location: &str) -> String {
    let r = s.get(location).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    header(&r, "range")
}

/// A body sent in pieces without a length: chunked on HTTP/1.1, DATA frames on h2.
fn streamed(data: &[u8]) -> reqwest::Body {
    let pieces: Vec<Result<Vec<u8>, std::io::Error>> =
        data.chunks(7000).map(|c| Ok(c.to_vec())).collect();
    reqwest::Body::wrap_stream(futures_util::stream::iter(pieces))
}

fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Item 7: connections

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed_at_the_first_byte_deadline() {
    let s = TestServer::start("[limits]\nfirst_byte_timeout = \"1s\"\n").await;
    let mut silent = TcpStream::connect(s.addr()).await.unwrap();
    let got = read_until_closed(&mut silent).await;
    assert!(got.is_empty(), "nothing was asked, nothing answered");
    // The same for h2c: the preface and a SETTINGS frame, then nothing.
    let mut h2 = TcpStream::connect(s.addr()).await.unwrap();
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    let got = read_until_closed(&mut h2).await;
    assert!(
        !got.is_empty(),
        "the server spoke h2 (its SETTINGS) before closing"
    );
    // A connection that does send a request is served.
    assert_eq!(s.get("/healthz").await.status(), StatusCode::OK);
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_at_the_idle_deadline() {
    let s = TestServer::start("[limits]\nidle_timeout = \"1s\"\n").await;
    let mut c = TcpStream::connect(s.addr()).await.unwrap();
    c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let got = read_until_closed(&mut c).await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.ends_with("ok\n"),
        "one response, then the close: {text}"
    );
    // h2c: one request (HEADERS with :method GET, :scheme http, :path / from HPACK's static
    // table), its answer, then the idle deadline closes the connection.
    let mut h2 = TcpStream::connect(s.addr()).await.unwrap();
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    h2.write_all(b"\0\0\x03\x01\x05\0\0\0\x01\x82\x86\x84")
        .await
        .unwrap();
    let got = read_until_closed(&mut h2).await;
    assert!(
        got.windows(6)
            .any(|w| w[0] == 1 && w[1] & 4 != 0 && w[2..] == [0, 0, 0, 1]),
        "the answer (HEADERS on stream 1) came before the close"
    );
}

/// A keep-alive connection that has been served one request (so it holds a slot), or `None`
/// when the server closed it at once.
async fn served_connection(addr: &str) -> Option<TcpStream> {
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .ok()?;
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.ends_with(b"ok\n") {
        match tokio::time::timeout(WITHIN, c.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return None,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!("no answer and no close"),
        }
    }
    Some(c)
}

#[tokio::test]
async fn connections_over_the_cap_are_closed_at_once_and_counted() {
    let s = TestServer::start("[limits]\nmax_connections = 2\n").await;
    // No pooled connection of the test's own may hold a slot.
    let fresh = || Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let before = metric_value(
        &fresh()
            .get(s.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
        "berth_connections_over_limit_total",
        &[],
    );
    let deadline = Instant::now() + WITHIN;
    let mut held = Vec::new();
    while held.len() < 2 {
        assert!(Instant::now() < deadline, "two connections were not served");
        held.extend(served_connection(&s.addr()).await);
    }
    // Both slots are held by served connections: a third is closed without an answer.
    let mut third = TcpStream::connect(s.addr()).await.unwrap();
    let _ = third
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    assert!(read_until_closed(&mut third).await.is_empty());
    // Freeing a slot serves again.
    drop(held.pop());
    loop {
        assert!(Instant::now() < deadline, "a freed slot was not reused");
        if let Ok(r) = fresh().get(s.url("/healthz")).send().await {
            assert_eq!(r.status(), StatusCode::OK);
            break;
        }
    }
    drop(held);
    let mut text = String::new();
    while !text.contains("berth_open_connections") {
        assert!(Instant::now() < deadline, "no /metrics answer");
        if let Ok(r) = fresh().get(s.url("/metrics")).send().await {
            text = r.text().await.unwrap();
        }
    }
    assert!(
        metric_value(&text, "berth_connections_over_limit_total", &[]) >= before + 1.0,
        "refusals are counted: {text}"
    );
}

/// Sends a request head and part of its body, then stalls; the server must answer or close.
async fn stalled_request(s: &TestServer, head: &str, part: &[u8]) -> String {
    let mut c = TcpStream::connect(s.addr()).await.unwrap();
    c.write_all(head.as_bytes()).await.unwrap();
    c.write_all(part).await.unwrap();
    String::from_utf8_lossy(&read_until_closed(&mut c).await).into_owned()
}

#[tokio::test]
async fn request_bodies_that_stall_are_cut_at_the_body_idle_deadline() {
    let s = TestServer::start("[limits]\nbody_idle_timeout = \"1s\"\n").await;
    // Blob PATCH: the bytes that arrived stay in the session.
    let loc = start_upload(&s, "library/stall").await;
    let answer = stalled_request(
        &s,
        &format!("PATCH {loc} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"),
        &[7u8; 10],
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("client sent nothing"), "{answer}");
    assert_eq!(upload_offset(&s, &loc).await, "0-9");
    // Manifest PUT.
    let answer = stalled_request(
        &s,
        "PUT /v2/library/stall/manifests/t HTTP/1.1\r\nHost: x\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\nContent-Length: 500\r\n\r\n",
        b"{\"schemaVersion\"",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("client sent nothing"), "{answer}");
    // Token form.
    let answer = stalled_request(
        &s,
        "POST /service/token HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 200\r\n\r\n",
        b"grant_type=pass",
    )
    .await;
    assert!(answer.contains("client sent nothing"), "{answer}");
    // JSON API.
    let answer = stalled_request(
        &s,
        "POST /api/v1/registries HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n",
        b"{\"name\":",
    )
    .await;
    assert!(answer.contains("client sent nothing"), "{answer}");
    // Monolithic blob upload: nothing is left in the temp directory.
    let answer = stalled_request(
        &s,
        &format!(
            "POST /v2/library/stall/blobs/uploads/?digest={} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n",
            sha256(&[1u8; 100])
        ),
        &[1u8; 10],
    )
    .await;
    assert!(answer.contains("client sent nothing"), "{answer}");
    let tmp = s.dir.path().join("data/tmp");
    assert_eq!(std::fs::read_dir(tmp).unwrap().count(), 0);
}

#[tokio::test]
async fn a_client_that_stops_reading_a_blob_is_cut_and_the_file_released() {
    let s = TestServer::start("[limits]\nsend_stall_timeout = \"2s\"\n").await;
    let len = 48 << 20;
    let blob = data(len, 3);
    let d = s.push_blob("library/big", &blob).await;
    let path = blob_path(&s, &d);
    assert_eq!(fds_on(&path), 0);
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut c = socket.connect(s.addr().parse().unwrap()).await.unwrap();
    c.write_all(format!("GET /v2/library/big/blobs/{d} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    // The response starts (the blob is open), then the client reads nothing more.
    eventually("the blob is opened for the response", || fds_on(&path) > 0).await;
    eventually("the stalled response releases the blob file", || {
        fds_on(&path) == 0
    })
    .await;
    let got = read_until_closed(&mut c).await;
    assert!(
        got.len() < len,
        "the connection was cut before the whole blob ({} of {len} bytes)",
        got.len()
    );
    // h2c: the client's stack keeps reading the socket but the application reads nothing, so
    // flow control stops the stream (no write ever blocks): the reader task gives up the file.
    let h2 = Client::builder().http2_prior_knowledge().build().unwrap();
    let stalled = h2
        .get(s.url(&format!("/v2/library/big/blobs/{d}")))
        .send()
        .await
        .unwrap();
    assert_eq!(stalled.version(), reqwest::Version::HTTP_2);
    eventually("the blob is opened for the h2 response", || {
        fds_on(&path) > 0
    })
    .await;
    eventually(
        "the h2 stream that nobody reads releases the blob file",
        || fds_on(&path) == 0,
    )
    .await;
    let cut = stalled.bytes().await;
    assert!(
        cut.as_ref().map_or(true, |b| b.len() < len),
        "the stalled h2 response was cut"
    );
    // The server goes on serving the same blob to a reader that reads, on h1 and h2.
    let r = s.get(&format!("/v2/library/big/blobs/{d}")).await;
    assert_eq!(r.bytes().await.unwrap().len(), len);
    let r = h2
        .get(s.url(&format!("/v2/library/big/blobs/{d}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap().len(), len);
}

/// The same for a blob the cache is still fetching: an HTTP/2 client that follows the partial
/// file (a `Range`) and reads nothing holds the file no longer than the stall deadline, and the
/// blob is cached whole for the next client.
#[tokio::test]
async fn a_client_that_stops_reading_a_cold_blob_is_cut_and_the_file_released() {
    let source = common::doubles::StaticRegistry::start();
    let len = 48 << 20;
    let layer = data(len, 5);
    let image = source.put_image("library/app", "v1", &[&layer]);
    let d = image.layer_digests[0].clone();
    let stall = "[limits]\nsend_stall_timeout = \"2s\"\n";
    let toml = common::server::cache_toml("registry", &source.url(), "", stall);
    let edge = TestServer::start(&toml).await;
    let url = edge.url(&format!("/v2/hub/library/app/blobs/{d}"));
    let h2 = Client::builder().http2_prior_knowledge().build().unwrap();
    let stalled = h2
        .get(&url)
        .header("Range", "bytes=1-")
        .send()
        .await
        .unwrap();
    assert_eq!(stalled.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(stalled.version(), reqwest::Version::HTTP_2);
    // The fetch goes on without the client and commits; the reader's handle on the file it
    // wrote is then a handle on the blob.
    let path = blob_path(&edge, &d);
    eventually("the blob is cached", || path.exists()).await;
    eventually(
        "the h2 stream that nobody reads releases the fetched file",
        || fds_on(&path) == 0,
    )
    .await;
    let cut = stalled.bytes().await;
    assert!(
        cut.as_ref().map_or(true, |b| b.len() < len - 1),
        "the stalled h2 response was cut"
    );
    let whole = h2.get(&url).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(sha256(&whole), d);
}

// ---------------------------------------------------------------------------------------------
// Item 8: upload sessions

#[tokio::test]
async fn an_idle_upload_session_holds_no_file_descriptor() {
    let s = TestServer::start("").await;
    let loc = start_upload(&s, "library/fd").await;
    let r = s
        .client
        .patch(s.url(&loc))
        .body(vec![5u8; 1000])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let id = loc.rsplit('/').next().unwrap();
    let file = s.dir.path().join("data/uploads").join(id).join("data");
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 1000);
    assert_eq!(
        fds_on(&file),
        0,
        "the idle session keeps its data file open"
    );
    let r = s
        .client
        .put(s.url(&format!("{loc}?digest={}", sha256(&[5u8; 1000]))))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
}

#[tokio::test]
async fn upload_sessions_are_capped_per_repository_and_in_total() {
    let s = TestServer::start("[limits]\nmax_uploads_per_repository = 2\nmax_uploads = 3\n").await;
    let a1 = start_upload(&s, "library/a").await;
    let _a2 = start_upload(&s, "library/a").await;
    let r = s
        .client
        .post(s.url("/v2/library/a/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let (code, message) = error_of(r).await;
    assert_eq!(code, "TOOMANYREQUESTS");
    assert!(message.contains("library/a"), "{message}");
    let _b1 = start_upload(&s, "library/b").await;
    let r = s
        .client
        .post(s.url("/v2/library/c/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS, "total cap");
    assert_eq!(error_of(r).await.0, "TOOMANYREQUESTS");
    // A monolithic push needs no session and still works.
    s.push_blob("library/c", b"monolithic").await;
    // Cancelling one frees its place.
    let r = s.client.delete(s.url(&a1)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    start_upload(&s, "library/c").await;
}

#[tokio::test]
async fn dead_sessions_expire_and_never_hold_the_cap() {
    let s = TestServer::start("[limits]\nmax_uploads_per_repository = 1\nupload_expiry = \"1s\"\n")
        .await;
    let old = start_upload(&s, "library/x").await;
    // Until the old one is idle for the expiry it holds the cap; then it is expired to make room.
    let deadline = Instant::now() + WITHIN;
    let fresh = loop {
        assert!(Instant::now() < deadline, "the dead session kept the cap");
        let r = s
            .client
            .post(s.url("/v2/library/x/blobs/uploads/"))
            .send()
            .await
            .unwrap();
        if r.status() == StatusCode::ACCEPTED {
            break header(&r, "location");
        }
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_ne!(fresh, old);
    assert_eq!(s.get(&old).await.status(), StatusCode::NOT_FOUND);
    let id = old.rsplit('/').next().unwrap();
    assert!(!s.dir.path().join("data/uploads").join(id).exists());
    assert_eq!(upload_offset(&s, &fresh).await, "0-0");
}

// ---------------------------------------------------------------------------------------------
// Item 9: bodies without Content-Length; Content-Range against the bytes that arrived

async fn pushes_without_content_length(client: &Client, s: &TestServer, repo: &str) {
    // Monolithic POST ?digest=.
    let one = data(300_000, 1);
    let r = client
        .post(s.url(&format!(
            "/v2/{repo}/blobs/uploads/?digest={}",
            sha256(&one)
        )))
        .body(streamed(&one))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED, "POST ?digest=");
    // POST, then PUT ?digest= with the whole body.
    let two = data(200_000, 2);
    let loc = start_upload(s, repo).await;
    let r = client
        .put(s.url(&format!("{loc}?digest={}", sha256(&two))))
        .body(streamed(&two))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED, "PUT ?digest= with a body");
    // PATCH (twice) then PUT ?digest= with the last piece.
    let three = data(250_000, 3);
    let loc = start_upload(s, repo).await;
    for piece in [&three[..100_000], &three[100_000..200_000]] {
        let r = client
            .patch(s.url(&loc))
            .body(streamed(piece))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::ACCEPTED, "PATCH");
    }
    assert_eq!(upload_offset(s, &loc).await, "0-199999");
    let r = client
        .put(s.url(&format!("{loc}?digest={}", sha256(&three))))
        .body(streamed(&three[200_000..]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED, "PUT ?digest= after PATCH");
    // A wrong digest is still refused.
    let loc = start_upload(s, repo).await;
    let r = client
        .put(s.url(&format!("{loc}?digest={}", sha256(b"other"))))
        .body(streamed(&one))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(error_of(r).await.0, "DIGEST_INVALID");
    for blob in [&one, &two, &three] {
        let r = client
            .get(s.url(&format!("/v2/{repo}/blobs/{}", sha256(blob))))
            .send()
            .await
            .unwrap();
        assert_eq!(r.bytes().await.unwrap(), blob[..]);
    }
}

#[tokio::test]
async fn chunked_http1_bodies_are_accepted_and_verified() {
    let s = TestServer::start("").await;
    let client = Client::new();
    pushes_without_content_length(&client, &s, "library/chunked").await;
}

#[tokio::test]
async fn h2c_bodies_without_length_are_accepted_and_verified() {
    let s = TestServer::start("").await;
    let client = Client::builder().http2_prior_knowledge().build().unwrap();
    let r = client.get(s.url("/v2/")).send().await.unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    pushes_without_content_length(&client, &s, "library/h2").await;
}

#[tokio::test]
async fn content_range_is_enforced_against_the_bytes_that_arrived() {
    let s = TestServer::start("").await;
    let blob = data(30_000, 9);
    let loc = start_upload(&s, "library/range").await;
    let patch = |range: String, body: reqwest::Body| {
        s.client
            .patch(s.url(&loc))
            .header("content-range", range)
            .body(body)
            .send()
    };
    let r = patch("0-9999".into(), streamed(&blob[..10_000]))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    // Fewer bytes than the range says: refused, nothing kept.
    let r = patch("10000-19999".into(), streamed(&blob[10_000..15_000]))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST, "short chunk");
    assert_eq!(error_of(r).await.0, "BLOB_UPLOAD_INVALID");
    assert_eq!(upload_offset(&s, &loc).await, "0-9999");
    // More bytes than the range says: refused, nothing kept.
    let r = patch("10000-14999".into(), streamed(&blob[10_000..20_000]))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST, "long chunk");
    assert_eq!(upload_offset(&s, &loc).await, "0-9999");
    // Out of order: 416 with the offset.
    let r = patch("20000-29999".into(), streamed(&blob[20_000..]))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(header(&r, "range"), "0-9999");
    // The right chunks complete it and the digest verifies.
    let r = patch("10000-29999".into(), streamed(&blob[10_000..]))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let r = s
        .client
        .put(s.url(&format!("{loc}?digest={}", sha256(&blob))))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let got = s
        .get(&format!("/v2/library/range/blobs/{}", sha256(&blob)))
        .await;
    assert_eq!(got.bytes().await.unwrap(), blob[..]);
}

/// Every metric family on `/metrics` says what it is (`# HELP`), the build is identified, and
/// the process's own figures are there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_has_help_and_the_build_and_process_are_described() {
    let s = TestServer::start("").await;
    s.push_image("library/app", "v1", "metrics").await;
    let text = s.get("/metrics").await.text().await.unwrap();
    let families: std::collections::BTreeSet<&str> = text
        .lines()
        .filter(|l| l.starts_with("berth_"))
        .map(|l| l.split(['{', ' ']).next().unwrap())
        .map(|name| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(name)
        })
        .collect();
    assert!(families.len() >= 10, "{families:?}");
    let undescribed: Vec<&&str> = families
        .iter()
        .filter(|f| !text.contains(&format!("# HELP {f} ")))
        .collect();
    assert!(undescribed.is_empty(), "without # HELP: {undescribed:?}");
    let build = text
        .lines()
        .find(|l| l.starts_with("berth_build_info{"))
        .unwrap_or_default();
    assert!(
        build.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION")))
            && build.contains("commit=\"")
            && build.ends_with(" 1"),
        "{build:?}"
    );
    for name in [
        "berth_process_resident_memory_bytes",
        "berth_process_open_fds",
        "berth_process_start_time_seconds",
        "berth_upload_sessions",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(&format!("{name} "))),
            "{name} is exported"
        );
    }
    assert!(common::metrics::metric_value(&text, "berth_process_open_fds", &[]) > 0.0);
}

/// A client that goes away in the middle of a chunk leaves the session where its last chunk
/// left it: the status says so, and the upload goes on from there (the store's unit test
/// `a_writer_dropped_mid_chunk_leaves_the_session_usable` covers a handler dropped with the
/// writer it took).
#[tokio::test]
async fn a_client_gone_in_the_middle_of_a_chunk_leaves_the_session_at_its_last_chunk() {
    let s = TestServer::start("").await;
    let whole = data(3 << 20, 9);
    let loc = start_upload(&s, "library/cut").await;
    let first = s
        .client
        .patch(s.url(&loc))
        .header("content-range", format!("0-{}", (1 << 20) - 1))
        .body(whole[..1 << 20].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), StatusCode::ACCEPTED);
    let loc = header(&first, "location");
    // Half of the second chunk, then the connection closes.
    {
        let mut c = TcpStream::connect(s.addr()).await.unwrap();
        let head = format!(
            "PATCH {loc} HTTP/1.1\r\nHost: x\r\nContent-Range: {}-{}\r\nContent-Length: {}\r\n\r\n",
            1 << 20,
            (2 << 20) - 1,
            1 << 20
        );
        c.write_all(head.as_bytes()).await.unwrap();
        c.write_all(&whole[1 << 20..(3 << 19)]).await.unwrap();
        c.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut offset = String::new();
    for _ in 0..100 {
        offset = upload_offset(&s, &loc).await;
        if offset == format!("0-{}", (1 << 20) - 1) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        offset,
        format!("0-{}", (1 << 20) - 1),
        "the last acknowledged chunk"
    );
    let rest = s
        .client
        .patch(s.url(&loc))
        .header("content-range", format!("{}-{}", 1 << 20, whole.len() - 1))
        .body(whole[1 << 20..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(
        rest.status(),
        StatusCode::ACCEPTED,
        "{:?}",
        rest.text().await
    );
    let loc = header(&rest, "location");
    let sep = if loc.contains('?') { '&' } else { '?' };
    let done = s
        .client
        .put(s.url(&format!("{loc}{sep}digest={}", sha256(&whole))))
        .send()
        .await
        .unwrap();
    assert_eq!(done.status(), StatusCode::CREATED);
}
