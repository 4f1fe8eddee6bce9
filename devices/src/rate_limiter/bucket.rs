//! A token bucket with continuous, drift-free refill.
//!
//! Tokens are credited in proportion to the time elapsed, `elapsed_ns * size / refill_ns`,
//! in exact integer arithmetic. The fraction of a token that a step leaves over is kept (as
//! `remainder`, in units of nanoseconds × tokens) and counted in the next step, so a million
//! steps of one microsecond credit exactly what one step of a second does.

use std::time::{Duration, Instant};

use super::config::{TokenBucketConfig, TokenBucketConfigError};

pub(super) const NANOS_PER_MILLI: u64 = 1_000_000;
const NANOS_PER_SEC: u128 = 1_000_000_000;

/// The outcome of [`TokenBucket::reduce`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum BucketReduction {
    /// The tokens were taken.
    Success,
    /// Not enough tokens; nothing was taken.
    Failure,
    /// The request was larger than the whole bucket and went through because the bucket was
    /// full. The bucket is now in debt; the value is that debt in refill periods
    /// (`debt / size`), i.e. how many `refill_time_ms` pass before the debt is repaid.
    /// [`TokenBucket::time_until_debt_repaid`] gives the exact time.
    OverConsumption(f64),
}

/// A token bucket: `size` tokens that refill continuously over `refill_time_ms`, plus a
/// one-time burst that is spent first and never refilled.
///
/// Invariants (kept by every method, checked on restore): `budget <= size`;
/// `one_time_burst <= config.one_time_burst`; `debt > 0` implies `budget == 0` and no burst left;
/// `remainder < refill_ns`, and `remainder == 0` when the bucket is full.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    pub(super) config: TokenBucketConfig,
    /// `config.refill_time_ms` in nanoseconds; validation bounds it to one day, so every
    /// product below fits in a `u128`.
    pub(super) refill_ns: u64,
    /// Regular tokens available as of `last_update`.
    pub(super) budget: u64,
    /// One-time burst tokens left.
    pub(super) one_time_burst: u64,
    /// Tokens taken beyond an empty bucket by an over-sized request; repaid by the refill
    /// before the budget grows again.
    pub(super) debt: u64,
    /// Refill progress towards the next token, in nanoseconds × tokens (`< refill_ns`).
    pub(super) remainder: u64,
    /// The instant up to which refill has been credited.
    pub(super) last_update: Instant,
}

impl PartialEq for TokenBucket {
    /// Equal configuration and state. The time of the last refill only matters while the
    /// bucket is not full: a full bucket is the same whenever it filled up.
    fn eq(&self, other: &Self) -> bool {
        self.config == other.config
            && self.budget == other.budget
            && self.one_time_burst == other.one_time_burst
            && self.debt == other.debt
            && self.remainder == other.remainder
            && (self.last_update == other.last_update || (self.is_full() && other.is_full()))
    }
}

impl Eq for TokenBucket {}

impl TokenBucket {
    /// A full bucket, with its whole one-time burst.
    pub fn new(config: TokenBucketConfig) -> Result<Self, TokenBucketConfigError> {
        Self::new_at(config, Instant::now())
    }

    pub(super) fn new_at(config: TokenBucketConfig, now: Instant) -> Result<Self, TokenBucketConfigError> {
        config.validate()?;
        Ok(TokenBucket {
            config,
            refill_ns: config.refill_time_ms.saturating_mul(NANOS_PER_MILLI),
            budget: config.size,
            one_time_burst: config.one_time_burst,
            debt: 0,
            remainder: 0,
            last_update: now,
        })
    }

    /// Takes `tokens`, from the one-time burst first and then from the budget. A failed
    /// reduction takes nothing.
    pub fn reduce(&mut self, tokens: u64) -> BucketReduction {
        self.reduce_at(tokens, Instant::now())
    }

    pub(super) fn reduce_at(&mut self, tokens: u64, now: Instant) -> BucketReduction {
        self.replenish(now);
        if tokens <= self.one_time_burst {
            self.one_time_burst -= tokens;
            return BucketReduction::Success;
        }
        let rest = tokens - self.one_time_burst;
        if rest <= self.budget {
            self.one_time_burst = 0;
            self.budget -= rest;
            return BucketReduction::Success;
        }
        // A request larger than the whole bucket could never be satisfied by waiting; let it
        // through once the bucket is full and make the guest pay it back over time.
        if rest > self.config.size && self.is_full() {
            self.one_time_burst = 0;
            self.budget = 0;
            self.debt = rest - self.config.size;
            tracing::debug!(tokens, size = self.config.size, debt = self.debt, "rate limiter bucket over-consumed");
            return BucketReduction::OverConsumption(self.debt as f64 / self.config.size as f64);
        }
        BucketReduction::Failure
    }

    /// Gives tokens back, e.g. those of a request that was taken but could not be processed.
    /// They repay debt first, then fill the budget up to `size`; what is left returns to the
    /// one-time burst only while that is not used up (up to the configured burst), so a
    /// spent burst is never regained. Anything beyond that is dropped.
    pub fn force_replenish(&mut self, tokens: u64) {
        let repaid = tokens.min(self.debt);
        self.debt -= repaid;
        let mut rest = tokens - repaid;
        if self.debt == 0 {
            let added = rest.min(self.config.size - self.budget);
            self.budget += added;
            rest -= added;
        }
        if self.is_full() {
            self.remainder = 0;
        }
        if self.one_time_burst > 0 {
            self.one_time_burst = self.one_time_burst.saturating_add(rest).min(self.config.one_time_burst);
        }
    }

    /// How long until a reduction of `tokens` would succeed (zero if it would now). A request
    /// larger than the bucket waits until the bucket is full (and out of debt).
    pub fn time_until_available(&self, tokens: u64) -> Duration {
        self.time_until_available_at(tokens, Instant::now())
    }

    pub(super) fn time_until_available_at(&self, tokens: u64, now: Instant) -> Duration {
        let mut current = self.clone();
        current.replenish(now);
        current.wait_for(tokens)
    }

    /// How long until the debt left by an over-sized request is repaid (zero without debt).
    pub fn time_until_debt_repaid(&self) -> Duration {
        self.time_until_debt_repaid_at(Instant::now())
    }

    pub(super) fn time_until_debt_repaid_at(&self, now: Instant) -> Duration {
        let mut current = self.clone();
        current.replenish(now);
        current.debt_wait()
    }

    /// `time_until_debt_repaid` for a bucket already replenished up to the present.
    pub(super) fn debt_wait(&self) -> Duration {
        ns_to_duration(self.ns_to_produce(u128::from(self.debt)))
    }

    /// `time_until_available` for a bucket already replenished up to the present.
    pub(super) fn wait_for(&self, tokens: u64) -> Duration {
        if tokens <= self.one_time_burst {
            return Duration::ZERO;
        }
        let target = (tokens - self.one_time_burst).min(self.config.size);
        let needed = u128::from(self.debt) + u128::from(target.saturating_sub(self.budget));
        ns_to_duration(self.ns_to_produce(needed))
    }

    /// Nanoseconds of refill after `last_update` that bring the bucket to full.
    pub(super) fn ns_to_full(&self) -> u128 {
        self.ns_to_produce(u128::from(self.debt) + u128::from(self.config.size - self.budget))
    }

    /// Nanoseconds of refill after `last_update` that produce `tokens` more tokens: the
    /// smallest `t` with `t * size + remainder >= tokens * refill_ns`.
    fn ns_to_produce(&self, tokens: u128) -> u128 {
        if tokens == 0 {
            return 0;
        }
        // tokens < 2^65 and refill_ns < 2^47: no overflow. remainder < refill_ns <= the product.
        let work = tokens * u128::from(self.refill_ns) - u128::from(self.remainder);
        work.div_ceil(u128::from(self.config.size))
    }

    /// Credits the refill for the time since `last_update`. An earlier `now` credits nothing.
    pub(super) fn replenish(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last_update);
        if now > self.last_update {
            self.last_update = now;
        }
        self.refill_for(u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX));
    }

    /// Credits `elapsed_ns` of refill. Time spent full is lost, as it would be in a real bucket.
    pub(super) fn refill_for(&mut self, elapsed_ns: u64) {
        if self.is_full() {
            self.remainder = 0;
            return;
        }
        // elapsed_ns * size < 2^128 - 2^65, remainder < 2^47: no overflow.
        let progress = u128::from(elapsed_ns) * u128::from(self.config.size) + u128::from(self.remainder);
        let refill_ns = u128::from(self.refill_ns);
        let mut tokens = progress / refill_ns;
        let missing = u128::from(self.debt) + u128::from(self.config.size - self.budget);
        if tokens >= missing {
            self.debt = 0;
            self.budget = self.config.size;
            self.remainder = 0;
            return;
        }
        // Below `missing`, so every quantity below fits in a u64.
        self.remainder = saturate_u64(progress % refill_ns);
        let repaid = tokens.min(u128::from(self.debt));
        self.debt -= saturate_u64(repaid);
        tokens -= repaid;
        self.budget += saturate_u64(tokens);
    }

    fn is_full(&self) -> bool {
        self.debt == 0 && self.budget == self.config.size
    }

    /// Tokens the bucket holds when full and regains per refill period.
    pub fn capacity(&self) -> u64 {
        self.config.size
    }

    /// Regular tokens available now (the one-time burst not included; zero while in debt).
    pub fn budget(&self) -> u64 {
        let mut current = self.clone();
        current.replenish(Instant::now());
        current.budget
    }

    /// One-time burst tokens left.
    pub fn one_time_burst(&self) -> u64 {
        self.one_time_burst
    }

    /// Tokens owed after an over-sized request, as of the last update.
    pub fn debt(&self) -> u64 {
        self.debt
    }

    /// Milliseconds to refill `capacity()` tokens from empty.
    pub fn refill_time_ms(&self) -> u64 {
        self.config.refill_time_ms
    }

    /// The configuration the bucket was built from.
    pub fn config(&self) -> TokenBucketConfig {
        self.config
    }
}

fn saturate_u64(x: u128) -> u64 {
    u64::try_from(x).unwrap_or(u64::MAX)
}

/// A nanosecond count as a `Duration`, saturating at `Duration::MAX`.
fn ns_to_duration(ns: u128) -> Duration {
    match u64::try_from(ns / NANOS_PER_SEC) {
        // The remainder is below 10^9 and fits in a u32.
        Ok(secs) => Duration::new(secs, (ns % NANOS_PER_SEC) as u32),
        Err(_) => Duration::MAX,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rate_limiter::config::MAX_REFILL_TIME_MS;

    fn config(size: u64, one_time_burst: u64, refill_time_ms: u64) -> TokenBucketConfig {
        TokenBucketConfig { size, one_time_burst, refill_time_ms }
    }

    fn bucket(size: u64, one_time_burst: u64, refill_time_ms: u64, now: Instant) -> TokenBucket {
        TokenBucket::new_at(config(size, one_time_burst, refill_time_ms), now).unwrap()
    }

    /// A bucket emptied at `now` (no burst).
    fn empty_bucket(size: u64, refill_time_ms: u64, now: Instant) -> TokenBucket {
        let mut b = bucket(size, 0, refill_time_ms, now);
        assert_eq!(b.reduce_at(size, now), BucketReduction::Success);
        b
    }

    #[test]
    fn test_bucket_new_starts_full_with_whole_burst() {
        let t0 = Instant::now();

        let b = bucket(1000, 300, 1000, t0);

        assert_eq!(b.budget, 1000);
        assert_eq!(b.one_time_burst, 300);
        assert_eq!(b.debt, 0);
        assert_eq!(b.capacity(), 1000);
        assert_eq!(b.refill_time_ms(), 1000);
    }

    #[test]
    fn test_bucket_new_invalid_config_is_error() {
        let result = TokenBucket::new(config(0, 0, 1000));

        assert_eq!(result, Err(TokenBucketConfigError::ZeroSize));
    }

    #[test]
    fn test_bucket_refill_partial_period_adds_proportional_tokens() {
        let t0 = Instant::now();
        let mut b = empty_bucket(1000, 1000, t0);

        b.replenish(t0 + Duration::from_millis(250));

        assert_eq!(b.budget, 250);
        assert_eq!(b.remainder, 0);
    }

    #[test]
    fn test_bucket_refill_million_micro_steps_equals_one_second_step() {
        // 999_983 tokens per 3 s: a third of a token per microsecond, never a whole number.
        let t0 = Instant::now();
        let mut stepped = empty_bucket(999_983, 3000, t0);
        let mut single = stepped.clone();

        for i in 1..=1_000_000u64 {
            stepped.replenish(t0 + Duration::from_micros(i));
        }
        single.replenish(t0 + Duration::from_secs(1));

        assert_eq!(stepped.budget, 999_983 / 3);
        assert_eq!(stepped, single);
    }

    #[test]
    fn test_bucket_refill_uneven_steps_match_exact_fraction() {
        let t0 = Instant::now();
        let mut b = empty_bucket(7, 1, t0);
        let mut now = t0;

        // 3 ns steps up to 999_999 ns: exactly floor(7 * 999_999 / 10^6) = 6 tokens.
        for _ in 0..333_333 {
            now += Duration::from_nanos(3);
            b.replenish(now);
        }

        assert_eq!(b.budget, 6);
        assert_eq!(b.remainder, 7 * 999_999 - 6 * 1_000_000);
    }

    #[test]
    fn test_bucket_refill_long_idle_stops_at_size() {
        let t0 = Instant::now();
        let mut b = empty_bucket(1000, 1000, t0);

        b.replenish(t0 + Duration::from_secs(3600));

        assert_eq!(b.budget, 1000);
        assert_eq!(b.remainder, 0);
    }

    #[test]
    fn test_bucket_refill_time_while_full_is_not_credited_later() {
        let t0 = Instant::now();
        let mut b = bucket(1000, 0, 1000, t0);
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(b.reduce_at(1000, t1), BucketReduction::Success);

        b.replenish(t1 + Duration::from_millis(100));

        assert_eq!(b.budget, 100);
    }

    #[test]
    fn test_bucket_replenish_earlier_instant_adds_nothing() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_millis(500);
        let mut b = empty_bucket(1000, 1000, t1);

        b.replenish(t0);

        assert_eq!(b.budget, 0);
        assert_eq!(b.last_update, t1);
    }

    #[test]
    fn test_bucket_reduce_uses_one_time_burst_first() {
        let t0 = Instant::now();
        let mut b = bucket(1000, 300, 1000, t0);

        let result = b.reduce_at(200, t0);

        assert_eq!(result, BucketReduction::Success);
        assert_eq!(b.one_time_burst, 100);
        assert_eq!(b.budget, 1000);
    }

    #[test]
    fn test_bucket_reduce_beyond_burst_takes_rest_from_budget() {
        let t0 = Instant::now();
        let mut b = bucket(1000, 300, 1000, t0);

        let result = b.reduce_at(500, t0);

        assert_eq!(result, BucketReduction::Success);
        assert_eq!(b.one_time_burst, 0);
        assert_eq!(b.budget, 800);
    }

    #[test]
    fn test_bucket_one_time_burst_spent_is_never_refilled() {
        let t0 = Instant::now();
        let mut b = bucket(1000, 300, 1000, t0);
        assert_eq!(b.reduce_at(1300, t0), BucketReduction::Success);

        b.replenish(t0 + Duration::from_secs(3600));

        assert_eq!(b.one_time_burst, 0);
        assert_eq!(b.budget, 1000);
    }

    #[test]
    fn test_bucket_reduce_failure_takes_nothing() {
        let t0 = Instant::now();
        let mut b = bucket(1000, 300, 1000, t0);
        assert_eq!(b.reduce_at(1200, t0), BucketReduction::Success);
        let before = b.clone();

        let result = b.reduce_at(200, t0);

        assert_eq!(result, BucketReduction::Failure);
        assert_eq!(b, before);
    }

    #[test]
    fn test_bucket_reduce_failure_keeps_unspent_burst() {
        let t0 = Instant::now();
        let mut b = bucket(1000, 100, 1000, t0);
        assert_eq!(b.reduce_at(50, t0), BucketReduction::Success);
        b.budget = 10; // as if an update had shrunk the budget under a live burst

        let result = b.reduce_at(100, t0);

        assert_eq!(result, BucketReduction::Failure);
        assert_eq!(b.one_time_burst, 50);
    }

    #[test]
    fn test_bucket_reduce_over_size_on_full_bucket_leaves_debt() {
        let t0 = Instant::now();
        let mut b = bucket(1000, 0, 1000, t0);

        let result = b.reduce_at(3500, t0);

        assert_eq!(result, BucketReduction::OverConsumption(2.5));
        assert_eq!(b.budget, 0);
        assert_eq!(b.debt, 2500);
    }

    #[test]
    fn test_bucket_reduce_over_size_spends_burst_first() {
        let t0 = Instant::now();
        let mut b = bucket(1000, 500, 1000, t0);

        let result = b.reduce_at(2000, t0);

        assert_eq!(result, BucketReduction::OverConsumption(0.5));
        assert_eq!(b.one_time_burst, 0);
        assert_eq!(b.debt, 500);
    }

    #[test]
    fn test_bucket_reduce_over_size_on_partial_bucket_fails() {
        let t0 = Instant::now();
        let mut b = bucket(1000, 0, 1000, t0);
        assert_eq!(b.reduce_at(1, t0), BucketReduction::Success);

        let result = b.reduce_at(1500, t0);

        assert_eq!(result, BucketReduction::Failure);
        assert_eq!(b.budget, 999);
        assert_eq!(b.debt, 0);
    }

    #[test]
    fn test_bucket_reduce_in_debt_fails_until_repaid() {
        let t0 = Instant::now();
        let mut b = bucket(1000, 0, 1000, t0);
        assert_eq!(b.reduce_at(3000, t0), BucketReduction::OverConsumption(2.0));

        let result = b.reduce_at(1, t0 + Duration::from_millis(1999));

        assert_eq!(result, BucketReduction::Failure);
        assert_eq!(b.debt, 1);
        assert_eq!(b.budget, 0);
    }

    #[test]
    fn test_bucket_debt_repaid_before_budget_grows() {
        let t0 = Instant::now();
        let mut b = bucket(1000, 0, 1000, t0);
        assert_eq!(b.reduce_at(3000, t0), BucketReduction::OverConsumption(2.0));

        b.replenish(t0 + Duration::from_millis(2300));

        assert_eq!(b.debt, 0);
        assert_eq!(b.budget, 300);
    }

    #[test]
    fn test_bucket_time_until_available_is_exact() {
        let t0 = Instant::now();
        let b = empty_bucket(3, 1000, t0);

        let wait = b.time_until_available_at(2, t0);

        // 2 tokens at 3 per second: 666_666_666.67 ns, rounded up.
        assert_eq!(wait, Duration::from_nanos(666_666_667));
    }

    #[test]
    fn test_bucket_time_until_available_elapsed_makes_reduce_succeed() {
        let t0 = Instant::now();
        let mut b = empty_bucket(3, 1000, t0);
        let wait = b.time_until_available_at(2, t0);
        let mut early = b.clone();

        let on_time = b.reduce_at(2, t0 + wait);
        let too_early = early.reduce_at(2, t0 + wait - Duration::from_nanos(1));

        assert_eq!(on_time, BucketReduction::Success);
        assert_eq!(too_early, BucketReduction::Failure);
    }

    #[test]
    fn test_bucket_time_until_available_within_burst_is_zero() {
        let t0 = Instant::now();
        let mut b = bucket(10, 100, 1000, t0);
        b.budget = 0;

        let wait = b.time_until_available_at(100, t0);

        assert_eq!(wait, Duration::ZERO);
    }

    #[test]
    fn test_bucket_time_until_available_over_size_waits_for_full() {
        let t0 = Instant::now();
        let b = empty_bucket(1000, 1000, t0);

        let wait = b.time_until_available_at(1_000_000, t0);

        assert_eq!(wait, Duration::from_secs(1));
    }

    #[test]
    fn test_bucket_time_until_available_in_debt_includes_debt() {
        let t0 = Instant::now();
        let mut b = bucket(1000, 0, 1000, t0);
        assert_eq!(b.reduce_at(2500, t0), BucketReduction::OverConsumption(1.5));

        let repaid = b.time_until_debt_repaid_at(t0);
        let one_more = b.time_until_available_at(100, t0);

        assert_eq!(repaid, Duration::from_millis(1500));
        assert_eq!(one_more, Duration::from_millis(1600));
    }

    #[test]
    fn test_bucket_force_replenish_repays_debt_then_budget() {
        let t0 = Instant::now();
        let mut b = bucket(1000, 0, 1000, t0);
        assert_eq!(b.reduce_at(1500, t0), BucketReduction::OverConsumption(0.5));

        b.force_replenish(700);

        assert_eq!(b.debt, 0);
        assert_eq!(b.budget, 200);
    }

    #[test]
    fn test_bucket_force_replenish_full_budget_returns_to_live_burst() {
        let t0 = Instant::now();
        let mut b = bucket(1000, 300, 1000, t0);
        assert_eq!(b.reduce_at(200, t0), BucketReduction::Success);

        b.force_replenish(500);

        assert_eq!(b.budget, 1000);
        assert_eq!(b.one_time_burst, 300);
    }

    #[test]
    fn test_bucket_force_replenish_spent_burst_is_not_regained() {
        let t0 = Instant::now();
        let mut b = bucket(1000, 300, 1000, t0);
        assert_eq!(b.reduce_at(400, t0), BucketReduction::Success);

        b.force_replenish(400);

        assert_eq!(b.budget, 1000);
        assert_eq!(b.one_time_burst, 0);
    }

    #[test]
    fn test_bucket_force_replenish_to_full_clears_remainder() {
        let t0 = Instant::now();
        let mut b = empty_bucket(3, 1000, t0);
        b.replenish(t0 + Duration::from_millis(100));
        assert_ne!(b.remainder, 0);

        b.force_replenish(3);

        assert_eq!(b.budget, 3);
        assert_eq!(b.remainder, 0);
    }

    #[test]
    fn test_bucket_u64_max_config_does_not_panic() {
        let t0 = Instant::now();
        let mut b = bucket(u64::MAX, u64::MAX, MAX_REFILL_TIME_MS, t0);

        let burst = b.reduce_at(u64::MAX, t0);
        let budget = b.reduce_at(u64::MAX, t0);
        let refilled_budget = b.time_until_available_at(u64::MAX, t0);
        b.replenish(t0 + Duration::from_secs(1 << 40)); // more than u64::MAX nanoseconds
        b.force_replenish(u64::MAX);

        assert_eq!(burst, BucketReduction::Success);
        assert_eq!(budget, BucketReduction::Success);
        assert_eq!(refilled_budget, Duration::from_millis(MAX_REFILL_TIME_MS));
        assert_eq!(b.budget, u64::MAX);
    }

    #[test]
    fn test_bucket_u64_max_request_on_slowest_bucket_saturates_wait() {
        let t0 = Instant::now();
        let mut b = bucket(1, 0, MAX_REFILL_TIME_MS, t0);

        let result = b.reduce_at(u64::MAX, t0);
        let wait = b.time_until_available_at(u64::MAX, t0);
        b.replenish(t0 + Duration::from_secs(1 << 40)); // more than u64::MAX nanoseconds

        assert!(matches!(result, BucketReduction::OverConsumption(_)));
        assert_eq!(b.debt, u64::MAX - 1 - u64::MAX / (MAX_REFILL_TIME_MS * NANOS_PER_MILLI));
        assert_eq!(wait, Duration::MAX);
    }

    #[test]
    fn test_bucket_consume_as_fast_as_allowed_for_10s_is_within_one_percent() {
        // Simulated time: after each failure, jump to when the request can be satisfied.
        let (size, burst, request) = (1_000_000u64, 100_000u64, 1500u64);
        let t0 = Instant::now();
        let end = t0 + Duration::from_secs(10);
        let mut b = bucket(size, burst, 1000, t0);
        let mut now = t0;
        let mut total = 0u64;

        while now <= end {
            match b.reduce_at(request, now) {
                BucketReduction::Success => total += request,
                BucketReduction::Failure => now += b.wait_for(request),
                BucketReduction::OverConsumption(_) => unreachable!("requests are smaller than the bucket"),
            }
        }

        // The bucket starts full (size) with its burst, then refills size per second.
        let expected = size + burst + 10 * size;
        assert!(total.abs_diff(expected) <= 10 * size / 100, "total {total}, expected {expected}");
    }
}
