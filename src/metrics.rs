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
        handle
    })
}

/// The text exposition.
pub fn render() -> String {
    init().render()
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

/// Counts blob bytes handed to clients (counted once per response, not per piece).
pub fn blob_bytes_served(n: u64) {
    metrics::counter!("berth_blob_bytes_served_total").increment(n);
}

/// Counts blob bytes sent with `sendfile` (a part of the bytes served).
pub fn sendfile_bytes(n: u64) {
    metrics::counter!("berth_sendfile_bytes_total").increment(n);
}

/// Sets the bytes held by the blob store.
pub fn storage_bytes(n: u64) {
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
