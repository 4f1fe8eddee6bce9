//! Device I/O rate limiting with token buckets (after Firecracker's rate limiter).
//!
//! A [`RateLimiter`] has an optional bandwidth bucket (bytes) and an optional operations
//! bucket (requests). A device asks it before processing each request:
//!
//! ```ignore
//! if !limiter.consume(1, TokenType::Ops) {
//!     return; // blocked: stop processing the queue until the limiter's fd fires
//! }
//! if !limiter.consume(len, TokenType::Bytes) {
//!     limiter.manual_replenish(1, TokenType::Ops); // undo the half-taken request
//!     return;
//! }
//! // ... process the request ...
//! ```
//!
//! When a consume fails the limiter becomes *blocked*: every consume fails until the
//! refill timer, armed for the time the refused request needs, fires. The device registers
//! [`AsRawFd::as_raw_fd`] (a non-blocking timerfd) in its event loop for `EPOLLIN`, calls
//! [`RateLimiter::event_handler`] when it is readable, and then resumes processing its queue
//! (the refused request first: it now fits).

mod bucket;
mod config;
pub mod persist;

use std::fmt;
use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use vmm_sys_util::timerfd::TimerFd;

pub use bucket::{BucketReduction, TokenBucket};
pub use config::{
    DEFAULT_REFILL_TIME_MS, MAX_REFILL_TIME_MS, RateLimiterConfig, RateLimiterConfigError, RateLimiterParseError,
    TokenBucketConfig, TokenBucketConfigError, parse_rate_limiter,
};
pub use persist::{PersistError, RATE_LIMITER_STATE_VERSION, RateLimiterState, TokenBucketState};

/// The kind of token a request consumes, i.e. which bucket limits it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenType {
    /// Bytes transferred: the bandwidth bucket.
    Bytes,
    /// Requests: the ops bucket.
    Ops,
}

impl fmt::Display for TokenType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TokenType::Bytes => "bandwidth",
            TokenType::Ops => "ops",
        })
    }
}

/// A change to one bucket of a running limiter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BucketUpdate {
    /// Keep the bucket as it is.
    None,
    /// Remove the bucket: that kind of token is no longer limited.
    Disabled,
    /// Set the bucket's configuration. An existing bucket keeps its tokens (capped at the new
    /// size), its debt and at most its remaining one-time burst, so an update never grants a
    /// free refill; a bucket that did not exist starts full, with its whole burst.
    Update(TokenBucketConfig),
}

#[derive(Debug, thiserror::Error)]
pub enum RateLimiterError {
    #[error(transparent)]
    InvalidConfig(#[from] RateLimiterConfigError),
    #[error("cannot create the rate limiter timer")]
    CreateTimer(#[source] io::Error),
    #[error("cannot read the rate limiter timer")]
    ReadTimer(#[source] io::Error),
    /// `event_handler` was called but the timer had not fired (e.g. the limiter was unblocked
    /// by an update in between). Harmless; the caller may ignore it.
    #[error("rate limiter event handler called but its timer has not fired")]
    SpuriousEvent,
}

/// Longest single timer wait. A longer wait (a huge debt on a slow bucket) wakes early; the
/// next consume then fails again and re-arms for the rest.
const MAX_TIMER_WAIT: Duration = Duration::from_secs(24 * 60 * 60);
/// A zero timerfd duration would disarm the timer instead of firing at once.
const MIN_TIMER_WAIT: Duration = Duration::from_nanos(1);

/// Why the limiter is blocked, kept so that a bucket update can recompute the wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Blocked {
    /// The bucket that refused (or went into debt).
    token_type: TokenType,
    /// What that bucket must be able to do before the limiter may proceed.
    need: Need,
    /// When the timer was armed and for how long.
    armed_at: Instant,
    armed_for: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Need {
    /// Give this many tokens: the refused request.
    Tokens(u64),
    /// Be out of debt, after an over-sized request went through.
    DebtRepaid,
}

/// Limits a device's bandwidth and request rate; see the [module documentation](self).
#[derive(Debug)]
pub struct RateLimiter {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    /// Always created, even without buckets, so that enabling a bucket later does not need a
    /// new fd the device has not registered (or that a seccomp filter forbids creating).
    timer: TimerFd,
    blocked: Option<Blocked>,
}

impl PartialEq for RateLimiter {
    /// Compares the buckets; the timer and the blocked state are not part of the value.
    fn eq(&self, other: &Self) -> bool {
        self.bandwidth == other.bandwidth && self.ops == other.ops
    }
}

impl RateLimiter {
    /// A limiter with full buckets. `RateLimiterConfig::default()` gives one that never blocks.
    pub fn new(config: RateLimiterConfig) -> Result<Self, RateLimiterError> {
        Self::new_at(config, Instant::now())
    }

    fn new_at(config: RateLimiterConfig, now: Instant) -> Result<Self, RateLimiterError> {
        config.validate()?;
        let bucket = |bucket: TokenType, config: Option<TokenBucketConfig>| {
            config
                .map(|c| TokenBucket::new_at(c, now))
                .transpose()
                .map_err(|error| RateLimiterConfigError { bucket, error })
        };
        let bandwidth = bucket(TokenType::Bytes, config.bandwidth)?;
        let ops = bucket(TokenType::Ops, config.ops)?;
        Ok(Self::from_parts(bandwidth, ops, new_timer().map_err(RateLimiterError::CreateTimer)?))
    }

    fn from_parts(bandwidth: Option<TokenBucket>, ops: Option<TokenBucket>, timer: TimerFd) -> Self {
        RateLimiter { bandwidth, ops, timer, blocked: None }
    }

    /// Takes `tokens` from the bucket of `token_type` and says whether the request may go
    /// ahead. Always true without that bucket; always false while blocked. On false nothing
    /// was taken and the limiter is blocked until its fd fires. A request larger than the
    /// bucket goes through when the bucket is full, leaving a debt that blocks the limiter
    /// until it is repaid.
    pub fn consume(&mut self, tokens: u64, token_type: TokenType) -> bool {
        self.consume_at(tokens, token_type, Instant::now())
    }

    fn consume_at(&mut self, tokens: u64, token_type: TokenType, now: Instant) -> bool {
        if self.blocked.is_some() {
            return false;
        }
        let Some(bucket) = self.bucket_mut(token_type) else {
            return true;
        };
        match bucket.reduce_at(tokens, now) {
            BucketReduction::Success => true,
            BucketReduction::Failure => {
                let wait = bucket.wait_for(tokens);
                self.block(Blocked { token_type, need: Need::Tokens(tokens), armed_at: now, armed_for: wait });
                false
            }
            BucketReduction::OverConsumption(_) => {
                let wait = bucket.debt_wait();
                self.block(Blocked { token_type, need: Need::DebtRepaid, armed_at: now, armed_for: wait });
                true
            }
        }
    }

    /// Gives back tokens taken by `consume` for a request that was not processed after all.
    /// Does not unblock the limiter. See [`TokenBucket::force_replenish`].
    pub fn manual_replenish(&mut self, tokens: u64, token_type: TokenType) {
        if let Some(bucket) = self.bucket_mut(token_type) {
            bucket.force_replenish(tokens);
        }
    }

    /// Whether consumes fail until the timer fires.
    pub fn is_blocked(&self) -> bool {
        self.blocked.is_some()
    }

    /// When the armed timer fires, while blocked (for metrics and logs; the device waits on
    /// the fd, not on this).
    pub fn blocked_until(&self) -> Option<Instant> {
        self.blocked.and_then(|b| b.armed_at.checked_add(b.armed_for))
    }

    /// To be called when the fd is readable: reads the timer and unblocks the limiter. The
    /// device should then resume processing its queue.
    pub fn event_handler(&mut self) -> Result<(), RateLimiterError> {
        match self.timer.wait() {
            Ok(_) => {
                self.blocked = None;
                Ok(())
            }
            Err(e) if e.errno() == libc::EAGAIN => Err(RateLimiterError::SpuriousEvent),
            Err(e) => Err(RateLimiterError::ReadTimer(io::Error::from_raw_os_error(e.errno()))),
        }
    }

    /// Changes the buckets while the device runs; see [`BucketUpdate`]. Both updates are
    /// validated before either is applied, so an error changes nothing. If the limiter is
    /// blocked, the wait is recomputed against the new buckets: the timer is re-armed, or
    /// disarmed and the limiter unblocked if the refused request now fits (the device should
    /// then resume processing its queue; check `is_blocked()`).
    pub fn update_buckets(&mut self, bandwidth: BucketUpdate, ops: BucketUpdate) -> Result<(), RateLimiterError> {
        self.update_buckets_at(bandwidth, ops, Instant::now())
    }

    fn update_buckets_at(
        &mut self,
        bandwidth: BucketUpdate,
        ops: BucketUpdate,
        now: Instant,
    ) -> Result<(), RateLimiterError> {
        let new_bandwidth = updated_bucket(self.bandwidth.as_ref(), bandwidth, now)
            .map_err(|error| RateLimiterConfigError { bucket: TokenType::Bytes, error })?;
        let new_ops = updated_bucket(self.ops.as_ref(), ops, now)
            .map_err(|error| RateLimiterConfigError { bucket: TokenType::Ops, error })?;
        self.bandwidth = new_bandwidth;
        self.ops = new_ops;

        if let Some(blocked) = self.blocked {
            let wait = self.bucket_mut(blocked.token_type).map(|bucket| match blocked.need {
                Need::Tokens(tokens) => bucket.time_until_available_at(tokens, now),
                Need::DebtRepaid => bucket.time_until_debt_repaid_at(now),
            });
            match wait {
                Some(wait) if !wait.is_zero() => self.block(Blocked { armed_at: now, armed_for: wait, ..blocked }),
                _ => self.unblock(),
            }
        }
        Ok(())
    }

    /// The bandwidth bucket, if bytes are limited.
    pub fn bandwidth(&self) -> Option<&TokenBucket> {
        self.bandwidth.as_ref()
    }

    /// The ops bucket, if requests are limited.
    pub fn ops(&self) -> Option<&TokenBucket> {
        self.ops.as_ref()
    }

    /// The current configuration.
    pub fn config(&self) -> RateLimiterConfig {
        RateLimiterConfig {
            bandwidth: self.bandwidth.as_ref().map(|b| b.config()),
            ops: self.ops.as_ref().map(|b| b.config()),
        }
    }

    fn bucket_mut(&mut self, token_type: TokenType) -> Option<&mut TokenBucket> {
        match token_type {
            TokenType::Bytes => self.bandwidth.as_mut(),
            TokenType::Ops => self.ops.as_mut(),
        }
    }

    /// Arms the timer and blocks. If the timer cannot be armed the limiter stays unblocked
    /// (the refused request is still refused and the buckets still enforce the rate): being
    /// blocked with no timer would stall the device for good.
    fn block(&mut self, blocked: Blocked) {
        let armed_for = blocked.armed_for.clamp(MIN_TIMER_WAIT, MAX_TIMER_WAIT);
        match self.timer.reset(armed_for, None) {
            Ok(()) => self.blocked = Some(Blocked { armed_for, ..blocked }),
            Err(e) => {
                tracing::error!("cannot arm the rate limiter timer: {e}");
                self.blocked = None;
            }
        }
    }

    /// Disarms the timer (which also discards an expiry not read yet) and unblocks.
    fn unblock(&mut self) {
        if let Err(e) = self.timer.clear() {
            tracing::error!("cannot disarm the rate limiter timer: {e}");
        }
        self.blocked = None;
    }
}

impl AsRawFd for RateLimiter {
    /// The refill timer: readable (`EPOLLIN`) when a blocked limiter may be retried; then
    /// call [`RateLimiter::event_handler`].
    fn as_raw_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }
}

/// The bucket after `update`, built without touching the current one.
fn updated_bucket(
    current: Option<&TokenBucket>,
    update: BucketUpdate,
    now: Instant,
) -> Result<Option<TokenBucket>, TokenBucketConfigError> {
    match update {
        BucketUpdate::None => Ok(current.cloned()),
        BucketUpdate::Disabled => Ok(None),
        BucketUpdate::Update(config) => {
            let mut new = TokenBucket::new_at(config, now)?;
            if let Some(current) = current {
                let mut current = current.clone();
                current.replenish(now);
                new.budget = current.budget.min(config.size);
                new.debt = current.debt;
                new.one_time_burst = current.one_time_burst.min(config.one_time_burst);
                // `remainder` stays 0: less than one token of refill progress is dropped.
            }
            Ok(Some(new))
        }
    }
}

/// A timerfd whose read fails with `EAGAIN` instead of blocking when it has not fired, so a
/// spurious `event_handler` call cannot hang the device's event loop.
fn new_timer() -> io::Result<TimerFd> {
    let timer = TimerFd::new().map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    let fd = timer.as_raw_fd();
    // SAFETY: F_GETFL on a descriptor we own only returns its status flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL on a descriptor we own only changes its status flags; no memory is passed.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(timer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket_config(size: u64, one_time_burst: u64, refill_time_ms: u64) -> TokenBucketConfig {
        TokenBucketConfig { size, one_time_burst, refill_time_ms }
    }

    fn limiter(bandwidth: Option<TokenBucketConfig>, ops: Option<TokenBucketConfig>, now: Instant) -> RateLimiter {
        RateLimiter::new_at(RateLimiterConfig { bandwidth, ops }, now).unwrap()
    }

    /// Waits (up to `timeout_ms`) for `fd` to become readable.
    fn wait_readable(fd: RawFd, timeout_ms: i32) -> bool {
        let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: `pfd` is a valid, exclusively borrowed pollfd and the count passed is 1.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        n == 1 && pfd.revents & libc::POLLIN != 0
    }

    /// Blocks `l` (1-token ops bucket over 1 s) at `t0`.
    fn blocked_ops_limiter(t0: Instant) -> RateLimiter {
        let mut l = limiter(None, Some(bucket_config(1, 0, 1000)), t0);
        assert!(l.consume_at(1, TokenType::Ops, t0));
        assert!(!l.consume_at(1, TokenType::Ops, t0));
        l
    }

    #[test]
    fn test_limiter_without_buckets_never_blocks() {
        let t0 = Instant::now();
        let mut l = limiter(None, None, t0);

        let results: Vec<bool> = (0..1000)
            .flat_map(|_| [l.consume_at(u64::MAX, TokenType::Bytes, t0), l.consume_at(u64::MAX, TokenType::Ops, t0)])
            .collect();

        assert!(results.iter().all(|&ok| ok));
        assert!(!l.is_blocked());
        assert!(!l.timer.is_armed().unwrap());
    }

    #[test]
    fn test_limiter_new_invalid_config_is_error() {
        let result = RateLimiter::new(RateLimiterConfig { bandwidth: Some(bucket_config(0, 0, 1000)), ops: None });

        assert!(matches!(
            result,
            Err(RateLimiterError::InvalidConfig(RateLimiterConfigError {
                bucket: TokenType::Bytes,
                error: TokenBucketConfigError::ZeroSize
            }))
        ));
    }

    #[test]
    fn test_limiter_ops_bucket_blocks_while_bandwidth_remains() {
        let t0 = Instant::now();
        let mut l = limiter(Some(bucket_config(1_000_000, 0, 1000)), Some(bucket_config(10, 0, 1000)), t0);
        let mut served = 0;

        while l.consume_at(1, TokenType::Ops, t0) && l.consume_at(100, TokenType::Bytes, t0) {
            served += 1;
        }

        assert_eq!(served, 10);
        assert!(l.is_blocked());
        assert_eq!(l.blocked.map(|b| b.token_type), Some(TokenType::Ops));
    }

    #[test]
    fn test_limiter_bandwidth_bucket_blocks_while_ops_remain() {
        let t0 = Instant::now();
        let mut l = limiter(Some(bucket_config(1000, 0, 1000)), Some(bucket_config(1_000_000, 0, 1000)), t0);
        let mut served = 0;

        while l.consume_at(1, TokenType::Ops, t0) && l.consume_at(100, TokenType::Bytes, t0) {
            served += 1;
        }

        assert_eq!(served, 10);
        assert!(l.is_blocked());
        assert_eq!(l.blocked.map(|b| b.token_type), Some(TokenType::Bytes));
    }

    #[test]
    fn test_limiter_failed_consume_arms_timer_for_refill_time() {
        let t0 = Instant::now();
        let mut l = limiter(Some(bucket_config(1000, 0, 1000)), None, t0);
        assert!(l.consume_at(1000, TokenType::Bytes, t0));

        let ok = l.consume_at(250, TokenType::Bytes, t0);

        assert!(!ok);
        assert!(l.is_blocked());
        assert!(l.timer.is_armed().unwrap());
        assert_eq!(l.blocked.map(|b| b.armed_for), Some(Duration::from_millis(250)));
    }

    #[test]
    fn test_limiter_blocked_refuses_other_bucket_and_unlimited_types() {
        let t0 = Instant::now();
        let mut l = blocked_ops_limiter(t0);

        let bytes = l.consume_at(1, TokenType::Bytes, t0 + Duration::from_secs(10));
        let ops = l.consume_at(1, TokenType::Ops, t0 + Duration::from_secs(10));

        assert!(!bytes);
        assert!(!ops);
    }

    #[test]
    fn test_limiter_event_handler_after_timer_fires_unblocks() {
        // A real 5 ms timer: 1 token per 5 ms, emptied.
        let mut l = RateLimiter::new(RateLimiterConfig { bandwidth: None, ops: Some(bucket_config(1, 0, 5)) }).unwrap();
        assert!(l.consume(1, TokenType::Ops));
        assert!(!l.consume(1, TokenType::Ops));

        let fired = wait_readable(l.as_raw_fd(), 5000);
        let handled = l.event_handler();

        assert!(fired);
        assert!(handled.is_ok(), "{handled:?}");
        assert!(!l.is_blocked());
        assert!(l.consume(1, TokenType::Ops));
    }

    #[test]
    fn test_limiter_event_handler_before_timer_fires_is_spurious() {
        let t0 = Instant::now();
        let mut l = limiter(None, Some(bucket_config(1, 0, MAX_REFILL_TIME_MS)), t0);
        assert!(l.consume_at(1, TokenType::Ops, t0));
        assert!(!l.consume_at(1, TokenType::Ops, t0));

        let result = l.event_handler();

        assert!(matches!(result, Err(RateLimiterError::SpuriousEvent)), "{result:?}");
        assert!(l.is_blocked());
    }

    #[test]
    fn test_limiter_over_consumption_succeeds_and_blocks_until_debt_repaid() {
        let t0 = Instant::now();
        let mut l = limiter(Some(bucket_config(1000, 0, 1000)), None, t0);

        let ok = l.consume_at(3500, TokenType::Bytes, t0);

        assert!(ok);
        assert!(l.is_blocked());
        assert_eq!(l.blocked.map(|b| b.armed_for), Some(Duration::from_millis(2500)));
        assert!(l.timer.is_armed().unwrap());
    }

    #[test]
    fn test_limiter_manual_replenish_returns_tokens_to_bucket() {
        let t0 = Instant::now();
        let mut l = limiter(Some(bucket_config(1000, 0, 1000)), None, t0);
        assert!(l.consume_at(600, TokenType::Bytes, t0));

        l.manual_replenish(600, TokenType::Bytes);
        let ok = l.consume_at(1000, TokenType::Bytes, t0);

        assert!(ok);
        assert!(!l.is_blocked());
    }

    #[test]
    fn test_limiter_manual_replenish_without_bucket_does_nothing() {
        let t0 = Instant::now();
        let mut l = limiter(Some(bucket_config(1000, 0, 1000)), None, t0);

        l.manual_replenish(600, TokenType::Ops);

        assert_eq!(l.ops(), None);
        assert_eq!(l.bandwidth().map(|b| b.budget), Some(1000));
    }

    #[test]
    fn test_limiter_update_while_blocked_disable_unblocks_and_disarms() {
        let t0 = Instant::now();
        let mut l = blocked_ops_limiter(t0);

        let result = l.update_buckets_at(BucketUpdate::None, BucketUpdate::Disabled, t0);

        assert!(result.is_ok(), "{result:?}");
        assert!(!l.is_blocked());
        assert!(!l.timer.is_armed().unwrap());
        assert!(l.consume_at(u64::MAX, TokenType::Ops, t0));
    }

    #[test]
    fn test_limiter_update_while_blocked_request_now_fits_unblocks() {
        // 600 of 1000 taken; a 2000-byte request must wait for a full bucket. Shrunk to 400,
        // the bucket is full at once and the request may go through as an over-consumption.
        let t0 = Instant::now();
        let mut l = limiter(Some(bucket_config(1000, 0, 1000)), None, t0);
        assert!(l.consume_at(600, TokenType::Bytes, t0));
        assert!(!l.consume_at(2000, TokenType::Bytes, t0));

        let result = l.update_buckets_at(BucketUpdate::Update(bucket_config(400, 0, 1000)), BucketUpdate::None, t0);

        assert!(result.is_ok(), "{result:?}");
        assert!(!l.is_blocked());
        assert!(!l.timer.is_armed().unwrap());
        assert!(l.consume_at(2000, TokenType::Bytes, t0));
    }

    #[test]
    fn test_limiter_update_after_wait_elapsed_unblocks() {
        let t0 = Instant::now();
        let mut l = blocked_ops_limiter(t0);

        let result = l.update_buckets_at(BucketUpdate::None, BucketUpdate::None, t0 + Duration::from_secs(1));

        assert!(result.is_ok(), "{result:?}");
        assert!(!l.is_blocked());
        assert!(!l.timer.is_armed().unwrap());
    }

    #[test]
    fn test_limiter_update_while_blocked_rearms_for_new_rate() {
        let t0 = Instant::now();
        let mut l = blocked_ops_limiter(t0);
        let t1 = t0 + Duration::from_millis(100);

        let result = l.update_buckets_at(BucketUpdate::None, BucketUpdate::Update(bucket_config(10, 0, 1000)), t1);

        // Empty 10-per-second bucket at t1: the refused 1-token request fits 100 ms later.
        assert!(result.is_ok(), "{result:?}");
        assert!(l.is_blocked());
        assert!(l.timer.is_armed().unwrap());
        assert_eq!(l.blocked_until(), Some(t1 + Duration::from_millis(100)));
    }

    #[test]
    fn test_limiter_update_other_bucket_while_blocked_keeps_wait() {
        let t0 = Instant::now();
        let mut l = blocked_ops_limiter(t0);

        let result = l.update_buckets_at(BucketUpdate::Update(bucket_config(100, 0, 1000)), BucketUpdate::None, t0);

        assert!(result.is_ok(), "{result:?}");
        assert!(l.is_blocked());
        assert_eq!(l.blocked.map(|b| b.armed_for), Some(Duration::from_secs(1)));
    }

    #[test]
    fn test_limiter_update_invalid_config_changes_nothing() {
        let t0 = Instant::now();
        let mut l = blocked_ops_limiter(t0);
        let before = (l.bandwidth.clone(), l.ops.clone(), l.blocked);

        let result = l.update_buckets_at(BucketUpdate::Disabled, BucketUpdate::Update(bucket_config(1, 0, 0)), t0);

        assert!(matches!(
            result,
            Err(RateLimiterError::InvalidConfig(RateLimiterConfigError {
                bucket: TokenType::Ops,
                error: TokenBucketConfigError::ZeroRefillTime
            }))
        ));
        assert_eq!((l.bandwidth.clone(), l.ops.clone(), l.blocked), before);
        assert!(l.timer.is_armed().unwrap());
    }

    #[test]
    fn test_limiter_update_keeps_tokens_capped_at_new_size() {
        let t0 = Instant::now();
        let mut l = limiter(Some(bucket_config(1000, 0, 1000)), None, t0);
        assert!(l.consume_at(200, TokenType::Bytes, t0));

        let shrink = l.update_buckets_at(BucketUpdate::Update(bucket_config(500, 0, 1000)), BucketUpdate::None, t0);
        let budget_after_shrink = l.bandwidth().map(|b| b.budget);
        let grow = l.update_buckets_at(BucketUpdate::Update(bucket_config(5000, 0, 1000)), BucketUpdate::None, t0);

        assert!(shrink.is_ok() && grow.is_ok());
        assert_eq!(budget_after_shrink, Some(500));
        assert_eq!(l.bandwidth().map(|b| (b.budget, b.capacity())), Some((500, 5000)));
    }

    #[test]
    fn test_limiter_update_never_grants_new_burst() {
        let t0 = Instant::now();
        let mut l = limiter(Some(bucket_config(1000, 100, 1000)), None, t0);
        assert!(l.consume_at(60, TokenType::Bytes, t0));

        let result = l.update_buckets_at(BucketUpdate::Update(bucket_config(1000, 5000, 1000)), BucketUpdate::None, t0);

        assert!(result.is_ok(), "{result:?}");
        assert_eq!(l.bandwidth().map(|b| b.one_time_burst()), Some(40));
    }

    #[test]
    fn test_limiter_update_keeps_debt() {
        let t0 = Instant::now();
        let mut l = limiter(Some(bucket_config(1000, 0, 1000)), None, t0);
        assert!(l.consume_at(3000, TokenType::Bytes, t0));

        let result = l.update_buckets_at(BucketUpdate::Update(bucket_config(4000, 0, 1000)), BucketUpdate::None, t0);

        // 2000 tokens of debt at 4000 per second.
        assert!(result.is_ok(), "{result:?}");
        assert_eq!(l.bandwidth().map(|b| b.debt()), Some(2000));
        assert_eq!(l.blocked.map(|b| b.armed_for), Some(Duration::from_millis(500)));
    }

    #[test]
    fn test_limiter_update_enables_new_bucket_full() {
        let t0 = Instant::now();
        let mut l = limiter(None, None, t0);

        let result = l.update_buckets_at(BucketUpdate::None, BucketUpdate::Update(bucket_config(10, 5, 1000)), t0);

        assert!(result.is_ok(), "{result:?}");
        assert_eq!(l.ops().map(|b| (b.budget, b.one_time_burst())), Some((10, 5)));
        assert_eq!(l.config(), RateLimiterConfig { bandwidth: None, ops: Some(bucket_config(10, 5, 1000)) });
    }

    #[test]
    fn test_limiter_consume_as_fast_as_allowed_for_10s_is_within_one_percent() {
        // Simulated time and timer: when blocked, jump to the expiry and unblock.
        let (size, burst, request) = (1_000_000u64, 100_000u64, 1500u64);
        let t0 = Instant::now();
        let end = t0 + Duration::from_secs(10);
        let mut l = limiter(Some(bucket_config(size, burst, 1000)), None, t0);
        let mut now = t0;
        let mut total = 0u64;

        while now <= end {
            if l.consume_at(request, TokenType::Bytes, now) {
                total += request;
            } else if let Some(until) = l.blocked_until() {
                now = until;
                l.unblock();
            } else {
                panic!("refused without blocking");
            }
        }

        // The bucket starts full (size) with its burst, then refills size per second.
        let expected = size + burst + 10 * size;
        assert!(total.abs_diff(expected) <= 10 * size / 100, "total {total}, expected {expected}");
    }
}
