//! Real clients pulling through berth's pull-through cache (an "edge" berth whose cache
//! registries front real upstreams on loopback: berth in origin mode and Debian's
//! `docker-registry`):
//!
//! * skopeo addresses the cache as `EDGE/CACHEREG/UPSTREAM-PATH:TAG`, gets the original bytes,
//!   keeps getting them after the upstream is gone, and is refused when it pushes;
//! * containerd uses the edge as a `hosts.toml` mirror (`?ns=HOST`) for two source hosts at
//!   once, and a second, fresh containerd pulls both again after the upstreams are stopped
//!   (which fails if the first pull bypassed the edge);
//! * the Docker daemon uses the edge as its `registry-mirrors` entry (mirror mode, unprefixed
//!   Docker Hub names), including a multi-arch index; Docker Hub itself is behind the closed
//!   proxy port, so a pull that succeeds was served by the edge.
//!
//! Tools come from Debian (`skopeo docker.io containerd runc busybox-static docker-registry`);
//! a missing tool fails the test. Each test has its own temp dirs, berths and daemons.

mod common;

use std::path::Path;

use common::clients::{self, Containerd, DistributionRegistry, Dockerd};
use common::metrics::metric_value;
use common::oci_layout::{self, sha256_digest, MARKER};
use common::process::BerthProcess;

/// Size of each of the two random layers of a test image.
const RANDOM_LAYER_SIZE: usize = 256 * 1024;

/// An upstream berth in origin mode: registry `library` holds `library/NAME` images.
fn start_origin(dir: &Path) -> BerthProcess {
    let d = dir.join("origin");
    std::fs::create_dir_all(&d).unwrap();
    BerthProcess::start_in(&d, "[[registry]]\nname = \"library\"\n")
}

/// An edge berth in `dir/edge` with `config` (image caches, cache registries, mirror).
fn start_edge(dir: &Path, config: &str) -> BerthProcess {
    let d = dir.join("edge");
    std::fs::create_dir_all(&d).unwrap();
    BerthProcess::start_in(&d, config)
}

/// Config of one image cache plus the cache registry `registry` that serves it.
fn cache_registry(cache: &str, kind: &str, url: &str, registry: &str) -> String {
    format!(
        "[[image_cache]]\nname = \"{cache}\"\nkind = \"{kind}\"\nurl = \"{url}\"\n\
         [[registry]]\nname = \"{registry}\"\ntype = \"cache\"\ncache = \"{cache}\"\n"
    )
}

fn oci_ref(layout: &Path, tag: &str) -> String {
    format!("oci:{}:{tag}", layout.display())
}

fn has_marker_line(out: &str) -> bool {
    out.lines().any(|l| l.trim() == MARKER)
}

/// `GET http://ADDR/PATH` → (status, body), on loopback without any proxy.
fn http_get(addr: &str, path: &str) -> (u16, String) {
    let (status, _, body) = http_get_with_headers(addr, path);
    (status, body)
}

/// `GET http://ADDR/PATH` → (status, headers, body).
fn http_get_with_headers(addr: &str, path: &str) -> (u16, reqwest::header::HeaderMap, String) {
    let url = format!("http://{addr}{path}");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(std::time::Duration::from_secs(30))
            .build()
            .unwrap();
        let r = client
            .get(&url)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        (status, headers, r.text().await.unwrap_or_default())
    })
}

/// The tags `GET /v2/REPO/tags/list` on `addr` returns (panics on anything but 200).
#[track_caller]
fn tags_list(addr: &str, repo: &str) -> Vec<String> {
    let path = format!("/v2/{repo}/tags/list");
    let (status, body) = http_get(addr, &path);
    assert_eq!(status, 200, "GET {path} on {addr}: {body}");
    let v: serde_json::Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"));
    v["tags"]
        .as_array()
        .unwrap_or_else(|| panic!("GET {path}: no tags array: {body}"))
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect()
}

/// The sum of the edge's `berth_cache_requests_total` for `registry` (every outcome).
fn cache_requests(addr: &str, registry: &str) -> f64 {
    let (status, body) = http_get(addr, "/metrics");
    assert_eq!(status, 200, "GET /metrics: {body}");
    metric_value(
        &body,
        "berth_cache_requests_total",
        &[("registry", registry)],
    )
}

// ---------------------------------------------------------------------------------------------
// 1. skopeo through the cache
// ---------------------------------------------------------------------------------------------

#[test]
fn skopeo_pulls_through_cache_and_keeps_serving_without_upstream() {
    let tmp = tempfile::tempdir().unwrap();
    let mut origin = start_origin(tmp.path());
    let src = tmp.path().join("src-layout");
    let img = oci_layout::build_image(&src, "v1", RANDOM_LAYER_SIZE);
    clients::skopeo_copy(
        &oci_ref(&src, "v1"),
        &format!("docker://{}/library/app:v1", origin.addr),
        &[],
    );
    let edge = start_edge(
        tmp.path(),
        &cache_registry("up", "registry", &origin.url(), "hub"),
    );
    let cached = |name_and_ref: &str| format!("docker://{}/hub/{name_and_ref}", edge.addr);

    // Before any pull the cache holds no tag for the image.
    let (status, body) = http_get(&edge.addr, "/v2/hub/library/app/tags/list");
    assert!(
        status == 404 || (status == 200 && !body.contains("\"v1\"")),
        "tags before the first pull: {status} {body}"
    );

    // Cold pull through the edge: the original manifest and every blob, byte for byte.
    let out = tmp.path().join("out-1");
    clients::skopeo_copy(&cached("library/app:v1"), &oci_ref(&out, "v1"), &[]);
    assert_eq!(oci_layout::tagged(&out, "v1").digest, img.manifest.digest);
    assert_eq!(
        oci_layout::read_blob(&out, &img.manifest.digest),
        img.manifest_bytes
    );
    assert_eq!(oci_layout::verified_blob_digests(&out), img.all_digests());
    let raw = clients::skopeo_inspect_raw(&cached("library/app:v1"));
    assert_eq!(raw, img.manifest_bytes, "manifest served by the edge");

    // The tag was recorded in the cache registry when the manifest was served.
    assert_eq!(
        clients::skopeo_list_tags(&cached("library/app")),
        vec!["v1".to_string()]
    );

    // Pushing into a cache registry is refused (403 DENIED), whatever step skopeo reaches:
    // the image it holds already (its blobs are cached: skopeo goes straight to the manifest
    // PUT) and a new image (blobs unknown: skopeo starts uploads).
    let fresh = oci_layout::build_image(&src, "fresh", 4 * 1024);
    for (tag, target) in [("v1", "library/pushed:v1"), ("fresh", "library/fresh:v1")] {
        let err = clients::try_skopeo(&[
            "copy",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
            &oci_ref(&src, tag),
            &cached(target),
        ])
        .expect_failure();
        eprintln!("push of {tag} into the cache registry: {}", err.trim());
        let lower = err.to_lowercase();
        assert!(
            lower.contains("denied") || lower.contains("forbidden") || lower.contains("403"),
            "push into the cache registry failed, but not with DENIED/forbidden:\n{err}"
        );
        let repo = target.split(':').next().unwrap();
        let (status, body) = http_get(&edge.addr, &format!("/v2/hub/{repo}/tags/list"));
        assert!(
            status == 404 || !body.contains("\"v1\""),
            "refused push left a tag in hub/{repo}: {status} {body}"
        );
    }
    let (status, _) = http_get(
        &edge.addr,
        &format!("/v2/hub/library/fresh/manifests/{}", fresh.manifest.digest),
    );
    assert_eq!(status, 404, "a refused push stored its manifest");

    // The upstream goes away: the edge serves the cached image (stale tag, immutable blobs).
    assert!(origin.terminate(), "origin berth did not stop cleanly");
    let out = tmp.path().join("out-2");
    clients::skopeo_copy(&cached("library/app:v1"), &oci_ref(&out, "v1"), &[]);
    assert_eq!(oci_layout::tagged(&out, "v1").digest, img.manifest.digest);
    assert_eq!(oci_layout::verified_blob_digests(&out), img.all_digests());
    let out = tmp.path().join("out-3");
    clients::skopeo_copy(
        &cached(&format!("library/app@{}", img.manifest.digest)),
        &oci_ref(&out, "d"),
        &[],
    );
    assert_eq!(oci_layout::verified_blob_digests(&out), img.all_digests());
    assert_eq!(
        clients::skopeo_list_tags(&cached("library/app")),
        vec!["v1".to_string()]
    );
}

// ---------------------------------------------------------------------------------------------
// 2. containerd: hosts.toml mirror with `ns` for two source hosts
// ---------------------------------------------------------------------------------------------

/// `ctr images pull` through the hosts dir; returns the digest `ctr images ls` shows.
fn ctr_pull(ctd: &Containerd, hosts: &Path, name: &str) -> String {
    ctd.ctr(&[
        "images",
        "pull",
        "--hosts-dir",
        hosts.to_str().unwrap(),
        // Not needed for the `http://` mirror host (hosts.toml names its scheme); kept as
        // TESTING.md documents the command.
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
    line.split_whitespace()
        .find(|w| w.starts_with("sha256:"))
        .unwrap_or_else(|| panic!("no digest in `ctr images ls` line: {line}"))
        .to_string()
}

fn ctr_run(ctd: &Containerd, name: &str) {
    let id = clients::unique_name("berth-cache");
    let out = ctd.ctr(&["run", "--rm", "--snapshotter", &ctd.snapshotter, name, &id]);
    assert!(
        has_marker_line(&out),
        "ctr run {name} printed {out:?}, expected a line {MARKER:?}"
    );
}

/// Writes `HOSTS/<dir>/hosts.toml` with `server` and the edge as a pull/resolve mirror.
fn write_hosts_toml(hosts: &Path, dir: &str, server: &str, edge: &str) {
    let d = hosts.join(dir);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(
        d.join("hosts.toml"),
        format!(
            "server = \"{server}\"\n\n[host.\"http://{edge}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
        ),
    )
    .unwrap();
}

#[test]
fn containerd_pulls_two_source_hosts_through_the_edge_with_ns() {
    let tmp = tempfile::tempdir().unwrap();
    // Source A, "docker.io": a berth origin holding library/app:v1.
    let mut origin = start_origin(tmp.path());
    let src_a = tmp.path().join("src-a");
    let img_a = oci_layout::build_image(&src_a, "v1", RANDOM_LAYER_SIZE);
    clients::skopeo_copy(
        &oci_ref(&src_a, "v1"),
        &format!("docker://{}/library/app:v1", origin.addr),
        &[],
    );
    // Source B, "127.0.0.1:BPORT": Debian's docker-registry holding library/other:v1.
    let mut dreg = Some(DistributionRegistry::start());
    let b_addr = dreg.as_ref().unwrap().addr.clone();
    let src_b = tmp.path().join("src-b");
    let img_b = oci_layout::build_image(&src_b, "v1", RANDOM_LAYER_SIZE);
    clients::skopeo_copy(
        &oci_ref(&src_b, "v1"),
        &format!("docker://{b_addr}/library/other:v1"),
        &[],
    );
    assert_ne!(img_a.manifest.digest, img_b.manifest.digest);

    let edge = start_edge(
        tmp.path(),
        &format!(
            "{}{}",
            cache_registry("dh", "dockerhub", &origin.url(), "docker"),
            cache_registry("bc", "registry", &format!("http://{b_addr}"), "b"),
        ),
    );

    let hosts = tmp.path().join("hosts.d");
    write_hosts_toml(
        &hosts,
        "docker.io",
        "https://registry-1.docker.io",
        &edge.addr,
    );
    write_hosts_toml(&hosts, &b_addr, &format!("http://{b_addr}"), &edge.addr);

    let name_a = "docker.io/library/app:v1";
    let name_b = format!("{b_addr}/library/other:v1");

    let before: Vec<f64> = ["docker", "b"]
        .iter()
        .map(|r| cache_requests(&edge.addr, r))
        .collect();
    let ctd = Containerd::start();
    eprintln!("containerd snapshotter: {}", ctd.snapshotter);
    assert_eq!(ctr_pull(&ctd, &hosts, name_a), img_a.manifest.digest);
    assert_eq!(ctr_pull(&ctd, &hosts, &name_b), img_b.manifest.digest);
    ctr_run(&ctd, name_a);
    ctr_run(&ctd, &name_b);

    // Both went through the edge: each tag is recorded in its own cache registry, and each
    // registry counted cache requests.
    assert_eq!(
        tags_list(&edge.addr, "docker/library/app"),
        vec!["v1".to_string()]
    );
    assert_eq!(
        tags_list(&edge.addr, "b/library/other"),
        vec!["v1".to_string()]
    );
    // Each pull went through its own registry: at least the manifest, the config and the two
    // layers of its image are counted there.
    for (registry, before) in ["docker", "b"].into_iter().zip(before) {
        let counted = cache_requests(&edge.addr, registry) - before;
        assert!(
            counted >= 4.0,
            "edge counted {counted} cache requests for registry {registry}"
        );
    }
    // The edge echoes the namespace (OCI "Registry Proxying").
    let (status, headers, body) = http_get_with_headers(
        &edge.addr,
        &format!("/v2/library/other/manifests/v1?ns={b_addr}"),
    );
    assert_eq!(status, 200, "GET manifest with ns={b_addr}: {body}");
    assert_eq!(
        headers.get("oci-namespace").and_then(|v| v.to_str().ok()),
        Some(b_addr.as_str()),
        "OCI-Namespace of a manifest GET with ns={b_addr}"
    );

    // Both upstreams stop; a fresh containerd (empty content store) pulls both again. Had the
    // first pulls fetched anything from source B directly, the edge would lack it now.
    assert!(origin.terminate(), "origin berth did not stop cleanly");
    drop(dreg.take());
    drop(ctd);
    let ctd2 = Containerd::start();
    assert_eq!(ctr_pull(&ctd2, &hosts, name_a), img_a.manifest.digest);
    assert_eq!(ctr_pull(&ctd2, &hosts, &name_b), img_b.manifest.digest);
    ctr_run(&ctd2, name_a);
    ctr_run(&ctd2, &name_b);
}

// ---------------------------------------------------------------------------------------------
// 3. dockerd: registry-mirrors → edge in Docker mirror mode, single and multi-arch
// ---------------------------------------------------------------------------------------------

#[test]
fn docker_pulls_single_and_multiarch_through_edge_mirror_mode() {
    let tmp = tempfile::tempdir().unwrap();
    let origin = start_origin(tmp.path());
    let src = tmp.path().join("src-layout");
    let img = oci_layout::build_image(&src, "v1", RANDOM_LAYER_SIZE);
    let idx = oci_layout::build_multiarch_index(&src, "multi", RANDOM_LAYER_SIZE);
    clients::skopeo_copy(
        &oci_ref(&src, "v1"),
        &format!("docker://{}/library/app:v1", origin.addr),
        &[],
    );
    clients::skopeo_copy(
        &oci_ref(&src, "multi"),
        &format!("docker://{}/library/multi:v2", origin.addr),
        &["--all"],
    );

    let edge = start_edge(
        tmp.path(),
        &format!(
            "{}[mirror]\nregistry = \"docker\"\n",
            cache_registry("dh", "dockerhub", &origin.url(), "docker")
        ),
    );
    let mirror = format!("http://{}", edge.addr);
    let docker = Dockerd::start_with(&[&mirror], &["127.0.0.0/8"]);
    let counted_before = cache_requests(&edge.addr, "docker");

    // Single-platform image, as a Docker Hub official name.
    let pulled = docker.docker(&["pull", "app:v1"]);
    assert!(
        pulled.contains(&img.manifest.digest),
        "docker pull app:v1 via the edge: digest differs from {}:\n{pulled}",
        img.manifest.digest
    );
    let id = docker
        .docker(&["image", "inspect", "-f", "{{.Id}}", "app:v1"])
        .trim()
        .to_string();
    assert_eq!(id, img.config.digest);
    let out = docker.docker(&["run", "--rm", "--network", "none", "app:v1"]);
    assert!(
        has_marker_line(&out),
        "docker run app:v1 printed {out:?}, expected a line {MARKER:?}"
    );

    // Multi-arch index: dockerd resolves it to its platform's manifest.
    let host = idx.image(oci_layout::host_architecture());
    let pulled = docker.docker(&["pull", "multi:v2"]);
    assert!(
        pulled.contains(&idx.index.digest),
        "docker pull multi:v2 via the edge: digest differs from the index {}:\n{pulled}",
        idx.index.digest
    );
    let id = docker
        .docker(&["image", "inspect", "-f", "{{.Id}}", "multi:v2"])
        .trim()
        .to_string();
    assert_eq!(
        id, host.config.digest,
        "dockerd picked another platform than {}",
        host.architecture
    );
    let layers = docker.docker(&[
        "image",
        "inspect",
        "-f",
        "{{json .RootFS.Layers}}",
        "multi:v2",
    ]);
    let layers: Vec<String> = serde_json::from_str(layers.trim()).unwrap();
    assert_eq!(layers, host.diff_ids);
    let out = docker.docker(&["run", "--rm", "--network", "none", "multi:v2"]);
    assert!(
        has_marker_line(&out),
        "docker run multi:v2 printed {out:?}, expected a line {MARKER:?}"
    );

    // The edge recorded both tags in its cache registry `docker`.
    let cached = |repo: &str| format!("docker://{}/docker/{repo}", edge.addr);
    assert_eq!(
        clients::skopeo_list_tags(&cached("library/app")),
        vec!["v1".to_string()]
    );
    assert_eq!(
        clients::skopeo_list_tags(&cached("library/multi")),
        vec!["v2".to_string()]
    );
    // And holds the index and the platform manifest it served, byte for byte.
    assert_eq!(
        clients::skopeo_inspect_raw(&cached(&format!("library/multi@{}", idx.index.digest))),
        idx.index_bytes
    );
    assert_eq!(
        sha256_digest(&clients::skopeo_inspect_raw(&cached(&format!(
            "library/multi@{}",
            host.manifest.digest
        )))),
        host.manifest.digest
    );
    // Both pulls were counted in `docker`: at least the manifest, the config and the two layers
    // of each image.
    let counted = cache_requests(&edge.addr, "docker") - counted_before;
    assert!(
        counted >= 8.0,
        "{counted} cache requests counted for `docker`"
    );
    drop(origin);
}
