//! Distributed mode in the sidecar (`[shared]`): one fleet per sidecar, syncing the breakers marked
//! `shared = true` through Redis (`envelope_core::distributed`, `envelope_redis`). Requests never wait for it:
//! the breakers admit calls by themselves, and the fleet runs as a task of its own.

use std::sync::Arc;

use envelope_core::circuit_breaker::CircuitBreaker;
use envelope_core::distributed::{Fleet, FleetConfig, FleetStatus, StoreError};
use envelope_core::event::Listeners;
use envelope_redis::RedisStore;

use crate::config::Shared;
use crate::data::runtime::Runtime;
use crate::data::upstream::SharedLinks;

/// The running fleet, if any, shared by the sidecar and its admin API.
pub(crate) type SharedSlot = Arc<std::sync::Mutex<Option<SharedState>>>;

pub(crate) fn lock_shared(slot: &SharedSlot) -> std::sync::MutexGuard<'_, Option<SharedState>> {
    slot.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The running fleet: its settings, and the task that syncs it.
pub(crate) struct SharedState {
    settings: Shared,
    fleet: Fleet,
    store: Arc<RedisStore>,
    task: tokio::task::JoinHandle<()>,
}

impl SharedState {
    /// Starts syncing through the store `settings` name (nothing is connected yet: a sidecar starts while Redis
    /// is down, its shared breakers deciding alone until it is up).
    pub(crate) fn start(settings: &Shared, events: Listeners) -> Result<SharedState, StoreError> {
        let store = Arc::new(match &settings.ca_pem {
            _ if settings.cluster => RedisStore::cluster(&settings.redis, &settings.key_prefix)?,
            _ if settings.sentinel.is_some() => {
                let master = settings.sentinel.as_deref().unwrap_or_default();
                RedisStore::sentinel(&settings.redis, master, &settings.key_prefix)?
            }
            Some(pem) => RedisStore::with_root_ca(&settings.redis, &settings.key_prefix, pem.clone())?,
            None => RedisStore::new(&settings.redis, &settings.key_prefix)?,
        });
        let mut config = FleetConfig::new(settings.instance.clone().unwrap_or_else(default_instance));
        config.sync_interval = settings.sync_interval;
        config.op_timeout = settings.op_timeout;
        config.listeners = events;
        let fleet = Fleet::new(store.clone(), config);
        let task = tokio::spawn(fleet.clone().run());
        Ok(SharedState { settings: settings.clone(), fleet, store, task })
    }

    /// Whether this fleet runs with `settings`.
    pub(crate) fn runs(&self, settings: &Shared) -> bool {
        self.settings == *settings
    }

    /// Shares exactly the runtime's shared breakers (kept ones keep their place in the fleet).
    pub(crate) fn follow(&self, runtime: &Runtime) {
        let breakers: Vec<CircuitBreaker> =
            runtime.upstreams.iter().filter_map(|u| u.breaker.clone()).filter(CircuitBreaker::is_linked).collect();
        // Validated with the config: every shared breaker has a time window.
        let _ = self.fleet.share_exactly(&breakers);
    }

    /// What the upstreams' global rate limits need: the store, and its health as the fleet sees it.
    pub(crate) fn links(&self) -> SharedLinks {
        SharedLinks {
            limits: self.store.clone(),
            health: self.fleet.store_health(),
            op_timeout: self.settings.op_timeout,
        }
    }

    pub(crate) fn status(&self) -> FleetStatus {
        self.fleet.status()
    }
}

impl Drop for SharedState {
    fn drop(&mut self) {
        self.task.abort();
        let _ = self.fleet.share_exactly(&[]);
    }
}

/// This instance's default name in its fleet: the host's name and the process id.
fn default_instance() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "envelope".to_owned());
    format!("{host}:{}", std::process::id())
}
