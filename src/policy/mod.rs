//! Policies over a registry's images: name patterns (`pattern`), which artifacts a cleanup
//! deletes (`cleanup`, decided without I/O so that a dry run and a real run agree), the policy
//! records with the protection check of the write paths (`book`), and the cleanup job (`run`).

pub mod book;
pub mod cleanup;
pub mod pattern;
pub mod run;
