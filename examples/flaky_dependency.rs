//! Envelope's policies against a flaky simulated dependency.
//!
//! A dependency goes through scripted incidents (an error burst, a latency spike, an outage, recovery) while a
//! steady stream of calls goes through an [`Envelope`] with every policy on. The example prints each breaker
//! transition as it happens and, per phase, what the policies did. It runs on tokio's paused clock: ten simulated
//! seconds take a fraction of a real one, and every run is the same.
//!
//! Run it with `cargo run --example flaky_dependency`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use envelope_core::bulkhead::{Bulkhead, Config as BulkheadConfig};
use envelope_core::circuit_breaker::{CircuitBreaker, Config as BreakerConfig};
use envelope_core::event::{Event, GiveUpReason, Listeners};
use envelope_core::fallback::Fallback;
use envelope_core::rate_limit::{Config as RateConfig, RateLimiter};
use envelope_core::retry::{Backoff, Config as RetryConfig, Retry, RetryBudget};
use envelope_core::{Envelope, Outcome};
use tokio::time::Instant;

/// What the dependency does during one phase.
#[derive(Clone, Copy)]
struct Phase {
    name: &'static str,
    seconds: u64,
    error_percent: u64,
    latency_ms: u64,
    down: bool,
}

const SCRIPT: [Phase; 5] = [
    Phase { name: "healthy", seconds: 2, error_percent: 2, latency_ms: 20, down: false },
    Phase { name: "error burst", seconds: 2, error_percent: 40, latency_ms: 20, down: false },
    Phase { name: "latency spike", seconds: 2, error_percent: 0, latency_ms: 600, down: false },
    Phase { name: "outage", seconds: 3, error_percent: 0, latency_ms: 0, down: true },
    Phase { name: "recovery", seconds: 3, error_percent: 0, latency_ms: 20, down: false },
];

/// Calls per second offered to the dependency.
const RATE: u64 = 50;

#[derive(Debug)]
enum DependencyError {
    Unavailable,
    Refused,
}

impl envelope_core::HasOutcome for DependencyError {
    fn outcome(&self) -> Outcome {
        match self {
            DependencyError::Unavailable => Outcome::Upstream5xx,
            DependencyError::Refused => Outcome::ConnectError,
        }
    }
}

async fn dependency(phase: Phase, hits: &Mutex<u64>) -> Result<&'static str, DependencyError> {
    *hits.lock().unwrap() += 1;
    if phase.down {
        return Err(DependencyError::Refused);
    }
    tokio::time::sleep(Duration::from_millis(phase.latency_ms)).await;
    if fastrand::u64(0..100) < phase.error_percent { Err(DependencyError::Unavailable) } else { Ok("fresh price") }
}

#[derive(Default)]
struct Tally {
    answered: BTreeMap<&'static str, u64>,
    outcomes: BTreeMap<&'static str, u64>,
    retries: u64,
    budget_denied: u64,
    rejected_by_breaker: u64,
    bulkhead_rejections: u64,
    timeouts: u64,
    fallbacks: u64,
    dependency_hits: u64,
}

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
    runtime.block_on(run());
}

async fn run() {
    fastrand::seed(7);
    let start = Instant::now();
    let phase_index = Arc::new(Mutex::new(0usize));
    let tallies: Arc<Mutex<Vec<Tally>>> = Arc::new(Mutex::new(SCRIPT.iter().map(|_| Tally::default()).collect()));

    // One listener sees every policy's events; the policies know nothing about it.
    let listeners = {
        let (tallies, phase_index) = (tallies.clone(), phase_index.clone());
        Listeners::new().with(move |event: &Event<'_>| {
            let at = start.elapsed().as_secs_f64();
            let mut all = tallies.lock().unwrap();
            let tally = &mut all[*phase_index.lock().unwrap()];
            match *event {
                Event::StateTransition { name, from, to } => {
                    println!("  t={at:5.2}s  breaker '{name}': {from} -> {to}");
                }
                Event::CallNotPermitted { .. } => tally.rejected_by_breaker += 1,
                Event::RetryScheduled { .. } => tally.retries += 1,
                Event::RetryGaveUp { reason: GiveUpReason::BudgetExhausted, .. } => tally.budget_denied += 1,
                Event::BulkheadRejected { .. } => tally.bulkhead_rejections += 1,
                Event::TimedOut { .. } => tally.timeouts += 1,
                Event::FallbackUsed { .. } => tally.fallbacks += 1,
                _ => {}
            }
        })
    };

    let breaker = BreakerConfig::builder()
        .count_window(20)
        .minimum_calls(10)
        .failure_rate_threshold(50.0)
        .open_duration(Duration::from_secs(1))
        .half_open_calls(3)
        .listeners(listeners.clone())
        .build()
        .unwrap();
    let retry = RetryConfig::builder()
        .max_attempts(3)
        .backoff(Backoff::exponential(Duration::from_millis(50), Duration::from_millis(400)).unwrap())
        .budget(RetryBudget::new(Duration::from_secs(5), 5, 0.2).unwrap())
        .listeners(listeners.clone())
        .build()
        .unwrap();
    let bulkhead = BulkheadConfig::builder()
        .max_concurrent(10)
        .queue(10, Duration::from_millis(50))
        .listeners(listeners.clone())
        .build()
        .unwrap();
    let envelope = Envelope::builder()
        .name("prices")
        .deadline(Duration::from_secs(1))
        .fallback(Fallback::new("prices").with_listeners(listeners.clone()))
        .retry(Retry::new("prices", retry))
        .circuit_breaker(CircuitBreaker::new("prices", breaker))
        .rate_limiter(RateLimiter::new("prices", RateConfig::per_second(200).build().unwrap()))
        .bulkhead(Bulkhead::new("prices", bulkhead))
        .attempt_timeout(Duration::from_millis(300))
        .listeners(listeners.clone())
        .build();

    println!("Envelope around a flaky 'prices' dependency, {RATE} calls/s (simulated time):");
    let hits = Arc::new(Mutex::new(0u64));
    let mut calls = Vec::new();
    for (i, phase) in SCRIPT.iter().enumerate() {
        *phase_index.lock().unwrap() = i;
        println!("- phase '{}' ({} s): {}", phase.name, phase.seconds, describe(phase));
        let hits_before = *hits.lock().unwrap();
        for _ in 0..phase.seconds * RATE {
            let (env, tallies, hits, phase) = (envelope.clone(), tallies.clone(), hits.clone(), *phase);
            calls.push(tokio::spawn(async move {
                let fell_back = Mutex::new(None);
                let result = env
                    .call_or(
                        || dependency(phase, &hits),
                        |outcome| {
                            *fell_back.lock().unwrap() = Some(outcome);
                            "cached price"
                        },
                    )
                    .await;
                let (answered, outcome) = match (result, fell_back.into_inner().unwrap()) {
                    (Ok(_), None) => ("fresh", Outcome::Ok),
                    (Ok(_), Some(outcome)) => ("fallback", outcome),
                    (Err(e), _) => ("error", e.policy_outcome().unwrap_or(Outcome::Failure)),
                };
                let mut all = tallies.lock().unwrap();
                let tally = &mut all[i];
                *tally.answered.entry(answered).or_default() += 1;
                *tally.outcomes.entry(outcome.as_str()).or_default() += 1;
            }));
            tokio::time::sleep(Duration::from_millis(1000 / RATE)).await;
        }
        tallies.lock().unwrap()[i].dependency_hits = *hits.lock().unwrap() - hits_before;
    }
    for c in calls {
        c.await.unwrap();
    }

    println!();
    println!(
        "{:<14} {:>5} {:>5} {:>8} {:>5} {:>8} {:>7} {:>7} {:>8} {:>8} {:>8}",
        "phase",
        "calls",
        "fresh",
        "fallback",
        "error",
        "dep hits",
        "retries",
        "budget",
        "breaker",
        "bulkhead",
        "timeouts"
    );
    println!(
        "{:<14} {:>5} {:>5} {:>8} {:>5} {:>8} {:>7} {:>7} {:>8} {:>8} {:>8}",
        "", "", "", "", "", "", "", "denied", "rejected", "rejected", ""
    );
    for (phase, t) in SCRIPT.iter().zip(tallies.lock().unwrap().iter()) {
        let n = |k: &str| t.answered.get(k).copied().unwrap_or(0);
        println!(
            "{:<14} {:>5} {:>5} {:>8} {:>5} {:>8} {:>7} {:>7} {:>8} {:>8} {:>8}",
            phase.name,
            n("fresh") + n("error") + n("fallback"),
            n("fresh"),
            n("fallback"),
            n("error"),
            t.dependency_hits,
            t.retries,
            t.budget_denied,
            t.rejected_by_breaker,
            t.bulkhead_rejections,
            t.timeouts
        );
    }
    println!();
    println!("What each answer stood for (one outcome taxonomy for policies, metrics and logs):");
    for (phase, t) in SCRIPT.iter().zip(tallies.lock().unwrap().iter()) {
        let list: Vec<String> = t.outcomes.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("  {:<14} {}", phase.name, list.join(" "));
    }
}
fn describe(p: &Phase) -> String {
    if p.down {
        "connections refused".into()
    } else {
        format!("{} ms latency, {} % errors", p.latency_ms, p.error_percent)
    }
}
