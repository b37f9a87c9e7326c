//! The OCI Distribution API through raw HTTP: pull, push, content discovery, content management,
//! and every error case with its OCI code and status.

mod common;

use common::server::*;
use reqwest::{Method, StatusCode};

#[tokio::test]
async fn base_endpoint_and_common_headers() {
    let s = TestServer::start("").await;
    const BASE_OK: [(&str, &str); 3] = [("method", "GET"), ("route", "base"), ("status", "200")];
    let base_ok_before = s.metric("berth_http_requests_total", &BASE_OK).await;
    let r = s.get("/v2/").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        header(&r, "docker-distribution-api-version"),
        "registry/2.0"
    );
    assert!(!header(&r, "x-request-id").is_empty());
    assert_eq!(s.get("/healthz").await.status(), StatusCode::OK);
    assert_eq!(s.get("/readyz").await.status(), StatusCode::OK);
    // The GET /v2/ above is counted under its method, route and status (the recorder is shared
    // with the other tests of this binary, which can only add to it).
    let base_ok = s.metric("berth_http_requests_total", &BASE_OK).await - base_ok_before;
    assert!(base_ok >= 1.0, "GET /v2/ 200 counted: {base_ok}");
}

#[tokio::test]
async fn monolithic_and_post_put_uploads() {
    let s = TestServer::start("").await;
    // Monolithic POST ?digest=.
    let d = s.push_blob("library/app", b"monolithic").await;
    // POST then PUT with the body.
    let r = s
        .req(Method::POST, "/v2/library/app/blobs/uploads/")
        .await
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let loc = header(&r, "location");
    assert!(loc.starts_with("/v2/library/app/blobs/uploads/"));
    assert_eq!(
        header(&r, "docker-upload-uuid"),
        loc.rsplit('/').next().unwrap()
    );
    let data = b"post then put";
    let r = s
        .client
        .put(s.url(&format!("{loc}?digest={}", sha256(data))))
        .header("content-type", "application/octet-stream")
        .body(data.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(
        header(&r, "location"),
        format!("/v2/library/app/blobs/{}", sha256(data))
    );
    assert_eq!(header(&r, "docker-content-digest"), sha256(data));
    // The session is gone after commit.
    assert_eq!(s.get(&loc).await.status(), StatusCode::NOT_FOUND);
    for (digest, body) in [(d, &b"monolithic"[..]), (sha256(data), &data[..])] {
        let r = s.get(&format!("/v2/library/app/blobs/{digest}")).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(header(&r, "docker-content-digest"), digest);
        assert_eq!(header(&r, "content-length"), body.len().to_string());
        assert_eq!(&r.bytes().await.unwrap()[..], body);
    }
}

#[tokio::test]
async fn chunked_upload_in_order_out_of_order_status_and_cancel() {
    let s = TestServer::start("").await;
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7) as u8).collect();
    let r = s
        .req(Method::POST, "/v2/library/app/blobs/uploads/")
        .await
        .send()
        .await
        .unwrap();
    let loc = header(&r, "location");
    assert_eq!(header(&r, "range"), "0-0");
    let mut offset = 0;
    for chunk in data.chunks(100_000) {
        let end = offset + chunk.len() - 1;
        let r = s
            .client
            .patch(s.url(&loc))
            .header("content-type", "application/octet-stream")
            .header("content-range", format!("{offset}-{end}"))
            .body(chunk.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::ACCEPTED);
        assert_eq!(header(&r, "range"), format!("0-{end}"));
        assert_eq!(header(&r, "location"), loc);
        offset = end + 1;
        // A retried (already received) chunk is refused with the current range.
        let r = s
            .client
            .patch(s.url(&loc))
            .header("content-range", format!("{}-{end}", end + 1 - chunk.len()))
            .body(chunk.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE);
        assert_eq!(header(&r, "range"), format!("0-{end}"));
    }
    // A chunk that skips ahead is refused too.
    let r = s
        .client
        .patch(s.url(&loc))
        .header("content-range", format!("{}-{}", offset + 10, offset + 19))
        .body(vec![0u8; 10])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(error_code(r).await, "BLOB_UPLOAD_INVALID");
    // Status.
    let r = s.get(&loc).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(header(&r, "range"), format!("0-{}", data.len() - 1));
    assert_eq!(header(&r, "location"), loc);
    // Wrong digest at PUT: DIGEST_INVALID and the session is discarded.
    let r = s
        .client
        .put(s.url(&format!("{loc}?digest={}", sha256(b"other"))))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(error_code(r).await, "DIGEST_INVALID");
    assert_eq!(s.get(&loc).await.status(), StatusCode::NOT_FOUND);

    // A fresh session: streamed PATCH without Content-Range (docker style), then PUT.
    let r = s
        .req(Method::POST, "/v2/library/app/blobs/uploads/")
        .await
        .send()
        .await
        .unwrap();
    let loc = header(&r, "location");
    let r = s
        .client
        .patch(s.url(&loc))
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let r = s
        .client
        .put(s.url(&format!("{loc}?digest={}", sha256(&data))))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let got = s
        .get(&format!("/v2/library/app/blobs/{}", sha256(&data)))
        .await
        .bytes()
        .await
        .unwrap();
    assert_eq!(&got[..], &data[..]);

    // Cancel.
    let r = s
        .req(Method::POST, "/v2/library/app/blobs/uploads/")
        .await
        .send()
        .await
        .unwrap();
    let loc = header(&r, "location");
    let r = s.req(Method::DELETE, &loc).await.send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r = s.get(&loc).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_code(r).await, "BLOB_UPLOAD_UNKNOWN");
    // A session is bound to its repository.
    let r = s
        .req(Method::POST, "/v2/library/app/blobs/uploads/")
        .await
        .send()
        .await
        .unwrap();
    let loc = header(&r, "location");
    let r = s.get(&loc.replace("library/app", "library/other")).await;
    assert_eq!(error_code(r).await, "BLOB_UPLOAD_UNKNOWN");
    let r = s.get("/v2/library/app/blobs/uploads/not-a-uuid").await;
    assert_eq!(error_code(r).await, "BLOB_UPLOAD_UNKNOWN");
}

#[tokio::test]
async fn upload_session_survives_restart() {
    let mut s = TestServer::start("").await;
    let r = s
        .req(Method::POST, "/v2/library/app/blobs/uploads/")
        .await
        .send()
        .await
        .unwrap();
    let loc = header(&r, "location");
    let r = s
        .client
        .patch(s.url(&loc))
        .header("content-range", "0-4")
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    s.restart().await;
    let r = s.get(&loc).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(header(&r, "range"), "0-4");
    let r = s
        .client
        .put(s.url(&format!("{loc}?digest={}", sha256(b"hello world"))))
        .header("content-range", "5-10")
        .body(" world")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::CREATED,
        "{}",
        r.text().await.unwrap()
    );
}

#[tokio::test]
async fn sha512_blobs_are_verified() {
    use sha2::Digest as _;
    let s = TestServer::start("").await;
    let data = b"sha512 content";
    let d = format!("sha512:{}", hex::encode(sha2::Sha512::digest(data)));
    let r = s
        .client
        .post(s.url(&format!("/v2/library/app/blobs/uploads/?digest={d}")))
        .body(data.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(
        s.get(&format!("/v2/library/app/blobs/{d}"))
            .await
            .bytes()
            .await
            .unwrap(),
        &data[..]
    );
    // Session upload finished with a sha512 digest.
    let r = s
        .req(Method::POST, "/v2/library/app/blobs/uploads/")
        .await
        .send()
        .await
        .unwrap();
    let loc = header(&r, "location");
    let r = s
        .client
        .put(s.url(&format!("{loc}?digest={d}")))
        .body(data.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    // Wrong content for a sha512 digest.
    let r = s
        .client
        .post(s.url(&format!("/v2/library/app/blobs/uploads/?digest={d}")))
        .body("tampered")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(error_code(r).await, "DIGEST_INVALID");
}

#[tokio::test]
async fn blob_reads_ranges_and_errors() {
    let s = TestServer::start("").await;
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let d = s.push_blob("library/app", &data).await;
    let path = format!("/v2/library/app/blobs/{d}");
    let r = s.req(Method::HEAD, &path).await.send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "content-length"), data.len().to_string());
    assert_eq!(header(&r, "docker-content-digest"), d);
    let r = s
        .client
        .get(s.url(&path))
        .header("range", "bytes=1048570-2097160")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        header(&r, "content-range"),
        format!("bytes 1048570-2097160/{}", data.len())
    );
    assert_eq!(&r.bytes().await.unwrap()[..], &data[1_048_570..=2_097_160]);
    let r = s
        .client
        .get(s.url(&path))
        .header("range", "bytes=-5")
        .send()
        .await
        .unwrap();
    assert_eq!(&r.bytes().await.unwrap()[..], &data[data.len() - 5..]);
    let r = s
        .client
        .get(s.url(&path))
        .header("range", "bytes=3000000-")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(header(&r, "content-range"), "bytes */3000000");
    // Whole blob across many 1 MiB pieces.
    assert_eq!(&s.get(&path).await.bytes().await.unwrap()[..], &data[..]);
    // Unknown blob, blob of another repository, malformed digest.
    let r = s
        .get(&format!("/v2/library/app/blobs/{}", sha256(b"nope")))
        .await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_code(r).await, "BLOB_UNKNOWN");
    let r = s.get(&format!("/v2/library/other/blobs/{d}")).await;
    assert_eq!(error_code(r).await, "BLOB_UNKNOWN");
    for bad in ["sha256:xyz", "md5:abc", "notadigest"] {
        let r = s.get(&format!("/v2/library/app/blobs/{bad}")).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{bad}");
        assert_eq!(error_code(r).await, "DIGEST_INVALID");
    }
    // Delete: unlinked from this repository.
    let r = s.req(Method::DELETE, &path).await.send().await.unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert_eq!(s.get(&path).await.status(), StatusCode::NOT_FOUND);
    let r = s.req(Method::DELETE, &path).await.send().await.unwrap();
    assert_eq!(error_code(r).await, "BLOB_UNKNOWN");
}

#[tokio::test]
async fn cross_repository_mount_and_fallback() {
    let s = TestServer::start("").await;
    let d = s.push_blob("library/src", b"shared layer").await;
    let r = s
        .req(
            Method::POST,
            &format!("/v2/library/dst/blobs/uploads/?mount={d}&from=library/src"),
        )
        .await
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(header(&r, "location"), format!("/v2/library/dst/blobs/{d}"));
    assert_eq!(header(&r, "docker-content-digest"), d);
    assert_eq!(
        s.get(&format!("/v2/library/dst/blobs/{d}")).await.status(),
        StatusCode::OK
    );
    // Source that does not hold it (or does not exist): a session instead.
    for from in ["library/empty", "nosuchreg/x", "Bad//name"] {
        let r = s
            .req(
                Method::POST,
                &format!("/v2/library/dst2/blobs/uploads/?mount={d}&from={from}"),
            )
            .await
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::ACCEPTED, "{from}");
        assert!(!header(&r, "docker-upload-uuid").is_empty());
    }
}

#[tokio::test]
async fn manifests_by_tag_and_digest_with_all_media_types() {
    let s = TestServer::start("").await;
    let (manifest, d) = s.push_image("library/app", "v1", "a").await;
    for reference in ["v1", d.as_str()] {
        let r = s
            .client
            .get(s.url(&format!("/v2/library/app/manifests/{reference}")))
            .header("accept", OCI_MANIFEST)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(header(&r, "content-type"), OCI_MANIFEST);
        assert_eq!(header(&r, "docker-content-digest"), d);
        assert_eq!(
            &r.bytes().await.unwrap()[..],
            &manifest[..],
            "bytes round-trip"
        );
        let r = s
            .req(
                Method::HEAD,
                &format!("/v2/library/app/manifests/{reference}"),
            )
            .await
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(header(&r, "content-length"), manifest.len().to_string());
        assert_eq!(header(&r, "docker-content-digest"), d);
    }
    // Docker schema 2 with a foreign layer that need not be present.
    let cfg = s.push_blob("library/app", b"{}").await;
    let docker = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": cfg, "size": 2},
        "layers": [{"mediaType": "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
                    "digest": sha256(b"foreign"), "size": 7, "urls": ["https://example.invalid/l"]}]
    }))
    .unwrap();
    let r = s
        .put_manifest(
            "library/app",
            "docker",
            "application/vnd.docker.distribution.manifest.v2+json",
            &docker,
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let docker_digest = sha256(&docker);
    // Docker manifest list and OCI index over both; pushed by digest.
    for (mt, tag) in [
        (
            "application/vnd.docker.distribution.manifest.list.v2+json",
            "list",
        ),
        (OCI_INDEX, "index"),
    ] {
        let index = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": mt,
            "manifests": [
                {"mediaType": OCI_MANIFEST, "digest": d, "size": manifest.len(), "platform": {"architecture": "amd64", "os": "linux"}},
                {"mediaType": "application/vnd.docker.distribution.manifest.v2+json", "digest": docker_digest, "size": docker.len(), "platform": {"architecture": "arm64", "os": "linux"}}
            ]
        }))
        .unwrap();
        let r = s
            .put_manifest("library/app", &sha256(&index), mt, &index)
            .await;
        assert_eq!(r.status(), StatusCode::CREATED, "{mt}");
        let r = s.put_manifest("library/app", tag, mt, &index).await;
        assert_eq!(r.status(), StatusCode::CREATED, "{mt}");
        let r = s.get(&format!("/v2/library/app/manifests/{tag}")).await;
        assert_eq!(header(&r, "content-type"), mt);
        assert_eq!(&r.bytes().await.unwrap()[..], &index[..]);
    }
    // Index naming a manifest the repository lacks.
    let missing = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": sha256(b"absent"), "size": 1}]
    }))
    .unwrap();
    let r = s
        .put_manifest("library/app", "bad", OCI_INDEX, &missing)
        .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(error_code(r).await, "MANIFEST_BLOB_UNKNOWN");
}

#[tokio::test]
async fn manifest_validation_errors() {
    let s = TestServer::start("").await;
    let cfg = s.push_blob("library/app", b"{}").await;
    let good = image_manifest(&cfg, 2, &cfg, 2);
    // Layer the repository lacks.
    let missing = image_manifest(&cfg, 2, &sha256(b"absent"), 6);
    let r = s
        .put_manifest("library/app", "v1", OCI_MANIFEST, &missing)
        .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["errors"][0]["code"], "MANIFEST_BLOB_UNKNOWN");
    assert_eq!(v["errors"][0]["detail"]["digest"], sha256(b"absent"));
    // Malformed JSON, wrong schemaVersion, Content-Type mismatch, unsupported type.
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (OCI_MANIFEST, b"{not json".to_vec()),
        (OCI_MANIFEST, br#"{"schemaVersion":1}"#.to_vec()),
        (
            "application/vnd.docker.distribution.manifest.v2+json",
            good.clone(),
        ),
        ("text/plain", br#"{"schemaVersion":2,"config":{}}"#.to_vec()),
        (
            "application/vnd.docker.distribution.manifest.v1+prettyjws",
            br#"{"schemaVersion":2}"#.to_vec(),
        ),
    ];
    for (ct, body) in cases {
        let r = s.put_manifest("library/app", "v1", ct, &body).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{ct}");
        assert_eq!(error_code(r).await, "MANIFEST_INVALID");
    }
    // Too large: 413 MANIFEST_INVALID, by Content-Length and by a streamed body.
    let mut big = good.clone();
    big.extend(std::iter::repeat_n(b' ', 4 * 1024 * 1024));
    let r = s
        .put_manifest("library/app", "v1", OCI_MANIFEST, &big)
        .await;
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(error_code(r).await, "MANIFEST_INVALID");
    let stream = futures_util::stream::iter(
        big.chunks(1 << 20)
            .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
            .collect::<Vec<_>>(),
    );
    let r = s
        .client
        .put(s.url("/v2/library/app/manifests/v1"))
        .header("content-type", OCI_MANIFEST)
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    // Digest reference that does not match the body.
    let r = s
        .put_manifest("library/app", &sha256(b"x"), OCI_MANIFEST, &good)
        .await;
    assert_eq!(error_code(r).await, "DIGEST_INVALID");
    // Bad tag.
    let r = s
        .put_manifest("library/app", "-bad", OCI_MANIFEST, &good)
        .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(error_code(r).await, "TAG_INVALID");
    let long_tag = "a".repeat(129);
    let r = s
        .put_manifest("library/app", &long_tag, OCI_MANIFEST, &good)
        .await;
    assert_eq!(error_code(r).await, "TAG_INVALID");
    // Nothing was stored by any of the refused pushes.
    let r = s.get("/v2/library/app/tags/list").await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    // Unknown manifests.
    let r = s.get("/v2/library/app/manifests/nope").await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_code(r).await, "MANIFEST_UNKNOWN");
    let r = s
        .get(&format!("/v2/library/app/manifests/{}", sha256(b"nope")))
        .await;
    assert_eq!(error_code(r).await, "MANIFEST_UNKNOWN");
}

/// A read of a reference that is neither a tag nor a digest names no manifest: 404
/// `MANIFEST_UNKNOWN` (the only error the spec lists there), on origin registries; a `PUT` keeps
/// 400 `TAG_INVALID` (asserted in `manifest_validation_errors`).
#[tokio::test]
async fn reading_a_malformed_reference_is_manifest_unknown() {
    let s = TestServer::start("").await;
    s.push_blob("library/app", b"{}").await;
    for reference in [
        "-bad",
        "sha256:xyz",
        "sha256:",
        "a".repeat(129).as_str(),
        "sha999:0",
    ] {
        for method in [Method::GET, Method::HEAD] {
            let path = format!("/v2/library/app/manifests/{reference}");
            let r = s.req(method.clone(), &path).await.send().await.unwrap();
            assert_eq!(r.status(), StatusCode::NOT_FOUND, "{method} {path}");
            if method == Method::GET {
                assert_eq!(error_code(r).await, "MANIFEST_UNKNOWN", "{path}");
            }
        }
    }
}

#[tokio::test]
async fn tag_overwrite_delete_and_manifest_delete() {
    let s = TestServer::start("").await;
    let (_, d1) = s.push_image("library/app", "v1", "one").await;
    assert_eq!(
        header(
            &s.get("/v2/library/app/manifests/v1").await,
            "docker-content-digest"
        ),
        d1
    );
    let (m2, d2) = s.push_image("library/app", "v1", "two").await;
    let r = s.get("/v2/library/app/manifests/v1").await;
    assert_eq!(
        header(&r, "docker-content-digest"),
        d2,
        "cached tag was invalidated"
    );
    assert_eq!(&r.bytes().await.unwrap()[..], &m2[..]);
    s.put_manifest("library/app", "v2", OCI_MANIFEST, &m2).await;
    // Tag delete leaves the artifact and its other tags.
    let r = s
        .req(Method::DELETE, "/v2/library/app/manifests/v1")
        .await
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert_eq!(
        s.get("/v2/library/app/manifests/v1").await.status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        s.get("/v2/library/app/manifests/v2").await.status(),
        StatusCode::OK
    );
    assert_eq!(
        s.get(&format!("/v2/library/app/manifests/{d2}"))
            .await
            .status(),
        StatusCode::OK
    );
    // Digest delete removes the artifact and every tag on it.
    let r = s
        .req(Method::DELETE, &format!("/v2/library/app/manifests/{d2}"))
        .await
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert_eq!(
        s.get("/v2/library/app/manifests/v2").await.status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        s.get(&format!("/v2/library/app/manifests/{d2}"))
            .await
            .status(),
        StatusCode::NOT_FOUND
    );
    let r = s
        .req(Method::DELETE, &format!("/v2/library/app/manifests/{d2}"))
        .await
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_code(r).await, "MANIFEST_UNKNOWN");
    // The first image is still there by digest.
    assert_eq!(
        s.get(&format!("/v2/library/app/manifests/{d1}"))
            .await
            .status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn tags_and_catalog_paginate_with_link() {
    let s = TestServer::start("").await;
    let (m, _) = s.push_image("library/app", "t00", "x").await;
    for i in 1..25 {
        let r = s
            .put_manifest("library/app", &format!("t{i:02}"), OCI_MANIFEST, &m)
            .await;
        assert_eq!(r.status(), StatusCode::CREATED);
    }
    let r = s.get("/v2/library/app/tags/list").await;
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["name"], "library/app");
    assert_eq!(v["tags"].as_array().unwrap().len(), 25);
    let mut seen = Vec::new();
    let mut next = Some("/v2/library/app/tags/list?n=10".to_string());
    while let Some(path) = next {
        let r = s.get(&path).await;
        let link = header(&r, "link");
        let v: serde_json::Value = r.json().await.unwrap();
        seen.extend(
            v["tags"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_str().unwrap().to_string()),
        );
        next = (!link.is_empty()).then(|| {
            assert!(link.ends_with("rel=\"next\""), "{link}");
            link[1..link.find('>').unwrap()].to_string()
        });
    }
    let want: Vec<String> = (0..25).map(|i| format!("t{i:02}")).collect();
    assert_eq!(seen, want);
    let v: serde_json::Value = s
        .get("/v2/library/app/tags/list?n=2&last=t05")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["tags"], serde_json::json!(["t06", "t07"]));
    let v: serde_json::Value = s
        .get("/v2/library/app/tags/list?n=0")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["tags"], serde_json::json!([]));
    let r = s.get("/v2/library/app/tags/list?n=abc").await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    // Catalog.
    for repo in ["library/b", "library/a/nested"] {
        s.push_image(repo, "v1", repo).await;
    }
    let v: serde_json::Value = s.get("/v2/_catalog").await.json().await.unwrap();
    assert_eq!(
        v["repositories"],
        serde_json::json!(["library/a/nested", "library/app", "library/b"])
    );
    let r = s.get("/v2/_catalog?n=1&last=library/a/nested").await;
    assert_eq!(
        header(&r, "link"),
        "</v2/_catalog?n=1&last=library%2Fapp>; rel=\"next\""
    );
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["repositories"], serde_json::json!(["library/app"]));
    let v: serde_json::Value = s
        .get("/v2/_catalog?n=5&last=library%2Fapp")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["repositories"], serde_json::json!(["library/b"]));
}

#[tokio::test]
async fn artifacts_with_subject_and_referrers_api() {
    let s = TestServer::start("").await;
    let (subject_manifest, subject) = s.push_image("library/app", "v1", "s").await;
    let empty_cfg = s.push_blob("library/app", b"{}").await;
    let mut referrers = Vec::new();
    for (i, artifact_type) in [
        "application/vnd.example.sbom",
        "application/vnd.example.sig",
        "application/vnd.example.sbom",
    ]
    .iter()
    .enumerate()
    {
        let layer = s
            .push_blob("library/app", format!("payload {i}").as_bytes())
            .await;
        let m = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": artifact_type,
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty_cfg, "size": 2},
            "layers": [{"mediaType": "application/octet-stream", "digest": layer, "size": 9}],
            "subject": {"mediaType": OCI_MANIFEST, "digest": subject, "size": subject_manifest.len()},
            "annotations": {"n": i.to_string()}
        }))
        .unwrap();
        let r = s
            .put_manifest("library/app", &sha256(&m), OCI_MANIFEST, &m)
            .await;
        assert_eq!(r.status(), StatusCode::CREATED);
        assert_eq!(header(&r, "oci-subject"), subject);
        referrers.push(sha256(&m));
    }
    let r = s.get(&format!("/v2/library/app/referrers/{subject}")).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "content-type"), OCI_INDEX);
    assert!(header(&r, "oci-filters-applied").is_empty());
    let v: serde_json::Value = r.json().await.unwrap();
    let list = v["manifests"].as_array().unwrap();
    assert_eq!(list.len(), 3);
    assert!(list
        .iter()
        .all(|d| d["mediaType"] == OCI_MANIFEST && d["size"].as_u64().unwrap() > 0));
    assert!(list.iter().any(|d| d["annotations"]["n"] == "1"));
    let r = s
        .get(&format!(
            "/v2/library/app/referrers/{subject}?artifactType=application/vnd.example.sbom"
        ))
        .await;
    assert_eq!(header(&r, "oci-filters-applied"), "artifactType");
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["manifests"].as_array().unwrap().len(), 2);
    assert!(v["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .all(|d| d["artifactType"] == "application/vnd.example.sbom"));
    // GET of an artifact with a subject carries OCI-Subject.
    let r = s
        .get(&format!("/v2/library/app/manifests/{}", referrers[0]))
        .await;
    assert_eq!(header(&r, "oci-subject"), subject);
    // Unknown subject: an empty index, not 404. Malformed digest: 400.
    let v: serde_json::Value = s
        .get(&format!("/v2/library/app/referrers/{}", sha256(b"none")))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["manifests"], serde_json::json!([]));
    let r = s.get("/v2/library/app/referrers/sha256:bad").await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    // Deleting a referrer removes it from the list.
    s.req(
        Method::DELETE,
        &format!("/v2/library/app/manifests/{}", referrers[1]),
    )
    .await
    .send()
    .await
    .unwrap();
    let v: serde_json::Value = s
        .get(&format!("/v2/library/app/referrers/{subject}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["manifests"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn names_registries_and_malformed_requests() {
    let s = TestServer::start("").await;
    let r = s
        .req(Method::POST, "/v2/ghost/app/blobs/uploads/")
        .await
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let (code, message) = error_of(r).await;
    assert_eq!(code, "NAME_UNKNOWN");
    assert!(message.contains("\"ghost\""), "{message}");
    for path in [
        "/v2/library/App/manifests/v1",
        "/v2/library/a..b/manifests/v1",
        "/v2/library/../etc/manifests/v1",
        "/v2/library/%2e%2e/etc/manifests/v1",
        "/v2/library//app/manifests/v1",
        "/v2/app/manifests/v1",
    ] {
        let r = s.get(path).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{path}");
        assert_eq!(error_code(r).await, "NAME_INVALID", "{path}");
    }
    let long = format!("/v2/library/{}/manifests/v1", "a".repeat(250));
    assert_eq!(error_code(s.get(&long).await).await, "NAME_INVALID");
    // Unknown endpoint and wrong method.
    assert_eq!(s.get("/v3/").await.status(), StatusCode::NOT_FOUND);
    let r = s
        .req(Method::POST, "/v2/library/app/manifests/v1")
        .await
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(error_code(r).await, "UNSUPPORTED");
    // Oversized headers are refused by the HTTP layer (431, or the connection closed while the
    // client is still sending), never served and never a panic.
    let r = s
        .client
        .get(s.url("/v2/"))
        .header("x-huge", "a".repeat(1024 * 1024))
        .send()
        .await;
    if let Ok(r) = r {
        assert_eq!(r.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    }
    // The server still serves after all of that.
    assert_eq!(s.get("/v2/").await.status(), StatusCode::OK);
}

#[tokio::test]
async fn pull_and_push_times_are_recorded() {
    let s = TestServer::start("").await;
    let (_, d) = s.push_image("library/app", "v1", "t").await;
    let app = s.server.as_ref().unwrap().app().clone();
    let digest = berth::oci::digest::Digest::parse(&d).unwrap();
    let record = app
        .store
        .meta
        .artifact("library/app", &digest)
        .await
        .unwrap()
        .unwrap();
    assert!(record.pushed_ms > 0);
    assert_eq!(
        app.store
            .meta
            .last_pull("library/app", &digest)
            .await
            .unwrap(),
        None
    );
    // HEAD is not a pull; GET is.
    s.req(Method::HEAD, "/v2/library/app/manifests/v1")
        .await
        .send()
        .await
        .unwrap();
    app.store.pulls.flush(&*app.store.meta).await.unwrap();
    assert_eq!(
        app.store
            .meta
            .last_pull("library/app", &digest)
            .await
            .unwrap(),
        None
    );
    s.get("/v2/library/app/manifests/v1").await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if let Some(t) = app
            .store
            .meta
            .last_pull("library/app", &digest)
            .await
            .unwrap()
        {
            assert!(t >= record.pushed_ms);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "pull time never written by the batcher"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_all_complete() {
    // sled's flush_async deadlocked with 8+ concurrent writers; writes share a group commit now.
    let s = TestServer::start("").await;
    let (manifest, _) = s.push_image("library/app", "base", "c").await;
    for round in 0..3 {
        concurrent_round(&s, &manifest, round).await;
    }
    let v: serde_json::Value = s
        .get("/v2/library/app/tags/list")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["tags"].as_array().unwrap().len(), 97);
}

async fn concurrent_round(s: &TestServer, manifest: &[u8], round: usize) {
    let mut tasks = Vec::new();
    for i in round * 32..(round + 1) * 32 {
        let manifest = manifest.to_vec();
        let (client, base) = (s.client.clone(), s.base.clone());
        tasks.push(tokio::spawn(async move {
            let data = format!("blob {i}").into_bytes();
            let r = client
                .post(format!(
                    "{base}/v2/library/app/blobs/uploads/?digest={}",
                    sha256(&data)
                ))
                .body(data)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::CREATED);
            let r = client
                .put(format!("{base}/v2/library/app/manifests/t{i}"))
                .header("content-type", OCI_MANIFEST)
                .body(manifest)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::CREATED);
        }));
    }
    let all = futures_util::future::join_all(tasks);
    let results = tokio::time::timeout(std::time::Duration::from_secs(60), all)
        .await
        .expect("concurrent writes finish (no flush deadlock)");
    assert!(results.iter().all(|r| r.is_ok()));
}
