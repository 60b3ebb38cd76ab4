//! One JSON line per request, on standard output.
//!
//! Fields: `ts_ms`, `request_id`, `trace_id` (W3C), `listener`, `route`, `method`, `status`, `upstream_status`, `attempts`,
//! `duration_ms`, `outcome`, `fallback` (why the route's fallback answered, when it did) and `error` (the full cause of a failure the client was answered for with a stable
//! problem document). Header values are never logged (so `Authorization` and `Cookie` cannot leak), and the request
//! id is logged only after validation (`envelope_http::request_id`), so every line is exactly one JSON object
//! whatever the client sends.
//!
//! A request never waits for standard output: lines go through a bounded queue ([`QUEUE`] lines) to a writer thread
//! of their own, which writes them in batches. When the queue is full (standard output is slower than the traffic,
//! or nobody reads it) the line is dropped and counted in `envelope_access_log_dropped_total`.

use std::io::Write;
use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{LazyLock, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::metrics::counter::Counter;

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
    /// Why the route's fallback answered (the outcome is then `fallback`), if it did.
    pub(crate) fallback: Option<&'a str>,
    /// The full cause of a failure (the client got a stable, non-revealing `detail`).
    pub(crate) error: Option<&'a str>,
}

/// Lines waiting for the writer thread, at most.
pub(crate) const QUEUE: usize = 1024;

/// Lines dropped because the queue was full.
static DROPPED: LazyLock<Counter> = LazyLock::new(Counter::default);

/// The writer thread's queue (`None` if the thread could not be started: every line is then dropped).
static WRITER: OnceLock<Option<SyncSender<Vec<u8>>>> = OnceLock::new();

/// The counter of dropped lines (for the metrics registry).
pub(crate) fn dropped() -> Counter {
    DROPPED.clone()
}

fn writer() -> Option<&'static SyncSender<Vec<u8>>> {
    WRITER
        .get_or_init(|| {
            let (lines, queue) = sync_channel::<Vec<u8>>(QUEUE);
            let thread = std::thread::Builder::new().name("envelope-access-log".to_owned()).spawn(move || {
                let mut batch = Vec::with_capacity(64 * 1024);
                while let Ok(line) = queue.recv() {
                    batch.extend_from_slice(&line);
                    while batch.len() < 64 * 1024
                        && let Ok(line) = queue.try_recv()
                    {
                        batch.extend_from_slice(&line);
                    }
                    // A closed standard output loses the lines, nothing else.
                    let _ = std::io::stdout().lock().write_all(&batch);
                    batch.clear();
                }
            });
            thread.ok().map(|_| lines)
        })
        .as_ref()
}

/// Writes `entry` as one line.
pub(crate) fn write(entry: &Entry<'_>) {
    let ts_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let mut line = json!({
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
    if let Some(reason) = entry.fallback {
        line["fallback"] = reason.into();
    }
    if let Some(error) = entry.error {
        line["error"] = error.into();
    }
    let mut line = serde_json::to_vec(&line).unwrap_or_default();
    line.push(b'\n');
    if writer().is_none_or(|w| w.try_send(line).is_err()) {
        DROPPED.inc();
    }
}
