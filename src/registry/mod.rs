//! Origin-registry behaviour: the OCI Distribution API over the local store.

pub mod blobs;
pub mod lists;
pub mod manifests;
pub mod quota;
pub mod receive;
pub mod uploads;

pub use crate::http::req::{empty, json_response, set, Req};

use crate::error::Result;
use crate::oci::reference::RepoName;
use crate::App;

impl App {
    /// Validates a repository name and checks that its registry exists (any type).
    pub fn repo(&self, name: &str) -> Result<RepoName> {
        let repo = RepoName::parse(name)?;
        if self.store.registry(repo.registry()).is_none() {
            return Err(crate::http::req::no_such_registry(repo.registry()));
        }
        Ok(repo)
    }
}
