//! The sync loop: every interval, each shared breaker's outcomes go to the store, the fleet's decisions are made
//! or followed, probes are claimed, and the store's failures put every breaker back on its own.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{BreakerStore, FleetView, StoreError, SyncRequest, TransitionRequest, check, decide};
use crate::circuit_breaker::{self, CircuitBreaker, State};
use crate::clock::{self, Instant};
use crate::event::{Event, Listeners};
use crate::outcome::Outcome;

/// Default time between two syncs.
pub const DEFAULT_SYNC_INTERVAL: Duration = Duration::from_millis(200);
/// Default time one store operation may take before it counts as failed.
pub const DEFAULT_OP_TIMEOUT: Duration = Duration::from_millis(50);

/// How a [`Fleet`] syncs.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// This instance's name in the store and in events (unique in the fleet: host and process id, say).
    pub instance: String,
    /// Time between two syncs.
    pub sync_interval: Duration,
    /// Time one store operation may take.
    pub op_timeout: Duration,
    /// Where the fleet's events go ([`Event::FleetTransition`], [`Event::SharedStateDegraded`],
    /// [`Event::SharedStateRestored`]).
    pub listeners: Listeners,
}

impl FleetConfig {
    /// The defaults, for instance `instance`.
    pub fn new(instance: impl Into<String>) -> Self {
        FleetConfig {
            instance: instance.into(),
            sync_interval: DEFAULT_SYNC_INTERVAL,
            op_timeout: DEFAULT_OP_TIMEOUT,
            listeners: Listeners::new(),
        }
    }
}

/// The shared breakers of one instance, synced with their fleet through a store. Cloning is cheap and shares it.
#[derive(Clone)]
pub struct Fleet {
    inner: Arc<Inner>,
}

struct Inner {
    config: FleetConfig,
    store: Arc<dyn BreakerStore>,
    describe: String,
    /// The store behind a breaker of its own: when it keeps failing, syncs fail at once instead of waiting for
    /// their timeouts.
    store_breaker: CircuitBreaker,
    members: Mutex<Vec<Member>>,
    health: Mutex<Health>,
}

#[derive(Clone)]
struct Member {
    breaker: CircuitBreaker,
    window_secs: u32,
    seq: u64,
    /// Probes granted to this instance: `(epoch, count)`.
    claimed: (u64, u32),
}

#[derive(Debug, Default)]
struct Health {
    synced_once: bool,
    degraded_since: Option<Instant>,
    last_error: Option<String>,
    last_sync: Option<Instant>,
}

/// What a fleet reports about itself (for the admin API and metrics).
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetStatus {
    /// The store, as it describes itself.
    pub store: String,
    /// This instance's name.
    pub instance: String,
    /// Whether the shared breakers follow the fleet now (the last sync worked).
    pub synced: bool,
    /// How long the store has been unreachable, if it is.
    pub degraded_for: Option<Duration>,
    /// The last error, while degraded.
    pub last_error: Option<String>,
    /// The shared breakers.
    pub breakers: Vec<String>,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet").field("status", &self.status()).finish()
    }
}

impl Fleet {
    /// A fleet syncing through `store`, with no breaker yet.
    pub fn new(store: Arc<dyn BreakerStore>, config: FleetConfig) -> Fleet {
        let store_breaker = CircuitBreaker::new(
            "shared-state",
            circuit_breaker::Config::builder()
                .count_window(3)
                .minimum_calls(3)
                .failure_rate_threshold(50.0)
                .open_duration(Duration::from_secs(1))
                .half_open_calls(1)
                .build()
                .expect("valid constants"),
        );
        let describe = store.describe();
        Fleet {
            inner: Arc::new(Inner {
                config,
                store,
                describe,
                store_breaker,
                members: Mutex::default(),
                health: Mutex::default(),
            }),
        }
    }

    /// Shares `breaker` with the fleet (made with [`CircuitBreaker::linked`], with a time window).
    pub fn join(&self, breaker: CircuitBreaker) -> Result<(), &'static str> {
        let window_secs = check(&breaker)?;
        let mut members = lock(&self.inner.members);
        members.retain(|m| m.breaker.name() != breaker.name());
        members.push(Member { breaker, window_secs, seq: 0, claimed: (0, 0) });
        Ok(())
    }

    /// Shares exactly `breakers` (after a config reload): a breaker already shared keeps its place (its sequence
    /// number and probes), a new one joins, one no longer given leaves and decides alone.
    pub fn share_exactly(&self, breakers: &[CircuitBreaker]) -> Result<(), &'static str> {
        let windows = breakers.iter().map(check).collect::<Result<Vec<_>, _>>()?;
        let mut members = lock(&self.inner.members);
        for m in members.iter().filter(|m| !breakers.iter().any(|b| b.same_as(&m.breaker))) {
            m.breaker.delegate(false);
        }
        members.retain(|m| breakers.iter().any(|b| b.same_as(&m.breaker)));
        for (b, window_secs) in breakers.iter().zip(windows) {
            if !members.iter().any(|m| m.breaker.same_as(b)) {
                members.push(Member { breaker: b.clone(), window_secs, seq: 0, claimed: (0, 0) });
            }
        }
        Ok(())
    }

    /// The store's breaker: shared rate limits ([`super::GlobalLimiter`]) on the same store use it too, so that
    /// a store the syncs found failing is not asked on the call path either.
    pub fn store_health(&self) -> CircuitBreaker {
        self.inner.store_breaker.clone()
    }

    /// What the fleet knows about itself now.
    pub fn status(&self) -> FleetStatus {
        let h = lock(&self.inner.health);
        let members = lock(&self.inner.members);
        FleetStatus {
            store: self.inner.describe.clone(),
            instance: self.inner.config.instance.clone(),
            // Every breaker has synced at least once (a breaker joined a moment ago has not followed the fleet yet).
            synced: h.synced_once && h.degraded_since.is_none() && members.iter().all(|m| m.seq > 0),
            degraded_for: h.degraded_since.map(|since| clock::now().saturating_duration_since(since)),
            last_error: h.last_error.clone(),
            breakers: members.iter().map(|m| m.breaker.name().to_owned()).collect(),
        }
    }

    /// Syncs forever, every sync interval (run it as a task; abort the task to stop).
    pub async fn run(self) {
        let mut tick = tokio::time::interval(self.inner.config.sync_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let _ = self.sync_once().await;
        }
    }

    /// One sync of every shared breaker. On the first failure every breaker decides alone until a sync works
    /// again; the outcomes of breakers not synced this round are dropped (each counted in its own window).
    pub async fn sync_once(&self) -> Result<(), StoreError> {
        let members: Vec<Member> = lock(&self.inner.members).clone();
        let mut synced = Vec::with_capacity(members.len());
        for mut m in members {
            match self.sync_member(&mut m).await {
                Ok(()) => synced.push(m),
                Err(e) => {
                    self.degrade(&e);
                    return Err(e);
                }
            }
        }
        {
            let mut all = lock(&self.inner.members);
            for m in synced {
                if let Some(slot) = all.iter_mut().find(|x| x.breaker.name() == m.breaker.name()) {
                    slot.seq = m.seq;
                    slot.claimed = m.claimed;
                }
            }
        }
        self.restore();
        Ok(())
    }

    async fn sync_member(&self, m: &mut Member) -> Result<(), StoreError> {
        let inner = &*self.inner;
        let instance = inner.config.instance.as_str();
        let b = m.breaker.clone();
        let name = b.name().to_owned();
        let config = b.config().clone();
        if let Some(state) = b.take_intent() {
            let (duration, probes, opens) = match state {
                State::Open => (config.open_duration_for(1), 0, 1),
                State::HalfOpen => (config.max_half_open_wait.unwrap_or(Duration::MAX), config.half_open_calls, 0),
                _ => (Duration::ZERO, 0, 0),
            };
            let req =
                TransitionRequest { breaker: &name, instance, from_epoch: None, to: state, duration, probes, opens };
            if let Err(e) = self.op(inner.store.transition(req)).await {
                b.restore_intent(state);
                return Err(e);
            }
        }
        let delta = b.take_delta();
        m.seq += 1;
        let req = SyncRequest {
            breaker: &name,
            instance,
            seq: m.seq,
            epoch: b.fleet_epoch(),
            delta,
            window_secs: m.window_secs,
        };
        let mut view: FleetView = self.op(inner.store.sync(req)).await?;
        b.delegate(true);
        if let Some(t) = decide(&view, &config, &name, instance) {
            let (_, after) = self.op(inner.store.transition(t)).await?;
            view = after;
        }
        let mut granted = if m.claimed.0 == view.epoch { m.claimed.1 } else { 0 };
        if view.state == State::HalfOpen && view.probes_left > 0 {
            let fresh = m.claimed.0 != view.epoch;
            if fresh || b.probes_issued() >= granted {
                granted += self.op(inner.store.claim_probes(&name, view.epoch, 1)).await?;
            }
        }
        m.claimed = (view.epoch, granted);
        if let Some((from, to)) = b.follow(view.state, view.epoch, view.remaining, granted) {
            inner.config.listeners.emit(Event::FleetTransition { name: &name, from, to, instance: &view.decided_by });
        }
        Ok(())
    }

    /// Runs one store operation within its timeout, behind the store's breaker.
    async fn op<T>(&self, fut: impl std::future::Future<Output = Result<T, StoreError>>) -> Result<T, StoreError> {
        let inner = &*self.inner;
        let permit = inner
            .store_breaker
            .try_acquire_owned()
            .map_err(|open| StoreError(format!("the store keeps failing: not asked again for {open}")))?;
        match tokio::time::timeout(inner.config.op_timeout, fut).await {
            Ok(Ok(v)) => {
                permit.record(Outcome::Ok);
                Ok(v)
            }
            Ok(Err(e)) => {
                permit.record(Outcome::Failure);
                Err(e)
            }
            Err(_) => {
                permit.record(Outcome::Timeout);
                Err(StoreError(format!("no answer within {:?}", inner.config.op_timeout)))
            }
        }
    }

    fn degrade(&self, error: &StoreError) {
        for m in lock(&self.inner.members).iter() {
            m.breaker.delegate(false);
            let _ = m.breaker.take_delta();
        }
        let mut h = lock(&self.inner.health);
        h.last_error = Some(error.0.clone());
        if h.degraded_since.is_none() {
            h.degraded_since = Some(clock::now());
            drop(h);
            let inner = &*self.inner;
            inner.config.listeners.emit(Event::SharedStateDegraded { store: &inner.describe, error: &error.0 });
        }
    }

    fn restore(&self) {
        let mut h = lock(&self.inner.health);
        h.synced_once = true;
        h.last_sync = Some(clock::now());
        h.last_error = None;
        if let Some(since) = h.degraded_since.take() {
            drop(h);
            let after = clock::now().saturating_duration_since(since);
            let inner = &*self.inner;
            inner.config.listeners.emit(Event::SharedStateRestored { store: &inner.describe, after });
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
