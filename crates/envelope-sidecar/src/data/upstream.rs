//! Upstreams at run time: endpoints picked round-robin with passive health, their connections (`outbound`), and
//! the policies shared by every route to the upstream (breaker, bulkhead, rate limit, injected faults).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use envelope_core::Outcome;
use envelope_core::bulkhead::Bulkhead;
use envelope_core::circuit_breaker::CircuitBreaker;
use envelope_core::distributed::{GlobalLimiter, LimitStore};
use envelope_core::event::Listeners;
use envelope_core::fault::{Fault, FaultInjector};
use envelope_core::rate_limit::RateLimiter;

use crate::config::{Endpoint, Scope, Upstream};
use crate::data::outbound::Outbound;

/// Consecutive connection failures after which an endpoint is taken out of rotation.
pub(crate) const EJECT_AFTER_FAILURES: u32 = 3;
/// How long an ejected endpoint stays out of rotation before it is tried again.
pub(crate) const EJECT_FOR: Duration = Duration::from_secs(10);

/// Passive health of one endpoint: consecutive connection failures, and until when it is out of rotation.
#[derive(Debug, Default)]
pub(crate) struct EndpointHealth {
    failures: AtomicU32,
    /// Nanoseconds since the upstream's epoch; 0 when in rotation.
    ejected_until: AtomicU64,
}

/// What distributed mode gives the upstreams: the store shared rate limits live in, and its health.
#[derive(Clone)]
pub(crate) struct SharedLinks {
    pub(crate) limits: Arc<dyn LimitStore>,
    /// The store's breaker, shared with the fleet's syncs.
    pub(crate) health: CircuitBreaker,
    pub(crate) op_timeout: Duration,
}

/// An upstream, ready to take requests.
pub(crate) struct UpstreamRt {
    pub(crate) spec: Upstream,
    next: AtomicUsize,
    epoch: Instant,
    pub(crate) health: Vec<EndpointHealth>,
    /// The connections to its endpoints.
    pub(crate) outbound: Outbound,
    pub(crate) breaker: Option<CircuitBreaker>,
    pub(crate) bulkhead: Option<Bulkhead>,
    pub(crate) rate_limit: Option<RateLimiter>,
    /// The fleet's rate limit (`scope = "global"`), whose local fallback is `rate_limit`.
    pub(crate) global_limit: Option<GlobalLimiter>,
    /// Faults injected into every attempt to this upstream (set through the admin API, always with an expiry).
    pub(crate) faults: FaultInjector,
    /// The status an injected abort answers with (the fault's outcome stands for it inside the envelope).
    pub(crate) fault_status: AtomicU16,
}

/// A fault to inject into an upstream's attempts, as the admin API and quality scenarios give it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct FaultSpec {
    /// Answer this status (400–599) instead of calling the upstream, for `abort_percent` of attempts.
    pub(crate) abort_status: Option<u16>,
    pub(crate) abort_percent: f64,
    /// Add this latency before `delay_percent` of attempts.
    pub(crate) delay: Option<Duration>,
    pub(crate) delay_percent: f64,
    /// How long the fault lasts (it always ends by itself).
    pub(crate) duration: Duration,
}

/// The longest a fault may last.
pub(crate) const MAX_FAULT_DURATION: Duration = Duration::from_secs(3600);

impl FaultSpec {
    /// Checks the ranges, naming the field at fault.
    pub(crate) fn validate(&self) -> Result<(), String> {
        if let Some(s) = self.abort_status
            && !(400..=599).contains(&s)
        {
            return Err(format!("abort_status {s} must be in 400..=599"));
        }
        for (name, p) in [("abort_percent", self.abort_percent), ("delay_percent", self.delay_percent)] {
            if !(0.0..=100.0).contains(&p) {
                return Err(format!("{name} {p} must be in [0, 100]"));
            }
        }
        if self.duration.is_zero() || self.duration > MAX_FAULT_DURATION {
            return Err(format!("duration must be more than 0 and at most {}s", MAX_FAULT_DURATION.as_secs()));
        }
        Ok(())
    }

    /// The outcome an aborted attempt stands for: what the policies would see from a real answer of that status.
    fn outcome(status: u16) -> Outcome {
        match status {
            429 => Outcome::RateLimited,
            500..=599 => Outcome::Upstream5xx,
            _ => Outcome::Upstream4xx,
        }
    }
}

impl UpstreamRt {
    pub(crate) fn new(spec: &Upstream, listeners: &Listeners, shared: Option<&SharedLinks>) -> Arc<Self> {
        // Built from the configs validated when the file was loaded: nothing here can fail.
        let breaker = spec.breaker.as_ref().map(|b| {
            let state = b.initial_state();
            let config = b.config.clone().with_listeners(listeners.clone());
            if b.shared {
                // Admits by itself as any breaker; the fleet (`control::shared`) makes its transitions the fleet's.
                CircuitBreaker::linked(spec.name.clone(), config, state)
            } else {
                CircuitBreaker::with_state(spec.name.clone(), config, state)
            }
        });
        let bulkhead = spec
            .bulkhead
            .as_ref()
            .map(|c| Bulkhead::new(spec.name.clone(), c.clone().with_listeners(listeners.clone())));
        // A global limit without the store (which `check` refuses) would be each instance's own.
        let global_limit = match (&spec.rate_limit, spec.rate_limit_scope, shared) {
            (Some(c), Scope::Global, Some(links)) => Some(
                GlobalLimiter::new(
                    spec.name.clone(),
                    spec.name.clone(),
                    c.clone().with_listeners(listeners.clone()),
                    links.limits.clone(),
                    links.health.clone(),
                    links.op_timeout,
                )
                .with_lease(spec.rate_limit_lease),
            ),
            _ => None,
        };
        let rate_limit = match &global_limit {
            Some(global) => Some(global.local().clone()),
            None => spec
                .rate_limit
                .as_ref()
                .map(|c| RateLimiter::new(spec.name.clone(), c.clone().with_listeners(listeners.clone()))),
        };
        Arc::new(UpstreamRt {
            spec: spec.clone(),
            next: AtomicUsize::new(0),
            epoch: Instant::now(),
            health: spec.endpoints.iter().map(|_| EndpointHealth::default()).collect(),
            outbound: Outbound::new(spec),
            breaker,
            bulkhead,
            rate_limit,
            global_limit,
            faults: FaultInjector::with_listeners(spec.name.clone(), listeners.clone()),
            fault_status: AtomicU16::new(503),
        })
    }

    /// Adds the upstream's own admission policies (breaker, rate limit, bulkhead) to an envelope of a route to it.
    pub(crate) fn admission(&self, mut b: envelope_core::compose::Builder) -> envelope_core::compose::Builder {
        if let Some(breaker) = &self.breaker {
            b = b.circuit_breaker(breaker.clone());
        }
        if let Some(global) = &self.global_limit {
            b = b.shared_rate_limit(global.clone());
        } else if let Some(limiter) = &self.rate_limit {
            b = b.rate_limiter(limiter.clone());
        }
        if let Some(bulkhead) = &self.bulkhead {
            b = b.bulkhead(bulkhead.clone());
        }
        b
    }

    /// Injects `fault` into every attempt from now until its duration has passed.
    pub(crate) fn inject(&self, fault: &FaultSpec) -> Result<(), String> {
        fault.validate()?;
        let mut f = match fault.abort_status {
            Some(status) => {
                self.fault_status.store(status, Ordering::Relaxed);
                Fault::abort(FaultSpec::outcome(status), fault.abort_percent)
            }
            None => Fault::delay(Duration::ZERO, 0.0),
        };
        if let Some(delay) = fault.delay {
            f = f.with_delay(delay, fault.delay_percent);
        }
        self.faults.set(f, Some(Instant::now() + fault.duration)).map_err(|e| e.to_string())
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX).max(1)
    }

    /// The next endpoint in rotation, round-robin, skipping ejected endpoints (unless all are ejected).
    pub(crate) fn pick(&self) -> (usize, &Endpoint) {
        let n = self.spec.endpoints.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let now = if n > 1 { self.now() } else { 0 };
        let i = (0..n)
            .map(|k| (start + k) % n)
            .find(|&i| n == 1 || self.health[i].ejected_until.load(Ordering::Relaxed) <= now)
            .unwrap_or(start % n);
        (i, &self.spec.endpoints[i])
    }

    /// Records whether a connection to endpoint `i` could be made.
    pub(crate) fn report(&self, i: usize, connected: bool) {
        let h = &self.health[i];
        if connected {
            if h.failures.load(Ordering::Relaxed) != 0 {
                h.failures.store(0, Ordering::Relaxed);
            }
            return;
        }
        if h.failures.fetch_add(1, Ordering::Relaxed) + 1 >= EJECT_AFTER_FAILURES {
            h.failures.store(0, Ordering::Relaxed);
            h.ejected_until.store(self.now() + EJECT_FOR.as_nanos() as u64, Ordering::Relaxed);
        }
    }

    /// Whether endpoint `i` is in rotation now.
    pub(crate) fn healthy(&self, i: usize) -> bool {
        self.health[i].ejected_until.load(Ordering::Relaxed) <= self.now()
    }
}

impl fmt::Debug for UpstreamRt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamRt").field("name", &self.spec.name).finish_non_exhaustive()
    }
}
