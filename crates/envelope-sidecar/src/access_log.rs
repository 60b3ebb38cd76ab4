//! One JSON line per request, on standard output.
//!
//! Fields: `ts_ms`, `request_id`, `trace_id` (W3C), `listener`, `route`, `method`, `status`, `upstream_status`, `attempts`,
//! `duration_ms`, `outcome`. Header values are never logged (so `Authorization` and `Cookie` cannot leak), and the
//! request id is logged only after validation (`envelope_http::request_id`), so every line is exactly one JSON
//! object whatever the client sends.

use std::io::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use envelope_core::Outcome;
use http::Method;
use serde_json::json;

/// What one request did.
#[derive(Debug)]
pub(crate) struct Entry<'a> {
    pub(crate) request_id: &'a str,
    pub(crate) trace_id: &'a str,
    pub(crate) listener: &'a str,
    pub(crate) route: Option<&'a str>,
    pub(crate) method: &'a Method,
    pub(crate) status: u16,
    pub(crate) upstream_status: Option<u16>,
    pub(crate) attempts: u32,
    pub(crate) duration: Duration,
    pub(crate) outcome: Outcome,
}

/// Writes `entry` as one line.
pub(crate) fn write(entry: &Entry<'_>) {
    let ts_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let line = json!({
        "ts_ms": ts_ms,
        "request_id": entry.request_id,
        "trace_id": entry.trace_id,
        "listener": entry.listener,
        "route": entry.route,
        "method": entry.method.as_str(),
        "status": entry.status,
        "upstream_status": entry.upstream_status,
        "attempts": entry.attempts,
        "duration_ms": entry.duration.as_secs_f64() * 1000.0,
        "outcome": entry.outcome.as_str(),
    });
    let mut bytes = line.to_string().into_bytes();
    bytes.push(b'\n');
    // A full or closed stdout must never fail a request: the line is dropped.
    let _ = std::io::stdout().lock().write_all(&bytes);
}
