//! `[storage] kind = "s3"`: a server keeps its blobs and upload sessions in an S3 bucket (a real
//! `s3s-fs` on loopback, installed by scripts/test.sh), and finds them again after a restart.

mod common;

use common::registry::{chunked_upload, Client};
use common::server::*;
use reqwest::StatusCode;

use berth::testbed::S3Server;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_keeps_its_blobs_and_uploads_in_the_bucket() {
    let s3 = S3Server::start().await;
    let mut s = TestServer::start(&s3.storage_toml("edge")).await;
    let client = Client::over(reqwest::Client::new(), &s.url(""));
    let manifest = client.image("library/app", "v1", "one", b"base").await;
    assert_eq!(client.pull_all("library/app", "v1").await, manifest);

    // A chunked upload longer than a part: its bytes go to the bucket as they come.
    let data: Vec<u8> = (0..(7 << 20)).map(|i| (i % 253) as u8).collect();
    let d = chunked_upload(&[&client], "library/app", &data, 6 << 20).await;
    let hex = d.trim_start_matches("sha256:");
    assert!(s3.holds(&format!("edge/blobs/sha256/{hex}")));
    assert!(!s
        .dir
        .path()
        .join("data/blobs/sha256")
        .join(&hex[..2])
        .exists());

    s.restart().await;
    let client = Client::over(reqwest::Client::new(), &s.url(""));
    assert_eq!(client.pull_all("library/app", "v1").await, manifest);
    let r = client.get(&format!("/v2/library/app/blobs/{d}")).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.bytes().await.unwrap().as_ref(), &data[..]);
}

/// With `redirect = true` a blob GET is a 307 to a presigned URL of the bucket that serves the
/// bytes, counted in `berth_blob_redirected_bytes_total`; a HEAD is not counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_downloads_are_redirected_to_the_bucket_and_counted() {
    let s3 = S3Server::start().await;
    let s = TestServer::start(&format!("{}redirect = true\n", s3.storage_toml("edge"))).await;
    let data: Vec<u8> = (0..100_000).map(|i| (i % 239) as u8).collect();
    let digest = s.push_blob("library/app", &data).await;
    let no_follow = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let path = s.url(&format!("/v2/library/app/blobs/{digest}"));
    let before = s.metric("berth_blob_redirected_bytes_total", &[]).await;
    let head = no_follow.head(&path).send().await.unwrap();
    assert_eq!(head.status(), StatusCode::TEMPORARY_REDIRECT);
    let r = no_follow.get(&path).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::TEMPORARY_REDIRECT);
    assert_eq!(header(&r, "docker-content-digest"), digest);
    let location = header(&r, "location");
    assert!(location.starts_with(&s3.endpoint()), "{location}");
    let fetched = reqwest::get(&location).await.unwrap();
    assert!(fetched.status().is_success());
    assert!(fetched.bytes().await.unwrap() == data);
    let after = s.metric("berth_blob_redirected_bytes_total", &[]).await;
    assert_eq!(
        after - before,
        data.len() as f64,
        "the GET counted, not the HEAD"
    );
}
