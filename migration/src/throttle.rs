//! The migration's bandwidth limit: a token bucket whose rate can change at any time
//! (`vmm migrate-set --max-bandwidth`). The bucket may go into debt by one write; the
//! writer then waits the debt off, so the average over any stretch longer than a few
//! writes is the rate.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Bytes per second shared between whoever sets the limit and the writer; 0 is no limit.
#[derive(Clone, Debug, Default)]
pub struct Bandwidth(Arc<AtomicU64>);

impl Bandwidth {
    pub fn new(bytes_per_sec: u64) -> Self {
        Bandwidth(Arc::new(AtomicU64::new(bytes_per_sec)))
    }

    pub fn set(&self, bytes_per_sec: u64) {
        self.0.store(bytes_per_sec, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Burst allowance: this long at the current rate.
const BURST: Duration = Duration::from_millis(20);

pub struct TokenBucket {
    tokens: f64,
    rate: u64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(now: Instant) -> Self {
        TokenBucket { tokens: 0.0, rate: 0, last: now }
    }

    /// Takes `bytes` at `rate` bytes/s (0: unlimited) and says how long to wait before
    /// sending them.
    pub fn take(&mut self, bytes: u64, rate: u64, now: Instant) -> Duration {
        if rate == 0 {
            self.rate = 0;
            self.tokens = 0.0;
            self.last = now;
            return Duration::ZERO;
        }
        let cap = rate as f64 * BURST.as_secs_f64();
        if rate != self.rate {
            self.rate = rate;
            self.tokens = self.tokens.min(cap);
        }
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * rate as f64).min(cap) - bytes as f64;
        if self.tokens >= 0.0 { Duration::ZERO } else { Duration::from_secs_f64(-self.tokens / rate as f64) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Simulated time: a writer that always waits what it is told sends at the rate.
    #[test]
    fn average_follows_the_rate_and_its_changes() {
        let start = Instant::now();
        let mut now = start;
        let mut b = TokenBucket::new(now);
        let mut sent = 0u64;
        while now - start < Duration::from_secs(2) {
            now += b.take(65536, 1_000_000, now);
            sent += 65536;
        }
        let rate = sent as f64 / (now - start).as_secs_f64();
        assert!((rate / 1_000_000.0 - 1.0).abs() < 0.05, "{rate}");
        let mid = now;
        let mut sent = 0u64;
        while now - mid < Duration::from_secs(2) {
            now += b.take(65536, 4_000_000, now);
            sent += 65536;
        }
        let rate = sent as f64 / (now - mid).as_secs_f64();
        assert!((rate / 4_000_000.0 - 1.0).abs() < 0.05, "{rate}");
        assert_eq!(b.take(1 << 30, 0, now), Duration::ZERO);
    }
}
