//! Credentials per source kind: where the user's secret comes from and how it becomes the basic
//! credentials of the challenge flow (ECR: a SigV4-signed `GetAuthorizationToken` call first).

use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use serde::Deserialize;

use crate::config::{ImageCacheConfig, SourceKind};

/// User and password for Basic auth (to the registry or to its token realm).
#[derive(Clone, PartialEq, Eq)]
pub struct Basic {
    /// User.
    pub user: String,
    /// Password.
    pub password: String,
}

impl std::fmt::Debug for Basic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Basic({}, <redacted>)", self.user)
    }
}

impl Basic {
    /// `Authorization` header value.
    pub fn header(&self) -> String {
        let raw = format!("{}:{}", self.user, self.password);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }
}

/// A credentials problem, reported with the image cache's name by the caller.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    /// The credentials file is unreadable or malformed.
    #[error("credentials file {0}: {1}")]
    File(String, String),
    /// ECR needs both halves of the key pair.
    #[error("ECR needs username = access key id and password = secret access key")]
    EcrKeys,
    /// ECR region not given and not in the URL.
    #[error("ECR region not found in {0}; set `region`")]
    EcrRegion(String),
    /// The token call failed.
    #[error("ECR GetAuthorizationToken failed: {0}")]
    EcrCall(String),
}

#[derive(Deserialize)]
struct UserPassword {
    username: String,
    password: String,
}

#[derive(Deserialize)]
struct QuayRobot {
    account_name: String,
    docker_cli_password: String,
}

/// Resolves the static credentials of an image cache (inline or from its file), per kind.
pub fn static_credentials(c: &ImageCacheConfig) -> Result<Option<Basic>, CredentialError> {
    let (user, password) = match &c.credentials_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| CredentialError::File(path.display().to_string(), e.to_string()))?;
            from_file_text(c.kind, &text)
                .map_err(|e| CredentialError::File(path.display().to_string(), e))?
        }
        None => match (&c.username, &c.password) {
            (None, None) => return Ok(None),
            (u, p) => (u.clone().unwrap_or_default(), p.clone().unwrap_or_default()),
        },
    };
    // Quay robot credentials may be pasted whole as the password.
    if c.kind == SourceKind::Quay {
        if let Ok(robot) = serde_json::from_str::<QuayRobot>(&password) {
            return Ok(Some(Basic {
                user: robot.account_name,
                password: robot.docker_cli_password,
            }));
        }
    }
    if c.kind == SourceKind::Gcr && user.is_empty() {
        return Ok(Some(Basic {
            user: "_json_key".into(),
            password,
        }));
    }
    Ok(Some(Basic { user, password }))
}

fn from_file_text(kind: SourceKind, text: &str) -> Result<(String, String), String> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    if kind == SourceKind::Gcr
        && value.get("type").and_then(|t| t.as_str()) == Some("service_account")
    {
        return Ok(("_json_key".into(), text.trim().to_string()));
    }
    if let Ok(robot) = serde_json::from_value::<QuayRobot>(value.clone()) {
        return Ok((robot.account_name, robot.docker_cli_password));
    }
    serde_json::from_value::<UserPassword>(value)
        .map(|u| (u.username, u.password))
        .map_err(|_| {
            "expected {\"username\",\"password\"}, a service-account key, or {\"account_name\",\"docker_cli_password\"}"
                .to_string()
        })
}

/// ECR's key pair and where to exchange it for a registry password.
#[derive(Debug, Clone)]
pub struct EcrKeys {
    access_key_id: String,
    secret: String,
    region: String,
    endpoint: String,
}

impl EcrKeys {
    /// Reads the key pair, region and API endpoint of an ECR image cache.
    pub fn from_config(
        c: &ImageCacheConfig,
        creds: Option<&Basic>,
    ) -> Result<EcrKeys, CredentialError> {
        let creds = creds
            .filter(|b| !b.user.is_empty() && !b.password.is_empty())
            .ok_or(CredentialError::EcrKeys)?;
        let region = match &c.region {
            Some(r) => r.clone(),
            None => {
                region_from_url(&c.url).ok_or_else(|| CredentialError::EcrRegion(c.url.clone()))?
            }
        };
        let endpoint = c
            .ecr_endpoint
            .clone()
            .unwrap_or_else(|| format!("https://api.ecr.{region}.amazonaws.com"));
        Ok(EcrKeys {
            access_key_id: creds.user.clone(),
            secret: creds.password.clone(),
            region,
            endpoint,
        })
    }

    /// Calls `GetAuthorizationToken` (SigV4-signed) and returns the registry's basic
    /// credentials (`AWS` + password) and when they expire.
    pub async fn authorization_token(
        &self,
        client: &reqwest::Client,
    ) -> Result<(Basic, Instant), CredentialError> {
        use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
        use aws_sigv4::sign::v4;
        let fail = |e: String| CredentialError::EcrCall(e);
        let body = b"{}".to_vec();
        let url = format!("{}/", self.endpoint.trim_end_matches('/'));
        let mut request = http::Request::builder()
            .method("POST")
            .uri(&url)
            .header("content-type", "application/x-amz-json-1.1")
            .header(
                "x-amz-target",
                "AmazonEC2ContainerRegistry_V20150921.GetAuthorizationToken",
            )
            .body(body.clone())
            .map_err(|e| fail(e.to_string()))?;
        let identity =
            aws_credential_types::Credentials::from_keys(&self.access_key_id, &self.secret, None)
                .into();
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.region)
            .name("ecr")
            .time(SystemTime::now())
            .settings(SigningSettings::default())
            .build()
            .map_err(|e| fail(e.to_string()))?
            .into();
        let signable = SignableRequest::new(
            "POST",
            &url,
            request
                .headers()
                .iter()
                .map(|(k, v)| (k.as_str(), v.to_str().unwrap_or(""))),
            SignableBody::Bytes(&body),
        )
        .map_err(|e| fail(e.to_string()))?;
        let (instructions, _) = sign(signable, &params)
            .map_err(|e| fail(e.to_string()))?
            .into_parts();
        instructions.apply_to_request_http1x(&mut request);
        let mut builder = client.post(&url).body(body);
        for (k, v) in request.headers() {
            builder = builder.header(k.as_str(), v.as_bytes());
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut response = builder
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .map_err(|e| fail(crate::http::egress::error_chain(&e.without_url())))?;
        let status = response.status();
        if !status.is_success() {
            // A short, sanitised excerpt of the error answer; the rest is never read.
            let raw = crate::http::egress::read_prefix(&mut response, 4096, deadline).await;
            return Err(fail(format!(
                "{status}: {}",
                crate::http::egress::excerpt(&raw)
            )));
        }
        let body = crate::http::egress::read_capped(
            &mut response,
            super::upstream::MAX_TOKEN_BYTES,
            deadline,
        )
        .await
        .map_err(|e| fail(e.to_string()))?;
        let text = String::from_utf8_lossy(&body);
        parse_token_response(&text).map_err(fail)
    }
}

fn parse_token_response(text: &str) -> Result<(Basic, Instant), String> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Data {
        authorization_token: String,
        expires_at: Option<f64>,
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Response {
        authorization_data: Vec<Data>,
    }
    let r: Response = serde_json::from_str(text).map_err(|e| format!("unexpected answer: {e}"))?;
    let data = r
        .authorization_data
        .into_iter()
        .next()
        .ok_or("no authorizationData")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(data.authorization_token.trim())
        .map_err(|e| format!("authorizationToken is not base64: {e}"))?;
    let decoded = String::from_utf8(decoded).map_err(|_| "authorizationToken is not UTF-8")?;
    let (user, password) = decoded
        .split_once(':')
        .ok_or("authorizationToken is not USER:PASSWORD")?;
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    // Valid 12 h; default to that when the field is missing.
    let valid_for = data
        .expires_at
        .map_or(12.0 * 3600.0, |t| (t - now).max(0.0));
    Ok((
        Basic {
            user: user.into(),
            password: password.into(),
        },
        Instant::now() + Duration::from_secs_f64(valid_for),
    ))
}

/// Region from `ACCOUNT.dkr.ecr.REGION.amazonaws.com`.
pub fn region_from_url(url: &str) -> Option<String> {
    let host = reqwest::Url::parse(url).ok()?.host_str()?.to_string();
    let parts: Vec<&str> = host.split('.').collect();
    let i = parts.iter().position(|p| *p == "ecr")?;
    (parts.get(i - 1) == Some(&"dkr")).then(|| parts.get(i + 1).map(|s| s.to_string()))?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(kind: SourceKind, user: Option<&str>, password: Option<&str>) -> ImageCacheConfig {
        ImageCacheConfig {
            username: user.map(Into::into),
            password: password.map(Into::into),
            ..ImageCacheConfig::new(
                "c",
                kind,
                "https://123456789012.dkr.ecr.eu-west-3.amazonaws.com",
            )
        }
    }

    #[test]
    fn per_kind_credentials() {
        let quay = cache(
            SourceKind::Quay,
            None,
            Some(r#"{"account_name":"org+bot","docker_cli_password":"pw"}"#),
        );
        assert_eq!(static_credentials(&quay).unwrap().unwrap().user, "org+bot");
        let gcr = cache(
            SourceKind::Gcr,
            None,
            Some("{\"type\":\"service_account\"}"),
        );
        assert_eq!(static_credentials(&gcr).unwrap().unwrap().user, "_json_key");
        assert!(static_credentials(&cache(SourceKind::Registry, None, None))
            .unwrap()
            .is_none());
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key.json");
        std::fs::write(&key, r#"{"type":"service_account","private_key":"x"}"#).unwrap();
        let mut g = cache(SourceKind::Gcr, None, None);
        g.credentials_file = Some(key);
        let b = static_credentials(&g).unwrap().unwrap();
        assert_eq!(
            (b.user.as_str(), b.password.contains("private_key")),
            ("_json_key", true)
        );
        assert!(format!("{b:?}").contains("redacted"));
    }

    #[test]
    fn ecr_region_endpoint_and_token_answer() {
        assert_eq!(
            region_from_url("https://1.dkr.ecr.eu-west-3.amazonaws.com").as_deref(),
            Some("eu-west-3")
        );
        assert_eq!(region_from_url("https://example.com"), None);
        let c = cache(SourceKind::Ecr, Some("AKID"), Some("SECRET"));
        let keys = EcrKeys::from_config(&c, static_credentials(&c).unwrap().as_ref()).unwrap();
        assert_eq!(keys.endpoint, "https://api.ecr.eu-west-3.amazonaws.com");
        assert!(EcrKeys::from_config(&c, None).is_err());
        let token = base64::engine::general_purpose::STANDARD.encode("AWS:secretpw");
        let (b, _) = parse_token_response(&format!(
            r#"{{"authorizationData":[{{"authorizationToken":"{token}","expiresAt":9999999999.5}}]}}"#
        ))
        .unwrap();
        assert_eq!((b.user.as_str(), b.password.as_str()), ("AWS", "secretpw"));
    }
}
