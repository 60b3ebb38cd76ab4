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
