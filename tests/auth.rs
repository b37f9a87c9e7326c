//! Access control over raw HTTP: who may do what on `/v2/` (the role × endpoint matrix), the
//! token endpoint, refused tokens, failed-login slowdown, and public/private listeners.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use berth::auth::token::{Access, Claims};
use berth::auth::Role;
use common::server::{error_of, header, sha256, TestServer, OCI_MANIFEST};
use reqwest::{Method, StatusCode};

/// How a request authenticates.
#[derive(Clone)]
enum Cred {
    None,
    Basic(String, String),
    Bearer(String),
}

impl Cred {
    fn apply(&self, r: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match self {
            Cred::None => r,
            Cred::Basic(id, secret) => r.basic_auth(id, Some(secret)),
            Cred::Bearer(t) => r.bearer_auth(t),
        }
    }
}

/// A server whose fixtures were pushed while it was still open, then locked by creating users.
struct Fixture {
    s: TestServer,
    admin: Cred,
    viewer: Cred,
    uploader: Cred,
    team_admin: Cred,
    /// Digest of `library/app:v1` and `team/app:v1`.
    app_digest: String,
}

const EXTRA: &str = "[[registry]]\nname = \"team\"\n[[registry]]\nname = \"open\"\nanonymous_pull = true\n[auth]\nfailed_login_limit = 3\n";

async fn fixture() -> Fixture {
    let s = TestServer::start(EXTRA).await;
    let (_, app_digest) = s.push_image("library/app", "v1", "a").await;
    s.push_image("team/app", "v1", "a").await;
    s.push_image("open/app", "v1", "a").await;
    let app = s.app();
    assert!(
        !app.auth.enforced(),
        "a data directory without users is open (auth.mode = auto)"
    );
    let key = |name: &str, role: Role, registries: &[&str]| {
        common::block(app.auth.users.create(
            name,
            role,
            registries.iter().map(|r| r.to_string()).collect(),
        ))
        .unwrap();
        let (k, secret) = common::block(app.auth.users.create_key(name)).unwrap();
        Cred::Basic(k.id, secret)
    };
    let admin = key("admin", Role::Admin, &[]);
    let viewer = key("viewer", Role::Viewer, &[]);
    let uploader = key("uploader", Role::ImageUploader, &[]);
    let team_admin = key("teamadmin", Role::Admin, &["team"]);
    assert!(app.auth.enforced());
    Fixture {
        s,
        admin,
        viewer,
        uploader,
        team_admin,
        app_digest,
    }
}

impl Fixture {
    async fn send(
        &self,
        cred: &Cred,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> reqwest::Response {
        let mut r = self.s.client.request(method, self.s.url(path));
        if !body.is_empty() {
            r = r.header("content-type", OCI_MANIFEST).body(body);
        }
        cred.apply(r).send().await.unwrap()
    }

    /// A token from `/service/token` for `scopes`.
    async fn token(&self, cred: &Cred, scopes: &[&str]) -> (String, Vec<Access>) {
        let mut path = "/service/token?service=berth".to_string();
        for s in scopes {
            path.push_str(&format!("&scope={s}"));
        }
        let r = self.send(cred, Method::GET, &path, vec![]).await;
        assert_eq!(r.status(), StatusCode::OK);
        let v: serde_json::Value = r.json().await.unwrap();
        assert!(v["expires_in"].as_u64().unwrap() > 0);
        assert!(v["issued_at"].as_str().unwrap().ends_with('Z'));
        assert_eq!(v["token"], v["access_token"]);
        let token = v["token"].as_str().unwrap().to_string();
        (token.clone(), claims_of(&token).access)
    }
}

/// Claims of a JWT, read without checking it (the test looks at what was granted).
fn claims_of(token: &str) -> Claims {
    let payload = token.split('.').nth(1).unwrap();
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    serde_json::from_slice(&json).unwrap()
}

/// The operations of the matrix: (name, method, path, body) on `REPO`.
fn operations(repo: &str, digest: &str) -> Vec<(&'static str, Method, String)> {
    vec![
        ("ping", Method::GET, "/v2/".into()),
        ("catalog", Method::GET, "/v2/_catalog".into()),
        (
            "pull-manifest",
            Method::GET,
            format!("/v2/{repo}/manifests/v1"),
        ),
        (
            "head-manifest",
            Method::HEAD,
            format!("/v2/{repo}/manifests/v1"),
        ),
        (
            "pull-by-digest",
            Method::GET,
            format!("/v2/{repo}/manifests/{digest}"),
        ),
        ("tags", Method::GET, format!("/v2/{repo}/tags/list")),
        (
            "referrers",
            Method::GET,
            format!("/v2/{repo}/referrers/{digest}"),
        ),
        (
            "push-blob",
            Method::POST,
            format!("/v2/{repo}/blobs/uploads/"),
        ),
        (
            "push-manifest",
            Method::PUT,
            format!("/v2/{repo}/manifests/v2"),
        ),
        (
            "delete-tag",
            Method::DELETE,
            format!("/v2/{repo}/manifests/gone"),
        ),
    ]
}

/// Expected status class per operation: "ok", 401 or 403.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Outcome {
    Ok,
    Unauthorized,
    Forbidden,
}

fn outcome(status: StatusCode) -> Outcome {
    match status.as_u16() {
        401 => Outcome::Unauthorized,
        403 => Outcome::Forbidden,
        // Allowed: the operation ran (202 upload, 201 manifest, 404 unknown tag to delete...).
        _ => Outcome::Ok,
    }
}

async fn run_matrix(f: &Fixture, who: &str, cred: &Cred, repo: &str, expect: &[(&str, Outcome)]) {
    let manifest = manifest_of(f, repo).await;
    for (op, method, path) in operations(repo, &f.app_digest) {
        let body = if op == "push-manifest" {
            manifest.clone()
        } else {
            vec![]
        };
        let r = f.send(cred, method.clone(), &path, body).await;
        let status = r.status();
        let want = expect
            .iter()
            .find(|(o, _)| *o == op)
            .map(|(_, w)| *w)
            .unwrap_or_else(|| panic!("no expectation for {op}"));
        assert_eq!(
            outcome(status),
            want,
            "{who} {method} {path}: got {status} {}",
            if method == Method::HEAD {
                String::new()
            } else {
                r.text().await.unwrap()
            }
        );
        if want == Outcome::Unauthorized {
            assert!(
                f.send(cred, method.clone(), &path, vec![])
                    .await
                    .headers()
                    .get("www-authenticate")
                    .is_some_and(|v| v.to_str().unwrap().starts_with("Bearer realm=")),
                "{who} {op}: a 401 carries a Bearer challenge"
            );
        }
    }
}

/// The manifest of `REPO:v1` (read with admin rights) to push again as `v2`.
async fn manifest_of(f: &Fixture, repo: &str) -> Vec<u8> {
    let r = f
        .send(
            &f.admin,
            Method::GET,
            &format!("/v2/{repo}/manifests/v1"),
            vec![],
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    r.bytes().await.unwrap().to_vec()
}

use Outcome::{Forbidden as F, Ok as O, Unauthorized as U};

fn expect(
    ping: Outcome,
    read: Outcome,
    push: Outcome,
    delete: Outcome,
) -> Vec<(&'static str, Outcome)> {
    vec![
        ("ping", ping),
        ("catalog", ping),
        ("pull-manifest", read),
        ("head-manifest", read),
        ("pull-by-digest", read),
        ("tags", read),
        ("referrers", read),
        ("push-blob", push),
        ("push-manifest", push),
        ("delete-tag", delete),
    ]
}

#[tokio::test]
async fn role_matrix_with_access_keys() {
    let f = fixture().await;
    let lib = "library/app";
    run_matrix(&f, "admin", &f.admin, lib, &expect(O, O, O, O)).await;
    run_matrix(&f, "viewer", &f.viewer, lib, &expect(O, O, F, F)).await;
    run_matrix(&f, "uploader", &f.uploader, lib, &expect(O, O, O, F)).await;
    run_matrix(
        &f,
        "team admin on library",
        &f.team_admin,
        lib,
        &expect(O, F, F, F),
    )
    .await;
    run_matrix(
        &f,
        "team admin on team",
        &f.team_admin,
        "team/app",
        &expect(O, O, O, O),
    )
    .await;
    run_matrix(&f, "anonymous", &Cred::None, lib, &expect(U, U, U, U)).await;
    // anonymous_pull registries: anyone pulls, nobody anonymous pushes.
    run_matrix(
        &f,
        "anonymous on open",
        &Cred::None,
        "open/app",
        &expect(U, O, U, U),
    )
    .await;
    // Anonymous callers do not learn which registries exist; users do.
    let r = f
        .send(
            &Cred::None,
            Method::GET,
            "/v2/nosuch/app/manifests/v1",
            vec![],
        )
        .await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = f
        .send(
            &f.viewer,
            Method::GET,
            "/v2/nosuch/app/manifests/v1",
            vec![],
        )
        .await;
    assert_eq!(error_of(r).await.0, "NAME_UNKNOWN");
    // A wrong secret is refused outright, never treated as anonymous.
    let Cred::Basic(id, _) = &f.viewer else {
        unreachable!()
    };
    let wrong = Cred::Basic(id.clone(), "not-the-secret".into());
    let r = f
        .send(&wrong, Method::GET, "/v2/open/app/manifests/v1", vec![])
        .await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(error_of(r).await.0, "UNAUTHORIZED");
}

#[tokio::test]
async fn catalog_lists_only_what_the_caller_may_read() {
    let f = fixture().await;
    let repos = |cred: Cred| {
        let f = &f;
        async move {
            let r = f.send(&cred, Method::GET, "/v2/_catalog", vec![]).await;
            assert_eq!(r.status(), StatusCode::OK);
            let v: serde_json::Value = r.json().await.unwrap();
            v["repositories"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        repos(f.admin.clone()).await,
        ["library/app", "open/app", "team/app"]
    );
    assert_eq!(repos(f.team_admin.clone()).await, ["team/app"]);
}

#[tokio::test]
async fn tokens_grant_the_intersection_of_scope_and_role() {
    let f = fixture().await;
    let scope = "repository:library/app:pull,push,delete";
    let (_, admin) = f.token(&f.admin, &[scope, "registry:catalog:*"]).await;
    assert_eq!(admin[0].actions, ["pull", "push", "delete"]);
    assert_eq!(admin[1].name, "catalog");
    let (viewer_token, viewer) = f.token(&f.viewer, &[scope]).await;
    assert_eq!(viewer[0].actions, ["pull"]);
    let (_, uploader) = f.token(&f.uploader, &[scope]).await;
    assert_eq!(uploader[0].actions, ["pull", "push"]);
    let (_, team) = f.token(&f.team_admin, &[scope]).await;
    assert!(team.is_empty(), "{team:?}");
    let (anon_token, anon) = f
        .token(&Cred::None, &[scope, "repository:open/app:pull,push"])
        .await;
    assert_eq!(anon.len(), 1);
    assert_eq!(
        (anon[0].name.as_str(), anon[0].actions.clone()),
        ("open/app", vec!["pull".to_string()])
    );
    assert_eq!(claims_of(&anon_token).sub, "");

    // Bearer tokens through the same matrix: the token's grant decides, not the role.
    let (admin_token, _) = f.token(&f.admin, &[scope, "registry:catalog:*"]).await;
    run_matrix(
        &f,
        "admin token",
        &Cred::Bearer(admin_token),
        "library/app",
        &expect(O, O, O, O),
    )
    .await;
    let viewer_bearer = Cred::Bearer(viewer_token);
    let vt = expect(O, O, U, U)
        .into_iter()
        .map(|(op, o)| (op, if op == "catalog" { U } else { o }))
        .collect::<Vec<_>>();
    run_matrix(&f, "viewer token", &viewer_bearer, "library/app", &vt).await;
    // A token lacking the scope says so: insufficient_scope in the challenge, DENIED in the body.
    let r = f
        .send(
            &viewer_bearer,
            Method::POST,
            "/v2/library/app/blobs/uploads/",
            vec![],
        )
        .await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let challenge = header(&r, "www-authenticate");
    assert!(
        challenge.contains("error=\"insufficient_scope\""),
        "{challenge}"
    );
    assert!(
        challenge.contains("scope=\"repository:library/app:pull,push\""),
        "{challenge}"
    );
    assert_eq!(error_of(r).await.0, "DENIED");

    // A token for another repository does not open this one.
    let (other, _) = f.token(&f.admin, &["repository:library/other:pull"]).await;
    let r = f
        .send(
            &Cred::Bearer(other),
            Method::GET,
            "/v2/library/app/manifests/v1",
            vec![],
        )
        .await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    // Anonymous token: pulls of the open registry only.
    let anon = Cred::Bearer(anon_token);
    run_matrix(
        &f,
        "anonymous token on open",
        &anon,
        "open/app",
        &expect(O, O, U, U)
            .into_iter()
            .map(|(op, o)| (op, if op == "catalog" { U } else { o }))
            .collect::<Vec<_>>(),
    )
    .await;
}

#[tokio::test]
async fn expired_and_tampered_tokens_are_refused() {
    let f = fixture().await;
    let app = f.s.app();
    // Every right, so only the expiry or the signature can be what refuses them.
    let access = vec![
        Access::parse("repository:library/app:pull,push,delete").unwrap(),
        Access::parse("registry:catalog:*").unwrap(),
    ];
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let expired = app.auth.keys.sign(&Claims {
        iss: "berth".into(),
        sub: "admin".into(),
        aud: "berth".into(),
        exp: now - 120,
        nbf: now - 600,
        iat: now - 600,
        jti: "x".into(),
        access: access.clone(),
    });
    let (good, _) = app
        .auth
        .keys
        .issue("admin", access.clone(), Duration::from_secs(60));
    let path = "/v2/library/app/manifests/v1";
    let r = f
        .send(&Cred::Bearer(good.clone()), Method::GET, path, vec![])
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = f
        .send(&Cred::Bearer(expired.clone()), Method::GET, path, vec![])
        .await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(error_of(r).await.1.contains("Expired"));
    // Same claims, widened to push, signature kept: must fail.
    let (h, _) = good.split_once('.').unwrap();
    let sig = good.rsplit('.').next().unwrap();
    let mut claims = claims_of(&good);
    claims.sub = "root".into();
    let forged_payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(serde_json::to_vec(&claims).unwrap());
    let forged = format!("{h}.{forged_payload}.{sig}");
    let r = f
        .send(&Cred::Bearer(forged.clone()), Method::GET, path, vec![])
        .await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // A token signed by another berth (another key) is not ours.
    let other = TestServer::start("").await;
    let (foreign, _) = other
        .app()
        .auth
        .keys
        .issue("admin", access, Duration::from_secs(60));
    let r = f
        .send(&Cred::Bearer(foreign.clone()), Method::GET, path, vec![])
        .await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    // Each of them through every operation of both matrices.
    let none = "U U U U U U U U U U U U U";
    for (who, token) in [
        ("expired", expired),
        ("forged", forged),
        ("foreign", foreign),
    ] {
        let cred = Cred::Bearer(token);
        run_matrix(&f, who, &cred, "library/app", &expect(U, U, U, U)).await;
        run_api_matrix(&f, who, &cred, none).await;
    }
    // A valid token whose scope names another repository opens nothing here.
    let (other, _) = app.auth.keys.issue(
        "admin",
        vec![Access::parse("repository:library/other:pull,push,delete").unwrap()],
        Duration::from_secs(60),
    );
    let other_repo: Vec<_> = expect(O, U, U, U)
        .into_iter()
        .map(|(op, o)| (op, if op == "catalog" { U } else { o }))
        .collect();
    run_matrix(
        &f,
        "other-repo token",
        &Cred::Bearer(other),
        "library/app",
        &other_repo,
    )
    .await;
}

#[tokio::test]
async fn challenge_points_at_the_token_endpoint_and_oauth_post_works() {
    let f = fixture().await;
    let r = f
        .send(
            &Cred::None,
            Method::GET,
            "/v2/library/app/manifests/v1",
            vec![],
        )
        .await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        header(&r, "www-authenticate"),
        format!(
            "Bearer realm=\"{}/service/token\",service=\"berth\",scope=\"repository:library/app:pull\"",
            f.s.base
        )
    );
    let (code, message) = error_of(r).await;
    assert_eq!(
        (code.as_str(), message.as_str()),
        ("UNAUTHORIZED", "authentication required")
    );

    // containerd's OAuth2 password grant.
    let Cred::Basic(id, secret) = &f.uploader else {
        unreachable!()
    };
    let form = format!(
        "grant_type=password&username={id}&password={secret}&service=berth&client_id=containerd-client&scope=repository%3Alibrary%2Fapp%3Apull%2Cpush"
    );
    let r =
        f.s.client
            .post(f.s.url("/service/token"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form)
            .send()
            .await
            .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let v: serde_json::Value = r.json().await.unwrap();
    let claims = claims_of(v["access_token"].as_str().unwrap());
    assert_eq!(
        (claims.sub.as_str(), claims.access[0].actions.len()),
        ("uploader", 2)
    );
    let r =
        f.s.client
            .post(f.s.url("/service/token"))
            .body(format!("grant_type=password&username={id}&password=nope"))
            .send()
            .await
            .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // A wrong secret on the GET endpoint gets a Basic challenge (docker login prints "unauthorized").
    let wrong = Cred::Basic(id.clone(), "nope".into());
    let r = f
        .send(&wrong, Method::GET, "/service/token?service=berth", vec![])
        .await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(header(&r, "www-authenticate").starts_with("Basic "));
}

#[tokio::test]
async fn repeated_failed_logins_are_slowed_down() {
    let f = fixture().await;
    let Cred::Basic(id, secret) = f.viewer.clone() else {
        unreachable!()
    };
    let wrong = Cred::Basic(id.clone(), "guess".into());
    let path = "/v2/library/app/manifests/v1";
    let failed_before = f.s.metric("berth_auth_failed_logins_total", &[]).await;
    // failed_login_limit = 3: three quick refusals, then each attempt waits.
    for _ in 0..3 {
        let r = f.send(&wrong, Method::GET, path, vec![]).await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    }
    let started = Instant::now();
    let r = f.send(&wrong, Method::GET, path, vec![]).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(
        started.elapsed() >= Duration::from_millis(240),
        "the 4th failure within the window is delayed, took {:?}",
        started.elapsed()
    );
    // The right secret is still accepted (after the delay), and is cached from then on.
    let r = f
        .send(&Cred::Basic(id, secret), Method::GET, path, vec![])
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    // The four refusals of this test are counted (other tests of this binary share the
    // process-wide recorder and can only add to it).
    let failed = f.s.metric("berth_auth_failed_logins_total", &[]).await - failed_before;
    assert!(failed >= 4.0, "4 failed logins, {failed} counted");
}

#[tokio::test]
async fn public_and_private_listeners() {
    let extra =
        "[[listen]]\naddr = \"127.0.0.1:0\"\nexposure = \"private\"\nallow = [\"127.0.0.0/8\"]\n\
[[listen]]\naddr = \"127.0.0.1:0\"\nexposure = \"private\"\nallow = [\"10.0.0.0/8\"]\n\
[[registry]]\nname = \"internal\"\npublic_uri = false\n";
    let s = TestServer::start(extra).await;
    let addrs: Vec<_> = s.server.as_ref().unwrap().local_addrs().to_vec();
    let (public, private, closed) = (addrs[0].0, addrs[1].0, addrs[2].0);
    // Push through the private listener (the registry does not exist on the public one).
    let private_base = format!("http://{private}");
    let data = b"internal blob".to_vec();
    let d = sha256(&data);
    let r = s
        .client
        .post(format!(
            "{private_base}/v2/internal/app/blobs/uploads/?digest={d}"
        ))
        .body(data)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let blob = |base: String| {
        let s = &s;
        let d = d.clone();
        async move {
            s.client
                .get(format!("{base}/v2/internal/app/blobs/{d}"))
                .send()
                .await
                .unwrap()
        }
    };
    assert_eq!(blob(private_base.clone()).await.status(), StatusCode::OK);
    let r = blob(format!("http://{public}")).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let (code, message) = error_of(r).await;
    assert_eq!(code, "NAME_UNKNOWN");
    assert!(message.contains("internal"), "{message}");
    // Origin content in other registries is on both.
    s.push_image("library/app", "v1", "p").await;
    let r = s
        .client
        .get(format!("http://{private}/v2/library/app/manifests/v1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // The catalog of the public listener does not show the hidden registry.
    let v: serde_json::Value = s.get("/v2/_catalog").await.json().await.unwrap();
    assert_eq!(v["repositories"], serde_json::json!(["library/app"]));
    // A private listener whose allow list excludes loopback closes the connection.
    let refused_before = s.metric("berth_connections_refused_total", &[]).await;
    let refused = s
        .client
        .get(format!("http://{closed}/v2/"))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(refused.is_err(), "{refused:?}");
    // Exactly the one connection above: no other test of this binary has a listener whose
    // allow list excludes loopback, so nothing else adds to this process-wide counter.
    let refused = s.metric("berth_connections_refused_total", &[]).await - refused_before;
    assert_eq!(refused, 1.0, "the refused connection is counted once");
}

#[tokio::test]
async fn auth_off_and_auth_on_modes() {
    // mode = "on" with no user: only anonymous pull registries answer.
    let s = TestServer::start("[auth]\nmode = \"on\"\n").await;
    let r = s.get("/v2/").await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // mode = "off": users exist, nobody is asked.
    let s = TestServer::start("[auth]\nmode = \"off\"\n").await;
    let app: Arc<berth::App> = s.app();
    app.auth
        .users
        .create("root", Role::Admin, vec![])
        .await
        .unwrap();
    s.push_image("library/app", "v1", "o").await;
    // Credentials that do not check out are ignored while auth is off (CI jobs that always log
    // in keep working), and the token endpoint still says they are wrong.
    let stale = |path: &str| {
        s.client
            .get(s.url(path))
            .basic_auth("BKSTALE", Some("old-secret"))
            .send()
    };
    assert_eq!(
        stale("/v2/library/app/manifests/v1")
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    assert_eq!(
        stale("/service/token?service=berth")
            .await
            .unwrap()
            .status(),
        StatusCode::UNAUTHORIZED
    );
}

/// `/api/v1` through the same check: (operation, method, path, JSON body) for a principal `who`.
fn api_operations(
    who: &str,
    digest: &str,
) -> Vec<(&'static str, Method, String, Option<serde_json::Value>)> {
    vec![
        (
            "list-registries",
            Method::GET,
            "/api/v1/registries".into(),
            None,
        ),
        (
            "get-registry",
            Method::GET,
            "/api/v1/registries/library".into(),
            None,
        ),
        (
            "list-images",
            Method::GET,
            "/api/v1/registries/library/images".into(),
            None,
        ),
        (
            "list-artifacts",
            Method::GET,
            "/api/v1/registries/library/images/app/artifacts".into(),
            None,
        ),
        (
            "list-tags",
            Method::GET,
            "/api/v1/registries/library/images/app/tags".into(),
            None,
        ),
        (
            "create-tag",
            Method::POST,
            "/api/v1/registries/library/images/app/tags".into(),
            Some(serde_json::json!({"tag": format!("t-{who}"), "digest": digest})),
        ),
        (
            "delete-tag",
            Method::DELETE,
            "/api/v1/registries/library/images/app/tags/nosuch".into(),
            None,
        ),
        (
            "list-image-caches",
            Method::GET,
            "/api/v1/image-caches".into(),
            None,
        ),
        (
            "create-registry",
            Method::POST,
            "/api/v1/registries".into(),
            Some(serde_json::json!({"name": format!("r-{who}"), "type": "normal"})),
        ),
        ("list-users", Method::GET, "/api/v1/users".into(), None),
        (
            "get-team",
            Method::GET,
            "/api/v1/registries/team".into(),
            None,
        ),
        (
            "patch-team",
            Method::PATCH,
            "/api/v1/registries/team".into(),
            Some(serde_json::json!({"anonymous_pull": false})),
        ),
        (
            "list-webhooks",
            Method::GET,
            "/api/v1/registries/library/webhooks".into(),
            None,
        ),
    ]
}

/// Expected outcomes, in the order of `api_operations`.
fn api_expect(row: &str) -> Vec<Outcome> {
    row.split_whitespace()
        .map(|c| match c {
            "O" => O,
            "F" => F,
            "U" => U,
            other => panic!("bad outcome {other}"),
        })
        .collect()
}

async fn run_api_matrix(f: &Fixture, who: &str, cred: &Cred, row: &str) {
    let expected = api_expect(row);
    let ops = api_operations(who.split_whitespace().next().unwrap(), &f.app_digest);
    assert_eq!(
        ops.len(),
        expected.len(),
        "{who}: one outcome per operation"
    );
    for ((op, method, path, body), want) in ops.into_iter().zip(expected) {
        let mut r = f.s.client.request(method.clone(), f.s.url(&path));
        if let Some(b) = body {
            r = r.json(&b);
        }
        let r = cred.apply(r).send().await.unwrap();
        let status = r.status();
        let text = r.text().await.unwrap();
        assert_eq!(
            outcome(status),
            want,
            "{who} {op} {method} {path}: got {status} {text}"
        );
        if status.is_client_error() {
            let v: serde_json::Value = serde_json::from_str(&text)
                .unwrap_or_else(|_| panic!("{who} {op}: error body is JSON: {text}"));
            assert!(v["errors"][0]["code"].is_string(), "{who} {op}: {text}");
            assert!(v["errors"][0]["message"].is_string(), "{who} {op}: {text}");
        }
    }
}

/// Outcome per principal of each operation of `api_operations` (O allowed, F 403, U 401).
#[rustfmt::skip]
const API_MATRIX: &[(&str, &str)] = &[
    //               list get imgs arts tags +tag -tag caches +reg users team patch hooks
    ("admin",       "O    O   O    O    O    O    O    O      O    O     O    O     O"),
    ("viewer",      "O    O   O    O    O    F    F    O      F    F     O    F     O"),
    ("uploader",    "O    O   O    O    O    O    F    O      F    F     O    F     O"),
    ("teamadmin",   "O    F   F    F    F    F    F    O      F    F     O    O     F"),
    ("anonymous",   "U    U   U    U    U    U    U    U      U    U     U    U     U"),
];

#[tokio::test]
async fn role_matrix_on_the_management_api() {
    let f = fixture().await;
    for (who, row) in API_MATRIX {
        let cred = match *who {
            "admin" => f.admin.clone(),
            "viewer" => f.viewer.clone(),
            "uploader" => f.uploader.clone(),
            "teamadmin" => f.team_admin.clone(),
            _ => Cred::None,
        };
        run_api_matrix(&f, who, &cred, row).await;
    }
    // A token acts on the API with its user's current role.
    let (token, _) = f.token(&f.admin, &["repository:library/app:pull"]).await;
    run_api_matrix(
        &f,
        "admintoken",
        &Cred::Bearer(token),
        "O O O O O O O O O O O O O",
    )
    .await;
    let app = f.s.app();
    let (forged, _) =
        TestServer::start("")
            .await
            .app()
            .auth
            .keys
            .issue("admin", vec![], Duration::from_secs(60));
    run_api_matrix(
        &f,
        "foreign token",
        &Cred::Bearer(forged),
        "U U U U U U U U U U U U U",
    )
    .await;
    let (good, _) = app
        .auth
        .keys
        .issue("admin", vec![], Duration::from_secs(60));
    let mut tampered = good.into_bytes();
    let n = tampered.len();
    tampered[n - 2] = if tampered[n - 2] == b'A' { b'B' } else { b'A' };
    let tampered = Cred::Bearer(String::from_utf8(tampered).unwrap());
    run_api_matrix(&f, "tampered token", &tampered, "U U U U U U U U U U U U U").await;
    // What the allowed changes did is visible.
    let r = f
        .send(&f.admin, Method::GET, "/v2/library/app/tags/list", vec![])
        .await;
    let tags: serde_json::Value = r.json().await.unwrap();
    let tags = tags["tags"].as_array().unwrap();
    for t in ["t-admin", "t-uploader", "t-admintoken"] {
        assert!(tags.iter().any(|x| x == t), "{t} in {tags:?}");
    }
    assert!(!tags.iter().any(|x| x == "t-viewer"));
}

/// The edge-site setup: auth on, a cache registry with anonymous pull, reached as a Docker
/// mirror (unprefixed names after the token dance) and by containerd's `ns`, while the edge's
/// own registry stays closed.
#[tokio::test]
async fn edge_cache_with_anonymous_pull_behind_auth() {
    let upstream = TestServer::start("[[registry]]\nname = \"team\"\n").await;
    let (_, digest) = upstream.push_image("team/app", "v1", "edge").await;
    // Mirror mode refuses a registry named `library`: the edge's own registry is `edge`.
    let edge = TestServer::start_bare(&common::server::cache_toml(
        "registry",
        &upstream.base,
        "",
        "anonymous_pull = true\n[[registry]]\nname = \"edge\"\n[mirror]\nregistry = \"hub\"\n[auth]\nmode = \"on\"\n",
    ))
    .await;
    let send = |cred: Cred, method: Method, path: &str| {
        let r = edge.client.request(method, edge.url(path));
        async move { cred.apply(r).send().await.unwrap() }
    };
    // The Docker daemon's dance: /v2/ refuses, an anonymous token is granted pull of what the
    // name the daemon knows resolves to (the mirror's cache registry), and the mirror-mode pull
    // works with it.
    assert_eq!(
        send(Cred::None, Method::GET, "/v2/").await.status(),
        StatusCode::UNAUTHORIZED
    );
    let r = send(
        Cred::None,
        Method::GET,
        "/service/token?service=berth&scope=repository:team/app:pull,push",
    )
    .await;
    let token = r.json::<serde_json::Value>().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();
    let claims = claims_of(&token);
    assert_eq!(claims.access.len(), 1);
    assert_eq!(
        (
            claims.access[0].name.as_str(),
            claims.access[0].actions.clone()
        ),
        ("hub/team/app", vec!["pull".to_string()])
    );
    let bearer = Cred::Bearer(token);
    assert_eq!(
        send(bearer.clone(), Method::GET, "/v2/").await.status(),
        StatusCode::OK
    );
    let r = send(bearer.clone(), Method::HEAD, "/v2/team/app/manifests/v1").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "docker-content-digest"), digest);
    // containerd: no token at all, ns routing.
    let ns = upstream.addr();
    let r = send(
        Cred::None,
        Method::GET,
        &format!("/v2/team/app/manifests/v1?ns={ns}"),
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    // By prefix, anonymously.
    let r = send(Cred::None, Method::GET, "/v2/hub/team/app/manifests/v1").await;
    assert_eq!(r.status(), StatusCode::OK);
    // Still no anonymous push, and the edge's own registry is closed.
    let r = send(Cred::None, Method::POST, "/v2/hub/team/app/blobs/uploads/").await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = send(bearer, Method::GET, "/v2/edge/x/tags/list").await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
}
