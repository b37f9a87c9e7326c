//! Shared test harness: berth processes, OCI layouts, real clients.
#![allow(dead_code)]

pub mod clients;
pub mod doubles;
pub mod metrics;
pub mod oci_layout;
pub mod process;
pub mod server;
