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
    let err = reqwest::get(format!("https://localhost:{}/v2/", addrs[0].0.port()))
        .await
        .expect_err("an untrusted certificate is not served");
    assert!(
        err.is_connect() && error_chain(&err).contains("UnknownIssuer"),
        "{}",
        error_chain(&err)
    );
    server.shutdown().await;
}

/// Writes `cert_pem` and `key_pem` into `dir` and returns a config with one TLS listener on them.
fn tls_config(dir: &std::path::Path, cert_pem: &str, key_pem: &str) -> Config {
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    std::fs::write(&cert_path, cert_pem).unwrap();
    std::fs::write(&key_path, key_pem).unwrap();
    Config::from_toml(&format!(
        "data_dir = {:?}\n[[listen]]\naddr = \"127.0.0.1:0\"\ntls_cert = {:?}\ntls_key = {:?}\n[[registry]]\nname = \"library\"\n",
        dir.join("data"),
        cert_path,
        key_path
    ))
    .unwrap()
}

/// A CA and a certificate for `localhost`/`127.0.0.1` that it signed: (CA PEM, cert chain PEM,
/// key PEM of the certificate).
fn ca_signed_certificate(ca_name: &str) -> (String, String, String) {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, ca_name);
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap())
        .unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
    (ca.pem(), leaf.pem(), key.serialize_pem())
}

/// The whole error chain of a failed request, for what it says about the cause.
fn error_chain(e: &reqwest::Error) -> String {
    let mut text = format!("{e}");
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
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

    // A certificate with the key of another keypair: refused at start, the mismatch named.
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let other_key = rcgen::KeyPair::generate().unwrap();
    assert_ne!(
        rcgen::PublicKeyData::der_bytes(&other_key),
        rcgen::PublicKeyData::der_bytes(&cert.signing_key)
    );
    let dir = tempfile::tempdir().unwrap();
    let config = tls_config(dir.path(), &cert.cert.pem(), &other_key.serialize_pem());
    let err = berth::Server::start(config)
        .await
        .err()
        .expect("start fails with a key that does not match the certificate");
    assert!(
        err.to_string().contains("certificate and key do not match"),
        "{err}"
    );

    // The same certificate with its own key starts: the refusal above was the mismatch.
    let dir = tempfile::tempdir().unwrap();
    let config = tls_config(
        dir.path(),
        &cert.cert.pem(),
        &cert.signing_key.serialize_pem(),
    );
    let server = berth::Server::start(config)
        .await
        .expect("the matching key starts");
    server.shutdown().await;
}

#[tokio::test]
async fn a_client_with_the_ca_is_served_and_others_fail_the_handshake() {
    let (ca, chain, key) = ca_signed_certificate("berth test CA");
    let (other_ca, _, _) = ca_signed_certificate("another CA");
    let dir = tempfile::tempdir().unwrap();
    let server = berth::Server::start(tls_config(dir.path(), &chain, &key))
        .await
        .unwrap();
    let url = format!("https://localhost:{}/v2/", server.local_addrs()[0].0.port());
    let client = |root: Option<&str>| {
        let mut b = reqwest::Client::builder();
        if let Some(pem) = root {
            b = b.add_root_certificate(reqwest::Certificate::from_pem(pem.as_bytes()).unwrap());
        }
        b.build().unwrap()
    };
    // Neither a client with only the default roots nor one trusting another CA gets an answer:
    // the handshake fails on the certificate.
    for (who, c) in [
        ("default roots", client(None)),
        ("another CA", client(Some(&other_ca))),
    ] {
        let err = c.get(&url).send().await.expect_err(who);
        assert!(err.is_connect(), "{who}: {err:?}");
        let chain = error_chain(&err);
        assert!(
            chain.contains("certificate") && chain.contains("UnknownIssuer"),
            "{who}: the handshake fails on the certificate: {chain}"
        );
    }
    // A client that trusts the CA is served, over h2 and HTTP/1.1.
    for http1_only in [false, true] {
        let c = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes()).unwrap());
        let c = if http1_only { c.http1_only() } else { c };
        let r = c.build().unwrap().get(&url).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(
            r.version(),
            if http1_only {
                reqwest::Version::HTTP_11
            } else {
                reqwest::Version::HTTP_2
            }
        );
    }
    server.shutdown().await;
}

/// SIGHUP (and `berth reload`) re-read a TLS listener's certificate: new handshakes get the new
/// one; a broken file keeps the one in use. The config file's registries apply at once, and
/// what needs a restart is named.
#[test]
fn reload_swaps_the_certificate_and_applies_the_config_file() {
    use common::process::BerthProcess;
    let dir = tempfile::tempdir().unwrap();
    let (ca_a, cert_a, key_a) = ca_signed_certificate("reload CA a");
    let (ca_b, cert_b, key_b) = ca_signed_certificate("reload CA b");
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let install = |cert: &str, key: &str| {
        std::fs::write(&cert_path, cert).unwrap();
        std::fs::write(&key_path, key).unwrap();
    };
    install(&cert_a, &key_a);
    let server = BerthProcess::start_in(
        dir.path(),
        &format!("[[listen]]\naddr = \"127.0.0.1:0\"\ntls_cert = {cert_path:?}\ntls_key = {key_path:?}\n"),
    );
    let port = server
        .tls_addr
        .clone()
        .expect("a TLS listener")
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let served_for = |ca: &str| {
        let client = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes()).unwrap())
            .build()
            .unwrap();
        rt.block_on(client.get(format!("https://localhost:{port}/v2/")).send())
            .is_ok_and(|r| r.status() == StatusCode::OK)
    };
    assert!(served_for(&ca_a) && !served_for(&ca_b));
    install(&cert_b, &key_b);
    server.signal_hup();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !served_for(&ca_b) {
        assert!(
            std::time::Instant::now() < deadline,
            "SIGHUP did not swap the certificate"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(!served_for(&ca_a), "the old certificate is still served");

    let url = server.url();
    let reload = |args: &[&str]| {
        let all: Vec<&str> = ["--server", url.as_str(), "reload"]
            .into_iter()
            .chain(args.iter().copied())
            .collect();
        common::process::run_berth(&all, &[])
    };
    // A broken certificate file: reported, and the one in use stays.
    std::fs::write(&cert_path, "not a certificate").unwrap();
    let (ok, out, e) = reload(&[]);
    assert!(!ok && out.contains("kept"), "{out}{e}");
    assert!(served_for(&ca_b));
    install(&cert_b, &key_b);

    // The config file: a registry, a cache registry (with the default cleanup, as at a start)
    // and replication added apply at once; a limit changed needs a restart.
    let config = dir.path().join("config.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        format!(
            "{text}\n[[registry]]\nname = \"late\"\n\
             [[image_cache]]\nname = \"up\"\nkind = \"registry\"\nurl = \"http://127.0.0.1:9\"\n\
             [[registry]]\nname = \"hubcache\"\ntype = \"cache\"\ncache = \"up\"\n\
             [[replication.endpoint]]\nname = \"eu\"\nurl = \"http://127.0.0.1:9\"\n\
             [[replication.rule]]\nname = \"to-eu\"\nendpoint = \"eu\"\nregistry = \"late\"\n\
             [limits]\nmax_connections = 100\n"
        ),
    )
    .unwrap();
    let (ok, out, e) = reload(&["--json"]);
    assert!(ok, "{out}{e}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        report["applied"],
        serde_json::json!([
            "image_cache up",
            "registry late",
            "registry hubcache",
            "replication endpoint eu",
            "replication rule to-eu"
        ]),
        "{out}"
    );
    let get = |path: &str| {
        rt.block_on(async {
            let r = reqwest::get(format!("{}/api/v1{path}", server.url()))
                .await
                .unwrap();
            (r.status(), r.text().await.unwrap())
        })
    };
    let (st, policies) = get("/registries/hubcache/cleanup-policies");
    assert_eq!(st, StatusCode::OK);
    assert!(policies.contains("pulled_within_days"), "{policies}");
    assert_eq!(get("/replication/rules/to-eu").0, StatusCode::OK);
    assert_eq!(
        report["restart_needed"],
        serde_json::json!(["limits"]),
        "{out}"
    );
    assert!(report["certificates"][0].get("error").is_none(), "{out}");
    let r = rt
        .block_on(reqwest::get(format!(
            "{}/api/v1/registries/late",
            server.url()
        )))
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // A config that would be refused changes nothing.
    std::fs::write(
        &config,
        format!("{text}\n[[registry]]\nname = \"hub\"\ntype = \"cache\"\ncache = \"missing\"\n"),
    )
    .unwrap();
    let (ok, out, e) = reload(&[]);
    assert!(!ok && e.contains("\"missing\""), "{out}{e}");
    let r = rt
        .block_on(reqwest::get(format!(
            "{}/api/v1/registries/hub",
            server.url()
        )))
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
}

/// A reload compares the config file's log filter with the one in effect, which an earlier
/// reload may have changed: putting the file back to its first filter applies it again (before,
/// the comparison was with the filter the server started with, so the changed filter stayed).
#[test]
fn a_log_filter_changed_by_a_reload_can_be_changed_back() {
    use common::process::{berth_bin, BerthProcess};
    let dir = tempfile::tempdir().unwrap();
    let server = BerthProcess::start_config_logging(dir.path(), "");
    let config = dir.path().join("config.toml");
    let first = std::fs::read_to_string(&config).unwrap();
    let default = berth::config::Config::from_toml("").unwrap().log;
    let reload = || {
        let out = std::process::Command::new(berth_bin())
            .args(["--server", &server.url(), "reload", "--json"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        report["applied"].clone()
    };
    assert_eq!(reload(), serde_json::json!([]), "nothing changed yet");
    std::fs::write(&config, format!("log = \"warn,berth=debug\"\n{first}")).unwrap();
    assert_eq!(reload(), serde_json::json!(["log = \"warn,berth=debug\""]));
    assert_eq!(reload(), serde_json::json!([]), "it is in effect already");
    std::fs::write(&config, &first).unwrap();
    assert_eq!(reload(), serde_json::json!([format!("log = {default:?}")]));
}
