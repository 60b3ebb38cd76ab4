//! RED metrics and a JSON access log for any tower HTTP service — the same ones the sidecar writes, for Rust
//! services that use Envelope in-process.
//!
//! Both layers name the route of a request with a function you give them (`route_of`), so that label values stay
//! bounded: return a route template (axum's `MatchedPath`, a router's name), never the raw path.
//!
//! ```
//! use envelope_http::observe::{AccessLogLayer, RedLayer, RedMetrics};
//! use prometheus_client::registry::Registry;
//!
//! let mut registry = Registry::default();
//! let metrics = RedMetrics::register(&mut registry);
//! let route_of = |req: &http::Request<()>| req.uri().path().split('/').nth(1).unwrap_or("").to_owned();
//! let red = RedLayer::new(metrics, route_of);
//! let log = AccessLogLayer::new(route_of);
//! # let _ = (red, log);
//! ```

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use envelope_core::Outcome;
use envelope_core::clock::{self, Instant};
use http::{Method, Request, Response};
use pin_project_lite::pin_project;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tower_layer::Layer;
use tower_service::Service;

use crate::classify::StatusClassifier;
use crate::request_id::RequestId;

/// Upper bounds of the duration histogram, in seconds: 5 ms to 10 s.
pub const DURATION_BUCKETS: [f64; 12] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    method: String,
    code: u16,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: String,
}

/// The RED families: `http_requests_total{route, method, code, outcome}` and
/// `http_request_duration_seconds{route}`.
#[derive(Debug, Clone)]
pub struct RedMetrics {
    requests: Family<RequestLabels, Counter>,
    duration: Family<RouteLabel, Histogram>,
}

impl RedMetrics {
    /// Creates the families and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = RedMetrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(|| Histogram::new(DURATION_BUCKETS)),
        };
        registry.register("http_requests", "HTTP requests answered", m.requests.clone());
        registry.register("http_request_duration_seconds", "Time to answer an HTTP request", m.duration.clone());
        m
    }

    fn record(&self, route: String, method: &Method, code: u16, outcome: Outcome, seconds: f64) {
        self.duration.get_or_create(&RouteLabel { route: route.clone() }).observe(seconds);
        let labels = RequestLabels { route, method: method.as_str().to_owned(), code, outcome: outcome.as_str() };
        self.requests.get_or_create(&labels).inc();
    }
}

/// Records RED metrics for every request.
pub struct RedLayer<F> {
    metrics: RedMetrics,
    route_of: Arc<F>,
    classifier: StatusClassifier,
}

impl<F> RedLayer<F> {
    /// Records into `metrics`, naming routes with `route_of`.
    pub fn new(metrics: RedMetrics, route_of: F) -> Self {
        RedLayer { metrics, route_of: Arc::new(route_of), classifier: StatusClassifier::new() }
    }
}

impl<F> Clone for RedLayer<F> {
    fn clone(&self) -> Self {
        RedLayer { metrics: self.metrics.clone(), route_of: self.route_of.clone(), classifier: self.classifier.clone() }
    }
}

impl<F> fmt::Debug for RedLayer<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedLayer").finish_non_exhaustive()
    }
}

impl<S, F> Layer<S> for RedLayer<F> {
    type Service = Observed<S, F, Red>;

    fn layer(&self, inner: S) -> Self::Service {
        Observed {
            inner,
            route_of: self.route_of.clone(),
            sink: Red { metrics: self.metrics.clone(), classifier: self.classifier.clone() },
        }
    }
}

/// Writes one JSON access-log line per request.
pub struct AccessLogLayer<F> {
    route_of: Arc<F>,
    write: Arc<dyn Fn(&str) + Send + Sync>,
}

impl<F> AccessLogLayer<F> {
    /// Logs to standard output, naming routes with `route_of`.
    pub fn new(route_of: F) -> Self {
        Self::with_writer(route_of, |line: &str| {
            use std::io::Write;
            let _ = writeln!(std::io::stdout().lock(), "{line}");
        })
    }

    /// Logs through `write` (one call per line, without the newline).
    pub fn with_writer(route_of: F, write: impl Fn(&str) + Send + Sync + 'static) -> Self {
        AccessLogLayer { route_of: Arc::new(route_of), write: Arc::new(write) }
    }
}

impl<F> Clone for AccessLogLayer<F> {
    fn clone(&self) -> Self {
        AccessLogLayer { route_of: self.route_of.clone(), write: self.write.clone() }
    }
}

impl<F> fmt::Debug for AccessLogLayer<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessLogLayer").finish_non_exhaustive()
    }
}

impl<S, F> Layer<S> for AccessLogLayer<F> {
    type Service = Observed<S, F, Log>;

    fn layer(&self, inner: S) -> Self::Service {
        Observed { inner, route_of: self.route_of.clone(), sink: Log { write: self.write.clone() } }
    }
}

/// What an observing layer does with a finished request.
pub trait Sink: Clone {
    /// Called once per request, when the response (or error) is ready.
    fn finish(&self, done: &Done<'_>);
}

/// A finished request, as the sinks see it.
#[derive(Debug)]
pub struct Done<'a> {
    /// The route name from `route_of`.
    pub route: String,
    /// The method.
    pub method: &'a Method,
    /// The request id, if a [`crate::request_id::RequestIdLayer`] ran before.
    pub request_id: Option<&'a RequestId>,
    /// The status (500 if the service failed without a response).
    pub status: u16,
    /// The outcome, when the response carries one (a [`crate::problem::problem`] answer does).
    pub outcome: Option<Outcome>,
    /// Time from the call to the response.
    pub elapsed: std::time::Duration,
}

/// The RED sink.
#[derive(Debug, Clone)]
pub struct Red {
    metrics: RedMetrics,
    classifier: StatusClassifier,
}

impl Sink for Red {
    fn finish(&self, d: &Done<'_>) {
        let outcome = d.outcome.unwrap_or_else(|| {
            http::StatusCode::from_u16(d.status).map_or(Outcome::Failure, |s| self.classifier.outcome_of(s))
        });
        self.metrics.record(d.route.clone(), d.method, d.status, outcome, d.elapsed.as_secs_f64());
    }
}

/// The access-log sink.
#[derive(Clone)]
pub struct Log {
    write: Arc<dyn Fn(&str) + Send + Sync>,
}

impl fmt::Debug for Log {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Log")
    }
}

impl Sink for Log {
    fn finish(&self, d: &Done<'_>) {
        let outcome = d.outcome.unwrap_or_else(|| {
            http::StatusCode::from_u16(d.status).map_or(Outcome::Failure, |s| StatusClassifier::new().outcome_of(s))
        });
        let line = serde_json::json!({
            "request_id": d.request_id.map(RequestId::as_str),
            "route": d.route,
            "method": d.method.as_str(),
            "status": d.status,
            "duration_ms": d.elapsed.as_secs_f64() * 1000.0,
            "outcome": outcome.as_str(),
        });
        (self.write)(&line.to_string());
    }
}

/// A service observed by a [`Sink`].
#[derive(Debug, Clone)]
pub struct Observed<S, F, K> {
    inner: S,
    route_of: Arc<F>,
    sink: K,
}

impl<S, F, K, B, RB> Service<Request<B>> for Observed<S, F, K>
where
    S: Service<Request<B>, Response = Response<RB>>,
    F: Fn(&Request<B>) -> String,
    K: Sink,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = ObservedFuture<S::Future, K>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let route = (self.route_of)(&req);
        let method = req.method().clone();
        let request_id = req.extensions().get::<RequestId>().cloned();
        ObservedFuture {
            inner: self.inner.call(req),
            sink: self.sink.clone(),
            state: Some((route, method, request_id, clock::now())),
        }
    }
}

pin_project! {
    /// The future of an [`Observed`] service.
    #[derive(Debug)]
    pub struct ObservedFuture<Fut, K> {
        #[pin]
        inner: Fut,
        sink: K,
        state: Option<(String, Method, Option<RequestId>, Instant)>,
    }
}

impl<Fut, K, RB, E> Future for ObservedFuture<Fut, K>
where
    Fut: Future<Output = Result<Response<RB>, E>>,
    K: Sink,
{
    type Output = Fut::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = match this.inner.poll(cx) {
            Poll::Ready(r) => r,
            Poll::Pending => return Poll::Pending,
        };
        if let Some((route, method, request_id, start)) = this.state.take() {
            let status = result.as_ref().map_or(500, |r| r.status().as_u16());
            let outcome = result.as_ref().ok().and_then(|r| r.extensions().get::<Outcome>().copied());
            let done = Done {
                route,
                method: &method,
                request_id: request_id.as_ref(),
                status,
                outcome,
                elapsed: start.elapsed(),
            };
            this.sink.finish(&done);
        }
        Poll::Ready(result)
    }
}
