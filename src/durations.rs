//! `"30s"`, `"2h"` durations in TOML and JSON (`#[serde(with = "crate::durations")]`): what
//! an operator writes in the configuration and what the API shows.

use serde::{Deserialize, Deserializer, Serializer};
use std::time::Duration;

/// Writes a duration as humantime text.
pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}

/// Reads humantime text (`"10s"`, `"1h 30m"`).
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(serde::de::Error::custom)
}
