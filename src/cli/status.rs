//! `berth status [--json]`: version, uptime, storage, counts and what each source is doing, from
//! `GET /api/v1/status` (of `--server`, or of the data directory in this process).

use http::Method;

use super::{print_json, Place};
use crate::api::views::{SourceStatus, StatusView};

/// Prints the status.
pub fn run(place: &Place, json: bool) -> Result<(), String> {
    let status: StatusView = place.call(Method::GET, "/status")?;
    if json {
        return print_json(&status);
    }
    outln!(
        "berth {} (commit {}), up {} (since {})",
        status.version,
        status.commit,
        humantime::format_duration(std::time::Duration::from_secs(status.uptime_seconds)),
        status.started
    );
    if place.server.is_none() {
        outln!("(read from the data directory, not a running server: the uptime is this command's and no source was asked; give --server for a server's view)");
    }
    let s = &status.storage;
    let blobs = s
        .blob_bytes
        .map_or("not counted yet".to_string(), |b| format!("{b} bytes"));
    outln!(
        "storage: {}: {} bytes free, {} bytes used on its volume; committed blobs: {blobs}",
        s.data_dir,
        s.volume_free_bytes,
        s.volume_used_bytes
    );
    let c = &status.counts;
    outln!(
        "registries: {}, image caches: {}, users: {}",
        c.registries,
        c.image_caches,
        c.users
    );
    if status.sources.is_empty() {
        outln!("sources: none");
    }
    for source in &status.sources {
        outln!("{}", source_line(source));
    }
    Ok(())
}

/// One line per source: `NAME (KIND URL): STATE ...`.
fn source_line(s: &SourceStatus) -> String {
    let state = if !s.loaded {
        "not loaded (the server log says why)".to_string()
    } else if s.consecutive_failures > 0 {
        format!("failing, {} consecutive failures", s.consecutive_failures)
    } else if s.last_success.is_some() {
        "ok".to_string()
    } else {
        "not asked yet".to_string()
    };
    let mut line = format!("source {} ({} {}): {state}", s.name, s.kind, s.url);
    if let Some(at) = &s.last_success {
        line.push_str(&format!("; last success {at}"));
    }
    if let Some(e) = &s.last_error {
        line.push_str(&format!(
            "; last error {} ({}): {}",
            e.at, e.kind, e.message
        ));
    }
    line
}
