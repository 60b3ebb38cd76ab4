//! Values written as text in the config: durations (`"250ms"`, `"5s"`), sizes (`"64KiB"`), percentages.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserialize, Deserializer};

/// The longest duration any key accepts: 365 days. Every deadline the sidecar computes from one (an instant plus
/// it) stays far inside what the clock and tokio's timer can represent.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 86_400);

/// A duration written as an integer and a unit: `us`, `ms`, `s`, `m`, `h` or `d` (`"250ms"`, `"5s"`, `"2m"`), at
/// most [`MAX_DURATION`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Dur(pub Duration);

impl Dur {
    /// Parses the text form.
    pub fn parse(text: &str) -> Result<Dur, String> {
        let text = text.trim();
        let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let n: u64 =
            number.parse().map_err(|_| format!("invalid duration `{text}`: expected e.g. \"250ms\" or \"5s\""))?;
        let d = match unit {
            "us" => Duration::from_micros(n),
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            "d" => Duration::from_secs(n.saturating_mul(86_400)),
            _ => return Err(format!("invalid duration `{text}`: the unit must be one of us, ms, s, m, h, d")),
        };
        if d > MAX_DURATION {
            return Err(format!("duration `{text}` is longer than the maximum of 365d"));
        }
        Ok(Dur(d))
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        if d.subsec_nanos() == 0 && d.as_secs() > 0 {
            write!(f, "{}s", d.as_secs())
        } else if d.subsec_nanos().is_multiple_of(1_000_000) {
            write!(f, "{}ms", d.as_millis())
        } else {
            write!(f, "{}us", d.as_micros())
        }
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Dur::parse(&text).map_err(de::Error::custom)
    }
}

/// A duration that must be greater than zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PositiveDur(pub Duration);

impl<'de> Deserialize<'de> for PositiveDur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let Dur(value) = Dur::deserialize(d)?;
        if value.is_zero() {
            return Err(de::Error::custom("must be greater than zero"));
        }
        Ok(PositiveDur(value))
    }
}

/// A percentage in (0, 100].
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
pub struct Percent(pub f32);

impl<'de> Deserialize<'de> for Percent {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = f64::deserialize(d)?;
        if !(value > 0.0 && value <= 100.0) {
            return Err(de::Error::custom(format!("{value} must be a percentage in (0, 100]")));
        }
        Ok(Percent(value as f32))
    }
}

/// A count that must be at least 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NonZero(pub u32);

impl<'de> Deserialize<'de> for NonZero {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = u32::deserialize(d)?;
        if value == 0 {
            return Err(de::Error::custom("must be at least 1"));
        }
        Ok(NonZero(value))
    }
}

impl From<NonZero> for u64 {
    fn from(n: NonZero) -> u64 {
        u64::from(n.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(Dur::parse("250ms").unwrap().0, Duration::from_millis(250));
        assert_eq!(Dur::parse("5s").unwrap().0, Duration::from_secs(5));
        assert_eq!(Dur::parse("2m").unwrap().0, Duration::from_secs(120));
        assert_eq!(Dur::parse("1h").unwrap().0, Duration::from_secs(3600));
        assert_eq!(Dur::parse("30d").unwrap().0, Duration::from_secs(30 * 86_400));
        assert_eq!(Dur::parse("0s").unwrap().0, Duration::ZERO);
        assert_eq!(Dur::parse("365d").unwrap().0, MAX_DURATION);
        for too_long in ["366d", "18446744073709551615s", "9000h"] {
            assert!(Dur::parse(too_long).unwrap_err().contains("maximum"), "{too_long}");
        }
        for bad in ["", "5", "s", "5 s", "-1s", "1.5s", "5sec", "5w"] {
            assert!(Dur::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(Dur(Duration::from_millis(1500)).to_string(), "1500ms");
        assert_eq!(Dur(Duration::from_secs(60)).to_string(), "60s");
    }
}
