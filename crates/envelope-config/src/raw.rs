//! The config file as written: serde structures that mirror the TOML, with `deny_unknown_fields` everywhere.
//! Values that can be checked alone are checked while parsing (units, ranges); cross-references are checked when
//! the raw config is resolved (`super::resolve`).

use std::net::SocketAddr;

use serde::Deserialize;
use toml::Spanned;

use super::units::{Dur, NonZero, Percent, PositiveDur};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    #[serde(default)]
    pub(crate) admin: RawAdmin,
    #[serde(default, rename = "listener")]
    pub(crate) listeners: Vec<RawListener>,
    #[serde(default, rename = "upstream")]
    pub(crate) upstreams: Vec<RawUpstream>,
    #[serde(default, rename = "route")]
    pub(crate) routes: Vec<RawRoute>,
    #[serde(default)]
    pub(crate) history: RawHistory,
    #[serde(default, rename = "counter")]
    pub(crate) counters: Vec<RawCounter>,
    #[serde(default, rename = "scenario")]
    pub(crate) scenarios: Vec<RawScenario>,
    pub(crate) tracing: Option<RawTracing>,
    pub(crate) shared: Option<Spanned<RawShared>>,
    #[serde(default)]
    pub(crate) alerts: RawAlerts,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAlerts {
    pub(crate) runbook_base_url: Option<Spanned<String>>,
    pub(crate) window_scale: Option<Spanned<u64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawShared {
    pub(crate) redis: Spanned<String>,
    pub(crate) key_prefix: Option<Spanned<String>>,
    pub(crate) op_timeout: Option<PositiveDur>,
    pub(crate) sync_interval: Option<PositiveDur>,
    pub(crate) instance: Option<Spanned<String>>,
    pub(crate) ca_file: Option<Spanned<String>>,
    pub(crate) cluster: Option<Spanned<bool>>,
    pub(crate) sentinel: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTracing {
    pub(crate) otlp_endpoint: Spanned<String>,
    pub(crate) service_name: Option<String>,
    pub(crate) export_interval: Option<PositiveDur>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawScenario {
    pub(crate) name: Spanned<String>,
    pub(crate) route: Spanned<String>,
    pub(crate) request: Option<RawScenarioRequest>,
    pub(crate) load: Option<RawLoad>,
    pub(crate) fault: Option<RawScenarioFault>,
    pub(crate) expect: Spanned<RawExpect>,
    pub(crate) window: Option<PositiveDur>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawScenarioRequest {
    pub(crate) method: Option<Spanned<String>>,
    pub(crate) path: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLoad {
    pub(crate) rate: NonZero,
    pub(crate) duration: PositiveDur,
    pub(crate) concurrency: Option<NonZero>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawScenarioFault {
    pub(crate) upstream: Spanned<String>,
    pub(crate) abort_status: Option<Spanned<u16>>,
    pub(crate) abort_percent: Option<Percent>,
    pub(crate) delay: Option<PositiveDur>,
    pub(crate) delay_percent: Option<Percent>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawExpect {
    pub(crate) success_rate: Option<Percent>,
    pub(crate) p99: Option<PositiveDur>,
    pub(crate) fast_fail_p99: Option<PositiveDur>,
    #[serde(default)]
    pub(crate) counters: std::collections::BTreeMap<String, u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHistory {
    pub(crate) path: Option<String>,
    pub(crate) retention: Option<PositiveDur>,
    pub(crate) flush_interval: Option<PositiveDur>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCounter {
    pub(crate) name: Spanned<String>,
    pub(crate) route: Option<Spanned<String>>,
    #[serde(rename = "match")]
    pub(crate) matcher: Option<Spanned<RawMatch>>,
    pub(crate) status: Option<Vec<Spanned<String>>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAdmin {
    pub(crate) listen: Option<Spanned<SocketAddr>>,
    pub(crate) allow_non_loopback: Option<bool>,
    pub(crate) token_env: Option<String>,
    pub(crate) allowed_hosts: Option<Vec<Spanned<String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawListener {
    pub(crate) name: Spanned<String>,
    pub(crate) listen: SocketAddr,
    pub(crate) max_concurrent: Option<NonZero>,
    /// `true`, or a table tuning it (read by hand, for errors that name the key).
    pub(crate) adaptive_concurrency: Option<Spanned<toml::Value>>,
    pub(crate) max_connections: Option<Spanned<NonZero>>,
    pub(crate) header_read_timeout: Option<PositiveDur>,
    pub(crate) keepalive_timeout: Option<PositiveDur>,
    pub(crate) engine: Option<Engine>,
    pub(crate) underscores_in_headers: Option<Underscores>,
    pub(crate) max_header_bytes: Option<Spanned<NonZero>>,
    pub(crate) max_headers: Option<Spanned<NonZero>>,
    pub(crate) max_uri_bytes: Option<Spanned<NonZero>>,
    pub(crate) max_body_bytes: Option<Spanned<u64>>,
    pub(crate) drain_timeout: Option<Dur>,
    pub(crate) access_log: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawUpstream {
    pub(crate) name: Spanned<String>,
    pub(crate) endpoints: Spanned<Vec<Spanned<String>>>,
    pub(crate) connect_timeout: Option<PositiveDur>,
    pub(crate) idle_timeout: Option<PositiveDur>,
    pub(crate) max_idle_per_endpoint: Option<usize>,
    pub(crate) ca_file: Option<Spanned<String>>,
    pub(crate) bulkhead: Option<RawBulkhead>,
    pub(crate) breaker: Option<Spanned<RawBreaker>>,
    pub(crate) rate_limit: Option<RawRateLimit>,
    pub(crate) protocol: Option<Protocol>,
}

/// The HTTP version spoken to an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// HTTP/1.1 on pooled keep-alive connections.
    #[default]
    Http1,
    /// HTTP/2: over TLS by ALPN for `https` endpoints, with prior knowledge (h2c) for `http` ones. Required for
    /// gRPC.
    Http2,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBulkhead {
    pub(crate) max_concurrent: NonZero,
    pub(crate) queue: Option<u32>,
    pub(crate) queue_timeout: Option<Dur>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBreaker {
    pub(crate) window: Option<RawWindow>,
    pub(crate) min_calls: Option<NonZero>,
    pub(crate) failure_rate: Option<Percent>,
    pub(crate) slow_call: Option<RawSlowCall>,
    pub(crate) open_for: Option<PositiveDur>,
    pub(crate) max_open_for: Option<PositiveDur>,
    pub(crate) half_open_calls: Option<NonZero>,
    pub(crate) max_half_open_wait: Option<PositiveDur>,
    pub(crate) mode: Option<BreakerMode>,
    pub(crate) shared: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawWindow {
    pub(crate) count: Option<NonZero>,
    pub(crate) seconds: Option<NonZero>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSlowCall {
    pub(crate) duration: PositiveDur,
    pub(crate) rate: Percent,
}

/// What serves a listener's HTTP/1 connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Engine {
    /// The listener's own HTTP/1.1 loop for the common case, hyper for the rest (HTTP/2, upgrades, `Expect`).
    Auto,
    /// hyper for every connection: the reference the own loop is tested against, and a fallback.
    Hyper,
}

/// What a listener does with request headers whose names contain `_` (which some servers read as `-`, so a
/// `transfer_encoding` header could mean different things to the proxy and to the service behind it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Underscores {
    /// Drop them before forwarding, and count them (nginx's default).
    Drop,
    /// Answer 400.
    Reject,
    /// Forward them as they are.
    Allow,
}

/// How an upstream's breaker behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerMode {
    /// The breaker opens and closes by itself.
    Normal,
    /// Every call passes; nothing is recorded.
    Disabled,
    /// Calls are recorded and would-trip events emitted, but the breaker never opens.
    MetricsOnly,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRateLimit {
    pub(crate) rate: NonZero,
    pub(crate) per: Option<PositiveDur>,
    pub(crate) burst: Option<NonZero>,
    pub(crate) shadow: Option<bool>,
    pub(crate) scope: Option<Spanned<Scope>>,
    pub(crate) lease: Option<Spanned<NonZero>>,
}

/// Whose limit a rate limit is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Each instance's own.
    Local,
    /// One limit for every instance, through `[shared]`.
    Global,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRoute {
    pub(crate) name: Spanned<String>,
    pub(crate) listener: Option<Spanned<String>>,
    #[serde(rename = "match")]
    pub(crate) matcher: Spanned<RawMatch>,
    pub(crate) strip_prefix: Option<bool>,
    pub(crate) idempotent: Option<bool>,
    pub(crate) upstream: Spanned<String>,
    pub(crate) tier: Option<Tier>,
    pub(crate) timeout: Option<PositiveDur>,
    pub(crate) attempt_timeout: Option<PositiveDur>,
    pub(crate) retry: Option<RawRetry>,
    #[serde(default)]
    pub(crate) fail_on_status: Vec<Spanned<u16>>,
    pub(crate) replay_limit: Option<Spanned<u64>>,
    pub(crate) rate_limit: Option<Spanned<RawKeyLimit>>,
    pub(crate) fallback: Option<Spanned<RawFallback>>,
    pub(crate) hedge: Option<Spanned<RawHedge>>,
    pub(crate) slo: Option<Spanned<RawSlo>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSlo {
    pub(crate) availability: Option<Spanned<f64>>,
    /// One `{ percentile, under }` table or a list of them (read by hand, for errors that say which).
    pub(crate) latency: Option<Spanned<toml::Value>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHedge {
    pub(crate) delay: Spanned<String>,
    pub(crate) max_extra: Option<Spanned<u64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFallback {
    pub(crate) on: Spanned<Vec<Spanned<String>>>,
    pub(crate) upstream: Option<Spanned<String>>,
    pub(crate) status: Option<Spanned<u16>>,
    pub(crate) body: Option<Spanned<String>>,
    pub(crate) body_file: Option<Spanned<String>>,
    #[serde(default)]
    pub(crate) headers: std::collections::BTreeMap<String, Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawKeyLimit {
    pub(crate) rate: NonZero,
    pub(crate) per: Option<PositiveDur>,
    pub(crate) burst: Option<NonZero>,
    pub(crate) shadow: Option<bool>,
    pub(crate) key: Option<Spanned<String>>,
    pub(crate) max_keys: Option<Spanned<u64>>,
    pub(crate) scope: Option<Spanned<Scope>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMatch {
    pub(crate) path_prefix: Option<String>,
    pub(crate) path: Option<String>,
    pub(crate) methods: Option<Vec<Spanned<String>>>,
}

/// An SLO tier: what the route promises, and how important its traffic is when load must be shed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    /// Authentication, payments.
    Critical,
    /// API endpoints.
    Default,
    /// Analytics, reports.
    NonCritical,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRetry {
    pub(crate) max_attempts: Option<NonZero>,
    pub(crate) backoff: Option<BackoffKind>,
    pub(crate) base: Option<Dur>,
    pub(crate) max_delay: Option<Dur>,
    pub(crate) jitter: Option<JitterKind>,
    pub(crate) retry_on: Option<Vec<Spanned<String>>>,
    pub(crate) budget: Option<RawBudget>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum BackoffKind {
    Constant,
    Linear,
    Exponential,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum JitterKind {
    None,
    Full,
    Equal,
    Decorrelated,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBudget {
    pub(crate) ratio: Option<f32>,
    pub(crate) min_per_second: Option<u32>,
    pub(crate) ttl: Option<PositiveDur>,
}
