//! One retry driver, four ways of calling: `Retry::call`, the async `Envelope`, the blocking `Envelope` and the
//! step face (`Envelope::steps`, which the Python package drives) make the same attempts, wait as often, and give
//! up for the same reason, whatever the script of answers.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use envelope_core::event::{Event, GiveUpReason};
use envelope_core::retry::{Backoff, Config, Retry, RetryBudget};
use envelope_core::{Classify, Envelope, HasOutcome, Outcome};

const MS: Duration = Duration::from_millis(1);

/// A failed attempt: its outcome, and the wait the dependency asked for.
#[derive(Debug, Clone, Copy)]
struct Failed {
    outcome: Outcome,
    retry_after: Option<Duration>,
}

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.outcome)
    }
}

impl std::error::Error for Failed {}

impl HasOutcome for Failed {
    fn outcome(&self) -> Outcome {
        self.outcome
    }
}

/// Classifies by the failure's own outcome, honouring its `Retry-After`.
struct Scripted;

impl Classify<u32, Failed> for Scripted {
    fn classify(&self, result: &Result<u32, Failed>) -> Outcome {
        result.as_ref().map_or_else(|e| e.outcome, |_| Outcome::Ok)
    }
    fn retry_after(&self, result: &Result<u32, Failed>) -> Option<Duration> {
        result.as_ref().err().and_then(|e| e.retry_after)
    }
}

fn fail(outcome: Outcome) -> Result<u32, Failed> {
    Err(Failed { outcome, retry_after: None })
}

fn fail_after(outcome: Outcome, wait: Duration) -> Result<u32, Failed> {
    Err(Failed { outcome, retry_after: Some(wait) })
}

/// What a way of calling did with a script: attempts made, the outcome it ended with, the waits it scheduled, and
/// why it gave up (if it did).
#[derive(Debug, PartialEq)]
struct Trace {
    attempts: usize,
    outcome: Outcome,
    scheduled: usize,
    gave_up: Option<GiveUpReason>,
}

/// A fresh retry policy (its own budget, if any) that records its events into `events`.
fn retry(budget: bool, events: &Arc<Mutex<(usize, Option<GiveUpReason>)>>) -> Retry {
    let seen = events.clone();
    let mut config = Config::builder().max_attempts(4).backoff(Backoff::exponential(MS, 50 * MS).unwrap()).listener(
        move |e: &Event<'_>| {
            let mut seen = seen.lock().unwrap();
            match e {
                Event::RetryScheduled { .. } => seen.0 += 1,
                Event::RetryGaveUp { reason, .. } => seen.1 = Some(*reason),
                _ => {}
            }
        },
    );
    if budget {
        // No reserve, no share of live calls: every retry is refused by the budget.
        config = config.budget(RetryBudget::new(Duration::from_secs(1), 0, 0.0).unwrap());
    }
    Retry::new("r", config.build().unwrap())
}

/// Answers, in order of attempts.
type Script = Vec<Result<u32, Failed>>;

/// The answer of attempt `n` (0-based): the script's, its last one repeated after it ends.
fn answer(script: &[Result<u32, Failed>], n: usize) -> Result<u32, Failed> {
    script[n.min(script.len() - 1)]
}

#[tokio::test(start_paused = true)]
async fn every_way_of_calling_retries_alike() {
    use Outcome::{RateLimited, Upstream4xx, Upstream5xx, UpstreamReset};
    // (name, the answers in order, whether the retry budget is spent)
    let scripts: Vec<(&str, Script, bool)> = vec![
        ("succeeds at once", vec![Ok(1)], false),
        ("recovers on the third", vec![fail(UpstreamReset), fail(Upstream5xx), Ok(3)], false),
        ("stays down", vec![fail(Upstream5xx)], false),
        ("the caller's fault", vec![fail(Upstream4xx)], false),
        ("asks to wait a little", vec![fail_after(RateLimited, 10 * MS), Ok(2)], false),
        ("asks to wait too long", vec![fail_after(RateLimited, Duration::from_secs(10))], false),
        ("budget spent", vec![fail(UpstreamReset), Ok(2)], true),
    ];
    for (name, script, budget) in &scripts {
        let mut traces = Vec::new();

        // Retry alone.
        let events = Arc::new(Mutex::new((0, None)));
        let policy = retry(*budget, &events);
        let mut made = 0;
        let result = policy
            .call_classified(&Scripted, || {
                made += 1;
                let r = answer(script, made - 1);
                async move { r }
            })
            .await;
        let outcome = result.as_ref().map_or_else(|e| e.outcome(), |_| Outcome::Ok);
        let (scheduled, gave_up) = *events.lock().unwrap();
        traces.push(("Retry::call", Trace { attempts: made, outcome, scheduled, gave_up }));

        // The async envelope.
        let events = Arc::new(Mutex::new((0, None)));
        let envelope = Envelope::builder().retry(retry(*budget, &events)).build();
        let mut made = 0;
        let (_, outcome) = envelope
            .call_classified(&Scripted, || {
                made += 1;
                let r = answer(script, made - 1);
                async move { r }
            })
            .await;
        let (scheduled, gave_up) = *events.lock().unwrap();
        traces.push(("Envelope::call", Trace { attempts: made, outcome, scheduled, gave_up }));

        // The blocking envelope (its waits are real sleeps, of a few milliseconds here).
        let events = Arc::new(Mutex::new((0, None)));
        let envelope = Envelope::builder().retry(retry(*budget, &events)).build();
        let mut made = 0;
        let (_, outcome) = envelope.call_blocking_classified(&Scripted, || {
            made += 1;
            answer(script, made - 1)
        });
        let (scheduled, gave_up) = *events.lock().unwrap();
        traces.push(("Envelope::call_blocking", Trace { attempts: made, outcome, scheduled, gave_up }));

        // The step face (a caller that runs each attempt itself), waits spent by the test.
        let events = Arc::new(Mutex::new((0, None)));
        let envelope = Envelope::builder().retry(retry(*budget, &events)).build();
        let mut steps = envelope.steps().unwrap();
        let mut made = 0;
        let outcome = loop {
            let attempt = steps.admit().unwrap();
            made += 1;
            let answer = answer(script, made - 1);
            let outcome = Scripted.classify(&answer);
            match steps.after(attempt, outcome, Scripted.retry_after(&answer), true) {
                Some(wait) => tokio::time::sleep(wait).await,
                None => break outcome,
            }
        };
        steps.finish(outcome);
        let (scheduled, gave_up) = *events.lock().unwrap();
        traces.push(("Envelope::steps", Trace { attempts: made, outcome, scheduled, gave_up }));

        let (first, reference) = &traces[0];
        for (way, trace) in &traces[1..] {
            assert_eq!(trace, reference, "{name}: {way} differs from {first}");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn the_script_outcomes_are_what_the_driver_decides() {
    // The shared answers above, pinned once: a test that all three ways agree must not pass by all being wrong.
    let events = Arc::new(Mutex::new((0, None)));
    let policy = retry(false, &events);
    let mut made = 0;
    let r = policy
        .call_classified(&Scripted, || {
            made += 1;
            let r = fail(Outcome::Upstream5xx);
            async move { r }
        })
        .await;
    assert!(r.is_err());
    assert_eq!(made, 4, "max_attempts");
    assert_eq!(*events.lock().unwrap(), (3, Some(GiveUpReason::AttemptsExhausted)));

    let events = Arc::new(Mutex::new((0, None)));
    let policy = retry(true, &events);
    let mut made = 0;
    let _ = policy
        .call_classified(&Scripted, || {
            made += 1;
            let r = fail(Outcome::UpstreamReset);
            async move { r }
        })
        .await;
    assert_eq!(made, 1);
    assert_eq!(*events.lock().unwrap(), (0, Some(GiveUpReason::BudgetExhausted)));
}
