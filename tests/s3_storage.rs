//! `[storage] kind = "s3"`: a server keeps its blobs and upload sessions in an S3 bucket (a real
//! `s3s-fs` on loopback, installed by scripts/test.sh), and finds them again after a restart.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::registry::Client;
use common::server::*;
use reqwest::StatusCode;

/// An `s3s-fs` over a fresh directory holding the bucket `berth`, killed on drop.
struct S3Server {
    child: std::process::Child,
    port: u16,
    root: tempfile::TempDir,
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl S3Server {
    async fn start() -> S3Server {
        let binary = std::env::var_os("PATH")
            .and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|dir| dir.join("s3s-fs"))
                    .find(|p| p.is_file())
            })
            .or_else(|| {
                std::env::var_os("HOME")
                    .map(|home| PathBuf::from(home).join(".cargo/bin/s3s-fs"))
                    .filter(|p| p.is_file())
            })
            .expect("s3s-fs is not installed: run scripts/test.sh");
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("berth")).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = std::process::Command::new(binary)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", "AK", "--secret-key", "SK"])
            .arg(root.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let server = S3Server { child, port, root };
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return server;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("s3s-fs did not listen on port {port}");
    }

    fn storage(&self) -> String {
        format!(
            "[storage]\nkind = \"s3\"\nendpoint = \"http://127.0.0.1:{}\"\nbucket = \"berth\"\n\
             prefix = \"edge\"\naccess_key_id = \"AK\"\nsecret_access_key = \"SK\"\n\
             part_bytes = 5242880\n",
            self.port
        )
    }

    /// s3s-fs keeps an object as a file at its key.
    fn holds(&self, key: &str) -> bool {
        self.root.path().join("berth").join(key).is_file()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_keeps_its_blobs_and_uploads_in_the_bucket() {
    let s3 = S3Server::start().await;
    let mut s = TestServer::start(&s3.storage()).await;
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
