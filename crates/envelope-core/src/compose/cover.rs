//! One timer per call instead of two: the call's deadline arms its own timer only while no attempt timer covers it.
//!
//! A call with a deadline runs its attempts under attempt timeouts whose limits are cut to the time left, so while
//! an attempt's timer is armed and ends no later than the deadline, that timer wakes the call in time and the
//! deadline needs no timer of its own (a timer costs a clock read, a registration and a removal). Between attempts
//! — a backoff, a bulkhead queue — or when an attempt's timer would end after the deadline (its limit counts from
//! when it was armed), the deadline arms its own, at the deadline itself.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use crate::timeout::LazyTimeout;

/// A call's deadline, and how many attempt timers ending by it are armed.
#[derive(Debug)]
pub(crate) struct Cover {
    deadline: Instant,
    armed: AtomicUsize,
}

impl Cover {
    pub(crate) fn new(deadline: Instant) -> Cover {
        Cover { deadline, armed: AtomicUsize::new(0) }
    }

    pub(crate) fn deadline(&self) -> Instant {
        self.deadline
    }
}

pin_project! {
    /// An attempt's timeout that counts itself in its call's [`Cover`] while its timer is armed and ends by the
    /// deadline.
    pub(crate) struct Covering<'a, F> {
        #[pin]
        inner: LazyTimeout<F>,
        cover: Option<&'a Cover>,
        counted: bool,
    }

    impl<F> PinnedDrop for Covering<'_, F> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if *this.counted && let Some(cover) = this.cover {
                cover.armed.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}

impl<'a, F> Covering<'a, F> {
    pub(crate) fn new(inner: LazyTimeout<F>, cover: Option<&'a Cover>) -> Self {
        Covering { inner, cover, counted: false }
    }
}

impl<F: Future> Future for Covering<'_, F> {
    type Output = <LazyTimeout<F> as Future>::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let out = this.inner.as_mut().poll(cx);
        let Some(cover) = this.cover else { return out };
        match &out {
            Poll::Ready(_) if *this.counted => {
                *this.counted = false;
                cover.armed.fetch_sub(1, Ordering::Relaxed);
            }
            Poll::Pending if !*this.counted && this.inner.armed_until().is_some_and(|end| end <= cover.deadline) => {
                *this.counted = true;
                cover.armed.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
        out
    }
}

pin_project! {
    /// The call's deadline over `inner` (the retry loop): its own timer only when no attempt timer covers it.
    pub(crate) struct Deadline<'a, F> {
        #[pin]
        inner: F,
        #[pin]
        sleep: Option<Sleep>,
        cover: &'a Cover,
    }
}

impl<'a, F> Deadline<'a, F> {
    pub(crate) fn new(inner: F, cover: &'a Cover) -> Self {
        Deadline { inner, sleep: None, cover }
    }
}

impl<F: Future> Future for Deadline<'_, F> {
    /// `Err(())` when the deadline passed first.
    type Output = Result<F::Output, ()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let Poll::Ready(out) = this.inner.poll(cx) {
            return Poll::Ready(Ok(out));
        }
        if this.sleep.is_none() {
            if this.cover.armed.load(Ordering::Relaxed) > 0 {
                // An attempt timer ending by the deadline will wake the call.
                return Poll::Pending;
            }
            this.sleep.set(Some(tokio::time::sleep_until(this.cover.deadline)));
        }
        match this.sleep.as_pin_mut().map(|s| s.poll(cx)) {
            Some(Poll::Ready(())) => Poll::Ready(Err(())),
            _ => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::{pending, poll_fn};
    use std::pin::pin;
    use std::time::Duration;

    use crate::timeout::lazy;

    async fn poll_once<F: Future>(f: Pin<&mut F>) -> Poll<F::Output> {
        let mut f = Some(f);
        poll_fn(|cx| Poll::Ready(f.take().map_or(Poll::Pending, |f| f.poll(cx)))).await
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_arms_no_timer_while_an_attempt_timer_ends_before_it() {
        let start = Instant::now();
        let cover = Cover::new(start + Duration::from_millis(100));
        let attempt = Covering::new(lazy(Duration::from_millis(30), pending::<()>()), Some(&cover));
        let mut call = pin!(Deadline::new(attempt, &cover));
        assert!(poll_once(call.as_mut()).await.is_pending());
        assert!(call.as_mut().project().sleep.is_none(), "no deadline timer while covered");
        assert_eq!(cover.armed.load(Ordering::Relaxed), 1);
        // The attempt's timer ends the call's wait at 30 ms, as its own timeout.
        let out = call.await;
        assert!(matches!(out, Ok(Err(_))), "the attempt timed out, not the deadline");
        assert_eq!(start.elapsed(), Duration::from_millis(30));
        assert_eq!(cover.armed.load(Ordering::Relaxed), 0, "uncounted once done");
    }

    #[tokio::test(start_paused = true)]
    async fn an_attempt_timer_ending_after_the_deadline_leaves_the_deadline_its_own() {
        let start = Instant::now();
        let cover = Cover::new(start + Duration::from_millis(100));
        // An attempt whose timer would end at 120 ms (its limit counts from when it is armed, which with a real
        // clock is always a little after its limit was cut to the time left).
        let attempt = Covering::new(lazy(Duration::from_millis(120), pending::<()>()), Some(&cover));
        let mut call = pin!(Deadline::new(attempt, &cover));
        assert!(poll_once(call.as_mut()).await.is_pending());
        assert_eq!(cover.armed.load(Ordering::Relaxed), 0, "not counted as cover");
        assert!(call.as_mut().project().sleep.is_some(), "the deadline armed its own timer");
        assert!(call.await.is_err(), "the deadline fired");
        assert_eq!(start.elapsed(), Duration::from_millis(100), "at the deadline, not at 120 ms");
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_before_the_attempt_is_bounded_by_the_deadline() {
        let start = Instant::now();
        let cover = Cover::new(start + Duration::from_millis(100));
        // A wait outside any attempt (a bulkhead queue, a backoff) that would outlast the deadline.
        let call = Deadline::new(tokio::time::sleep(Duration::from_millis(500)), &cover);
        assert!(call.await.is_err());
        assert_eq!(start.elapsed(), Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_attempt_uncounts_itself() {
        let cover = Cover::new(Instant::now() + Duration::from_millis(100));
        {
            let mut attempt = pin!(Covering::new(lazy(Duration::from_millis(30), pending::<()>()), Some(&cover)));
            assert!(poll_once(attempt.as_mut()).await.is_pending());
            assert_eq!(cover.armed.load(Ordering::Relaxed), 1);
        }
        assert_eq!(cover.armed.load(Ordering::Relaxed), 0);
    }
}
