//! Event time: parsing every form Activity Tracker uses, and the report's RFC 3339 rendering.
//!
//! Times are kept as whole milliseconds since the Unix epoch (`Millis`), which is the precision of
//! the report and plenty for ordering key events. Parsing is hand-written: it runs on every
//! relevant event and must not allocate.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// A point in time, in milliseconds since 1970-01-01T00:00:00Z.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Millis(pub i64);

impl Millis {
    pub fn parse(text: &str) -> Option<Millis> {
        parse_event_time(text)
    }

    pub fn from_offset_date_time(t: time::OffsetDateTime) -> Millis {
        Millis((t.unix_timestamp_nanos() / 1_000_000) as i64)
    }

    pub fn now() -> Millis {
        Millis::from_offset_date_time(time::OffsetDateTime::now_utc())
    }

    pub fn plus(self, d: std::time::Duration) -> Millis {
        Millis(
            self.0
                .saturating_add(d.as_millis().min(i64::MAX as u128) as i64),
        )
    }

    pub fn to_offset_date_time(self) -> time::OffsetDateTime {
        time::OffsetDateTime::from_unix_timestamp_nanos(self.0 as i128 * 1_000_000)
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
    }

    /// Seconds from `self` to `later` (negative when `later` is before `self`).
    pub fn seconds_until(self, later: Millis) -> f64 {
        (later.0 - self.0) as f64 / 1000.0
    }
}

impl fmt::Display for Millis {
    /// RFC 3339 in UTC with millisecond precision: `2026-09-19T14:03:11.520Z`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let days = self.0.div_euclid(86_400_000);
        let ms_of_day = self.0.rem_euclid(86_400_000);
        let (y, m, d) = civil_from_days(days);
        let h = ms_of_day / 3_600_000;
        let mi = (ms_of_day / 60_000) % 60;
        let s = (ms_of_day / 1000) % 60;
        let ms = ms_of_day % 1000;
        if (0..=9999).contains(&y) {
            // Digits into a fixed template: this runs for every time in every alert, timeline
            // entry and stored document, and `write!` with width specifiers costs ~10x more.
            let mut out = *b"0000-00-00T00:00:00.000Z";
            for (at, width, value) in [
                (0, 4, y),
                (5, 2, m),
                (8, 2, d),
                (11, 2, h),
                (14, 2, mi),
                (17, 2, s),
                (20, 3, ms),
            ] {
                let mut v = value;
                for k in (at..at + width).rev() {
                    out[k] = b'0' + (v % 10) as u8;
                    v /= 10;
                }
            }
            return f.write_str(std::str::from_utf8(&out).map_err(|_| fmt::Error)?);
        }
        write!(f, "{y:04}-{m:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{ms:03}Z")
    }
}

impl Serialize for Millis {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Millis {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = std::borrow::Cow::<str>::deserialize(d)?;
        Millis::parse(&text)
            .ok_or_else(|| serde::de::Error::custom(format!("invalid time {text:?}")))
    }
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.fraction](Z|+HHMM|+HH:MM|-HHMM|-HH:MM)`; `T` may be a space and `Z`
/// lower case. Fractions of any length are accepted and truncated to milliseconds.
pub fn parse_event_time(text: &str) -> Option<Millis> {
    // `trim` decodes characters from both ends; a text that starts and ends with a printable
    // ASCII byte has nothing to trim (every white space character is below b'!' or above 0x7f).
    let b = match (text.as_bytes().first(), text.as_bytes().last()) {
        (Some(&first), Some(&last))
            if (b'!'..0x80).contains(&first) && (b'!'..0x80).contains(&last) =>
        {
            text.as_bytes()
        }
        _ => text.trim().as_bytes(),
    };
    if b.len() < 19 {
        return None;
    }
    let num = |range: std::ops::Range<usize>| -> Option<i64> {
        let mut v = 0i64;
        for &c in b.get(range)? {
            if !c.is_ascii_digit() {
                return None;
            }
            v = v * 10 + (c - b'0') as i64;
        }
        Some(v)
    };
    let year = num(0..4)?;
    let month = num(5..7)?;
    let day = num(8..10)?;
    let hour = num(11..13)?;
    let minute = num(14..16)?;
    let second = num(17..19)?;
    if b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    if !(1..=12).contains(&month)
        || day < 1
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut i = 19;
    let mut millis = 0i64;
    if b.get(i) == Some(&b'.') || b.get(i) == Some(&b',') {
        i += 1;
        let start = i;
        let mut scale = 100;
        while i < b.len() && b[i].is_ascii_digit() {
            millis += (b[i] - b'0') as i64 * scale;
            scale /= 10;
            i += 1;
        }
        if i == start {
            return None;
        }
    }
    let offset_minutes = match b.get(i) {
        Some(b'Z') | Some(b'z') if i + 1 == b.len() => 0,
        Some(&sign @ (b'+' | b'-')) => {
            let rest = &b[i + 1..];
            let (hh, mm) = match rest.len() {
                4 => (num(i + 1..i + 3)?, num(i + 3..i + 5)?),
                5 if rest[2] == b':' => (num(i + 1..i + 3)?, num(i + 4..i + 6)?),
                2 => (num(i + 1..i + 3)?, 0),
                _ => return None,
            };
            if hh > 23 || mm > 59 {
                return None;
            }
            let m = hh * 60 + mm;
            if sign == b'-' {
                -m
            } else {
                m
            }
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second.min(59) - offset_minutes * 60;
    Some(Millis(secs * 1000 + millis))
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if is_leap(y) => 29,
        _ => 28,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_documented_form_to_the_same_instant() {
        let forms = [
            "2026-08-20T14:03:11.52+0000",
            "2026-08-20T14:03:11.520Z",
            "2026-08-20T14:03:11.52Z",
            "2026-08-20T08:03:11.52-06:00",
            "2026-08-20T08:03:11.520-0600",
            "2026-08-20 14:03:11.520000000Z",
            "2026-08-20T16:03:11.52+02",
            // Surrounding white space, ASCII or not, is trimmed.
            " 2026-08-20T14:03:11.520Z\t",
            "\u{a0}2026-08-20T14:03:11.520Z\u{2003}",
        ];
        let want = parse_event_time(forms[0]).unwrap();
        for f in forms {
            assert_eq!(parse_event_time(f), Some(want), "{f}");
        }
        assert_eq!(want.to_string(), "2026-08-20T14:03:11.520Z");
    }

    #[test]
    fn rejects_garbage() {
        for f in [
            "yesterday",
            "",
            "2026-08-20",
            "2026-13-20T14:03:11Z",
            "2026-02-30T14:03:11Z",
            "2026-08-20T14:03:11",
            "2026-08-20T14:03:11.Z",
            "2026-08-20T14:03:11+25:00",
            "2026-08-20T14:03:11Zjunk",
        ] {
            assert_eq!(parse_event_time(f), None, "{f}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: 2000,
            rng_algorithm: proptest::test_runner::RngAlgorithm::XorShift,
            ..proptest::prelude::ProptestConfig::default()
        })]

        /// The template writer prints what the `write!` formatting prints.
        #[test]
        fn display_is_the_formatted_form(ms in -70_000_000_000_000i64..300_000_000_000_000) {
            let m = Millis(ms);
            let days = ms.div_euclid(86_400_000);
            let ms_of_day = ms.rem_euclid(86_400_000);
            let (y, mo, d) = civil_from_days(days);
            let want = format!(
                "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
                ms_of_day / 3_600_000,
                (ms_of_day / 60_000) % 60,
                (ms_of_day / 1000) % 60,
                ms_of_day % 1000
            );
            proptest::prop_assert_eq!(m.to_string(), want);
        }
    }

    #[test]
    fn round_trips_through_display() {
        for ms in [0i64, 1_787_234_591_520, -86_400_001, 951_782_400_000] {
            let m = Millis(ms);
            assert_eq!(parse_event_time(&m.to_string()), Some(m));
        }
        assert_eq!(
            Millis(951_782_400_000).to_string(),
            "2000-02-29T00:00:00.000Z"
        );
    }
}
