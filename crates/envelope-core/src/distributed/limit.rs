//! A rate limit shared by a fleet: the GCRA state lives in the store and one atomic step there decides each call,
//! so instances together admit what one limiter would. The store is asked on the call path (that is what makes
//! the limit exact), within the operation timeout and behind the store's breaker; when it cannot answer, the
//! instance's own limiter decides instead, with the same settings (so a fleet of `n` instances admits up to `n`
//! times the limit while the store is down: the documented price of never failing a call because of it).

use std::sync::Arc;
use std::time::Duration;

use super::{BoxFuture, StoreError};
use crate::circuit_breaker::CircuitBreaker;
use crate::event::Event;
use crate::outcome::Outcome;
use crate::rate_limit::{Config as RateConfig, RateLimited, RateLimiter};

/// Where a fleet's shared rate limits live. One method, one atomic step.
pub trait LimitStore: Send + Sync + 'static {
    /// GCRA for `key`: one call every `interval`, bursts of `burst`. `Ok(Ok(()))`: admitted (and counted);
    /// `Ok(Err(wait))`: over the limit, the next call would be admitted after `wait`.
    fn take<'a>(
        &'a self,
        key: &'a str,
        interval: Duration,
        burst: u32,
    ) -> BoxFuture<'a, Result<Result<(), Duration>, StoreError>>;
}

/// A rate limit shared by every instance (see the module docs). Cloning shares it.
#[derive(Clone)]
pub struct GlobalLimiter {
    inner: Arc<Inner>,
}

struct Inner {
    key: String,
    interval: Duration,
    burst: u32,
    shadow: bool,
    listeners: crate::event::Listeners,
    store: Arc<dyn LimitStore>,
    /// This instance's limiter with the same settings: the fallback.
    local: RateLimiter,
    /// The store's health, shared with the fleet's breakers' syncs.
    health: CircuitBreaker,
    op_timeout: Duration,
}

impl std::fmt::Debug for GlobalLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GlobalLimiter").field("key", &self.inner.key).field("interval", &self.inner.interval).finish()
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
        let interval = config.period() / config.rate().max(1);
        let (burst, shadow, listeners) = (config.burst(), config.shadow(), config.listeners().clone());
        let local = RateLimiter::new(name, config);
        let key = key.into();
        GlobalLimiter {
            inner: Arc::new(Inner { key, interval, burst, shadow, listeners, store, local, health, op_timeout }),
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
        let Ok(permit) = inner.health.try_acquire_owned() else { return inner.local.try_acquire() };
        match tokio::time::timeout(inner.op_timeout, inner.store.take(&inner.key, inner.interval, inner.burst)).await {
            Ok(Ok(Ok(()))) => {
                permit.record(Outcome::Ok);
                Ok(())
            }
            Ok(Ok(Err(wait))) => {
                permit.record(Outcome::Ok);
                inner.listeners.emit(Event::RateLimited { name: inner.local.name(), shadow: inner.shadow });
                if inner.shadow { Ok(()) } else { Err(RateLimited { retry_after: wait }) }
            }
            Ok(Err(_)) => {
                permit.record(Outcome::Failure);
                inner.local.try_acquire()
            }
            Err(_) => {
                permit.record(Outcome::Timeout);
                inner.local.try_acquire()
            }
        }
    }
}

/// The admission step of an envelope whose rate limit is shared (see [`crate::compose::Builder::shared_rate_limit`]).
impl GlobalLimiter {
    pub(crate) fn admit(&self) -> BoxFuture<'_, Result<(), RateLimited>> {
        Box::pin(self.acquire())
    }
}
