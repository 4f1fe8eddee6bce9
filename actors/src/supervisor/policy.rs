//! Restart policies and the pure decision of whether (and when) to restart a VMM process.
//!
//! The decision has no clock of its own: callers pass `now`, so tests can drive it with
//! made-up instants.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// What a VM's supervisor does when its VMM process ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum RestartPolicy {
    /// Restart after every exit, even a clean power-off (after a short fixed delay).
    Always,
    /// Restart only after a failure (any exit but status 0), with exponential backoff,
    /// at most `max_restarts` times within any `window`.
    OnFailure { max_restarts: u32, window: Duration, backoff_initial: Duration, backoff_max: Duration },
    /// Never restart.
    Never,
}

impl RestartPolicy {
    /// On-failure with OTP-like defaults: 3 restarts in 60 s, backoff 100 ms doubling to 5 s.
    pub fn on_failure() -> Self {
        RestartPolicy::OnFailure {
            max_restarts: 3,
            window: Duration::from_secs(60),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
        }
    }
}

/// Delay before an `Always` restart, so that a VM that exits at once does not spin a core.
pub const ALWAYS_DELAY: Duration = Duration::from_millis(100);

/// How a VMM process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessExit {
    /// It exited with this status (0: the guest powered off or was shut down).
    Code(i32),
    /// It was killed by this signal.
    Signal(i32),
    /// It ended, but not as our child (re-adopted), so its status is not known.
    Unknown,
}

impl ProcessExit {
    /// Exit status 0 is the only success.
    pub fn is_failure(&self) -> bool {
        !matches!(self, ProcessExit::Code(0))
    }
}

impl std::fmt::Display for ProcessExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProcessExit::Code(c) => write!(f, "exit status {c}"),
            ProcessExit::Signal(s) => write!(f, "killed by signal {s}"),
            ProcessExit::Unknown => f.write_str("ended (status unknown: not our child)"),
        }
    }
}

/// The verdict on one exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Start the process again after this delay.
    Restart { after: Duration },
    /// The exit was clean and the policy does not restart clean exits.
    Done,
    /// The policy says no more: `Never`, or the restart budget of the window is spent.
    GiveUp,
}

/// The restart history of one VM under its policy.
#[derive(Debug, Clone)]
pub struct RestartTracker {
    policy: RestartPolicy,
    /// When each restart within the current window was decided, oldest first.
    recent: VecDeque<Instant>,
    /// Failures in a row (with no clean exit and no quiet window between them); sets the
    /// backoff exponent.
    streak: u32,
}

impl RestartTracker {
    pub fn new(policy: RestartPolicy) -> Self {
        RestartTracker { policy, recent: VecDeque::new(), streak: 0 }
    }

    pub fn policy(&self) -> RestartPolicy {
        self.policy
    }

    /// Decides what to do about `exit` at `now`, and records a restart if it says so.
    pub fn on_exit(&mut self, exit: ProcessExit, now: Instant) -> Decision {
        match self.policy {
            RestartPolicy::Never => Decision::GiveUp,
            RestartPolicy::Always => Decision::Restart { after: ALWAYS_DELAY },
            RestartPolicy::OnFailure { max_restarts, window, backoff_initial, backoff_max } => {
                if !exit.is_failure() {
                    self.streak = 0;
                    return Decision::Done;
                }
                while self.recent.front().is_some_and(|t| now.saturating_duration_since(*t) >= window) {
                    self.recent.pop_front();
                }
                if self.recent.is_empty() {
                    // A whole window without a restart: this is a new failure, not a loop.
                    self.streak = 0;
                }
                if self.recent.len() >= max_restarts as usize {
                    return Decision::GiveUp;
                }
                self.recent.push_back(now);
                let after = backoff(backoff_initial, backoff_max, self.streak);
                self.streak = self.streak.saturating_add(1);
                Decision::Restart { after }
            }
        }
    }
}

/// `initial * 2^n`, capped at `max`.
fn backoff(initial: Duration, max: Duration, n: u32) -> Duration {
    let factor = 1u32.checked_shl(n.min(31)).unwrap_or(u32::MAX);
    initial.saturating_mul(factor).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on_failure(max_restarts: u32, window_s: u64) -> RestartTracker {
        RestartTracker::new(RestartPolicy::OnFailure {
            max_restarts,
            window: Duration::from_secs(window_s),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_millis(1000),
        })
    }

    fn delay(d: Decision) -> Duration {
        match d {
            Decision::Restart { after } => after,
            other => panic!("expected a restart, got {other:?}"),
        }
    }

    #[test]
    fn test_on_failure_backoff_doubles_then_caps() {
        let mut t = on_failure(100, 60);
        let now = Instant::now();

        let delays: Vec<u64> =
            (0..7).map(|_| delay(t.on_exit(ProcessExit::Signal(9), now)).as_millis() as u64).collect();

        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000, 1000]);
    }

    #[test]
    fn test_on_failure_budget_spent_within_window_gives_up() {
        let mut t = on_failure(2, 10);
        let now = Instant::now();

        let first = t.on_exit(ProcessExit::Code(3), now);
        let second = t.on_exit(ProcessExit::Code(3), now + Duration::from_secs(1));
        let third = t.on_exit(ProcessExit::Code(3), now + Duration::from_secs(2));

        assert!(matches!(first, Decision::Restart { .. }));
        assert!(matches!(second, Decision::Restart { .. }));
        assert_eq!(third, Decision::GiveUp);
    }

    #[test]
    fn test_on_failure_restarts_leave_the_window_and_budget_returns() {
        let mut t = on_failure(1, 10);
        let now = Instant::now();

        let first = t.on_exit(ProcessExit::Signal(9), now);
        let inside = t.on_exit(ProcessExit::Signal(9), now + Duration::from_secs(9));
        let after_window = t.on_exit(ProcessExit::Signal(9), now + Duration::from_secs(10));

        assert!(matches!(first, Decision::Restart { .. }));
        assert_eq!(inside, Decision::GiveUp);
        assert_eq!(delay(after_window), Duration::from_millis(100), "a quiet window resets the backoff");
    }

    #[test]
    fn test_on_failure_clean_exit_is_not_restarted_and_resets_backoff() {
        let mut t = on_failure(10, 60);
        let now = Instant::now();
        t.on_exit(ProcessExit::Code(2), now);
        t.on_exit(ProcessExit::Code(2), now);

        let clean = t.on_exit(ProcessExit::Code(0), now);
        let next = t.on_exit(ProcessExit::Code(2), now);

        assert_eq!(clean, Decision::Done);
        assert_eq!(delay(next), Duration::from_millis(100));
    }

    #[test]
    fn test_on_failure_unknown_exit_counts_as_failure() {
        let mut t = on_failure(1, 60);

        let d = t.on_exit(ProcessExit::Unknown, Instant::now());

        assert!(matches!(d, Decision::Restart { .. }));
    }

    #[test]
    fn test_never_gives_up_on_failure_and_clean_exit() {
        let mut t = RestartTracker::new(RestartPolicy::Never);
        let now = Instant::now();

        assert_eq!(t.on_exit(ProcessExit::Signal(9), now), Decision::GiveUp);
        assert_eq!(t.on_exit(ProcessExit::Code(0), now), Decision::GiveUp);
    }

    #[test]
    fn test_always_restarts_clean_exits_without_limit() {
        let mut t = RestartTracker::new(RestartPolicy::Always);
        let now = Instant::now();

        let all: Vec<Decision> = (0..50).map(|_| t.on_exit(ProcessExit::Code(0), now)).collect();

        assert!(all.iter().all(|d| *d == Decision::Restart { after: ALWAYS_DELAY }));
    }

    #[test]
    fn test_backoff_huge_exponent_saturates_at_max() {
        assert_eq!(backoff(Duration::from_secs(1), Duration::from_secs(30), 200), Duration::from_secs(30));
    }
}
