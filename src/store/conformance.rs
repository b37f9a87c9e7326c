//! The contract every [`BlobStore`] backend must keep, as one suite (distribution's
//! `storage/driver/testsuites` is the model). A new backend adds one test that hands the suite
//! a fresh, empty store.

use std::sync::Arc;

use bytes::Bytes;

use super::blobs::{
    BlobRead, BlobStore, Checkpoint, HashingWrite, Pending, PendingKind, Pieces, Pipeline,
};
use crate::oci::digest::{Algorithm, Digest, Verifier};

async fn bytes_of(read: Option<BlobRead>) -> Vec<u8> {
    let read = read.expect("the blob exists");
    read.collect(u64::MAX)
        .await
        .expect("readable")
        .expect("bytes, not a redirect")
        .to_vec()
}

/// Runs every check on `store`, which must start empty.
pub async fn blob_store(store: Arc<dyn BlobStore>) {
    reads_of_committed_blobs(&*store).await;
    writes_are_invisible_until_committed(&*store).await;
    writes_resume_from_their_checkpoint(&*store).await;
    a_growing_write_can_be_followed(&*store).await;
    listings_page_in_lexical_order(&*store).await;
    large_writes_hash_while_they_write(&*store).await;
    many_pieces_make_one_write(&*store).await;
}

async fn many_pieces_make_one_write(store: &dyn BlobStore) {
    // More pieces than one vectored write takes (IOV_MAX is 1024 on Linux), of uneven sizes.
    let mut pieces = Pieces::default();
    let mut whole = Vec::new();
    for i in 0..3000usize {
        let piece: Vec<u8> = (0..(i % 97 + 1)).map(|j| (i + j) as u8).collect();
        whole.extend_from_slice(&piece);
        pieces.push(Bytes::from(piece));
    }
    pieces.push(Bytes::new()); // dropped
    assert_eq!(pieces.len(), whole.len());
    let d = Digest::sha256(&whole);
    let (mut w, _) = store
        .open_pending(&Pending::Temp(uuid::Uuid::new_v4()))
        .await
        .unwrap();
    w.write(Bytes::from_static(b"").into()).await.unwrap();
    w.write(pieces).await.unwrap();
    assert_eq!(w.written(), whole.len() as u64);
    w.commit(&d).await.unwrap();
    assert_eq!(
        bytes_of(store.read(&d, 0, None).await.unwrap()).await,
        whole
    );
    assert!(store.delete(&d).await.unwrap());
}

async fn reads_of_committed_blobs(store: &dyn BlobStore) {
    let content = Bytes::from_static(b"0123456789");
    let d = Digest::sha256(&content);
    assert!(store.stat(&d).await.unwrap().is_none(), "absent: no stat");
    assert!(
        store.read(&d, 0, None).await.unwrap().is_none(),
        "absent: no read"
    );
    assert!(store.read_small(&d, 100).await.unwrap().is_none());
    store.put(&d, content.clone()).await.unwrap();
    store.put(&d, content.clone()).await.unwrap(); // idempotent
    assert_eq!(store.stat(&d).await.unwrap().unwrap().size, 10);
    assert_eq!(
        bytes_of(store.read(&d, 0, None).await.unwrap()).await,
        b"0123456789"
    );
    assert_eq!(
        bytes_of(store.read(&d, 3, Some(4)).await.unwrap()).await,
        b"3456"
    );
    assert_eq!(
        bytes_of(store.read(&d, 7, Some(100)).await.unwrap()).await,
        b"789"
    );
    assert_eq!(bytes_of(store.read(&d, 10, None).await.unwrap()).await, b"");
    assert!(store.read(&d, 11, None).await.is_err(), "past the end");
    assert_eq!(
        store.read_small(&d, 10).await.unwrap().unwrap(),
        content,
        "exactly at the limit"
    );
    assert!(store.read_small(&d, 9).await.is_err(), "over the limit");
    assert!(store.delete(&d).await.unwrap());
    assert!(
        !store.delete(&d).await.unwrap(),
        "second delete: nothing there"
    );
    assert!(store.stat(&d).await.unwrap().is_none());
    assert!(store.read(&d, 0, None).await.unwrap().is_none());
    // Put again after a delete: stored again (a backend remembering its puts forgets deletes).
    store.put(&d, content.clone()).await.unwrap();
    assert_eq!(store.stat(&d).await.unwrap().unwrap().size, 10);
    assert!(store.delete(&d).await.unwrap());
}

async fn writes_are_invisible_until_committed(store: &dyn BlobStore) {
    let d = Digest::sha256(b"hello world");
    let key = Pending::Temp(uuid::Uuid::new_v4());
    let (mut w, checkpoint) = store.open_pending(&key).await.unwrap();
    assert_eq!((w.written(), checkpoint), (0, None), "a new write is empty");
    assert_eq!(w.key(), &key);
    w.write(Bytes::from_static(b"hello ").into()).await.unwrap();
    w.write(Bytes::from_static(b"world").into()).await.unwrap();
    assert_eq!(w.written(), 11);
    assert!(
        store.stat(&d).await.unwrap().is_none(),
        "visible before commit"
    );
    assert!(store.list(None, 100).await.unwrap().is_empty());
    w.commit(&d).await.unwrap();
    assert_eq!(
        store.read_small(&d, 100).await.unwrap().unwrap(),
        &b"hello world"[..]
    );
    assert!(
        store.stat_pending(&key).await.unwrap().is_none(),
        "committed: no longer pending"
    );

    // The same content committed again through another write: both succeed, one blob.
    let (mut again, _) = store
        .open_pending(&Pending::Temp(uuid::Uuid::new_v4()))
        .await
        .unwrap();
    again
        .write(Bytes::from_static(b"hello world").into())
        .await
        .unwrap();
    let again_key = again.key().clone();
    again.commit(&d).await.unwrap();
    assert!(store.stat_pending(&again_key).await.unwrap().is_none());
    assert_eq!(store.list(None, 100).await.unwrap().len(), 1);

    // An aborted write leaves nothing.
    let gone = Digest::sha256(b"never");
    let (mut w, _) = store
        .open_pending(&Pending::Temp(uuid::Uuid::new_v4()))
        .await
        .unwrap();
    w.write(Bytes::from_static(b"never").into()).await.unwrap();
    let key = w.key().clone();
    w.abort().await.unwrap();
    assert!(store.stat_pending(&key).await.unwrap().is_none());
    assert!(store.stat(&gone).await.unwrap().is_none());
    assert!(store.delete(&d).await.unwrap());
}

async fn writes_resume_from_their_checkpoint(store: &dyn BlobStore) {
    let key = Pending::Upload(uuid::Uuid::new_v4());
    let (mut w, _) = store.open_pending(&key).await.unwrap();
    w.write(Bytes::from_static(b"abc").into()).await.unwrap();
    w.sync().await.unwrap();
    w.checkpoint(b"state at 3".to_vec()).await.unwrap();
    w.write(Bytes::from_static(b"def").into()).await.unwrap();
    drop(w);

    let listed = store.list_pending(PendingKind::Upload).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].key, key);
    assert_eq!(listed[0].info.size, 6);
    assert!(store
        .list_pending(PendingKind::Fetch)
        .await
        .unwrap()
        .is_empty());

    let (mut w, checkpoint) = store.open_pending(&key).await.unwrap();
    assert_eq!(
        w.written(),
        6,
        "a reopened write stands after what it holds"
    );
    assert_eq!(
        checkpoint,
        Some(Checkpoint {
            offset: 3,
            state: b"state at 3".to_vec()
        })
    );
    w.truncate(3).await.unwrap();
    assert_eq!(w.written(), 3);
    w.write(Bytes::from_static(b"XYZ").into()).await.unwrap();
    assert_eq!(
        bytes_of(store.read_pending(&key, 0, None).await.unwrap()).await,
        b"abcXYZ"
    );
    assert_eq!(
        bytes_of(store.read_pending(&key, 2, Some(2)).await.unwrap()).await,
        b"cX"
    );
    w.checkpoint(b"state at 6".to_vec()).await.unwrap();
    let stat = store.stat_pending(&key).await.unwrap().unwrap();
    assert_eq!(stat.info.size, 6);
    assert_eq!(stat.checkpoint.unwrap().offset, 6);
    drop(w);
    assert!(store.remove_pending(&key).await.unwrap());
    assert!(!store.remove_pending(&key).await.unwrap());
    assert!(store.stat_pending(&key).await.unwrap().is_none());
    assert!(store.read_pending(&key, 0, None).await.unwrap().is_none());
    assert!(store
        .list_pending(PendingKind::Upload)
        .await
        .unwrap()
        .is_empty());
}

async fn a_growing_write_can_be_followed(store: &dyn BlobStore) {
    let d = Digest::sha256(b"first second");
    let key = Pending::Fetch(d.clone());
    let (mut w, _) = store.open_pending(&key).await.unwrap();
    w.write(Bytes::from_static(b"first ").into()).await.unwrap();
    // A follower reads what is there, then what arrives later.
    let seen = store.read_pending(&key, 0, None).await.unwrap();
    assert_eq!(bytes_of(seen).await, b"first ");
    w.write(Bytes::from_static(b"second").into()).await.unwrap();
    let rest = store.read_pending(&key, 6, None).await.unwrap();
    assert_eq!(bytes_of(rest).await, b"second");
    let listed = store.list_pending(PendingKind::Fetch).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].key, key);
    w.commit(&d).await.unwrap();
    assert!(store
        .list_pending(PendingKind::Fetch)
        .await
        .unwrap()
        .is_empty());
    assert!(store.delete(&d).await.unwrap());
}

async fn listings_page_in_lexical_order(store: &dyn BlobStore) {
    let mut all: Vec<Digest> = Vec::new();
    for i in 0..40u32 {
        let content = Bytes::from(format!("blob {i}"));
        let d = if i % 4 == 0 {
            // A few of the other algorithm: they sort after every sha256 digest.
            let mut v = Verifier::new(Algorithm::Sha512);
            v.update(&content);
            v.finish()
        } else {
            Digest::sha256(&content)
        };
        store.put(&d, content).await.unwrap();
        all.push(d);
    }
    all.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    let mut paged = Vec::new();
    let mut after: Option<Digest> = None;
    loop {
        let page = store.list(after.as_ref(), 7).await.unwrap();
        assert!(page.len() <= 7);
        if page.is_empty() {
            break;
        }
        after = page.last().map(|(d, _)| d.clone());
        paged.extend(page);
    }
    let digests: Vec<Digest> = paged.iter().map(|(d, _)| d.clone()).collect();
    assert_eq!(
        digests, all,
        "pages cover every blob once, in lexical order"
    );
    for (d, info) in &paged {
        assert_eq!(
            Some(info.size),
            store.stat(d).await.unwrap().map(|i| i.size)
        );
    }
    for d in &all {
        assert!(store.delete(d).await.unwrap());
    }
    assert!(store.list(None, 100).await.unwrap().is_empty());
}

async fn large_writes_hash_while_they_write(store: &dyn BlobStore) {
    let piece: Vec<u8> = (0..(3 << 20)).map(|i| (i % 251) as u8).collect();
    let mut whole = Verifier::new(Algorithm::Sha256);
    let (w, _) = store
        .open_pending(&Pending::Temp(uuid::Uuid::new_v4()))
        .await
        .unwrap();
    let mut pipe = Pipeline::new(HashingWrite::new(w, Verifier::new(Algorithm::Sha256)));
    for _ in 0..4 {
        whole.update(&piece);
        pipe.submit(Bytes::from(piece.clone())).await.unwrap();
    }
    pipe.settle().await.unwrap();
    let w = pipe.take().unwrap();
    assert_eq!(w.written(), 4 * piece.len() as u64);
    let d = whole.finish();
    assert_eq!(w.verifier.current(), d, "hash of exactly the bytes written");
    w.inner.commit(&d).await.unwrap();
    let read = store.read(&d, (3 << 20) - 2, Some(4)).await.unwrap();
    assert_eq!(
        bytes_of(read).await,
        [
            piece[(3 << 20) - 2],
            piece[(3 << 20) - 1],
            piece[0],
            piece[1]
        ]
    );
    assert!(store.delete(&d).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_filesystem_backend_keeps_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let store = super::fs::FsBlobStore::open(dir.path()).unwrap();
    blob_store(Arc::new(store)).await;
}
