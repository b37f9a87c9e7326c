//! A rule's bandwidth limit: one token bucket (`governor`) per execution, shared by every blob
//! the rule sends at once, taken piece by piece as bytes leave.

use std::num::NonZeroU32;

use governor::clock::{Clock, DefaultClock};
use governor::{Quota, RateLimiter};

/// Bytes per second, shared by the streams of one execution.
pub struct Bandwidth {
    limiter: RateLimiter<governor::state::NotKeyed, governor::state::InMemoryState, DefaultClock>,
    burst: u32,
}

impl Bandwidth {
    /// A limit of `bytes_per_sec` (at least 1), with a burst of a tenth of a second's bytes
    /// (at least 64 KiB): short enough that the rate holds over any second.
    pub fn new(bytes_per_sec: u64) -> Bandwidth {
        let rate = u32::try_from(bytes_per_sec.max(1)).unwrap_or(u32::MAX);
        let burst = (rate / 10).max(64 * 1024).min(rate.max(1));
        let one = NonZeroU32::MIN;
        let quota = Quota::per_second(NonZeroU32::new(rate).unwrap_or(one))
            .allow_burst(NonZeroU32::new(burst).unwrap_or(one));
        Bandwidth {
            limiter: RateLimiter::direct(quota),
            burst,
        }
    }

    /// Waits until `bytes` may be sent.
    pub async fn take(&self, mut bytes: u64) {
        let clock = DefaultClock::default();
        while bytes > 0 {
            let n = u32::try_from(bytes).unwrap_or(u32::MAX).min(self.burst);
            let Some(cells) = NonZeroU32::new(n) else {
                return;
            };
            match self.limiter.check_n(cells) {
                Ok(Ok(())) => bytes -= u64::from(n),
                Ok(Err(not_until)) => {
                    tokio::time::sleep(not_until.wait_time_from(clock.now())).await;
                }
                // `n` is at most the burst: cannot happen; send rather than spin.
                Err(_) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Bandwidth;
    use std::time::Instant;

    #[tokio::test]
    async fn the_rate_holds_over_a_second() {
        let b = Bandwidth::new(1 << 20);
        let t = Instant::now();
        // The first tenth of a second's bytes are the burst; 1 MiB more needs a second.
        for _ in 0..18 {
            b.take(64 * 1024).await;
        }
        let s = t.elapsed().as_secs_f64();
        assert!(
            (0.9..3.0).contains(&s),
            "took {s} s for 1.125 MiB at 1 MiB/s"
        );
    }
}
