//! Bulkhead behaviour: limits, FIFO queue, queue timeout, resizing, and permits that never leak.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use envelope_core::bulkhead::{Bulkhead, Config};
use envelope_core::event::Event;

const MS: Duration = Duration::from_millis(1);

#[tokio::test(start_paused = true)]
async fn rejects_at_once_without_a_queue() {
    let b = Bulkhead::new("b", Config::builder().max_concurrent(2).build().unwrap());
    let p1 = b.acquire().await.unwrap();
    let _p2 = b.acquire().await.unwrap();
    let err = b.acquire().await.unwrap_err();
    assert!(!err.waited());
    drop(p1);
    assert!(b.try_acquire().is_ok());
    assert_eq!(b.metrics().rejected, 1);
}

#[tokio::test(start_paused = true)]
async fn queue_is_fifo_bounded_and_timed() {
    let b = Bulkhead::new("b", Config::builder().max_concurrent(1).queue(2, 100 * MS).build().unwrap());
    let held = b.acquire_owned().await.unwrap();
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut waiters = Vec::new();
    for i in 0..2 {
        let (b, order) = (b.clone(), order.clone());
        waiters.push(tokio::spawn(async move {
            let _p = b.acquire().await.unwrap();
            order.lock().unwrap().push(i);
            tokio::time::sleep(MS).await;
        }));
        tokio::task::yield_now().await;
    }
    assert_eq!(b.metrics().queued, 2);
    assert!(!b.acquire().await.unwrap_err().waited(), "queue of 2 is full");
    drop(held);
    for w in waiters {
        w.await.unwrap();
    }
    assert_eq!(*order.lock().unwrap(), [0, 1], "first in, first served");

    let held = b.acquire_owned().await.unwrap();
    let t0 = tokio::time::Instant::now();
    let err = b.acquire().await.unwrap_err();
    assert!(err.waited());
    assert_eq!(tokio::time::Instant::now() - t0, 100 * MS);
    assert_eq!(b.metrics().queued, 0, "a timed-out waiter leaves the queue");
    drop(held);
    assert_eq!(b.metrics().active, 0);
}

#[tokio::test(start_paused = true)]
async fn resizes_live() {
    let b = Bulkhead::new("b", Config::builder().max_concurrent(2).queue(10, Duration::from_secs(1)).build().unwrap());
    let p: Vec<_> = vec![b.acquire_owned().await.unwrap(), b.acquire_owned().await.unwrap()];
    let waiter = {
        let b = b.clone();
        tokio::spawn(async move { b.acquire_owned().await.map(|_| ()) })
    };
    tokio::task::yield_now().await;
    b.set_max_concurrent(3).unwrap();
    waiter.await.unwrap().expect("growing the limit admits a waiter at once");
    b.set_max_concurrent(1).unwrap();
    drop(p);
    assert_eq!(b.metrics().active, 0);
    let _one = b.try_acquire().unwrap();
    assert!(b.try_acquire().is_err(), "shrunk to one");
    assert!(b.set_max_concurrent(0).is_err());
}

#[tokio::test(start_paused = true)]
async fn rejections_are_reported() {
    let events = Arc::new(AtomicUsize::new(0));
    let seen = events.clone();
    let b = Bulkhead::new(
        "b",
        Config::builder()
            .max_concurrent(1)
            .listener(move |e: &Event<'_>| {
                if matches!(e, Event::BulkheadRejected { waited: false, .. }) {
                    seen.fetch_add(1, Ordering::SeqCst);
                }
            })
            .build()
            .unwrap(),
    );
    let _p = b.try_acquire().unwrap();
    let _ = b.try_acquire();
    assert_eq!(events.load(Ordering::SeqCst), 1);
}

/// Thousands of calls, cancelled at random points (while queued, while running) or panicking while holding a
/// permit: afterwards every permit is back, none was handed out twice, and the limit was never exceeded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_leaks_a_permit_under_cancellation_and_panics() {
    const LIMIT: usize = 4;
    let b = Bulkhead::new("b", Config::builder().max_concurrent(LIMIT).queue(8, 2 * MS).build().unwrap());
    let running = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..3000u32 {
        let (b, running, peak) = (b.clone(), running.clone(), peak.clone());
        let task = tokio::spawn(async move {
            let Ok(_permit) = b.acquire().await else { return };
            let now = running.fetch_add(1, Ordering::SeqCst) + 1;
            peak.fetch_max(now, Ordering::SeqCst);
            struct Leave(Arc<AtomicUsize>);
            impl Drop for Leave {
                fn drop(&mut self) {
                    self.0.fetch_sub(1, Ordering::SeqCst);
                }
            }
            let _leave = Leave(running);
            tokio::time::sleep(Duration::from_micros(fastrand::u64(0..300))).await;
            if i % 97 == 0 {
                panic!("boom while holding a permit");
            }
        });
        if fastrand::u8(0..4) == 0 {
            // Cancel some calls at a random point: before, while queued, or while running.
            let abort = task.abort_handle();
            let delay = Duration::from_micros(fastrand::u64(0..500));
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                abort.abort();
            });
        }
        tasks.push(task);
        if i % 50 == 0 {
            tokio::task::yield_now().await;
        }
    }
    let mut panicked = 0;
    for t in tasks {
        if let Err(e) = t.await {
            panicked += usize::from(e.is_panic());
        }
    }
    assert!(panicked > 0, "the test must exercise panics");
    let m = b.metrics();
    assert_eq!((m.active, m.queued), (0, 0), "every permit and queue slot returned");
    assert!(peak.load(Ordering::SeqCst) <= LIMIT);
    // All permits are really free: LIMIT at once, and not one more.
    let all: Vec<_> = (0..LIMIT).map(|_| b.try_acquire().expect("free")).collect();
    assert!(b.try_acquire().is_err(), "no permit was returned twice");
    drop(all);
}

#[test]
fn blocking_threads_share_the_limit_and_release_on_panic() {
    const LIMIT: usize = 3;
    let b =
        Bulkhead::new("b", Config::builder().max_concurrent(LIMIT).queue(64, Duration::from_secs(5)).build().unwrap());
    let running = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let handles: Vec<_> = (0..12)
        .map(|i| {
            let (b, running, peak) = (b.clone(), running.clone(), peak.clone());
            std::thread::spawn(move || {
                for j in 0..50 {
                    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        let _permit = b.acquire_blocking().expect("queue wait is generous");
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        peak.fetch_max(now, Ordering::SeqCst);
                        std::thread::yield_now();
                        running.fetch_sub(1, Ordering::SeqCst);
                        if (i + j) % 13 == 0 {
                            panic!("boom");
                        }
                    }));
                    let _ = result;
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert!(peak.load(Ordering::SeqCst) <= LIMIT);
    assert_eq!(b.metrics().active, 0);
}

/// The queue ticket for callers with their own event loop: FIFO with the async and blocking waiters, a dropped
/// ticket passes on a permit granted meanwhile, and `leave` after the wait ran out is a counted rejection.
#[test]
fn queue_tickets_wait_in_the_same_fifo() {
    use envelope_core::bulkhead::Admission;
    use std::task::{Context, Poll, Waker};
    let b = Bulkhead::new("b", Config::builder().max_concurrent(1).queue(3, 100 * MS).build().unwrap());
    let Ok(Admission::Acquired(held)) = b.acquire_or_queue() else { panic!("a free permit is taken at once") };
    let Ok(Admission::Queued(mut first)) = b.acquire_or_queue() else { panic!("queued") };
    let Ok(Admission::Queued(second)) = b.acquire_or_queue() else { panic!("queued") };
    let Ok(Admission::Queued(third)) = b.acquire_or_queue() else { panic!("queued") };
    assert!(!b.acquire_or_queue().unwrap_err().waited(), "the queue of 3 is full");
    assert_eq!(first.max_wait(), 100 * MS);
    let mut cx = Context::from_waker(Waker::noop());
    assert!(std::pin::Pin::new(&mut first).poll(&mut cx).is_pending());
    drop(held);
    let Poll::Ready(permit) = std::pin::Pin::new(&mut first).poll(&mut cx) else { panic!("first in line") };
    assert_eq!(b.metrics().queued, 2);
    // The second gives up after its permit was granted: the permit goes on to the third, not lost.
    drop(permit);
    drop(second);
    let permit = third.leave().expect("granted before the wait ran out");
    assert_eq!(b.metrics().active, 1);
    assert_eq!(b.metrics().rejected, 1);
    // A ticket whose wait ran out ungranted is a rejection that waited.
    let Ok(Admission::Queued(late)) = b.acquire_or_queue() else { panic!("queued") };
    let err = late.leave().unwrap_err();
    assert!(err.waited());
    assert_eq!((b.metrics().queued, b.metrics().rejected), (0, 2));
    drop(permit);
    assert_eq!(b.metrics().active, 0);
}
