//! Tiered caches (issue 14 item 4): an edge berth whose image cache is a regional berth, whose
//! cache registry (in mirror mode, so the edge's upstream paths reach it unchanged) pulls from
//! the real source, all on loopback with a counting relay in front of the source. Manifests,
//! blobs, HEAD and Range work cold and warm; 32 cold pulls at the edge make one fetch at the
//! source; a 404 at the top travels down as a 404.

mod common;

use common::doubles::FaultRelay;
use common::registry::Client as Registry;
use common::server::{sha256, TestServer, OCI_MANIFEST};
use reqwest::StatusCode;
use serde_json::json;

struct Tiers {
    relay: FaultRelay,
    edge: TestServer,
    _regional: TestServer,
    _source: TestServer,
    manifest: Vec<u8>,
    layer: Vec<u8>,
    layer_digest: String,
}

fn cache(url: &str, mirror: bool) -> String {
    format!(
        "[[image_cache]]\nname = \"up\"\nkind = \"registry\"\nurl = \"{url}\"\n\
         [[registry]]\nname = \"hub\"\ntype = \"cache\"\ncache = \"up\"\n{}",
        if mirror {
            "[mirror]\nregistry = \"hub\"\n"
        } else {
            ""
        }
    )
}

async fn tiers(layer_size: usize) -> Tiers {
    let source = TestServer::start("").await;
    let up = Registry::over(source.client.clone(), &source.base);
    let layer: Vec<u8> = (0..layer_size).map(|i| (i * 7 % 251) as u8).collect();
    let layer_digest = up.blob("library/app", &layer).await;
    let config = up.blob("library/app", b"{\"tier\":1}").await;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": 10},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer.len()}],
    }))
    .unwrap();
    up.manifest("library/app", "v1", OCI_MANIFEST, &manifest)
        .await;
    let relay = FaultRelay::start(&source.base);
    // The regional cache answers unqualified paths (`library/app`) from its cache registry.
    let regional = TestServer::start_bare(&cache(&relay.url(), true)).await;
    let edge = TestServer::start_bare(&cache(&regional.base, false)).await;
    Tiers {
        relay,
        edge,
        _regional: regional,
        _source: source,
        manifest,
        layer,
        layer_digest,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_pulls_through_a_regional_cache_with_one_fetch_at_the_source() {
    let t = tiers(8 << 20).await;
    let edge = Registry::over(t.edge.client.clone(), &t.edge.base);
    // HEAD of a cold tag, then the manifest by tag and by digest.
    let r = t
        .edge
        .client
        .head(t.edge.url("/v2/hub/library/app/manifests/v1"))
        .header("accept", OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let digest = sha256(&t.manifest);
    assert_eq!(
        r.headers()["docker-content-digest"].to_str().unwrap(),
        digest
    );
    assert_eq!(
        edge.pull_manifest("hub/library/app", "v1").await.unwrap(),
        t.manifest
    );
    assert_eq!(
        edge.pull_manifest("hub/library/app", &digest)
            .await
            .unwrap(),
        t.manifest
    );
    // A cold Range of the layer.
    let blob = format!("/v2/hub/library/app/blobs/{}", t.layer_digest);
    t.relay.throttle(8 << 20);
    let r = t
        .edge
        .client
        .get(t.edge.url(&blob))
        .header("range", "bytes=1000-1999")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(&r.bytes().await.unwrap()[..], &t.layer[1000..2000]);
    // 32 cold GETs of the layer at once at the edge: the source is asked once.
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let (client, url) = (t.edge.client.clone(), t.edge.url(&blob));
        tasks.push(tokio::spawn(async move {
            let r = client.get(url).send().await.unwrap();
            assert_eq!(r.status(), StatusCode::OK);
            r.bytes().await.unwrap()
        }));
    }
    for task in tasks {
        assert_eq!(sha256(&task.await.unwrap()), t.layer_digest);
    }
    assert_eq!(
        t.relay.requests_matching("GET", &t.layer_digest),
        1,
        "one fetch of the layer at the source"
    );
    assert_eq!(
        t.relay.bytes_sent_matching(&t.layer_digest),
        t.layer.len() as u64
    );
    // Warm: HEAD, Range and the whole image, with no new request of the layer at the source.
    let r = t.edge.client.head(t.edge.url(&blob)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.headers()["content-length"],
        t.layer.len().to_string().as_str()
    );
    let r = t
        .edge
        .client
        .get(t.edge.url(&blob))
        .header("range", "bytes=-100")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        &r.bytes().await.unwrap()[..],
        &t.layer[t.layer.len() - 100..]
    );
    edge.pull_all("hub/library/app", "v1").await;
    assert_eq!(t.relay.requests_matching("GET", &t.layer_digest), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_404_at_the_source_travels_down_as_a_404() {
    let t = tiers(1024).await;
    for path in [
        "/v2/hub/library/app/manifests/missing",
        "/v2/hub/library/nothing/manifests/v1",
        "/v2/hub/library/app/blobs/sha256:0000000000000000000000000000000000000000000000000000000000000000",
    ] {
        let r = t.edge.client.get(t.edge.url(path)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{path}");
        let r = t.edge.client.head(t.edge.url(path)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "HEAD {path}");
    }
}
