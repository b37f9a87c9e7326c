//! TOML configuration: embedded defaults, parsing and validation with clear errors.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Whole server configuration; every field has a default so `berth serve` runs with no file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where blobs, uploads and metadata live.
    pub data_dir: PathBuf,
    /// Listeners; at least one.
    pub listen: Vec<Listen>,
    /// Registries created (or updated) at start.
    pub registry: Vec<RegistryConfig>,
    /// Limits on requests and resources.
    pub limits: Limits,
    /// In-memory caches for hot lookups.
    pub cache: MemoryCache,
    /// How long in-flight requests may run after SIGTERM/SIGINT.
    #[serde(with = "humantime_serde_compat")]
    pub shutdown_grace: Duration,
    /// Log filter (tracing `EnvFilter` syntax); `RUST_LOG` overrides it.
    pub log: String,
}

/// One listening socket.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    /// Address and port, e.g. `0.0.0.0:5000`; port 0 picks a free port.
    pub addr: SocketAddr,
    /// PEM certificate chain; with `tls_key` turns on TLS.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key.
    pub tls_key: Option<PathBuf>,
}

/// A registry (namespace) declared in the config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// First path segment of every image in it.
    pub name: String,
    /// `normal` (push and pull) or `cache` (pull-through).
    #[serde(rename = "type", default)]
    pub kind: RegistryKind,
}

/// Type of a registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RegistryKind {
    /// Push and pull.
    #[default]
    Normal,
    /// Pull-through cache of a source registry; push refused.
    Cache,
}

impl std::fmt::Display for RegistryKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RegistryKind::Normal => "normal",
            RegistryKind::Cache => "cache",
        })
    }
}

impl std::str::FromStr for RegistryKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "normal" => Ok(RegistryKind::Normal),
            "cache" => Ok(RegistryKind::Cache),
            other => Err(format!(
                "unknown registry type {other:?} (expected normal or cache)"
            )),
        }
    }
}

/// Request and resource limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest manifest accepted on push, in bytes (OCI recommends 4 MiB).
    pub max_manifest_bytes: usize,
    /// Largest total size of request headers, in bytes.
    pub max_header_bytes: usize,
    /// Page size of tag and catalog lists when the client gives no `n`.
    pub default_page_size: usize,
    /// Largest `n` honoured in tag and catalog lists.
    pub max_page_size: usize,
    /// Upload sessions untouched for this long are removed.
    #[serde(with = "humantime_serde_compat")]
    pub upload_expiry: Duration,
}

/// Sizes of the in-memory hot caches.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MemoryCache {
    /// Memory bound for cached manifests (bytes of manifest bodies).
    pub manifest_bytes: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("./berth-data"),
            listen: vec![Listen {
                addr: SocketAddr::from(([127, 0, 0, 1], 5000)),
                tls_cert: None,
                tls_key: None,
            }],
            registry: Vec::new(),
            limits: Limits::default(),
            cache: MemoryCache::default(),
            shutdown_grace: Duration::from_secs(30),
            log: "info".to_string(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_manifest_bytes: 4 * 1024 * 1024,
            max_header_bytes: 64 * 1024,
            default_page_size: 1000,
            max_page_size: 10_000,
            upload_expiry: Duration::from_secs(24 * 3600),
        }
    }
}

impl Default for MemoryCache {
    fn default() -> Self {
        MemoryCache {
            manifest_bytes: 64 * 1024 * 1024,
        }
    }
}

/// A configuration that could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The TOML is malformed or has unknown keys.
    #[error("invalid config {path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    /// The values are inconsistent.
    #[error("invalid config: {0}")]
    Invalid(String),
}

impl Config {
    /// Loads a config file, or the embedded defaults when `path` is `None`.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let config = match path {
            None => Config::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                Config::from_toml(&text).map_err(|e| match e {
                    ConfigError::Parse { source, .. } => ConfigError::Parse {
                        path: path.to_path_buf(),
                        source,
                    },
                    other => other,
                })?
            }
        };
        config.validate()?;
        Ok(config)
    }

    /// Parses TOML text (without validation).
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: PathBuf::from("<text>"),
            source,
        })
    }

    /// Checks the values that serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.listen.is_empty() {
            return Err(ConfigError::Invalid(
                "at least one [[listen]] is required".into(),
            ));
        }
        for l in &self.listen {
            if l.tls_cert.is_some() != l.tls_key.is_some() {
                return Err(ConfigError::Invalid(format!(
                    "listen {}: tls_cert and tls_key must be given together",
                    l.addr
                )));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for r in &self.registry {
            crate::oci::reference::validate_registry_name(&r.name)
                .map_err(|e| ConfigError::Invalid(format!("registry {:?}: {e}", r.name)))?;
            if !seen.insert(&r.name) {
                return Err(ConfigError::Invalid(format!(
                    "registry {:?} declared twice",
                    r.name
                )));
            }
        }
        if self.limits.max_manifest_bytes == 0 || self.limits.default_page_size == 0 {
            return Err(ConfigError::Invalid(
                "limits.max_manifest_bytes and limits.default_page_size must be positive".into(),
            ));
        }
        Ok(())
    }
}

/// `"30s"`, `"2h"` durations in TOML.
mod humantime_serde_compat {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_need_no_file() {
        let c = Config::load(None).unwrap();
        assert_eq!(c.listen[0].addr.port(), 5000);
        assert_eq!(c.data_dir, PathBuf::from("./berth-data"));
    }

    #[test]
    fn parses_listeners_registries_and_durations() {
        let c = Config::from_toml(
            r#"
            data_dir = "/var/lib/berth"
            shutdown_grace = "5s"
            [[listen]]
            addr = "0.0.0.0:443"
            tls_cert = "/c.pem"
            tls_key = "/k.pem"
            [[registry]]
            name = "library"
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.shutdown_grace, Duration::from_secs(5));
        assert_eq!(c.registry[0].kind, RegistryKind::Normal);
    }

    #[test]
    fn example_config_documents_the_defaults() {
        let example = Config::from_toml(include_str!("../config.example.toml")).unwrap();
        example.validate().unwrap();
        // The example shows every default; both render the same once parsed.
        assert_eq!(format!("{example:?}"), format!("{:?}", Config::default()));
    }

    #[test]
    fn rejects_unknown_keys_and_bad_values() {
        assert!(Config::from_toml("lisen = []").is_err());
        let c = Config::from_toml("[[registry]]\nname = \"Bad\"").unwrap();
        assert!(c.validate().is_err());
        let c = Config::from_toml("[[listen]]\naddr = \"127.0.0.1:1\"\ntls_cert = \"/x\"").unwrap();
        assert!(c.validate().is_err());
    }
}
