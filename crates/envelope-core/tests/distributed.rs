//! Distributed mode against the in-memory store, several instances in one process on a paused clock: trips
//! shared, counts exact, probes counted fleet-wide, operators' transitions shared, and the fallback to local
//! decisions when the store is down.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use envelope_core::Outcome;
use envelope_core::circuit_breaker::{CircuitBreaker, Config, State};
use envelope_core::distributed::{BreakerStore, Fleet, FleetConfig, MemoryStore, SyncRequest};
use envelope_core::event::{Event, Listeners};

const SEC: Duration = Duration::from_secs(1);

fn config(minimum_calls: u32) -> Config {
    Config::builder()
        .time_window(10)
        .minimum_calls(minimum_calls)
        .failure_rate_threshold(50.0)
        .open_duration(5 * SEC)
        .half_open_calls(3)
        .max_half_open_wait(Some(30 * SEC))
        .build()
        .unwrap()
}

/// What one instance's fleet reported.
type Seen = Arc<Mutex<Vec<String>>>;

struct Instance {
    fleet: Fleet,
    breaker: CircuitBreaker,
    seen: Seen,
}

fn instance(store: &Arc<MemoryStore>, name: &str, minimum_calls: u32) -> Instance {
    let seen: Seen = Arc::default();
    let log = seen.clone();
    let listeners = Listeners::new().with(move |e: &Event<'_>| {
        let line = match e {
            Event::FleetTransition { name, from, to, instance } => format!("{name}: {from} -> {to} by {instance}"),
            Event::SharedStateDegraded { .. } => "degraded".to_owned(),
            Event::SharedStateRestored { .. } => "restored".to_owned(),
            _ => return,
        };
        log.lock().unwrap().push(line);
    });
    let mut fc = FleetConfig::new(name);
    fc.listeners = listeners;
    let fleet = Fleet::new(store.clone() as Arc<dyn BreakerStore>, fc);
    let breaker = CircuitBreaker::linked("db", config(minimum_calls), State::Closed);
    fleet.join(breaker.clone()).unwrap();
    Instance { fleet, breaker, seen }
}

fn fail(b: &CircuitBreaker, n: usize) {
    for _ in 0..n {
        b.try_acquire().expect("admitted").record(Outcome::Failure);
    }
}

#[tokio::test(start_paused = true)]
async fn a_trip_through_one_instance_opens_the_other_which_names_who_decided() {
    let store = Arc::new(MemoryStore::new());
    let (a, b) = (instance(&store, "a", 4), instance(&store, "b", 4));
    a.fleet.sync_once().await.unwrap();
    b.fleet.sync_once().await.unwrap();
    fail(&a.breaker, 4);
    assert_eq!(a.breaker.state(), State::Closed, "while the fleet decides, the local window does not trip");
    a.fleet.sync_once().await.unwrap();
    assert_eq!(a.breaker.state(), State::Open);
    assert!(b.breaker.try_acquire().is_ok(), "b has not synced yet");
    b.fleet.sync_once().await.unwrap();
    let open = b.breaker.try_acquire().unwrap_err();
    assert_eq!(open.state(), State::Open);
    let left = open.remaining().unwrap();
    assert!(left > 4 * SEC && left <= 5 * SEC);
    assert_eq!(*b.seen.lock().unwrap(), ["db: closed -> open by a"]);
    assert_eq!(*a.seen.lock().unwrap(), ["db: closed -> open by a"]);
}

#[tokio::test(start_paused = true)]
async fn counts_from_every_instance_add_up_exactly_and_a_repeated_sync_counts_once() {
    let store = Arc::new(MemoryStore::new());
    let (a, b) = (instance(&store, "a", 10_000), instance(&store, "b", 10_000));
    a.fleet.sync_once().await.unwrap();
    b.fleet.sync_once().await.unwrap();
    let (ab, bb) = (a.breaker.clone(), b.breaker.clone());
    let t1 = std::thread::spawn(move || fail(&ab, 1000));
    let t2 = std::thread::spawn(move || fail(&bb, 1000));
    t1.join().unwrap();
    t2.join().unwrap();
    a.fleet.sync_once().await.unwrap();
    b.fleet.sync_once().await.unwrap();
    let delta = envelope_core::circuit_breaker::Delta::default();
    let look = SyncRequest { breaker: "db", instance: "observer", seq: 1, epoch: 1, delta, window_secs: 10 };
    let view = store.sync(look).await.unwrap();
    assert_eq!((view.window.calls, view.window.failures), (2000, 2000));

    // The same (instance, seq) sent twice, as after a timeout whose request did arrive: counted once.
    let mut delta = envelope_core::circuit_breaker::Delta::default();
    delta.window.calls = 5;
    let again = SyncRequest { breaker: "db", instance: "observer", seq: 2, epoch: 1, delta, window_secs: 10 };
    store.sync(again).await.unwrap();
    let view = store.sync(again).await.unwrap();
    assert_eq!(view.window.calls, 2005);
    // Counts age out of the window.
    tokio::time::advance(11 * SEC).await;
    let view = store.sync(SyncRequest { seq: 3, delta: Default::default(), ..again }).await.unwrap();
    assert_eq!(view.window.calls, 0);
}

#[tokio::test(start_paused = true)]
async fn the_whole_fleet_sends_exactly_the_configured_probes_then_closes() {
    for round in 0..20 {
        let store = Arc::new(MemoryStore::new());
        let fleet: Vec<Instance> = (0..3).map(|i| instance(&store, &format!("i{i}"), 4)).collect();
        for i in &fleet {
            i.fleet.sync_once().await.unwrap();
        }
        fail(&fleet[0].breaker, 4);
        for i in &fleet {
            i.fleet.sync_once().await.unwrap();
            assert_eq!(i.breaker.state(), State::Open);
        }
        tokio::time::advance(5 * SEC).await;
        // Every instance has callers knocking all the time; syncs come in a different order each round.
        let mut probes = Vec::new();
        for tick in 0..6 {
            for k in 0..3 {
                let i = &fleet[(k + round + tick) % 3];
                i.fleet.sync_once().await.unwrap();
                for _ in 0..5 {
                    if let Ok(p) = i.breaker.try_acquire_owned() {
                        probes.push(p);
                    }
                }
            }
        }
        assert_eq!(probes.len(), 3, "round {round}: exactly 3 probes in the whole fleet");
        for p in probes {
            p.record(Outcome::Ok);
        }
        for _ in 0..2 {
            for i in &fleet {
                i.fleet.sync_once().await.unwrap();
            }
        }
        for i in &fleet {
            assert_eq!(i.breaker.state(), State::Closed, "round {round}: healthy probes close every instance");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn failed_probes_open_the_fleet_again() {
    let store = Arc::new(MemoryStore::new());
    let (a, b) = (instance(&store, "a", 4), instance(&store, "b", 4));
    a.fleet.sync_once().await.unwrap();
    b.fleet.sync_once().await.unwrap();
    fail(&a.breaker, 4);
    a.fleet.sync_once().await.unwrap();
    tokio::time::advance(5 * SEC).await;
    let mut failed = 0;
    for _ in 0..6 {
        for i in [&a, &b] {
            i.fleet.sync_once().await.unwrap();
            if let Ok(p) = i.breaker.try_acquire() {
                p.record(Outcome::Timeout);
                failed += 1;
            }
        }
    }
    assert_eq!(failed, 3);
    for i in [&a, &b] {
        i.fleet.sync_once().await.unwrap();
        assert_eq!(i.breaker.state(), State::Open);
    }
}

#[tokio::test(start_paused = true)]
async fn an_operators_force_open_on_one_instance_applies_to_all() {
    let store = Arc::new(MemoryStore::new());
    let (a, b) = (instance(&store, "a", 4), instance(&store, "b", 4));
    a.fleet.sync_once().await.unwrap();
    b.fleet.sync_once().await.unwrap();
    a.breaker.force_open();
    a.fleet.sync_once().await.unwrap();
    b.fleet.sync_once().await.unwrap();
    assert_eq!(b.breaker.state(), State::ForcedOpen);
    assert_eq!(*b.seen.lock().unwrap(), ["db: closed -> forced_open by a"]);
    b.breaker.reset();
    b.fleet.sync_once().await.unwrap();
    a.fleet.sync_once().await.unwrap();
    assert_eq!(a.breaker.state(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn with_the_store_down_each_instance_decides_alone_then_follows_the_fleet_again() {
    let store = Arc::new(MemoryStore::new());
    let (a, b) = (instance(&store, "a", 4), instance(&store, "b", 4));
    a.fleet.sync_once().await.unwrap();
    b.fleet.sync_once().await.unwrap();
    store.set_down(true);
    assert!(a.fleet.sync_once().await.is_err());
    assert!(!a.fleet.status().synced);
    // Alone again: a's own window trips it; b, which saw nothing, stays closed.
    fail(&a.breaker, 4);
    assert_eq!(a.breaker.state(), State::Open);
    assert!(b.breaker.try_acquire().is_ok());
    assert!(a.fleet.sync_once().await.is_err());
    assert_eq!(*a.seen.lock().unwrap(), ["degraded"], "said once");
    // Back: the fleet (closed, nothing recorded while down) is followed again.
    store.set_down(false);
    tokio::time::advance(2 * SEC).await; // past the store's own breaker
    a.fleet.sync_once().await.unwrap();
    assert!(a.fleet.status().synced);
    assert_eq!(a.breaker.state(), State::Closed);
    // The transition back names no instance: nobody decided it, a's own decision is simply dropped.
    assert_eq!(*a.seen.lock().unwrap(), ["degraded", "db: open -> closed by ", "restored"]);
}

#[test]
fn only_a_linked_breaker_with_a_time_window_can_join() {
    let store: Arc<dyn BreakerStore> = Arc::new(MemoryStore::new());
    let fleet = Fleet::new(store, FleetConfig::new("a"));
    let local = CircuitBreaker::new("db", config(4));
    assert!(fleet.join(local).is_err());
    let counted = CircuitBreaker::linked("db", Config::builder().count_window(100).build().unwrap(), State::Closed);
    assert!(fleet.join(counted).unwrap_err().contains("time window"));
}
