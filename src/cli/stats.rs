//! `berth cache stats`: hit ratio and bytes saved, read from a running server's `/metrics`.

use std::collections::BTreeMap;

/// Per-registry figures since the server started (fields in alphabetical order, as printed).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct RegistryStats {
    /// Blob bytes served to clients.
    pub bytes_served: u64,
    /// Requests by outcome.
    pub outcomes: BTreeMap<String, u64>,
}

/// Whole-node figures.
#[derive(Debug, Default, serde::Serialize, PartialEq)]
pub struct CacheStats {
    /// Per cache registry.
    pub registries: BTreeMap<String, RegistryStats>,
    /// Bytes fetched from sources.
    pub upstream_bytes: u64,
}

/// What `berth cache stats --json` prints.
#[derive(Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct StatsView {
    /// Bytes clients received that the sources did not have to send.
    pub bytes_saved: u64,
    /// Share of requests answered without a full fetch.
    pub hit_ratio: f64,
    /// Per cache registry.
    pub registries: BTreeMap<String, RegistryStats>,
    /// Bytes fetched from sources.
    pub upstream_bytes: u64,
}

impl StatsView {
    /// The view of parsed figures.
    pub fn of(stats: &CacheStats) -> StatsView {
        StatsView {
            bytes_saved: stats.bytes_saved(),
            hit_ratio: stats.hit_ratio(),
            registries: stats.registries.clone(),
            upstream_bytes: stats.upstream_bytes,
        }
    }
}

impl CacheStats {
    /// Share of requests answered without a full fetch (`hit`, `revalidated`, `stale`, `coalesced`).
    pub fn hit_ratio(&self) -> f64 {
        let (mut hits, mut total) = (0, 0);
        for r in self.registries.values() {
            for (outcome, n) in &r.outcomes {
                total += n;
                if outcome != "miss" {
                    hits += n;
                }
            }
        }
        if total == 0 {
            0.0
        } else {
            hits as f64 / total as f64
        }
    }

    /// Bytes clients received that the source did not have to send.
    pub fn bytes_saved(&self) -> u64 {
        let served: u64 = self.registries.values().map(|r| r.bytes_served).sum();
        served.saturating_sub(self.upstream_bytes)
    }
}

fn label<'a>(labels: &'a str, name: &str) -> Option<&'a str> {
    labels.split(',').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k.trim() == name).then(|| v.trim().trim_matches('"'))
    })
}

/// Parses the Prometheus text exposition.
pub fn parse(text: &str) -> CacheStats {
    let mut stats = CacheStats::default();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let value = value.parse::<f64>().unwrap_or(0.0) as u64;
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (n, l.trim_end_matches('}')),
            None => (series, ""),
        };
        match name {
            "berth_cache_requests_total" => {
                if let (Some(r), Some(o)) = (label(labels, "registry"), label(labels, "outcome")) {
                    *stats
                        .registries
                        .entry(r.into())
                        .or_default()
                        .outcomes
                        .entry(o.into())
                        .or_default() += value;
                }
            }
            "berth_cache_blob_bytes_served_total" => {
                if let Some(r) = label(labels, "registry") {
                    stats.registries.entry(r.into()).or_default().bytes_served += value;
                }
            }
            "berth_upstream_fetch_bytes_total" => stats.upstream_bytes += value,
            _ => {}
        }
    }
    stats
}

/// Fetches and parses `/metrics` of a running server.
pub async fn fetch(server: &str) -> Result<CacheStats, String> {
    let url = format!("{}/metrics", server.trim_end_matches('/'));
    let text = reqwest::get(&url)
        .await
        .map_err(|e| format!("cannot reach {url}: {}", super::remote::cause_chain(&e)))?
        .text()
        .await
        .map_err(|e| e.to_string())?;
    Ok(parse(&text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_metrics() {
        let s = parse(
            "# TYPE berth_cache_requests_total counter\n\
             berth_cache_requests_total{registry=\"hub\",outcome=\"miss\"} 1\n\
             berth_cache_requests_total{registry=\"hub\",outcome=\"hit\"} 3\n\
             berth_cache_blob_bytes_served_total{registry=\"hub\"} 400\n\
             berth_upstream_fetch_bytes_total 100\n",
        );
        assert_eq!(s.hit_ratio(), 0.75);
        assert_eq!(s.bytes_saved(), 300);
        assert_eq!(s.registries["hub"].outcomes["hit"], 3);
    }
}
