//! The admin listener: health, readiness, metrics, a JSON view of the running config and policies, and operator
//! control of circuit breakers.
//!
//! | path | method | what |
//! |---|---|---|
//! | `/`, `/dashboard` | GET | the dashboard page: health, RED charts from the history, SLOs, breakers, scenarios |
//! | `/healthz` | GET | 200 while the process runs |
//! | `/readyz` | GET | 200 while serving, 503 once shutdown has begun |
//! | `/metrics` | GET | Prometheus / OpenMetrics text |
//! | `/api/v1/config` | GET | the resolved config |
//! | `/api/v1/routes` | GET | routes and their policies |
//! | `/api/v1/upstreams` | GET | upstreams, endpoints, bulkhead and rate-limit state |
//! | `/api/v1/breakers` | GET | every breaker's state and window |
//! | `/api/v1/slo` | GET | per route: objective, availability, error budget left, burn rates, alerts |
//! | `/api/v1/history` | GET | per-minute history of one `route`, `upstream` or `counter` over `minutes`, `hours` or `days` (default 1 day), summed by `step` (`minute`, `hour`, `day`; default: minute up to a day, else hour) |
//! | `/api/v1/breakers/{upstream}/force-open` | POST | force the breaker open |
//! | `/api/v1/breakers/{upstream}/force-close` | POST | force the breaker closed |
//! | `/api/v1/breakers/{upstream}/reset` | POST | back to closed with an empty window |
//! | `/api/v1/events` | GET | the latest circuit-breaker transitions (up to 256), newest first |
//! | `/api/v1/scenarios` | GET | each quality scenario's response measures, judged on live traffic over its window |
//! | `/api/v1/faults` | GET | faults being injected, per upstream |
//! | `/api/v1/faults/{upstream}` | POST | inject a fault into the upstream's attempts (JSON: `abort_status`, `abort_percent`, `delay_ms`, `delay_percent`, `duration_ms` ≤ 1 h) |
//! | `/api/v1/faults/{upstream}` | DELETE | stop injecting |
//!
//! State-changing calls need `Authorization: Bearer <token>`, the token being read from the environment variable
//! named by `admin.token_env` (default `ENVELOPE_ADMIN_TOKEN`); with no token set they are refused. Other methods
//! on these paths answer 405 and change nothing. The token is compared in constant time, whatever the lengths.
//!
//! Every request's `Host` must name a loopback host (`localhost`, `*.localhost`, a loopback address), the admin
//! listener's own address, or one of `admin.allowed_hosts`; others are refused with 421. A web page cannot then
//! read the API from a browser on the same machine by pointing its own name at 127.0.0.1 (DNS rebinding).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use serde_json::{Value, json};

use crate::data::runtime::Runtime;
use crate::data::upstream::FaultSpec;
use crate::observe::history::{History, Subject};
use crate::observe::metrics::Metrics;

#[derive(Clone)]
pub(crate) struct AdminState {
    /// Distributed mode's fleet, if any.
    pub(crate) shared: crate::control::shared::SharedSlot,
    pub(crate) runtime: Arc<arc_swap::ArcSwap<Runtime>>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) token: Option<String>,
    pub(crate) draining: Arc<AtomicBool>,
    pub(crate) history: Arc<History>,
}

pub(crate) fn router(state: AdminState) -> Router {
    let hosts = Arc::new(AllowedHosts::new(&state.runtime.load().config.admin));
    Router::new()
        .route("/", get(dashboard))
        .route("/dashboard", get(dashboard))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/v1/config", get(config))
        .route("/api/v1/routes", get(routes))
        .route("/api/v1/upstreams", get(upstreams))
        .route("/api/v1/breakers", get(breakers))
        .route("/api/v1/shared", get(shared))
        .route("/api/v1/listeners", get(listeners))
        .route("/api/v1/slo", get(slo))
        .route("/api/v1/history", get(history))
        .route("/api/v1/breakers/{upstream}/{action}", post(breaker_action))
        .route("/api/v1/events", get(events))
        .route("/api/v1/scenarios", get(scenarios))
        .route("/api/v1/faults", get(faults))
        .route("/api/v1/faults/{upstream}", post(inject_fault).delete(clear_fault))
        .with_state(state)
        .layer(axum::middleware::from_fn(move |req: axum::extract::Request, next: axum::middleware::Next| {
            let hosts = hosts.clone();
            async move {
                if !hosts.allows(&req) {
                    return (StatusCode::MISDIRECTED_REQUEST, "this host name is not the admin listener's\n")
                        .into_response();
                }
                next.run(req).await
            }
        }))
}

/// The `Host` values the admin listener answers to.
#[derive(Debug)]
struct AllowedHosts {
    /// The listener's own address (a non-loopback listen), and the configured names.
    names: Vec<String>,
}

impl AllowedHosts {
    fn new(admin: &crate::config::Admin) -> Self {
        let mut names = admin.allowed_hosts.clone();
        if !admin.listen.ip().is_unspecified() {
            names.push(admin.listen.ip().to_string());
        }
        AllowedHosts { names }
    }

    /// Whether the request's `Host` (or, on HTTP/2, its authority) is one to answer. A request with neither is no
    /// browser's: it is answered.
    fn allows(&self, req: &axum::extract::Request) -> bool {
        let host = match req.headers().get(header::HOST) {
            Some(v) => match v.to_str() {
                Ok(v) => v,
                Err(_) => return false,
            },
            None => match req.uri().authority() {
                Some(a) => a.as_str(),
                None => return true,
            },
        };
        let name = host_name(host).to_ascii_lowercase();
        let bare = name.trim_start_matches('[').trim_end_matches(']');
        name == "localhost"
            || name.ends_with(".localhost")
            || bare.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
            || self.names.iter().any(|n| n.trim_start_matches('[').trim_end_matches(']') == bare)
    }
}

/// The name in a `Host` value, without its port.
fn host_name(host: &str) -> &str {
    if host.starts_with('[') {
        return host.find(']').map_or(host, |end| &host[..=end]);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

/// The dashboard: one self-contained page (no build step, no external resource) that polls the JSON API.
async fn dashboard() -> Response {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CACHE_CONTROL, "no-store")],
        include_str!("dashboard.html"),
    )
        .into_response()
}

async fn readyz(State(s): State<AdminState>) -> Response {
    if s.draining.load(Ordering::Acquire) {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else {
        (StatusCode::OK, "ready\n").into_response()
    }
}

async fn slo(State(s): State<AdminState>) -> axum::Json<Value> {
    let rt = s.runtime.load();
    let names = ["5m", "30m", "1h", "6h", "3d", "30d"];
    let all: Vec<Value> = rt
        .listeners
        .iter()
        .flat_map(|l| l.routes.iter())
        .map(|r| {
            let o = r.slo.objective();
            let rep = r.slo.report();
            let per_window = |values: &[f64; 6]| -> Value {
                names
                    .iter()
                    .zip(values)
                    .map(|(n, v)| ((*n).to_owned(), json!(v)))
                    .collect::<serde_json::Map<_, _>>()
                    .into()
            };
            json!({
                "route": r.spec.name,
                "tier": format!("{:?}", r.spec.tier),
                "objective": {
                    "availability": o.availability,
                    "latency_threshold_ms": o.latency_threshold.as_millis() as u64,
                    "latency_percentile": o.latency_percentile,
                },
                "events": names.iter().zip(rep.windows).map(|(n, c)| ((*n).to_owned(), json!({
                    "total": c.total, "errors": c.errors, "slow": c.slow,
                }))).collect::<serde_json::Map<_, _>>(),
                "availability": rep.availability,
                "error_budget_remaining": rep.budget_remaining,
                "burn_rates": per_window(&rep.burn_rates),
                "alert": format!("{:?}", rep.alert).to_lowercase(),
                "latency_budget_remaining": rep.latency_budget_remaining,
                "latency_burn_rates": per_window(&rep.latency_burn_rates),
                "latency_alert": format!("{:?}", rep.latency_alert).to_lowercase(),
                "latencies": rep.latencies.iter().map(|l| json!({
                    "objective": crate::config::SloSpec::latency_name(&l.objective),
                    "percentile": l.objective.percentile,
                    "threshold_ms": l.objective.threshold.as_secs_f64() * 1000.0,
                    "slow": names.iter().zip(l.slow).map(|(n, s)| ((*n).to_owned(), json!(s))).collect::<serde_json::Map<_, _>>(),
                    "budget_remaining": l.budget_remaining,
                    "burn_rates": per_window(&l.burn_rates),
                    "alert": format!("{:?}", l.alert).to_lowercase(),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    axum::Json(json!(all))
}

async fn metrics(State(s): State<AdminState>, headers: HeaderMap) -> Response {
    let rt = s.runtime.load();
    for route in rt.listeners.iter().flat_map(|l| l.routes.iter()) {
        s.metrics.slo(&route.spec.name, &route.slo.report());
    }
    for (spec, live) in rt.config.listeners.iter().zip(&rt.listeners) {
        s.metrics.concurrency(&spec.name, &live.shedder.metrics());
    }
    for u in &rt.upstreams {
        if let Some(b) = &u.bulkhead {
            s.metrics.bulkhead(&u.spec.name, &b.metrics());
        }
    }
    let openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/openmetrics-text"));
    if openmetrics {
        let content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8";
        ([(header::CONTENT_TYPE, content_type)], s.metrics.encode_openmetrics()).into_response()
    } else {
        ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], s.metrics.encode_prometheus())
            .into_response()
    }
}

async fn config(State(s): State<AdminState>) -> axum::Json<Value> {
    let rt = s.runtime.load();
    let c = &rt.config;
    axum::Json(json!({
        "admin": { "listen": c.admin.listen.to_string(), "token_env": c.admin.token_env },
        "listeners": c.listeners.iter().map(|l| json!({
            "name": l.name,
            "listen": l.listen.to_string(),
            "shedding": l.shedding.limit().to_string(),
            "max_connections": l.max_connections,
            "header_read_timeout_ms": l.header_read_timeout.as_millis() as u64,
            "max_header_bytes": l.max_header_bytes,
            "max_headers": l.max_headers,
            "max_uri_bytes": l.max_uri_bytes,
            "max_body_bytes": l.max_body_bytes,
            "drain_timeout_ms": l.drain_timeout.as_millis() as u64,
        })).collect::<Vec<_>>(),
        "upstreams": c.upstreams.iter().map(|u| upstream_json(u, None)).collect::<Vec<_>>(),
        "routes": c.routes.iter().map(|r| route_json(r, c)).collect::<Vec<_>>(),
    }))
}

fn upstream_json(u: &crate::config::Upstream, live: Option<&crate::data::upstream::UpstreamRt>) -> Value {
    let mut v = json!({
        "name": u.name,
        "endpoints": u.endpoints.iter().map(|e| format!("{}://{}", e.scheme, e.authority)).collect::<Vec<_>>(),
        "connect_timeout_ms": u.connect_timeout.as_millis() as u64,
        "bulkhead": u.bulkhead.as_ref().map(|b| json!({
            "max_concurrent": b.max_concurrent(), "queue": b.max_queue(), "queue_timeout_ms": b.max_wait().as_millis() as u64,
        })),
        "breaker": u.breaker.as_ref().map(|b| json!({
            "window": format!("{:?}", b.config.window()), "min_calls": b.config.minimum_calls(),
            "failure_rate": b.config.failure_rate_threshold(),
            "open_for_ms": b.config.open_duration().as_millis() as u64, "half_open_calls": b.config.half_open_calls(),
        })),
        "rate_limit": u.rate_limit.as_ref().map(|r| json!({
            "rate": r.rate(), "per_ms": r.period().as_millis() as u64, "burst": r.burst(), "shadow": r.shadow(),
            "scope": if u.rate_limit_scope == crate::config::Scope::Global { "global" } else { "local" },
        })),
        "breaker_shared": u.breaker.as_ref().is_some_and(|b| b.shared),
    });
    if let Some(live) = live {
        v["endpoints_healthy"] = json!((0..u.endpoints.len()).map(|i| live.healthy(i)).collect::<Vec<_>>());
        if let Some(b) = &live.bulkhead {
            let m = b.metrics();
            v["bulkhead_now"] = json!({ "active": m.active, "queued": m.queued, "rejected": m.rejected });
        }
        if let Some(r) = &live.rate_limit {
            let m = r.metrics();
            v["rate_limit_now"] = json!({ "allowed": m.allowed, "limited": m.limited });
        }
        if let Some(b) = &live.breaker {
            v["breaker_state"] = json!(b.state().as_str());
        }
    }
    v
}

fn route_json(r: &crate::config::Route, c: &crate::config::Config) -> Value {
    json!({
        "name": r.name,
        "listener": c.listeners[r.listener].name,
        "path_prefix": r.matcher.path_prefix,
        "template": r.matcher.template.is_some(),
        "methods": r.matcher.methods.as_ref().map(|m| m.iter().map(|m| m.as_str().to_owned()).collect::<Vec<_>>()),
        "strip_prefix": r.strip_prefix,
        "upstream": c.upstreams[r.upstream].name,
        "tier": format!("{:?}", r.tier),
        "timeout_ms": r.timeout.as_millis() as u64,
        "attempt_timeout_ms": r.attempt_timeout.map(|d| d.as_millis() as u64),
        "retry": r.retry.as_ref().map(|x| {
            let (ttl, min_per_second, ratio) = x.budget().map_or((Duration::ZERO, 0, 0.0), |b| b.settings());
            json!({
                "max_attempts": x.max_attempts(),
                "retry_on": x.retry_on().iter().map(|o| o.as_str()).collect::<Vec<_>>(),
                "budget": { "ratio": ratio, "min_per_second": min_per_second, "ttl_ms": ttl.as_millis() as u64 },
            })
        }),
        "fail_on_status": r.fail_on_status.iter().map(|s| s.as_u16()).collect::<Vec<_>>(),
        "replay_limit": r.replay_limit,
    })
}

async fn history(State(s): State<AdminState>, Query(q): Query<std::collections::HashMap<String, String>>) -> Response {
    let bad = |msg: String| json_error(StatusCode::BAD_REQUEST, msg);
    let subject = match (q.get("route"), q.get("upstream"), q.get("counter")) {
        (Some(r), None, None) => Subject::Route(r.clone()),
        (None, Some(u), None) => Subject::Upstream(u.clone()),
        (None, None, Some(c)) => Subject::Counter(c.clone()),
        _ => return bad("give exactly one of `route`, `upstream`, `counter`".to_owned()),
    };
    let mut span = None;
    for (key, unit) in [("minutes", 60u64), ("hours", 3600), ("days", 86_400)] {
        if let Some(v) = q.get(key) {
            match v.parse::<u64>() {
                Ok(n) if (1..=366 * 86_400 / unit).contains(&n) && span.is_none() => {
                    span = Some(std::time::Duration::from_secs(n * unit));
                }
                _ => return bad(format!("`{key}` must be a whole number of at most a year (and alone)")),
            }
        }
    }
    let span = span.unwrap_or(std::time::Duration::from_secs(86_400));
    let step = match q.get("step").map(String::as_str) {
        None if span <= std::time::Duration::from_secs(86_400) => 60,
        None | Some("hour") => 3600,
        Some("minute") => 60,
        Some("day") => 86_400,
        Some(other) => return bad(format!("unknown step `{other}`: minute, hour or day")),
    };
    let step = std::time::Duration::from_secs(step);
    let history = s.history.clone();
    from_history(move || history.query(&subject, span, step)).await
}

/// A JSON error answer: `{"error": message}`.
fn json_error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(json!({ "error": message.into() }))).into_response()
}

/// Runs a read of the history (blocking: SQLite) off the runtime's workers and answers with its JSON.
async fn from_history(read: impl FnOnce() -> Result<Value, String> + Send + 'static) -> Response {
    match tokio::task::spawn_blocking(read).await {
        Ok(Ok(v)) => axum::Json(v).into_response(),
        Ok(Err(e)) => json_error(StatusCode::INTERNAL_SERVER_ERROR, e),
        Err(_) => json_error(StatusCode::INTERNAL_SERVER_ERROR, "the history read panicked"),
    }
}

/// The answer for an upstream name that is not in the config.
fn no_upstream(name: &str) -> Response {
    (StatusCode::NOT_FOUND, format!("no upstream `{name}`\n")).into_response()
}

async fn events(State(s): State<AdminState>) -> axum::Json<Value> {
    let all: Vec<Value> = s
        .metrics
        .recent_transitions()
        .iter()
        .rev()
        .map(|t| {
            let ms = t.at.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
            json!({ "at_ms": ms, "upstream": t.upstream, "kind": "breaker_transition",
                    "from": t.from.as_str(), "to": t.to.as_str() })
        })
        .collect();
    axum::Json(json!(all))
}

async fn scenarios(State(s): State<AdminState>) -> Response {
    let rt = s.runtime.load_full();
    let history = s.history.clone();
    from_history(move || {
        let judged = rt.config.scenarios.iter().map(|sc| {
            let m = history.measure(sc)?;
            Ok(crate::observe::quality::scenario_json(sc, &m, &crate::observe::quality::judge(&sc.expect, &m)))
        });
        Ok(Value::Array(judged.collect::<Result<_, String>>()?))
    })
    .await
}

async fn routes(State(s): State<AdminState>) -> axum::Json<Value> {
    let rt = s.runtime.load();
    let c = &rt.config;
    axum::Json(json!(c.routes.iter().map(|r| route_json(r, c)).collect::<Vec<_>>()))
}

async fn upstreams(State(s): State<AdminState>) -> axum::Json<Value> {
    let all: Vec<Value> = s.runtime.load().upstreams.iter().map(|u| upstream_json(&u.spec, Some(u))).collect();
    axum::Json(json!(all))
}

/// Each listener's concurrency limit now and, for an adaptive one, its inputs: the baseline latency it aims near
/// and the last window's mean latency (Envoy's adaptive concurrency filter exports the same).
async fn listeners(State(s): State<AdminState>) -> axum::Json<Value> {
    let rt = s.runtime.load();
    let all: Vec<Value> = rt
        .config
        .listeners
        .iter()
        .zip(&rt.listeners)
        .map(|(spec, live)| {
            let m = live.shedder.metrics();
            let ms = |d: Option<std::time::Duration>| d.map(|d| d.as_secs_f64() * 1000.0);
            json!({
                "listener": spec.name,
                "adaptive": !matches!(spec.shedding.limit(), envelope_core::shed::Limit::Fixed(_)),
                "limit": m.limit,
                "in_flight": m.in_flight,
                "shed": m.shed,
                "baseline_latency_ms": ms(m.baseline_latency),
                "sampled_latency_ms": ms(m.sampled_latency),
            })
        })
        .collect();
    axum::Json(json!(all))
}

/// Distributed mode: whether the shared breakers follow their fleet or decide alone, and why. Readiness does not
/// depend on it (a sidecar whose store is down still serves).
async fn shared(State(s): State<AdminState>) -> axum::Json<Value> {
    let status = crate::control::shared::lock_shared(&s.shared).as_ref().map(|f| f.status());
    axum::Json(match status {
        None => json!({ "enabled": false }),
        Some(st) => json!({
            "enabled": true,
            "store": st.store,
            "instance": st.instance,
            "synced": st.synced,
            "degraded_for_ms": st.degraded_for.map(|d| d.as_millis() as u64),
            "last_error": st.last_error,
            "breakers": st.breakers,
        }),
    })
}

async fn breakers(State(s): State<AdminState>) -> axum::Json<Value> {
    let all: Vec<Value> = s
        .runtime
        .load()
        .upstreams
        .iter()
        .filter_map(|u| u.breaker.as_ref())
        .map(|b| {
            let m = b.metrics();
            json!({
                "upstream": b.name(),
                "state": m.state.as_str(),
                "calls": m.window.calls,
                "failed_calls": m.window.failures,
                "slow_calls": m.window.slow,
                "failure_rate": m.failure_rate,
                "slow_call_rate": m.slow_call_rate,
                "consecutive_opens": m.consecutive_opens,
                "remaining_open_ms": m.remaining_open.map(|d| d.as_millis() as u64),
            })
        })
        .collect();
    axum::Json(json!(all))
}

/// Checks the bearer token of a state-changing call: the refusal to answer with (403 without a configured token,
/// 401 without a matching one), or `None` to go ahead.
fn refusal(s: &AdminState, headers: &HeaderMap) -> Option<Response> {
    let Some(expected) = s.token.as_deref() else {
        return Some(
            (StatusCode::FORBIDDEN, "no admin token is configured; state changes are disabled\n").into_response(),
        );
    };
    let given =
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    if !given.is_some_and(|g| constant_time_eq(g.as_bytes(), expected.as_bytes())) {
        return Some(
            (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, "Bearer")], "a valid bearer token is required\n")
                .into_response(),
        );
    }
    None
}

async fn breaker_action(
    State(s): State<AdminState>,
    Path((upstream, action)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Some(refused) = refusal(&s, &headers) {
        return refused;
    }
    let rt = s.runtime.load();
    let Some(breaker) = rt.upstream_named(&upstream).and_then(|u| u.breaker.as_ref()) else {
        return (StatusCode::NOT_FOUND, format!("no breaker for upstream `{upstream}`\n")).into_response();
    };
    match action.as_str() {
        "force-open" => breaker.force_open(),
        "force-close" => breaker.force_closed(),
        "reset" => breaker.reset(),
        _ => return (StatusCode::NOT_FOUND, "actions: force-open, force-close, reset\n").into_response(),
    }
    axum::Json(json!({ "upstream": upstream, "state": breaker.state().as_str() })).into_response()
}

/// A fault as the admin API takes it.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultRequest {
    abort_status: Option<u16>,
    #[serde(default)]
    abort_percent: Option<f64>,
    delay_ms: Option<u64>,
    delay_percent: Option<f64>,
    duration_ms: u64,
}

impl FaultRequest {
    fn spec(&self) -> FaultSpec {
        FaultSpec {
            abort_status: self.abort_status,
            abort_percent: self.abort_percent.unwrap_or(if self.abort_status.is_some() { 100.0 } else { 0.0 }),
            delay: self.delay_ms.map(std::time::Duration::from_millis),
            delay_percent: self.delay_percent.unwrap_or(if self.delay_ms.is_some() { 100.0 } else { 0.0 }),
            duration: std::time::Duration::from_millis(self.duration_ms),
        }
    }
}

fn fault_json(u: &crate::data::upstream::UpstreamRt) -> Option<Value> {
    let f = u.faults.current()?;
    let remaining = u.faults.until().map(|t| t.saturating_duration_since(tokio::time::Instant::now()));
    Some(json!({
        "upstream": u.spec.name,
        "abort_status": f.abort.map(|_| u.fault_status.load(Ordering::Relaxed)),
        "abort_percent": f.abort_percent,
        "delay_ms": f.delay.map(|d| d.as_millis() as u64),
        "delay_percent": f.delay_percent,
        "remaining_ms": remaining.map(|d| d.as_millis() as u64),
    }))
}

async fn faults(State(s): State<AdminState>) -> axum::Json<Value> {
    axum::Json(json!(s.runtime.load().upstreams.iter().filter_map(|u| fault_json(u)).collect::<Vec<_>>()))
}

async fn inject_fault(
    State(s): State<AdminState>,
    Path(upstream): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(refused) = refusal(&s, &headers) {
        return refused;
    }
    let bad = |msg: String| json_error(StatusCode::BAD_REQUEST, msg);
    let request: FaultRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return bad(format!("invalid fault: {e}")),
    };
    let rt = s.runtime.load();
    let Some(u) = rt.upstream_named(&upstream) else { return no_upstream(&upstream) };
    match u.inject(&request.spec()) {
        Ok(()) => axum::Json(fault_json(u).unwrap_or(Value::Null)).into_response(),
        Err(e) => bad(e),
    }
}

async fn clear_fault(State(s): State<AdminState>, Path(upstream): Path<String>, headers: HeaderMap) -> Response {
    if let Some(refused) = refusal(&s, &headers) {
        return refused;
    }
    let rt = s.runtime.load();
    let Some(u) = rt.upstream_named(&upstream) else { return no_upstream(&upstream) };
    u.faults.clear();
    StatusCode::NO_CONTENT.into_response()
}

/// Compares secrets without an early exit on the first differing byte.
/// Whether `given` equals `expected`, in a time that depends on `expected`'s length only: every byte of
/// `expected` is compared whatever `given` is, and a length mismatch is folded in rather than returned early.
fn constant_time_eq(given: &[u8], expected: &[u8]) -> bool {
    let mut diff = u8::from(given.len() != expected.len());
    for (i, e) in expected.iter().enumerate() {
        diff |= std::hint::black_box(given.get(i).copied().unwrap_or(0) ^ e);
    }
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod host_tests {
    use super::*;

    #[test]
    fn host_names_lose_their_port_only() {
        for (host, name) in [
            ("localhost", "localhost"),
            ("localhost:9901", "localhost"),
            ("[::1]:9901", "[::1]"),
            ("[::1]", "[::1]"),
            ("127.0.0.1:80", "127.0.0.1"),
            ("a:b", "a:b"),
        ] {
            assert_eq!(host_name(host), name, "{host}");
        }
    }

    #[test]
    fn tokens_compare_whole_whatever_their_lengths() {
        assert!(constant_time_eq(b"s3cret", b"s3cret"));
        for given in [&b""[..], b"s", b"s3cre", b"s3cret!", b"s3creT", b"x3cret", b"s3cret\0"] {
            assert!(!constant_time_eq(given, b"s3cret"), "{given:?}");
        }
        assert!(!constant_time_eq(b"", b"a"));
        assert!(constant_time_eq(b"", b""));
    }
}
