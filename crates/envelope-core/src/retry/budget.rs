//! Retry budgets: why a budget and not just `max_attempts`?
//!
//! `max_attempts = 3` on every client of a failing dependency triples the load on it exactly when it can least
//! take it. A budget bounds retries as a share of live traffic instead: every first attempt deposits
//! `retry_ratio` of a retry, every retry withdraws one, and deposits expire after `ttl`. A small floor
//! (`min_per_second`) lets a quiet client still retry at all. So however many clients fail, retries add at most
//! `retry_ratio` (plus the floor) to the load. This matches tower's `TpsBudget` and Finagle's `RetryBudget`.
//!
//! The budget lives behind an `Arc`; every clone of a [`RetryBudget`] draws on the same balance.

use std::fmt;
use std::time::Duration;

use crate::clock::{self, Instant};
use crate::sync::{Arc, AtomicU64, Ordering};

/// Default time a deposit stays usable.
pub const DEFAULT_TTL: Duration = Duration::from_secs(10);
/// Default retries per second allowed regardless of traffic.
pub const DEFAULT_MIN_PER_SECOND: u32 = 10;
/// Default share of live calls that may be retried.
pub const DEFAULT_RETRY_RATIO: f32 = 0.2;

const SLOTS: u64 = 10;
/// Units per retry: ratios have a resolution of 1/1000.
const UNIT: i64 = 1000;

/// A retry budget. Cloning shares the balance.
#[derive(Clone)]
pub struct RetryBudget {
    shared: Arc<Shared>,
}

struct Shared {
    epoch: Instant,
    slot_nanos: u64,
    deposit: i64,
    reserve: i64,
    /// Per slot: tag (slot number + 1) in the high 32 bits, balance as a signed 32-bit value in the low bits.
    slots: [AtomicU64; SLOTS as usize],
    ttl: Duration,
    min_per_second: u32,
    ratio: f32,
}

/// Why a budget is invalid.
#[derive(Debug, Clone, PartialEq)]
pub struct InvalidBudget(&'static str);

impl fmt::Display for InvalidBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid retry budget: {}", self.0)
    }
}

impl std::error::Error for InvalidBudget {}

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget::new(DEFAULT_TTL, DEFAULT_MIN_PER_SECOND, DEFAULT_RETRY_RATIO).expect("defaults are valid")
    }
}

impl RetryBudget {
    /// A budget: deposits last `ttl` (1 s ..= 60 s), `min_per_second` retries are always allowed, and up to
    /// `retry_ratio` (0 ..= 1000) retries per live call.
    pub fn new(ttl: Duration, min_per_second: u32, retry_ratio: f32) -> Result<Self, InvalidBudget> {
        if ttl < Duration::from_secs(1) || ttl > Duration::from_secs(60) {
            return Err(InvalidBudget("ttl must be between 1 s and 60 s"));
        }
        if !(0.0..=1000.0).contains(&retry_ratio) {
            return Err(InvalidBudget("retry_ratio must be between 0 and 1000"));
        }
        let reserve = i64::from(min_per_second) * ttl.as_secs() as i64 * UNIT;
        Ok(RetryBudget {
            shared: Arc::new(Shared {
                epoch: clock::now(),
                slot_nanos: (clock::as_nanos(ttl) / SLOTS).max(1),
                deposit: (f64::from(retry_ratio) * UNIT as f64).round() as i64,
                reserve,
                slots: Default::default(),
                ttl,
                min_per_second,
                ratio: retry_ratio,
            }),
        })
    }

    /// Records a live (first) call.
    #[inline]
    pub fn deposit(&self) {
        self.deposit_at(None);
    }

    /// [`deposit`](Self::deposit) at `now` if the caller has just read the clock (the call's start), so that a
    /// call that succeeds at once costs no clock read here.
    #[inline]
    pub(crate) fn deposit_at(&self, now: Option<Instant>) {
        let s = &self.shared;
        if s.deposit > 0 {
            s.add(s.deposit, now.unwrap_or_else(clock::now));
        }
    }

    /// Takes one retry from the budget if the balance allows it.
    pub fn withdraw(&self) -> bool {
        let s = &self.shared;
        let now = clock::now();
        if s.balance(now) < UNIT {
            return false;
        }
        s.add(-UNIT, now);
        true
    }

    /// Retries available now (rounded down).
    pub fn available(&self) -> u64 {
        (self.shared.balance(clock::now()).max(0) / UNIT) as u64
    }

    /// `(ttl, min_per_second, retry_ratio)`.
    pub fn settings(&self) -> (Duration, u32, f32) {
        (self.shared.ttl, self.shared.min_per_second, self.shared.ratio)
    }
}

impl Shared {
    fn slot_of(&self, now: Instant) -> u64 {
        clock::nanos_since(self.epoch, now) / self.slot_nanos
    }

    fn add(&self, amount: i64, now: Instant) {
        let slot = self.slot_of(now);
        let tag = slot + 1;
        let word = &self.slots[(slot % SLOTS) as usize];
        let mut current = word.load(Ordering::Acquire);
        loop {
            let (current_tag, value) = (current >> 32, current as u32 as i32);
            let base = if current_tag == tag {
                i64::from(value)
            } else if current_tag < tag {
                0
            } else {
                return;
            };
            let next_value = (base + amount).clamp(i64::from(i32::MIN), i64::from(i32::MAX)) as i32;
            let next = tag << 32 | u64::from(next_value as u32);
            match word.compare_exchange_weak(current, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return,
                Err(actual) => current = actual,
            }
        }
    }

    fn balance(&self, now: Instant) -> i64 {
        let newest = self.slot_of(now) + 1;
        let oldest = newest.saturating_sub(SLOTS - 1);
        let live: i64 = self
            .slots
            .iter()
            .map(|w| w.load(Ordering::Acquire))
            .filter(|v| (oldest..=newest).contains(&(v >> 32)))
            .map(|v| i64::from(v as u32 as i32))
            .sum();
        live + self.reserve
    }
}

impl fmt::Debug for RetryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryBudget")
            .field("ttl", &self.shared.ttl)
            .field("min_per_second", &self.shared.min_per_second)
            .field("retry_ratio", &self.shared.ratio)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn floor_alone_allows_min_per_second_times_ttl() {
        let b = RetryBudget::new(Duration::from_secs(1), 10, 0.0).unwrap();
        let granted = (0..100).filter(|_| b.withdraw()).count();
        assert_eq!(granted, 10);
        assert!(!b.withdraw(), "exhausted budget denies");
        tokio::time::advance(Duration::from_millis(1100)).await;
        let granted = (0..100).filter(|_| b.withdraw()).count();
        assert_eq!(granted, 10, "the floor refills once the withdrawals expire");
    }

    #[tokio::test(start_paused = true)]
    async fn ratio_of_live_calls_and_refill_after_ttl() {
        let b = RetryBudget::new(Duration::from_secs(10), 0, 0.1).unwrap();
        for _ in 0..100 {
            b.deposit();
        }
        assert_eq!(b.available(), 10);
        let granted = (0..50).filter(|_| b.withdraw()).count();
        assert_eq!(granted, 10, "10 % of 100 live calls");
        // The withdrawals expire with their slots: after the ttl, new deposits count afresh.
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(b.available(), 0, "old deposits expired");
        for _ in 0..20 {
            b.deposit();
        }
        assert_eq!(b.available(), 2);
        assert!(b.withdraw() && b.withdraw() && !b.withdraw());
    }

    #[tokio::test(start_paused = true)]
    async fn clones_share_one_balance() {
        let a = RetryBudget::new(Duration::from_secs(1), 3, 0.0).unwrap();
        let b = a.clone();
        assert!(a.withdraw() && b.withdraw() && a.withdraw());
        assert!(!b.withdraw());
    }

    #[test]
    fn invalid_budgets_are_rejected() {
        assert!(RetryBudget::new(Duration::from_millis(10), 1, 0.1).is_err());
        assert!(RetryBudget::new(Duration::from_secs(1), 1, -0.1).is_err());
    }
}
