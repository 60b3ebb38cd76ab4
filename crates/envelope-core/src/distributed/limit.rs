//! A rate limit shared by a fleet: the GCRA state lives in the store and one atomic step there decides each call,
//! so instances together admit what one limiter would.
//!
//! **Lease mode** (`lease = n`, for high rates): an instance takes `n` calls' worth from the store at once and
//! admits them itself, so the store is asked once every `n` calls. Accuracy: it never admits more than the limit
//! (every call admitted was taken from the fleet's bucket first); it may admit less, by up to `n - 1` calls per
//! instance per lease, when a lease expires unused (a lease lasts `n` intervals, the time those calls stand for).
//! When the bucket has less than a lease left, single calls are taken, so a fleet still reaches its limit. The store is asked on the call path (that is what makes
//! the limit exact), within the operation timeout and behind the store's breaker; when it cannot answer, the
//! instance's own limiter decides instead, with the same settings (so a fleet of `n` instances admits up to `n`
//! times the limit while the store is down: the documented price of never failing a call because of it).

use std::sync::Arc;
use std::time::Duration;

use super::{BoxFuture, StoreError};
use crate::circuit_breaker::CircuitBreaker;
use crate::event::Event;
use crate::outcome::Outcome;
use crate::rate_limit::{Config as RateConfig, KeyedRateLimiter, RateLimited, RateLimiter};

/// Where a fleet's shared rate limits live. One method, one atomic step.
pub trait LimitStore: Send + Sync + 'static {
    /// GCRA for `key`: one call every `interval`, bursts of `burst`; takes `cost` calls' worth at once.
    /// `Ok(Ok(()))`: admitted (and counted); `Ok(Err(wait))`: over the limit, the same cost would be admitted
    /// after `wait`.
    fn take<'a>(
        &'a self,
        key: &'a str,
        interval: Duration,
        burst: u32,
        cost: u32,
    ) -> BoxFuture<'a, Result<Result<(), Duration>, StoreError>>;
}

/// A rate limit shared by every instance (see the module docs). Cloning shares it.
#[derive(Clone)]
pub struct GlobalLimiter {
    inner: Arc<Inner>,
}

/// A fleet's limit as every shared limiter asks the store for it: where, at what rate, and how to report a
/// refusal.
struct Fleetwide {
    name: std::sync::Arc<str>,
    key: String,
    interval: Duration,
    burst: u32,
    shadow: bool,
    listeners: crate::event::Listeners,
    store: Arc<dyn LimitStore>,
    /// The store's health, shared with the fleet's breakers' syncs.
    health: CircuitBreaker,
    op_timeout: Duration,
}

impl Fleetwide {
    fn new(
        name: std::sync::Arc<str>,
        key: String,
        config: &RateConfig,
        store: Arc<dyn LimitStore>,
        health: CircuitBreaker,
        op_timeout: Duration,
    ) -> Fleetwide {
        let interval = config.period() / config.rate().max(1);
        let (burst, shadow, listeners) = (config.burst(), config.shadow(), config.listeners().clone());
        Fleetwide { name, key, interval, burst, shadow, listeners, store, health, op_timeout }
    }

    /// The store said no: counted, and refused unless in shadow mode.
    fn refused(&self, wait: Duration) -> Result<(), RateLimited> {
        self.listeners.emit(Event::RateLimited { name: &self.name, shadow: self.shadow });
        if self.shadow { Ok(()) } else { Err(RateLimited { retry_after: wait }) }
    }
}

struct Inner {
    fleet: Fleetwide,
    /// This instance's limiter with the same settings: the fallback.
    local: RateLimiter,
    /// Calls taken from the store at once (1: no lease).
    lease: u32,
    /// What is left of this instance's lease: calls (high 32 bits) and the lease's expiry in milliseconds since
    /// `epoch` (low 32 bits); taken one call at a time with a compare-and-swap.
    leased: std::sync::atomic::AtomicU64,
    epoch: crate::clock::Instant,
}

impl std::fmt::Debug for GlobalLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let fleet = &self.inner.fleet;
        f.debug_struct("GlobalLimiter").field("key", &fleet.key).field("interval", &fleet.interval).finish()
    }
}

impl GlobalLimiter {
    /// A limit named `name`, shared under `key` in `store`, with `config`'s rate, burst and shadow mode; an
    /// instance's own limiter with the same settings decides while the store cannot (see the module docs).
    /// `health` is the store's breaker ([`super::Fleet::store_health`]).
    pub fn new(
        name: impl Into<std::sync::Arc<str>>,
        key: impl Into<String>,
        config: RateConfig,
        store: Arc<dyn LimitStore>,
        health: CircuitBreaker,
        op_timeout: Duration,
    ) -> GlobalLimiter {
        let name = name.into();
        let fleet = Fleetwide::new(name.clone(), key.into(), &config, store, health, op_timeout);
        let local = RateLimiter::new(name, config);
        let (lease, leased, epoch) = (1, std::sync::atomic::AtomicU64::new(0), crate::clock::now());
        GlobalLimiter { inner: Arc::new(Inner { fleet, local, lease, leased, epoch }) }
    }

    /// Takes `n` calls' worth from the store at once (lease mode, see the module docs); at most the burst.
    pub fn with_lease(self, n: u32) -> GlobalLimiter {
        let mut inner = Arc::into_inner(self.inner).expect("set the lease before sharing the limiter");
        inner.lease = n.clamp(1, inner.fleet.burst.max(1));
        GlobalLimiter { inner: Arc::new(inner) }
    }

    /// Takes one call from this instance's lease, if it has one left and it has not expired.
    fn take_from_lease(&self) -> bool {
        use std::sync::atomic::Ordering;
        let inner = &*self.inner;
        if inner.lease <= 1 {
            return false;
        }
        let now = crate::clock::now().saturating_duration_since(inner.epoch).as_millis() as u64;
        let mut bits = inner.leased.load(Ordering::Acquire);
        loop {
            let (left, until) = (bits >> 32, bits & 0xFFFF_FFFF);
            if left == 0 || now >= until {
                return false;
            }
            match inner.leased.compare_exchange_weak(bits, bits - (1 << 32), Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return true,
                Err(actual) => bits = actual,
            }
        }
    }

    /// A lease of `n` calls was taken: one is used now, the rest kept (with what is left of another lease taken
    /// at the same moment) for `n` intervals.
    fn keep_lease(&self, n: u32) {
        use std::sync::atomic::Ordering;
        let inner = &*self.inner;
        let now = crate::clock::now().saturating_duration_since(inner.epoch);
        let now_ms = now.as_millis() as u64;
        let until = (now + inner.fleet.interval * n).as_millis().min(u128::from(u32::MAX)) as u64;
        let mut bits = inner.leased.load(Ordering::Acquire);
        loop {
            let (left, old_until) = (bits >> 32, bits & 0xFFFF_FFFF);
            let left = if old_until > now_ms { left } else { 0 };
            let next = (left + u64::from(n - 1)).min(u64::from(u32::MAX)) << 32 | until.max(old_until);
            match inner.leased.compare_exchange_weak(bits, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return,
                Err(actual) => bits = actual,
            }
        }
    }

    /// This instance's limiter (the fallback).
    pub fn local(&self) -> &RateLimiter {
        &self.inner.local
    }

    /// Takes a turn from the fleet's limit, or this instance's while the store cannot answer. Never waits longer
    /// than the operation timeout, and only while the store's breaker has not yet seen it fail.
    pub async fn acquire(&self) -> Result<(), RateLimited> {
        let inner = &*self.inner;
        if self.take_from_lease() {
            return Ok(());
        }
        let f = &inner.fleet;
        let Ok(permit) = f.health.try_acquire_owned() else { return inner.local.try_acquire() };
        let take = async {
            if inner.lease > 1 {
                match f.store.take(&f.key, f.interval, f.burst, inner.lease).await {
                    Ok(Ok(())) => return Ok((Ok(()), inner.lease)),
                    // A single call fits if the lease missed by less than the other calls of the lease; else
                    // it is refused too, and when it would fit is known without asking again.
                    Ok(Err(wait)) if wait > f.interval * (inner.lease - 1) => {
                        return Ok((Err(wait - f.interval * (inner.lease - 1)), 1));
                    }
                    Ok(Err(_)) => {} // less than a lease left: one call at a time
                    Err(e) => return Err(e),
                }
            }
            f.store.take(&f.key, f.interval, f.burst, 1).await.map(|r| (r, 1))
        };
        match ask(permit, f.op_timeout, take).await {
            Some(Ok(taken)) => {
                if taken > 1 {
                    self.keep_lease(taken);
                }
                Ok(())
            }
            Some(Err(wait)) => f.refused(wait),
            None => inner.local.try_acquire(),
        }
    }
}

/// Runs one store step within the timeout and records it on the store's breaker: `None` when the store could not
/// answer (the caller's own limiter decides then).
async fn ask<T>(
    permit: crate::circuit_breaker::OwnedPermit,
    op_timeout: Duration,
    step: impl std::future::Future<Output = Result<(Result<(), Duration>, T), StoreError>>,
) -> Option<Result<T, Duration>> {
    match tokio::time::timeout(op_timeout, step).await {
        Ok(Ok((answer, taken))) => {
            permit.record(Outcome::Ok);
            Some(answer.map(|()| taken))
        }
        Ok(Err(_)) => {
            permit.record(Outcome::Failure);
            None
        }
        Err(_) => {
            permit.record(Outcome::Timeout);
            None
        }
    }
}

/// A rate limit per key (a client, a tenant, an API key) shared by every instance: each key has its own GCRA state
/// in the store, under the limit's key and the caller's key, decided as [`GlobalLimiter`] decides (no lease). While
/// the store cannot answer, an instance's own per-key limiter with the same settings decides, in bounded memory.
#[derive(Clone)]
pub struct GlobalKeyedLimiter {
    inner: Arc<KeyedInner>,
}

struct KeyedInner {
    fleet: Fleetwide,
    local: KeyedRateLimiter<String>,
}

impl std::fmt::Debug for GlobalKeyedLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GlobalKeyedLimiter").field("key", &self.inner.fleet.key).finish_non_exhaustive()
    }
}

impl GlobalKeyedLimiter {
    /// A per-key limit named `name`, shared under `key` in `store`, with `config`'s rate, burst and shadow mode;
    /// the local fallback tracks at most `max_keys` keys.
    pub fn new(
        name: impl Into<std::sync::Arc<str>>,
        key: impl Into<String>,
        config: RateConfig,
        store: Arc<dyn LimitStore>,
        health: CircuitBreaker,
        op_timeout: Duration,
        max_keys: std::num::NonZeroUsize,
    ) -> GlobalKeyedLimiter {
        let name = name.into();
        let fleet = Fleetwide::new(name.clone(), key.into(), &config, store, health, op_timeout);
        let local = KeyedRateLimiter::bounded(name, config, max_keys);
        GlobalKeyedLimiter { inner: Arc::new(KeyedInner { fleet, local }) }
    }

    /// This instance's per-key limiter (the fallback).
    pub fn local(&self) -> &KeyedRateLimiter<String> {
        &self.inner.local
    }

    /// Takes a turn for `key` from the fleet's limit, or this instance's while the store cannot answer.
    pub async fn acquire(&self, key: &str) -> Result<(), RateLimited> {
        let (f, local) = (&self.inner.fleet, &self.inner.local);
        let Ok(permit) = f.health.try_acquire_owned() else { return local.try_acquire(key) };
        let full = format!("{}:{key}", f.key);
        let step = async { f.store.take(&full, f.interval, f.burst, 1).await.map(|r| (r, ())) };
        match ask(permit, f.op_timeout, step).await {
            Some(Ok(())) => Ok(()),
            Some(Err(wait)) => f.refused(wait),
            None => local.try_acquire(key),
        }
    }
}
