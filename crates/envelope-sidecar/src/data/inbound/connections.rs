//! A listener's open connections: the `max_connections` limit, and idle connections giving way to new ones.
//!
//! A connection is *idle* while it waits for a request's first byte: a new connection that has sent nothing yet,
//! or a keep-alive connection between requests. When the limit is reached, a new connection asks an idle one to
//! hand over its place (as nginx closes idle keep-alive connections when `worker_connections` run out), so a
//! flood of silent sockets cannot lock out clients with real requests: the flood is what is idle. A connection in
//! the middle of a request is never asked, nor one that became idle less than [`GRACE`] ago (a client that has just
//! connected and whose request is on its way).
//!
//! Here too: the connection timers both engines keep (`h1` on its own loop, `hyper_io` for hyper's connections).
//!
//! Asking costs nothing to the connections that are not asked: each idle wait reads one atomic counter (and polls
//! a watch channel once per connection), and a request adds two atomic additions (idle → busy → idle). Only
//! handing a place over takes a lock.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot, watch};
use tokio::time::Instant;

/// How long a connection accepted over the limit waits for an idle one to give way before it is closed.
const WAIT_FOR_ROOM: Duration = Duration::from_secs(1);

/// Most connections waiting for a place at once.
const MAX_WAITING: usize = 1024;

/// How long a connection must have been idle before it may be asked to give way.
pub(crate) const GRACE: Duration = Duration::from_millis(10);

/// The connections of one listener.
#[derive(Debug)]
pub(crate) struct Connections {
    permits: Arc<Semaphore>,
    limit: usize,
    /// Connections idle now.
    idle: AtomicUsize,
    /// New connections waiting for a place, each with the channel its place is sent on.
    waiting: Mutex<VecDeque<oneshot::Sender<OwnedSemaphorePermit>>>,
    /// How many wait (read without the lock).
    waiting_count: AtomicUsize,
    /// Bumped each time idle connections are asked (read without a lock), and the channel that wakes them.
    asked_count: AtomicU64,
    asked: watch::Sender<u64>,
}

impl Connections {
    pub(crate) fn new(limit: usize) -> Arc<Connections> {
        Arc::new(Connections {
            permits: Arc::new(Semaphore::new(limit)),
            limit,
            idle: AtomicUsize::new(0),
            waiting: Mutex::new(VecDeque::new()),
            waiting_count: AtomicUsize::new(0),
            asked_count: AtomicU64::new(0),
            asked: watch::channel(0).0,
        })
    }

    /// A place for a new connection: at once if under the limit; otherwise, if some connection is idle, the place
    /// of one that gives way (within [`WAIT_FOR_ROOM`]). `None`: the connection is to be closed.
    pub(crate) async fn admit(self: &Arc<Self>) -> Option<Place> {
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                if self.idle.load(Ordering::Acquire) == 0 {
                    return None;
                }
                let (give, take) = oneshot::channel();
                {
                    let mut waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
                    waiting.push_back(give);
                    self.waiting_count.fetch_add(1, Ordering::AcqRel);
                    if waiting.len() > MAX_WAITING {
                        // The longest waiting is closed (its sender dropped): under a flood, the newest arrivals
                        // are the ones with a chance of being real clients with a request on its way.
                        waiting.pop_front();
                        self.waiting_count.fetch_sub(1, Ordering::AcqRel);
                    }
                }
                self.asked_count.fetch_add(1, Ordering::AcqRel);
                self.asked.send_modify(|n| *n = n.wrapping_add(1));
                // Unanswered: the sender stays queued until an idle connection finds it closed and skips it.
                tokio::time::timeout(WAIT_FOR_ROOM, take).await.ok()?.ok()?
            }
        };
        Some(Place { connections: self.clone(), permit: Some(permit), wake: None, seen: 0, idle: None })
    }

    /// Every place back (all connections closed), or `timeout` passed.
    pub(crate) async fn drained(&self, timeout: Duration) {
        let all = u32::try_from(self.limit).unwrap_or(u32::MAX);
        let _ = tokio::time::timeout(timeout, self.permits.acquire_many(all)).await;
    }

    /// Hands `permit` to the newest connection still waiting; gives it back if none is.
    fn hand_over(&self, mut permit: OwnedSemaphorePermit) -> Result<(), OwnedSemaphorePermit> {
        let mut waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some(give) = waiting.pop_back() {
            self.waiting_count.fetch_sub(1, Ordering::AcqRel);
            match give.send(permit) {
                Ok(()) => return Ok(()),
                // That one stopped waiting.
                Err(back) => permit = back,
            }
        }
        Err(permit)
    }
}

/// A connection's place among the listener's connections: it says when the connection is idle, and learns when
/// it should give its place to a new one. Dropping it frees the place.
pub(crate) struct Place {
    connections: Arc<Connections>,
    /// `None` once handed over.
    permit: Option<OwnedSemaphorePermit>,
    /// Wakes the connection's task when idle connections are asked. Made when first needed and polled once per
    /// arming (a connection's task keeps its waker); after that, a change of `asked_count` from `seen` says it has
    /// fired, without a lock.
    wake: Option<Pin<Box<dyn Future<Output = ()> + Send + Sync>>>,
    seen: u64,
    /// Since when the connection is idle, if it is.
    idle: Option<Instant>,
}

impl std::fmt::Debug for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Place").field("idle", &self.idle).finish_non_exhaustive()
    }
}

impl Place {
    /// Marks the connection idle (waiting for a request's first byte) since `since`, or busy (`None`).
    pub(crate) fn set_idle(&mut self, since: Option<Instant>) {
        match (self.idle.is_some(), since) {
            (false, Some(_)) => {
                self.idle = since;
                self.connections.idle.fetch_add(1, Ordering::AcqRel);
            }
            (true, None) => {
                self.idle = None;
                self.connections.idle.fetch_sub(1, Ordering::AcqRel);
            }
            _ => {}
        }
    }

    /// Ready when this idle connection has handed its place to a new one and is to close now.
    pub(crate) fn poll_give_way(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if self.connections.waiting_count.load(Ordering::Acquire) > 0
                && let Some(since) = self.idle
            {
                let idle_for = since.elapsed();
                if idle_for >= GRACE {
                    if self.give_way() {
                        return Poll::Ready(());
                    }
                } else {
                    // Asked, but too new to go: look again once the grace has passed.
                    let waker = cx.waker().clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(GRACE - idle_for).await;
                        waker.wake();
                    });
                }
            }
            let asked = self.connections.asked_count.load(Ordering::Acquire);
            match &mut self.wake {
                Some(_) if asked == self.seen => return Poll::Pending,
                Some(_) => self.wake = None,
                None => {
                    self.seen = asked;
                    let mut changed = self.connections.asked.subscribe();
                    let mut wake: Pin<Box<dyn Future<Output = ()> + Send + Sync>> = Box::pin(async move {
                        let _ = changed.changed().await;
                    });
                    if wake.as_mut().poll(cx).is_pending() {
                        self.wake = Some(wake);
                        return Poll::Pending;
                    }
                }
            }
        }
    }

    /// Hands the place to a waiting connection, if one still waits.
    fn give_way(&mut self) -> bool {
        let Some(permit) = self.permit.take() else { return true };
        match self.connections.hand_over(permit) {
            Ok(()) => true,
            Err(permit) => {
                self.permit = Some(permit);
                false
            }
        }
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        self.set_idle(None);
    }
}

/// The listener's connection timers.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timers {
    /// A new connection's first byte, and a request head's last byte after its first, within this.
    pub(crate) header_read: Duration,
    /// A kept-alive connection's next request within this.
    pub(crate) keepalive: Duration,
}

/// The answer to a request head that did not arrive in time (here and in `hyper_io`).
pub(crate) const REQUEST_TIMEOUT: &[u8] =
    b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";

/// A connection's timer: one `Sleep`, made when first needed, moved to each new deadline only when it fires early
/// (a kept-alive connection's idle deadline moves with every request; the timer is reset once per timeout at
/// most, not once per request).
#[derive(Default)]
pub(crate) struct Timer(Option<Pin<Box<tokio::time::Sleep>>>);

impl Timer {
    /// Whether `deadline` has passed; if not, the task is woken when it may have.
    pub(crate) fn poll_expired(&mut self, deadline: Instant, cx: &mut Context<'_>) -> bool {
        let sleep = self.0.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if sleep.deadline() > deadline {
            sleep.as_mut().reset(deadline);
        }
        loop {
            if sleep.as_mut().poll(cx).is_pending() {
                return false;
            }
            if Instant::now() >= deadline {
                return true;
            }
            sleep.as_mut().reset(deadline);
        }
    }
}
