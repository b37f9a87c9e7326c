//! HTTP plumbing: listeners and TLS, routing, streaming bodies.

pub mod body;
pub mod deadline;
pub mod egress;
pub mod finish;
pub mod h1;
pub mod pool;
pub mod req;
pub mod router;
pub mod server;
pub mod tls;
