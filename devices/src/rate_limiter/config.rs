//! Rate limiter configuration: the serde form of the API, its validation, and the
//! command-line form.
//!
//! # Command-line syntax
//!
//! A comma-separated list of `key=value` items, in any order, each key at most once:
//!
//! | key         | value             | meaning                                                    |
//! |-------------|-------------------|------------------------------------------------------------|
//! | `bw`        | `SIZE[/REFILL_MS]`| bandwidth bucket: `SIZE` bytes per `REFILL_MS` ms (default 1000) |
//! | `ops`       | `SIZE[/REFILL_MS]`| operations bucket: `SIZE` requests per `REFILL_MS` ms (default 1000) |
//! | `bw_burst`  | `N`               | one-time burst of `N` bytes on top of `bw` (default 0)     |
//! | `ops_burst` | `N`               | one-time burst of `N` requests on top of `ops` (default 0) |
//!
//! Numbers are plain decimal `u64`s (no unit suffixes). Spaces around items, keys and values
//! are ignored. A bucket that is not given is not limited; a burst needs its bucket.
//!
//! Examples: `bw=10485760` (10 MiB/s); `ops=1000` (1000 requests/s);
//! `bw=1048576/100,bw_burst=67108864,ops=500` (1 MiB per 100 ms with a one-time 64 MiB
//! burst, and 500 requests/s).

use std::num::ParseIntError;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::TokenType;

/// Longest accepted refill period (one day). A longer one is almost certainly a unit mistake,
/// and the bound keeps every product in the refill arithmetic within a `u128`.
pub const MAX_REFILL_TIME_MS: u64 = 24 * 60 * 60 * 1000;

/// Refill period of the command-line form when none is given: sizes are then per second.
pub const DEFAULT_REFILL_TIME_MS: u64 = 1000;

/// One token bucket: `size` tokens refilled over `refill_time_ms`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucketConfig {
    /// Tokens (bytes or requests) the bucket holds when full and regains per refill period.
    pub size: u64,
    /// Extra tokens usable once, spent before the regular budget and never refilled.
    #[serde(default)]
    pub one_time_burst: u64,
    /// Milliseconds to refill `size` tokens from empty.
    pub refill_time_ms: u64,
}

/// Why a [`TokenBucketConfig`] is rejected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenBucketConfigError {
    #[error("size must be greater than 0 (leave the bucket out to not limit)")]
    ZeroSize,
    #[error("refill_time_ms must be greater than 0")]
    ZeroRefillTime,
    #[error("refill_time_ms is {0}, more than the maximum of {MAX_REFILL_TIME_MS} (one day)")]
    RefillTimeTooLong(u64),
}

impl TokenBucketConfig {
    /// Checks the bounds that the bucket arithmetic relies on.
    pub fn validate(&self) -> Result<(), TokenBucketConfigError> {
        if self.size == 0 {
            return Err(TokenBucketConfigError::ZeroSize);
        }
        if self.refill_time_ms == 0 {
            return Err(TokenBucketConfigError::ZeroRefillTime);
        }
        if self.refill_time_ms > MAX_REFILL_TIME_MS {
            return Err(TokenBucketConfigError::RefillTimeTooLong(self.refill_time_ms));
        }
        Ok(())
    }
}

/// A rate limiter: each bucket that is present limits its kind of token.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiterConfig {
    /// Bytes.
    #[serde(default)]
    pub bandwidth: Option<TokenBucketConfig>,
    /// Requests.
    #[serde(default)]
    pub ops: Option<TokenBucketConfig>,
}

/// Why a [`RateLimiterConfig`] is rejected; names the bucket.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid {bucket} bucket: {error}")]
pub struct RateLimiterConfigError {
    pub bucket: TokenType,
    pub error: TokenBucketConfigError,
}

impl RateLimiterConfig {
    /// Validates every bucket that is present.
    pub fn validate(&self) -> Result<(), RateLimiterConfigError> {
        for (bucket, config) in [(TokenType::Bytes, &self.bandwidth), (TokenType::Ops, &self.ops)] {
            if let Some(config) = config {
                config.validate().map_err(|error| RateLimiterConfigError { bucket, error })?;
            }
        }
        Ok(())
    }
}

/// Why a command-line rate limiter specification is rejected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RateLimiterParseError {
    #[error("empty rate limiter specification; expected e.g. `bw=10485760,ops=1000`")]
    Empty,
    #[error("empty item in rate limiter specification (stray comma?)")]
    EmptyItem,
    #[error("`{0}` is not a key=value item")]
    NotKeyValue(String),
    #[error("unknown rate limiter key `{0}`; expected bw, ops, bw_burst or ops_burst")]
    UnknownKey(String),
    #[error("rate limiter key `{0}` given more than once")]
    DuplicateKey(&'static str),
    #[error("invalid {what} `{value}` in `{key}`: {error}")]
    InvalidNumber { key: &'static str, what: &'static str, value: String, error: ParseIntError },
    #[error("`{burst_key}` given without `{bucket_key}`")]
    BurstWithoutBucket { burst_key: &'static str, bucket_key: &'static str },
    #[error(transparent)]
    Invalid(#[from] RateLimiterConfigError),
}

/// Parses the command-line form described in the [module documentation](self), and
/// validates the result.
pub fn parse_rate_limiter(spec: &str) -> Result<RateLimiterConfig, RateLimiterParseError> {
    use RateLimiterParseError as E;

    let spec = spec.trim();
    if spec.is_empty() {
        return Err(E::Empty);
    }
    let (mut bw, mut ops, mut bw_burst, mut ops_burst) = (None, None, None, None);
    for item in spec.split(',') {
        let item = item.trim();
        if item.is_empty() {
            return Err(E::EmptyItem);
        }
        let (key, value) = item.split_once('=').ok_or_else(|| E::NotKeyValue(item.to_string()))?;
        let value = value.trim();
        match key.trim() {
            "bw" => set_once(&mut bw, "bw", parse_size_refill("bw", value)?)?,
            "ops" => set_once(&mut ops, "ops", parse_size_refill("ops", value)?)?,
            "bw_burst" => set_once(&mut bw_burst, "bw_burst", parse_number("bw_burst", "burst", value)?)?,
            "ops_burst" => set_once(&mut ops_burst, "ops_burst", parse_number("ops_burst", "burst", value)?)?,
            other => return Err(E::UnknownKey(other.to_string())),
        }
    }
    let config = RateLimiterConfig {
        bandwidth: bucket_config(bw, bw_burst, "bw", "bw_burst")?,
        ops: bucket_config(ops, ops_burst, "ops", "ops_burst")?,
    };
    config.validate()?;
    Ok(config)
}

impl FromStr for RateLimiterConfig {
    type Err = RateLimiterParseError;

    /// See [`parse_rate_limiter`].
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_rate_limiter(s)
    }
}

fn set_once<T>(slot: &mut Option<T>, key: &'static str, value: T) -> Result<(), RateLimiterParseError> {
    if slot.replace(value).is_some() {
        return Err(RateLimiterParseError::DuplicateKey(key));
    }
    Ok(())
}

fn parse_number(key: &'static str, what: &'static str, value: &str) -> Result<u64, RateLimiterParseError> {
    value.parse().map_err(|error| RateLimiterParseError::InvalidNumber { key, what, value: value.to_string(), error })
}

/// `SIZE[/REFILL_MS]` as `(size, refill_time_ms)`.
fn parse_size_refill(key: &'static str, value: &str) -> Result<(u64, u64), RateLimiterParseError> {
    match value.split_once('/') {
        Some((size, refill)) => {
            Ok((parse_number(key, "size", size.trim())?, parse_number(key, "refill time", refill.trim())?))
        }
        None => Ok((parse_number(key, "size", value)?, DEFAULT_REFILL_TIME_MS)),
    }
}

fn bucket_config(
    size_refill: Option<(u64, u64)>,
    burst: Option<u64>,
    bucket_key: &'static str,
    burst_key: &'static str,
) -> Result<Option<TokenBucketConfig>, RateLimiterParseError> {
    match (size_refill, burst) {
        (None, None) => Ok(None),
        (None, Some(_)) => Err(RateLimiterParseError::BurstWithoutBucket { burst_key, bucket_key }),
        (Some((size, refill_time_ms)), burst) => {
            Ok(Some(TokenBucketConfig { size, one_time_burst: burst.unwrap_or(0), refill_time_ms }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::de::value::{Error as DeError, MapDeserializer};

    fn bucket(size: u64, one_time_burst: u64, refill_time_ms: u64) -> TokenBucketConfig {
        TokenBucketConfig { size, one_time_burst, refill_time_ms }
    }

    fn invalid_number(key: &'static str, what: &'static str, value: &str) -> RateLimiterParseError {
        let error = value.parse::<u64>().unwrap_err();
        RateLimiterParseError::InvalidNumber { key, what, value: value.to_string(), error }
    }

    #[test]
    fn test_config_validate_zero_size_is_error() {
        let result = bucket(0, 0, 1000).validate();

        assert_eq!(result, Err(TokenBucketConfigError::ZeroSize));
    }

    #[test]
    fn test_config_validate_zero_refill_time_is_error() {
        let result = bucket(1, 0, 0).validate();

        assert_eq!(result, Err(TokenBucketConfigError::ZeroRefillTime));
    }

    #[test]
    fn test_config_validate_refill_time_over_one_day_is_error() {
        let result = bucket(1, 0, MAX_REFILL_TIME_MS + 1).validate();

        assert_eq!(result, Err(TokenBucketConfigError::RefillTimeTooLong(MAX_REFILL_TIME_MS + 1)));
    }

    #[test]
    fn test_config_validate_refill_time_u64_max_is_error() {
        let result = bucket(u64::MAX, u64::MAX, u64::MAX).validate();

        assert_eq!(result, Err(TokenBucketConfigError::RefillTimeTooLong(u64::MAX)));
    }

    #[test]
    fn test_config_validate_u64_max_size_and_burst_one_day_is_ok() {
        let result = bucket(u64::MAX, u64::MAX, MAX_REFILL_TIME_MS).validate();

        assert_eq!(result, Ok(()));
    }

    #[test]
    fn test_config_error_message_names_bucket_and_field() {
        let config = RateLimiterConfig { bandwidth: Some(bucket(1, 0, 1)), ops: Some(bucket(5, 0, 0)) };

        let error = config.validate().unwrap_err();

        assert_eq!(error.to_string(), "invalid ops bucket: refill_time_ms must be greater than 0");
    }

    #[test]
    fn test_config_validate_no_buckets_is_ok() {
        let result = RateLimiterConfig::default().validate();

        assert_eq!(result, Ok(()));
    }

    #[test]
    fn test_config_deserialize_missing_burst_defaults_to_zero() {
        let map = MapDeserializer::<_, DeError>::new([("size", 10u64), ("refill_time_ms", 100)].into_iter());

        let config = TokenBucketConfig::deserialize(map);

        assert_eq!(config, Ok(bucket(10, 0, 100)));
    }

    #[test]
    fn test_config_deserialize_unknown_bucket_field_is_error() {
        let map = MapDeserializer::<_, DeError>::new(
            [("size", 10u64), ("refill_time_ms", 100), ("refill_ms", 100)].into_iter(),
        );

        let error = TokenBucketConfig::deserialize(map).unwrap_err();

        assert!(error.to_string().contains("unknown field `refill_ms`"), "{error}");
    }

    #[test]
    fn test_config_deserialize_unknown_limiter_field_is_error() {
        let map = MapDeserializer::<_, DeError>::new([("bandwith", ())].into_iter());

        let error = RateLimiterConfig::deserialize(map).unwrap_err();

        assert!(error.to_string().contains("unknown field `bandwith`"), "{error}");
    }

    #[test]
    fn test_config_deserialize_missing_buckets_are_none() {
        let map = MapDeserializer::<_, DeError>::new(std::iter::empty::<(&str, ())>());

        let config = RateLimiterConfig::deserialize(map);

        assert_eq!(config, Ok(RateLimiterConfig::default()));
    }

    #[test]
    fn test_parse_sizes_without_refill_are_per_second() {
        let config = parse_rate_limiter("bw=10485760,ops=1000");

        assert_eq!(
            config,
            Ok(RateLimiterConfig { bandwidth: Some(bucket(10485760, 0, 1000)), ops: Some(bucket(1000, 0, 1000)) })
        );
    }

    #[test]
    fn test_parse_refill_and_bursts_any_order_with_spaces() {
        let config = parse_rate_limiter(" ops_burst=50 , ops = 500/250, bw_burst=64,bw=1048576 / 100 ");

        assert_eq!(
            config,
            Ok(RateLimiterConfig { bandwidth: Some(bucket(1048576, 64, 100)), ops: Some(bucket(500, 50, 250)) })
        );
    }

    #[test]
    fn test_parse_single_bucket_leaves_other_unlimited() {
        let config: Result<RateLimiterConfig, _> = "ops=1000".parse();

        assert_eq!(config, Ok(RateLimiterConfig { bandwidth: None, ops: Some(bucket(1000, 0, 1000)) }));
    }

    #[test]
    fn test_parse_u64_max_values_is_ok() {
        let spec = format!("bw={0},bw_burst={0},ops={0}/{1}", u64::MAX, MAX_REFILL_TIME_MS);

        let config = parse_rate_limiter(&spec);

        assert_eq!(
            config,
            Ok(RateLimiterConfig {
                bandwidth: Some(bucket(u64::MAX, u64::MAX, 1000)),
                ops: Some(bucket(u64::MAX, 0, MAX_REFILL_TIME_MS)),
            })
        );
    }

    #[test]
    fn test_parse_empty_is_error() {
        let result = parse_rate_limiter("  ");

        assert_eq!(result, Err(RateLimiterParseError::Empty));
    }

    #[test]
    fn test_parse_trailing_comma_is_error() {
        let result = parse_rate_limiter("bw=1,");

        assert_eq!(result, Err(RateLimiterParseError::EmptyItem));
    }

    #[test]
    fn test_parse_item_without_equals_is_error() {
        let result = parse_rate_limiter("bw=1,ops");

        assert_eq!(result, Err(RateLimiterParseError::NotKeyValue("ops".to_string())));
    }

    #[test]
    fn test_parse_unknown_key_is_error() {
        let result = parse_rate_limiter("bw=1,refill_ms=5");

        assert_eq!(result, Err(RateLimiterParseError::UnknownKey("refill_ms".to_string())));
    }

    #[test]
    fn test_parse_duplicate_key_is_error() {
        let result = parse_rate_limiter("bw=1,ops=2,bw=3");

        assert_eq!(result, Err(RateLimiterParseError::DuplicateKey("bw")));
    }

    #[test]
    fn test_parse_unit_suffix_is_error() {
        let result = parse_rate_limiter("bw=10M");

        assert_eq!(result, Err(invalid_number("bw", "size", "10M")));
    }

    #[test]
    fn test_parse_size_over_u64_is_error() {
        let result = parse_rate_limiter("ops=18446744073709551616");

        assert_eq!(result, Err(invalid_number("ops", "size", "18446744073709551616")));
    }

    #[test]
    fn test_parse_bad_refill_is_error() {
        let result = parse_rate_limiter("bw=1/2/3");

        assert_eq!(result, Err(invalid_number("bw", "refill time", "2/3")));
    }

    #[test]
    fn test_parse_negative_burst_is_error() {
        let result = parse_rate_limiter("ops=1,ops_burst=-1");

        assert_eq!(result, Err(invalid_number("ops_burst", "burst", "-1")));
    }

    #[test]
    fn test_parse_burst_without_bucket_is_error() {
        let result = parse_rate_limiter("ops=1,bw_burst=100");

        assert_eq!(result, Err(RateLimiterParseError::BurstWithoutBucket { burst_key: "bw_burst", bucket_key: "bw" }));
    }

    #[test]
    fn test_parse_zero_size_is_error_naming_bucket() {
        let result = parse_rate_limiter("bw=0");

        let error = result.unwrap_err();
        assert_eq!(
            error,
            RateLimiterParseError::Invalid(RateLimiterConfigError {
                bucket: TokenType::Bytes,
                error: TokenBucketConfigError::ZeroSize
            })
        );
        assert!(error.to_string().starts_with("invalid bandwidth bucket: size must be greater than 0"), "{error}");
    }

    #[test]
    fn test_parse_zero_refill_is_error() {
        let result = parse_rate_limiter("ops=10/0");

        assert_eq!(
            result,
            Err(RateLimiterParseError::Invalid(RateLimiterConfigError {
                bucket: TokenType::Ops,
                error: TokenBucketConfigError::ZeroRefillTime
            }))
        );
    }

    #[test]
    fn test_parse_refill_over_one_day_is_error() {
        let result = parse_rate_limiter("ops=10/86400001");

        assert_eq!(
            result,
            Err(RateLimiterParseError::Invalid(RateLimiterConfigError {
                bucket: TokenType::Ops,
                error: TokenBucketConfigError::RefillTimeTooLong(86_400_001)
            }))
        );
    }

    #[test]
    fn test_parse_error_message_says_what_is_wrong() {
        let error = parse_rate_limiter("bw=10M").unwrap_err();

        assert_eq!(error.to_string(), "invalid size `10M` in `bw`: invalid digit found in string");
    }
}
