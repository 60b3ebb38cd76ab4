//! Timeout: give up on a call after a fixed time, and cancel it.
//!
//! The timer is armed when the call first has to wait ([`LazyTimeout`]): a call that completes at once costs no
//! clock read and no timer. When the timer fires, the inner future is **dropped**: whatever it held (a connection, a permit, a child task
//! handle) is released at once, so the work really stops. A caller that drops the call itself is not a timeout:
//! nothing is reported and no [`Elapsed`] is produced.
//!
//! ```
//! use envelope_core::timeout::Timeout;
//! use std::time::Duration;
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
//! let timeout = Timeout::new(Duration::from_millis(100));
//! let slow = timeout.call(|| async {
//!     tokio::time::sleep(Duration::from_secs(1)).await;
//!     Ok::<_, std::io::Error>(())
//! });
//! assert!(matches!(slow.await, Err(envelope_core::Error::Timeout(_))));
//! # }
//! ```

pub(crate) mod error;
mod future;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

pub use error::Elapsed;
pub use future::LazyTimeout;
pub(crate) use future::lazy;

use crate::event::{Event, Listeners};

/// A timeout policy. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Timeout {
    name: Arc<str>,
    duration: Duration,
    listeners: Listeners,
}

impl Timeout {
    /// Times out after `duration`.
    pub fn new(duration: Duration) -> Self {
        Timeout { name: Arc::from("timeout"), duration, listeners: Listeners::new() }
    }

    /// Names the policy in events.
    pub fn named(mut self, name: impl Into<Arc<str>>) -> Self {
        self.name = name.into();
        self
    }

    /// Sends events to `listeners`.
    pub fn with_listeners(mut self, listeners: Listeners) -> Self {
        self.listeners = listeners;
        self
    }

    /// The timeout.
    pub fn duration(&self) -> Duration {
        self.duration
    }

    /// Runs `f`, cancelling it after the timeout.
    pub async fn call<T, E, F, Fut>(&self, f: F) -> Result<T, crate::Error<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        match self.run(self.duration, f()).await {
            Ok(r) => r.map_err(crate::Error::Inner),
            Err(e) => Err(crate::Error::Timeout(e)),
        }
    }

    /// Runs `fut` for at most `limit` (which the caller may have shortened, e.g. to a deadline).
    pub(crate) async fn run<Fut: Future>(&self, limit: Duration, fut: Fut) -> Result<Fut::Output, Elapsed> {
        match lazy(limit, fut).await {
            Ok(out) => Ok(out),
            Err(_) => {
                self.listeners.emit(Event::TimedOut { name: &self.name, after: limit });
                Err(Elapsed { after: limit })
            }
        }
    }
}
