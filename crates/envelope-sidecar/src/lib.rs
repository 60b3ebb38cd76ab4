//! The `envelope` sidecar as a library: configuration, the proxy stack, listeners.
//!
//! | module | what |
//! |---|---|
//! | [`config`] | the config file: parse, validate, locate errors |
//! | `runtime` | the config as live objects: shedders, route tables, envelopes, upstream clients |
//! | `proxy` | the request path, top to bottom, in one function |
//! | `telemetry` | request and attempt spans, exported over OTLP |
//! | `history` | per-minute rollups in embedded SQLite, written by one background task |
//! | [`server`] | listeners, limits, reload, graceful drain |
//! | `connections` | a listener's `max_connections`, and idle connections giving way to new ones |
//! | `h1` | the listener's own HTTP/1.1 loop for the common case, with the connection timers |
//! | `hyper_io` | the same timers for the connections hyper serves |
//! | `client` | the own pooled HTTP/1.1 upstream client |
//! | [`demo`] | the sidecar in front of a built-in flaky service |
//! | [`generate`] | Prometheus SLO rules from the config |
//! | [`quality`] | quality scenarios: response measures judged against what was measured |
//! | [`verify`] | `envelope verify`: drive each scenario's load and fault against a running sidecar |
#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub, missing_debug_implementations)]

mod access_log;
mod admin;
mod client;
pub mod config;
mod connections;
pub mod demo;
#[doc(hidden)]
pub mod fuzz;
pub mod generate;
mod h1;
mod history;
mod hyper_io;
mod metrics;
mod proxy;
pub mod quality;
mod runtime;
pub mod server;
mod telemetry;
mod upstream;
pub mod verify;
mod wire;

pub use envelope_http;
pub use server::{ConfigFile, ReloadError, RunError, Sidecar};
