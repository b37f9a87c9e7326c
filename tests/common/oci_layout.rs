//! Builds OCI image layouts on disk without any network access.
//!
//! * [`build_image`]: a runnable single-platform image: a layer with Debian's static busybox
//!   (`/bin/busybox` plus `sh`/`echo` links), two layers of random bytes, and a config whose
//!   `Cmd` prints [`MARKER`].
//! * [`build_multiarch_index`]: an OCI index with an amd64 and an arm64 manifest (the host one
//!   runs; the other carries the same x86-64 busybox and need not run).
//!
//! Both write `oci-layout`, `blobs/sha256/*` and `index.json` (the tag is the
//! `org.opencontainers.image.ref.name` annotation; entries with other tags are kept, so several
//! images can share one layout). All digests are returned so tests can compare round trips.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use flate2::write::GzEncoder;
use flate2::Compression;
use rand::RngCore;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// The line the images' `Cmd` prints.
pub const MARKER: &str = "berth-ok";
pub const MT_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MT_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MT_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MT_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";
/// Debian's `busybox-static` binary.
pub const BUSYBOX: &str = "/bin/busybox";

const CREATED: &str = "2024-01-01T00:00:00Z";
const MTIME: u64 = 1_704_067_200; // 2024-01-01T00:00:00Z

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    let out = Sha256::digest(bytes);
    let mut s = String::with_capacity(7 + 64);
    s.push_str("sha256:");
    for b in out.iter() {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// A content descriptor (media type, digest, size).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
}

impl Descriptor {
    fn to_json(&self) -> Value {
        json!({ "mediaType": self.media_type, "digest": self.digest, "size": self.size })
    }
}

/// One image manifest written to a layout.
#[derive(Clone, Debug)]
pub struct BuiltImage {
    /// Descriptor of the manifest (`digest` = sha256 of `manifest_bytes`).
    pub manifest: Descriptor,
    /// The exact manifest bytes stored in the layout.
    pub manifest_bytes: Vec<u8>,
    pub config: Descriptor,
    pub config_bytes: Vec<u8>,
    /// Gzipped layers, busybox first.
    pub layers: Vec<Descriptor>,
    /// sha256 of each uncompressed layer tar, as in the config's `rootfs.diff_ids`.
    pub diff_ids: Vec<String>,
    /// `amd64` or `arm64`.
    pub architecture: String,
}

impl BuiltImage {
    /// Config and layer digests (the blobs a registry must hold for this manifest).
    pub fn blob_digests(&self) -> BTreeSet<String> {
        std::iter::once(self.config.digest.clone())
            .chain(self.layers.iter().map(|l| l.digest.clone()))
            .collect()
    }

    /// Every digest a layout holding just this image contains: manifest, config, layers.
    pub fn all_digests(&self) -> BTreeSet<String> {
        let mut s = self.blob_digests();
        s.insert(self.manifest.digest.clone());
        s
    }
}

/// An OCI index written to a layout, with its per-platform images.
#[derive(Clone, Debug)]
pub struct BuiltIndex {
    pub index: Descriptor,
    pub index_bytes: Vec<u8>,
    /// In index order: amd64 then arm64.
    pub images: Vec<BuiltImage>,
}

impl BuiltIndex {
    /// The image for `architecture` (`amd64`/`arm64`).
    pub fn image(&self, architecture: &str) -> &BuiltImage {
        self.images
            .iter()
            .find(|i| i.architecture == architecture)
            .unwrap_or_else(|| panic!("no {architecture} image in the index"))
    }

    /// Every digest in the layout for this index: index, manifests, configs, layers.
    pub fn all_digests(&self) -> BTreeSet<String> {
        let mut s: BTreeSet<String> = self.images.iter().flat_map(|i| i.all_digests()).collect();
        s.insert(self.index.digest.clone());
        s
    }
}

/// The OCI architecture name of this machine (the one busybox runs on).
pub fn host_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => panic!("unsupported host architecture {other}"),
    }
}

/// Builds a runnable image (busybox layer + 2 layers of `random_layer_size` random bytes each)
/// for the host architecture into `layout`, tagged `tag` in `index.json`.
pub fn build_image(layout: &Path, tag: &str, random_layer_size: usize) -> BuiltImage {
    init_layout(layout);
    let busybox = busybox_layer();
    let img = write_image(layout, host_architecture(), &busybox, random_layer_size);
    add_to_index_json(layout, &img.manifest, tag);
    img
}

/// Builds an OCI index with an amd64 and an arm64 image (each: the busybox layer, shared, plus
/// 2 random layers of their own) into `layout`, tagged `tag` in `index.json`.
pub fn build_multiarch_index(layout: &Path, tag: &str, random_layer_size: usize) -> BuiltIndex {
    init_layout(layout);
    let busybox = busybox_layer();
    let images: Vec<BuiltImage> = ["amd64", "arm64"]
        .iter()
        .map(|arch| write_image(layout, arch, &busybox, random_layer_size))
        .collect();
    let manifests: Vec<Value> = images
        .iter()
        .map(|img| {
            let mut d = img.manifest.to_json();
            let mut platform = json!({ "architecture": img.architecture, "os": "linux" });
            if img.architecture == "arm64" {
                platform["variant"] = json!("v8");
            }
            d["platform"] = platform;
            d
        })
        .collect();
    let index_bytes = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MT_INDEX,
        "manifests": manifests,
    }))
    .unwrap();
    let index = write_blob(layout, MT_INDEX, &index_bytes);
    add_to_index_json(layout, &index, tag);
    BuiltIndex {
        index,
        index_bytes,
        images,
    }
}

/// Writes a layout as an (uncompressed) tar file, the form `ctr images import` reads.
pub fn layout_to_tar(layout: &Path, tar_path: &Path) {
    let file = std::fs::File::create(tar_path).unwrap();
    let mut b = tar::Builder::new(file);
    b.mode(tar::HeaderMode::Deterministic);
    b.follow_symlinks(false);
    b.append_dir_all(".", layout).unwrap();
    b.into_inner().unwrap().sync_all().unwrap();
}

/// The `(tag, descriptor)` entries of a layout's `index.json`.
pub fn read_index_json(layout: &Path) -> Vec<(Option<String>, Descriptor)> {
    let path = layout.join("index.json");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let v: Value = serde_json::from_slice(&bytes).unwrap();
    v["manifests"]
        .as_array()
        .expect("index.json has no manifests array")
        .iter()
        .map(|m| {
            let tag = m["annotations"][ANNOTATION_REF_NAME]
                .as_str()
                .map(str::to_string);
            (tag, descriptor_from_json(m))
        })
        .collect()
}

/// The descriptor tagged `tag` in a layout's `index.json`; panics if absent.
pub fn tagged(layout: &Path, tag: &str) -> Descriptor {
    let entries = read_index_json(layout);
    entries
        .iter()
        .find(|(t, _)| t.as_deref() == Some(tag))
        .map(|(_, d)| d.clone())
        .unwrap_or_else(|| {
            panic!(
                "tag {tag} not in {}/index.json: {entries:?}",
                layout.display()
            )
        })
}

/// Digests of every blob in `layout/blobs/sha256`, after checking each file hashes to its name.
pub fn verified_blob_digests(layout: &Path) -> BTreeSet<String> {
    let dir = layout.join("blobs").join("sha256");
    let mut out = BTreeSet::new();
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display())) {
        let entry = entry.unwrap();
        let name = format!("sha256:{}", entry.file_name().to_string_lossy());
        let bytes = std::fs::read(entry.path()).unwrap();
        let actual = sha256_digest(&bytes);
        assert_eq!(
            actual,
            name,
            "blob {} does not hash to its name",
            entry.path().display()
        );
        out.insert(name);
    }
    out
}

/// Reads a blob from a layout.
pub fn read_blob(layout: &Path, digest: &str) -> Vec<u8> {
    let path = blob_path(layout, digest);
    std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn blob_path(layout: &Path, digest: &str) -> PathBuf {
    let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
    layout.join("blobs").join("sha256").join(hex)
}

fn descriptor_from_json(v: &Value) -> Descriptor {
    Descriptor {
        media_type: v["mediaType"].as_str().unwrap_or_default().to_string(),
        digest: v["digest"].as_str().expect("descriptor digest").to_string(),
        size: v["size"].as_u64().expect("descriptor size"),
    }
}

fn init_layout(layout: &Path) {
    std::fs::create_dir_all(layout.join("blobs").join("sha256")).unwrap();
    std::fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    if !layout.join("index.json").exists() {
        write_index_json(layout, Vec::new());
    }
}

fn write_index_json(layout: &Path, manifests: Vec<Value>) {
    let v = json!({ "schemaVersion": 2, "mediaType": MT_INDEX, "manifests": manifests });
    std::fs::write(
        layout.join("index.json"),
        serde_json::to_vec_pretty(&v).unwrap(),
    )
    .unwrap();
}

/// Adds `desc` under `tag` to `index.json`, replacing an entry with the same tag.
fn add_to_index_json(layout: &Path, desc: &Descriptor, tag: &str) {
    let bytes = std::fs::read(layout.join("index.json")).unwrap();
    let v: Value = serde_json::from_slice(&bytes).unwrap();
    let mut manifests: Vec<Value> = v["manifests"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|m| m["annotations"][ANNOTATION_REF_NAME].as_str() != Some(tag))
        .collect();
    let mut entry = desc.to_json();
    entry["annotations"] = json!({ (ANNOTATION_REF_NAME): tag });
    manifests.push(entry);
    write_index_json(layout, manifests);
}

fn write_blob(layout: &Path, media_type: &str, bytes: &[u8]) -> Descriptor {
    let digest = sha256_digest(bytes);
    let path = blob_path(layout, &digest);
    if !path.exists() {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, bytes).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
    }
    Descriptor {
        media_type: media_type.to_string(),
        digest,
        size: bytes.len() as u64,
    }
}

/// An uncompressed layer tar and its `created_by` history text.
struct Layer {
    tar: Vec<u8>,
    created_by: String,
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(MTIME);
    h.set_uid(0);
    h.set_gid(0);
    h
}

fn busybox_layer() -> Layer {
    let busybox = std::fs::read(BUSYBOX).unwrap_or_else(|e| {
        panic!("cannot read {BUSYBOX} ({e}): install Debian's busybox-static (apt-get install -y busybox-static)")
    });
    let mut b = tar::Builder::new(Vec::new());
    for (dir, mode) in [
        ("bin/", 0o755),
        ("dev/", 0o755),
        ("etc/", 0o755),
        ("proc/", 0o555),
        ("sys/", 0o555),
        ("tmp/", 0o1777),
    ] {
        let mut h = header(tar::EntryType::Directory, mode, 0);
        b.append_data(&mut h, dir, std::io::empty()).unwrap();
    }
    let mut h = header(tar::EntryType::Regular, 0o755, busybox.len() as u64);
    b.append_data(&mut h, "bin/busybox", &busybox[..]).unwrap();
    for link in ["sh", "echo"] {
        let mut h = header(tar::EntryType::Symlink, 0o777, 0);
        b.append_link(&mut h, format!("bin/{link}"), "busybox")
            .unwrap();
    }
    Layer {
        tar: b.into_inner().unwrap(),
        created_by: "berth test: busybox-static with sh, echo".into(),
    }
}

fn random_layer(name: &str, size: usize) -> Layer {
    let mut data = vec![0u8; size];
    rand::thread_rng().fill_bytes(&mut data);
    let mut b = tar::Builder::new(Vec::new());
    let mut h = header(tar::EntryType::Directory, 0o755, 0);
    b.append_data(&mut h, "data/", std::io::empty()).unwrap();
    let mut h = header(tar::EntryType::Regular, 0o644, size as u64);
    b.append_data(&mut h, format!("data/{name}.bin"), &data[..])
        .unwrap();
    Layer {
        tar: b.into_inner().unwrap(),
        created_by: format!("berth test: {size} random bytes in /data/{name}.bin"),
    }
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = GzEncoder::new(
        Vec::with_capacity(bytes.len() / 2 + 1024),
        Compression::fast(),
    );
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

/// Writes the layers, config and manifest of one image into the layout's blobs.
fn write_image(
    layout: &Path,
    architecture: &str,
    busybox: &Layer,
    random_layer_size: usize,
) -> BuiltImage {
    let randoms = [
        random_layer(&format!("random-{architecture}-1"), random_layer_size),
        random_layer(&format!("random-{architecture}-2"), random_layer_size),
    ];
    let all: Vec<&Layer> = std::iter::once(busybox).chain(randoms.iter()).collect();
    let mut layers = Vec::new();
    let mut diff_ids = Vec::new();
    for layer in &all {
        diff_ids.push(sha256_digest(&layer.tar));
        layers.push(write_blob(layout, MT_LAYER_GZIP, &gzip(&layer.tar)));
    }
    let mut config = json!({
        "created": CREATED,
        "architecture": architecture,
        "os": "linux",
        "config": {
            "Env": ["PATH=/bin"],
            "Cmd": ["/bin/sh", "-c", format!("echo {MARKER}")],
            "WorkingDir": "/",
        },
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
        "history": all.iter().map(|l| json!({ "created": CREATED, "created_by": l.created_by })).collect::<Vec<_>>(),
    });
    if architecture == "arm64" {
        config["variant"] = json!("v8");
    }
    let config_bytes = serde_json::to_vec(&config).unwrap();
    let config_desc = write_blob(layout, MT_CONFIG, &config_bytes);
    let manifest_bytes = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MT_MANIFEST,
        "config": config_desc.to_json(),
        "layers": layers.iter().map(Descriptor::to_json).collect::<Vec<_>>(),
    }))
    .unwrap();
    let manifest = write_blob(layout, MT_MANIFEST, &manifest_bytes);
    BuiltImage {
        manifest,
        manifest_bytes,
        config: config_desc,
        config_bytes,
        layers,
        diff_ids,
        architecture: architecture.to_string(),
    }
}
