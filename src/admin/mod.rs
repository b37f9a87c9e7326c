//! Admin operations behind the CLI: on the data directory (server stopped) or through a running
//! server's HTTP endpoints (`remote`, the management API).

pub mod prefetch;
pub mod remote;
pub mod stats;
pub mod users;

use crate::config::{Config, ImageCacheConfig, RegistryConfig, RegistryKind};
use crate::store::meta::{Meta, RegistryRecord};

/// Opens the metadata of the configured data directory, with a hint when the server holds it.
pub fn open_meta(config: &Config) -> Result<Meta, String> {
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|e| format!("{}: {e}", config.data_dir.display()))?;
    Meta::open(&config.data_dir).map_err(|e| {
        format!(
            "cannot open metadata in {}: {e} (is `berth serve` running on this data directory? stop it first)",
            config.data_dir.display()
        )
    })
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Checks a registry's type against the image cache it names (CLI and API alike).
pub fn check_kind(meta: &Meta, kind: RegistryKind, cache: Option<&str>) -> Result<(), String> {
    match (kind, cache) {
        (RegistryKind::Cache, None) => Err(
            "a registry of type cache needs the image cache it serves (--cache, or \"cache\" in the API)"
                .into(),
        ),
        (RegistryKind::Normal, Some(_)) => {
            Err("only registries of type cache name an image cache".into())
        }
        (RegistryKind::Cache, Some(c)) if meta.image_cache(c).map_err(err)?.is_none() => Err(
            format!("image cache {c:?} does not exist (create it with `berth cache create {c} ...`)"),
        ),
        _ => Ok(()),
    }
}

/// Creates a registry with the settings of a `[[registry]]` table.
pub fn create_registry(meta: &Meta, settings: &RegistryConfig) -> Result<(), String> {
    crate::oci::reference::validate_registry_name(&settings.name).map_err(err)?;
    if meta.registry(&settings.name).map_err(err)?.is_some() {
        return Err(format!("registry {:?} already exists", settings.name));
    }
    check_kind(meta, settings.kind, settings.cache.as_deref())?;
    meta.put_registry(&RegistryRecord::new(settings))
        .map_err(err)?;
    meta.flush_blocking().map_err(err)
}

/// Creates or replaces an image cache, after checking it builds a usable source.
pub fn put_image_cache(
    meta: &Meta,
    config: &Config,
    cache: ImageCacheConfig,
    replace: bool,
) -> Result<(), String> {
    crate::oci::reference::validate_registry_name(&cache.name).map_err(err)?;
    let exists = meta.image_cache(&cache.name).map_err(err)?.is_some();
    match (exists, replace) {
        (true, false) => {
            return Err(format!(
                "image cache {:?} already exists (use `berth cache update`)",
                cache.name
            ))
        }
        (false, true) => return Err(format!("image cache {:?} does not exist", cache.name)),
        _ => {}
    }
    crate::cache::upstream::Source::new(cache.clone(), &config.pull_through.allowed_ports)?;
    meta.put_image_cache(&cache).map_err(err)?;
    meta.flush_blocking().map_err(err)
}

/// Registries that serve an image cache.
pub fn registries_using(meta: &Meta, name: &str) -> Result<Vec<String>, String> {
    Ok(meta
        .registries()
        .map_err(err)?
        .into_iter()
        .filter(|r| r.cache.as_deref() == Some(name))
        .map(|r| r.name)
        .collect())
}

/// Deletes an image cache unless a registry still uses it.
pub fn delete_image_cache(meta: &Meta, name: &str) -> Result<(), String> {
    let users = registries_using(meta, name)?;
    if !users.is_empty() {
        return Err(format!(
            "image cache {name:?} is used by registry {} (delete or change that registry first)",
            users.join(", ")
        ));
    }
    if !meta.delete_image_cache(name).map_err(err)? {
        return Err(format!("image cache {name:?} does not exist"));
    }
    meta.flush_blocking().map_err(err)
}

/// The JSON of a registry (the management API's shape).
pub fn registry_json(meta: &Meta, r: &RegistryRecord) -> Result<serde_json::Value, sled::Error> {
    let images = meta.repositories(Some(&r.name), None, usize::MAX)?.len();
    Ok(serde_json::json!({
        "name": r.name,
        "type": r.kind,
        "cache": r.cache,
        "public_uri": r.public_uri,
        "anonymous_pull": r.anonymous_pull,
        "created": crate::api::rfc3339(r.created_ms),
        "image_count": images,
    }))
}

/// A change to an image cache: only the fields given change. The body of the API's PATCH, and
/// what `berth cache create|update` apply (locally, or sent as that body with `--server`).
#[derive(Debug, Default, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct CachePatch {
    /// Source kind.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<crate::config::SourceKind>,
    /// Source URL.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// User.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Password or token (write-only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// Credentials file on the server.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credentials_file: Option<std::path::PathBuf>,
    /// Fetch budget, e.g. `200s`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fetch_budget: Option<String>,
    /// Revalidation TTL, e.g. `30s`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revalidate_ttl: Option<String>,
    /// ECR region.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// ECR API endpoint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ecr_endpoint: Option<String>,
}

impl CachePatch {
    /// Applies the given fields; a duration that does not parse is refused with its field name.
    pub fn apply(self, c: &mut ImageCacheConfig) -> Result<(), String> {
        let duration = |field: &str, text: &str| {
            humantime::parse_duration(text)
                .map_err(|e| format!("{field}: {text:?} is not a duration: {e}"))
        };
        if let Some(k) = self.kind {
            c.kind = k;
        }
        if let Some(u) = self.url {
            c.url = u;
        }
        if let Some(u) = self.username {
            c.username = Some(u);
        }
        if let Some(p) = self.password {
            c.password = Some(p);
        }
        if let Some(f) = self.credentials_file {
            c.credentials_file = Some(f);
        }
        if let Some(b) = self.fetch_budget {
            c.fetch_budget = duration("fetch_budget", &b)?;
        }
        if let Some(t) = self.revalidate_ttl {
            c.revalidate_ttl = duration("revalidate_ttl", &t)?;
        }
        if let Some(r) = self.region {
            c.region = Some(r);
        }
        if let Some(e) = self.ecr_endpoint {
            c.ecr_endpoint = Some(e);
        }
        Ok(())
    }
}

/// One line describing an image cache; credentials are never shown, only whether they are set.
pub fn describe_image_cache(c: &ImageCacheConfig) -> serde_json::Value {
    let credentials = match (&c.credentials_file, &c.username, &c.password) {
        (Some(f), _, _) => format!("file {}", f.display()),
        (None, Some(u), Some(_)) => format!("user {u}, password set"),
        (None, Some(u), None) => format!("user {u}"),
        (None, None, Some(_)) => "password set".into(),
        (None, None, None) => "anonymous".into(),
    };
    serde_json::json!({
        "name": c.name,
        "kind": c.kind.to_string(),
        "url": c.url,
        "credentials": credentials,
        "fetch_budget": humantime::format_duration(c.fetch_budget).to_string(),
        "revalidate_ttl": humantime::format_duration(c.revalidate_ttl).to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SourceKind;

    fn source(name: &str) -> ImageCacheConfig {
        ImageCacheConfig {
            username: Some("u".into()),
            password: Some("s3cret".into()),
            ..ImageCacheConfig::new(name, SourceKind::Registry, "https://registry.example")
        }
    }

    #[test]
    fn image_cache_lifecycle_and_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            data_dir: dir.path().to_path_buf(),
            ..Config::default()
        };
        let meta = open_meta(&config).unwrap();
        put_image_cache(&meta, &config, source("up"), false).unwrap();
        assert!(put_image_cache(&meta, &config, source("up"), false).is_err());
        assert!(put_image_cache(&meta, &config, source("nope"), true).is_err());
        let shown = describe_image_cache(&meta.image_cache("up").unwrap().unwrap()).to_string();
        assert!(!shown.contains("s3cret"), "{shown}");
        let hub = |cache: Option<&str>| RegistryConfig {
            name: "hub".into(),
            kind: RegistryKind::Cache,
            cache: cache.map(str::to_string),
            public_uri: true,
            anonymous_pull: false,
        };
        assert!(create_registry(&meta, &hub(None)).is_err());
        assert!(create_registry(&meta, &hub(Some("missing"))).is_err());
        create_registry(&meta, &hub(Some("up"))).unwrap();
        assert!(create_registry(&meta, &hub(Some("up"))).is_err(), "exists");
        let e = delete_image_cache(&meta, "up").unwrap_err();
        assert!(e.contains("registry hub"), "{e}");
        meta.delete_registry("hub").unwrap();
        delete_image_cache(&meta, "up").unwrap();
        let mut bad = source("bad");
        bad.url = "not a url".into();
        assert!(put_image_cache(&meta, &config, bad, false).is_err());
    }
}
