//! Repository names, tags and references: the distribution-spec grammar and berth's limits.

use std::fmt;

use super::digest::{Digest, DigestError};

/// Longest repository name, registry included (DESIGN.md 1).
pub const MAX_NAME_LEN: usize = 255;
/// Longest tag.
pub const MAX_TAG_LEN: usize = 128;

/// Why a name or reference was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    /// Name breaks the grammar.
    #[error("invalid repository name {name:?}: {why}")]
    Name {
        /// The name.
        name: String,
        /// The rule it breaks.
        why: &'static str,
    },
    /// Tag breaks the grammar.
    #[error("invalid tag {0:?}: tags are [A-Za-z0-9_][A-Za-z0-9._-]{{0,127}}")]
    Tag(String),
    /// Digest reference is malformed.
    #[error(transparent)]
    Digest(#[from] DigestError),
}

/// A repository: `REGISTRY/IMAGE` where IMAGE may contain slashes.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoName {
    text: Box<str>,
    registry_len: usize,
}

impl RepoName {
    /// Parses and validates a full repository name.
    pub fn parse(name: &str) -> Result<RepoName, ReferenceError> {
        let bad = |why| ReferenceError::Name {
            name: name.to_string(),
            why,
        };
        if name.len() > MAX_NAME_LEN {
            return Err(bad("longer than 255 characters"));
        }
        let mut components = 0;
        for component in name.split('/') {
            validate_component(component).map_err(bad)?;
            components += 1;
        }
        if components < 2 {
            return Err(bad("expected REGISTRY/IMAGE"));
        }
        let registry_len = name.find('/').unwrap_or(name.len());
        Ok(RepoName {
            text: name.into(),
            registry_len,
        })
    }

    /// The registry (first component).
    pub fn registry(&self) -> &str {
        &self.text[..self.registry_len]
    }

    /// The image inside the registry.
    pub fn image(&self) -> &str {
        &self.text[self.registry_len + 1..]
    }

    /// Whole name.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RepoName({})", self.text)
    }
}

/// Validates one path component: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
fn validate_component(c: &str) -> Result<(), &'static str> {
    let b = c.as_bytes();
    if b.is_empty() {
        return Err("empty path component");
    }
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return Err("components start and end with a lowercase letter or digit");
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &b[start..i];
        let ok = sep == b"." || sep == b"_" || sep == b"__" || sep.iter().all(|&x| x == b'-');
        if !ok {
            return Err(
                "only lowercase letters, digits and single separators . _ __ - are allowed",
            );
        }
    }
    Ok(())
}

/// Validates a registry name (one name component).
pub fn validate_registry_name(name: &str) -> Result<(), ReferenceError> {
    validate_component(name).map_err(|why| ReferenceError::Name {
        name: name.to_string(),
        why,
    })?;
    if name.len() > MAX_NAME_LEN {
        return Err(ReferenceError::Name {
            name: name.to_string(),
            why: "longer than 255 characters",
        });
    }
    Ok(())
}

/// Suffixes of the tags cosign gives what it attaches to `sha256-HEX`.
pub const COSIGN_SUFFIXES: [&str; 3] = [".sig", ".att", ".sbom"];

/// The artifact a cosign tag (`sha256-HEX.sig`, `.att`, `.sbom`) belongs to.
pub fn cosign_subject(tag: &str) -> Option<crate::oci::digest::Digest> {
    let hex = tag.strip_prefix("sha256-")?;
    let hex = COSIGN_SUFFIXES.iter().find_map(|s| hex.strip_suffix(s))?;
    crate::oci::digest::Digest::parse(&format!("sha256:{hex}")).ok()
}

/// Validates a tag: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
pub fn validate_tag(tag: &str) -> Result<(), ReferenceError> {
    let b = tag.as_bytes();
    let first_ok = b
        .first()
        .is_some_and(|&x| x.is_ascii_alphanumeric() || x == b'_');
    let rest_ok = b[1.min(b.len())..]
        .iter()
        .all(|&x| x.is_ascii_alphanumeric() || b"._-".contains(&x));
    if first_ok && rest_ok && b.len() <= MAX_TAG_LEN {
        Ok(())
    } else {
        Err(ReferenceError::Tag(tag.to_string()))
    }
}

/// The `<reference>` of a manifest URL: a tag or a digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Reference {
    /// A tag name.
    Tag(Box<str>),
    /// A content digest.
    Digest(Digest),
}

impl Reference {
    /// Parses a tag or (if it contains `:`) a digest.
    pub fn parse(s: &str) -> Result<Reference, ReferenceError> {
        if s.contains(':') {
            Ok(Reference::Digest(Digest::parse(s)?))
        } else {
            validate_tag(s)?;
            Ok(Reference::Tag(s.into()))
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => f.write_str(t),
            Reference::Digest(d) => f.write_str(d.as_str()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let n = RepoName::parse("library/team/app-1.2_x__y").unwrap();
        assert_eq!(n.registry(), "library");
        assert_eq!(n.image(), "team/app-1.2_x__y");
        for bad in [
            "library",
            "Library/a",
            "a//b",
            "a/b/",
            "/a/b",
            "a/../b",
            "a/./b",
            "a/b%2e",
            "a/b..c",
            "a/-b",
            "a/b_",
            "a/b___c",
            "a/b.-c",
        ] {
            assert!(RepoName::parse(bad).is_err(), "{bad} accepted");
        }
        assert!(RepoName::parse("a/b--c").is_ok());
        let long = format!("r/{}", "a".repeat(254));
        assert!(RepoName::parse(&long).is_err());
        assert!(RepoName::parse(&long[..255]).is_ok());
    }

    #[test]
    fn tags_and_references() {
        assert!(validate_tag("v1.0_rc-1").is_ok());
        assert!(validate_tag("_x").is_ok());
        assert!(validate_tag(".x").is_err());
        assert!(validate_tag("").is_err());
        assert!(validate_tag(&"a".repeat(128)).is_ok());
        assert!(validate_tag(&"a".repeat(129)).is_err());
        assert!(matches!(Reference::parse("latest"), Ok(Reference::Tag(_))));
        assert!(matches!(
            Reference::parse("sha256:zz"),
            Err(ReferenceError::Digest(_))
        ));
    }
}
