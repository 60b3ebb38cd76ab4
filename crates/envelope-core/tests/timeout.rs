//! Timeout behaviour: the inner work is cancelled, and a caller's own cancellation is not a timeout.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use envelope_core::event::{Event, Listeners};
use envelope_core::timeout::Timeout;
use envelope_core::{Error, Outcome, error::outcome_of_error};

struct DropFlag(Arc<AtomicBool>);
impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[tokio::test(start_paused = true)]
async fn timeout_drops_the_inner_future() {
    let dropped = Arc::new(AtomicBool::new(false));
    let finished = Arc::new(AtomicBool::new(false));
    let t = Timeout::new(Duration::from_millis(100));
    let (d, f) = (dropped.clone(), finished.clone());
    let r = t
        .call(|| async move {
            let _guard = DropFlag(d);
            tokio::time::sleep(Duration::from_secs(5)).await;
            f.store(true, Ordering::SeqCst);
            Ok::<_, std::io::Error>(())
        })
        .await;
    let Err(Error::Timeout(e)) = r else { panic!("expected a timeout") };
    assert_eq!(e.after(), Duration::from_millis(100));
    assert!(dropped.load(Ordering::SeqCst), "the inner work was cancelled");
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(!finished.load(Ordering::SeqCst), "and never resumed");
    let boxed: envelope_core::BoxError = Box::new(e);
    assert_eq!(outcome_of_error(boxed.as_ref()), Outcome::Timeout);
}

#[tokio::test(start_paused = true)]
async fn caller_cancellation_is_not_a_timeout() {
    let timeouts = Arc::new(AtomicUsize::new(0));
    let seen = timeouts.clone();
    let listeners = Listeners::new().with(move |e: &Event<'_>| {
        if matches!(e, Event::TimedOut { .. }) {
            seen.fetch_add(1, Ordering::SeqCst);
        }
    });
    let t = Timeout::new(Duration::from_millis(100)).with_listeners(listeners);
    let call = t.call(|| async {
        tokio::time::sleep(Duration::from_secs(5)).await;
        Ok::<_, std::io::Error>(())
    });
    // The caller gives up first.
    let r = tokio::time::timeout(Duration::from_millis(10), call).await;
    assert!(r.is_err());
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(timeouts.load(Ordering::SeqCst), 0);
    // A real timeout is reported.
    let _ = t
        .call(|| async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok::<_, std::io::Error>(())
        })
        .await;
    assert_eq!(timeouts.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn fast_calls_pass_through() {
    let t = Timeout::new(Duration::from_millis(100));
    let r = t.call(|| async { Ok::<_, std::io::Error>(5) }).await;
    assert_eq!(r.unwrap(), 5);
}
