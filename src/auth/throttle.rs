//! Slows repeated failed logins down, where they come from: attempts from a client address
//! that keeps failing wait before they are checked, and each further failure on an access key
//! waits before its answer. A correct secret is never held up by failures from elsewhere, so an
//! attacker guessing one key cannot lock its owner out.

use std::net::IpAddr;
use std::time::Duration;

/// Failure counts within a sliding window; past `limit`, waits start at 250 ms and double up to
/// 10 s, so guessing a secret is slow while a real user who mistyped once is not held up.
pub struct Throttle {
    limit: u32,
    by_key: moka::sync::Cache<String, u32>,
    by_client: moka::sync::Cache<IpAddr, u32>,
}

/// Longest wait of a login attempt.
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

    fn wait(&self, failures: u32) -> Duration {
        if failures < self.limit {
            return Duration::ZERO;
        }
        let doublings = (failures - self.limit).min(6);
        (Duration::from_millis(250) * 2u32.pow(doublings)).min(MAX_DELAY)
    }

    /// How long an attempt from `client` waits before it is checked (its address's failures).
    pub fn before_check(&self, client: IpAddr) -> Duration {
        self.wait(self.by_client.get(&client).unwrap_or(0))
    }

    /// How long a failed attempt on `key` waits before its answer (the key's failures from
    /// anywhere, this one included).
    pub fn after_failure(&self, key: &str) -> Duration {
        self.wait(self.by_key.get(key).unwrap_or(0))
    }

    /// Records a failed attempt.
    pub fn failed(&self, key: &str, client: IpAddr) {
        let k = self.by_key.get(key).unwrap_or(0).saturating_add(1);
        self.by_key.insert(key.to_string(), k);
        let c = self.by_client.get(&client).unwrap_or(0).saturating_add(1);
        self.by_client.insert(client, c);
    }

    /// Forgets the key's failures after a good login (the address keeps its count).
    pub fn succeeded(&self, key: &str) {
        self.by_key.invalidate(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slows_the_failing_address_and_failures_on_the_key_not_the_owner_elsewhere() {
        let t = Throttle::new(3, Duration::from_secs(60));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..3 {
            assert_eq!(t.before_check(a), Duration::ZERO);
            t.failed("K", a);
        }
        // The failing address waits before any check, whatever key it tries.
        assert_eq!(t.before_check(a), Duration::from_millis(250));
        // Another address is checked at once: a correct secret from there is not held up...
        assert_eq!(t.before_check(b), Duration::ZERO);
        // ...while a wrong one on the guessed key waits before its answer.
        assert_eq!(t.after_failure("K"), Duration::from_millis(250));
        assert_eq!(t.after_failure("OTHER"), Duration::ZERO);
        for _ in 0..20 {
            t.failed("K", a);
        }
        assert_eq!(t.before_check(a), MAX_DELAY);
        assert_eq!(t.after_failure("K"), MAX_DELAY);
        t.succeeded("K");
        assert_eq!(t.after_failure("K"), Duration::ZERO);
        assert_eq!(t.before_check(a), MAX_DELAY, "the address keeps its count");
    }
}
