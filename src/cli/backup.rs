//! `berth backup DIR`: copies a node's metadata and blobs into a directory while it serves (or
//! from its stopped data directory), through the management API's backup pages; a second run
//! into the same directory fetches only the blobs it lacks. `berth restore DIR`: makes a new
//! data directory from such a directory.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use http::Method;
use serde::Serialize;

use super::{err, print_json, Place};
use crate::backup::{blob_path, Line, Page, LINES_FILE};
use crate::config::Config;
use crate::oci::digest::{Digest, Verifier};

/// What a backup copied.
#[derive(Debug, Default, Serialize)]
struct BackupReport {
    /// The backup directory.
    dir: String,
    registries: usize,
    image_caches: usize,
    records: usize,
    repositories: usize,
    artifacts: usize,
    tags: usize,
    /// Blobs the backup holds (manifests included) and their bytes.
    blobs: usize,
    blob_bytes: u64,
    /// Blobs fetched by this run, and their bytes.
    fetched: usize,
    fetched_bytes: u64,
    /// Blobs already in the directory from an earlier run.
    kept: usize,
    /// Blobs deleted from the node while the backup ran (what needs them is left out at
    /// restore).
    missing: Vec<String>,
    /// Files of earlier runs no longer needed, removed.
    pruned: usize,
    seconds: f64,
}

/// `berth backup DIR`.
pub fn backup(place: &Place, dir: &Path, page_lines: usize, json: bool) -> Result<(), String> {
    let started = Instant::now();
    private_dir(dir)?;
    let mut report = BackupReport {
        dir: dir.display().to_string(),
        ..BackupReport::default()
    };
    // The lines go to a partial file, renamed once every blob they name is in: a directory
    // whose lines file exists is a complete backup.
    let partial = dir.join(format!(".{LINES_FILE}.partial"));
    let mut out = std::io::BufWriter::new(private_file(&partial)?);
    let mut needed: BTreeMap<Digest, u64> = BTreeMap::new();
    let mut cursor: Option<String> = None;
    let mut last_repo = String::new();
    loop {
        let path = match &cursor {
            None => format!("/backup?limit={page_lines}"),
            Some(c) => format!("/backup?limit={page_lines}&cursor={c}"),
        };
        let page: Page = place.call(Method::GET, &path)?;
        for line in &page.lines {
            serde_json::to_writer(&mut out, line).map_err(err)?;
            out.write_all(b"\n").map_err(err)?;
            if let Some((digest, size)) = line.needs() {
                needed.insert(digest.clone(), size);
            }
            match line {
                Line::Registry { .. } => report.registries += 1,
                Line::ImageCache { .. } => report.image_caches += 1,
                Line::Record { .. } => report.records += 1,
                Line::Tag { .. } => report.tags += 1,
                Line::Artifact { repo, .. } => {
                    report.artifacts += 1;
                    if *repo != last_repo {
                        report.repositories += 1;
                        last_repo.clone_from(repo);
                    }
                }
                _ => {}
            }
        }
        match page.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    out.into_inner()
        .map_err(|e| e.to_string())?
        .sync_all()
        .map_err(err)?;

    report.blobs = needed.len();
    for (digest, size) in &needed {
        report.blob_bytes += size;
        let target = blob_path(dir, digest);
        if fs::metadata(&target).is_ok_and(|m| m.len() == *size) {
            report.kept += 1;
            continue;
        }
        match fetch_blob(place, &target, digest)? {
            Some(n) => {
                report.fetched += 1;
                report.fetched_bytes += n;
            }
            None => {
                eprintln!("berth: warning: blob {digest} was deleted from the node while the backup ran; what needs it is left out at restore");
                report.missing.push(digest.to_string());
            }
        }
    }
    fs::rename(&partial, dir.join(LINES_FILE)).map_err(|e| format!("{}: {e}", dir.display()))?;
    sync_dir(dir)?;
    report.pruned = prune(dir, &needed)?;
    report.seconds = started.elapsed().as_secs_f64();
    if json {
        return print_json(&report);
    }
    outln!(
        "backup of {} registries, {} image caches, {} records, {} repositories, {} artifacts, {} tags in {}",
        report.registries,
        report.image_caches,
        report.records,
        report.repositories,
        report.artifacts,
        report.tags,
        report.dir
    );
    outln!(
        "blobs: {} ({} bytes): {} fetched ({} bytes), {} already there, {} missing, {} old files removed; {:.1} s",
        report.blobs,
        report.blob_bytes,
        report.fetched,
        report.fetched_bytes,
        report.kept,
        report.missing.len(),
        report.pruned,
        report.seconds
    );
    Ok(())
}

/// Fetches one blob into `target` through a temporary file, checked against its digest;
/// its size, or `None` when the node no longer has it.
fn fetch_blob(place: &Place, target: &Path, digest: &Digest) -> Result<Option<u64>, String> {
    let parent = target.parent().expect("blob paths have a parent");
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(parent)
        .map_err(|e| format!("{}: {e}", parent.display()))?;
    let temp = target.with_extension("partial");
    let mut file = std::io::BufWriter::with_capacity(1 << 20, private_file(&temp)?);
    let mut verifier = Verifier::new(digest.algorithm());
    let mut size = 0u64;
    let found = place.download(&format!("/backup/blobs/{digest}"), &mut |piece| {
        verifier.update(piece);
        size += piece.len() as u64;
        file.write_all(piece)
    });
    let file = file.into_inner().map_err(|e| e.to_string());
    let outcome = match (found, file) {
        (Ok(false), _) => Ok(None),
        (Ok(true), Ok(file)) if verifier.current() == *digest => {
            file.sync_all().map_err(err)?;
            fs::rename(&temp, target).map_err(|e| format!("{}: {e}", target.display()))?;
            return Ok(Some(size));
        }
        (Ok(true), Ok(_)) => Err(format!(
            "blob {digest}: the node sent {size} bytes whose digest is {}",
            verifier.current()
        )),
        (Err(e), _) | (_, Err(e)) => Err(format!("blob {digest}: {e}")),
    };
    let _ = fs::remove_file(&temp);
    outcome
}

/// Removes blob files no line names any more (and partial files of an interrupted run).
fn prune(dir: &Path, needed: &BTreeMap<Digest, u64>) -> Result<usize, String> {
    let mut removed = 0;
    let blobs = dir.join("blobs");
    let Ok(algorithms) = fs::read_dir(&blobs) else {
        return Ok(0);
    };
    for algorithm in algorithms.flatten() {
        for fan in fs::read_dir(algorithm.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            for file in fs::read_dir(fan.path()).into_iter().flatten().flatten() {
                let name = format!(
                    "{}:{}",
                    algorithm.file_name().to_string_lossy(),
                    file.file_name().to_string_lossy()
                );
                let keep = Digest::parse(&name).is_ok_and(|d| needed.contains_key(&d));
                if !keep {
                    fs::remove_file(file.path())
                        .map_err(|e| format!("{}: {e}", file.path().display()))?;
                    removed += 1;
                }
            }
        }
    }
    Ok(removed)
}

/// `berth restore DIR`: into the data directory of the config (or --data-dir), which must
/// hold no berth data yet.
pub fn restore(place: &Place, dir: &Path, json: bool) -> Result<(), String> {
    if place.server.is_some() {
        return Err("restore makes a new data directory on this host: stop the server, run `berth restore DIR` with --config (or --data-dir) naming an empty data directory, then start the server on it".into());
    }
    let data = &place.config.data_dir;
    if crate::store::holds_data(data) {
        return Err(format!(
            "{} holds berth data already: restore into a new data directory (--data-dir NEW), or move this one away first",
            data.display()
        ));
    }
    if !dir.join(LINES_FILE).is_file() {
        return Err(format!(
            "{} holds no backup ({LINES_FILE} is missing): give the directory `berth backup` wrote",
            dir.display()
        ));
    }
    let started = Instant::now();
    let max_manifest = place.config.limits.max_manifest_bytes;
    let report = place.rt.block_on(async {
        // Checked before the data directory is made: a refused backup leaves nothing behind.
        let backup = crate::backup::check(dir).await.map_err(|e| e.to_string())?;
        let store =
            crate::store::Store::open_with(data, &place.config.storage, &place.config.metadata)
                .await
                .map_err(|e| format!("cannot open data directory {}: {e}", data.display()))?;
        crate::backup::restore(&backup, &store, max_manifest)
            .await
            .map_err(|e| e.to_string())
    })?;
    say_restored(
        json,
        "restored",
        &report,
        &format!("into {}", data.display()),
        started,
        "is not in the backup (or damaged)",
    )
}

/// `berth migrate-store --to CONFIG`.
pub fn migrate_store(place: &Place, to: &Path, json: bool) -> Result<(), String> {
    if place.server.is_some() {
        return Err("migrate-store reads the data directory of a stopped server: stop it, then run `berth --config CONFIG migrate-store --to NEW-CONFIG` on its host".into());
    }
    let source = &place.config;
    if !crate::store::holds_data(&source.data_dir)
        && matches!(source.metadata, crate::store::meta::MetadataSettings::Sled)
    {
        return Err(format!(
            "{} holds no berth data: nothing to migrate",
            source.data_dir.display()
        ));
    }
    let target = Config::read(Some(to)).map_err(|e| e.to_string())?;
    let problems = target.problems();
    if !problems.is_empty() {
        return Err(format!("{}: {}", to.display(), problems.join("; ")));
    }
    if target.data_dir == source.data_dir {
        return Err(format!(
            "the target's data_dir is the source's ({}): give the target a data directory of its own",
            target.data_dir.display()
        ));
    }
    let started = Instant::now();
    let max_manifest = source.limits.max_manifest_bytes;
    let report = place.rt.block_on(async {
        let from =
            crate::store::Store::open_with(&source.data_dir, &source.storage, &source.metadata)
                .await
                .map_err(|e| format!("cannot open the source: {e}"))?;
        let into =
            crate::store::Store::open_with(&target.data_dir, &target.storage, &target.metadata)
                .await
                .map_err(|e| format!("cannot open the target: {e}"))?;
        let empty = into.meta.registries().await.map_err(err)?.is_empty()
            && into.meta.repositories(None, None, 1).await.map_err(err)?.is_empty();
        if !empty {
            return Err(format!(
                "the target of {} holds registries or repositories already: migrate into empty storage and metadata",
                to.display()
            ));
        }
        crate::backup::restore::migrate(&from, &into, max_manifest)
            .await
            .map_err(|e| e.to_string())
    })?;
    say_restored(
        json,
        "migrated",
        &report,
        &format!(
            "(each checked against its digest) into the store of {}",
            to.display()
        ),
        started,
        "is missing from the source, or its bytes do not match its digest",
    )
}

/// How a restore or a migration ends: the report as JSON; or a line of what it brought back,
/// where and how fast, then a warning on stderr for each blob (`missing_blob` says why),
/// artifact and tag it left out.
fn say_restored(
    json: bool,
    done: &str,
    report: &crate::backup::RestoreReport,
    into: &str,
    started: Instant,
    missing_blob: &str,
) -> Result<(), String> {
    if json {
        return print_json(report);
    }
    outln!(
        "{done} {} registries, {} image caches, {} records, {} repositories, {} artifacts, {} tags, {} blobs ({} bytes) {into} in {:.1} s",
        report.registries,
        report.image_caches,
        report.records,
        report.repositories,
        report.artifacts,
        report.tags,
        report.blobs,
        report.blob_bytes,
        started.elapsed().as_secs_f64()
    );
    for d in &report.missing_blobs {
        eprintln!("berth: warning: blob {d} {missing_blob}");
    }
    for a in &report.dropped_artifacts {
        eprintln!("berth: warning: artifact {a} left out: a blob or child manifest is missing");
    }
    for t in &report.dropped_tags {
        eprintln!("berth: warning: tag {t} left out: its artifact is missing");
    }
    Ok(())
}

/// Creates `dir` (and `dir/blobs`) readable by its owner only: a backup holds secrets.
fn private_dir(dir: &Path) -> Result<(), String> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir.join("blobs"))
        .map_err(|e| format!("cannot create the backup directory {}: {e}", dir.display()))
}

fn private_file(path: &PathBuf) -> Result<fs::File, String> {
    fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn sync_dir(dir: &Path) -> Result<(), String> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| format!("{}: {e}", dir.display()))
}
