//! Sliding windows of recent calls, lock-free.
//!
//! **Count window** — the last `n` calls as two bit sets (failed, slow) indexed by a call sequence number, with
//! running counts of set bits. A successful, fast call that lands in a full window with no failed or slow call in
//! it changes nothing observable (it would evict another clean call), so it returns without writing anything:
//! the healthy steady state is read-only and scales across cores. Any other call advances the sequence with one
//! `fetch_add` and flips at most two bits.
//!
//! **Time window** — one bucket per second, `n` buckets in a ring. Each counter is a `u64` tagged with the second
//! it belongs to (high 32 bits) and updated by compare-and-swap, so a bucket rolls over to a new second exactly,
//! even with concurrent writers, and an expired bucket is recognised by its tag without a sweeper.

use super::state::Snapshot;
use crate::sync::{AtomicIsize, AtomicU64, Ordering};

use super::config::Window;

const NANOS_PER_SEC: u64 = 1_000_000_000;

#[derive(Debug)]
pub(crate) enum SlidingWindow {
    Count(CountWindow),
    Time(TimeWindow),
}

impl SlidingWindow {
    pub(crate) fn new(window: Window) -> Self {
        match window {
            Window::Count(n) => SlidingWindow::Count(CountWindow::new(n)),
            Window::Time(secs) => SlidingWindow::Time(TimeWindow::new(secs)),
        }
    }

    /// Records one call. Returns the window after it, or `None` when the call cannot have changed any verdict
    /// (a clean call in a clean window), which is the lock-free, write-free fast path.
    #[inline]
    pub(crate) fn record(&self, failed: bool, slow: bool, now_nanos: u64) -> Option<Snapshot> {
        match self {
            SlidingWindow::Count(w) => w.record(failed, slow),
            SlidingWindow::Time(w) => w.record(failed, slow, now_nanos),
        }
    }

    /// Whether recording needs the time (time windows do, count windows do not).
    #[inline]
    pub(crate) fn needs_time(&self) -> bool {
        matches!(self, SlidingWindow::Time(_))
    }

    pub(crate) fn snapshot(&self, now_nanos: u64) -> Snapshot {
        match self {
            SlidingWindow::Count(w) => w.snapshot(),
            SlidingWindow::Time(w) => w.snapshot(now_nanos / NANOS_PER_SEC),
        }
    }

    /// Forgets every call. Called under the breaker's transition lock.
    pub(crate) fn reset(&self) {
        match self {
            SlidingWindow::Count(w) => w.reset(),
            SlidingWindow::Time(w) => w.reset(),
        }
    }
}

#[derive(Debug)]
pub(crate) struct CountWindow {
    size: u64,
    seq: AtomicU64,
    failed_bits: Box<[AtomicU64]>,
    slow_bits: Box<[AtomicU64]>,
    // Signed: a bit can be cleared by one thread just before the thread that set it counts it.
    failed: AtomicIsize,
    slow: AtomicIsize,
}

impl CountWindow {
    fn new(size: u32) -> Self {
        let words = (size as usize).div_ceil(64);
        CountWindow {
            size: u64::from(size),
            seq: AtomicU64::new(0),
            failed_bits: (0..words).map(|_| AtomicU64::new(0)).collect(),
            slow_bits: (0..words).map(|_| AtomicU64::new(0)).collect(),
            failed: AtomicIsize::new(0),
            slow: AtomicIsize::new(0),
        }
    }

    #[inline]
    fn record(&self, failed: bool, slow: bool) -> Option<Snapshot> {
        if !failed
            && !slow
            && self.failed.load(Ordering::Acquire) <= 0
            && self.slow.load(Ordering::Acquire) <= 0
            && self.seq.load(Ordering::Relaxed) >= self.size
        {
            return None;
        }
        let pos = self.seq.fetch_add(1, Ordering::AcqRel);
        let slot = pos % self.size;
        let (word, mask) = ((slot / 64) as usize, 1u64 << (slot % 64));
        let df = set_bit(&self.failed_bits[word], mask, failed);
        let ds = set_bit(&self.slow_bits[word], mask, slow);
        let failures = if df != 0 {
            self.failed.fetch_add(df, Ordering::AcqRel) + df
        } else {
            self.failed.load(Ordering::Acquire)
        };
        let slows =
            if ds != 0 { self.slow.fetch_add(ds, Ordering::AcqRel) + ds } else { self.slow.load(Ordering::Acquire) };
        Some(Snapshot { calls: (pos + 1).min(self.size) as u32, failures: clamp(failures), slow: clamp(slows) })
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            calls: self.seq.load(Ordering::Acquire).min(self.size) as u32,
            failures: clamp(self.failed.load(Ordering::Acquire)),
            slow: clamp(self.slow.load(Ordering::Acquire)),
        }
    }

    fn reset(&self) {
        self.seq.store(0, Ordering::Release);
        for w in self.failed_bits.iter().chain(self.slow_bits.iter()) {
            w.store(0, Ordering::Release);
        }
        self.failed.store(0, Ordering::Release);
        self.slow.store(0, Ordering::Release);
    }
}

/// Sets or clears `mask` in `word`; returns how the number of set bits changed (-1, 0 or +1).
#[inline]
fn set_bit(word: &AtomicU64, mask: u64, set: bool) -> isize {
    if set {
        let old = word.fetch_or(mask, Ordering::AcqRel);
        isize::from(old & mask == 0)
    } else if word.load(Ordering::Acquire) & mask == 0 {
        0
    } else {
        let old = word.fetch_and(!mask, Ordering::AcqRel);
        -isize::from(old & mask != 0)
    }
}

fn clamp(n: isize) -> u32 {
    u32::try_from(n.max(0)).unwrap_or(u32::MAX)
}

#[derive(Debug)]
pub(crate) struct TimeWindow {
    secs: u64,
    buckets: Box<[Bucket]>,
    /// Tag (second + 1) of the last second that saw a failed or slow call; 0 if none.
    last_bad: AtomicU64,
}

#[derive(Debug, Default)]
struct Bucket {
    calls: AtomicU64,
    failed: AtomicU64,
    slow: AtomicU64,
}

const COUNT_MASK: u64 = u32::MAX as u64;

impl TimeWindow {
    fn new(secs: u32) -> Self {
        TimeWindow {
            secs: u64::from(secs),
            buckets: (0..secs).map(|_| Bucket::default()).collect(),
            last_bad: AtomicU64::new(0),
        }
    }

    fn record(&self, failed: bool, slow: bool, now_nanos: u64) -> Option<Snapshot> {
        let sec = now_nanos / NANOS_PER_SEC;
        let tag = sec + 1;
        let bucket = &self.buckets[(sec % self.secs) as usize];
        bump(&bucket.calls, tag);
        if failed {
            bump(&bucket.failed, tag);
        }
        if slow {
            bump(&bucket.slow, tag);
        }
        if failed || slow {
            self.last_bad.fetch_max(tag, Ordering::AcqRel);
        } else if self.last_bad.load(Ordering::Acquire) + self.secs <= tag {
            // No failed or slow call in the window: a clean call cannot change any verdict.
            return None;
        }
        Some(self.snapshot(sec))
    }

    fn snapshot(&self, sec: u64) -> Snapshot {
        let newest = sec + 1;
        let oldest = newest.saturating_sub(self.secs - 1);
        let live = |word: &AtomicU64| {
            let v = word.load(Ordering::Acquire);
            let tag = v >> 32;
            if tag >= oldest && tag <= newest { (v & COUNT_MASK) as u32 } else { 0 }
        };
        let mut s = Snapshot::default();
        for b in self.buckets.iter() {
            s.calls = s.calls.saturating_add(live(&b.calls));
            s.failures = s.failures.saturating_add(live(&b.failed));
            s.slow = s.slow.saturating_add(live(&b.slow));
        }
        s
    }

    fn reset(&self) {
        for b in self.buckets.iter() {
            b.calls.store(0, Ordering::Release);
            b.failed.store(0, Ordering::Release);
            b.slow.store(0, Ordering::Release);
        }
        self.last_bad.store(0, Ordering::Release);
    }
}

/// Adds one to a tagged counter, restarting it at 1 if it belongs to an older second. A write for a second older
/// than the counter's is dropped: that bucket has already been reused for a newer second.
#[inline]
fn bump(word: &AtomicU64, tag: u64) {
    let mut current = word.load(Ordering::Acquire);
    loop {
        let current_tag = current >> 32;
        let next = if current_tag == tag {
            current + 1
        } else if current_tag < tag {
            tag << 32 | 1
        } else {
            return;
        };
        match word.compare_exchange_weak(current, next, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return,
            Err(actual) => current = actual,
        }
    }
}

#[cfg(all(test, not(envelope_loom)))]
mod tests {
    use super::*;

    const S: u64 = NANOS_PER_SEC;

    #[test]
    fn count_window_evicts_the_oldest_call() {
        let w = CountWindow::new(4);
        for failed in [true, true, false, false] {
            w.record(failed, false);
        }
        assert_eq!(w.snapshot(), Snapshot { calls: 4, failures: 2, slow: 0 });
        // Two more clean calls push both failures out.
        w.record(false, false);
        assert_eq!(w.snapshot().failures, 1);
        w.record(false, false);
        assert_eq!(w.snapshot(), Snapshot { calls: 4, failures: 0, slow: 0 });
        // Now clean and full: a clean call takes the write-free path.
        assert_eq!(w.record(false, false), None);
        assert_eq!(w.record(false, true), Some(Snapshot { calls: 4, failures: 0, slow: 1 }));
    }

    #[test]
    fn count_window_not_full_always_counts() {
        let w = CountWindow::new(3);
        assert_eq!(w.record(false, false), Some(Snapshot { calls: 1, failures: 0, slow: 0 }));
        assert_eq!(w.record(false, false), Some(Snapshot { calls: 2, failures: 0, slow: 0 }));
        w.reset();
        assert_eq!(w.snapshot(), Snapshot::default());
    }

    #[test]
    fn count_window_spanning_many_words() {
        let w = CountWindow::new(200);
        for i in 0..1000u32 {
            w.record(i % 4 == 0, i % 10 == 0);
        }
        assert_eq!(w.snapshot(), Snapshot { calls: 200, failures: 50, slow: 20 });
    }

    #[test]
    fn time_window_rolls_over_by_the_second() {
        let w = TimeWindow::new(3);
        w.record(true, false, 0);
        w.record(false, false, S / 2);
        w.record(true, false, S + 1);
        w.record(false, true, 2 * S);
        assert_eq!(w.snapshot(2), Snapshot { calls: 4, failures: 2, slow: 1 });
        // At second 3 the bucket of second 0 has left the window.
        assert_eq!(w.snapshot(3), Snapshot { calls: 2, failures: 1, slow: 1 });
        // Writing second 3 reuses second 0's bucket and restarts its counters.
        w.record(false, false, 3 * S);
        assert_eq!(w.snapshot(3), Snapshot { calls: 3, failures: 1, slow: 1 });
        assert_eq!(w.snapshot(10), Snapshot::default());
    }

    #[test]
    fn time_window_clean_calls_take_the_fast_path_once_failures_expire() {
        let w = TimeWindow::new(2);
        assert!(w.record(true, false, 0).is_some());
        assert!(w.record(false, false, S).is_some(), "failure of second 0 still in window");
        assert_eq!(w.record(false, false, 2 * S), None);
        assert_eq!(w.snapshot(2).calls, 2);
    }

    #[test]
    fn stale_writes_do_not_clobber_a_newer_second() {
        let word = AtomicU64::new(0);
        bump(&word, 5);
        bump(&word, 5);
        bump(&word, 3);
        assert_eq!(word.load(Ordering::Relaxed), 5 << 32 | 2);
        bump(&word, 6);
        assert_eq!(word.load(Ordering::Relaxed), 6 << 32 | 1);
    }
}
