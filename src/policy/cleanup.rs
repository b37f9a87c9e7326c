//! Which artifacts of an image a cleanup deletes (DESIGN.md 9), decided without I/O from the
//! image's artifacts and the registry's policies, so a dry run and a real run select the same.
//!
//! Each enabled policy whose image pattern matches the image selects the artifacts with a tag
//! its tag filter matches (an untagged artifact is tested as the empty string) and keeps what
//! its rule names among them. The union of what the policies keep stays, with everything it
//! needs: the children of a kept index and the referrers (signatures, SBOMs) of a kept
//! artifact. Protected artifacts stay with what they need too. Everything else is deleted, an
//! artifact as a whole with all its tags: several policies can only keep more, never delete
//! more.
//!
//! What belongs to another artifact of the image follows it and takes no place of its own in a
//! rule's count: the untagged platform manifests of an index, and the referrers of an artifact
//! (signatures, SBOMs; a cosign `sha256-HEX.sig` tag included). They stay when what they belong
//! to stays, and go with it.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use super::pattern::Pattern;
use crate::oci::digest::Digest;

const DAY_MS: u64 = 24 * 3600 * 1000;

/// What a policy keeps among the artifacts it selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "rule", content = "n", rename_all = "snake_case")]
pub enum Rule {
    /// The N most recently pushed.
    LatestPushed(u32),
    /// The N most recently pulled (never pulled: after every pulled one, newest push first).
    LatestPulled(u32),
    /// Those pushed within the last N days.
    PushedWithinDays(u32),
    /// Those pulled within the last N days.
    PulledWithinDays(u32),
    /// All of them.
    Always,
}

/// A rule's name, as the API and the records give it (its N apart).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleKind {
    /// [`Rule::LatestPushed`].
    LatestPushed,
    /// [`Rule::LatestPulled`].
    LatestPulled,
    /// [`Rule::PushedWithinDays`].
    PushedWithinDays,
    /// [`Rule::PulledWithinDays`].
    PulledWithinDays,
    /// [`Rule::Always`].
    Always,
}

impl Rule {
    /// The rule named `kind` with its N (`always` takes none, the others need one).
    pub fn of(kind: RuleKind, n: Option<u32>) -> Result<Rule, String> {
        Ok(match (kind, n) {
            (RuleKind::Always, None) => Rule::Always,
            (RuleKind::Always, Some(_)) => return Err("rule always takes no n".into()),
            (_, None) => {
                let name = serde_json::to_string(&kind).unwrap_or_default();
                return Err(format!("rule {name} needs n (a count or days)"));
            }
            (RuleKind::LatestPushed, Some(n)) => Rule::LatestPushed(n),
            (RuleKind::LatestPulled, Some(n)) => Rule::LatestPulled(n),
            (RuleKind::PushedWithinDays, Some(n)) => Rule::PushedWithinDays(n),
            (RuleKind::PulledWithinDays, Some(n)) => Rule::PulledWithinDays(n),
        })
    }
}

/// Whether a tag filter keeps what its pattern matches or what it does not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TagMode {
    /// Tags the pattern matches.
    #[default]
    Matching,
    /// Tags the pattern does not match.
    Excluding,
}

/// A cleanup policy, compiled.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Its id (reported with what it kept).
    pub id: String,
    /// Disabled policies keep nothing.
    pub enabled: bool,
    /// Image names (the repository below the registry).
    pub images: Pattern,
    /// Tags.
    pub tags: Pattern,
    /// Matching or excluding.
    pub tag_mode: TagMode,
    /// What it keeps.
    pub rule: Rule,
}

/// One artifact of the image, as the selection sees it.
#[derive(Debug, Clone)]
pub struct Artifact {
    /// Its digest.
    pub digest: Digest,
    /// Its tags (none: untagged).
    pub tags: Vec<String>,
    /// First push, Unix ms.
    pub pushed_ms: u64,
    /// Last pull, Unix ms.
    pub pulled_ms: Option<u64>,
    /// Index children (manifests it needs).
    pub children: Vec<Digest>,
    /// The artifact it refers to (an OCI `subject`, or the digest a cosign `sha256-HEX.sig`
    /// tag names).
    pub subject: Option<Digest>,
    /// Protected by a protection policy: never deleted.
    pub protected: bool,
}

/// Why an artifact stays.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "why", content = "by", rename_all = "snake_case")]
pub enum Kept {
    /// A policy kept it (its id).
    Policy(String),
    /// A protection policy protects it.
    Protected,
    /// A kept index needs it (the index's digest).
    ChildOf(Digest),
    /// It refers to a kept artifact (that artifact's digest).
    ReferrerOf(Digest),
    /// No enabled policy applies to its image.
    NotCovered,
}

/// What a cleanup does to one image.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    /// What stays, and the first reason found.
    pub kept: BTreeMap<Digest, Kept>,
    /// What goes, with its tags.
    pub deleted: BTreeMap<Digest, Vec<String>>,
}

/// The selection for the image `image` (its name below the registry) of `artifacts`, at `now_ms`.
pub fn select(policies: &[Policy], image: &str, artifacts: &[Artifact], now_ms: u64) -> Selection {
    let mut kept: BTreeMap<Digest, Kept> = BTreeMap::new();
    let applying: Vec<&Policy> = policies
        .iter()
        .filter(|p| p.enabled && p.images.matches(image))
        .collect();
    // An image no enabled policy names is out of the cleanup's scope (Harbor's model: the
    // image pattern marks what a policy applies to), not an image to empty.
    if applying.is_empty() {
        let kept = artifacts
            .iter()
            .map(|a| (a.digest.clone(), Kept::NotCovered))
            .collect();
        return Selection {
            kept,
            deleted: BTreeMap::new(),
        };
    }
    let present: HashSet<&Digest> = artifacts.iter().map(|a| &a.digest).collect();
    let children: HashSet<&Digest> = artifacts.iter().flat_map(|a| &a.children).collect();
    let follows = |a: &Artifact| {
        (a.tags.is_empty() && children.contains(&a.digest))
            || a.subject.as_ref().is_some_and(|s| present.contains(s))
    };
    for policy in applying {
        let selected: Vec<&Artifact> = artifacts
            .iter()
            .filter(|a| !follows(a) && policy.selects(a))
            .collect();
        for a in keep(policy.rule, selected, now_ms) {
            kept.entry(a.digest.clone())
                .or_insert_with(|| Kept::Policy(policy.id.clone()));
        }
    }
    for a in artifacts.iter().filter(|a| a.protected) {
        kept.insert(a.digest.clone(), Kept::Protected);
    }
    // What the kept need: children of kept indexes, referrers of kept artifacts, until nothing
    // more is added (a kept index's child may have a signature of its own).
    let by_digest: HashMap<&Digest, &Artifact> = artifacts.iter().map(|a| (&a.digest, a)).collect();
    let mut referrers: HashMap<&Digest, Vec<&Digest>> = HashMap::new();
    for a in artifacts {
        if let Some(subject) = &a.subject {
            referrers.entry(subject).or_default().push(&a.digest);
        }
    }
    let mut todo: Vec<Digest> = kept.keys().cloned().collect();
    while let Some(digest) = todo.pop() {
        let children = by_digest
            .get(&digest)
            .map(|a| a.children.as_slice())
            .unwrap_or_default();
        let needed = children
            .iter()
            .map(|c| (c, Kept::ChildOf(digest.clone())))
            .chain(
                referrers
                    .get(&digest)
                    .into_iter()
                    .flatten()
                    .map(|r| (*r, Kept::ReferrerOf(digest.clone()))),
            );
        for (d, why) in needed.collect::<Vec<_>>() {
            if !kept.contains_key(d) && by_digest.contains_key(d) {
                kept.insert(d.clone(), why);
                todo.push(d.clone());
            }
        }
    }
    let deleted = artifacts
        .iter()
        .filter(|a| !kept.contains_key(&a.digest))
        .map(|a| (a.digest.clone(), a.tags.clone()))
        .collect();
    Selection { kept, deleted }
}

/// An artifact with what belongs to it (untagged platform manifests of an index, referrers),
/// recursively: what is kept or evicted as one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unit {
    /// The artifact (index into the image's artifacts).
    pub root: usize,
    /// The root and everything that belongs to it (indexes into the image's artifacts).
    pub members: Vec<usize>,
}

/// The units of an image: one per artifact that belongs to no other.
pub fn units(artifacts: &[Artifact]) -> Vec<Unit> {
    let index: HashMap<&Digest, usize> = artifacts
        .iter()
        .enumerate()
        .map(|(i, a)| (&a.digest, i))
        .collect();
    let mut parents: HashMap<&Digest, usize> = HashMap::new();
    for a in artifacts {
        for c in &a.children {
            *parents.entry(c).or_default() += 1;
        }
    }
    let mut referrers: HashMap<&Digest, Vec<usize>> = HashMap::new();
    for (i, a) in artifacts.iter().enumerate() {
        if let Some(s) = &a.subject {
            referrers.entry(s).or_default().push(i);
        }
    }
    let follows = |a: &Artifact| {
        (a.tags.is_empty() && parents.contains_key(&a.digest))
            || a.subject.as_ref().is_some_and(|s| index.contains_key(s))
    };
    let mut out = Vec::new();
    for (root, a) in artifacts.iter().enumerate() {
        if follows(a) {
            continue;
        }
        let mut members = vec![root];
        let mut todo = vec![root];
        while let Some(i) = todo.pop() {
            let node = &artifacts[i];
            // A platform manifest two indexes share belongs to neither alone.
            let children = node
                .children
                .iter()
                .filter(|c| parents.get(c) == Some(&1))
                .filter_map(|c| index.get(c).copied())
                .filter(|&c| artifacts[c].tags.is_empty());
            let refs = referrers.get(&node.digest).into_iter().flatten().copied();
            for m in children.chain(refs).collect::<Vec<_>>() {
                if !members.contains(&m) {
                    members.push(m);
                    todo.push(m);
                }
            }
        }
        out.push(Unit { root, members });
    }
    out
}

impl Policy {
    /// Whether the policy's tag filter selects the artifact (any of its tags, or the empty
    /// string for an untagged one).
    fn selects(&self, a: &Artifact) -> bool {
        let test = |tag: &str| match self.tag_mode {
            TagMode::Matching => self.tags.matches(tag),
            TagMode::Excluding => !self.tags.matches(tag),
        };
        if a.tags.is_empty() {
            test("")
        } else {
            a.tags.iter().any(|t| test(t))
        }
    }
}

/// What `rule` keeps among `selected`.
fn keep(rule: Rule, mut selected: Vec<&Artifact>, now_ms: u64) -> Vec<&Artifact> {
    let within = |days: u32, at: Option<u64>| {
        at.is_some_and(|t| t.saturating_add(u64::from(days) * DAY_MS) >= now_ms)
    };
    match rule {
        Rule::Always => selected,
        Rule::LatestPushed(n) => {
            selected.sort_by(|a, b| b.pushed_ms.cmp(&a.pushed_ms).then(a.digest.cmp(&b.digest)));
            selected.truncate(n as usize);
            selected
        }
        Rule::LatestPulled(n) => {
            selected.sort_by(|a, b| {
                b.pulled_ms
                    .cmp(&a.pulled_ms)
                    .then(b.pushed_ms.cmp(&a.pushed_ms))
                    .then(a.digest.cmp(&b.digest))
            });
            selected.truncate(n as usize);
            selected
        }
        Rule::PushedWithinDays(days) => selected
            .into_iter()
            .filter(|a| within(days, Some(a.pushed_ms)))
            .collect(),
        Rule::PulledWithinDays(days) => selected
            .into_iter()
            .filter(|a| within(days, a.pulled_ms))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_000 * DAY_MS;

    /// An artifact named `name` (its digest is the hash of the name), pushed `pushed` days ago,
    /// pulled `pulled` days ago.
    fn art(name: &str, tags: &[&str], pushed: u64, pulled: Option<u64>) -> Artifact {
        Artifact {
            digest: dg(name),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            pushed_ms: NOW - pushed * DAY_MS,
            pulled_ms: pulled.map(|d| NOW - d * DAY_MS),
            children: vec![],
            subject: None,
            protected: false,
        }
    }

    fn dg(name: &str) -> Digest {
        Digest::sha256(name.as_bytes())
    }

    fn policy(images: &str, tags: &str, mode: TagMode, rule: Rule) -> Policy {
        Policy {
            id: format!("{images}|{tags}|{mode:?}|{rule:?}"),
            enabled: true,
            images: Pattern::new(images).unwrap(),
            tags: Pattern::new(tags).unwrap(),
            tag_mode: mode,
            rule,
        }
    }

    use TagMode::{Excluding, Matching};

    /// The image `library/app`: five releases, a release candidate, two untagged builds.
    fn app() -> Vec<Artifact> {
        vec![
            art("v1", &["1.0"], 50, Some(40)),
            art("v2", &["1.1", "stable"], 40, Some(1)),
            art("v3", &["1.2"], 30, None),
            art("v4", &["2.0"], 20, Some(10)),
            art("v5", &["2.1", "latest"], 10, Some(2)),
            art("rc", &["2.2-rc1"], 5, None),
            art("u1", &[], 3, None),
            art("u2", &[], 1, Some(1)),
        ]
    }

    /// Names of the deleted artifacts, sorted.
    fn deleted(policies: &[Policy], image: &str, artifacts: &[Artifact]) -> Vec<String> {
        let names: HashMap<Digest, String> = [
            "v1", "v2", "v3", "v4", "v5", "rc", "u1", "u2", "idx", "amd", "arm", "sig", "sbom",
            "old",
        ]
        .iter()
        .map(|n| (dg(n), n.to_string()))
        .collect();
        let mut out: Vec<String> = select(policies, image, artifacts, NOW)
            .deleted
            .keys()
            .map(|d| names[d].clone())
            .collect();
        out.sort();
        out
    }

    #[test]
    fn every_rule_alone_and_combined() {
        let all = "**";
        // (policies, deleted)
        let table: Vec<(Vec<Policy>, Vec<&str>)> = vec![
            (vec![policy(all, "**", Matching, Rule::Always)], vec![]),
            // The 2 most recently pushed of everything (untagged included: tested as "").
            (
                vec![policy(all, "**", Matching, Rule::LatestPushed(2))],
                vec!["rc", "v1", "v2", "v3", "v4", "v5"],
            ),
            // Tagged only: `?*` needs one character, so "" (untagged) is not selected.
            (
                vec![policy(all, "?*", Matching, Rule::LatestPushed(2))],
                vec!["u1", "u2", "v1", "v2", "v3", "v4"],
            ),
            // Most recently pulled 2: v2 and u2 (1 day), then v5 (2 days) is third.
            (
                vec![policy(all, "**", Matching, Rule::LatestPulled(2))],
                vec!["rc", "u1", "v1", "v3", "v4", "v5"],
            ),
            (
                vec![policy(all, "**", Matching, Rule::PushedWithinDays(20))],
                vec!["v1", "v2", "v3"],
            ),
            (
                vec![policy(all, "**", Matching, Rule::PulledWithinDays(10))],
                vec!["rc", "u1", "v1", "v3"],
            ),
            (
                vec![policy(all, "**", Matching, Rule::LatestPushed(0))],
                vec!["rc", "u1", "u2", "v1", "v2", "v3", "v4", "v5"],
            ),
            // Two count rules together keep the union, never less than either.
            (
                vec![
                    policy(all, "1.*", Matching, Rule::LatestPushed(1)),
                    policy(all, "2.*", Matching, Rule::LatestPushed(1)),
                ],
                vec!["u1", "u2", "v1", "v2", "v4", "v5"],
            ),
            // `{a,b}` and `?`.
            (
                vec![policy(all, "{stable,latest}", Matching, Rule::Always)],
                vec!["rc", "u1", "u2", "v1", "v3", "v4"],
            ),
            (
                vec![policy(all, "1.?", Matching, Rule::Always)],
                vec!["rc", "u1", "u2", "v4", "v5"],
            ),
            // Exclude: everything whose tags are not release candidates (untagged "" included).
            (
                vec![policy(all, "*-rc*", Excluding, Rule::Always)],
                vec!["rc"],
            ),
            // A disabled policy keeps nothing; with no other policy applying, nothing is touched.
            (
                vec![
                    Policy {
                        enabled: false,
                        ..policy(all, "**", Matching, Rule::Always)
                    },
                    policy(all, "latest", Matching, Rule::Always),
                ],
                vec!["rc", "u1", "u2", "v1", "v2", "v3", "v4"],
            ),
        ];
        for (policies, expected) in table {
            let ids: Vec<&str> = policies.iter().map(|p| p.id.as_str()).collect();
            assert_eq!(
                deleted(&policies, "library/app", &app()),
                expected,
                "{ids:?}"
            );
        }
    }

    #[test]
    fn an_artifact_with_a_kept_tag_keeps_all_its_tags() {
        let s = select(
            &[policy("**", "stable", Matching, Rule::Always)],
            "library/app",
            &app(),
            NOW,
        );
        assert!(
            s.kept.contains_key(&dg("v2")),
            "kept by its stable tag, 1.1 with it"
        );
        assert!(s
            .deleted
            .values()
            .all(|tags| !tags.contains(&"1.1".to_string())));
        assert_eq!(
            s.deleted[&dg("v5")],
            vec!["2.1".to_string(), "latest".to_string()]
        );
    }

    #[test]
    fn image_patterns_scope_the_policies() {
        let keep_latest = |images: &str| vec![policy(images, "latest", Matching, Rule::Always)];
        let removes =
            |images: &str, image: &str| !deleted(&keep_latest(images), image, &app()).is_empty();
        // (image pattern, image, does the policy apply)
        let table = [
            ("library/*", "library/app", true),
            ("library/*", "library/team/app", false),
            ("library/**", "library/team/app", true),
            ("**", "app", true),
            ("", "any/thing", true),
            ("{library,team}/app", "team/app", true),
            ("other/*", "library/app", false),
        ];
        for (images, image, applies) in table {
            assert_eq!(removes(images, image), applies, "{images:?} on {image:?}");
        }
        // Out of scope: every artifact stays, and says why.
        let s = select(&keep_latest("other/*"), "library/app", &app(), NOW);
        assert!(s.kept.values().all(|k| *k == Kept::NotCovered));
    }

    #[test]
    fn indexes_keep_their_children_and_artifacts_their_referrers() {
        let mut idx = art("idx", &["multi"], 2, None);
        idx.children = vec![dg("amd"), dg("arm")];
        let mut sig = art("sig", &[], 2, None);
        sig.subject = Some(dg("idx"));
        let mut sbom = art("sbom", &[], 2, None);
        sbom.subject = Some(dg("amd"));
        let mut old_sig = art("sig", &[], 2, None);
        old_sig.digest = dg("old");
        old_sig.subject = Some(dg("v1"));
        let artifacts = vec![
            idx,
            art("amd", &[], 2, None),
            art("arm", &[], 2, None),
            sig,
            sbom,
            art("v1", &["1.0"], 50, None),
            old_sig,
        ];
        let p = [policy("**", "multi", Matching, Rule::Always)];
        // The children, the index's signature and the child's SBOM stay; v1 goes with its own
        // signature.
        assert_eq!(deleted(&p, "library/app", &artifacts), vec!["old", "v1"]);
        let s = select(&p, "library/app", &artifacts, NOW);
        assert_eq!(s.kept[&dg("amd")], Kept::ChildOf(dg("idx")));
        assert_eq!(s.kept[&dg("sig")], Kept::ReferrerOf(dg("idx")));
        assert_eq!(s.kept[&dg("sbom")], Kept::ReferrerOf(dg("amd")));
        // Nothing keeps the index: its children and referrers go with it.
        let none = [policy("**", "nothing-is-tagged-so", Matching, Rule::Always)];
        assert_eq!(deleted(&none, "library/app", &artifacts).len(), 7);
    }

    #[test]
    fn children_and_signatures_take_no_place_in_a_count() {
        // Pushed last, a signature and an index's platform manifests would be "the latest".
        let mut idx = art("idx", &["multi"], 9, None);
        idx.children = vec![dg("amd"), dg("arm")];
        let mut sig = art("sig", &["sha256-v1.sig"], 0, None);
        sig.subject = Some(dg("v5"));
        let mut sbom = art("sbom", &[], 0, None);
        sbom.subject = Some(dg("v1"));
        let mut artifacts = vec![
            idx,
            art("amd", &[], 0, None),
            art("arm", &[], 0, None),
            sig,
            sbom,
        ];
        artifacts.extend(app().into_iter().filter(|a| !a.tags.is_empty()));
        let p = [policy("**", "**", Matching, Rule::LatestPushed(2))];
        // Kept: rc (5 days) and idx (9 days), idx's children; v5 is not among the two latest
        // so its signature goes with it, and v1's SBOM with v1.
        assert_eq!(
            deleted(&p, "library/app", &artifacts),
            vec!["sbom", "sig", "v1", "v2", "v3", "v4", "v5"]
        );
        let s = select(&p, "library/app", &artifacts, NOW);
        assert_eq!(s.kept[&dg("arm")], Kept::ChildOf(dg("idx")));
        // A signature whose subject is not in the image counts as itself.
        let mut lone = art("sig", &["sha256-x.sig"], 0, None);
        lone.subject = Some(dg("old"));
        let alone = [
            lone,
            art("v1", &["1.0"], 50, None),
            art("v2", &["1.1"], 40, None),
        ];
        assert_eq!(deleted(&p, "library/app", &alone), vec!["v1"]);
    }

    #[test]
    fn units_hold_what_belongs_to_an_artifact() {
        let mut idx = art("idx", &["multi"], 9, None);
        idx.children = vec![dg("amd"), dg("arm")];
        let mut sig = art("sig", &["sha256-x.sig"], 0, None);
        sig.subject = Some(dg("idx"));
        let mut sbom = art("sbom", &[], 0, None);
        sbom.subject = Some(dg("amd"));
        let artifacts = vec![
            idx,
            art("amd", &[], 0, None),
            art("arm", &[], 0, None),
            sig,
            sbom,
            art("v1", &["1.0"], 50, None),
        ];
        let mut got: Vec<(usize, Vec<usize>)> = units(&artifacts)
            .into_iter()
            .map(|u| {
                let mut m = u.members;
                m.sort();
                (u.root, m)
            })
            .collect();
        got.sort();
        assert_eq!(got, vec![(0, vec![0, 1, 2, 3, 4]), (5, vec![5])]);
    }

    #[test]
    fn protection_wins_over_every_policy() {
        let mut artifacts = app();
        artifacts[0].protected = true; // v1
        let mut idx = art("idx", &["multi"], 60, None);
        idx.children = vec![dg("amd")];
        idx.protected = true;
        artifacts.push(idx);
        artifacts.push(art("amd", &[], 60, None));
        let p = [policy("**", "**", Matching, Rule::LatestPushed(1))];
        let s = select(&p, "library/app", &artifacts, NOW);
        assert_eq!(s.kept[&dg("v1")], Kept::Protected);
        assert_eq!(s.kept[&dg("idx")], Kept::Protected);
        assert_eq!(
            s.kept[&dg("amd")],
            Kept::ChildOf(dg("idx")),
            "a protected index keeps its children"
        );
        assert_eq!(
            deleted(&p, "library/app", &artifacts),
            vec!["rc", "u1", "v2", "v3", "v4", "v5"]
        );
    }

    #[test]
    fn the_same_input_selects_the_same_whatever_the_order() {
        let p = [policy("**", "**", Matching, Rule::LatestPushed(3))];
        let mut reversed = app();
        reversed.reverse();
        assert_eq!(
            select(&p, "a", &app(), NOW),
            select(&p, "a", &reversed, NOW)
        );
    }
}
