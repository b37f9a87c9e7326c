//! Storage used per registry, kept by the metadata's write paths: every distinct blob or
//! manifest a registry's repositories hold counts once for that registry (a layer shared by ten
//! images of one registry is stored once, and counted once).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use crate::oci::digest::Digest;

/// What a registry holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Bytes of its distinct blobs and manifests.
    pub bytes: u64,
    /// Its distinct blobs and manifests.
    pub blobs: u64,
    /// Its artifacts (manifests, per repository).
    pub artifacts: u64,
}

/// A digest as a fixed-size key (sha256 digests as their bytes; any other algorithm hashed).
type Key = [u8; 32];

fn key_of(digest: &Digest) -> Key {
    let mut k = [0u8; 32];
    if hex::decode_to_slice(digest.hex(), &mut k).is_ok() {
        return k;
    }
    sha2::Sha256::digest(digest.as_str().as_bytes()).into()
}

/// One registry's holdings: each digest with how many links and artifacts hold it, and its size.
#[derive(Default)]
struct Held {
    refs: HashMap<Key, (u32, u64)>,
    bytes: u64,
    artifacts: u64,
}

/// The holdings of every registry, in memory: counted from the stored links and artifacts when
/// the metadata opens, then changed by each write that adds or removes one.
#[derive(Default)]
pub(super) struct UsageBook {
    registries: HashMap<String, Held>,
}

impl Held {
    fn usage(&self) -> Usage {
        Usage {
            bytes: self.bytes,
            blobs: self.refs.len() as u64,
            artifacts: self.artifacts,
        }
    }
}

/// The registry of a repository (its first segment).
pub(super) fn registry_of(repo: &str) -> &str {
    repo.split('/').next().unwrap_or(repo)
}

impl UsageBook {
    /// `repo` now holds `digest` (`size` bytes) once more: a new blob link or a new artifact.
    pub(super) fn hold(&mut self, repo: &str, digest: &Digest, size: u64, artifact: bool) {
        let held = self
            .registries
            .entry(registry_of(repo).to_string())
            .or_default();
        let entry = held.refs.entry(key_of(digest)).or_insert((0, size));
        if entry.0 == 0 {
            held.bytes += entry.1;
        }
        entry.0 += 1;
        if artifact {
            held.artifacts += 1;
        }
    }

    /// `repo` holds `digest` once less: a removed blob link or artifact.
    pub(super) fn release(&mut self, repo: &str, digest: &Digest, artifact: bool) {
        let Some(held) = self.registries.get_mut(registry_of(repo)) else {
            return;
        };
        if artifact {
            held.artifacts = held.artifacts.saturating_sub(1);
        }
        let k = key_of(digest);
        if let Some(entry) = held.refs.get_mut(&k) {
            entry.0 -= 1;
            if entry.0 == 0 {
                held.bytes -= entry.1;
                held.refs.remove(&k);
            }
        }
    }

    /// A registry was deleted with everything under it.
    pub(super) fn forget(&mut self, registry: &str) {
        self.registries.remove(registry);
    }

    /// What one registry holds (nothing for one that holds nothing).
    pub(super) fn of(&self, registry: &str) -> Usage {
        self.registries
            .get(registry)
            .map_or_else(Usage::default, Held::usage)
    }

    /// How many of a registry's blobs and manifests another registry holds too (a deletion
    /// there does not free them): a walk of its digests, for the API, not for every scrape.
    pub(super) fn shared_blobs(&self, registry: &str) -> u64 {
        let Some(held) = self.registries.get(registry) else {
            return 0;
        };
        held.refs
            .keys()
            .filter(|k| {
                self.registries
                    .iter()
                    .any(|(other, h)| other != registry && h.refs.contains_key(*k))
            })
            .count() as u64
    }

    /// Every registry holding something, by name.
    pub(super) fn usage(&self) -> Vec<(String, Usage)> {
        let mut out: Vec<(String, Usage)> = self
            .registries
            .iter()
            .filter(|(_, held)| !held.refs.is_empty() || held.artifacts > 0)
            .map(|(name, held)| (name.clone(), held.usage()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Digest {
        Digest::sha256(s.as_bytes())
    }

    #[test]
    fn a_digest_counts_once_per_registry_however_many_hold_it() {
        let mut book = UsageBook::default();
        book.hold("lib/a", &d("layer"), 100, false);
        book.hold("lib/b", &d("layer"), 100, false);
        book.hold("lib/a", &d("manifest"), 10, true);
        book.hold("team/x", &d("layer"), 100, false);
        let usage = book.usage();
        assert_eq!(
            usage[0],
            (
                "lib".into(),
                Usage {
                    bytes: 110,
                    blobs: 2,
                    artifacts: 1
                }
            )
        );
        assert_eq!(book.shared_blobs("lib"), 1);
        assert_eq!(book.of("lib"), usage[0].1);
        assert_eq!(usage[1].1.bytes, 100);
        book.release("lib/a", &d("layer"), false);
        assert_eq!(book.usage()[0].1.bytes, 110, "lib/b still holds the layer");
        book.release("lib/b", &d("layer"), false);
        book.release("lib/a", &d("manifest"), true);
        assert_eq!(
            book.usage().len(),
            1,
            "lib holds nothing: only team is listed"
        );
        assert_eq!(book.shared_blobs("team"), 0);
        assert_eq!(book.of("lib"), Usage::default());
        book.forget("team");
        assert!(book.usage().is_empty());
    }

    #[test]
    fn other_algorithms_have_keys_too() {
        let sha512 = Digest::parse(&format!("sha512:{}", "ab".repeat(64))).unwrap();
        assert_ne!(key_of(&sha512), key_of(&d("x")));
    }
}
