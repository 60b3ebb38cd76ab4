//! Rate limiting: at most `rate` calls per `period`, with bursts, decided by GCRA.
//!
//! - [`RateLimiter`] limits all calls together (Envoy's local rate limit, resilience4j's `RateLimiter`). One
//!   `u64` of state, one compare-and-swap per call.
//! - [`KeyedRateLimiter`] limits each key (client, tenant, route) separately, in bounded memory: at most
//!   `max_keys` keys are tracked; a key whose bucket is full again carries no state and is evicted first.
//! - **Shadow mode** counts and reports what would have been rejected, and lets every call through, so a limit
//!   can be tried on live traffic before it is enforced.
//! - A call may **wait** for its turn up to `max_wait` (resilience4j's `timeoutDuration`); the default is to
//!   reject at once.
//!
//! ```
//! use envelope_core::rate_limit::{Config, RateLimiter};
//!
//! let limiter = RateLimiter::new("llm-api", Config::per_second(50).burst(10).build()?);
//! assert!(limiter.try_acquire().is_ok());
//! # Ok::<(), envelope_core::rate_limit::ConfigError>(())
//! ```

pub(crate) mod error;
mod gcra;

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::hash::{BuildHasher, Hash, RandomState};
use std::time::Duration;

pub use error::RateLimited;

use self::gcra::Gcra;
use crate::clock::{self, Instant};
use crate::event::{Event, Listener, Listeners};
use crate::sync::{Arc, AtomicU64, Mutex, Ordering, lock};

/// Default longest wait for a turn: none (reject at once).
pub const DEFAULT_MAX_WAIT: Duration = Duration::ZERO;
/// Default number of keys a [`KeyedRateLimiter`] tracks.
pub const DEFAULT_MAX_KEYS: usize = 10_000;

/// A validated rate limiter configuration. Build one with [`Config::per`] or [`Config::per_second`] (a rate limit
/// has no meaningful default rate, so there is no `Default`).
#[derive(Debug, Clone)]
pub struct Config {
    rate: u32,
    period: Duration,
    burst: u32,
    shadow: bool,
    max_wait: Duration,
    listeners: Listeners,
    gcra: Gcra,
}

/// Two configs are equal when their settings are: where their events go is not a setting.
impl PartialEq for Config {
    fn eq(&self, o: &Config) -> bool {
        (self.rate, self.period, self.burst, self.shadow, self.max_wait)
            == (o.rate, o.period, o.burst, o.shadow, o.max_wait)
    }
}

impl Config {
    /// A builder for `rate` calls per `period`, with a burst of `rate` and the other documented defaults.
    pub fn per(rate: u32, period: Duration) -> Builder {
        Builder { rate, period, burst: rate, shadow: false, max_wait: DEFAULT_MAX_WAIT, listeners: Listeners::new() }
    }
    /// A builder for `rate` calls per second.
    pub fn per_second(rate: u32) -> Builder {
        Config::per(rate, Duration::from_secs(1))
    }
    /// Calls allowed per period, sustained.
    pub fn rate(&self) -> u32 {
        self.rate
    }
    /// The period.
    pub fn period(&self) -> Duration {
        self.period
    }
    /// Calls allowed at once after an idle spell.
    pub fn burst(&self) -> u32 {
        self.burst
    }
    /// Whether calls over the limit are counted but let through.
    pub fn shadow(&self) -> bool {
        self.shadow
    }
    /// Longest time a call may wait for its turn.
    pub fn max_wait(&self) -> Duration {
        self.max_wait
    }
    /// Where the limiter's events go.
    pub fn listeners(&self) -> &Listeners {
        &self.listeners
    }

    /// The same settings, reporting to `listeners` instead (listeners are not validated: this cannot fail).
    pub fn with_listeners(mut self, listeners: Listeners) -> Self {
        self.listeners = listeners;
        self
    }
}

/// Builds a rate limiter [`Config`].
#[derive(Debug, Clone)]
pub struct Builder {
    rate: u32,
    period: Duration,
    burst: u32,
    shadow: bool,
    max_wait: Duration,
    listeners: Listeners,
}

impl Builder {
    /// Allows bursts of `burst` calls (≥ 1; defaults to the rate).
    pub fn burst(mut self, burst: u32) -> Self {
        self.burst = burst;
        self
    }
    /// Counts but does not reject.
    pub fn shadow(mut self, shadow: bool) -> Self {
        self.shadow = shadow;
        self
    }
    /// Lets calls wait up to `max_wait` for their turn.
    pub fn max_wait(mut self, max_wait: Duration) -> Self {
        self.max_wait = max_wait;
        self
    }
    /// Sends events to `listener` too.
    pub fn listener(mut self, listener: impl Listener) -> Self {
        self.listeners = self.listeners.with(listener);
        self
    }
    /// Use exactly these listeners.
    pub fn listeners(mut self, listeners: Listeners) -> Self {
        self.listeners = listeners;
        self
    }
    /// Validates the configuration.
    pub fn build(self) -> Result<Config, ConfigError> {
        if self.rate == 0 {
            return Err(ConfigError("rate must be at least 1"));
        }
        if self.burst == 0 {
            return Err(ConfigError("burst must be at least 1"));
        }
        if self.period.is_zero() {
            return Err(ConfigError("period must be greater than zero"));
        }
        let interval = clock::as_nanos(self.period) / u64::from(self.rate);
        if interval == 0 {
            return Err(ConfigError("rate is above one call per nanosecond"));
        }
        let gcra = Gcra { interval, tolerance: interval.saturating_mul(u64::from(self.burst)) };
        let Builder { rate, period, burst, shadow, max_wait, listeners } = self;
        Ok(Config { rate, period, burst, shadow, max_wait, listeners, gcra })
    }
}

/// Why a rate limiter configuration is invalid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(&'static str);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for ConfigError {}

/// What a limiter reports about itself.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Metrics {
    /// Calls allowed.
    pub allowed: u64,
    /// Calls over the limit (rejected, or let through in shadow mode).
    pub limited: u64,
}

struct Common {
    name: std::sync::Arc<str>,
    gcra: Gcra,
    shadow: bool,
    max_wait: u64,
    epoch: Instant,
    allowed: AtomicU64,
    limited: AtomicU64,
    listeners: Listeners,
}

impl Common {
    fn new(name: std::sync::Arc<str>, config: Config) -> Self {
        Common {
            name,
            gcra: config.gcra,
            shadow: config.shadow,
            max_wait: clock::as_nanos(config.max_wait),
            epoch: clock::now(),
            allowed: AtomicU64::new(0),
            limited: AtomicU64::new(0),
            listeners: config.listeners,
        }
    }

    /// Decides a call at `now` against `tat`, updating it. `Ok(wait)`: allowed after `wait` nanoseconds
    /// (0 = now).
    #[inline]
    fn decide(&self, tat: &AtomicU64, now: Instant, may_wait: bool) -> Result<u64, RateLimited> {
        let now = clock::nanos_since(self.epoch, now);
        let mut current = tat.load(Ordering::Acquire);
        loop {
            let (next, wait) = match self.gcra.check(current, now) {
                Ok(next) => (next, 0),
                Err(wait) if may_wait && wait <= self.max_wait => {
                    // Reserve the turn: the TAT moves on as if the call came at its allowed time.
                    (self.gcra.check(current, now + wait).unwrap_or(current), wait)
                }
                Err(wait) => return self.limited(wait),
            };
            match tat.compare_exchange_weak(current, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    self.allowed.fetch_add(1, Ordering::Relaxed);
                    return Ok(wait);
                }
                Err(actual) => current = actual,
            }
        }
    }

    #[cold]
    fn limited(&self, wait: u64) -> Result<u64, RateLimited> {
        self.limited.fetch_add(1, Ordering::Relaxed);
        self.listeners.emit(Event::RateLimited { name: &self.name, shadow: self.shadow });
        if self.shadow { Ok(0) } else { Err(RateLimited { retry_after: Duration::from_nanos(wait) }) }
    }

    fn metrics(&self) -> Metrics {
        Metrics { allowed: self.allowed.load(Ordering::Relaxed), limited: self.limited.load(Ordering::Relaxed) }
    }
}

/// What a limiter allows, as the IETF `RateLimit-Policy` and `RateLimit` fields say it: a quota of `limit` calls
/// earned back over `window`, `remaining` of them usable now, all of them again after `reset`.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    /// Calls allowed at once when the limiter is idle (its burst).
    pub limit: u64,
    /// The time in which a whole quota is earned back.
    pub window: Duration,
    /// Calls allowed now without waiting.
    pub remaining: u64,
    /// Time until the whole quota is available again.
    pub reset: Duration,
}

/// A rate limiter shared by all its clones.
#[derive(Clone)]
pub struct RateLimiter {
    shared: Arc<(Common, AtomicU64)>,
}

impl RateLimiter {
    /// A limiter named `name` (a validated configuration cannot fail).
    pub fn new(name: impl Into<std::sync::Arc<str>>, config: Config) -> Self {
        RateLimiter { shared: Arc::new((Common::new(name.into(), config), AtomicU64::new(0))) }
    }

    /// The limiter's name.
    pub fn name(&self) -> &str {
        &self.shared.0.name
    }

    /// Takes a turn now, or says how long until one is free. Never waits.
    #[inline]
    pub fn try_acquire(&self) -> Result<(), RateLimited> {
        self.try_acquire_at(clock::now())
    }

    /// [`try_acquire`](Self::try_acquire) with the caller's reading of the clock.
    #[inline]
    pub fn try_acquire_at(&self, now: Instant) -> Result<(), RateLimited> {
        self.shared.0.decide(&self.shared.1, now, false).map(|_| ())
    }

    /// Takes a turn, waiting for it up to the configured `max_wait`.
    pub async fn acquire(&self) -> Result<(), RateLimited> {
        let wait = self.shared.0.decide(&self.shared.1, clock::now(), true)?;
        if wait > 0 {
            tokio::time::sleep(Duration::from_nanos(wait)).await;
        }
        Ok(())
    }

    /// How long [`acquire`](Self::acquire) must wait, reserving the turn (for blocking callers who sleep
    /// themselves).
    pub fn reserve(&self) -> Result<Duration, RateLimited> {
        self.shared.0.decide(&self.shared.1, clock::now(), true).map(Duration::from_nanos)
    }

    /// Runs `f` when the limiter allows it.
    pub async fn call<T, E, F, Fut>(&self, f: F) -> Result<T, crate::Error<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.acquire().await?;
        f().await.map_err(crate::Error::Inner)
    }

    /// Calls allowed and limited so far.
    pub fn metrics(&self) -> Metrics {
        self.shared.0.metrics()
    }

    /// The quota now (reads the limiter's state; takes nothing).
    pub fn quota(&self) -> Quota {
        self.quota_at(clock::now())
    }

    /// [`quota`](Self::quota) with the caller's reading of the clock.
    pub fn quota_at(&self, now: Instant) -> Quota {
        let c = &self.shared.0;
        let ahead = self.shared.1.load(Ordering::Acquire).saturating_sub(clock::nanos_since(c.epoch, now));
        let Gcra { interval, tolerance } = c.gcra;
        Quota {
            limit: tolerance / interval,
            window: Duration::from_nanos(tolerance),
            remaining: tolerance.saturating_sub(ahead) / interval,
            reset: Duration::from_nanos(ahead),
        }
    }
}

impl fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimiter").field("name", &self.shared.0.name).finish_non_exhaustive()
    }
}

const SHARDS: usize = 16;

/// A rate limiter per key, in bounded memory.
pub struct KeyedRateLimiter<K> {
    shared: Arc<Keyed<K>>,
}

struct Keyed<K> {
    common: Common,
    max_per_shard: usize,
    hasher: RandomState,
    shards: Box<[Mutex<HashMap<K, AtomicU64>>]>,
}

impl<K> Clone for KeyedRateLimiter<K> {
    /// Clones share every key's state.
    fn clone(&self) -> Self {
        KeyedRateLimiter { shared: self.shared.clone() }
    }
}

impl<K: Hash + Eq + Clone> KeyedRateLimiter<K> {
    /// A per-key limiter tracking at most `max_keys` keys (rounded up to a multiple of 16).
    pub fn new(name: impl Into<std::sync::Arc<str>>, config: Config, max_keys: usize) -> Result<Self, ConfigError> {
        let max_keys = std::num::NonZeroUsize::new(max_keys).ok_or(ConfigError("max_keys must be at least 1"))?;
        Ok(Self::bounded(name, config, max_keys))
    }

    /// [`KeyedRateLimiter::new`] with a cap that cannot be zero: infallible.
    pub fn bounded(name: impl Into<std::sync::Arc<str>>, config: Config, max_keys: std::num::NonZeroUsize) -> Self {
        KeyedRateLimiter {
            shared: Arc::new(Keyed {
                common: Common::new(name.into(), config),
                max_per_shard: max_keys.get().div_ceil(SHARDS),
                hasher: RandomState::new(),
                shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            }),
        }
    }

    /// Takes a turn for `key` now, or says how long until one is free. The key may be given borrowed (`&str` for
    /// `String` keys): it is copied only the first time it is seen.
    pub fn try_acquire<Q>(&self, key: &Q) -> Result<(), RateLimited>
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        self.try_acquire_at(key, clock::now())
    }

    /// [`try_acquire`](Self::try_acquire) with the caller's reading of the clock.
    pub fn try_acquire_at<Q>(&self, key: &Q, now: Instant) -> Result<(), RateLimited>
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let k = &self.shared;
        let shard = &k.shards[(k.hasher.hash_one(key) as usize) % SHARDS];
        let mut map = lock(shard);
        if let Some(tat) = map.get(key) {
            return k.common.decide(tat, now, false).map(|_| ());
        }
        if map.len() >= k.max_per_shard {
            k.evict(&mut map, now);
        }
        let tat = map.entry(key.to_owned()).or_insert_with(|| AtomicU64::new(0));
        k.common.decide(tat, now, false).map(|_| ())
    }

    /// Keys tracked now.
    pub fn len(&self) -> usize {
        self.shared.shards.iter().map(|s| lock(s).len()).sum()
    }

    /// Whether no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets every key whose bucket is full again. Call it periodically to return memory early; it also runs
    /// by itself when a shard is full.
    pub fn evict_idle(&self) {
        let now = clock::nanos_since(self.shared.common.epoch, clock::now());
        for shard in self.shared.shards.iter() {
            let gcra = self.shared.common.gcra;
            lock(shard).retain(|_, tat| !gcra.is_idle(tat.load(Ordering::Acquire), now));
        }
    }

    /// Calls allowed and limited so far, over all keys.
    pub fn metrics(&self) -> Metrics {
        self.shared.common.metrics()
    }
}

impl<K: Hash + Eq + Clone> Keyed<K> {
    /// Makes room in a full shard: drop idle keys; if none is idle, drop the key closest to idle (it loses at
    /// most the remainder of its burst debt).
    fn evict(&self, map: &mut HashMap<K, AtomicU64>, now: Instant) {
        let now = clock::nanos_since(self.common.epoch, now);
        let gcra = self.common.gcra;
        map.retain(|_, tat| !gcra.is_idle(tat.load(Ordering::Acquire), now));
        if map.len() >= self.max_per_shard {
            let oldest = map.iter().min_by_key(|(_, tat)| tat.load(Ordering::Acquire)).map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                map.remove(&k);
            }
        }
    }
}

impl<K> fmt::Debug for KeyedRateLimiter<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedRateLimiter").field("name", &self.shared.common.name).finish_non_exhaustive()
    }
}
