//! Replication endpoints: another berth or any OCI registry, with its credentials (a record of
//! their own, never shown or logged), its TLS checks, and the client that talks to it (the
//! image caches' client: the same token flow, retries, redirect and egress checks).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::RwLock;
use serde::{Deserialize, Serialize};

use crate::cache::upstream::{ClientTls, Source, UpstreamError, UpstreamRequest};
use crate::config::{ImageCacheConfig, PullThrough};
use crate::http::egress::EgressPolicy;
use crate::store::meta::{CredentialRecord, MetaResult, MetaStore, Records, SourceKind};

/// An endpoint as stored and shown (no secret in it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRecord {
    /// Its name, which rules refer to.
    pub name: String,
    /// What it is: `registry` for another berth or any OCI registry, or a cloud registry kind
    /// (its token flow).
    pub kind: SourceKind,
    /// Its URL (`https://eu.example.com:5000`).
    pub url: String,
    /// Accept any TLS certificate.
    #[serde(default)]
    pub insecure: bool,
    /// CA certificates (PEM) trusted for it besides the system's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

/// An endpoint with its credentials, as the config and the API take it. For another berth:
/// `username` is an access key id, `password` its secret.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EndpointSpec {
    /// Its name.
    pub name: String,
    /// Its kind (default `registry`).
    #[serde(default = "registry_kind")]
    pub kind: SourceKind,
    /// Its URL.
    pub url: String,
    /// Accept any TLS certificate.
    #[serde(default)]
    pub insecure: bool,
    /// CA file.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Credentials.
    #[serde(flatten)]
    pub credentials: CredentialRecord,
}

fn registry_kind() -> SourceKind {
    SourceKind::Registry
}

impl EndpointSpec {
    /// The record and the credentials.
    pub fn split(self) -> (EndpointRecord, CredentialRecord) {
        (
            EndpointRecord {
                name: self.name,
                kind: self.kind,
                url: self.url,
                insecure: self.insecure,
                ca_file: self.ca_file,
            },
            self.credentials,
        )
    }
}

/// Most endpoints stored.
pub const MAX_ENDPOINTS: usize = 100;

const ENDPOINTS: &str = "replication_endpoints";
const CREDENTIALS: &str = "replication_credentials";

/// The endpoints and their clients.
pub struct Endpoints {
    records: Records<EndpointRecord>,
    credentials: Records<CredentialRecord>,
    clients: RwLock<HashMap<String, Arc<Source>>>,
    settings: PullThrough,
    egress: Arc<EgressPolicy>,
}

/// Why an endpoint could not be stored or used.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// The definition is refused (the reason names the field).
    #[error("{0}")]
    Invalid(String),
    /// No such endpoint.
    #[error("replication endpoint {0:?} does not exist")]
    Unknown(String),
    /// The metadata failed.
    #[error(transparent)]
    Meta(#[from] crate::store::meta::MetaError),
}

impl Endpoints {
    /// Opens the endpoints stored in `meta`.
    pub fn open(
        meta: Arc<dyn MetaStore>,
        allowed_ports: &[u16],
        egress: Arc<EgressPolicy>,
    ) -> Endpoints {
        Endpoints {
            records: Records::new(meta.clone(), ENDPOINTS),
            credentials: Records::new(meta, CREDENTIALS),
            clients: RwLock::default(),
            settings: PullThrough {
                allowed_ports: allowed_ports.to_vec(),
                ..PullThrough::default()
            },
            egress,
        }
    }

    fn build(
        &self,
        record: &EndpointRecord,
        credentials: &CredentialRecord,
    ) -> Result<Source, String> {
        let mut c = ImageCacheConfig::new(&record.name, record.kind, &record.url);
        c.username = credentials.username.clone();
        c.password = credentials.password.clone();
        c.credentials_file = credentials.credentials_file.clone();
        let tls = ClientTls {
            insecure: record.insecure,
            ca_file: record.ca_file.clone(),
        };
        Source::build_with(c, &self.settings, self.egress.clone(), &tls)
            .map(|s| s.with_role("replication endpoint"))
    }

    /// Creates or replaces an endpoint after checking that its client can be built (URL, port,
    /// credentials, CA file).
    pub async fn put(&self, spec: EndpointSpec) -> Result<EndpointRecord, EndpointError> {
        crate::oci::reference::validate_registry_name(&spec.name)
            .map_err(|e| EndpointError::Invalid(format!("name: {e}")))?;
        let (record, credentials) = spec.split();
        let client = self
            .build(&record, &credentials)
            .map_err(EndpointError::Invalid)?;
        let exists = self.records.get(&[&record.name]).await?.is_some();
        if !exists && self.records.list(&[]).await?.len() >= MAX_ENDPOINTS {
            return Err(EndpointError::Invalid(format!(
                "at most {MAX_ENDPOINTS} endpoints"
            )));
        }
        if credentials.is_empty() {
            self.credentials.remove(&[&record.name]).await?;
        } else {
            self.credentials.put(&[&record.name], &credentials).await?;
        }
        self.records.put(&[&record.name], &record).await?;
        self.clients
            .write()
            .insert(record.name.clone(), Arc::new(client));
        Ok(record)
    }

    /// Every endpoint, by name.
    pub async fn list(&self) -> MetaResult<Vec<EndpointRecord>> {
        Ok(self
            .records
            .list(&[])
            .await?
            .into_iter()
            .map(|(_, r)| r)
            .collect())
    }

    /// One endpoint.
    pub async fn get(&self, name: &str) -> MetaResult<Option<EndpointRecord>> {
        self.records.get(&[name]).await
    }

    /// Whether credentials are stored for an endpoint.
    pub async fn has_credentials(&self, name: &str) -> MetaResult<bool> {
        Ok(self.credentials.get(&[name]).await?.is_some())
    }

    /// Deletes an endpoint and its credentials; whether it existed.
    pub async fn remove(&self, name: &str) -> MetaResult<bool> {
        self.clients.write().remove(name);
        self.credentials.remove(&[name]).await?;
        Ok(self.records.remove(&[name]).await?.is_some())
    }

    /// The client of an endpoint (built at first use, kept until the endpoint changes).
    pub async fn client(&self, name: &str) -> Result<Arc<Source>, EndpointError> {
        if let Some(c) = self.clients.read().get(name) {
            return Ok(c.clone());
        }
        let record = self
            .records
            .get(&[name])
            .await?
            .ok_or_else(|| EndpointError::Unknown(name.to_string()))?;
        let credentials = self.credentials.get(&[name]).await?.unwrap_or_default();
        let client = Arc::new(
            self.build(&record, &credentials)
                .map_err(EndpointError::Invalid)?,
        );
        self.clients
            .write()
            .insert(name.to_string(), client.clone());
        Ok(client)
    }

    /// Tries the endpoint: `GET /v2/` with its credentials (a token without scope where it asks
    /// for one). `Ok` is the API version check passing.
    pub async fn test(&self, name: &str) -> Result<Result<(), UpstreamError>, EndpointError> {
        let client = self.client(name).await?;
        let req =
            UpstreamRequest::new(http::Method::GET, String::new(), "", http::HeaderMap::new());
        let deadline = Instant::now() + Duration::from_secs(15);
        Ok(client.send(&req, deadline).await.map(|_| ()))
    }
}
