//! Saving and restoring a [`RateLimiter`] (snapshots, live migration).
//!
//! The state is plain data: no `Instant` (meaningless on another host or after a reboot),
//! only the time since each bucket's last refill, so the time between save and restore does
//! not count as refill. The blocked flag and the timer are not saved: a restored limiter
//! starts unblocked, and a bucket still short of tokens (or in debt) refuses the next
//! request and blocks again.
//!
//! Restore treats the state as untrusted (it may arrive over the network): every field is
//! checked against the bucket invariants before anything is built.

use std::io;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::bucket::TokenBucket;
use super::{RateLimiter, TokenBucketConfig, TokenBucketConfigError, TokenType, new_timer};

/// Version of [`RateLimiterState`]; bump on any change to the state's layout or meaning.
pub const RATE_LIMITER_STATE_VERSION: u16 = 1;

/// A token bucket at the moment it was saved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucketState {
    pub config: TokenBucketConfig,
    /// Regular tokens as of the last refill (`<= config.size`).
    pub budget: u64,
    /// One-time burst left (`<= config.one_time_burst`).
    pub one_time_burst: u64,
    /// Tokens owed by an over-sized request; non-zero only with no budget and no burst left.
    pub debt: u64,
    /// Refill progress towards the next token, in nanoseconds × tokens
    /// (`< config.refill_time_ms * 1_000_000`; zero when the bucket is full).
    pub refill_remainder: u64,
    /// Nanoseconds between the last refill and the save, at most the time the bucket needs
    /// to fill up (later time changes nothing and is not recorded).
    pub elapsed_ns: u64,
}

/// A rate limiter at the moment it was saved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiterState {
    /// [`RATE_LIMITER_STATE_VERSION`] of the saving side.
    pub version: u16,
    pub bandwidth: Option<TokenBucketState>,
    pub ops: Option<TokenBucketState>,
}

/// Why a [`RateLimiterState`] cannot be restored.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("rate limiter state version {found} is not supported (expected {RATE_LIMITER_STATE_VERSION})")]
    UnsupportedVersion { found: u16 },
    #[error("{bucket} bucket state: invalid config: {error}")]
    InvalidConfig { bucket: TokenType, error: TokenBucketConfigError },
    #[error("{bucket} bucket state: budget {budget} exceeds the size {size}")]
    BudgetOverSize { bucket: TokenType, budget: u64, size: u64 },
    #[error("{bucket} bucket state: one-time burst left {left} exceeds the configured {configured}")]
    BurstOverConfigured { bucket: TokenType, left: u64, configured: u64 },
    #[error("{bucket} bucket state: debt {debt} with a non-zero budget {budget}")]
    DebtWithBudget { bucket: TokenType, debt: u64, budget: u64 },
    #[error("{bucket} bucket state: debt {debt} with one-time burst left {left}")]
    DebtWithBurst { bucket: TokenType, debt: u64, left: u64 },
    #[error("{bucket} bucket state: refill remainder {remainder} is not below the refill period of {refill_ns} ns")]
    RemainderOutOfRange { bucket: TokenType, remainder: u64, refill_ns: u64 },
    #[error("{bucket} bucket state: refill remainder {remainder} on a full bucket")]
    RemainderOnFullBucket { bucket: TokenType, remainder: u64 },
    #[error(
        "{bucket} bucket state: {elapsed_ns} ns since the last refill, more than the {max_ns} ns it needs to fill up"
    )]
    ElapsedTooLong { bucket: TokenType, elapsed_ns: u64, max_ns: u128 },
    #[error("cannot create the rate limiter timer")]
    CreateTimer(#[source] io::Error),
}

impl RateLimiter {
    /// The limiter's state, for [`RateLimiter::restore`].
    pub fn save(&self) -> RateLimiterState {
        self.save_at(Instant::now())
    }

    pub(super) fn save_at(&self, now: Instant) -> RateLimiterState {
        RateLimiterState {
            version: RATE_LIMITER_STATE_VERSION,
            bandwidth: self.bandwidth.as_ref().map(|b| b.save_at(now)),
            ops: self.ops.as_ref().map(|b| b.save_at(now)),
        }
    }

    /// A limiter from a saved state, unblocked. The whole state is checked first; on error
    /// nothing is created.
    pub fn restore(state: &RateLimiterState) -> Result<RateLimiter, PersistError> {
        Self::restore_at(state, Instant::now())
    }

    pub(super) fn restore_at(state: &RateLimiterState, now: Instant) -> Result<RateLimiter, PersistError> {
        if state.version != RATE_LIMITER_STATE_VERSION {
            return Err(PersistError::UnsupportedVersion { found: state.version });
        }
        let bucket = |bucket, state: &Option<TokenBucketState>| {
            state.as_ref().map(|s| TokenBucket::restore_at(bucket, s, now)).transpose()
        };
        let bandwidth = bucket(TokenType::Bytes, &state.bandwidth)?;
        let ops = bucket(TokenType::Ops, &state.ops)?;
        let timer = new_timer().map_err(PersistError::CreateTimer)?;
        Ok(RateLimiter::from_parts(bandwidth, ops, timer))
    }
}

impl TokenBucket {
    fn save_at(&self, now: Instant) -> TokenBucketState {
        let elapsed = u64::try_from(now.saturating_duration_since(self.last_update).as_nanos()).unwrap_or(u64::MAX);
        TokenBucketState {
            config: self.config,
            budget: self.budget,
            one_time_burst: self.one_time_burst,
            debt: self.debt,
            refill_remainder: self.remainder,
            // Past the time to fill up, the bucket is simply full: record no more than that.
            elapsed_ns: u64::try_from(u128::from(elapsed).min(self.ns_to_full())).unwrap_or(u64::MAX),
        }
    }

    /// Checks `state` against the bucket invariants, then builds the bucket as it was
    /// `state.elapsed_ns` before `now`.
    fn restore_at(bucket: TokenType, state: &TokenBucketState, now: Instant) -> Result<TokenBucket, PersistError> {
        let mut restored =
            TokenBucket::new_at(state.config, now).map_err(|error| PersistError::InvalidConfig { bucket, error })?;
        let size = state.config.size;
        if state.budget > size {
            return Err(PersistError::BudgetOverSize { bucket, budget: state.budget, size });
        }
        if state.one_time_burst > state.config.one_time_burst {
            return Err(PersistError::BurstOverConfigured {
                bucket,
                left: state.one_time_burst,
                configured: state.config.one_time_burst,
            });
        }
        if state.debt > 0 && state.budget > 0 {
            return Err(PersistError::DebtWithBudget { bucket, debt: state.debt, budget: state.budget });
        }
        if state.debt > 0 && state.one_time_burst > 0 {
            return Err(PersistError::DebtWithBurst { bucket, debt: state.debt, left: state.one_time_burst });
        }
        if state.refill_remainder >= restored.refill_ns {
            return Err(PersistError::RemainderOutOfRange {
                bucket,
                remainder: state.refill_remainder,
                refill_ns: restored.refill_ns,
            });
        }
        if state.refill_remainder > 0 && state.debt == 0 && state.budget == size {
            return Err(PersistError::RemainderOnFullBucket { bucket, remainder: state.refill_remainder });
        }
        restored.budget = state.budget;
        restored.one_time_burst = state.one_time_burst;
        restored.debt = state.debt;
        restored.remainder = state.refill_remainder;
        let max_ns = restored.ns_to_full();
        if u128::from(state.elapsed_ns) > max_ns {
            return Err(PersistError::ElapsedTooLong { bucket, elapsed_ns: state.elapsed_ns, max_ns });
        }
        match now.checked_sub(Duration::from_nanos(state.elapsed_ns)) {
            Some(last_update) => restored.last_update = last_update,
            // Not representable (only just after boot): credit the refill right away instead.
            None => restored.refill_for(state.elapsed_ns),
        }
        Ok(restored)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rate_limiter::{MAX_REFILL_TIME_MS, RateLimiterConfig};

    fn bucket_config(size: u64, one_time_burst: u64, refill_time_ms: u64) -> TokenBucketConfig {
        TokenBucketConfig { size, one_time_burst, refill_time_ms }
    }

    fn limiter(t0: Instant) -> RateLimiter {
        let config =
            RateLimiterConfig { bandwidth: Some(bucket_config(1000, 500, 1000)), ops: Some(bucket_config(3, 0, 1000)) };
        RateLimiter::new_at(config, t0).unwrap()
    }

    /// A valid state with a partly used bandwidth bucket, for corrupting one field at a time.
    fn bucket_state() -> TokenBucketState {
        TokenBucketState {
            config: bucket_config(1000, 500, 1000),
            budget: 400,
            one_time_burst: 0,
            debt: 0,
            refill_remainder: 123_000,
            elapsed_ns: 1000,
        }
    }

    fn state_with(bandwidth: TokenBucketState) -> RateLimiterState {
        RateLimiterState { version: RATE_LIMITER_STATE_VERSION, bandwidth: Some(bandwidth), ops: None }
    }

    #[test]
    fn test_persist_fresh_limiter_round_trip_is_equal() {
        let t0 = Instant::now();
        let l = limiter(t0);

        let restored = RateLimiter::restore_at(&l.save_at(t0), t0);

        assert_eq!(restored.unwrap(), l);
    }

    #[test]
    fn test_persist_used_limiter_round_trip_is_equal() {
        let t0 = Instant::now();
        let mut l = limiter(t0);
        assert!(l.consume_at(900, TokenType::Bytes, t0));
        assert!(l.consume_at(2, TokenType::Ops, t0 + Duration::from_millis(10)));
        let t1 = t0 + Duration::from_millis(123);
        assert!(l.consume_at(1, TokenType::Ops, t1)); // leaves a refill remainder
        let t2 = t1 + Duration::from_millis(77);

        let state = l.save_at(t2);
        let restored = RateLimiter::restore_at(&state, t2).unwrap();

        assert_ne!(state.ops.as_ref().map(|s| s.refill_remainder), Some(0));
        assert_eq!(restored, l);
        assert_eq!(restored.save_at(t2), state);
    }

    #[test]
    fn test_persist_limiter_in_debt_round_trip_is_equal() {
        let t0 = Instant::now();
        let mut l = limiter(t0);
        assert!(l.consume_at(5000, TokenType::Bytes, t0));
        let t1 = t0 + Duration::from_millis(1500);

        let restored = RateLimiter::restore_at(&l.save_at(t1), t1).unwrap();

        assert_eq!(restored.bandwidth().map(|b| b.debt()), Some(3500));
        assert_eq!(restored, l);
    }

    #[test]
    fn test_persist_limiter_without_buckets_round_trip_is_equal() {
        let t0 = Instant::now();
        let l = RateLimiter::new_at(RateLimiterConfig::default(), t0).unwrap();

        let restored = RateLimiter::restore(&l.save());

        assert_eq!(restored.unwrap(), l);
    }

    #[test]
    fn test_persist_restore_is_unblocked_and_blocks_again_when_short() {
        let t0 = Instant::now();
        let mut l = limiter(t0);
        assert!(l.consume_at(3, TokenType::Ops, t0));
        assert!(!l.consume_at(1, TokenType::Ops, t0));

        let mut restored = RateLimiter::restore_at(&l.save_at(t0), t0).unwrap();
        let unblocked = !restored.is_blocked();
        let ok = restored.consume_at(1, TokenType::Ops, t0);

        assert!(unblocked);
        assert!(!ok);
        assert!(restored.is_blocked());
    }

    #[test]
    fn test_persist_downtime_between_save_and_restore_does_not_refill() {
        let t0 = Instant::now();
        let mut l = limiter(t0);
        assert!(l.consume_at(3, TokenType::Ops, t0));
        let state = l.save_at(t0 + Duration::from_millis(100));

        let restored = RateLimiter::restore_at(&state, t0 + Duration::from_secs(60)).unwrap();

        assert_eq!(restored.save_at(t0 + Duration::from_secs(60)), state);
    }

    #[test]
    fn test_persist_save_idle_full_bucket_records_no_elapsed_time() {
        let t0 = Instant::now();
        let l = limiter(t0);

        let state = l.save_at(t0 + Duration::from_secs(3600));

        assert_eq!(state.bandwidth.map(|s| s.elapsed_ns), Some(0));
    }

    #[test]
    fn test_persist_save_long_idle_bucket_caps_elapsed_at_time_to_full() {
        let t0 = Instant::now();
        let mut l = limiter(t0);
        assert!(l.consume_at(3, TokenType::Ops, t0));

        let t1 = t0 + Duration::from_secs(3600);

        let state = l.save_at(t1);
        let mut restored = RateLimiter::restore_at(&state, t1).unwrap().ops().unwrap().clone();
        restored.replenish(t1);

        assert_eq!(state.ops.map(|s| s.elapsed_ns), Some(1_000_000_000));
        assert_eq!(restored.budget, 3);
    }

    #[test]
    fn test_persist_restore_valid_corruption_base_state_is_ok() {
        let result = RateLimiter::restore(&state_with(bucket_state()));

        assert!(result.is_ok(), "{result:?}");
    }

    #[test]
    fn test_persist_restore_wrong_version_is_error() {
        let state = RateLimiterState { version: 2, bandwidth: None, ops: None };

        let result = RateLimiter::restore(&state);

        assert!(matches!(result, Err(PersistError::UnsupportedVersion { found: 2 })), "{result:?}");
    }

    #[test]
    fn test_persist_restore_zero_size_is_error() {
        let state = state_with(TokenBucketState { config: bucket_config(0, 500, 1000), budget: 0, ..bucket_state() });

        let result = RateLimiter::restore(&state);

        assert!(
            matches!(
                result,
                Err(PersistError::InvalidConfig { bucket: TokenType::Bytes, error: TokenBucketConfigError::ZeroSize })
            ),
            "{result:?}"
        );
    }

    #[test]
    fn test_persist_restore_zero_refill_time_is_error() {
        let state = state_with(TokenBucketState { config: bucket_config(1000, 500, 0), ..bucket_state() });

        let result = RateLimiter::restore(&state);

        assert!(
            matches!(result, Err(PersistError::InvalidConfig { error: TokenBucketConfigError::ZeroRefillTime, .. })),
            "{result:?}"
        );
    }

    #[test]
    fn test_persist_restore_refill_time_u64_max_is_error() {
        let state = state_with(TokenBucketState { config: bucket_config(1000, 500, u64::MAX), ..bucket_state() });

        let result = RateLimiter::restore(&state);

        assert!(
            matches!(
                result,
                Err(PersistError::InvalidConfig { error: TokenBucketConfigError::RefillTimeTooLong(_), .. })
            ),
            "{result:?}"
        );
    }

    #[test]
    fn test_persist_restore_budget_over_size_is_error() {
        let state = state_with(TokenBucketState { budget: 1001, ..bucket_state() });

        let result = RateLimiter::restore(&state);

        assert!(matches!(result, Err(PersistError::BudgetOverSize { budget: 1001, size: 1000, .. })), "{result:?}");
    }

    #[test]
    fn test_persist_restore_burst_over_configured_is_error() {
        let state = state_with(TokenBucketState { one_time_burst: 501, ..bucket_state() });

        let result = RateLimiter::restore(&state);

        assert!(
            matches!(result, Err(PersistError::BurstOverConfigured { left: 501, configured: 500, .. })),
            "{result:?}"
        );
    }

    #[test]
    fn test_persist_restore_debt_with_budget_is_error() {
        let state = state_with(TokenBucketState { debt: 1, ..bucket_state() });

        let result = RateLimiter::restore(&state);

        assert!(matches!(result, Err(PersistError::DebtWithBudget { debt: 1, budget: 400, .. })), "{result:?}");
    }

    #[test]
    fn test_persist_restore_debt_with_burst_is_error() {
        let state = state_with(TokenBucketState { budget: 0, one_time_burst: 10, debt: 1, ..bucket_state() });

        let result = RateLimiter::restore(&state);

        assert!(matches!(result, Err(PersistError::DebtWithBurst { debt: 1, left: 10, .. })), "{result:?}");
    }

    #[test]
    fn test_persist_restore_remainder_of_a_whole_token_is_error() {
        let state = state_with(TokenBucketState { refill_remainder: 1_000_000_000, ..bucket_state() });

        let result = RateLimiter::restore(&state);

        assert!(
            matches!(result, Err(PersistError::RemainderOutOfRange { refill_ns: 1_000_000_000, .. })),
            "{result:?}"
        );
    }

    #[test]
    fn test_persist_restore_remainder_on_full_bucket_is_error() {
        let state = state_with(TokenBucketState { budget: 1000, elapsed_ns: 0, ..bucket_state() });

        let result = RateLimiter::restore(&state);

        assert!(matches!(result, Err(PersistError::RemainderOnFullBucket { remainder: 123_000, .. })), "{result:?}");
    }

    #[test]
    fn test_persist_restore_elapsed_past_time_to_full_is_error() {
        // 600 tokens at 1000 per second, less the remainder of 0.123 token: 599_999_877 ns.
        let state = state_with(TokenBucketState { elapsed_ns: 599_999_878, ..bucket_state() });

        let result = RateLimiter::restore(&state);

        assert!(matches!(result, Err(PersistError::ElapsedTooLong { max_ns: 599_999_877, .. })), "{result:?}");
    }

    #[test]
    fn test_persist_restore_elapsed_exactly_time_to_full_fills_bucket() {
        let t0 = Instant::now();
        let state = state_with(TokenBucketState { elapsed_ns: 599_999_877, ..bucket_state() });

        let restored = RateLimiter::restore_at(&state, t0).unwrap();

        let mut bucket = restored.bandwidth().unwrap().clone();
        bucket.replenish(t0);
        assert_eq!((bucket.budget, bucket.remainder), (1000, 0));
    }

    #[test]
    fn test_persist_restore_corrupt_ops_bucket_names_it() {
        let state = RateLimiterState {
            version: RATE_LIMITER_STATE_VERSION,
            bandwidth: Some(bucket_state()),
            ops: Some(TokenBucketState { budget: 2000, ..bucket_state() }),
        };

        let error = RateLimiter::restore(&state).unwrap_err();

        assert!(matches!(error, PersistError::BudgetOverSize { bucket: TokenType::Ops, .. }), "{error:?}");
        assert_eq!(error.to_string(), "ops bucket state: budget 2000 exceeds the size 1000");
    }

    #[test]
    fn test_persist_restore_all_u64_max_fields_is_error_without_panic() {
        let max = TokenBucketState {
            config: bucket_config(u64::MAX, u64::MAX, u64::MAX),
            budget: u64::MAX,
            one_time_burst: u64::MAX,
            debt: u64::MAX,
            refill_remainder: u64::MAX,
            elapsed_ns: u64::MAX,
        };
        let state = RateLimiterState { version: u16::MAX, bandwidth: Some(max.clone()), ops: Some(max.clone()) };
        let versioned = RateLimiterState { version: RATE_LIMITER_STATE_VERSION, ..state.clone() };
        let valid_config = state_with(TokenBucketState { config: bucket_config(u64::MAX, u64::MAX, 1), ..max });

        let by_version = RateLimiter::restore(&state);
        let by_config = RateLimiter::restore(&versioned);
        let by_fields = RateLimiter::restore(&valid_config);

        assert!(matches!(by_version, Err(PersistError::UnsupportedVersion { .. })), "{by_version:?}");
        assert!(matches!(by_config, Err(PersistError::InvalidConfig { .. })), "{by_config:?}");
        assert!(matches!(by_fields, Err(PersistError::DebtWithBudget { .. })), "{by_fields:?}");
    }

    #[test]
    fn test_persist_restore_u64_max_config_with_max_debt_is_ok() {
        let state = state_with(TokenBucketState {
            config: bucket_config(u64::MAX, u64::MAX, MAX_REFILL_TIME_MS),
            budget: 0,
            one_time_burst: 0,
            debt: u64::MAX,
            refill_remainder: 0,
            elapsed_ns: MAX_REFILL_TIME_MS * 1_000_000,
        });

        let restored = RateLimiter::restore(&state).unwrap();

        assert_eq!(restored.bandwidth().map(|b| b.capacity()), Some(u64::MAX));
    }
}
