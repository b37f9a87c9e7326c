//! Slows repeated failed logins down, per access key and per client address.

use std::net::IpAddr;
use std::time::Duration;

/// Failure counts within a sliding window; after `limit` failures each further attempt waits
/// 250 ms, doubling up to 10 s, so guessing a secret is slow while a real user who mistyped once
/// is not held up.
pub struct Throttle {
    limit: u32,
    by_key: moka::sync::Cache<String, u32>,
    by_client: moka::sync::Cache<IpAddr, u32>,
}

/// Longest wait before a login attempt is checked.
pub const MAX_DELAY: Duration = Duration::from_secs(10);

impl Throttle {
    /// Counts failures for `window` after the last one.
    pub fn new(limit: u32, window: Duration) -> Throttle {
        Throttle {
            limit,
            by_key: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_idle(window)
                .build(),
            by_client: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_idle(window)
                .build(),
        }
    }

    /// How long to wait before checking this attempt.
    pub fn delay(&self, key: &str, client: IpAddr) -> Duration {
        let failures = self
            .by_key
            .get(key)
            .unwrap_or(0)
            .max(self.by_client.get(&client).unwrap_or(0));
        if failures < self.limit {
            return Duration::ZERO;
        }
        let doublings = (failures - self.limit).min(6);
        (Duration::from_millis(250) * 2u32.pow(doublings)).min(MAX_DELAY)
    }

    /// Records a failed attempt.
    pub fn failed(&self, key: &str, client: IpAddr) {
        let k = self.by_key.get(key).unwrap_or(0).saturating_add(1);
        self.by_key.insert(key.to_string(), k);
        let c = self.by_client.get(&client).unwrap_or(0).saturating_add(1);
        self.by_client.insert(client, c);
    }

    /// Forgets the key's failures after a good login (the address keeps its count).
    pub fn succeeded(&self, key: &str, _client: IpAddr) {
        self.by_key.invalidate(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slows_after_the_limit_per_key_and_per_address() {
        let t = Throttle::new(3, Duration::from_secs(60));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..3 {
            assert_eq!(t.delay("K", a), Duration::ZERO);
            t.failed("K", a);
        }
        assert_eq!(t.delay("K", b), Duration::from_millis(250));
        assert_eq!(t.delay("OTHER", a), Duration::from_millis(250));
        assert_eq!(t.delay("OTHER", b), Duration::ZERO);
        for _ in 0..20 {
            t.failed("K", a);
        }
        assert_eq!(t.delay("K", a), MAX_DELAY);
    }
}
