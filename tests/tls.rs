//! TLS listeners (rustls): HTTPS with HTTP/2 by ALPN and HTTP/1.1, beside a plain listener.

mod common;

use berth::config::Config;
use reqwest::StatusCode;

#[tokio::test]
async fn https_listener_serves_h2_and_http1_beside_plain_http() {
    let dir = tempfile::tempdir().unwrap();
    let cert =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap();
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let config = Config::from_toml(&format!(
        "data_dir = {:?}\n[[listen]]\naddr = \"127.0.0.1:0\"\ntls_cert = {:?}\ntls_key = {:?}\n[[listen]]\naddr = \"127.0.0.1:0\"\n[[registry]]\nname = \"library\"\n",
        dir.path().join("data"),
        cert_path,
        key_path
    ))
    .unwrap();
    let server = berth::Server::start(config).await.unwrap();
    let addrs = server.local_addrs().to_vec();
    assert!(
        addrs[0].1 && !addrs[1].1,
        "first listener is TLS, second plain"
    );
    let root = reqwest::Certificate::from_pem(cert.cert.pem().as_bytes()).unwrap();
    for http1_only in [false, true] {
        let mut builder = reqwest::Client::builder().add_root_certificate(root.clone());
        if http1_only {
            builder = builder.http1_only();
        }
        let client = builder.build().unwrap();
        let r = client
            .get(format!("https://localhost:{}/v2/", addrs[0].0.port()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let want = if http1_only {
            reqwest::Version::HTTP_11
        } else {
            reqwest::Version::HTTP_2
        };
        assert_eq!(r.version(), want);
    }
    let r = reqwest::get(format!("http://{}/v2/", addrs[1].0))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // A client that does not trust the certificate is refused at the handshake, not served.
    let r = reqwest::get(format!("https://localhost:{}/v2/", addrs[0].0.port())).await;
    assert!(r.is_err());
    server.shutdown().await;
}

#[tokio::test]
async fn a_missing_or_mismatched_certificate_fails_start_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config::from_toml(&format!(
        "data_dir = {:?}\n[[listen]]\naddr = \"127.0.0.1:0\"\ntls_cert = \"/nonexistent/cert.pem\"\ntls_key = \"/nonexistent/key.pem\"\n",
        dir.path().join("data")
    ))
    .unwrap();
    let err = berth::Server::start(config)
        .await
        .err()
        .expect("start fails");
    assert!(
        err.to_string()
            .contains("cannot read tls_cert /nonexistent/cert.pem"),
        "{err}"
    );
}
