//! The configuration turned into live objects: per listener a shedder and a route table; per route an
//! [`Envelope`] composed from the route's own policies and its upstream's shared ones.

use std::fmt;
use std::sync::Arc;

use envelope_core::Envelope;
use envelope_core::distributed::GlobalKeyedLimiter;
use envelope_core::event::Listeners;
use envelope_core::hedge::Hedge;
use envelope_core::rate_limit::KeyedRateLimiter;
use envelope_core::retry::{Retry, RetryBudget};
use envelope_core::shed::{LoadShedder, Priority};
use envelope_http::classify::StatusClassifier;

use crate::config::{
    BusinessCounter, Config, Fallback, FallbackAnswer, HedgeDelay, HedgeSpec, KeyLimit, Route, Scope, Tier,
};
use crate::data::routes::{RouteTable, Routed};
use crate::data::upstream::{SharedLinks, UpstreamRt};
use crate::observe::metrics::{
    AttemptMetrics, BusinessMetrics, FallbackMetrics, ListenerMetrics, Metrics, RouteMetrics,
};
use crate::observe::telemetry::Spans;
use envelope_core::slo::Slo;

/// Everything a request needs, built once per config (and again on reload).
pub(crate) struct Runtime {
    pub(crate) config: Config,
    pub(crate) listeners: Vec<ListenerRt>,
    pub(crate) upstreams: Vec<Arc<UpstreamRt>>,
    /// Business counters and their metrics, in config order.
    pub(crate) counters: Vec<(BusinessCounter, BusinessMetrics)>,
    /// The span exporter, when tracing is configured (set up at start, kept across reloads).
    pub(crate) spans: Option<Arc<Spans>>,
}

pub(crate) struct ListenerRt {
    pub(crate) shedder: LoadShedder,
    pub(crate) metrics: ListenerMetrics,
    /// Routes of this listener, most specific first, indexed by prefix.
    pub(crate) routes: RouteTable<Arc<RouteRt>>,
}

pub(crate) struct RouteRt {
    pub(crate) spec: Route,
    pub(crate) envelope: Envelope,
    /// The same policies with the route's hedge, for the requests that may be sent twice (the others go through
    /// `envelope`), if the route hedges.
    pub(crate) hedged: Option<Envelope>,
    pub(crate) classifier: StatusClassifier,
    pub(crate) upstream: Arc<UpstreamRt>,
    pub(crate) metrics: RouteMetrics,
    /// The route's SLO, from its tier. Kept across reloads while the route keeps its name and tier.
    pub(crate) slo: Arc<Slo>,
    /// The route's per-key rate limit, if it has one.
    pub(crate) key_limit: Option<KeyLimiter>,
    /// What answers when the upstream failed for a reason the route names, if anything.
    pub(crate) fallback: Option<FallbackRt>,
}

/// A route's fallback, live: the reasons it answers for, its answer, its counters.
pub(crate) struct FallbackRt {
    pub(crate) spec: Fallback,
    pub(crate) target: FallbackTarget,
    pub(crate) metrics: FallbackMetrics,
}

/// What a fallback answers with.
pub(crate) enum FallbackTarget {
    /// A fixed answer.
    Static { status: http::StatusCode, headers: http::HeaderMap, body: bytes::Bytes },
    /// Another upstream, through its own breaker, rate limit and bulkhead: one attempt, under the route's
    /// deadline and attempt timeout (no retry, no shedding: the request was already admitted or shed once).
    Upstream { upstream: Arc<UpstreamRt>, envelope: Envelope, attempts: AttemptMetrics },
}

impl FallbackRt {
    fn new(
        spec: &Route,
        fallback: &Fallback,
        upstreams: &[Arc<UpstreamRt>],
        events: &Listeners,
        metrics: &Metrics,
    ) -> Self {
        let target = match &fallback.answer {
            FallbackAnswer::Static { status, headers, body } => FallbackTarget::Static {
                status: *status,
                headers: headers.clone(),
                body: bytes::Bytes::copy_from_slice(body),
            },
            FallbackAnswer::Upstream(i) => {
                let upstream = upstreams[*i].clone();
                let mut b =
                    Envelope::builder().name(spec.name.clone()).deadline(spec.timeout).listeners(events.clone());
                b = upstream.admission(b);
                if let Some(t) = spec.attempt_timeout {
                    b = b.attempt_timeout(t);
                }
                let attempts = metrics.attempts(&spec.name, &upstream.spec.name);
                FallbackTarget::Upstream { envelope: b.fault(upstream.faults.clone()).build(), upstream, attempts }
            }
        };
        FallbackRt { spec: fallback.clone(), target, metrics: metrics.fallback(&spec.name) }
    }

    /// The upstream it falls back to, if it is one.
    pub(crate) fn upstream(&self) -> Option<&Arc<UpstreamRt>> {
        match &self.target {
            FallbackTarget::Upstream { upstream, .. } => Some(upstream),
            FallbackTarget::Static { .. } => None,
        }
    }
}

/// A route's per-key rate limit, live: each instance's own (bounded memory: idle keys evicted first, at most
/// `max_keys`), or the fleet's through the shared store (the instance's own deciding while the store cannot).
pub(crate) enum KeyLimiter {
    Local(KeyedRateLimiter<String>),
    Global(GlobalKeyedLimiter),
}

impl KeyLimiter {
    fn new(spec: &KeyLimit, name: &str, events: &Listeners, shared: Option<&SharedLinks>) -> KeyLimiter {
        let config = spec.config.clone().with_listeners(events.clone());
        match (spec.scope, shared) {
            (Scope::Global, Some(links)) => KeyLimiter::Global(GlobalKeyedLimiter::new(
                name.to_owned(),
                format!("route:{name}"),
                config,
                links.limits.clone(),
                links.health.clone(),
                links.op_timeout,
                spec.max_keys,
            )),
            _ => KeyLimiter::Local(KeyedRateLimiter::bounded(name.to_owned(), config, spec.max_keys)),
        }
    }

    /// Takes a turn for `key`.
    pub(crate) async fn acquire(&self, key: &str) -> Result<(), envelope_core::rate_limit::RateLimited> {
        match self {
            KeyLimiter::Local(l) => l.try_acquire(key),
            KeyLimiter::Global(g) => g.acquire(key).await,
        }
    }
}

impl Runtime {
    /// Builds the runtime for `config`. On a reload, `previous` is the runtime being replaced: an upstream whose
    /// settings did not change is kept as it is (breaker state and window, bulkhead, rate limit, connection
    /// pool), and so is a route whose settings and upstream did not change (its retry budget), and each listener's
    /// shedder.
    pub(crate) fn build(
        config: Config,
        metrics: &Arc<Metrics>,
        spans: Option<Arc<Spans>>,
        previous: Option<&Runtime>,
        shared: Option<&SharedLinks>,
    ) -> Runtime {
        let events = metrics.listener_for_events();
        let listeners_for_events = &events;
        let upstreams: Vec<_> = config
            .upstreams
            .iter()
            .map(|u| match previous.and_then(|p| p.upstreams.iter().find(|old| old.spec == *u)) {
                Some(kept) => kept.clone(),
                None => UpstreamRt::new(u, listeners_for_events, shared),
            })
            .collect();
        for u in &upstreams {
            if let Some(b) = &u.breaker {
                metrics.breaker_state(&u.spec.name, b.state());
            }
        }
        let listeners = config
            .listeners
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let kept = previous.and_then(|p| {
                    let same = p.config.listeners.get(i) == Some(l);
                    same.then(|| p.listeners[i].shedder.clone())
                });
                let shedder = kept.unwrap_or_else(|| {
                    LoadShedder::new(l.name.clone(), l.shedding.clone().with_listeners(listeners_for_events.clone()))
                });
                let mut routes: Vec<Arc<RouteRt>> = config
                    .routes
                    .iter()
                    .filter(|r| r.listener == i)
                    .map(|r| {
                        let upstream = &upstreams[r.upstream];
                        let fallback_upstream = match r.fallback.as_ref().map(|f| &f.answer) {
                            Some(FallbackAnswer::Upstream(u)) => Some(&upstreams[*u]),
                            _ => None,
                        };
                        let unchanged = previous.and_then(|p| {
                            p.listeners.get(i)?.routes.iter().find(|old| {
                                old.spec == *r
                                    && Arc::ptr_eq(&old.upstream, upstream)
                                    && old.fallback.as_ref().and_then(FallbackRt::upstream).map(Arc::as_ptr)
                                        == fallback_upstream.map(Arc::as_ptr)
                                    && p.config.listeners.get(i) == Some(l)
                            })
                        });
                        match unchanged {
                            Some(kept) => kept.clone(),
                            None => {
                                let thresholds: Vec<_> = r.slo.latencies.iter().map(|l| l.threshold).collect();
                                let route_metrics = metrics.route(&l.name, &r.name, &upstream.spec.name, &thresholds);
                                // The SLO history survives a change of the route's other settings.
                                let slo = previous
                                    .and_then(|p| p.route_named(&r.name))
                                    .filter(|old| old.spec.slo == r.slo)
                                    .map(|old| old.slo.clone())
                                    .unwrap_or_else(|| {
                                        Arc::new(
                                            Slo::with_objectives(r.slo.availability, &r.slo.latencies)
                                                .expect("the config checked the objectives"),
                                        )
                                    });
                                let fallback = r
                                    .fallback
                                    .as_ref()
                                    .map(|f| FallbackRt::new(r, f, &upstreams, listeners_for_events, metrics));
                                Arc::new(RouteRt {
                                    fallback,
                                    ..RouteRt::new(
                                        r,
                                        &shedder,
                                        upstream,
                                        listeners_for_events,
                                        route_metrics,
                                        slo,
                                        shared,
                                    )
                                })
                            }
                        }
                    })
                    .collect();
                // Most specific first: templates before prefixes with the same literal start, longer literals first.
                routes.sort_by_key(|r| {
                    std::cmp::Reverse((r.spec.matcher.path_prefix.len(), r.spec.matcher.template.is_some()))
                });
                ListenerRt { shedder, metrics: metrics.listener(&l.name), routes: RouteTable::new(routes) }
            })
            .collect();
        let counters = config.counters.iter().map(|c| (c.clone(), metrics.business(&c.name))).collect();
        Runtime { config, listeners, upstreams, counters, spans }
    }
}

impl Routed for Arc<RouteRt> {
    fn matcher(&self) -> &crate::config::PathMatch {
        &self.spec.matcher
    }
}

impl RouteRt {
    fn new(
        spec: &Route,
        shedder: &LoadShedder,
        upstream: &Arc<UpstreamRt>,
        events: &Listeners,
        metrics: RouteMetrics,
        slo: Arc<Slo>,
        shared: Option<&SharedLinks>,
    ) -> RouteRt {
        // One retry (and its budget) for both envelopes.
        let retry =
            spec.retry.as_ref().map(|c| Retry::new(spec.name.clone(), c.clone().with_listeners(events.clone())));
        let envelope = |hedge: Option<Hedge>| {
            let mut b = Envelope::builder()
                .name(spec.name.clone())
                .shed(shedder.clone(), priority(spec.tier))
                .deadline(spec.timeout)
                .listeners(events.clone());
            if let Some(retry) = &retry {
                b = b.retry(retry.clone());
            }
            if let Some(hedge) = hedge {
                b = b.hedge(hedge);
            }
            b = upstream.admission(b);
            if let Some(t) = spec.attempt_timeout {
                b = b.attempt_timeout(t);
            }
            b.fault(upstream.faults.clone()).build()
        };
        let hedged = spec.hedge.as_ref().map(|h| envelope(Some(hedge(spec, h, events))));
        RouteRt {
            spec: spec.clone(),
            envelope: envelope(None),
            hedged,
            classifier: StatusClassifier::new().fail_on(spec.fail_on_status.iter().copied()),
            upstream: upstream.clone(),
            metrics,
            slo,
            key_limit: spec.rate_limit.as_ref().map(|l| KeyLimiter::new(l, &spec.name, events, shared)),
            fallback: None,
        }
    }
}

/// A route's hedge: drawing its extra attempts from the route's retry budget (which the retry fills per call), or
/// from a budget of its own with the retry defaults when the route does not retry.
fn hedge(spec: &Route, h: &HedgeSpec, events: &Listeners) -> Hedge {
    let hedge = match h.delay {
        HedgeDelay::Fixed(d) => Hedge::new(spec.name.clone(), d, h.max_extra),
        HedgeDelay::Percentile(p) => Hedge::after_percentile(spec.name.clone(), p, h.max_extra)
            .expect("the config checked the percentile's range"),
    };
    let hedge = hedge.with_listeners(events.clone());
    match spec.retry.as_ref().and_then(|r| r.budget()) {
        Some(budget) => hedge.drawing_from(budget.clone()),
        None => hedge.with_budget(RetryBudget::default()),
    }
}

impl Runtime {
    /// The upstream named `name`.
    pub(crate) fn upstream_named(&self, name: &str) -> Option<&Arc<UpstreamRt>> {
        self.upstreams.iter().find(|u| u.spec.name == name)
    }

    /// The route named `name`, on any listener.
    pub(crate) fn route_named(&self, name: &str) -> Option<&Arc<RouteRt>> {
        self.listeners.iter().flat_map(|l| l.routes.iter()).find(|r| r.spec.name == name)
    }
}

/// The shedding priority of a tier: critical work is shed last.
pub(crate) fn priority(tier: Tier) -> Priority {
    match tier {
        Tier::Critical => Priority::Critical,
        Tier::Default => Priority::Default,
        Tier::NonCritical => Priority::NonCritical,
    }
}

impl fmt::Debug for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Runtime").field("routes", &self.config.routes.len()).finish_non_exhaustive()
    }
}
