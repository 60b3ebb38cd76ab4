//! Load shedding: fixed limits, priorities, and an adaptive limit that follows latency.

use std::time::Duration;

use envelope_core::Outcome;
use envelope_core::shed::adaptive::GradientConfig;
use envelope_core::shed::{self, LoadShedder, Priority};

#[test]
fn fixed_limit_sheds_at_once_and_frees_on_drop() {
    let s = LoadShedder::new("s", shed::Config::builder().fixed(2).shares([100, 100, 100]).build().unwrap());
    let a = s.try_acquire(Priority::Default).unwrap();
    let _b = s.try_acquire(Priority::Default).unwrap();
    let err = s.try_acquire(Priority::Critical).unwrap_err();
    assert_eq!(err.limit(), 2);
    drop(a);
    assert!(s.try_acquire(Priority::Default).is_ok());
    assert_eq!(s.metrics().shed, 1);
}

#[test]
fn critical_work_is_shed_last() {
    let s = LoadShedder::new("s", shed::Config::builder().fixed(100).build().unwrap());
    let mut held = Vec::new();
    while let Ok(p) = s.try_acquire(Priority::NonCritical) {
        held.push(p);
    }
    assert_eq!(held.len(), 75, "non-critical may use 75 %");
    while let Ok(p) = s.try_acquire(Priority::Default) {
        held.push(p);
    }
    assert_eq!(held.len(), 90, "default may use 90 %");
    assert!(s.try_acquire(Priority::NonCritical).is_err());
    while let Ok(p) = s.try_acquire(Priority::Critical) {
        held.push(p);
    }
    assert_eq!(held.len(), 100, "critical may use it all");
}

/// Drives the shedder against a simulated dependency that serves `capacity` calls at a time in 10 ms, and
/// queues the rest (latency grows with concurrency). `offered` calls try to start every step.
async fn drive(s: &LoadShedder, steps: usize, offered: usize, capacity: usize) -> usize {
    let mut admitted_max = 0;
    for _ in 0..steps {
        let permits: Vec<_> = (0..offered).filter_map(|_| s.try_acquire(Priority::Critical).ok()).collect();
        admitted_max = admitted_max.max(permits.len());
        let n = permits.len().max(1);
        let latency = Duration::from_millis(10) * (n.div_ceil(capacity)) as u32;
        tokio::time::advance(latency).await;
        for p in permits {
            p.record(Outcome::Ok);
        }
    }
    admitted_max
}

#[tokio::test(start_paused = true)]
async fn adaptive_limit_follows_the_dependency() {
    let mut config = GradientConfig::default();
    config.initial_limit = 50;
    let s = LoadShedder::new("s", shed::Config::builder().adaptive(config).build().unwrap());
    // Healthy and lightly used: 4 at a time against a capacity of 100. The limit must not drift up.
    drive(&s, 1000, 4, 100).await;
    assert!(s.limit() <= 50, "no drift while lightly used: {}", s.limit());
    // The dependency degrades to a capacity of 8 while 40 calls are offered: the limit must come down to near the
    // capacity (Gradient2 settles around 2x capacity with its √limit queue allowance).
    drive(&s, 2000, 40, 8).await;
    let overloaded = s.limit();
    assert!((8..=24).contains(&overloaded), "limit under overload: {overloaded}");
    assert!(s.metrics().shed > 0);
    // It recovers to a capacity of 100 with 40 offered: the limit must rise enough to admit them all again.
    drive(&s, 2000, 40, 100).await;
    assert!(s.limit() >= 40, "limit after recovery: {}", s.limit());
}
