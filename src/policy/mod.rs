//! Policies over a registry's images: name patterns (`pattern`) and which artifacts a cleanup
//! deletes (`cleanup`), decided without I/O so that a dry run and a real run agree.

pub mod cleanup;
pub mod pattern;
