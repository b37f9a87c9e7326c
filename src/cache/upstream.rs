//! One source registry: its HTTP client, the Docker token challenge flow with a token cache per
//! scope, and retries with backoff that honour `Retry-After`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::{HeaderMap, Method, StatusCode};
use serde::Deserialize;

use super::credentials::{static_credentials, Basic, CredentialError, EcrKeys};
use crate::config::{ImageCacheConfig, SourceKind};

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
}

impl UpstreamError {
    /// 404 from the source.
    pub fn is_not_found(&self) -> bool {
        matches!(self, UpstreamError::Status { status, .. } if *status == StatusCode::NOT_FOUND)
    }

    /// Worth a retry, and a reason to serve a cached copy: unreachable, 5xx, 429.
    pub fn is_transient(&self) -> bool {
        match self {
            UpstreamError::Unreachable(_) => true,
            UpstreamError::Status { status, .. } => {
                status.is_server_error() || *status == StatusCode::TOO_MANY_REQUESTS
            }
            UpstreamError::Auth(_) => false,
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
    /// Path after `/v2/`.
    pub path: String,
    /// Upstream repository (for `scope=repository:REPO:pull`).
    pub repo: &'a str,
    /// Extra headers (`Accept`, `Range`).
    pub headers: HeaderMap,
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
    credentials: Option<Basic>,
    ecr: Option<EcrKeys>,
    ecr_password: tokio::sync::Mutex<Option<(Basic, Instant)>>,
    tokens: Mutex<HashMap<String, CachedToken>>,
    wants_basic: AtomicBool,
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

fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let v = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    v.trim().parse::<u64>().ok().map(Duration::from_secs)
}

impl Source {
    /// Builds the client for an image cache; checks its URL, port and credentials.
    pub fn new(config: ImageCacheConfig, allowed_ports: &[u16]) -> Result<Source, String> {
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
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .pool_idle_timeout(Duration::from_secs(90))
            .user_agent(concat!("berth/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Source {
            config,
            endpoint,
            hosts,
            client,
            credentials,
            ecr,
            ecr_password: tokio::sync::Mutex::new(None),
            tokens: Mutex::new(HashMap::new()),
            wants_basic: AtomicBool::new(false),
        })
    }

    /// Name of the image cache.
    pub fn name(&self) -> &str {
        &self.config.name
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
        let (basic, expires) = keys
            .authorization_token(&self.client)
            .await
            .map_err(|e| UpstreamError::Auth(e.to_string()))?;
        tracing::info!(cache = %self.name(), "ECR authorization token refreshed");
        *cached = Some((basic.clone(), expires));
        Ok(Some(basic))
    }

    fn cached_token(&self, scope: &str) -> Option<String> {
        let tokens = self.tokens.lock().unwrap();
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
        let mut url = reqwest::Url::parse(realm)
            .map_err(|e| UpstreamError::Auth(format!("bad realm {realm:?}: {e}")))?;
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = service {
                q.append_pair("service", s);
            }
            q.append_pair("scope", scope);
        }
        let mut req = self.client.get(url);
        if let Some(basic) = self.basic().await? {
            req = req.header(reqwest::header::AUTHORIZATION, basic.header());
        }
        let response = tokio::time::timeout_at(deadline.into(), req.send())
            .await
            .map_err(|_| UpstreamError::Unreachable("token endpoint timed out".into()))?
            .map_err(|e| UpstreamError::Unreachable(format!("token endpoint: {e}")))?;
        let status = response.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(UpstreamError::Auth(format!(
                "token endpoint {realm} answered {status}"
            )));
        }
        if !status.is_success() {
            return Err(UpstreamError::Status {
                status,
                retry_after: retry_after(response.headers()),
                message: format!("token endpoint {realm}"),
            });
        }
        let text = tokio::time::timeout_at(deadline.into(), response.bytes())
            .await
            .map_err(|_| UpstreamError::Unreachable("token endpoint timed out".into()))?
            .map_err(|e| UpstreamError::Unreachable(format!("token endpoint: {e}")))?;
        let body: TokenResponse = serde_json::from_slice(&text)
            .map_err(|e| UpstreamError::Auth(format!("token endpoint sent no token: {e}")))?;
        let token = body
            .token
            .or(body.access_token)
            .ok_or_else(|| UpstreamError::Auth("token endpoint sent no token".into()))?;
        // Docker's spec: 60 s when unspecified. Refresh a tenth early (at most a minute).
        let lifetime = Duration::from_secs(body.expires_in.unwrap_or(60).max(1));
        let header = format!("Bearer {token}");
        self.tokens.lock().unwrap().insert(
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
        let url = format!("{}/v2/{}", self.endpoint, req.path);
        let mut builder = self.client.request(req.method.clone(), url);
        for (k, v) in &req.headers {
            builder = builder.header(k, v);
        }
        if let Some(a) = auth {
            builder = builder.header(reqwest::header::AUTHORIZATION, a);
        }
        tokio::time::timeout_at(deadline.into(), builder.send())
            .await
            .map_err(|_| UpstreamError::Unreachable("timed out waiting for the source".into()))?
            .map_err(|e| UpstreamError::Unreachable(error_chain(&e)))
    }

    /// One request with the challenge flow (at most one auth round trip), no retries.
    pub async fn send(
        &self,
        req: &UpstreamRequest<'_>,
        deadline: Instant,
    ) -> Result<reqwest::Response, UpstreamError> {
        let scope = format!("repository:{}:pull", req.repo);
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
                self.tokens.lock().unwrap().remove(&scope);
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
        let message = tokio::time::timeout_at(deadline.into(), response.text())
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default()
            .chars()
            .take(300)
            .collect();
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

/// An error with its causes (reqwest hides the useful part in `source()`).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

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
