//! Listeners: accept connections within limits, serve HTTP/1.1 and HTTP/2 through [`crate::proxy::handle`], and
//! drain on shutdown.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use std::sync::atomic::{AtomicBool, Ordering};

use crate::admin;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::proxy;
use crate::runtime::Runtime;

/// Why the sidecar could not start or stopped with an error.
#[derive(Debug)]
pub enum RunError {
    /// A listener could not bind its address.
    Bind {
        /// Which listener.
        listener: String,
        /// Its address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Waiting for signals failed.
    Signal(std::io::Error),
}

impl fmt::Display for RunError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunError::Bind { listener, addr, source } => {
                write!(f, "listener `{listener}` cannot bind {addr}: {source}")
            }
            RunError::Signal(e) => write!(f, "cannot wait for signals: {e}"),
        }
    }
}

impl std::error::Error for RunError {}

/// A running sidecar: its listeners are bound and serving.
pub struct Sidecar {
    addrs: Vec<SocketAddr>,
    admin_addr: SocketAddr,
    draining: Arc<AtomicBool>,
    shutdown: watch::Sender<bool>,
    done: tokio::task::JoinHandle<()>,
}

impl fmt::Debug for Sidecar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sidecar").field("addrs", &self.addrs).finish_non_exhaustive()
    }
}

impl Sidecar {
    /// Binds every listener of `config` (all or nothing) and starts serving.
    pub async fn start(config: Config) -> Result<Sidecar, RunError> {
        let metrics = Metrics::new();
        let rt = Arc::new(Runtime::build(config, &metrics));
        let mut sockets = Vec::new();
        for l in &rt.config.listeners {
            let socket = TcpListener::bind(l.listen).await.map_err(|source| RunError::Bind {
                listener: l.name.clone(),
                addr: l.listen,
                source,
            })?;
            sockets.push(socket);
        }
        let admin_socket = TcpListener::bind(rt.config.admin.listen).await.map_err(|source| RunError::Bind {
            listener: "admin".to_owned(),
            addr: rt.config.admin.listen,
            source,
        })?;
        let admin_addr = admin_socket.local_addr().map_err(|source| RunError::Bind {
            listener: "admin".to_owned(),
            addr: rt.config.admin.listen,
            source,
        })?;
        let addrs = sockets.iter().filter_map(|s| s.local_addr().ok()).collect();
        let (shutdown, signal) = watch::channel(false);
        let draining = Arc::new(AtomicBool::new(false));
        let admin = admin::router(admin::AdminState {
            runtime: rt.clone(),
            metrics: metrics.clone(),
            token: std::env::var(&rt.config.admin.token_env).ok().filter(|t| !t.is_empty()),
            draining: draining.clone(),
        });
        tokio::spawn(async move {
            let _ = axum::serve(admin_socket, admin).await;
        });
        let mut loops = Vec::new();
        for (i, socket) in sockets.into_iter().enumerate() {
            loops.push(tokio::spawn(serve_listener(rt.clone(), i, socket, signal.clone())));
        }
        let done = tokio::spawn(async move {
            for l in loops {
                let _ = l.await;
            }
        });
        Ok(Sidecar { addrs, admin_addr, draining, shutdown, done })
    }

    /// The bound addresses of the listeners, in config order.
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// The bound address of the admin listener.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Stops accepting, lets in-flight requests finish (up to the drain timeout), and returns. Readiness turns
    /// 503 at once.
    pub async fn shutdown(self) {
        self.draining.store(true, Ordering::Release);
        let _ = self.shutdown.send(true);
        let _ = self.done.await;
    }

    /// Runs until SIGTERM or SIGINT, then shuts down gracefully.
    pub async fn run_until_signal(self) -> Result<(), RunError> {
        wait_for_signal().await.map_err(RunError::Signal)?;
        self.shutdown().await;
        Ok(())
    }
}

#[cfg(unix)]
async fn wait_for_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

#[cfg(not(unix))]
async fn wait_for_signal() -> std::io::Result<()> {
    tokio::signal::ctrl_c().await
}

/// Accepts and serves connections until told to stop; then drains: open connections finish their in-flight
/// requests (HTTP/1 keep-alive ends, HTTP/2 sends GOAWAY), up to the listener's drain timeout.
async fn serve_listener(rt: Arc<Runtime>, index: usize, socket: TcpListener, mut stop: watch::Receiver<bool>) {
    let spec = rt.config.listeners[index].clone();
    let connections = Arc::new(Semaphore::new(spec.max_connections));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(spec.header_read_timeout)
        .max_buf_size(spec.max_header_bytes)
        .max_headers(spec.max_headers);
    builder.http2().timer(TokioTimer::new()).max_header_list_size(spec.max_header_bytes as u32);
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
        // Over the connection limit: close at once (the client sees a reset, not a hang).
        let Ok(permit) = connections.clone().try_acquire_owned() else { continue };
        let _ = stream.set_nodelay(true);
        let rt = rt.clone();
        let service = service_fn(move |req| proxy::handle(rt.clone(), index, remote, req));
        let conn = builder.serve_connection(TokioIo::new(stream), service).into_owned();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
            drop(permit);
        });
    }
    drop(socket);
    // Every connection holds a permit until it is done: all permits back means drained.
    let all = u32::try_from(spec.max_connections).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(spec.drain_timeout, connections.acquire_many(all)).await;
}
