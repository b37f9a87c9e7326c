//! TOML configuration: embedded defaults, parsing and validation with clear errors.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::durations as humantime_serde_compat;

use crate::store::meta::{
    now_ms, CredentialRecord, ImageCacheRecord, ImageCacheSettings, RegistryRecord,
};
pub use crate::store::meta::{RegistryKind, SourceKind};

/// Whole server configuration; every field has a default so `berth serve` runs with no file.
#[derive(Debug, Clone, Deserialize, Serialize)]
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
    pub memory: MemoryCache,
    /// Source registries that cache-type registries pull through.
    pub image_cache: Vec<ImageCacheConfig>,
    /// Docker daemon mirror mode.
    pub mirror: MirrorConfig,
    /// Behaviour shared by all image caches.
    pub pull_through: PullThrough,
    /// How long in-flight requests may run after SIGTERM/SIGINT.
    #[serde(with = "humantime_serde_compat")]
    pub shutdown_grace: Duration,
    /// Log filter (tracing `EnvFilter` syntax); `RUST_LOG` overrides it.
    pub log: String,
    /// `text` (one line per event, for people) or `json` (one JSON object per event, for log
    /// collectors).
    pub log_format: LogFormat,
    /// Users, access keys and Docker token auth.
    pub auth: AuthConfig,
    /// Webhook delivery.
    pub webhooks: WebhookConfig,
    /// Replication: endpoints, rules and how blobs travel.
    pub replication: ReplicationConfig,
    /// Where metadata lives: sled in the data directory, or PostgreSQL shared by several nodes.
    pub metadata: crate::store::meta::MetadataSettings,
    /// Where berth may connect on a source's or a user's say-so (redirects, token realms,
    /// webhook targets).
    pub egress: EgressConfig,
    /// Where blob bytes live: the data directory (default) or an S3-compatible bucket.
    pub storage: crate::store::BlobBackend,
    /// How nodes that share one database and one bucket work together.
    pub cluster: ClusterConfig,
    /// The file this config was read from (`None`: the embedded defaults); reloads read it.
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

/// The destination policy for redirects, foreign token realms and webhook targets (`[egress]`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct EgressConfig {
    /// Address ranges berth never connects to on someone else's say-so (checked on the resolved
    /// address); the IP of every listener bound to a specific address is added.
    pub denied_networks: Vec<ipnet::IpNet>,
    /// Exceptions that win over `denied_networks` and the listener addresses (e.g. a webhook
    /// receiver on this host).
    pub allowed_networks: Vec<ipnet::IpNet>,
}

impl Default for EgressConfig {
    fn default() -> Self {
        let nets = [
            "127.0.0.0/8",
            "::1/128",
            "0.0.0.0/8",
            "::/128",
            "169.254.0.0/16",
            "fe80::/10",
        ];
        EgressConfig {
            denied_networks: nets
                .iter()
                .map(|n| n.parse().expect("built-in network parses"))
                .collect(),
            allowed_networks: Vec::new(),
        }
    }
}

/// Nodes over one PostgreSQL database and one bucket (`[cluster]`).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Where the other nodes reach this one (`http://10.0.0.11:5000`): a node asked for a
    /// blob that another node is fetching from the source streams it from there. Default: the
    /// first listener, when it is bound to a specific address.
    pub advertise_url: Option<String>,
}

/// Whether requests must authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// On as soon as one user exists (a fresh data directory is open until the first admin).
    #[default]
    Auto,
    /// Always on: with no user, nothing but anonymous pull of `anonymous_pull` registries works.
    On,
    /// Off: everyone may do everything (a registry on a trusted loopback or lab network).
    Off,
}

/// Users, access keys and Docker token auth (`[auth]`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// `auto`, `on` or `off`.
    pub mode: AuthMode,
    /// `service` of the token challenge and the `aud` of issued tokens.
    pub service: String,
    /// Token endpoint URL sent in challenges; default `http(s)://<Host header>/service/token`.
    pub realm: Option<String>,
    /// Lifetime of issued tokens (at most 12 hours).
    #[serde(with = "humantime_serde_compat")]
    pub token_lifetime: Duration,
    /// Failed logins (per access key, and per client address) before answers are slowed down.
    pub failed_login_limit: u32,
    /// Window in which failed logins are counted.
    #[serde(with = "humantime_serde_compat")]
    pub failed_login_window: Duration,
    /// Access-key secrets checked (argon2) at the same time; further logins wait for a turn.
    pub max_concurrent_logins: usize,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            mode: AuthMode::Auto,
            service: "berth".into(),
            realm: None,
            token_lifetime: Duration::from_secs(15 * 60),
            failed_login_limit: 5,
            failed_login_window: Duration::from_secs(15 * 60),
            max_concurrent_logins: 4,
        }
    }
}

/// Webhook delivery (`[webhooks]`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookConfig {
    /// Ports webhook targets may use; empty allows any.
    pub allowed_ports: Vec<u16>,
    /// Deliveries waiting per webhook policy; more are dropped (counted and logged).
    pub queue_size: usize,
    /// Attempts per delivery before it is marked failed.
    pub max_attempts: u32,
    /// Delay before the first retry; doubled after each failure.
    #[serde(with = "humantime_serde_compat")]
    pub retry_initial: Duration,
    /// Longest delay between retries.
    #[serde(with = "humantime_serde_compat")]
    pub retry_max: Duration,
    /// Deadline of one delivery attempt.
    #[serde(with = "humantime_serde_compat")]
    pub timeout: Duration,
    /// Delivery log entries kept per policy.
    pub log_keep: usize,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            allowed_ports: vec![80, 88, 443, 8443],
            queue_size: 1000,
            max_attempts: 10,
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(300),
            timeout: Duration::from_secs(10),
            log_keep: 200,
        }
    }
}

/// Replication (`[replication]`, `[[replication.endpoint]]`, `[[replication.rule]]`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplicationConfig {
    /// Ports endpoints may use; empty allows any.
    pub allowed_ports: Vec<u16>,
    /// Bytes sent per `PATCH` of a blob upload: what a cut link may cost to send again.
    pub chunk_bytes: u64,
    /// Attempts per blob or manifest within one task, with backoff (`Retry-After` honoured).
    pub attempts: u32,
    /// Deadline of one request (a chunk included); a stalled transfer ends and resumes.
    #[serde(with = "humantime_serde_compat")]
    pub request_timeout: Duration,
    /// Endpoints created (or replaced) at start.
    pub endpoint: Vec<crate::replication::endpoint::EndpointSpec>,
    /// Rules created (or replaced) at start.
    pub rule: Vec<crate::replication::rule::Rule>,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        ReplicationConfig {
            allowed_ports: Vec::new(),
            chunk_bytes: 8 << 20,
            attempts: 5,
            request_timeout: Duration::from_secs(300),
            endpoint: Vec::new(),
            rule: Vec::new(),
        }
    }
}

/// How log events are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One line per event.
    #[default]
    Text,
    /// One JSON object per event, its fields as keys.
    Json,
}

/// One listening socket.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    /// Address and port, e.g. `0.0.0.0:5000`; port 0 picks a free port.
    pub addr: SocketAddr,
    /// PEM certificate chain; with `tls_key` turns on TLS.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key.
    pub tls_key: Option<PathBuf>,
    /// `public`: registries with `public_uri = false` do not exist here. `private`: all
    /// registries are served, to the addresses in `allow` only.
    #[serde(default)]
    pub exposure: Exposure,
    /// Private listeners: client networks allowed to connect (CIDR); empty allows any.
    #[serde(default)]
    pub allow: Vec<ipnet::IpNet>,
    /// Plain listeners: blob bodies go from the file to the socket with `sendfile` on HTTP/1.1
    /// connections (TLS and HTTP/2 always copy through user space).
    #[serde(default = "yes")]
    pub sendfile: bool,
}

/// Who a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Exposure {
    /// Internet-facing: hides registries with `public_uri = false`.
    #[default]
    Public,
    /// Internal network: every registry, optionally only to allowed networks.
    Private,
}

/// A registry (namespace) declared in the config.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// First path segment of every image in it.
    pub name: String,
    /// `normal` (push and pull) or `cache` (pull-through).
    #[serde(rename = "type", default)]
    pub kind: RegistryKind,
    /// For `type = "cache"`: the `[[image_cache]]` it serves.
    #[serde(default)]
    pub cache: Option<String>,
    /// Reachable on public listeners (false: only on private ones).
    #[serde(default = "yes")]
    pub public_uri: bool,
    /// Anyone may pull without credentials (edge sites). Unset: on for the registry named in
    /// `[mirror]` (Docker daemons do not log in to a mirror), off for the others.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anonymous_pull: Option<bool>,
    /// Most bytes its images may store (distinct blobs and manifests, as
    /// `berth_registry_storage_bytes` counts them); a push past it is refused with 403. Unset
    /// or 0: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota_bytes: Option<u64>,
}

/// serde default for flags that are on unless turned off.
pub(crate) fn yes() -> bool {
    true
}

/// A source registry definition (`[[image_cache]]`, or `berth cache create`). Stored as an
/// [`ImageCacheRecord`] and a [`CredentialRecord`] ([`ImageCacheConfig::to_records`]); `Debug`
/// never shows the password.
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ImageCacheConfig {
    /// Name that cache registries refer to.
    pub name: String,
    /// Source kind.
    pub kind: SourceKind,
    /// Source URL as the user knows it (`https://hub.docker.com`, `https://ACCOUNT.dkr.ecr.REGION.amazonaws.com`, ...).
    pub url: String,
    /// User (ECR: access key id; GCR: `_json_key`; Quay: account_name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Password or token (ECR: secret access key; GCR: key JSON; Quay: docker_cli_password or the whole JSON).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// File holding the credentials instead: `{"username":…,"password":…}`, a GCR service-account
    /// key JSON, or Quay's `{"account_name":…,"docker_cli_password":…}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_file: Option<PathBuf>,
    /// How long one caching blob fetch may run before it stops and resumes on the next request.
    #[serde(default = "default_fetch_budget", with = "humantime_serde_compat")]
    pub fetch_budget: Duration,
    /// A tag revalidated within this time is served without asking the source (0: always ask).
    #[serde(default, with = "humantime_serde_compat")]
    pub revalidate_ttl: Duration,
    /// ECR: region (default: read from the URL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// ECR: API endpoint for GetAuthorizationToken (default `https://api.ecr.REGION.amazonaws.com`;
    /// set it for a VPC interface endpoint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ecr_endpoint: Option<String>,
}

impl ImageCacheConfig {
    /// An anonymous image cache with default budget and no TTL.
    pub fn new(name: &str, kind: SourceKind, url: &str) -> ImageCacheConfig {
        ImageCacheConfig {
            name: name.to_string(),
            kind,
            url: url.to_string(),
            username: None,
            password: None,
            credentials_file: None,
            fetch_budget: default_fetch_budget(),
            revalidate_ttl: Duration::ZERO,
            region: None,
            ecr_endpoint: None,
        }
    }

    /// The store's records of this definition: the image cache and its credentials.
    pub fn to_records(&self) -> (ImageCacheRecord, CredentialRecord) {
        (
            ImageCacheRecord {
                name: self.name.clone(),
                kind: self.kind,
                endpoint: self.url.clone(),
                settings: ImageCacheSettings {
                    fetch_budget_ms: self.fetch_budget,
                    revalidate_ttl_ms: self.revalidate_ttl,
                    region: self.region.clone(),
                    ecr_endpoint: self.ecr_endpoint.clone(),
                },
            },
            CredentialRecord {
                username: self.username.clone(),
                password: self.password.clone(),
                credentials_file: self.credentials_file.clone(),
            },
        )
    }

    /// The definition of a stored image cache and its credentials (`None`: anonymous).
    pub fn from_records(
        record: ImageCacheRecord,
        credentials: Option<CredentialRecord>,
    ) -> ImageCacheConfig {
        let credentials = credentials.unwrap_or_default();
        ImageCacheConfig {
            name: record.name,
            kind: record.kind,
            url: record.endpoint,
            username: credentials.username,
            password: credentials.password,
            credentials_file: credentials.credentials_file,
            fetch_budget: record.settings.fetch_budget_ms,
            revalidate_ttl: record.settings.revalidate_ttl_ms,
            region: record.settings.region,
            ecr_endpoint: record.settings.ecr_endpoint,
        }
    }
}

impl std::fmt::Debug for ImageCacheConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageCacheConfig")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("url", &self.url)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("credentials_file", &self.credentials_file)
            .field("fetch_budget", &self.fetch_budget)
            .field("revalidate_ttl", &self.revalidate_ttl)
            .field("region", &self.region)
            .field("ecr_endpoint", &self.ecr_endpoint)
            .finish()
    }
}

fn default_fetch_budget() -> Duration {
    Duration::from_secs(200)
}

/// Docker daemon mirror mode.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MirrorConfig {
    /// Cache registry that serves requests whose first path segment is not a registry
    /// (what a Docker daemon sends to its `registry-mirrors`).
    pub registry: Option<String>,
}

/// Settings shared by every image cache.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PullThrough {
    /// Source ports berth may connect to; empty allows any.
    pub allowed_ports: Vec<u16>,
    /// The default cleanup policy of cache registries keeps what was pulled within this long.
    #[serde(with = "humantime_serde_compat")]
    pub cleanup_unpulled_after: Duration,
    /// No longer used: garbage collection runs on its own schedule (daily by default; `berth gc
    /// schedule`). Accepted so that older configs still load; a value other than the default
    /// is warned about.
    #[serde(with = "humantime_serde_compat")]
    pub cleanup_interval: Duration,
    /// Partial blob fetches untouched for this long are removed.
    #[serde(with = "humantime_serde_compat")]
    pub partial_max_age: Duration,
    /// Blob files younger than this are never garbage-collected (what an interrupted push may
    /// come back for).
    #[serde(with = "humantime_serde_compat")]
    pub gc_grace: Duration,
    /// Deadline for a tag revalidation (HEAD) before the cached copy is served as stale.
    #[serde(with = "humantime_serde_compat")]
    pub revalidate_timeout: Duration,
    /// Largest blob a source may send when neither its `Content-Length` nor a cached manifest
    /// gives the size; a fetch that goes past it is stopped and discarded.
    pub max_blob_bytes: u64,
    /// Size cap of what the cache registries hold together: bytes, or `"N%"` of the data
    /// volume. None by default.
    pub cache_max_size: Option<SizeCap>,
    /// Eviction starts when the cache holds more than this percentage of the cap...
    pub evict_high_percent: u8,
    /// ...and evicts the least recently pulled until it holds at most this percentage.
    pub evict_low_percent: u8,
    /// How often the cache's size is compared with the cap.
    #[serde(with = "humantime_serde_compat")]
    pub evict_interval: Duration,
}

/// A size cap: bytes, or a percentage of the data volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "SizeCapText", into = "SizeCapText")]
pub enum SizeCap {
    /// Bytes.
    Bytes(u64),
    /// Percent of the data volume's size (1 to 100).
    Percent(u8),
}

/// How a [`SizeCap`] is written: an integer (bytes) or `"N%"`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SizeCapText {
    /// Bytes.
    Bytes(u64),
    /// `"N%"`.
    Text(String),
}

impl TryFrom<SizeCapText> for SizeCap {
    type Error = String;
    fn try_from(t: SizeCapText) -> Result<SizeCap, String> {
        match t {
            SizeCapText::Bytes(b) => Ok(SizeCap::Bytes(b)),
            SizeCapText::Text(s) => s
                .trim()
                .strip_suffix('%')
                .and_then(|n| n.trim().parse::<u8>().ok())
                .filter(|n| (1..=100).contains(n))
                .map(SizeCap::Percent)
                .ok_or_else(|| {
                    format!("{s:?} is neither a number of bytes nor a percentage like \"20%\"")
                }),
        }
    }
}

impl From<SizeCap> for SizeCapText {
    fn from(c: SizeCap) -> SizeCapText {
        match c {
            SizeCap::Bytes(b) => SizeCapText::Bytes(b),
            SizeCap::Percent(p) => SizeCapText::Text(format!("{p}%")),
        }
    }
}

impl SizeCap {
    /// The cap in bytes on a volume of `volume_bytes`.
    pub fn bytes(&self, volume_bytes: u64) -> u64 {
        match *self {
            SizeCap::Bytes(b) => b,
            SizeCap::Percent(p) => volume_bytes / 100 * u64::from(p),
        }
    }
}

impl Default for PullThrough {
    fn default() -> Self {
        PullThrough {
            allowed_ports: Vec::new(),
            cleanup_unpulled_after: Duration::from_secs(7 * 24 * 3600),
            cleanup_interval: Duration::from_secs(3600),
            partial_max_age: Duration::from_secs(2 * 3600),
            gc_grace: Duration::from_secs(2 * 3600),
            revalidate_timeout: Duration::from_secs(10),
            max_blob_bytes: 64 << 30,
            cache_max_size: None,
            evict_high_percent: 90,
            evict_low_percent: 80,
            evict_interval: Duration::from_secs(60),
        }
    }
}

/// Request and resource limits.
#[derive(Debug, Clone, Deserialize, Serialize)]
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
    /// Open connections per listener; a connection over the cap is closed at once.
    pub max_connections: usize,
    /// How long a new connection may take to deliver its first complete request head
    /// (TLS handshake included; h1 and h2 alike).
    #[serde(with = "humantime_serde_compat")]
    pub first_byte_timeout: Duration,
    /// How long a connection with no request in flight stays open (h1 keep-alive, idle h2).
    #[serde(with = "humantime_serde_compat")]
    pub idle_timeout: Duration,
    /// Interval of HTTP/2 keep-alive pings; a ping unanswered for as long closes the connection.
    #[serde(with = "humantime_serde_compat")]
    pub h2_keep_alive: Duration,
    /// Longest a client may send nothing in the middle of a request body.
    #[serde(with = "humantime_serde_compat")]
    pub body_idle_timeout: Duration,
    /// Longest a response may wait for a client that does not read it.
    #[serde(with = "humantime_serde_compat")]
    pub send_stall_timeout: Duration,
    /// Upload sessions open per repository.
    pub max_uploads_per_repository: usize,
    /// Upload sessions open in total.
    pub max_uploads: usize,
    /// Below this many free bytes on the data volume `/readyz` answers 503.
    pub min_free_bytes: u64,
}

/// Sizes of the in-memory hot caches.
#[derive(Debug, Clone, Deserialize, Serialize)]
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
                exposure: Exposure::Public,
                allow: Vec::new(),
                sendfile: true,
            }],
            registry: Vec::new(),
            limits: Limits::default(),
            memory: MemoryCache::default(),
            image_cache: Vec::new(),
            mirror: MirrorConfig::default(),
            pull_through: PullThrough::default(),
            shutdown_grace: Duration::from_secs(30),
            log: "info".to_string(),
            log_format: LogFormat::Text,
            auth: AuthConfig::default(),
            webhooks: WebhookConfig::default(),
            replication: ReplicationConfig::default(),
            metadata: Default::default(),
            egress: EgressConfig::default(),
            storage: Default::default(),
            cluster: ClusterConfig::default(),
            source: None,
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
            upload_expiry: Duration::from_secs(3600),
            max_connections: 4096,
            first_byte_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            h2_keep_alive: Duration::from_secs(30),
            body_idle_timeout: Duration::from_secs(30),
            send_stall_timeout: Duration::from_secs(60),
            max_uploads_per_repository: 64,
            max_uploads: 1024,
            min_free_bytes: 100 * 1024 * 1024,
        }
    }
}

impl Limits {
    /// Caps and deadlines must allow something: zero would refuse every connection or upload,
    /// or cut every connection at once.
    fn problems(&self, say: &mut impl FnMut(String)) {
        let counts = [
            ("max_connections", self.max_connections),
            ("max_uploads", self.max_uploads),
            (
                "max_uploads_per_repository",
                self.max_uploads_per_repository,
            ),
        ];
        for (name, value) in counts {
            if value == 0 {
                say(format!("limits.{name} must be at least 1"));
            }
        }
        let deadlines = [
            ("first_byte_timeout", self.first_byte_timeout),
            ("idle_timeout", self.idle_timeout),
            ("h2_keep_alive", self.h2_keep_alive),
            ("body_idle_timeout", self.body_idle_timeout),
            ("send_stall_timeout", self.send_stall_timeout),
            ("upload_expiry", self.upload_expiry),
        ];
        for (name, value) in deadlines {
            if value.is_zero() {
                say(format!("limits.{name} must be longer than 0"));
            }
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
        /// The config file.
        path: PathBuf,
        /// Why it could not be read.
        source: std::io::Error,
    },
    /// The TOML is malformed or has unknown keys.
    #[error("invalid config {path}: {source}")]
    Parse {
        /// The config file.
        path: PathBuf,
        /// What the TOML parser said.
        source: toml::de::Error,
    },
    /// The values are inconsistent.
    #[error("invalid config: {0}")]
    Invalid(String),
}

impl Config {
    /// Loads a config file, or the embedded defaults when `path` is `None`.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let config = Config::read(path)?;
        config.validate()?;
        Ok(config)
    }

    /// Reads a config file (or the embedded defaults) without checking its values.
    pub fn read(path: Option<&Path>) -> Result<Config, ConfigError> {
        Ok(match path {
            None => Config::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                let mut config = Config::from_toml(&text).map_err(|e| match e {
                    ConfigError::Parse { source, .. } => ConfigError::Parse {
                        path: path.to_path_buf(),
                        source,
                    },
                    other => other,
                })?;
                config.source = Some(path.to_path_buf());
                config
            }
        })
    }

    /// Parses TOML text (without validation).
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: PathBuf::from("<text>"),
            source,
        })
    }

    /// Checks the values that serde cannot; the error lists every problem.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let problems = self.problems();
        if problems.is_empty() {
            return Ok(());
        }
        Err(ConfigError::Invalid(problems.join("; ")))
    }

    /// Every value serde cannot check that is wrong, each said with how to fix it.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let mut say = |p: String| problems.push(p);
        let pt = &self.pull_through;
        if !(1..=100).contains(&pt.evict_high_percent)
            || pt.evict_low_percent >= pt.evict_high_percent
        {
            say(format!(
                "pull_through: evict_low_percent ({}) must be below evict_high_percent ({}), which is at most 100",
                pt.evict_low_percent, pt.evict_high_percent
            ));
        }
        if pt.evict_interval.is_zero() {
            say("pull_through.evict_interval must be at least 1s".into());
        }
        if let crate::store::BlobBackend::S3(s3) = &self.storage {
            if let Err(problem) = s3.validate() {
                say(problem);
            }
        }
        if let crate::store::meta::MetadataSettings::Postgres(pg) = &self.metadata {
            if let Err(problem) = pg.validate() {
                say(problem);
            }
        }
        if let Some(url) = &self.cluster.advertise_url {
            let usable = reqwest::Url::parse(url).is_ok_and(|u| {
                matches!(u.scheme(), "http" | "https")
                    && u.host().is_some()
                    && u.path() == "/"
                    && u.query().is_none()
            });
            if !usable {
                say(format!(
                    "cluster.advertise_url {url:?} must be an http:// or https:// URL of this node with no path"
                ));
            }
        }
        let rep = &self.replication;
        if !(64 * 1024..=1 << 30).contains(&rep.chunk_bytes) {
            say("replication.chunk_bytes must be 65536 to 1073741824".into());
        }
        if rep.attempts == 0 || rep.request_timeout.is_zero() {
            say("replication.attempts and replication.request_timeout must be above 0".into());
        }
        let endpoints: std::collections::HashSet<&str> =
            rep.endpoint.iter().map(|e| e.name.as_str()).collect();
        if endpoints.len() != rep.endpoint.len() {
            say("[[replication.endpoint]]: a name is declared twice".into());
        }
        let mut rules = std::collections::HashSet::new();
        for r in &rep.rule {
            if let Err(e) = r.check() {
                say(format!("[[replication.rule]] {:?}: {e}", r.name));
            }
            if !rules.insert(r.name.as_str()) {
                say(format!(
                    "[[replication.rule]] {:?} is declared twice",
                    r.name
                ));
            }
        }
        if self.listen.is_empty() {
            say("at least one [[listen]] is required".into());
        }
        let mut addrs = std::collections::HashSet::new();
        for l in &self.listen {
            // Port 0 asks the kernel for a free port: never the same twice.
            if l.addr.port() != 0 && !addrs.insert(l.addr) {
                say(format!(
                    "listen {}: the same address is declared twice",
                    l.addr
                ));
            }
            if l.exposure == Exposure::Public && !l.allow.is_empty() {
                say(format!(
                    "listen {}: `allow` is only for exposure = \"private\" listeners",
                    l.addr
                ));
            }
            if l.tls_cert.is_some() != l.tls_key.is_some() {
                say(format!(
                    "listen {}: tls_cert and tls_key must be given together",
                    l.addr
                ));
            }
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log) {
            say(format!("log = {:?} is not a log filter: {e}", self.log));
        }
        self.limits.problems(&mut say);
        let mut seen = std::collections::HashSet::new();
        for r in &self.registry {
            if let Err(e) = crate::oci::reference::validate_registry_name(&r.name) {
                say(format!("registry {:?}: {e}", r.name));
            }
            if !seen.insert(&r.name) {
                say(format!("registry {:?} declared twice", r.name));
            }
            match (r.kind, &r.cache) {
                (RegistryKind::Cache, None) => say(format!(
                    "registry {:?} has type = \"cache\" but no `cache = \"<image_cache name>\"`",
                    r.name
                )),
                (RegistryKind::Normal, Some(_)) => say(format!(
                    "registry {:?}: `cache` is only for type = \"cache\"",
                    r.name
                )),
                _ => {}
            }
        }
        let mut caches = std::collections::HashSet::new();
        for c in &self.image_cache {
            if let Err(e) = crate::oci::reference::validate_registry_name(&c.name) {
                say(format!("image_cache {:?}: {e}", c.name));
            }
            if !caches.insert(&c.name) {
                say(format!("image_cache {:?} declared twice", c.name));
            }
        }
        if self.auth.token_lifetime > MAX_TOKEN_LIFETIME || self.auth.token_lifetime.is_zero() {
            say(format!(
                "auth.token_lifetime must be between 1s and 12h, not {}",
                humantime::format_duration(self.auth.token_lifetime)
            ));
        }
        if self.webhooks.queue_size == 0 || self.webhooks.max_attempts == 0 {
            say("webhooks.queue_size and webhooks.max_attempts must be positive".into());
        }
        if self.limits.max_manifest_bytes == 0 || self.limits.default_page_size == 0 {
            say("limits.max_manifest_bytes and limits.default_page_size must be positive".into());
        }
        problems
    }

    /// The stored record of a `[[registry]]` table (created now).
    pub fn registry_record(&self, r: &RegistryConfig) -> RegistryRecord {
        RegistryRecord {
            name: r.name.clone(),
            kind: r.kind,
            created_ms: now_ms(),
            cache: r.cache.clone(),
            public_uri: r.public_uri,
            anonymous_pull: r
                .anonymous_pull
                .unwrap_or(self.mirror.registry.as_deref() == Some(r.name.as_str())),
            quota_bytes: r.quota_bytes.filter(|q| *q > 0),
        }
    }

    /// What is wrong with the registries and image caches this config leads to: `stored` is
    /// what the data directory holds (`None` when it cannot be read, as for `check-config`
    /// while the server runs: references this file does not resolve are then warnings).
    pub fn plan_problems(&self, stored: Option<&Stored>) -> Problems {
        let mut registries: std::collections::BTreeMap<&str, (RegistryKind, Option<&str>)> =
            Default::default();
        let mut caches: std::collections::BTreeSet<&str> = Default::default();
        if let Some(stored) = stored {
            for r in &stored.registries {
                registries.insert(&r.name, (r.kind, r.cache.as_deref()));
            }
            caches.extend(stored.image_caches.iter().map(String::as_str));
        }
        for r in &self.registry {
            registries.insert(&r.name, (r.kind, r.cache.as_deref()));
        }
        caches.extend(self.image_cache.iter().map(|c| c.name.as_str()));
        let mut out = Problems::default();
        if self.pull_through.cleanup_interval != PullThrough::default().cleanup_interval {
            out.warnings.push("pull_through.cleanup_interval no longer applies: garbage collection runs on its own schedule (daily at 00:00 UTC unless set with `berth gc schedule`), cleanups on each registry's (`berth cleanup schedule`)".into());
        }
        let unless_stored = " unless the data directory holds it (berth checks that at start)";
        for (name, (_, cache)) in &registries {
            let Some(cache) = cache else { continue };
            if !caches.contains(cache) {
                let p = format!(
                    "registry {name:?} serves image cache {cache:?}, which does not exist: declare it in [[image_cache]] or create it (`berth cache create {cache} ...`)"
                );
                match stored {
                    Some(_) => out.errors.push(p),
                    None => out.warnings.push(format!("{p}{unless_stored}")),
                }
            }
        }
        let Some(mirror) = self.mirror.registry.as_deref() else {
            return out;
        };
        match registries.get(mirror) {
            Some((RegistryKind::Cache, _)) => {}
            Some(_) => out.errors.push(format!(
                "mirror.registry {mirror:?} is a normal registry: it must be a cache registry (type = \"cache\") whose image cache is Docker Hub"
            )),
            None => {
                let p = format!(
                    "mirror.registry {mirror:?} is not a registry: declare [[registry]] name = {mirror:?}, type = \"cache\", cache = \"<the Docker Hub image cache>\""
                );
                match stored {
                    Some(_) => out.errors.push(p),
                    None => out.warnings.push(format!("{p}{unless_stored}")),
                }
            }
        }
        if mirror != SHADOWING_NAMESPACE && registries.contains_key(SHADOWING_NAMESPACE) {
            out.errors.push(format!(
                "registry {SHADOWING_NAMESPACE:?} shadows the mirror: a Docker daemon asks its mirror for every official image as library/NAME (`docker pull busybox` sends /v2/library/busybox/...), which would reach registry {SHADOWING_NAMESPACE:?} instead of mirror registry {mirror:?}, and the daemon would fall back to Docker Hub without a word. Rename that registry (move its images, then `berth registry delete {SHADOWING_NAMESPACE}`) or remove [mirror]"
            ));
        }
        out
    }

    /// The config as TOML, secrets replaced by `<redacted>` (for `check-config`).
    pub fn to_redacted_toml(&self) -> Result<String, String> {
        let mut shown = self.clone();
        for r in &mut shown.registry {
            r.anonymous_pull = Some(self.registry_record(r).anonymous_pull);
        }
        for c in &mut shown.image_cache {
            if c.password.is_some() {
                c.password = Some("<redacted>".into());
            }
        }
        if let crate::store::meta::MetadataSettings::Postgres(pg) = &mut shown.metadata {
            *pg = pg.redacted();
        }
        toml::to_string(&shown).map_err(|e| e.to_string())
    }
}

/// The Docker Hub namespace of every official image: a registry of this name would capture
/// what a Docker daemon asks its mirror for.
pub const SHADOWING_NAMESPACE: &str = "library";

/// What a data directory holds, for [`Config::plan_problems`].
#[derive(Debug, Default)]
pub struct Stored {
    /// Its registries.
    pub registries: Vec<RegistryRecord>,
    /// Names of its image caches.
    pub image_caches: Vec<String>,
}

/// Problems found in a config: errors refuse a start, warnings do not.
#[derive(Debug, Default)]
pub struct Problems {
    /// What `serve` refuses.
    pub errors: Vec<String>,
    /// What may be wrong, depending on what the data directory holds.
    pub warnings: Vec<String>,
}

/// Longest lifetime of an issued token.
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(12 * 3600);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_caps_and_watermarks_are_checked() {
        let with = |pt: &str| Config::from_toml(&format!("[pull_through]\n{pt}\n"));
        let cap = |pt: &str| with(pt).unwrap().pull_through.cache_max_size;
        assert_eq!(
            cap("cache_max_size = 1048576"),
            Some(SizeCap::Bytes(1 << 20))
        );
        assert_eq!(cap("cache_max_size = \"20%\""), Some(SizeCap::Percent(20)));
        assert_eq!(cap(""), None);
        for bad in ["\"0%\"", "\"120%\"", "\"20GB\"", "-1"] {
            assert!(with(&format!("cache_max_size = {bad}")).is_err(), "{bad}");
        }
        assert_eq!(SizeCap::Percent(20).bytes(1000), 200);
        assert_eq!(SizeCap::Bytes(7).bytes(1000), 7);
        for (high, low, ok) in [
            (90, 80, true),
            (80, 80, false),
            (50, 60, false),
            (101, 80, false),
        ] {
            let c = with(&format!(
                "evict_high_percent = {high}\nevict_low_percent = {low}"
            ))
            .unwrap();
            assert_eq!(c.validate().is_ok(), ok, "high {high}, low {low}");
        }
        let c = with("evict_interval = \"0s\"").unwrap();
        assert!(c.validate().is_err(), "a zero interval");
    }

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
    fn image_caches_convert_to_store_records_and_back_and_debug_hides_the_password() {
        let mut c = ImageCacheConfig::new("up", SourceKind::Ecr, "https://x.example");
        c.username = Some("AKID".into());
        c.password = Some("s3cret".into());
        c.revalidate_ttl = Duration::from_secs(30);
        c.region = Some("eu-west-1".into());
        let (record, credentials) = c.to_records();
        assert_eq!(record.endpoint, "https://x.example");
        assert_eq!(credentials.password.as_deref(), Some("s3cret"));
        let back = ImageCacheConfig::from_records(record, Some(credentials));
        assert_eq!(
            serde_json::to_value(&back).unwrap(),
            serde_json::to_value(&c).unwrap()
        );
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("s3cret") && shown.contains("AKID"),
            "{shown}"
        );
        let r = Config::default().registry_record(&RegistryConfig {
            name: "hub".into(),
            kind: RegistryKind::Cache,
            cache: Some("up".into()),
            public_uri: false,
            anonymous_pull: Some(true),
            quota_bytes: Some(0),
        });
        assert_eq!(
            (r.kind, r.cache.as_deref()),
            (RegistryKind::Cache, Some("up"))
        );
        assert!(!r.public_uri && r.anonymous_pull);
        assert_eq!(r.quota_bytes, None, "a quota of 0 is no quota");
    }

    #[test]
    fn storage_is_the_filesystem_or_a_checked_s3_bucket() {
        use crate::store::BlobBackend;
        let c = Config::from_toml("[storage]\nkind = \"filesystem\"").unwrap();
        assert_eq!(c.storage, BlobBackend::Filesystem {});
        assert!(Config::from_toml("[storage]\nkind = \"filesystem\"\nbucket = \"b\"").is_err());
        let c = Config::from_toml(
            "[storage]\nkind = \"s3\"\nbucket = \"b\"\nendpoint = \"http://127.0.0.1:9000\"\n\
             secret_access_key = \"s3cret\"\naccess_key_id = \"AK\"\nrequest_timeout = \"2m\"",
        )
        .unwrap();
        c.validate().unwrap();
        let BlobBackend::S3(s3) = &c.storage else {
            panic!("s3: {:?}", c.storage);
        };
        assert_eq!((s3.region.as_str(), s3.part_bytes), ("us-east-1", 8 << 20));
        assert_eq!(s3.request_timeout, Duration::from_secs(120));
        assert!(s3.path_style && !s3.redirect);
        let shown = format!("{c:?}");
        assert!(!shown.contains("s3cret") && shown.contains("AK"), "{shown}");
        assert!(
            Config::from_toml("[storage]\nkind = \"s3\"").is_err(),
            "bucket required"
        );
        assert!(Config::from_toml("[storage]\nkind = \"s3\"\nbucket = \"b\"\nbuckit = 1").is_err());
        for bad in [
            "part_bytes = 1048576",
            "endpoint = \"minio:9000\"",
            "access_key_id = \"AK\"",
            "prefix = \"/a//b\"",
        ] {
            let c = Config::from_toml(&format!("[storage]\nkind = \"s3\"\nbucket = \"b\"\n{bad}"))
                .unwrap();
            assert!(c.validate().is_err(), "{bad}");
        }
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
