//! Metrics: RED per route, and what every policy did, in Prometheus / OpenMetrics form (prometheus-client).
//!
//! Label values are bounded: routes, listeners and upstreams by their configured names, outcomes by the taxonomy.
//! Per-route handles are resolved once, when the config is loaded (a counter handle shares its value with its
//! family), so a request increments a counter it already holds. Policy events (breaker transitions, retries,
//! rejections) reach the metrics through an event listener: the policies know nothing about metrics.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `envelope_requests_total` | counter | `listener`, `route`, `method` (the standard nine, or `other`), `outcome`, `code` (status class) |
//! | `envelope_request_duration_seconds` | histogram (5 ms … 10 s), with `trace_id` exemplars in OpenMetrics | `route` |
//! | `envelope_requests_in_flight` | gauge | `listener` |
//! | `envelope_unmatched_requests_total` | counter | `listener` |
//! | `envelope_headers_dropped_total` | counter | `listener` (request headers with `_` in their names, dropped) |
//! | `envelope_access_log_dropped_total` | counter | (access-log lines dropped: standard output too slow) |
//! | `envelope_upstream_attempts_total` | counter | `route`, `upstream` |
//! | `envelope_upstream_attempt_duration_seconds` | histogram (the request buckets) | `upstream` (each attempt, to the head of its answer or its failure) |
//! | `envelope_breaker_state` | gauge (1 = current) | `upstream`, `state` |
//! | `envelope_breaker_transitions_total` | counter | `upstream`, `from`, `to` |
//! | `envelope_breaker_rejections_total` | counter | `upstream` |
//! | `envelope_retries_total` | counter | `route`, `outcome` (of the attempt retried) |
//! | `envelope_retries_given_up_total` | counter | `route`, `reason` |
//! | `envelope_bulkhead_rejections_total` | counter | `upstream`, `waited` |
//! | `envelope_rate_limited_total` | counter | `upstream`, `shadow` |
//! | `envelope_shed_total` | counter | `listener`, `priority` |
//! | `envelope_timeouts_total` | counter | `route` |
//! | `envelope_config_reloads_total` | counter | `result` (`ok`, `rejected`) |
//! | `envelope_slo_error_budget_remaining` | gauge | `route` |
//! | `envelope_slo_burn_rate` | gauge | `route`, `window` (5m, 30m, 1h, 6h, 3d, 30d) |
//! | `envelope_slo_slow_requests_total` | counter | `route`, `under` (a latency objective's threshold, seconds) |
//! | `envelope_slo_latency_budget_remaining` | gauge | `route`, `objective` (`p95_300ms`) |
//! | `envelope_business_events_total` | counter | `counter` (the `[[counter]]` name) |
//! | `envelope_concurrency_limit` | gauge | `listener` (the shedder's limit now: fixed, or the adaptive one) |
//! | `envelope_concurrency_baseline_latency_seconds` | gauge | `listener` (adaptive: the latency the limit aims near) |
//! | `envelope_concurrency_sampled_latency_seconds` | gauge | `listener` (adaptive: the last window's mean latency) |
//! | `envelope_bulkhead_in_flight` | gauge | `upstream` (calls holding a permit now) |
//! | `envelope_bulkhead_queued` | gauge | `upstream` (calls waiting in the queue now) |
//! | `envelope_bulkhead_limit` | gauge | `upstream` |
//! | `envelope_hedges_total` | counter | `route` (extra attempts a hedge started) |
//! | `envelope_fallbacks_total` | counter | `route`, `reason` (a route's fallback answered) |
//! | `envelope_fallback_failures_total` | counter | `route`, `reason` (the fallback upstream failed too) |
//! | `envelope_shared_state_up` | gauge (1: synced with the fleet, 0: deciding alone) | (only with `[shared]`) |
//! | `envelope_shared_state_degradations_total` | counter | (times the shared store became unreachable) |
//!
//! The same events also go to the history's tallies (`crate::observe::history`), which keep per-minute rollups.

use std::sync::Arc;

use envelope_core::Outcome;
use envelope_core::circuit_breaker::State;
use envelope_core::event::{Event, Listeners};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::exemplar::HistogramWithExemplars;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use envelope_http::observe::DURATION_BUCKETS;
use envelope_http::trace::TraceContext;
use tokio::time::Instant;

use crate::config::{FallbackReason, SloSpec};
use crate::observe::history::tally::{BUCKETS, RouteTally, Tallies, UpstreamEvent, UpstreamTally, bucket_of};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    listener: String,
    route: String,
    method: &'static str,
    outcome: &'static str,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RetryLabels {
    route: String,
    /// The outcome of the attempt that is retried.
    outcome: &'static str,
}

/// The `method` label's values: the standard methods, and `other` for any extension method, so that a client
/// cannot make new series by inventing methods.
pub(crate) const METHODS: [&str; 10] =
    ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE", "other"];

/// The index of `method` in [`METHODS`].
fn method_index(method: &http::Method) -> usize {
    METHODS[..9].iter().position(|m| *m == method.as_str()).unwrap_or(9)
}

/// One method's request counters, by outcome then status class (0: none/local, 1..=5: 1xx..5xx).
type MethodSeries = [[std::sync::OnceLock<Counter>; 6]; Outcome::ALL.len()];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabel {
    listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabel {
    upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SlowLabels {
    route: String,
    /// The latency objective's threshold, in seconds.
    under: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ObjectiveLabels {
    route: String,
    /// The latency objective, such as `p95_300ms`.
    objective: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FallbackLabels {
    route: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AttemptLabels {
    route: String,
    upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    upstream: String,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransitionLabels {
    upstream: String,
    from: &'static str,
    to: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GiveUpLabels {
    route: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BulkheadLabels {
    upstream: String,
    waited: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RateLabels {
    upstream: String,
    shadow: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ShedLabels {
    listener: String,
    priority: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BurnLabels {
    route: String,
    window: &'static str,
}

/// The exemplar of a duration observation: the trace it belongs to.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TraceLabel {
    trace_id: TraceId,
}

/// A trace id, written as 32 lowercase hex digits only when the exposition is encoded (no string per request).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct TraceId(u128);

impl prometheus_client::encoding::EncodeLabelValue for TraceId {
    fn encode(&self, encoder: &mut prometheus_client::encoding::LabelValueEncoder) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        write!(encoder, "{:032x}", self.0)
    }
}

/// A bucket's exemplar is replaced at most this often: scrapes are seconds apart, so a newer one per request would
/// only cost.
const EXEMPLAR_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CounterLabel {
    counter: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadLabels {
    result: &'static str,
}

/// Every metric family of the sidecar.
#[derive(Debug)]
pub(crate) struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    duration: Family<RouteLabel, HistogramWithExemplars<TraceLabel>>,
    in_flight: Family<ListenerLabel, Gauge>,
    unmatched: Family<ListenerLabel, Counter>,
    headers_dropped: Family<ListenerLabel, Counter>,
    attempts: Family<AttemptLabels, Counter>,
    attempt_duration: Family<UpstreamLabel, Histogram>,
    breaker_state: Family<StateLabels, Gauge>,
    breaker_transitions: Family<TransitionLabels, Counter>,
    breaker_rejections: Family<UpstreamLabel, Counter>,
    retries: Family<RetryLabels, Counter>,
    retries_given_up: Family<GiveUpLabels, Counter>,
    bulkhead_rejections: Family<BulkheadLabels, Counter>,
    rate_limited: Family<RateLabels, Counter>,
    shed: Family<ShedLabels, Counter>,
    timeouts: Family<RouteLabel, Counter>,
    reloads: Family<ReloadLabels, Counter>,
    slo_budget: Family<RouteLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    slo_burn: Family<BurnLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    business: Family<CounterLabel, Counter>,
    shared_up: Gauge,
    shared_degradations: Counter,
    concurrency_limit: Family<ListenerLabel, Gauge>,
    baseline_latency: Family<ListenerLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    sampled_latency: Family<ListenerLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    bulkhead_in_flight: Family<UpstreamLabel, Gauge>,
    bulkhead_queued: Family<UpstreamLabel, Gauge>,
    bulkhead_limit: Family<UpstreamLabel, Gauge>,
    fallbacks: Family<FallbackLabels, Counter>,
    slo_slow: Family<SlowLabels, Counter>,
    slo_latency_budget: Family<ObjectiveLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    hedges: Family<RouteLabel, Counter>,
    fallback_failures: Family<FallbackLabels, Counter>,
    /// What the history will roll up at its next flush.
    pub(crate) tallies: Arc<Tallies>,
    /// The latest breaker transitions, newest last (at most [`RECENT_EVENTS`]).
    recent: std::sync::Mutex<std::collections::VecDeque<Transition>>,
}

/// How many breaker transitions `/api/v1/events` remembers.
pub(crate) const RECENT_EVENTS: usize = 256;

/// A breaker transition, as `/api/v1/events` lists it.
#[derive(Debug, Clone)]
pub(crate) struct Transition {
    pub(crate) at: std::time::SystemTime,
    pub(crate) upstream: String,
    pub(crate) from: State,
    pub(crate) to: State,
}

/// A route's metric handles, resolved at config load.
#[derive(Debug, Clone)]
pub(crate) struct RouteMetrics {
    /// Indexed by method ([`METHODS`]), then outcome, then status class; a method's table made with its first
    /// request and each series the first time it counts, so that `/metrics` lists only what happened and an idle
    /// route costs a pointer per method.
    requests: Arc<[std::sync::OnceLock<Box<MethodSeries>>; METHODS.len()]>,
    /// The family and the labels the series are made with.
    request_family: Family<RequestLabels, Counter>,
    listener: Arc<str>,
    route: Arc<str>,
    /// The route's duration histogram, made with its first request (13 series a route otherwise, before any
    /// traffic).
    duration: Arc<std::sync::OnceLock<HistogramWithExemplars<TraceLabel>>>,
    duration_family: Family<RouteLabel, HistogramWithExemplars<TraceLabel>>,
    /// Per duration bucket (and one above them), when its exemplar may next be replaced: milliseconds since
    /// `epoch`.
    exemplar_due: Arc<[std::sync::atomic::AtomicU64; BUCKETS]>,
    epoch: Instant,
    /// The route's attempts to its upstream.
    pub(crate) to_upstream: AttemptMetrics,
    tally: Arc<RouteTally>,
    /// Per latency objective: its threshold in seconds, and its slow-request counter (made when it first counts).
    slow: Arc<[(f64, std::sync::OnceLock<Counter>)]>,
    slow_family: Family<SlowLabels, Counter>,
}

/// A route's attempts to one upstream: counted, and timed to the answer's head (or the failure).
#[derive(Debug, Clone)]
pub(crate) struct AttemptMetrics {
    attempts: Counter,
    duration: Histogram,
    tally: Arc<UpstreamTally>,
}

/// A route's fallback's counters, by reason, each series made the first time it counts.
#[derive(Debug, Clone)]
pub(crate) struct FallbackMetrics {
    used: Arc<[std::sync::OnceLock<Counter>; FallbackReason::ALL.len()]>,
    failed: Arc<[std::sync::OnceLock<Counter>; FallbackReason::ALL.len()]>,
    used_family: Family<FallbackLabels, Counter>,
    failed_family: Family<FallbackLabels, Counter>,
    route: Arc<str>,
}

impl FallbackMetrics {
    /// The fallback answered for `reason`.
    pub(crate) fn used(&self, reason: FallbackReason) {
        self.count(&self.used, &self.used_family, reason);
    }

    /// The fallback (another upstream) failed too, for a request that fell back for `reason`.
    pub(crate) fn failed(&self, reason: FallbackReason) {
        self.count(&self.failed, &self.failed_family, reason);
    }

    fn count(
        &self,
        series: &[std::sync::OnceLock<Counter>; FallbackReason::ALL.len()],
        family: &Family<FallbackLabels, Counter>,
        reason: FallbackReason,
    ) {
        series[reason as usize]
            .get_or_init(|| {
                family.get_or_create(&FallbackLabels { route: self.route.to_string(), reason: reason.as_str() }).clone()
            })
            .inc();
    }
}

/// A business counter's handles.
#[derive(Debug, Clone)]
pub(crate) struct BusinessMetrics {
    counter: Counter,
    tally: Arc<std::sync::atomic::AtomicU64>,
}

impl BusinessMetrics {
    pub(crate) fn inc(&self) {
        self.counter.inc();
        self.tally.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A listener's metric handles.
#[derive(Debug, Clone)]
pub(crate) struct ListenerMetrics {
    pub(crate) in_flight: Gauge,
    pub(crate) unmatched: Counter,
    pub(crate) headers_dropped: Counter,
}

const CODES: [&str; 6] = ["none", "1xx", "2xx", "3xx", "4xx", "5xx"];

impl Metrics {
    /// The metrics; `shared`: the sidecar runs in distributed mode (`[shared]`), which has metrics of its own.
    pub(crate) fn new(shared: bool) -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("envelope");
        let m = Metrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(|| HistogramWithExemplars::new(DURATION_BUCKETS.into_iter())),
            in_flight: Family::default(),
            unmatched: Family::default(),
            headers_dropped: Family::default(),
            attempts: Family::default(),
            attempt_duration: Family::new_with_constructor(|| Histogram::new(DURATION_BUCKETS)),
            breaker_state: Family::default(),
            breaker_transitions: Family::default(),
            breaker_rejections: Family::default(),
            retries: Family::default(),
            retries_given_up: Family::default(),
            bulkhead_rejections: Family::default(),
            rate_limited: Family::default(),
            shed: Family::default(),
            timeouts: Family::default(),
            reloads: Family::default(),
            slo_budget: Family::default(),
            slo_burn: Family::default(),
            business: Family::default(),
            shared_up: Gauge::default(),
            shared_degradations: Counter::default(),
            concurrency_limit: Family::default(),
            baseline_latency: Family::default(),
            sampled_latency: Family::default(),
            bulkhead_in_flight: Family::default(),
            bulkhead_queued: Family::default(),
            bulkhead_limit: Family::default(),
            fallbacks: Family::default(),
            slo_slow: Family::default(),
            slo_latency_budget: Family::default(),
            hedges: Family::default(),
            fallback_failures: Family::default(),
            tallies: Arc::default(),
            recent: Default::default(),
            registry: Registry::default(),
        };
        registry.register("requests", "Requests answered, by route, outcome and status class", m.requests.clone());
        registry.register("request_duration_seconds", "Time to answer a request", m.duration.clone());
        registry.register("requests_in_flight", "Requests being handled", m.in_flight.clone());
        registry.register("unmatched_requests", "Requests that matched no route (404)", m.unmatched.clone());
        registry.register(
            "access_log_dropped",
            "Access-log lines dropped because standard output did not keep up",
            crate::observe::access_log::dropped(),
        );
        registry.register(
            "headers_dropped",
            "Request headers dropped before forwarding (names with an underscore)",
            m.headers_dropped.clone(),
        );
        registry.register(
            "upstream_attempts",
            "Attempts sent to an upstream (first tries and retries)",
            m.attempts.clone(),
        );
        registry.register(
            "upstream_attempt_duration_seconds",
            "Time of each attempt to an upstream, to its answer's head",
            m.attempt_duration.clone(),
        );
        registry.register("breaker_state", "Circuit breaker state (1 for the current state)", m.breaker_state.clone());
        registry.register("breaker_transitions", "Circuit breaker state changes", m.breaker_transitions.clone());
        registry.register(
            "breaker_rejections",
            "Calls rejected by an open circuit breaker",
            m.breaker_rejections.clone(),
        );
        registry.register("retries", "Retries scheduled", m.retries.clone());
        registry.register("retries_given_up", "Calls whose retries stopped, by reason", m.retries_given_up.clone());
        registry.register("bulkhead_rejections", "Calls rejected by a full bulkhead", m.bulkhead_rejections.clone());
        registry.register("rate_limited", "Calls over a local rate limit", m.rate_limited.clone());
        registry.register("shed", "Requests shed by a listener, by priority", m.shed.clone());
        registry.register("timeouts", "Deadlines and attempt timeouts that fired", m.timeouts.clone());
        registry.register("config_reloads", "Config reloads, by result", m.reloads.clone());
        registry.register(
            "slo_error_budget_remaining",
            "Share of the availability error budget left over 30 days",
            m.slo_budget.clone(),
        );
        registry.register("slo_burn_rate", "Availability burn rate per window", m.slo_burn.clone());
        registry.register(
            "slo_slow_requests",
            "Requests slower than a latency objective's threshold (`under`, seconds)",
            m.slo_slow.clone(),
        );
        registry.register(
            "slo_latency_budget_remaining",
            "Share of a latency objective's budget left over 30 days",
            m.slo_latency_budget.clone(),
        );
        registry.register("business_events", "Requests counted by a business counter", m.business.clone());
        registry.register("concurrency_limit", "A listener's concurrency limit now", m.concurrency_limit.clone());
        registry.register(
            "concurrency_baseline_latency_seconds",
            "An adaptive limit's baseline latency (the lowest recent window's mean)",
            m.baseline_latency.clone(),
        );
        registry.register(
            "concurrency_sampled_latency_seconds",
            "An adaptive limit's mean latency in its last window",
            m.sampled_latency.clone(),
        );
        registry.register("bulkhead_in_flight", "Calls holding a bulkhead permit now", m.bulkhead_in_flight.clone());
        registry.register("bulkhead_queued", "Calls waiting in a bulkhead's queue now", m.bulkhead_queued.clone());
        registry.register("bulkhead_limit", "A bulkhead's limit of calls in flight", m.bulkhead_limit.clone());
        registry.register("fallbacks", "Requests a route's fallback answered, by reason", m.fallbacks.clone());
        registry.register("hedges", "Extra attempts a route's hedge started", m.hedges.clone());
        registry.register(
            "fallback_failures",
            "Fallbacks to another upstream that failed too (the client got the original error), by reason",
            m.fallback_failures.clone(),
        );
        if shared {
            registry.register(
                "shared_state_up",
                "Whether shared breakers follow the fleet (1) or decide alone (0)",
                m.shared_up.clone(),
            );
            registry.register(
                "shared_state_degradations",
                "Times the shared store became unreachable",
                m.shared_degradations.clone(),
            );
        }
        Arc::new(Metrics { registry, ..m })
    }

    /// A route's handles; `thresholds`: its latency objectives'.
    pub(crate) fn route(
        &self,
        listener: &str,
        route: &str,
        upstream: &str,
        thresholds: &[std::time::Duration],
    ) -> RouteMetrics {
        RouteMetrics {
            requests: Arc::default(),
            request_family: self.requests.clone(),
            listener: listener.into(),
            route: route.into(),
            duration: Arc::default(),
            duration_family: self.duration.clone(),
            exemplar_due: Arc::default(),
            epoch: Instant::now(),
            to_upstream: self.attempts(route, upstream),
            tally: self.tallies.route(route),
            slow: thresholds.iter().map(|t| (t.as_secs_f64(), std::sync::OnceLock::new())).collect(),
            slow_family: self.slo_slow.clone(),
        }
    }

    /// The handles of route `route`'s attempts to `upstream`.
    pub(crate) fn attempts(&self, route: &str, upstream: &str) -> AttemptMetrics {
        AttemptMetrics {
            attempts: self
                .attempts
                .get_or_create(&AttemptLabels { route: route.to_owned(), upstream: upstream.to_owned() })
                .clone(),
            duration: self.attempt_duration.get_or_create(&UpstreamLabel { upstream: upstream.to_owned() }).clone(),
            tally: self.tallies.upstream(upstream),
        }
    }

    /// The handles of route `route`'s fallback.
    pub(crate) fn fallback(&self, route: &str) -> FallbackMetrics {
        FallbackMetrics {
            used: Arc::default(),
            failed: Arc::default(),
            used_family: self.fallbacks.clone(),
            failed_family: self.fallback_failures.clone(),
            route: route.into(),
        }
    }

    pub(crate) fn business(&self, name: &str) -> BusinessMetrics {
        BusinessMetrics {
            counter: self.business.get_or_create(&CounterLabel { counter: name.to_owned() }).clone(),
            tally: self.tallies.counter(name),
        }
    }

    pub(crate) fn listener(&self, listener: &str) -> ListenerMetrics {
        let label = ListenerLabel { listener: listener.to_owned() };
        ListenerMetrics {
            in_flight: self.in_flight.get_or_create(&label).clone(),
            unmatched: self.unmatched.get_or_create(&label).clone(),
            headers_dropped: self.headers_dropped.get_or_create(&label).clone(),
        }
    }

    /// Sets the state gauge of a breaker (1 for `state`, 0 for the others).
    pub(crate) fn breaker_state(&self, upstream: &str, state: State) {
        for s in State::ALL {
            let labels = StateLabels { upstream: upstream.to_owned(), state: s.as_str() };
            self.breaker_state.get_or_create(&labels).set(i64::from(s == state));
        }
    }

    /// Publishes a route's SLO state (called on each scrape).
    pub(crate) fn slo(&self, route: &str, report: &envelope_core::slo::Report) {
        self.slo_budget.get_or_create(&RouteLabel { route: route.to_owned() }).set(report.budget_remaining);
        for l in &report.latencies {
            let labels = ObjectiveLabels { route: route.to_owned(), objective: SloSpec::latency_name(&l.objective) };
            self.slo_latency_budget.get_or_create(&labels).set(l.budget_remaining);
        }
        for (window, rate) in ["5m", "30m", "1h", "6h", "3d", "30d"].into_iter().zip(report.burn_rates) {
            self.slo_burn.get_or_create(&BurnLabels { route: route.to_owned(), window }).set(rate);
        }
    }

    /// A listener's shedder as it is now (set at each scrape).
    pub(crate) fn concurrency(&self, listener: &str, m: &envelope_core::shed::Metrics) {
        let label = ListenerLabel { listener: listener.to_owned() };
        self.concurrency_limit.get_or_create(&label).set(m.limit as i64);
        if let Some(b) = m.baseline_latency {
            self.baseline_latency.get_or_create(&label).set(b.as_secs_f64());
        }
        if let Some(s) = m.sampled_latency {
            self.sampled_latency.get_or_create(&label).set(s.as_secs_f64());
        }
    }

    /// An upstream's bulkhead as it is now (set at each scrape).
    pub(crate) fn bulkhead(&self, upstream: &str, m: &envelope_core::bulkhead::Metrics) {
        let label = UpstreamLabel { upstream: upstream.to_owned() };
        self.bulkhead_in_flight.get_or_create(&label).set(m.active as i64);
        self.bulkhead_queued.get_or_create(&label).set(m.queued as i64);
        self.bulkhead_limit.get_or_create(&label).set(m.max_concurrent as i64);
    }

    /// The latest breaker transitions, oldest first.
    pub(crate) fn recent_transitions(&self) -> Vec<Transition> {
        self.recent.lock().unwrap_or_else(std::sync::PoisonError::into_inner).iter().cloned().collect()
    }

    /// Counts a config reload.
    pub(crate) fn reload(&self, ok: bool) {
        self.reloads.get_or_create(&ReloadLabels { result: if ok { "ok" } else { "rejected" } }).inc();
    }

    /// An event listener that turns policy events into metrics.
    pub(crate) fn listener_for_events(self: &Arc<Self>) -> Listeners {
        let m = Arc::downgrade(self);
        Listeners::new().with(move |e: &Event<'_>| {
            if let Some(m) = m.upgrade() {
                m.on_event(e);
            }
        })
    }

    fn on_event(&self, e: &Event<'_>) {
        match *e {
            Event::StateTransition { name, from, to } => {
                let labels = TransitionLabels { upstream: name.to_owned(), from: from.as_str(), to: to.as_str() };
                self.breaker_transitions.get_or_create(&labels).inc();
                self.breaker_state(name, to);
                let event = match to {
                    State::Open | State::ForcedOpen => Some(UpstreamEvent::Opened),
                    State::HalfOpen => Some(UpstreamEvent::HalfOpened),
                    State::Closed => Some(UpstreamEvent::Closed),
                    _ => None,
                };
                if let Some(event) = event {
                    self.tallies.upstream(name).count(event);
                }
                let mut recent = self.recent.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                if recent.len() == RECENT_EVENTS {
                    recent.pop_front();
                }
                let at = std::time::SystemTime::now();
                recent.push_back(Transition { at, upstream: name.to_owned(), from, to });
            }
            Event::CallNotPermitted { name, .. } => {
                self.breaker_rejections.get_or_create(&UpstreamLabel { upstream: name.to_owned() }).inc();
                self.tallies.upstream(name).count(UpstreamEvent::BreakerRejection);
            }
            Event::RetryScheduled { name, outcome, .. } => {
                self.retries.get_or_create(&RetryLabels { route: name.to_owned(), outcome: outcome.as_str() }).inc();
            }
            Event::RetryGaveUp { name, reason, .. } => {
                let reason = reason.as_str();
                self.retries_given_up.get_or_create(&GiveUpLabels { route: name.to_owned(), reason }).inc();
            }
            Event::BulkheadRejected { name, waited } => {
                let labels =
                    BulkheadLabels { upstream: name.to_owned(), waited: if waited { "true" } else { "false" } };
                self.bulkhead_rejections.get_or_create(&labels).inc();
                self.tallies.upstream(name).count(UpstreamEvent::BulkheadRejection);
            }
            Event::RateLimited { name, shadow } => {
                let labels = RateLabels { upstream: name.to_owned(), shadow: if shadow { "true" } else { "false" } };
                self.rate_limited.get_or_create(&labels).inc();
                if !shadow {
                    self.tallies.upstream(name).count(UpstreamEvent::RateLimited);
                }
            }
            Event::Shed { name, priority, .. } => {
                let labels = ShedLabels { listener: name.to_owned(), priority: priority.as_str() };
                self.shed.get_or_create(&labels).inc();
            }
            Event::TimedOut { name, .. } => {
                self.timeouts.get_or_create(&RouteLabel { route: name.to_owned() }).inc();
            }
            Event::HedgeLaunched { name, .. } => {
                self.hedges.get_or_create(&RouteLabel { route: name.to_owned() }).inc();
            }
            Event::FleetTransition { name, from, to, instance } => {
                let by = if instance.is_empty() { "the fleet's first state" } else { instance };
                eprintln!("envelope: shared breaker `{name}`: {from} -> {to} (decided by {by})");
            }
            Event::SharedStateDegraded { store, error } => {
                self.shared_up.set(0);
                self.shared_degradations.inc();
                eprintln!(
                    "envelope: shared state at {store} unreachable ({error}); shared breakers decide alone until it is back"
                );
            }
            Event::SharedStateRestored { store, after } => {
                self.shared_up.set(1);
                eprintln!(
                    "envelope: shared state at {store} reachable again after {after:.1?}; shared breakers follow the fleet"
                );
            }
            _ => {}
        }
    }

    /// The OpenMetrics text exposition.
    pub(crate) fn encode_openmetrics(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub(crate) fn encode_prometheus(&self) -> String {
        openmetrics_to_prometheus(&self.encode_openmetrics())
    }
}

/// Rewrites an OpenMetrics exposition as Prometheus text 0.0.4: a counter family is named with its `_total` suffix
/// in `HELP` and `TYPE` (as its samples are), and the OpenMetrics-only `UNIT` and `EOF` lines and exemplars are
/// dropped.
pub(crate) fn openmetrics_to_prometheus(text: &str) -> String {
    let counters: std::collections::HashSet<&str> =
        text.lines().filter_map(|l| l.strip_prefix("# TYPE ")).filter_map(|l| l.strip_suffix(" counter")).collect();
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters.contains(name).then(|| format!("{prefix}{name}_total {tail}"))
        });
        let line = renamed.as_deref().unwrap_or(line);
        // An exemplar follows a sample after ` # ` (label values cannot hold it unescaped: `#` is fine, but the
        // exposition puts exemplars after the value, so the last ` # {` starts one).
        let line = match line.rfind(" # {") {
            Some(i) if !line.starts_with('#') => &line[..i],
            _ => line,
        };
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// An answered request, as the metrics count it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Served<'a> {
    pub(crate) method: &'a http::Method,
    pub(crate) outcome: Outcome,
    pub(crate) status: u16,
    /// Its latency.
    pub(crate) seconds: f64,
    /// The attempts made for it.
    pub(crate) attempts: u32,
}

impl RouteMetrics {
    /// Counts one answered request; a sampled trace becomes the exemplar of its duration bucket.
    /// `now` is when the request ended (the clock is read once per request, by the caller).
    pub(crate) fn record(&self, served: &Served<'_>, now: Instant, trace: &TraceContext) {
        let Served { method, outcome, status, seconds, attempts } = *served;
        let class =
            if (100..600).contains(&status) && outcome != Outcome::ClientCancelled { status as usize / 100 } else { 0 };
        let m = method_index(method);
        let series = self.requests[m].get_or_init(|| Box::new(std::array::from_fn(|_| Default::default())));
        let counter = series[outcome as usize][class].get_or_init(|| {
            let labels = RequestLabels {
                listener: self.listener.to_string(),
                route: self.route.to_string(),
                method: METHODS[m],
                outcome: outcome.as_str(),
                code: CODES[class],
            };
            self.request_family.get_or_create(&labels).clone()
        });
        counter.inc();
        let exemplar = (trace.flags & 1 == 1 && self.exemplar_due(seconds, now))
            .then_some(TraceLabel { trace_id: TraceId(trace.trace_id) });
        let duration = self
            .duration
            .get_or_init(|| self.duration_family.get_or_create(&RouteLabel { route: self.route.to_string() }).clone());
        duration.observe(seconds, exemplar, None);
        self.tally.record(outcome, seconds, attempts);
        // Slow for a latency objective: as the route's SLO counts it (every answered request, over its threshold).
        if outcome != Outcome::ClientCancelled {
            for (threshold, counter) in self.slow.iter().filter(|(t, _)| seconds > *t) {
                counter
                    .get_or_init(|| {
                        let labels = SlowLabels { route: self.route.to_string(), under: threshold.to_string() };
                        self.slow_family.get_or_create(&labels).clone()
                    })
                    .inc();
            }
        }
    }

    /// Whether the bucket of `seconds` should take a new exemplar at `now` (and if so, not again for a while).
    fn exemplar_due(&self, seconds: f64, now: Instant) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let now = now.saturating_duration_since(self.epoch).as_millis() as u64;
        let due = &self.exemplar_due[bucket_of(seconds)];
        let at = due.load(Relaxed);
        now >= at && due.compare_exchange(at, now + EXEMPLAR_EVERY.as_millis() as u64, Relaxed, Relaxed).is_ok()
    }
}

impl AttemptMetrics {
    /// Counts one attempt sent upstream.
    pub(crate) fn attempt(&self) {
        self.attempts.inc();
        self.tally.count(UpstreamEvent::Attempt);
    }

    /// An attempt to the upstream ended (its answer's head came, or it failed) after `elapsed`.
    pub(crate) fn attempt_done(&self, elapsed: std::time::Duration) {
        self.duration.observe(elapsed.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::openmetrics_to_prometheus;

    #[test]
    fn a_bucket_takes_a_new_exemplar_at_most_once_a_second() {
        let m = super::Metrics::new(false);
        let r = m.route("l", "r", "u", &[]);
        let now = tokio::time::Instant::now();
        assert!(r.exemplar_due(0.001, now), "the first observation of a bucket");
        assert!(!r.exemplar_due(0.002, now), "same bucket, same second");
        assert!(r.exemplar_due(0.3, now), "another bucket");
        assert!(r.exemplar_due(60.0, now), "above every bound");
        assert!(!r.exemplar_due(60.0, now));
        assert!(r.exemplar_due(0.002, now + super::EXEMPLAR_EVERY), "a second later");
    }

    #[test]
    fn counters_are_named_with_total_and_openmetrics_lines_dropped() {
        let om = "# HELP envelope_requests Requests.\n# TYPE envelope_requests counter\nenvelope_requests_total{route=\"a\"} 3\nenvelope_d_bucket{le=\"0.005\"} 1 # {trace_id=\"ab\"} 0.001\n# HELP envelope_in_flight In flight.\n# TYPE envelope_in_flight gauge\nenvelope_in_flight 1\n# UNIT envelope_x seconds\n# EOF\n";
        let text = openmetrics_to_prometheus(om);
        assert_eq!(
            text,
            "# HELP envelope_requests_total Requests.\n# TYPE envelope_requests_total counter\nenvelope_requests_total{route=\"a\"} 3\nenvelope_d_bucket{le=\"0.005\"} 1\n# HELP envelope_in_flight In flight.\n# TYPE envelope_in_flight gauge\nenvelope_in_flight 1\n"
        );
    }
}
