//! Manifest media types and the parts of a manifest the registry needs (blobs, children, subject).
//!
//! Manifests are stored byte-for-byte; this module only reads them. berth parses with its own
//! lenient descriptor types rather than `oci-spec`'s: it must accept Docker schema 2 and manifest
//! lists, unknown fields and artifact manifests exactly as clients send them, and needs only the
//! descriptors, never a rebuilt document.

use serde::{Deserialize, Serialize};

use super::digest::Digest;

/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker image manifest v2 schema 2.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list.
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker schema 1 (signed): refused.
pub const DOCKER_SCHEMA1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";
/// Docker schema 1 (unsigned): refused.
pub const DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+json";
/// Docker foreign (non-distributable) layer: not required to be in the repository.
const DOCKER_FOREIGN_LAYER: &str = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip";
/// OCI non-distributable layer prefix.
const OCI_NONDISTRIBUTABLE: &str = "application/vnd.oci.image.layer.nondistributable";

/// Whether a media type is one berth stores as a manifest.
pub fn is_manifest_media_type(media_type: &str) -> bool {
    matches!(
        media_type,
        OCI_MANIFEST | OCI_INDEX | DOCKER_MANIFEST | DOCKER_MANIFEST_LIST
    )
}

/// Whether a media type is an index (its children are manifests).
pub fn is_index_media_type(media_type: &str) -> bool {
    matches!(media_type, OCI_INDEX | DOCKER_MANIFEST_LIST)
}

/// A content descriptor as it appears in manifests and in the referrers response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Media type of the referenced content.
    pub media_type: String,
    /// Digest of the content.
    pub digest: Digest,
    /// Size in bytes.
    pub size: u64,
    /// Artifact type (artifacts and referrers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    /// Annotations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<serde_json::Map<String, serde_json::Value>>,
    /// Platform (index entries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<serde_json::Value>,
    /// External URLs (non-distributable layers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub urls: Option<Vec<String>>,
}

/// The loose shape shared by manifests and indexes.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawManifest {
    schema_version: Option<i64>,
    media_type: Option<String>,
    artifact_type: Option<String>,
    config: Option<Descriptor>,
    layers: Option<Vec<Descriptor>>,
    manifests: Option<Vec<Descriptor>>,
    subject: Option<Descriptor>,
    annotations: Option<serde_json::Map<String, serde_json::Value>>,
}

/// What the registry reads from a manifest.
#[derive(Debug, Clone)]
pub struct ParsedManifest {
    /// Effective media type (from the body, or the Content-Type when the body has none).
    pub media_type: String,
    /// `artifactType`, or for an image manifest without one, its config media type.
    pub artifact_type: Option<String>,
    /// Blobs the repository must hold (config and distributable layers).
    pub blobs: Vec<Digest>,
    /// Manifests the repository must hold (index children).
    pub children: Vec<Descriptor>,
    /// The manifest this one refers to (referrers API).
    pub subject: Option<Descriptor>,
    /// Top-level annotations (carried into the referrers response).
    pub annotations: Option<serde_json::Map<String, serde_json::Value>>,
}

impl ParsedManifest {
    /// The descriptor of this manifest (`digest`, `size` bytes) as the referrers response lists
    /// it under its subject.
    pub fn descriptor(&self, digest: &Digest, size: u64) -> Descriptor {
        Descriptor {
            media_type: self.media_type.clone(),
            digest: digest.clone(),
            size,
            artifact_type: self.artifact_type.clone(),
            annotations: self.annotations.clone(),
            platform: None,
            urls: None,
        }
    }
}

/// Why a manifest was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// Body is not the JSON of a manifest.
    #[error("manifest is not valid JSON: {0}")]
    Json(String),
    /// `schemaVersion` missing or not 2.
    #[error("manifest schemaVersion must be 2")]
    SchemaVersion,
    /// No usable media type, or one berth does not store.
    #[error("unsupported manifest media type {0:?}")]
    MediaType(String),
    /// Content-Type and body disagree.
    #[error("Content-Type {header:?} does not match the manifest's mediaType {body:?}")]
    MediaTypeMismatch {
        /// The request's `Content-Type`.
        header: String,
        /// The body's `mediaType`.
        body: String,
    },
    /// Fields that do not belong to the media type.
    #[error("manifest of type {0} is missing {1}")]
    Shape(String, &'static str),
}

/// Parses manifest bytes; `content_type` is the request's Content-Type (without parameters).
pub fn parse(bytes: &[u8], content_type: Option<&str>) -> Result<ParsedManifest, ManifestError> {
    let raw: RawManifest =
        serde_json::from_slice(bytes).map_err(|e| ManifestError::Json(e.to_string()))?;
    if raw.schema_version != Some(2) {
        return Err(ManifestError::SchemaVersion);
    }
    let media_type = match (&raw.media_type, content_type) {
        (Some(body), Some(header)) if body != header => {
            return Err(ManifestError::MediaTypeMismatch {
                header: header.to_string(),
                body: body.clone(),
            })
        }
        (Some(body), _) => body.clone(),
        (None, Some(header)) => header.to_string(),
        // OCI allows an absent mediaType; infer it from the shape.
        (None, None) if raw.manifests.is_some() => OCI_INDEX.to_string(),
        (None, None) => OCI_MANIFEST.to_string(),
    };
    if !is_manifest_media_type(&media_type) {
        return Err(ManifestError::MediaType(media_type));
    }
    let mut parsed = ParsedManifest {
        media_type,
        artifact_type: raw.artifact_type,
        blobs: Vec::new(),
        children: Vec::new(),
        subject: raw.subject,
        annotations: raw.annotations,
    };
    if is_index_media_type(&parsed.media_type) {
        parsed.children = raw
            .manifests
            .ok_or_else(|| ManifestError::Shape(parsed.media_type.clone(), "manifests"))?;
    } else {
        let config = raw
            .config
            .ok_or_else(|| ManifestError::Shape(parsed.media_type.clone(), "config"))?;
        let layers = raw
            .layers
            .ok_or_else(|| ManifestError::Shape(parsed.media_type.clone(), "layers"))?;
        if parsed.artifact_type.is_none() {
            parsed.artifact_type = Some(config.media_type.clone());
        }
        parsed.blobs.push(config.digest);
        parsed.blobs.extend(
            layers
                .into_iter()
                .filter(|l| is_distributable(&l.media_type))
                .map(|l| l.digest),
        );
    }
    Ok(parsed)
}

fn is_distributable(media_type: &str) -> bool {
    media_type != DOCKER_FOREIGN_LAYER && !media_type.starts_with(OCI_NONDISTRIBUTABLE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    #[test]
    fn image_manifest_lists_config_and_layers() {
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}",
            "config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":2}},
            "layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{}","size":3}},
                      {{"mediaType":"{DOCKER_FOREIGN_LAYER}","digest":"{}","size":3}}],
            "subject":{{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":9}}}}"#,
            d('a'),
            d('b'),
            d('c'),
            d('e')
        );
        let p = parse(body.as_bytes(), Some(OCI_MANIFEST)).unwrap();
        assert_eq!(p.blobs.len(), 2);
        assert_eq!(
            p.artifact_type.as_deref(),
            Some("application/vnd.oci.image.config.v1+json")
        );
        assert_eq!(p.subject.unwrap().digest.as_str(), d('e'));
    }

    #[test]
    fn index_and_errors() {
        let body = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":1}}]}}"#,
            d('a')
        );
        let p = parse(body.as_bytes(), Some(OCI_INDEX)).unwrap();
        assert_eq!(p.children.len(), 1);
        assert!(matches!(
            parse(body.as_bytes(), Some(OCI_MANIFEST)),
            Err(ManifestError::Shape(..))
        ));
        assert!(matches!(parse(b"{", None), Err(ManifestError::Json(_))));
        assert!(matches!(
            parse(br#"{"schemaVersion":1}"#, None),
            Err(ManifestError::SchemaVersion)
        ));
        assert!(matches!(
            parse(br#"{"schemaVersion":2,"mediaType":"text/plain"}"#, None),
            Err(ManifestError::MediaType(_))
        ));
        assert!(matches!(
            parse(
                format!(r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[]}}"#)
                    .as_bytes(),
                Some(DOCKER_MANIFEST)
            ),
            Err(ManifestError::MediaTypeMismatch { .. })
        ));
    }
}
