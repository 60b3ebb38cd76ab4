//! Hedging, fallback and fault injection.

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use envelope_core::fallback::Fallback;
use envelope_core::fault::{Fault, FaultInjector};
use envelope_core::hedge::Hedge;
use envelope_core::{Error, Outcome, OutcomeSet};
use tokio::time::Instant;

const MS: Duration = Duration::from_millis(1);

struct Count(Arc<AtomicUsize>);
impl Drop for Count {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[tokio::test(start_paused = true)]
async fn hedge_first_success_wins_and_losers_are_cancelled() {
    let hedge = Hedge::new("h", 50 * MS, 2);
    let started = Cell::new(0u32);
    let cancelled = Arc::new(AtomicUsize::new(0));
    let t0 = Instant::now();
    let r = hedge
        .call(|| {
            started.set(started.get() + 1);
            let n = started.get();
            let guard = Count(cancelled.clone());
            async move {
                let _guard = guard;
                // The first attempt is very slow, the second answers 20 ms after it starts.
                let took = if n == 1 { 1000 * MS } else { 20 * MS };
                tokio::time::sleep(took).await;
                Ok::<_, std::io::Error>(n)
            }
        })
        .await;
    assert_eq!(r.unwrap(), 2);
    assert_eq!(Instant::now() - t0, 70 * MS, "hedge at 50 ms, answer at 70 ms");
    assert_eq!(started.get(), 2, "the third attempt was never needed");
    assert_eq!(cancelled.load(Ordering::SeqCst), 2, "both attempts dropped: the loser cancelled");
}

/// Sendable again only once `ready` is set (a request whose body is still arriving from its client).
struct Arriving<'a>(&'a std::sync::atomic::AtomicBool);

impl<T> envelope_core::Classify<T, std::io::Error> for Arriving<'_> {
    fn classify(&self, result: &Result<T, std::io::Error>) -> Outcome {
        envelope_core::DefaultClassifier.classify(result)
    }
    fn can_send_again(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

#[tokio::test(start_paused = true)]
async fn a_hedge_waits_until_the_call_can_be_sent_again() {
    use std::sync::atomic::AtomicBool;
    let hedge = Hedge::new("h", 50 * MS, 1);
    let ready = AtomicBool::new(false);
    let started = Cell::new(Vec::new());
    let t0 = Instant::now();
    let arriving = Arriving(&ready);
    let call = hedge.call_classified(&arriving, || {
        let mut at = started.take();
        at.push(Instant::now() - t0);
        let n = at.len();
        started.set(at);
        async move {
            tokio::time::sleep(if n == 1 { 1000 * MS } else { 10 * MS }).await;
            Ok::<_, std::io::Error>(n)
        }
    });
    // Sendable from 120 ms on: the hedge due at 50 ms waits, looks again at 100 ms, and starts at 150 ms.
    let flip = async {
        tokio::time::sleep(120 * MS).await;
        ready.store(true, Ordering::SeqCst);
    };
    let (r, ()) = tokio::join!(call, flip);
    assert_eq!(r.unwrap(), 2);
    assert_eq!(started.take(), [Duration::ZERO, 150 * MS]);

    // Never sendable again: no hedge at all, the one attempt answers.
    let never = AtomicBool::new(false);
    let calls = Cell::new(0);
    let t0 = Instant::now();
    let r = hedge
        .call_classified(&Arriving(&never), || {
            calls.set(calls.get() + 1);
            async {
                tokio::time::sleep(300 * MS).await;
                Ok::<_, std::io::Error>(7)
            }
        })
        .await;
    assert_eq!((r.unwrap(), calls.get(), Instant::now() - t0), (7, 1, 300 * MS));
}

#[tokio::test(start_paused = true)]
async fn hedge_launches_at_once_after_a_failure_and_returns_the_last_failure() {
    let hedge = Hedge::new("h", 1000 * MS, 2);
    let started = Cell::new(0u32);
    let t0 = Instant::now();
    let r = hedge
        .call(|| {
            started.set(started.get() + 1);
            async { Err::<(), _>("down") }
        })
        .await;
    assert!(matches!(r, Err(Error::Inner("down"))));
    assert_eq!(started.get(), 3, "1 + 2 hedges");
    assert_eq!(Instant::now(), t0, "failures launch the next attempt without waiting");
}

#[tokio::test(start_paused = true)]
async fn fallback_only_on_configured_outcomes() {
    let fallback = Fallback::new("f").on(OutcomeSet::of(&[Outcome::ConnectError]));
    let refused = || async { Err::<&str, _>(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)) };
    assert_eq!(fallback.call(refused, |_| "cached").await.unwrap(), "cached");
    let other = || async { Err::<&str, _>(std::io::Error::other("bad")) };
    assert!(matches!(fallback.call(other, |_| "cached").await, Err(Error::Inner(_))));
    let fine = || async { Ok::<_, std::io::Error>("fresh") };
    assert_eq!(fallback.call(fine, |_| "cached").await.unwrap(), "fresh");
}

#[tokio::test(start_paused = true)]
async fn faults_hit_about_their_percentage_and_expire() {
    let faults = FaultInjector::new("f");
    assert_eq!(faults.decide(), Default::default(), "inactive by default");
    faults.set(Fault::abort(Outcome::Upstream5xx, 30.0), Some(Instant::now() + Duration::from_secs(1))).unwrap();
    assert!(faults.set(Fault::abort(Outcome::Upstream5xx, f64::NAN), None).is_err());
    assert!(faults.set(Fault::delay(MS, -1.0), None).is_err());
    let aborted = (0..10_000).filter(|_| faults.decide().abort == Some(Outcome::Upstream5xx)).count();
    assert!((2_500..3_500).contains(&aborted), "{aborted} of 10000 at 30 %");
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(faults.decide(), Default::default(), "expired");
    faults.set(Fault::delay(20 * MS, 100.0), None).unwrap();
    assert_eq!(faults.decide().delay, Some(20 * MS));
    faults.clear();
    assert!(faults.current().is_none());
}

#[tokio::test(start_paused = true)]
async fn hedging_inside_the_envelope_passes_each_attempt_through_the_breaker() {
    use envelope_core::Envelope;
    use envelope_core::circuit_breaker::{CircuitBreaker, Config};
    let breaker = CircuitBreaker::new("b", Config::builder().count_window(10).minimum_calls(10).build().unwrap());
    let env = Envelope::builder().hedge(Hedge::new("h", 50 * MS, 1)).circuit_breaker(breaker.clone()).build();
    let started = Cell::new(0u32);
    let cancelled = Arc::new(AtomicUsize::new(0));
    let r = env
        .call(|| {
            started.set(started.get() + 1);
            let n = started.get();
            let guard = Count(cancelled.clone());
            async move {
                let _guard = guard;
                tokio::time::sleep(if n == 1 { 1000 * MS } else { 10 * MS }).await;
                Ok::<_, std::io::Error>(n)
            }
        })
        .await;
    assert_eq!(r.unwrap(), 2, "the hedge answered first");
    assert_eq!(cancelled.load(Ordering::SeqCst), 2, "the slow attempt was cancelled");
    assert_eq!(breaker.metrics().window.calls, 1, "only the finished attempt was recorded; the cancelled one was not");
}

#[test]
fn latencies_give_percentiles_within_a_bucket_and_fade() {
    use envelope_core::hedge::{FADE_AT, Latencies, MIN_SAMPLES};
    let seen = Latencies::default();
    for _ in 0..MIN_SAMPLES - 1 {
        seen.record(10 * MS);
    }
    assert_eq!(seen.percentile(50.0), None, "too few to say");
    seen.record(10 * MS);
    let p = seen.percentile(50.0).unwrap();
    assert!(p >= 10 * MS && p <= 13 * MS, "{p:?}: the upper bound of 10 ms's bucket");

    let seen = Latencies::default();
    for ms in 1..=1000u64 {
        seen.record(Duration::from_millis(ms));
    }
    for (pct, exact) in [(50.0, 500.0), (95.0, 950.0), (99.0, 990.0)] {
        let got = seen.percentile(pct).unwrap().as_secs_f64() * 1000.0;
        assert!(got >= exact && got <= exact * 1.25, "p{pct}: {got} ms against {exact}");
    }
    // Newer latencies take over: after twice the fading threshold at 2 ms, the old second-long ones are a trace.
    for _ in 0..2 * FADE_AT {
        seen.record(2 * MS);
    }
    let p50 = seen.percentile(50.0).unwrap();
    assert!(p50 <= 3 * MS, "{p50:?}");
    assert!(seen.percentile(99.9).unwrap() > 100 * MS, "the tail is still there");
}

#[tokio::test(start_paused = true)]
async fn a_percentile_hedge_learns_the_latency_first_then_hedges_only_the_slow_calls() {
    let hedge = Hedge::after_percentile("h", 95.0, 1).unwrap();
    assert!(Hedge::after_percentile("h", 100.0, 1).is_none() && Hedge::after_percentile("h", 0.0, 1).is_none());
    let attempts = Cell::new(0u32);
    // 20 calls at 10 ms: no hedge while it learns.
    for _ in 0..envelope_core::hedge::MIN_SAMPLES {
        let r = hedge
            .call(|| {
                attempts.set(attempts.get() + 1);
                async {
                    tokio::time::sleep(10 * MS).await;
                    Ok::<_, std::io::Error>(())
                }
            })
            .await;
        assert!(r.is_ok());
    }
    assert_eq!(attempts.get(), envelope_core::hedge::MIN_SAMPLES);
    let delay = hedge.current_delay().unwrap();
    assert!(delay >= 10 * MS && delay <= 13 * MS, "{delay:?}");

    // A call whose first attempt stalls: the hedge starts after the learnt p95 and wins.
    attempts.set(0);
    let t0 = Instant::now();
    let r = hedge
        .call(|| {
            attempts.set(attempts.get() + 1);
            let n = attempts.get();
            async move {
                tokio::time::sleep(if n == 1 { 10_000 * MS } else { 10 * MS }).await;
                Ok::<_, std::io::Error>(n)
            }
        })
        .await;
    assert_eq!(r.unwrap(), 2);
    // The timer wheel rounds each sleep up to the next millisecond.
    assert!(t0.elapsed() >= delay + 10 * MS && t0.elapsed() <= delay + 12 * MS, "{:?}", t0.elapsed());
}

#[tokio::test(start_paused = true)]
async fn a_hedge_drawing_from_a_retrys_budget_does_not_fill_it() {
    use envelope_core::retry::RetryBudget;
    let slow = |n: u32| async move {
        tokio::time::sleep(if n % 2 == 1 { 1000 * MS } else { MS }).await;
        Ok::<_, std::io::Error>(n)
    };
    for (deposits, expect_hedges) in [(true, 5), (false, 0)] {
        let budget = RetryBudget::new(Duration::from_secs(10), 0, 0.5).unwrap();
        let hedge = Hedge::new("h", 10 * MS, 1);
        let hedge = if deposits { hedge.with_budget(budget.clone()) } else { hedge.drawing_from(budget.clone()) };
        // Ten calls deposit (or not) first; then ten slow calls ask for hedges.
        for _ in 0..10 {
            hedge.call(|| slow(2)).await.unwrap();
        }
        let launched = Cell::new(0u32);
        for _ in 0..10 {
            let n = Cell::new(0u32);
            hedge
                .call(|| {
                    n.set(n.get() + 1);
                    if n.get() == 2 {
                        launched.set(launched.get() + 1);
                    }
                    slow(n.get())
                })
                .await
                .unwrap();
        }
        // With deposits: the first ten calls' deposits at a ratio of 0.5 pay for five hedges at least (the slow
        // calls deposit too). Without: the budget stays empty (no minimum per second), so nothing hedges.
        assert!(
            if deposits { launched.get() >= expect_hedges } else { launched.get() == 0 },
            "deposits {deposits}: {} hedges",
            launched.get()
        );
    }
}
