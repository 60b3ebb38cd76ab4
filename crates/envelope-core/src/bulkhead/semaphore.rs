//! A FIFO semaphore with a bounded queue, live resizing, and waiters that are async tasks or blocked threads.
//!
//! Why not `tokio::sync::Semaphore`: the bulkhead also needs a bounded queue, waiting from threads that have no
//! runtime (`call_blocking`), and shrinking below the permits in use. The design:
//!
//! - One `u64` word holds both the free permits (low half, may go negative after a shrink; nobody takes a permit
//!   while it is ≤ 0) and the number of queued waiters (high half). Because both live in one word, a releaser's
//!   `fetch_add` tells it atomically whether anybody waits: no Dekker-style pairing of two variables, no reliance
//!   on `SeqCst`, and nothing loom cannot model.
//! - Fast path: when nobody is queued, take a permit with one compare-and-swap; release with one `fetch_add`.
//! - Slow path: waiters queue in FIFO order under a mutex; a releaser that saw waiters hands free permits to the
//!   front of the queue, taking the permit and the queue slot in one compare-and-swap.
//! - A waiter that gives up (cancelled, timed out) removes itself; if a permit was handed to it meanwhile, it
//!   passes the permit on. Permits are returned by `Drop`, exactly once.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::thread::Thread;

use crate::sync::{Arc, AtomicBool, AtomicU64, AtomicUsize, Mutex, Ordering, lock};

/// Largest number of permits (the free count is stored with this offset in 32 bits).
pub(crate) const MAX_PERMITS: usize = 1 << 30;
const OFFSET: u64 = 1 << 31;
const ONE_QUEUED: u64 = 1 << 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct State {
    available: i64,
    queued: u64,
}

impl State {
    const fn unpack(word: u64) -> State {
        State { available: (word & 0xFFFF_FFFF) as i64 - OFFSET as i64, queued: word >> 32 }
    }

    const fn pack(self) -> u64 {
        self.queued << 32 | (self.available + OFFSET as i64) as u64
    }
}

#[derive(Debug)]
pub(crate) struct Semaphore {
    word: AtomicU64,
    limit: AtomicUsize,
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

/// What joining the queue gave.
#[derive(Debug)]
pub(crate) enum Enqueued {
    /// A permit was free after all: it is the caller's.
    Acquired,
    /// The caller waits on this slot.
    Waiting(Arc<Slot>),
}

impl Semaphore {
    pub(crate) fn new(permits: usize) -> Self {
        let permits = permits.min(MAX_PERMITS);
        Semaphore {
            word: AtomicU64::new(State { available: permits as i64, queued: 0 }.pack()),
            limit: AtomicUsize::new(permits),
            queue: Mutex::new(VecDeque::new()),
        }
    }

    fn state(&self) -> State {
        State::unpack(self.word.load(Ordering::Acquire))
    }

    pub(crate) fn limit(&self) -> usize {
        self.limit.load(Ordering::Acquire)
    }

    pub(crate) fn in_use(&self) -> usize {
        (self.limit() as i64 - self.state().available).max(0) as usize
    }

    pub(crate) fn queued(&self) -> usize {
        self.state().queued as usize
    }

    /// Takes a permit if one is free and nobody is queued ahead.
    #[inline]
    pub(crate) fn try_acquire(&self) -> bool {
        let mut word = self.word.load(Ordering::Acquire);
        loop {
            let s = State::unpack(word);
            if s.queued > 0 || s.available <= 0 {
                return false;
            }
            match self.word.compare_exchange_weak(word, word - 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return true,
                Err(actual) => word = actual,
            }
        }
    }

    /// Returns a permit.
    #[inline]
    pub(crate) fn release(&self) {
        let before = State::unpack(self.word.fetch_add(1, Ordering::AcqRel));
        if before.queued > 0 {
            self.dispatch(&mut lock(&self.queue));
        }
    }

    /// Hands free permits to the front of the queue. Caller holds the queue lock.
    fn dispatch(&self, queue: &mut VecDeque<Arc<Slot>>) {
        while !queue.is_empty() {
            // Take a permit and the waiter's queue slot together.
            let mut word = self.word.load(Ordering::Acquire);
            loop {
                let s = State::unpack(word);
                if s.available <= 0 {
                    return;
                }
                let next = State { available: s.available - 1, queued: s.queued - 1 }.pack();
                match self.word.compare_exchange_weak(word, next, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => break,
                    Err(actual) => word = actual,
                }
            }
            if let Some(slot) = queue.pop_front() {
                slot.grant();
            }
        }
    }

    /// Joins the queue (if it has room), or takes a permit freed meanwhile.
    pub(crate) fn enqueue(&self, max_queue: usize) -> Result<Enqueued, Refused> {
        let mut queue = lock(&self.queue);
        let mut word = self.word.load(Ordering::Acquire);
        loop {
            let s = State::unpack(word);
            let next = if s.queued == 0 && s.available > 0 {
                word - 1
            } else if queue.len() >= max_queue {
                return Err(Refused::QueueFull);
            } else {
                word + ONE_QUEUED
            };
            match self.word.compare_exchange_weak(word, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) if next < word => return Ok(Enqueued::Acquired),
                Ok(_) => break,
                Err(actual) => word = actual,
            }
        }
        let slot = Arc::new(Slot::default());
        queue.push_back(slot.clone());
        // Permits freed by releasers that saw no waiter yet go to the front of the queue now.
        self.dispatch(&mut queue);
        Ok(Enqueued::Waiting(slot))
    }

    /// Leaves the queue. Returns true if the slot had already been granted a permit, which the caller now owns.
    pub(crate) fn dequeue(&self, slot: &Arc<Slot>) -> bool {
        let mut queue = lock(&self.queue);
        if let Some(i) = queue.iter().position(|s| Arc::ptr_eq(s, slot)) {
            queue.remove(i);
            self.word.fetch_sub(ONE_QUEUED, Ordering::AcqRel);
            return false;
        }
        slot.is_granted()
    }

    /// Changes the number of permits. Shrinking below the permits in use takes effect as they are returned.
    pub(crate) fn resize(&self, permits: usize) {
        let permits = permits.min(MAX_PERMITS);
        let mut queue = lock(&self.queue);
        let old = self.limit.swap(permits, Ordering::AcqRel);
        if permits >= old {
            self.word.fetch_add((permits - old) as u64, Ordering::AcqRel);
        } else {
            self.word.fetch_sub((old - permits) as u64, Ordering::AcqRel);
        }
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
        if let Some(slot) = self.slot.take()
            && self.semaphore.dequeue(&slot)
        {
            self.semaphore.release();
        }
    }
}

#[cfg(all(test, envelope_loom))]
mod loom_model {
    use super::*;

    /// One permit, two callers: the second queues while the first may be releasing at the same moment. In every
    /// interleaving the second gets the permit (no waiter sleeps next to a free permit) and it ends up free again.
    #[test]
    fn release_races_with_enqueue() {
        loom::model(|| {
            let s = Arc::new(Semaphore::new(1));
            assert!(s.try_acquire());
            let other = s.clone();
            let t = loom::thread::spawn(move || {
                if !other.try_acquire() {
                    if let Enqueued::Waiting(slot) = other.enqueue(1).expect("room in the queue") {
                        loom::future::block_on(Wait { semaphore: &other, slot: Some(slot) });
                    }
                }
                other.release();
            });
            s.release();
            t.join().unwrap();
            assert_eq!(s.in_use(), 0);
            assert_eq!(s.queued(), 0);
            assert!(s.try_acquire(), "the permit is free");
        });
    }

    /// A waiter that gives up while a permit is being handed to it passes the permit on: never leaked, never
    /// returned twice.
    #[test]
    fn cancelled_waiter_passes_a_granted_permit_on() {
        loom::model(|| {
            let s = Arc::new(Semaphore::new(1));
            assert!(s.try_acquire());
            let Enqueued::Waiting(slot) = s.enqueue(1).expect("room") else { panic!("no permit is free") };
            let releaser = s.clone();
            let t = loom::thread::spawn(move || releaser.release());
            drop(Wait { semaphore: &s, slot: Some(slot) });
            t.join().unwrap();
            assert_eq!(s.in_use(), 0);
            assert_eq!(s.queued(), 0);
            assert!(s.try_acquire());
            assert!(!s.try_acquire(), "exactly one permit");
        });
    }
}
