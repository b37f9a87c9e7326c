//! The OCI distribution-spec v1.1.1 conformance suite (`conformance/0*_test.go` of
//! opencontainers/distribution-spec), check for check, against berth: the four workflows
//! (pull, push, content discovery, content management) in the suite's order on one repository,
//! with the suite's data shapes (configs with unknown fields and inline `data`, a manifest
//! without layers, a chunked blob, references with `subject` and `artifactType`, an index
//! artifact), its expected statuses and its conditional checks. Run without auth, and with
//! auth enforced through the token dance its client (reggie) does: a 401 with a Bearer
//! challenge, Basic credentials at the realm, the request again with the token.
//!
//! The Go suite itself cannot run here (it needs Go >= 1.20 and modules from the Go proxy,
//! which this machine cannot reach); this is its port. Every failing check is reported by the
//! suite's own name, and the test asserts there are none. `CONFORMANCE_DEBUG=1` prints the
//! challenges the client answers.

mod common;

use std::collections::HashMap;

use base64::Engine as _;
use common::server::{sha256, TestServer};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const NAME: &str = "library/conformance";
const CROSS: &str = "library/conformance-cross";
const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const INDEX: &str = "application/vnd.oci.image.index.v1+json";
const TYPE_A: &str = "application/vnd.nhl.peanut.butter.bagel";
const TYPE_B: &str = "application/vnd.nba.strawberry.jam.croissant";
const ANNOTATION: &str = "org.opencontainers.conformance.test";
const ERROR_CODES: &[&str] = &[
    "BLOB_UNKNOWN",
    "BLOB_UPLOAD_INVALID",
    "BLOB_UPLOAD_UNKNOWN",
    "DIGEST_INVALID",
    "MANIFEST_BLOB_UNKNOWN",
    "MANIFEST_INVALID",
    "MANIFEST_UNKNOWN",
    "MANIFEST_UNVERIFIED",
    "NAME_INVALID",
    "NAME_UNKNOWN",
    "SIZE_INVALID",
    "TAG_INVALID",
    "UNAUTHORIZED",
    "DENIED",
    "UNSUPPORTED",
];

/// A blob of the suite: content, digest.
#[derive(Clone)]
struct Blob {
    content: Vec<u8>,
    digest: String,
}

impl Blob {
    fn new(content: Vec<u8>) -> Blob {
        let digest = sha256(&content);
        Blob { content, digest }
    }

    fn json(v: &Value) -> Blob {
        Blob::new(serde_json::to_vec_pretty(v).unwrap())
    }

    fn descriptor(&self, media_type: &str) -> Value {
        json!({"mediaType": media_type, "size": self.content.len(), "digest": self.digest})
    }
}

/// The suite's test data, built as `setup.go` builds it.
struct Data {
    configs: Vec<Blob>,
    layer: Blob,
    manifests: Vec<Blob>,
    empty_layer_manifest: Blob,
    blob_a: Blob,
    blob_b: Blob,
    chunk1: Vec<u8>,
    chunk2: Vec<u8>,
    empty_json: Blob,
    ref_blob_a: Blob,
    ref_blob_b: Blob,
    refs_a_config: Blob,
    refs_b_config: Blob,
    refs_a_layer: Blob,
    refs_b_layer: Blob,
    refs_c_layer: Blob,
    refs_index: Blob,
    annotations: HashMap<String, String>,
    dummy: String,
}

fn random(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn data() -> Data {
    let b64 = base64::engine::general_purpose::STANDARD;
    let run = uuid::Uuid::new_v4().to_string();
    let configs: Vec<Blob> = (0..5)
        .map(|i| {
            Blob::json(&json!({
                "author": format!("{run}-{i}"),
                "architecture": "amd64",
                "os": "linux",
                "rootfs": {"type": "layers", "diff_ids": []},
            }))
        })
        .collect();
    let layer = Blob::new(random(4096, 7));
    let image = |config: &Blob, layers: Vec<Value>| {
        let mut cfg = config.descriptor("application/vnd.oci.image.config.v1+json");
        // What the suite adds: the config inline, and a field no spec knows.
        cfg["data"] = json!(b64.encode(&config.content));
        cfg["newUnspecifiedField"] = json!(b64.encode(b"hello world"));
        json!({"schemaVersion": 2, "mediaType": MANIFEST, "config": cfg, "layers": layers})
    };
    let layers = vec![layer.descriptor("application/vnd.oci.image.layer.v1.tar+gzip")];
    let manifests: Vec<Blob> = configs
        .iter()
        .map(|c| Blob::json(&image(c, layers.clone())))
        .collect();
    let mut empty = image(&configs[1], Vec::new());
    empty.as_object_mut().unwrap().remove("mediaType");
    let empty_layer_manifest = Blob::json(&empty);
    let blob_b = Blob::new(random(42, 2));
    let (chunk1, chunk2) = blob_b.content.split_at(42 / 2 + 1);
    let (chunk1, chunk2) = (chunk1.to_vec(), chunk2.to_vec());
    let empty_json = Blob::new(b"{}".to_vec());
    let ref_blob_a = Blob::new(b"NHL Peanut Butter on my NHL bagel".to_vec());
    let ref_blob_b = Blob::new(b"NBA Strawberry Jam on my NBA croissant".to_vec());
    let subject = manifests[4].descriptor(MANIFEST);
    let empty_desc = empty_json.descriptor("application/vnd.oci.empty.v1+json");
    let config_artifact = |blob: &Blob, kind: &str, note: &str| {
        Blob::json(&json!({
            "schemaVersion": 2, "mediaType": MANIFEST,
            "config": blob.descriptor(kind), "subject": subject,
            "layers": [empty_desc], "annotations": {ANNOTATION: note},
        }))
    };
    let layer_artifact = |blob: &Blob, kind: &str, subject: &Value, note: Option<&str>| {
        let mut m = json!({
            "schemaVersion": 2, "mediaType": MANIFEST, "artifactType": kind,
            "config": empty_desc, "subject": subject, "layers": [blob.descriptor(kind)],
        });
        if let Some(note) = note {
            m["annotations"] = json!({ANNOTATION: note});
        }
        Blob::json(&m)
    };
    let refs_a_config = config_artifact(&ref_blob_a, TYPE_A, "test config a");
    let refs_b_config = config_artifact(&ref_blob_b, TYPE_B, "test config b");
    let refs_a_layer = layer_artifact(&ref_blob_a, TYPE_A, &subject, Some("test layer a"));
    let refs_b_layer = layer_artifact(&ref_blob_b, TYPE_B, &subject, Some("test layer b"));
    let missing_subject = manifests[3].descriptor(MANIFEST);
    let refs_c_layer = layer_artifact(&ref_blob_b, TYPE_B, &missing_subject, None);
    let refs_index = Blob::json(&json!({
        "schemaVersion": 2, "mediaType": INDEX, "artifactType": "application/vnd.food.stand",
        "manifests": [refs_a_config.descriptor(MANIFEST), refs_a_layer.descriptor(MANIFEST)],
        "subject": subject, "annotations": {ANNOTATION: "test index"},
    }));
    let annotations = [
        (&refs_a_config, "test config a"),
        (&refs_b_config, "test config b"),
        (&refs_a_layer, "test layer a"),
        (&refs_b_layer, "test layer b"),
        (&refs_index, "test index"),
    ]
    .into_iter()
    .map(|(b, v)| (b.digest.clone(), v.to_string()))
    .collect();
    Data {
        configs,
        layer,
        manifests,
        empty_layer_manifest,
        blob_a: Blob::new(random(42, 1)),
        blob_b,
        chunk1,
        chunk2,
        empty_json,
        ref_blob_a,
        ref_blob_b,
        refs_a_config,
        refs_b_config,
        refs_a_layer,
        refs_b_layer,
        refs_c_layer,
        refs_index,
        annotations,
        dummy: sha256(b"hello world"),
    }
}

/// An answer.
struct Resp {
    status: StatusCode,
    headers: reqwest::header::HeaderMap,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// The `Location` as a path (reggie's GetRelativeLocation).
    fn location(&self) -> String {
        let l = self.header("location");
        match l.find("/v2/") {
            Some(i) => l[i..].to_string(),
            None => l.to_string(),
        }
    }

    fn ok(&self) -> bool {
        self.status.is_success()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// The suite's client: requests with `<name>` resolved, and the token dance when asked.
struct Client {
    http: reqwest::Client,
    base: String,
    credentials: Option<(String, String)>,
    tokens: HashMap<String, String>,
    last_challenge: Option<String>,
}

impl Client {
    async fn send(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Vec<u8>>,
    ) -> Resp {
        let url = format!("{}{}", self.base, path);
        let scope_key = path.split("/blobs/").next().unwrap_or(path).to_string();
        let mut token = self.tokens.get(&scope_key).cloned();
        for _ in 0..2 {
            let mut req = self.http.request(method.clone(), &url);
            for (n, v) in headers {
                // Go's client ignores a Content-Length header set by hand and sends the body's
                // own length (reggie's PUTs without a body set one the body does not have).
                if body.is_none() && n.eq_ignore_ascii_case("content-length") {
                    continue;
                }
                req = req.header(*n, *v);
            }
            if let Some(b) = &body {
                req = req.body(b.clone());
            }
            if let Some(t) = &token {
                req = req.bearer_auth(t);
            }
            let r = req.send().await.unwrap();
            let status = r.status();
            let challenge = r
                .headers()
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let resp = Resp {
                status,
                headers: r.headers().clone(),
                body: r.bytes().await.unwrap().to_vec(),
            };
            let (Some((user, secret)), Some(challenge), StatusCode::UNAUTHORIZED) =
                (&self.credentials, challenge, status)
            else {
                return resp;
            };
            self.last_challenge = Some(challenge.clone());
            if std::env::var("CONFORMANCE_DEBUG").is_ok() {
                eprintln!("{method} {path}: {challenge}");
            }
            let params = challenge_params(challenge.trim_start_matches("Bearer "));
            let mut realm = reqwest::Url::parse(&params["realm"]).unwrap();
            for key in ["service", "scope"] {
                if let Some(v) = params.get(key) {
                    realm.query_pairs_mut().append_pair(key, v);
                }
            }
            let answer: Value = self
                .http
                .get(realm)
                .basic_auth(user, Some(secret))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let t = answer["token"].as_str().unwrap_or("").to_string();
            self.tokens.insert(scope_key.clone(), t.clone());
            token = Some(t);
        }
        panic!(
            "{method} {path}: still refused after the token dance ({:?})",
            self.last_challenge
        );
    }

    async fn get(&mut self, path: &str) -> Resp {
        self.send(Method::GET, path, &[], None).await
    }

    async fn head(&mut self, path: &str) -> Resp {
        self.send(Method::HEAD, path, &[], None).await
    }

    async fn delete(&mut self, path: &str) -> Resp {
        self.send(Method::DELETE, path, &[], None).await
    }

    /// POST a session, then PUT the blob to it (the suite's "Populate registry with …").
    async fn push_blob(&mut self, name: &str, blob: &Blob) -> Resp {
        let r = self
            .send(
                Method::POST,
                &format!("/v2/{name}/blobs/uploads/"),
                &[],
                None,
            )
            .await;
        let at = with_query(&r.location(), "digest", &blob.digest);
        let len = blob.content.len().to_string();
        let headers = [
            ("content-type", "application/octet-stream"),
            ("content-length", len.as_str()),
        ];
        self.send(Method::PUT, &at, &headers, Some(blob.content.clone()))
            .await
    }

    async fn put_manifest(&mut self, reference: &str, blob: &Blob, media_type: &str) -> Resp {
        let path = format!("/v2/{NAME}/manifests/{reference}");
        self.send(
            Method::PUT,
            &path,
            &[("content-type", media_type)],
            Some(blob.content.clone()),
        )
        .await
    }
}

/// `key="value",key="value"` of a challenge (values are quoted and may hold commas).
fn challenge_params(text: &str) -> HashMap<String, String> {
    let mut params = HashMap::new();
    let mut rest = text.trim();
    while let Some((key, tail)) = rest.split_once('=') {
        let tail = tail.trim_start();
        let (value, after) = match tail.strip_prefix('"') {
            Some(quoted) => match quoted.split_once('"') {
                Some((v, after)) => (v, after),
                None => (quoted, ""),
            },
            None => tail.split_once(',').unwrap_or((tail, "")),
        };
        params.insert(key.trim().to_string(), value.to_string());
        rest = after.trim_start_matches([',', ' ']);
    }
    params
}

fn with_query(location: &str, key: &str, value: &str) -> String {
    let sep = if location.contains('?') { '&' } else { '?' };
    format!("{location}{sep}{key}={value}")
}

/// The failing checks, by the suite's names.
#[derive(Default)]
struct Report {
    failed: Vec<String>,
    passed: usize,
}

impl Report {
    fn check(&mut self, name: &str, ok: bool, detail: impl std::fmt::Display) {
        if ok {
            self.passed += 1;
        } else {
            self.failed.push(format!("{name}: {detail}"));
        }
    }
}

fn blob_path(name: &str, digest: &str) -> String {
    format!("/v2/{name}/blobs/{digest}")
}

fn manifest_path(reference: &str) -> String {
    format!("/v2/{NAME}/manifests/{reference}")
}

fn deleted(r: &Resp, also: &[u16]) -> bool {
    r.ok() || also.contains(&r.status.as_u16())
}

async fn pull(c: &mut Client, d: &Data, rep: &mut Report) {
    let ctx = "Pull";
    for blob in [&d.configs[0], &d.configs[1], &d.layer] {
        let r = c.push_blob(NAME, blob).await;
        rep.check(&format!("{ctx} setup: populate blob"), r.ok(), r.status);
    }
    let r = c.put_manifest("tagtest0", &d.manifests[0], MANIFEST).await;
    rep.check(
        &format!("{ctx} setup: manifest[0] by tag"),
        r.ok(),
        r.status,
    );
    let r = c
        .put_manifest(&d.manifests[1].digest, &d.manifests[1], MANIFEST)
        .await;
    rep.check(
        &format!("{ctx} setup: manifest[1] by digest"),
        r.ok(),
        r.status,
    );

    let r = c.head(&blob_path(NAME, &d.dummy)).await;
    rep.check(
        "HEAD request to nonexistent blob should result in 404 response",
        r.status == 404,
        r.status,
    );
    let r = c.head(&blob_path(NAME, &d.configs[0].digest)).await;
    let digest = r.header("docker-content-digest");
    rep.check(
        "HEAD request to existing blob should yield 200",
        r.status == 200 && (digest.is_empty() || digest == d.configs[0].digest),
        r.status,
    );
    let r = c.get(&blob_path(NAME, &d.dummy)).await;
    rep.check(
        "GET nonexistent blob should result in 404 response",
        r.status == 404,
        r.status,
    );
    let r = c.get(&blob_path(NAME, &d.configs[0].digest)).await;
    rep.check(
        "GET request to existing blob URL should yield 200",
        r.status == 200,
        r.status,
    );

    let accept = [("accept", MANIFEST)];
    let r = c.head(&manifest_path(".INVALID_MANIFEST_NAME")).await;
    rep.check(
        "HEAD request to nonexistent manifest should return 404",
        r.status == 404,
        r.status,
    );
    for (i, reference, name) in [
        (
            0,
            d.manifests[0].digest.as_str(),
            "HEAD request to manifest[0] path (digest) should yield 200 response",
        ),
        (
            1,
            d.manifests[1].digest.as_str(),
            "HEAD request to manifest[1] path (digest) should yield 200 response",
        ),
        (
            0,
            "tagtest0",
            "HEAD request to manifest path (tag) should yield 200 response",
        ),
    ] {
        let r = c
            .send(Method::HEAD, &manifest_path(reference), &accept, None)
            .await;
        let digest = r.header("docker-content-digest");
        rep.check(
            name,
            r.status == 200 && (digest.is_empty() || digest == d.manifests[i].digest),
            r.status,
        );
    }
    let r = c.get(&manifest_path(".INVALID_MANIFEST_NAME")).await;
    rep.check(
        "GET nonexistent manifest should return 404",
        r.status == 404,
        r.status,
    );
    for (reference, name) in [
        (
            d.manifests[0].digest.as_str(),
            "GET request to manifest[0] path (digest) should yield 200 response",
        ),
        (
            d.manifests[1].digest.as_str(),
            "GET request to manifest[1] path (digest) should yield 200 response",
        ),
        (
            "tagtest0",
            "GET request to manifest path (tag) should yield 200 response",
        ),
    ] {
        let r = c
            .send(Method::GET, &manifest_path(reference), &accept, None)
            .await;
        rep.check(name, r.status == 200, r.status);
    }
    let r = c
        .send(
            Method::GET,
            &manifest_path("sha256:totallywrong"),
            &[("content-type", MANIFEST)],
            Some(b"blablabla".to_vec()),
        )
        .await;
    let code = r.json()["errors"][0]["code"]
        .as_str()
        .unwrap_or("")
        .to_string();
    rep.check(
        "400 response body should contain OCI-conforming JSON message",
        r.status == 404 || (r.status == 400 && ERROR_CODES.contains(&code.as_str())),
        format!("{} {code}", r.status),
    );

    for m in &d.manifests[..2] {
        let r = c.delete(&manifest_path(&m.digest)).await;
        rep.check(
            "Pull teardown: delete manifest created in setup",
            deleted(&r, &[405]),
            r.status,
        );
    }
    for blob in [&d.configs[0], &d.configs[1], &d.layer] {
        let r = c.delete(&blob_path(NAME, &blob.digest)).await;
        rep.check(
            "Pull teardown: delete blob created in setup",
            deleted(&r, &[404, 405]),
            r.status,
        );
    }
}

async fn push(c: &mut Client, d: &Data, rep: &mut Report) {
    let octets = ("content-type", "application/octet-stream");
    // Blob Upload Streamed
    let r = c
        .send(
            Method::POST,
            &format!("/v2/{NAME}/blobs/uploads/"),
            &[],
            None,
        )
        .await;
    let session = r.location();
    let r = c
        .send(
            Method::PATCH,
            &session,
            &[octets],
            Some(d.blob_a.content.clone()),
        )
        .await;
    rep.check(
        "PATCH request with blob in body should yield 202 response",
        !session.is_empty() && r.status == 202,
        r.status,
    );
    let len = d.blob_a.content.len().to_string();
    let r = c
        .send(
            Method::PUT,
            &with_query(&r.location(), "digest", &d.blob_a.digest),
            &[octets, ("content-length", &len)],
            None,
        )
        .await;
    rep.check(
        "PUT request to session URL with digest should yield 201 response",
        r.status == 201 && !r.location().is_empty(),
        r.status,
    );

    // Blob Upload Monolithic
    let r = c.get(&blob_path(NAME, &d.dummy)).await;
    rep.check(
        "GET nonexistent blob should result in 404 response",
        r.status == 404,
        r.status,
    );
    let config = &d.configs[1];
    let len = config.content.len().to_string();
    let r = c
        .send(
            Method::POST,
            &format!("/v2/{NAME}/blobs/uploads/?digest={}", config.digest),
            &[octets, ("content-length", &len)],
            Some(config.content.clone()),
        )
        .await;
    let monolithic = r.status;
    rep.check(
        "POST request with digest and blob should yield a 201 or 202",
        !r.location().is_empty() && (r.status == 201 || r.status == 202),
        r.status,
    );
    let r = c.get(&blob_path(NAME, &config.digest)).await;
    let want = if monolithic == 202 { 404 } else { 200 };
    rep.check(
        "GET request to blob URL from prior request should yield 200 or 404 based on response code",
        r.status == want,
        r.status,
    );
    let r = c
        .send(
            Method::POST,
            &format!("/v2/{NAME}/blobs/uploads/"),
            &[],
            None,
        )
        .await;
    rep.check(
        "POST request should yield a session ID",
        r.status == 202,
        r.status,
    );
    let r = c
        .send(
            Method::PUT,
            &with_query(&r.location(), "digest", &config.digest),
            &[octets, ("content-length", &len)],
            Some(config.content.clone()),
        )
        .await;
    rep.check(
        "PUT upload of a blob should yield a 201 Response",
        r.status == 201 && !r.location().is_empty(),
        r.status,
    );
    let r = c.get(&blob_path(NAME, &config.digest)).await;
    rep.check(
        "GET request to existing blob should yield 200 response",
        r.status == 200,
        r.status,
    );
    let r = c.push_blob(NAME, &d.layer).await;
    rep.check(
        "PUT upload of a layer blob should yield a 201 Response",
        r.status == 201 && !r.location().is_empty(),
        r.status,
    );
    let r = c.get(&blob_path(NAME, &d.layer.digest)).await;
    rep.check(
        "GET request to existing layer should yield 200 response",
        r.status == 200,
        r.status,
    );

    // Blob Upload Chunked
    let range1 = format!("0-{}", d.chunk1.len() - 1);
    let range2 = format!("{}-{}", d.chunk1.len(), d.blob_b.content.len() - 1);
    let (len1, len2) = (d.chunk1.len().to_string(), d.chunk2.len().to_string());
    let post = [("content-length", "0")];
    let r = c
        .send(
            Method::POST,
            &format!("/v2/{NAME}/blobs/uploads/"),
            &post,
            None,
        )
        .await;
    let r = c
        .send(
            Method::PATCH,
            &r.location(),
            &[
                octets,
                ("content-length", &len2),
                ("content-range", &range2),
            ],
            Some(d.chunk2.clone()),
        )
        .await;
    rep.check(
        "Out-of-order blob upload should return 416",
        r.status == 416,
        r.status,
    );
    let r = c
        .send(
            Method::POST,
            &format!("/v2/{NAME}/blobs/uploads/"),
            &post,
            None,
        )
        .await;
    let first = r.location();
    let chunk1 = [
        octets,
        ("content-length", len1.as_str()),
        ("content-range", range1.as_str()),
    ];
    let r = c
        .send(Method::PATCH, &first, &chunk1, Some(d.chunk1.clone()))
        .await;
    rep.check(
        "PATCH request with first chunk should return 202",
        r.status == 202 && r.header("range") == range1,
        format!("{} range {:?}", r.status, r.header("range")),
    );
    let r = c
        .send(Method::PATCH, &first, &chunk1, Some(d.chunk1.clone()))
        .await;
    rep.check(
        "Retry previous blob chunk should return 416",
        r.status == 416,
        r.status,
    );
    let r = c.get(&first).await;
    rep.check(
        "Get on stale blob upload should return 204 with a range and location",
        r.status == 204 && !r.location().is_empty() && r.header("range") == range1,
        r.status,
    );
    let r = c
        .send(
            Method::PATCH,
            &r.location(),
            &[
                octets,
                ("content-length", &len2),
                ("content-range", &range2),
            ],
            Some(d.chunk2.clone()),
        )
        .await;
    rep.check(
        "PATCH request with second chunk should return 202",
        r.status == 202 && !r.location().is_empty(),
        r.status,
    );
    let r = c
        .send(
            Method::PUT,
            &with_query(&r.location(), "digest", &d.blob_b.digest),
            &[octets, ("content-length", "0")],
            None,
        )
        .await;
    rep.check(
        "PUT request with digest should return 201",
        r.status == 201 && !r.location().is_empty(),
        r.status,
    );

    // Cross-Repository Blob Mount
    let uploads = format!("/v2/{CROSS}/blobs/uploads/");
    let r = c
        .send(
            Method::POST,
            &format!("{uploads}?mount={}", d.dummy),
            &[],
            None,
        )
        .await;
    rep.check(
        "Cross-mounting of a blob without the from argument should yield session id",
        r.status == 202 && !r.location().is_empty(),
        r.status,
    );
    let mount = format!("{uploads}?mount={}&from={NAME}", d.blob_a.digest);
    let r = c.send(Method::POST, &mount, &[], None).await;
    rep.check(
        "POST request to mount another repository's blob should return 201 or 202",
        r.status == 201 || r.status == 202,
        r.status,
    );
    if r.status == 201 {
        let at = r.location();
        let ok = at == blob_path(CROSS, &d.blob_a.digest);
        let g = c.get(&at).await;
        rep.check(
            "GET request to test digest within cross-mount namespace should return 200",
            ok && g.status == 200,
            format!("{at} {}", g.status),
        );
        // berth does no automatic content discovery: a mount without `from` opens a session.
        let r = c
            .send(
                Method::POST,
                &format!("{uploads}?mount={}", d.blob_a.digest),
                &[],
                None,
            )
            .await;
        rep.check(
            "Cross-mounting without from, and automatic content discovery disabled should return a 202",
            r.status == 202,
            r.status,
        );
    } else {
        rep.check(
            "Cross-mounting of nonexistent blob should yield session id",
            r.location().starts_with(&uploads),
            r.location(),
        );
    }

    // Manifest Upload
    let r = c.get(&manifest_path(".INVALID_MANIFEST_NAME")).await;
    rep.check(
        "GET nonexistent manifest should return 404",
        r.status == 404,
        r.status,
    );
    for i in 0..4 {
        let r = c
            .put_manifest(&format!("test{i}"), &d.manifests[1], MANIFEST)
            .await;
        rep.check(
            "PUT should accept a manifest upload",
            r.status == 201 && !r.location().is_empty(),
            r.status,
        );
    }
    let r = c
        .put_manifest("emptylayer", &d.empty_layer_manifest, MANIFEST)
        .await;
    let empty_ref = r.location();
    rep.check(
        "Registry should accept a manifest upload with no layers",
        r.status == 201 && !empty_ref.is_empty(),
        r.status,
    );
    let accept = [("accept", MANIFEST)];
    let r = c
        .send(
            Method::GET,
            &manifest_path(&d.manifests[1].digest),
            &accept,
            None,
        )
        .await;
    rep.check(
        "GET request to manifest URL (digest) should yield 200 response",
        r.status == 200,
        r.status,
    );

    // Teardown
    let r = c.delete(&manifest_path(&d.manifests[1].digest)).await;
    rep.check(
        "Push teardown: delete manifest created in tests",
        deleted(&r, &[405]),
        r.status,
    );
    let r = c.delete(&empty_ref).await;
    rep.check(
        "Push teardown: delete manifest with no layers",
        deleted(&r, &[404, 405]),
        r.status,
    );
    for blob in [&d.configs[1], &d.layer] {
        let r = c.delete(&blob_path(NAME, &blob.digest)).await;
        rep.check(
            "Push teardown: delete blob",
            deleted(&r, &[404, 405]),
            r.status,
        );
    }
}

async fn discovery(c: &mut Client, d: &Data, rep: &mut Report) {
    for blob in [&d.configs[2], &d.layer] {
        let r = c.push_blob(NAME, blob).await;
        rep.check("Discovery setup: populate blob", r.ok(), r.status);
    }
    for i in 0..4 {
        let r = c
            .put_manifest(&format!("test{i}"), &d.manifests[2], MANIFEST)
            .await;
        rep.check(
            "Discovery setup: populate registry with test tags",
            r.ok(),
            r.status,
        );
    }
    // References setup, in the suite's order.
    rep.check(
        "References setup: the empty JSON blob's digest",
        d.empty_json.digest
            == "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a",
        &d.empty_json.digest,
    );
    for blob in [&d.empty_json, &d.ref_blob_a] {
        let r = c.push_blob(NAME, blob).await;
        rep.check("References setup: blob", r.ok(), r.status);
    }
    let subject = d.manifests[4].digest.clone();
    for (m, media_type) in [
        (&d.refs_a_config, MANIFEST),
        (&d.refs_a_layer, MANIFEST),
        (&d.refs_index, INDEX),
    ] {
        let r = c.put_manifest(&m.digest, m, media_type).await;
        rep.check(
            "References setup: a referrer pushed before its subject answers OCI-Subject",
            r.ok() && r.header("oci-subject") == subject,
            format!("{} {:?}", r.status, r.header("oci-subject")),
        );
    }
    for blob in [&d.configs[4], &d.layer] {
        let r = c.push_blob(NAME, blob).await;
        rep.check("References setup: blob", r.ok(), r.status);
    }
    let r = c.put_manifest("tagtest0", &d.manifests[4], MANIFEST).await;
    rep.check("References setup: the subject", r.ok(), r.status);
    let r = c.push_blob(NAME, &d.ref_blob_b).await;
    rep.check("References setup: blob", r.ok(), r.status);
    for (m, want) in [
        (&d.refs_b_config, &subject),
        (&d.refs_b_layer, &subject),
        (&d.refs_c_layer, &d.manifests[3].digest),
    ] {
        let r = c.put_manifest(&m.digest, m, MANIFEST).await;
        rep.check(
            "References setup: a referrer answers OCI-Subject",
            r.ok() && r.header("oci-subject") == want.as_str(),
            format!("{} {:?}", r.status, r.header("oci-subject")),
        );
    }

    // Listing tags
    let tags = |r: &Resp| -> Vec<String> {
        r.json()["tags"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|t| t.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let r = c.get(&format!("/v2/{NAME}/tags/list")).await;
    let all = tags(&r);
    rep.check(
        "GET request to list tags should yield 200 response",
        r.status == 200,
        r.status,
    );
    let half = all.len() / 2;
    let r = c.get(&format!("/v2/{NAME}/tags/list?n={half}")).await;
    let page = tags(&r);
    rep.check(
        "GET number of tags should be limitable by `n` query parameter",
        r.status == 200 && page.len() == half,
        format!("{} {page:?}", r.status),
    );
    let last = page.last().cloned().unwrap_or_default();
    let r = c
        .get(&format!("/v2/{NAME}/tags/list?n={half}&last={last}"))
        .await;
    let next = tags(&r);
    rep.check(
        "GET start of tag is set by `last` query parameter",
        r.status == 200 && next.len() <= half && next.iter().all(|t| *t > last),
        format!("{} {next:?} after {last}", r.status),
    );

    // Listing references
    let index_of = |r: &Resp| {
        r.json()["manifests"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    };
    let annotated = |items: &[Value]| {
        items.iter().all(|m| {
            let a = m["annotations"].as_object();
            let digest = m["digest"].as_str().unwrap_or("");
            a.is_some_and(|a| a.len() == 1)
                && m["annotations"][ANNOTATION].as_str()
                    == d.annotations.get(digest).map(String::as_str)
        })
    };
    let r = c.get(&format!("/v2/{NAME}/referrers/{}", d.dummy)).await;
    rep.check(
        "GET request to nonexistent blob should result in empty 200 response",
        r.status == 200 && r.header("content-type") == INDEX && index_of(&r).is_empty(),
        r.status,
    );
    let r = c.get(&format!("/v2/{NAME}/referrers/{subject}")).await;
    let items = index_of(&r);
    rep.check(
        "GET request to existing blob should yield 200",
        r.status == 200
            && r.header("content-type") == INDEX
            && items.len() == 5
            && items[0]["digest"] != items[1]["digest"]
            && annotated(&items),
        format!("{} {} referrers", r.status, items.len()),
    );
    let r = c
        .get(&format!(
            "/v2/{NAME}/referrers/{subject}?artifactType={TYPE_A}"
        ))
        .await;
    let items = index_of(&r);
    let filtered = r.header("oci-filters-applied");
    rep.check(
        "GET request to existing blob with filter should yield 200",
        r.status == 200
            && r.header("content-type") == INDEX
            && filtered == "artifactType"
            && items.len() == 2
            && annotated(&items),
        format!(
            "{} filters {filtered:?}, {} referrers",
            r.status,
            items.len()
        ),
    );
    let r = c
        .get(&format!("/v2/{NAME}/referrers/{}", d.manifests[3].digest))
        .await;
    let items = index_of(&r);
    rep.check(
        "GET request to missing manifest should yield 200",
        r.status == 200
            && r.header("content-type") == INDEX
            && items.len() == 1
            && items[0]["digest"] == d.refs_c_layer.digest.as_str(),
        format!("{} {} referrers", r.status, items.len()),
    );

    // Teardown
    for m in [
        &d.refs_index,
        &d.manifests[2],
        &d.manifests[4],
        &d.refs_a_config,
        &d.refs_a_layer,
        &d.refs_b_config,
        &d.refs_b_layer,
        &d.refs_c_layer,
    ] {
        let r = c.delete(&manifest_path(&m.digest)).await;
        rep.check(
            "Discovery teardown: delete manifest & associated tags",
            deleted(&r, &[404, 405]),
            r.status,
        );
    }
    for blob in [
        &d.configs[2],
        &d.configs[4],
        &d.layer,
        &d.ref_blob_a,
        &d.ref_blob_b,
        &d.empty_json,
    ] {
        let r = c.delete(&blob_path(NAME, &blob.digest)).await;
        rep.check(
            "Discovery teardown: delete blob",
            deleted(&r, &[404, 405]),
            r.status,
        );
    }
}

async fn management(c: &mut Client, d: &Data, rep: &mut Report) {
    for blob in [&d.configs[3], &d.layer] {
        let r = c.push_blob(NAME, blob).await;
        rep.check("Management setup: populate blob", r.ok(), r.status);
    }
    let r = c.put_manifest("tagtest0", &d.manifests[3], MANIFEST).await;
    rep.check(
        "Management setup: populate registry with test tag",
        r.ok(),
        r.status,
    );
    let count = |r: &Resp| r.json()["tags"].as_array().map_or(0, Vec::len);
    let r = c.get(&format!("/v2/{NAME}/tags/list")).await;
    let before = count(&r);
    rep.check(
        "Check how many tags there are before anything gets deleted",
        r.status == 200,
        r.status,
    );

    let r = c.delete(&manifest_path("tagtest0")).await;
    let code = r.json()["errors"][0]["code"]
        .as_str()
        .unwrap_or("")
        .to_string();
    rep.check(
        "DELETE request to manifest tag should return 202, unless tag deletion is disallowed (400/405)",
        r.status == 202 || r.status == 405 || (r.status == 400 && code == "UNSUPPORTED"),
        r.status,
    );
    let r = c.delete(&manifest_path(&d.manifests[3].digest)).await;
    rep.check(
        "DELETE request to manifest (digest) should yield 202 response unless already deleted",
        r.status == 202 || r.status == 404,
        r.status,
    );
    let r = c.get(&manifest_path(&d.manifests[3].digest)).await;
    rep.check(
        "GET request to deleted manifest URL should yield 404 response, unless delete is disallowed",
        r.status == 404 || r.status == 200,
        r.status,
    );
    let r = c.get(&format!("/v2/{NAME}/tags/list")).await;
    let after = if r.status == 200 { count(&r) } else { 0 };
    rep.check(
        "GET request to tags list should reflect manifest deletion",
        (r.status == 200 || r.status == 404) && after + 1 == before,
        format!("{} {before} -> {after}", r.status),
    );

    let r = c.delete(&blob_path(NAME, &d.configs[3].digest)).await;
    let first = deleted(&r, &[]) && r.status == 202 || r.status == 404 || r.status == 405;
    let r = c.delete(&blob_path(NAME, &d.layer.digest)).await;
    rep.check(
        "DELETE request to blob URL should yield 202 response",
        first && (r.status == 202 || r.status == 404 || r.status == 405),
        r.status,
    );
    let r = c.get(&blob_path(NAME, &d.configs[3].digest)).await;
    rep.check(
        "GET request to deleted blob URL should yield 404 response",
        r.status == 404,
        r.status,
    );
}

async fn run(s: &TestServer, credentials: Option<(String, String)>) -> Report {
    let mut c = Client {
        http: reqwest::Client::new(),
        base: s.base.clone(),
        credentials,
        tokens: HashMap::new(),
        last_challenge: None,
    };
    let d = data();
    let mut rep = Report::default();
    pull(&mut c, &d, &mut rep).await;
    push(&mut c, &d, &mut rep).await;
    discovery(&mut c, &d, &mut rep).await;
    management(&mut c, &d, &mut rep).await;
    rep
}

fn verdict(mode: &str, rep: &Report) {
    assert!(rep.passed > 80, "{mode}: only {} checks ran", rep.passed);
    assert!(
        rep.failed.is_empty(),
        "{mode}: {} of {} conformance checks failed:\n{}",
        rep.failed.len(),
        rep.passed + rep.failed.len(),
        rep.failed.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_distribution_spec_conformance_suite_passes_without_auth() {
    let s = TestServer::start("").await;
    let rep = run(&s, None).await;
    verdict("without auth", &rep);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_distribution_spec_conformance_suite_passes_with_auth() {
    let s = TestServer::start("[auth]\nmode = \"on\"\n").await;
    let credentials = s.user("conformance", berth::auth::Role::Admin, &["library"]);
    // Anonymous requests are refused: the suite's client has to do the token dance.
    assert_eq!(s.get(&format!("/v2/{NAME}/tags/list")).await.status(), 401);
    let rep = run(&s, Some(credentials)).await;
    verdict("with auth", &rep);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_distribution_spec_conformance_suite_passes_on_s3_and_postgresql() {
    let url = berth::testbed::postgres().database().await;
    let bucket = berth::testbed::S3Server::start().await;
    let s = TestServer::start(&format!(
        "[auth]\nmode = \"on\"\n[metadata]\nkind = \"postgres\"\nurl = {url:?}\n{}",
        bucket.storage_toml("conformance")
    ))
    .await;
    let credentials = s.user("conformance", berth::auth::Role::Admin, &["library"]);
    let rep = run(&s, Some(credentials)).await;
    verdict("on S3 and PostgreSQL", &rep);
    // The records are in the database and the blobs in the bucket, not in the data directory.
    assert!(!s.dir.path().join("data/meta").exists());
    assert!(!s.dir.path().join("data/blobs").exists());
}
