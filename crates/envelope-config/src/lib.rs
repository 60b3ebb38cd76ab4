//! Envelope's config file in two stages: the file as written (`raw`) and the validated config the sidecar runs on
//! ([`Config`]), which the Python package reads too (`Envelope.from_config`), so that both accept exactly the same
//! files. Every error names the file, line, column and field path, and nothing is bound or started
//! before the whole config is valid.

pub(crate) mod raw;
mod units;

use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use envelope_core::{Outcome, OutcomeSet};
use http::{Method, StatusCode, Uri};
use toml::Spanned;

use self::raw::{
    BackoffKind, JitterKind, RawBreaker, RawConfig, RawFallback, RawHedge, RawKeyLimit, RawMatch, RawRetry, RawRoute,
    RawShared, RawSlo, RawUpstream,
};
pub use self::raw::{BreakerMode, Engine, Protocol, Scope, Tier, Underscores};
pub use self::units::{Dur, MAX_DURATION, NonZero, Percent, PositiveDur};

/// Default admin listener: loopback only.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9901";
/// Default environment variable holding the admin bearer token.
pub const DEFAULT_ADMIN_TOKEN_ENV: &str = "ENVELOPE_ADMIN_TOKEN";
/// Default in-flight requests per listener before load is shed (429).
pub const DEFAULT_MAX_CONCURRENT: u32 = 1000;
/// Default open connections per listener.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 10_000;
/// Default time a client has to send the request head (slowloris protection, 408).
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time an idle keep-alive client connection is kept open between requests.
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default limit on the request head size (431).
pub const DEFAULT_MAX_HEADER_BYTES: u32 = 16 * 1024;
/// Default limit on the number of request headers (431).
pub const DEFAULT_MAX_HEADERS: u32 = 100;
/// Default limit on the request target length (414).
pub const DEFAULT_MAX_URI_BYTES: u32 = 8 * 1024;
/// Default limit on a request body (413).
pub const DEFAULT_MAX_BODY_BYTES: u64 = 10 * 1024 * 1024;
/// Default time in-flight requests get to finish on shutdown.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Default time to establish an upstream connection.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Default time an idle pooled upstream connection is kept.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Default idle pooled connections kept per upstream endpoint.
pub const DEFAULT_MAX_IDLE_PER_ENDPOINT: usize = 64;
/// Default route timeout, covering every attempt and wait (Envoy's default).
pub const DEFAULT_ROUTE_TIMEOUT: Duration = Duration::from_secs(15);
/// Default cap on a request body buffered for retries.
pub const DEFAULT_REPLAY_LIMIT: usize = envelope_http::body::DEFAULT_REPLAY_LIMIT;

/// The largest `max_connections`.
pub const MAX_MAX_CONNECTIONS: u64 = 1_000_000;
/// The smallest and the largest `max_header_bytes` (hyper reads heads in a buffer of at least 8 KiB).
pub const HEADER_BYTES_RANGE: (u64, u64) = (8 * 1024, 1024 * 1024);
/// The largest `max_headers`.
pub const MAX_MAX_HEADERS: u64 = 1000;
/// The largest `max_uri_bytes`.
pub const MAX_MAX_URI_BYTES: u64 = 1024 * 1024;
/// The largest `max_body_bytes`: 1 TiB.
pub const MAX_MAX_BODY_BYTES: u64 = 1 << 40;
/// The largest `replay_limit`: 64 MiB (each buffered request holds this much memory at most).
pub const MAX_REPLAY_LIMIT: u64 = 64 * 1024 * 1024;

/// A configuration error, located in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file (as given).
    pub file: String,
    /// 1-based line, 0 if unknown.
    pub line: usize,
    /// 1-based column, 0 if unknown.
    pub column: usize,
    /// The field path, such as `route[1].retry.max_attempts`.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file, self.line, self.column)?;
        if !self.field.is_empty() {
            write!(f, "`{}`: ", self.field)?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The admin listener.
    pub admin: Admin,
    /// Listeners, in file order.
    pub listeners: Vec<Listener>,
    /// Upstreams, in file order.
    pub upstreams: Vec<Upstream>,
    /// Routes, in file order (matched longest prefix first).
    pub routes: Vec<Route>,
    /// The metrics history.
    pub history: History,
    /// Business counters, in file order.
    pub counters: Vec<BusinessCounter>,
    /// Quality scenarios, in file order.
    pub scenarios: Vec<Scenario>,
    /// Span export, if configured.
    pub tracing: Option<Tracing>,
    /// Distributed mode: the store shared breakers sync through (`[shared]`), if configured.
    pub shared: Option<Shared>,
    /// Where the generated alerts' runbook links point (`[alerts]`).
    pub alerts: Alerts,
}

/// Default base of the generated alerts' runbook links: the runbook in this repository, relative.
pub const DEFAULT_RUNBOOK_BASE_URL: &str = "docs/runbook.md";

/// The generated alerts (`[alerts]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alerts {
    /// The runbook every alert links into (`<base>#<alert, lower case>`): an absolute URL where operators read it.
    pub runbook_base_url: String,
    /// The burn-rate windows of the generated rules divided by this (1: as named). For drills and tests only: at
    /// 60, the 1 h window is a minute and the 5 m one five seconds, so a page fires and clears in seconds.
    pub window_scale: u32,
}

/// The largest `[alerts] window_scale`: the 5 m window becomes a second.
pub const MAX_WINDOW_SCALE: u64 = 300;

/// Default key prefix in the shared store.
pub const DEFAULT_KEY_PREFIX: &str = "envelope:";
/// Default time one operation on the shared store may take.
pub const DEFAULT_SHARED_OP_TIMEOUT: Duration = Duration::from_millis(50);
/// Default time between two syncs with the shared store.
pub const DEFAULT_SYNC_INTERVAL: Duration = Duration::from_millis(200);

/// Distributed mode (`[shared]`): where the breakers marked `shared = true` share their state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shared {
    /// The Redis address: `redis://[user:password@]host[:port][/db]` (or `rediss://` for TLS).
    pub redis: String,
    /// Prefix of every key the sidecar writes.
    pub key_prefix: String,
    /// Time one store operation may take before it counts as failed.
    pub op_timeout: Duration,
    /// Time between two syncs.
    pub sync_interval: Duration,
    /// This instance's name in the fleet (default: the host name and process id, made at start).
    pub instance: Option<String>,
    /// For `rediss://`: the PEM certificates the server's is checked against instead of the system's roots.
    pub ca_pem: Option<Vec<u8>>,
    /// `redis` is a node of a Redis Cluster (the others are discovered from it).
    pub cluster: bool,
    /// `redis` is a Sentinel, and this the name of the master it watches.
    pub sentinel: Option<String>,
}

/// Default `service.name` of exported spans.
pub const DEFAULT_SERVICE_NAME: &str = "envelope";
/// Default interval between two span exports.
pub const DEFAULT_EXPORT_INTERVAL: Duration = Duration::from_secs(5);

/// Span export over OTLP/HTTP (`[tracing]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Tracing {
    /// The collector's traces URL, e.g. `http://127.0.0.1:4318/v1/traces`.
    pub otlp_endpoint: String,
    /// The `service.name` resource attribute.
    pub service_name: String,
    /// How often batches are exported.
    pub export_interval: Duration,
}

/// Default load of a scenario: requests per second.
pub const DEFAULT_SCENARIO_RATE: u32 = 20;
/// Default load of a scenario: how long.
pub const DEFAULT_SCENARIO_DURATION: Duration = Duration::from_secs(10);
/// Default window over which live traffic is evaluated against a scenario's response measures.
pub const DEFAULT_SCENARIO_WINDOW: Duration = Duration::from_secs(300);

/// A quality scenario (`[[scenario]]`): a stimulus and the response measures the envelope promises under it.
#[derive(Debug, Clone, PartialEq)]
pub struct Scenario {
    /// Its name.
    pub name: String,
    /// The route the load goes to (by name).
    pub route: String,
    /// Method of the requests `envelope verify` sends.
    pub method: Method,
    /// Path (and query) of those requests.
    pub path: String,
    /// Requests per second `envelope verify` sends.
    pub rate: u32,
    /// For how long.
    pub duration: Duration,
    /// At most this many requests in flight (the load is bounded).
    pub concurrency: u32,
    /// The stimulus: a fault injected into an upstream for the duration of the load.
    pub fault: Option<ScenarioFault>,
    /// The response measures.
    pub expect: Expect,
    /// Live traffic is evaluated over this window.
    pub window: Duration,
}

/// A scenario's fault.
#[derive(Debug, Clone, PartialEq)]
pub struct ScenarioFault {
    /// The upstream whose attempts are faulted.
    pub upstream: String,
    /// Abort with this status.
    pub abort_status: Option<u16>,
    /// Share of attempts aborted, percent (`None`: all of them, when `abort_status` is given; the sidecar's fault
    /// API applies that default).
    pub abort_percent: Option<f64>,
    /// Added latency.
    pub delay: Option<Duration>,
    /// Share of attempts delayed, percent (`None`: all of them, when `delay` is given).
    pub delay_percent: Option<f64>,
}

/// Response measures: every one given must hold.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Expect {
    /// At least this share of requests served (not 5xx, not 429), percent.
    pub success_rate: Option<f64>,
    /// The 99th percentile of all latencies below this.
    pub p99: Option<Duration>,
    /// The 99th percentile of locally rejected requests (open breaker, full bulkhead, shed, rate limited) below
    /// this.
    pub fast_fail_p99: Option<Duration>,
    /// Business counters that must not grow by more than this during the scenario.
    pub counters: Vec<(String, u64)>,
}

/// Default file of the metrics history, next to the config file.
pub const DEFAULT_HISTORY_PATH: &str = "envelope-history.db";
/// Default retention of the metrics history.
pub const DEFAULT_HISTORY_RETENTION: Duration = Duration::from_secs(30 * 86_400);
/// Default interval between two writes of the metrics history.
pub const DEFAULT_HISTORY_FLUSH_INTERVAL: Duration = Duration::from_secs(10);

/// The metrics history (`[history]`).
#[derive(Debug, Clone, PartialEq)]
pub struct History {
    /// The SQLite file; `None` keeps the history in memory (`path = ":memory:"`).
    pub path: Option<std::path::PathBuf>,
    /// How long rows are kept.
    pub retention: Duration,
    /// How often counts are written (a crash loses at most this much).
    pub flush_interval: Duration,
}

/// A business counter (`[[counter]]`): requests with given attributes, e.g. "orders" = `POST /orders` answered 2xx.
#[derive(Debug, Clone, PartialEq)]
pub struct BusinessCounter {
    /// Its name (the `counter` label, and the history's key).
    pub name: String,
    /// Only requests of the route of this name.
    pub route: Option<String>,
    /// Request path and methods; `None` matches every request.
    pub matcher: Option<PathMatch>,
    /// Inclusive status ranges of the answer that count (default: 200–299).
    pub statuses: Vec<(u16, u16)>,
}

/// A path prefix or template, and methods.
#[derive(Debug, Clone, PartialEq)]
pub struct PathMatch {
    /// The path prefix (for a template: its literal start).
    pub path_prefix: String,
    /// The path template, if the match is by template.
    pub template: Option<Vec<Segment>>,
    /// Methods matched (`None`: all).
    pub methods: Option<Vec<Method>>,
}

impl PathMatch {
    /// Whether a request for `path` with `method` matches: a template matches whole segments, a prefix matches
    /// at a segment boundary (`/api` takes `/api` and `/api/x`, not `/apix`).
    pub fn matches(&self, path: &str, method: &Method) -> bool {
        let path_ok = match &self.template {
            Some(template) => template_matches(template, path),
            None => {
                let prefix = self.path_prefix.as_str();
                let next = path.as_bytes().get(prefix.len());
                path.starts_with(prefix)
                    && (prefix.ends_with('/') || next.is_none() || next == Some(&b'/') || next == Some(&b'?'))
            }
        };
        path_ok && self.methods.as_ref().is_none_or(|m| m.contains(method))
    }
}

impl BusinessCounter {
    /// Whether an answered request counts.
    pub fn counts(&self, route: Option<&str>, path: &str, method: &Method, status: u16) -> bool {
        self.route.as_deref().is_none_or(|r| route == Some(r))
            && self.matcher.as_ref().is_none_or(|m| m.matches(path, method))
            && self.statuses.iter().any(|(lo, hi)| (*lo..=*hi).contains(&status))
    }
}

/// The admin listener.
#[derive(Debug, Clone, PartialEq)]
pub struct Admin {
    /// Where it listens.
    pub listen: SocketAddr,
    /// Environment variable holding the bearer token for state-changing calls.
    pub token_env: String,
    /// Names a request's `Host` may carry besides loopback ones (lower case, without a port).
    pub allowed_hosts: Vec<String>,
}

/// A listener.
#[derive(Debug, Clone, PartialEq)]
pub struct Listener {
    /// Its name.
    pub name: String,
    /// Where it listens.
    pub listen: SocketAddr,
    /// How it sheds load.
    pub shedding: envelope_core::shed::Config,
    /// Open connections allowed.
    pub max_connections: usize,
    /// Time to receive a request head, from its first byte (and a new connection's first byte).
    pub header_read_timeout: Duration,
    /// Time a keep-alive connection may sit idle between requests.
    pub keepalive_timeout: Duration,
    /// What serves HTTP/1 connections.
    pub engine: Engine,
    /// What happens to request headers with `_` in their names.
    pub underscores_in_headers: Underscores,
    /// Largest request head.
    pub max_header_bytes: usize,
    /// Most request headers.
    pub max_headers: usize,
    /// Longest request target.
    pub max_uri_bytes: usize,
    /// Largest request body.
    pub max_body_bytes: u64,
    /// Time in-flight requests get on shutdown.
    pub drain_timeout: Duration,
    /// Whether each request writes a JSON access-log line to standard output.
    pub access_log: bool,
}

/// An upstream endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `http` or `https`.
    pub scheme: http::uri::Scheme,
    /// Host and port.
    pub authority: http::uri::Authority,
    /// The `Host` header sent to it (the authority, made once).
    pub host: http::HeaderValue,
    /// Where to connect: host and port (the scheme's default port when the endpoint names none).
    pub connect_to: String,
}

/// Circuit breaker of an upstream: the engine's validated configuration, and its mode.
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerSpec {
    /// The breaker's settings (from `envelope_core`'s defaults, with what the file sets).
    pub config: envelope_core::circuit_breaker::Config,
    /// Normal, disabled or metrics-only.
    pub mode: BreakerMode,
    /// Shared with every instance through `[shared]` (distributed mode).
    pub shared: bool,
}

impl BreakerSpec {
    /// The state the breaker starts in: closed, or the mode's operator state.
    pub fn initial_state(&self) -> envelope_core::circuit_breaker::State {
        use envelope_core::circuit_breaker::State;
        match self.mode {
            BreakerMode::Normal => State::Closed,
            BreakerMode::Disabled => State::Disabled,
            BreakerMode::MetricsOnly => State::MetricsOnly,
        }
    }
}

/// An upstream.
#[derive(Debug, Clone, PartialEq)]
pub struct Upstream {
    /// Its name.
    pub name: String,
    /// Endpoints, used round-robin.
    pub endpoints: Vec<Endpoint>,
    /// Time to connect.
    pub connect_timeout: Duration,
    /// Idle pooled connections are closed after this.
    pub idle_timeout: Duration,
    /// Idle pooled connections kept per endpoint.
    pub max_idle_per_endpoint: usize,
    /// Extra trusted root certificates (PEM, DER-encoded) for https endpoints, besides the Mozilla roots.
    pub extra_roots: Vec<Vec<u8>>,
    /// Bulkhead, if any (validated).
    pub bulkhead: Option<envelope_core::bulkhead::Config>,
    /// Circuit breaker, if any.
    pub breaker: Option<BreakerSpec>,
    /// Rate limit, if any (validated).
    pub rate_limit: Option<envelope_core::rate_limit::Config>,
    /// Whose limit the rate limit is: this instance's, or the fleet's (`scope = "global"`, through `[shared]`).
    pub rate_limit_scope: Scope,
    /// A global limit's lease: calls taken from the store at once (1: every call asks the store).
    pub rate_limit_lease: u32,
    /// The HTTP version spoken to it.
    pub protocol: Protocol,
}

/// One segment of a path template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// Exactly this text.
    Literal(String),
    /// Any one non-empty segment.
    Any,
    /// The rest of the path (last segment only).
    Rest,
}

/// Parses a path template such as `/users/{id}/orders` or `/files/{*path}`.
pub fn parse_template(template: &str) -> Result<Vec<Segment>, String> {
    let Some(rest) = template.strip_prefix('/') else { return Err("must start with `/`".to_owned()) };
    let parts: Vec<&str> = rest.split('/').collect();
    let mut out = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        let seg = match part.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
            Some(name) if name.starts_with('*') && i + 1 == parts.len() && name.len() > 1 => Segment::Rest,
            Some(name) if name.starts_with('*') => return Err("`{*name}` must be the last segment".to_owned()),
            Some(name) if !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') => {
                Segment::Any
            }
            Some(_) => return Err(format!("`{part}` is not a valid parameter")),
            None if part.contains('{') || part.contains('}') => {
                return Err(format!("`{part}`: a parameter must be a whole segment"));
            }
            None => Segment::Literal((*part).to_owned()),
        };
        out.push(seg);
    }
    Ok(out)
}

/// Whether `path` matches `template`.
pub fn template_matches(template: &[Segment], path: &str) -> bool {
    let Some(rest) = path.strip_prefix('/') else { return false };
    let mut parts = rest.split('/');
    for seg in template {
        match seg {
            Segment::Rest => return true,
            Segment::Any => match parts.next() {
                Some(p) if !p.is_empty() => {}
                _ => return false,
            },
            Segment::Literal(l) => {
                if parts.next() != Some(l.as_str()) {
                    return false;
                }
            }
        }
    }
    parts.next().is_none()
}

/// A route.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// Its name (a metrics label).
    pub name: String,
    /// Index of its listener.
    pub listener: usize,
    /// Path prefix or template (segments, `{name}` for any one segment, a last `{*name}` for the rest of the
    /// path), and methods.
    pub matcher: PathMatch,
    /// Whether the prefix is removed before forwarding.
    pub strip_prefix: bool,
    /// Index of its upstream.
    pub upstream: usize,
    /// Every request the route matches may be sent twice, whatever its method: retried after any retryable
    /// failure, hedged and answered by the fallback as a GET is (a search by POST, a read-only gRPC method).
    pub idempotent: bool,
    /// SLO tier (and shedding priority).
    pub tier: Tier,
    /// Total time for the request, every attempt and wait included (504).
    pub timeout: Duration,
    /// Time for one attempt.
    pub attempt_timeout: Option<Duration>,
    /// Retries, if any.
    pub retry: Option<envelope_core::retry::Config>,
    /// 4xx statuses counted as failures.
    pub fail_on_status: Vec<StatusCode>,
    /// Largest body buffered for retries.
    pub replay_limit: usize,
    /// A rate limit on the route's requests, per key (one key for all when none is named).
    pub rate_limit: Option<KeyLimit>,
    /// What answers when the upstream failed for one of the reasons named, if anything.
    pub fallback: Option<Fallback>,
    /// Hedging of the route's idempotent requests, if any.
    pub hedge: Option<HedgeSpec>,
    /// The route's SLO: its tier's, with what the route's `slo` sets.
    pub slo: SloSpec,
}

/// A route's SLO: availability, and one or more latency objectives.
#[derive(Debug, Clone, PartialEq)]
pub struct SloSpec {
    /// Share of requests that must be served, in (0, 1).
    pub availability: f64,
    /// Latency objectives, in the order written (1 to 4).
    pub latencies: Vec<envelope_core::slo::LatencyObjective>,
}

impl SloSpec {
    /// A latency objective's name in labels and the API: `p95_300ms`, `p99.9_1500ms`.
    pub fn latency_name(l: &envelope_core::slo::LatencyObjective) -> String {
        let pct = (l.percentile * 1e6).round() / 1e4;
        let ms = l.threshold.as_secs_f64() * 1000.0;
        format!("p{pct}_{ms}ms")
    }

    /// The objectives of `tier`.
    pub fn of_tier(tier: Tier) -> SloSpec {
        use envelope_core::slo::{LatencyObjective, Objective};
        let o = match tier {
            Tier::Critical => Objective::CRITICAL,
            Tier::Default => Objective::DEFAULT,
            Tier::NonCritical => Objective::NON_CRITICAL,
        };
        let latency = LatencyObjective { threshold: o.latency_threshold, percentile: o.latency_percentile };
        SloSpec { availability: o.availability, latencies: vec![latency] }
    }
}

/// The most extra attempts a hedge may start.
pub const MAX_HEDGES: u64 = 5;

/// A route's hedging: when an extra attempt starts, and how many at most.
#[derive(Debug, Clone, PartialEq)]
pub struct HedgeSpec {
    /// When the next attempt starts while none has answered.
    pub delay: HedgeDelay,
    /// Extra attempts at most (1 to [`MAX_HEDGES`]).
    pub max_extra: u32,
}

/// When a hedge starts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum HedgeDelay {
    /// After this long.
    Fixed(Duration),
    /// After this percentile (strictly between 0 and 100) of the route's attempts' latencies.
    Percentile(f64),
}

/// Why a route's fallback answers: the primary upstream's failure, as the fallback's `on` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FallbackReason {
    /// The upstream's breaker is open (no attempt was made, or none could be made after the first).
    CircuitOpen,
    /// The upstream failed (5xx, connection error, reset) on its last attempt, with no retry left.
    RetriesExhausted,
    /// The route's deadline or the last attempt's timeout ran out.
    Timeout,
    /// The listener shed the request.
    Shed,
    /// The upstream's bulkhead was full.
    BulkheadFull,
    /// The upstream's own rate limit (this side's) was reached.
    RateLimited,
}

impl FallbackReason {
    /// Every reason.
    pub const ALL: [FallbackReason; 6] = [
        FallbackReason::CircuitOpen,
        FallbackReason::RetriesExhausted,
        FallbackReason::Timeout,
        FallbackReason::Shed,
        FallbackReason::BulkheadFull,
        FallbackReason::RateLimited,
    ];

    /// The name in the config, the response header, the metric label and the log.
    pub const fn as_str(self) -> &'static str {
        match self {
            FallbackReason::CircuitOpen => "circuit_open",
            FallbackReason::RetriesExhausted => "retries_exhausted",
            FallbackReason::Timeout => "timeout",
            FallbackReason::Shed => "shed",
            FallbackReason::BulkheadFull => "bulkhead_full",
            FallbackReason::RateLimited => "rate_limited",
        }
    }

    /// The reason a call that ended in `outcome` gives, if it is one a fallback may answer for. A 4xx of the
    /// upstream (429 included) is never one: the client's own mistake, or the upstream's word, is passed on.
    pub const fn of(outcome: Outcome) -> Option<FallbackReason> {
        match outcome {
            Outcome::CircuitOpen => Some(FallbackReason::CircuitOpen),
            Outcome::Failure | Outcome::ConnectError | Outcome::UpstreamReset | Outcome::Upstream5xx => {
                Some(FallbackReason::RetriesExhausted)
            }
            Outcome::Timeout => Some(FallbackReason::Timeout),
            Outcome::Shed => Some(FallbackReason::Shed),
            Outcome::BulkheadFull => Some(FallbackReason::BulkheadFull),
            Outcome::LocalRateLimited => Some(FallbackReason::RateLimited),
            // Ok, the upstream's 4xx and 429, the client's cancellation or bad request, a fallback's answer.
            _ => None,
        }
    }
}

/// A route's fallback: the reasons it answers for, and its answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Fallback {
    /// The reasons, as a bit set over [`FallbackReason`] (bit = its position in [`FallbackReason::ALL`]).
    pub on: u8,
    /// What answers.
    pub answer: FallbackAnswer,
}

impl Fallback {
    /// Whether the fallback answers for `reason`.
    pub const fn covers(&self, reason: FallbackReason) -> bool {
        self.on & (1 << reason as u8) != 0
    }
}

/// The largest fallback body (in the config or its file): it is held in memory.
pub const MAX_FALLBACK_BODY: u64 = 1024 * 1024;

/// A fallback's answer.
#[derive(Debug, Clone, PartialEq)]
pub enum FallbackAnswer {
    /// A fixed answer, made by the sidecar.
    Static {
        /// Its status (2xx to 5xx).
        status: StatusCode,
        /// Its headers (no framing or hop-by-hop ones: the sidecar sets those).
        headers: http::HeaderMap,
        /// Its body.
        body: Vec<u8>,
    },
    /// Another upstream (its index), given the same request once, within what is left of the route's deadline.
    Upstream(usize),
}

/// Default cap on the keys a per-key limit tracks.
pub const DEFAULT_MAX_KEYS: usize = 10_000;
/// Largest `max_keys`.
pub const MAX_MAX_KEYS: u64 = 10_000_000;

/// A route's rate limit, per key.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyLimit {
    /// The limit each key gets (validated by the engine).
    pub config: envelope_core::rate_limit::Config,
    /// What the key is.
    pub key: KeySource,
    /// Keys tracked at most (idle keys are evicted first).
    pub max_keys: std::num::NonZeroUsize,
    /// Each instance's own, or the fleet's (through `[shared]`).
    pub scope: Scope,
}

/// Where a request's rate-limit key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// No key: one limit for every request of the route.
    Route,
    /// A request header's value (a request without it shares the key of all such requests).
    Header(http::HeaderName),
    /// The path segment of the route's template parameter at this index (`/tenants/{tenant}` → 1).
    Param(usize),
    /// The client's address.
    Client,
}

impl Config {
    /// Reads and validates the config file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::parse(&path.display().to_string(), &Config::read(path)?)
    }

    /// The text of the config file at `path`, or an error naming the file.
    pub fn read(path: &Path) -> Result<String, ConfigError> {
        std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.display().to_string(),
            line: 0,
            column: 0,
            field: String::new(),
            message: format!("cannot read the config file: {e}"),
        })
    }

    /// Validates the config text `text`, naming it `file` in errors. Defaults may be overridden by the
    /// environment variables listed in [`ENV_OVERRIDES`].
    pub fn parse(file: &str, text: &str) -> Result<Config, ConfigError> {
        Config::parse_with_env(file, text, &|name| std::env::var(name).ok())
    }

    /// Like [`Config::parse`], reading overrides of the defaults through `env`.
    pub fn parse_with_env(file: &str, text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let defaults = Defaults::from_env(env)?;
        let locate = |span: Option<Range<usize>>, field: String, message: String| {
            let (line, column) = span.map_or((0, 0), |s| line_column(text, s.start));
            ConfigError { file: file.to_owned(), line, column, field, message }
        };
        let de =
            toml::Deserializer::parse(text).map_err(|e| locate(e.span(), String::new(), e.message().to_owned()))?;
        let raw: RawConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            // `Spanned` values show up in serde's path as a private field: leave it out.
            let path = e.path().to_string().replace(".$__serde_spanned_private_value", "");
            let inner = e.into_inner();
            locate(inner.span(), if path == "." { String::new() } else { path }, inner.message().to_owned())
        })?;
        resolve(raw, &defaults, Path::new(file).parent().unwrap_or(Path::new("")))
            .map_err(|Invalid { span, field, message }| locate(span, field, message))
    }
}

/// Environment variables that override a default (a value in the config file always wins).
pub const ENV_OVERRIDES: [(&str, &str); 8] = [
    ("ENVELOPE_ADMIN_LISTEN", "admin.listen"),
    ("ENVELOPE_MAX_CONCURRENT", "listener.max_concurrent"),
    ("ENVELOPE_MAX_BODY_BYTES", "listener.max_body_bytes"),
    ("ENVELOPE_DRAIN_TIMEOUT", "listener.drain_timeout"),
    ("ENVELOPE_ACCESS_LOG", "listener.access_log"),
    ("ENVELOPE_CONNECT_TIMEOUT", "upstream.connect_timeout"),
    ("ENVELOPE_ROUTE_TIMEOUT", "route.timeout"),
    ("ENVELOPE_REPLAY_LIMIT", "route.replay_limit"),
];

/// The defaults in force: the documented constants, or their environment overrides.
struct Defaults {
    admin_listen: SocketAddr,
    max_concurrent: u32,
    max_body_bytes: u64,
    drain_timeout: Duration,
    access_log: bool,
    connect_timeout: Duration,
    route_timeout: Duration,
    replay_limit: usize,
}

impl Defaults {
    fn from_env(env: &dyn Fn(&str) -> Option<String>) -> Result<Defaults, ConfigError> {
        fn get<T>(
            env: &dyn Fn(&str) -> Option<String>,
            name: &str,
            default: T,
            parse: impl Fn(&str) -> Option<T>,
        ) -> Result<T, ConfigError> {
            match env(name) {
                None => Ok(default),
                Some(v) => parse(v.trim()).ok_or_else(|| ConfigError {
                    file: "environment".to_owned(),
                    line: 0,
                    column: 0,
                    field: name.to_owned(),
                    message: format!("invalid value `{v}`"),
                }),
            }
        }
        let dur = |v: &str| Dur::parse(v).ok().map(|d| d.0);
        Ok(Defaults {
            admin_listen: get(env, "ENVELOPE_ADMIN_LISTEN", DEFAULT_ADMIN_LISTEN.parse().expect("valid"), |v| {
                v.parse().ok()
            })?,
            max_concurrent: get(env, "ENVELOPE_MAX_CONCURRENT", DEFAULT_MAX_CONCURRENT, |v| {
                v.parse().ok().filter(|n| *n > 0)
            })?,
            max_body_bytes: get(env, "ENVELOPE_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES, |v| v.parse().ok())?,
            drain_timeout: get(env, "ENVELOPE_DRAIN_TIMEOUT", DEFAULT_DRAIN_TIMEOUT, dur)?,
            access_log: get(env, "ENVELOPE_ACCESS_LOG", true, |v| v.parse().ok())?,
            connect_timeout: get(env, "ENVELOPE_CONNECT_TIMEOUT", DEFAULT_CONNECT_TIMEOUT, |v| {
                dur(v).filter(|d| !d.is_zero())
            })?,
            route_timeout: get(env, "ENVELOPE_ROUTE_TIMEOUT", DEFAULT_ROUTE_TIMEOUT, |v| {
                dur(v).filter(|d| !d.is_zero())
            })?,
            replay_limit: get(env, "ENVELOPE_REPLAY_LIMIT", DEFAULT_REPLAY_LIMIT, |v| v.parse().ok())?,
        })
    }
}

fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// A validation error before it is located in the file.
struct Invalid {
    span: Option<Range<usize>>,
    field: String,
    message: String,
}

/// A number of the config within `min..=max` (as written, or `None` if it is not), or an error naming the range.
fn bounded<T: Copy + Into<u64>>(
    value: Option<&Spanned<T>>,
    field: String,
    min: u64,
    max: u64,
) -> Result<Option<u64>, Invalid> {
    let Some(v) = value else { return Ok(None) };
    let n: u64 = (*v.get_ref()).into();
    if n < min || n > max {
        return Err(invalid(v, field, format!("{n} is out of range: {min} to {max}")));
    }
    Ok(Some(n))
}

fn invalid<T>(spanned: &Spanned<T>, field: impl Into<String>, message: impl Into<String>) -> Invalid {
    Invalid { span: Some(spanned.span()), field: field.into(), message: message.into() }
}

fn resolve(raw: RawConfig, defaults: &Defaults, base_dir: &Path) -> Result<Config, Invalid> {
    let admin_listen = match &raw.admin.listen {
        Some(l) => {
            let addr = *l.get_ref();
            if !addr.ip().is_loopback() && raw.admin.allow_non_loopback != Some(true) {
                return Err(invalid(
                    l,
                    "admin.listen",
                    format!(
                        "{addr} is not a loopback address; set `allow_non_loopback = true` to expose the admin API"
                    ),
                ));
            }
            addr
        }
        None => defaults.admin_listen,
    };
    let mut allowed_hosts = Vec::new();
    for (i, h) in raw.admin.allowed_hosts.iter().flatten().enumerate() {
        let name = h.get_ref().to_ascii_lowercase();
        if name.is_empty()
            || name.contains(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']')))
        {
            return Err(invalid(
                h,
                format!("admin.allowed_hosts[{i}]"),
                format!("`{name}` is not a host name or address"),
            ));
        }
        allowed_hosts.push(name);
    }
    let admin = Admin {
        listen: admin_listen,
        token_env: raw.admin.token_env.clone().unwrap_or_else(|| DEFAULT_ADMIN_TOKEN_ENV.to_owned()),
        allowed_hosts,
    };

    let mut listeners = Vec::new();
    for (i, l) in raw.listeners.iter().enumerate() {
        if raw.listeners[..i].iter().any(|o| o.name.get_ref() == l.name.get_ref()) {
            return Err(invalid(
                &l.name,
                format!("listener[{i}].name"),
                format!("duplicate listener `{}`", l.name.get_ref()),
            ));
        }
        let field = |f: &str| format!("listener[{i}].{f}");
        // The engine's shedder config, validated by the engine: an adaptive limit with its defaults, or a fixed one.
        let shed = envelope_core::shed::Config::builder();
        let adaptive =
            l.adaptive_concurrency.as_ref().map(|a| resolve_adaptive(&field("adaptive_concurrency"), a)).transpose()?;
        let shedding = match (adaptive.flatten(), l.max_concurrent) {
            (Some(gradient), _) => shed.adaptive(gradient).build(),
            (_, Some(n)) => shed.fixed(n.0 as usize).build(),
            _ => shed.fixed(defaults.max_concurrent as usize).build(),
        }
        .map_err(|e| match &l.adaptive_concurrency {
            Some(a) => invalid(a, field("adaptive_concurrency"), e.to_string()),
            None => invalid(&l.name, field("max_concurrent"), e.to_string()),
        })?;
        listeners.push(Listener {
            name: l.name.get_ref().clone(),
            listen: l.listen,
            shedding,
            max_connections: bounded(l.max_connections.as_ref(), field("max_connections"), 1, MAX_MAX_CONNECTIONS)?
                .unwrap_or(u64::from(DEFAULT_MAX_CONNECTIONS)) as usize,
            header_read_timeout: l.header_read_timeout.map_or(DEFAULT_HEADER_READ_TIMEOUT, |d| d.0),
            keepalive_timeout: l.keepalive_timeout.map_or(DEFAULT_KEEPALIVE_TIMEOUT, |d| d.0),
            engine: l.engine.unwrap_or(Engine::Auto),
            underscores_in_headers: l.underscores_in_headers.unwrap_or(Underscores::Drop),
            max_header_bytes: bounded(
                l.max_header_bytes.as_ref(),
                field("max_header_bytes"),
                HEADER_BYTES_RANGE.0,
                HEADER_BYTES_RANGE.1,
            )?
            .unwrap_or(u64::from(DEFAULT_MAX_HEADER_BYTES)) as usize,
            max_headers: bounded(l.max_headers.as_ref(), field("max_headers"), 1, MAX_MAX_HEADERS)?
                .unwrap_or(u64::from(DEFAULT_MAX_HEADERS)) as usize,
            max_uri_bytes: bounded(l.max_uri_bytes.as_ref(), field("max_uri_bytes"), 1, MAX_MAX_URI_BYTES)?
                .unwrap_or(u64::from(DEFAULT_MAX_URI_BYTES)) as usize,
            max_body_bytes: bounded(l.max_body_bytes.as_ref(), field("max_body_bytes"), 0, MAX_MAX_BODY_BYTES)?
                .unwrap_or(defaults.max_body_bytes),
            drain_timeout: l.drain_timeout.map_or(defaults.drain_timeout, |d| d.0),
            access_log: l.access_log.unwrap_or(defaults.access_log),
        });
    }

    let shared = raw.shared.as_ref().map(resolve_shared).transpose()?;
    let mut upstreams = Vec::new();
    for (i, u) in raw.upstreams.iter().enumerate() {
        if raw.upstreams[..i].iter().any(|o| o.name.get_ref() == u.name.get_ref()) {
            return Err(invalid(
                &u.name,
                format!("upstream[{i}].name"),
                format!("duplicate upstream `{}`", u.name.get_ref()),
            ));
        }
        upstreams.push(resolve_upstream(i, u, defaults, shared.is_some())?);
    }

    let mut routes = Vec::new();
    for (i, r) in raw.routes.iter().enumerate() {
        if raw.routes[..i].iter().any(|o| o.name.get_ref() == r.name.get_ref()) {
            return Err(invalid(
                &r.name,
                format!("route[{i}].name"),
                format!("duplicate route `{}`", r.name.get_ref()),
            ));
        }
        routes.push(resolve_route(i, r, &listeners, &upstreams, defaults, shared.is_some(), base_dir)?);
    }

    let history = History {
        path: match raw.history.path.as_deref() {
            Some(":memory:") => None,
            Some(p) => Some(base_dir.join(p)),
            None => Some(base_dir.join(DEFAULT_HISTORY_PATH)),
        },
        retention: raw.history.retention.map_or(DEFAULT_HISTORY_RETENTION, |d| d.0),
        flush_interval: raw.history.flush_interval.map_or(DEFAULT_HISTORY_FLUSH_INTERVAL, |d| d.0),
    };
    let mut counters = Vec::new();
    for (i, c) in raw.counters.iter().enumerate() {
        if raw.counters[..i].iter().any(|o| o.name.get_ref() == c.name.get_ref()) {
            return Err(invalid(
                &c.name,
                format!("counter[{i}].name"),
                format!("duplicate counter `{}`", c.name.get_ref()),
            ));
        }
        counters.push(resolve_counter(i, c, &routes)?);
    }
    let mut scenarios = Vec::new();
    for (i, sc) in raw.scenarios.iter().enumerate() {
        if raw.scenarios[..i].iter().any(|o| o.name.get_ref() == sc.name.get_ref()) {
            return Err(invalid(
                &sc.name,
                format!("scenario[{i}].name"),
                format!("duplicate scenario `{}`", sc.name.get_ref()),
            ));
        }
        scenarios.push(resolve_scenario(i, sc, &routes, &upstreams, &counters)?);
    }
    let tracing = match &raw.tracing {
        None => None,
        Some(t) => {
            let url = t.otlp_endpoint.get_ref();
            let ok = url
                .parse::<Uri>()
                .is_ok_and(|u| matches!(u.scheme_str(), Some("http" | "https")) && u.authority().is_some());
            if !ok {
                return Err(invalid(&t.otlp_endpoint, "tracing.otlp_endpoint", "must be an http:// or https:// URL"));
            }
            Some(Tracing {
                otlp_endpoint: url.clone(),
                service_name: t.service_name.clone().unwrap_or_else(|| DEFAULT_SERVICE_NAME.to_owned()),
                export_interval: t.export_interval.map_or(DEFAULT_EXPORT_INTERVAL, |d| d.0),
            })
        }
    };
    for (i, u) in raw.upstreams.iter().enumerate() {
        if let Some(b) = &u.breaker
            && b.get_ref().shared == Some(true)
            && shared.is_none()
        {
            return Err(invalid(
                b,
                format!("upstream[{i}].breaker.shared"),
                "a shared breaker needs the store it is shared through: add `[shared]` with `redis = \"redis://host:6379\"`",
            ));
        }
    }
    let runbook_base_url = match &raw.alerts.runbook_base_url {
        None => DEFAULT_RUNBOOK_BASE_URL.to_owned(),
        Some(url) => {
            let ok = url.get_ref().parse::<Uri>().is_ok_and(|u| {
                matches!(u.scheme_str(), Some("http" | "https"))
                    && u.authority().is_some()
                    && !url.get_ref().contains('#')
            });
            if !ok {
                return Err(invalid(url, "alerts.runbook_base_url", "an absolute http(s) URL, without a `#` fragment"));
            }
            url.get_ref().clone()
        }
    };
    let window_scale =
        bounded(raw.alerts.window_scale.as_ref(), "alerts.window_scale".to_owned(), 1, MAX_WINDOW_SCALE)?
            .map_or(1, |n| n as u32);
    let alerts = Alerts { runbook_base_url, window_scale };
    Ok(Config { admin, listeners, upstreams, routes, history, counters, scenarios, tracing, shared, alerts })
}

/// `[shared]`: a Redis address the sidecar can use as it is (so what `check` accepts, `run` can connect to).
fn resolve_shared(raw: &Spanned<RawShared>) -> Result<Shared, Invalid> {
    let r = raw.get_ref();
    let url = r.redis.get_ref();
    let uri = url.parse::<Uri>().ok();
    let scheme_ok = uri.as_ref().is_some_and(|u| matches!(u.scheme_str(), Some("redis" | "rediss")));
    let authority = uri.as_ref().and_then(|u| u.authority()).map(|a| a.host().to_owned()).unwrap_or_default();
    let db_ok = uri.as_ref().is_some_and(|u| {
        let path = u.path().trim_start_matches('/');
        path.is_empty() || path.parse::<u32>().is_ok()
    }) && uri.as_ref().is_some_and(|u| u.query().is_none());
    if !scheme_ok || authority.is_empty() || !db_ok {
        return Err(invalid(
            &r.redis,
            "shared.redis",
            "must be a Redis address: `redis://[user:password@]host[:port][/db]` or `rediss://…` for TLS",
        ));
    }
    let key_prefix = match &r.key_prefix {
        Some(p) if p.get_ref().is_empty() || p.get_ref().chars().any(|c| c.is_whitespace() || c == '{' || c == '}') => {
            return Err(invalid(p, "shared.key_prefix", "must be non-empty, without spaces or braces"));
        }
        Some(p) => p.get_ref().clone(),
        None => DEFAULT_KEY_PREFIX.to_owned(),
    };
    let instance = match &r.instance {
        Some(n) if n.get_ref().is_empty() || n.get_ref().len() > 128 => {
            return Err(invalid(n, "shared.instance", "must be 1 to 128 characters"));
        }
        Some(n) => Some(n.get_ref().clone()),
        None => None,
    };
    let ca_pem = match &r.ca_file {
        None => None,
        Some(path) if !url.starts_with("rediss://") => {
            return Err(invalid(path, "shared.ca_file", "a CA file is for a TLS address (`rediss://`)"));
        }
        Some(path) => {
            use rustls_pki_types::CertificateDer;
            use rustls_pki_types::pem::PemObject;
            let bad = |why: String| invalid(path, "shared.ca_file", format!("`{}`: {why}", path.get_ref()));
            let pem = std::fs::read(path.get_ref()).map_err(|e| bad(e.to_string()))?;
            let certs =
                CertificateDer::pem_slice_iter(&pem).collect::<Result<Vec<_>, _>>().map_err(|e| bad(e.to_string()))?;
            if certs.is_empty() {
                return Err(bad("no PEM certificate in the file".to_owned()));
            }
            Some(pem)
        }
    };
    let cluster = r.cluster.as_ref().is_some_and(|c| *c.get_ref());
    if let Some(c) = &r.cluster
        && cluster
        && (ca_pem.is_some() || url.starts_with("rediss://"))
    {
        return Err(invalid(c, "shared.cluster", "a cluster is reached over plain TCP here (no `rediss://`)"));
    }
    let sentinel = match &r.sentinel {
        None => None,
        Some(s) if s.get_ref().is_empty() => return Err(invalid(s, "shared.sentinel", "the master's name is empty")),
        Some(s) if cluster || url.starts_with("rediss://") => {
            return Err(invalid(s, "shared.sentinel", "a Sentinel is reached over plain TCP, without `cluster`"));
        }
        Some(s) => Some(s.get_ref().clone()),
    };
    let sync_interval = r.sync_interval.map_or(DEFAULT_SYNC_INTERVAL, |d| d.0);
    if sync_interval < Duration::from_millis(10) {
        return Err(invalid(raw, "shared.sync_interval", "must be at least 10ms"));
    }
    Ok(Shared {
        redis: url.clone(),
        key_prefix,
        op_timeout: r.op_timeout.map_or(DEFAULT_SHARED_OP_TIMEOUT, |d| d.0),
        sync_interval,
        instance,
        ca_pem,
        cluster,
        sentinel,
    })
}

fn resolve_scenario(
    i: usize,
    sc: &raw::RawScenario,
    routes: &[Route],
    upstreams: &[Upstream],
    counters: &[BusinessCounter],
) -> Result<Scenario, Invalid> {
    let field = |f: &str| format!("scenario[{i}].{f}");
    let route = routes
        .iter()
        .find(|r| &r.name == sc.route.get_ref())
        .ok_or_else(|| invalid(&sc.route, field("route"), format!("no route named `{}`", sc.route.get_ref())))?;
    let request = sc.request.as_ref();
    let method = match request.and_then(|r| r.method.as_ref()) {
        None => Method::GET,
        Some(m) => Method::from_bytes(m.get_ref().to_ascii_uppercase().as_bytes())
            .map_err(|_| invalid(m, field("request.method"), "not an HTTP method"))?,
    };
    let path = match request.and_then(|r| r.path.as_ref()) {
        Some(p) if p.get_ref().starts_with('/') && p.get_ref().parse::<Uri>().is_ok() => p.get_ref().clone(),
        Some(p) => return Err(invalid(p, field("request.path"), "must be a path starting with `/`")),
        None => route.matcher.path_prefix.clone(),
    };
    let fault = match &sc.fault {
        None => None,
        Some(f) => {
            if !upstreams.iter().any(|u| &u.name == f.upstream.get_ref()) {
                return Err(invalid(
                    &f.upstream,
                    field("fault.upstream"),
                    format!("no upstream named `{}`", f.upstream.get_ref()),
                ));
            }
            if let Some(s) = &f.abort_status
                && !(400..=599).contains(s.get_ref())
            {
                return Err(invalid(s, field("fault.abort_status"), "must be a 4xx or 5xx status"));
            }
            let abort_status = f.abort_status.as_ref().map(|s| *s.get_ref());
            Some(ScenarioFault {
                upstream: f.upstream.get_ref().clone(),
                abort_status,
                abort_percent: f.abort_percent.map(|p| f64::from(p.0)),
                delay: f.delay.map(|d| d.0),
                delay_percent: f.delay_percent.map(|p| f64::from(p.0)),
            })
        }
    };
    let e = sc.expect.get_ref();
    let mut expect_counters = Vec::new();
    for (name, max) in &e.counters {
        if !counters.iter().any(|c| &c.name == name) {
            return Err(invalid(&sc.expect, field("expect.counters"), format!("no counter named `{name}`")));
        }
        expect_counters.push((name.clone(), *max));
    }
    let expect = Expect {
        // Percentages are written with at most a few decimals: round away f32's noise.
        success_rate: e.success_rate.map(|p| (f64::from(p.0) * 1e4).round() / 1e4),
        p99: e.p99.map(|d| d.0),
        fast_fail_p99: e.fast_fail_p99.map(|d| d.0),
        counters: expect_counters,
    };
    if expect == Expect::default() {
        return Err(invalid(&sc.expect, field("expect"), "give at least one response measure"));
    }
    let load = sc.load.as_ref();
    Ok(Scenario {
        name: sc.name.get_ref().clone(),
        route: route.name.clone(),
        method,
        path,
        rate: load.map_or(DEFAULT_SCENARIO_RATE, |l| l.rate.0),
        duration: load.map_or(DEFAULT_SCENARIO_DURATION, |l| l.duration.0),
        concurrency: load.and_then(|l| l.concurrency).map_or(64, |c| c.0),
        fault,
        expect,
        window: sc.window.map_or(DEFAULT_SCENARIO_WINDOW, |d| d.0),
    })
}

fn resolve_counter(i: usize, c: &raw::RawCounter, routes: &[Route]) -> Result<BusinessCounter, Invalid> {
    let route = match &c.route {
        None => None,
        Some(name) if routes.iter().any(|r| &r.name == name.get_ref()) => Some(name.get_ref().clone()),
        Some(name) => {
            return Err(invalid(name, format!("counter[{i}].route"), format!("no route named `{}`", name.get_ref())));
        }
    };
    let matcher = c.matcher.as_ref().map(|m| resolve_match(&format!("counter[{i}]"), m)).transpose()?;
    let statuses = match &c.status {
        None => vec![(200, 299)],
        Some(list) => list
            .iter()
            .enumerate()
            .map(|(j, s)| {
                parse_status_range(s.get_ref()).ok_or_else(|| {
                    invalid(s, format!("counter[{i}].status[{j}]"), "expected a status (`409`) or a class (`2xx`)")
                })
            })
            .collect::<Result<_, _>>()?,
    };
    Ok(BusinessCounter { name: c.name.get_ref().clone(), route, matcher, statuses })
}

/// `"409"` → 409–409, `"2xx"` → 200–299.
fn parse_status_range(s: &str) -> Option<(u16, u16)> {
    let s = s.trim();
    if let Some(class) = s.strip_suffix("xx").or_else(|| s.strip_suffix("XX")) {
        let c: u16 = class.parse().ok().filter(|c| (1..=5).contains(c))?;
        return Some((c * 100, c * 100 + 99));
    }
    let code: u16 = s.parse().ok().filter(|c| (100..600).contains(c))?;
    Some((code, code))
}

/// A `match` table: path prefix or template, and methods. `field` names its owner in errors.
fn resolve_match(field: &str, matcher: &Spanned<raw::RawMatch>) -> Result<PathMatch, Invalid> {
    let m = matcher.get_ref();
    let (path_prefix, template) = match (&m.path_prefix, &m.path) {
        (Some(_), Some(_)) => {
            return Err(invalid(matcher, format!("{field}.match"), "give `path_prefix` or `path`, not both"));
        }
        (_, Some(t)) => {
            let segments = parse_template(t).map_err(|e| invalid(matcher, format!("{field}.match.path"), e))?;
            let literal = t.split('{').next().unwrap_or("/").to_owned();
            (literal, Some(segments))
        }
        (p, None) => (p.clone().unwrap_or_else(|| "/".to_owned()), None),
    };
    if !path_prefix.starts_with('/') {
        return Err(invalid(matcher, format!("{field}.match.path_prefix"), "must start with `/`"));
    }
    let methods = match &m.methods {
        None => None,
        Some(list) => Some(
            list.iter()
                .enumerate()
                .map(|(j, name)| {
                    let upper = name.get_ref().to_ascii_uppercase();
                    Method::from_bytes(upper.as_bytes())
                        .map_err(|_| invalid(name, format!("{field}.match.methods[{j}]"), "not an HTTP method"))
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    Ok(PathMatch { path_prefix, template, methods })
}

/// A listener's `adaptive_concurrency`: `true` (the engine's defaults), `false` (off: `None`), or a table setting
/// its operating point: `tolerance` (the latency, as a multiple of the unloaded one, it lets in-flight work grow
/// to), `initial_limit`, `min_limit`, `max_limit`, `window`.
fn resolve_adaptive(
    field: &str,
    value: &Spanned<toml::Value>,
) -> Result<Option<envelope_core::shed::adaptive::GradientConfig>, Invalid> {
    use envelope_core::shed::adaptive::GradientConfig;
    let bad = |at: String, why: String| invalid(value, at, why);
    let table = match value.get_ref() {
        toml::Value::Boolean(false) => return Ok(None),
        toml::Value::Boolean(true) => return Ok(Some(GradientConfig::default())),
        toml::Value::Table(t) => t,
        _ => return Err(bad(field.to_owned(), "`true`, or a table such as `{ tolerance = 1.2 }`".into())),
    };
    let mut c = GradientConfig::default();
    for (key, v) in table {
        let at = format!("{field}.{key}");
        let count = |v: &toml::Value| match v {
            toml::Value::Integer(n) if *n >= 1 => Ok(*n as usize),
            _ => Err(bad(at.clone(), "a whole number of at least 1".into())),
        };
        match key.as_str() {
            "tolerance" => {
                c.tolerance = match v {
                    toml::Value::Float(f) => *f,
                    toml::Value::Integer(n) => *n as f64,
                    _ => return Err(bad(at, "a number of at least 1.0, such as 1.2".into())),
                }
            }
            "headroom" => {
                c.headroom = Some(match v {
                    toml::Value::Float(f) => *f,
                    toml::Value::Integer(n) => *n as f64,
                    _ => return Err(bad(at, "a number above 0, such as 1".into())),
                })
            }
            "initial_limit" => c.initial_limit = count(v)?,
            "min_limit" => c.min_limit = count(v)?,
            "max_limit" => c.max_limit = count(v)?,
            "window" => {
                c.window = match v {
                    toml::Value::String(d) => Dur::parse(d).map_err(|why| bad(at.clone(), why))?.0,
                    _ => return Err(bad(at, "a duration such as \"100ms\"".into())),
                }
            }
            _ => {
                return Err(bad(
                    at,
                    "unknown field, expected `tolerance`, `headroom`, `initial_limit`, `min_limit`, `max_limit` or `window`"
                        .into(),
                ));
            }
        }
    }
    // The engine's own check decides (a tolerance under 1, a floor above the ceiling, a zero window).
    c.validate().map_err(|e| bad(field.to_owned(), e.to_string()))?;
    Ok(Some(c))
}

/// `shared`: the config has `[shared]` (a global limit needs it).
fn resolve_upstream(i: usize, u: &RawUpstream, defaults: &Defaults, shared: bool) -> Result<Upstream, Invalid> {
    let field = |f: &str| format!("upstream[{i}].{f}");
    if u.endpoints.get_ref().is_empty() {
        return Err(invalid(&u.endpoints, field("endpoints"), "an upstream needs at least one endpoint"));
    }
    let mut endpoints = Vec::new();
    for (j, e) in u.endpoints.get_ref().iter().enumerate() {
        let bad = |why: &str| invalid(e, format!("upstream[{i}].endpoints[{j}]"), format!("`{}` {why}", e.get_ref()));
        let uri: Uri = e.get_ref().parse().map_err(|_| bad("is not a URL like http://127.0.0.1:8000"))?;
        let scheme = uri.scheme().cloned().ok_or_else(|| bad("has no scheme (http:// or https://)"))?;
        if scheme != http::uri::Scheme::HTTP && scheme != http::uri::Scheme::HTTPS {
            return Err(bad("must use http or https"));
        }
        let authority = uri.authority().cloned().ok_or_else(|| bad("has no host"))?;
        if uri.path() != "/" && !uri.path().is_empty() {
            return Err(bad("must not have a path (use a route's strip_prefix to rewrite paths)"));
        }
        let host = http::HeaderValue::from_str(authority.as_str()).map_err(|_| bad("not a valid host"))?;
        // A port must be a number from 1 to 65535; without one, the scheme's.
        // (`Authority::port` reads a port it cannot parse as none: the text after the last `:` is read here.)
        let text = authority.as_str();
        let port = match text.rfind(':').filter(|&at| !text[at..].contains(']')) {
            None => Some(if scheme == http::uri::Scheme::HTTPS { 443 } else { 80 }),
            Some(at) => text[at + 1..].parse::<u16>().ok().filter(|&p| p != 0),
        };
        let Some(port) = port else { return Err(bad("has a port outside 1 to 65535")) };
        let connect_to = format!("{}:{port}", authority.host());
        endpoints.push(Endpoint { scheme, authority, host, connect_to });
    }
    let breaker = u.breaker.as_ref().map(|b| resolve_breaker(i, b)).transpose()?;
    // The engine's own validation decides, once: the runtime builds from what was checked here.
    let bulkhead = u
        .bulkhead
        .as_ref()
        .map(|b| {
            envelope_core::bulkhead::Config::builder()
                .max_concurrent(b.max_concurrent.0 as usize)
                .queue(b.queue.unwrap_or(0) as usize, b.queue_timeout.map_or(Duration::ZERO, |d| d.0))
                .build()
                .map_err(|e| invalid(&u.name, field("bulkhead"), e.to_string()))
        })
        .transpose()?;
    let rate_limit = u
        .rate_limit
        .as_ref()
        .map(|r| {
            envelope_core::rate_limit::Config::per(r.rate.0, r.per.map_or(Duration::from_secs(1), |d| d.0))
                .burst(r.burst.map_or(r.rate.0, |b| b.0))
                .shadow(r.shadow.unwrap_or(false))
                .build()
                .map_err(|e| invalid(&u.name, field("rate_limit"), e.to_string()))
        })
        .transpose()?;
    let rate_limit_scope = match u.rate_limit.as_ref().and_then(|r| r.scope.as_ref()) {
        Some(scope) if *scope.get_ref() == Scope::Global && !shared => {
            return Err(invalid(
                scope,
                field("rate_limit.scope"),
                "a global limit needs the store it is shared through: add `[shared]` with `redis = \"redis://host:6379\"`",
            ));
        }
        Some(scope) => *scope.get_ref(),
        None => Scope::Local,
    };
    let rate_limit_lease = match u.rate_limit.as_ref().and_then(|r| r.lease.as_ref().map(|l| (r, l))) {
        None => 1,
        Some((_, lease)) if rate_limit_scope != Scope::Global => {
            return Err(invalid(
                lease,
                field("rate_limit.lease"),
                "a lease is for a global limit (`scope = \"global\"`)",
            ));
        }
        Some((r, lease)) if lease.get_ref().0 > r.burst.map_or(r.rate.0, |b| b.0) => {
            return Err(invalid(lease, field("rate_limit.lease"), "a lease is at most the burst"));
        }
        Some((_, lease)) => lease.get_ref().0,
    };
    let extra_roots = match &u.ca_file {
        None => Vec::new(),
        Some(path) => {
            use rustls_pki_types::CertificateDer;
            use rustls_pki_types::pem::PemObject;
            let bad = |why: String| invalid(path, field("ca_file"), format!("`{}`: {why}", path.get_ref()));
            let certs = CertificateDer::pem_file_iter(path.get_ref())
                .map_err(|e| bad(e.to_string()))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad(e.to_string()))?;
            if certs.is_empty() {
                return Err(bad("no PEM certificate in the file".to_owned()));
            }
            certs.into_iter().map(|c| c.to_vec()).collect()
        }
    };
    Ok(Upstream {
        name: u.name.get_ref().clone(),
        endpoints,
        connect_timeout: u.connect_timeout.map_or(defaults.connect_timeout, |d| d.0),
        idle_timeout: u.idle_timeout.map_or(DEFAULT_IDLE_TIMEOUT, |d| d.0),
        max_idle_per_endpoint: u.max_idle_per_endpoint.unwrap_or(DEFAULT_MAX_IDLE_PER_ENDPOINT),
        extra_roots,
        bulkhead,
        breaker,
        rate_limit,
        rate_limit_scope,
        rate_limit_lease,
        protocol: u.protocol.unwrap_or_default(),
    })
}

/// The breaker of an upstream: `envelope_core`'s defaults (one set for the library, the sidecar and Python; see
/// `envelope_core::circuit_breaker::DEFAULT_MINIMUM_CALLS`), with what the file sets, validated by the engine.
fn resolve_breaker(i: usize, b: &Spanned<RawBreaker>) -> Result<BreakerSpec, Invalid> {
    use envelope_core::circuit_breaker::{Config as BreakerConfig, Escalation};
    let raw = b.get_ref();
    let mut builder = BreakerConfig::builder();
    if let Some(w) = &raw.window {
        builder = match (w.count, w.seconds) {
            (Some(c), None) => builder.count_window(c.0),
            (None, Some(s)) => builder.time_window(s.0),
            _ => {
                return Err(invalid(
                    b,
                    format!("upstream[{i}].breaker.window"),
                    "give exactly one of `count` or `seconds`",
                ));
            }
        };
    }
    if let Some(n) = raw.min_calls {
        builder = builder.minimum_calls(n.0);
    }
    if let Some(p) = raw.failure_rate {
        builder = builder.failure_rate_threshold(p.0);
    }
    if let Some(s) = &raw.slow_call {
        builder = builder.slow_calls(s.duration.0, s.rate.0);
    }
    if let Some(d) = raw.open_for {
        builder = builder.open_duration(d.0);
    }
    if let Some(max) = raw.max_open_for {
        builder = builder.escalation(Escalation { multiplier: 2.0, max: max.0, jitter: 0.1 });
    }
    if let Some(n) = raw.half_open_calls {
        builder = builder.half_open_calls(n.0);
    }
    if let Some(d) = raw.max_half_open_wait {
        builder = builder.max_half_open_wait(Some(d.0));
    }
    // The engine's own validation (e.g. minimum calls larger than a count window) decides.
    let config = builder.build().map_err(|e| invalid(b, format!("upstream[{i}].breaker"), e.to_string()))?;
    let mode = raw.mode.unwrap_or(BreakerMode::Normal);
    let shared = raw.shared == Some(true);
    if shared {
        if let Err(why) = envelope_core::distributed::shared_window(&config) {
            return Err(invalid(b, format!("upstream[{i}].breaker.window"), why));
        }
        if mode != BreakerMode::Normal {
            return Err(invalid(b, format!("upstream[{i}].breaker.mode"), "a shared breaker is in the normal mode"));
        }
    }
    Ok(BreakerSpec { config, mode, shared })
}

fn resolve_route(
    i: usize,
    r: &RawRoute,
    listeners: &[Listener],
    upstreams: &[Upstream],
    defaults: &Defaults,
    shared: bool,
    base_dir: &Path,
) -> Result<Route, Invalid> {
    let field = |f: &str| format!("route[{i}].{f}");
    let listener = match &r.listener {
        Some(name) => listeners
            .iter()
            .position(|l| &l.name == name.get_ref())
            .ok_or_else(|| invalid(name, field("listener"), format!("no listener named `{}`", name.get_ref())))?,
        None if listeners.len() == 1 => 0,
        None => {
            return Err(invalid(
                &r.name,
                field("listener"),
                "name the listener: the config has more than one (or none)",
            ));
        }
    };
    let upstream = upstreams.iter().position(|u| &u.name == r.upstream.get_ref()).ok_or_else(|| {
        invalid(&r.upstream, field("upstream"), format!("no upstream named `{}`", r.upstream.get_ref()))
    })?;
    let matcher = resolve_match(&format!("route[{i}]"), &r.matcher)?;
    if matcher.template.is_some() && r.strip_prefix == Some(true) {
        return Err(invalid(&r.matcher, field("strip_prefix"), "only a `path_prefix` route can strip its prefix"));
    }
    let mut fail_on_status = Vec::new();
    for (j, s) in r.fail_on_status.iter().enumerate() {
        match StatusCode::from_u16(*s.get_ref()) {
            Ok(code) if code.is_client_error() => fail_on_status.push(code),
            _ => {
                return Err(invalid(
                    s,
                    format!("route[{i}].fail_on_status[{j}]"),
                    "must be a 4xx status (5xx always fail)",
                ));
            }
        }
    }
    let retry = r.retry.as_ref().map(|retry| resolve_retry(i, &r.name, retry)).transpose()?;
    let rate_limit = r.rate_limit.as_ref().map(|l| resolve_key_limit(i, l, &r.matcher, shared)).transpose()?;
    let fallback = r.fallback.as_ref().map(|f| resolve_fallback(i, f, upstream, upstreams, base_dir)).transpose()?;
    let hedge = r.hedge.as_ref().map(|h| resolve_hedge(i, h)).transpose()?;
    let tier = r.tier.unwrap_or_else(|| tier_by_path(&matcher.path_prefix));
    let slo = resolve_slo(i, r.slo.as_ref(), tier)?;
    Ok(Route {
        name: r.name.get_ref().clone(),
        listener,
        tier,
        matcher,
        strip_prefix: r.strip_prefix.unwrap_or(false),
        idempotent: r.idempotent.unwrap_or(false),
        upstream,
        timeout: r.timeout.map_or(defaults.route_timeout, |d| d.0),
        attempt_timeout: r.attempt_timeout.map(|d| d.0),
        retry,
        fail_on_status,
        replay_limit: bounded(r.replay_limit.as_ref(), format!("route[{i}].replay_limit"), 0, MAX_REPLAY_LIMIT)?
            .map_or(defaults.replay_limit, |n| n as usize),
        rate_limit,
        fallback,
        hedge,
        slo,
    })
}

/// A percentage as a share, rounded to 12 decimals (99.99 is 0.9999, not the 0.99989999… of the division).
fn share(percent: f64) -> f64 {
    (percent / 100.0 * 1e12).round() / 1e12
}

/// A route's SLO: the tier's objectives, with `availability` (a percentage, 0 to 100 exclusive) and `latency` (one
/// `{ percentile, under }` table or a list of 1 to 4) replaced when the route sets them.
fn resolve_slo(i: usize, raw: Option<&Spanned<RawSlo>>, tier: Tier) -> Result<SloSpec, Invalid> {
    use envelope_core::slo::{LatencyObjective, MAX_LATENCY_OBJECTIVES};
    let mut spec = SloSpec::of_tier(tier);
    let Some(raw) = raw else { return Ok(spec) };
    let field = |name: &str| format!("route[{i}].slo.{name}");
    if let Some(a) = &raw.get_ref().availability {
        let v = *a.get_ref();
        if !(v > 0.0 && v < 100.0) {
            return Err(invalid(
                a,
                field("availability"),
                format!("{v}: a percentage above 0 and below 100, such as 99.95"),
            ));
        }
        spec.availability = share(v);
    }
    if let Some(latency) = &raw.get_ref().latency {
        let bad = |at: String, why: String| invalid(latency, at, why);
        let tables: Vec<(String, &toml::Table)> = match latency.get_ref() {
            toml::Value::Table(t) => vec![(field("latency"), t)],
            toml::Value::Array(list) => list
                .iter()
                .enumerate()
                .map(|(j, v)| match v {
                    toml::Value::Table(t) => Ok((field(&format!("latency[{j}]")), t)),
                    _ => Err(bad(
                        field(&format!("latency[{j}]")),
                        "a `{ percentile = 95, under = \"300ms\" }` table".into(),
                    )),
                })
                .collect::<Result<_, _>>()?,
            _ => {
                return Err(bad(
                    field("latency"),
                    "a `{ percentile = 95, under = \"300ms\" }` table, or a list of them".into(),
                ));
            }
        };
        if tables.is_empty() || tables.len() > MAX_LATENCY_OBJECTIVES {
            return Err(bad(field("latency"), format!("1 to {MAX_LATENCY_OBJECTIVES} latency objectives")));
        }
        spec.latencies.clear();
        for (at, t) in tables {
            if let Some(key) = t.keys().find(|k| *k != "percentile" && *k != "under") {
                return Err(bad(format!("{at}.{key}"), "unknown field, expected `percentile` or `under`".into()));
            }
            let percentile = match t.get("percentile") {
                Some(toml::Value::Float(p)) => *p,
                Some(toml::Value::Integer(p)) => *p as f64,
                Some(_) => return Err(bad(format!("{at}.percentile"), "a number, such as 95 or 99.9".into())),
                None => {
                    return Err(bad(
                        format!("{at}.percentile"),
                        "missing: the share of requests under `under`, such as 95".into(),
                    ));
                }
            };
            if !(percentile > 0.0 && percentile < 100.0) {
                return Err(bad(format!("{at}.percentile"), format!("{percentile}: above 0 and below 100")));
            }
            let threshold = match t.get("under") {
                Some(toml::Value::String(d)) => match Dur::parse(d) {
                    Ok(d) if !d.0.is_zero() => d.0,
                    Ok(_) => return Err(bad(format!("{at}.under"), "must be more than 0".into())),
                    Err(why) => return Err(bad(format!("{at}.under"), why)),
                },
                Some(_) => return Err(bad(format!("{at}.under"), "a duration such as \"300ms\"".into())),
                None => return Err(bad(format!("{at}.under"), "missing: the latency, such as \"300ms\"".into())),
            };
            spec.latencies.push(LatencyObjective { threshold, percentile: share(percentile) });
        }
    }
    Ok(spec)
}

/// A route's hedge: `delay` a duration (`"50ms"`) or a percentile (`"p95"`, `"p99.9"`), and at most `max_extra`
/// extra attempts.
fn resolve_hedge(i: usize, h: &Spanned<RawHedge>) -> Result<HedgeSpec, Invalid> {
    let field = |name: &str| format!("route[{i}].hedge.{name}");
    let raw = h.get_ref();
    let text = raw.delay.get_ref().trim();
    let delay = match text.strip_prefix('p') {
        Some(p) => match p.parse::<f64>() {
            Ok(p) if p > 0.0 && p < 100.0 => HedgeDelay::Percentile(p),
            _ => {
                return Err(invalid(
                    &raw.delay,
                    field("delay"),
                    "a percentile is `p<number>` between 0 and 100, say `p95`",
                ));
            }
        },
        None => match Dur::parse(text) {
            Ok(d) if !d.0.is_zero() => HedgeDelay::Fixed(d.0),
            Ok(_) => return Err(invalid(&raw.delay, field("delay"), "must be more than 0")),
            Err(why) => {
                return Err(invalid(
                    &raw.delay,
                    field("delay"),
                    format!("a duration (`50ms`) or a percentile (`p95`): {why}"),
                ));
            }
        },
    };
    let max_extra = bounded(raw.max_extra.as_ref(), field("max_extra"), 1, MAX_HEDGES)?.map_or(1, |n| n as u32);
    Ok(HedgeSpec { delay, max_extra })
}

/// A route's fallback: its reasons (at least one, each once), and either another upstream than the route's or a
/// static answer (`status`, `body` or `body_file` read now, `headers`).
fn resolve_fallback(
    i: usize,
    f: &Spanned<RawFallback>,
    primary: usize,
    upstreams: &[Upstream],
    base_dir: &Path,
) -> Result<Fallback, Invalid> {
    let field = |name: &str| format!("route[{i}].fallback.{name}");
    let raw = f.get_ref();
    let mut on = 0u8;
    for (j, name) in raw.on.get_ref().iter().enumerate() {
        let reason = FallbackReason::ALL.into_iter().find(|r| r.as_str() == name.get_ref()).ok_or_else(|| {
            let names: Vec<_> = FallbackReason::ALL.iter().map(|r| r.as_str()).collect();
            invalid(name, field(&format!("on[{j}]")), format!("unknown reason; one of {}", names.join(", ")))
        })?;
        on |= 1 << reason as u8;
    }
    if on == 0 {
        return Err(invalid(&raw.on, field("on"), "name at least one reason the fallback answers for"));
    }
    let answer = if let Some(name) = &raw.upstream {
        let fixed = [
            raw.status.as_ref().map(|s| s.span()),
            raw.body.as_ref().map(|b| b.span()),
            raw.body_file.as_ref().map(|b| b.span()),
        ];
        if let Some(span) = fixed.into_iter().flatten().next().or_else(|| raw.headers.values().next().map(|h| h.span()))
        {
            return Err(Invalid {
                span: Some(span),
                field: field("upstream"),
                message: "a fallback is another upstream or a static answer (`status`, `body`, `headers`), not both"
                    .to_owned(),
            });
        }
        let index = upstreams
            .iter()
            .position(|u| &u.name == name.get_ref())
            .ok_or_else(|| invalid(name, field("upstream"), format!("no upstream named `{}`", name.get_ref())))?;
        if index == primary {
            return Err(invalid(name, field("upstream"), "the fallback must be another upstream than the route's"));
        }
        FallbackAnswer::Upstream(index)
    } else {
        let status = match &raw.status {
            None => StatusCode::OK,
            Some(s) => match StatusCode::from_u16(*s.get_ref()) {
                Ok(code) if (200..=599).contains(&code.as_u16()) => code,
                _ => return Err(invalid(s, field("status"), "a status from 200 to 599")),
            },
        };
        let body = match (&raw.body, &raw.body_file) {
            (Some(_), Some(file)) => {
                return Err(invalid(file, field("body_file"), "give `body` or `body_file`, not both"));
            }
            (Some(text), None) => text.get_ref().clone().into_bytes(),
            (None, Some(file)) => {
                let path = base_dir.join(file.get_ref());
                std::fs::read(&path)
                    .map_err(|e| invalid(file, field("body_file"), format!("cannot read `{}`: {e}", path.display())))?
            }
            (None, None) => Vec::new(),
        };
        if body.len() as u64 > MAX_FALLBACK_BODY {
            let at = raw.body_file.as_ref().map_or_else(|| field("body"), |_| field("body_file"));
            return Err(Invalid {
                span: raw.body_file.as_ref().map(|b| b.span()).or_else(|| raw.body.as_ref().map(|b| b.span())),
                field: at,
                message: format!("{} bytes: a fallback body is at most {MAX_FALLBACK_BODY}", body.len()),
            });
        }
        let mut headers = http::HeaderMap::new();
        for (name, value) in &raw.headers {
            let at = field(&format!("headers.{name}"));
            let header = http::HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| invalid(value, at.clone(), format!("`{name}` is not a header name")))?;
            if envelope_http::headers::is_hop_by_hop(header.as_str().as_bytes())
                || header == http::header::CONTENT_LENGTH
            {
                return Err(invalid(value, at, "the sidecar sets the framing and connection headers itself"));
            }
            let v = http::HeaderValue::from_str(value.get_ref())
                .map_err(|_| invalid(value, at, "not a valid header value"))?;
            headers.append(header, v);
        }
        if !body.is_empty() && !headers.contains_key(http::header::CONTENT_TYPE) {
            headers.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain; charset=utf-8"));
        }
        FallbackAnswer::Static { status, headers, body }
    };
    Ok(Fallback { on, answer })
}

/// A route's per-key limit: the engine's rate-limit config, the key (`header:<name>`, `param:<name>` of the
/// route's template, `client`), the cap on keys, and the scope (global needs `[shared]`).
fn resolve_key_limit(
    i: usize,
    l: &Spanned<RawKeyLimit>,
    matcher: &Spanned<RawMatch>,
    shared: bool,
) -> Result<KeyLimit, Invalid> {
    let field = |f: &str| format!("route[{i}].rate_limit.{f}");
    let raw = l.get_ref();
    let config = envelope_core::rate_limit::Config::per(raw.rate.0, raw.per.map_or(Duration::from_secs(1), |d| d.0))
        .burst(raw.burst.map_or(raw.rate.0, |b| b.0))
        .shadow(raw.shadow.unwrap_or(false))
        .build()
        .map_err(|e| invalid(l, format!("route[{i}].rate_limit"), e.to_string()))?;
    let key = match &raw.key {
        None => KeySource::Route,
        Some(k) => {
            let text = k.get_ref();
            if text == "client" {
                KeySource::Client
            } else if let Some(name) = text.strip_prefix("header:") {
                let name = http::HeaderName::from_bytes(name.as_bytes())
                    .map_err(|_| invalid(k, field("key"), format!("`{name}` is not a header name")))?;
                KeySource::Header(name)
            } else if let Some(name) = text.strip_prefix("param:") {
                let template = matcher.get_ref().path.as_deref().unwrap_or("");
                let index = template
                    .trim_start_matches('/')
                    .split('/')
                    .position(|seg| seg == format!("{{{name}}}"))
                    .ok_or_else(|| {
                        invalid(k, field("key"), format!("the route's `match.path` has no parameter `{{{name}}}`"))
                    })?;
                KeySource::Param(index)
            } else {
                return Err(invalid(k, field("key"), "`header:<name>`, `param:<name>` or `client`"));
            }
        }
    };
    let max_keys =
        bounded(raw.max_keys.as_ref(), field("max_keys"), 1, MAX_MAX_KEYS)?.map_or(DEFAULT_MAX_KEYS, |n| n as usize);
    let max_keys = std::num::NonZeroUsize::new(max_keys).unwrap_or(std::num::NonZeroUsize::MIN);
    let scope = match &raw.scope {
        Some(s) if *s.get_ref() == Scope::Global && !shared => {
            return Err(invalid(
                s,
                field("scope"),
                "a global limit needs the store it is shared through: add `[shared]` with `redis = \"redis://host:6379\"`",
            ));
        }
        Some(s) => *s.get_ref(),
        None => Scope::Local,
    };
    Ok(KeyLimit { config, key, max_keys, scope })
}

/// The tier of a route without one in the config: `/auth*` and `/payments*` are critical, `/analytics*` and
/// `/reports*` non-critical, everything else default (`envelope_http::tier`, the rule the Python middleware
/// applies too).
pub fn tier_by_path(prefix: &str) -> Tier {
    use envelope_core::shed::Priority;
    match envelope_http::tier::priority_by_path(prefix) {
        Priority::Critical => Tier::Critical,
        Priority::Default => Tier::Default,
        Priority::NonCritical => Tier::NonCritical,
    }
}

/// A route's retry: `envelope_core`'s defaults with what the file sets, validated by the engine (its own budget,
/// one per route).
fn resolve_retry(i: usize, name: &Spanned<String>, r: &RawRetry) -> Result<envelope_core::retry::Config, Invalid> {
    use envelope_core::retry::{Backoff, Growth, Jitter};
    let field = |f: &str| format!("route[{i}].retry.{f}");
    let base = r.base.map_or(envelope_core::retry::DEFAULT_BASE, |d| d.0);
    let max_delay = r.max_delay.map_or(envelope_core::retry::DEFAULT_MAX_DELAY, |d| d.0);
    let growth = match r.backoff.unwrap_or(BackoffKind::Exponential) {
        BackoffKind::Constant => Growth::Constant,
        BackoffKind::Linear => Growth::Linear,
        BackoffKind::Exponential => Growth::Exponential { multiplier: envelope_core::retry::DEFAULT_MULTIPLIER },
    };
    let jitter = match r.jitter.unwrap_or(JitterKind::Full) {
        JitterKind::None => Jitter::None,
        JitterKind::Full => Jitter::Full,
        JitterKind::Equal => Jitter::Equal,
        JitterKind::Decorrelated => Jitter::Decorrelated,
    };
    let backoff =
        Backoff::new(growth, base, max_delay, jitter).map_err(|e| invalid(name, field("backoff"), e.to_string()))?;
    let retry_on = match &r.retry_on {
        None => OutcomeSet::RETRYABLE,
        Some(list) => {
            let mut set = OutcomeSet::EMPTY;
            for (j, o) in list.iter().enumerate() {
                let outcome = Outcome::from_name(o.get_ref()).ok_or_else(|| {
                    let names: Vec<_> = Outcome::ALL.iter().map(|o| o.as_str()).collect();
                    invalid(
                        o,
                        format!("route[{i}].retry.retry_on[{j}]"),
                        format!("unknown outcome; one of {}", names.join(", ")),
                    )
                })?;
                set = set.with(outcome);
            }
            set
        }
    };
    let budget = match &r.budget {
        None => (
            envelope_core::retry::DEFAULT_RETRY_RATIO,
            envelope_core::retry::DEFAULT_MIN_PER_SECOND,
            envelope_core::retry::DEFAULT_TTL,
        ),
        Some(b) => (
            b.ratio.unwrap_or(envelope_core::retry::DEFAULT_RETRY_RATIO),
            b.min_per_second.unwrap_or(envelope_core::retry::DEFAULT_MIN_PER_SECOND),
            b.ttl.map_or(envelope_core::retry::DEFAULT_TTL, |d| d.0),
        ),
    };
    let budget = envelope_core::retry::RetryBudget::new(budget.2, budget.1, budget.0)
        .map_err(|e| invalid(name, field("budget"), e.to_string()))?;
    let mut config = envelope_core::retry::Config::builder().backoff(backoff).retry_on(retry_on).budget(budget);
    if let Some(n) = r.max_attempts {
        config = config.max_attempts(n.0);
    }
    config.build().map_err(|e| invalid(name, field("max_attempts"), e.to_string()))
}
