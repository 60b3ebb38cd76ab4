//! Test support: a scriptable, misbehaving upstream and a driver for the real `envelope` binary, both on
//! 127.0.0.1 with real sockets and bounded waits.
#![allow(dead_code)] // each test file uses a different part of the support code

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};

/// What the fault upstream does with one request.
#[derive(Debug, Clone)]
pub enum Action {
    /// Answer with a status after a delay, with extra headers.
    Respond { status: u16, delay: Duration, headers: Vec<(&'static str, String)> },
    /// Close the connection without reading the body or answering.
    ResetBeforeBody,
    /// Read the body, then close the connection without answering.
    ResetAfterBody,
    /// Answer 200 with the first part of a body, then stall for this long before the rest.
    StallBody(Duration),
}

/// A body that sends a first chunk, stalls, then ends.
pub struct Stalling {
    first: Option<Bytes>,
    stall: std::pin::Pin<Box<tokio::time::Sleep>>,
    done: bool,
}

impl http_body::Body for Stalling {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
        use std::future::Future;
        if let Some(first) = self.first.take() {
            return std::task::Poll::Ready(Some(Ok(http_body::Frame::data(first))));
        }
        if self.done {
            return std::task::Poll::Ready(None);
        }
        match self.stall.as_mut().poll(cx) {
            std::task::Poll::Ready(()) => {
                self.done = true;
                std::task::Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from_static(b" and the rest")))))
            }
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }
}

type UpBody = http_body_util::Either<Full<Bytes>, Stalling>;

impl Action {
    pub fn status(status: u16) -> Action {
        Action::Respond { status, delay: Duration::ZERO, headers: Vec::new() }
    }

    pub fn delayed(status: u16, delay: Duration) -> Action {
        Action::Respond { status, delay, headers: Vec::new() }
    }

    pub fn with_header(status: u16, name: &'static str, value: &str) -> Action {
        Action::Respond { status, delay: Duration::ZERO, headers: vec![(name, value.to_owned())] }
    }
}

#[derive(Default)]
struct State {
    /// Scripted actions per path, used in order; the last one repeats.
    scripts: HashMap<String, VecDeque<Action>>,
    /// Requests seen: (method, path) -> count.
    counts: HashMap<(String, String), usize>,
    /// Bodies seen per path, in order.
    bodies: HashMap<String, Vec<Bytes>>,
    /// Request ids seen per path, in order.
    request_ids: HashMap<String, Vec<String>>,
    /// `traceparent` headers seen per path, in order.
    traceparents: HashMap<String, Vec<String>>,
    /// Every request's headers per path, in order.
    headers: HashMap<String, Vec<http::HeaderMap>>,
    /// Requests whose handling was cancelled (the proxy closed the connection before the answer).
    cancelled: usize,
    /// The HTTP version of every request per path, in order.
    versions: HashMap<String, Vec<http::Version>>,
}

/// A scriptable upstream on 127.0.0.1.
#[derive(Clone)]
pub struct FaultUpstream {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
}

struct CancelGuard {
    state: Arc<Mutex<State>>,
    done: bool,
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if !self.done {
            self.state.lock().unwrap().cancelled += 1;
        }
    }
}

impl FaultUpstream {
    pub async fn start() -> FaultUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let state = shared.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| handle(state.clone(), req));
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        FaultUpstream { addr, state }
    }

    /// Like [`FaultUpstream::start`], over TLS with a fresh self-signed certificate for 127.0.0.1 and localhost;
    /// returns the certificate (PEM) to trust.
    pub async fn start_tls() -> (FaultUpstream, String) {
        let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
        let pem = cert.cert.pem();
        let key = rustls::pki_types::PrivateKeyDer::try_from(cert.signing_key.serialize_der()).unwrap();
        let mut config =
            rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(vec![cert.cert.der().clone()], key)
                .unwrap();
        // Both versions offered by ALPN, as a real server would (it serves what the client's first bytes say).
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let (state, acceptor) = (shared.clone(), acceptor.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(stream).await else { return };
                    let service = service_fn(move |req| handle(state.clone(), req));
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        (FaultUpstream { addr, state }, pem)
    }

    /// Scripts `path`: each request takes the next action; the last repeats.
    pub fn script(&self, path: &str, actions: impl IntoIterator<Item = Action>) {
        self.state.lock().unwrap().scripts.insert(path.to_owned(), actions.into_iter().collect());
    }

    pub fn count(&self, method: &str, path: &str) -> usize {
        self.state.lock().unwrap().counts.get(&(method.to_owned(), path.to_owned())).copied().unwrap_or(0)
    }

    pub fn bodies(&self, path: &str) -> Vec<Bytes> {
        self.state.lock().unwrap().bodies.get(path).cloned().unwrap_or_default()
    }

    pub fn request_ids(&self, path: &str) -> Vec<String> {
        self.state.lock().unwrap().request_ids.get(path).cloned().unwrap_or_default()
    }

    pub fn traceparents(&self, path: &str) -> Vec<String> {
        self.state.lock().unwrap().traceparents.get(path).cloned().unwrap_or_default()
    }

    /// The headers of each request to `path`, in order.
    pub fn headers(&self, path: &str) -> Vec<http::HeaderMap> {
        self.state.lock().unwrap().headers.get(path).cloned().unwrap_or_default()
    }

    /// The HTTP version of each request to `path`, in order.
    pub fn versions(&self, path: &str) -> Vec<http::Version> {
        self.state.lock().unwrap().versions.get(path).cloned().unwrap_or_default()
    }

    pub fn cancelled(&self) -> usize {
        self.state.lock().unwrap().cancelled
    }
}

async fn handle(state: Arc<Mutex<State>>, req: Request<Incoming>) -> Result<Response<UpBody>, std::io::Error> {
    let path = req.uri().path().to_owned();
    let method = req.method().to_string();
    let id = req.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let traceparent = req.headers().get("traceparent").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let action = {
        let mut s = state.lock().unwrap();
        *s.counts.entry((method, path.clone())).or_default() += 1;
        s.request_ids.entry(path.clone()).or_default().push(id);
        s.traceparents.entry(path.clone()).or_default().push(traceparent);
        s.headers.entry(path.clone()).or_default().push(req.headers().clone());
        s.versions.entry(path.clone()).or_default().push(req.version());
        match s.scripts.get_mut(&path) {
            Some(q) if q.len() > 1 => q.pop_front().unwrap(),
            Some(q) => q.front().cloned().unwrap_or(Action::status(200)),
            None => Action::status(200),
        }
    };
    if let Action::ResetBeforeBody = action {
        return Err(std::io::Error::other("reset before body"));
    }
    let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    state.lock().unwrap().bodies.entry(path.clone()).or_default().push(body.clone());
    match action {
        Action::ResetAfterBody | Action::ResetBeforeBody => Err(std::io::Error::other("reset after body")),
        Action::StallBody(stall) => {
            let body = Stalling {
                first: Some(Bytes::from_static(b"first part")),
                stall: Box::pin(tokio::time::sleep(stall)),
                done: false,
            };
            Ok(Response::new(http_body_util::Either::Right(body)))
        }
        Action::Respond { status, delay, headers } => {
            let mut guard = CancelGuard { state: state.clone(), done: false };
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            guard.done = true;
            let mut r = Response::new(http_body_util::Either::Left(Full::new(Bytes::from(format!(
                "{status} from upstream {path}"
            )))));
            *r.status_mut() = StatusCode::from_u16(status).unwrap();
            for (name, value) in headers {
                r.headers_mut().insert(name, value.parse().unwrap());
            }
            Ok(r)
        }
    }
}

/// The real `envelope` binary, running a config.
pub struct Envelope {
    pub child: Child,
    pub addr: SocketAddr,
    /// Every listener's address, in config order (`addr` is the last).
    pub addrs: Vec<SocketAddr>,
    pub admin: SocketAddr,
    pub log: Arc<Mutex<Vec<String>>>,
    /// Standard error lines after the start-up lines.
    pub errors: Arc<Mutex<Vec<String>>>,
    _dir: TempDir,
}

/// A directory removed on drop.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        let dir = std::env::temp_dir().join(format!("envelope-test-{}-{}", std::process::id(), fastrand_suffix()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn fastrand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
        ^ (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64)
}

/// Writes `config` (with `{upstream}` replaced) and starts the binary on it; waits until it listens.
pub async fn envelope(config: &str, upstream: SocketAddr) -> Envelope {
    envelope_with_env(config, upstream, &[]).await
}

/// Like [`envelope`], with extra environment variables.
pub async fn envelope_with_env(config: &str, upstream: SocketAddr, env: &[(&str, &str)]) -> Envelope {
    let dir = TempDir::new();
    std::fs::write(dir.0.join("envelope.toml"), config.replace("{upstream}", &upstream.to_string())).unwrap();
    spawn_in(dir, env).await
}

/// Like [`envelope`], but nothing ever reads the process's standard output (the access log): once the pipe is
/// full, every write to it would block.
pub async fn envelope_with_stdout_unread(config: &str, upstream: SocketAddr) -> Envelope {
    let dir = TempDir::new();
    std::fs::write(dir.0.join("envelope.toml"), config.replace("{upstream}", &upstream.to_string())).unwrap();
    spawn(dir, &[], false).await
}

/// Starts the binary on `dir/envelope.toml`.
async fn spawn_in(dir: TempDir, env: &[(&str, &str)]) -> Envelope {
    spawn(dir, env, true).await
}

/// Starts the binary on `dir/envelope.toml`; `read_stdout`: collect its access log (else leave it unread).
async fn spawn(dir: TempDir, env: &[(&str, &str)], read_stdout: bool) -> Envelope {
    let path = dir.0.join("envelope.toml");
    let mut child = Command::new(env!("CARGO_BIN_EXE_envelope"))
        .args(["run", "--config", path.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .envs(env.iter().copied())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let errors = Arc::new(Mutex::new(Vec::new()));
    let early = errors.clone();
    let (addrs, admin) = tokio::time::timeout(Duration::from_secs(20), async {
        let mut addrs = Vec::new();
        while let Some(line) = stderr.next_line().await.unwrap() {
            early.lock().unwrap().push(line.clone());
            if let Some(a) = line.strip_prefix("envelope: listening on ") {
                addrs.push(a.parse::<SocketAddr>().unwrap());
            }
            if let Some(a) = line.strip_prefix("envelope: admin on ") {
                assert!(!addrs.is_empty(), "listeners are printed first");
                return (addrs, a.parse::<SocketAddr>().unwrap());
            }
        }
        panic!("envelope exited before listening");
    })
    .await
    .expect("envelope starts within 20 s");
    let log = Arc::new(Mutex::new(Vec::new()));
    let sink = log.clone();
    if read_stdout {
        let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        tokio::spawn(async move {
            while let Ok(Some(line)) = stdout.next_line().await {
                sink.lock().unwrap().push(line);
            }
        });
    }
    let late = errors.clone();
    tokio::spawn(async move {
        while let Ok(Some(line)) = stderr.next_line().await {
            late.lock().unwrap().push(line);
        }
    });
    let addr = *addrs.last().unwrap();
    Envelope { child, addr, addrs, admin, log, errors, _dir: dir }
}

impl Envelope {
    /// The access-log lines so far, parsed.
    pub fn access_log(&self) -> Vec<serde_json::Value> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .map(|l| serde_json::from_str(l).expect("every line is one JSON object"))
            .collect()
    }

    /// The access log once it has at least `n` lines (it is written by a thread of its own, a moment after the
    /// answer), within 10 s.
    pub async fn access_log_lines(&self, n: usize) -> Vec<serde_json::Value> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.access_log();
            if log.len() >= n {
                return log;
            }
            assert!(tokio::time::Instant::now() < deadline, "{n} access-log lines within 10 s, got {}", log.len());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The directory holding the config (and the default history file).
    pub fn dir(&self) -> &std::path::Path {
        &self._dir.0
    }

    /// Stops the process gracefully (SIGTERM, waits up to 30 s for exit 0) and starts it again on the same
    /// directory and config.
    pub async fn restart(mut self) -> Envelope {
        self.signal("TERM");
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await.unwrap().unwrap();
        assert!(status.success(), "{status}");
        let dir = std::mem::replace(&mut self._dir, TempDir(std::path::PathBuf::new()));
        spawn_in(dir, &[]).await
    }

    /// Kills the process (SIGKILL: no chance to flush anything) and starts it again on the same directory.
    pub async fn crash_and_restart(mut self) -> Envelope {
        self.child.kill().await.unwrap();
        let dir = std::mem::replace(&mut self._dir, TempDir(std::path::PathBuf::new()));
        spawn_in(dir, &[]).await
    }

    pub fn pid(&self) -> u32 {
        self.child.id().unwrap()
    }

    /// Replaces the config file (with `{upstream}` replaced), for reload tests.
    pub fn rewrite_config(&self, config: &str, upstream: SocketAddr) {
        let path = self._dir.0.join("envelope.toml");
        let tmp = self._dir.0.join("envelope.toml.tmp");
        std::fs::write(&tmp, config.replace("{upstream}", &upstream.to_string())).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
    }

    /// Sends a signal to the process (`TERM`, `HUP`, ...).
    pub fn signal(&self, name: &str) {
        let pid = self.pid().to_string();
        assert!(std::process::Command::new("kill").args([&format!("-{name}"), &pid]).status().unwrap().success());
    }
}

/// A plain HTTP/1.1 client for the tests.
pub fn client() -> hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>> {
    hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http()
}

/// Sends a request and returns status, headers and body, within 30 s.
pub async fn send(req: Request<Full<Bytes>>) -> (StatusCode, http::HeaderMap, Bytes) {
    let resp = tokio::time::timeout(Duration::from_secs(30), client().request(req))
        .await
        .expect("answered in time")
        .expect("a response");
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, headers, body)
}

pub fn get(addr: SocketAddr, path: &str) -> Request<Full<Bytes>> {
    Request::get(format!("http://{addr}{path}")).body(Full::new(Bytes::new())).unwrap()
}

/// A config with two listeners on one upstream (`{upstream}`), each with a catch-all route: `auto` (the listener's
/// own HTTP/1.1 loop, first) and `hyper` (hyper alone, second), both with the extra listener keys `listener`
/// (TOML lines), for tests that hold the two engines to the same behaviour.
pub fn two_engines(listener: &str) -> String {
    two_engines_with(listener, "")
}

/// Like [`two_engines`], with the extra route keys `route` (TOML lines) on both routes.
pub fn two_engines_with(listener: &str, route: &str) -> String {
    let mut config = String::from("[admin]\nlisten = \"127.0.0.1:0\"\n");
    for engine in ["auto", "hyper"] {
        config.push_str(&format!(
            "\n[[listener]]\nname = \"{engine}\"\nlisten = \"127.0.0.1:0\"\nengine = \"{engine}\"\n{listener}\n"
        ));
    }
    config.push_str("\n[[upstream]]\nname = \"app\"\nendpoints = [\"http://{upstream}\"]\n");
    for engine in ["auto", "hyper"] {
        config.push_str(&format!(
            "\n[[route]]\nname = \"{engine}\"\nlistener = \"{engine}\"\nmatch = {{ path_prefix = \"/\" }}\nupstream = \"app\"\n{route}\n"
        ));
    }
    config
}

/// A `redis-server` of the test's own on a free port of 127.0.0.1, killed when dropped.
pub struct Redis {
    child: std::process::Child,
    pub port: u16,
}

impl Redis {
    pub fn start() -> Redis {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        Redis::start_on(port)
    }

    /// A server on `port` (to restart one where the sidecars expect it).
    pub fn start_on(port: u16) -> Redis {
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (the test command installs it)");
        let redis = Redis { child, port };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while redis.cli(&["PING"]) != "PONG" {
            assert!(std::time::Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// `redis-cli` against it: its standard output, trimmed.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = std::process::Command::new("redis-cli").args(["-p", &self.port.to_string()]).args(args).output();
        out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned()).unwrap_or_default()
    }

    /// Sends `signal` (`-STOP`, `-CONT`) to the server.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.id().to_string();
        assert!(std::process::Command::new("kill").args([signal, &pid]).status().unwrap().success());
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// GETs `path` from the admin listener, parsed as JSON.
pub async fn admin_json(admin: SocketAddr, path: &str) -> serde_json::Value {
    let (_, _, body) = send(get(admin, path)).await;
    serde_json::from_slice(&body).unwrap()
}
