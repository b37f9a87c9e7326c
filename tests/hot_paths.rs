//! The bytes' hot paths. Zero-copy blob bodies on plain HTTP/1.1 (`http::h1`): byte-identical
//! to the user-space path for every form of request, correct framing with keep-alive,
//! pipelining and a hand-over to hyper on the same connection, and nothing held after a client
//! goes away. The cold path: the client that starts a fetch is fed from memory, and falls back
//! to the partial file when it falls behind.

mod common;

use std::time::Duration;

use common::doubles::StaticRegistry;
use common::metrics::metric_value;
use common::server::{cache_toml, sha256, TestServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The metrics recorder is shared by every test of this binary: the tests here check byte
/// counts they cause, so they run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The server's first listener sends with `sendfile`; the second copies through user space.
async fn server() -> (TestServer, String, String) {
    let s = TestServer::start("[[listen]]\naddr = \"127.0.0.1:0\"\nsendfile = false\n").await;
    let addrs = s.server.as_ref().unwrap().local_addrs().to_vec();
    (s, addrs[0].0.to_string(), addrs[1].0.to_string())
}

fn blob(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

/// One raw response: status, headers (lowercased names) and body.
#[derive(Debug, PartialEq)]
struct Raw {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Headers that do not change between two answers to the same request.
    fn stable(&self) -> Vec<(String, String)> {
        let mut h: Vec<_> = self
            .headers
            .iter()
            .filter(|(n, _)| n != "date" && n != "x-request-id")
            .cloned()
            .collect();
        h.sort();
        h
    }
}

/// Reads one response from `stream` (with what was already read in `buf`); `head_only` for
/// a HEAD request (no body follows whatever the length says).
async fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>, head_only: bool) -> Raw {
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 65536];
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "connection closed before a response head");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8(buf[..end].to_vec()).unwrap();
    buf.drain(..end);
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (n, v) = l.split_once(':').unwrap();
            (n.trim().to_ascii_lowercase(), v.trim().to_string())
        })
        .collect();
    let len: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .map_or(0, |(_, v)| v.parse().unwrap());
    let len = if head_only || status == 204 || status == 304 {
        0
    } else {
        len
    };
    while buf.len() < len {
        let mut chunk = vec![0u8; 1 << 20];
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "connection closed in the middle of a body");
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = buf.drain(..len).collect();
    Raw {
        status,
        headers,
        body,
    }
}

async fn exchange(addr: &str, request: &str) -> Raw {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    read_response(&mut stream, &mut Vec::new(), request.starts_with("HEAD")).await
}

fn get(path: &str, extra: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: berth\r\n{extra}\r\n")
}

/// A monolithic push whose body is sent chunked (`Transfer-Encoding`): hyper's to read.
fn chunked_post(digest: &str, data: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "POST /v2/library/app/blobs/uploads/?digest={digest} HTTP/1.1\r\nHost: b\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n",
        data.len()
    )
    .into_bytes();
    r.extend_from_slice(data);
    r.extend_from_slice(b"\r\n0\r\n\r\n");
    r
}

/// A request head with a body of `len` bytes.
fn with_body(method: &str, target: &str, extra: &str, len: usize) -> String {
    format!("{method} {target} HTTP/1.1\r\nHost: berth\r\nContent-Type: application/octet-stream\r\nContent-Length: {len}\r\n{extra}\r\n")
}

/// The path of an answer's `Location`.
fn location(r: &Raw) -> String {
    let l = r.header("location").expect("a Location");
    match l.strip_prefix("http://") {
        Some(rest) => rest[rest.find('/').unwrap()..].to_string(),
        None => l.to_string(),
    }
}

/// An answer without what differs between two sessions or connections.
fn comparable(r: &Raw) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let headers = r
        .stable()
        .into_iter()
        .filter(|(n, _)| !["location", "docker-upload-uuid", "connection"].contains(&n.as_str()))
        .collect();
    let body = if r.status >= 400 {
        Vec::new()
    } else {
        r.body.clone()
    };
    (r.status, headers, body)
}

/// What a push sequence saw: the answers, comparable; the `Connection` header of the refused
/// chunk's answer and whether the server closed that connection after it; the session of the
/// cut push.
type Sequence = (
    Vec<(u16, Vec<(String, String)>, Vec<u8>)>,
    (Option<String>, bool),
    String,
);

/// A chunked push (POST, two PATCHes, a refused PATCH, PUT), a monolithic one and a cut one,
/// on one listener.
async fn push_sequence(addr: &str, data: &[u8], mono: &[u8]) -> Sequence {
    let mut answers = Vec::new();
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut buf = Vec::new();
    let start = with_body("POST", "/v2/library/app/blobs/uploads/", "", 0);
    stream.write_all(start.as_bytes()).await.unwrap();
    let r = read_response(&mut stream, &mut buf, false).await;
    let session = location(&r);
    answers.push(comparable(&r));
    let cut = 3 << 20;
    let range = format!("Content-Range: 0-{}\r\n", cut - 1);
    stream
        .write_all(with_body("PATCH", &session, &range, cut).as_bytes())
        .await
        .unwrap();
    stream.write_all(&data[..cut]).await.unwrap();
    let r = read_response(&mut stream, &mut buf, false).await;
    answers.push(comparable(&r));
    // A chunk that does not start at the offset is refused before its body is read; the
    // connection closes after the answer, which the client still reads whole.
    let wrong = format!("Content-Range: 5-{}\r\n", (1 << 20) + 4);
    stream
        .write_all(with_body("PATCH", &session, &wrong, 1 << 20).as_bytes())
        .await
        .unwrap();
    let _ = stream.write_all(&vec![1u8; 1 << 20]).await;
    let r = read_response(&mut stream, &mut buf, false).await;
    answers.push(comparable(&r));
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest))
        .await
        .is_ok_and(|read| read.is_ok() && rest.is_empty() && buf.is_empty());
    let refusal = (r.header("connection").map(str::to_string), closed);
    // The rest, with the upload's status and the PUT pipelined behind it, on a new connection.
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut buf = Vec::new();
    let range = format!("Content-Range: {cut}-{}\r\n", data.len() - 1);
    let mut pipelined = with_body("PATCH", &session, &range, data.len() - cut).into_bytes();
    pipelined.extend_from_slice(&data[cut..]);
    pipelined.extend_from_slice(get(&session, "").as_bytes());
    let put = format!("{session}?digest={}", sha256(data));
    pipelined.extend_from_slice(with_body("PUT", &put, "", 0).as_bytes());
    stream.write_all(&pipelined).await.unwrap();
    for _ in 0..3 {
        let r = read_response(&mut stream, &mut buf, false).await;
        answers.push(comparable(&r));
    }
    stream
        .write_all(get(&format!("/v2/library/app/blobs/{}", sha256(data)), "").as_bytes())
        .await
        .unwrap();
    let r = read_response(&mut stream, &mut buf, false).await;
    assert!(r.body == data, "the pushed blob reads back whole");
    answers.push((r.status, Vec::new(), Vec::new()));
    // Monolithic, then a wrong digest, on the same connection.
    for digest in [sha256(mono), sha256(b"other")] {
        let post = format!("/v2/library/app/blobs/uploads/?digest={digest}");
        stream
            .write_all(with_body("POST", &post, "", mono.len()).as_bytes())
            .await
            .unwrap();
        stream.write_all(mono).await.unwrap();
        let r = read_response(&mut stream, &mut buf, false).await;
        answers.push(comparable(&r));
    }
    // A chunk whose client goes away after 700 KiB of its 2 MiB.
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut buf = Vec::new();
    stream.write_all(start.as_bytes()).await.unwrap();
    let r = read_response(&mut stream, &mut buf, false).await;
    let cut_session = location(&r);
    stream
        .write_all(
            with_body(
                "PATCH",
                &cut_session,
                "Content-Range: 0-2097151\r\n",
                2 << 20,
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    stream.write_all(&data[..700 << 10]).await.unwrap();
    drop(stream);
    (answers, refusal, cut_session)
}

/// Pushes read by the driver (large reads into pooled buffers) answer exactly as hyper's do:
/// chunked and monolithic pushes, a refusal before the body is read (after which the driver
/// closes the connection: the unread body would be taken for the next request), pipelining
/// behind a body, a wrong digest, a client gone mid-chunk (the session stays where it was).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_read_by_the_driver_answer_as_hyper_does() {
    let _serial = SERIAL.lock().await;
    let (s, zero, copy) = server().await;
    let data = blob((5 << 20) + 777);
    let mono = blob((1 << 20) + 1);
    let driven_before = s.metric("berth_upload_driven_bytes_total", &[]).await;
    let (driven, refusal, driven_cut) = push_sequence(&zero, &data, &mono).await;
    assert_eq!(
        refusal,
        (Some("close".to_string()), true),
        "a body the handler left unread ends its connection, and the answer says so"
    );
    // Every body byte the driver read went to a handler: the chunks, the monolithic pushes and
    // the 700 KiB of the cut chunk that arrived before its client went away.
    let read = (data.len() + 2 * mono.len() + (700 << 10)) as f64;
    eventually_async("the driver counts the bodies it read", || async {
        s.metric("berth_upload_driven_bytes_total", &[]).await - driven_before == read
    })
    .await;
    let (hyper, _, hyper_cut) = push_sequence(&copy, &data, &mono).await;
    let statuses: Vec<u16> = driven.iter().map(|a| a.0).collect();
    assert_eq!(statuses, [202, 202, 416, 202, 204, 201, 200, 201, 400]);
    assert_eq!(driven, hyper, "the same answers on both listeners");
    // The cut chunk is discarded: both sessions still stand at 0 and take a whole one.
    for (addr, session) in [(&zero, &driven_cut), (&copy, &hyper_cut)] {
        let mut status = None;
        for _ in 0..100 {
            let r = exchange(addr, &get(session, "")).await;
            if r.status == 204 {
                status = Some(r);
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let r = status.expect("the session answers once the cut chunk is dropped");
        assert_eq!(
            r.header("range"),
            Some("0-0"),
            "{addr}: nothing of the cut chunk kept"
        );
    }
    assert_eq!(
        s.metric("berth_upload_driven_bytes_total", &[]).await - driven_before,
        read,
        "the copying listener leaves bodies to hyper"
    );
}

/// A body that arrives in small pieces with pauses (a slow link) goes to the handler as it
/// comes, within its idle deadline, and is whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_push_body_arrives_piece_by_piece() {
    let _serial = SERIAL.lock().await;
    let (s, zero, _) = server().await;
    let data = blob(8000);
    let digest = sha256(&data);
    let mut stream = TcpStream::connect(&zero).await.unwrap();
    let post = format!("/v2/library/app/blobs/uploads/?digest={digest}");
    stream
        .write_all(with_body("POST", &post, "", data.len()).as_bytes())
        .await
        .unwrap();
    for piece in data.chunks(1000) {
        stream.write_all(piece).await.unwrap();
        tokio::time::sleep(Duration::from_millis(120)).await;
    }
    let r = read_response(&mut stream, &mut Vec::new(), false).await;
    assert_eq!(r.status, 201);
    let d = berth::oci::digest::Digest::parse(&digest).unwrap();
    assert!(s.holds_blob(&d));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_copy_answers_are_byte_identical_to_user_space_ones() {
    let _serial = SERIAL.lock().await;
    let (s, zero, copy) = server().await;
    let data = blob((3 << 20) + 12345);
    let digest = s.push_blob("library/app", &data).await;
    let path = format!("/v2/library/app/blobs/{digest}");
    let sent_before = s.metric("berth_sendfile_bytes_total", &[]).await;
    let mut zero_copied = 0usize;
    let size = data.len();
    let forms = [
        ("", 200, data.clone()),
        ("Range: bytes=0-9\r\n", 206, data[..10].to_vec()),
        ("Range: bytes=1000-\r\n", 206, data[1000..].to_vec()),
        ("Range: bytes=-5\r\n", 206, data[size - 5..].to_vec()),
        ("Range: bytes=5-1\r\n", 200, data.clone()),
        ("Range: bytes=0-1,5-6\r\n", 200, data.clone()),
        (&format!("Range: bytes={size}-\r\n"), 416, Vec::new()),
        ("Range: bytes=-0\r\n", 416, Vec::new()),
    ];
    for (range, status, want) in &forms {
        let a = exchange(&zero, &get(&path, range)).await;
        let b = exchange(&copy, &get(&path, range)).await;
        assert_eq!(a.status, *status, "{range:?}");
        if *status != 416 {
            assert_eq!(a.body, *want, "{range:?}: the bytes asked for");
            zero_copied += want.len();
        }
        assert_eq!((a.status, &a.body), (b.status, &b.body), "{range:?}");
        assert_eq!(a.stable(), b.stable(), "{range:?}: same headers");
        assert!(a.header("date").is_some(), "{range:?}: a Date header");
    }
    // HEAD: the same head, no body, on both paths.
    let head = format!("HEAD {path} HTTP/1.1\r\nHost: berth\r\n\r\n");
    let (a, b) = (exchange(&zero, &head).await, exchange(&copy, &head).await);
    assert_eq!(a.status, 200);
    assert_eq!(a.header("content-length"), Some(size.to_string().as_str()));
    assert_eq!(a.stable(), b.stable());
    // Errors and other routes answer the same too.
    for p in ["/v2/", "/v2/library/app/blobs/sha256:0000000000000000000000000000000000000000000000000000000000000000", "/v2/library/app/tags/list", "/nothing"] {
        let (a, b) = (exchange(&zero, &get(p, "")).await, exchange(&copy, &get(p, "")).await);
        assert_eq!((a.status, &a.body), (b.status, &b.body), "{p}");
        assert_eq!(a.stable(), b.stable(), "{p}");
    }
    // The zero-copy listener really moved the blob bytes with sendfile, exactly those.
    let sent = s.metric("berth_sendfile_bytes_total", &[]).await - sent_before;
    assert_eq!(sent as usize, zero_copied);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_pipelining_and_hand_over_share_one_connection() {
    let _serial = SERIAL.lock().await;
    let (s, zero, _) = server().await;
    let data = blob(1 << 20);
    let digest = s.push_blob("library/app", &data).await;
    let path = format!("/v2/library/app/blobs/{digest}");
    let mut stream = TcpStream::connect(&zero).await.unwrap();
    let mut buf = Vec::new();
    // Keep-alive: one request after another.
    for _ in 0..3 {
        stream.write_all(get(&path, "").as_bytes()).await.unwrap();
        let r = read_response(&mut stream, &mut buf, false).await;
        assert_eq!((r.status, r.body.len()), (200, data.len()));
        assert_eq!(sha256(&r.body), digest);
    }
    // Pipelined: three requests in one write, three answers in order.
    let pipelined = format!(
        "{}HEAD {path} HTTP/1.1\r\nHost: b\r\n\r\n{}",
        get(&path, "Range: bytes=10-19\r\n"),
        get("/v2/", "")
    );
    stream.write_all(pipelined.as_bytes()).await.unwrap();
    let r = read_response(&mut stream, &mut buf, false).await;
    assert_eq!((r.status, r.body.as_slice()), (206, &data[10..20]));
    let r = read_response(&mut stream, &mut buf, true).await;
    assert_eq!(
        (r.status, r.header("content-length")),
        (200, Some("1048576"))
    );
    let r = read_response(&mut stream, &mut buf, false).await;
    assert_eq!(r.status, 200);
    // A push with a length is read by the driver itself, the connection stays with it.
    let other = blob(1000);
    let other_digest = sha256(&other);
    let post = format!(
        "POST /v2/library/app/blobs/uploads/?digest={other_digest} HTTP/1.1\r\nHost: b\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\n\r\n",
        other.len()
    );
    stream.write_all(post.as_bytes()).await.unwrap();
    stream.write_all(&other).await.unwrap();
    let r = read_response(&mut stream, &mut buf, false).await;
    assert_eq!(r.status, 201, "pushed through the driver");
    // A chunked body hands the connection to hyper; later requests still work there.
    let third = blob(100);
    let third_digest = sha256(&third);
    stream
        .write_all(chunked_post(&third_digest, &third).as_slice())
        .await
        .unwrap();
    let r = read_response(&mut stream, &mut buf, false).await;
    assert_eq!(r.status, 201, "pushed through hyper on the same connection");
    for (d, want) in [(&other_digest, &other), (&third_digest, &third)] {
        stream
            .write_all(get(&format!("/v2/library/app/blobs/{d}"), "").as_bytes())
            .await
            .unwrap();
        let r = read_response(&mut stream, &mut buf, false).await;
        assert_eq!((r.status, &r.body), (200, want));
    }
    // Connection: close ends the connection after the answer.
    // (HTTP/1.0 with keep-alive is kept and told so, as ab -k needs; checked below.)
    stream
        .write_all(get(&path, "Range: bytes=0-0\r\nConnection: close\r\n").as_bytes())
        .await
        .unwrap();
    let r = read_response(&mut stream, &mut buf, false).await;
    assert_eq!(r.status, 206);
    assert_eq!(r.header("connection"), Some("close"));
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).await.unwrap();
    assert!(
        buf.is_empty() && rest.is_empty(),
        "nothing after the last answer"
    );
}

/// Open descriptors of this process on `path` (the server runs in the test process).
fn open_fds_on(path: &std::path::Path) -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target == path)
        .count()
}

fn blob_file(s: &TestServer, digest: &str) -> std::path::PathBuf {
    let hex = digest.trim_start_matches("sha256:");
    s.dir
        .path()
        .join("data/blobs/sha256")
        .join(&hex[..2])
        .join(hex)
}

async fn eventually_async<F: std::future::Future<Output = bool>>(
    what: &str,
    mut check: impl FnMut() -> F,
) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(std::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(std::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_mid_body_releases_the_file_and_counts_what_was_sent() {
    let _serial = SERIAL.lock().await;
    let (s, zero, _) = server().await;
    let data = blob(64 << 20);
    let digest = s.push_blob("library/app", &data).await;
    let file = blob_file(&s, &digest);
    let served_before = s.metric("berth_blob_bytes_served_total", &[]).await;
    let mut stream = TcpStream::connect(&zero).await.unwrap();
    stream
        .write_all(get(&format!("/v2/library/app/blobs/{digest}"), "").as_bytes())
        .await
        .unwrap();
    let mut first = vec![0u8; 1 << 20];
    stream.read_exact(&mut first).await.unwrap();
    assert_eq!(
        open_fds_on(&file),
        1,
        "the body holds its file while it is sent"
    );
    drop(stream);
    eventually("the file is closed once the client is gone", || {
        open_fds_on(&file) == 0
    })
    .await;
    let text = reqwest::get(format!("http://{zero}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let served = metric_value(&text, "berth_blob_bytes_served_total", &[]) - served_before;
    assert!(
        served >= (1 << 20) as f64 && served < data.len() as f64,
        "bytes really sent are counted, not the length announced: {served}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_deleted_while_it_is_sent_arrives_whole() {
    let _serial = SERIAL.lock().await;
    let (s, zero, _) = server().await;
    let data = blob(48 << 20);
    let digest = s.push_blob("library/app", &data).await;
    let mut stream = TcpStream::connect(&zero).await.unwrap();
    stream
        .write_all(get(&format!("/v2/library/app/blobs/{digest}"), "").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    // The head and the first bytes are on their way: then the blob goes from the store.
    let mut chunk = vec![0u8; 1 << 16];
    let n = stream.read(&mut chunk).await.unwrap();
    buf.extend_from_slice(&chunk[..n]);
    let d = berth::oci::digest::Digest::parse(&digest).unwrap();
    assert!(s.app().store.blobs.delete(&d).await.unwrap());
    assert!(!s.holds_blob(&d));
    let r = read_response(&mut stream, &mut buf, false).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), data.len());
    assert_eq!(
        sha256(&r.body),
        digest,
        "the open file still had every byte"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_connections_handed_to_hyper_and_frees_the_data_directory() {
    let _serial = SERIAL.lock().await;
    let (mut s, zero, _) = server().await;
    // One connection idle in the driver, one handed to hyper by a chunked push and left idle.
    let idle = TcpStream::connect(&zero).await.unwrap();
    let mut pushed = TcpStream::connect(&zero).await.unwrap();
    let data = blob(100);
    pushed
        .write_all(&chunked_post(&sha256(&data), &data))
        .await
        .unwrap();
    let r = read_response(&mut pushed, &mut Vec::new(), false).await;
    assert_eq!(r.status, 201);
    // Both close at once (well inside the 2 s grace) and the data directory's lock is free
    // for the next server: the restart would fail otherwise.
    let started = std::time::Instant::now();
    s.restart().await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    for mut c in [idle, pushed] {
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }
    assert_eq!(s.get("/v2/").await.status(), 200);
}

/// A cache registry `hub` in front of a source holding one image whose layer has `len` bytes.
/// The edge listens twice: first with `sendfile` (the driver), then without (hyper, as TLS and
/// HTTP/2 are served); the URL of the layer on each.
struct Cold {
    _source: StaticRegistry,
    edge: TestServer,
    layer: Vec<u8>,
    plain: String,
    user_space: String,
}

async fn cold(len: usize) -> Cold {
    let source = StaticRegistry::start();
    let layer = blob(len);
    let image = source.put_image("library/app", "v1", &[&layer]);
    let second = "[[listen]]\naddr = \"127.0.0.1:0\"\nsendfile = false\n";
    let edge = TestServer::start(&cache_toml("registry", &source.url(), "", second)).await;
    let addrs = edge.server.as_ref().unwrap().local_addrs().to_vec();
    let path = format!("/v2/hub/library/app/blobs/{}", image.layer_digests[0]);
    Cold {
        plain: format!("http://{}{path}", addrs[0].0),
        user_space: format!("http://{}{path}", addrs[1].0),
        _source: source,
        edge,
        layer,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_that_starts_a_fetch_is_fed_from_memory() {
    let _serial = SERIAL.lock().await;
    let c = cold(6 << 20).await;
    let before = c.edge.metric("berth_cache_direct_bytes_total", &[]).await;
    let body = c.edge.client.get(&c.user_space).send().await.unwrap();
    let body = body.bytes().await.unwrap();
    assert_eq!(sha256(&body), sha256(&c.layer));
    let fed = c.edge.metric("berth_cache_direct_bytes_total", &[]).await - before;
    // Every byte but the last, which waits for the digest and comes from the file.
    assert_eq!(fed as usize, c.layer.len() - 1);
    // A warm GET reads the committed blob.
    let again = c.edge.client.get(&c.user_space).send().await.unwrap();
    assert_eq!(again.bytes().await.unwrap(), body);
    assert_eq!(
        c.edge.metric("berth_cache_direct_bytes_total", &[]).await - before,
        fed
    );
}

/// On a connection that sends files, the starter follows the partial file like any other
/// client: every byte goes out with `sendfile`, none from the fetch's memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_starter_on_a_plain_connection_is_sent_the_file() {
    let _serial = SERIAL.lock().await;
    let c = cold(6 << 20).await;
    let fed_before = c.edge.metric("berth_cache_direct_bytes_total", &[]).await;
    let sent_before = c.edge.metric("berth_sendfile_bytes_total", &[]).await;
    let body = c.edge.client.get(&c.plain).send().await.unwrap();
    assert_eq!(body.status(), 200);
    let body = body.bytes().await.unwrap();
    assert_eq!(sha256(&body), sha256(&c.layer));
    let fed = c.edge.metric("berth_cache_direct_bytes_total", &[]).await - fed_before;
    assert_eq!(fed, 0.0, "nothing from memory");
    let sent = c.edge.metric("berth_sendfile_bytes_total", &[]).await - sent_before;
    assert_eq!(sent as usize, c.layer.len(), "every byte with sendfile");
}

/// A cold `Range` (a fetch started past byte 0: every client follows the file) gives the same
/// bytes and headers whether the connection sends the file's regions or reads them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_ranges_are_the_same_sent_or_read() {
    let _serial = SERIAL.lock().await;
    let (from, to) = (1000usize, (5 << 20) + 17);
    let mut answers = Vec::new();
    for user_space in [false, true] {
        let c = cold(6 << 20).await;
        let url = if user_space { &c.user_space } else { &c.plain };
        let r = c.edge.client.get(url.as_str());
        let r = r.header("Range", format!("bytes={from}-{to}"));
        let r = r.send().await.unwrap();
        assert_eq!(r.status(), 206);
        let range = common::server::header(&r, "content-range");
        assert_eq!(range, format!("bytes {from}-{to}/{}", c.layer.len()));
        let body = r.bytes().await.unwrap();
        assert_eq!(&body[..], &c.layer[from..=to], "user space: {user_space}");
        answers.push(body);
    }
    assert_eq!(answers[0], answers[1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_starter_that_falls_behind_goes_on_from_the_file() {
    let _serial = SERIAL.lock().await;
    let c = cold(48 << 20).await;
    let before = c.edge.metric("berth_cache_direct_bytes_total", &[]).await;
    let mut response = c.edge.client.get(&c.user_space).send().await.unwrap();
    let first = response.chunk().await.unwrap().unwrap();
    // The fetch runs on at loopback speed while this client reads nothing: its feed (two
    // writes) fills and is cut; socket buffers hold a few MiB at most.
    let committed = berth::oci::digest::Digest::parse(&sha256(&c.layer)).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !c.edge.holds_blob(&committed) {
        assert!(std::time::Instant::now() < deadline, "the fetch completes");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut body = first.to_vec();
    while let Some(chunk) = response.chunk().await.unwrap() {
        body.extend_from_slice(&chunk);
    }
    assert_eq!(body.len(), c.layer.len());
    assert_eq!(
        sha256(&body),
        sha256(&c.layer),
        "the file gave the rest, in order"
    );
    let fed = c.edge.metric("berth_cache_direct_bytes_total", &[]).await - before;
    assert!(
        fed > 0.0 && (fed as usize) < c.layer.len() / 2,
        "fed from memory until it fell behind: {fed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_logged_and_counted_when_their_body_ends() {
    let _serial = SERIAL.lock().await;
    let (s, zero, copy) = server().await;
    let data = blob(32 << 20);
    let digest = s.push_blob("library/app", &data).await;
    let path = format!("/v2/library/app/blobs/{digest}");
    let blob_get = [("method", "GET"), ("route", "blob")];
    for addr in [&zero, &copy] {
        let duration = "berth_http_request_duration_seconds_sum";
        let before = s.metric(duration, &blob_get).await;
        let bytes_before = s.metric("berth_http_response_bytes_total", &[]).await;
        // A client that takes its time: the request lasts until its last byte left.
        let mut stream = TcpStream::connect(addr.as_str()).await.unwrap();
        stream.write_all(get(&path, "").as_bytes()).await.unwrap();
        let mut first = vec![0u8; 1 << 16];
        stream.read_exact(&mut first).await.unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        let mut buf = first;
        let r = read_response(&mut stream, &mut buf, false).await;
        assert_eq!(r.body.len(), data.len());
        let counted = || async {
            let text = reqwest::get(format!("http://{zero}/metrics"))
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            (
                metric_value(&text, duration, &blob_get) - before,
                metric_value(&text, "berth_http_response_bytes_total", &[]) - bytes_before,
            )
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let (seconds, bytes) = loop {
            let (seconds, bytes) = counted().await;
            if bytes >= data.len() as f64 || std::time::Instant::now() > deadline {
                break (seconds, bytes);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(
            seconds >= 0.4,
            "{addr}: duration until the body ended: {seconds}"
        );
        assert!(
            bytes >= data.len() as f64 && bytes < (data.len() + 100_000) as f64,
            "{addr}: bytes really sent: {bytes}"
        );
    }
    // A download cut short is counted as such, with the bytes that left, not its length.
    for addr in [&zero, &copy] {
        let aborted = [("reason", "client_gone")];
        let before = s
            .metric("berth_http_responses_aborted_total", &aborted)
            .await;
        let bytes_before = s.metric("berth_http_response_bytes_total", &[]).await;
        let mut stream = TcpStream::connect(addr.as_str()).await.unwrap();
        stream.write_all(get(&path, "").as_bytes()).await.unwrap();
        let mut first = vec![0u8; 1 << 16];
        stream.read_exact(&mut first).await.unwrap();
        drop(stream);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while s
            .metric("berth_http_responses_aborted_total", &aborted)
            .await
            - before
            < 1.0
        {
            assert!(
                std::time::Instant::now() < deadline,
                "{addr}: aborted download counted"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // What the client received at least; at most what the sockets' buffers could hold
        // besides (the counting /metrics answers of this loop add a few KiB).
        let sent = s.metric("berth_http_response_bytes_total", &[]).await - bytes_before;
        assert!(
            sent >= first.len() as f64 && sent < (data.len() / 2) as f64,
            "{addr}: {sent} bytes counted for a download cut after {} of {}",
            first.len(),
            data.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_1_0_keeps_a_connection_only_when_asked_and_says_so() {
    let _serial = SERIAL.lock().await;
    let (s, zero, copy) = server().await;
    let digest = s.push_blob("library/app", &blob(1000)).await;
    let path = format!("/v2/library/app/blobs/{digest}");
    for addr in [&zero, &copy] {
        // ab -k -i: HEAD over HTTP/1.0 with keep-alive, several on one connection.
        let mut stream = TcpStream::connect(addr.as_str()).await.unwrap();
        let mut buf = Vec::new();
        for _ in 0..3 {
            let head = format!("HEAD {path} HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n");
            stream.write_all(head.as_bytes()).await.unwrap();
            let r = read_response(&mut stream, &mut buf, true).await;
            assert_eq!(r.status, 200, "{addr}");
            let connection = r.header("connection").map(str::to_ascii_lowercase);
            assert_eq!(connection.as_deref(), Some("keep-alive"), "{addr}");
        }
        // Without it, the answer ends the connection.
        let mut stream = TcpStream::connect(addr.as_str()).await.unwrap();
        let get = format!("GET {path} HTTP/1.0\r\n\r\n");
        stream.write_all(get.as_bytes()).await.unwrap();
        let mut all = Vec::new();
        stream.read_to_end(&mut all).await.unwrap();
        assert!(
            all.ends_with(&blob(1000)),
            "{addr}: the body, then the close"
        );
    }
}
