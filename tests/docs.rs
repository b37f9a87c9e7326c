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
        match (&mut current, line.strip_prefix("```")) {
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

#[test]
fn every_config_in_the_guides_passes_check_config() {
    let tmp = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for (guide, text) in guides() {
        for (lang, block) in blocks(&text) {
            if lang != "toml" || !block.contains("[[listen]]") {
                continue;
            }
            // The guide's paths belong to the operator's machine: only data_dir is redirected.
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
