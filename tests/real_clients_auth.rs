//! Real clients with credentials: `docker login` then push, pull and run; skopeo `--creds`;
//! containerd `ctr --user`; a wrong secret gets a clear `unauthorized` in each.
//!
//! Users and keys are created on the data directory before berth starts, as an operator does
//! with `berth user create` / `berth key create`.

mod common;

use std::path::Path;

use berth::auth::users::Users;
use berth::auth::Role;
use common::clients::{self, Containerd, Dockerd};
use common::oci_layout::{self, sha256_digest, MARKER};
use common::process::BerthProcess;

const REGISTRIES: &str = "[[registry]]\nname = \"library\"\n";

/// `ID:SECRET` of an uploader and of a viewer.
struct Keys {
    uploader: (String, String),
    viewer: (String, String),
}

fn seed_users(dir: &Path) -> Keys {
    common::block(async {
        let meta = berth::store::meta::open(&dir.join("data")).unwrap();
        let users = Users::open(&meta).await.unwrap();
        users.create("root", Role::Admin, vec![]).await.unwrap();
        users
            .create("ci", Role::ImageUploader, vec![])
            .await
            .unwrap();
        users.create("node", Role::Viewer, vec![]).await.unwrap();
        let (k, s) = users.create_key("ci").await.unwrap();
        let uploader = (k.id, s);
        let (k, s) = users.create_key("node").await.unwrap();
        let viewer = (k.id, s);
        meta.flush().await.unwrap();
        Keys { uploader, viewer }
    })
}

fn start() -> (tempfile::TempDir, BerthProcess, Keys) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("berth");
    std::fs::create_dir_all(root.join("data")).unwrap();
    let keys = seed_users(&root);
    let berth = BerthProcess::start_in(&root, REGISTRIES);
    (dir, berth, keys)
}

fn creds((id, secret): &(String, String)) -> String {
    format!("{id}:{secret}")
}

fn oci_ref(layout: &Path, tag: &str) -> String {
    format!("oci:{}:{tag}", layout.display())
}

fn is_unauthorized(text: &str) -> bool {
    let t = text.to_ascii_lowercase();
    t.contains("unauthorized") || t.contains("authentication required")
}

#[test]
fn skopeo_with_creds() {
    let (dir, berth, keys) = start();
    let src = dir.path().join("src");
    let img = oci_layout::build_image(&src, "v1", 64 * 1024);
    let dest = format!("docker://{}/library/app:v1", berth.addr);

    // Anonymous: refused with a clear unauthorized.
    let out = clients::try_skopeo(&[
        "copy",
        "--dest-tls-verify=false",
        &oci_ref(&src, "v1"),
        &dest,
    ]);
    assert!(
        !out.success() && is_unauthorized(&out.stderr_str()),
        "{}",
        out.stderr_str()
    );
    // Wrong secret.
    let wrong = format!("{}:wrong", keys.uploader.0);
    let out = clients::try_skopeo(&[
        "copy",
        "--dest-tls-verify=false",
        "--dest-creds",
        &wrong,
        &oci_ref(&src, "v1"),
        &dest,
    ]);
    assert!(
        !out.success() && is_unauthorized(&out.stderr_str()),
        "{}",
        out.stderr_str()
    );
    // A viewer may not push.
    let out = clients::try_skopeo(&[
        "copy",
        "--dest-tls-verify=false",
        "--dest-creds",
        &creds(&keys.viewer),
        &oci_ref(&src, "v1"),
        &dest,
    ]);
    assert!(!out.success(), "a viewer pushed: {}", out.stdout_str());
    // The uploader pushes; the viewer reads it back byte for byte.
    clients::skopeo_copy(
        &oci_ref(&src, "v1"),
        &dest,
        &["--dest-creds", &creds(&keys.uploader)],
    );
    let raw = clients::skopeo(&[
        "inspect",
        "--tls-verify=false",
        "--raw",
        "--creds",
        &creds(&keys.viewer),
        &dest,
    ]);
    assert_eq!(sha256_digest(raw.as_bytes()), img.manifest.digest);
    let out = dir.path().join("out");
    clients::skopeo_copy(
        &dest,
        &oci_ref(&out, "v1"),
        &["--src-creds", &creds(&keys.viewer)],
    );
    assert_eq!(oci_layout::verified_blob_digests(&out), img.all_digests());
}

#[test]
fn docker_login_push_pull_and_run() {
    let (dir, berth, keys) = start();
    let src = dir.path().join("src");
    let img = oci_layout::build_image(&src, "v1", 256 * 1024);
    let archive = dir.path().join("app.tar");
    clients::skopeo_copy(
        &oci_ref(&src, "v1"),
        &format!("docker-archive:{}:berth-src/app:v1", archive.display()),
        &[],
    );
    let docker = Dockerd::start();
    docker.docker(&["load", "-i", archive.to_str().unwrap()]);
    let name = format!("{}/library/app:v1", berth.addr);
    docker.docker(&["tag", "berth-src/app:v1", &name]);

    // Not logged in: the push is refused.
    let out = docker.try_docker(&["push", &name]);
    assert!(!out.success(), "anonymous push succeeded");
    // Wrong secret: docker login says unauthorized.
    let out = docker.try_docker(&["login", "-u", &keys.uploader.0, "-p", "wrong", &berth.addr]);
    assert!(
        !out.success() && is_unauthorized(&out.stderr_str()),
        "{}",
        out.stderr_str()
    );

    let out = docker.docker(&[
        "login",
        "-u",
        &keys.uploader.0,
        "-p",
        &keys.uploader.1,
        &berth.addr,
    ]);
    assert!(out.contains("Login Succeeded"), "{out}");
    let pushed = docker.docker(&["push", &name]);
    assert!(pushed.contains("digest: sha256:"), "{pushed}");
    docker.docker(&["rmi", &name, "berth-src/app:v1"]);

    // Pull and run as the viewer.
    docker.docker(&["logout", &berth.addr]);
    let out = docker.try_docker(&["pull", &name]);
    assert!(!out.success(), "anonymous pull succeeded");
    docker.docker(&[
        "login",
        "-u",
        &keys.viewer.0,
        "-p",
        &keys.viewer.1,
        &berth.addr,
    ]);
    docker.docker(&["pull", &name]);
    let id = docker.docker(&["image", "inspect", "-f", "{{.Id}}", &name]);
    assert_eq!(id.trim(), img.config.digest);
    let out = docker.docker(&["run", "--rm", "--network", "none", &name]);
    assert!(out.lines().any(|l| l.trim() == MARKER), "{out}");
    // The viewer's token has no push: docker reports the refusal.
    docker.docker(&["tag", &name, &format!("{}/library/app:v2", berth.addr)]);
    let out = docker.try_docker(&["push", &format!("{}/library/app:v2", berth.addr)]);
    assert!(!out.success(), "a viewer pushed");
}

#[test]
fn containerd_pulls_with_credentials() {
    let (dir, berth, keys) = start();
    let src = dir.path().join("src");
    let img = oci_layout::build_image(&src, "v1", 256 * 1024);
    let name = format!("{}/library/app:v1", berth.addr);
    clients::skopeo_copy(
        &oci_ref(&src, "v1"),
        &format!("docker://{name}"),
        &["--dest-creds", &creds(&keys.uploader)],
    );
    let ctd = Containerd::start();
    let pull = |user: Option<String>| {
        let mut args = vec![
            "images",
            "pull",
            "--plain-http",
            "--snapshotter",
            &ctd.snapshotter,
        ];
        let user_arg;
        if let Some(u) = user {
            user_arg = u;
            args.extend(["--user", user_arg.as_str()]);
        }
        args.push(&name);
        ctd.try_ctr(&args)
    };
    let out = pull(None);
    assert!(
        !out.success() && is_unauthorized(&out.stderr_str()),
        "{}",
        out.stderr_str()
    );
    let out = pull(Some(format!("{}:wrong", keys.viewer.0)));
    assert!(
        !out.success() && is_unauthorized(&out.stderr_str()),
        "{}",
        out.stderr_str()
    );
    let out = pull(Some(creds(&keys.viewer)));
    assert!(out.success(), "{}", out.stderr_str());
    let listed = ctd.ctr(&["images", "ls"]);
    assert!(listed.contains(&img.manifest.digest), "{listed}");
    let id = clients::unique_name("berth-auth");
    let out = ctd.ctr(&["run", "--rm", "--snapshotter", &ctd.snapshotter, &name, &id]);
    assert!(out.lines().any(|l| l.trim() == MARKER), "{out}");
}

/// An edge site: auth on, its Docker Hub cache registry open for anonymous pulls. A Docker
/// daemon with the edge as `registry-mirrors` gets a 401 on `/v2/`, fetches an anonymous token,
/// pulls and runs the image; nothing else on the edge is open.
#[test]
fn docker_mirror_pulls_anonymously_from_an_edge_with_auth_on() {
    let dir = tempfile::tempdir().unwrap();
    let origin_dir = dir.path().join("origin");
    std::fs::create_dir_all(&origin_dir).unwrap();
    let origin = BerthProcess::start_in(&origin_dir, REGISTRIES);
    let src = dir.path().join("src");
    let img = oci_layout::build_image(&src, "v1", 256 * 1024);
    clients::skopeo_copy(
        &oci_ref(&src, "v1"),
        &format!("docker://{}/library/app:v1", origin.addr),
        &[],
    );
    let edge_dir = dir.path().join("edge");
    std::fs::create_dir_all(&edge_dir).unwrap();
    let edge = BerthProcess::start_in(
        &edge_dir,
        &format!(
            "[[image_cache]]\nname = \"dh\"\nkind = \"dockerhub\"\nurl = \"{}\"\n\
             [[registry]]\nname = \"docker\"\ntype = \"cache\"\ncache = \"dh\"\nanonymous_pull = true\n\
             [[registry]]\nname = \"private\"\n\
             [mirror]\nregistry = \"docker\"\n[auth]\nmode = \"on\"\n",
            origin.url()
        ),
    );
    let docker = Dockerd::start_with(&[&format!("http://{}", edge.addr)], &["127.0.0.0/8"]);
    let pulled = docker.docker(&["pull", "app:v1"]);
    assert!(pulled.contains(&img.manifest.digest), "{pulled}");
    let out = docker.docker(&["run", "--rm", "--network", "none", "app:v1"]);
    assert!(out.lines().any(|l| l.trim() == MARKER), "{out}");
    // The edge's own registry stays closed to the same anonymous daemon.
    let out = docker.try_docker(&["pull", &format!("{}/private/app:v1", edge.addr)]);
    assert!(
        !out.success(),
        "anonymous pull from a closed registry succeeded"
    );
    let text = out.stderr_str().to_ascii_lowercase();
    assert!(
        text.contains("unauthorized") || text.contains("denied"),
        "{text}"
    );
}
