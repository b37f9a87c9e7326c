//! `berth cache prefetch`: warms a cache registry ahead of time by pulling images through a
//! running berth (all platforms of an index, or one), so an edge site can be filled before its
//! network turns private-only.

use std::time::Duration;

use futures_util::StreamExt;
use serde::Deserialize;

const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

/// A platform filter `os/arch[/variant]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    os: String,
    arch: String,
    variant: Option<String>,
}

impl std::str::FromStr for Platform {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split('/').collect();
        match parts.as_slice() {
            [os, arch] => Ok(Platform {
                os: os.to_string(),
                arch: arch.to_string(),
                variant: None,
            }),
            [os, arch, v] => Ok(Platform {
                os: os.to_string(),
                arch: arch.to_string(),
                variant: Some(v.to_string()),
            }),
            _ => Err(format!("platform {s:?} is not os/arch[/variant]")),
        }
    }
}

/// The platform of an index entry (fields a manifest leaves out, or sends as something other
/// than text, match no filter).
#[derive(Debug, Default, Deserialize)]
struct PlatformSpec {
    #[serde(default, deserialize_with = "text_or_none")]
    os: Option<String>,
    #[serde(default, deserialize_with = "text_or_none")]
    architecture: Option<String>,
    #[serde(default, deserialize_with = "text_or_none")]
    variant: Option<String>,
}

fn text_or_none<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum TextOrOther {
        Text(String),
        Other(serde::de::IgnoredAny),
    }
    Ok(match TextOrOther::deserialize(d)? {
        TextOrOther::Text(t) => Some(t),
        TextOrOther::Other(_) => None,
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    digest: String,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    platform: Option<PlatformSpec>,
}

#[derive(Deserialize)]
struct Manifest {
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

impl Platform {
    fn matches(&self, p: &Option<PlatformSpec>) -> bool {
        let Some(p) = p else { return false };
        p.os.as_deref() == Some(self.os.as_str())
            && p.architecture.as_deref() == Some(self.arch.as_str())
            && (self.variant.is_none() || p.variant == self.variant)
    }
}

/// What one prefetch did.
#[derive(Debug, Default, serde::Serialize)]
pub struct Report {
    /// Digest of the reference's manifest (or index), as the server named it.
    pub digest: String,
    /// Manifests fetched (indexes included).
    pub manifests: usize,
    /// Blobs fetched.
    pub blobs: usize,
    /// Blob bytes.
    pub bytes: u64,
}

/// One line of `berth cache prefetch --json`: a reference and what its prefetch did, or why
/// it failed.
#[derive(Debug, serde::Serialize)]
pub struct ReportLine<'a> {
    /// Blobs fetched.
    pub blobs: usize,
    /// Blob bytes.
    pub bytes: u64,
    /// Digest of the reference's manifest (absent when it could not be read).
    #[serde(skip_serializing_if = "str::is_empty")]
    pub digest: &'a str,
    /// Why it failed (absent when it did not).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'a str>,
    /// Manifests fetched (indexes included).
    pub manifests: usize,
    /// The reference as given.
    pub reference: &'a str,
    /// Seconds it took.
    pub seconds: f64,
}

impl<'a> ReportLine<'a> {
    /// The line of `reference`'s prefetch, done or failed, after `seconds`.
    pub fn of(
        reference: &'a str,
        result: &'a Result<Report, String>,
        seconds: f64,
    ) -> ReportLine<'a> {
        let empty = Report::default();
        let (report, error) = match result {
            Ok(r) => (r, None),
            Err(e) => (&empty, Some(e.as_str())),
        };
        ReportLine {
            blobs: report.blobs,
            bytes: report.bytes,
            digest: match result {
                Ok(r) => r.digest.as_str(),
                Err(_) => "",
            },
            error,
            manifests: report.manifests,
            reference,
            seconds: (seconds * 1000.0).round() / 1000.0,
        }
    }
}

/// Splits `REPO:TAG` or `REPO@DIGEST`.
pub fn split_reference(r: &str) -> Result<(&str, &str), String> {
    if let Some((repo, digest)) = r.split_once('@') {
        return Ok((repo, digest));
    }
    match r.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') => Ok((repo, tag)),
        _ => Ok((r, "latest")),
    }
}

async fn get_manifest(
    client: &reqwest::Client,
    base: &str,
    repo: &str,
    reference: &str,
) -> Result<(Manifest, String), String> {
    let url = format!("{base}/v2/{repo}/manifests/{reference}");
    let r = client
        .get(&url)
        .header("accept", ACCEPT)
        .send()
        .await
        .map_err(|e| format!("{url}: {}", super::remote::cause_chain(&e)))?;
    if !r.status().is_success() {
        return Err(format!(
            "{url}: {} {}",
            r.status(),
            r.text().await.unwrap_or_default()
        ));
    }
    let digest = r
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let manifest = r
        .json()
        .await
        .map_err(|e| format!("{url}: not a manifest: {e}"))?;
    Ok((manifest, digest))
}

/// Pulls every manifest and blob of `reference` (`CACHEREG/PATH:TAG`) through `base`.
pub async fn prefetch(
    base: &str,
    reference: &str,
    platform: Option<&Platform>,
    progress: &indicatif::ProgressBar,
) -> Result<Report, String> {
    let base = base.trim_end_matches('/');
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(3600))
        .build()
        .map_err(|e| e.to_string())?;
    let (repo, top) = split_reference(reference)?;
    let mut report = Report::default();
    let (root, digest) = get_manifest(&client, base, repo, top).await?;
    report.digest = digest;
    report.manifests += 1;
    let images = match root.manifests {
        Some(children) => {
            let mut images = Vec::new();
            for child in children
                .iter()
                .filter(|c| platform.is_none_or(|p| p.matches(&c.platform)))
            {
                images.push(get_manifest(&client, base, repo, &child.digest).await?.0);
                report.manifests += 1;
            }
            if images.is_empty() {
                return Err(format!(
                    "{reference}: no manifest for platform {platform:?}"
                ));
            }
            images
        }
        None => vec![root],
    };
    let blobs: Vec<&Descriptor> = images
        .iter()
        .flat_map(|m| m.config.iter().chain(m.layers.iter()))
        .collect();
    progress.inc_length(blobs.iter().map(|b| b.size).sum());
    for blob in blobs {
        let url = format!("{base}/v2/{repo}/blobs/{}", blob.digest);
        let r = client
            .get(&url)
            .send()
            .await
            .map_err(|e| format!("{url}: {}", super::remote::cause_chain(&e)))?;
        if !r.status().is_success() {
            return Err(format!("{url}: {}", r.status()));
        }
        let mut stream = r.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let n = chunk.map_err(|e| format!("{url}: {e}"))?.len() as u64;
            report.bytes += n;
            progress.inc(n);
        }
        report.blobs += 1;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_and_platforms() {
        assert_eq!(
            split_reference("hub/library/nginx:1.27").unwrap(),
            ("hub/library/nginx", "1.27")
        );
        assert_eq!(
            split_reference("hub/nginx").unwrap(),
            ("hub/nginx", "latest")
        );
        assert_eq!(
            split_reference("hub/a@sha256:x").unwrap(),
            ("hub/a", "sha256:x")
        );
        let p: Platform = "linux/arm64/v8".parse().unwrap();
        let spec = |text: &str| Some(serde_json::from_str::<PlatformSpec>(text).unwrap());
        assert!(p.matches(&spec(
            r#"{"os":"linux","architecture":"arm64","variant":"v8"}"#
        )));
        assert!(!p.matches(&spec(r#"{"os":"linux","architecture":"amd64"}"#)));
        assert!(!p.matches(&spec(r#"{"os":7,"architecture":"arm64","variant":"v8"}"#)));
        assert!(!p.matches(&None));
        assert!("linux".parse::<Platform>().is_err());
    }
}
