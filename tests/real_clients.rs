//! Real clients against a running berth: skopeo, the Docker daemon and containerd push, pull,
//! copy and delete images built on disk (no internet), and pulled images are run to prove
//! they are intact.
//!
//! The tools come from Debian (`skopeo docker.io containerd runc busybox-static`); a missing
//! tool fails the test. Each test has its own temp dir, berth process and daemons, so the
//! tests run in parallel.
//!
//! `BERTH_REAL_CLIENTS_PEER=distribution` runs the same tests against Debian's
//! `docker-registry` (CNCF distribution 2.8) instead of berth, to check the harness itself;
//! `BERTH_REAL_CLIENTS_PEER=berth-shared` against berth with its blobs in an S3 bucket
//! (`s3s-fs` on loopback) and its metadata in PostgreSQL, as the nodes of a hub run
//! (`scripts/test.sh` runs the suite both ways).

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::clients::{self, Containerd, DistributionRegistry, Dockerd};
use common::oci_layout::{self, sha256_digest, MARKER};
use common::process::BerthProcess;

/// berth config: the registry every image name here lives in.
const REGISTRIES: &str = "[[registry]]\nname = \"library\"\n";
/// Size of each of the two random layers of a test image.
const RANDOM_LAYER_SIZE: usize = 512 * 1024;

enum Server {
    Berth(BerthProcess),
    /// berth over a bucket and a database; the S3 server lives as long as berth.
    Shared {
        berth: BerthProcess,
        _bucket: berth::testbed::S3Server,
    },
    Distribution(DistributionRegistry),
}

/// A registry under test with its temp dir; fields drop in order: server first, then the dir.
struct Setup {
    server: Server,
    dir: tempfile::TempDir,
}

impl Setup {
    fn start() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let server = match std::env::var("BERTH_REAL_CLIENTS_PEER").as_deref() {
            Ok("distribution") => Server::Distribution(DistributionRegistry::start()),
            Ok("berth-shared") => {
                let rt = tokio::runtime::Runtime::new().unwrap();
                let (s3, url) = rt.block_on(async {
                    let s3 = berth::testbed::S3Server::start().await;
                    (s3, berth::testbed::postgres().database().await)
                });
                std::fs::create_dir_all(dir.path().join("berth")).unwrap();
                let shared = format!(
                    "{}[metadata]\nkind = \"postgres\"\nurl = {url:?}\n{REGISTRIES}",
                    s3.storage_toml("hub")
                );
                let berth = BerthProcess::start_in(&dir.path().join("berth"), &shared);
                Server::Shared { berth, _bucket: s3 }
            }
            Ok(other) if !other.is_empty() && other != "berth" => {
                panic!("BERTH_REAL_CLIENTS_PEER={other}: expected `berth`, `berth-shared` or `distribution`")
            }
            _ => {
                std::fs::create_dir_all(dir.path().join("berth")).unwrap();
                Server::Berth(BerthProcess::start_in(
                    &dir.path().join("berth"),
                    REGISTRIES,
                ))
            }
        };
        Setup { server, dir }
    }

    /// `127.0.0.1:PORT`.
    fn addr(&self) -> &str {
        match &self.server {
            Server::Berth(b) | Server::Shared { berth: b, .. } => &b.addr,
            Server::Distribution(d) => &d.addr,
        }
    }

    /// `docker://127.0.0.1:PORT/library/NAME_AND_REF`.
    fn docker_ref(&self, name_and_ref: &str) -> String {
        format!("docker://{}/library/{name_and_ref}", self.addr())
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }
}

fn oci_ref(layout: &Path, tag: &str) -> String {
    format!("oci:{}:{tag}", layout.display())
}

fn has_marker_line(out: &str) -> bool {
    out.lines().any(|l| l.trim() == MARKER)
}

#[test]
fn skopeo_copies_image_in_and_out_unchanged() {
    let s = Setup::start();
    let src = s.path("src-layout");
    let img = oci_layout::build_image(&src, "v1", RANDOM_LAYER_SIZE);
    assert_eq!(img.layers.len(), 3);

    clients::skopeo_copy(&oci_ref(&src, "v1"), &s.docker_ref("app:v1"), &[]);

    // The registry serves the very bytes that were pushed.
    let raw = clients::skopeo_inspect_raw(&s.docker_ref("app:v1"));
    assert_eq!(
        sha256_digest(&raw),
        img.manifest.digest,
        "manifest by tag changed: {}",
        String::from_utf8_lossy(&raw)
    );
    assert_eq!(raw, img.manifest_bytes);
    let raw = clients::skopeo_inspect_raw(&s.docker_ref(&format!("app@{}", img.manifest.digest)));
    assert_eq!(
        sha256_digest(&raw),
        img.manifest.digest,
        "manifest by digest"
    );
    let config = clients::skopeo(&[
        "inspect",
        "--tls-verify=false",
        "--config",
        "--raw",
        &s.docker_ref("app:v1"),
    ]);
    assert_eq!(
        sha256_digest(config.as_bytes()),
        img.config.digest,
        "config blob"
    );
    // The non-raw inspect parses the config and lists the layers in order.
    let inspect: serde_json::Value = serde_json::from_str(&clients::skopeo(&[
        "inspect",
        "--tls-verify=false",
        &s.docker_ref("app:v1"),
    ]))
    .unwrap();
    assert_eq!(inspect["Digest"], img.manifest.digest.as_str());
    let layers: Vec<&str> = inspect["Layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    let expected: Vec<&str> = img.layers.iter().map(|l| l.digest.as_str()).collect();
    assert_eq!(layers, expected);

    let tags = clients::skopeo_list_tags(&s.docker_ref("app"));
    assert_eq!(tags, vec!["v1".to_string()]);

    // Out again into a fresh layout: same manifest, every blob present and intact.
    let out = s.path("out-layout");
    clients::skopeo_copy(&s.docker_ref("app:v1"), &oci_ref(&out, "v1"), &[]);
    assert_eq!(oci_layout::tagged(&out, "v1").digest, img.manifest.digest);
    assert_eq!(oci_layout::verified_blob_digests(&out), img.all_digests());
    assert_eq!(
        oci_layout::read_blob(&out, &img.manifest.digest),
        img.manifest_bytes
    );

    // Registry to registry, another repository: skopeo mounts the blobs from `app`.
    clients::skopeo_copy(&s.docker_ref("app:v1"), &s.docker_ref("app-copy:v2"), &[]);
    let raw = clients::skopeo_inspect_raw(&s.docker_ref("app-copy:v2"));
    assert_eq!(
        sha256_digest(&raw),
        img.manifest.digest,
        "manifest copied across repositories"
    );
    assert_eq!(
        clients::skopeo_list_tags(&s.docker_ref("app-copy")),
        vec!["v2".to_string()]
    );
    let out2 = s.path("out-layout-2");
    clients::skopeo_copy(&s.docker_ref("app-copy:v2"), &oci_ref(&out2, "v2"), &[]);
    assert_eq!(oci_layout::verified_blob_digests(&out2), img.all_digests());
}

#[test]
fn skopeo_copies_multiarch_index_with_all() {
    let s = Setup::start();
    let src = s.path("src-layout");
    let idx = oci_layout::build_multiarch_index(&src, "multi", RANDOM_LAYER_SIZE);
    assert_eq!(idx.images.len(), 2);

    clients::skopeo_copy(
        &oci_ref(&src, "multi"),
        &s.docker_ref("multi:v1"),
        &["--all"],
    );

    let raw = clients::skopeo_inspect_raw(&s.docker_ref("multi:v1"));
    assert_eq!(
        sha256_digest(&raw),
        idx.index.digest,
        "index by tag: {}",
        String::from_utf8_lossy(&raw)
    );
    assert_eq!(raw, idx.index_bytes);
    for img in &idx.images {
        let raw =
            clients::skopeo_inspect_raw(&s.docker_ref(&format!("multi@{}", img.manifest.digest)));
        assert_eq!(
            sha256_digest(&raw),
            img.manifest.digest,
            "{} manifest",
            img.architecture
        );
    }
    assert_eq!(
        clients::skopeo_list_tags(&s.docker_ref("multi")),
        vec!["v1".to_string()]
    );

    // `--all` out: the whole index, every platform's blobs.
    let out = s.path("out-all");
    clients::skopeo_copy(&s.docker_ref("multi:v1"), &oci_ref(&out, "v1"), &["--all"]);
    assert_eq!(oci_layout::tagged(&out, "v1").digest, idx.index.digest);
    assert_eq!(oci_layout::verified_blob_digests(&out), idx.all_digests());

    // Without `--all`: skopeo resolves the index to the host platform's manifest.
    let host = idx.image(oci_layout::host_architecture());
    let out = s.path("out-host");
    clients::skopeo_copy(&s.docker_ref("multi:v1"), &oci_ref(&out, "v1"), &[]);
    assert_eq!(oci_layout::tagged(&out, "v1").digest, host.manifest.digest);
    assert_eq!(oci_layout::verified_blob_digests(&out), host.all_digests());

    // The arm64 image on its own, by digest.
    let arm = idx.image("arm64");
    let out = s.path("out-arm64");
    clients::skopeo_copy(
        &s.docker_ref(&format!("multi@{}", arm.manifest.digest)),
        &oci_ref(&out, "arm"),
        &[],
    );
    assert_eq!(oci_layout::tagged(&out, "arm").digest, arm.manifest.digest);
    assert_eq!(oci_layout::verified_blob_digests(&out), arm.all_digests());
}

#[test]
fn skopeo_deletes_manifest_by_digest() {
    let s = Setup::start();
    let src = s.path("src-layout");
    let img = oci_layout::build_image(&src, "v1", 64 * 1024);
    clients::skopeo_copy(&oci_ref(&src, "v1"), &s.docker_ref("app:v1"), &[]);
    let by_digest = s.docker_ref(&format!("app@{}", img.manifest.digest));
    assert_eq!(
        sha256_digest(&clients::skopeo_inspect_raw(&by_digest)),
        img.manifest.digest
    );

    clients::skopeo_delete(&by_digest);

    let err = clients::try_skopeo_inspect(&by_digest, &["--raw"]).expect_failure();
    assert!(
        err.contains("manifest unknown") || err.contains("not found") || err.contains("404"),
        "unexpected error inspecting a deleted manifest: {err}"
    );
    // The tag pointed at the deleted manifest: it must not resolve to it any more.
    let by_tag = clients::try_skopeo_inspect(&s.docker_ref("app:v1"), &["--raw"]);
    assert!(
        !by_tag.success() || sha256_digest(&by_tag.stdout) != img.manifest.digest,
        "tag v1 still serves the deleted manifest"
    );
    // Deleting again fails: the manifest is gone.
    let again = clients::try_skopeo(&["delete", "--tls-verify=false", &by_digest]);
    assert!(!again.success(), "second delete of {by_digest} succeeded");
}

#[test]
fn docker_pushes_pulls_and_runs() {
    let s = Setup::start();
    let src = s.path("src-layout");
    let img = oci_layout::build_image(&src, "v1", RANDOM_LAYER_SIZE);
    let archive = s.path("app.tar");
    clients::skopeo_copy(
        &oci_ref(&src, "v1"),
        &format!("docker-archive:{}:berth-src/app:v1", archive.display()),
        &[],
    );

    let docker = Dockerd::start_with(&[], &["127.0.0.0/8"]);
    let loaded = docker.docker(&["load", "-i", archive.to_str().unwrap()]);
    assert!(loaded.contains("berth-src/app:v1"), "docker load: {loaded}");
    let image_id = docker
        .docker(&["image", "inspect", "-f", "{{.Id}}", "berth-src/app:v1"])
        .trim()
        .to_string();
    assert_eq!(
        image_id, img.config.digest,
        "docker's image id is the config digest"
    );

    let name = format!("{}/library/app:v1", s.addr());
    docker.docker(&["tag", "berth-src/app:v1", &name]);
    let pushed = docker.docker(&["push", &name]);
    let pushed_digest = pushed
        .split_whitespace()
        .skip_while(|w| *w != "digest:")
        .nth(1)
        .unwrap_or_else(|| panic!("no digest in docker push output:\n{pushed}"))
        .to_string();
    // What berth serves under the tag is what docker pushed (a Docker schema 2 manifest).
    let raw = clients::skopeo_inspect_raw(&format!("docker://{name}"));
    assert_eq!(
        sha256_digest(&raw),
        pushed_digest,
        "pushed manifest: {}",
        String::from_utf8_lossy(&raw)
    );
    let manifest: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    assert_eq!(manifest["config"]["digest"], img.config.digest.as_str());

    docker.docker(&["rmi", &name, "berth-src/app:v1"]);
    let gone = docker.try_docker(&["image", "inspect", &image_id]);
    assert!(!gone.success(), "image {image_id} still present after rmi");

    let pulled = docker.docker(&["pull", &name]);
    assert!(
        pulled.contains(&pushed_digest),
        "docker pull digest differs from push ({pushed_digest}):\n{pulled}"
    );
    let pulled_id = docker
        .docker(&["image", "inspect", "-f", "{{.Id}}", &name])
        .trim()
        .to_string();
    assert_eq!(pulled_id, img.config.digest);
    let layers = docker.docker(&["image", "inspect", "-f", "{{json .RootFS.Layers}}", &name]);
    let layers: Vec<String> = serde_json::from_str(layers.trim()).unwrap();
    assert_eq!(layers, img.diff_ids, "docker's diff ids after pull");

    let out = docker.docker(&["run", "--rm", "--network", "none", &name]);
    assert!(
        has_marker_line(&out),
        "docker run printed {out:?}, expected a line {MARKER:?}"
    );
}

#[test]
fn containerd_pushes_pulls_and_runs() {
    let s = Setup::start();
    let src = s.path("src-layout");
    let img = oci_layout::build_image(&src, "v1", RANDOM_LAYER_SIZE);
    let tar = s.path("layout.tar");
    oci_layout::layout_to_tar(&src, &tar);

    let ctd = Containerd::start();
    eprintln!("containerd snapshotter: {}", ctd.snapshotter);
    let base = format!("{}/library/app", s.addr());
    let name = format!("{base}:v1");
    ctd.ctr(&[
        "images",
        "import",
        "--base-name",
        &base,
        "--no-unpack",
        tar.to_str().unwrap(),
    ]);
    let listed = ctd.ctr(&["images", "ls", "-q"]);
    assert!(
        listed.lines().any(|l| l.trim() == name),
        "import did not create {name}:\n{listed}"
    );

    ctd.ctr(&["images", "push", "--plain-http", &name]);
    let raw = clients::skopeo_inspect_raw(&format!("docker://{name}"));
    assert_eq!(
        sha256_digest(&raw),
        img.manifest.digest,
        "pushed manifest: {}",
        String::from_utf8_lossy(&raw)
    );

    // Remove the image and let GC drop its content, so the pull must fetch everything.
    ctd.ctr(&["images", "rm", "--sync", &name]);
    let content: BTreeSet<String> = ctd
        .ctr(&["content", "ls", "-q"])
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    let leftover: Vec<String> = img
        .all_digests()
        .into_iter()
        .filter(|d| content.contains(d))
        .collect();
    assert!(
        leftover.is_empty(),
        "content left after rm --sync: {leftover:?}"
    );

    ctd.ctr(&[
        "images",
        "pull",
        "--plain-http",
        "--snapshotter",
        &ctd.snapshotter,
        &name,
    ]);
    let listed = ctd.ctr(&["images", "ls"]);
    let line = listed
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name.as_str()))
        .unwrap_or_else(|| panic!("{name} not listed after pull:\n{listed}"));
    assert!(
        line.contains(&img.manifest.digest),
        "pulled image digest differs: {line}"
    );

    let id = clients::unique_name("berth-ctr");
    let out = ctd.ctr(&["run", "--rm", "--snapshotter", &ctd.snapshotter, &name, &id]);
    assert!(
        has_marker_line(&out),
        "ctr run printed {out:?}, expected a line {MARKER:?}"
    );
}

// Beyond push/pull by name: berth as the Docker Hub mirror of each daemon (TESTING.md, "What
// the daemons send to a mirror"). `docker.io/library/NAME` maps to berth's `library` registry.

#[test]
fn docker_pulls_through_berth_as_registry_mirror() {
    let s = Setup::start();
    let src = s.path("src-layout");
    let img = oci_layout::build_image(&src, "v1", RANDOM_LAYER_SIZE);
    clients::skopeo_copy(&oci_ref(&src, "v1"), &s.docker_ref("mirrored:v1"), &[]);

    let mirror = format!("http://{}", s.addr());
    let docker = Dockerd::start_with(&[&mirror], &["127.0.0.0/8"]);
    // A Docker Hub name: served by the mirror or not at all (Hub is behind 127.0.0.1:9).
    let pulled = docker.docker(&["pull", "mirrored:v1"]);
    assert!(
        pulled.contains(&img.manifest.digest),
        "docker pull via mirror: digest differs from {}:\n{pulled}",
        img.manifest.digest
    );
    let id = docker
        .docker(&["image", "inspect", "-f", "{{.Id}}", "mirrored:v1"])
        .trim()
        .to_string();
    assert_eq!(id, img.config.digest);
    let out = docker.docker(&["run", "--rm", "--network", "none", "mirrored:v1"]);
    assert!(
        has_marker_line(&out),
        "docker run printed {out:?}, expected a line {MARKER:?}"
    );
}

#[test]
fn containerd_pulls_through_berth_as_registry_mirror() {
    let s = Setup::start();
    let src = s.path("src-layout");
    let img = oci_layout::build_image(&src, "v1", RANDOM_LAYER_SIZE);
    clients::skopeo_copy(&oci_ref(&src, "v1"), &s.docker_ref("mirrored:v1"), &[]);

    let hosts = s.path("hosts.d");
    std::fs::create_dir_all(hosts.join("docker.io")).unwrap();
    std::fs::write(
        hosts.join("docker.io").join("hosts.toml"),
        format!(
            "server = \"https://registry-1.docker.io\"\n\n[host.\"http://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            s.addr()
        ),
    )
    .unwrap();

    let ctd = Containerd::start();
    let name = "docker.io/library/mirrored:v1";
    ctd.ctr(&[
        "images",
        "pull",
        "--hosts-dir",
        hosts.to_str().unwrap(),
        "--plain-http",
        "--snapshotter",
        &ctd.snapshotter,
        name,
    ]);
    let listed = ctd.ctr(&["images", "ls"]);
    let line = listed
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .unwrap_or_else(|| panic!("{name} not listed after pull:\n{listed}"));
    assert!(
        line.contains(&img.manifest.digest),
        "pulled image digest differs: {line}"
    );
    let id = clients::unique_name("berth-mirror");
    let out = ctd.ctr(&["run", "--rm", "--snapshotter", &ctd.snapshotter, name, &id]);
    assert!(
        has_marker_line(&out),
        "ctr run printed {out:?}, expected a line {MARKER:?}"
    );
}

/// Cleanup of a registry skopeo filled (issue 12): three images, a multi-arch index, a
/// cosign-style signature (`sha256-HEX.sig`) of the newest image and an OCI referrer of the
/// middle one. A policy keeps the two most recently pushed: the dry run names exactly what the
/// real run deletes (the two oldest images and the referrer that belongs to one of them); the
/// kept image and index copy out byte-identical with skopeo, the signature stays with its
/// subject, the deleted answer 404.
#[test]
fn cleanup_of_a_registry_skopeo_filled() {
    use common::process::berth_bin;
    use common::registry::Client;
    use common::server::OCI_MANIFEST;

    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("berth")).unwrap();
    let berth = BerthProcess::start_in(&dir.path().join("berth"), REGISTRIES);
    let target = |name_and_ref: &str| format!("docker://{}/library/{name_and_ref}", berth.addr);
    let mut images = Vec::new();
    for tag in ["1", "2", "3"] {
        let layout = dir.path().join(format!("src-{tag}"));
        images.push(oci_layout::build_image(&layout, tag, 64 * 1024));
        clients::skopeo_copy(&oci_ref(&layout, tag), &target(&format!("app:{tag}")), &[]);
        // Push times order the images.
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let layout = dir.path().join("src-multi");
    let index = oci_layout::build_multiarch_index(&layout, "multi", 64 * 1024);
    clients::skopeo_copy(&oci_ref(&layout, "multi"), &target("app:multi"), &["--all"]);

    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = Client::new(&berth.url(), None);
    let subject = |img: &oci_layout::BuiltImage| serde_json::json!({"mediaType": OCI_MANIFEST, "digest": img.manifest.digest, "size": img.manifest.size});
    let (signature_tag, referrer) = rt.block_on(async {
        let config = client.blob("library/app", b"{}").await;
        let payload = br#"{"critical":{"image":{"docker-manifest-digest":"x"}}}"#;
        let layer = client.blob("library/app", payload).await;
        let signature = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": 2},
            "layers": [{"mediaType": "application/vnd.dev.cosign.simplesigning.v1+json", "digest": layer, "size": payload.len()}],
        }))
        .unwrap();
        let tag = format!("{}.sig", images[2].manifest.digest.replace(':', "-"));
        client.manifest("library/app", &tag, OCI_MANIFEST, &signature).await;
        let sbom = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "artifactType": "application/vnd.example.sbom",
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": config, "size": 2},
            "layers": [{"mediaType": "application/vnd.example.sbom", "digest": layer, "size": payload.len()}],
            "subject": subject(&images[1]),
        }))
        .unwrap();
        let d = sha256_digest(&sbom);
        client.manifest("library/app", &d, OCI_MANIFEST, &sbom).await;
        (tag, d)
    });

    let berth_cli = |args: &[&str]| {
        let out = std::process::Command::new(berth_bin())
            .args(["--server", &berth.url()])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "berth {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    berth_cli(&[
        "cleanup",
        "add",
        "library",
        "--images",
        "app",
        "--rule",
        "latest-pushed",
        "--n",
        "2",
    ]);
    let history = |json: &str| {
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        assert_eq!(v["execution"]["status"], "succeeded", "{v}");
        let mut rows: Vec<(String, String)> = v["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["artifact"].as_str().unwrap().to_string(),
                    r["action"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        rows.sort();
        rows
    };
    let expect = |action: &str| {
        let mut rows: Vec<(String, String)> = [
            &images[0].manifest.digest,
            &images[1].manifest.digest,
            &referrer,
        ]
        .iter()
        .map(|d| (format!("library/app@{d}"), action.to_string()))
        .collect();
        rows.sort();
        rows
    };
    let dry = history(&berth_cli(&[
        "cleanup",
        "run",
        "library",
        "--dry-run",
        "--json",
    ]));
    assert_eq!(dry, expect("would_delete"));
    let real = history(&berth_cli(&["cleanup", "run", "library", "--json"]));
    assert_eq!(real, expect("deleted"));

    let out = dir.path().join("out-3");
    clients::skopeo_copy(&target("app:3"), &oci_ref(&out, "3"), &[]);
    assert_eq!(
        oci_layout::tagged(&out, "3").digest,
        images[2].manifest.digest
    );
    assert_eq!(
        oci_layout::verified_blob_digests(&out),
        images[2].all_digests()
    );
    let out = dir.path().join("out-multi");
    clients::skopeo_copy(&target("app:multi"), &oci_ref(&out, "multi"), &["--all"]);
    assert_eq!(oci_layout::tagged(&out, "multi").digest, index.index.digest);
    assert_eq!(oci_layout::verified_blob_digests(&out), index.all_digests());
    rt.block_on(async {
        assert!(
            client
                .pull_manifest("library/app", &signature_tag)
                .await
                .is_some(),
            "the signature stays with its subject"
        );
        for d in [
            &images[0].manifest.digest,
            &images[1].manifest.digest,
            &referrer,
        ] {
            assert!(
                client.pull_manifest("library/app", d).await.is_none(),
                "{d} was deleted"
            );
        }
        for tag in ["1", "2"] {
            assert!(
                client.pull_manifest("library/app", tag).await.is_none(),
                "tag {tag} went with it"
            );
        }
    });
    assert_eq!(
        clients::skopeo_list_tags(&target("app"))
            .into_iter()
            .collect::<BTreeSet<_>>(),
        ["3".to_string(), "multi".to_string(), signature_tag]
            .into_iter()
            .collect()
    );
}
