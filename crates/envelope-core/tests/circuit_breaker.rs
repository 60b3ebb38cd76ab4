//! Circuit breaker behaviour, ported from what resilience4j and Polly pin down. Paused clock, no real sleeps.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::Duration;

use envelope_core::Outcome;
use envelope_core::circuit_breaker::{CircuitBreaker, Config, Escalation, Registry, State};
use envelope_core::event::Event;
use envelope_core::outcome::BreakerVerdict;
use tokio::time::advance;

const SEC: Duration = Duration::from_secs(1);

fn breaker(config: Config) -> CircuitBreaker {
    CircuitBreaker::new("test", config)
}

fn count(window: u32, minimum: u32) -> Config {
    Config::builder()
        .count_window(window)
        .minimum_calls(minimum)
        .open_duration(10 * SEC)
        .half_open_calls(3)
        .build()
        .unwrap()
}

fn record(b: &CircuitBreaker, outcome: Outcome) {
    b.try_acquire().expect("permitted").record(outcome);
}

fn record_n(b: &CircuitBreaker, n: usize, outcome: Outcome) {
    for _ in 0..n {
        record(b, outcome);
    }
}

/// Opens the breaker, then moves past the open duration so the next call is a probe.
async fn to_half_open(b: &CircuitBreaker) {
    b.transition_to(State::Open);
    advance(b.config().open_duration() * 40).await;
}

#[tokio::test(start_paused = true)]
async fn four_of_ten_failures_stay_closed_five_of_ten_trip() {
    let b = breaker(count(10, 10));
    record_n(&b, 4, Outcome::Upstream5xx);
    record_n(&b, 6, Outcome::Ok);
    assert_eq!(b.state(), State::Closed);
    assert_eq!(b.metrics().failure_rate, Some(40.0));

    let b = breaker(count(10, 10));
    record_n(&b, 5, Outcome::Ok);
    record_n(&b, 4, Outcome::Timeout);
    assert_eq!(b.state(), State::Closed, "9 calls: below the minimum");
    record(&b, Outcome::ConnectError);
    assert_eq!(b.state(), State::Open, "5 of 10 is 50 %: trips at >=");
}

#[tokio::test(start_paused = true)]
async fn nothing_trips_before_minimum_calls() {
    let b = breaker(count(100, 20));
    record_n(&b, 19, Outcome::Failure);
    assert_eq!(b.state(), State::Closed);
    assert_eq!(b.metrics().failure_rate, None, "no rate is published before the minimum");
    record(&b, Outcome::Failure);
    assert_eq!(b.state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn a_success_that_completes_the_minimum_can_trip() {
    let b = breaker(count(10, 10));
    record_n(&b, 9, Outcome::Failure);
    record(&b, Outcome::Ok);
    assert_eq!(b.state(), State::Open, "9 of 10 failed once the window reached its minimum");
}

#[tokio::test(start_paused = true)]
async fn slow_calls_trip_at_zero_percent_failures() {
    let config = Config::builder()
        .count_window(4)
        .minimum_calls(4)
        .slow_calls(Duration::from_millis(100), 50.0)
        .build()
        .unwrap();
    let b = breaker(config);
    for slow in [false, true, false, true] {
        let permit = b.try_acquire().unwrap();
        advance(if slow { Duration::from_millis(100) } else { Duration::from_millis(99) }).await;
        permit.record(Outcome::Ok);
    }
    let m = b.metrics();
    assert_eq!(b.state(), State::Open);
    assert_eq!(m.window.failures, 0);
}

#[tokio::test(start_paused = true)]
async fn open_moves_to_half_open_exactly_at_the_open_duration() {
    let b = breaker(count(2, 2));
    record_n(&b, 2, Outcome::Failure);
    assert_eq!(b.state(), State::Open);
    advance(10 * SEC - Duration::from_nanos(1)).await;
    let err = b.try_acquire().unwrap_err();
    assert_eq!(err.state(), State::Open);
    assert_eq!(err.remaining(), Some(Duration::from_nanos(1)));
    advance(Duration::from_nanos(1)).await;
    let probe = b.try_acquire().expect("open duration has passed");
    assert!(probe.is_probe());
    assert_eq!(b.state(), State::HalfOpen);
    drop(probe);
}

#[tokio::test(start_paused = true)]
async fn rejected_calls_are_counted_and_reported() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let config = Config::builder()
        .count_window(2)
        .minimum_calls(2)
        .listener(move |e: &Event<'_>| {
            let line = match e {
                Event::StateTransition { from, to, .. } => format!("{from}->{to}"),
                Event::CallNotPermitted { state, .. } => format!("rejected in {state}"),
                Event::FailureRateExceeded { failure_rate, .. } => format!("rate {failure_rate}"),
                _ => return,
            };
            log.lock().unwrap().push(line);
        })
        .build()
        .unwrap();
    let b = breaker(config);
    record_n(&b, 2, Outcome::Failure);
    assert!(b.try_acquire().is_err());
    assert!(b.try_acquire().is_err());
    assert_eq!(*seen.lock().unwrap(), ["rate 100", "closed->open", "rejected in open", "rejected in open"]);
}

#[tokio::test(start_paused = true)]
async fn half_open_closes_when_probes_succeed_and_reopens_when_they_fail() {
    let b = breaker(count(10, 10));
    to_half_open(&b).await;
    record_n(&b, 3, Outcome::Ok);
    assert_eq!(b.state(), State::Closed);
    assert_eq!(b.metrics().window.calls, 0, "closing starts a fresh window");

    to_half_open(&b).await;
    record(&b, Outcome::Ok);
    record(&b, Outcome::Failure);
    assert_eq!(b.state(), State::HalfOpen, "decides only once all probes are in");
    record(&b, Outcome::Failure);
    assert_eq!(b.state(), State::Open, "2 of 3 probes failed");
}

#[test]
fn half_open_admits_exactly_n_of_many_concurrent_callers() {
    const THREADS: usize = 16;
    for round in 0..50 {
        let b = breaker(count(10, 10));
        b.transition_to(State::HalfOpen);
        let barrier = Arc::new(Barrier::new(THREADS));
        let admitted = Arc::new(AtomicUsize::new(0));
        let handles: Vec<_> = (0..THREADS)
            .map(|_| {
                let (b, barrier, admitted) = (b.clone(), barrier.clone(), admitted.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    if let Ok(permit) = b.try_acquire() {
                        admitted.fetch_add(1, Ordering::SeqCst);
                        // Never handed back: however late the other threads try, no probe is freed for them.
                        std::mem::forget(permit);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(admitted.load(Ordering::SeqCst), 3, "round {round}");
    }
}

#[tokio::test(start_paused = true)]
async fn ignored_outcomes_are_not_counted_and_hand_back_the_probe() {
    let b = breaker(count(4, 4));
    record_n(&b, 10, Outcome::CircuitOpen);
    record_n(&b, 10, Outcome::Shed);
    record_n(&b, 10, Outcome::RateLimited);
    assert_eq!(b.metrics().window.calls, 0, "local rejections and upstream 429 are ignored");

    to_half_open(&b).await;
    let probes: Vec<_> = (0..3).map(|_| b.try_acquire().unwrap()).collect();
    assert!(b.try_acquire().is_err(), "all three probes taken");
    let mut probes = probes.into_iter();
    probes.next().unwrap().record(Outcome::ClientCancelled);
    let replacement = b.try_acquire().expect("an ignored probe hands its permit back");
    drop(probes.next().unwrap());
    let another = b.try_acquire().expect("a dropped probe hands its permit back");
    for p in [replacement, another, probes.next().unwrap()] {
        p.record(Outcome::Ok);
    }
    assert_eq!(b.state(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn outcomes_can_be_recorded_differently() {
    let config = Config::builder()
        .count_window(2)
        .minimum_calls(2)
        .record(Outcome::Upstream4xx, BreakerVerdict::Failure)
        .record(Outcome::Timeout, BreakerVerdict::Ignore)
        .build()
        .unwrap();
    let b = breaker(config);
    record_n(&b, 5, Outcome::Timeout);
    assert_eq!(b.state(), State::Closed);
    record_n(&b, 2, Outcome::Upstream4xx);
    assert_eq!(b.state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn escalation_lengthens_reopens_and_resets_after_a_close() {
    let config = Config::builder()
        .count_window(1)
        .minimum_calls(1)
        .half_open_calls(1)
        .open_duration(10 * SEC)
        .escalation(Escalation::doubling(40 * SEC))
        .build()
        .unwrap();
    let b = breaker(config);
    record(&b, Outcome::Failure);
    let mut open_for = Vec::new();
    for _ in 0..4 {
        open_for.push(b.metrics().remaining_open.unwrap().as_secs());
        advance(b.metrics().remaining_open.unwrap()).await;
        record(&b, Outcome::Failure); // the probe fails: re-open
    }
    assert_eq!(open_for, [10, 20, 40, 40]);
    advance(40 * SEC).await;
    record(&b, Outcome::Ok);
    assert_eq!(b.state(), State::Closed);
    record(&b, Outcome::Failure);
    assert_eq!(b.metrics().remaining_open, Some(10 * SEC), "escalation reset by the close");
}

#[tokio::test(start_paused = true)]
async fn time_window_rolls_over_on_the_second() {
    let config = Config::builder().time_window(10).minimum_calls(100).build().unwrap();
    let b = breaker(config);
    record(&b, Outcome::Failure);
    advance(Duration::from_millis(9_999)).await;
    record(&b, Outcome::Ok);
    assert_eq!(b.metrics().window.calls, 2, "second 0 is still inside a 10 s window at 9.999 s");
    advance(Duration::from_millis(1)).await;
    let w = b.metrics().window;
    assert_eq!((w.calls, w.failures), (1, 0), "at 10 s the bucket of second 0 has left the window");
}

#[tokio::test(start_paused = true)]
async fn time_window_forgets_failures_older_than_the_window() {
    let config = Config::builder().time_window(10).minimum_calls(4).failure_rate_threshold(50.0).build().unwrap();
    let b = breaker(config);
    record_n(&b, 3, Outcome::Failure);
    advance(10 * SEC).await;
    record_n(&b, 3, Outcome::Ok);
    assert_eq!(b.metrics().window.calls, 3, "the three failures fell out of the window");
    record(&b, Outcome::Failure);
    assert_eq!(b.state(), State::Closed, "1 of 4 = 25 %");
    record(&b, Outcome::Failure);
    record(&b, Outcome::Failure);
    assert_eq!(b.state(), State::Open, "3 of 6 = 50 %");
}

#[tokio::test(start_paused = true)]
async fn forced_and_operator_states_never_transition_by_themselves() {
    let b = breaker(count(2, 2));
    b.force_open();
    advance(3600 * SEC).await;
    assert_eq!(b.try_acquire().unwrap_err().state(), State::ForcedOpen);
    assert_eq!(b.state(), State::ForcedOpen);

    b.force_closed();
    record_n(&b, 50, Outcome::Failure);
    assert_eq!(b.state(), State::ForcedClosed);
    assert_eq!(b.metrics().window.failures, 2, "forced closed still records");

    let rates = Arc::new(AtomicUsize::new(0));
    let seen = rates.clone();
    let config = Config::builder()
        .count_window(2)
        .minimum_calls(2)
        .listener(move |e: &Event<'_>| {
            if matches!(e, Event::FailureRateExceeded { .. }) {
                seen.fetch_add(1, Ordering::SeqCst);
            }
        })
        .build()
        .unwrap();
    let m = CircuitBreaker::with_state("metrics-only", config, State::MetricsOnly);
    record_n(&m, 5, Outcome::Failure);
    assert_eq!(m.state(), State::MetricsOnly);
    assert!(rates.load(Ordering::SeqCst) >= 1, "metrics-only reports what it would have done");

    let d = CircuitBreaker::with_state("disabled", count(2, 2), State::Disabled);
    record_n(&d, 50, Outcome::Failure);
    assert_eq!(d.state(), State::Disabled);
    assert_eq!(d.metrics().window.calls, 0, "disabled records nothing");
}

#[tokio::test(start_paused = true)]
async fn a_hung_probe_cannot_wedge_half_open() {
    let config = Config::builder()
        .count_window(2)
        .minimum_calls(2)
        .half_open_calls(1)
        .open_duration(10 * SEC)
        .max_half_open_wait(Some(5 * SEC))
        .build()
        .unwrap();
    let b = breaker(config);
    to_half_open(&b).await;
    let hung = b.try_acquire().unwrap();
    advance(5 * SEC - Duration::from_nanos(1)).await;
    assert_eq!(b.try_acquire().unwrap_err().state(), State::HalfOpen);
    advance(Duration::from_nanos(1)).await;
    assert_eq!(b.try_acquire().unwrap_err().state(), State::Open, "re-opened after the half-open limit");
    hung.record(Outcome::Ok);
    assert_eq!(b.state(), State::Open, "a result from an earlier state is not counted");
}

#[tokio::test(start_paused = true)]
async fn results_from_an_earlier_state_are_not_counted() {
    let b = breaker(count(2, 2));
    let late = b.try_acquire().unwrap();
    record_n(&b, 2, Outcome::Failure);
    b.reset();
    late.record(Outcome::Failure);
    assert_eq!(b.metrics().window.calls, 0);
}

#[test]
fn eight_threads_times_500_failures_count_exactly_4000() {
    for config in [
        Config::builder().count_window(4000).minimum_calls(4000).build().unwrap(),
        Config::builder().time_window(3600).minimum_calls(1).build().unwrap(),
    ] {
        let b = CircuitBreaker::with_state("hammer", config, State::ForcedClosed);
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let b = b.clone();
                std::thread::spawn(move || {
                    for _ in 0..500 {
                        b.try_acquire().unwrap().record(Outcome::Failure);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let w = b.metrics().window;
        assert_eq!((w.calls, w.failures), (4000, 4000), "{:?}", b.config().window());
    }
}

#[tokio::test(start_paused = true)]
async fn call_records_through_the_classifier() {
    let b = breaker(count(2, 2));
    for _ in 0..2 {
        let r = b.call(|| async { Err::<(), _>(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)) }).await;
        assert!(matches!(r, Err(envelope_core::Error::Inner(_))));
    }
    let r = b.call(|| async { Ok::<_, std::io::Error>(()) }).await;
    assert!(matches!(r, Err(envelope_core::Error::CircuitOpen(_))));
}

#[test]
fn registry_creates_once_and_shares_state() {
    let registry = Registry::new(count(2, 2));
    let a = registry.breaker("payments");
    let b = registry.breaker("payments");
    a.force_open();
    assert_eq!(b.state(), State::ForcedOpen);
    registry.breaker("auth");
    let names: Vec<_> = registry.all().iter().map(|b| b.name().to_owned()).collect();
    assert_eq!(names, ["auth", "payments"]);
}

#[test]
fn handles_are_send_and_sync() {
    fn check<T: Send + Sync + Clone + 'static>() {}
    check::<CircuitBreaker>();
    check::<Registry>();
}
