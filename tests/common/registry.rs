//! A raw-HTTP registry client for tests that run berth as a process: pushes of small images
//! (monolithic blob uploads, manifests), and pulls that check every digest, with an optional
//! access key as Basic credentials.

use reqwest::StatusCode;
use serde_json::{json, Value};

use super::server::{sha256, OCI_INDEX, OCI_MANIFEST};

/// A registry client with an optional access key.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    key: Option<(String, String)>,
}

/// A chunked upload of `data` in PATCHes of `chunk` bytes: begun with a POST on `nodes[0]`,
/// PATCH `i` sent to `nodes[i % nodes.len()]`, closed with a PUT on the node of the last
/// PATCH (any node of a shared store must take the session on). Each step must be accepted;
/// answers the digest.
pub async fn chunked_upload(nodes: &[&Client], repo: &str, data: &[u8], chunk: usize) -> String {
    let r = nodes[0]
        .req(reqwest::Method::POST, &format!("/v2/{repo}/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let location = |r: &reqwest::Response| r.headers()["location"].to_str().unwrap().to_string();
    let mut at_location = location(&r);
    let mut last = nodes[0];
    for (i, piece) in data.chunks(chunk).enumerate() {
        let at = i * chunk;
        last = nodes[i % nodes.len()];
        let r = last
            .req(reqwest::Method::PATCH, &at_location)
            .header("content-range", format!("{at}-{}", at + piece.len() - 1))
            .body(piece.to_vec())
            .send()
            .await
            .unwrap();
        let status = r.status();
        let next = location(&r);
        assert_eq!(
            status,
            StatusCode::ACCEPTED,
            "PATCH {i}: {:?}",
            r.text().await
        );
        at_location = next;
    }
    let d = sha256(data);
    let sep = if at_location.contains('?') { '&' } else { '?' };
    let r = last
        .req(
            reqwest::Method::PUT,
            &format!("{at_location}{sep}digest={d}"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED, "{:?}", r.text().await);
    d
}

impl Client {
    /// Over an existing HTTP client (its default headers, credentials included, apply).
    pub fn over(http: reqwest::Client, base: &str) -> Client {
        Client {
            http,
            base: base.to_string(),
            key: None,
        }
    }

    pub fn new(base: &str, key: Option<(String, String)>) -> Client {
        Client {
            http: reqwest::Client::new(),
            base: base.to_string(),
            key,
        }
    }

    pub fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(method, format!("{}{path}", self.base));
        match &self.key {
            Some((id, secret)) => r.basic_auth(id, Some(secret)),
            None => r,
        }
    }

    pub async fn blob(&self, repo: &str, data: &[u8]) -> String {
        let d = sha256(data);
        let r = self
            .req(
                reqwest::Method::POST,
                &format!("/v2/{repo}/blobs/uploads/?digest={d}"),
            )
            .body(data.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            StatusCode::CREATED,
            "{}",
            r.text().await.unwrap()
        );
        d
    }

    pub async fn manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        body: &[u8],
    ) -> String {
        let r = self
            .req(
                reqwest::Method::PUT,
                &format!("/v2/{repo}/manifests/{reference}"),
            )
            .header("content-type", media_type)
            .body(body.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            StatusCode::CREATED,
            "{}",
            r.text().await.unwrap()
        );
        sha256(body)
    }

    /// Config, one layer unique to `seed` and one shared `shared` layer; the manifest's bytes.
    pub async fn image(&self, repo: &str, tag: &str, seed: &str, shared: &[u8]) -> Vec<u8> {
        let config_bytes = format!("{{\"seed\":\"{seed}\"}}").into_bytes();
        let config = self.blob(repo, &config_bytes).await;
        let layer_bytes = format!("layer of {seed}").into_bytes();
        let layer = self.blob(repo, &layer_bytes).await;
        let base = self.blob(repo, shared).await;
        let body = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": config_bytes.len()},
            "layers": [
                {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": base, "size": shared.len()},
                {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer, "size": layer_bytes.len()},
            ],
        }))
        .unwrap();
        self.manifest(repo, tag, OCI_MANIFEST, &body).await;
        body
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.req(reqwest::Method::GET, path).send().await.unwrap()
    }

    /// The manifest bytes of `repo:reference`, `None` on 404.
    pub async fn pull_manifest(&self, repo: &str, reference: &str) -> Option<Vec<u8>> {
        let r = self
            .req(
                reqwest::Method::GET,
                &format!("/v2/{repo}/manifests/{reference}"),
            )
            .header("accept", format!("{OCI_MANIFEST}, {OCI_INDEX}"))
            .send()
            .await
            .unwrap();
        if r.status() == StatusCode::NOT_FOUND {
            return None;
        }
        assert_eq!(r.status(), StatusCode::OK, "{repo}:{reference}");
        Some(r.bytes().await.unwrap().to_vec())
    }

    /// Pulls `repo:reference` completely (an index's children too), checking every digest;
    /// the manifest's bytes.
    pub async fn pull_all(&self, repo: &str, reference: &str) -> Vec<u8> {
        let bytes = self
            .pull_manifest(repo, reference)
            .await
            .unwrap_or_else(|| panic!("{repo}:{reference} does not pull"));
        let m: Value = serde_json::from_slice(&bytes).unwrap();
        if let Some(children) = m["manifests"].as_array() {
            for c in children {
                let d = c["digest"].as_str().unwrap();
                let child = Box::pin(self.pull_all(repo, d)).await;
                assert_eq!(sha256(&child), d);
            }
            return bytes;
        }
        let mut blobs = vec![m["config"]["digest"].as_str().unwrap().to_string()];
        for l in m["layers"].as_array().unwrap() {
            blobs.push(l["digest"].as_str().unwrap().to_string());
        }
        for d in blobs {
            let r = self.get(&format!("/v2/{repo}/blobs/{d}")).await;
            assert_eq!(r.status(), StatusCode::OK, "{repo}:{reference} blob {d}");
            assert_eq!(
                sha256(&r.bytes().await.unwrap()),
                d,
                "{repo}:{reference} blob {d}"
            );
        }
        bytes
    }

    pub async fn list(&self, path: &str, field: &str) -> Vec<String> {
        let v: Value = self.get(path).await.json().await.unwrap();
        v[field]
            .as_array()
            .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
            .unwrap_or_default()
    }

    /// Every (repository, tag) of the node.
    /// What the registry serves, to compare before and after: every tag with its manifest
    /// bytes (its blobs pulled and checked).
    pub async fn served(&self) -> Vec<(String, String, Vec<u8>)> {
        let mut all = Vec::new();
        for (repo, tag) in self.every_tag().await {
            let bytes = self.pull_all(&repo, &tag).await;
            all.push((repo, tag, bytes));
        }
        all
    }

    pub async fn every_tag(&self) -> Vec<(String, String)> {
        let mut all = Vec::new();
        for repo in self.list("/v2/_catalog?n=1000", "repositories").await {
            for tag in self.list(&format!("/v2/{repo}/tags/list"), "tags").await {
                all.push((repo.clone(), tag));
            }
        }
        all
    }
}
