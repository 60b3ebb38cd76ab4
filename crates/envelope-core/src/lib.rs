//! Resilience policies for async and blocking Rust: keep a dependency's failures from becoming yours.
//!
//! `envelope-core` is the policy engine of Envelope. Each policy is usable on its own, as a plain call
//! (`policy.call(|| async { … })`), and composed in a fixed, documented order by [`Envelope`], which is also a
//! `tower` [`Layer`](tower_layer::Layer) ([`EnvelopeLayer`]) and has a blocking face
//! ([`Envelope::call_blocking`]).
//!
//! # Map
//! | module | what it does | anchor semantics |
//! |---|---|---|
//! | [`outcome`] | one taxonomy of outcomes; retryable? counts against a breaker? | |
//! | [`retry`] | attempts, backoff + jitter, `Retry-After`, deadline, budget | Envoy, Polly, tower `TpsBudget` |
//! | [`circuit_breaker`] | count/time windows, slow calls, half-open probes, forced states | resilience4j |
//! | [`timeout`] | cancel after a fixed time | tower, Envoy |
//! | [`bulkhead`] | concurrency cap with a bounded, timed queue | resilience4j, Envoy |
//! | [`rate_limit`] | GCRA, per key, shadow mode | Envoy local rate limit |
//! | [`shed`] | fixed or adaptive concurrency limit, priorities | Gradient2, SRE criticality |
//! | [`hedge`] | parallel attempts for slow calls | Polly hedging |
//! | [`fallback`] | degraded answer on chosen outcomes | Polly fallback |
//! | [`fault`] | injected failures and latency | Polly chaos, Envoy fault filter |
//! | [`compose`] | all of the above, in order | |
//! | [`slo`] | good/total events in rolling windows, error budgets, burn-rate alerts | Google SRE workbook |
//! | [`event`] | what policies did, for metrics and logs | resilience4j events |
//!
//! # Time
//! Every policy reads time through [`tokio::time`], so tests run on a paused clock.
//!
//! # Example
//! ```
//! use envelope_core::{Envelope, circuit_breaker::{CircuitBreaker, Config as BreakerConfig},
//!     retry::{Config as RetryConfig, Retry}, bulkhead::{Bulkhead, Config as BulkheadConfig}};
//! use std::time::Duration;
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
//! let envelope = Envelope::builder()
//!     .deadline(Duration::from_secs(2))
//!     .retry(Retry::new("inventory", RetryConfig::default()))
//!     .circuit_breaker(CircuitBreaker::new("inventory", BreakerConfig::default()))
//!     .bulkhead(Bulkhead::new("inventory", BulkheadConfig::builder().max_concurrent(32).build().unwrap()))
//!     .attempt_timeout(Duration::from_millis(500))
//!     .build();
//! let stock = envelope.call(|| async { Ok::<_, std::io::Error>(12) }).await.unwrap();
//! assert_eq!(stock, 12);
//! # }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub, missing_debug_implementations)]

pub mod bulkhead;
pub mod circuit_breaker;
pub mod clock;
pub mod compose;
pub mod distributed;
pub mod error;
pub mod event;
pub mod fallback;
pub mod fault;
pub mod hedge;
pub mod outcome;
pub mod rate_limit;
pub mod retry;
pub mod shed;
pub mod slo;
mod sync;
pub mod timeout;

pub use compose::{CallOptions, Envelope, EnvelopeLayer, EnvelopeService, StepAttempt, Steps};
pub use error::{BoxError, Error};
pub use outcome::{Classify, DefaultClassifier, HasOutcome, Outcome, OutcomeSet};
