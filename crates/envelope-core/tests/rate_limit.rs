//! Rate limiter behaviour on a paused clock: burst, steady rate, waiting, shadow mode, per-key memory bounds.

use std::time::Duration;

use envelope_core::rate_limit::{Config, KeyedRateLimiter, RateLimiter};
use tokio::time::advance;

const MS: Duration = Duration::from_millis(1);

#[tokio::test(start_paused = true)]
async fn burst_then_steady_rate() {
    let l = RateLimiter::new("l", Config::per_second(10).burst(5).build().unwrap());
    let allowed = (0..20).filter(|_| l.try_acquire().is_ok()).count();
    assert_eq!(allowed, 5, "a full burst, then nothing");
    let err = l.try_acquire().unwrap_err();
    assert_eq!(err.retry_after(), 100 * MS);
    advance(99 * MS).await;
    assert!(l.try_acquire().is_err());
    advance(MS).await;
    assert!(l.try_acquire().is_ok(), "one call per 100 ms");
    assert!(l.try_acquire().is_err());
    // Over 10 s of steady calls, 10 per second get through.
    let mut allowed = 0;
    for _ in 0..1000 {
        advance(10 * MS).await;
        allowed += usize::from(l.try_acquire().is_ok());
    }
    assert_eq!(allowed, 100);
    let m = l.metrics();
    assert_eq!(m.allowed, 106);
}

#[tokio::test(start_paused = true)]
async fn waits_for_a_turn_up_to_max_wait() {
    let l = RateLimiter::new("l", Config::per_second(10).burst(1).max_wait(250 * MS).build().unwrap());
    let t0 = tokio::time::Instant::now();
    for expected in [0, 100, 200] {
        l.acquire().await.unwrap();
        assert_eq!((tokio::time::Instant::now() - t0).as_millis(), expected);
    }
    // Three callers at once: the turns are 300, 400 and 500 ms; the third would wait 300 ms > 250 ms.
    assert_eq!(l.reserve().unwrap(), 100 * MS);
    assert_eq!(l.reserve().unwrap(), 200 * MS);
    assert!(l.reserve().is_err());
}

#[tokio::test(start_paused = true)]
async fn shadow_mode_counts_but_never_rejects() {
    let l = RateLimiter::new("l", Config::per_second(1).burst(1).shadow(true).build().unwrap());
    assert!((0..10).all(|_| l.try_acquire().is_ok()));
    assert_eq!(l.metrics().limited, 9);
}

#[tokio::test(start_paused = true)]
async fn keys_are_limited_separately_in_bounded_memory() {
    let l = KeyedRateLimiter::new("per-client", Config::per_second(1).burst(2).build().unwrap(), 64).unwrap();
    let (a, b) = (u32::MAX, u32::MAX - 1);
    assert!(l.try_acquire(&a).is_ok() && l.try_acquire(&a).is_ok());
    assert!(l.try_acquire(&a).is_err());
    assert!(l.try_acquire(&b).is_ok(), "another key has its own burst");
    for i in 0..10_000u32 {
        let _ = l.try_acquire(&i);
    }
    assert!(l.len() <= 64, "tracked keys stay bounded: {}", l.len());
    advance(Duration::from_secs(5)).await;
    l.evict_idle();
    assert!(l.is_empty(), "idle keys carry no state and are evicted");
}

#[test]
fn invalid_configs_are_rejected() {
    assert!(Config::per_second(0).build().is_err());
    assert!(Config::per_second(5).burst(0).build().is_err());
    assert!(Config::per(5, Duration::ZERO).build().is_err());
    assert!(KeyedRateLimiter::<u32>::new("l", Config::per_second(5).build().unwrap(), 0).is_err());
}

#[tokio::test(start_paused = true)]
async fn the_quota_says_what_is_left_and_when_all_of_it_is_back() {
    let limiter = RateLimiter::new("q", Config::per(5, Duration::from_secs(10)).build().unwrap());
    let q = limiter.quota();
    assert_eq!((q.limit, q.window, q.remaining, q.reset), (5, Duration::from_secs(10), 5, Duration::ZERO));
    for left in (0..5).rev() {
        limiter.try_acquire().unwrap();
        assert_eq!(limiter.quota().remaining, left);
    }
    assert!(limiter.try_acquire().is_err());
    let q = limiter.quota();
    assert_eq!((q.remaining, q.reset), (0, Duration::from_secs(10)), "all five back in one window");
    tokio::time::advance(Duration::from_secs(2)).await;
    let q = limiter.quota();
    assert_eq!((q.remaining, q.reset), (1, Duration::from_secs(8)), "one earned back every 2 s");
}
