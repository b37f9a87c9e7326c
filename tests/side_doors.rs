//! No path around authorization: cross-repository mounts, `?ns=` routing against token scopes,
//! existence oracles, atomic push/delete under races, and a failed-login slowdown that does not
//! lock out the rightful owner. Each test failed on the code before the fix (issue 9, items 1-6).

mod common;

use std::time::{Duration, Instant};

use berth::auth::Role;
use common::server::{cache_toml, error_of, sha256, TestServer, OCI_MANIFEST};
use reqwest::{Method, StatusCode};

/// Claims of a JWT, read without checking it (the test looks at what was granted).
fn claims_of(token: &str) -> serde_json::Value {
    use base64::Engine as _;
    let payload = token.split('.').nth(1).unwrap();
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    serde_json::from_slice(&json).unwrap()
}

/// Base URL of the server's `i`-th listener.
fn listener(s: &TestServer, i: usize) -> String {
    format!("http://{}", s.server.as_ref().unwrap().local_addrs()[i].0)
}

#[tokio::test]
async fn a_mount_takes_nothing_from_a_repository_the_caller_may_not_pull() {
    let s = TestServer::start("[[registry]]\nname = \"team\"\n").await;
    let secret_blob = s.push_blob("team/secret", b"team's secret layer").await;
    let shared_blob = s.push_blob("library/base", b"a shared layer").await;
    let (id, key) = s.user("ci", Role::ImageUploader, &["library"]);
    let mount = |digest: &str, from: &str| {
        s.client
            .post(s.url(&format!(
                "/v2/library/app/blobs/uploads/?mount={digest}&from={from}"
            )))
            .basic_auth(&id, Some(&key))
            .send()
    };
    // Not readable by the caller: a session, as for a blob that exists nowhere.
    let r = mount(&secret_blob, "team/secret").await.unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert!(r.headers().get("location").is_some());
    let nowhere = sha256(b"exists nowhere");
    let r2 = mount(&nowhere, "team/secret").await.unwrap();
    assert_eq!(r2.status(), StatusCode::ACCEPTED);
    // Nothing was linked: the blob is still unknown in library/app.
    let r = s
        .client
        .head(s.url(&format!("/v2/library/app/blobs/{secret_blob}")))
        .basic_auth(&id, Some(&key))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    // A repository the caller may pull lends its blob.
    let r = mount(&shared_blob, "library/base").await.unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
}

#[tokio::test]
async fn a_mount_takes_nothing_from_a_registry_hidden_on_this_listener() {
    let extra = "[[listen]]\naddr = \"127.0.0.1:0\"\nexposure = \"private\"\n\
[[registry]]\nname = \"internal\"\npublic_uri = false\n";
    let s = TestServer::start(extra).await;
    let private = listener(&s, 1);
    let d = s
        .push_blob_via(&private, "internal/app", b"internal layer")
        .await;
    // Through the public listener the hidden registry lends nothing.
    let r = s
        .client
        .post(s.url(&format!(
            "/v2/library/app/blobs/uploads/?mount={d}&from=internal/app"
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    // Through the private listener it does.
    let r = s
        .client
        .post(format!(
            "{private}/v2/library/app/blobs/uploads/?mount={d}&from=internal/app"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
}

/// A token granted for `library/app` (an origin repository the user may pull) does not open
/// `library/app?ns=SOURCE`, which resolves to the cache registry `hub` the user may not use.
#[tokio::test]
async fn a_token_is_checked_against_what_ns_resolves_to() {
    let upstream = TestServer::start("").await;
    upstream.push_image("library/app", "v1", "up").await;
    let edge = TestServer::start(&cache_toml("registry", &upstream.base, "", "")).await;
    edge.push_image("library/app", "v1", "edge").await;
    let (id, key) = edge.user("libreader", Role::Viewer, &["library"]);
    let r = edge
        .client
        .get(edge.url(
            "/service/token?service=berth&scope=repository:library/app:pull&scope=repository:hub/library/app:pull",
        ))
        .basic_auth(&id, Some(&key))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let token = r.json::<serde_json::Value>().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();
    let bearer = |path: String| edge.client.get(edge.url(&path)).bearer_auth(&token).send();
    // The origin repository the token names: allowed.
    let r = bearer("/v2/library/app/manifests/v1".into()).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // The same name routed by ns to the cache registry: refused, asking for the resolved scope.
    let ns = upstream.addr();
    let r = bearer(format!("/v2/library/app/manifests/v1?ns={ns}"))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let challenge = r
        .headers()
        .get("www-authenticate")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        challenge.contains("repository:hub/library/app:pull"),
        "{challenge}"
    );
    assert!(challenge.contains("insufficient_scope"), "{challenge}");
    // The same refusal for a blob.
    let r = bearer(format!("/v2/library/app/tags/list?ns={ns}"))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
}

/// The token endpoint resolves names as `/v2/` does and grants under the resolved name.
#[tokio::test]
async fn the_token_endpoint_grants_the_name_a_scope_resolves_to() {
    let upstream = TestServer::start("").await;
    let edge = TestServer::start_bare(&cache_toml(
        "registry",
        &upstream.base,
        "",
        "[[registry]]\nname = \"closed\"\n[mirror]\nregistry = \"hub\"\n",
    ))
    .await;
    let (id, key) = edge.user("hubreader", Role::Viewer, &["hub"]);
    let r = edge
        .client
        .get(edge.url(
            "/service/token?service=berth&scope=repository:team/app:pull&scope=repository:closed/app:pull&scope=repository:ghost/x:pull",
        ))
        .basic_auth(&id, Some(&key))
        .send()
        .await
        .unwrap();
    let token = r.json::<serde_json::Value>().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();
    let claims = claims_of(&token);
    let names: Vec<&str> = claims["access"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    // team/app resolves by the mirror to hub/team/app; closed/app is the origin registry
    // `closed`, which the user may not read; ghost/x does not exist (the mirror takes it).
    assert_eq!(names, ["hub/team/app", "hub/ghost/x"]);
}

/// Anonymous and unauthorized callers get the same answer for a registry that does not exist,
/// one that exists but is closed to them, and one hidden from their listener (even with
/// anonymous pull).
#[tokio::test]
async fn no_existence_oracle_for_hidden_closed_or_missing_registries() {
    let extra = "[[listen]]\naddr = \"127.0.0.1:0\"\nexposure = \"private\"\n\
[[registry]]\nname = \"closed\"\n\
[[registry]]\nname = \"hidden\"\npublic_uri = false\n\
[[registry]]\nname = \"hiddenopen\"\npublic_uri = false\nanonymous_pull = true\n";
    let s = TestServer::start(extra).await;
    let private = listener(&s, 1);
    for reg in ["closed", "hidden", "hiddenopen"] {
        s.push_blob_via(
            &private,
            &format!("{reg}/app"),
            format!("{reg} layer").as_bytes(),
        )
        .await;
    }
    let (id, key) = s.user("libviewer", Role::Viewer, &["library"]);
    let requests = [
        (Method::GET, "manifests/v1"),
        (Method::HEAD, "manifests/v1"),
        (Method::GET, "tags/list"),
        (Method::POST, "blobs/uploads/"),
        (Method::DELETE, "manifests/v1"),
    ];
    for (who, cred) in [
        ("anonymous", None),
        ("viewer of library", Some((&id, &key))),
    ] {
        for (method, tail) in &requests {
            let mut answers = Vec::new();
            for reg in ["nothere", "closed", "hidden", "hiddenopen"] {
                let mut r = s
                    .client
                    .request(method.clone(), s.url(&format!("/v2/{reg}/app/{tail}")));
                if let Some((id, key)) = cred {
                    r = r.basic_auth(id, Some(key));
                }
                let r = r.send().await.unwrap();
                let status = r.status();
                let (code, message) = if *method == Method::HEAD {
                    (String::new(), String::new())
                } else {
                    error_of(r).await
                };
                answers.push((status, code, message.replace(reg, "REG")));
            }
            assert!(
                answers.iter().all(|a| a == &answers[0]),
                "{who} {method} {tail}: {answers:#?}"
            );
            assert!(
                matches!(
                    answers[0].0,
                    StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN
                ),
                "{who} {method} {tail}: {answers:?}"
            );
        }
    }
}

/// Pushes of a tagged manifest raced against deletes of it by digest never leave a tag that
/// points at a manifest that is gone. Each round starts with the artifact present, races a
/// tagged PUT against a DELETE by digest, then checks that every listed tag pulls; four
/// repositories race at once, 600 rounds each.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_push_and_delete_never_leave_a_dangling_tag() {
    let s = std::sync::Arc::new(TestServer::start("").await);
    let mut tasks = Vec::new();
    for worker in 0..4 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let repo = format!("library/race{worker}");
            let (manifest, digest) = s.push_image(&repo, "seed", "race").await;
            let mut dangling = 0;
            for round in 0..600 {
                let r = s
                    .put_manifest(&repo, &digest, OCI_MANIFEST, &manifest)
                    .await;
                assert_eq!(r.status(), StatusCode::CREATED);
                let tag = format!("t{}", round % 4);
                let put = s.put_manifest(&repo, &tag, OCI_MANIFEST, &manifest);
                let delete = async {
                    s.req(Method::DELETE, &format!("/v2/{repo}/manifests/{digest}"))
                        .await
                        .send()
                        .await
                        .unwrap()
                };
                let (put, delete) = tokio::join!(put, delete);
                assert_eq!(put.status(), StatusCode::CREATED);
                assert!(
                    matches!(
                        delete.status(),
                        StatusCode::ACCEPTED | StatusCode::NOT_FOUND
                    ),
                    "{}",
                    delete.status()
                );
                let list = s.get(&format!("/v2/{repo}/tags/list")).await;
                let tags: Vec<String> = if list.status() == StatusCode::OK {
                    let v: serde_json::Value = list.json().await.unwrap();
                    serde_json::from_value(v["tags"].clone()).unwrap_or_default()
                } else {
                    Vec::new()
                };
                for t in tags {
                    let r = s.get(&format!("/v2/{repo}/manifests/{t}")).await;
                    if r.status() != StatusCode::OK {
                        dangling += 1;
                    }
                }
            }
            dangling
        }));
    }
    let mut dangling = 0;
    for t in tasks {
        dangling += t.await.unwrap();
    }
    assert_eq!(dangling, 0, "listed tags that did not pull");
}

/// Failures from one address do not hold up the key's correct secret from another; the failing
/// address itself is slowed.
#[tokio::test]
async fn failed_logins_slow_the_failing_address_not_the_owner() {
    let s = TestServer::start("[auth]\nfailed_login_limit = 1\n").await;
    let (id, key) = s.user("owner", Role::Viewer, &[]);
    let from = |ip: [u8; 4]| {
        reqwest::Client::builder()
            .local_address(std::net::IpAddr::from(ip))
            .build()
            .unwrap()
    };
    let attacker = from([127, 0, 0, 2]);
    let owner = from([127, 0, 0, 1]);
    let path = "/v2/library/app/tags/list";
    let guesses: Vec<_> = (0..4)
        .map(|i| {
            attacker
                .get(s.url(path))
                .basic_auth(&id, Some(format!("guess-{i}")))
                .send()
        })
        .collect();
    for r in futures_util::future::join_all(guesses).await {
        assert_eq!(r.unwrap().status(), StatusCode::UNAUTHORIZED);
    }
    // The owner's first login (nothing memoized yet) from its own address: not held up by the
    // key's failures (the old throttle waited 2 s here).
    let started = Instant::now();
    let r = owner
        .get(s.url(path))
        .basic_auth(&id, Some(&key))
        .send()
        .await
        .unwrap();
    assert_ne!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "the owner waited {:?}",
        started.elapsed()
    );
    // The failing address waits before any check, even with a correct secret of another key.
    let (other, other_key) = s.user("other", Role::Viewer, &[]);
    let started = Instant::now();
    let r = attacker
        .get(s.url(path))
        .basic_auth(&other, Some(&other_key))
        .send()
        .await
        .unwrap();
    assert_ne!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(
        started.elapsed() >= Duration::from_millis(240),
        "the failing address was not slowed: {:?}",
        started.elapsed()
    );
}
