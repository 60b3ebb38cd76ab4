//! The sidecar's life: bind every listener and the admin API, reload the config without dropping a request, and
//! drain on shutdown. Serving connections is the data plane's (`data::inbound`).

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::{Config, ConfigError};
use crate::control::admin;
use crate::control::shared::{SharedSlot, SharedState, lock_shared};
use crate::data::inbound;
use crate::data::runtime::Runtime;
use crate::observe::history::History;
use crate::observe::metrics::Metrics;

/// How often the config file is checked for changes.
pub const RELOAD_POLL_INTERVAL: Duration = Duration::from_secs(1);

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
    /// The span exporter could not be set up.
    Tracing(String),
    /// Distributed mode's store could not be set up.
    Shared(envelope_core::distributed::StoreError),
}

impl fmt::Display for RunError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunError::Bind { listener, addr, source } => {
                write!(f, "listener `{listener}` cannot bind {addr}: {source}")
            }
            RunError::Signal(e) => write!(f, "cannot wait for signals: {e}"),
            RunError::Tracing(e) => f.write_str(e),
            RunError::Shared(e) => write!(f, "shared state: {e}"),
        }
    }
}

impl std::error::Error for RunError {}

/// Why a reload was refused (the running config keeps serving).
#[derive(Debug)]
pub enum ReloadError {
    /// The new config is invalid.
    Invalid(ConfigError),
    /// The listeners changed, which needs a restart.
    ListenersChanged,
}

impl fmt::Display for ReloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReloadError::Invalid(e) => e.fmt(f),
            ReloadError::ListenersChanged => {
                f.write_str("listeners and the admin listener cannot change on reload; restart to change them")
            }
        }
    }
}

impl std::error::Error for ReloadError {}

/// A running sidecar: its listeners are bound and serving.
pub struct Sidecar {
    runtime: Arc<ArcSwap<Runtime>>,
    metrics: Arc<Metrics>,
    addrs: Vec<SocketAddr>,
    admin_addr: SocketAddr,
    draining: Arc<AtomicBool>,
    shutdown: watch::Sender<bool>,
    done: tokio::task::JoinHandle<()>,
    history: Arc<History>,
    history_task: tokio::task::JoinHandle<()>,
    /// Distributed mode's fleet, with `[shared]`.
    shared: SharedSlot,
}

impl fmt::Debug for Sidecar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sidecar").field("addrs", &self.addrs).finish_non_exhaustive()
    }
}

fn bind_error(listener: &str, addr: SocketAddr) -> impl FnOnce(std::io::Error) -> RunError + '_ {
    move |source| RunError::Bind { listener: listener.to_owned(), addr, source }
}

impl Sidecar {
    /// Binds every listener of `config` and the admin listener (all or nothing) and starts serving.
    pub async fn start(config: Config) -> Result<Sidecar, RunError> {
        let metrics = Metrics::new(config.shared.is_some());
        let spans = config
            .tracing
            .as_ref()
            .map(crate::observe::telemetry::Spans::start)
            .transpose()
            .map_err(RunError::Tracing)?;
        // Distributed mode first: the upstreams' global rate limits are built on its store.
        let shared: SharedSlot = Arc::default();
        if let Some(settings) = &config.shared {
            let fleet = SharedState::start(settings, metrics.listener_for_events()).map_err(RunError::Shared)?;
            *lock_shared(&shared) = Some(fleet);
        }
        let links = lock_shared(&shared).as_ref().map(SharedState::links);
        let runtime = Arc::new(ArcSwap::from_pointee(Runtime::build(config, &metrics, spans, None, links.as_ref())));
        let rt = runtime.load_full();
        if let Some(fleet) = lock_shared(&shared).as_ref() {
            fleet.follow(&rt);
        }
        let mut sockets = Vec::new();
        for l in &rt.config.listeners {
            sockets.push(TcpListener::bind(l.listen).await.map_err(bind_error(&l.name, l.listen))?);
        }
        let admin_listen = rt.config.admin.listen;
        let admin_socket = TcpListener::bind(admin_listen).await.map_err(bind_error("admin", admin_listen))?;
        let admin_addr = admin_socket.local_addr().map_err(bind_error("admin", admin_listen))?;
        let addrs = sockets.iter().filter_map(|s| s.local_addr().ok()).collect();
        let (shutdown, signal) = watch::channel(false);
        let draining = Arc::new(AtomicBool::new(false));
        let settings = &rt.config.history;
        let history = History::open(settings.path.as_deref(), settings.retention, metrics.tallies.clone());
        let history_task = tokio::spawn(history.clone().run(settings.flush_interval, signal.clone()));
        let admin = admin::router(admin::AdminState {
            runtime: runtime.clone(),
            metrics: metrics.clone(),
            token: std::env::var(&rt.config.admin.token_env).ok().filter(|t| !t.is_empty()),
            draining: draining.clone(),
            history: history.clone(),
            shared: shared.clone(),
        });
        tokio::spawn(async move {
            let _ = axum::serve(admin_socket, admin).await;
        });
        let mut loops = Vec::new();
        for (i, socket) in sockets.into_iter().enumerate() {
            loops.push(tokio::spawn(inbound::serve_listener(runtime.clone(), i, socket, signal.clone())));
        }
        let done = tokio::spawn(async move {
            for l in loops {
                let _ = l.await;
            }
        });
        Ok(Sidecar { runtime, metrics, addrs, admin_addr, draining, shutdown, done, history, history_task, shared })
    }

    /// The bound addresses of the listeners, in config order.
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// The bound address of the admin listener.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Applies `config` atomically: requests in flight finish on the old config, new ones use the new one, and
    /// unchanged upstreams, routes and listeners keep their state. Refused (and counted) if listeners change.
    pub fn reload(&self, config: Config) -> Result<(), ReloadError> {
        let old = self.runtime.load_full();
        if config.listeners != old.config.listeners || config.admin != old.config.admin {
            self.metrics.reload(false);
            return Err(ReloadError::ListenersChanged);
        }
        self.history.set_retention(config.history.retention);
        let mut shared = lock_shared(&self.shared);
        // Shared breakers kept by the reload keep their place in the fleet; a changed `[shared]` starts a new
        // fleet (the old one stops, its breakers deciding alone until the new one has synced).
        match (&config.shared, shared.as_ref()) {
            (None, _) => *shared = None,
            (Some(s), Some(running)) if running.runs(s) => {}
            (Some(s), _) => {
                *shared = None;
                match SharedState::start(s, self.metrics.listener_for_events()) {
                    Ok(fleet) => *shared = Some(fleet),
                    Err(e) => eprintln!("envelope: shared state: {e}; shared breakers decide alone"),
                }
            }
        }
        let links = shared.as_ref().map(SharedState::links);
        let new = Arc::new(Runtime::build(config, &self.metrics, old.spans.clone(), Some(&old), links.as_ref()));
        if let Some(fleet) = shared.as_ref() {
            fleet.follow(&new);
        }
        drop(shared);
        self.runtime.store(new);
        self.metrics.reload(true);
        Ok(())
    }

    /// Reads the config file again and applies it if it changed (or always, when `force`d, as on SIGHUP); an
    /// invalid file is refused, counted, and changes nothing. `None` when the file was unchanged.
    pub fn reload_from(&self, file: &mut ConfigFile, force: bool) -> Option<Result<(), ReloadError>> {
        let text = match Config::read(&file.path) {
            Ok(text) => text,
            Err(e) => {
                // A file caught missing mid-rewrite is retried on the next poll; SIGHUP asked for it, so say why.
                if !force {
                    return None;
                }
                self.metrics.reload(false);
                return Some(Err(ReloadError::Invalid(e)));
            }
        };
        let fingerprint = fingerprint(&text);
        if !force && fingerprint == file.fingerprint {
            return None;
        }
        file.fingerprint = fingerprint;
        Some(match Config::parse(&file.path.display().to_string(), &text) {
            Ok(config) => self.reload(config),
            Err(e) => {
                self.metrics.reload(false);
                Err(ReloadError::Invalid(e))
            }
        })
    }

    /// Stops accepting, lets in-flight requests finish (up to the drain timeout), and returns. Readiness turns
    /// 503 at once.
    pub async fn shutdown(self) {
        self.draining.store(true, Ordering::Release);
        let _ = self.shutdown.send(true);
        let _ = self.done.await;
        // The history's last flush (it saw the shutdown too), and the last span export.
        let _ = self.history_task.await;
        if let Some(spans) = self.runtime.load().spans.clone() {
            let _ = tokio::task::spawn_blocking(move || spans.shutdown()).await;
        }
    }

    /// Runs until SIGTERM or SIGINT, then shuts down gracefully. With a config file, reloads it on SIGHUP and
    /// whenever its content changes, logging the result on standard error.
    pub async fn run(self, mut config: Option<ConfigFile>) -> Result<(), RunError> {
        let signals = Signals::new().map_err(RunError::Signal)?;
        tokio::pin!(signals);
        let mut poll = tokio::time::interval(RELOAD_POLL_INTERVAL);
        loop {
            let (force, why) = tokio::select! {
                signal = signals.as_mut().next() => match signal {
                    Signal::Stop => break,
                    Signal::Reload => (true, "SIGHUP"),
                },
                _ = poll.tick() => (false, "file change"),
            };
            let Some(file) = config.as_mut() else { continue };
            match self.reload_from(file, force) {
                None => {}
                Some(Ok(())) => eprintln!("envelope: config reloaded ({why})"),
                Some(Err(e)) => eprintln!("envelope: config reload rejected ({why}), the running config stays: {e}"),
            }
        }
        self.shutdown().await;
        Ok(())
    }
}

/// The config file a sidecar runs from, with a fingerprint of the text it last applied (or refused). Changes are
/// seen by content, not by modification time: file times are as coarse as the kernel's clock tick, and a rewrite
/// right after the start would otherwise be missed.
#[derive(Debug)]
pub struct ConfigFile {
    path: PathBuf,
    fingerprint: u64,
}

impl ConfigFile {
    /// Reads and validates the config file at `path`; the returned file remembers exactly the text that was
    /// parsed, so any later change is a reload.
    pub fn load(path: PathBuf) -> Result<(ConfigFile, Config), ConfigError> {
        let text = Config::read(&path)?;
        let config = Config::parse(&path.display().to_string(), &text)?;
        Ok((ConfigFile { fingerprint: fingerprint(&text), path }, config))
    }
}

fn fingerprint(text: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

enum Signal {
    Stop,
    Reload,
}

#[cfg(unix)]
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

#[cfg(unix)]
impl Signals {
    fn new() -> std::io::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    async fn next(self: std::pin::Pin<&mut Self>) -> Signal {
        let this = self.get_mut();
        tokio::select! {
            _ = this.term.recv() => Signal::Stop,
            _ = this.int.recv() => Signal::Stop,
            _ = this.hup.recv() => Signal::Reload,
        }
    }
}

#[cfg(not(unix))]
struct Signals;

#[cfg(not(unix))]
impl Signals {
    fn new() -> std::io::Result<Signals> {
        Ok(Signals)
    }

    async fn next(self: std::pin::Pin<&mut Self>) -> Signal {
        let _ = tokio::signal::ctrl_c().await;
        Signal::Stop
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = "[admin]\nlisten = \"127.0.0.1:0\"\n[[listener]]\nname = \"in\"\nlisten = \"127.0.0.1:0\"\n\
        [[upstream]]\nname = \"app\"\nendpoints = [\"http://127.0.0.1:9\"]\n\
        [[route]]\nname = \"api\"\nmatch = { path_prefix = \"/api\" }\nupstream = \"app\"\n";

    fn reloads(sidecar: &Sidecar, ok: bool) -> u64 {
        let text = sidecar.metrics.encode_prometheus();
        let needle = format!("envelope_config_reloads_total{{result=\"{}\"}} ", if ok { "ok" } else { "rejected" });
        text.lines().find_map(|l| l.strip_prefix(needle.as_str())?.parse().ok()).unwrap_or(0)
    }

    #[tokio::test]
    async fn a_rewrite_right_after_the_start_is_seen_and_each_text_is_applied_once() {
        let dir = std::env::temp_dir().join(format!("envelope-reload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("envelope.toml");
        std::fs::write(&path, CONFIG).unwrap();
        let (mut file, config) = ConfigFile::load(path.clone()).unwrap();
        let sidecar = Sidecar::start(config).await.unwrap();
        assert!(sidecar.reload_from(&mut file, false).is_none(), "the text it started from is no change");

        // Rewritten before the first poll, and with the same length: still a change.
        std::fs::write(&path, CONFIG.replace("\"api\"", "\"apj\"")).unwrap();
        assert!(matches!(sidecar.reload_from(&mut file, false), Some(Ok(()))));
        assert_eq!(sidecar.runtime.load().config.routes[0].name, "apj");
        assert!(sidecar.reload_from(&mut file, false).is_none(), "applied once");

        // An invalid text is refused once, not on every poll; SIGHUP (force) tries it again.
        std::fs::write(&path, "[[listener]\nnot toml").unwrap();
        assert!(matches!(sidecar.reload_from(&mut file, false), Some(Err(ReloadError::Invalid(_)))));
        assert!(sidecar.reload_from(&mut file, false).is_none());
        assert!(matches!(sidecar.reload_from(&mut file, true), Some(Err(_))));
        assert_eq!((reloads(&sidecar, true), reloads(&sidecar, false)), (1, 2));
        assert_eq!(sidecar.runtime.load().config.routes[0].name, "apj", "the last good config stays");
        let _ = std::fs::remove_dir_all(&dir);
        sidecar.shutdown().await;
    }
}
