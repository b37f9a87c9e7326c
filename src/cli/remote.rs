//! The CLI's remote mode: admin commands as calls to a running server's management API,
//! authenticated with an access key as Basic credentials.

use bytes::Bytes;
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use reqwest::Method;

/// A management API client.
pub struct Remote {
    base: String,
    client: reqwest::Client,
    key: Option<(String, String)>,
}

/// One path segment, percent-encoded (image names carry `/`).
pub fn seg(s: &str) -> String {
    utf8_percent_encode(s, NON_ALPHANUMERIC).to_string()
}

/// What an error answer says: the message of an OCI error (`{"errors":[{"message":…}]}`), else
/// the answer as JSON text (a body that is not JSON as a JSON string).
pub fn error_text(body: &[u8]) -> String {
    error_message(body).unwrap_or_else(|| match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(v) => v.to_string(),
        Err(_) => serde_json::Value::String(String::from_utf8_lossy(body).into_owned()).to_string(),
    })
}

/// The message of an OCI error answer, if it is one.
pub fn error_message(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Errors {
        errors: Vec<Message>,
    }
    #[derive(serde::Deserialize)]
    struct Message {
        message: String,
    }
    let e: Errors = serde_json::from_slice(body).ok()?;
    e.errors.into_iter().next().map(|m| m.message)
}

impl Remote {
    /// A client for the server at `base` (`http(s)://host:port`); `key` is (Access Key ID, Secret Key).
    pub fn new(base: &str, key: Option<(String, String)>) -> Result<Remote, String> {
        check_server_url(base)?;
        let client = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(10))
            .timeout(std::time::Duration::from_secs(300))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Remote {
            base: base.trim_end_matches('/').to_string(),
            client,
            key,
        })
    }

    /// The URL of `/api/v1{path}` on this server.
    pub fn url(&self, path: &str) -> String {
        format!("{}/api/v1{path}", self.base)
    }

    /// Calls `METHOD /api/v1{path}` with an optional JSON body; returns the bytes of a
    /// successful answer, or the API's error message.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<Bytes, String> {
        let url = self.url(path);
        let mut req = self.client.request(method.clone(), &url);
        if let Some((id, secret)) = &self.key {
            req = req.basic_auth(id, Some(secret));
        }
        if let Some(b) = body {
            req = req
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(b);
        }
        let r = req
            .send()
            .await
            .map_err(|e| format!("cannot reach {}: {}", self.base, cause_chain(&e)))?;
        let status = r.status();
        let bytes = r.bytes().await.map_err(|e| e.to_string())?;
        if status.is_success() {
            return Ok(bytes);
        }
        let message = error_text(&bytes);
        let hint = if status == reqwest::StatusCode::UNAUTHORIZED && self.key.is_none() {
            " (give --access-key and --secret-key, or BERTH_ACCESS_KEY and BERTH_SECRET_KEY)"
        } else {
            ""
        };
        Err(format!("{method} {url}: {status}: {message}{hint}"))
    }
}

impl Remote {
    /// Streams the answer of `GET /api/v1{path}` into `sink`, piece by piece (a blob: no whole
    /// body in memory, no deadline for the whole transfer but one of `stall` per piece);
    /// `Ok(false)` when the answer is 404, with nothing written.
    pub async fn download(
        &self,
        path: &str,
        stall: std::time::Duration,
        sink: &mut (dyn FnMut(&[u8]) -> std::io::Result<()> + Send),
    ) -> Result<bool, String> {
        let url = self.url(path);
        let mut req = self
            .client
            .get(&url)
            .timeout(std::time::Duration::from_secs(7 * 24 * 3600));
        if let Some((id, secret)) = &self.key {
            req = req.basic_auth(id, Some(secret));
        }
        let mut r = req
            .send()
            .await
            .map_err(|e| format!("cannot reach {}: {}", self.base, cause_chain(&e)))?;
        let status = r.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            return Ok(false);
        }
        if !status.is_success() {
            let bytes = r.bytes().await.unwrap_or_default();
            return Err(format!("GET {url}: {status}: {}", error_text(&bytes)));
        }
        loop {
            let piece = tokio::time::timeout(stall, r.chunk())
                .await
                .map_err(|_| format!("GET {url}: the server sent nothing for {stall:?}"))?
                .map_err(|e| format!("GET {url}: {}", cause_chain(&e)))?;
            match piece {
                Some(bytes) => sink(&bytes).map_err(|e| e.to_string())?,
                None => return Ok(true),
            }
        }
    }
}

/// `--server` must be a URL with its scheme (`127.0.0.1:5000` alone would otherwise be read as
/// a URL whose scheme is `127.0.0.1`).
pub fn check_server_url(base: &str) -> Result<(), String> {
    match reqwest::Url::parse(base) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Ok(()),
        _ => Err(format!(
            "--server {base:?} is not an http:// or https:// URL: give the scheme, e.g. http://{}",
            base.trim_start_matches("//")
        )),
    }
}

/// An error with every cause it wraps (reqwest's own text hides "connection refused").
pub fn cause_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}
