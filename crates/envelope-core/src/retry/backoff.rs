//! Backoff between attempts: how long to wait, growing with each retry, capped, and jittered so that many
//! clients failing together do not retry together.

use std::fmt;
use std::time::Duration;

/// Default first delay.
pub const DEFAULT_BASE: Duration = Duration::from_millis(100);
/// Default cap on any delay (also the cap on a server's `Retry-After`).
pub const DEFAULT_MAX_DELAY: Duration = Duration::from_secs(2);
/// Default growth factor of exponential backoff.
pub const DEFAULT_MULTIPLIER: f64 = 2.0;

/// How the delay grows with the attempt number.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Growth {
    /// Always `base`.
    Constant,
    /// `base × n` before the n-th retry.
    Linear,
    /// `base × multiplier^(n-1)` before the n-th retry.
    Exponential {
        /// Growth factor (≥ 1).
        multiplier: f64,
    },
}

/// How the delay is randomised.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Jitter {
    /// Exactly the computed delay.
    None,
    /// Uniform in `[0, d]` (AWS "full jitter"; the default).
    Full,
    /// Uniform in `[d/2, d]` (AWS "equal jitter").
    Equal,
    /// Uniform in `[d × (1 - f), d]` for a fraction `f` in [0, 1].
    Ratio(f64),
    /// Uniform in `[base, 3 × previous delay]`, capped (AWS / Polly "decorrelated jitter"); ignores `Growth`.
    Decorrelated,
}

/// A validated backoff. Build with [`Backoff::exponential`], [`Backoff::constant`] or [`Backoff::linear`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    growth: Growth,
    base: Duration,
    max_delay: Duration,
    jitter: Jitter,
}

/// Why a backoff is invalid (tower's `InvalidBackoff`).
#[derive(Debug, Clone, PartialEq)]
pub struct InvalidBackoff(&'static str);

impl fmt::Display for InvalidBackoff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid backoff: {}", self.0)
    }
}

impl std::error::Error for InvalidBackoff {}

impl Default for Backoff {
    /// Exponential from 100 ms, doubling, capped at 2 s, full jitter.
    fn default() -> Self {
        Backoff {
            growth: Growth::Exponential { multiplier: DEFAULT_MULTIPLIER },
            base: DEFAULT_BASE,
            max_delay: DEFAULT_MAX_DELAY,
            jitter: Jitter::Full,
        }
    }
}

impl Backoff {
    /// Any growth, base, cap and jitter; validated.
    pub fn new(growth: Growth, base: Duration, max_delay: Duration, jitter: Jitter) -> Result<Self, InvalidBackoff> {
        if max_delay < base {
            return Err(InvalidBackoff("max_delay must be at least base"));
        }
        if let Growth::Exponential { multiplier } = growth
            && !(multiplier >= 1.0 && multiplier.is_finite())
        {
            return Err(InvalidBackoff("multiplier must be a finite number >= 1"));
        }
        if let Jitter::Ratio(f) = jitter
            && !(0.0..=1.0).contains(&f)
        {
            return Err(InvalidBackoff("jitter ratio must be in [0, 1]"));
        }
        if matches!(jitter, Jitter::Decorrelated) && base.is_zero() {
            return Err(InvalidBackoff("decorrelated jitter needs a base above zero"));
        }
        Ok(Backoff { growth, base, max_delay, jitter })
    }

    /// Exponential doubling from `base`, capped at `max_delay`, full jitter.
    pub fn exponential(base: Duration, max_delay: Duration) -> Result<Self, InvalidBackoff> {
        Self::new(Growth::Exponential { multiplier: DEFAULT_MULTIPLIER }, base, max_delay, Jitter::Full)
    }

    /// Always `delay`, no jitter.
    pub fn constant(delay: Duration) -> Self {
        Backoff { growth: Growth::Constant, base: delay, max_delay: delay, jitter: Jitter::None }
    }

    /// `base × n`, capped, no jitter.
    pub fn linear(base: Duration, max_delay: Duration) -> Result<Self, InvalidBackoff> {
        Self::new(Growth::Linear, base, max_delay, Jitter::None)
    }

    /// No delay at all.
    pub fn none() -> Self {
        Backoff::constant(Duration::ZERO)
    }

    /// This backoff with another jitter; validated.
    pub fn with_jitter(self, jitter: Jitter) -> Result<Self, InvalidBackoff> {
        Self::new(self.growth, self.base, self.max_delay, jitter)
    }

    /// The cap on any delay.
    pub fn max_delay(&self) -> Duration {
        self.max_delay
    }

    /// The first delay, before jitter.
    pub fn base(&self) -> Duration {
        self.base
    }

    /// The jitter.
    pub fn jitter(&self) -> Jitter {
        self.jitter
    }

    /// The delay before the `retry`-th retry (1 for the first), before jitter, capped.
    pub fn ceiling(&self, retry: u32) -> Duration {
        let n = retry.max(1);
        let base = self.base.as_secs_f64();
        let secs = match self.growth {
            Growth::Constant => base,
            Growth::Linear => base * f64::from(n),
            Growth::Exponential { multiplier } => base * multiplier.powi((n - 1).min(1024) as i32),
        };
        Duration::from_secs_f64(secs.min(self.max_delay.as_secs_f64()))
    }

    /// The delay before the `retry`-th retry, jittered; `previous` is the delay before the last one (used by
    /// decorrelated jitter).
    pub fn delay(&self, retry: u32, previous: Duration) -> Duration {
        let d = self.ceiling(retry);
        let between = |lo: Duration, hi: Duration| {
            if hi <= lo { lo } else { lo + (hi - lo).mul_f64(fastrand::f64()) }
        };
        match self.jitter {
            Jitter::None => d,
            Jitter::Full => between(Duration::ZERO, d),
            Jitter::Equal => between(d / 2, d),
            Jitter::Ratio(f) => between(d.mul_f64(1.0 - f), d),
            Jitter::Decorrelated => {
                let prev = previous.max(self.base);
                between(self.base, prev.saturating_mul(3)).min(self.max_delay)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn growth_and_cap() {
        let b = Backoff::new(Growth::Exponential { multiplier: 2.0 }, 100 * MS, 1000 * MS, Jitter::None).unwrap();
        let ds: Vec<_> = (1..=6).map(|n| b.delay(n, Duration::ZERO).as_millis()).collect();
        assert_eq!(ds, [100, 200, 400, 800, 1000, 1000]);
        let l = Backoff::linear(100 * MS, 250 * MS).unwrap();
        assert_eq!((1..=3).map(|n| l.delay(n, Duration::ZERO).as_millis()).collect::<Vec<_>>(), [100, 200, 250]);
        assert_eq!(Backoff::constant(7 * MS).delay(9, Duration::ZERO), 7 * MS);
        assert_eq!(b.ceiling(u32::MAX), 1000 * MS);
    }

    #[test]
    fn invalid_backoffs_are_rejected() {
        assert!(Backoff::exponential(2 * MS, MS).is_err());
        assert!(Backoff::new(Growth::Exponential { multiplier: 0.5 }, MS, MS, Jitter::None).is_err());
        assert!(Backoff::default().with_jitter(Jitter::Ratio(1.5)).is_err());
        assert!(Backoff::default().with_jitter(Jitter::Ratio(-0.1)).is_err());
        assert!(Backoff::new(Growth::Constant, Duration::ZERO, MS, Jitter::Decorrelated).is_err());
    }

    fn any_jitter() -> impl Strategy<Value = Jitter> {
        prop_oneof![
            Just(Jitter::None),
            Just(Jitter::Full),
            Just(Jitter::Equal),
            (0.0f64..=1.0).prop_map(Jitter::Ratio),
            Just(Jitter::Decorrelated),
        ]
    }

    proptest! {
        /// Every jittered delay lies within its documented bounds, for every jitter kind.
        #[test]
        fn jitter_stays_within_bounds(
            base_ms in 1u64..500, cap_factor in 1u64..50, retry in 1u32..40, jitter in any_jitter(),
            previous_ms in 0u64..100_000,
        ) {
            let base = Duration::from_millis(base_ms);
            let cap = base * cap_factor as u32;
            let b = Backoff::new(Growth::Exponential { multiplier: 2.0 }, base, cap, jitter).unwrap();
            let previous = Duration::from_millis(previous_ms);
            for _ in 0..200 {
                let d = b.delay(retry, previous);
                let ceiling = b.ceiling(retry);
                prop_assert!(d <= cap);
                match jitter {
                    Jitter::None => prop_assert_eq!(d, ceiling),
                    Jitter::Full => prop_assert!(d <= ceiling),
                    Jitter::Equal => prop_assert!(d >= ceiling / 2 && d <= ceiling),
                    Jitter::Ratio(f) => prop_assert!(d >= ceiling.mul_f64(1.0 - f).saturating_sub(Duration::from_nanos(1)) && d <= ceiling),
                    Jitter::Decorrelated => prop_assert!(d >= base.min(cap) && d <= previous.max(base) * 3),
                }
            }
        }
    }

    #[test]
    fn full_jitter_spreads_over_the_whole_range() {
        let b = Backoff::exponential(100 * MS, 100 * MS).unwrap();
        let samples: Vec<_> = (0..2000).map(|_| b.delay(1, Duration::ZERO)).collect();
        let low = samples.iter().filter(|d| **d < 25 * MS).count();
        let high = samples.iter().filter(|d| **d > 75 * MS).count();
        // Each quarter should get about 500 of 2000; anything above 300 rules out a collapsed distribution.
        assert!(low > 300 && high > 300, "low {low}, high {high}");
    }
}
