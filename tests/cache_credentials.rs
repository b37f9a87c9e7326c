//! Source credentials per kind, against loopback doubles: Docker Hub's token server, ECR's
//! SigV4 GetAuthorizationToken, Quay and GCR basic credentials, a real Debian docker-registry
//! with htpasswd, and blob redirects followed without the source's credentials.

mod common;

use std::time::{Duration, Instant};

use common::doubles::{
    BasicAuthFront, EcrConfig, EcrDouble, HtpasswdRegistry, StaticImage, StaticRegistry,
    TokenAuthConfig, TokenAuthFront,
};
use common::server::*;
use reqwest::StatusCode;

async fn edge(cache_toml: &str) -> TestServer {
    TestServer::start(&format!(
        "[[image_cache]]\nname = \"up\"\n{cache_toml}\n[[registry]]\nname = \"hub\"\ntype = \"cache\"\ncache = \"up\"\n"
    ))
    .await
}

/// Pulls the image's manifest by tag and every blob through the edge; checks the bytes.
async fn pull(edge: &TestServer, image: &StaticImage, layers: &[&[u8]]) {
    let r = edge
        .get(&format!("/v2/hub/{}/manifests/{}", image.repo, image.tag))
        .await;
    assert_eq!(r.status(), StatusCode::OK, "{}", r.text().await.unwrap());
    assert_eq!(header(&r, "docker-content-digest"), image.manifest_digest);
    for (digest, data) in image.layer_digests.iter().zip(layers) {
        let r = edge
            .get(&format!("/v2/hub/{}/blobs/{digest}", image.repo))
            .await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(&r.bytes().await.unwrap()[..], *data);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_hub_token_flow_caches_tokens_per_scope_and_refreshes_them() {
    let source = StaticRegistry::start();
    let front = TokenAuthFront::start_with(
        &source.url(),
        TokenAuthConfig {
            credentials: Some(("hubuser".into(), "hubpat".into())),
            allow_anonymous: false,
            expires_in: 3,
            ..TokenAuthConfig::default()
        },
    );
    let a = source.put_image("library/nginx", "1.27", &[b"nginx layer"]);
    let b = source.put_image("bitnami/redis", "7", &[b"redis layer"]);
    let e = edge(&format!(
        "kind = \"dockerhub\"\nurl = \"{}\"\nusername = \"hubuser\"\npassword = \"hubpat\"",
        front.url()
    ))
    .await;
    // `nginx` gets library/ (Docker Hub official image).
    let r = e.get("/v2/hub/nginx/manifests/1.27").await;
    assert_eq!(header(&r, "docker-content-digest"), a.manifest_digest);
    for _ in 0..3 {
        pull(&e, &a, &[b"nginx layer"]).await;
    }
    assert_eq!(
        front.token_requests_for("repository:library/nginx:pull"),
        1,
        "one login, not one per pull"
    );
    pull(&e, &b, &[b"redis layer"]).await;
    assert_eq!(
        front.token_requests_for("repository:bitnami/redis:pull"),
        1,
        "a token per scope"
    );
    // Near its expiry (expires_in = 3 s; the edge refreshes a tenth early) a new token is
    // fetched: pull until one was, with a deadline, and only one.
    let deadline = Instant::now() + Duration::from_secs(15);
    while front.token_requests_for("repository:library/nginx:pull") < 2 {
        assert!(
            Instant::now() < deadline,
            "no new token 15 s after one valid for 3 s"
        );
        pull(&e, &a, &[b"nginx layer"]).await;
        if front.token_requests_for("repository:library/nginx:pull") < 2 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert_eq!(front.token_requests_for("repository:library/nginx:pull"), 2);
    // Wrong credentials: a clear error naming the image cache, and the stale copy is served.
    front.set_credentials(Some(("hubuser", "other")));
    front.revoke_tokens();
    let r = e.get("/v2/hub/library/nginx/manifests/1.27").await;
    assert_eq!(
        r.status(),
        StatusCode::OK,
        "cached copy while the source refuses"
    );
    let r = e.get("/v2/hub/library/nginx/manifests/other").await;
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    let v: serde_json::Value = r.json().await.unwrap();
    assert!(
        v["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("\"up\""),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_hub_anonymous_pull() {
    let source = StaticRegistry::start();
    let front = TokenAuthFront::start(&source.url());
    let a = source.put_image("library/alpine", "3", &[b"alpine"]);
    let e = edge(&format!("kind = \"dockerhub\"\nurl = \"{}\"", front.url())).await;
    pull(&e, &a, &[b"alpine"]).await;
    assert_eq!(front.token_requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ecr_signs_get_authorization_token_and_reuses_the_password() {
    let source = StaticRegistry::start();
    let ecr = EcrDouble::start(&source.url());
    let cfg = ecr.config();
    let a = source.put_image("team/app", "v1", &[b"ecr layer"]);
    let toml = format!(
        "kind = \"ecr\"\nurl = \"{}\"\nregion = \"{}\"\necr_endpoint = \"{}\"\nusername = \"{}\"\npassword = \"{}\"",
        ecr.registry_url(),
        cfg.region,
        ecr.api_url(),
        cfg.access_key_id,
        cfg.secret_access_key
    );
    let e = edge(&toml).await;
    for _ in 0..3 {
        pull(&e, &a, &[b"ecr layer"]).await;
    }
    let b = source.put_image("team/other", "v1", &[b"other"]);
    pull(&e, &b, &[b"other"]).await;
    assert_eq!(
        ecr.token_calls(),
        1,
        "the 12 h password is reused across pulls and repositories"
    );
    assert_eq!(ecr.signature_failures(), 0);
    // The password is revoked early: berth notices the 401 and exchanges its keys again,
    // within the same request.
    ecr.expire_passwords();
    let c = source.put_image("team/third", "v1", &[b"third"]);
    pull(&e, &c, &[b"third"]).await;
    assert_eq!(ecr.token_calls(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ecr_with_a_wrong_secret_is_refused_by_the_signature_check() {
    let source = StaticRegistry::start();
    let ecr = EcrDouble::start_with(&source.url(), EcrConfig::default());
    let cfg = ecr.config();
    source.put_image("team/app", "v1", &[b"x"]);
    let e = edge(&format!(
        "kind = \"ecr\"\nurl = \"{}\"\nregion = \"{}\"\necr_endpoint = \"{}\"\nusername = \"{}\"\npassword = \"not-the-secret\"",
        ecr.registry_url(),
        cfg.region,
        ecr.api_url(),
        cfg.access_key_id
    ))
    .await;
    let r = e.get("/v2/hub/team/app/manifests/v1").await;
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    let v: serde_json::Value = r.json().await.unwrap();
    assert!(
        v["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("GetAuthorizationToken"),
        "{v}"
    );
    assert!(ecr.signature_failures() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quay_robot_json_and_gcr_json_key_file() {
    let source = StaticRegistry::start();
    let a = source.put_image("org/app", "v1", &[b"quay"]);
    let quay = BasicAuthFront::quay(&source.url(), "org+robot", "robotpw");
    let robot = r#"{"account_name":"org+robot","docker_cli_password":"robotpw"}"#;
    let e = edge(&format!(
        "kind = \"quay\"\nurl = \"{}\"\npassword = '{robot}'",
        quay.url()
    ))
    .await;
    pull(&e, &a, &[b"quay"]).await;
    assert!(quay.accepted() > 0 && quay.rejected() <= 1);

    let key = r#"{"type":"service_account","project_id":"p","private_key":"-----BEGIN PRIVATE KEY-----x"}"#;
    let gcr = BasicAuthFront::json_key(&source.url(), key);
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("key.json");
    std::fs::write(&key_file, key).unwrap();
    let e = edge(&format!(
        "kind = \"gcr\"\nurl = \"{}\"\ncredentials_file = {:?}",
        gcr.url(),
        key_file
    ))
    .await;
    pull(&e, &a, &[b"quay"]).await;
    assert!(gcr.accepted() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debian_docker_registry_with_htpasswd_as_source() {
    let source = HtpasswdRegistry::start("harbor", "Harbor12345");
    let client = reqwest::Client::new();
    let auth = source.basic_auth_header();
    let mut digests = Vec::new();
    for data in [b"{}".to_vec(), b"htpasswd layer".to_vec()] {
        let r = client
            .post(format!("{}/v2/proj/app/blobs/uploads/", source.url()))
            .header("authorization", &auth)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::ACCEPTED);
        let loc = header(&r, "location");
        let sep = if loc.contains('?') { '&' } else { '?' };
        let loc = if loc.starts_with("http") {
            loc
        } else {
            format!("{}{loc}", source.url())
        };
        let r = client
            .put(format!("{loc}{sep}digest={}", sha256(&data)))
            .header("authorization", &auth)
            .body(data.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
        digests.push((sha256(&data), data.len() as u64));
    }
    let m = image_manifest(&digests[0].0, digests[0].1, &digests[1].0, digests[1].1);
    let r = client
        .put(format!("{}/v2/proj/app/manifests/v1", source.url()))
        .header("authorization", &auth)
        .header("content-type", OCI_MANIFEST)
        .body(m.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let e = edge(&format!(
        "kind = \"harbor\"\nurl = \"{}\"\nusername = \"harbor\"\npassword = \"Harbor12345\"",
        source.url()
    ))
    .await;
    let r = e.get("/v2/hub/proj/app/manifests/v1").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(&r.bytes().await.unwrap()[..], &m[..]);
    let r = e
        .get(&format!("/v2/hub/proj/app/blobs/{}", digests[1].0))
        .await;
    assert_eq!(&r.bytes().await.unwrap()[..], b"htpasswd layer");
    // Wrong password: refused with a clear error.
    let bad = edge(&format!(
        "kind = \"harbor\"\nurl = \"{}\"\nusername = \"harbor\"\npassword = \"wrong\"",
        source.url()
    ))
    .await;
    let r = bad.get("/v2/hub/proj/app/manifests/v1").await;
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    let v: serde_json::Value = r.json().await.unwrap();
    assert!(
        v["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("refused"),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_redirects_are_followed_without_the_source_credentials() {
    let source = StaticRegistry::start();
    let a = source.put_image("org/app", "v1", &[b"redirected layer"]);
    let front = BasicAuthFront::start(&source.url(), "user", "pw");
    front.redirect_blobs(true);
    // The object store double is on loopback (another port than the source): the egress
    // policy refuses that by default (tests/egress.rs), so this test allows loopback.
    let e = edge(&format!(
        "kind = \"acr\"\nurl = \"{}\"\nusername = \"user\"\npassword = \"pw\"\n[egress]\nallowed_networks = [\"127.0.0.0/8\"]",
        front.url()
    ))
    .await;
    pull(&e, &a, &[b"redirected layer"]).await;
    assert!(
        front.object_store().traffic().requests_matching("GET", "") >= 1,
        "blob bytes came from the object store"
    );
    assert_eq!(
        front.object_store().rejected_with_auth(),
        0,
        "Authorization was not forwarded across hosts"
    );
}

/// A data directory written before image-cache credentials were a record of their own (the
/// whole definition, password inline, in the `image_caches` tree) still opens: its cache
/// registry keeps pulling from a source that demands those credentials, the API shows them as
/// set, and afterwards the definition no longer holds the secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_legacy_data_dir_keeps_its_image_caches_and_their_credentials() {
    let source = StaticRegistry::start();
    let image = source.put_image("org/app", "v1", &[b"legacy layer"]);
    let front = BasicAuthFront::start(&source.url(), "bot", "legacy-pw-61c2");
    let dir = tempfile::tempdir().unwrap();
    let meta_dir = dir.path().join("data").join("meta");
    {
        // What berth wrote before: `ImageCacheConfig` as JSON, and a cache registry using it.
        let db = sled::open(&meta_dir).unwrap();
        let legacy = format!(
            r#"{{"name":"up","kind":"registry","url":"{}","username":"bot","password":"legacy-pw-61c2","fetch_budget":"3m 20s","revalidate_ttl":"0s"}}"#,
            front.url()
        );
        db.open_tree("image_caches")
            .unwrap()
            .insert("up", legacy.as_bytes())
            .unwrap();
        db.open_tree("registries")
            .unwrap()
            .insert(
                "hub",
                &br#"{"name":"hub","kind":"cache","created_ms":1700000000000,"cache":"up","public_uri":true,"anonymous_pull":false}"#[..],
            )
            .unwrap();
        db.flush().unwrap();
    }
    // sled's flusher thread lets go of the database's file lock a moment after the last
    // handle is dropped: start once it has.
    let deadline = Instant::now() + Duration::from_secs(10);
    let server = loop {
        match berth::Server::start(config_for(dir.path(), "")).await {
            Ok(server) => break server,
            Err(e) if Instant::now() < deadline && e.to_string().contains("lock") => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("{e}"),
        }
    };
    let base = format!("http://{}", server.local_addrs()[0].0);
    let client = reqwest::Client::new();
    let r = client
        .get(format!("{base}/v2/hub/org/app/manifests/v1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK, "{}", r.text().await.unwrap());
    assert_eq!(header(&r, "docker-content-digest"), image.manifest_digest);
    let r = client
        .get(format!(
            "{base}/v2/hub/org/app/blobs/{}",
            image.layer_digests[0]
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(&r.bytes().await.unwrap()[..], b"legacy layer");
    // The front answers 401 to anything without bot/legacy-pw-61c2: it let the pulls through.
    assert!(front.accepted() >= 2, "{} accepted", front.accepted());
    let v: serde_json::Value = client
        .get(format!("{base}/api/v1/image-caches/up"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["credentials"], "user bot, password set", "{v}");
    assert_eq!(v["loaded"], true, "{v}");
    assert_eq!(v["fetch_budget"], "3m 20s", "{v}");
    server.shutdown().await;
    // The last holders of the store let go of it as their tasks end: open it once they have.
    let deadline = Instant::now() + Duration::from_secs(20);
    let db = loop {
        match sled::open(&meta_dir) {
            Ok(db) => break db,
            Err(e) => {
                assert!(Instant::now() < deadline, "metadata still locked: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let definition = db
        .open_tree("image_caches")
        .unwrap()
        .get("up")
        .unwrap()
        .unwrap();
    let definition = String::from_utf8_lossy(&definition);
    assert!(!definition.contains("legacy-pw-61c2"), "{definition}");
    let credentials = db
        .open_tree("credentials")
        .unwrap()
        .get("up")
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&credentials).contains("legacy-pw-61c2"));
}
