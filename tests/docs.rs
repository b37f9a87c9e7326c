//! The operator guides in docs/guides stay true: every berth config in them passes
//! `berth check-config`, every daemon.json parses with the keys the guide relies on, every
//! containerd hosts.toml names a server and hosts with capabilities. (What the daemons do with
//! those files is proven by tests/real_clients*.rs, which write the same settings.)

mod common;

use std::process::Command;

use common::process::berth_bin;

/// (language, text) of every fenced block of a markdown file.
fn blocks(markdown: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current: Option<(String, String)> = None;
    for line in markdown.lines() {
        // Fences may be indented (a block inside a list item).
        match (&mut current, line.trim_start().strip_prefix("```")) {
            (None, Some(lang)) => current = Some((lang.trim().to_string(), String::new())),
            (Some(_), Some(_)) => out.extend(current.take()),
            (Some((_, text)), None) => {
                text.push_str(line);
                text.push('\n');
            }
            (None, None) => {}
        }
    }
    assert!(current.is_none(), "an unclosed code block");
    out
}

fn guides() -> Vec<(String, String)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/guides");
    let mut all: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read_to_string(&p).unwrap())
        })
        .collect();
    all.sort();
    assert!(!all.is_empty(), "no guide in {}", dir.display());
    all
}

/// The guides' TLS files live in /etc/berth/tls: tests put them in a temp dir instead.
const TLS_DIR: &str = "/etc/berth/tls";

/// Runs the guides' openssl recipe (every `sh` block that calls openssl) in `dir`.
fn make_tls_files(dir: &std::path::Path) {
    let mut ran = 0;
    for (guide, text) in guides() {
        for (lang, block) in blocks(&text) {
            if lang != "sh" || !block.contains("openssl ") {
                continue;
            }
            let script = block.replace(TLS_DIR, &dir.display().to_string());
            let out = Command::new("bash")
                .args(["-euo", "pipefail", "-c", &script])
                .output()
                .expect("bash runs");
            assert!(
                out.status.success(),
                "{guide}: the openssl recipe fails:\n{script}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            ran += 1;
        }
    }
    assert!(ran > 0, "no openssl recipe in the guides");
}

#[test]
fn every_config_in_the_guides_passes_check_config() {
    let tmp = tempfile::tempdir().unwrap();
    let tls = tmp.path().join("tls");
    make_tls_files(&tls);
    let mut checked = 0;
    for (guide, text) in guides() {
        for (lang, block) in blocks(&text) {
            // Whole configs, and fragments of one (a `[pull_through]` section to add).
            let fragment = block.starts_with("[pull_through]");
            if lang != "toml" || !(block.contains("[[listen]]") || fragment) {
                continue;
            }
            let block = if fragment {
                format!("[[listen]]\naddr = \"127.0.0.1:5000\"\n{block}")
            } else {
                block
            };
            // The guide's paths belong to the operator's machine: data_dir and the TLS files
            // are redirected, nothing else.
            let block = block.replace(TLS_DIR, &tls.display().to_string());
            let file = tmp.path().join(format!("{guide}-{checked}.toml"));
            std::fs::write(&file, &block).unwrap();
            let out = Command::new(berth_bin())
                .arg("--config")
                .arg(&file)
                .arg("--data-dir")
                .arg(tmp.path().join("data"))
                .arg("check-config")
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{guide}: a config block fails check-config:\n{block}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            checked += 1;
        }
    }
    assert!(checked > 0, "no berth config found in the guides");
}

#[test]
fn every_daemon_and_containerd_snippet_in_the_guides_is_well_formed() {
    let (mut daemons, mut hosts) = (0, 0);
    for (guide, text) in guides() {
        for (lang, block) in blocks(&text) {
            if lang == "json" && block.contains("registry-mirrors") {
                let v: serde_json::Value = serde_json::from_str(&block).unwrap_or_else(|e| {
                    panic!("{guide}: daemon.json does not parse: {e}\n{block}")
                });
                let mirrors = v["registry-mirrors"]
                    .as_array()
                    .expect("registry-mirrors list");
                assert!(
                    mirrors
                        .iter()
                        .all(|m| m.as_str().is_some_and(|m| m.starts_with("http"))),
                    "{guide}: a mirror without its scheme: {block}"
                );
                daemons += 1;
            }
            if lang == "toml" && block.contains("[host.") {
                let v: toml::Value = toml::from_str(&block)
                    .unwrap_or_else(|e| panic!("{guide}: hosts.toml does not parse: {e}\n{block}"));
                assert!(
                    v["server"].as_str().is_some(),
                    "{guide}: no server: {block}"
                );
                for (host, h) in v["host"].as_table().expect("[host.\"...\"] tables") {
                    let caps = h["capabilities"].as_array().expect("capabilities");
                    assert!(
                        host.starts_with("http") && caps.iter().any(|c| c.as_str() == Some("pull")),
                        "{guide}: host {host} cannot pull: {block}"
                    );
                }
                hosts += 1;
            }
        }
    }
    assert!(
        daemons > 0 && hosts > 0,
        "daemon.json {daemons}, hosts.toml {hosts}"
    );
}

/// The TLS guide's recipe gives a certificate a client trusting only the guide's CA accepts,
/// for the name the guide uses, from a berth started with the guide's listener settings.
#[tokio::test]
async fn the_tls_guide_recipe_serves_clients_that_trust_its_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let tls = tmp.path().join("tls");
    make_tls_files(&tls);
    let config = berth::config::Config::from_toml(&format!(
        "data_dir = {:?}\n[[listen]]\naddr = \"127.0.0.1:0\"\ntls_cert = {:?}\ntls_key = {:?}\n",
        tmp.path().join("data"),
        tls.join("berth.crt"),
        tls.join("berth.key")
    ))
    .unwrap();
    let server = berth::Server::start(config).await.unwrap();
    let addr = server.local_addrs()[0].0;
    let ca = std::fs::read(tls.join("ca.crt")).unwrap();
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .resolve("berth.example.internal", addr)
        .build()
        .unwrap();
    let r = client
        .get(format!(
            "https://berth.example.internal:{}/v2/",
            addr.port()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::OK);
    server.shutdown().await;
}

/// The backup guide, run as written against a server on loopback: its URL, paths and config
/// point at the test's; `systemctl stop|start berth` stop and start that server; `chown` is
/// left out (no `berth` user here: tests/deb_package.sh proves the package's owners). At the
/// end the restored server serves the image pushed before the backup, byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backup_guide_runs_as_written() {
    use common::process::BerthProcess;
    use common::registry::Client;

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let registries = "[[registry]]\nname = \"library\"\n";
    let mut server = Some(BerthProcess::start_in(dir, registries));
    let url = server.as_ref().unwrap().url();
    let manifest = Client::new(&url, None)
        .image("library/app", "v1", "guide", b"a base layer")
        .await;
    let out = Command::new(berth_bin())
        .args([
            "--server", &url, "user", "create", "root", "--admin", "--json",
        ])
        .output()
        .unwrap();
    let first: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let (id, secret) = (
        first["first_key"]["id"].as_str().unwrap().to_string(),
        first["first_key"]["secret"].as_str().unwrap().to_string(),
    );

    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/guides/backup.md"),
    )
    .unwrap();
    let data = dir.join("data");
    let backups = dir.join("backups");
    let mut ran = 0;
    for (lang, block) in blocks(&text) {
        if lang != "sh" {
            continue;
        }
        for command in block.replace("\\\n", " ").lines().map(str::trim) {
            if command.is_empty() || command.starts_with('#') || command.starts_with("export ") {
                continue;
            }
            let port = server.as_ref().map(|s| s.url());
            let command = command
                .replace("http://127.0.0.1:5000", port.as_deref().unwrap_or(&url))
                .replace("/var/backups/berth", &backups.display().to_string())
                .replace("/var/lib/berth", &data.display().to_string())
                .replace(
                    "/etc/berth/config.toml",
                    &dir.join("config.toml").display().to_string(),
                );
            let run = |command: &str| {
                Command::new("bash")
                    .args(["-euo", "pipefail", "-c", command])
                    .env(
                        "PATH",
                        format!("{}:{}", bin_dir(), std::env::var("PATH").unwrap()),
                    )
                    .env("BERTH_ACCESS_KEY", &id)
                    .env("BERTH_SECRET_KEY", &secret)
                    .output()
                    .unwrap()
            };
            match command.as_str() {
                "systemctl stop berth" => {
                    assert!(server.take().unwrap().terminate());
                }
                "systemctl start berth" => {
                    server = Some(BerthProcess::start_in(dir, registries));
                }
                c if c.starts_with("chown ") => continue,
                c if c.contains("--config") && c.contains(" backup ") => {
                    // "With the server running, this refuses": then on the stopped node.
                    let out = run(c);
                    assert!(
                        !out.status.success()
                            && String::from_utf8_lossy(&out.stderr).contains("--server"),
                        "{c}"
                    );
                    assert!(server.take().unwrap().terminate());
                    let out = run(c);
                    assert!(
                        out.status.success(),
                        "{c}: {}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                    server = Some(BerthProcess::start_in(dir, registries));
                }
                c => {
                    let out = run(c);
                    assert!(
                        out.status.success(),
                        "{c}: {}{}",
                        String::from_utf8_lossy(&out.stdout),
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
            }
            ran += 1;
        }
    }
    assert!(ran >= 6, "the guide's commands ran: {ran}");
    assert!(
        dir.join("data.old").is_dir(),
        "the guide moved the old data away"
    );
    let client = Client::new(&server.as_ref().unwrap().url(), Some((id, secret)));
    assert_eq!(client.pull_all("library/app", "v1").await, manifest);
}

/// Runs every command of the `sh` blocks of `docs/guides/GUIDE` as written (the binary under
/// test first on PATH, the guide's `http://127.0.0.1:5000` replaced by `url`), each of which
/// must succeed; (command, stdout) of each.
fn run_guide_commands(guide: &str, url: &str) -> Vec<(String, String)> {
    run_guide_commands_with(guide, &[("http://127.0.0.1:5000", url)], &[])
}

/// [`run_guide_commands`] with each `(from, to)` of `replace` replaced in the commands, and
/// `env` set for them.
fn run_guide_commands_with(
    guide: &str,
    replace: &[(&str, &str)],
    env: &[(&str, &str)],
) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("docs/guides")
            .join(guide),
    )
    .unwrap();
    let mut ran = Vec::new();
    for (lang, block) in blocks(&text) {
        if lang != "sh" {
            continue;
        }
        for command in block.replace("\\\n", " ").lines().map(str::trim) {
            if command.is_empty() || command.starts_with('#') {
                continue;
            }
            let command = replace
                .iter()
                .fold(command.to_string(), |c, (from, to)| c.replace(from, to));
            let out = Command::new("bash")
                .args(["-euo", "pipefail", "-c", &command])
                .envs(env.iter().copied())
                .env(
                    "PATH",
                    format!("{}:{}", bin_dir(), std::env::var("PATH").unwrap()),
                )
                .output()
                .unwrap();
            let (stdout, stderr) = (
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            );
            assert!(out.status.success(), "{command}: {stdout}{stderr}");
            ran.push((command, stdout));
        }
    }
    ran
}

/// The directory of the `berth` binary under test (the guides call it by name).
fn bin_dir() -> String {
    std::path::Path::new(&berth_bin())
        .parent()
        .unwrap()
        .display()
        .to_string()
}

/// Every metric berth describes is in docs/metrics.md (with what to alert on): a metric added
/// without its line in the guide fails here.
#[test]
fn every_metric_is_in_the_metrics_guide() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let source = std::fs::read_to_string(root.join("src/metrics.rs")).unwrap();
    let guide = std::fs::read_to_string(root.join("docs/metrics.md")).unwrap();
    let mut names: Vec<&str> = source
        .split('"')
        .skip(1)
        .step_by(2)
        .filter(|s| {
            s.starts_with("berth_")
                && s.chars()
                    .all(|c| c.is_ascii_lowercase() || c == '_' || c.is_ascii_digit())
        })
        .collect();
    names.sort();
    names.dedup();
    assert!(
        names.len() > 20,
        "metric names found in src/metrics.rs: {names:?}"
    );
    let missing: Vec<_> = names
        .iter()
        .filter(|n| !guide.contains(&format!("`{n}")))
        .collect();
    assert!(missing.is_empty(), "not in docs/metrics.md: {missing:?}");
}

/// The edge guide's commands, run as written against an edge on loopback whose source is
/// another berth holding the guide's images (each an index of linux/amd64 and linux/arm64):
/// the prefetch fills the cache for one platform, the stats and the prune's dry run answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edge_guide_commands_run_as_written() {
    use common::process::BerthProcess;
    use common::registry::Client;
    use common::server::{sha256, OCI_INDEX, OCI_MANIFEST};

    let source_dir = tempfile::tempdir().unwrap();
    let source = BerthProcess::start_in(source_dir.path(), "[[registry]]\nname = \"library\"\n");
    let up = Client::new(&source.url(), None);
    let mut arm = Vec::new();
    for (repo, tag) in [("library/nginx", "1.27"), ("library/redis", "7.2")] {
        let mut entries = Vec::new();
        for arch in ["amd64", "arm64"] {
            let m = up
                .image(
                    repo,
                    &format!("{tag}-{arch}"),
                    &format!("{repo}-{arch}"),
                    b"base",
                )
                .await;
            if arch == "arm64" {
                arm.push(sha256(&m));
            }
            entries.push(serde_json::json!({"mediaType": OCI_MANIFEST, "digest": sha256(&m), "size": m.len(), "platform": {"architecture": arch, "os": "linux"}}));
        }
        let index = serde_json::to_vec(
            &serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}),
        )
        .unwrap();
        up.manifest(repo, tag, OCI_INDEX, &index).await;
    }
    let edge_dir = tempfile::tempdir().unwrap();
    let edge = BerthProcess::start_in(
        edge_dir.path(),
        &format!(
            "[[image_cache]]\nname = \"hub\"\nkind = \"registry\"\nurl = \"{}\"\n[[registry]]\nname = \"docker\"\ntype = \"cache\"\ncache = \"hub\"\nanonymous_pull = true\n",
            source.url()
        ),
    );
    let ran = run_guide_commands("edge.md", &edge.url());
    assert!(ran.len() >= 3, "the guide's commands: {ran:?}");
    let prefetch = &ran.iter().find(|(c, _)| c.contains("prefetch")).unwrap().1;
    assert_eq!(
        prefetch.lines().count(),
        2,
        "one line per image: {prefetch}"
    );
    // The arm64 images came in, whole, and are served from the edge's disk.
    let client = Client::new(&edge.url(), None);
    for (repo, digest) in [
        ("docker/library/nginx", &arm[0]),
        ("docker/library/redis", &arm[1]),
    ] {
        client.pull_all(repo, digest).await;
    }
    drop(source);
    for (repo, digest) in [
        ("docker/library/nginx", &arm[0]),
        ("docker/library/redis", &arm[1]),
    ] {
        client.pull_all(repo, digest).await;
    }
}

/// The upgrade guide's commands, as written: the new binary checks the running config, and the
/// restarted server answers what step 3 looks at. `install` and `systemctl` act on the host's
/// service (tests/deb_package.sh installs, upgrades and verifies the unit); here the restart is
/// a stop and a start of a server on loopback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upgrade_guide_commands_run_as_written() {
    use common::process::BerthProcess;
    let tmp = tempfile::tempdir().unwrap();
    let mut server = Some(BerthProcess::start_in(
        tmp.path(),
        "[[registry]]\nname = \"team\"\n",
    ));
    let config = tmp.path().join("config.toml");
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/guides/upgrade.md"),
    )
    .unwrap();
    let mut ran = 0;
    for (lang, block) in blocks(&text) {
        if lang != "sh" {
            continue;
        }
        for command in block.lines().map(str::trim).filter(|c| !c.is_empty()) {
            match command {
                "systemctl restart berth" => {
                    assert!(server.take().unwrap().terminate());
                    server = Some(BerthProcess::start_in(
                        tmp.path(),
                        "[[registry]]\nname = \"team\"\n",
                    ));
                }
                c if c.starts_with("install ") => {}
                c => {
                    let c = c
                        .replace("/usr/local/bin/berth-new", &berth_bin())
                        .replace("/etc/berth/config.toml", &config.display().to_string());
                    let out = Command::new("bash")
                        .args(["-euo", "pipefail", "-c", &c])
                        .output()
                        .unwrap();
                    assert!(
                        out.status.success(),
                        "{c}: {}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
            }
            ran += 1;
        }
    }
    assert_eq!(ran, 3, "check-config, install, restart");
    // Step 3: the version, and readiness.
    let url = server.as_ref().unwrap().url();
    let out = Command::new(berth_bin()).arg("version").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("berth "));
    let ready = reqwest::get(format!("{url}/readyz")).await.unwrap();
    assert_eq!(ready.text().await.unwrap(), "ready\n");
}

/// The cleanup guide's commands, as written, against a server holding the guide's images:
/// protected release tags stay, the last three `v*` of `app` stay, the rest of `app` goes
/// (untagged included), `tools/**` and images no policy names are untouched, the dry run
/// deletes nothing and names what the real run deletes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cleanup_guide_runs_as_written() {
    use common::process::BerthProcess;
    use common::registry::Client;
    use common::server::sha256;

    let tmp = tempfile::tempdir().unwrap();
    let server = BerthProcess::start_in(tmp.path(), "[[registry]]\nname = \"library\"\n");
    let client = Client::new(&server.url(), None);
    let mut digest = std::collections::HashMap::new();
    for tag in ["v1.0", "v1.1", "v2.0", "v2.1", "v2.2", "v2.3", "build-7"] {
        let m = client.image("library/app", tag, tag, b"base").await;
        digest.insert(tag, sha256(&m));
        // Push times order the releases.
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    client
        .image("library/tools/lint", "1", "lint", b"base")
        .await;
    client.image("library/other", "1", "other", b"base").await;
    let ran = run_guide_commands("cleanup.md", &server.url());
    assert_eq!(ran.len(), 12, "{ran:?}");
    let output = |end: &str| &ran.iter().find(|(c, _)| c.ends_with(end)).unwrap().1;
    // The artifacts a run's rows name with `action`, sorted.
    let rows = |out: &str, action: &str| {
        let mut named: Vec<String> = out
            .lines()
            .filter_map(|l| l.strip_prefix(action))
            .map(|rest| rest.split_whitespace().next().unwrap().to_string())
            .collect();
        named.sort();
        named
    };
    let mut gone = vec![
        format!("library/app@{}", digest["v2.0"]),
        format!("library/app@{}", digest["build-7"]),
    ];
    gone.sort();
    assert_eq!(rows(output("--dry-run"), "would_delete "), gone);
    assert_eq!(rows(output("cleanup run library"), "deleted "), gone);
    for d in [&digest["v2.0"], &digest["build-7"]] {
        assert!(
            client.pull_manifest("library/app", d).await.is_none(),
            "{d} is gone"
        );
    }
    for tag in ["v1.0", "v1.1", "v2.1", "v2.2", "v2.3"] {
        client.pull_all("library/app", tag).await;
    }
    client.pull_all("library/tools/lint", "1").await;
    client.pull_all("library/other", "1").await;
    assert!(
        output("'0 3 * * SUN'").contains("next: "),
        "the next runs are shown"
    );
    assert_eq!(
        output("cleanup executions library").lines().count(),
        2,
        "the dry run and the real run"
    );
    // Garbage collection ran (the blobs of the deleted artifacts are younger than the grace).
    assert!(
        output("gc run").contains("succeeded"),
        "{:?}",
        output("gc run")
    );
    assert!(output("'0 4 * * *'").contains("next: "));
}

/// The replication guide's commands, run as written from a source region to a second region
/// with auth on (both in-process on loopback): the endpoint with an access key, a rule on each
/// push with its first run by hand, a scheduled rule, the executions; then a push reaches the
/// other region by event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_replication_guide_runs_as_written() {
    use common::registry::Client;
    use common::server::TestServer;

    let source = TestServer::start("").await;
    let region = TestServer::start("").await;
    let (key, secret) = region.user("replicator", berth::auth::Role::Admin, &[]);
    let up = Client::over(source.client.clone(), &source.base);
    let web = up.image("library/team/web", "v1", "web", b"base").await;
    up.image("library/team/web", "dev", "dev", b"base").await;
    up.image("library/team/api", "v2", "api", b"base").await;
    up.image("library/other", "v1", "other", b"base").await;
    let (s, r) = (source.base.clone(), region.base.clone());
    let ran = tokio::task::spawn_blocking(move || {
        run_guide_commands_with(
            "replication.md",
            &[("http://127.0.0.1:5000", &s), ("http://127.0.0.1:5001", &r)],
            &[("EU_KEY", &key), ("EU_SECRET", &secret)],
        )
    })
    .await
    .unwrap();
    assert_eq!(ran.len(), 8, "{ran:?}");
    let output = |has: &str| &ran.iter().find(|(c, _)| c.contains(has)).unwrap().1;
    assert!(output("endpoint test").contains("credentials accepted"));
    let copied: Vec<&str> = output("replication run team-to-eu")
        .lines()
        .filter(|l| l.starts_with("copied"))
        .collect();
    assert_eq!(copied.len(), 2, "team/web:v1 and team/api:v2: {copied:?}");
    assert!(output("rule list").contains("nightly"));
    assert!(output("executions team-to-eu").contains("succeeded"));
    let reader = region.user("reader", berth::auth::Role::Viewer, &[]);
    let there = Client::new(&region.base, Some(reader));
    assert_eq!(there.pull_all("library/team/web", "v1").await, web);
    there.pull_all("library/team/api", "v2").await;
    assert!(there
        .pull_manifest("library/team/web", "dev")
        .await
        .is_none());
    assert!(there.pull_manifest("library/other", "v1").await.is_none());
    // The event rule: a push here is there within seconds.
    let v3 = up.image("library/team/web", "v3", "v3", b"base").await;
    let mut arrived = None;
    for _ in 0..200 {
        arrived = there.pull_manifest("library/team/web", "v3").await;
        if arrived.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(arrived, Some(v3));
}
