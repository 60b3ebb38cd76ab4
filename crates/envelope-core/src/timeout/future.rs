use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::Sleep;

use super::Elapsed;

pin_project! {
    /// A timeout whose timer is armed only when the inner future first returns `Pending`.
    ///
    /// A call that completes on its first poll (a cache hit, an in-memory answer, a rejection) costs no clock read
    /// and no timer registration. The limit counts from the first `Pending`, which is where waiting starts; the
    /// synchronous work of the first poll cannot be interrupted by any timer anyway.
    #[must_use = "futures do nothing unless polled"]
    #[derive(Debug)]
    pub struct LazyTimeout<F> {
        #[pin]
        future: F,
        #[pin]
        sleep: Option<Sleep>,
        limit: Duration,
    }
}

impl<F> LazyTimeout<F> {
    /// When the timer ends, once armed.
    pub(crate) fn armed_until(&self) -> Option<tokio::time::Instant> {
        self.sleep.as_ref().map(Sleep::deadline)
    }
}

/// Runs `future` for at most `limit` (armed lazily, see [`LazyTimeout`]).
pub(crate) fn lazy<F: Future>(limit: Duration, future: F) -> LazyTimeout<F> {
    LazyTimeout { future, sleep: None, limit }
}

impl<F: Future> Future for LazyTimeout<F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let Poll::Ready(out) = this.future.poll(cx) {
            return Poll::Ready(Ok(out));
        }
        if this.sleep.is_none() {
            this.sleep.set(Some(tokio::time::sleep(*this.limit)));
        }
        match this.sleep.as_pin_mut().map(|s| s.poll(cx)) {
            Some(Poll::Ready(())) => Poll::Ready(Err(Elapsed { after: *this.limit })),
            _ => Poll::Pending,
        }
    }
}
