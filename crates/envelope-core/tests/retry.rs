//! Retry behaviour: exact attempt counts, classification, Retry-After, deadline awareness, budgets.

use std::cell::Cell;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use envelope_core::event::{Event, GiveUpReason};
use envelope_core::retry::{Backoff, Config, Retry, RetryBudget};
use envelope_core::{Classify, Error, Outcome, OutcomeSet};
use tokio::time::Instant;

const MS: Duration = Duration::from_millis(1);

fn no_wait(max_attempts: u32) -> Config {
    Config::builder().max_attempts(max_attempts).backoff(Backoff::none()).build().unwrap()
}

#[tokio::test(start_paused = true)]
async fn makes_exactly_max_attempts_calls() {
    for max in [1, 2, 3, 7] {
        let calls = Cell::new(0);
        let retry = Retry::new("r", no_wait(max));
        let r = retry
            .call(|| {
                calls.set(calls.get() + 1);
                async { Err::<(), _>("boom") }
            })
            .await;
        assert!(matches!(r, Err(Error::Inner("boom"))));
        assert_eq!(calls.get(), max);
    }
}

#[tokio::test(start_paused = true)]
async fn stops_at_the_first_success_and_on_non_retryable_outcomes() {
    let calls = Cell::new(0);
    let retry = Retry::new("r", no_wait(5));
    let r = retry
        .call(|| {
            calls.set(calls.get() + 1);
            let n = calls.get();
            async move { if n == 2 { Ok(n) } else { Err("flaky") } }
        })
        .await;
    assert_eq!(r.unwrap(), 2);

    let calls = Cell::new(0);
    let four_xx = |r: &Result<(), ()>| if r.is_ok() { Outcome::Ok } else { Outcome::Upstream4xx };
    let _ = retry
        .call_classified(&four_xx, || {
            calls.set(calls.get() + 1);
            async { Err(()) }
        })
        .await;
    assert_eq!(calls.get(), 1, "4xx is not retryable");

    let calls = Cell::new(0);
    let only_timeouts = Retry::new(
        "r",
        Config::builder()
            .max_attempts(5)
            .backoff(Backoff::none())
            .retry_on(OutcomeSet::of(&[Outcome::Timeout]))
            .build()
            .unwrap(),
    );
    let _ = only_timeouts
        .call(|| {
            calls.set(calls.get() + 1);
            async { Err::<(), _>("plain failure") }
        })
        .await;
    assert_eq!(calls.get(), 1, "retry_on restricts what is retried");
}

#[tokio::test(start_paused = true)]
async fn waits_the_backoff_between_attempts() {
    let backoff = Backoff::linear(100 * MS, 1000 * MS).unwrap();
    let retry = Retry::new("r", Config::builder().max_attempts(4).backoff(backoff).build().unwrap());
    let starts = Mutex::new(Vec::new());
    let t0 = Instant::now();
    let _ = retry
        .call(|| {
            starts.lock().unwrap().push((Instant::now() - t0).as_millis());
            async { Err::<(), _>("x") }
        })
        .await;
    assert_eq!(*starts.lock().unwrap(), [0, 100, 300, 600]);
}

/// A classifier that reads a Retry-After carried in the error.
struct RetryAfterInError;

impl Classify<(), Option<Duration>> for RetryAfterInError {
    fn classify(&self, r: &Result<(), Option<Duration>>) -> Outcome {
        if r.is_ok() { Outcome::Ok } else { Outcome::RateLimited }
    }
    fn retry_after(&self, r: &Result<(), Option<Duration>>) -> Option<Duration> {
        r.as_ref().err().copied().flatten()
    }
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_honoured_and_too_long_means_no_retry() {
    let backoff = Backoff::exponential(10 * MS, 2000 * MS).unwrap();
    let retry = Retry::new("r", Config::builder().max_attempts(3).backoff(backoff).build().unwrap());
    let starts = Mutex::new(Vec::new());
    let t0 = Instant::now();
    let _ = retry
        .call_classified(&RetryAfterInError, || {
            starts.lock().unwrap().push((Instant::now() - t0).as_millis());
            async { Err(Some(1500 * MS)) }
        })
        .await;
    assert_eq!(*starts.lock().unwrap(), [0, 1500, 3000], "the server's wait replaces the backoff");

    let calls = Cell::new(0);
    let reasons = Arc::new(Mutex::new(Vec::new()));
    let seen = reasons.clone();
    let retry = Retry::new(
        "r",
        Config::builder()
            .max_attempts(3)
            .backoff(backoff)
            .listener(move |e: &Event<'_>| {
                if let Event::RetryGaveUp { reason, .. } = e {
                    seen.lock().unwrap().push(*reason);
                }
            })
            .build()
            .unwrap(),
    );
    let _ = retry
        .call_classified(&RetryAfterInError, || {
            calls.set(calls.get() + 1);
            async { Err(Some(2001 * MS)) }
        })
        .await;
    assert_eq!(calls.get(), 1);
    assert_eq!(*reasons.lock().unwrap(), [GiveUpReason::RetryAfterTooLong]);
}

#[tokio::test(start_paused = true)]
async fn deadline_aware_retry_never_starts_a_late_attempt() {
    // Each attempt takes 300 ms and fails; waits are 100 ms; the deadline is 1 s.
    // Attempt 1: 0–300. Wait to 400. Attempt 2: 400–700. After a wait the time left is 200 ms < 300 ms: stop.
    let retry = Retry::new(
        "r",
        Config::builder().max_attempts(10).backoff(Backoff::constant(100 * MS)).deadline(1000 * MS).build().unwrap(),
    );
    let starts = Mutex::new(Vec::new());
    let t0 = Instant::now();
    let r = retry
        .call(|| {
            starts.lock().unwrap().push((Instant::now() - t0).as_millis());
            async {
                tokio::time::sleep(300 * MS).await;
                Err::<(), _>("slow failure")
            }
        })
        .await;
    assert!(matches!(r, Err(Error::Inner(_))));
    assert_eq!(*starts.lock().unwrap(), [0, 400]);
    assert!(Instant::now() - t0 <= 1000 * MS);
}

#[tokio::test(start_paused = true)]
async fn per_attempt_timeout_cancels_and_is_retried() {
    let retry = Retry::new(
        "r",
        Config::builder().max_attempts(3).backoff(Backoff::none()).per_attempt_timeout(50 * MS).build().unwrap(),
    );
    let calls = Cell::new(0);
    let r = retry
        .call(|| {
            calls.set(calls.get() + 1);
            let n = calls.get();
            async move {
                if n < 3 {
                    tokio::time::sleep(Duration::from_secs(10)).await;
                }
                Ok::<_, std::io::Error>(n)
            }
        })
        .await;
    assert_eq!(r.unwrap(), 3);
}

#[tokio::test(start_paused = true)]
async fn budget_denies_when_exhausted_and_refills() {
    // No floor, 50 % of live calls: two live calls buy one retry.
    let budget = RetryBudget::new(Duration::from_secs(1), 0, 0.5).unwrap();
    let retry = Retry::new(
        "r",
        Config::builder().max_attempts(10).backoff(Backoff::none()).budget(budget.clone()).build().unwrap(),
    );
    let calls = Cell::new(0);
    let failing = || {
        calls.set(calls.get() + 1);
        async { Err::<(), _>("down") }
    };
    let _ = retry.call(failing).await;
    assert_eq!(calls.get(), 1, "one live call deposits half a retry: not enough");
    calls.set(0);
    let _ = retry.call(failing).await;
    assert_eq!(calls.get(), 2, "the second live call completes one retry's worth");
    calls.set(0);
    let _ = retry.call(failing).await;
    assert_eq!(calls.get(), 1, "spent again");
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(budget.available(), 0, "deposits expired with the ttl");
}

#[tokio::test(start_paused = true)]
async fn budget_is_shared_by_clones() {
    let budget = RetryBudget::new(Duration::from_secs(1), 2, 0.0).unwrap();
    let config = Config::builder().max_attempts(10).backoff(Backoff::none()).budget(budget).build().unwrap();
    let a = Retry::new("a", config);
    let b = a.clone();
    let calls = Cell::new(0);
    let failing = || {
        calls.set(calls.get() + 1);
        async { Err::<(), _>("down") }
    };
    let _ = a.call(failing).await;
    let _ = b.call(failing).await;
    assert_eq!(calls.get(), 4, "2 live calls + 2 retries from the shared floor of 2 per second");
}

#[test]
fn invalid_configs_are_rejected() {
    assert!(Config::builder().max_attempts(0).build().is_err());
    assert!(Config::builder().max_attempts(101).build().is_err());
    assert!(Config::builder().deadline(Duration::ZERO).build().is_err());
    assert!(Config::builder().per_attempt_timeout(Duration::ZERO).build().is_err());
}

/// A classifier that forbids repeating the call (as the HTTP layer does for a POST without an idempotency key).
struct NotReplayable;

impl Classify<(), &'static str> for NotReplayable {
    fn classify(&self, r: &Result<(), &'static str>) -> Outcome {
        if r.is_ok() { Outcome::Ok } else { Outcome::Upstream5xx }
    }
    fn may_retry(&self, _: &Result<(), &'static str>) -> bool {
        false
    }
}

#[tokio::test(start_paused = true)]
async fn a_classifier_can_forbid_repeating_a_call() {
    let reasons = Arc::new(Mutex::new(Vec::new()));
    let seen = reasons.clone();
    let retry = Retry::new(
        "r",
        Config::builder()
            .max_attempts(5)
            .backoff(Backoff::none())
            .listener(move |e: &Event<'_>| {
                if let Event::RetryGaveUp { reason, .. } = e {
                    seen.lock().unwrap().push(*reason);
                }
            })
            .build()
            .unwrap(),
    );
    let calls = Cell::new(0);
    let _ = retry
        .call_classified(&NotReplayable, || {
            calls.set(calls.get() + 1);
            async { Err("5xx after the body was sent") }
        })
        .await;
    assert_eq!(calls.get(), 1);
    assert_eq!(*reasons.lock().unwrap(), [GiveUpReason::NotReplayable]);
}

proptest::proptest! {
    /// Over any period, a budget grants at most its ratio of the live calls made in that period and the `ttl`
    /// before it, plus its per-second floor over the period and one `ttl` (deposits and withdrawals are counted in
    /// slots of `ttl`: a window can see up to one `ttl` of the past). Paused clock, any traffic.
    #[test]
    fn retries_never_exceed_the_ratio_of_live_calls_plus_the_floor_over_any_period(
        ttl_secs in 1u64..=10,
        floor in 0u32..=5,
        ratio_permille in 0u32..=1000,
        steps in proptest::collection::vec((0u64..2_000, 0u32..30, 0u32..30), 1..60),
    ) {
        let ratio = ratio_permille as f32 / 1000.0;
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
        // Per step: its time (ms since start), live calls, retries granted.
        let log: Vec<(u64, u32, u32)> = rt.block_on(async {
            let budget = RetryBudget::new(Duration::from_secs(ttl_secs), floor, ratio).unwrap();
            let start = Instant::now();
            let mut log = Vec::new();
            for &(advance_ms, calls, asks) in &steps {
                tokio::time::advance(Duration::from_millis(advance_ms)).await;
                for _ in 0..calls {
                    budget.deposit();
                }
                let granted = (0..asks).filter(|_| budget.withdraw()).count() as u32;
                log.push((start.elapsed().as_millis() as u64, calls, granted));
            }
            log
        });
        let ttl_ms = ttl_secs * 1000;
        for i in 0..log.len() {
            for j in i..log.len() {
                let (from, to) = (log[i].0, log[j].0);
                let granted: u64 = log[i..=j].iter().map(|s| u64::from(s.2)).sum();
                let calls: u64 =
                    log[..=j].iter().filter(|s| s.0 + ttl_ms >= from).map(|s| u64::from(s.1)).sum();
                let period_ms = to - from + ttl_ms;
                // The budget's ratio has a resolution of 1/1000: the bound is exact in thousandths.
                let bound = u64::from(ratio_permille) * calls / 1000
                    + (u64::from(floor) * period_ms).div_ceil(1000)
                    + u64::from(floor) * ttl_secs;
                proptest::prop_assert!(
                    granted <= bound,
                    "{granted} retries in [{from}, {to}] ms with {calls} live calls, floor {floor}/s, ratio {ratio}, ttl {ttl_secs}s: bound {bound}"
                );
            }
        }
    }
}
