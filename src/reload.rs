//! Reload without a restart (SIGHUP, `POST /api/v1/reload`, `berth reload`): TLS certificates
//! re-read from their files, and from the config file the parts that can change at run time
//! (registries and image caches it declares, replication endpoints and rules, the log filter).
//! Everything else is reported as needing a restart; nothing is half-applied (the config is
//! checked as at start first).

use std::sync::{Arc, OnceLock};

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::http::tls::CertFiles;
use crate::App;

/// What a reload acts on besides the App: the listeners' certificates.
#[derive(Default)]
pub struct Reloadable {
    certs: parking_lot::Mutex<Vec<(String, Arc<CertFiles>)>>,
    /// One reload at a time.
    running: tokio::sync::Mutex<()>,
    /// The log filter a reload set (`None`: the one the server started with).
    log: parking_lot::Mutex<Option<String>>,
}

impl Reloadable {
    /// Adds a TLS listener's certificate (`listen`: the listener's configured address).
    pub fn add_certificate(&self, listen: String, cert: Arc<CertFiles>) {
        self.certs.lock().push((listen, cert));
    }
}

/// What a reload did (`POST /api/v1/reload`, `berth reload`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReloadReport {
    /// What was applied from the config file (registries, image caches, the log filter).
    pub applied: Vec<String>,
    /// Every TLS listener's certificate: re-read, or kept with the reason.
    pub certificates: Vec<CertificateReload>,
    /// The config file read, or why none was.
    pub config: String,
    /// Why (part of) the config file was not applied; empty when all went well.
    pub problems: Vec<String>,
    /// Sections of the config file that changed but apply only at the next restart.
    pub restart_needed: Vec<String>,
}

/// A TLS listener's certificate in a reload.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CertificateReload {
    /// Its certificate file.
    pub cert: String,
    /// Why the new certificate was not taken (the old one stays); absent when it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The listener (its configured address).
    pub listen: String,
}

/// Changes the process's log filter (set once by whoever installed the logger).
pub type LogFilterHook = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

static LOG_FILTER: OnceLock<LogFilterHook> = OnceLock::new();

/// Lets reloads change the log filter (the CLI's `serve` installs it with the logger).
pub fn set_log_filter_hook(hook: LogFilterHook) {
    let _ = LOG_FILTER.set(hook);
}

/// Reloads what can change at run time and says what happened to each part.
pub async fn reload(app: &App) -> ReloadReport {
    let _one = app.reloadable.running.lock().await;
    let mut report = ReloadReport::default();
    let certs = app.reloadable.certs.lock().clone();
    for (listen, cert) in certs {
        let error = cert.reload().err();
        match &error {
            Some(e) => {
                tracing::error!(%listen, error = %e, "reload: certificate kept, the new one is unusable")
            }
            None => {
                tracing::info!(%listen, cert = %cert.cert_path().display(), "reload: certificate re-read")
            }
        }
        report.certificates.push(CertificateReload {
            listen,
            cert: cert.cert_path().display().to_string(),
            error,
        });
    }
    let Some(path) = app.config.source.clone() else {
        report.config = "no config file: the embedded defaults do not change".into();
        return report;
    };
    report.config = path.display().to_string();
    let fresh = match Config::load(Some(&path)) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(config = %path.display(), error = %e, "reload: config refused, nothing changed");
            report.problems.push(e.to_string());
            return report;
        }
    };
    report.restart_needed = needs_restart(&app.config, &fresh);
    if let Err(e) = crate::apply_config(&app.store, &fresh).await {
        tracing::error!(config = %path.display(), error = %e, "reload: registries and image caches unchanged");
        report.problems.push(e.to_string());
    } else {
        for c in &fresh.image_cache {
            match app.cache.load(&*app.store.meta, &c.name).await {
                Ok(()) => report.applied.push(format!("image_cache {}", c.name)),
                Err(e) => report.problems.push(e),
            }
        }
        report.applied.extend(
            fresh
                .registry
                .iter()
                .map(|r| format!("registry {}", r.name)),
        );
        // A cache registry the file adds gets the default cleanup now, as at a start.
        if let Err(e) = crate::scheduler::default_cache_cleanups(app).await {
            report
                .problems
                .push(format!("default cleanup of cache registries: {e}"));
        }
        match app.replication.apply(&fresh.replication).await {
            Ok(()) => {
                let endpoints = fresh.replication.endpoint.iter().map(|e| &e.name);
                let rules = fresh.replication.rule.iter().map(|r| &r.name);
                report
                    .applied
                    .extend(endpoints.map(|n| format!("replication endpoint {n}")));
                report
                    .applied
                    .extend(rules.map(|n| format!("replication rule {n}")));
            }
            Err(e) => report.problems.push(e),
        }
    }
    // Compared with the filter in effect, which an earlier reload may have changed (App.config
    // stays what the server started with: what a restart would change).
    let in_effect = app
        .reloadable
        .log
        .lock()
        .clone()
        .unwrap_or_else(|| app.config.log.clone());
    if fresh.log != in_effect {
        match (std::env::var_os("RUST_LOG"), LOG_FILTER.get()) {
            (Some(_), _) => report
                .restart_needed
                .push("log (RUST_LOG is set and wins over the config)".into()),
            (None, Some(set)) => match set(&fresh.log) {
                Ok(()) => {
                    *app.reloadable.log.lock() = Some(fresh.log.clone());
                    report.applied.push(format!("log = {:?}", fresh.log));
                }
                Err(e) => report.problems.push(format!("log: {e}")),
            },
            (None, None) => report.restart_needed.push("log".into()),
        }
    }
    for r in &report.restart_needed {
        tracing::warn!(part = %r, "reload: changed in the config file, applies at the next restart");
    }
    report
}

/// The sections of the config a reload cannot apply, where the file now differs from what the
/// server runs with.
fn needs_restart(running: &Config, fresh: &Config) -> Vec<String> {
    fn differ<T: serde::Serialize>(a: &T, b: &T) -> bool {
        serde_json::to_value(a).ok() != serde_json::to_value(b).ok()
    }
    let mut out = Vec::new();
    let mut check = |name: &str, changed: bool| {
        if changed {
            out.push(name.to_string());
        }
    };
    check("data_dir", running.data_dir != fresh.data_dir);
    check("listen", differ(&running.listen, &fresh.listen));
    check("limits", differ(&running.limits, &fresh.limits));
    check("memory", differ(&running.memory, &fresh.memory));
    check("mirror", differ(&running.mirror, &fresh.mirror));
    check(
        "pull_through",
        differ(&running.pull_through, &fresh.pull_through),
    );
    check(
        "shutdown_grace",
        running.shutdown_grace != fresh.shutdown_grace,
    );
    check("log_format", running.log_format != fresh.log_format);
    check("auth", differ(&running.auth, &fresh.auth));
    check("webhooks", differ(&running.webhooks, &fresh.webhooks));
    check("egress", differ(&running.egress, &fresh.egress));
    check("storage", differ(&running.storage, &fresh.storage));
    check("metadata", running.metadata != fresh.metadata);
    // Endpoints and rules apply at once; how blobs travel needs a restart.
    let travel = |r: &crate::config::ReplicationConfig| {
        (
            r.allowed_ports.clone(),
            r.chunk_bytes,
            r.attempts,
            r.request_timeout,
        )
    };
    check(
        "replication (allowed_ports, chunk_bytes, attempts, request_timeout)",
        travel(&running.replication) != travel(&fresh.replication),
    );
    out
}
