//! An in-process berth on an ephemeral port in a temp dir, and raw-HTTP helpers.

use berth::config::Config;
use reqwest::{Client, Method, Response, StatusCode};
use sha2::{Digest as _, Sha256};

/// A server running inside the test process.
pub struct TestServer {
    pub server: Option<berth::Server>,
    pub base: String,
    pub dir: tempfile::TempDir,
    pub client: Client,
    extra: String,
    /// Whether the server has the normal registry `library` besides what `extra` declares.
    library: bool,
}

/// Config for a temp dir: one listener on port 0 plus `extra` TOML.
pub fn config_for(dir: &std::path::Path, extra: &str) -> Config {
    let text = format!(
        "data_dir = {:?}\nshutdown_grace = \"2s\"\n[[listen]]\naddr = \"127.0.0.1:0\"\n{extra}",
        dir.join("data")
    );
    let c = Config::from_toml(&text).expect("test config parses");
    c.validate().expect("test config is valid");
    c
}

impl TestServer {
    /// Starts with registry `library` (normal) plus `extra` TOML.
    pub async fn start(extra: &str) -> TestServer {
        TestServer::start_with(extra, true).await
    }

    /// Starts with only what `extra` declares (mirror mode refuses a registry `library`).
    pub async fn start_bare(extra: &str) -> TestServer {
        TestServer::start_with(extra, false).await
    }

    async fn start_with(extra: &str, library: bool) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let mut s = TestServer {
            server: None,
            base: String::new(),
            dir,
            client: Client::builder().build().unwrap(),
            extra: extra.to_string(),
            library,
        };
        s.boot(extra).await;
        s
    }

    async fn boot(&mut self, extra: &str) {
        let library = if self.library {
            "[[registry]]\nname = \"library\"\n"
        } else {
            ""
        };
        let extra = format!("{library}{extra}");
        let server = berth::Server::start(config_for(self.dir.path(), &extra))
            .await
            .unwrap();
        self.base = format!("http://{}", server.local_addrs()[0].0);
        self.server = Some(server);
    }

    /// Graceful stop and start again on the same data directory.
    pub async fn restart(&mut self) {
        self.server.take().unwrap().shutdown().await;
        let extra = self.extra.clone();
        self.boot(&extra).await;
    }

    /// The running server's shared state.
    /// Whether the store holds `digest` as a committed blob (the filesystem backend's layout:
    /// `DATA/blobs/<algo>/<2 hex>/<hex>`), checked without a runtime.
    pub fn holds_blob(&self, digest: &berth::oci::digest::Digest) -> bool {
        let hex = digest.hex();
        self.dir
            .path()
            .join("data")
            .join("blobs")
            .join(digest.algorithm().as_str())
            .join(&hex[..2])
            .join(hex)
            .exists()
    }

    pub fn app(&self) -> std::sync::Arc<berth::App> {
        self.server.as_ref().unwrap().app().clone()
    }

    /// The value of `name` (with `labels`) on this server's `/metrics`, 0 when absent; see
    /// [`super::metrics::metric_value`]. The recorder is shared by the whole test binary:
    /// compare a reading before an action with one after it.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let text = self.get("/metrics").await.text().await.unwrap();
        super::metrics::metric_value(&text, name, labels)
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        self.base.trim_start_matches("http://").to_string()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub async fn req(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.client.request(method, self.url(path))
    }

    /// `method /api/v1{path}` with an optional JSON body; the status and the JSON answer (its
    /// text as a JSON string when it is not JSON).
    pub async fn api(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (StatusCode, serde_json::Value) {
        let mut r = self
            .client
            .request(method, self.url(&format!("/api/v1{path}")));
        if let Some(b) = body {
            r = r.json(&b);
        }
        let r = r.send().await.unwrap();
        let status = r.status();
        let text = r.text().await.unwrap();
        let value = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
        (status, value)
    }

    pub async fn get(&self, path: &str) -> Response {
        self.client.get(self.url(path)).send().await.unwrap()
    }

    /// Creates a user with one access key (auth turns on with the first user in `auto` mode);
    /// returns (Access Key ID, Secret Key).
    pub fn user(
        &self,
        name: &str,
        role: berth::auth::Role,
        registries: &[&str],
    ) -> (String, String) {
        let app = self.app();
        super::block(app.auth.users.create(
            name,
            role,
            registries.iter().map(|r| r.to_string()).collect(),
        ))
        .unwrap();
        let (key, secret) = super::block(app.auth.users.create_key(name)).unwrap();
        (key.id, secret)
    }

    /// Monolithic push of a blob; returns its digest.
    pub async fn push_blob(&self, repo: &str, data: &[u8]) -> String {
        self.push_blob_via(&self.base, repo, data).await
    }

    /// Monolithic push of a blob through the listener at `base`; returns its digest.
    pub async fn push_blob_via(&self, base: &str, repo: &str, data: &[u8]) -> String {
        super::registry::Client::over(self.client.clone(), base)
            .blob(repo, data)
            .await
    }

    /// Pushes a manifest; returns the response.
    pub async fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        body: &[u8],
    ) -> Response {
        self.client
            .put(self.url(&format!("/v2/{repo}/manifests/{reference}")))
            .header("content-type", media_type)
            .body(body.to_vec())
            .send()
            .await
            .unwrap()
    }

    /// Pushes config + one layer and an OCI manifest tagged `tag`; returns (manifest bytes, digest).
    pub async fn push_image(&self, repo: &str, tag: &str, seed: &str) -> (Vec<u8>, String) {
        let config = self
            .push_blob(repo, format!("{{\"seed\":\"{seed}\"}}").as_bytes())
            .await;
        let layer_bytes = format!("layer {seed}").into_bytes();
        let layer = self.push_blob(repo, &layer_bytes).await;
        let manifest = image_manifest(
            &config,
            12 + seed.len() as u64,
            &layer,
            layer_bytes.len() as u64,
        );
        let r = self.put_manifest(repo, tag, OCI_MANIFEST, &manifest).await;
        assert_eq!(
            r.status(),
            StatusCode::CREATED,
            "{}",
            r.text().await.unwrap()
        );
        let d = sha256(&manifest);
        (manifest, d)
    }
}

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

pub fn image_manifest(config: &str, config_size: u64, layer: &str, layer_size: u64) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer, "size": layer_size}],
    }))
    .unwrap()
}

/// Config of an edge caching `url` as image cache `up` behind cache registry `hub`;
/// `cache_options` go into the `[[image_cache]]` table, `extra` after it.
pub fn cache_toml(kind: &str, url: &str, cache_options: &str, extra: &str) -> String {
    format!(
        "[[image_cache]]\nname = \"up\"\nkind = \"{kind}\"\nurl = \"{url}\"\n{cache_options}\n[[registry]]\nname = \"hub\"\ntype = \"cache\"\ncache = \"up\"\n{extra}"
    )
}

/// The OCI error code and message of a response body.
pub async fn error_of(r: Response) -> (String, String) {
    let v: serde_json::Value = r.json().await.expect("error body is JSON");
    let e = &v["errors"][0];
    (
        e["code"].as_str().expect("errors[0].code").to_string(),
        e["message"].as_str().unwrap_or("").to_string(),
    )
}

/// The OCI error code of a response body.
pub async fn error_code(r: Response) -> String {
    let v: serde_json::Value = r.json().await.expect("error body is JSON");
    v["errors"][0]["code"]
        .as_str()
        .expect("errors[0].code")
        .to_string()
}

pub fn header(r: &Response, name: &str) -> String {
    r.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}
