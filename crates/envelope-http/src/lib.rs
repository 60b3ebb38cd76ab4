//! HTTP semantics for Envelope's policies: what an HTTP exchange means to the policy engine.
//!
//! `envelope-core` decides from [`Outcome`](envelope_core::Outcome)s; this crate maps HTTP onto them and back:
//!
//! | module | what it does |
//! |---|---|
//! | [`request_id`] | keep a valid `X-Request-ID` or generate one; echo it; a tower layer |
//! | [`classify`] | status-code-first classification; `Retry-After` in both forms |
//! | [`idempotency`] | which requests may be sent again (method, `Idempotency-Key`) |
//! | [`body`] | request bodies replayable within a memory cap |
//! | [`problem`] | local errors as RFC 9457 `problem+json` responses, in one place |
//! | [`grpc`] | gRPC calls: `grpc-status` as outcomes, `grpc-timeout`, local answers as gRPC statuses |
//! | [`headers`] | hop-by-hop headers, `X-Forwarded-For` |
//! | [`observe`] | RED metrics and a JSON access log as tower layers |
//! | [`trace`] | W3C `traceparent`: continue or start a trace, pass it on |
//! | [`tier`] | the priority of a request by its path (critical, default, non-critical) |
#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub, missing_debug_implementations)]

pub mod body;
pub mod classify;
pub mod grpc;
pub mod headers;
pub mod idempotency;
pub mod observe;
pub mod problem;
pub mod request_id;
pub mod tier;
pub mod trace;

pub use envelope_core;
