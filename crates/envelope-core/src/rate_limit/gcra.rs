//! The Generic Cell Rate Algorithm, as a pure function of the stored state and the time.
//!
//! GCRA keeps one number per limiter: the *theoretical arrival time* (TAT) of the next call if calls came exactly
//! at the allowed rate. A call at `now` is allowed if, after adding one emission interval, the TAT is no further
//! ahead of `now` than the burst allows. It is a token bucket without the refill arithmetic: one `u64`, updated
//! with one compare-and-swap.

/// Rate parameters in nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Gcra {
    /// Time between calls at the sustained rate.
    pub(crate) interval: u64,
    /// How far the TAT may run ahead of now: `burst × interval`.
    pub(crate) tolerance: u64,
}

impl Gcra {
    /// Decides a call at `now` given the stored `tat`: `Ok(new_tat)` if allowed, `Err(wait)` with the time until it
    /// would be.
    #[inline]
    pub(crate) const fn check(self, tat: u64, now: u64) -> Result<u64, u64> {
        let start = if tat > now { tat } else { now };
        let new_tat = start.saturating_add(self.interval);
        let ahead = new_tat - now;
        if ahead <= self.tolerance { Ok(new_tat) } else { Err(ahead - self.tolerance) }
    }

    /// Whether a limiter with this `tat` is back to a full burst at `now` (its state carries no information).
    pub(crate) const fn is_idle(self, tat: u64, now: u64) -> bool {
        tat <= now
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn burst_then_steady_rate() {
        // 10 per second, burst 3.
        let g = Gcra { interval: 100 * MS, tolerance: 300 * MS };
        let mut tat = 0;
        for _ in 0..3 {
            tat = g.check(tat, 0).unwrap();
        }
        assert_eq!(g.check(tat, 0), Err(100 * MS));
        assert_eq!(g.check(tat, 99 * MS), Err(MS));
        tat = g.check(tat, 100 * MS).unwrap();
        assert!(g.check(tat, 100 * MS).is_err());
        assert!(g.is_idle(tat, 400 * MS));
    }

    proptest! {
        /// Over any window of length L, at most burst + L / interval calls are allowed.
        #[test]
        fn never_exceeds_rate_plus_burst(
            interval in 1u64..1_000, burst in 1u64..20, gaps in proptest::collection::vec(0u64..2_000, 1..400)
        ) {
            let g = Gcra { interval, tolerance: interval * burst };
            let mut tat = 0;
            let mut now = 0;
            let mut allowed = Vec::new();
            for gap in gaps {
                now += gap;
                if let Ok(t) = g.check(tat, now) {
                    tat = t;
                    allowed.push(now);
                }
            }
            for (i, &start) in allowed.iter().enumerate() {
                for (j, &end) in allowed.iter().enumerate().skip(i) {
                    let calls = (j - i + 1) as u64;
                    prop_assert!(calls <= burst + (end - start) / interval, "{calls} calls in {}", end - start);
                }
            }
        }
    }
}
