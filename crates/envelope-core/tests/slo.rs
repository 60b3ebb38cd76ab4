//! SLO arithmetic on a paused clock: exact budgets, and burn-rate alerts that fire within the short window and clear
//! after it.

use std::time::Duration;

use envelope_core::slo::{Alert, Objective, Slo};
use tokio::time::{Instant, advance};

const MS: Duration = Duration::from_millis(1);

#[tokio::test(start_paused = true)]
async fn budget_arithmetic_is_exact() {
    // 99 % availability, p95 under 200 ms.
    let objective = Objective { availability: 0.99, latency_threshold: 200 * MS, latency_percentile: 0.95 };
    let slo = Slo::new(objective).unwrap();
    for i in 0..1000 {
        // 5 x 503 are errors; 3 x 400 are the caller's fault and not errors; 20 calls are slow.
        let error = i < 5;
        let latency = if (100..120).contains(&i) { 450 * MS } else { 20 * MS };
        slo.record(error, latency);
    }
    let r = slo.report();
    assert_eq!(r.windows[5].total, 1000);
    assert_eq!(r.windows[5].errors, 5);
    assert_eq!(r.windows[5].slow, 20);
    assert!((r.availability - 0.995).abs() < 1e-12, "{}", r.availability);
    assert!((r.budget_remaining - 0.5).abs() < 1e-9, "half the budget left: {}", r.budget_remaining);
    assert!((r.latency_budget_remaining - 0.6).abs() < 1e-9, "2 % slow of 5 % allowed: {}", r.latency_budget_remaining);
    assert!((r.burn_rates[0] - 0.5).abs() < 1e-9, "burn rate 0.5 in every window");
}

#[tokio::test(start_paused = true)]
async fn a_fast_burn_pages_within_the_short_window_and_clears_after_it() {
    let slo = Slo::new(Objective::DEFAULT).unwrap(); // 99.9 %
    let minute = |slo: &Slo, error: bool| {
        for _ in 0..100 {
            slo.record(error, 10 * MS);
        }
    };
    for _ in 0..60 {
        minute(&slo, false);
        advance(Duration::from_secs(60)).await;
    }
    assert_eq!(slo.report().alert, Alert::None, "an hour of healthy traffic");
    // The dependency fails every call: the 5 m and 1 h burn rates pass 14.4 within minutes.
    minute(&slo, true);
    advance(Duration::from_secs(60)).await;
    minute(&slo, true);
    let r = slo.report();
    assert_eq!(r.alert, Alert::Page, "burn rates {:?}", r.burn_rates);
    advance(Duration::from_secs(60)).await;
    // Recovery. After the 30 m window has passed with no error, no pair of windows is above its page threshold
    // any more; the slow-burn ticket (3 d and 6 h above 1x) remains, as it should.
    for _ in 0..31 {
        minute(&slo, false);
        advance(Duration::from_secs(60)).await;
    }
    let r = slo.report();
    assert_eq!(r.alert, Alert::Ticket, "burn rates {:?}", r.burn_rates);
    assert_eq!(r.windows[0].errors, 0, "the 5 m window is clean");
}

#[tokio::test(start_paused = true)]
async fn windows_roll_over_by_the_minute_and_the_hour() {
    let slo = Slo::new(Objective::DEFAULT).unwrap();
    slo.record(true, MS);
    advance(Duration::from_secs(4 * 60)).await;
    assert_eq!(slo.counts(Duration::from_secs(300), Instant::now()).errors, 1, "still inside 5 m");
    advance(Duration::from_secs(60)).await;
    assert_eq!(slo.counts(Duration::from_secs(300), Instant::now()).errors, 0, "out of 5 m after 5 minutes");
    assert_eq!(slo.counts(Duration::from_secs(3600), Instant::now()).errors, 1);
    advance(Duration::from_secs(7 * 3600)).await;
    assert_eq!(slo.counts(Duration::from_secs(6 * 3600), Instant::now()).errors, 0);
    assert_eq!(slo.counts(Duration::from_secs(3 * 24 * 3600), Instant::now()).errors, 1, "kept by the hour ring");
    advance(Duration::from_secs(31 * 24 * 3600)).await;
    assert_eq!(slo.counts(Duration::from_secs(30 * 24 * 3600), Instant::now()).total, 0, "out of the SLO window");
}

#[test]
fn objectives_are_validated_and_tiers_match_the_requirements() {
    assert!(Slo::new(Objective { availability: 1.0, ..Objective::DEFAULT }).is_err());
    assert!(Slo::new(Objective { latency_percentile: 0.0, ..Objective::DEFAULT }).is_err());
    assert!(Slo::new(Objective { latency_threshold: Duration::ZERO, ..Objective::DEFAULT }).is_err());
    assert_eq!(Objective::CRITICAL.latency_threshold, 100 * MS);
    assert_eq!(Objective::DEFAULT.availability, 0.999);
    assert_eq!(Objective::NON_CRITICAL.latency_threshold, 500 * MS);
}

#[tokio::test(start_paused = true)]
async fn several_latency_objectives_are_each_judged_on_their_own() {
    use envelope_core::slo::LatencyObjective;
    let p95 = LatencyObjective { threshold: 300 * MS, percentile: 0.95 };
    let p99 = LatencyObjective { threshold: 1000 * MS, percentile: 0.99 };
    let slo = Slo::with_objectives(0.9995, &[p95, p99]).unwrap();
    assert_eq!(slo.objective().latency_threshold, 300 * MS, "the first is the SLO's objective");
    for i in 0..1000 {
        // 40 calls between 300 ms and 1 s (slow for the p95 only), 5 above 1 s (slow for both).
        let latency = match i {
            0..40 => 500 * MS,
            40..45 => 2000 * MS,
            _ => 50 * MS,
        };
        slo.record(false, latency);
    }
    let r = slo.report();
    assert_eq!(r.latencies.len(), 2);
    assert_eq!((r.latencies[0].slow[5], r.latencies[1].slow[5]), (45, 5));
    assert!(
        (r.latencies[0].budget_remaining - 0.1).abs() < 1e-9,
        "4.5 % slow of 5 %: {}",
        r.latencies[0].budget_remaining
    );
    assert!(
        (r.latencies[1].budget_remaining - 0.5).abs() < 1e-9,
        "0.5 % slow of 1 %: {}",
        r.latencies[1].budget_remaining
    );
    assert_eq!(r.latency_budget_remaining, r.latencies[0].budget_remaining);
    assert_eq!(r.windows[5].slow, 45);

    assert!(Slo::with_objectives(0.999, &[]).is_err());
    assert!(Slo::with_objectives(0.999, &[p95; 5]).is_err());
    assert!(Slo::with_objectives(0.999, &[LatencyObjective { percentile: 1.0, ..p95 }]).is_err());
    assert!(Slo::with_objectives(1.5, &[p95]).is_err());
}

#[test]
fn an_slo_without_calls_reports_its_whole_budget() {
    let slo = Slo::new(Objective::DEFAULT).unwrap();
    let r = slo.report();
    assert_eq!((r.windows[5].total, r.budget_remaining), (0, 1.0));
    assert!(format!("{slo:?}").contains("availability"));
}
