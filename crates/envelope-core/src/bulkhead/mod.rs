//! Bulkhead: cap the calls in flight to one dependency, with a bounded, timed FIFO queue in front.
//!
//! Semantics follow resilience4j's semaphore bulkhead (`maxConcurrentCalls`, `maxWaitDuration`) and Envoy's
//! `max_requests` / `max_pending_requests`:
//!
//! - at most `max_concurrent` calls run at once;
//! - a call that finds no free permit waits in a FIFO queue of at most `max_queue` calls, for at most `max_wait`
//!   (a zero wait or a zero queue rejects at once with [`BulkheadFull`]);
//! - a permit is returned when its guard is dropped: on completion, on cancellation of the caller's future, and
//!   on panic. It can never leak and is never returned twice;
//! - the limits can be changed live ([`Bulkhead::set_max_concurrent`]); shrinking below the calls in flight takes
//!   effect as they finish.
//!
//! ```
//! use envelope_core::bulkhead::{Bulkhead, Config};
//! use std::time::Duration;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let config = Config::builder().max_concurrent(10).queue(5, Duration::from_millis(50)).build().unwrap();
//! let bulkhead = Bulkhead::new("inventory", config);
//! let answer = bulkhead.call(|| async { Ok::<_, std::io::Error>(42) }).await.unwrap();
//! assert_eq!(answer, 42);
//! # }
//! ```

pub(crate) mod error;
pub(crate) mod semaphore;

use std::fmt;
use std::future::Future;
use std::time::Duration;

pub use error::BulkheadFull;

use self::semaphore::{Enqueued, MAX_PERMITS, Semaphore, Slot, Wait};
use crate::clock;
use crate::event::{Event, Listener, Listeners};
use crate::sync::{Arc, AtomicU64, AtomicUsize, Ordering};

/// Default maximum of concurrent calls (resilience4j's default).
pub const DEFAULT_MAX_CONCURRENT: usize = 25;
/// Default queue length: no queue.
pub const DEFAULT_MAX_QUEUE: usize = 0;
/// Default longest wait in the queue: none (reject at once).
pub const DEFAULT_MAX_WAIT: Duration = Duration::ZERO;

/// A validated bulkhead configuration. Build one with [`Config::builder`].
#[derive(Debug, Clone)]
pub struct Config {
    max_concurrent: usize,
    max_queue: usize,
    max_wait: Duration,
    listeners: Listeners,
}

impl Default for Config {
    fn default() -> Self {
        Builder::default().build().expect("defaults are valid")
    }
}

/// Two configs are equal when their settings are: where their events go is not a setting.
impl PartialEq for Config {
    fn eq(&self, other: &Config) -> bool {
        (self.max_concurrent, self.max_queue, self.max_wait) == (other.max_concurrent, other.max_queue, other.max_wait)
    }
}

impl Config {
    /// A builder starting from the documented defaults.
    pub fn builder() -> Builder {
        Builder::default()
    }
    /// Calls allowed to run at once.
    pub fn max_concurrent(&self) -> usize {
        self.max_concurrent
    }
    /// Calls allowed to wait for a permit.
    pub fn max_queue(&self) -> usize {
        self.max_queue
    }
    /// Longest wait for a permit.
    pub fn max_wait(&self) -> Duration {
        self.max_wait
    }
    /// The same settings, reporting to `listeners` instead (listeners are not validated: this cannot fail).
    pub fn with_listeners(mut self, listeners: Listeners) -> Self {
        self.listeners = listeners;
        self
    }
}

/// Builds a bulkhead [`Config`]; every setter starts from the documented default.
#[derive(Debug, Clone)]
pub struct Builder {
    config: Config,
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            config: Config {
                max_concurrent: DEFAULT_MAX_CONCURRENT,
                max_queue: DEFAULT_MAX_QUEUE,
                max_wait: DEFAULT_MAX_WAIT,
                listeners: Listeners::new(),
            },
        }
    }
}

impl Builder {
    /// Calls allowed to run at once (1 ..= about 2^29).
    pub fn max_concurrent(mut self, n: usize) -> Self {
        self.config.max_concurrent = n;
        self
    }
    /// Lets up to `max_queue` calls wait up to `max_wait` each.
    pub fn queue(mut self, max_queue: usize, max_wait: Duration) -> Self {
        self.config.max_queue = max_queue;
        self.config.max_wait = max_wait;
        self
    }
    /// Sends events to `listener` too.
    pub fn listener(mut self, listener: impl Listener) -> Self {
        self.config.listeners = self.config.listeners.with(listener);
        self
    }
    /// Use exactly these listeners.
    pub fn listeners(mut self, listeners: Listeners) -> Self {
        self.config.listeners = listeners;
        self
    }
    /// Validates the configuration.
    pub fn build(self) -> Result<Config, ConfigError> {
        let c = self.config;
        if c.max_concurrent == 0 {
            return Err(ConfigError("max_concurrent must be at least 1"));
        }
        if c.max_concurrent > MAX_PERMITS {
            return Err(ConfigError("max_concurrent is too large"));
        }
        Ok(c)
    }
}

/// Why a bulkhead configuration is invalid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(&'static str);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for ConfigError {}

/// A bulkhead. Cloning is cheap and every clone shares the same permits.
#[derive(Clone)]
pub struct Bulkhead {
    shared: Arc<Shared>,
}

struct Shared {
    name: std::sync::Arc<str>,
    semaphore: Semaphore,
    max_queue: AtomicUsize,
    max_wait_nanos: AtomicU64,
    rejected: AtomicU64,
    listeners: Listeners,
}

/// What a bulkhead reports about itself.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Metrics {
    /// The current limit.
    pub max_concurrent: usize,
    /// Permits held now.
    pub active: usize,
    /// Calls waiting now.
    pub queued: usize,
    /// Calls rejected since creation.
    pub rejected: u64,
}

impl Bulkhead {
    /// A bulkhead named `name` (a validated configuration cannot fail).
    pub fn new(name: impl Into<std::sync::Arc<str>>, config: Config) -> Self {
        let shared = Shared {
            name: name.into(),
            semaphore: Semaphore::new(config.max_concurrent),
            max_queue: AtomicUsize::new(config.max_queue),
            max_wait_nanos: AtomicU64::new(clock::as_nanos(config.max_wait)),
            rejected: AtomicU64::new(0),
            listeners: config.listeners,
        };
        Bulkhead { shared: Arc::new(shared) }
    }

    /// The bulkhead's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Takes a permit, waiting in the queue if the configuration allows.
    pub async fn acquire(&self) -> Result<Permit<'_>, BulkheadFull> {
        self.shared.acquire().await?;
        Ok(Permit { shared: &self.shared })
    }

    /// Like [`acquire`](Self::acquire), with a permit that owns a handle to the bulkhead.
    pub async fn acquire_owned(&self) -> Result<OwnedPermit, BulkheadFull> {
        self.shared.acquire().await?;
        Ok(OwnedPermit { shared: self.shared.clone() })
    }

    /// Like [`try_acquire`](Self::try_acquire), with a permit that owns a handle to the bulkhead.
    pub fn try_acquire_owned(&self) -> Result<OwnedPermit, BulkheadFull> {
        if self.shared.semaphore.try_acquire() {
            Ok(OwnedPermit { shared: self.shared.clone() })
        } else {
            Err(self.shared.reject(false))
        }
    }

    /// Like [`acquire_blocking`](Self::acquire_blocking), with a permit that owns a handle to the bulkhead.
    pub fn acquire_blocking_owned(&self) -> Result<OwnedPermit, BulkheadFull> {
        self.shared.acquire_blocking()?;
        Ok(OwnedPermit { shared: self.shared.clone() })
    }

    /// Takes a permit if one is free, or joins the queue (as the configuration allows) and returns the place in it,
    /// for callers that wait on their own event loop: poll the [`Queued`] with a waker of that loop, and when its
    /// [`max_wait`](Queued::max_wait) runs out, [`leave`](Queued::leave) it. Async Rust callers use
    /// [`acquire`](Self::acquire), which does exactly this with tokio's timer.
    pub fn acquire_or_queue(&self) -> Result<Admission, BulkheadFull> {
        if self.shared.semaphore.try_acquire() {
            return Ok(Admission::Acquired(OwnedPermit { shared: self.shared.clone() }));
        }
        match self.shared.join_queue()? {
            None => Ok(Admission::Acquired(OwnedPermit { shared: self.shared.clone() })),
            Some((slot, max_wait)) => {
                Ok(Admission::Queued(Queued { shared: self.shared.clone(), slot: Some(slot), max_wait }))
            }
        }
    }

    /// Takes a permit only if one is free now.
    pub fn try_acquire(&self) -> Result<Permit<'_>, BulkheadFull> {
        if self.shared.semaphore.try_acquire() {
            Ok(Permit { shared: &self.shared })
        } else {
            Err(self.shared.reject(false))
        }
    }

    /// Takes a permit, blocking the current thread in the queue if the configuration allows. For threads that
    /// are not running an async runtime.
    pub fn acquire_blocking(&self) -> Result<Permit<'_>, BulkheadFull> {
        self.shared.acquire_blocking()?;
        Ok(Permit { shared: &self.shared })
    }

    /// Runs `f` holding a permit.
    pub async fn call<T, E, F, Fut>(&self, f: F) -> Result<T, crate::Error<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let _permit = self.acquire().await?;
        f().await.map_err(crate::Error::Inner)
    }

    /// Changes the limit of concurrent calls, live.
    pub fn set_max_concurrent(&self, max_concurrent: usize) -> Result<(), ConfigError> {
        if max_concurrent == 0 || max_concurrent > MAX_PERMITS {
            return Err(ConfigError("max_concurrent must be at least 1"));
        }
        self.shared.semaphore.resize(max_concurrent);
        Ok(())
    }

    /// Changes the queue, live. Calls already waiting keep their place.
    pub fn set_queue(&self, max_queue: usize, max_wait: Duration) {
        self.shared.max_queue.store(max_queue, Ordering::Release);
        self.shared.max_wait_nanos.store(clock::as_nanos(max_wait), Ordering::Release);
    }

    /// What the bulkhead knows now.
    pub fn metrics(&self) -> Metrics {
        let s = &self.shared.semaphore;
        Metrics {
            max_concurrent: s.limit(),
            active: s.in_use(),
            queued: s.queued(),
            rejected: self.shared.rejected.load(Ordering::Relaxed),
        }
    }
}

impl Shared {
    #[inline]
    async fn acquire(&self) -> Result<(), BulkheadFull> {
        if self.semaphore.try_acquire() {
            return Ok(());
        }
        self.acquire_slow().await
    }

    /// No permit was free: join the queue if the configuration allows. `Ok(None)`: a permit was taken after all.
    fn join_queue(&self) -> Result<Option<(Arc<Slot>, Duration)>, BulkheadFull> {
        let (max_queue, max_wait) = self.queue_limits();
        if max_queue == 0 || max_wait.is_zero() {
            return Err(self.reject(false));
        }
        match self.semaphore.enqueue(max_queue) {
            Ok(Enqueued::Acquired) => Ok(None),
            Ok(Enqueued::Waiting(slot)) => Ok(Some((slot, max_wait))),
            Err(_) => Err(self.reject(false)),
        }
    }

    async fn acquire_slow(&self) -> Result<(), BulkheadFull> {
        let Some((slot, max_wait)) = self.join_queue()? else { return Ok(()) };
        let wait = Wait { semaphore: &self.semaphore, slot: Some(slot) };
        match tokio::time::timeout(max_wait, wait).await {
            Ok(()) => Ok(()),
            Err(_) => Err(self.reject(true)),
        }
    }

    fn acquire_blocking(&self) -> Result<(), BulkheadFull> {
        if self.semaphore.try_acquire() {
            return Ok(());
        }
        let Some((slot, max_wait)) = self.join_queue()? else { return Ok(()) };
        slot.register_thread();
        let deadline = clock::now() + max_wait;
        while !slot.is_granted() {
            let now = clock::now();
            if now >= deadline {
                if self.semaphore.dequeue(&slot) {
                    return Ok(());
                }
                return Err(self.reject(true));
            }
            std::thread::park_timeout(deadline - now);
        }
        Ok(())
    }

    fn queue_limits(&self) -> (usize, Duration) {
        (self.max_queue.load(Ordering::Acquire), Duration::from_nanos(self.max_wait_nanos.load(Ordering::Acquire)))
    }

    #[cold]
    fn reject(&self, waited: bool) -> BulkheadFull {
        self.rejected.fetch_add(1, Ordering::Relaxed);
        self.listeners.emit(Event::BulkheadRejected { name: &self.name, waited });
        BulkheadFull { waited }
    }
}

impl fmt::Debug for Bulkhead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bulkhead").field("name", &self.shared.name).field("metrics", &self.metrics()).finish()
    }
}

/// A bulkhead permit; returned when dropped.
#[must_use = "the permit is returned as soon as it is dropped"]
pub struct Permit<'a> {
    shared: &'a Shared,
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        self.shared.semaphore.release();
    }
}

impl fmt::Debug for Permit<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("bulkhead::Permit")
    }
}

/// A bulkhead permit that owns a handle to its bulkhead; returned when dropped.
#[must_use = "the permit is returned as soon as it is dropped"]
pub struct OwnedPermit {
    shared: Arc<Shared>,
}

impl Drop for OwnedPermit {
    fn drop(&mut self) {
        self.shared.semaphore.release();
    }
}

impl fmt::Debug for OwnedPermit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("bulkhead::OwnedPermit")
    }
}

/// A permit taken at once, or a place in the queue (see [`Bulkhead::acquire_or_queue`]).
#[derive(Debug)]
pub enum Admission {
    /// A permit was free.
    Acquired(OwnedPermit),
    /// The caller waits in the queue, at most [`Queued::max_wait`].
    Queued(Queued),
}

/// A place in a bulkhead's queue. It resolves to a permit when the permits ahead of it are returned; dropped
/// before that, it leaves the queue (passing on any permit granted meanwhile), so no permit is ever lost to a
/// caller that gave up.
pub struct Queued {
    shared: Arc<Shared>,
    slot: Option<Arc<Slot>>,
    max_wait: Duration,
}

impl Queued {
    /// The longest this caller may wait, from when it joined the queue.
    pub fn max_wait(&self) -> Duration {
        self.max_wait
    }

    /// The wait ran out: leaves the queue with the permit if it was granted meanwhile, or the rejection (counted
    /// and reported to the listeners as a timed-out wait).
    pub fn leave(mut self) -> Result<OwnedPermit, BulkheadFull> {
        let slot = self.slot.take().expect("a queued place is left once");
        if self.shared.semaphore.dequeue(&slot) {
            Ok(OwnedPermit { shared: self.shared.clone() })
        } else {
            Err(self.shared.reject(true))
        }
    }
}

impl Future for Queued {
    type Output = OwnedPermit;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<OwnedPermit> {
        let Some(slot) = &self.slot else { panic!("`Queued` polled after it resolved") };
        match slot.poll_granted(cx) {
            std::task::Poll::Ready(()) => {
                self.slot = None;
                std::task::Poll::Ready(OwnedPermit { shared: self.shared.clone() })
            }
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take()
            && self.shared.semaphore.dequeue(&slot)
        {
            self.shared.semaphore.release();
        }
    }
}

impl fmt::Debug for Queued {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("bulkhead::Queued").field("max_wait", &self.max_wait).finish()
    }
}
