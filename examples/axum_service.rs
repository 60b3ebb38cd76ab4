//! An axum service that uses Envelope's HTTP layers in-process: request ids, a JSON access log, RED metrics, and
//! the resilience envelope around a call to a flaky dependency, with errors answered as problem+json.
//!
//! The example drives its own router in-process (no sockets) with a few requests, then prints the access log and
//! the metrics it produced. Run it with `cargo run --example axum_service`.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{MatchedPath, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use envelope_core::circuit_breaker::{CircuitBreaker, Config as BreakerConfig};
use envelope_core::retry::{Backoff, Config as RetryConfig, Retry};
use envelope_core::{Envelope, Error, Outcome};
use envelope_http::observe::{AccessLogLayer, RedLayer, RedMetrics};
use envelope_http::problem::problem;
use envelope_http::request_id::{RequestId, RequestIdLayer};
use http::Request;
use prometheus_client::registry::Registry;
use tower::ServiceExt;

#[derive(Clone)]
struct App {
    /// The envelope around the "inventory" dependency.
    inventory: Envelope,
    calls: Arc<AtomicU32>,
}

#[derive(Debug)]
struct Unavailable;

impl envelope_core::HasOutcome for Unavailable {
    fn outcome(&self) -> Outcome {
        Outcome::Upstream5xx
    }
}

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("inventory unavailable")
    }
}

/// A dependency that fails every other call.
async fn inventory(calls: &AtomicU32) -> Result<u32, Unavailable> {
    let n = calls.fetch_add(1, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(2)).await;
    if n.is_multiple_of(2) { Err(Unavailable) } else { Ok(42) }
}

async fn stock(State(app): State<App>, request_id: Option<axum::Extension<RequestId>>) -> Response {
    let id = request_id.map(|e| e.0);
    match app.inventory.call(|| inventory(&app.calls)).await {
        Ok(n) => format!("{{\"in_stock\": {n}}}").into_response(),
        // Errors become responses in one place: a problem+json document with the outcome and the request id.
        Err(e) => {
            let outcome = e.policy_outcome().unwrap_or(Outcome::Upstream5xx);
            let detail = match &e {
                Error::Inner(inner) => inner.to_string(),
                other => other.to_string(),
            };
            problem(outcome, &detail, id.as_ref(), None).map(Body::new).into_response()
        }
    }
}

fn route_of(req: &Request<Body>) -> String {
    req.extensions().get::<MatchedPath>().map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned())
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut registry = Registry::with_prefix("shop");
    let red = RedMetrics::register(&mut registry);
    let log_lines = Arc::new(Mutex::new(Vec::new()));
    let sink = log_lines.clone();

    let app = App {
        inventory: Envelope::builder()
            .deadline(Duration::from_secs(1))
            .retry(Retry::new(
                "inventory",
                RetryConfig::builder()
                    .max_attempts(3)
                    .backoff(Backoff::constant(Duration::from_millis(5)))
                    .build()
                    .unwrap(),
            ))
            .circuit_breaker(CircuitBreaker::new(
                "inventory",
                BreakerConfig::builder().count_window(10).minimum_calls(5).build().unwrap(),
            ))
            .attempt_timeout(Duration::from_millis(200))
            .build(),
        calls: Arc::default(),
    };
    // Layers run outside-in: request id first (so the log and the handler see it), then the log, then metrics.
    // `route_layer` runs after routing, so `MatchedPath` is known to the log and metrics.
    let router = Router::new()
        .route("/stock/{sku}", get(stock))
        .route_layer(RedLayer::new(red, route_of))
        .route_layer(AccessLogLayer::with_writer(route_of, move |line: &str| {
            sink.lock().unwrap().push(line.to_owned())
        }))
        .layer(RequestIdLayer)
        .with_state(app);

    for (path, id) in [("/stock/1", Some("order-page-1")), ("/stock/2", None), ("/stock/3", Some("bad id with spaces"))]
    {
        let mut req = Request::get(path);
        if let Some(id) = id {
            req = req.header("x-request-id", id);
        }
        let response = router.clone().oneshot(req.body(Body::empty()).unwrap()).await.unwrap();
        println!(
            "GET {path} -> {} (x-request-id: {})",
            response.status(),
            response.headers()["x-request-id"].to_str().unwrap()
        );
    }
    println!("\naccess log:");
    for line in log_lines.lock().unwrap().iter() {
        println!("  {line}");
    }
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    println!("\nmetrics:");
    for line in text.lines().filter(|l| l.starts_with("shop_http_requests_total")) {
        println!("  {line}");
    }
}
