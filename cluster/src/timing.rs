//! The lease and fencing times, all derived from the host lease's TTL (`docs/ha.md`, "Fencing
//! and the timing argument", which explains each and why their order keeps a VM from running
//! twice).

use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// T: the host lease's time to live in the store.
    pub ttl: Duration,
    /// R: how often the keeper renews the lease (and sends permits).
    pub renew: Duration,
    /// F: a permit holds until this long after the renewal it follows was sent.
    pub fence: Duration,
    /// W: how long the leader waits, after a host's lease is gone, before failing it over.
    pub failover_wait: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimingError {
    #[error("a lease TTL of {0:?} is too short: at least 2 s (whole seconds; etcd's minimum)")]
    TooShort(Duration),
    #[error("a lease TTL of {0:?} is not whole seconds (etcd counts leases in seconds)")]
    NotWholeSeconds(Duration),
}

pub const DEFAULT_TTL: Duration = Duration::from_secs(3);
/// How long before the lease's TTL a permit ends (T − F).
const FENCE_BEFORE_TTL: Duration = Duration::from_secs(1);
/// W.
const FAILOVER_WAIT: Duration = Duration::from_millis(500);

impl Timing {
    /// The times for a lease of `ttl`: renew six times per TTL, let permits run a second
    /// short of it (a renewal may fail for most of a second while etcd elects a leader),
    /// and wait half a second more than it before failing over.
    pub fn from_ttl(ttl: Duration) -> Result<Timing, TimingError> {
        if ttl.subsec_nanos() != 0 {
            return Err(TimingError::NotWholeSeconds(ttl));
        }
        if ttl < Duration::from_secs(2) {
            return Err(TimingError::TooShort(ttl));
        }
        Ok(Timing { ttl, renew: ttl / 6, fence: ttl - FENCE_BEFORE_TTL, failover_wait: FAILOVER_WAIT })
    }

    /// How long a stale copy has been paused, at the least, when the new one starts:
    /// T + W − F.
    pub fn margin(&self) -> Duration {
        self.ttl + self.failover_wait - self.fence
    }
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            ttl: DEFAULT_TTL,
            renew: DEFAULT_TTL / 6,
            fence: DEFAULT_TTL.saturating_sub(FENCE_BEFORE_TTL),
            failover_wait: FAILOVER_WAIT,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_timing_keeps_the_fence_before_the_failover_with_a_margin() {
        for secs in [2, 3, 10, 60] {
            let t = Timing::from_ttl(Duration::from_secs(secs)).unwrap();
            assert!(t.fence < t.ttl, "permits end before the lease can");
            assert!(t.renew * 2 < t.fence, "a missed renewal does not fence");
            assert!(t.margin() >= Duration::from_millis(1500), "{t:?}");
        }
        assert_eq!(Timing::from_ttl(DEFAULT_TTL).unwrap(), Timing::default());
    }

    #[test]
    fn test_timing_refuses_ttls_etcd_cannot_hold() {
        assert_eq!(Timing::from_ttl(Duration::from_secs(1)), Err(TimingError::TooShort(Duration::from_secs(1))));
        assert!(matches!(Timing::from_ttl(Duration::from_millis(2500)), Err(TimingError::NotWholeSeconds(_))));
    }
}
