//! The tower face of [`Envelope`]: a `Layer` that wraps any `Service` whose requests can be cloned (for retries).

use std::fmt;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::task::{Context, Poll};

use tower_layer::Layer;
use tower_service::Service;

use super::Envelope;
use crate::error::{BoxError, Error};
use crate::outcome::{Classify, DefaultClassifier};

/// Applies an [`Envelope`] to a tower service.
///
/// Errors are boxed, tower-style: Envelope's own rejections are its policy error types ([`crate::timeout::Elapsed`],
/// [`crate::circuit_breaker::CircuitOpen`], …), found with [`crate::error::is_caused_by`] or
/// [`crate::error::outcome_of_error`]; the service's own errors are passed through boxed.
///
/// ```
/// use envelope_core::{Envelope, EnvelopeLayer};
/// use envelope_core::retry::{Config, Retry};
/// use tower_layer::Layer;
///
/// let envelope = Envelope::builder().retry(Retry::new("api", Config::default())).build();
/// let service = EnvelopeLayer::new(envelope).layer(tower::service_fn(|req: u32| async move {
///     Ok::<_, envelope_core::BoxError>(req * 2)
/// }));
/// # let _ = service;
/// ```
///
/// Every policy is also a layer on its own: `EnvelopeLayer::from(policy)` (a retry, breaker, bulkhead, rate
/// limiter, hedge or fault injector; a shedder with the priority of its calls), or [`EnvelopeLayer::timeout`],
/// applies just that policy, with the same semantics and errors as inside a full [`Envelope`]:
///
/// ```
/// use envelope_core::EnvelopeLayer;
/// use envelope_core::circuit_breaker::{CircuitBreaker, Config};
/// use tower_layer::Layer;
///
/// let breaker = CircuitBreaker::new("api", Config::default());
/// let service = EnvelopeLayer::from(breaker.clone()).layer(tower::service_fn(|req: u32| async move {
///     Ok::<_, envelope_core::BoxError>(req)
/// }));
/// # let _ = service;
/// ```
#[derive(Clone)]
pub struct EnvelopeLayer<C = DefaultClassifier> {
    envelope: Envelope,
    classifier: C,
}

impl EnvelopeLayer {
    /// A layer classifying with [`DefaultClassifier`].
    pub fn new(envelope: Envelope) -> Self {
        EnvelopeLayer { envelope, classifier: DefaultClassifier }
    }
}

impl<C> EnvelopeLayer<C> {
    /// A layer classifying with `classifier`.
    pub fn with_classifier(envelope: Envelope, classifier: C) -> Self {
        EnvelopeLayer { envelope, classifier }
    }
}

// Every policy is a tower layer on its own (see `EnvelopeLayer`'s docs).
macro_rules! layer_from {
    ($($policy:ty => $method:ident),* $(,)?) => {$(
        impl From<$policy> for EnvelopeLayer {
            fn from(policy: $policy) -> Self {
                EnvelopeLayer::new(Envelope::builder().$method(policy).build())
            }
        }
    )*};
}

layer_from! {
    crate::retry::Retry => retry,
    crate::circuit_breaker::CircuitBreaker => circuit_breaker,
    crate::bulkhead::Bulkhead => bulkhead,
    crate::rate_limit::RateLimiter => rate_limiter,
    crate::hedge::Hedge => hedge,
    crate::fault::FaultInjector => fault,
}

/// A shedder admits each call at the given priority.
impl From<(crate::shed::LoadShedder, crate::shed::Priority)> for EnvelopeLayer {
    fn from((shedder, priority): (crate::shed::LoadShedder, crate::shed::Priority)) -> Self {
        EnvelopeLayer::new(Envelope::builder().shed(shedder, priority).build())
    }
}

impl EnvelopeLayer {
    /// A layer that cuts each call off after `timeout` (the timeout policy alone).
    pub fn timeout(timeout: std::time::Duration) -> Self {
        EnvelopeLayer::new(Envelope::builder().attempt_timeout(timeout).build())
    }
}

impl<S, C: Clone> Layer<S> for EnvelopeLayer<C> {
    type Service = EnvelopeService<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        EnvelopeService { inner, envelope: self.envelope.clone(), classifier: self.classifier.clone() }
    }
}

impl<C> fmt::Debug for EnvelopeLayer<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnvelopeLayer").field("envelope", &self.envelope).finish()
    }
}

/// A service wrapped by an [`EnvelopeLayer`].
///
/// Cloning clones the inner service and shares the envelope's state (breaker, bulkhead, budget, limits).
#[derive(Clone)]
pub struct EnvelopeService<S, C = DefaultClassifier> {
    inner: S,
    envelope: Envelope,
    classifier: C,
}

/// The future of an [`EnvelopeService`].
pub type ResponseFuture<R> = Pin<Box<dyn Future<Output = Result<R, BoxError>> + Send>>;

impl<S, C, Req> Service<Req> for EnvelopeService<S, C>
where
    S: Service<Req> + Clone + Send + 'static,
    S::Future: Send,
    S::Response: Send + 'static,
    S::Error: Into<BoxError> + Send + 'static,
    Req: Clone + Send + 'static,
    C: Classify<S::Response, S::Error> + Clone + Send + Sync + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Response>;

    /// Always ready: readiness of the inner service, and every admission decision, are taken per attempt inside
    /// the call, so no permit is held by an idle connection.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let envelope = self.envelope.clone();
        let classifier = self.classifier.clone();
        let inner = self.inner.clone();
        Box::pin(async move {
            let make = move || {
                let mut svc = inner.clone();
                let req = req.clone();
                async move {
                    poll_fn(|cx| svc.poll_ready(cx)).await?;
                    svc.call(req).await
                }
            };
            let (result, _outcome) = envelope.call_classified(&classifier, make).await;
            result.map_err(into_box)
        })
    }
}

fn into_box<E: Into<BoxError>>(e: Error<E>) -> BoxError {
    match e {
        Error::Inner(e) => e.into(),
        Error::Timeout(e) => Box::new(e),
        Error::CircuitOpen(e) => Box::new(e),
        Error::BulkheadFull(e) => Box::new(e),
        Error::RateLimited(e) => Box::new(e),
        Error::Shed(e) => Box::new(e),
        Error::Injected(e) => Box::new(e),
    }
}

impl<S: fmt::Debug, C> fmt::Debug for EnvelopeService<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnvelopeService").field("inner", &self.inner).field("envelope", &self.envelope).finish()
    }
}
