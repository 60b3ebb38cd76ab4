//! The `envelope` sidecar as a library: configuration, the proxy stack, the admin listener.
#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub, missing_debug_implementations)]

pub mod config;

pub use envelope_http;
