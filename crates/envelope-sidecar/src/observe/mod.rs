//! Observability: what the sidecar tells about the requests it served.
//!
//! | module | what |
//! |---|---|
//! | `metrics` | Prometheus/OpenMetrics registry: RED per route, policies, listeners, SLOs |
//! | `telemetry` | request and attempt spans, exported over OTLP |
//! | `access_log` | one JSON line per request, written by a thread of its own |
//! | `history` | per-minute rollups in embedded SQLite, written by one background task |
//! | [`quality`] | quality scenarios: response measures judged against what was measured |

pub(crate) mod access_log;
pub(crate) mod history;
pub(crate) mod metrics;
pub mod quality;
pub(crate) mod telemetry;
