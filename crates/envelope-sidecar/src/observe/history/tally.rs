//! What happened since the last flush, counted on the request path with relaxed atomic adds and taken (swapped to
//! zero) by the history task. A tally lives as long as the sidecar, keyed by name, so a reload that rebuilds a
//! route loses nothing that was counted for it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use envelope_core::Outcome;
use envelope_http::observe::DURATION_BUCKETS;

use crate::observe::quality::is_fast_fail;

/// Latency buckets of a rollup: the upper bounds of [`DURATION_BUCKETS`] and one for everything slower.
pub(crate) const BUCKETS: usize = DURATION_BUCKETS.len() + 1;

/// The latency bucket of a duration: the first bound it does not exceed, or the last bucket.
pub(crate) fn bucket_of(seconds: f64) -> usize {
    DURATION_BUCKETS.iter().position(|b| seconds <= *b).unwrap_or(BUCKETS - 1)
}

/// Requests answered on one route.
#[derive(Debug, Default)]
pub(crate) struct RouteTally {
    outcomes: [AtomicU64; Outcome::ALL.len()],
    buckets: [AtomicU64; BUCKETS],
    rejected: [AtomicU64; BUCKETS],
    duration_us: AtomicU64,
}

/// A route's counts over one period.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct RouteCounts {
    /// Requests by outcome, indexed like [`Outcome::ALL`].
    pub(crate) outcomes: [u64; Outcome::ALL.len()],
    /// Requests by latency bucket (non-cumulative), the last one above every bound.
    pub(crate) buckets: [u64; BUCKETS],
    /// Locally rejected requests (open breaker, full bulkhead, shed, rate limited) by latency bucket: how fast
    /// the envelope fails fast.
    pub(crate) rejected: [u64; BUCKETS],
    /// Sum of the request durations, in microseconds.
    pub(crate) duration_us: u64,
}

impl RouteTally {
    /// Counts a request answered in `outcome` after `seconds`, with `attempts` made for it.
    pub(crate) fn record(&self, outcome: Outcome, seconds: f64, attempts: u32) {
        self.outcomes[outcome as usize].fetch_add(1, Ordering::Relaxed);
        let bucket = bucket_of(seconds);
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        if is_fast_fail(outcome, attempts) {
            self.rejected[bucket].fetch_add(1, Ordering::Relaxed);
        }
        self.duration_us.fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
    }

    fn take(&self) -> RouteCounts {
        RouteCounts {
            outcomes: std::array::from_fn(|i| self.outcomes[i].swap(0, Ordering::Relaxed)),
            buckets: std::array::from_fn(|i| self.buckets[i].swap(0, Ordering::Relaxed)),
            rejected: std::array::from_fn(|i| self.rejected[i].swap(0, Ordering::Relaxed)),
            duration_us: self.duration_us.swap(0, Ordering::Relaxed),
        }
    }
}

impl RouteCounts {
    pub(crate) fn requests(&self) -> u64 {
        self.outcomes.iter().sum()
    }

    /// Every count, in storage order: outcomes, latency buckets, fast-fail buckets, duration sum.
    pub(crate) fn values(&self) -> impl Iterator<Item = u64> + '_ {
        self.outcomes.iter().chain(&self.buckets).chain(&self.rejected).chain([&self.duration_us]).copied()
    }

    /// The counts of [`RouteCounts::values`] order (missing values count 0).
    pub(crate) fn from_values(values: &[u64]) -> RouteCounts {
        let at = |i: usize| values.get(i).copied().unwrap_or(0);
        let n = Outcome::ALL.len();
        RouteCounts {
            outcomes: std::array::from_fn(at),
            buckets: std::array::from_fn(|i| at(n + i)),
            rejected: std::array::from_fn(|i| at(n + BUCKETS + i)),
            duration_us: at(n + 2 * BUCKETS),
        }
    }

    /// Requests that spent availability budget (the SLO's notion of an error).
    pub(crate) fn errors(&self) -> u64 {
        Outcome::ALL.iter().filter(|o| o.counts_against_availability()).map(|o| self.outcomes[*o as usize]).sum()
    }

    /// Adds `other` into `self`.
    pub(crate) fn add(&mut self, other: &RouteCounts) {
        self.outcomes.iter_mut().zip(other.outcomes).for_each(|(a, b)| *a += b);
        self.buckets.iter_mut().zip(other.buckets).for_each(|(a, b)| *a += b);
        self.rejected.iter_mut().zip(other.rejected).for_each(|(a, b)| *a += b);
        self.duration_us += other.duration_us;
    }
}

/// The latency below which a share `q` of the counted requests finished, in seconds, interpolated inside its
/// bucket as Prometheus' `histogram_quantile` does (the open last bucket answers its lower bound). `None` without
/// requests.
pub(crate) fn quantile(buckets: &[u64; BUCKETS], q: f64) -> Option<f64> {
    let total = buckets.iter().sum::<u64>();
    if total == 0 {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * total as f64;
    let mut below = 0u64;
    for (i, &n) in buckets.iter().enumerate() {
        if n > 0 && (below + n) as f64 >= rank {
            let lower = if i == 0 { 0.0 } else { DURATION_BUCKETS[i - 1] };
            let Some(&upper) = DURATION_BUCKETS.get(i) else { return Some(lower) };
            return Some(lower + (upper - lower) * ((rank - below as f64) / n as f64).clamp(0.0, 1.0));
        }
        below += n;
    }
    DURATION_BUCKETS.last().copied()
}

/// What an upstream's policies did.
#[derive(Debug, Default)]
pub(crate) struct UpstreamTally {
    values: [AtomicU64; UPSTREAM_COLUMNS.len()],
}

/// The counts kept per upstream, in storage order.
pub(crate) const UPSTREAM_COLUMNS: [&str; 7] = [
    "attempts",
    "breaker_opened",
    "breaker_half_opened",
    "breaker_closed",
    "breaker_rejections",
    "bulkhead_rejections",
    "rate_limited",
];

/// One of [`UPSTREAM_COLUMNS`].
#[derive(Debug, Clone, Copy)]
pub(crate) enum UpstreamEvent {
    Attempt = 0,
    Opened,
    HalfOpened,
    Closed,
    BreakerRejection,
    BulkheadRejection,
    RateLimited,
}

impl UpstreamTally {
    pub(crate) fn count(&self, event: UpstreamEvent) {
        self.values[event as usize].fetch_add(1, Ordering::Relaxed);
    }

    fn take(&self) -> [u64; UPSTREAM_COLUMNS.len()] {
        std::array::from_fn(|i| self.values[i].swap(0, Ordering::Relaxed))
    }
}

/// Every tally of the sidecar, by name.
#[derive(Debug, Default)]
pub(crate) struct Tallies {
    routes: Mutex<BTreeMap<String, Arc<RouteTally>>>,
    upstreams: Mutex<BTreeMap<String, Arc<UpstreamTally>>>,
    counters: Mutex<BTreeMap<String, Arc<AtomicU64>>>,
}

/// Everything taken from the tallies at one flush (names with nothing to report are left out).
#[derive(Debug, Default)]
pub(crate) struct Taken {
    pub(crate) routes: Vec<(String, RouteCounts)>,
    pub(crate) upstreams: Vec<(String, [u64; UPSTREAM_COLUMNS.len()])>,
    pub(crate) counters: Vec<(String, u64)>,
}

fn get_or_insert<T: Default>(map: &Mutex<BTreeMap<String, Arc<T>>>, name: &str) -> Arc<T> {
    let mut map = map.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(t) = map.get(name) {
        return t.clone();
    }
    map.entry(name.to_owned()).or_default().clone()
}

impl Tallies {
    pub(crate) fn route(&self, name: &str) -> Arc<RouteTally> {
        get_or_insert(&self.routes, name)
    }

    pub(crate) fn upstream(&self, name: &str) -> Arc<UpstreamTally> {
        get_or_insert(&self.upstreams, name)
    }

    pub(crate) fn counter(&self, name: &str) -> Arc<AtomicU64> {
        get_or_insert(&self.counters, name)
    }

    /// Takes every count since the last call.
    pub(crate) fn take(&self) -> Taken {
        let routes = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
        let upstreams = self.upstreams.lock().unwrap_or_else(PoisonError::into_inner);
        let counters = self.counters.lock().unwrap_or_else(PoisonError::into_inner);
        Taken {
            routes: routes.iter().map(|(n, t)| (n.clone(), t.take())).filter(|(_, c)| c.requests() > 0).collect(),
            upstreams: upstreams
                .iter()
                .map(|(n, t)| (n.clone(), t.take()))
                .filter(|(_, v)| v.iter().any(|&x| x > 0))
                .collect(),
            counters: counters
                .iter()
                .map(|(n, c)| (n.clone(), c.swap(0, Ordering::Relaxed)))
                .filter(|(_, v)| *v > 0)
                .collect(),
        }
    }

    /// Puts counts that could not be stored back, to be tried again at the next flush.
    pub(crate) fn give_back(&self, taken: &Taken) {
        for (name, c) in &taken.routes {
            let t = self.route(name);
            for (i, n) in c.outcomes.iter().enumerate() {
                t.outcomes[i].fetch_add(*n, Ordering::Relaxed);
            }
            for (i, n) in c.buckets.iter().enumerate() {
                t.buckets[i].fetch_add(*n, Ordering::Relaxed);
            }
            for (i, n) in c.rejected.iter().enumerate() {
                t.rejected[i].fetch_add(*n, Ordering::Relaxed);
            }
            t.duration_us.fetch_add(c.duration_us, Ordering::Relaxed);
        }
        for (name, v) in &taken.upstreams {
            let t = self.upstream(name);
            for (i, n) in v.iter().enumerate() {
                t.values[i].fetch_add(*n, Ordering::Relaxed);
            }
        }
        for (name, v) in &taken.counters {
            self.counter(name).fetch_add(*v, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_swaps_to_zero_and_leaves_out_silent_names() {
        let t = Tallies::default();
        let api = t.route("api");
        let _quiet = t.route("quiet");
        api.record(Outcome::Ok, 0.003, 1);
        api.record(Outcome::Upstream5xx, 0.3, 3);
        api.record(Outcome::Timeout, 60.0, 1);
        api.record(Outcome::CircuitOpen, 0.001, 0);
        // Retried twice, then refused by the breaker that opened meanwhile: not a fast fail.
        api.record(Outcome::CircuitOpen, 0.4, 2);
        t.counter("orders").fetch_add(2, Ordering::Relaxed);
        t.upstream("db").count(UpstreamEvent::Opened);
        let taken = t.take();
        assert_eq!(taken.routes.len(), 1);
        let (name, c) = &taken.routes[0];
        assert_eq!(name, "api");
        assert_eq!(c.requests(), 5);
        assert_eq!(c.rejected.iter().sum::<u64>(), 1, "only the open-breaker rejection before any attempt is fast");
        assert_eq!(c.rejected[0], 1);
        assert_eq!(c.outcomes[Outcome::Upstream5xx as usize], 1);
        assert_eq!(c.buckets[0], 2, "3 ms and 1 ms are in the 5 ms bucket");
        assert_eq!(c.buckets[7], 2, "300 ms and 400 ms are in the 500 ms bucket");
        assert_eq!(c.buckets[BUCKETS - 1], 1, "60 s is above every bound");
        assert_eq!(c.duration_us, 60_704_000);
        assert_eq!(taken.counters, vec![("orders".to_owned(), 2)]);
        assert_eq!(taken.upstreams[0].1[UpstreamEvent::Opened as usize], 1);
        let again = t.take();
        assert!(again.routes.is_empty() && again.upstreams.is_empty() && again.counters.is_empty(), "nothing twice");
        t.give_back(&taken);
        assert_eq!(t.take().routes[0].1, *c, "given-back counts come out again");
    }

    #[test]
    fn quantiles_interpolate_inside_buckets() {
        let mut c = RouteCounts::default();
        assert_eq!(quantile(&c.buckets, 0.5), None);
        // 100 requests: 50 in (0, 5 ms], 50 in (5 ms, 10 ms].
        c.buckets[0] = 50;
        c.buckets[1] = 50;
        assert!((quantile(&c.buckets, 0.5).unwrap() - 0.005).abs() < 1e-12);
        assert!((quantile(&c.buckets, 0.75).unwrap() - 0.0075).abs() < 1e-12);
        assert!((quantile(&c.buckets, 1.0).unwrap() - 0.010).abs() < 1e-12);
        // Everything above the last bound answers that bound.
        let mut slow = RouteCounts::default();
        slow.buckets[BUCKETS - 1] = 3;
        assert_eq!(quantile(&slow.buckets, 0.99), Some(10.0));
    }
}
