//! The composed envelope: order of policies, the three faces (async, blocking, tower), and shared state.

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use envelope_core::bulkhead::{Bulkhead, Config as BulkheadConfig};
use envelope_core::circuit_breaker::{CircuitBreaker, Config as BreakerConfig, State};
use envelope_core::fallback::Fallback;
use envelope_core::fault::{Fault, FaultInjector};
use envelope_core::rate_limit::{Config as RateConfig, RateLimiter};
use envelope_core::retry::{Backoff, Config as RetryConfig, Retry};
use envelope_core::shed::{self, LoadShedder, Priority};
use envelope_core::{BoxError, Envelope, EnvelopeLayer, Error, Outcome, error::is_caused_by, error::outcome_of_error};
use tower::{Service, ServiceExt};
use tower_layer::Layer;

const MS: Duration = Duration::from_millis(1);

fn retry(max: u32) -> Retry {
    Retry::new("r", RetryConfig::builder().max_attempts(max).backoff(Backoff::none()).build().unwrap())
}

fn breaker(window: u32) -> CircuitBreaker {
    CircuitBreaker::new(
        "b",
        BreakerConfig::builder()
            .count_window(window)
            .minimum_calls(window)
            .open_duration(Duration::from_secs(30))
            .build()
            .unwrap(),
    )
}

#[tokio::test(start_paused = true)]
async fn retries_never_bypass_an_open_breaker() {
    let b = breaker(2);
    let env = Envelope::builder().retry(retry(5)).circuit_breaker(b.clone()).build();
    let calls = Cell::new(0);
    let r = env
        .call(|| {
            calls.set(calls.get() + 1);
            async { Err::<(), _>("down") }
        })
        .await;
    assert_eq!(calls.get(), 2, "the breaker opened after 2 failures; the 3rd attempt was rejected");
    assert!(matches!(r, Err(Error::CircuitOpen(_))), "circuit_open is not retried");
    assert_eq!(b.state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn a_call_that_began_earlier_has_only_the_rest_of_its_deadline() {
    let env = Envelope::builder().deadline(250 * MS).attempt_timeout(200 * MS).build();
    let arrived = tokio::time::Instant::now();
    // Say the request's body took 100 ms to arrive before the call.
    tokio::time::sleep(100 * MS).await;
    let (r, outcome) = env
        .call_classified_since(arrived, &envelope_core::DefaultClassifier, || async {
            tokio::time::sleep(Duration::from_secs(10)).await;
            Ok::<(), std::io::Error>(())
        })
        .await;
    assert!(matches!(r, Err(Error::Timeout(_))));
    assert_eq!(outcome, Outcome::Timeout);
    // The deadline (250 ms from arrival) cut the attempt before its own 200 ms were up (at 300 ms).
    assert_eq!(tokio::time::Instant::now() - arrived, 250 * MS);
}

#[tokio::test(start_paused = true)]
async fn deadline_bounds_all_attempts_and_waits() {
    let env = Envelope::builder()
        .deadline(250 * MS)
        .retry(Retry::new(
            "r",
            RetryConfig::builder().max_attempts(10).backoff(Backoff::constant(100 * MS)).build().unwrap(),
        ))
        .build();
    let t0 = tokio::time::Instant::now();
    let calls = Cell::new(0);
    let r = env
        .call(|| {
            calls.set(calls.get() + 1);
            async {
                tokio::time::sleep(20 * MS).await;
                Err::<(), _>("x")
            }
        })
        .await;
    // Attempts at 0, 120 and 240 ms; the third cannot finish (20 ms needed, 10 left): not started.
    assert_eq!(calls.get(), 2);
    assert!(matches!(r, Err(Error::Inner("x"))));
    assert!(tokio::time::Instant::now() - t0 <= 250 * MS);
}

#[tokio::test(start_paused = true)]
async fn attempt_timeout_is_per_attempt_and_releases_the_bulkhead() {
    let bulkhead = Bulkhead::new("bh", BulkheadConfig::builder().max_concurrent(1).build().unwrap());
    let env = Envelope::builder().retry(retry(3)).bulkhead(bulkhead.clone()).attempt_timeout(50 * MS).build();
    let calls = Cell::new(0);
    let r = env
        .call(|| {
            calls.set(calls.get() + 1);
            let n = calls.get();
            async move {
                if n < 3 {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Ok::<_, std::io::Error>(n)
            }
        })
        .await;
    assert_eq!(r.unwrap(), 3, "two attempts timed out, each released its permit for the next");
    assert_eq!(bulkhead.metrics().active, 0);
}

#[tokio::test(start_paused = true)]
async fn local_rejections_do_not_count_against_the_breaker() {
    let b = breaker(2);
    let limiter = RateLimiter::new("rl", RateConfig::per_second(1).burst(1).build().unwrap());
    let env = Envelope::builder().circuit_breaker(b.clone()).rate_limiter(limiter).build();
    let ok = || async { Ok::<_, std::io::Error>(()) };
    assert!(env.call(ok).await.is_ok());
    for _ in 0..10 {
        assert!(matches!(env.call(ok).await, Err(Error::RateLimited(_))));
    }
    assert_eq!(b.metrics().window.calls, 1, "rate-limited calls never reached the breaker's window");
    assert_eq!(b.state(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn shed_first_and_fallback_last() {
    let shedder = LoadShedder::new("s", shed::Config::builder().fixed(1).build().unwrap());
    let env = Envelope::builder()
        .shed(shedder.clone(), Priority::Critical)
        .fallback(Fallback::new("fb"))
        .retry(retry(2))
        .build();
    let hold = shedder.try_acquire(Priority::Critical).unwrap();
    let r = env.call_or(|| async { Ok::<_, std::io::Error>("live") }, |_| "fallback").await;
    assert!(matches!(r, Err(Error::Shed(_))), "shedding is not covered by the fallback by default");
    drop(hold);
    let calls = Cell::new(0);
    let r = env
        .call_or(
            || {
                calls.set(calls.get() + 1);
                async { Err::<&str, _>(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)) }
            },
            |outcome| if outcome == Outcome::ConnectError { "fallback" } else { "?" },
        )
        .await;
    assert_eq!(r.unwrap(), "fallback");
    assert_eq!(calls.get(), 2, "the fallback answered after every retry failed");
}

#[tokio::test(start_paused = true)]
async fn injected_faults_look_like_real_ones_to_the_other_policies() {
    let b = breaker(4);
    let faults = FaultInjector::new("f");
    faults.set(Fault::abort(Outcome::Upstream5xx, 100.0), None).unwrap();
    let env = Envelope::builder().retry(retry(2)).circuit_breaker(b.clone()).fault(faults.clone()).build();
    let calls = Cell::new(0);
    for _ in 0..2 {
        let r = env
            .call(|| {
                calls.set(calls.get() + 1);
                async { Ok::<_, std::io::Error>(()) }
            })
            .await;
        assert!(matches!(r, Err(Error::Injected(_))));
    }
    assert_eq!(calls.get(), 0, "aborted calls never reach the dependency");
    assert_eq!(b.state(), State::Open, "4 injected 5xx (2 calls x 2 attempts) opened the breaker");
    // Injected latency trips the attempt timeout.
    faults.set(Fault::delay(Duration::from_secs(1), 100.0), None).unwrap();
    b.reset();
    let env = Envelope::builder().attempt_timeout(100 * MS).fault(faults).build();
    let (r, outcome) =
        env.call_classified(&envelope_core::DefaultClassifier, || async { Ok::<_, std::io::Error>(()) }).await;
    assert!(r.is_err());
    assert_eq!(outcome, Outcome::Timeout);
}

#[test]
fn call_blocking_applies_the_same_policies_without_a_runtime() {
    let b = breaker(4);
    let env = Envelope::builder()
        .retry(retry(3))
        .circuit_breaker(b.clone())
        .bulkhead(Bulkhead::new("bh", BulkheadConfig::builder().max_concurrent(2).build().unwrap()))
        .build();
    let mut calls = 0;
    let r = env.call_blocking(|| {
        calls += 1;
        if calls < 3 { Err("flaky") } else { Ok(calls) }
    });
    assert_eq!(r.unwrap(), 3);
    let mut calls = 0;
    let r: Result<(), _> = env.call_blocking(|| {
        calls += 1;
        Err("down")
    });
    assert!(matches!(r, Err(Error::CircuitOpen(_))));
    assert_eq!(calls, 1, "window of 4: F F S, then F makes 75 %: open, the retry is rejected");
}

#[tokio::test(start_paused = true)]
async fn tower_layer_retries_and_reports_policy_errors_by_type() {
    let hits = Arc::new(AtomicUsize::new(0));
    let seen = hits.clone();
    let inner = tower::service_fn(move |req: u32| {
        let n = seen.fetch_add(1, Ordering::SeqCst) + 1;
        async move { if n < 3 { Err::<u32, BoxError>("flaky".into()) } else { Ok(req * 2) } }
    });
    let env = Envelope::builder().retry(retry(3)).build();
    let mut svc = EnvelopeLayer::new(env).layer(inner);
    assert_eq!(svc.ready().await.unwrap().call(21).await.unwrap(), 42);
    assert_eq!(hits.load(Ordering::SeqCst), 3);

    let slow = tower::service_fn(|_: ()| async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        Ok::<_, BoxError>(())
    });
    let env = Envelope::builder().attempt_timeout(10 * MS).build();
    let err = EnvelopeLayer::new(env).layer(slow).oneshot(()).await.unwrap_err();
    assert!(is_caused_by::<envelope_core::timeout::Elapsed>(err.as_ref()));
    assert_eq!(outcome_of_error(err.as_ref()), Outcome::Timeout);
}

#[tokio::test(start_paused = true)]
async fn clones_share_state() {
    let env = Envelope::builder().circuit_breaker(breaker(2)).build();
    let clone = env.clone();
    for _ in 0..2 {
        let _ = env.call(|| async { Err::<(), _>("down") }).await;
    }
    assert!(matches!(clone.call(|| async { Ok::<_, &str>(()) }).await, Err(Error::CircuitOpen(_))));
}

#[test]
fn public_types_are_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Envelope>();
    check::<EnvelopeLayer>();
    check::<Bulkhead>();
    check::<RateLimiter>();
    check::<LoadShedder>();
    check::<Retry>();
    check::<FaultInjector>();
    check::<Error<std::io::Error>>();
}

#[tokio::test(start_paused = true)]
async fn each_policy_is_a_tower_layer_on_its_own() {
    let down = tower::service_fn(|_: ()| async { Err::<(), BoxError>("down".into()) });

    // A breaker alone: two failures in a window of two open it; the third call never reaches the service.
    let b = breaker(2);
    let mut svc = EnvelopeLayer::from(b.clone()).layer(down);
    for _ in 0..2 {
        assert!(svc.ready().await.unwrap().call(()).await.is_err());
    }
    let err = svc.ready().await.unwrap().call(()).await.unwrap_err();
    assert_eq!(outcome_of_error(err.as_ref()), Outcome::CircuitOpen);

    // A bulkhead alone: one in flight, the second rejected at once.
    let bh = Bulkhead::new("bh", BulkheadConfig::builder().max_concurrent(1).build().unwrap());
    let slow = tower::service_fn(|_: ()| async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        Ok::<_, BoxError>(())
    });
    let svc = EnvelopeLayer::from(bh).layer(slow);
    let first = tokio::spawn(svc.clone().oneshot(()));
    tokio::task::yield_now().await;
    let err = svc.clone().oneshot(()).await.unwrap_err();
    assert_eq!(outcome_of_error(err.as_ref()), Outcome::BulkheadFull);
    assert!(first.await.unwrap().is_ok());

    // A timeout alone.
    let err = EnvelopeLayer::timeout(10 * MS).layer(slow).oneshot(()).await.unwrap_err();
    assert_eq!(outcome_of_error(err.as_ref()), Outcome::Timeout);

    // A rate limiter alone: a burst of one, then 429-like rejections.
    let rl = RateLimiter::new("rl", RateConfig::per_second(1).burst(1).build().unwrap());
    let ok = tower::service_fn(|_: ()| async { Ok::<_, BoxError>(()) });
    let svc = EnvelopeLayer::from(rl).layer(ok);
    assert!(svc.clone().oneshot(()).await.is_ok());
    let err = svc.clone().oneshot(()).await.unwrap_err();
    assert_eq!(outcome_of_error(err.as_ref()), Outcome::LocalRateLimited);

    // A retry alone: a flaky service answers on its third attempt.
    let hits = Arc::new(AtomicUsize::new(0));
    let seen = hits.clone();
    let flaky = tower::service_fn(move |_: ()| {
        let n = seen.fetch_add(1, Ordering::SeqCst) + 1;
        async move { if n < 3 { Err::<u32, BoxError>("flaky".into()) } else { Ok(n as u32) } }
    });
    assert_eq!(EnvelopeLayer::from(retry(3)).layer(flaky).oneshot(()).await.unwrap(), 3);
}

/// The step face's bulkhead queue, for callers that wait on their own event loop: the queued attempt waits at most
/// the queue's wait or the time left before the deadline, runs with only the rest of the deadline, and a wait that
/// ran out is the deadline's timeout or the bulkhead's rejection.
#[tokio::test(start_paused = true)]
async fn steps_wait_in_the_bulkhead_queue_within_the_deadline() {
    use std::task::{Context, Poll, Waker};
    let bulkhead = Bulkhead::new("bh", BulkheadConfig::builder().max_concurrent(1).queue(2, 500 * MS).build().unwrap());
    let env = Envelope::builder().deadline(300 * MS).attempt_timeout(200 * MS).bulkhead(bulkhead.clone()).build();
    let mut cx = Context::from_waker(Waker::noop());

    let mut holder = env.steps().unwrap();
    let held = holder.admit_or_queue().unwrap();
    assert_eq!(held.queue_wait(), None, "a free permit: no wait");
    let mut waiter = env.steps().unwrap();
    let mut queued = waiter.admit_or_queue().unwrap();
    assert_eq!(queued.queue_wait(), Some(300 * MS), "the deadline is shorter than the queue's wait");
    assert!(queued.poll_queue(&mut cx).is_pending());
    assert!(env.steps().unwrap().admit().is_err(), "admit() never queues");

    tokio::time::advance(150 * MS).await;
    assert_eq!(queued.queue_wait(), Some(150 * MS));
    assert_eq!(holder.after(held, Outcome::Ok, None, true), None);
    assert_eq!(queued.poll_queue(&mut cx), Poll::Ready(()));
    assert_eq!(queued.limit(), Some(150 * MS), "only the rest of the deadline");
    assert_eq!(bulkhead.metrics().active, 1);

    // Another waits behind it; its wait runs out with the deadline: a timeout, and its place is given up.
    let mut late = env.steps().unwrap();
    let stuck = late.admit_or_queue().unwrap();
    tokio::time::advance(300 * MS).await;
    let (_, outcome) = late.queue_timed_out(stuck).unwrap_err();
    assert_eq!(outcome, Outcome::Timeout);
    assert_eq!(bulkhead.metrics().queued, 0);
    assert_eq!(waiter.after(queued, Outcome::Ok, None, true), None);
    assert_eq!(bulkhead.metrics().active, 0);

    // Without a deadline, the queue's own wait: a rejection that waited.
    let env = Envelope::builder().bulkhead(bulkhead.clone()).build();
    let mut a = env.steps().unwrap();
    let held = a.admit_or_queue().unwrap();
    let mut b = env.steps().unwrap();
    let waiting = b.admit_or_queue().unwrap();
    assert_eq!(waiting.queue_wait(), Some(500 * MS));
    let (e, outcome) = b.queue_timed_out(waiting).unwrap_err();
    assert_eq!(outcome, Outcome::BulkheadFull);
    assert!(matches!(e, Error::BulkheadFull(f) if f.waited()));
    drop(held);
    assert_eq!(bulkhead.metrics().active, 0);
}

#[tokio::test(start_paused = true)]
async fn a_callers_deadline_shortens_the_envelopes_but_never_lengthens_it() {
    let envelope = Envelope::builder().deadline(1000 * MS).build();
    let no_deadline = Envelope::builder().build();
    let slow = || async {
        tokio::time::sleep(Duration::from_secs(60)).await;
        Ok::<_, std::io::Error>(())
    };
    let classify = |r: &Result<(), std::io::Error>| if r.is_ok() { Outcome::Ok } else { Outcome::Failure };
    for (env, within, expect) in [
        (&envelope, Some(100 * MS), 100 * MS),
        (&envelope, Some(5000 * MS), 1000 * MS),
        (&envelope, None, 1000 * MS),
        (&no_deadline, Some(250 * MS), 250 * MS),
    ] {
        let start = tokio::time::Instant::now();
        let options = envelope_core::CallOptions { started: Some(start), within, attempts: None };
        let (result, outcome) = env.call_with(options, &classify, slow).await;
        assert_eq!(outcome, Outcome::Timeout);
        assert!(matches!(result, Err(Error::Timeout(t)) if t.after() == expect));
        assert_eq!(start.elapsed(), expect);
    }
}

#[tokio::test(start_paused = true)]
async fn the_attempts_counted_are_those_admitted_injected_faults_included() {
    use std::sync::atomic::AtomicU32;
    let faults = FaultInjector::new("f");
    let envelope = Envelope::builder().retry(retry(3)).circuit_breaker(breaker(4)).fault(faults.clone()).build();
    // Every attempt answered by an injected 503: three attempts counted, the dependency never called.
    faults.set(Fault::abort(Outcome::Upstream5xx, 100.0), None).unwrap();
    let attempts = AtomicU32::new(0);
    let calls = AtomicU32::new(0);
    let options = envelope_core::CallOptions { attempts: Some(&attempts), ..Default::default() };
    let (_, outcome) = envelope
        .call_with(options, &envelope_core::DefaultClassifier, || {
            calls.fetch_add(1, Ordering::Relaxed);
            async { Ok::<_, std::io::Error>(()) }
        })
        .await;
    assert_eq!(
        (outcome, attempts.load(Ordering::Relaxed), calls.load(Ordering::Relaxed)),
        (Outcome::Upstream5xx, 3, 0)
    );
    // The breaker opened on them (4 failures): the next call is rejected before any attempt.
    let _ =
        envelope.call_with(options, &envelope_core::DefaultClassifier, || async { Ok::<_, std::io::Error>(()) }).await;
    let before = attempts.load(Ordering::Relaxed);
    let (_, outcome) =
        envelope.call_with(options, &envelope_core::DefaultClassifier, || async { Ok::<_, std::io::Error>(()) }).await;
    assert_eq!(outcome, Outcome::CircuitOpen);
    assert_eq!(attempts.load(Ordering::Relaxed), before, "rejected before any attempt: none counted");
}
