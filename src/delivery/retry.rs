//! The retry policy: what an attempt's result means for the notification (spec section 4).
//!
//! - Delivered: done.
//! - Permanent (4xx other than 429, SMTP 5xx, unusable address): failed at once.
//! - Retryable (5xx, 429, timeouts, connection errors, SMTP 4xx): tried again after an
//!   exponential backoff with jitter (`initial_backoff * 2^(attempts-1)`, capped at `max_backoff`,
//!   then a random factor in [0.5, 1], never below `initial_backoff`), or after the receiver's
//!   `Retry-After` on a 429; until `max_age` after the notification was created, then failed.
//!   The last retry is scheduled no later than that deadline.

use super::Attempt;
use crate::settings::DeliverySettings;
use crate::store::AttemptOutcome;
use rand::Rng;
use std::time::Duration;
use time::OffsetDateTime;

/// What to record after attempt number `attempts` (1 for the first) of a notification created at
/// `created_at` ended with `result` at `now`.
pub fn decide(
    result: &Attempt,
    attempts: i64,
    created_at: OffsetDateTime,
    now: OffsetDateTime,
    settings: &DeliverySettings,
) -> AttemptOutcome {
    match result {
        Attempt::Delivered => AttemptOutcome::Delivered,
        Attempt::Permanent(error) => AttemptOutcome::Failed {
            error: error.clone(),
        },
        Attempt::Retryable { retry_after, .. } => {
            let error = result.error().unwrap_or_default();
            let deadline = created_at + settings.max_age;
            if now >= deadline {
                return AttemptOutcome::Failed {
                    error: format!(
                        "gave up after {attempts} attempt{} over {}: {error}",
                        if attempts == 1 { "" } else { "s" },
                        crate::settings::display_duration(settings.max_age)
                    ),
                };
            }
            let delay = retry_after.unwrap_or_else(|| backoff(attempts, settings));
            AttemptOutcome::Retry {
                at: (now + delay).min(deadline),
                error,
            }
        }
    }
}

/// The pause after `attempts` failed attempts, with jitter.
pub fn backoff(attempts: i64, settings: &DeliverySettings) -> Duration {
    let exponent = u32::try_from(attempts.saturating_sub(1).clamp(0, 32)).unwrap_or(32);
    let base = settings
        .initial_backoff
        .saturating_mul(2u32.saturating_pow(exponent))
        .min(settings.max_backoff);
    let factor: f64 = rand::rng().random_range(0.5..=1.0);
    base.mul_f64(factor)
        .max(settings.initial_backoff)
        .min(settings.max_backoff.max(settings.initial_backoff))
}

/// A `Retry-After` value: delay seconds, or an HTTP date (`Sun, 06 Nov 1994 08:49:37 GMT`).
pub fn parse_retry_after(value: &str, now: OffsetDateTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let format = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    let at = time::PrimitiveDateTime::parse(value, format)
        .ok()?
        .assume_utc();
    Some(Duration::try_from(at - now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn settings() -> DeliverySettings {
        DeliverySettings {
            max_age: Duration::from_secs(3600),
            webhook_timeout: Duration::from_secs(10),
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
        }
    }

    #[test]
    fn backoff_doubles_with_jitter_between_the_bounds() {
        let s = settings();
        for _ in 0..200 {
            let first = backoff(1, &s);
            assert!(first >= Duration::from_secs(1) && first <= Duration::from_secs(1));
            let third = backoff(3, &s);
            assert!(third >= Duration::from_secs(2) && third <= Duration::from_secs(4));
            let late = backoff(40, &s);
            assert!(late >= Duration::from_secs(30) && late <= Duration::from_secs(60));
        }
    }

    #[test]
    fn retry_after_takes_seconds_and_http_dates() {
        let now = datetime!(2026-08-20 14:00:00 UTC);
        assert_eq!(parse_retry_after(" 7 ", now), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after("Thu, 20 Aug 2026 14:00:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("Thu, 20 Aug 2026 13:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn retries_stop_at_the_maximum_age() {
        let s = settings();
        let created = datetime!(2026-08-20 14:00:00 UTC);
        let retry = Attempt::Retryable {
            error: "HTTP 503".into(),
            retry_after: Some(Duration::from_secs(7200)),
        };
        match decide(&retry, 1, created, created, &s) {
            AttemptOutcome::Retry { at, .. } => assert_eq!(at, created + s.max_age),
            other => panic!("{other:?}"),
        }
        match decide(&retry, 5, created, created + s.max_age, &s) {
            AttemptOutcome::Failed { error } => {
                assert!(
                    error.starts_with("gave up after 5 attempts over 1h: HTTP 503"),
                    "{error}"
                )
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            decide(
                &Attempt::Permanent("HTTP 400".into()),
                1,
                created,
                created,
                &s
            ),
            AttemptOutcome::Failed {
                error: "HTTP 400".into()
            }
        );
    }
}
