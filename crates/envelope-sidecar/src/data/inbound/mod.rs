//! The way in: each listener accepts connections within its limits and serves them — HTTP/1.1's common case on
//! the own loop (`h1`), everything else (HTTP/2, unusual requests) with hyper, with the same timers on both
//! (`hyper_io`) — through one request path, `proxy::handle`.
//!
//! | module | what |
//! |---|---|
//! | `connections` | a listener's `max_connections`, idle connections giving way to new ones, the connection timers |
//! | `h1` | the listener's own HTTP/1.1 loop for the common case |
//! | `hyper_io` | the same timers for the connections hyper serves |

pub(crate) mod connections;
pub(crate) mod h1;
pub(crate) mod hyper_io;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::Either;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::Engine;
use crate::data::proxy;
use crate::data::runtime::Runtime;
use connections::{Connections, Place, Timers};
use hyper_io::{InFlight, TimedIo, Tracked};

/// Accepts and serves connections until told to stop; then drains: open connections finish their in-flight
/// requests (HTTP/1 keep-alive ends, HTTP/2 sends GOAWAY), up to the listener's drain timeout.
pub(crate) async fn serve_listener(
    runtime: Arc<ArcSwap<Runtime>>,
    index: usize,
    socket: TcpListener,
    mut stop: watch::Receiver<bool>,
) {
    // Listener settings cannot change on reload (see `Sidecar::reload`).
    let spec = runtime.load().config.listeners[index].clone();
    let connections = Connections::new(spec.max_connections);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // hyper's header read timeout is off: `TimedIo` keeps the listener's timers on hyper's connections as `h1`
    // does on its own (hyper's would also bound the wait between requests, and close without a 408).
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .max_buf_size(spec.max_header_bytes)
        .max_headers(spec.max_headers);
    builder.http2().timer(TokioTimer::new()).max_header_list_size(spec.max_header_bytes as u32);
    let builder = Arc::new(builder);
    let settings = Settings {
        limits: h1::Limits { max_header_bytes: spec.max_header_bytes, max_headers: spec.max_headers },
        timers: Timers { header_read: spec.header_read_timeout, keepalive: spec.keepalive_timeout },
        engine: spec.engine,
    };
    loop {
        let accepted = tokio::select! {
            accepted = socket.accept() => accepted,
            _ = stop.changed() => break,
        };
        let Ok((stream, remote)) = accepted else {
            // Out of file descriptors and the like: back off briefly rather than spin.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (runtime, builder, connections, mut stop) =
            (runtime.clone(), builder.clone(), connections.clone(), stop.clone());
        tokio::spawn(async move {
            // Over the connection limit: an idle connection gives way, or this one is closed (the client sees a
            // reset, not a hang). The connection holds its place until it is done.
            let Some(place) = connections.admit().await else { return };
            serve_connection(runtime, index, stream, remote, &builder, settings, place, &mut stop).await;
        });
    }
    drop(socket);
    // Every connection holds a place until it is done: all places back means drained.
    connections.drained(spec.drain_timeout).await;
}

/// A listener's settings for each connection.
#[derive(Debug, Clone, Copy)]
struct Settings {
    limits: h1::Limits,
    timers: Timers,
    engine: Engine,
}

/// Serves one client connection: HTTP/1.1's common case in `h1`, the rest (HTTP/2, unusual requests) in hyper,
/// which takes over with the bytes already read. Each request runs on the config current when it arrives; a reload
/// never changes a request midway.
#[allow(clippy::too_many_arguments)]
async fn serve_connection(
    runtime: Arc<ArcSwap<Runtime>>,
    index: usize,
    mut stream: tokio::net::TcpStream,
    remote: SocketAddr,
    builder: &auto::Builder<TokioExecutor>,
    settings: Settings,
    mut place: Place,
    stop: &mut watch::Receiver<bool>,
) {
    let client = Arc::new(proxy::Client::new(remote));
    let prefix = match settings.engine {
        Engine::Hyper => Bytes::new(),
        Engine::Auto => {
            // The own HTTP/1.1 writer takes a passed-through upstream head as it is; hyper gets header maps.
            let handle = |req| proxy::handle_passing(runtime.load_full(), index, &client, req);
            match h1::serve(&mut stream, settings.limits, settings.timers, &mut place, stop, handle).await {
                h1::Next::Closed => return,
                h1::Next::HandOver(prefix) => prefix,
            }
        }
    };
    let in_flight = InFlight::default();
    let tracking = in_flight.clone();
    let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let (runtime, client, busy) = (runtime.load_full(), client.clone(), tracking.start());
        async move {
            let response = proxy::handle(runtime, index, &client, req.map(Either::Left)).await;
            Ok::<_, std::convert::Infallible>(response.map(|body| Tracked::new(body, busy)))
        }
    });
    let stream = TimedIo::new(prefix, stream, settings.timers, in_flight, place);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = stop.changed() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}
