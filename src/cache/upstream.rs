//! One source registry: its HTTP client, the Docker token challenge flow with a token cache per
//! scope, and retries with backoff that honour `Retry-After`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use http::{HeaderMap, Method, StatusCode};
use reqwest::Url;
use serde::Deserialize;

use super::credentials::{static_credentials, Basic, CredentialError, EcrKeys};
use super::health::{self, ErrorKind, Health, RequestKind};
use crate::config::{ImageCacheConfig, PullThrough, SourceKind};
use crate::http::egress::{self, EgressPolicy, ReadError};

/// Redirect hops followed per request before berth gives up (a loop, or a source that keeps
/// sending it elsewhere).
pub const MAX_REDIRECTS: usize = 5;

/// Largest token answer read from a token realm (or ECR's API): real ones are a few KiB.
pub const MAX_TOKEN_BYTES: usize = 1 << 20;

/// Bytes of an error answer read to make its excerpt; the rest is never read.
const MAX_ERROR_BODY_BYTES: usize = 4096;

/// Hosts that all mean Docker Hub.
const DOCKER_HUB_HOSTS: [&str; 4] = [
    "docker.io",
    "index.docker.io",
    "registry-1.docker.io",
    "hub.docker.com",
];

/// Why a source request failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    /// Connect error, timeout, or a broken body.
    #[error("source unreachable: {0}")]
    Unreachable(String),
    /// No answer (or no more bytes) before the deadline.
    #[error("source timed out: {0}")]
    TimedOut(String),
    /// The source answered with an error status.
    #[error("source answered {status}: {message}")]
    Status {
        /// Its status.
        status: StatusCode,
        /// Its `Retry-After`, if any.
        retry_after: Option<Duration>,
        /// Its error text.
        message: String,
    },
    /// Credentials missing, refused, or the credential exchange failed.
    #[error("source refused credentials: {0}")]
    Auth(String),
    /// berth refused what the source asked for or sent: a redirect or token realm the egress
    /// policy denies, too many redirects, an answer over its size cap.
    #[error("source refused: {0}")]
    Refused(String),
}

impl UpstreamError {
    /// 404 from the source.
    pub fn is_not_found(&self) -> bool {
        matches!(self, UpstreamError::Status { status, .. } if *status == StatusCode::NOT_FOUND)
    }

    /// Worth a retry, and a reason to serve a cached copy: unreachable, 5xx, 429.
    pub fn is_transient(&self) -> bool {
        match self {
            UpstreamError::Unreachable(_) | UpstreamError::TimedOut(_) => true,
            UpstreamError::Status { status, .. } => {
                status.is_server_error() || *status == StatusCode::TOO_MANY_REQUESTS
            }
            UpstreamError::Auth(_) | UpstreamError::Refused(_) => false,
        }
    }

    /// The source's `Retry-After`, if it sent one.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            UpstreamError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// A request to the source: `path` is what follows `/v2/`, `repo` gives the token scope.
pub struct UpstreamRequest<'a> {
    /// Method.
    pub method: Method,
    /// Path after `/v2/` (with its query, if any).
    pub path: String,
    /// Upstream repository (for `scope=repository:REPO:pull`; empty: no scope, as for `/v2/`).
    pub repo: &'a str,
    /// Extra headers (`Accept`, `Range`).
    pub headers: HeaderMap,
    /// Ask for push rights too (`pull,push`): replication writes to its endpoints.
    pub push: bool,
    /// Ask for pull rights on this repository too (a cross-repository mount's `from`).
    pub mount_from: Option<&'a str>,
    /// The request body, made afresh for each attempt (a 401 makes the request go again).
    pub body: Option<BodySource>,
}

/// Makes a request body for one attempt: a stream cannot be sent twice, so a request that may
/// be repeated after the challenge carries what makes its body instead.
pub type BodySource = Arc<dyn Fn() -> reqwest::Body + Send + Sync>;

impl<'a> UpstreamRequest<'a> {
    /// A request without body that needs only pull rights.
    pub fn new(method: Method, path: String, repo: &'a str, headers: HeaderMap) -> Self {
        UpstreamRequest {
            method,
            path,
            repo,
            headers,
            push: false,
            mount_from: None,
            body: None,
        }
    }
}

/// How the client checks the registry's TLS certificate.
#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    /// Accept any certificate (a test or a private endpoint whose CA is not at hand).
    pub insecure: bool,
    /// PEM file of CA certificates trusted besides the system's.
    pub ca_file: Option<std::path::PathBuf>,
}

struct CachedToken {
    header: String,
    expires: Instant,
}

/// A source registry with its client and authentication state.
pub struct Source {
    /// The definition.
    pub config: ImageCacheConfig,
    endpoint: String,
    hosts: Vec<String>,
    client: reqwest::Client,
    policy: Arc<EgressPolicy>,
    allowed_ports: Vec<u16>,
    max_blob_bytes: u64,
    credentials: Option<Basic>,
    ecr: Option<EcrKeys>,
    ecr_password: tokio::sync::Mutex<Option<(Basic, Instant)>>,
    tokens: Mutex<HashMap<String, CachedToken>>,
    wants_basic: AtomicBool,
    /// What this source is doing (kept by [`super::Cache`] across rebuilds of the source).
    health: Arc<Health>,
    /// What berth uses it as, for log lines: an image cache, or a replication endpoint.
    role: &'static str,
}

/// The source's `WWW-Authenticate` challenge.
#[derive(Debug, PartialEq, Eq)]
pub enum Challenge {
    /// `Basic realm=…`.
    Basic,
    /// `Bearer realm=…,service=…,scope=…`.
    Bearer {
        /// Token endpoint.
        realm: String,
        /// `service` parameter.
        service: Option<String>,
        /// `scope` parameter.
        scope: Option<String>,
    },
}

/// Parses a `WWW-Authenticate` header.
pub fn parse_challenge(value: &str) -> Option<Challenge> {
    let (scheme, rest) = value.trim().split_once(' ').unwrap_or((value.trim(), ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut params = HashMap::new();
    let mut rest = rest.trim();
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=')?;
        let after = after.trim_start();
        let (val, next) = if let Some(quoted) = after.strip_prefix('"') {
            let end = quoted.find('"')?;
            (&quoted[..end], &quoted[end + 1..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (&after[..end], &after[end..])
        };
        params.insert(key.trim().to_ascii_lowercase(), val.to_string());
        rest = next.trim_start_matches([',', ' ']);
    }
    Some(Challenge::Bearer {
        realm: params.remove("realm")?,
        service: params.remove("service"),
        scope: params.remove("scope"),
    })
}

/// Scheme, lowercase host and port of a URL: credentials go only back to where they were meant.
fn origin(u: &Url) -> (String, String, Option<u16>) {
    (
        u.scheme().to_string(),
        u.host_str().unwrap_or_default().to_ascii_lowercase(),
        u.port_or_known_default(),
    )
}

/// `host[:port]` of a URL, for messages (never its user-info, path or query).
fn host_port(u: &Url) -> String {
    match (u.host_str(), u.port()) {
        (Some(h), Some(p)) => format!("{h}:{p}"),
        (Some(h), None) => h.to_string(),
        _ => "(no host)".into(),
    }
}

fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let v = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    v.trim().parse::<u64>().ok().map(Duration::from_secs)
}

impl Source {
    /// Builds the client for an image cache with the default egress policy and blob cap;
    /// checks its URL, port and credentials.
    pub fn new(config: ImageCacheConfig, allowed_ports: &[u16]) -> Result<Source, String> {
        let settings = PullThrough {
            allowed_ports: allowed_ports.to_vec(),
            ..PullThrough::default()
        };
        Source::build(config, &settings, Arc::new(EgressPolicy::default()))
    }

    /// Builds the client for an image cache under `policy`, with the ports and blob cap of
    /// `[pull_through]`; checks its URL, port and credentials.
    pub fn build(
        config: ImageCacheConfig,
        settings: &PullThrough,
        policy: Arc<EgressPolicy>,
    ) -> Result<Source, String> {
        Source::build_with(config, settings, policy, &ClientTls::default())
    }

    /// [`Source::build`] with its own certificate checks.
    pub fn build_with(
        config: ImageCacheConfig,
        settings: &PullThrough,
        policy: Arc<EgressPolicy>,
        tls: &ClientTls,
    ) -> Result<Source, String> {
        let allowed_ports = settings.allowed_ports.as_slice();
        let url = reqwest::Url::parse(&config.url).map_err(|e| {
            format!(
                "image cache {:?}: bad url {:?}: {e}",
                config.name, config.url
            )
        })?;
        let host = url
            .host_str()
            .ok_or_else(|| format!("image cache {:?}: url has no host", config.name))?
            .to_string();
        let port = url.port_or_known_default().unwrap_or(443);
        if !allowed_ports.is_empty() && !allowed_ports.contains(&port) {
            return Err(format!(
                "image cache {:?}: port {port} is not in pull_through.allowed_ports {allowed_ports:?}",
                config.name
            ));
        }
        let is_hub =
            config.kind == SourceKind::Dockerhub && DOCKER_HUB_HOSTS.contains(&host.as_str());
        let endpoint = if is_hub {
            "https://registry-1.docker.io".to_string()
        } else {
            config.url.trim_end_matches('/').to_string()
        };
        let mut hosts = vec![host.clone()];
        if let Some(p) = url.port() {
            hosts.push(format!("{host}:{p}"));
        }
        if config.kind == SourceKind::Dockerhub {
            hosts.extend(DOCKER_HUB_HOSTS.iter().map(|h| h.to_string()));
        }
        let credentials = static_credentials(&config)
            .map_err(|e| format!("image cache {:?}: {e}", config.name))?;
        let ecr = match config.kind {
            SourceKind::Ecr => Some(
                EcrKeys::from_config(&config, credentials.as_ref())
                    .map_err(|e: CredentialError| format!("image cache {:?}: {e}", config.name))?,
            ),
            _ => None,
        };
        // The operator's own hosts resolve unfiltered (sources on private or loopback addresses
        // are configured on purpose); any other name goes through the egress policy.
        let mut trusted = vec![host.clone()];
        trusted.extend(
            [Some(endpoint.as_str()), config.ecr_endpoint.as_deref()]
                .into_iter()
                .flatten()
                .filter_map(|u| Url::parse(u).ok()?.host_str().map(str::to_string)),
        );
        // Redirects are followed by hand (`request_following`): each hop is checked against the
        // egress policy, and credentials never leave the origin they were meant for.
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .pool_idle_timeout(Duration::from_secs(90))
            .redirect(reqwest::redirect::Policy::none())
            .dns_resolver(policy.resolver(trusted))
            .user_agent(concat!("berth/", env!("CARGO_PKG_VERSION")))
            .danger_accept_invalid_certs(tls.insecure);
        if let Some(path) = &tls.ca_file {
            let pem = std::fs::read(path).map_err(|e| {
                format!(
                    "{:?}: cannot read CA file {}: {e}",
                    config.name,
                    path.display()
                )
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| format!("{:?}: CA file {}: {e}", config.name, path.display()))?;
            for c in certs {
                builder = builder.add_root_certificate(c);
            }
        }
        let client = builder.build().map_err(|e| e.to_string())?;
        Ok(Source {
            config,
            endpoint,
            hosts,
            client,
            policy,
            allowed_ports: allowed_ports.to_vec(),
            max_blob_bytes: settings.max_blob_bytes,
            credentials,
            ecr,
            ecr_password: tokio::sync::Mutex::new(None),
            tokens: Mutex::new(HashMap::new()),
            wants_basic: AtomicBool::new(false),
            health: Arc::default(),
            role: "image cache",
        })
    }

    /// The same client, used as `role` (its log lines say so).
    pub fn with_role(mut self, role: &'static str) -> Source {
        self.role = role;
        self
    }

    /// The same source, keeping its health in `health` (shared with the source it replaces).
    pub fn with_health(mut self, health: Arc<Health>) -> Source {
        self.health = health;
        self
    }

    /// Its health as last seen.
    pub fn health(&self) -> &Health {
        &self.health
    }

    /// The source answered a request whose answer was read and checked whole.
    pub fn record_success(&self) {
        self.health.success();
    }

    /// A request to the source failed: counted by kind, kept as the last error, and logged
    /// (WARN, with the source's name).
    pub fn record_failure(&self, kind: ErrorKind, message: &str) {
        health::count_error(self.name(), kind);
        let failures = self.health.failure(kind, message);
        match kind {
            ErrorKind::Connect | ErrorKind::Timeout => {
                tracing::warn!(source = %self.name(), role = self.role, url = %self.endpoint, kind = kind.label(), consecutive_failures = failures, error = %message, "source unreachable")
            }
            _ => {
                tracing::warn!(source = %self.name(), role = self.role, url = %self.endpoint, kind = kind.label(), consecutive_failures = failures, error = %message, "source request failed")
            }
        }
    }

    /// [`Source::record_failure`] of an [`UpstreamError`].
    pub fn record_error(&self, e: &UpstreamError) {
        self.record_failure(ErrorKind::of(e), &e.to_string());
    }

    /// Name of the image cache.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// Largest blob accepted when neither the source nor a cached manifest gives its size.
    pub fn max_blob_bytes(&self) -> u64 {
        self.max_blob_bytes
    }

    /// Sends `method url` and follows up to [`MAX_REDIRECTS`] redirects by hand. `auth` goes
    /// only to the origin (scheme, host, port) of `url`; a hop to any other origin must pass
    /// the egress policy (on its resolved address) and is sent without credentials.
    async fn request_following(
        &self,
        req: &UpstreamRequest<'_>,
        mut url: Url,
        auth: Option<&str>,
        deadline: Instant,
        what: &str,
    ) -> Result<reqwest::Response, UpstreamError> {
        let home = origin(&url);
        let mut hops = 0;
        loop {
            let mut builder = self.client.request(req.method.clone(), url.clone());
            for (k, v) in &req.headers {
                builder = builder.header(k, v);
            }
            if let Some(make) = &req.body {
                builder = builder.body(make());
            }
            if let Some(a) = auth.filter(|_| origin(&url) == home) {
                builder = builder.header(reqwest::header::AUTHORIZATION, a);
            }
            let response = tokio::time::timeout_at(deadline.into(), builder.send())
                .await
                .map_err(|_| UpstreamError::TimedOut(format!("timed out waiting for the {what}")))?
                .map_err(|e| {
                    let timed_out = e.is_timeout();
                    let text = format!("{what}: {}", egress::error_chain(&e.without_url()));
                    if timed_out {
                        UpstreamError::TimedOut(text)
                    } else {
                        UpstreamError::Unreachable(text)
                    }
                })?;
            let status = response.status();
            if !matches!(status.as_u16(), 301 | 302 | 303 | 307 | 308) {
                return Ok(response);
            }
            let Some(location) = response
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|v| v.to_str().ok())
            else {
                return Ok(response);
            };
            hops += 1;
            if hops > MAX_REDIRECTS {
                tracing::warn!(cache = %self.name(), what, "more than {MAX_REDIRECTS} redirects; giving up");
                return Err(UpstreamError::Refused(format!(
                    "the {what} redirected more than {MAX_REDIRECTS} times (a redirect loop?)"
                )));
            }
            let next = url.join(location).map_err(|e| {
                UpstreamError::Refused(format!("the {what} redirected to an invalid location: {e}"))
            })?;
            if origin(&next) != home {
                if let Err(e) = self
                    .policy
                    .check_resolved(&next, &self.allowed_ports, "pull_through.allowed_ports")
                    .await
                {
                    tracing::warn!(cache = %self.name(), what, target = %host_port(&next), error = %e, "redirect refused by the egress policy");
                    return Err(UpstreamError::Refused(format!(
                        "the {what} redirected to {}, which the egress policy refuses: {e}",
                        host_port(&next)
                    )));
                }
            }
            url = next;
        }
    }

    /// The part after `/v2/` (with its query) of a `Location` the registry answered (an upload
    /// session's), relative or absolute; refused when it points at another origin or outside
    /// `/v2/`.
    pub fn v2_path(&self, location: &str) -> Result<String, UpstreamError> {
        let base = Url::parse(&format!("{}/v2/", self.endpoint))
            .map_err(|e| UpstreamError::Refused(format!("bad endpoint URL: {e}")))?;
        let url = base
            .join(location)
            .map_err(|e| UpstreamError::Refused(format!("bad Location {location:?}: {e}")))?;
        let path = url
            .path()
            .strip_prefix("/v2/")
            .filter(|_| origin(&url) == origin(&base));
        let Some(path) = path else {
            return Err(UpstreamError::Refused(format!(
                "the registry answered a Location outside its /v2/ API: {}",
                host_port(&url)
            )));
        };
        Ok(match url.query() {
            Some(q) => format!("{path}?{q}"),
            None => path.to_string(),
        })
    }

    /// Whether this source serves registry host `ns` (containerd's `?ns=`).
    pub fn serves_host(&self, ns: &str) -> bool {
        self.hosts.iter().any(|h| h.eq_ignore_ascii_case(ns))
    }

    /// Upstream repository for a path: Docker Hub's one-component names get `library/`.
    pub fn upstream_repo(&self, path: &str) -> String {
        if self.config.kind == SourceKind::Dockerhub && !path.contains('/') {
            format!("library/{path}")
        } else {
            path.to_string()
        }
    }

    /// Basic credentials for the registry (ECR: the token exchanged, refreshed ahead of expiry).
    async fn basic(&self) -> Result<Option<Basic>, UpstreamError> {
        let Some(keys) = &self.ecr else {
            return Ok(self.credentials.clone());
        };
        let mut cached = self.ecr_password.lock().await;
        if let Some((basic, expires)) = cached.as_ref() {
            // Refresh 30 minutes ahead of the 12 h expiry (or at half-life for short tokens).
            let margin = Duration::from_secs(1800)
                .min(expires.saturating_duration_since(Instant::now()) / 2);
            if Instant::now() + margin < *expires {
                return Ok(Some(basic.clone()));
            }
        }
        health::count_request(self.name(), RequestKind::EcrAuth);
        let (basic, expires) = keys
            .authorization_token(&self.client)
            .await
            .map_err(|e| UpstreamError::Auth(e.to_string()))?;
        tracing::info!(cache = %self.name(), "ECR authorization token refreshed");
        *cached = Some((basic.clone(), expires));
        Ok(Some(basic))
    }

    fn cached_token(&self, scope: &str) -> Option<String> {
        let tokens = self.tokens.lock();
        let t = tokens.get(scope)?;
        (Instant::now() < t.expires).then(|| t.header.clone())
    }

    async fn fetch_token(
        &self,
        realm: &str,
        service: Option<&str>,
        scope: &str,
        deadline: Instant,
    ) -> Result<String, UpstreamError> {
        #[derive(Deserialize)]
        struct TokenResponse {
            token: Option<String>,
            access_token: Option<String>,
            expires_in: Option<u64>,
        }
        let mut url =
            Url::parse(realm).map_err(|e| UpstreamError::Auth(format!("bad token realm: {e}")))?;
        let realm_host = url.host_str().unwrap_or_default().to_string();
        // A realm on the source's own host is the source's; any other host must pass the
        // egress policy like a redirect target.
        let own_host = self
            .hosts
            .iter()
            .any(|h| h.eq_ignore_ascii_case(&realm_host))
            || Url::parse(&self.endpoint)
                .ok()
                .and_then(|u| u.host_str().map(|h| h.eq_ignore_ascii_case(&realm_host)))
                .unwrap_or(false);
        let checked = if own_host {
            // The source's own host: its address is the operator's; scheme and port still
            // matter.
            match self
                .policy
                .check_url(&url, &self.allowed_ports, "pull_through.allowed_ports")
            {
                Err(egress::EgressError::Denied { .. }) => Ok(()),
                other => other,
            }
        } else {
            self.policy
                .check_resolved(&url, &self.allowed_ports, "pull_through.allowed_ports")
                .await
        };
        if let Err(e) = checked {
            tracing::warn!(cache = %self.name(), realm = %host_port(&url), error = %e, "token realm refused by the egress policy");
            return Err(UpstreamError::Refused(format!(
                "token realm on {} refused by the egress policy: {e}",
                host_port(&url)
            )));
        }
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = service {
                q.append_pair("service", s);
            }
            // Several scopes (a mount's source) go as several `scope` parameters.
            for one in scope.split(' ').filter(|s| !s.is_empty()) {
                q.append_pair("scope", one);
            }
        }
        let realm_at = host_port(&url);
        let basic = self.basic().await?.map(|b| b.header());
        health::count_request(self.name(), RequestKind::Token);
        let mut response = self
            .request_following(
                &UpstreamRequest::new(Method::GET, String::new(), "", HeaderMap::new()),
                url,
                basic.as_deref(),
                deadline,
                "token endpoint",
            )
            .await?;
        let status = response.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(UpstreamError::Auth(format!(
                "token endpoint on {realm_at} answered {status}"
            )));
        }
        if !status.is_success() {
            return Err(UpstreamError::Status {
                status,
                retry_after: retry_after(response.headers()),
                message: format!("token endpoint on {realm_at}"),
            });
        }
        let text = egress::read_capped(&mut response, MAX_TOKEN_BYTES, deadline)
            .await
            .map_err(|e| match e {
                ReadError::TooLarge(cap) => {
                    tracing::warn!(cache = %self.name(), realm = %realm_at, "token answer over {cap} bytes; not read");
                    UpstreamError::Refused(format!(
                        "token endpoint on {realm_at} sent an answer over {cap} bytes"
                    ))
                }
                ReadError::Timeout => UpstreamError::TimedOut(format!("token endpoint: {e}")),
                other => UpstreamError::Unreachable(format!("token endpoint: {other}")),
            })?;
        let body: TokenResponse = serde_json::from_slice(&text)
            .map_err(|e| UpstreamError::Auth(format!("token endpoint sent no token: {e}")))?;
        let token = body
            .token
            .or(body.access_token)
            .ok_or_else(|| UpstreamError::Auth("token endpoint sent no token".into()))?;
        // Docker's spec: 60 s when unspecified. Refresh a tenth early (at most a minute).
        let lifetime = Duration::from_secs(body.expires_in.unwrap_or(60).max(1));
        let header = format!("Bearer {token}");
        self.tokens.lock().insert(
            scope.to_string(),
            CachedToken {
                header: header.clone(),
                expires: Instant::now() + lifetime - (lifetime / 10).min(Duration::from_secs(60)),
            },
        );
        metrics::counter!("berth_upstream_token_requests_total", "cache" => self.name().to_string()).increment(1);
        Ok(header)
    }

    async fn attempt(
        &self,
        req: &UpstreamRequest<'_>,
        auth: Option<&str>,
        deadline: Instant,
    ) -> Result<reqwest::Response, UpstreamError> {
        let url = Url::parse(&format!("{}/v2/{}", self.endpoint, req.path))
            .map_err(|e| UpstreamError::Refused(format!("bad source path {:?}: {e}", req.path)))?;
        health::count_request(self.name(), RequestKind::of_path(&req.path));
        self.request_following(req, url, auth, deadline, "source")
            .await
    }

    /// One request with the challenge flow (at most one auth round trip), no retries; its
    /// outcome counted and kept in the source's health. A 404 is an answer (the source is up).
    /// The answer to a `GET` of a manifest or blob counts as a success only once its body was
    /// read and checked: the caller calls [`Source::record_success`] or
    /// [`Source::record_failure`] then.
    pub async fn send(
        &self,
        req: &UpstreamRequest<'_>,
        deadline: Instant,
    ) -> Result<reqwest::Response, UpstreamError> {
        let result = self.send_once(req, deadline).await;
        match &result {
            Ok(_) => {
                let body_checked_later = req.method == Method::GET
                    && matches!(
                        RequestKind::of_path(&req.path),
                        RequestKind::Manifest | RequestKind::Blob
                    );
                if !body_checked_later {
                    self.record_success();
                }
            }
            Err(e) if e.is_not_found() => self.record_success(),
            Err(e) => self.record_error(e),
        }
        result
    }

    async fn send_once(
        &self,
        req: &UpstreamRequest<'_>,
        deadline: Instant,
    ) -> Result<reqwest::Response, UpstreamError> {
        let scope = match (req.repo.is_empty(), req.push) {
            (true, _) if req.path.starts_with("_catalog") => "registry:catalog:*".to_string(),
            (true, _) => String::new(),
            (false, false) => format!("repository:{}:pull", req.repo),
            (false, true) => format!("repository:{}:pull,push", req.repo),
        };
        let scope = match req.mount_from {
            Some(from) => format!("{scope} repository:{from}:pull"),
            None => scope,
        };
        let auth = if self.wants_basic.load(Ordering::Relaxed) {
            self.basic().await?.map(|b| b.header())
        } else {
            self.cached_token(&scope)
        };
        let mut response = self.attempt(req, auth.as_deref(), deadline).await?;
        if response.status() == StatusCode::UNAUTHORIZED {
            let challenge = response
                .headers()
                .get(reqwest::header::WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_challenge);
            let auth = match challenge {
                Some(Challenge::Bearer { realm, service, .. }) => {
                    self.fetch_token(&realm, service.as_deref(), &scope, deadline)
                        .await?
                }
                Some(Challenge::Basic) => {
                    self.wants_basic.store(true, Ordering::Relaxed);
                    self.basic()
                        .await?
                        .ok_or_else(|| {
                            UpstreamError::Auth(
                                "source wants Basic credentials and none are configured".into(),
                            )
                        })?
                        .header()
                }
                None => {
                    return Err(UpstreamError::Auth(
                        "source answered 401 without a usable challenge".into(),
                    ))
                }
            };
            response = self.attempt(req, Some(&auth), deadline).await?;
            if response.status() == StatusCode::UNAUTHORIZED
                && self.ecr.is_some()
                && auth.starts_with("Basic")
            {
                // The exchanged ECR password may have been revoked early: exchange the keys again.
                *self.ecr_password.lock().await = None;
                if let Some(fresh) = self.basic().await? {
                    response = self.attempt(req, Some(&fresh.header()), deadline).await?;
                }
            }
            if response.status() == StatusCode::UNAUTHORIZED {
                self.tokens.lock().remove(&scope);
                return Err(UpstreamError::Auth(format!(
                    "credentials of image cache {:?} were refused",
                    self.name()
                )));
            }
        }
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let retry = retry_after(response.headers());
        // Only a short, sanitised excerpt of the source's error text is kept (and read).
        let mut response = response;
        let raw = egress::read_prefix(&mut response, MAX_ERROR_BODY_BYTES, deadline).await;
        let message = egress::excerpt(&raw);
        Err(UpstreamError::Status {
            status,
            retry_after: retry,
            message,
        })
    }

    /// Like [`Source::send`], retrying transient failures with exponential backoff (honouring
    /// `Retry-After`) until `deadline`.
    pub async fn send_with_retries(
        &self,
        req: &UpstreamRequest<'_>,
        deadline: Instant,
    ) -> Result<reqwest::Response, UpstreamError> {
        let mut backoff = Duration::from_millis(200);
        loop {
            match self.send(req, deadline).await {
                Err(e) if e.is_transient() => {
                    let wait = e.retry_after().unwrap_or(backoff);
                    if Instant::now() + wait >= deadline {
                        return Err(e);
                    }
                    tracing::debug!(cache = %self.name(), path = %req.path, error = %e, ?wait, "retrying source request");
                    tokio::time::sleep(wait).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
                other => return other,
            }
        }
    }
}

pub use crate::http::egress::error_chain;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/nginx:pull""#
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/nginx:pull".into()),
            })
        );
        assert_eq!(
            parse_challenge(r#"Basic realm="Registry Realm""#),
            Some(Challenge::Basic)
        );
        assert_eq!(
            parse_challenge("Bearer realm=http://x/t, service=s"),
            Some(Challenge::Bearer {
                realm: "http://x/t".into(),
                service: Some("s".into()),
                scope: None
            })
        );
        assert_eq!(parse_challenge("Negotiate abc"), None);
        assert_eq!(parse_challenge("Bearer service=x"), None);
    }

    #[test]
    fn docker_hub_endpoint_hosts_and_library_prefix() {
        let c = ImageCacheConfig::new("hub", SourceKind::Dockerhub, "https://hub.docker.com");
        let s = Source::new(c.clone(), &[]).unwrap();
        assert_eq!(s.endpoint, "https://registry-1.docker.io");
        assert!(s.serves_host("docker.io") && s.serves_host("registry-1.docker.io"));
        assert_eq!(s.upstream_repo("nginx"), "library/nginx");
        assert_eq!(s.upstream_repo("bitnami/redis"), "bitnami/redis");
        assert!(Source::new(c, &[80]).is_err(), "port 443 not allowed");
    }
}
