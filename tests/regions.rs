//! Two berth regions on separate hosts: each runs in a network namespace of its own, joined by a
//! veth pair (the link between the regions, which the test cuts), and each reachable from the
//! test on a management link of its own. Real clients on both ends: skopeo pushes into region
//! A, replication (declared in A's config file, on push events) brings it to B, skopeo pulls it
//! byte-identical from B and containerd runs it. Then a large push replicates while the link
//! goes down and up: the copy resumes, and B receives at most one chunk more than the blobs.
//! Needs root (`ip netns`), as CI has.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::clients::{self, exec, Containerd, COMMAND_TIMEOUT};
use common::oci_layout::{self, MARKER};
use common::process::BerthProcess;

/// Runs `ip ARGS`, panicking on failure.
fn ip(args: &[&str]) {
    let out = exec(Command::new("ip").args(args), Duration::from_secs(20));
    assert!(out.success(), "ip {args:?}: {}", out.stderr_str());
}

/// The namespaces and links of one test, removed when dropped.
struct Regions {
    a: String,
    b: String,
    /// The A-B link's end in A (cut with `ip -n A link set DEV down`).
    link_a: String,
    /// Addresses: A on the management link, B on the management link, B on the A-B link.
    a_mgmt: String,
    b_mgmt: String,
    b_link: String,
}

impl Regions {
    fn new() -> Regions {
        let id = std::process::id() % 10_000;
        let (a, b) = (format!("brA{id}"), format!("brB{id}"));
        let net = 100 + (id % 100);
        for ns in [&a, &b] {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(std::process::Stdio::null())
                .status();
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        let r = Regions {
            link_a: format!("lkA{id}"),
            a_mgmt: format!("10.{net}.1.2"),
            b_mgmt: format!("10.{net}.2.2"),
            b_link: format!("10.{net}.0.2"),
            a,
            b,
        };
        // The link between the regions.
        let link_b = format!("lkB{id}");
        ip(&[
            "link", "add", &r.link_a, "type", "veth", "peer", "name", &link_b,
        ]);
        ip(&["link", "set", &r.link_a, "netns", &r.a]);
        ip(&["link", "set", &link_b, "netns", &r.b]);
        ip(&[
            "-n",
            &r.a,
            "addr",
            "add",
            &format!("10.{net}.0.1/30"),
            "dev",
            &r.link_a,
        ]);
        ip(&[
            "-n",
            &r.b,
            "addr",
            "add",
            &format!("{}/30", r.b_link),
            "dev",
            &link_b,
        ]);
        ip(&["-n", &r.a, "link", "set", &r.link_a, "up"]);
        ip(&["-n", &r.b, "link", "set", &link_b, "up"]);
        // A management link from the test's namespace to each region.
        for (ns, sub, tag) in [(&r.a, 1, "A"), (&r.b, 2, "B")] {
            let (host, inner) = (format!("mg{tag}{id}h"), format!("mg{tag}{id}n"));
            ip(&["link", "add", &host, "type", "veth", "peer", "name", &inner]);
            ip(&["link", "set", &inner, "netns", ns]);
            ip(&["addr", "add", &format!("10.{net}.{sub}.1/30"), "dev", &host]);
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("10.{net}.{sub}.2/30"),
                "dev",
                &inner,
            ]);
            ip(&["link", "set", &host, "up"]);
            ip(&["-n", ns, "link", "set", &inner, "up"]);
        }
        r
    }

    fn no_proxy(&self) -> String {
        format!(
            "127.0.0.1,localhost,::1,{},{},{}",
            self.a_mgmt, self.b_mgmt, self.b_link
        )
    }

    fn link(&self, up: bool) {
        ip(&[
            "-n",
            &self.a,
            "link",
            "set",
            &self.link_a,
            if up { "up" } else { "down" },
        ]);
    }
}

impl Drop for Regions {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth ends in it, and so their peers.
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

fn skopeo(regions: &Regions, args: &[&str]) -> String {
    clients::require_tool("/usr/bin/skopeo");
    let mut cmd = clients::skopeo_command(args);
    cmd.env("NO_PROXY", regions.no_proxy())
        .env("no_proxy", regions.no_proxy());
    exec(&mut cmd, COMMAND_TIMEOUT).expect_success()
}

/// `berth_upload_received_bytes_total` of the berth at `base`.
fn received(base: &str) -> u64 {
    let text = get(&format!("{base}/metrics"));
    common::metrics::metric_value(&text, "berth_upload_received_bytes_total", &[]) as u64
}

fn get(url: &str) -> String {
    common::block(async { reqwest::get(url).await.unwrap().text().await.unwrap() })
}

fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let t = Instant::now();
    while !ok() {
        assert!(t.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn regions_replicate_on_push_and_resume_after_a_cut_link() {
    let regions = Regions::new();
    let wa = ["ip", "netns", "exec", regions.a.as_str()];
    let wb = ["ip", "netns", "exec", regions.b.as_str()];
    let dir_b = tempfile::tempdir().unwrap();
    let _b = BerthProcess::start_wrapped(
        dir_b.path(),
        "[[registry]]\nname = \"library\"\n[limits]\nbody_idle_timeout = \"5s\"\n",
        "0.0.0.0:5000",
        &wb,
    );
    let chunk = 8u64 << 20;
    let a_config = format!(
        r#"[[registry]]
name = "library"

[replication]
chunk_bytes = {chunk}
request_timeout = "3s"
attempts = 8

[[replication.endpoint]]
name = "region-b"
url = "http://{b_link}:5000"

[[replication.rule]]
name = "to-b"
endpoint = "region-b"
registry = "library"
trigger = "event"
bandwidth_limit = 12000000
concurrency = 1
"#,
        b_link = regions.b_link
    );
    let dir_a = tempfile::tempdir().unwrap();
    let _a = BerthProcess::start_wrapped(dir_a.path(), &a_config, "0.0.0.0:5000", &wa);
    let (a_base, b_base) = (
        format!("http://{}:5000", regions.a_mgmt),
        format!("http://{}:5000", regions.b_mgmt),
    );

    // A runnable image pushed with skopeo into A appears in B by event, byte-identical.
    let layouts = tempfile::tempdir().unwrap();
    let small = layouts.path().join("small");
    let img = oci_layout::build_image(&small, "v1", 256 * 1024);
    let pushed = Instant::now();
    skopeo(
        &regions,
        &[
            "copy",
            "--dest-tls-verify=false",
            &format!("oci:{}:v1", small.display()),
            &format!("docker://{}:5000/library/app:v1", regions.a_mgmt),
        ],
    );
    let b_ref = format!("docker://{}:5000/library/app:v1", regions.b_mgmt);
    wait_for("the image in region B", Duration::from_secs(15), || {
        let mut cmd = clients::skopeo_command(&["inspect", "--raw", "--tls-verify=false", &b_ref]);
        cmd.env("NO_PROXY", regions.no_proxy());
        exec(&mut cmd, COMMAND_TIMEOUT).success()
    });
    eprintln!(
        "replicated to region B {:?} after the push",
        pushed.elapsed()
    );
    let raw = skopeo(
        &regions,
        &["inspect", "--raw", "--tls-verify=false", &b_ref],
    );
    assert_eq!(
        raw.as_bytes(),
        &img.manifest_bytes[..],
        "the manifest is byte-identical"
    );
    let pulled = layouts.path().join("pulled");
    skopeo(
        &regions,
        &[
            "copy",
            "--src-tls-verify=false",
            &b_ref,
            &format!("oci:{}:v1", pulled.display()),
        ],
    );
    // containerd pulls it from region B and runs it.
    let ctd = Containerd::start();
    let name = format!("{}:5000/library/app:v1", regions.b_mgmt);
    let mut pull = ctd.ctr_command(&[
        "images",
        "pull",
        "--plain-http",
        "--snapshotter",
        &ctd.snapshotter,
        &name,
    ]);
    pull.env("NO_PROXY", regions.no_proxy());
    exec(&mut pull, COMMAND_TIMEOUT).expect_success();
    let id = clients::unique_name("berth-region");
    let out = ctd.ctr(&["run", "--rm", "--snapshotter", &ctd.snapshotter, &name, &id]);
    assert!(
        out.lines().any(|l| l.trim() == MARKER),
        "ctr run printed {out:?}"
    );

    // A large push replicates at 12 MB/s; the link goes down for 5 s in the middle.
    let big = layouts.path().join("big");
    let big_img = oci_layout::build_image(&big, "v1", 40 << 20);
    let before = received(&b_base);
    skopeo(
        &regions,
        &[
            "copy",
            "--dest-tls-verify=false",
            &format!("oci:{}:v1", big.display()),
            &format!("docker://{}:5000/library/big:v1", regions.a_mgmt),
        ],
    );
    wait_for("the copy under way", Duration::from_secs(20), || {
        received(&b_base) > before + (20 << 20)
    });
    regions.link(false);
    std::thread::sleep(Duration::from_secs(5));
    regions.link(true);
    let big_ref = format!("docker://{}:5000/library/big:v1", regions.b_mgmt);
    wait_for(
        "the large image in region B",
        Duration::from_secs(90),
        || {
            let mut cmd =
                clients::skopeo_command(&["inspect", "--raw", "--tls-verify=false", &big_ref]);
            cmd.env("NO_PROXY", regions.no_proxy());
            exec(&mut cmd, COMMAND_TIMEOUT).success()
        },
    );
    let got = received(&b_base) - before;
    // The busybox layer is in B already; the two random layers and the config are new.
    let new_bytes: u64 =
        big_img.layers[1..].iter().map(|l| l.size).sum::<u64>() + big_img.config.size;
    eprintln!("region B received {got} bytes for {new_bytes} new bytes (chunk {chunk})");
    assert!(got >= new_bytes, "{got} < {new_bytes}");
    assert!(
        got <= new_bytes + chunk,
        "B received {got} bytes for {new_bytes}: more than one chunk ({chunk}) sent again"
    );
    let raw = skopeo(
        &regions,
        &["inspect", "--raw", "--tls-verify=false", &big_ref],
    );
    assert_eq!(raw.as_bytes(), &big_img.manifest_bytes[..]);
    let list = get(&format!(
        "{a_base}/api/v1/replication/rules/to-b/executions"
    ));
    assert!(list.contains("\"failed\":0"), "{list}");
}
