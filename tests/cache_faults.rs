//! The cache against a faulty source (a relay in front of a static registry): one fetch for a
//! herd, resume with Range after the budget or a reset, corruption never committed, stale copies
//! on 5xx/429, Retry-After honoured, the fetch outliving its client.

mod common;

use std::time::{Duration, Instant};

use common::doubles::{wait_until, Fault, FaultRelay, FaultRule, StaticRegistry};
use common::server::*;
use reqwest::StatusCode;

fn random(len: usize, seed: u8) -> Vec<u8> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed as u64);
    (0..len).map(|_| rng.gen()).collect()
}

const CACHE_REQUESTS: &str = "berth_cache_requests_total";
const HUB_COALESCED: [(&str, &str); 2] = [("registry", "hub"), ("outcome", "coalesced")];
const HUB_HIT: [(&str, &str); 2] = [("registry", "hub"), ("outcome", "hit")];
const HUB_STALE: [(&str, &str); 2] = [("registry", "hub"), ("outcome", "stale")];

struct Setup {
    source: StaticRegistry,
    relay: FaultRelay,
    edge: TestServer,
    layer: Vec<u8>,
    layer_digest: String,
    manifest_digest: String,
}

async fn setup(layer_len: usize, cache_options: &str) -> Setup {
    let source = StaticRegistry::start();
    let layer = random(layer_len, 7);
    let image = source.put_image("library/app", "v1", &[&layer]);
    let relay = FaultRelay::start(&source.url());
    let edge = TestServer::start(&cache_toml("registry", &relay.url(), cache_options, "")).await;
    Setup {
        source,
        relay,
        edge,
        layer_digest: image.layer_digests[0].clone(),
        manifest_digest: image.manifest_digest.clone(),
        layer,
    }
}

impl Setup {
    fn blob_path(&self) -> String {
        format!("/v2/hub/library/app/blobs/{}", self.layer_digest)
    }

    /// The partial file of the layer and its saved fetch state (`DATA/partial/sha256-HEX`).
    fn partial_paths(&self) -> (std::path::PathBuf, std::path::PathBuf) {
        let name = self.layer_digest.replacen(':', "-", 1);
        let partial = self.edge.dir.path().join("data").join("partial").join(name);
        let state = partial.with_extension("state");
        (partial, state)
    }

    fn committed(&self) -> bool {
        let d = berth::oci::digest::Digest::parse(&self.layer_digest).unwrap();
        self.edge.holds_blob(&d)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_concurrent_cold_pulls_make_one_source_fetch() {
    let s = setup(8 << 20, "").await;
    // Slow enough that all 32 arrive while the fetch runs.
    s.relay.throttle(8 << 20);
    let coalesced_before = s.edge.metric(CACHE_REQUESTS, &HUB_COALESCED).await;
    let hit_before = s.edge.metric(CACHE_REQUESTS, &HUB_HIT).await;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let (client, url) = (s.edge.client.clone(), s.edge.url(&s.blob_path()));
        tasks.push(tokio::spawn(async move {
            let r = client.get(url).send().await.unwrap();
            assert_eq!(r.status(), StatusCode::OK);
            r.bytes().await.unwrap()
        }));
    }
    for t in tasks {
        assert_eq!(sha256(&t.await.unwrap()), s.layer_digest);
    }
    assert_eq!(
        s.relay.requests_matching("GET", "/blobs/"),
        1,
        "the source is asked once"
    );
    assert_eq!(s.relay.bytes_sent_matching("/blobs/"), s.layer.len() as u64);
    assert!(started.elapsed() < Duration::from_secs(20));
    assert!(
        wait_until(Duration::from_secs(10), || s.committed()).await,
        "committed after the stream"
    );
    // One request started the fetch; each of the 31 others joined it (or, had it come after the
    // commit, was a hit). The recorder is shared with the other tests of this binary, which can
    // only add to these counters.
    let coalesced = s.edge.metric(CACHE_REQUESTS, &HUB_COALESCED).await - coalesced_before;
    let hit = s.edge.metric(CACHE_REQUESTS, &HUB_HIT).await - hit_before;
    assert!(
        coalesced >= 1.0 && coalesced + hit >= 31.0,
        "joined requests are counted as coalesced: {coalesced} coalesced, {hit} hits"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_reach_the_client_before_the_blob_is_complete() {
    let s = setup(4 << 20, "").await;
    // About 4 s for the whole blob: the first MiB must arrive long before the end.
    s.relay.throttle(1 << 20);
    let started = Instant::now();
    let mut r = s
        .edge
        .client
        .get(s.edge.url(&s.blob_path()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let mut got = 0;
    while got < (1 << 20) {
        got += r
            .chunk()
            .await
            .unwrap()
            .expect("bytes while the source is still sending")
            .len();
    }
    assert!(
        !s.committed(),
        "the first MiB was streamed before the blob was complete"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    while let Some(c) = r.chunk().await.unwrap() {
        got += c.len();
    }
    assert_eq!(got, s.layer.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_expiry_keeps_the_partial_and_the_next_request_resumes_with_range() {
    let s = setup(4 << 20, "fetch_budget = \"1s\"").await;
    s.relay.throttle(1 << 20);
    let r = s
        .edge
        .client
        .get(s.edge.url(&s.blob_path()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(
        r.bytes().await.is_err(),
        "the first client's stream stops with the budget"
    );
    assert!(!s.committed());
    let first = s.relay.bytes_sent_matching("/blobs/");
    assert!(first > 0 && first < s.layer.len() as u64, "{first}");
    s.relay.clear_faults();
    let r = s.edge.get(&s.blob_path()).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(sha256(&r.bytes().await.unwrap()), s.layer_digest);
    let ranges = s.relay.ranges_seen("/blobs/");
    assert_eq!(ranges.len(), 1, "{ranges:?}");
    let resumed_at: u64 = ranges[0]
        .trim_start_matches("bytes=")
        .trim_end_matches('-')
        .parse()
        .unwrap();
    assert!(
        resumed_at > 0 && resumed_at <= first,
        "{ranges:?} after {first}"
    );
    let total = s.relay.bytes_sent_matching("/blobs/");
    assert!(
        total <= s.layer.len() as u64 + (first - resumed_at),
        "total fetched ≈ one blob: {total}"
    );
    assert!(
        wait_until(Duration::from_secs(10), || s.committed()).await,
        "committed after the stream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_mid_blob_is_resumed_within_the_same_request() {
    let s = setup(4 << 20, "").await;
    s.relay.inject(
        FaultRule::new(Fault::ResetAfter(1_500_000))
            .path("/blobs/")
            .method("GET")
            .times(1),
    );
    let r = s.edge.get(&s.blob_path()).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(sha256(&r.bytes().await.unwrap()), s.layer_digest);
    assert_eq!(
        s.relay.ranges_seen("/blobs/"),
        vec!["bytes=1500000-".to_string()]
    );
    assert_eq!(s.relay.bytes_sent_matching("/blobs/"), s.layer.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_that_ignores_range_is_skipped_ahead() {
    let s = setup(2 << 20, "fetch_budget = \"1s\"").await;
    // 1 MiB/s against a 1 s budget: the first fetch stops with part of the 2 MiB blob.
    s.relay.throttle(1 << 20);
    let _ = s.edge.get(&s.blob_path()).await.bytes().await;
    // The stopped fetch left a resumable partial: its saved state says how many bytes it holds
    // (the first 8 bytes, big-endian), and the partial file holds exactly that many.
    let (partial, state) = s.partial_paths();
    assert!(
        wait_until(Duration::from_secs(10), || state.exists()).await,
        "the budget stop keeps a resumable partial ({} is missing)",
        state.display()
    );
    assert!(!s.committed(), "the first fetch did not finish the blob");
    let held = {
        let st = std::fs::read(&state).unwrap();
        u64::from_be_bytes(st[..8].try_into().unwrap())
    };
    assert!(
        held > 0 && held < s.layer.len() as u64,
        "the partial holds part of the blob: {held} of {}",
        s.layer.len()
    );
    assert_eq!(std::fs::metadata(&partial).unwrap().len(), held);
    assert_eq!(
        s.relay.ranges_seen("/blobs/"),
        Vec::<String>::new(),
        "the first fetch starts at zero, without Range"
    );
    assert!(s.relay.bytes_sent_matching("/blobs/") >= held);

    // The source now ignores Range and sends the whole blob with 200.
    s.relay.reset_counters();
    s.relay.clear_faults();
    s.relay.ignore_range();
    let r = s.edge.get(&s.blob_path()).await;
    assert_eq!(r.status(), StatusCode::OK);
    let body = r.bytes().await.unwrap();
    assert_eq!(body.len(), s.layer.len());
    assert!(body[..] == s.layer[..], "the bytes served are the blob's");
    assert_eq!(sha256(&body), s.layer_digest);
    // The resumed fetch asked for the rest (the relay logs the header as it arrived, before it
    // drops it), got the whole blob and skipped what the partial already held.
    assert_eq!(
        s.relay.ranges_seen("/blobs/"),
        vec![format!("bytes={held}-")],
        "the resumed request asks the source for the bytes after the partial"
    );
    assert_eq!(s.relay.requests_matching("GET", "/blobs/"), 1);
    assert_eq!(
        s.relay.bytes_sent_matching("/blobs/"),
        s.layer.len() as u64,
        "the source ignored Range and sent every byte"
    );
    assert!(
        wait_until(Duration::from_secs(10), || s.committed()).await,
        "committed after the stream"
    );
    assert!(
        wait_until(Duration::from_secs(10), || !partial.exists()
            && !state.exists())
        .await,
        "the partial is gone once the blob is committed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_blob_is_never_committed_or_served_whole() {
    let s = setup(3 << 20, "").await;
    s.relay.corrupt_at(2_000_000);
    let r = s.edge.get(&s.blob_path()).await;
    let body = r.bytes().await;
    assert!(
        body.is_err(),
        "the client's stream fails instead of ending normally"
    );
    assert!(
        !s.committed(),
        "corrupt content never reaches the blob store"
    );
    s.relay.clear_faults();
    let r = s.edge.get(&s.blob_path()).await;
    assert_eq!(sha256(&r.bytes().await.unwrap()), s.layer_digest);
    assert!(
        wait_until(Duration::from_secs(10), || s.committed()).await,
        "committed after the stream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fetch_goes_on_when_the_client_leaves() {
    let s = setup(4 << 20, "").await;
    s.relay.throttle(8 << 20);
    let mut r = s
        .edge
        .client
        .get(s.edge.url(&s.blob_path()))
        .send()
        .await
        .unwrap();
    r.chunk().await.unwrap();
    drop(r);
    assert!(
        wait_until(Duration::from_secs(20), || s.committed()).await,
        "fetch finished without its client"
    );
    assert_eq!(s.relay.requests_matching("GET", "/blobs/"), 1);
    assert_eq!(
        sha256(&s.edge.get(&s.blob_path()).await.bytes().await.unwrap()),
        s.layer_digest
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_on_a_cold_blob_is_served_from_the_fetch() {
    let s = setup(4 << 20, "").await;
    let r = s
        .edge
        .client
        .get(s.edge.url(&s.blob_path()))
        .header("range", "bytes=3000000-3000099")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        header(&r, "content-range"),
        format!("bytes 3000000-3000099/{}", s.layer.len())
    );
    assert_eq!(
        &r.bytes().await.unwrap()[..],
        &s.layer[3_000_000..3_000_100]
    );
    assert!(wait_until(Duration::from_secs(20), || s.committed()).await);
    assert_eq!(s.relay.requests_matching("GET", "/blobs/"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_manifest_on_5xx_429_and_unreachable_and_retry_after_is_honoured() {
    let s = setup(1000, "").await;
    let path = "/v2/hub/library/app/manifests/v1";
    let stale_before = s.edge.metric(CACHE_REQUESTS, &HUB_STALE).await;
    assert_eq!(
        header(&s.edge.get(path).await, "docker-content-digest"),
        s.manifest_digest
    );
    for (code, retry_after) in [(500u16, None), (503, None), (429, Some(1))] {
        s.relay.status(code, retry_after, None);
        let r = s.edge.get(path).await;
        assert_eq!(r.status(), StatusCode::OK, "{code}: cached copy");
        assert_eq!(header(&r, "docker-content-digest"), s.manifest_digest);
        s.relay.clear_faults();
    }
    s.relay.set_reachable(false);
    assert_eq!(s.edge.get(path).await.status(), StatusCode::OK);
    s.relay.set_reachable(true);
    // 500, 503, 429 and the unreachable source: four stale answers of this test.
    let stale = s.edge.metric(CACHE_REQUESTS, &HUB_STALE).await - stale_before;
    assert!(stale >= 4.0, "stale answers are counted: {stale}");
    // Nothing cached and the source rate-limits: 429 with its Retry-After.
    s.relay.status(429, Some(7), None);
    let r = s.edge.get("/v2/hub/library/other/manifests/v1").await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&r, "retry-after"), "7");
    assert_eq!(error_code(r).await, "TOOMANYREQUESTS");
    s.relay.clear_faults();
    // A blob fetch retries a 503 after its Retry-After and succeeds.
    s.relay.inject(
        FaultRule::new(Fault::Status {
            code: 503,
            retry_after: Some(1),
        })
        .path("/blobs/")
        .method("GET")
        .times(1),
    );
    let started = Instant::now();
    let r = s.edge.get(&s.blob_path()).await;
    assert_eq!(sha256(&r.bytes().await.unwrap()), s.layer_digest);
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "waited for Retry-After"
    );
    assert_eq!(s.relay.requests_matching("GET", "/blobs/"), 2);
    drop(s.source);
}
