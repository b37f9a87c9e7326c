//! The CLI's remote mode: admin commands as calls to a running server's management API,
//! authenticated with an access key as Basic credentials.

use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use reqwest::Method;
use serde_json::Value;

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

impl Remote {
    /// A client for the server at `base` (`http(s)://host:port`); `key` is (Access Key ID, Secret Key).
    pub fn new(base: &str, key: Option<(String, String)>) -> Result<Remote, String> {
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

    /// Calls `METHOD /api/v1{path}` with an optional JSON body; returns the JSON answer, or the
    /// API's error message.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, String> {
        let url = format!("{}/api/v1{path}", self.base);
        let mut req = self.client.request(method.clone(), &url);
        if let Some((id, secret)) = &self.key {
            req = req.basic_auth(id, Some(secret));
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req
            .send()
            .await
            .map_err(|e| format!("cannot reach {}: {e}", self.base))?;
        let status = r.status();
        let text = r.text().await.map_err(|e| e.to_string())?;
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if status.is_success() {
            return Ok(value);
        }
        let message = value["errors"][0]["message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| value.to_string());
        let hint = if status == reqwest::StatusCode::UNAUTHORIZED && self.key.is_none() {
            " (give --access-key and --secret-key, or BERTH_ACCESS_KEY and BERTH_SECRET_KEY)"
        } else {
            ""
        };
        Err(format!("{method} {url}: {status}: {message}{hint}"))
    }
}
