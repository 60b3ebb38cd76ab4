//! gRPC through the sidecar, end to end: a real tonic server (the standard health service, and a test service with
//! unary, server-streaming and bidirectional methods) behind an HTTP/2 (h2c) upstream, called by a real tonic
//! client. Streams flow both ways as they come; `grpc-status` is the outcome (transient codes retried, the others
//! not); `grpc-timeout` is the deadline; local refusals are gRPC statuses.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use support::{envelope, get, send};
use tokio_stream::{Stream, StreamExt};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::{Code, Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_prost::ProstCodec;

/// The test service's one message.
#[derive(Clone, PartialEq, prost::Message)]
struct Msg {
    #[prost(string, tag = "1")]
    text: String,
}

fn msg(text: &str) -> Msg {
    Msg { text: text.to_owned() }
}

/// What the test service has seen.
#[derive(Default)]
struct Seen {
    /// Each call's method and the `grpc-timeout` it came with.
    timeouts: std::sync::Mutex<Vec<(String, Option<String>)>>,
    flaky: AtomicUsize,
    missing: AtomicUsize,
    stalled: AtomicUsize,
    /// What each `Collect` call received.
    collected: std::sync::Mutex<Vec<String>>,
    /// `Flaky` fails with UNAVAILABLE this many times before it answers.
    flaky_failures: AtomicUsize,
}

/// `test.Echo`: `Chat` (bidirectional: echoes each message as it comes), `Flaky` (unary: UNAVAILABLE a set number
/// of times, then an echo), `Missing` (unary: NOT_FOUND), `Slow` (unary: answers after 10 s), `Stall` (unary: the
/// first call answers after 10 s, the others at once), `Collect` (client-streaming: answers with every message
/// once the stream ends), `Count`
/// (server-streaming: three messages, then INTERNAL).
#[derive(Clone)]
struct Echo(Arc<Seen>);

impl tonic::server::NamedService for Echo {
    const NAME: &'static str = "test.Echo";
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;
type MsgStream = Pin<Box<dyn Stream<Item = Result<Msg, Status>> + Send>>;

impl tower::Service<http::Request<tonic::body::Body>> for Echo {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let seen = self.0.clone();
        let timeout = req.headers().get("grpc-timeout").map(|v| v.to_str().unwrap().to_owned());
        seen.timeouts.lock().unwrap().push((req.uri().path().to_owned(), timeout));
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(ProstCodec::<Msg, Msg>::default());
            let response = match req.uri().path() {
                "/test.Echo/Chat" => {
                    let chat = tower::service_fn(|req: Request<tonic::Streaming<Msg>>| async move {
                        let mut incoming = req.into_inner();
                        let out: MsgStream = Box::pin(async_stream(move |tx| async move {
                            while let Some(m) = incoming.next().await {
                                let reply = m.map(|m| msg(&format!("echo: {}", m.text)));
                                if tx.send(reply).await.is_err() {
                                    break;
                                }
                            }
                        }));
                        Ok::<_, Status>(Response::new(out))
                    });
                    grpc.streaming(chat, req).await
                }
                "/test.Echo/Flaky" => {
                    let flaky = tower::service_fn(move |req: Request<Msg>| {
                        let seen = seen.clone();
                        async move {
                            seen.flaky.fetch_add(1, Ordering::SeqCst);
                            let left = seen.flaky_failures.load(Ordering::SeqCst);
                            if left > 0 {
                                seen.flaky_failures.store(left - 1, Ordering::SeqCst);
                                return Err(Status::unavailable("warming up"));
                            }
                            Ok(Response::new(msg(&format!("echo: {}", req.into_inner().text))))
                        }
                    });
                    grpc.unary(flaky, req).await
                }
                "/test.Echo/Missing" => {
                    let missing = tower::service_fn(move |_: Request<Msg>| {
                        let seen = seen.clone();
                        async move {
                            seen.missing.fetch_add(1, Ordering::SeqCst);
                            Err::<Response<Msg>, _>(Status::not_found("no such thing"))
                        }
                    });
                    grpc.unary(missing, req).await
                }
                "/test.Echo/Collect" => {
                    let collect = tower::service_fn(move |req: Request<tonic::Streaming<Msg>>| {
                        let seen = seen.clone();
                        async move {
                            let mut incoming = req.into_inner();
                            let mut texts = Vec::new();
                            while let Some(m) = incoming.next().await {
                                texts.push(m?.text);
                            }
                            let all = texts.join(" ");
                            seen.collected.lock().unwrap().push(all.clone());
                            Ok::<_, Status>(Response::new(msg(&all)))
                        }
                    });
                    grpc.client_streaming(collect, req).await
                }
                "/test.Echo/Stall" => {
                    let stall = tower::service_fn(move |req: Request<Msg>| {
                        let first = seen.stalled.fetch_add(1, Ordering::SeqCst) == 0;
                        async move {
                            if first {
                                tokio::time::sleep(Duration::from_secs(10)).await;
                            }
                            Ok::<_, Status>(Response::new(msg(&format!("echo: {}", req.into_inner().text))))
                        }
                    });
                    grpc.unary(stall, req).await
                }
                "/test.Echo/Slow" => {
                    let slow = tower::service_fn(|req: Request<Msg>| async move {
                        tokio::time::sleep(Duration::from_secs(10)).await;
                        Ok::<_, Status>(Response::new(req.into_inner()))
                    });
                    grpc.unary(slow, req).await
                }
                "/test.Echo/Count" => {
                    let count = tower::service_fn(|_: Request<Msg>| async move {
                        let items = (1..=3).map(|i| Ok(msg(&i.to_string())));
                        let out: MsgStream =
                            Box::pin(tokio_stream::iter(items.chain([Err(Status::internal("ran out"))])));
                        Ok::<_, Status>(Response::new(out))
                    });
                    grpc.server_streaming(count, req).await
                }
                _ => Status::unimplemented("no such method").into_http(),
            };
            Ok(response)
        })
    }
}

/// A stream fed by `body` through a channel.
fn async_stream<F, Fut>(body: F) -> impl Stream<Item = Result<Msg, Status>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<Msg, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(body(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

struct Server {
    addr: SocketAddr,
    seen: Arc<Seen>,
    health: tonic_health::server::HealthReporter,
}

impl Server {
    /// The `grpc-timeout` of each call to `path`, in order.
    fn timeouts(&self, path: &str) -> Vec<Option<String>> {
        let seen = self.seen.timeouts.lock().unwrap();
        seen.iter().filter(|(p, _)| p == path).map(|(_, t)| t.clone()).collect()
    }
}

async fn grpc_server() -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_service_status("test.Echo", tonic_health::ServingStatus::Serving).await;
    let seen = Arc::new(Seen::default());
    let echo = Echo(seen.clone());
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(health_service)
            .add_service(echo)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    Server { addr, seen, health }
}

const CONFIG: &str = r#"
[admin]
listen = "127.0.0.1:0"

[[listener]]
name = "inbound"
listen = "127.0.0.1:0"

[[upstream]]
name = "grpc"
endpoints = ["http://{upstream}"]
protocol = "http2"
breaker = { window = { count = 4 }, min_calls = 4, failure_rate = 50, open_for = "30s" }

[[route]]
name = "rpc"
match = { path_prefix = "/" }
upstream = "grpc"
timeout = "5s"
retry = { max_attempts = 3, base = "1ms", max_delay = "5ms" }
"#;

async fn channel(addr: SocketAddr) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap()
}

async fn unary(ch: &tonic::transport::Channel, method: &'static str, req: Request<Msg>) -> Result<Msg, Status> {
    let mut grpc = tonic::client::Grpc::new(ch.clone());
    grpc.ready().await.unwrap();
    let path = PathAndQuery::from_static(method);
    grpc.unary(req, path, ProstCodec::<Msg, Msg>::default()).await.map(Response::into_inner)
}

/// A unary call to `path` with `grpc-timeout: <timeout>`, by a plain HTTP/2 client (prior knowledge): the answer's
/// head.
async fn raw_call(addr: SocketAddr, path: &str, timeout: &str) -> http::Response<hyper::body::Incoming> {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    // One length-prefixed message: Msg { text: "wait" }.
    let frame = bytes::Bytes::from_static(&[0, 0, 0, 0, 6, 0x0a, 4, b'w', b'a', b'i', b't']);
    let req = http::Request::post(format!("http://{addr}{path}"))
        .version(http::Version::HTTP_2)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", timeout)
        .body(http_body_util::Full::new(frame))
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), client.request(req)).await.expect("answered").unwrap()
}

async fn metric(admin: SocketAddr, needle: &str) -> f64 {
    let (_, _, body) = send(get(admin, "/metrics")).await;
    String::from_utf8_lossy(&body)
        .lines()
        .filter(|l| l.contains(needle) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn the_health_service_answers_and_its_watch_streams_through_the_sidecar() {
    let server = grpc_server().await;
    let env = envelope(CONFIG, server.addr).await;
    let mut health = HealthClient::new(channel(env.addr).await);

    let status = health.check(HealthCheckRequest { service: "test.Echo".into() }).await.unwrap().into_inner();
    assert_eq!(status.status, ServingStatus::Serving as i32);

    // Watch streams: the first status at once, a change as it happens (nothing buffered on the way).
    let mut watch = health.watch(HealthCheckRequest { service: "test.Echo".into() }).await.unwrap().into_inner();
    let first: HealthCheckResponse = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status, ServingStatus::Serving as i32);
    server.health.set_service_status("test.Echo", tonic_health::ServingStatus::NotServing).await;
    let next = tokio::time::timeout(Duration::from_secs(5), watch.message()).await.expect("streamed").unwrap().unwrap();
    assert_eq!(next.status, ServingStatus::NotServing as i32);

    let log = env.access_log_lines(1).await;
    assert_eq!((log[0]["status"].as_u64(), log[0]["outcome"].as_str()), (Some(200), Some("ok")));
}

#[tokio::test]
async fn a_bidirectional_stream_flows_both_ways_as_it_comes() {
    let server = grpc_server().await;
    let env = envelope(CONFIG, server.addr).await;
    let mut grpc = tonic::client::Grpc::new(channel(env.addr).await);
    grpc.ready().await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel::<Msg>(1);
    let outbound = tokio_stream::wrappers::ReceiverStream::new(rx);
    tx.send(msg("one")).await.unwrap();
    let path = PathAndQuery::from_static("/test.Echo/Chat");
    let mut replies =
        grpc.streaming(Request::new(outbound), path, ProstCodec::<Msg, Msg>::default()).await.unwrap().into_inner();
    // Each reply comes before the next message is sent: the request body is not held back to be buffered.
    assert_eq!(replies.message().await.unwrap().unwrap().text, "echo: one");
    tx.send(msg("two")).await.unwrap();
    assert_eq!(replies.message().await.unwrap().unwrap().text, "echo: two");
    drop(tx);
    assert!(replies.message().await.unwrap().is_none(), "the stream ends with status OK in its trailers");
    let log = env.access_log_lines(1).await;
    assert_eq!(log[0]["outcome"], "ok");
}

#[tokio::test]
async fn unavailable_is_retried_and_a_callers_error_is_not() {
    let server = grpc_server().await;
    let env = envelope(CONFIG, server.addr).await;
    let ch = channel(env.addr).await;

    server.seen.flaky_failures.store(2, Ordering::SeqCst);
    assert_eq!(unary(&ch, "/test.Echo/Flaky", Request::new(msg("hi"))).await.unwrap().text, "echo: hi");
    assert_eq!(server.seen.flaky.load(Ordering::SeqCst), 3, "two UNAVAILABLE, retried, then the answer");

    let e = unary(&ch, "/test.Echo/Missing", Request::new(msg("x"))).await.unwrap_err();
    assert_eq!((e.code(), e.message()), (Code::NotFound, "no such thing"), "the upstream's own status, passed on");
    assert_eq!(server.seen.missing.load(Ordering::SeqCst), 1, "NOT_FOUND is not retried");

    let log = env.access_log_lines(2).await;
    assert_eq!((log[0]["attempts"].as_u64(), log[0]["outcome"].as_str()), (Some(3), Some("ok")));
    assert_eq!((log[1]["attempts"].as_u64(), log[1]["outcome"].as_str()), (Some(1), Some("upstream_4xx")));
    assert_eq!(metric(env.admin, r#"envelope_retries_total{route="rpc",outcome="upstream_5xx"}"#).await, 2.0);
}

#[tokio::test]
async fn a_status_in_the_trailers_after_messages_is_the_calls_outcome() {
    let server = grpc_server().await;
    let env = envelope(CONFIG, server.addr).await;
    let mut grpc = tonic::client::Grpc::new(channel(env.addr).await);
    grpc.ready().await.unwrap();
    let path = PathAndQuery::from_static("/test.Echo/Count");
    let mut items = grpc
        .server_streaming(Request::new(msg("")), path, ProstCodec::<Msg, Msg>::default())
        .await
        .unwrap()
        .into_inner();
    for i in 1..=3 {
        assert_eq!(items.message().await.unwrap().unwrap().text, i.to_string());
    }
    let e = items.message().await.unwrap_err();
    assert_eq!((e.code(), e.message()), (Code::Internal, "ran out"), "the trailers came through");
    let log = env.access_log_lines(1).await;
    assert_eq!(log[0]["outcome"], "upstream_5xx", "{}", log[0]);
}

/// Like Envoy, the sidecar tells each attempt's callee the time it has left (`grpc-timeout`): the route's deadline
/// less what has passed, or the attempt timeout when sooner.
#[tokio::test]
async fn each_attempt_tells_the_upstream_the_time_it_has_left() {
    let server = grpc_server().await;
    let env = envelope(CONFIG, server.addr).await;
    let ch = channel(env.addr).await;
    server.seen.flaky_failures.store(2, Ordering::SeqCst);
    assert_eq!(unary(&ch, "/test.Echo/Flaky", Request::new(msg("x"))).await.unwrap().text, "echo: x");
    let told: Vec<Duration> = server
        .timeouts("/test.Echo/Flaky")
        .iter()
        .map(|t| envelope_http::grpc::parse_timeout(t.as_deref().expect("a grpc-timeout").as_bytes()).unwrap())
        .collect();
    assert_eq!(told.len(), 3, "three attempts");
    assert!(told.iter().all(|t| *t > Duration::from_secs(4) && *t <= Duration::from_secs(5)), "{told:?}");
    assert!(told[0] > told[1] && told[1] > told[2], "less left at each attempt: {told:?}");
    drop(env);

    let per_attempt = CONFIG.replace("timeout = \"5s\"", "timeout = \"5s\"\nattempt_timeout = \"750ms\"");
    let env = envelope(&per_attempt, server.addr).await;
    let ch = channel(env.addr).await;
    assert_eq!(unary(&ch, "/test.Echo/Flaky", Request::new(msg("y"))).await.unwrap().text, "echo: y");
    let last = server.timeouts("/test.Echo/Flaky").pop().unwrap().unwrap();
    assert_eq!(envelope_http::grpc::parse_timeout(last.as_bytes()), Some(Duration::from_millis(750)), "{last}");
}

/// On a route that says its calls may be sent twice, a stalled call is hedged once the client has sent its whole
/// request (tonic streams it, with no length); a bidirectional stream on the same route still flows.
#[tokio::test]
async fn a_stalled_call_is_hedged_on_an_idempotent_route() {
    let server = grpc_server().await;
    let config =
        CONFIG.replace("timeout = \"5s\"", "timeout = \"5s\"\nidempotent = true\nhedge = { delay = \"50ms\" }");
    let env = envelope(&config, server.addr).await;
    let ch = channel(env.addr).await;
    let started = Instant::now();
    assert_eq!(unary(&ch, "/test.Echo/Stall", Request::new(msg("h"))).await.unwrap().text, "echo: h");
    assert!(started.elapsed() < Duration::from_secs(3), "not the first call's 10 s: {:?}", started.elapsed());
    assert_eq!(server.seen.stalled.load(Ordering::SeqCst), 2);
    assert_eq!(metric(env.admin, r#"envelope_hedges_total{route="rpc"}"#).await, 1.0);
    let log = env.access_log_lines(1).await;
    assert_eq!((log[0]["attempts"].as_u64(), log[0]["outcome"].as_str()), (Some(2), Some("ok")), "{}", log[0]);

    // A call whose client is still sending is not sent twice meanwhile: the hedges due every 50 ms wait until the
    // client has finished (at about 300 ms). One may start then, before the answer comes: with all of it.
    let mut client = tonic::client::Grpc::new(ch.clone());
    client.ready().await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let path = PathAndQuery::from_static("/test.Echo/Collect");
    let sender = tokio::spawn(async move {
        tx.send(msg("a")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        tx.send(msg("b")).await.unwrap();
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    let reply = client.client_streaming(Request::new(stream), path, ProstCodec::<Msg, Msg>::default()).await;
    sender.await.unwrap();
    assert_eq!(reply.unwrap().into_inner().text, "a b");
    let received = server.seen.collected.lock().unwrap().clone();
    assert!(!received.is_empty() && received.iter().all(|r| r == "a b"), "every attempt sent all of it: {received:?}");
    let hedges = metric(env.admin, r#"envelope_hedges_total{route="rpc"}"#).await;
    // The stalled call's hedge, and this call's if one started after the client finished (it may have been
    // cancelled before the server read all of it).
    assert!(received.len() <= 2 && (hedges == 1.0 || hedges == 2.0), "{hedges} hedges, received {received:?}");
}

#[tokio::test]
async fn grpc_timeout_is_the_deadline_and_local_refusals_are_grpc_statuses() {
    let server = grpc_server().await;
    let env = envelope(CONFIG, server.addr).await;
    let ch = channel(env.addr).await;

    // The caller gives 200 ms (grpc-timeout), the route 5 s: the sidecar answers DEADLINE_EXCEEDED itself. (Sent
    // by a plain HTTP/2 client: tonic's would cut the call off itself at the same moment.)
    let started = Instant::now();
    let head = raw_call(env.addr, "/test.Echo/Slow", "200m").await;
    assert_eq!(head.status(), http::StatusCode::OK);
    assert_eq!(head.headers()["content-type"], "application/grpc");
    assert_eq!(head.headers()["grpc-status"], "4", "DEADLINE_EXCEEDED, trailers-only");
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    let log = env.access_log_lines(1).await;
    assert_eq!(log[0]["outcome"], "timeout");
    assert!(log[0]["duration_ms"].as_f64().unwrap() < 1000.0, "{}", log[0]);
    // The upstream was told the time left, not the caller's 200 ms again.
    let told = server.timeouts("/test.Echo/Slow");
    let left = envelope_http::grpc::parse_timeout(told[0].as_deref().unwrap().as_bytes()).unwrap();
    assert!(left > Duration::ZERO && left < Duration::from_millis(200), "{told:?}");

    // UNAVAILABLE four times (the retries spent) opens the breaker; then the sidecar refuses with UNAVAILABLE
    // itself, as a gRPC status with a message and a pushback, not a problem document.
    server.seen.flaky_failures.store(1000, Ordering::SeqCst);
    let _ = unary(&ch, "/test.Echo/Flaky", Request::new(msg("a"))).await;
    let _ = unary(&ch, "/test.Echo/Flaky", Request::new(msg("b"))).await;
    let before = server.seen.flaky.load(Ordering::SeqCst);
    let e = unary(&ch, "/test.Echo/Flaky", Request::new(msg("c"))).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    assert!(e.message().contains("circuit breaker is open"), "{}", e.message());
    assert!(e.metadata().get("grpc-retry-pushback-ms").is_some());
    assert!(e.metadata().get("x-request-id").is_some());
    assert_eq!(server.seen.flaky.load(Ordering::SeqCst), before, "refused without a call");
    let log = env.access_log_lines(4).await;
    assert_eq!((log[3]["status"].as_u64(), log[3]["outcome"].as_str()), (Some(200), Some("circuit_open")));
}
