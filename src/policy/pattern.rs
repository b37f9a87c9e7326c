//! Name patterns of policies and filters (DESIGN.md 9): doublestar globs. `*` is any run without
//! `/`, `**` any run including `/` (as a whole path component), `?` one character but `/`,
//! `{a,b}` alternatives, `[...]` classes; the empty pattern matches everything.

/// A compiled pattern.
#[derive(Debug, Clone)]
pub struct Pattern {
    text: String,
    matcher: Option<globset::GlobMatcher>,
}

/// A pattern that does not compile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid pattern {pattern:?}: {why}")]
pub struct PatternError {
    /// The pattern as given.
    pub pattern: String,
    /// What is wrong with it.
    pub why: String,
}

impl Pattern {
    /// Compiles `text` (empty: everything).
    pub fn new(text: &str) -> Result<Pattern, PatternError> {
        let matcher = if text.is_empty() {
            None
        } else {
            Some(
                globset::GlobBuilder::new(text)
                    .literal_separator(true)
                    .build()
                    .map_err(|e| PatternError {
                        pattern: text.to_string(),
                        why: e.kind().to_string(),
                    })?
                    .compile_matcher(),
            )
        };
        Ok(Pattern {
            text: text.to_string(),
            matcher,
        })
    }

    /// Whether `name` matches.
    pub fn matches(&self, name: &str) -> bool {
        self.matcher.as_ref().is_none_or(|m| m.is_match(name))
    }

    /// The pattern as given.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Pattern) -> bool {
        self.text == other.text
    }
}

impl Eq for Pattern {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_grammar_of_design_9() {
        // (pattern, name, matches)
        let table = [
            ("library/*", "library/hello-world", true),
            ("library/*", "library/my/hello-world", false),
            ("library/**", "library/hello-world", true),
            ("library/**", "library/my/hello-world", true),
            ("**", "a/b/c", true),
            ("**/app", "team/x/app", true),
            ("1.?", "1.0", true),
            ("1.?", "1.01", false),
            ("a?c", "a/c", false),
            ("{v1,v2}", "v1", true),
            ("{v1,v2}", "v2", true),
            ("{v1,v2}", "v3", false),
            ("v[0-9]", "v7", true),
            ("v[0-9]", "vx", false),
            ("*", "", true),
            ("", "", true),
            ("", "anything/at/all", true),
            ("latest", "latest", true),
            ("latest", "latest2", false),
            ("*-rc*", "1.2-rc1", true),
            ("*", "a/b", false),
        ];
        for (pattern, name, expected) in table {
            let p = Pattern::new(pattern).unwrap();
            assert_eq!(p.matches(name), expected, "{pattern:?} on {name:?}");
        }
    }

    #[test]
    fn a_broken_pattern_is_refused_with_its_reason() {
        let e = Pattern::new("{a,b").unwrap_err();
        assert_eq!(e.pattern, "{a,b");
        assert!(e.to_string().contains("invalid pattern"), "{e}");
    }
}
