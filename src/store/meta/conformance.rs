//! The contract every [`MetaStore`] backend must keep, as one suite (like the blob seam's in
//! `store::conformance`). A new backend adds one test that hands the suite a fresh, empty store.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::{
    pull_key, ArtifactRecord, Change, CredentialRecord, ImageCacheRecord, ImageCacheSettings,
    MetaStore, Missing, Records, Refers, RegistryKind, RegistryRecord, SourceKind,
};
use crate::oci::digest::Digest;
use crate::oci::manifest::Descriptor;

/// Runs every check on `meta`, which must start empty.
pub async fn meta_store(meta: Arc<dyn MetaStore>) {
    registries_and_image_caches_with_credentials(&*meta).await;
    repositories_page_in_lexical_order(&*meta).await;
    blob_links_are_per_repository_and_page(&*meta).await;
    artifacts_carry_their_tags_and_referrers(&*meta).await;
    an_artifact_is_recorded_only_with_what_it_refers_to(&*meta).await;
    tags_page_with_last_and_n(&*meta).await;
    records_put_get_list_and_remove(&meta).await;
    per_repository_reads_in_one_call(&*meta).await;
    pull_times_are_kept_per_artifact(&*meta).await;
    every_change_is_notified(&*meta).await;
    racing_put_and_delete_leave_no_tag_on_a_missing_artifact(&meta).await;
    usage_is_kept_by_links_and_artifacts(&*meta).await;
    meta.flush().await.expect("flush");
}

fn registry(name: &str, kind: RegistryKind) -> RegistryRecord {
    RegistryRecord {
        name: name.into(),
        kind,
        created_ms: 1,
        cache: (kind == RegistryKind::Cache).then(|| "up".into()),
        public_uri: true,
        anonymous_pull: false,
        quota_bytes: None,
    }
}

fn artifact(pushed_ms: u64, subject: Option<Digest>) -> ArtifactRecord {
    ArtifactRecord {
        media_type: "application/vnd.oci.image.manifest.v1+json".into(),
        size: 10,
        pushed_ms,
        artifact_type: None,
        subject,
    }
}

fn descriptor(digest: &Digest) -> Descriptor {
    Descriptor {
        media_type: "application/vnd.oci.image.manifest.v1+json".into(),
        digest: digest.clone(),
        size: 10,
        artifact_type: Some("application/example".into()),
        annotations: None,
        platform: None,
        urls: None,
    }
}

fn d(text: &str) -> Digest {
    Digest::sha256(text.as_bytes())
}

async fn registries_and_image_caches_with_credentials(meta: &dyn MetaStore) {
    assert!(meta.registries().await.unwrap().is_empty());
    meta.put_registry(&registry("zeta", RegistryKind::Normal))
        .await
        .unwrap();
    meta.put_registry(&registry("alpha", RegistryKind::Cache))
        .await
        .unwrap();
    let names: Vec<String> = meta
        .registries()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.name)
        .collect();
    assert_eq!(names, ["alpha", "zeta"], "by name");
    let mut changed = registry("zeta", RegistryKind::Normal);
    changed.anonymous_pull = true;
    meta.put_registry(&changed).await.unwrap();
    assert!(meta.registry("zeta").await.unwrap().unwrap().anonymous_pull);
    assert!(meta.registry("nope").await.unwrap().is_none());
    // Deleting a registry takes what is recorded under it, and nothing of a registry whose
    // name only starts the same.
    let m = d("zeta manifest");
    meta.put_artifact(
        "zeta/app",
        &m,
        &artifact(1, None),
        Some("v1"),
        None,
        &Refers::default(),
    )
    .await
    .unwrap()
    .unwrap();
    meta.link_blob("zeta/app", &d("zeta blob"), 3)
        .await
        .unwrap();
    meta.put_artifact(
        "zetas/app",
        &m,
        &artifact(1, None),
        Some("v1"),
        None,
        &Refers::default(),
    )
    .await
    .unwrap()
    .unwrap();
    meta.delete_registry("zeta").await.unwrap();
    assert!(meta.registry("zeta").await.unwrap().is_none());
    assert!(!meta.repo_exists("zeta/app").await.unwrap());
    assert!(meta.artifact("zeta/app", &m).await.unwrap().is_none());
    assert!(meta.tag("zeta/app", "v1").await.unwrap().is_none());
    assert!(meta
        .blob_link("zeta/app", &d("zeta blob"))
        .await
        .unwrap()
        .is_none());
    assert_eq!(meta.tag("zetas/app", "v1").await.unwrap(), Some(m.clone()));
    assert!(meta
        .delete_artifact("zetas/app", &m)
        .await
        .unwrap()
        .is_some());
    assert!(meta.remove_repo_if_empty("zetas/app").await.unwrap());
    meta.delete_registry("alpha").await.unwrap();

    let cache = ImageCacheRecord {
        name: "up".into(),
        kind: SourceKind::Registry,
        endpoint: "https://registry.example".into(),
        settings: ImageCacheSettings {
            fetch_budget_ms: Duration::from_secs(200),
            revalidate_ttl_ms: Duration::from_secs(30),
            region: None,
            ecr_endpoint: None,
        },
    };
    let creds = CredentialRecord {
        username: Some("u".into()),
        password: Some("p".into()),
        credentials_file: None,
    };
    meta.put_image_cache(&cache, Some(&creds)).await.unwrap();
    assert_eq!(meta.image_cache("up").await.unwrap(), Some(cache.clone()));
    assert_eq!(meta.credentials("up").await.unwrap(), Some(creds));
    assert_eq!(meta.image_caches().await.unwrap(), vec![cache.clone()]);
    // Anonymous now: the old credentials do not linger.
    meta.put_image_cache(&cache, Some(&CredentialRecord::default()))
        .await
        .unwrap();
    assert_eq!(meta.credentials("up").await.unwrap(), None);
    meta.put_image_cache(
        &cache,
        Some(&CredentialRecord {
            username: Some("v".into()),
            ..Default::default()
        }),
    )
    .await
    .unwrap();
    assert!(meta.delete_image_cache("up").await.unwrap());
    assert!(!meta.delete_image_cache("up").await.unwrap());
    assert_eq!(meta.credentials("up").await.unwrap(), None, "gone with it");
    assert!(meta.image_caches().await.unwrap().is_empty());
}

async fn repositories_page_in_lexical_order(meta: &dyn MetaStore) {
    let m = d("catalog manifest");
    for repo in ["cat/b", "cat/a/x", "cat/a", "dog/a", "cat2/a"] {
        meta.put_artifact(repo, &m, &artifact(1, None), None, None, &Refers::default())
            .await
            .unwrap()
            .unwrap();
    }
    assert_eq!(
        meta.repositories(None, None, 100).await.unwrap(),
        ["cat/a", "cat/a/x", "cat/b", "cat2/a", "dog/a"]
    );
    assert_eq!(
        meta.repositories(Some("cat"), None, 100).await.unwrap(),
        ["cat/a", "cat/a/x", "cat/b"],
        "one registry, not one whose name starts the same"
    );
    assert_eq!(
        meta.repositories(Some("cat"), Some("cat/a"), 1)
            .await
            .unwrap(),
        ["cat/a/x"]
    );
    assert_eq!(
        meta.repositories(None, Some("cat/b"), 2).await.unwrap(),
        ["cat2/a", "dog/a"]
    );
    assert!(meta
        .repositories(None, Some("dog/a"), 10)
        .await
        .unwrap()
        .is_empty());
    assert!(meta.repo_exists("cat/a").await.unwrap());
    assert!(!meta.repo_exists("cat").await.unwrap());
    // Still holding an artifact: stays in the catalog.
    assert!(!meta.remove_repo_if_empty("cat/a").await.unwrap());
    for repo in ["cat/b", "cat/a/x", "cat/a", "dog/a", "cat2/a"] {
        assert_eq!(meta.delete_artifact(repo, &m).await.unwrap(), Some(vec![]));
        assert!(meta.remove_repo_if_empty(repo).await.unwrap());
    }
    assert!(meta.repositories(None, None, 100).await.unwrap().is_empty());
}

async fn blob_links_are_per_repository_and_page(meta: &dyn MetaStore) {
    let mut digests: Vec<Digest> = (0..5).map(|i| d(&format!("blob {i}"))).collect();
    for (i, b) in digests.iter().enumerate() {
        meta.link_blob("links/a", b, i as u64 + 1).await.unwrap();
    }
    let shared = digests[0].clone();
    meta.link_blob("links/ab", &shared, 9).await.unwrap();
    digests.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    assert_eq!(
        meta.linked_blobs("links/a", None, usize::MAX)
            .await
            .unwrap(),
        digests,
        "lexical order, one repository"
    );
    let first = meta.linked_blobs("links/a", None, 2).await.unwrap();
    assert_eq!(first, digests[..2]);
    let rest = meta
        .linked_blobs("links/a", first.last(), 10)
        .await
        .unwrap();
    assert_eq!(rest, digests[2..]);
    assert_eq!(meta.blob_link("links/ab", &shared).await.unwrap(), Some(9));
    assert!(meta
        .blob_link("links/b", &digests[0])
        .await
        .unwrap()
        .is_none());
    // Links of repositories not in the catalog (no manifest yet) are references all the same.
    assert!(!meta.repo_exists("links/a").await.unwrap());
    let referenced = meta.referenced().await.unwrap();
    assert!(
        digests.iter().all(|b| referenced.contains(b)),
        "{referenced:?}"
    );
    for b in &digests {
        assert!(meta.unlink_blob("links/a", b).await.unwrap());
        assert!(!meta.unlink_blob("links/a", b).await.unwrap());
    }
    assert!(
        meta.referenced().await.unwrap().contains(&shared),
        "still linked by links/ab"
    );
    assert!(meta.unlink_blob("links/ab", &shared).await.unwrap());
    assert!(meta.referenced().await.unwrap().is_empty());
    assert!(meta
        .linked_blobs("links/a", None, usize::MAX)
        .await
        .unwrap()
        .is_empty());
}

async fn artifacts_carry_their_tags_and_referrers(meta: &dyn MetaStore) {
    let repo = "art/app";
    let subject = d("subject");
    let image = d("image");
    meta.put_artifact(
        repo,
        &subject,
        &artifact(5, None),
        Some("latest"),
        None,
        &Refers::default(),
    )
    .await
    .unwrap()
    .unwrap();
    // Pushed again under another tag: the first push time stays.
    meta.put_artifact(
        repo,
        &subject,
        &artifact(9, None),
        Some("v1"),
        None,
        &Refers::default(),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(
        meta.artifact(repo, &subject)
            .await
            .unwrap()
            .unwrap()
            .pushed_ms,
        5
    );
    meta.put_artifact(
        repo,
        &image,
        &artifact(6, None),
        Some("other"),
        None,
        &Refers::default(),
    )
    .await
    .unwrap()
    .unwrap();
    let mut referrers: Vec<Digest> = (0..3).map(|i| d(&format!("signature {i}"))).collect();
    for r in &referrers {
        meta.put_artifact(
            repo,
            r,
            &artifact(7, Some(subject.clone())),
            None,
            Some(&descriptor(r)),
            &Refers::default(),
        )
        .await
        .unwrap()
        .unwrap();
    }
    referrers.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    let listed: Vec<Digest> = meta
        .referrers(repo, &subject, None, usize::MAX)
        .await
        .unwrap()
        .into_iter()
        .map(|desc| desc.digest)
        .collect();
    assert_eq!(listed, referrers);
    let page = meta
        .referrers(repo, &subject, Some(&referrers[0]), 1)
        .await
        .unwrap();
    assert_eq!(page, vec![descriptor(&referrers[1])]);
    assert!(meta
        .referrers(repo, &image, None, usize::MAX)
        .await
        .unwrap()
        .is_empty());
    // Every artifact, in lexical order of digest, and in pages.
    let mut all = vec![subject.clone(), image.clone()];
    all.extend(referrers.iter().cloned());
    all.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    let listed: Vec<Digest> = meta
        .artifacts(repo, None, usize::MAX)
        .await
        .unwrap()
        .into_iter()
        .map(|(d, _)| d)
        .collect();
    assert_eq!(listed, all);
    let first = meta.artifacts(repo, None, 3).await.unwrap();
    let rest = meta
        .artifacts(repo, first.last().map(|(d, _)| d), 10)
        .await
        .unwrap();
    assert_eq!(first.len() + rest.len(), all.len());
    assert_eq!(rest[0].0, all[3]);
    // A tag moves onto an existing artifact only.
    assert!(meta.tag_artifact(repo, &image, "latest").await.unwrap());
    assert_eq!(meta.tag(repo, "latest").await.unwrap(), Some(image.clone()));
    assert!(!meta
        .tag_artifact(repo, &d("never pushed"), "x")
        .await
        .unwrap());
    assert!(meta.tag(repo, "x").await.unwrap().is_none());
    // Deleting a referrer removes its entry; deleting the subject removes its tags.
    assert_eq!(
        meta.delete_artifact(repo, &referrers[0]).await.unwrap(),
        Some(vec![])
    );
    assert_eq!(
        meta.referrers(repo, &subject, None, usize::MAX)
            .await
            .unwrap()
            .len(),
        2
    );
    assert_eq!(
        meta.delete_artifact(repo, &subject).await.unwrap(),
        Some(vec!["v1".to_string()])
    );
    assert!(meta.artifact(repo, &subject).await.unwrap().is_none());
    assert!(meta.tag(repo, "v1").await.unwrap().is_none());
    assert_eq!(meta.delete_artifact(repo, &subject).await.unwrap(), None);
    assert_eq!(
        meta.delete_tag(repo, "other").await.unwrap(),
        Some(image.clone())
    );
    assert_eq!(meta.delete_tag(repo, "other").await.unwrap(), None);
    assert_eq!(
        meta.delete_artifact(repo, &image).await.unwrap(),
        Some(vec!["latest".to_string()])
    );
    for r in &referrers[1..] {
        meta.delete_artifact(repo, r).await.unwrap();
    }
    assert!(meta.remove_repo_if_empty(repo).await.unwrap());
}

async fn an_artifact_is_recorded_only_with_what_it_refers_to(meta: &dyn MetaStore) {
    let repo = "refers/app";
    let (config, layer, child) = (d("refers config"), d("refers layer"), d("refers child"));
    let m = d("refers manifest");
    meta.link_blob(repo, &config, 1).await.unwrap();
    // Linked by another repository only: not this one's.
    meta.link_blob("refers/other", &layer, 1).await.unwrap();
    let image = Refers {
        blobs: vec![config.clone(), layer.clone()],
        manifests: vec![],
    };
    let m = &m;
    let put = |refers: Refers| async move {
        meta.put_artifact(repo, m, &artifact(1, None), Some("v1"), None, &refers)
            .await
            .unwrap()
    };
    assert_eq!(put(image.clone()).await, Err(Missing::Blob(layer.clone())));
    assert!(
        meta.artifact(repo, m).await.unwrap().is_none(),
        "nothing written"
    );
    assert_eq!(meta.tag(repo, "v1").await.unwrap(), None);
    assert!(
        !meta.repo_exists(repo).await.unwrap(),
        "no catalog entry either"
    );
    meta.link_blob(repo, &layer, 1).await.unwrap();
    assert_eq!(put(image).await, Ok(()));
    assert_eq!(meta.tag(repo, "v1").await.unwrap().as_ref(), Some(m));
    let index = Refers {
        blobs: vec![],
        manifests: vec![m.clone(), child.clone()],
    };
    assert_eq!(put(index).await, Err(Missing::Manifest(child)));
    meta.delete_artifact(repo, m).await.unwrap();
    meta.unlink_blob(repo, &config).await.unwrap();
    meta.unlink_blob(repo, &layer).await.unwrap();
    meta.unlink_blob("refers/other", &layer).await.unwrap();
    meta.remove_repo_if_empty(repo).await.unwrap();
}

async fn tags_page_with_last_and_n(meta: &dyn MetaStore) {
    let m = d("tagged");
    for t in ["b", "a", "c", "a.1", "B"] {
        meta.put_artifact(
            "tags/x",
            &m,
            &artifact(1, None),
            Some(t),
            None,
            &Refers::default(),
        )
        .await
        .unwrap()
        .unwrap();
    }
    meta.put_artifact(
        "tags/x2",
        &m,
        &artifact(1, None),
        Some("zz"),
        None,
        &Refers::default(),
    )
    .await
    .unwrap()
    .unwrap();
    meta.put_artifact(
        "tags/x/y",
        &m,
        &artifact(1, None),
        Some("yy"),
        None,
        &Refers::default(),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(
        meta.tags("tags/x", None, 100).await.unwrap(),
        ["B", "a", "a.1", "b", "c"],
        "byte order, this repository only"
    );
    assert_eq!(meta.tags("tags/x", None, 2).await.unwrap(), ["B", "a"]);
    assert_eq!(
        meta.tags("tags/x", Some("a"), 2).await.unwrap(),
        ["a.1", "b"]
    );
    assert_eq!(meta.tags("tags/x", Some("b"), 100).await.unwrap(), ["c"]);
    assert!(meta
        .tags("tags/x", Some("c"), 100)
        .await
        .unwrap()
        .is_empty());
    assert!(meta.tags("tags/x", None, 0).await.unwrap().is_empty());
    for repo in ["tags/x", "tags/x2", "tags/x/y"] {
        meta.delete_artifact(repo, &m).await.unwrap();
        meta.remove_repo_if_empty(repo).await.unwrap();
    }
    assert!(meta.tags("tags/x", None, 100).await.unwrap().is_empty());
}

async fn records_put_get_list_and_remove(meta: &Arc<dyn MetaStore>) {
    let records: Records<Vec<u32>> = Records::new(meta.clone(), "conformance_records");
    let other: Records<Vec<u32>> = Records::new(meta.clone(), "conformance_other");
    assert!(records.get(&["a"]).await.unwrap().is_none());
    for (k, v) in [("a", 1), ("b", 2), ("c", 3)] {
        records.put(&["p", k], &vec![v]).await.unwrap();
    }
    records.put(&["p2", "a"], &vec![9]).await.unwrap();
    records.put(&["q"], &vec![7]).await.unwrap();
    other.put(&["p", "a"], &vec![100]).await.unwrap();
    assert_eq!(records.get(&["p", "b"]).await.unwrap(), Some(vec![2]));
    let trees = meta.record_trees().await.unwrap();
    let ours: Vec<&String> = trees
        .iter()
        .filter(|t| t.starts_with("conformance_"))
        .collect();
    assert_eq!(
        ours,
        ["conformance_other", "conformance_records"],
        "record trees by name, none of the registries' or repositories' trees: {trees:?}"
    );
    assert!(!trees.iter().any(|t| t == "artifacts" || t == "tags"));
    assert_eq!(records.get(&["q"]).await.unwrap(), Some(vec![7]));
    // Created once: a second creator finds it and changes nothing.
    assert!(meta
        .record_create("conformance_records", "once", b"[1]".to_vec())
        .await
        .unwrap());
    assert!(!meta
        .record_create("conformance_records", "once", b"[2]".to_vec())
        .await
        .unwrap());
    assert_eq!(records.get(&["once"]).await.unwrap(), Some(vec![1]));
    assert_eq!(records.remove(&["once"]).await.unwrap(), Some(vec![1]));
    // Sequences: increasing, above their floor, each number handed out once.
    assert_eq!(meta.sequence_next("conformance", 0).await.unwrap(), 1);
    assert_eq!(meta.sequence_next("conformance", 0).await.unwrap(), 2);
    assert_eq!(meta.sequence_next("conformance", 10).await.unwrap(), 11);
    assert_eq!(meta.sequence_next("conformance", 3).await.unwrap(), 12);
    assert_eq!(meta.sequence_next("other", 0).await.unwrap(), 1);
    let racing: Vec<_> = (0..20).map(|_| meta.sequence_next("raced", 0)).collect();
    let mut got: Vec<u64> = futures_util::future::join_all(racing)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    got.sort();
    assert_eq!(got, (1..=20).collect::<Vec<u64>>(), "each once");
    // Leases: one holder at a time; renewed by its holder, taken by another once expired or
    // released; racing takers agree on one.
    let minute = Duration::from_secs(60);
    let a = meta.lease_take("conformance", "a", minute).await.unwrap();
    assert_eq!(a.holder, "a");
    let b = meta.lease_take("conformance", "b", minute).await.unwrap();
    assert_eq!(b.holder, "a", "held: b is told who holds it");
    assert!(b.remaining > Duration::from_secs(50) && b.remaining <= minute);
    meta.lease_release("conformance", "b").await.unwrap();
    let renewed = meta.lease_take("conformance", "a", minute).await.unwrap();
    assert_eq!(renewed.holder, "a", "not b's to release; a renews");
    meta.lease_release("conformance", "a").await.unwrap();
    let b = meta
        .lease_take("conformance", "b", Duration::from_millis(50))
        .await
        .unwrap();
    assert_eq!(b.holder, "b", "released: free");
    tokio::time::sleep(Duration::from_millis(120)).await;
    let a = meta.lease_take("conformance", "a", minute).await.unwrap();
    assert_eq!(a.holder, "a", "expired: anyone's");
    let racing: Vec<_> = ["x", "y", "z"]
        .iter()
        .map(|h| meta.lease_take("raced", h, minute))
        .collect();
    let holders: std::collections::HashSet<String> = futures_util::future::join_all(racing)
        .await
        .into_iter()
        .map(|l| l.unwrap().holder)
        .collect();
    assert_eq!(
        holders.len(),
        1,
        "every racer sees the one winner: {holders:?}"
    );
    let under_p = records.list(&["p"]).await.unwrap();
    assert_eq!(
        under_p,
        vec![
            ("a".to_string(), vec![1]),
            ("b".to_string(), vec![2]),
            ("c".to_string(), vec![3])
        ],
        "the rest of the key, in key order, not p2's"
    );
    assert_eq!(
        records.list_page(&["p"], Some("a"), 1).await.unwrap(),
        vec![("b".to_string(), vec![2])]
    );
    assert!(records
        .list_page(&["p"], Some("c"), 10)
        .await
        .unwrap()
        .is_empty());
    let all = records.list(&[]).await.unwrap();
    assert_eq!(all.len(), 5, "every record of this tree only: {all:?}");
    assert_eq!(all[0].0, "p\0a", "compound keys joined by NUL");
    assert_eq!(records.remove(&["q"]).await.unwrap(), Some(vec![7]));
    assert_eq!(records.remove(&["q"]).await.unwrap(), None);
    assert_eq!(records.remove_prefix(&["p"]).await.unwrap(), 3);
    assert_eq!(records.list(&[]).await.unwrap().len(), 1, "p2 stays");
    assert_eq!(records.remove_prefix(&["p2"]).await.unwrap(), 1);
    assert_eq!(other.get(&["p", "a"]).await.unwrap(), Some(vec![100]));
    assert_eq!(other.remove_prefix(&["p"]).await.unwrap(), 1);
}

async fn pull_times_are_kept_per_artifact(meta: &dyn MetaStore) {
    let m = d("pulled");
    meta.put_artifact(
        "pulls/a",
        &m,
        &artifact(1, None),
        Some("v1"),
        None,
        &Refers::default(),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(meta.last_pull("pulls/a", &m).await.unwrap(), None);
    meta.record_pulls(&[(pull_key("pulls/a", &m), 42)])
        .await
        .unwrap();
    meta.record_pulls(&[(pull_key("pulls/a", &m), 43), (pull_key("pulls/b", &m), 1)])
        .await
        .unwrap();
    assert_eq!(meta.last_pull("pulls/a", &m).await.unwrap(), Some(43));
    assert_eq!(meta.last_pull("pulls/b", &m).await.unwrap(), Some(1));
    // Gone with its artifact.
    meta.delete_artifact("pulls/a", &m).await.unwrap();
    assert_eq!(meta.last_pull("pulls/a", &m).await.unwrap(), None);
    meta.remove_repo_if_empty("pulls/a").await.unwrap();
}

/// A change, owned, as a subscriber saw it.
fn describe(change: Change<'_>) -> String {
    match change {
        Change::Tag { repo, tag } => format!("tag {repo} {tag}"),
        Change::Artifact { repo, digest } => format!("artifact {repo} {digest}"),
        Change::Registry { name, record } => match record {
            Some(r) => format!("registry {name} anonymous_pull={}", r.anonymous_pull),
            None => format!("registry {name} gone"),
        },
        Change::Record { tree, key, value } => format!(
            "record {tree} {} {}",
            key.replace('\0', "/"),
            match value {
                Some(v) => String::from_utf8_lossy(v).into_owned(),
                None => "removed".into(),
            }
        ),
        Change::Lost => "lost".into(),
    }
}

async fn every_change_is_notified(meta: &dyn MetaStore) {
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let sink = seen.clone();
    meta.subscribe(Box::new(move |change| sink.lock().push(describe(change))));
    let take = || std::mem::take(&mut *seen.lock());
    let m = d("notified");
    meta.put_registry(&registry("note", RegistryKind::Normal))
        .await
        .unwrap();
    assert_eq!(take(), ["registry note anonymous_pull=false"]);
    meta.put_artifact(
        "note/app",
        &m,
        &artifact(1, None),
        Some("v1"),
        None,
        &Refers::default(),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(
        take(),
        [format!("artifact note/app {m}"), "tag note/app v1".into()]
    );
    assert!(meta.tag_artifact("note/app", &m, "v2").await.unwrap());
    assert_eq!(take(), ["tag note/app v2"]);
    meta.delete_tag("note/app", "v2").await.unwrap();
    assert_eq!(take(), ["tag note/app v2"]);
    meta.delete_tag("note/app", "v2").await.unwrap();
    assert!(take().is_empty(), "nothing changed, nothing told");
    meta.delete_artifact("note/app", &m).await.unwrap();
    assert_eq!(
        take(),
        [format!("artifact note/app {m}"), "tag note/app v1".into()]
    );
    meta.record_put("note_records", "k\0l", b"{}".to_vec())
        .await
        .unwrap();
    assert_eq!(take(), ["record note_records k/l {}"]);
    meta.record_remove("note_records", "k\0l").await.unwrap();
    assert_eq!(take(), ["record note_records k/l removed"]);
    meta.record_put("note_records", "k\0m", b"{}".to_vec())
        .await
        .unwrap();
    take();
    assert_eq!(
        meta.record_remove_prefix("note_records", "k\0")
            .await
            .unwrap(),
        1
    );
    assert_eq!(take(), ["record note_records k/m removed"]);
    meta.delete_registry("note").await.unwrap();
    assert_eq!(take(), ["registry note gone"]);
}

async fn racing_put_and_delete_leave_no_tag_on_a_missing_artifact(meta: &Arc<dyn MetaStore>) {
    let repo = "race/app";
    let m = d("raced");
    for round in 0..200 {
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..8 {
            let meta = meta.clone();
            let m = m.clone();
            tasks.spawn(async move {
                if i % 2 == 0 {
                    let tag = format!("t{round}-{i}");
                    meta.put_artifact(
                        repo,
                        &m,
                        &artifact(1, None),
                        Some(&tag),
                        None,
                        &Refers::default(),
                    )
                    .await
                    .unwrap()
                    .unwrap();
                } else {
                    meta.delete_artifact(repo, &m).await.unwrap();
                }
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.unwrap();
        }
        let present = meta.artifact(repo, &m).await.unwrap().is_some();
        for tag in meta.tags(repo, None, usize::MAX).await.unwrap() {
            assert_eq!(meta.tag(repo, &tag).await.unwrap(), Some(m.clone()));
            assert!(
                present,
                "round {round}: tag {tag} points at a deleted artifact"
            );
        }
    }
    meta.delete_artifact(repo, &m).await.unwrap();
    assert!(meta.tags(repo, None, usize::MAX).await.unwrap().is_empty());
    meta.remove_repo_if_empty(repo).await.unwrap();
}

/// What `usage` lists for registry `name` (zero when it lists nothing for it), checked equal to
/// what `registry_usage` says of it alone.
async fn usage_of(meta: &dyn MetaStore, name: &str) -> super::Usage {
    let listed = meta
        .usage()
        .await
        .unwrap()
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, u)| u)
        .unwrap_or_default();
    assert_eq!(meta.registry_usage(name).await.unwrap(), listed, "{name}");
    listed
}

async fn usage_is_kept_by_links_and_artifacts(meta: &dyn MetaStore) {
    let (layer, config, m) = (d("usage layer"), d("usage config"), d("usage manifest"));
    meta.put_registry(&registry("usage", RegistryKind::Normal))
        .await
        .unwrap();
    meta.put_registry(&registry("usage2", RegistryKind::Normal))
        .await
        .unwrap();
    for repo in ["usage/a", "usage/b"] {
        meta.link_blob(repo, &layer, 1000).await.unwrap();
        meta.link_blob(repo, &config, 5).await.unwrap();
        let refers = Refers {
            blobs: vec![layer.clone(), config.clone()],
            manifests: vec![],
        };
        meta.put_artifact(repo, &m, &artifact(1, None), Some("v1"), None, &refers)
            .await
            .unwrap()
            .unwrap();
    }
    // Linked twice and pushed again under another tag: still counted once.
    meta.link_blob("usage/a", &layer, 1000).await.unwrap();
    meta.put_artifact(
        "usage/a",
        &m,
        &artifact(2, None),
        Some("v2"),
        None,
        &Refers::default(),
    )
    .await
    .unwrap()
    .unwrap();
    let expected = super::Usage {
        bytes: 1015,
        blobs: 3,
        artifacts: 2,
    };
    assert_eq!(usage_of(meta, "usage").await, expected);
    assert_eq!(meta.shared_blobs("usage").await.unwrap(), 0);
    assert_eq!(
        usage_of(meta, "nothing-here").await,
        super::Usage::default()
    );
    meta.link_blob("usage2/c", &layer, 1000).await.unwrap();
    assert_eq!(meta.shared_blobs("usage").await.unwrap(), 1);
    assert_eq!(usage_of(meta, "usage2").await.bytes, 1000);
    // Released by the last holder only.
    meta.delete_artifact("usage/a", &m).await.unwrap();
    meta.unlink_blob("usage/a", &layer).await.unwrap();
    meta.unlink_blob("usage/a", &config).await.unwrap();
    assert_eq!(
        usage_of(meta, "usage").await,
        super::Usage {
            artifacts: 1,
            ..expected
        }
    );
    assert_eq!(meta.shared_blobs("usage").await.unwrap(), 1);
    meta.delete_artifact("usage/b", &m).await.unwrap();
    meta.unlink_blob("usage/b", &layer).await.unwrap();
    assert_eq!(
        usage_of(meta, "usage").await.bytes,
        5,
        "the config is still linked"
    );
    meta.delete_registry("usage").await.unwrap();
    assert_eq!(usage_of(meta, "usage").await, super::Usage::default());
    meta.delete_registry("usage2").await.unwrap();
    assert_eq!(usage_of(meta, "usage2").await, super::Usage::default());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sled_backend_keeps_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    meta_store(super::open(dir.path()).unwrap()).await;
}

async fn per_repository_reads_in_one_call(meta: &dyn MetaStore) {
    let repo = "bulk/app";
    let (a, b) = (d("bulk a"), d("bulk b"));
    for (digest, tag) in [(&a, "v1"), (&b, "v2")] {
        meta.put_artifact(
            repo,
            digest,
            &artifact(1, None),
            Some(tag),
            None,
            &Refers::default(),
        )
        .await
        .unwrap()
        .unwrap();
    }
    assert!(meta.tag_artifact(repo, &a, "latest").await.unwrap());
    assert_eq!(
        meta.tagged(repo).await.unwrap(),
        vec![
            ("latest".to_string(), a.clone()),
            ("v1".to_string(), a.clone()),
            ("v2".to_string(), b.clone())
        ]
    );
    assert!(meta.tagged("bulk/none").await.unwrap().is_empty());
    meta.record_pulls(&[(super::pull_key(repo, &b), 42)])
        .await
        .unwrap();
    let pulls = meta.last_pulls(repo).await.unwrap();
    assert_eq!(pulls.len(), 1);
    assert_eq!(pulls.get(&b), Some(&42));
    meta.record_put_many(
        "bulk_records",
        vec![("k1".into(), b"1".to_vec()), ("k2".into(), b"2".to_vec())],
    )
    .await
    .unwrap();
    assert_eq!(
        meta.record_list("bulk_records", "", None, 10)
            .await
            .unwrap(),
        vec![
            ("k1".to_string(), b"1".to_vec()),
            ("k2".to_string(), b"2".to_vec())
        ]
    );
    // Several deletions in one call, each answered as alone: tags, or none for a missing one.
    let gone = d("never pushed");
    let answers = meta
        .delete_artifacts(repo, &[a.clone(), gone, b.clone()])
        .await
        .unwrap();
    assert_eq!(
        answers,
        vec![
            Some(vec!["latest".to_string(), "v1".to_string()]),
            None,
            Some(vec!["v2".to_string()])
        ]
    );
    assert!(meta.tagged(repo).await.unwrap().is_empty());
    assert!(
        meta.last_pulls(repo).await.unwrap().is_empty(),
        "pull times go with them"
    );
    assert!(meta.remove_repo_if_empty(repo).await.unwrap());
    meta.record_remove_prefix("bulk_records", "").await.unwrap();
}
