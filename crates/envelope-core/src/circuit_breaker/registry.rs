use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use super::{CircuitBreaker, Config};

/// Circuit breakers by name, created on first use from a default configuration (resilience4j's registry).
///
/// The registry is not on the hot path: look a breaker up once and keep the handle.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    default: Config,
    breakers: Arc<RwLock<HashMap<Arc<str>, CircuitBreaker>>>,
}

impl Registry {
    /// A registry that creates breakers with `default`.
    pub fn new(default: Config) -> Self {
        Registry { default, breakers: Arc::default() }
    }

    /// The breaker named `name`, created with the default configuration if it does not exist.
    pub fn breaker(&self, name: &str) -> CircuitBreaker {
        self.breaker_with(name, || self.default.clone())
    }

    /// The breaker named `name`, created with `config()` if it does not exist. An existing breaker keeps its
    /// configuration and state.
    pub fn breaker_with(&self, name: &str, config: impl FnOnce() -> Config) -> CircuitBreaker {
        if let Some(b) = self.get(name) {
            return b;
        }
        let mut map = self.breakers.write().unwrap_or_else(|p| p.into_inner());
        map.entry(Arc::from(name)).or_insert_with(|| CircuitBreaker::new(name, config())).clone()
    }

    /// The breaker named `name`, if it exists.
    pub fn get(&self, name: &str) -> Option<CircuitBreaker> {
        self.breakers.read().unwrap_or_else(|p| p.into_inner()).get(name).cloned()
    }

    /// Removes the breaker named `name`; handles already given out keep working on their own.
    pub fn remove(&self, name: &str) -> Option<CircuitBreaker> {
        self.breakers.write().unwrap_or_else(|p| p.into_inner()).remove(name)
    }

    /// Every breaker, sorted by name.
    pub fn all(&self) -> Vec<CircuitBreaker> {
        let mut all: Vec<_> = self.breakers.read().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        all.sort_by(|a, b| a.name().cmp(b.name()));
        all
    }
}
