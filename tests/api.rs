//! The management API end to end over HTTP: every endpoint's happy path and refusals, pagination,
//! filters, artifact fields, tag changes seen through `/v2/`, listener visibility, OpenAPI coverage.

mod common;

use berth::auth::Role;
use berth::store::meta::Refers;
use common::server::{header, image_manifest, sha256, TestServer, OCI_INDEX, OCI_MANIFEST};
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION};
use reqwest::{Client, Method, StatusCode};
use serde_json::{json, Value};

/// Basic credentials of a new key of a new user.
fn user(s: &TestServer, name: &str, role: Role, registries: &[&str]) -> String {
    let (id, secret) = s.user(name, role, registries);
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"))
    )
}

/// A server whose `client` sends the credentials of a full admin (`root`) on every request,
/// so `push_image` and friends keep working once auth is on.
async fn admin_server(extra: &str) -> TestServer {
    let mut s = TestServer::start(extra).await;
    let auth = user(&s, "root", Role::Admin, &[]);
    let mut h = HeaderMap::new();
    h.insert(AUTHORIZATION, HeaderValue::from_str(&auth).unwrap());
    s.client = Client::builder().default_headers(h).build().unwrap();
    s
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
}

impl Answer {
    fn code(&self) -> &str {
        self.body["errors"][0]["code"].as_str().unwrap_or("")
    }
    fn message(&self) -> &str {
        self.body["errors"][0]["message"].as_str().unwrap_or("")
    }
    fn link(&self) -> Option<String> {
        self.headers
            .get("link")
            .map(|v| v.to_str().unwrap().to_string())
    }
    fn names(&self) -> Vec<String> {
        self.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["name"].as_str().unwrap().to_string())
            .collect()
    }
}

async fn send(client: &Client, url: String, method: Method, body: Option<Value>) -> Answer {
    let mut r = client.request(method, url);
    if let Some(b) = body {
        r = r.json(&b);
    }
    let r = r.send().await.unwrap();
    let status = r.status();
    let headers = r.headers().clone();
    let text = r.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Answer {
        status,
        headers,
        body,
    }
}

/// An API call with the server's (admin) client.
async fn api(s: &TestServer, method: Method, path: &str, body: Option<Value>) -> Answer {
    send(&s.client, s.url(path), method, body).await
}

/// Polls a cleanup execution (API path) until it is no longer running; returns it.
async fn wait_execution(s: &TestServer, path: &str) -> Value {
    for _ in 0..600 {
        let e = api(s, Method::GET, &format!("/api/v1{path}"), None).await;
        assert_eq!(e.status, StatusCode::OK, "{path}: {:?}", e.body);
        if e.body["status"] != "running" {
            return e.body;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("{path} still running after 30 s");
}

/// An API call with other credentials (`None`: anonymous).
async fn api_as(
    s: &TestServer,
    auth: Option<&str>,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> Answer {
    let mut h = HeaderMap::new();
    if let Some(a) = auth {
        h.insert(AUTHORIZATION, HeaderValue::from_str(a).unwrap());
    }
    let client = Client::builder().default_headers(h).build().unwrap();
    send(&client, s.url(path), method, body).await
}

/// Pushes an image whose config blob names its platform; returns (manifest digest, total size).
async fn push_platform_image(s: &TestServer, repo: &str, tag: &str, arch: &str) -> (String, u64) {
    let config = serde_json::to_vec(&json!({
        "architecture": arch, "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}
    }))
    .unwrap();
    let layer = format!("layer of {repo}:{tag} {arch}").into_bytes();
    let c = s.push_blob(repo, &config).await;
    let l = s.push_blob(repo, &layer).await;
    let manifest = image_manifest(&c, config.len() as u64, &l, layer.len() as u64);
    let r = s.put_manifest(repo, tag, OCI_MANIFEST, &manifest).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    (
        sha256(&manifest),
        (manifest.len() + config.len() + layer.len()) as u64,
    )
}

#[tokio::test]
async fn registries_crud_errors_and_auth() {
    let s = admin_server("").await;
    let r = api(&s, Method::GET, "/api/v1/registries", None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.names(), ["library"]);
    assert_eq!(r.body["total"], 1);

    let r = api(
        &s,
        Method::POST,
        "/api/v1/registries",
        Some(json!({"name": "team", "anonymous_pull": false})),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    assert_eq!(r.body["type"], "normal");
    assert_eq!(r.body["public_uri"], true);
    let again = api(
        &s,
        Method::POST,
        "/api/v1/registries",
        Some(json!({"name": "team"})),
    )
    .await;
    assert_eq!(
        (again.status, again.code()),
        (StatusCode::CONFLICT, "CONFLICT")
    );
    let r = api(
        &s,
        Method::POST,
        "/api/v1/registries",
        Some(json!({"name": "hub", "type": "cache"})),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.message().contains("cache"), "{}", r.message());
    let r = api(
        &s,
        Method::POST,
        "/api/v1/registries",
        Some(json!({"name": "x", "colour": "red"})),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(
        r.message().contains("unknown field `colour`"),
        "{}",
        r.message()
    );
    let bad = s
        .client
        .post(s.url("/api/v1/registries"))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    let r = api(
        &s,
        Method::POST,
        "/api/v1/registries",
        Some(json!({"name": "Bad Name"})),
    )
    .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::BAD_REQUEST, "NAME_INVALID")
    );

    assert_eq!(
        api(&s, Method::GET, "/api/v1/registries/nope", None)
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        api(&s, Method::PUT, "/api/v1/registries/team", None)
            .await
            .status,
        StatusCode::METHOD_NOT_ALLOWED
    );
    assert_eq!(
        api(&s, Method::GET, "/api/v1/nothing/here", None)
            .await
            .status,
        StatusCode::NOT_FOUND
    );

    // anonymous_pull applies at once: a pull without credentials works after the PATCH.
    let (d, _) = push_platform_image(&s, "team/app", "v1", "amd64").await;
    let anon = Client::new();
    let pull = || {
        anon.get(s.url(&format!("/v2/team/app/manifests/{d}")))
            .send()
    };
    assert_eq!(pull().await.unwrap().status(), StatusCode::UNAUTHORIZED);
    let r = api(
        &s,
        Method::PATCH,
        "/api/v1/registries/team",
        Some(json!({"anonymous_pull": true})),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["anonymous_pull"], true);
    assert_eq!(r.body["image_count"], 1);
    assert_eq!(pull().await.unwrap().status(), StatusCode::OK);

    // The one check: anonymous → 401 with a challenge, a viewer → 403 on changes, a registry
    // admin may change their registry but not create registries.
    let r = api_as(&s, None, Method::GET, "/api/v1/registries", None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(r.headers.contains_key("www-authenticate"));
    let viewer = user(&s, "viewer", Role::Viewer, &[]);
    let r = api_as(
        &s,
        Some(&viewer),
        Method::GET,
        "/api/v1/registries/team",
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = api_as(
        &s,
        Some(&viewer),
        Method::POST,
        "/api/v1/registries",
        Some(json!({"name": "v"})),
    )
    .await;
    assert_eq!((r.status, r.code()), (StatusCode::FORBIDDEN, "DENIED"));
    let team_admin = user(&s, "teamadmin", Role::Admin, &["team"]);
    let r = api_as(
        &s,
        Some(&team_admin),
        Method::PATCH,
        "/api/v1/registries/team",
        Some(json!({"anonymous_pull": false})),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = api_as(
        &s,
        Some(&team_admin),
        Method::PATCH,
        "/api/v1/registries/team",
        Some(json!({"type": "normal"})),
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    // Lists show only what the caller may read.
    let r = api_as(
        &s,
        Some(&team_admin),
        Method::GET,
        "/api/v1/registries",
        None,
    )
    .await;
    assert_eq!(r.names(), ["team"]);
}

#[tokio::test]
async fn lists_paginate_with_link_and_filter() {
    let s = admin_server("").await;
    for i in 0..5 {
        let r = api(
            &s,
            Method::POST,
            "/api/v1/registries",
            Some(json!({"name": format!("reg{i}")})),
        )
        .await;
        assert_eq!(r.status, StatusCode::CREATED);
    }
    // 6 registries (library + reg0..reg4), 2 per page: follow Link to the end.
    let mut path = "/api/v1/registries?page_size=2".to_string();
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let r = api(&s, Method::GET, &path, None).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.body["total"], 6);
        assert_eq!(r.body["page_size"], 2);
        seen.extend(r.names());
        pages += 1;
        match r.link() {
            Some(link) => {
                assert!(link.ends_with("; rel=\"next\""), "{link}");
                path = link
                    .trim_start_matches('<')
                    .split('>')
                    .next()
                    .unwrap()
                    .to_string();
            }
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, ["library", "reg0", "reg1", "reg2", "reg3", "reg4"]);
    // Filters survive in the Link.
    let r = api(
        &s,
        Method::GET,
        "/api/v1/registries?q=REG&page_size=1",
        None,
    )
    .await;
    assert_eq!(r.body["total"], 5);
    assert_eq!(r.names(), ["reg0"]);
    let link = r.link().unwrap();
    assert!(link.contains("q=REG") && link.contains("page=2"), "{link}");
    // Past the end: empty page, no Link; bad numbers: 400; huge sizes are clamped.
    let r = api(&s, Method::GET, "/api/v1/registries?page=9", None).await;
    assert_eq!(r.body["items"], json!([]));
    assert!(r.link().is_none());
    for bad in ["page=0", "page=x", "page_size=-1"] {
        let r = api(&s, Method::GET, &format!("/api/v1/registries?{bad}"), None).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}");
    }
    let r = api(&s, Method::GET, "/api/v1/registries?page_size=100000", None).await;
    assert_eq!(r.body["page_size"], 500);
}

#[tokio::test]
async fn registry_create_push_delete() {
    let s = admin_server("").await;
    let r = api(
        &s,
        Method::POST,
        "/api/v1/registries",
        Some(json!({"name": "team"})),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let (d, _) = push_platform_image(&s, "team/app", "v1", "amd64").await;
    assert_eq!(
        s.get("/v2/team/app/manifests/v1").await.status(),
        StatusCode::OK
    );
    let r = api(&s, Method::DELETE, "/api/v1/registries/team", None).await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert!(r.message().contains("force=true"), "{}", r.message());
    let r = api(
        &s,
        Method::DELETE,
        "/api/v1/registries/team?force=true",
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["deleted_images"], 1);
    assert_eq!(
        api(&s, Method::GET, "/api/v1/registries/team", None)
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    let r = s.get("/v2/team/app/manifests/v1").await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    // Created again under the same name, it is empty: nothing served from the old one.
    api(
        &s,
        Method::POST,
        "/api/v1/registries",
        Some(json!({"name": "team"})),
    )
    .await;
    for reference in ["v1", d.as_str()] {
        let r = s.get(&format!("/v2/team/app/manifests/{reference}")).await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{reference}");
    }
    // A registry from the config file would come back at restart: refused.
    let r = api(&s, Method::DELETE, "/api/v1/registries/library", None).await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert!(r.message().contains("config"), "{}", r.message());
}

#[tokio::test]
async fn images_and_artifacts_with_their_fields() {
    let s = admin_server("").await;
    let (d1, size1) = push_platform_image(&s, "library/team/app", "v1", "arm64").await;
    let (d2, _) = push_platform_image(&s, "library/team/app", "v2", "amd64").await;
    s.push_image("library/other", "latest", "o").await;

    let r = api(&s, Method::GET, "/api/v1/registries/library/images", None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.names(), ["other", "team/app"]);
    let app = &r.body["items"][1];
    assert_eq!(app["artifact_count"], 2);
    assert_eq!(app["tag_count"], 2);
    assert!(app["last_push"].is_string());
    let r = api(
        &s,
        Method::GET,
        "/api/v1/registries/library/images?q=team",
        None,
    )
    .await;
    assert_eq!(r.names(), ["team/app"]);
    assert_eq!(
        api(&s, Method::GET, "/api/v1/registries/nope/images", None)
            .await
            .status,
        StatusCode::NOT_FOUND
    );

    let base = "/api/v1/registries/library/images/team%2Fapp";
    let r = api(&s, Method::GET, &format!("{base}/artifacts/{d1}"), None).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["digest"], d1.as_str());
    assert_eq!(r.body["tags"], json!(["v1"]));
    assert_eq!(r.body["size"], size1);
    assert_eq!(r.body["platforms"], json!(["linux/arm64"]));
    assert_eq!(r.body["media_type"], OCI_MANIFEST);
    assert_eq!(r.body["signed"], false);
    assert!(r.body["pushed"].is_string());
    assert_eq!(r.body["last_pull"], Value::Null);

    // A pull sets last_pull (pulls are batched; the API writes them before answering).
    assert_eq!(
        s.get("/v2/library/team/app/manifests/v1").await.status(),
        StatusCode::OK
    );
    let r = api(&s, Method::GET, &format!("{base}/artifacts/{d1}"), None).await;
    assert!(r.body["last_pull"].is_string(), "{:?}", r.body);

    // A cosign-style signature tag flips `signed`.
    let sig_tag = format!("{}.sig", d1.replacen(':', "-", 1));
    let sig = s.push_blob("library/team/app", b"{}").await;
    let payload = s.push_blob("library/team/app", b"signature payload").await;
    let sig_manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sig, "size": 2},
        "layers": [{"mediaType": "application/vnd.dev.cosign.simplesigning.v1+json", "digest": payload, "size": 17}],
    }))
    .unwrap();
    let put = s
        .put_manifest("library/team/app", &sig_tag, OCI_MANIFEST, &sig_manifest)
        .await;
    assert_eq!(put.status(), StatusCode::CREATED);
    let r = api(&s, Method::GET, &format!("{base}/artifacts/{d1}"), None).await;
    assert_eq!(r.body["signed"], true);
    let r = api(&s, Method::GET, &format!("{base}/artifacts/{d2}"), None).await;
    assert_eq!(r.body["signed"], false);

    // An index lists its children's platforms and counts their content.
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": d1, "size": 1, "platform": {"os": "linux", "architecture": "arm64"}},
            {"mediaType": OCI_MANIFEST, "digest": d2, "size": 1, "platform": {"os": "linux", "architecture": "amd64", "variant": "v3"}},
        ],
    }))
    .unwrap();
    let put = s
        .put_manifest("library/team/app", "multi", OCI_INDEX, &index)
        .await;
    assert_eq!(put.status(), StatusCode::CREATED);
    let di = sha256(&index);
    let r = api(&s, Method::GET, &format!("{base}/artifacts/{di}"), None).await;
    assert_eq!(
        r.body["platforms"],
        json!(["linux/arm64", "linux/amd64/v3"])
    );
    assert!(r.body["size"].as_u64().unwrap() > size1);

    // Listing: newest first, filters by media type and tagged state, paginated.
    let r = api(&s, Method::GET, &format!("{base}/artifacts"), None).await;
    assert_eq!(r.body["total"], 4);
    let pushed: Vec<&str> = r.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["pushed"].as_str().unwrap())
        .collect();
    assert!(pushed.windows(2).all(|w| w[0] >= w[1]), "{pushed:?}");
    // `+` in a query means a space: clients encode media types.
    let r = api(
        &s,
        Method::GET,
        &format!("{base}/artifacts?media_type=application%2Fvnd.oci.image.index.v1%2Bjson"),
        None,
    )
    .await;
    assert_eq!(r.body["total"], 1);
    assert_eq!(r.body["items"][0]["digest"], di.as_str());
    let r = api(
        &s,
        Method::GET,
        &format!("{base}/artifacts?page_size=3"),
        None,
    )
    .await;
    assert_eq!(r.body["items"].as_array().unwrap().len(), 3);
    assert!(r.link().unwrap().contains("page=2"));
    // Untag v2 through /v2/: its artifact becomes the one untagged artifact.
    let del = s
        .client
        .delete(s.url("/v2/library/team/app/manifests/v2"))
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), StatusCode::ACCEPTED);
    let r = api(
        &s,
        Method::GET,
        &format!("{base}/artifacts?tagged=false"),
        None,
    )
    .await;
    assert_eq!(r.body["total"], 1);
    assert_eq!(r.body["items"][0]["digest"], d2.as_str());
    let r = api(
        &s,
        Method::GET,
        &format!("{base}/artifacts?tagged=maybe"),
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);

    // Errors: malformed digest 400, unknown digest 404, unknown image 404.
    let r = api(
        &s,
        Method::GET,
        &format!("{base}/artifacts/sha256:nothex"),
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let unknown = sha256(b"nothing");
    let r = api(
        &s,
        Method::GET,
        &format!("{base}/artifacts/{unknown}"),
        None,
    )
    .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN")
    );
    let r = api(
        &s,
        Method::GET,
        "/api/v1/registries/library/images/missing/artifacts",
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);

    // Delete an artifact: it and its tags are gone from /v2/ too.
    let r = api(&s, Method::DELETE, &format!("{base}/artifacts/{d1}"), None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["deleted_tags"], json!(["v1"]));
    assert_eq!(
        s.get("/v2/library/team/app/manifests/v1").await.status(),
        StatusCode::NOT_FOUND
    );
    let r = api(&s, Method::DELETE, &format!("{base}/artifacts/{d1}"), None).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn tags_glob_create_move_delete() {
    let s = admin_server("").await;
    let (d1, _) = push_platform_image(&s, "library/app", "1.0", "amd64").await;
    let (d2, _) = push_platform_image(&s, "library/app", "1.01", "arm64").await;
    let tags = "/api/v1/registries/library/images/app/tags";
    for t in ["2.0", "beta", "alpha"] {
        let r = api(
            &s,
            Method::POST,
            tags,
            Some(json!({"tag": t, "digest": d1})),
        )
        .await;
        assert_eq!(r.status, StatusCode::CREATED, "{t}: {:?}", r.body);
        assert_eq!(r.body["previous"], Value::Null);
    }
    let sref = &s;
    let list = |pattern: &str| {
        let path = format!(
            "{tags}?pattern={}",
            percent_encoding::utf8_percent_encode(pattern, percent_encoding::NON_ALPHANUMERIC)
        );
        async move { api(sref, Method::GET, &path, None).await.names() }
    };
    assert_eq!(list("1.?").await, ["1.0"]);
    assert_eq!(list("1.*").await, ["1.0", "1.01"]);
    assert_eq!(list("{alpha,beta}").await, ["alpha", "beta"]);
    assert_eq!(list("[ab]*").await, ["alpha", "beta"]);
    assert_eq!(list("").await.len(), 5);
    let r = api(&s, Method::GET, &format!("{tags}?pattern=%5B"), None).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = api(&s, Method::GET, &format!("{tags}?pattern=1.0"), None).await;
    assert_eq!(r.body["items"][0]["digest"], d1.as_str());

    // Visible through /v2/: the new tag lists and serves its artifact.
    let r: Value = s
        .get("/v2/library/app/tags/list")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(r["tags"], json!(["1.0", "1.01", "2.0", "alpha", "beta"]));
    let digest_of = |reference: &str| {
        let url = format!("/v2/library/app/manifests/{reference}");
        async move {
            let r = sref.get(&url).await;
            (
                r.status(),
                common::server::header(&r, "docker-content-digest"),
            )
        }
    };
    assert_eq!(digest_of("beta").await, (StatusCode::OK, d1.clone()));
    // Moving a tag replaces what a (hot-cached) pull by tag gets.
    let r = api(
        &s,
        Method::POST,
        tags,
        Some(json!({"tag": "beta", "digest": d2})),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["previous"], d1.as_str());
    assert_eq!(digest_of("beta").await, (StatusCode::OK, d2.clone()));
    // Delete: the tag goes, the artifact stays.
    let r = api(&s, Method::DELETE, &format!("{tags}/beta"), None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(digest_of("beta").await.0, StatusCode::NOT_FOUND);
    assert_eq!(digest_of(&d2).await.0, StatusCode::OK);
    let r = api(&s, Method::DELETE, &format!("{tags}/beta"), None).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN")
    );

    // Refusals: unknown digest, bad tag, missing field.
    let unknown = sha256(b"none");
    let r = api(
        &s,
        Method::POST,
        tags,
        Some(json!({"tag": "x", "digest": unknown})),
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = api(
        &s,
        Method::POST,
        tags,
        Some(json!({"tag": "-bad", "digest": d1})),
    )
    .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::BAD_REQUEST, "TAG_INVALID")
    );
    let r = api(&s, Method::POST, tags, Some(json!({"tag": "x"}))).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.message().contains("digest"), "{}", r.message());

    // Cache registries take no tags.
    let r = api(
        &s,
        Method::POST,
        "/api/v1/image-caches",
        Some(json!({"name": "up", "kind": "registry", "url": "http://127.0.0.1:9"})),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let r = api(
        &s,
        Method::POST,
        "/api/v1/registries",
        Some(json!({"name": "hub", "type": "cache", "cache": "up"})),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED);
    // Its image cache applied at once: no note about a restart.
    assert!(r.body.get("note").is_none(), "{:?}", r.body);
    let r = api(
        &s,
        Method::POST,
        "/api/v1/registries/hub/images/library%2Fnginx/tags",
        Some(json!({"tag": "x", "digest": d1})),
    )
    .await;
    assert_eq!((r.status, r.code()), (StatusCode::FORBIDDEN, "DENIED"));
}

#[tokio::test]
async fn image_delete_removes_every_artifact_and_tag() {
    let s = admin_server("").await;
    push_platform_image(&s, "library/team/app", "v1", "amd64").await;
    push_platform_image(&s, "library/team/app", "v2", "arm64").await;
    push_platform_image(&s, "library/team/keep", "v1", "arm64").await;
    let r = api(
        &s,
        Method::DELETE,
        "/api/v1/registries/library/images/team%2Fapp",
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["deleted_artifacts"], 2);
    assert_eq!(r.body["deleted_tags"], 2);
    for reference in ["v1", "v2"] {
        let r = s
            .get(&format!("/v2/library/team/app/manifests/{reference}"))
            .await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
    }
    let r = api(&s, Method::GET, "/api/v1/registries/library/images", None).await;
    assert_eq!(r.names(), ["team/keep"]);
    let r = api(
        &s,
        Method::DELETE,
        "/api/v1/registries/library/images/team%2Fapp",
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    // A viewer may not delete.
    let viewer = user(&s, "viewer", Role::Viewer, &[]);
    let r = api_as(
        &s,
        Some(&viewer),
        Method::DELETE,
        "/api/v1/registries/library/images/team%2Fkeep",
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn image_caches_and_prune() {
    let s = admin_server("").await;
    let body = json!({"name": "up", "kind": "registry", "url": "http://127.0.0.1:9",
                      "username": "bot", "password": "s3cret-pass"});
    let r = api(&s, Method::POST, "/api/v1/image-caches", Some(body.clone())).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    // Built at once (no restart): its source is loaded before the answer.
    assert_eq!(r.body["loaded"], true);
    assert_eq!(r.body["applies"], "immediately");
    let r = api(&s, Method::POST, "/api/v1/image-caches", Some(body)).await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    let r = api(
        &s,
        Method::POST,
        "/api/v1/image-caches",
        Some(json!({"name": "bad", "kind": "registry", "url": "not a url"})),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = api(
        &s,
        Method::PATCH,
        "/api/v1/image-caches/up",
        Some(json!({"url": "http://127.0.0.1:8", "fetch_budget": "30s"})),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["fetch_budget"], "30s");
    let r = api(
        &s,
        Method::PATCH,
        "/api/v1/image-caches/up",
        Some(json!({"fetch_budget": "soon"})),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = api(&s, Method::GET, "/api/v1/image-caches/up", None).await;
    assert_eq!(r.body["url"], "http://127.0.0.1:8");
    let list = api(&s, Method::GET, "/api/v1/image-caches", None).await;
    assert_eq!(list.names(), ["up"]);
    for shown in [&r.body, &list.body] {
        assert!(!shown.to_string().contains("s3cret"), "{shown}");
    }
    assert_eq!(
        api(&s, Method::GET, "/api/v1/image-caches/nope", None)
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    // In use: refused, naming the registry.
    api(
        &s,
        Method::POST,
        "/api/v1/registries",
        Some(json!({"name": "hub", "type": "cache", "cache": "up"})),
    )
    .await;
    let r = api(&s, Method::DELETE, "/api/v1/image-caches/up", None).await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert!(r.message().contains("hub"), "{}", r.message());
    assert_eq!(
        api(&s, Method::DELETE, "/api/v1/registries/hub", None)
            .await
            .status,
        StatusCode::OK
    );
    let r = api(&s, Method::DELETE, "/api/v1/image-caches/up", None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(api(&s, Method::GET, "/api/v1/image-caches", None)
        .await
        .names()
        .is_empty());

    // Prune: a dry run reports, leaves normal registries alone; bad durations are a 400.
    push_platform_image(&s, "library/app", "v1", "amd64").await;
    let r = api(
        &s,
        Method::POST,
        "/api/v1/cache/prune",
        Some(json!({"dry_run": true, "unpulled_for": "0s"})),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["dry_run"], true);
    assert_eq!(r.body["artifacts"], json!([]));
    let r = api(&s, Method::POST, "/api/v1/cache/prune", None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["dry_run"], false);
    let r = api(
        &s,
        Method::POST,
        "/api/v1/cache/prune",
        Some(json!({"unpulled_for": "a week"})),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        s.get("/v2/library/app/manifests/v1").await.status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn prune_removes_unpulled_cache_artifacts() {
    // A cache registry's artifact (recorded as the cache would) goes; a pulled one stays.
    let s = admin_server(&common::server::cache_toml(
        "registry",
        "http://127.0.0.1:9",
        "",
        "",
    ))
    .await;
    push_platform_image(&s, "library/app", "v1", "amd64").await;
    let app = s.app();
    let record = berth::store::meta::ArtifactRecord {
        media_type: OCI_MANIFEST.into(),
        size: 10,
        pushed_ms: 1,
        artifact_type: None,
        subject: None,
    };
    let old = berth::oci::digest::Digest::sha256(b"old manifest");
    app.store
        .meta
        .put_artifact(
            "hub/library/old",
            &old,
            &record,
            Some("v1"),
            None,
            &Refers::default(),
        )
        .await
        .unwrap()
        .unwrap();
    let r = api(
        &s,
        Method::POST,
        "/api/v1/cache/prune",
        Some(json!({"dry_run": true, "unpulled_for": "1h"})),
    )
    .await;
    assert_eq!(r.body["artifacts"][0]["repository"], "hub/library/old");
    assert!(app
        .store
        .meta
        .artifact("hub/library/old", &old)
        .await
        .unwrap()
        .is_some());
    let r = api(
        &s,
        Method::POST,
        "/api/v1/cache/prune",
        Some(json!({"unpulled_for": "1h"})),
    )
    .await;
    assert_eq!(r.body["artifacts"][0]["tags"], json!(["v1"]));
    assert!(app
        .store
        .meta
        .artifact("hub/library/old", &old)
        .await
        .unwrap()
        .is_none());
    let viewer = user(&s, "viewer", Role::Viewer, &[]);
    let r = api_as(&s, Some(&viewer), Method::POST, "/api/v1/cache/prune", None).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn users_and_keys_lifecycle() {
    let s = admin_server("").await;
    let r = api(
        &s,
        Method::POST,
        "/api/v1/users",
        Some(json!({"name": "ci", "role": "image_uploader", "registries": ["library"]})),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    assert_eq!(r.body["role"], "image_uploader");
    let r = api(
        &s,
        Method::POST,
        "/api/v1/users",
        Some(json!({"name": "ci", "role": "viewer"})),
    )
    .await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    let r = api(
        &s,
        Method::POST,
        "/api/v1/users",
        Some(json!({"name": "x", "role": "wizard"})),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = api(&s, Method::GET, "/api/v1/users", None).await;
    assert_eq!(r.names(), ["ci", "root"]);
    assert_eq!(
        api(&s, Method::GET, "/api/v1/users?q=c", None)
            .await
            .names(),
        ["ci"]
    );

    // A key: secret shown once, works as Basic credentials on /v2/, listed without its secret.
    let r = api(&s, Method::POST, "/api/v1/users/ci/keys", None).await;
    assert_eq!(r.status, StatusCode::CREATED);
    let id = r.body["id"].as_str().unwrap().to_string();
    let secret = r.body["secret"].as_str().unwrap().to_string();
    let ci = Client::new();
    let ping = || ci.get(s.url("/v2/")).basic_auth(&id, Some(&secret)).send();
    assert_eq!(ping().await.unwrap().status(), StatusCode::OK);
    let r = api(&s, Method::GET, "/api/v1/users/ci/keys", None).await;
    assert_eq!(r.body["total"], 1);
    let k = &r.body["items"][0];
    assert_eq!(k["id"], id.as_str());
    assert_eq!(k["age_days"], 0);
    assert_eq!(k["rotation_due"], false);
    assert!(!r.body.to_string().contains(&secret));
    let r = api(&s, Method::GET, "/api/v1/users/ci", None).await;
    assert_eq!(r.body["key_count"], 1);
    assert_eq!(r.body["keys"][0]["id"], id.as_str());

    // Patch, then the one check uses the new role.
    let r = api(
        &s,
        Method::PATCH,
        "/api/v1/users/ci",
        Some(json!({"role": "viewer"})),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["registries"], json!(["library"]));
    let r = api(
        &s,
        Method::PATCH,
        "/api/v1/users/root",
        Some(json!({"role": "viewer"})),
    )
    .await;
    assert_eq!(r.status, StatusCode::CONFLICT);

    // Revoke: the key stops working.
    let r = api(
        &s,
        Method::DELETE,
        &format!("/api/v1/users/ci/keys/{id}"),
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(ping().await.unwrap().status(), StatusCode::UNAUTHORIZED);
    let r = api(
        &s,
        Method::DELETE,
        &format!("/api/v1/users/ci/keys/{id}"),
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    // Five keys at most.
    for _ in 0..5 {
        let r = api(&s, Method::POST, "/api/v1/users/ci/keys", None).await;
        assert_eq!(r.status, StatusCode::CREATED);
    }
    let r = api(&s, Method::POST, "/api/v1/users/ci/keys", None).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);

    // Users and keys are for admins of every registry only.
    let limited = user(&s, "limited", Role::Admin, &["library"]);
    let r = api_as(&s, Some(&limited), Method::GET, "/api/v1/users", None).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = api_as(&s, None, Method::POST, "/api/v1/users/ci/keys", None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);

    // Delete: the last full admin stays.
    assert_eq!(
        api(&s, Method::DELETE, "/api/v1/users/ci", None)
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        api(&s, Method::GET, "/api/v1/users/ci", None).await.status,
        StatusCode::NOT_FOUND
    );
    let r = api(&s, Method::DELETE, "/api/v1/users/root", None).await;
    assert_eq!(r.status, StatusCode::CONFLICT);
}

#[tokio::test]
async fn hidden_registry_exists_only_on_private_listeners() {
    let s = admin_server("[[listen]]\naddr = \"127.0.0.1:0\"\nexposure = \"private\"\n").await;
    let private = format!("http://{}", s.server.as_ref().unwrap().local_addrs()[1].0);
    let r = api(
        &s,
        Method::POST,
        "/api/v1/registries",
        Some(json!({"name": "internal", "public_uri": false})),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED);
    push_platform_image(&s, "library/app", "v1", "amd64").await;
    let on_private = |path: &str| {
        let url = format!("{private}{path}");
        let client = s.client.clone();
        async move { send(&client, url, Method::GET, None).await }
    };
    let public = api(&s, Method::GET, "/api/v1/registries", None).await;
    assert_eq!(public.names(), ["library"]);
    let r = on_private("/api/v1/registries").await;
    assert_eq!(r.names(), ["internal", "library"]);
    for path in [
        "/api/v1/registries/internal",
        "/api/v1/registries/internal/images",
    ] {
        assert_eq!(
            api(&s, Method::GET, path, None).await.status,
            StatusCode::NOT_FOUND,
            "{path}"
        );
        assert_eq!(on_private(path).await.status, StatusCode::OK, "{path}");
    }
    let r = api(&s, Method::DELETE, "/api/v1/registries/internal", None).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

/// Sample values for the path parameters of the OpenAPI document.
fn fill(template: &str) -> String {
    template
        .replace("{registry}", "library")
        .replace("{image}", "team%2Fapp")
        .replace("{digest}", &sha256(b"x"))
        .replace("{tag}", "v1")
        .replace("{name}", "nobody")
        .replace("{id}", "BKNONE")
}

#[tokio::test]
async fn every_documented_path_is_served_and_nothing_else() {
    let s = admin_server("").await;
    let r = api(&s, Method::GET, "/api/v1/openapi.json", None).await;
    assert_eq!(r.status, StatusCode::OK);
    let paths = r.body["paths"].as_object().unwrap().clone();
    assert!(paths.len() >= 20);
    for (template, item) in &paths {
        let documented: Vec<String> = item
            .as_object()
            .unwrap()
            .keys()
            .filter(|k| ["get", "post", "patch", "delete", "put"].contains(&k.as_str()))
            .cloned()
            .collect();
        assert!(!documented.is_empty(), "{template}");
        let path = fill(template);
        for method in ["get", "post", "patch", "delete", "put"] {
            let m = Method::from_bytes(method.to_ascii_uppercase().as_bytes()).unwrap();
            let r = api(&s, m, &path, Some(json!({}))).await;
            if documented.iter().any(|d| d == method) {
                assert!(
                    r.status != StatusCode::METHOD_NOT_ALLOWED
                        && !r.message().starts_with("no such endpoint"),
                    "{method} {path}: documented but not routed: {} {:?}",
                    r.status,
                    r.body
                );
            } else {
                assert_eq!(
                    r.status,
                    StatusCode::METHOD_NOT_ALLOWED,
                    "{method} {path}: served but not documented"
                );
            }
        }
    }
    // And a path not in the document is not served.
    let r = api(
        &s,
        Method::GET,
        "/api/v1/registries/library/everything",
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert!(r.message().starts_with("no such endpoint"));
}

/// Follows a `$ref` of the OpenAPI document.
fn resolved<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema["$ref"].as_str() {
        Some(r) => {
            let name = r.trim_start_matches("#/components/schemas/");
            let target = &doc["components"]["schemas"][name];
            assert!(target.is_object(), "dangling $ref {r}");
            resolved(doc, target)
        }
        None => schema,
    }
}

/// Properties, required fields, type, nullability and enum of a schema, `allOf` merged (later
/// parts refine earlier ones, as `Page` + typed `items` do).
#[derive(Default)]
struct Flat {
    properties: serde_json::Map<String, Value>,
    required: Vec<String>,
    kind: Option<String>,
    nullable: bool,
    one_of: Option<Vec<Value>>,
    items: Option<Value>,
}

fn flatten(doc: &Value, schema: &Value, into: &mut Flat) {
    let schema = resolved(doc, schema);
    for part in schema["allOf"].as_array().into_iter().flatten() {
        flatten(doc, part, into);
    }
    if let Some(p) = schema["properties"].as_object() {
        for (k, v) in p {
            into.properties.insert(k.clone(), v.clone());
        }
    }
    for r in schema["required"].as_array().into_iter().flatten() {
        into.required.push(r.as_str().unwrap().to_string());
    }
    if let Some(t) = schema["type"].as_str() {
        into.kind = Some(t.to_string());
    }
    into.nullable |= schema["nullable"] == true;
    if let Some(e) = schema["enum"].as_array() {
        into.one_of = Some(e.clone());
    }
    if !schema["items"].is_null() {
        into.items = Some(schema["items"].clone());
    }
}

/// Everything in `value` that its schema does not document (or contradicts), with its path.
fn undocumented(doc: &Value, schema: &Value, value: &Value, at: &str, problems: &mut Vec<String>) {
    let mut s = Flat::default();
    flatten(doc, schema, &mut s);
    if value.is_null() {
        if !s.nullable && s.kind.is_some() {
            problems.push(format!("{at}: null, but not nullable"));
        }
        return;
    }
    let fits = match s.kind.as_deref() {
        None => true,
        Some("string") => value.is_string(),
        Some("integer") => value.is_i64() || value.is_u64(),
        Some("number") => value.is_number(),
        Some("boolean") => value.is_boolean(),
        Some("array") => value.is_array(),
        Some("object") => value.is_object(),
        Some(other) => panic!("{at}: unknown schema type {other}"),
    };
    if !fits {
        problems.push(format!("{at}: {value} is not a {:?}", s.kind));
        return;
    }
    if let Some(allowed) = &s.one_of {
        if !allowed.contains(value) {
            problems.push(format!("{at}: {value} is not one of {allowed:?}"));
        }
    }
    if let (Some(items), Some(values)) = (&s.items, value.as_array()) {
        for (i, v) in values.iter().enumerate() {
            undocumented(doc, items, v, &format!("{at}[{i}]"), problems);
        }
    }
    if let Some(object) = value.as_object() {
        for r in &s.required {
            if !object.contains_key(r) {
                problems.push(format!("{at}: required field {r} missing"));
            }
        }
        // A schema without properties (`Deleted`, the document itself) leaves fields open.
        if !s.properties.is_empty() {
            for (k, v) in object {
                match s.properties.get(k) {
                    Some(p) => undocumented(doc, p, v, &format!("{at}.{k}"), problems),
                    None => problems.push(format!("{at}: field {k} is not documented")),
                }
            }
        }
    }
}

#[tokio::test]
async fn every_answer_is_what_openapi_documents() {
    use common::doubles::{empty_body, LoopbackServer};
    // A webhook receiver on loopback (allowed here; tests/egress.rs checks the refusal).
    let receiver = LoopbackServer::start(|_req| async move {
        http::Response::builder()
            .status(200)
            .body(empty_body())
            .unwrap()
    });
    let s = admin_server(
        "[egress]\nallowed_networks = [\"127.0.0.0/8\"]\n[webhooks]\nallowed_ports = []\n",
    )
    .await;
    let doc: Value = serde_json::from_str(berth::api::OPENAPI).unwrap();
    let mut problems = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    // Calls `method path` (path below /api/v1; `template` names its route) and checks the answer
    // against the response the document gives for its status.
    macro_rules! call {
        ($method:expr, $template:expr, $path:expr, $body:expr) => {{
            let path: String = $path;
            let a = api(&s, $method, &format!("/api/v1{path}"), $body).await;
            assert!(
                a.status.is_success(),
                "{} {path}: {} {:?}",
                $method,
                a.status,
                a.body
            );
            let method = $method.as_str().to_ascii_lowercase();
            let response = &doc["paths"][format!("/api/v1{}", $template)][&method]["responses"]
                [a.status.as_str()];
            let at = format!("{} {} {}", $method, $template, a.status.as_str());
            if response.is_null() {
                problems.push(format!("{at}: status not documented"));
            } else {
                match response["content"]["application/json"].get("schema") {
                    Some(schema) => undocumented(&doc, schema, &a.body, &at, &mut problems),
                    None if a.body == Value::String(String::new()) => {}
                    None if response["content"]
                        .get("application/octet-stream")
                        .is_some() => {}
                    None => problems.push(format!("{at}: a body, but none is documented")),
                }
            }
            seen.insert(format!("{method} /api/v1{}", $template));
            a
        }};
    }

    let reg = "/registries/{registry}";
    call!(
        Method::POST,
        "/registries",
        "/registries".into(),
        Some(json!({"name": "shop"}))
    );
    call!(Method::GET, "/registries", "/registries".into(), None);
    call!(Method::GET, reg, "/registries/shop".into(), None);
    call!(
        Method::PATCH,
        reg,
        "/registries/shop".into(),
        Some(json!({"anonymous_pull": true}))
    );
    let (digest, _) = push_platform_image(&s, "shop/team/app", "v1", "arm64").await;
    push_platform_image(&s, "shop/other", "v1", "amd64").await;
    let image = format!("{reg}/images/{{image}}");
    let app = "/registries/shop/images/team%2Fapp";
    call!(
        Method::GET,
        format!("{reg}/images"),
        "/registries/shop/images".into(),
        None
    );
    call!(
        Method::GET,
        format!("{image}/artifacts"),
        format!("{app}/artifacts"),
        None
    );
    call!(
        Method::GET,
        format!("{image}/artifacts/{{digest}}"),
        format!("{app}/artifacts/{digest}"),
        None
    );
    call!(
        Method::GET,
        format!("{image}/tags"),
        format!("{app}/tags"),
        None
    );
    let new_tag = json!({"tag": "v2", "digest": digest});
    call!(
        Method::POST,
        format!("{image}/tags"),
        format!("{app}/tags"),
        Some(new_tag.clone())
    );
    let moved = call!(
        Method::POST,
        format!("{image}/tags"),
        format!("{app}/tags"),
        Some(new_tag)
    );
    assert_eq!(moved.status, StatusCode::OK, "a move");
    call!(
        Method::DELETE,
        format!("{image}/tags/{{tag}}"),
        format!("{app}/tags/v2"),
        None
    );

    let cache = json!({"name": "up", "kind": "registry", "url": "https://registry.example",
        "username": "u", "password": "p"});
    call!(
        Method::POST,
        "/image-caches",
        "/image-caches".into(),
        Some(cache)
    );
    call!(Method::GET, "/image-caches", "/image-caches".into(), None);
    call!(
        Method::GET,
        "/image-caches/{name}",
        "/image-caches/up".into(),
        None
    );
    call!(
        Method::PATCH,
        "/image-caches/{name}",
        "/image-caches/up".into(),
        Some(json!({"revalidate_ttl": "30s"}))
    );
    let status = call!(Method::GET, "/status", "/status".into(), None);
    assert_eq!(
        status.body["sources"][0]["name"], "up",
        "the image cache is a source of the status"
    );
    call!(
        Method::POST,
        "/cache/prune",
        "/cache/prune".into(),
        Some(json!({"dry_run": true}))
    );
    call!(Method::POST, "/reload", "/reload".into(), None);
    let page = call!(Method::GET, "/backup", "/backup?limit=2".into(), None);
    let next = page.body["next"].as_str().unwrap().to_string();
    assert_eq!(page.body["lines"][0]["kind"], "header");
    let mut blob = None;
    let mut cursor = Some(next);
    while let Some(c) = cursor.take() {
        let page = call!(Method::GET, "/backup", format!("/backup?cursor={c}"), None);
        for line in page.body["lines"].as_array().unwrap() {
            if line["kind"] == "blob" {
                blob = line["digest"].as_str().map(String::from);
            }
        }
        cursor = page.body["next"].as_str().map(String::from);
    }
    let blob = blob.expect("the backup names a blob");
    call!(
        Method::GET,
        "/backup/blobs/{digest}",
        format!("/backup/blobs/{blob}"),
        None
    );

    call!(
        Method::POST,
        "/users",
        "/users".into(),
        Some(json!({"name": "ann", "role": "viewer"}))
    );
    call!(Method::GET, "/users", "/users".into(), None);
    call!(
        Method::PATCH,
        "/users/{name}",
        "/users/ann".into(),
        Some(json!({"role": "image_uploader"}))
    );
    let key = call!(
        Method::POST,
        "/users/{name}/keys",
        "/users/ann/keys".into(),
        None
    );
    call!(Method::GET, "/users/{name}", "/users/ann".into(), None);
    call!(
        Method::GET,
        "/users/{name}/keys",
        "/users/ann/keys".into(),
        None
    );
    let id = key.body["id"].as_str().unwrap().to_string();
    call!(
        Method::DELETE,
        "/users/{name}/keys/{id}",
        format!("/users/ann/keys/{id}"),
        None
    );

    let hooks = format!("{reg}/webhooks");
    let hook = format!("{hooks}/{{id}}");
    let spec = json!({"name": "h", "events": ["PUSH_ARTIFACT"],
        "target": format!("{}/hook", receiver.url()), "secret": "k"});
    let created = call!(
        Method::POST,
        &hooks,
        "/registries/shop/webhooks".into(),
        Some(spec)
    );
    let id = created.body["id"].as_str().unwrap().to_string();
    let one = format!("/registries/shop/webhooks/{id}");
    call!(
        Method::GET,
        &hooks,
        "/registries/shop/webhooks".into(),
        None
    );
    call!(Method::GET, &hook, one.clone(), None);
    call!(
        Method::PATCH,
        &hook,
        one.clone(),
        Some(json!({"enabled": true}))
    );
    call!(
        Method::POST,
        format!("{hook}/test"),
        format!("{one}/test"),
        None
    );
    call!(
        Method::GET,
        format!("{hook}/deliveries"),
        format!("{one}/deliveries"),
        None
    );
    call!(Method::DELETE, &hook, one, None);

    let cps = format!("{reg}/cleanup-policies");
    let created = call!(
        Method::POST,
        &cps,
        "/registries/shop/cleanup-policies".into(),
        Some(json!({"images": "team/**", "rule": "latest_pushed", "n": 5}))
    );
    let id = created.body["id"].as_str().unwrap().to_string();
    let one = format!("/registries/shop/cleanup-policies/{id}");
    let cp = format!("{cps}/{{id}}");
    call!(
        Method::GET,
        &cps,
        "/registries/shop/cleanup-policies".into(),
        None
    );
    call!(Method::GET, &cp, one.clone(), None);
    call!(Method::PATCH, &cp, one.clone(), Some(json!({"tags": "v*"})));
    let pps = format!("{reg}/protection-policies");
    let created = call!(
        Method::POST,
        &pps,
        "/registries/shop/protection-policies".into(),
        Some(json!({"images": "team/**", "tags": "v1"}))
    );
    let pid = created.body["id"].as_str().unwrap().to_string();
    let pone = format!("/registries/shop/protection-policies/{pid}");
    let pp = format!("{pps}/{{id}}");
    call!(
        Method::GET,
        &pps,
        "/registries/shop/protection-policies".into(),
        None
    );
    call!(Method::GET, &pp, pone.clone(), None);
    call!(
        Method::PATCH,
        &pp,
        pone.clone(),
        Some(json!({"enabled": true}))
    );
    let cleanup = format!("{reg}/cleanup");
    call!(
        Method::PUT,
        &cleanup,
        "/registries/shop/cleanup".into(),
        Some(json!({"schedule": {"type": "custom", "cron": "0 3 * * SUN"}}))
    );
    call!(
        Method::GET,
        &cleanup,
        "/registries/shop/cleanup".into(),
        None
    );
    let execs = format!("{cleanup}/executions");
    let started = call!(
        Method::POST,
        &execs,
        "/registries/shop/cleanup/executions".into(),
        Some(json!({"dry_run": true}))
    );
    let eid = started.body["id"].as_str().unwrap().to_string();
    let exec = format!("{execs}/{{id}}");
    let eone = format!("/registries/shop/cleanup/executions/{eid}");
    let ended = wait_execution(&s, &eone).await;
    assert_eq!(ended["status"], "succeeded", "{ended}");
    call!(Method::GET, &exec, eone.clone(), None);
    call!(
        Method::GET,
        &execs,
        "/registries/shop/cleanup/executions".into(),
        None
    );
    call!(
        Method::GET,
        format!("{exec}/tasks"),
        format!("{eone}/tasks"),
        None
    );
    call!(
        Method::GET,
        format!("{exec}/history"),
        format!("{eone}/history"),
        None
    );
    call!(
        Method::POST,
        format!("{exec}/stop"),
        format!("{eone}/stop"),
        None
    );
    call!(Method::DELETE, &pp, pone, None);
    call!(Method::DELETE, &cp, one, None);

    call!(
        Method::PUT,
        "/gc",
        "/gc".into(),
        Some(json!({"schedule": {"type": "weekly"}}))
    );
    call!(Method::GET, "/gc", "/gc".into(), None);
    let started = call!(
        Method::POST,
        "/gc/executions",
        "/gc/executions".into(),
        Some(json!({"dry_run": true}))
    );
    let gid = started.body["id"].as_str().unwrap().to_string();
    let gone = format!("/gc/executions/{gid}");
    let ended = wait_execution(&s, &gone).await;
    assert_eq!(ended["status"], "succeeded", "{ended}");
    call!(Method::GET, "/gc/executions", "/gc/executions".into(), None);
    call!(Method::GET, "/gc/executions/{id}", gone.clone(), None);
    call!(
        Method::GET,
        "/gc/executions/{id}/tasks",
        format!("{gone}/tasks"),
        None
    );
    call!(
        Method::GET,
        "/gc/executions/{id}/history",
        format!("{gone}/history"),
        None
    );
    call!(
        Method::POST,
        "/gc/executions/{id}/stop",
        format!("{gone}/stop"),
        None
    );

    // An eviction (they start by themselves past the cache's cap; one is recorded here).
    let run = s
        .app()
        .jobs
        .start(berth::jobs::executions::Start {
            kind: "evict".into(),
            scope: berth::cache::evict::SCOPE.into(),
            trigger: berth::jobs::executions::Trigger::Schedule,
            dry_run: false,
            operator: "evict".into(),
        })
        .await
        .unwrap();
    let eid = run.execution().id.clone();
    run.finish(None).await.unwrap();
    let ev = format!("/cache/eviction/executions/{eid}");
    let evx = "/cache/eviction/executions/{id}";
    call!(
        Method::GET,
        "/cache/eviction/executions",
        "/cache/eviction/executions".into(),
        None
    );
    call!(Method::GET, evx, ev.clone(), None);
    call!(
        Method::GET,
        format!("{evx}/tasks"),
        format!("{ev}/tasks"),
        None
    );
    call!(
        Method::GET,
        format!("{evx}/history"),
        format!("{ev}/history"),
        None
    );
    call!(
        Method::POST,
        format!("{evx}/stop"),
        format!("{ev}/stop"),
        None
    );

    // Replication to a second region (no auth there) into its registry `library`.
    let region = TestServer::start("").await;
    let ep = json!({"name": "eu", "url": region.base});
    call!(
        Method::POST,
        "/replication/endpoints",
        "/replication/endpoints".into(),
        Some(ep.clone())
    );
    call!(
        Method::GET,
        "/replication/endpoints",
        "/replication/endpoints".into(),
        None
    );
    let epn = "/replication/endpoints/{name}";
    call!(Method::GET, epn, "/replication/endpoints/eu".into(), None);
    call!(
        Method::PUT,
        epn,
        "/replication/endpoints/eu".into(),
        Some(json!({"name": "eu", "url": region.base, "username": "u", "password": "p"}))
    );
    call!(
        Method::PUT,
        epn,
        "/replication/endpoints/eu".into(),
        Some(ep)
    );
    let tested = call!(
        Method::POST,
        "/replication/endpoints/{name}/test",
        "/replication/endpoints/eu/test".into(),
        None
    );
    assert_eq!(tested.body["ok"], true, "{:?}", tested.body);
    let rule = json!({"name": "to-eu", "endpoint": "eu", "registry": "shop",
                      "images": "team/**", "dest_namespace": "library"});
    call!(
        Method::POST,
        "/replication/rules",
        "/replication/rules".into(),
        Some(rule.clone())
    );
    call!(
        Method::GET,
        "/replication/rules",
        "/replication/rules".into(),
        None
    );
    let rn = "/replication/rules/{name}";
    call!(Method::GET, rn, "/replication/rules/to-eu".into(), None);
    call!(
        Method::PUT,
        rn,
        "/replication/rules/to-eu".into(),
        Some(rule)
    );
    let started = call!(
        Method::POST,
        "/replication/rules/{name}/executions",
        "/replication/rules/to-eu/executions".into(),
        None
    );
    let rid = started.body["id"].as_str().unwrap().to_string();
    let rex = format!("/replication/rules/to-eu/executions/{rid}");
    let ended = wait_execution(&s, &rex).await;
    assert_eq!(ended["status"], "succeeded", "{ended}");
    assert_eq!(ended["counts"]["acted"], 1, "{ended}");
    call!(
        Method::GET,
        "/replication/rules/{name}/executions",
        "/replication/rules/to-eu/executions".into(),
        None
    );
    let rx = "/replication/rules/{name}/executions/{id}";
    call!(Method::GET, rx, rex.clone(), None);
    call!(
        Method::GET,
        format!("{rx}/tasks"),
        format!("{rex}/tasks"),
        None
    );
    call!(
        Method::GET,
        format!("{rx}/history"),
        format!("{rex}/history"),
        None
    );
    call!(
        Method::POST,
        format!("{rx}/stop"),
        format!("{rex}/stop"),
        None
    );
    call!(Method::DELETE, rn, "/replication/rules/to-eu".into(), None);
    call!(
        Method::DELETE,
        epn,
        "/replication/endpoints/eu".into(),
        None
    );

    call!(
        Method::DELETE,
        format!("{image}/artifacts/{{digest}}"),
        format!("{app}/artifacts/{digest}"),
        None
    );
    call!(
        Method::DELETE,
        image,
        "/registries/shop/images/other".into(),
        None
    );
    call!(
        Method::DELETE,
        "/image-caches/{name}",
        "/image-caches/up".into(),
        None
    );
    call!(Method::DELETE, "/users/{name}", "/users/ann".into(), None);
    call!(
        Method::DELETE,
        reg,
        "/registries/shop?force=true".into(),
        None
    );
    // Every documented operation was called (but the document itself).
    let documented: std::collections::BTreeSet<String> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .unwrap()
                .keys()
                .filter(|m| ["get", "post", "patch", "delete", "put"].contains(&m.as_str()))
                .map(move |m| format!("{m} {path}"))
        })
        .filter(|op| op != "get /api/v1/openapi.json")
        .collect();
    assert_eq!(seen, documented);
    assert!(
        problems.is_empty(),
        "openapi.json and the answers disagree:\n{}",
        problems.join("\n")
    );
}

/// An image cache created or changed through the API serves at once (before, a cache registry
/// on an image cache created at run time answered 500 until a restart).
#[tokio::test]
async fn image_caches_created_or_changed_at_run_time_serve_at_once() {
    let first = TestServer::start("").await;
    let (_, one) = first.push_image("library/app", "v1", "first").await;
    let second = TestServer::start("").await;
    let (_, two) = second.push_image("library/other", "v1", "second").await;
    let s = admin_server("").await;
    let cache = json!({"name": "rt", "kind": "registry", "url": first.base});
    let r = api(&s, Method::POST, "/api/v1/image-caches", Some(cache)).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let registry = json!({"name": "rt", "type": "cache", "cache": "rt"});
    let r = api(&s, Method::POST, "/api/v1/registries", Some(registry)).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    assert!(r.body.get("note").is_none(), "{:?}", r.body);
    let r = s.get("/v2/rt/library/app/manifests/v1").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "docker-content-digest"), one);
    // Pointed at another source: the next request goes there.
    let change = json!({"url": second.base});
    let r = api(&s, Method::PATCH, "/api/v1/image-caches/rt", Some(change)).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let r = s.get("/v2/rt/library/other/manifests/v1").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "docker-content-digest"), two);
}

/// A registry's usage is kept by the writes: a layer shared by two images of the registry
/// counts once, a layer another registry holds too is named shared, and a deleted image gives
/// back only what nothing else holds; the gauges on /metrics say the same at once (before, the
/// only storage figure was the whole store's, counted every 5 minutes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_usage_follows_pushes_and_deletes() {
    let s = admin_server("[[registry]]\nname = \"other\"\n").await;
    let shared = b"a layer both images share".to_vec();
    let reg = common::registry::Client::over(s.client.clone(), &s.base);
    let a = reg.image("library/a", "v1", "a", &shared).await;
    let b = reg.image("library/b", "v1", "b", &shared).await;
    reg.blob("other/c", &shared).await;
    let usage = || async {
        api(&s, Method::GET, "/api/v1/registries/library", None)
            .await
            .body["usage"]
            .clone()
    };
    // Per image: config {"seed":"x"} (12 bytes), its own layer "layer of x" (10), the manifest.
    let bytes = shared.len() + 2 * (12 + 10) + a.len() + b.len();
    assert_eq!(
        usage().await,
        json!({"bytes": bytes, "blobs": 7, "shared_blobs": 1, "artifacts": 2})
    );
    assert_eq!(
        s.metric("berth_registry_storage_bytes", &[("registry", "library")])
            .await,
        bytes as f64
    );
    assert_eq!(
        s.metric("berth_registry_artifacts", &[("registry", "library")])
            .await,
        2.0
    );
    let r = api(
        &s,
        Method::DELETE,
        "/api/v1/registries/library/images/a",
        None,
    )
    .await;
    assert!(r.status.is_success(), "{:?}", r.body);
    let left = shared.len() + 12 + 10 + b.len();
    assert_eq!(
        usage().await,
        json!({"bytes": left, "blobs": 4, "shared_blobs": 1, "artifacts": 1})
    );
    assert_eq!(
        s.metric("berth_registry_storage_bytes", &[("registry", "library")])
            .await,
        left as f64
    );
}

/// A registry's storage quota: a push past it is refused with 403 DENIED naming the usage and
/// the limit, before its bytes are read when its length is known; a chunk without a length is
/// taken, and the upload's end refused until the quota allows it; another tag for a manifest
/// the registry holds needs no space; only an admin of every registry changes a quota.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_past_the_registry_quota_is_refused() {
    let s = admin_server("").await;
    let r = api(
        &s,
        Method::POST,
        "/api/v1/registries",
        Some(json!({"name": "small", "quota_bytes": 1000})),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    assert_eq!(r.body["quota_bytes"], 1000);
    let reg = common::registry::Client::over(s.client.clone(), &s.base);
    let manifest = reg.image("small/app", "v1", "a", &[7u8; 300]).await;
    let used = 300 + 12 + 10 + manifest.len();
    // Monolithic, with its length: refused before the body is read.
    let big = vec![1u8; 1000 - used + 1];
    let r = s
        .client
        .post(s.url(&format!(
            "/v2/small/app/blobs/uploads/?digest={}",
            sha256(&big)
        )))
        .body(big.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let (code, message) = common::server::error_of(r).await;
    assert_eq!(code, "DENIED");
    assert!(
        message.contains(&format!(
            "{used} bytes stored + {} bytes pushed > 1000 bytes allowed",
            big.len()
        )),
        "{message}"
    );
    // What fits goes in.
    reg.blob("small/app", &big[1..]).await;
    // A chunk with its range: refused, the session stays where it was.
    let r = s
        .client
        .post(s.url("/v2/small/app/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    let location = header(&r, "location");
    let r = s
        .client
        .patch(s.url(&location))
        .header("content-range", "0-9")
        .body(vec![2u8; 10])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    // A chunk without a length is taken; the upload's end is refused until the quota allows it.
    let chunk = vec![3u8; 10];
    let stream = futures_util::stream::iter(vec![Ok::<_, std::io::Error>(chunk.clone())]);
    let r = s
        .client
        .patch(s.url(&location))
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::ACCEPTED,
        "{}",
        r.text().await.unwrap()
    );
    let location = header(&r, "location");
    let sep = if location.contains('?') { '&' } else { '?' };
    let finish = s.url(&format!("{location}{sep}digest={}", sha256(&chunk)));
    let r = s.client.put(&finish).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    // Another tag for the manifest it holds needs no space.
    let r = s
        .put_manifest("small/app", "v1-again", OCI_MANIFEST, &manifest)
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    // A registry's own admin cannot raise its quota; an admin of everything can.
    let auth = user(&s, "smalladmin", Role::Admin, &["small"]);
    let r = api_as(
        &s,
        Some(&auth),
        Method::PATCH,
        "/api/v1/registries/small",
        Some(json!({"quota_bytes": 0})),
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{:?}", r.body);
    let r = api(
        &s,
        Method::PATCH,
        "/api/v1/registries/small",
        Some(json!({"quota_bytes": 0})),
    )
    .await;
    assert!(
        r.body.get("quota_bytes").is_none(),
        "0 removes it: {:?}",
        r.body
    );
    let r = s.client.put(&finish).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::CREATED, "the same upload ends now");
}

/// Pushes `repo:tag` (a small image unique to `seed`) with the server's client; its digest.
async fn push_seeded(s: &TestServer, repo: &str, tag: &str, seed: &str) -> String {
    let reg = common::registry::Client::over(s.client.clone(), &s.url(""));
    sha256(&reg.image(repo, tag, seed, b"shared base layer").await)
}

/// The status and OCI error code of a request through `/v2/`.
async fn v2(
    s: &TestServer,
    method: Method,
    path: &str,
    body: Option<(&str, Vec<u8>)>,
) -> (StatusCode, String) {
    let mut r = s.client.request(method, s.url(path));
    if let Some((media_type, bytes)) = body {
        r = r.header("content-type", media_type).body(bytes);
    }
    let r = r.send().await.unwrap();
    let status = r.status();
    let body: Value = r.json().await.unwrap_or(Value::Null);
    (
        status,
        body["errors"][0]["code"].as_str().unwrap_or("").to_string(),
    )
}

/// Protection (issue 12 item 4): a protected tag cannot be pushed over (with the same digest or
/// another), deleted, moved, or have its artifact or image deleted, through `/v2/` and the API
/// (412 DENIED naming the policy); other tags of the artifact can go; a cleanup never deletes
/// it; disabling the policy lifts it. Limits and duplicates are refused.
#[tokio::test]
async fn protected_tags_refuse_every_change() {
    let s = admin_server("").await;
    let r = api(
        &s,
        Method::POST,
        "/api/v1/registries",
        Some(json!({"name": "prod"})),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let a = push_seeded(&s, "prod/app", "v1", "a").await;
    let b = push_seeded(&s, "prod/app", "v2", "b").await;
    let t = api(
        &s,
        Method::POST,
        "/api/v1/registries/prod/images/app/tags",
        Some(json!({"tag": "also-a", "digest": a})),
    )
    .await;
    assert_eq!(t.status, StatusCode::CREATED);
    let policies = "/api/v1/registries/prod/protection-policies";
    let p = api(
        &s,
        Method::POST,
        policies,
        Some(json!({"images": "app", "tags": "v1"})),
    )
    .await;
    assert_eq!(p.status, StatusCode::CREATED, "{:?}", p.body);
    let id = p.body["id"].as_str().unwrap().to_string();
    let dup = api(
        &s,
        Method::POST,
        policies,
        Some(json!({"images": "app", "tags": "v1"})),
    )
    .await;
    assert_eq!(dup.status, StatusCode::CONFLICT, "duplicate");
    let bad = api(&s, Method::POST, policies, Some(json!({"tags": "v[1"}))).await;
    assert_eq!(
        bad.status,
        StatusCode::BAD_REQUEST,
        "a pattern that does not compile"
    );

    let a_bytes = s
        .client
        .get(s.url("/v2/prod/app/manifests/v1"))
        .header("accept", OCI_MANIFEST)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .to_vec();
    let b_bytes = s
        .client
        .get(s.url("/v2/prod/app/manifests/v2"))
        .header("accept", OCI_MANIFEST)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .to_vec();
    let refused = (StatusCode::PRECONDITION_FAILED, "DENIED".to_string());
    assert_eq!(
        v2(
            &s,
            Method::PUT,
            "/v2/prod/app/manifests/v1",
            Some((OCI_MANIFEST, a_bytes.clone()))
        )
        .await,
        refused,
        "re-push, same digest"
    );
    assert_eq!(
        v2(
            &s,
            Method::PUT,
            "/v2/prod/app/manifests/v1",
            Some((OCI_MANIFEST, b_bytes))
        )
        .await,
        refused,
        "push of another digest"
    );
    assert_eq!(
        v2(&s, Method::DELETE, "/v2/prod/app/manifests/v1", None).await,
        refused,
        "tag delete"
    );
    assert_eq!(
        v2(
            &s,
            Method::DELETE,
            &format!("/v2/prod/app/manifests/{a}"),
            None
        )
        .await,
        refused,
        "artifact delete"
    );
    let msg = api(
        &s,
        Method::DELETE,
        "/api/v1/registries/prod/images/app/tags/v1",
        None,
    )
    .await;
    assert_eq!(
        (msg.status, msg.code()),
        (StatusCode::PRECONDITION_FAILED, "DENIED")
    );
    assert!(
        msg.message().contains(&id),
        "the refusal names the policy: {}",
        msg.message()
    );
    for (method, path, body) in [
        (
            Method::DELETE,
            format!("/api/v1/registries/prod/images/app/artifacts/{a}"),
            None,
        ),
        (
            Method::DELETE,
            "/api/v1/registries/prod/images/app".to_string(),
            None,
        ),
        (
            Method::POST,
            "/api/v1/registries/prod/images/app/tags".to_string(),
            Some(json!({"tag": "v1", "digest": b})),
        ),
    ] {
        let r = api(&s, method.clone(), &path, body).await;
        assert_eq!(
            (r.status, r.code()),
            (StatusCode::PRECONDITION_FAILED, "DENIED"),
            "{method} {path}"
        );
    }
    // Another tag of the protected artifact, and unprotected tags, can go.
    assert_eq!(
        v2(&s, Method::DELETE, "/v2/prod/app/manifests/also-a", None)
            .await
            .0,
        StatusCode::ACCEPTED
    );
    // A protected tag that does not exist yet can be created, then no longer changed.
    let all = api(&s, Method::POST, policies, Some(json!({"tags": "rel-*"}))).await;
    assert_eq!(all.status, StatusCode::CREATED);
    push_seeded(&s, "prod/tool", "rel-1", "c").await;
    assert_eq!(
        v2(
            &s,
            Method::PUT,
            "/v2/prod/tool/manifests/rel-1",
            Some((OCI_MANIFEST, a_bytes))
        )
        .await,
        refused
    );

    // A cleanup that keeps nothing still keeps the protected artifact.
    let c = api(
        &s,
        Method::POST,
        "/api/v1/registries/prod/cleanup-policies",
        Some(json!({"images": "app", "rule": "latest_pushed", "n": 0})),
    )
    .await;
    assert_eq!(c.status, StatusCode::CREATED, "{:?}", c.body);
    let run = api(
        &s,
        Method::POST,
        "/api/v1/registries/prod/cleanup/executions",
        None,
    )
    .await;
    assert_eq!(run.status, StatusCode::ACCEPTED, "{:?}", run.body);
    let e = wait_execution(
        &s,
        &format!(
            "/registries/prod/cleanup/executions/{}",
            run.body["id"].as_str().unwrap()
        ),
    )
    .await;
    assert_eq!(
        (e["status"].as_str(), e["counts"]["acted"].as_u64()),
        (Some("succeeded"), Some(1)),
        "{e}"
    );
    assert_eq!(
        v2(&s, Method::GET, "/v2/prod/app/manifests/v2", None)
            .await
            .0,
        StatusCode::NOT_FOUND,
        "v2 was cleaned up"
    );
    assert_eq!(
        v2(&s, Method::GET, "/v2/prod/app/manifests/v1", None)
            .await
            .0,
        StatusCode::OK,
        "v1 is protected"
    );

    // Disabled, the policy protects nothing.
    let off = api(
        &s,
        Method::PATCH,
        &format!("{policies}/{id}"),
        Some(json!({"enabled": false})),
    )
    .await;
    assert_eq!(off.status, StatusCode::OK);
    assert_eq!(
        v2(&s, Method::DELETE, "/v2/prod/app/manifests/v1", None)
            .await
            .0,
        StatusCode::ACCEPTED
    );

    // At most 15 per registry.
    for i in 2..15 {
        let r = api(
            &s,
            Method::POST,
            policies,
            Some(json!({"tags": format!("t{i}")})),
        )
        .await;
        assert_eq!(r.status, StatusCode::CREATED, "policy {i}");
    }
    let over = api(&s, Method::POST, policies, Some(json!({"tags": "t99"}))).await;
    assert_eq!(over.status, StatusCode::CONFLICT, "the 16th");
}

/// Cleanup (issue 12 items 1 and 3): a dry run reports exactly what the real run then deletes;
/// what policies keep still pulls completely, the rest answers 404; images no policy names are
/// untouched; executions, tasks and history are paged; policy limits and validation.
#[tokio::test]
async fn cleanup_dry_run_then_real_run() {
    let s = admin_server("").await;
    let r = api(
        &s,
        Method::POST,
        "/api/v1/registries",
        Some(json!({"name": "lib"})),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED);
    // The oldest push, untagged since.
    let untagged = {
        let reg = common::registry::Client::over(s.client.clone(), &s.url(""));
        let bytes = reg
            .image("lib/app", "tmp", "untagged", b"shared base layer")
            .await;
        let d = sha256(&bytes);
        let r = s
            .client
            .delete(s.url("/v2/lib/app/manifests/tmp"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::ACCEPTED);
        d
    };
    let mut digests = std::collections::HashMap::new();
    for tag in ["1.0", "1.1", "1.2", "2.0"] {
        // Push times order the artifacts.
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        digests.insert(tag, push_seeded(&s, "lib/app", tag, tag).await);
    }
    push_seeded(&s, "lib/tools", "1", "t1").await;
    push_seeded(&s, "lib/other", "1", "o1").await;
    let policies = "/api/v1/registries/lib/cleanup-policies";
    for body in [
        json!({"images": "app", "rule": "latest_pushed", "n": 2}),
        json!({"images": "tools", "rule": "always"}),
    ] {
        let r = api(&s, Method::POST, policies, Some(body)).await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    }
    for (body, status) in [
        (
            json!({"images": "app", "rule": "latest_pushed", "n": 2}),
            StatusCode::CONFLICT,
        ),
        (json!({"rule": "latest_pushed"}), StatusCode::BAD_REQUEST),
        (json!({"rule": "always", "n": 3}), StatusCode::BAD_REQUEST),
        (json!({"rule": "sometimes"}), StatusCode::BAD_REQUEST),
        (
            json!({"images": "{a", "rule": "always"}),
            StatusCode::BAD_REQUEST,
        ),
    ] {
        let r = api(&s, Method::POST, policies, Some(body.clone())).await;
        assert_eq!(r.status, status, "{body}: {:?}", r.body);
    }
    let cron = api(
        &s,
        Method::PUT,
        "/api/v1/registries/lib/cleanup",
        Some(json!({"schedule": {"type": "custom", "cron": "0 3 * * MON-FRI"}})),
    )
    .await;
    assert_eq!(cron.status, StatusCode::OK, "{:?}", cron.body);
    assert_eq!(cron.body["next_runs"].as_array().unwrap().len(), 5);
    let bad = api(
        &s,
        Method::PUT,
        "/api/v1/registries/lib/cleanup",
        Some(json!({"schedule": {"type": "custom", "cron": "0 3 L * *"}})),
    )
    .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST, "beyond the grammar");

    let execs = "/api/v1/registries/lib/cleanup/executions";
    let mut reported = Vec::new();
    for dry_run in [true, false] {
        let run = api(&s, Method::POST, execs, Some(json!({"dry_run": dry_run}))).await;
        assert_eq!(run.status, StatusCode::ACCEPTED, "{:?}", run.body);
        let path = format!(
            "/registries/lib/cleanup/executions/{}",
            run.body["id"].as_str().unwrap()
        );
        let e = wait_execution(&s, &path).await;
        assert_eq!(e["status"], "succeeded", "{e}");
        assert_eq!(e["dry_run"], dry_run);
        assert_eq!(e["tasks"], 3, "one task per image: {e}");
        let mut rows = Vec::new();
        let mut cursor = String::new();
        loop {
            let page = api(
                &s,
                Method::GET,
                &format!("/api/v1{path}/history?limit=2{cursor}"),
                None,
            )
            .await;
            for row in page.body["items"].as_array().unwrap() {
                rows.push((
                    row["artifact"].as_str().unwrap().to_string(),
                    row["action"].as_str().unwrap().to_string(),
                ));
            }
            match page.body["next"].as_str() {
                Some(n) => cursor = format!("&cursor={n}"),
                None => break,
            }
        }
        rows.sort();
        reported.push(rows);
        let tasks = api(&s, Method::GET, &format!("/api/v1{path}/tasks"), None).await;
        let units: Vec<&str> = tasks.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["unit"].as_str().unwrap())
            .collect();
        assert_eq!(units, ["app", "other", "tools"]);
        if dry_run {
            assert_eq!(
                v2(&s, Method::GET, "/v2/lib/app/manifests/1.0", None)
                    .await
                    .0,
                StatusCode::OK,
                "a dry run deletes nothing"
            );
        }
    }
    let expect = |action: &str| {
        let mut e: Vec<(String, String)> = [&digests["1.0"], &digests["1.1"], &untagged]
            .iter()
            .map(|d| (format!("lib/app@{d}"), action.to_string()))
            .collect();
        e.sort();
        e
    };
    assert_eq!(reported[0], expect("would_delete"), "the dry run");
    assert_eq!(
        reported[1],
        expect("deleted"),
        "the real run deletes what the dry run showed"
    );
    let reg = common::registry::Client::over(s.client.clone(), &s.url(""));
    for (repo, reference) in [
        ("lib/app", "1.2"),
        ("lib/app", "2.0"),
        ("lib/tools", "1"),
        ("lib/other", "1"),
    ] {
        reg.pull_all(repo, reference).await;
    }
    for reference in [
        digests["1.0"].as_str(),
        &digests["1.1"],
        &untagged,
        "1.0",
        "1.1",
    ] {
        assert_eq!(
            v2(
                &s,
                Method::GET,
                &format!("/v2/lib/app/manifests/{reference}"),
                None
            )
            .await
            .0,
            StatusCode::NOT_FOUND,
            "{reference}"
        );
    }
    let list = api(&s, Method::GET, &format!("{execs}?limit=1"), None).await;
    assert_eq!(list.body["items"][0]["dry_run"], false, "newest first");
    let next = list.body["next"].as_str().unwrap();
    let older = api(
        &s,
        Method::GET,
        &format!("{execs}?limit=1&cursor={next}"),
        None,
    )
    .await;
    assert_eq!(older.body["items"][0]["dry_run"], true);

    // At most 15 policies.
    for i in 2..15 {
        let r = api(
            &s,
            Method::POST,
            policies,
            Some(json!({"images": format!("i{i}"), "rule": "always"})),
        )
        .await;
        assert_eq!(r.status, StatusCode::CREATED);
    }
    let over = api(
        &s,
        Method::POST,
        policies,
        Some(json!({"images": "i99", "rule": "always"})),
    )
    .await;
    assert_eq!(over.status, StatusCode::CONFLICT);
}

/// A cache registry gets the default cleanup (not pulled for `cleanup_unpulled_after`, daily)
/// when it is created; a normal one gets none.
#[tokio::test]
async fn cache_registries_get_the_default_cleanup() {
    let s = admin_server("[pull_through]\ncleanup_unpulled_after = \"36h\"\n").await;
    let c = api(
        &s,
        Method::POST,
        "/api/v1/image-caches",
        Some(json!({"name": "up", "kind": "registry", "url": "https://registry.example"})),
    )
    .await;
    assert_eq!(c.status, StatusCode::CREATED, "{:?}", c.body);
    let r = api(
        &s,
        Method::POST,
        "/api/v1/registries",
        Some(json!({"name": "hub", "type": "cache", "cache": "up"})),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let p = api(
        &s,
        Method::GET,
        "/api/v1/registries/hub/cleanup-policies",
        None,
    )
    .await;
    let items = p.body["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{:?}", p.body);
    assert_eq!(
        (items[0]["rule"].as_str(), items[0]["n"].as_u64()),
        (Some("pulled_within_days"), Some(2))
    );
    let sched = api(&s, Method::GET, "/api/v1/registries/hub/cleanup", None).await;
    assert_eq!(sched.body["schedule"]["type"], "daily");
    assert!(
        sched.body["next_runs"][0]
            .as_str()
            .unwrap()
            .ends_with("T00:00:00Z"),
        "{:?}",
        sched.body
    );
    let r = api(
        &s,
        Method::POST,
        "/api/v1/registries",
        Some(json!({"name": "own"})),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let p = api(
        &s,
        Method::GET,
        "/api/v1/registries/own/cleanup-policies",
        None,
    )
    .await;
    assert_eq!(p.body["items"], json!([]));
}
