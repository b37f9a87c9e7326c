//! The blob gate between online garbage collection and the writers (DESIGN.md 9, Harbor's
//! model): a collection *marks* the blobs it may delete before it looks for references, then
//! *claims* each still-marked one (marked → deleting, under one lock) just before deleting
//! it. Every writer that makes a blob referenced (an upload's or a fetch's commit and link, a
//! manifest's bytes and record, a link of a blob already held) *holds* the digest for the
//! length of its write: holding un-marks it, so the claim fails and the blob stays; a blob
//! already being deleted makes the holder wait until it is gone, and the holder then writes it
//! anew. So a blob is never deleted under a link, and nothing a push wrote is lost, with no
//! read-only window.
//!
//! The states live in memory: one node's writers and its collector meet here. (Several nodes
//! will need them in the shared metadata.)

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::oci::digest::Digest;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Writers hold it (how many).
    Held(u32),
    /// A collection may delete it.
    Marked,
    /// A collection is deleting it.
    Deleting,
}

/// The gate (one per store).
#[derive(Default)]
pub struct BlobGate {
    states: Mutex<HashMap<Digest, State>>,
    /// Woken when a deletion ends.
    deleted: Notify,
}

/// A writer's hold on a digest; released when dropped.
pub struct Hold {
    gate: Arc<BlobGate>,
    digest: Digest,
}

impl BlobGate {
    /// Holds `digest` for a write that will make it referenced: waits while a collection
    /// deletes it; un-marks it.
    pub async fn hold(self: &Arc<Self>, digest: &Digest) -> Hold {
        loop {
            // Registered before the check, so a deletion ending in between is not missed.
            let deleted = self.deleted.notified();
            {
                let mut states = self.states.lock();
                match states.get(digest).copied() {
                    Some(State::Deleting) => {}
                    Some(State::Held(n)) => {
                        states.insert(digest.clone(), State::Held(n + 1));
                        break;
                    }
                    Some(State::Marked) | None => {
                        states.insert(digest.clone(), State::Held(1));
                        break;
                    }
                }
            }
            deleted.await;
        }
        Hold {
            gate: self.clone(),
            digest: digest.clone(),
        }
    }

    /// Marks `digest` as a candidate of a collection, unless a writer holds it; whether it is
    /// marked.
    pub fn mark(&self, digest: &Digest) -> bool {
        let mut states = self.states.lock();
        match states.get(digest) {
            Some(State::Held(_)) | Some(State::Deleting) => false,
            Some(State::Marked) => true,
            None => {
                states.insert(digest.clone(), State::Marked);
                true
            }
        }
    }

    /// Un-marks a candidate found referenced.
    pub fn unmark(&self, digest: &Digest) {
        let mut states = self.states.lock();
        if states.get(digest) == Some(&State::Marked) {
            states.remove(digest);
        }
    }

    /// Claims a marked digest for deletion (marked → deleting); false when a writer took it
    /// meanwhile (it is no longer a candidate).
    pub fn claim(&self, digest: &Digest) -> bool {
        let mut states = self.states.lock();
        if states.get(digest) == Some(&State::Marked) {
            states.insert(digest.clone(), State::Deleting);
            true
        } else {
            false
        }
    }

    /// Ends the deletion of a claimed digest; writers waiting for it go on.
    pub fn deleted(&self, digest: &Digest) {
        let mut states = self.states.lock();
        if states.get(digest) == Some(&State::Deleting) {
            states.remove(digest);
        }
        drop(states);
        self.deleted.notify_waiters();
    }

    /// Drops every mark a collection left (it ended, or failed).
    pub fn clear_marks(&self) {
        self.states.lock().retain(|_, s| *s != State::Marked);
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        let mut states = self.gate.states.lock();
        match states.get(&self.digest).copied() {
            Some(State::Held(n)) if n > 1 => {
                states.insert(self.digest.clone(), State::Held(n - 1));
            }
            Some(State::Held(_)) => {
                states.remove(&self.digest);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn d(s: &str) -> Digest {
        Digest::sha256(s.as_bytes())
    }

    #[test]
    fn a_held_digest_is_neither_marked_nor_claimed() {
        let gate = Arc::new(BlobGate::default());
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let hold = rt.block_on(gate.hold(&d("a")));
        assert!(!gate.mark(&d("a")));
        assert!(!gate.claim(&d("a")));
        drop(hold);
        assert!(gate.mark(&d("a")));
        assert!(gate.claim(&d("a")));
    }

    #[test]
    fn a_hold_unmarks_and_the_claim_then_fails() {
        let gate = Arc::new(BlobGate::default());
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert!(gate.mark(&d("a")));
        let hold = rt.block_on(gate.hold(&d("a")));
        assert!(!gate.claim(&d("a")), "the writer took it back");
        drop(hold);
        assert!(!gate.claim(&d("a")), "no longer marked");
        assert!(gate.mark(&d("b")));
        gate.unmark(&d("b"));
        assert!(!gate.claim(&d("b")));
    }

    #[tokio::test]
    async fn a_writer_waits_for_a_deletion_to_end() {
        let gate = Arc::new(BlobGate::default());
        assert!(gate.mark(&d("a")));
        assert!(gate.claim(&d("a")));
        let g = gate.clone();
        let writer = tokio::spawn(async move {
            let _hold = g.hold(&d("a")).await;
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !writer.is_finished(),
            "the writer waits while the blob is deleted"
        );
        gate.deleted(&d("a"));
        tokio::time::timeout(Duration::from_secs(5), writer)
            .await
            .unwrap()
            .unwrap();
        assert!(gate.mark(&d("a")), "released");
    }

    #[test]
    fn clearing_leaves_holds_and_deletions() {
        let gate = Arc::new(BlobGate::default());
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let _hold = rt.block_on(gate.hold(&d("held")));
        assert!(gate.mark(&d("marked")));
        assert!(gate.mark(&d("deleting")) && gate.claim(&d("deleting")));
        gate.clear_marks();
        assert!(!gate.claim(&d("marked")), "marks are gone");
        assert!(!gate.mark(&d("held")));
        assert!(!gate.mark(&d("deleting")));
    }
}
