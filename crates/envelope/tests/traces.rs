//! Traces: with `[tracing]` set, a server span per request and a client span per attempt reach an OTLP/HTTP
//! collector (an in-process fake one here, decoding the protobuf the real exporter sends), with the request id
//! and outcome as attributes, the ids of the `traceparent` the sidecar propagates, and a last export on shutdown.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message;
use support::{Action, FaultUpstream, envelope, send};
use tokio::net::TcpListener;

/// A span as received, with its resource's `service.name`.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    kind: i32,
    attributes: HashMap<String, String>,
}

/// A fake OTLP/HTTP collector: decodes every `POST /v1/traces` and keeps the spans.
struct Collector {
    addr: SocketAddr,
    spans: Arc<Mutex<Vec<Received>>>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text(v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

impl Collector {
    async fn start() -> Collector {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let spans: Arc<Mutex<Vec<Received>>> = Arc::default();
        let sink = spans.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let sink = sink.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        let sink = sink.clone();
                        async move {
                            assert_eq!(req.uri().path(), "/v1/traces");
                            assert_eq!(req.headers()["content-type"], "application/x-protobuf");
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let export = ExportTraceServiceRequest::decode(body).expect("valid OTLP protobuf");
                            for rs in export.resource_spans {
                                let service = rs
                                    .resource
                                    .iter()
                                    .flat_map(|r| r.attributes.iter())
                                    .find(|a| a.key == "service.name")
                                    .map(|a| text(&a.value))
                                    .unwrap_or_default();
                                for span in rs.scope_spans.iter().flat_map(|s| s.spans.iter()) {
                                    sink.lock().unwrap().push(Received {
                                        service: service.clone(),
                                        trace_id: hex(&span.trace_id),
                                        span_id: hex(&span.span_id),
                                        parent_span_id: hex(&span.parent_span_id),
                                        kind: span.kind,
                                        attributes: span
                                            .attributes
                                            .iter()
                                            .map(|a| (a.key.clone(), text(&a.value)))
                                            .collect(),
                                    });
                                }
                            }
                            Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::new())))
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Collector { addr, spans }
    }

    /// Waits (up to 10 s) until at least `n` spans arrived; returns them all.
    async fn wait_for(&self, n: usize) -> Vec<Received> {
        for _ in 0..100 {
            if self.spans.lock().unwrap().len() >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let spans = self.spans.lock().unwrap().clone();
        assert!(spans.len() >= n, "{} of {n} spans arrived: {spans:#?}", spans.len());
        spans
    }
}

fn config(collector: SocketAddr, export_interval: &str) -> String {
    format!(
        r#"
[admin]
listen = "127.0.0.1:0"

[[listener]]
name = "inbound"
listen = "127.0.0.1:0"

[[upstream]]
name = "app"
endpoints = ["http://{{upstream}}"]

[[route]]
name = "api"
match = {{ path_prefix = "/api" }}
upstream = "app"
retry = {{ max_attempts = 2, base = "1ms", max_delay = "5ms" }}

[tracing]
otlp_endpoint = "http://{collector}/v1/traces"
service_name = "envelope-test"
export_interval = "{export_interval}"
"#
    )
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER: &str = "00f067aa0ba902b7";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_and_attempt_spans_reach_the_collector_with_request_id_and_outcome() {
    let collector = Collector::start().await;
    let up = FaultUpstream::start().await;
    up.script("/api/flaky", [Action::status(503), Action::status(200)]);
    let env = envelope(&config(collector.addr, "100ms"), up.addr).await;

    let req = Request::get(format!("http://{}/api/flaky", env.addr))
        .header("traceparent", format!("00-{TRACE}-{CALLER}-01"))
        .header("x-request-id", "trace-test-1")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(send(req).await.0, StatusCode::OK);

    let spans = collector.wait_for(3).await;
    let server: Vec<_> = spans.iter().filter(|s| s.kind == SpanKind::Server as i32).collect();
    let attempts: Vec<_> = spans.iter().filter(|s| s.kind == SpanKind::Client as i32).collect();
    assert_eq!((server.len(), attempts.len()), (1, 2), "{spans:#?}");
    let request = server[0];
    assert_eq!(request.service, "envelope-test");
    assert_eq!(request.trace_id, TRACE, "the caller's trace is continued");
    assert_eq!(request.parent_span_id, CALLER, "under the caller's span");
    assert_eq!(request.attributes["envelope.request_id"], "trace-test-1");
    assert_eq!(request.attributes["envelope.outcome"], "ok");
    assert_eq!(request.attributes["envelope.route"], "api");
    assert_eq!(request.attributes["envelope.attempts"], "2");
    assert_eq!(request.attributes["http.response.status_code"], "200");
    let outcomes: Vec<&str> = attempts.iter().map(|a| a.attributes["envelope.outcome"].as_str()).collect();
    assert_eq!(outcomes, ["upstream_5xx", "ok"]);
    for a in &attempts {
        assert_eq!((a.trace_id.as_str(), a.parent_span_id.as_str()), (TRACE, request.span_id.as_str()));
        assert_eq!(a.attributes["envelope.request_id"], "trace-test-1");
    }
    // The upstream's spans hang under the attempts: each attempt sent its own span id as the parent.
    let sent: Vec<String> = up.traceparents("/api/flaky");
    let expected: Vec<String> = attempts.iter().map(|a| format!("00-{TRACE}-{}-01", a.span_id)).collect();
    assert_eq!(sent, expected);

    // A request without a trace starts one: a root span.
    assert_eq!(send(support::get(env.addr, "/api/plain")).await.0, StatusCode::OK);
    let spans = collector.wait_for(5).await;
    let root = spans
        .iter()
        .find(|s| s.kind == SpanKind::Server as i32 && s.trace_id != TRACE)
        .expect("a span for the second request");
    assert_eq!(root.parent_span_id, "", "no parent");
    assert_eq!(root.attributes["envelope.outcome"], "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_still_queued_are_exported_on_shutdown() {
    let collector = Collector::start().await;
    let up = FaultUpstream::start().await;
    let mut env = envelope(&config(collector.addr, "1h"), up.addr).await;
    let req = Request::get(format!("http://{}/api/late", env.addr))
        .header("x-request-id", "last-words")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(send(req).await.0, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(collector.spans.lock().unwrap().is_empty(), "nothing exported before the hour is up");
    env.signal("TERM");
    let status = tokio::time::timeout(Duration::from_secs(30), env.child.wait()).await.unwrap().unwrap();
    assert!(status.success());
    let spans = collector.wait_for(2).await;
    assert!(spans.iter().any(|s| s.attributes.get("envelope.request_id").map(String::as_str) == Some("last-words")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_leaves_a_client_cancelled_span() {
    let collector = Collector::start().await;
    let up = FaultUpstream::start().await;
    up.script("/api/slow", [Action::delayed(200, Duration::from_secs(5))]);
    let env = envelope(&config(collector.addr, "100ms"), up.addr).await;
    let req = Request::get(format!("http://{}/api/slow", env.addr))
        .header("x-request-id", "gone-early")
        .body(Full::new(Bytes::new()))
        .unwrap();
    // The client gives up after 200 ms, long before the upstream answers.
    let _ = tokio::time::timeout(Duration::from_millis(200), support::client().request(req)).await;
    let spans = collector.wait_for(1).await;
    let request =
        spans.iter().find(|s| s.kind == SpanKind::Server as i32).unwrap_or_else(|| panic!("a server span: {spans:#?}"));
    assert_eq!(request.attributes["envelope.request_id"], "gone-early");
    assert_eq!(request.attributes["envelope.outcome"], "client_cancelled");
    assert_eq!(request.attributes["http.response.status_code"], "499");
}
