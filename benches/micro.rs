//! Micro-benchmarks of the hot pure functions: reference parsing, manifest parsing, digest verification.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use berth::http::router::route;
use berth::oci::digest::{Algorithm, Digest, Verifier};
use berth::oci::manifest;
use berth::oci::reference::{Reference, RepoName};

fn references(c: &mut Criterion) {
    c.bench_function("repo_name_parse", |b| {
        b.iter(|| RepoName::parse(std::hint::black_box("library/team/app-server_v2")).unwrap())
    });
    let digest = format!("sha256:{}", "a".repeat(64));
    c.bench_function("digest_reference_parse", |b| {
        b.iter(|| Reference::parse(std::hint::black_box(&digest)).unwrap())
    });
    c.bench_function("route_manifest_path", |b| {
        b.iter(|| {
            route(std::hint::black_box(
                "/v2/library/team/app/manifests/v1.2.3",
            ))
            .unwrap()
        })
    });
}

fn manifests(c: &mut Criterion) {
    let layers: Vec<_> = (0..12)
        .map(|i| {
            serde_json::json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": Digest::sha256(format!("layer{i}").as_bytes()).as_str(),
                "size": 1_000_000 + i,
            })
        })
        .collect();
    let body = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": manifest::OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": Digest::sha256(b"cfg").as_str(), "size": 1234},
        "layers": layers,
        "annotations": {"org.opencontainers.image.created": "2026-11-24T00:00:00Z"}
    }))
    .unwrap();
    c.bench_function("manifest_parse_12_layers", |b| {
        b.iter(|| {
            manifest::parse(std::hint::black_box(&body), Some(manifest::OCI_MANIFEST)).unwrap()
        })
    });
}

fn digests(c: &mut Criterion) {
    let mut group = c.benchmark_group("verify");
    for size in [64 * 1024usize, 4 << 20] {
        let data = vec![0x5au8; size];
        group.throughput(Throughput::Bytes(size as u64));
        for algo in [Algorithm::Sha256, Algorithm::Sha512] {
            group.bench_with_input(BenchmarkId::new(algo.as_str(), size), &data, |b, data| {
                b.iter(|| {
                    let mut v = Verifier::new(algo);
                    v.update(data);
                    v.finish()
                })
            });
        }
    }
    group.finish();
}

/// The per-request cost of credentials: a bearer token check, and a cached access-key check.
fn auth(c: &mut Criterion) {
    use berth::auth::token::{Access, TokenKeys};
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let meta = berth::store::meta::open(dir.path()).unwrap();
    let keys = rt
        .block_on(TokenKeys::open(&meta, dir.path(), "berth"))
        .unwrap();
    let access = vec![Access::parse("repository:library/app:pull,push").unwrap()];
    let (token, _) = keys.issue("ci", access.clone(), std::time::Duration::from_secs(900));
    c.bench_function("token_verify", |b| {
        b.iter(|| keys.verify(std::hint::black_box(&token)).unwrap())
    });
    c.bench_function("token_issue", |b| {
        b.iter(|| keys.issue("ci", access.clone(), std::time::Duration::from_secs(900)))
    });
    let users = rt.block_on(berth::auth::users::Users::open(&meta)).unwrap();
    rt.block_on(users.create("ci", berth::auth::Role::ImageUploader, vec![]))
        .unwrap();
    let (key, secret) = rt.block_on(users.create_key("ci")).unwrap();
    c.bench_function("access_key_verify_argon2", |b| {
        b.iter(|| {
            // A fresh Users each time would reopen sled; instead check a wrong secret, which
            // is never memoized and costs the same argon2 run as a first good login.
            rt.block_on(users.verify(&key.id, "wrong-secret-wrong-secret"))
                .unwrap_err()
        })
    });
    rt.block_on(users.verify(&key.id, &secret)).unwrap();
    c.bench_function("access_key_verify_cached", |b| {
        b.iter(|| users.verified(&key.id, &secret).unwrap())
    });
}

criterion_group!(benches, references, manifests, digests, auth);
criterion_main!(benches);
