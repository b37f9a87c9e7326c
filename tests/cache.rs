//! Pull-through cache with real upstreams on loopback (berth in origin mode): the serving table,
//! digests immutable, addressing (prefix, Docker mirror, containerd `ns`), push refusal, cleanup.

mod common;

use std::time::Duration;

use common::doubles::wait_until;
use common::server::*;
use reqwest::{Method, StatusCode};

/// An upstream berth holding `library/app:v1`, and an edge berth caching it as registry `hub`.
async fn pair(edge_extra: &str) -> (TestServer, TestServer, Vec<u8>, String) {
    pair_with("", edge_extra).await
}

async fn pair_with(
    upstream_extra: &str,
    edge_extra: &str,
) -> (TestServer, TestServer, Vec<u8>, String) {
    let upstream = TestServer::start(upstream_extra).await;
    let (manifest, digest) = upstream.push_image("library/app", "v1", "one").await;
    let edge = TestServer::start(&cache_toml("registry", &upstream.base, "", edge_extra)).await;
    (upstream, edge, manifest, digest)
}

fn config_and_layer(manifest: &[u8]) -> (String, String) {
    let m: serde_json::Value = serde_json::from_slice(manifest).unwrap();
    (
        m["config"]["digest"].as_str().unwrap().to_string(),
        m["layers"][0]["digest"].as_str().unwrap().to_string(),
    )
}

#[tokio::test]
async fn pull_through_stores_manifest_tag_and_blobs_byte_for_byte() {
    let (upstream, edge, manifest, digest) = pair("").await;
    let r = edge.get("/v2/hub/library/app/manifests/v1").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "docker-content-digest"), digest);
    assert_eq!(&r.bytes().await.unwrap()[..], &manifest[..]);
    // HEAD revalidates against the source and agrees.
    let r = edge
        .req(Method::HEAD, "/v2/hub/library/app/manifests/v1")
        .await
        .send()
        .await
        .unwrap();
    assert_eq!(header(&r, "docker-content-digest"), digest);
    // The tag is recorded locally as soon as the manifest was served.
    let v: serde_json::Value = edge
        .get("/v2/hub/library/app/tags/list")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["tags"], serde_json::json!(["v1"]));
    let (config, layer) = config_and_layer(&manifest);
    for d in [&config, &layer] {
        let path = format!("/v2/hub/library/app/blobs/{d}");
        let want = upstream
            .get(&format!("/v2/library/app/blobs/{d}"))
            .await
            .bytes()
            .await
            .unwrap();
        let r = edge.get(&path).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(header(&r, "docker-content-digest"), *d);
        assert_eq!(header(&r, "content-length"), want.len().to_string());
        assert_eq!(r.bytes().await.unwrap(), want, "cold GET");
        assert_eq!(
            edge.get(&path).await.bytes().await.unwrap(),
            want,
            "warm GET"
        );
        // Range on a cached blob.
        let r = edge
            .client
            .get(edge.url(&path))
            .header("range", "bytes=1-3")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
        assert_eq!(r.bytes().await.unwrap(), want.slice(1..4));
    }
    // Everything is held locally now: the source can go away.
    drop(upstream);
    let r = edge
        .get(&format!("/v2/hub/library/app/manifests/{digest}"))
        .await;
    assert_eq!(
        r.status(),
        StatusCode::OK,
        "by digest: served without asking the source"
    );
    let r = edge.get("/v2/hub/library/app/manifests/v1").await;
    assert_eq!(
        r.status(),
        StatusCode::OK,
        "by tag: stale copy while the source is unreachable"
    );
    assert_eq!(header(&r, "docker-content-digest"), digest);
}

#[tokio::test]
async fn serving_table_changed_equal_unreachable_deleted() {
    let (upstream, edge, _, d1) = pair("").await;
    assert_eq!(
        header(
            &edge.get("/v2/hub/library/app/manifests/v1").await,
            "docker-content-digest"
        ),
        d1
    );
    // Source moved the tag: the new manifest is fetched, stored and served.
    let (m2, d2) = upstream.push_image("library/app", "v1", "two").await;
    let r = edge.get("/v2/hub/library/app/manifests/v1").await;
    assert_eq!(header(&r, "docker-content-digest"), d2);
    assert_eq!(&r.bytes().await.unwrap()[..], &m2[..]);
    // Source deleted it: 404, and the tag is no longer served.
    let r = upstream
        .req(Method::DELETE, "/v2/library/app/manifests/v1")
        .await
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let r = edge.get("/v2/hub/library/app/manifests/v1").await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_code(r).await, "MANIFEST_UNKNOWN");
    let v: serde_json::Value = edge
        .get("/v2/hub/library/app/tags/list")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["tags"], serde_json::json!([]));
    // Digests stay immutable and cached.
    assert_eq!(
        edge.get(&format!("/v2/hub/library/app/manifests/{d2}"))
            .await
            .status(),
        StatusCode::OK
    );
    // Unknown at the source and not cached: 404.
    let r = edge.get("/v2/hub/library/nope/manifests/v1").await;
    assert_eq!(error_code(r).await, "MANIFEST_UNKNOWN");
    // Source unreachable with nothing cached: a clear 502.
    drop(upstream);
    let r = edge.get("/v2/hub/library/other/manifests/v1").await;
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    let v: serde_json::Value = r.json().await.unwrap();
    assert!(
        v["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("unreachable"),
        "{v}"
    );
}

#[tokio::test]
async fn uncached_blob_head_asks_the_source() {
    let (upstream, edge, manifest, _) = pair("").await;
    let (_, layer) = config_and_layer(&manifest);
    let r = edge
        .req(Method::HEAD, &format!("/v2/hub/library/app/blobs/{layer}"))
        .await
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "docker-content-digest"), layer);
    let size = upstream
        .get(&format!("/v2/library/app/blobs/{layer}"))
        .await
        .bytes()
        .await
        .unwrap()
        .len();
    assert_eq!(header(&r, "content-length"), size.to_string());
    let r = edge
        .req(
            Method::HEAD,
            &format!("/v2/hub/library/app/blobs/{}", sha256(b"absent")),
        )
        .await
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = edge
        .get(&format!("/v2/hub/library/app/blobs/{}", sha256(b"absent")))
        .await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_code(r).await, "BLOB_UNKNOWN");
}

#[tokio::test]
async fn index_children_are_fetched_on_demand() {
    let (upstream, edge, manifest, digest) = pair("").await;
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": digest, "size": manifest.len(),
                       "platform": {"architecture": "amd64", "os": "linux"}}]
    }))
    .unwrap();
    let r = upstream
        .put_manifest("library/app", "multi", OCI_INDEX, &index)
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = edge.get("/v2/hub/library/app/manifests/multi").await;
    assert_eq!(header(&r, "content-type"), OCI_INDEX);
    assert_eq!(&r.bytes().await.unwrap()[..], &index[..]);
    let r = edge
        .get(&format!("/v2/hub/library/app/manifests/{digest}"))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(&r.bytes().await.unwrap()[..], &manifest[..]);
}

#[tokio::test]
async fn cache_registries_refuse_push_and_tagging() {
    let (_upstream, edge, manifest, _) = pair("").await;
    let r = edge
        .req(Method::POST, "/v2/hub/library/app/blobs/uploads/")
        .await
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let (code, message) = error_of(r).await;
    assert_eq!(code, "DENIED");
    assert!(message.contains("pull-through cache"), "{message}");
    let r = edge
        .put_manifest("hub/library/app", "v2", OCI_MANIFEST, &manifest)
        .await;
    assert_eq!(error_code(r).await, "DENIED");
    // cosign-style signature tag.
    let r = edge
        .put_manifest("hub/library/app", "sha256-abc.sig", OCI_MANIFEST, &manifest)
        .await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn docker_mirror_mode_and_containerd_ns_routing() {
    let upstream = TestServer::start("[[registry]]\nname = \"team\"\n").await;
    let (manifest, digest) = upstream.push_image("library/app", "v1", "one").await;
    // Mirror mode refuses a `library` registry (it would capture every official image), so
    // this edge has none.
    let edge = TestServer::start_bare(&cache_toml(
        "registry",
        &upstream.base,
        "",
        "[[registry]]\nname = \"edge\"\n[mirror]\nregistry = \"hub\"\n",
    ))
    .await;
    let (_, layer) = config_and_layer(&manifest);
    // Docker daemon: unprefixed path, first segment is not a registry: the mirror serves it.
    let r = edge
        .req(Method::HEAD, "/v2/library/app/manifests/v1")
        .await
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "docker-content-digest"), digest);
    // A name whose first segment is a registry of the edge goes to that registry.
    let r = edge
        .req(Method::HEAD, "/v2/edge/app/manifests/v1")
        .await
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    upstream.push_image("team/app", "v1", "t").await;
    let r = edge
        .req(Method::HEAD, "/v2/team/app/manifests/v1")
        .await
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // containerd: ?ns= names the source host; the whole path is the upstream path.
    let ns = upstream.addr();
    let r = edge
        .get(&format!("/v2/library/app/manifests/v1?ns={ns}"))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "oci-namespace"), ns);
    assert_eq!(header(&r, "docker-content-digest"), digest);
    let r = edge
        .get(&format!("/v2/library/app/blobs/{layer}?ns={ns}"))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    // Stored under the cache registry.
    let v: serde_json::Value = edge
        .get("/v2/hub/library/app/tags/list")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["tags"], serde_json::json!(["v1"]));
    // An ns that matches no image cache is ignored (the name routes as without it), never a
    // 400.
    let r = edge.get("/v2/edge/app/manifests/v1?ns=quay.io").await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_code(r).await, "MANIFEST_UNKNOWN");
}

#[tokio::test]
async fn docker_hub_names_get_library_prefix() {
    let upstream = TestServer::start("").await;
    let (_, digest) = upstream.push_image("library/nginx", "1.27", "n").await;
    let edge = TestServer::start_bare(&format!(
        "[[image_cache]]\nname = \"dh\"\nkind = \"dockerhub\"\nurl = \"{}\"\n[[registry]]\nname = \"docker\"\ntype = \"cache\"\ncache = \"dh\"\n[mirror]\nregistry = \"docker\"\n",
        upstream.base
    ))
    .await;
    for path in [
        "/v2/docker/nginx/manifests/1.27",
        "/v2/nginx/manifests/1.27",
        "/v2/docker/library/nginx/manifests/1.27",
    ] {
        let r = edge.get(path).await;
        assert_eq!(r.status(), StatusCode::OK, "{path}");
        assert_eq!(header(&r, "docker-content-digest"), digest);
    }
    let r = edge
        .get("/v2/library/nginx/manifests/1.27?ns=docker.io")
        .await;
    assert_eq!(header(&r, "oci-namespace"), "docker.io");
}

#[tokio::test]
async fn cleanup_sweep_removes_unpulled_artifacts_and_their_blobs() {
    let (upstream, edge, manifest, digest) = pair("").await;
    let (config, layer) = config_and_layer(&manifest);
    edge.get("/v2/hub/library/app/manifests/v1").await;
    for d in [&config, &layer] {
        edge.get(&format!("/v2/hub/library/app/blobs/{d}"))
            .await
            .bytes()
            .await
            .unwrap();
    }
    // An origin image on the edge must survive any sweep.
    edge.push_image("library/keep", "v1", "keep").await;
    let app = edge.app();
    let store = &app.store;
    // Clients get the last byte once the digest matched; the commit follows.
    for d in [&config, &layer] {
        let d = berth::oci::digest::Digest::parse(d).unwrap();
        assert!(
            wait_until(Duration::from_secs(10), || edge.holds_blob(&d)).await,
            "fetched blob committed"
        );
    }
    app.store.pulls.flush(&*store.meta).await.unwrap();
    // Recently pulled: a 1-hour sweep keeps everything.
    let r = berth::cache::sweep::sweep(
        store,
        std::time::Duration::from_secs(3600),
        std::time::Duration::ZERO,
        &[],
        false,
    )
    .await
    .unwrap();
    assert!(r.artifacts.is_empty() && r.blobs.is_empty(), "{r:?}");
    // Dry run of a zero-age sweep lists, removes nothing.
    let r = berth::cache::sweep::sweep(
        store,
        std::time::Duration::ZERO,
        std::time::Duration::ZERO,
        &[],
        true,
    )
    .await
    .unwrap();
    assert_eq!(r.artifacts.len(), 1);
    assert_eq!(r.blobs.len(), 3, "manifest, config, layer: {r:?}");
    assert_eq!(
        edge.get("/v2/hub/library/app/manifests/v1").await.status(),
        StatusCode::OK
    );
    app.store.pulls.flush(&*store.meta).await.unwrap();
    // The real one.
    let r = berth::cache::sweep::sweep(
        store,
        std::time::Duration::ZERO,
        std::time::Duration::ZERO,
        &[],
        false,
    )
    .await
    .unwrap();
    assert_eq!(r.artifacts.len(), 1);
    assert_eq!(r.artifacts[0].2, vec!["v1".to_string()]);
    assert_eq!(r.blobs.len(), 3);
    assert!(!edge.holds_blob(&berth::oci::digest::Digest::parse(&layer).unwrap()));
    // The origin image is intact; the cached one comes back from the source on demand.
    assert_eq!(
        edge.get("/v2/library/keep/manifests/v1").await.status(),
        StatusCode::OK
    );
    let r = edge.get("/v2/hub/library/app/manifests/v1").await;
    assert_eq!(header(&r, "docker-content-digest"), digest);
    assert_eq!(
        edge.get(&format!("/v2/hub/library/app/blobs/{layer}"))
            .await
            .status(),
        StatusCode::OK
    );
    drop(upstream);
}

#[tokio::test]
async fn revalidate_ttl_skips_the_source_for_hot_tags() {
    let upstream = TestServer::start("").await;
    let (_, d1) = upstream.push_image("library/app", "v1", "one").await;
    let edge = TestServer::start(&cache_toml(
        "registry",
        &upstream.base,
        "revalidate_ttl = \"1h\"",
        "",
    ))
    .await;
    assert_eq!(
        header(
            &edge.get("/v2/hub/library/app/manifests/v1").await,
            "docker-content-digest"
        ),
        d1
    );
    upstream.push_image("library/app", "v1", "two").await;
    // Within the TTL the cached tag is served without asking the source.
    assert_eq!(
        header(
            &edge.get("/v2/hub/library/app/manifests/v1").await,
            "docker-content-digest"
        ),
        d1
    );
}

#[tokio::test]
async fn a_blob_cached_for_one_repository_is_served_for_another_only_if_the_source_has_it_there() {
    let (upstream, edge, manifest, _) = pair("").await;
    let (_, layer) = config_and_layer(&manifest);
    assert_eq!(
        edge.get(&format!("/v2/hub/library/app/blobs/{layer}"))
            .await
            .status(),
        StatusCode::OK
    );
    // The source does not hold it under library/private: neither does the cache.
    for method in [Method::GET, Method::HEAD] {
        let r = edge
            .req(
                method.clone(),
                &format!("/v2/hub/library/private/blobs/{layer}"),
            )
            .await
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{method}");
    }
    // Once the source holds it there too, the cached bytes serve it without a new fetch.
    let data = upstream
        .get(&format!("/v2/library/app/blobs/{layer}"))
        .await
        .bytes()
        .await
        .unwrap();
    upstream.push_blob("library/private", &data).await;
    let r = edge
        .get(&format!("/v2/hub/library/private/blobs/{layer}"))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.bytes().await.unwrap(), data);
}

/// Availability never beats access: with the source down, a blob held for one repository is
/// not served under another repository the source never confirmed.
#[tokio::test]
async fn a_blob_held_for_another_repository_is_not_served_while_the_source_is_down() {
    let (mut upstream, edge, manifest, _) = pair("").await;
    let (_, layer) = config_and_layer(&manifest);
    let held = edge
        .get(&format!("/v2/hub/library/app/blobs/{layer}"))
        .await;
    assert_eq!(held.status(), StatusCode::OK);
    upstream.server.take().unwrap().shutdown().await;
    for method in [Method::GET, Method::HEAD] {
        let r = edge
            .req(
                method.clone(),
                &format!("/v2/hub/library/private/blobs/{layer}"),
            )
            .await
            .send()
            .await
            .unwrap();
        assert!(
            r.status().is_server_error() || r.status() == StatusCode::NOT_FOUND,
            "{method}: {}",
            r.status()
        );
        assert_ne!(r.status(), StatusCode::OK, "{method}");
    }
    // Nothing was linked: the repository the source never confirmed stays empty.
    let app = edge.app();
    let digest = berth::oci::digest::Digest::parse(&layer).unwrap();
    assert_eq!(
        app.store
            .meta
            .blob_link("hub/library/private", &digest)
            .await
            .unwrap(),
        None
    );
    // What the cache holds for the repository it was fetched for still serves.
    let r = edge
        .get(&format!("/v2/hub/library/app/blobs/{layer}"))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
}

/// A malformed reference names no manifest on a cache registry either: 404 `MANIFEST_UNKNOWN`.
#[tokio::test]
async fn reading_a_malformed_reference_in_a_cache_registry_is_manifest_unknown() {
    let (_upstream, edge, _, _) = pair("").await;
    for reference in ["-bad", "sha256:xyz"] {
        let r = edge
            .get(&format!("/v2/hub/library/app/manifests/{reference}"))
            .await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{reference}");
        assert_eq!(error_code(r).await, "MANIFEST_UNKNOWN", "{reference}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_warms_all_platforms_or_one() {
    let upstream = TestServer::start("").await;
    let (amd, amd_digest) = upstream.push_image("library/multi", "amd64", "amd").await;
    let (arm, arm_digest) = upstream.push_image("library/multi", "arm64", "arm").await;
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": amd_digest, "size": amd.len(), "platform": {"architecture": "amd64", "os": "linux"}},
            {"mediaType": OCI_MANIFEST, "digest": arm_digest, "size": arm.len(), "platform": {"architecture": "arm64", "os": "linux", "variant": "v8"}}
        ]
    }))
    .unwrap();
    assert_eq!(
        upstream
            .put_manifest("library/multi", "v1", OCI_INDEX, &index)
            .await
            .status(),
        StatusCode::CREATED
    );
    let edge = TestServer::start(&cache_toml("registry", &upstream.base, "", "")).await;
    let bar = indicatif::ProgressBar::hidden();
    let arm_only: berth::cli::prefetch::Platform = "linux/arm64".parse().unwrap();
    let r =
        berth::cli::prefetch::prefetch(&edge.base, "hub/library/multi:v1", Some(&arm_only), &bar)
            .await
            .unwrap();
    assert_eq!(
        (r.manifests, r.blobs),
        (2, 2),
        "index + arm64 manifest, its config and layer"
    );
    let (_, amd_layer) = config_and_layer(&amd);
    let held = |d: &str| edge.holds_blob(&berth::oci::digest::Digest::parse(d).unwrap());
    assert!(!held(&amd_layer), "the other platform was not fetched");
    let r = berth::cli::prefetch::prefetch(&edge.base, "hub/library/multi:v1", None, &bar)
        .await
        .unwrap();
    assert_eq!((r.manifests, r.blobs), (3, 4));
    assert!(
        wait_until(Duration::from_secs(10), || held(&amd_layer)).await,
        "prefetched blob committed"
    );
    // Filled: the source can go away and every platform still pulls.
    drop(upstream);
    for d in [&amd_digest, &arm_digest] {
        assert_eq!(
            edge.get(&format!("/v2/hub/library/multi/manifests/{d}"))
                .await
                .status(),
            StatusCode::OK
        );
    }
    let bad = berth::cli::prefetch::prefetch(
        &edge.base,
        "hub/library/multi:v1",
        Some(&"linux/s390x".parse().unwrap()),
        &bar,
    )
    .await;
    assert!(bad.is_err());
}
