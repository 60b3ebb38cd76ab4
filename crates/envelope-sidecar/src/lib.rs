//! The `envelope` sidecar as a library: configuration, the proxy stack, listeners.
//!
//! The source is laid out by part:
//!
//! | part | what |
//! |---|---|
//! | [`config`] | the config file: parse, validate, locate errors |
//! | `data` | the data plane: listeners, the request path, the way out to the upstreams, the live config |
//! | `control` | the sidecar's life ([`server`]: start, reload, drain) and the admin API |
//! | `observe` | metrics, traces, the access log, the history, [`quality`] scenarios |
//! | `tools` | operator tools: the [`demo`], [`generate`]d rules and dashboards, [`verify`] |
#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub, missing_debug_implementations)]

/// The config file, validated once (its own crate, shared with the Python package).
pub use envelope_config as config;
mod control;
mod data;
#[doc(hidden)]
pub mod fuzz;
mod observe;
mod tools;

pub use control::server;
pub use envelope_http;
pub use observe::quality;
pub use server::{ConfigFile, ReloadError, RunError, Sidecar};
pub use tools::{demo, generate, verify};
