//! OCI protocol types with no I/O: references, digests, manifests.

pub mod digest;
pub mod manifest;
pub mod reference;
