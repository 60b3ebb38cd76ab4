//! The store in memory: the reference semantics every store must match (the Redis store's scripts are tested
//! against the same scenarios), and a fleet of one process's instances for tests. Time is the engine's clock, so
//! a paused tokio clock drives it.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use super::{BoxFuture, BreakerStore, FleetView, LimitStore, StoreError, SyncRequest, TransitionRequest};
use crate::circuit_breaker::{Snapshot, State};
use crate::clock::{self, Instant};

/// A store in one process's memory (see the module docs); share it between fleets in an `Arc`.
#[derive(Debug)]
pub struct MemoryStore {
    start: Instant,
    breakers: Mutex<HashMap<String, Entry>>,
    /// Each shared rate limit's theoretical arrival time (GCRA).
    limits: Mutex<HashMap<String, Instant>>,
    /// When set, every operation fails (to test the fallback).
    down: std::sync::atomic::AtomicBool,
}

#[derive(Debug)]
struct Entry {
    state: State,
    epoch: u64,
    /// Open: when probes may start. Half-open: when the fleet gives up on its probes.
    until: Option<Instant>,
    /// `(second, counts)`, oldest first, this epoch's only.
    buckets: VecDeque<(u64, Snapshot)>,
    probes: Snapshot,
    probes_left: u32,
    opens: u32,
    decided_by: String,
    seqs: HashMap<String, u64>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore {
            start: clock::now(),
            breakers: Mutex::default(),
            limits: Mutex::default(),
            down: Default::default(),
        }
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes every operation fail (`true`) or work again: the store "down", for tests of the fallback.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, std::sync::atomic::Ordering::Release);
    }

    fn op<T>(&self, f: impl FnOnce(&mut HashMap<String, Entry>, Instant) -> T) -> Result<T, StoreError> {
        if self.down.load(std::sync::atomic::Ordering::Acquire) {
            return Err(StoreError("the store is down".into()));
        }
        let mut breakers = self.breakers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        Ok(f(&mut breakers, clock::now()))
    }

    fn second(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.start).as_secs()
    }
}

impl Entry {
    fn new() -> Self {
        Entry {
            state: State::Closed,
            epoch: 1,
            until: None,
            buckets: VecDeque::new(),
            probes: Snapshot::default(),
            probes_left: 0,
            opens: 0,
            decided_by: String::new(),
            seqs: HashMap::new(),
        }
    }

    fn view(&self, now: Instant, second: u64, window_secs: u32) -> FleetView {
        let from = second.saturating_sub(u64::from(window_secs).saturating_sub(1));
        let mut window = Snapshot::default();
        for (_, s) in self.buckets.iter().filter(|(sec, _)| *sec >= from) {
            window.calls += s.calls;
            window.failures += s.failures;
            window.slow += s.slow;
        }
        FleetView {
            state: self.state,
            epoch: self.epoch,
            remaining: match (self.state, self.until) {
                (_, Some(until)) => until.saturating_duration_since(now),
                (State::HalfOpen, None) => Duration::MAX, // no limit on the probes' time
                _ => Duration::ZERO,
            },
            window,
            probes: self.probes,
            probes_left: self.probes_left,
            opens: self.opens,
            decided_by: self.decided_by.clone(),
        }
    }
}

fn add(a: &mut Snapshot, b: Snapshot) {
    a.calls += b.calls;
    a.failures += b.failures;
    a.slow += b.slow;
}

impl BreakerStore for MemoryStore {
    fn describe(&self) -> String {
        "memory".into()
    }

    fn sync<'a>(&'a self, req: SyncRequest<'a>) -> BoxFuture<'a, Result<FleetView, StoreError>> {
        let second_of = |now| self.second(now);
        let result = self.op(|breakers, now| {
            let second = second_of(now);
            let e = breakers.entry(req.breaker.to_owned()).or_insert_with(Entry::new);
            let seen = e.seqs.get(req.instance).copied().unwrap_or(0);
            if req.seq > seen {
                e.seqs.insert(req.instance.to_owned(), req.seq);
                if req.epoch == e.epoch {
                    if req.delta.window.calls > 0 {
                        match e.buckets.back_mut() {
                            Some((sec, s)) if *sec == second => add(s, req.delta.window),
                            _ => e.buckets.push_back((second, req.delta.window)),
                        }
                    }
                    if e.state == State::HalfOpen {
                        add(&mut e.probes, req.delta.probes);
                    }
                }
            }
            // Buckets older than the window go (a window of n seconds holds this second and the n - 1 before).
            while e.buckets.front().is_some_and(|(sec, _)| sec + u64::from(req.window_secs) <= second) {
                e.buckets.pop_front();
            }
            e.view(now, second, req.window_secs)
        });
        Box::pin(std::future::ready(result))
    }

    fn transition<'a>(&'a self, req: TransitionRequest<'a>) -> BoxFuture<'a, Result<(bool, FleetView), StoreError>> {
        let second_of = |now| self.second(now);
        let result = self.op(|breakers, now| {
            let e = breakers.entry(req.breaker.to_owned()).or_insert_with(Entry::new);
            let made = req.from_epoch.is_none_or(|epoch| epoch == e.epoch);
            if made {
                e.state = req.to;
                e.epoch += 1;
                e.buckets.clear();
                e.probes = Snapshot::default();
                e.probes_left = if req.to == State::HalfOpen { req.probes } else { 0 };
                e.until = match req.to {
                    State::Open | State::HalfOpen => now.checked_add(req.duration),
                    _ => None,
                };
                e.opens = req.opens;
                e.decided_by = req.instance.to_owned();
            }
            (made, e.view(now, second_of(now), 1))
        });
        Box::pin(std::future::ready(result))
    }

    fn claim_probes<'a>(&'a self, breaker: &'a str, epoch: u64, want: u32) -> BoxFuture<'a, Result<u32, StoreError>> {
        let result = self.op(|breakers, _| match breakers.get_mut(breaker) {
            Some(e) if e.epoch == epoch && e.state == State::HalfOpen => {
                let granted = want.min(e.probes_left);
                e.probes_left -= granted;
                granted
            }
            _ => 0,
        });
        Box::pin(std::future::ready(result))
    }
}

impl LimitStore for MemoryStore {
    fn take<'a>(
        &'a self,
        key: &'a str,
        interval: Duration,
        burst: u32,
        cost: u32,
    ) -> BoxFuture<'a, Result<Result<(), Duration>, StoreError>> {
        let result = if self.down.load(std::sync::atomic::Ordering::Acquire) {
            Err(StoreError("the store is down".into()))
        } else {
            let now = clock::now();
            let mut limits = self.limits.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let tat = limits.get(key).copied().unwrap_or(now).max(now);
            let next = tat + interval * cost;
            // Admitted while the new arrival time is within `burst` intervals of now.
            let allow_at = next.checked_sub(interval * burst).unwrap_or(now);
            if allow_at > now {
                Ok(Err(allow_at - now))
            } else {
                limits.insert(key.to_owned(), next);
                Ok(Ok(()))
            }
        };
        Box::pin(std::future::ready(result))
    }
}
