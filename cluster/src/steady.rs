//! Whether the store has been steady, and for how long: the leader's daemon reads it
//! (linearizably) every `STEADY_READ_EVERY`, and a read that fails or is answered later
//! than `STEADY_ON_TIME` after it was sent ends the steady time. The leader fails a host
//! over only once the store has been steady for S (`Timing::steady`): a keeper may have
//! been given permits while a majority of etcd's members had no leader, and a leader that
//! had not noticed yet could commit the host's lease expiry when they hear from it again
//! (`docs/ha.md`, "While the store has no quorum").

use crate::records;
use crate::timing::{STEADY_ON_TIME, STEADY_READ_EVERY};
use novacron_store::Store;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// The reads' outcomes, by when each was sent; no I/O and no clock of its own.
#[derive(Debug, Default, Clone)]
pub struct Steadiness {
    /// The send time of the latest read that failed or came late.
    last_unsteady: Option<Instant>,
    /// The send time of the first read answered on time after it.
    steady_since: Option<Instant>,
}

impl Steadiness {
    /// A read sent at `sent` was answered on time (`on_time`) or not. Reads may end out of
    /// order; a late one also ends the steady time of reads sent after it (which only
    /// makes the steady time shorter).
    pub fn read(&mut self, sent: Instant, on_time: bool) {
        if !on_time {
            self.last_unsteady = Some(self.last_unsteady.map_or(sent, |last| last.max(sent)));
            self.steady_since = None;
        } else if self.last_unsteady.is_none_or(|last| sent > last) {
            self.steady_since = Some(self.steady_since.map_or(sent, |since| since.min(sent)));
        }
    }

    /// How long the store has been steady at `now` (zero before the first read on time).
    pub fn steady_for(&self, now: Instant) -> Duration {
        self.steady_since.map_or(Duration::ZERO, |since| now.saturating_duration_since(since))
    }
}

/// The reads, on a task of their own for as long as a clone of the monitor lives.
#[derive(Clone)]
pub struct StoreMonitor {
    state: Arc<Mutex<Steadiness>>,
}

impl StoreMonitor {
    /// Starts reading `store` (on the current tokio runtime).
    pub fn start(store: Arc<dyn Store>) -> StoreMonitor {
        let state = Arc::new(Mutex::new(Steadiness::default()));
        tokio::spawn(read_steadily(store, Arc::downgrade(&state)));
        StoreMonitor { state }
    }

    pub fn steady_for(&self) -> Duration {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).steady_for(Instant::now())
    }
}

async fn read_steadily(store: Arc<dyn Store>, state: Weak<Mutex<Steadiness>>) {
    let mut tick = tokio::time::interval(STEADY_READ_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while state.strong_count() > 0 {
        tick.tick().await;
        // Each read on its own task, so that one in flight does not delay the next.
        let (store, state) = (store.clone(), state.clone());
        tokio::spawn(async move {
            let sent = Instant::now();
            let answer = tokio::time::timeout(STEADY_ON_TIME, store.get(records::LEADER)).await;
            let on_time = matches!(answer, Ok(Ok(_)));
            if !on_time {
                tracing::debug!("the store did not answer a read within {STEADY_ON_TIME:?}");
            }
            if let Some(state) = state.upgrade() {
                state.lock().unwrap_or_else(|p| p.into_inner()).read(sent, on_time);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_steady_time_runs_from_the_first_read_on_time_after_the_last_late_one() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut s = Steadiness::default();
        assert_eq!(s.steady_for(at(1000)), Duration::ZERO, "nothing read yet");
        s.read(at(0), true);
        s.read(at(100), true);
        assert_eq!(s.steady_for(at(1000)), Duration::from_millis(1000));
        s.read(at(200), false);
        assert_eq!(s.steady_for(at(1000)), Duration::ZERO);
        s.read(at(300), true);
        assert_eq!(s.steady_for(at(1000)), Duration::from_millis(700));
    }

    #[test]
    fn test_a_late_read_that_ends_after_later_reads_still_ends_the_steady_time() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut s = Steadiness::default();
        s.read(at(0), true);
        // Sent at 100, known late only at 350; the reads sent at 200 and 300 ended first.
        s.read(at(200), true);
        s.read(at(300), true);
        s.read(at(100), false);
        assert_eq!(s.steady_for(at(1000)), Duration::ZERO);
        // An on-time read sent before the late one does not bring the steady time back.
        s.read(at(50), true);
        assert_eq!(s.steady_for(at(1000)), Duration::ZERO);
        s.read(at(400), true);
        assert_eq!(s.steady_for(at(1000)), Duration::from_millis(600));
    }
}
