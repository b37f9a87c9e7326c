//! What the store holds, served over HTTP: manifests from a hot cache of ready responses, and
//! blobs with `Range`. Origin registries (`registry/`) and cache registries (`cache/`) both serve
//! through it; neither reaches into the other's handlers.

pub mod blobs;
pub mod manifests;
