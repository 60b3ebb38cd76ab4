//! A FIFO semaphore with a bounded queue, live resizing, and waiters that are async tasks or blocked threads.
//!
//! Why not `tokio::sync::Semaphore`: the bulkhead also needs a bounded queue, waiting from threads that have no
//! runtime (`call_blocking`), and shrinking below the permits in use. The design:
//!
//! - `available` counts free permits and may go negative after a shrink; nobody takes a permit while it is ≤ 0.
//! - Fast path: when nobody is queued, take a permit with one compare-and-swap; release with one `fetch_add`.
//! - Slow path: waiters queue in FIFO order under a mutex; a releaser that sees `queued > 0` hands free permits
//!   to the front of the queue. Waiter and releaser each write their own counter and then read the other's with
//!   `SeqCst`, so at least one of them sees the free permit (Dekker), and no waiter sleeps next to a free permit.
//! - A waiter that gives up (cancelled, timed out) removes itself; if a permit was handed to it meanwhile, it
//!   passes the permit on. Permits are returned by `Drop`, exactly once.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::thread::Thread;

use crate::sync::{Arc, AtomicBool, AtomicIsize, AtomicUsize, Mutex, Ordering, lock};

#[derive(Debug)]
pub(crate) struct Semaphore {
    available: AtomicIsize,
    limit: AtomicUsize,
    queued: AtomicUsize,
    queue: Mutex<VecDeque<Arc<Slot>>>,
}

#[derive(Debug, Default)]
pub(crate) struct Slot {
    granted: AtomicBool,
    wake: Mutex<Wake>,
}

#[derive(Debug, Default)]
enum Wake {
    #[default]
    Nobody,
    Task(Waker),
    Thread(Thread),
}

/// Why a permit was not handed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The queue was full (or queueing is off).
    QueueFull,
}

impl Semaphore {
    pub(crate) fn new(permits: usize) -> Self {
        Semaphore {
            available: AtomicIsize::new(permits as isize),
            limit: AtomicUsize::new(permits),
            queued: AtomicUsize::new(0),
            queue: Mutex::new(VecDeque::new()),
        }
    }

    pub(crate) fn limit(&self) -> usize {
        self.limit.load(Ordering::Acquire)
    }

    pub(crate) fn in_use(&self) -> usize {
        let available = self.available.load(Ordering::Acquire);
        (self.limit() as isize - available).max(0) as usize
    }

    pub(crate) fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    /// Takes a permit if one is free and nobody is queued ahead.
    #[inline]
    pub(crate) fn try_acquire(&self) -> bool {
        self.queued.load(Ordering::SeqCst) == 0 && self.take()
    }

    #[inline]
    fn take(&self) -> bool {
        let mut current = self.available.load(Ordering::Acquire);
        while current > 0 {
            match self.available.compare_exchange_weak(current, current - 1, Ordering::SeqCst, Ordering::Acquire) {
                Ok(_) => return true,
                Err(actual) => current = actual,
            }
        }
        false
    }

    /// Returns a permit.
    #[inline]
    pub(crate) fn release(&self) {
        self.available.fetch_add(1, Ordering::SeqCst);
        if self.queued.load(Ordering::SeqCst) > 0 {
            self.dispatch(&mut lock(&self.queue));
        }
    }

    /// Hands free permits to the front of the queue. Caller holds the queue lock.
    fn dispatch(&self, queue: &mut VecDeque<Arc<Slot>>) {
        while !queue.is_empty() && self.take() {
            if let Some(slot) = queue.pop_front() {
                self.queued.fetch_sub(1, Ordering::SeqCst);
                slot.grant();
            }
        }
    }

    /// Joins the queue (if it has room); the returned slot is granted a permit later, or at once.
    pub(crate) fn enqueue(&self, max_queue: usize) -> Result<Arc<Slot>, Refused> {
        let mut queue = lock(&self.queue);
        if queue.len() >= max_queue {
            return Err(Refused::QueueFull);
        }
        let slot = Arc::new(Slot::default());
        queue.push_back(slot.clone());
        self.queued.fetch_add(1, Ordering::SeqCst);
        self.dispatch(&mut queue);
        Ok(slot)
    }

    /// Leaves the queue. Returns true if the slot had already been granted a permit, which the caller now owns.
    pub(crate) fn dequeue(&self, slot: &Arc<Slot>) -> bool {
        let mut queue = lock(&self.queue);
        if let Some(i) = queue.iter().position(|s| Arc::ptr_eq(s, slot)) {
            queue.remove(i);
            self.queued.fetch_sub(1, Ordering::SeqCst);
            return false;
        }
        slot.is_granted()
    }

    /// Changes the number of permits. Shrinking below the permits in use takes effect as they are returned.
    pub(crate) fn resize(&self, permits: usize) {
        let mut queue = lock(&self.queue);
        let old = self.limit.swap(permits, Ordering::AcqRel);
        self.available.fetch_add(permits as isize - old as isize, Ordering::SeqCst);
        self.dispatch(&mut queue);
    }
}

impl Slot {
    pub(crate) fn is_granted(&self) -> bool {
        self.granted.load(Ordering::Acquire)
    }

    fn grant(&self) {
        self.granted.store(true, Ordering::Release);
        match std::mem::take(&mut *lock(&self.wake)) {
            Wake::Nobody => {}
            Wake::Task(w) => w.wake(),
            Wake::Thread(t) => t.unpark(),
        }
    }

    /// Polls for the grant, registering the task to be woken.
    pub(crate) fn poll_granted(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.is_granted() {
            return Poll::Ready(());
        }
        {
            let mut wake = lock(&self.wake);
            match &*wake {
                Wake::Task(w) if w.will_wake(cx.waker()) => {}
                _ => *wake = Wake::Task(cx.waker().clone()),
            }
        }
        if self.is_granted() { Poll::Ready(()) } else { Poll::Pending }
    }

    /// Registers the current thread to be unparked on grant.
    pub(crate) fn register_thread(&self) {
        *lock(&self.wake) = Wake::Thread(std::thread::current());
    }
}

/// Waits in the queue for a permit; leaves the queue (passing on any permit granted meanwhile) when dropped early.
pub(crate) struct Wait<'a> {
    pub(crate) semaphore: &'a Semaphore,
    pub(crate) slot: Option<Arc<Slot>>,
}

impl Future for Wait<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let Some(slot) = &self.slot else { return Poll::Ready(()) };
        match slot.poll_granted(cx) {
            Poll::Ready(()) => {
                self.slot = None;
                Poll::Ready(())
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for Wait<'_> {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            if self.semaphore.dequeue(&slot) {
                self.semaphore.release();
            }
        }
    }
}
