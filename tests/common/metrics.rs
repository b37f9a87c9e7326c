//! Reading values out of a `/metrics` page (Prometheus text format).
//!
//! Every server in one test binary shares one process-wide recorder, so a test must never
//! conclude anything from a metric's *name* being present: another test may have caused it.
//! Read the value before and after the action instead, and assert the difference.

/// The labels of one sample line, `name{a="x",b="y"} 3` → `[("a","x"),("b","y")]`, with the
/// value escapes of the text format (`\\`, `\"`, `\n`) undone. `None` when malformed.
fn parse_labels(s: &str) -> Option<Vec<(String, String)>> {
    let mut labels = Vec::new();
    let mut rest = s;
    loop {
        rest = rest.trim_start_matches([',', ' ']);
        if rest.is_empty() {
            return Some(labels);
        }
        let (key, after) = rest.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        labels.push((key.trim().to_string(), value));
        rest = &after[end + 1..];
    }
}

/// The sum of the samples of `name` whose labels include every `(label, value)` of `labels`
/// (an empty slice: every series of `name`); `None` when there is no such sample.
pub fn metric_sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (series_labels, value) = if let Some(inner) = rest.strip_prefix('{') {
            let Some((inner, value)) = inner.rsplit_once('}') else {
                continue;
            };
            let Some(l) = parse_labels(inner) else {
                continue;
            };
            (l, value)
        } else if rest.starts_with(' ') {
            (Vec::new(), rest)
        } else {
            // Another metric whose name starts with `name` (`name_bucket`, `name_sum`, ...).
            continue;
        };
        let wanted = labels
            .iter()
            .all(|(k, v)| series_labels.iter().any(|(sk, sv)| sk == k && sv == v));
        if !wanted {
            continue;
        }
        let Some(v) = value
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        else {
            panic!("unparsable sample in /metrics: {line}");
        };
        *found.get_or_insert(0.0) += v;
    }
    found
}

/// Like [`metric_sample`], 0 when absent (a counter that was never incremented).
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric_sample(text, name, labels).unwrap_or(0.0)
}

#[test]
fn metric_value_reads_labelled_and_plain_samples() {
    let text = "# HELP a_total x\n# TYPE a_total counter\na_total 3\n\
                a_total_extra 100\n\
                b_total{registry=\"hub\",outcome=\"hit\"} 2\n\
                b_total{registry=\"hub\",outcome=\"miss\"} 5\n\
                b_total{registry=\"h\\\"x\",outcome=\"hit\"} 7\n\
                h_seconds_bucket{le=\"0.5\"} 9\n";
    assert_eq!(metric_value(text, "a_total", &[]), 3.0);
    assert_eq!(metric_value(text, "b_total", &[("outcome", "hit")]), 9.0);
    assert_eq!(
        metric_value(text, "b_total", &[("registry", "hub"), ("outcome", "hit")]),
        2.0
    );
    assert_eq!(metric_value(text, "b_total", &[("registry", "h\"x")]), 7.0);
    assert_eq!(metric_value(text, "b_total", &[]), 14.0);
    assert_eq!(metric_sample(text, "b_total", &[("outcome", "gone")]), None);
    assert_eq!(metric_sample(text, "h_seconds", &[]), None);
    assert_eq!(metric_value(text, "nothing_total", &[]), 0.0);
}
