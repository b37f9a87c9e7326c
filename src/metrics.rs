//! Prometheus metrics: one process-wide recorder, names as in DESIGN.md 7.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the recorder once per process (several servers in one test process share it).
pub fn init() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets(&[
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
                60.0,
            ])
            .expect("static buckets are valid")
            .build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("a metrics recorder was already installed; /metrics may be empty");
        }
        describe();
        metrics::gauge!("berth_build_info", "version" => VERSION, "commit" => COMMIT).set(1.0);
        metrics::gauge!("berth_process_start_time_seconds").set(
            process_start()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
        );
        handle
    })
}

static START: OnceLock<std::time::SystemTime> = OnceLock::new();

/// When this process started serving (the first call of [`init`]): the
/// `berth_process_start_time_seconds` gauge and the start time of `GET /api/v1/status`.
pub fn process_start() -> std::time::SystemTime {
    *START.get_or_init(std::time::SystemTime::now)
}

/// Bytes of the committed blobs at the last count (`u64::MAX`: not counted yet).
static STORAGE_BYTES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(u64::MAX);

/// The `berth_storage_bytes` figure last set, if it was counted yet.
pub fn storage_bytes_counted() -> Option<u64> {
    let n = STORAGE_BYTES.load(std::sync::atomic::Ordering::Relaxed);
    (n != u64::MAX).then_some(n)
}

/// berth's version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The git commit berth was built from (`unknown` outside a checkout).
pub const COMMIT: &str = env!("BERTH_GIT_COMMIT");

/// `# HELP` (and unit) of every metric berth exports.
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!(
        "berth_build_info",
        "Always 1; labels: version and git commit of the binary"
    );
    describe_gauge!(
        "berth_process_start_time_seconds",
        Unit::Seconds,
        "Start of the process, Unix time"
    );
    describe_counter!(
        "berth_process_cpu_seconds_total",
        Unit::Seconds,
        "CPU time of the process (user + system)"
    );
    describe_gauge!(
        "berth_process_resident_memory_bytes",
        Unit::Bytes,
        "Resident memory of the process"
    );
    describe_gauge!(
        "berth_process_open_fds",
        "Open file descriptors of the process"
    );
    describe_counter!(
        "berth_http_requests_total",
        "Requests answered, by method, route and status (counted when the body ends)"
    );
    describe_histogram!(
        "berth_http_request_duration_seconds",
        Unit::Seconds,
        "From the request's arrival to the end of its response body"
    );
    describe_counter!(
        "berth_http_response_bytes_total",
        Unit::Bytes,
        "Response body bytes handed to connections"
    );
    describe_counter!(
        "berth_mirror_refused_total",
        "Requests a Docker daemon may have sent to its mirror that were refused or not found (a daemon then falls back to Docker Hub without a word), by status (401, 403, 404) and reason (mirror: routed to the [mirror] registry; shadowed: a normal registry answered a Docker daemon)"
    );
    describe_counter!("berth_http_responses_aborted_total", "Response bodies that ended before their last byte, by reason (client_gone, stalled, body_error)");
    describe_counter!(
        "berth_blob_bytes_served_total",
        Unit::Bytes,
        "Blob body bytes sent (origin and cache registries)"
    );
    describe_counter!(
        "berth_blob_redirected_bytes_total",
        Unit::Bytes,
        "Bytes of the blobs whose GET was answered with a redirect to object storage (presigned URL): sent by the bucket, not by berth"
    );
    describe_counter!(
        "berth_sendfile_bytes_total",
        Unit::Bytes,
        "Blob body bytes sent with sendfile (zero-copy), a part of the blob bytes served"
    );
    describe_counter!(
        "berth_upload_driven_bytes_total",
        Unit::Bytes,
        "Blob upload body bytes read by berth's own HTTP/1.1 driver (plain listeners with sendfile on) rather than through hyper, a part of the upload bytes received"
    );
    describe_gauge!("berth_open_connections", "Client connections open");
    describe_counter!(
        "berth_connections_over_limit_total",
        "Connections closed at once because limits.max_connections were open"
    );
    describe_counter!(
        "berth_connections_refused_total",
        "Connections from addresses outside a private listener's allow list"
    );
    describe_gauge!("berth_upload_sessions", "Blob upload sessions open");
    describe_counter!(
        "berth_upload_received_bytes_total",
        "Blob bytes received in upload bodies, kept or not (a chunk cut short is discarded)"
    );
    describe_gauge!(
        "berth_storage_bytes",
        Unit::Bytes,
        "Bytes of the committed blobs (updated every 5 minutes)"
    );
    describe_gauge!(
        "berth_registry_storage_bytes",
        Unit::Bytes,
        "Bytes of the distinct blobs and manifests a registry holds (a blob its images share counts once), kept by the writes"
    );
    describe_gauge!(
        "berth_registry_blobs",
        "Distinct blobs and manifests a registry holds"
    );
    describe_gauge!(
        "berth_registry_artifacts",
        "Artifacts (manifests per repository) a registry holds"
    );
    describe_gauge!(
        "berth_storage_free_bytes",
        Unit::Bytes,
        "Free bytes on the data directory's volume"
    );
    describe_counter!(
        "berth_auth_failed_logins_total",
        "Failed logins (wrong secret, unknown key, throttled)"
    );
    describe_counter!(
        "berth_auth_tokens_issued_total",
        "Bearer tokens issued by the token endpoint"
    );
    describe_counter!(
        "berth_cache_requests_total",
        "Cache registry requests by registry and outcome (hit, miss, coalesced, stale, ...)"
    );
    describe_counter!(
        "berth_cache_blob_bytes_served_total",
        Unit::Bytes,
        "Blob bytes a cache registry served, by registry"
    );
    describe_counter!(
        "berth_cache_peer_streams_total",
        "Cold blob responses streamed from the node holding the blob's fetch lease"
    );
    describe_counter!(
        "berth_cache_peer_bytes_total",
        Unit::Bytes,
        "Bytes of cold blob responses streamed from the node holding the fetch lease"
    );
    describe_counter!(
        "berth_cache_direct_bytes_total",
        Unit::Bytes,
        "Cold blob bytes fed to the client that started the fetch from memory"
    );
    describe_counter!(
        "berth_cache_budget_expiries_total",
        "Source fetches stopped by their fetch budget (resumed by the next request)"
    );
    describe_counter!(
        "berth_cache_digest_mismatches_total",
        "Blobs a source sent with another digest than asked (discarded)"
    );
    describe_counter!(
        "berth_cache_evicted_artifacts_total",
        "Cache artifacts evicted because the cache passed its size cap"
    );
    describe_counter!(
        "berth_gc_deleted_blobs_total",
        "Blob files garbage collection deleted"
    );
    describe_counter!(
        "berth_gc_deleted_bytes_total",
        Unit::Bytes,
        "Bytes of the blob files garbage collection deleted"
    );
    describe_counter!(
        "berth_cleanup_deleted_artifacts_total",
        "Artifacts cleanup policies deleted (real runs)"
    );
    describe_counter!(
        "berth_replication_bytes_total",
        "Blob bytes replication sent, by rule and endpoint"
    );
    describe_counter!(
        "berth_replication_artifacts_total",
        "Artifacts replication handled, by rule, endpoint and result (copied, skipped, failed)"
    );
    describe_gauge!(
        "berth_replication_event_lag_seconds",
        "Time from a push to its replication, last seen, by rule (event rules)"
    );
    describe_counter!(
        "berth_replication_events_dropped_total",
        "Pushes the replication queue could not take (the event rules then run in full)"
    );
    describe_counter!(
        "berth_cache_oversized_fetches_total",
        "Source fetches stopped because the source sent more bytes than the blob can have"
    );
    describe_gauge!(
        "berth_inflight_fetches",
        "Blob fetches from sources in flight"
    );
    describe_counter!(
        "berth_upstream_fetch_bytes_total",
        Unit::Bytes,
        "Blob bytes received from sources"
    );
    describe_counter!(
        "berth_upstream_token_requests_total",
        "Token requests berth made to sources"
    );
    describe_counter!(
        "berth_upstream_requests_total",
        "Requests berth made to sources, by source (image cache name) and kind (manifest, blob, tags, token, ecr_auth, other)"
    );
    describe_counter!(
        "berth_upstream_errors_total",
        "Failed source requests, by source (image cache name) and kind (connect, timeout, 4xx (not 404), 5xx, digest_mismatch, auth, refused)"
    );
    describe_counter!(
        "berth_cache_stale_total",
        "Cached copies served because their source failed, by source (image cache name)"
    );
    describe_counter!(
        "berth_events_dropped_total",
        "Events dropped because the event queue was full"
    );
    describe_counter!(
        "berth_webhook_deliveries_total",
        "Webhook delivery attempts, by result"
    );
    describe_gauge!("berth_webhook_queue_depth", "Webhook deliveries waiting");
}

/// Registries whose usage was last published (a deleted one is set to zero once).
static USAGE_PUBLISHED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Publishes what each registry holds (`usage`: every registry holding anything, from the
/// metadata); registries published before and absent now go to zero.
pub fn registry_usage(usage: &[(String, crate::store::meta::Usage)]) {
    let mut published = USAGE_PUBLISHED.lock().unwrap_or_else(|e| e.into_inner());
    for gone in published
        .iter()
        .filter(|p| !usage.iter().any(|(n, _)| n == *p))
    {
        let registry = gone.clone();
        metrics::gauge!("berth_registry_storage_bytes", "registry" => registry.clone()).set(0.0);
        metrics::gauge!("berth_registry_blobs", "registry" => registry.clone()).set(0.0);
        metrics::gauge!("berth_registry_artifacts", "registry" => registry).set(0.0);
    }
    for (name, u) in usage {
        metrics::gauge!("berth_registry_storage_bytes", "registry" => name.clone())
            .set(u.bytes as f64);
        metrics::gauge!("berth_registry_blobs", "registry" => name.clone()).set(u.blobs as f64);
        metrics::gauge!("berth_registry_artifacts", "registry" => name.clone())
            .set(u.artifacts as f64);
    }
    *published = usage.iter().map(|(n, _)| n.clone()).collect();
}

/// The text exposition, with the process's own figures read now.
pub fn render() -> String {
    process();
    init().render()
}

/// CPU time, resident memory and open descriptors of this process (Linux `/proc/self`).
fn process() {
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
        // Fields after the command name (which may hold spaces): utime is the 12th, stime 13th.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map_or("", |(_, rest)| rest)
            .split_whitespace()
            .collect();
        let ticks: Option<u64> = fields
            .get(11)
            .zip(fields.get(12))
            .and_then(|(u, s)| Some(u.parse::<u64>().ok()? + s.parse::<u64>().ok()?));
        if let Some(ticks) = ticks {
            let hz = rustix::param::clock_ticks_per_second();
            metrics::counter!("berth_process_cpu_seconds_total").absolute(ticks / hz.max(1));
        }
        let rss_pages = fields.get(21).and_then(|p| p.parse::<u64>().ok());
        if let Some(pages) = rss_pages {
            let page = rustix::param::page_size() as u64;
            metrics::gauge!("berth_process_resident_memory_bytes").set((pages * page) as f64);
        }
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        metrics::gauge!("berth_process_open_fds").set(fds.count() as f64);
    }
}

/// Sets the number of open upload sessions.
pub fn upload_sessions(n: usize) {
    metrics::gauge!("berth_upload_sessions").set(n as f64);
}

fn method_label(m: &http::Method) -> &'static str {
    match *m {
        http::Method::GET => "GET",
        http::Method::HEAD => "HEAD",
        http::Method::PUT => "PUT",
        http::Method::POST => "POST",
        http::Method::PATCH => "PATCH",
        http::Method::DELETE => "DELETE",
        _ => "OTHER",
    }
}

/// Counts a finished request.
pub fn request(
    method: &http::Method,
    route: &'static str,
    status: http::StatusCode,
    elapsed: Duration,
) {
    let method = method_label(method);
    metrics::counter!("berth_http_requests_total", "method" => method, "route" => route, "status" => status.as_u16().to_string())
        .increment(1);
    metrics::histogram!("berth_http_request_duration_seconds", "method" => method, "route" => route)
        .record(elapsed.as_secs_f64());
}

/// A blob of `n` bytes sent by object storage at a presigned URL berth redirected to.
pub fn blob_bytes_redirected(n: u64) {
    metrics::counter!("berth_blob_redirected_bytes_total").increment(n);
}

/// Counts blob bytes handed to clients (counted once per response, not per piece).
pub fn blob_bytes_served(n: u64) {
    metrics::counter!("berth_blob_bytes_served_total").increment(n);
}

/// Counts response body bytes handed to connections.
pub fn response_bytes(n: u64) {
    metrics::counter!("berth_http_response_bytes_total").increment(n);
}

/// Counts a response body that ended before its last byte, by reason.
pub fn response_aborted(reason: &'static str) {
    metrics::counter!("berth_http_responses_aborted_total", "reason" => reason).increment(1);
}

/// Counts request body bytes read by the HTTP/1.1 driver itself (pushes on plain listeners).
pub fn driven_body_bytes(n: u64) {
    metrics::counter!("berth_upload_driven_bytes_total").increment(n);
}

/// Counts blob bytes sent with `sendfile` (a part of the bytes served).
pub fn sendfile_bytes(n: u64) {
    metrics::counter!("berth_sendfile_bytes_total").increment(n);
}

/// Sets the bytes held by the blob store.
pub fn storage_bytes(n: u64) {
    STORAGE_BYTES.store(n, std::sync::atomic::Ordering::Relaxed);
    metrics::gauge!("berth_storage_bytes").set(n as f64);
}

/// A login with an unknown key or a wrong secret.
pub fn login_failed() {
    metrics::counter!("berth_auth_failed_logins_total").increment(1);
}

/// A token issued by `/service/token`.
pub fn token_issued() {
    metrics::counter!("berth_auth_tokens_issued_total").increment(1);
}

/// A connection refused by a private listener's allow list.
pub fn connection_refused() {
    metrics::counter!("berth_connections_refused_total").increment(1);
}

/// A webhook delivery outcome: `delivered`, `failed`, `dropped` (queue full) or `retried`.
pub fn webhook_delivery(result: &'static str) {
    metrics::counter!("berth_webhook_deliveries_total", "result" => result).increment(1);
}

/// Webhook deliveries waiting in the policies' queues.
pub fn webhook_queue_depth(n: u64) {
    metrics::gauge!("berth_webhook_queue_depth").set(n as f64);
}

/// A connection accepted (gauge `berth_open_connections`).
pub fn connection_opened() {
    metrics::gauge!("berth_open_connections").increment(1.0);
}

/// A connection ended.
pub fn connection_closed() {
    metrics::gauge!("berth_open_connections").decrement(1.0);
}

/// A connection closed at once because its listener had `limits.max_connections` open.
pub fn connection_over_limit() {
    metrics::counter!("berth_connections_over_limit_total").increment(1);
}

/// Free bytes on the data directory's volume.
pub fn storage_free_bytes(n: u64) {
    metrics::gauge!("berth_storage_free_bytes").set(n as f64);
}
