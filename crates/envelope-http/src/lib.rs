//! HTTP semantics for Envelope's policies: request ids, status-code-first classification, `Retry-After`,
//! idempotency and replayable bodies, RED metrics and access logs, as tower layers.
//!
//! This crate sits between the protocol-agnostic engine ([`envelope_core`]) and the sidecar. Its content is being
//! built (see the project's issues); today it only re-exports the engine so the workspace shows the layering.

pub use envelope_core;
