//! Durations as Go's `time.ParseDuration` writes them, which is what Kubernetes and
//! Gateway API users type: `500ms`, `1s`, `1.5s`, `1m30s`, `1h30m`, `0`.
//!
//! A sequence of decimal numbers, each with an optional fraction and a unit (`ns`,
//! `us`, `µs`, `ms`, `s`, `m`, `h`). Stricter than Go in two ways: no sign (a
//! negative duration means nothing here) and no spaces. `humantime` is not used: it
//! accepts `1 hour` and `1h 30m` but not fractions such as `1.5s`. Nor is kube's
//! `kube::core::Duration` (the `metav1.Duration` parser): it accepts a sign, `1s0`
//! and an empty string, computes in floating point, and panics on overflow, and this
//! parses what any user who may write a policy sends; guarding it would take this
//! whole tokenizer again (see the test below).

use std::time::Duration;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is not a duration ({reason}); write it like 500ms, 10s or 1m30s")]
pub struct DurationError {
    pub value: String,
    pub reason: &'static str,
}

const UNITS: [(&str, u128); 8] = [
    ("ns", 1),
    ("us", 1_000),
    ("µs", 1_000),
    ("μs", 1_000),
    ("ms", 1_000_000),
    ("s", 1_000_000_000),
    ("m", 60_000_000_000),
    ("h", 3_600_000_000_000),
];

pub fn parse(value: &str) -> Result<Duration, DurationError> {
    let err = |reason| DurationError {
        value: value.to_owned(),
        reason,
    };
    if value == "0" {
        return Ok(Duration::ZERO);
    }
    if value.is_empty() {
        return Err(err("empty"));
    }
    let mut rest = value;
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let int_len = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let (int, after) = rest.split_at(int_len);
        let (frac, after) = match after.strip_prefix('.') {
            Some(after) => {
                let n = after
                    .find(|c: char| !c.is_ascii_digit())
                    .unwrap_or(after.len());
                after.split_at(n)
            }
            None => ("", after),
        };
        if int.is_empty() && frac.is_empty() {
            return Err(err(if rest.starts_with(['-', '+']) {
                "a sign is not allowed"
            } else {
                "a number is missing"
            }));
        }
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let Some(&(_, nanos)) = UNITS.iter().find(|(u, _)| *u == unit) else {
            return Err(err(if unit.is_empty() {
                "a unit is missing"
            } else {
                "unknown unit"
            }));
        };
        let overflow = || err("too large");
        let whole: u128 = if int.is_empty() {
            0
        } else {
            int.parse().map_err(|_| overflow())?
        };
        let mut part = whole.checked_mul(nanos).ok_or_else(overflow)?;
        // The fraction, digit by digit; digits below a nanosecond are dropped.
        let mut scale = nanos;
        for d in frac.bytes() {
            scale /= 10;
            part += u128::from(d - b'0') * scale;
        }
        total = total.checked_add(part).ok_or_else(overflow)?;
        rest = after;
    }
    let secs = u64::try_from(total / 1_000_000_000).map_err(|_| err("too large"))?;
    // The remainder is below 10^9, so it fits.
    let nanos = (total % 1_000_000_000) as u32;
    Ok(Duration::new(secs, nanos))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn go_style_durations() {
        let ms = Duration::from_millis;
        for (text, want) in [
            ("0", Duration::ZERO),
            ("0s", Duration::ZERO),
            ("500ms", ms(500)),
            ("1s", ms(1000)),
            ("1.5s", ms(1500)),
            (".5s", ms(500)),
            ("1m", ms(60_000)),
            ("1h30m", ms(5_400_000)),
            ("1m30s", ms(90_000)),
            ("2h45m10.5s", ms(9_910_500)),
            ("250us", Duration::from_micros(250)),
            ("250µs", Duration::from_micros(250)),
            ("10ns", Duration::from_nanos(10)),
            ("1.0000000001s", ms(1000)),
        ] {
            assert_eq!(parse(text), Ok(want), "{text}");
        }
    }

    /// What keeps kube-core's parser out (module docs): if these change, it may do.
    #[test]
    fn kube_core_duration_is_too_lenient_for_outside_input() {
        let kube = |s: &'static str| {
            std::panic::catch_unwind(|| s.parse::<kube::core::Duration>().is_ok())
        };
        for lenient in ["-1s", "1s0", ""] {
            assert_eq!(kube(lenient).ok(), Some(true), "{lenient:?}");
            assert!(parse(lenient).is_err(), "{lenient:?}");
        }
        assert!(
            kube("9999999999999999999999h").is_err(),
            "kube's parser panics"
        );
        assert_eq!(
            parse("9999999999999999999999h").unwrap_err().reason,
            "too large"
        );
    }

    #[test]
    fn bad_durations_say_why() {
        for (text, reason) in [
            ("", "empty"),
            ("5", "a unit is missing"),
            ("10 s", "unknown unit"),
            ("1h 30m", "unknown unit"),
            ("5sec", "unknown unit"),
            ("-1s", "a sign is not allowed"),
            ("s", "a number is missing"),
            (".s", "a number is missing"),
            ("99999999999999999999999999999999999999999h", "too large"),
            ("9999999999999999999999h", "too large"),
        ] {
            let e = parse(text).unwrap_err();
            assert_eq!(e.reason, reason, "{text}");
        }
        assert_eq!(
            parse("5x").unwrap_err().to_string(),
            "\"5x\" is not a duration (unknown unit); write it like 500ms, 10s or 1m30s"
        );
    }
}
