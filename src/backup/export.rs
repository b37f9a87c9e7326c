//! The lines of a backup, read through the metadata seam in pages while the server runs. A
//! cursor names where the next page starts, so no state is kept between pages and a client
//! that goes away leaves nothing behind.

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::{Line, Page, FORMAT};
use crate::oci::digest::Digest;
use crate::store::meta::{now_ms, MetaResult, MetaStore};

/// Where the next page starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "at", rename_all = "snake_case")]
enum Cursor {
    /// The header, registries and image caches.
    Start,
    /// The typed records of `tree` whose key sorts after `after`.
    Records { tree: String, after: Option<String> },
    /// One part of a repository, after `after`.
    Repo {
        repo: String,
        part: Part,
        after: Option<String>,
    },
    /// The end line.
    End,
}

/// A repository's records, in the order they are read: referring ones first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Part {
    Tags,
    Artifacts,
    Blobs,
}

impl Cursor {
    fn encode(&self) -> String {
        let json = serde_json::to_vec(self).expect("cursors serialize");
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
    }

    fn decode(text: &str) -> Option<Cursor> {
        let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(text)
            .ok()?;
        serde_json::from_slice(&json).ok()
    }
}

/// A cursor that is not one of ours.
#[derive(Debug, thiserror::Error)]
#[error("not a backup cursor: {0:?} (pass the `next` of the previous page, or none)")]
pub struct BadCursor(pub String);

/// The page of about `limit` lines starting at `cursor` (`None`: the first; its registries and
/// image caches come whole).
pub async fn page(
    meta: &dyn MetaStore,
    cursor: Option<&str>,
    limit: usize,
) -> Result<MetaResult<Page>, BadCursor> {
    let start = match cursor {
        None => Cursor::Start,
        Some(text) => Cursor::decode(text).ok_or_else(|| BadCursor(text.to_string()))?,
    };
    Ok(walk(meta, start, limit.max(1)).await)
}

async fn walk(meta: &dyn MetaStore, mut at: Cursor, limit: usize) -> MetaResult<Page> {
    let mut lines = Vec::new();
    while lines.len() < limit {
        let room = limit - lines.len();
        at = match at {
            Cursor::Start => {
                lines.push(Line::Header {
                    format: FORMAT,
                    berth: crate::metrics::VERSION.to_string(),
                    created_ms: now_ms(),
                });
                for record in meta.registries().await? {
                    lines.push(Line::Registry { record });
                }
                for record in meta.image_caches().await? {
                    let credentials = meta.credentials(&record.name).await?;
                    lines.push(Line::ImageCache {
                        record,
                        credentials,
                    });
                }
                next_tree(meta, None).await?
            }
            Cursor::Records { tree, after } => {
                let page = meta.record_list(&tree, "", after.as_deref(), room).await?;
                let done = page.len() < room;
                let last = page.last().map(|(k, _)| k.clone());
                for (key, bytes) in page {
                    let value = serde_json::from_slice(&bytes).map_err(|e| {
                        crate::store::meta::MetaError::Corrupt(format!(
                            "record {key:?} of {tree} is not JSON: {e}"
                        ))
                    })?;
                    lines.push(Line::Record {
                        tree: tree.clone(),
                        key,
                        value,
                    });
                }
                if done {
                    next_tree(meta, Some(&tree)).await?
                } else {
                    Cursor::Records { tree, after: last }
                }
            }
            Cursor::Repo { repo, part, after } => {
                let (last, done) = match part {
                    Part::Tags => {
                        let tags = meta.tags(&repo, after.as_deref(), room).await?;
                        for tag in &tags {
                            // A tag removed since the listing is simply not copied.
                            if let Some(digest) = meta.tag(&repo, tag).await? {
                                lines.push(Line::Tag {
                                    repo: repo.clone(),
                                    tag: tag.clone(),
                                    digest,
                                });
                            }
                        }
                        (tags.last().cloned(), tags.len() < room)
                    }
                    Part::Artifacts => {
                        let after = parse_after(after.as_deref())?;
                        let page = meta.artifacts(&repo, after.as_ref(), room).await?;
                        let last = page.last().map(|(d, _)| d.to_string());
                        let done = page.len() < room;
                        for (digest, record) in page {
                            let last_pull_ms = meta.last_pull(&repo, &digest).await?;
                            lines.push(Line::Artifact {
                                repo: repo.clone(),
                                digest,
                                record,
                                last_pull_ms,
                            });
                        }
                        (last, done)
                    }
                    Part::Blobs => {
                        let after = parse_after(after.as_deref())?;
                        let page = meta.linked_blobs(&repo, after.as_ref(), room).await?;
                        for digest in &page {
                            if let Some(size) = meta.blob_link(&repo, digest).await? {
                                lines.push(Line::Blob {
                                    repo: repo.clone(),
                                    digest: digest.clone(),
                                    size,
                                });
                            }
                        }
                        (page.last().map(|d| d.to_string()), page.len() < room)
                    }
                };
                match (done, part) {
                    (false, part) => Cursor::Repo {
                        repo,
                        part,
                        after: last,
                    },
                    (true, Part::Tags) => Cursor::Repo {
                        repo,
                        part: Part::Artifacts,
                        after: None,
                    },
                    (true, Part::Artifacts) => Cursor::Repo {
                        repo,
                        part: Part::Blobs,
                        after: None,
                    },
                    (true, Part::Blobs) => next_repo(meta, Some(&repo)).await?,
                }
            }
            Cursor::End => {
                lines.push(Line::End {});
                return Ok(Page { lines, next: None });
            }
        };
    }
    Ok(Page {
        lines,
        next: Some(at.encode()),
    })
}

fn parse_after(after: Option<&str>) -> MetaResult<Option<Digest>> {
    after
        .map(|a| {
            Digest::parse(a).map_err(|e| {
                crate::store::meta::MetaError::Corrupt(format!("backup cursor digest {a:?}: {e}"))
            })
        })
        .transpose()
}

/// The record tree after `tree` (the first for `None`), else the first repository.
async fn next_tree(meta: &dyn MetaStore, tree: Option<&str>) -> MetaResult<Cursor> {
    let trees = meta.record_trees().await?;
    match trees
        .into_iter()
        .find(|t| tree.is_none_or(|after| t.as_str() > after))
    {
        Some(tree) => Ok(Cursor::Records { tree, after: None }),
        None => next_repo(meta, None).await,
    }
}

/// The repository after `repo` (the first for `None`), else the end.
async fn next_repo(meta: &dyn MetaStore, repo: Option<&str>) -> MetaResult<Cursor> {
    Ok(match meta.repositories(None, repo, 1).await?.pop() {
        Some(repo) => Cursor::Repo {
            repo,
            part: Part::Tags,
            after: None,
        },
        None => Cursor::End,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_strangers_are_refused() {
        let c = Cursor::Repo {
            repo: "lib/app".into(),
            part: Part::Artifacts,
            after: Some("sha256:00".into()),
        };
        assert_eq!(Cursor::decode(&c.encode()), Some(c));
        assert_eq!(Cursor::decode("not base64 at all!"), None);
        assert_eq!(Cursor::decode("e30"), None, "{{}} is no cursor");
    }
}
