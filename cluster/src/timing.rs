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
    /// S: how long the store must have answered every read on time before the leader
    /// fails a host over (`steady.rs`): longer than a permit a keeper gave while the
    /// store had no leader can hold.
    pub steady: Duration,
}

/// How often the leader's daemon reads the store to know that it is steady.
pub const STEADY_READ_EVERY: Duration = Duration::from_millis(100);
/// A read answered later than this after it was sent counts as the store being unsteady.
pub const STEADY_ON_TIME: Duration = Duration::from_millis(250);
/// How long a keeper waits for each member's answers when it asks whether they have a
/// leader. This and the two above add up to the shortest election timeout etcd may have
/// (`ELECTION_TIMEOUT_AT_LEAST`): a member that lost its leader has not heard from it for
/// an election timeout, and within that time one of the leader daemon's reads must have
/// been sent and gone unanswered.
pub const LEADER_POLL_WITHIN: Duration = Duration::from_millis(150);
/// The shortest etcd election timeout the bridging of permits is sound for.
pub const ELECTION_TIMEOUT_AT_LEAST: Duration = Duration::from_millis(500);

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
/// S − F: the margin of S over the longest permit.
const STEADY_AFTER_FENCE: Duration = Duration::from_secs(1);

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
        let fence = ttl - FENCE_BEFORE_TTL;
        Ok(Timing { ttl, renew: ttl / 6, fence, failover_wait: FAILOVER_WAIT, steady: fence + STEADY_AFTER_FENCE })
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
            steady: DEFAULT_TTL.saturating_sub(FENCE_BEFORE_TTL) + STEADY_AFTER_FENCE,
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
    fn test_a_bridged_permit_ends_before_a_failover_the_leader_could_decide_after_it() {
        // A permit given at t (members leaderless) holds until t + F. The leader daemon's
        // last read that went unanswered was sent at t − ON_TIME − READ_EVERY at the
        // latest, so it fails over at t − ON_TIME − READ_EVERY + S at the earliest.
        assert_eq!(LEADER_POLL_WITHIN + STEADY_ON_TIME + STEADY_READ_EVERY, ELECTION_TIMEOUT_AT_LEAST);
        for secs in [2, 3, 10, 60] {
            let t = Timing::from_ttl(Duration::from_secs(secs)).unwrap();
            let earliest_failover = t.steady - STEADY_ON_TIME - STEADY_READ_EVERY;
            assert!(earliest_failover >= t.fence + Duration::from_millis(500), "{t:?}");
        }
    }

    #[test]
    fn test_timing_refuses_ttls_etcd_cannot_hold() {
        assert_eq!(Timing::from_ttl(Duration::from_secs(1)), Err(TimingError::TooShort(Duration::from_secs(1))));
        assert!(matches!(Timing::from_ttl(Duration::from_millis(2500)), Err(TimingError::NotWholeSeconds(_))));
    }
}
