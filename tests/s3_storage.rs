//! `[storage] kind = "s3"`: a server keeps its blobs and upload sessions in an S3 bucket (a real
//! `s3s-fs` on loopback, installed by scripts/test.sh), and finds them again after a restart.

mod common;

use common::registry::Client;
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
    let r = client
        .req(reqwest::Method::POST, "/v2/library/app/blobs/uploads/")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let mut location = r.headers()["location"].to_str().unwrap().to_string();
    let mut at = 0;
    for chunk in data.chunks(6 << 20) {
        let r = client
            .req(reqwest::Method::PATCH, &location)
            .header("content-range", format!("{at}-{}", at + chunk.len() - 1))
            .body(chunk.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            StatusCode::ACCEPTED,
            "{}",
            r.text().await.unwrap()
        );
        location = r.headers()["location"].to_str().unwrap().to_string();
        at += chunk.len();
    }
    let d = sha256(&data);
    let sep = if location.contains('?') { '&' } else { '?' };
    let r = client
        .req(reqwest::Method::PUT, &format!("{location}{sep}digest={d}"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::CREATED,
        "{}",
        r.text().await.unwrap()
    );
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
