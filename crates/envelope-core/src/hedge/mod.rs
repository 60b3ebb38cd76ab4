//! Hedging: when a call is slow, start another one in parallel and take whichever answers first
//! (Polly's hedging strategy; "The Tail at Scale").
//!
//! The first attempt starts at once. If it has not finished after `delay`, a second starts while the first keeps
//! running, and so on up to `max_hedged` extra attempts. An attempt that fails with a retryable outcome starts the
//! next one at once. The first result that is not a retryable failure wins and **every other attempt is
//! cancelled** (dropped). If all attempts fail, the last failure is returned.
//!
//! Hedging sends the same request more than once: use it only for idempotent operations (the HTTP layer enforces
//! this by method). Hedges can draw on a [`RetryBudget`] so that they add a bounded share of load.
//!
//! The delay is fixed, or a percentile of the latencies the hedge has seen ([`Hedge::after_percentile`]): hedging
//! after the p95 sends a second attempt for about 1 call in 20, the slowest, whatever the dependency's speed. Until
//! it has seen [`MIN_SAMPLES`] answers, a percentile hedge does not hedge.
//!
//! ```
//! use envelope_core::hedge::Hedge;
//! use std::time::Duration;
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
//! let hedge = Hedge::new("search", Duration::from_millis(50), 1);
//! let answer = hedge.call(|| async { Ok::<_, std::io::Error>("fast enough") }).await.unwrap();
//! assert_eq!(answer, "fast enough");
//! # }
//! ```

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::Poll;
use std::time::Duration;

use crate::clock::{self, Instant};
use crate::event::{Event, Listeners};
use crate::outcome::{Classify, DefaultClassifier, HasOutcome, Outcome};
use crate::retry::{RetryBudget, classified};

/// A hedging policy.
#[derive(Debug, Clone)]
pub struct Hedge {
    name: Arc<str>,
    delay: Delay,
    max_hedged: u32,
    budget: Option<RetryBudget>,
    /// Whether each call deposits into the budget (else another policy, the retry sharing it, does).
    deposits: bool,
    listeners: Listeners,
}

/// When the next attempt starts.
#[derive(Debug, Clone)]
enum Delay {
    Fixed(Duration),
    /// This percentile (0 < p < 100) of the latencies seen.
    Percentile(f64, Arc<Latencies>),
}

/// Answers a percentile hedge must have seen before it hedges.
pub const MIN_SAMPLES: u32 = 20;

impl Hedge {
    /// Starts up to `max_hedged` extra attempts, one every `delay` while none has answered.
    pub fn new(name: impl Into<Arc<str>>, delay: Duration, max_hedged: u32) -> Self {
        Hedge::with_delay(name.into(), Delay::Fixed(delay), max_hedged)
    }

    /// Starts up to `max_hedged` extra attempts, each once the earlier ones have taken longer than `percentile`
    /// (strictly between 0 and 100, say 95) of the attempts seen so far took; with fewer than [`MIN_SAMPLES`]
    /// answers seen, none. `None` for a percentile out of range.
    pub fn after_percentile(name: impl Into<Arc<str>>, percentile: f64, max_hedged: u32) -> Option<Self> {
        (percentile > 0.0 && percentile < 100.0)
            .then(|| Hedge::with_delay(name.into(), Delay::Percentile(percentile, Arc::default()), max_hedged))
    }

    fn with_delay(name: Arc<str>, delay: Delay, max_hedged: u32) -> Self {
        Hedge { name, delay, max_hedged, budget: None, deposits: true, listeners: Listeners::new() }
    }

    /// Draws each extra attempt from `budget`, into which every call deposits.
    pub fn with_budget(mut self, budget: RetryBudget) -> Self {
        self.budget = Some(budget);
        self.deposits = true;
        self
    }

    /// Draws each extra attempt from `budget` without depositing into it: for a budget another policy fills
    /// per call (a retry's, when the hedge runs inside it), so that calls are not counted twice.
    pub fn drawing_from(mut self, budget: RetryBudget) -> Self {
        self.budget = Some(budget);
        self.deposits = false;
        self
    }

    /// The delay before the next hedge now: fixed, or the percentile of what was seen (`None`: not enough seen).
    pub fn current_delay(&self) -> Option<Duration> {
        match &self.delay {
            Delay::Fixed(d) => Some(*d),
            Delay::Percentile(p, seen) => seen.percentile(*p),
        }
    }

    /// Sends events to `listeners`.
    pub fn with_listeners(mut self, listeners: Listeners) -> Self {
        self.listeners = listeners;
        self
    }

    /// Runs `f`, hedging it; results are classified with [`DefaultClassifier`].
    pub async fn call<T, E, F, Fut>(&self, f: F) -> Result<T, crate::Error<E>>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: HasOutcome,
    {
        self.call_classified(&DefaultClassifier, f).await
    }

    /// Runs `f`, hedging it; results are classified with `classifier`.
    pub async fn call_classified<T, E, F, Fut, C>(&self, classifier: &C, mut f: F) -> Result<T, crate::Error<E>>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        C: Classify<T, E>,
    {
        self.race(
            || classifier.can_send_again(),
            || {
                let fut = f();
                async move { classified(classifier, fut.await) }
            },
        )
        .await
        .0
    }

    /// Races attempts made by `make`; each yields `(result, outcome, hint)`. Another attempt starts only when
    /// `ready` says the call can be sent again; until then, a hedge that is due waits another delay.
    pub(crate) async fn race<R, H, Fut, F, G>(&self, ready: G, mut make: F) -> (R, Outcome, H)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = (R, Outcome, H)>,
        G: Fn() -> bool,
    {
        if let Some(b) = &self.budget
            && self.deposits
        {
            b.deposit();
        }
        let seen = match &self.delay {
            Delay::Percentile(_, seen) => Some(&**seen),
            Delay::Fixed(_) => None,
        };
        let started = clock::now();
        // Without a delay (a percentile not known yet), no hedge: the one attempt is the call, timed to learn from.
        let Some(delay) = self.current_delay() else {
            let done = make().await;
            if let Some(seen) = seen
                && answered(done.1)
            {
                seen.record(clock::now().saturating_duration_since(started));
            }
            return done;
        };
        // Each running attempt with when it began (for the latencies a percentile hedge learns from).
        let mut running: Vec<(Pin<Box<Fut>>, Instant)> = vec![(Box::pin(make()), started)];
        let mut launched = 1u32;
        let timer = tokio::time::sleep(delay);
        tokio::pin!(timer);
        let mut last = None;
        let done = poll_fn(|cx| {
            loop {
                let mut launch_now = false;
                let mut i = 0;
                while i < running.len() {
                    if let Poll::Ready(done) = running[i].0.as_mut().poll(cx) {
                        let (_, began) = running.swap_remove(i);
                        if answered(done.1) {
                            if let Some(seen) = seen {
                                seen.record(clock::now().saturating_duration_since(began));
                            }
                            // The winner; returning drops (cancels) every other attempt.
                            return Poll::Ready(done);
                        }
                        last = Some(done);
                        launch_now = true;
                    } else {
                        i += 1;
                    }
                }
                let may_launch = launched <= self.max_hedged;
                if may_launch && (launch_now || timer.as_mut().poll(cx).is_ready()) {
                    if !ready() {
                        // Not sendable yet (its body is still arriving): look again after another delay.
                        timer.as_mut().reset(clock::now() + delay);
                        if running.is_empty() {
                            return Poll::Ready(last.take().expect("an attempt finished"));
                        }
                        continue;
                    }
                    if self.budget.as_ref().is_some_and(|b| !b.withdraw()) {
                        launched = u32::MAX;
                    } else {
                        launched += 1;
                        self.listeners.emit(Event::HedgeLaunched { name: &self.name, attempt: launched });
                        let now = clock::now();
                        running.push((Box::pin(make()), now));
                        timer.as_mut().reset(now + delay);
                        continue;
                    }
                }
                if running.is_empty() {
                    return Poll::Ready(last.take().expect("an attempt finished"));
                }
                return Poll::Pending;
            }
        })
        .await;
        // The attempts the winner cancelled took at least this long: counted as that, so that the slow tail the
        // hedge cuts off still counts in the percentile.
        if let Some(seen) = seen {
            let now = clock::now();
            for (_, began) in &running {
                seen.record(now.saturating_duration_since(*began));
            }
        }
        done
    }
}

/// Whether an attempt that ended in `outcome` answered (the race's winner): a success, or a failure not worth
/// another attempt.
fn answered(outcome: Outcome) -> bool {
    outcome.is_ok() || !outcome.is_retryable()
}

/// Latencies seen, in buckets growing by a quarter from 50 µs (the last holds everything from about 60 s):
/// percentiles within 25 %, in 256 bytes, without a lock. Older latencies fade: once the buckets hold
/// [`FADE_AT`], every count is halved.
#[derive(Debug)]
pub struct Latencies {
    buckets: [AtomicU32; LATENCY_BUCKETS],
    count: AtomicU32,
}

const LATENCY_BUCKETS: usize = 64;
/// The lower bound of the first bucket, in nanoseconds.
const FIRST_BOUND_NANOS: f64 = 50_000.0;
const GROWTH: f64 = 1.25;
/// Latencies held before they are halved: the percentile follows about the last 1,000 to 2,000 answers.
pub const FADE_AT: u32 = 2_000;

impl Default for Latencies {
    fn default() -> Self {
        Latencies { buckets: std::array::from_fn(|_| AtomicU32::new(0)), count: AtomicU32::new(0) }
    }
}

impl Latencies {
    fn bucket(d: Duration) -> usize {
        let nanos = d.as_nanos() as f64;
        if nanos <= FIRST_BOUND_NANOS {
            return 0;
        }
        ((nanos / FIRST_BOUND_NANOS).ln() / GROWTH.ln()).ceil().min((LATENCY_BUCKETS - 1) as f64) as usize
    }

    /// The upper bound of bucket `i`.
    fn bound(i: usize) -> Duration {
        Duration::from_nanos((FIRST_BOUND_NANOS * GROWTH.powi(i as i32)) as u64)
    }

    /// Counts one latency.
    pub fn record(&self, d: Duration) {
        self.buckets[Latencies::bucket(d)].fetch_add(1, Ordering::Relaxed);
        if self.count.fetch_add(1, Ordering::Relaxed) + 1 == FADE_AT {
            // One caller fades them (others may count meanwhile: the halving is approximate, which a percentile
            // estimate can afford).
            for b in &self.buckets {
                let _ = b.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| Some(n / 2));
            }
            self.count.fetch_sub(FADE_AT / 2, Ordering::Relaxed);
        }
    }

    /// The `p`th percentile (upper bound of its bucket), or `None` with fewer than [`MIN_SAMPLES`] counted.
    pub fn percentile(&self, p: f64) -> Option<Duration> {
        let counts: [u32; LATENCY_BUCKETS] = std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed));
        let total: u64 = counts.iter().map(|&n| u64::from(n)).sum();
        if total < u64::from(MIN_SAMPLES) {
            return None;
        }
        let rank = ((p / 100.0) * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0u64;
        for (i, &n) in counts.iter().enumerate() {
            seen += u64::from(n);
            if seen >= rank {
                return Some(Latencies::bound(i));
            }
        }
        Some(Latencies::bound(LATENCY_BUCKETS - 1))
    }
}
