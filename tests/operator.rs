//! What an operator meets on the first day: a config error that changes nothing stored, mirror
//! mode that cannot be shadowed or refused silently, image caches that apply at once.

mod common;

use common::server::*;
use reqwest::{Method, StatusCode};

/// Starts a server on `dir` with `toml` (one listener on port 0), or says why it refused.
async fn start_on(dir: &std::path::Path, toml: &str) -> Result<berth::Server, String> {
    berth::Server::start(config_for(dir, toml))
        .await
        .map_err(|e| e.to_string())
}

/// Registry names stored in a data directory (read by a server started on it with no config).
async fn stored_registries(dir: &std::path::Path) -> (Vec<String>, Vec<String>) {
    let server = start_on(dir, "").await.expect("plain start");
    let app = server.app();
    let mut registries: Vec<String> = app
        .store
        .registries()
        .iter()
        .map(|r| r.name.clone())
        .collect();
    registries.sort();
    let caches = app
        .store
        .meta
        .image_caches()
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.name)
        .collect();
    server.shutdown().await;
    (registries, caches)
}

/// Before: a typo'd cache registry was stored before the check that refused it, so every later
/// start failed on the stored record, even with the typo fixed.
#[tokio::test]
async fn a_refused_config_changes_nothing_stored_and_the_fixed_one_starts() {
    let dir = tempfile::tempdir().unwrap();
    let typo =
        "[[image_cache]]\nname = \"up1\"\nkind = \"registry\"\nurl = \"http://127.0.0.1:9\"\n\
                [[registry]]\nname = \"hubb\"\ntype = \"cache\"\ncache = \"upp\"\n\
                [[registry]]\nname = \"team\"\n";
    let e = start_on(dir.path(), typo).await.err().expect("refused");
    assert!(
        e.contains("\"hubb\"") && e.contains("\"upp\"") && e.contains("nothing was changed"),
        "{e}"
    );
    // Nothing of the refused config was written: no registry, no image cache.
    assert_eq!(stored_registries(dir.path()).await, (vec![], vec![]));
    let fixed =
        "[[image_cache]]\nname = \"up\"\nkind = \"registry\"\nurl = \"http://127.0.0.1:9\"\n\
                 [[registry]]\nname = \"hub\"\ntype = \"cache\"\ncache = \"up\"\n";
    let server = start_on(dir.path(), fixed)
        .await
        .expect("the fixed config starts");
    server.shutdown().await;
    assert_eq!(
        stored_registries(dir.path()).await,
        (vec!["hub".to_string()], vec!["up".to_string()])
    );
}

/// Mirror mode: a registry `library` would capture every official image a Docker daemon asks
/// its mirror for; berth refuses it, declared or stored, and through the API.
#[tokio::test]
async fn mirror_mode_refuses_a_registry_that_shadows_official_images() {
    let mirror = cache_toml(
        "registry",
        "http://127.0.0.1:9",
        "",
        "[mirror]\nregistry = \"hub\"\n",
    );
    let dir = tempfile::tempdir().unwrap();
    let e = start_on(
        dir.path(),
        &format!("[[registry]]\nname = \"library\"\n{mirror}"),
    )
    .await
    .err()
    .expect("refused");
    assert!(e.contains("registry \"library\" shadows the mirror"), "{e}");
    // Stored by an earlier start without the mirror: refused as well, and still there.
    let server = start_on(dir.path(), "[[registry]]\nname = \"library\"\n")
        .await
        .unwrap();
    server.shutdown().await;
    let e = start_on(dir.path(), &mirror).await.err().expect("refused");
    assert!(e.contains("shadows the mirror"), "{e}");
    assert_eq!(stored_registries(dir.path()).await.0, ["library"]);
    // Through the API of a mirror-mode server.
    let edge = TestServer::start_bare(&mirror).await;
    let r = edge
        .req(Method::POST, "/api/v1/registries")
        .await
        .json(&serde_json::json!({"name": "library"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CONFLICT);
    let (_, message) = error_of(r).await;
    assert!(message.contains("shadow the mirror"), "{message}");
}

/// The mirror's cache registry allows anonymous pull unless the config says otherwise (Docker
/// daemons do not log in to a mirror); a refused or missing mirror request is a WARN and a
/// count, since the daemon hides it.
#[tokio::test]
async fn the_mirror_serves_anonymous_daemons_and_counts_what_it_refuses() {
    let upstream = TestServer::start("").await;
    let (_, digest) = upstream.push_image("library/app", "v1", "mirror").await;
    let edge = TestServer::start_bare(&cache_toml(
        "registry",
        &upstream.base,
        "",
        "[[registry]]\nname = \"team\"\n[mirror]\nregistry = \"hub\"\n[auth]\nmode = \"on\"\n",
    ))
    .await;
    // `docker pull library/app:v1` through the mirror, no credentials.
    let r = edge.get("/v2/library/app/manifests/v1").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "docker-content-digest"), digest);
    let mirror_404 = [("status", "404"), ("reason", "mirror")];
    let before = edge.metric("berth_mirror_refused_total", &mirror_404).await;
    let r = edge.get("/v2/library/nothing/manifests/v1").await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        edge.metric("berth_mirror_refused_total", &mirror_404).await,
        before + 1.0
    );
    // A Docker daemon refused by a normal registry in mirror mode: counted as shadowed.
    let shadowed = [("status", "401"), ("reason", "shadowed")];
    let before = edge.metric("berth_mirror_refused_total", &shadowed).await;
    let r = edge
        .req(Method::GET, "/v2/team/app/manifests/v1")
        .await
        .header(
            "user-agent",
            "docker/26.1.5 go/go1.22.2 os/linux arch/amd64",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        edge.metric("berth_mirror_refused_total", &shadowed).await,
        before + 1.0
    );
    // The registry the mirror serves can still be closed explicitly.
    let closed = TestServer::start_bare(&cache_toml(
        "registry",
        &upstream.base,
        "",
        "anonymous_pull = false\n[mirror]\nregistry = \"hub\"\n[auth]\nmode = \"on\"\n",
    ))
    .await;
    let r = closed.get("/v2/library/app/manifests/v1").await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
}
