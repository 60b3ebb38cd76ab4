//! Circuit breaker: stop calling a dependency that is failing, and probe it carefully before trusting it again.
//!
//! Semantics follow resilience4j, with the differences noted:
//!
//! - **Closed**: calls pass and are recorded in a [count or time window](Window). Once the window holds at least
//!   `minimum_calls`, the breaker opens when the failure rate *or* the slow-call rate is **at or above** its
//!   threshold (`5 of 10` trips at 50 %).
//! - **Open**: calls are rejected with [`CircuitOpen`] (which says how long remains) until the open duration has
//!   passed. With [`Escalation`], each consecutive re-open lasts longer (capped, optionally jittered); the
//!   escalation resets when the breaker closes (Polly's escalating break).
//! - **Half-open**: exactly `half_open_calls` probes are admitted; concurrent extra calls are rejected. When all
//!   probes have been recorded, their failure and slow-call rates decide between closed and open. A probe whose
//!   outcome is ignored (or whose future is dropped) hands its permit back so another probe can run. If half-open
//!   lasts longer than `max_half_open_wait` (on by default, unlike resilience4j), the breaker re-opens, so a hung
//!   probe cannot wedge it.
//! - **Disabled / forced open / forced closed / metrics-only**: operator states that never transition by
//!   themselves; see [`State`].
//!
//! Results of calls admitted in an earlier state are not counted in a later one: every transition bumps a
//! generation carried by the permit.
//!
//! # The hot path
//! Admitting a call in the closed state is one atomic load. Recording a success in a full, clean count window is
//! two more loads and no write. Neither ever takes a lock; the mutex inside is taken only to change state. The clock
//! is read only where it is needed: in the open state, for time windows, and when slow-call detection is on.
//!
//! # Example
//! ```
//! use envelope_core::circuit_breaker::{CircuitBreaker, Config};
//! use envelope_core::Outcome;
//! use std::time::Duration;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let breaker = CircuitBreaker::new(
//!     "payments",
//!     Config::builder().count_window(20).minimum_calls(10).open_duration(Duration::from_secs(30)).build().unwrap(),
//! );
//! // As a plain call:
//! let result: Result<u32, _> = breaker.call(|| async { Ok::<_, std::io::Error>(7) }).await;
//! assert_eq!(result.unwrap(), 7);
//! // Or by hand, with a permit:
//! if let Ok(permit) = breaker.try_acquire() {
//!     permit.record(Outcome::Upstream5xx);
//! }
//! # }
//! ```

mod config;
pub(crate) mod error;
pub(crate) mod fleet;
mod registry;
pub(crate) mod state;
mod window;

use std::fmt;
use std::future::Future;
use std::time::Duration;

pub use config::{
    Builder, Config, ConfigError, DEFAULT_FAILURE_RATE_THRESHOLD, DEFAULT_HALF_OPEN_CALLS, DEFAULT_MAX_HALF_OPEN_WAIT,
    DEFAULT_MINIMUM_CALLS, DEFAULT_OPEN_DURATION, DEFAULT_SLOW_CALL_DURATION, DEFAULT_SLOW_CALL_RATE_THRESHOLD,
    DEFAULT_WINDOW, Escalation, MAX_COUNT_WINDOW, MAX_HALF_OPEN_CALLS, MAX_TIME_WINDOW_SECS, Window,
};
pub use error::CircuitOpen;
pub use fleet::Delta;
pub use registry::Registry;
pub use state::{Snapshot, State};

use self::state::{Verdict, Word, judge};
use self::window::SlidingWindow;
use crate::clock::{self, Instant};
use crate::event::Event;
use crate::outcome::{BreakerVerdict, Classify, DefaultClassifier, HasOutcome, Outcome};
use crate::sync::{Arc, AtomicU64, Mutex, Ordering, lock};

/// A circuit breaker. Cloning is cheap and every clone shares the same state: hand clones to every caller of the
/// same dependency.
#[derive(Clone)]
pub struct CircuitBreaker {
    shared: Arc<Shared>,
}

struct Shared {
    name: std::sync::Arc<str>,
    config: Config,
    epoch: Instant,
    word: AtomicU64,
    /// In open: when probes may start. In half-open: when to give up and re-open. Nanoseconds since `epoch`.
    deadline: AtomicU64,
    window: SlidingWindow,
    transitions: Mutex<Transitions>,
    /// Probes admitted in this half-open state: the config's `half_open_calls`, or what the fleet granted.
    allowance: AtomicU64,
    /// The link to the fleet, for a breaker shared in distributed mode.
    fleet: Option<fleet::Link>,
}

/// State that only changes under the transition lock.
#[derive(Debug, Default)]
struct Transitions {
    /// Opens since the last close (drives escalation).
    consecutive_opens: u32,
    /// Results of half-open probes.
    probes: Snapshot,
}

/// What a breaker reports about itself.
///
/// Rejected calls are not counted here: a rejection is the breaker's hottest path after the happy one, and a shared
/// counter would add an atomic read-modify-write to it. Count [`Event::CallNotPermitted`] in a listener (the
/// sidecar's metrics do), which costs nothing when nobody listens.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Metrics {
    /// Current state.
    pub state: State,
    /// Calls in the window (or, in half-open, probes recorded).
    pub window: Snapshot,
    /// Failure rate in percent, once the window holds the minimum number of calls.
    pub failure_rate: Option<f32>,
    /// Slow-call rate in percent, once the window holds the minimum number of calls.
    pub slow_call_rate: Option<f32>,
    /// Opens since the last close.
    pub consecutive_opens: u32,
    /// Time left in the open state.
    pub remaining_open: Option<Duration>,
}

impl CircuitBreaker {
    /// A closed breaker named `name`.
    pub fn new(name: impl Into<std::sync::Arc<str>>, config: Config) -> Self {
        Self::with_state(name, config, State::Closed)
    }

    /// A breaker that starts in `state` (for instance [`State::Disabled`] from configuration).
    pub fn with_state(name: impl Into<std::sync::Arc<str>>, config: Config, state: State) -> Self {
        Self::make(name.into(), config, state, None)
    }

    /// A breaker whose state is shared by a fleet of instances (distributed mode): it admits calls by itself, as
    /// any breaker, and a [`crate::distributed::Fleet`] syncing it makes its transitions the fleet's. Until the
    /// fleet is reached (and whenever it cannot be), it behaves exactly as [`CircuitBreaker::with_state`].
    pub fn linked(name: impl Into<std::sync::Arc<str>>, config: Config, state: State) -> Self {
        Self::make(name.into(), config, state, Some(fleet::Link::default()))
    }

    fn make(name: std::sync::Arc<str>, config: Config, state: State, fleet: Option<fleet::Link>) -> Self {
        let state = if state == State::HalfOpen || state == State::Open { State::Closed } else { state };
        let shared = Shared {
            name,
            epoch: clock::now(),
            word: AtomicU64::new(Word::initial(state).pack()),
            deadline: AtomicU64::new(0),
            window: SlidingWindow::new(config.window),
            transitions: Mutex::new(Transitions::default()),
            allowance: AtomicU64::new(u64::from(config.half_open_calls)),
            fleet,
            config,
        };
        CircuitBreaker { shared: Arc::new(shared) }
    }

    /// Whether `other` is a clone of this breaker (the same state), not merely one of the same name.
    pub fn same_as(&self, other: &CircuitBreaker) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }

    /// Whether this breaker is shared by a fleet ([`CircuitBreaker::linked`]).
    pub fn is_linked(&self) -> bool {
        self.shared.fleet.is_some()
    }

    /// The breaker's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The breaker's configuration.
    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// The current state. An open breaker whose open duration has passed still reads as open until the next call
    /// asks for a permit.
    pub fn state(&self) -> State {
        Word::unpack(self.shared.word.load(Ordering::Acquire)).state
    }

    /// Asks to make a call now. The permit must be used to [`record`](Permit::record) the outcome; dropping it
    /// unrecorded counts as a cancelled call (ignored, and a half-open probe slot is handed back).
    #[inline]
    pub fn try_acquire(&self) -> Result<Permit<'_>, CircuitOpen> {
        let token = self.shared.acquire(None)?;
        Ok(Permit { shared: &self.shared, token, done: false })
    }

    /// [`try_acquire`](Self::try_acquire) with the caller's reading of the clock.
    #[inline]
    pub fn try_acquire_at(&self, now: Instant) -> Result<Permit<'_>, CircuitOpen> {
        let token = self.shared.acquire(Some(now))?;
        Ok(Permit { shared: &self.shared, token, done: false })
    }

    /// Like [`try_acquire`](Self::try_acquire), but the permit owns a handle to the breaker (for futures that
    /// must be `'static`).
    pub fn try_acquire_owned(&self) -> Result<OwnedPermit, CircuitOpen> {
        let token = self.shared.acquire(None)?;
        Ok(OwnedPermit { shared: self.shared.clone(), token, done: false })
    }

    /// Runs `f` if the breaker permits it, classifying the result with [`DefaultClassifier`].
    pub async fn call<T, E, F, Fut>(&self, f: F) -> Result<T, crate::Error<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: HasOutcome,
    {
        self.call_classified(&DefaultClassifier, f).await
    }

    /// Runs `f` if the breaker permits it, classifying the result with `classifier`.
    pub async fn call_classified<T, E, F, Fut, C>(&self, classifier: &C, f: F) -> Result<T, crate::Error<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        C: Classify<T, E>,
    {
        let permit = self.try_acquire()?;
        let result = f().await;
        permit.record(classifier.classify(&result));
        result.map_err(crate::Error::Inner)
    }

    /// What the breaker knows now.
    pub fn metrics(&self) -> Metrics {
        let now = clock::nanos_since(self.shared.epoch, clock::now());
        let word = Word::unpack(self.shared.word.load(Ordering::Acquire));
        let t = lock(&self.shared.transitions);
        let window = if word.state == State::HalfOpen { t.probes } else { self.shared.window.snapshot(now) };
        let minimum = if word.state == State::HalfOpen { 1 } else { self.shared.config.minimum_calls };
        let ready = window.calls >= minimum && window.calls > 0;
        let remaining_open = (word.state == State::Open)
            .then(|| Duration::from_nanos(self.shared.deadline.load(Ordering::Acquire).saturating_sub(now)));
        Metrics {
            state: word.state,
            window,
            failure_rate: if ready { window.failure_rate() } else { None },
            slow_call_rate: if ready { window.slow_call_rate() } else { None },
            consecutive_opens: t.consecutive_opens,
            remaining_open,
        }
    }

    /// Moves to `state` now, whatever the current state: an operator's manual transition. Entering
    /// [`State::Closed`] clears the window and the escalation; entering [`State::Open`] counts as an open. On a
    /// linked breaker the transition also goes to the fleet, so that every instance makes it.
    pub fn transition_to(&self, state: State) {
        if let Some(link) = &self.shared.fleet {
            link.set_intent(state);
        }
        self.shared.transition(None, state, clock::now());
    }

    /// Rejects every call until released by another transition.
    pub fn force_open(&self) {
        self.transition_to(State::ForcedOpen);
    }

    /// Admits every call until released by another transition; calls are still recorded.
    pub fn force_closed(&self) {
        self.transition_to(State::ForcedClosed);
    }

    /// Back to closed with an empty window and no escalation.
    pub fn reset(&self) {
        self.transition_to(State::Closed);
    }
}

/// Distributed mode's hooks ([`crate::distributed`]): only a linked breaker has them.
impl CircuitBreaker {
    /// Whether the fleet decides this breaker's transitions (`on`), or the breaker alone (the fleet cannot be
    /// reached). Returns whether it changed.
    pub(crate) fn delegate(&self, on: bool) -> bool {
        match &self.shared.fleet {
            Some(link) => link.delegated.swap(on, Ordering::AcqRel) != on,
            None => false,
        }
    }

    /// The outcomes recorded since the last take.
    pub(crate) fn take_delta(&self) -> Delta {
        self.shared.fleet.as_ref().map(fleet::Link::take).unwrap_or_default()
    }

    /// An operator's transition made here and not yet sent to the fleet.
    pub(crate) fn take_intent(&self) -> Option<State> {
        self.shared.fleet.as_ref().and_then(fleet::Link::take_intent)
    }

    /// Puts back an operator's transition whose sending failed, unless a newer one was made meanwhile.
    pub(crate) fn restore_intent(&self, state: State) {
        if let Some(link) = &self.shared.fleet {
            let mut intent = crate::sync::lock(&link.intent);
            if intent.is_none() {
                *intent = Some(state);
            }
        }
    }

    /// Half-open probes handed out now (0 in any other state).
    pub(crate) fn probes_issued(&self) -> u32 {
        let word = Word::unpack(self.shared.word.load(Ordering::Acquire));
        if word.state == State::HalfOpen { u32::from(word.issued) } else { 0 }
    }

    /// The fleet epoch this breaker follows now (0: none yet).
    pub(crate) fn fleet_epoch(&self) -> u64 {
        self.shared.fleet.as_ref().map_or(0, |l| l.epoch.load(Ordering::Acquire))
    }

    /// Applies the fleet's state: `to` in fleet epoch `epoch`, with `remaining` (open: until probes may start;
    /// half-open: until the fleet gives up on its probes) and, in half-open, the probes granted to this instance.
    /// Returns the local transition it made, if any.
    pub(crate) fn follow(&self, to: State, epoch: u64, remaining: Duration, allowance: u32) -> Option<(State, State)> {
        let link = self.shared.fleet.as_ref()?;
        let s = &*self.shared;
        let now = clock::now();
        let mut t = lock(&s.transitions);
        let current = Word::unpack(s.word.load(Ordering::Acquire));
        if link.epoch.load(Ordering::Acquire) == epoch && current.state == to {
            if to == State::HalfOpen {
                s.allowance.store(u64::from(allowance), Ordering::Release);
            }
            return None;
        }
        link.epoch.store(epoch, Ordering::Release);
        if current.state == to && to == State::Closed {
            return None;
        }
        let from = s.enter(&mut t, current, to, now);
        let until = clock::nanos_since(s.epoch, now).saturating_add(clock::as_nanos(remaining));
        match to {
            State::Open => s.deadline.store(until, Ordering::Release),
            State::HalfOpen => {
                s.deadline.store(until, Ordering::Release);
                s.allowance.store(u64::from(allowance), Ordering::Release);
            }
            _ => {}
        }
        drop(t);
        s.config.listeners.emit(Event::StateTransition { name: &s.name, from, to });
        Some((from, to))
    }
}

impl fmt::Debug for CircuitBreaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker").field("name", &self.shared.name).field("state", &self.state()).finish()
    }
}

/// What a permit remembers about its admission.
#[derive(Debug, Clone, Copy)]
struct Token {
    generation: u32,
    probe: bool,
    /// When the call was admitted; only read when slow calls are detected.
    start: Option<Instant>,
}

impl Shared {
    /// Admits or rejects a call; `now` is read from the clock only if this decision needs it.
    #[inline]
    fn acquire(&self, now: Option<Instant>) -> Result<Token, CircuitOpen> {
        let bits = self.word.load(Ordering::Acquire);
        let word = Word::unpack(bits);
        if word.state == State::Closed && self.config.slow_call_duration.is_none() {
            return Ok(Token { generation: word.generation, probe: false, start: None });
        }
        self.acquire_slow(bits, now)
    }

    /// Every state but the common case of closed without slow-call detection.
    #[inline(never)]
    fn acquire_slow(&self, mut bits: u64, now: Option<Instant>) -> Result<Token, CircuitOpen> {
        let start =
            || if self.config.slow_call_duration.is_some() { Some(now.unwrap_or_else(clock::now)) } else { None };
        loop {
            let word = Word::unpack(bits);
            match word.state {
                State::Closed | State::ForcedClosed | State::MetricsOnly | State::Disabled => {
                    return Ok(Token { generation: word.generation, probe: false, start: start() });
                }
                State::ForcedOpen => return Err(self.reject(word.state, u64::MAX)),
                State::Open => {
                    let now = now.unwrap_or_else(clock::now);
                    let now_nanos = clock::nanos_since(self.epoch, now);
                    let until = self.deadline.load(Ordering::Acquire);
                    if now_nanos < until {
                        return Err(self.reject(State::Open, until - now_nanos));
                    }
                    if self.delegated() {
                        // The fleet moves to half-open and grants the probes; until then, still open.
                        return Err(self.reject(State::Open, 0));
                    }
                    self.transition(Some(word), State::HalfOpen, now);
                }
                State::HalfOpen => {
                    if u64::from(word.issued) < self.allowance.load(Ordering::Acquire) {
                        let next = Word { issued: word.issued + 1, ..word };
                        match self.word.compare_exchange_weak(bits, next.pack(), Ordering::AcqRel, Ordering::Acquire) {
                            Ok(_) => return Ok(Token { generation: word.generation, probe: true, start: start() }),
                            Err(actual) => {
                                bits = actual;
                                continue;
                            }
                        }
                    }
                    let now = now.unwrap_or_else(clock::now);
                    if clock::nanos_since(self.epoch, now) < self.deadline.load(Ordering::Acquire) || self.delegated() {
                        return Err(self.reject(State::HalfOpen, u64::MAX));
                    }
                    // A probe hung past the half-open limit: re-open rather than wait forever.
                    self.transition(Some(word), State::Open, now);
                }
            }
            bits = self.word.load(Ordering::Acquire);
        }
    }

    /// Whether the fleet decides this breaker's transitions now.
    #[inline]
    fn delegated(&self) -> bool {
        self.fleet.as_ref().is_some_and(fleet::Link::is_delegated)
    }

    #[inline]
    fn reject(&self, state: State, remaining_nanos: u64) -> CircuitOpen {
        if !self.config.listeners.is_empty() {
            self.config.listeners.emit(Event::CallNotPermitted { name: &self.name, state });
        }
        CircuitOpen { state, remaining_nanos }
    }

    /// Records a call's outcome; `now` is read from the clock only if slow calls or a time window need it.
    #[inline]
    fn record(&self, token: Token, outcome: Outcome, now: Option<Instant>) {
        let verdict = self.config.verdict(outcome);
        if verdict == BreakerVerdict::Ignore {
            self.release(token);
            return;
        }
        let failed = verdict == BreakerVerdict::Failure;
        let now = match now {
            Some(now) => Some(now),
            None if token.start.is_some() || token.probe || self.window.needs_time() => Some(clock::now()),
            None => None,
        };
        let slow = match (self.config.slow_call_duration, token.start, now) {
            (Some(threshold), Some(start), Some(now)) => now.saturating_duration_since(start) >= threshold,
            _ => false,
        };
        if token.probe {
            self.record_probe(token, failed, slow, now.unwrap_or_else(clock::now));
            return;
        }
        let word = Word::unpack(self.word.load(Ordering::Acquire));
        if word.generation != token.generation || !word.state.records() {
            return;
        }
        let now_nanos = now.map_or(0, |now| clock::nanos_since(self.epoch, now));
        if let Some(link) = &self.fleet {
            link.add(failed, slow);
        }
        if let Some(snapshot) = self.window.record(failed, slow, now_nanos)
            && !self.delegated()
        {
            self.judge(word, snapshot, now);
        }
    }

    /// Decides whether the window just recorded trips the breaker.
    #[inline(never)]
    fn judge(&self, word: Word, snapshot: Snapshot, now: Option<Instant>) {
        let c = &self.config;
        let verdict = judge(snapshot, c.minimum_calls, c.failure_ppm, c.slow_ppm);
        if matches!(verdict, Verdict::FailureRateExceeded | Verdict::SlowCallRateExceeded) {
            self.exceeded(verdict, snapshot);
            if word.state == State::Closed {
                self.transition(Some(word), State::Open, now.unwrap_or_else(clock::now));
            }
        }
    }

    #[cold]
    fn exceeded(&self, verdict: Verdict, s: Snapshot) {
        let name = &*self.name;
        let event = match verdict {
            Verdict::FailureRateExceeded => {
                Event::FailureRateExceeded { name, failure_rate: s.failure_rate().unwrap_or(0.0) }
            }
            _ => Event::SlowCallRateExceeded { name, slow_call_rate: s.slow_call_rate().unwrap_or(0.0) },
        };
        self.config.listeners.emit(event);
    }

    fn record_probe(&self, token: Token, failed: bool, slow: bool, now: Instant) {
        let mut t = lock(&self.transitions);
        let word = Word::unpack(self.word.load(Ordering::Acquire));
        if word.generation != token.generation || word.state != State::HalfOpen {
            return;
        }
        t.probes.calls += 1;
        t.probes.failures += u32::from(failed);
        t.probes.slow += u32::from(slow);
        if let Some(link) = &self.fleet {
            link.add_probe(failed, slow);
            if link.is_delegated() {
                return; // the fleet judges every instance's probes together
            }
        }
        if t.probes.calls < self.config.half_open_calls {
            return;
        }
        let c = &self.config;
        let verdict = judge(t.probes, c.half_open_calls, c.failure_ppm, c.slow_ppm);
        let to = if verdict == Verdict::Healthy { State::Closed } else { State::Open };
        let from = self.enter(&mut t, word, to, now);
        drop(t);
        self.config.listeners.emit(Event::StateTransition { name: &self.name, from, to });
    }

    /// Hands a half-open probe slot back (ignored outcome or dropped permit).
    fn release(&self, token: Token) {
        if !token.probe {
            return;
        }
        let mut bits = self.word.load(Ordering::Acquire);
        loop {
            let word = Word::unpack(bits);
            if word.generation != token.generation || word.state != State::HalfOpen || word.issued == 0 {
                return;
            }
            let next = Word { issued: word.issued - 1, ..word };
            match self.word.compare_exchange_weak(bits, next.pack(), Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return,
                Err(actual) => bits = actual,
            }
        }
    }

    /// Moves to `to` if the state is still `expected` (`None`: unconditionally). Emits the transition.
    #[cold]
    fn transition(&self, expected: Option<Word>, to: State, now: Instant) {
        let mut t = lock(&self.transitions);
        let current = Word::unpack(self.word.load(Ordering::Acquire));
        if let Some(expected) = expected
            && (current.generation != expected.generation || current.state != expected.state)
        {
            return;
        }
        let from = self.enter(&mut t, current, to, now);
        drop(t);
        self.config.listeners.emit(Event::StateTransition { name: &self.name, from, to });
    }

    /// Performs the transition; the caller holds the transition lock.
    fn enter(&self, t: &mut Transitions, current: Word, to: State, now: Instant) -> State {
        let now_nanos = clock::nanos_since(self.epoch, now);
        match to {
            State::Open => {
                t.consecutive_opens = t.consecutive_opens.saturating_add(1);
                let open_for = self.config.open_duration_for(t.consecutive_opens);
                self.deadline.store(now_nanos.saturating_add(clock::as_nanos(open_for)), Ordering::Release);
            }
            State::HalfOpen => {
                t.probes = Snapshot::default();
                self.allowance.store(u64::from(self.config.half_open_calls), Ordering::Release);
                let give_up =
                    self.config.max_half_open_wait.map_or(u64::MAX, |d| now_nanos.saturating_add(clock::as_nanos(d)));
                self.deadline.store(give_up, Ordering::Release);
            }
            State::Closed => {
                t.consecutive_opens = 0;
                self.window.reset();
            }
            State::ForcedClosed | State::MetricsOnly | State::Disabled | State::ForcedOpen => self.window.reset(),
        }
        self.word.store(current.enter(to).pack(), Ordering::Release);
        current.state
    }
}

/// Permission to make one call, borrowed from the breaker.
#[must_use = "record the outcome with `record`; dropping the permit counts as a cancelled call"]
pub struct Permit<'a> {
    shared: &'a Shared,
    token: Token,
    done: bool,
}

impl Permit<'_> {
    /// Records how the call ended, timed from the permit's admission.
    #[inline]
    pub fn record(mut self, outcome: Outcome) {
        self.done = true;
        self.shared.record(self.token, outcome, None);
    }

    /// [`record`](Self::record) with the caller's reading of the clock.
    #[inline]
    pub fn record_at(mut self, outcome: Outcome, now: Instant) {
        self.done = true;
        self.shared.record(self.token, outcome, Some(now));
    }

    /// Whether this permit is a half-open probe.
    pub fn is_probe(&self) -> bool {
        self.token.probe
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.shared.release(self.token);
        }
    }
}

impl fmt::Debug for Permit<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit").field("probe", &self.token.probe).finish()
    }
}

/// A [`Permit`] that owns a handle to its breaker.
#[must_use = "record the outcome with `record`; dropping the permit counts as a cancelled call"]
pub struct OwnedPermit {
    shared: Arc<Shared>,
    token: Token,
    done: bool,
}

impl OwnedPermit {
    /// Records how the call ended, timed from the permit's admission.
    pub fn record(mut self, outcome: Outcome) {
        self.done = true;
        self.shared.record(self.token, outcome, None);
    }
}

impl Drop for OwnedPermit {
    fn drop(&mut self) {
        if !self.done {
            self.shared.release(self.token);
        }
    }
}

impl fmt::Debug for OwnedPermit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OwnedPermit").field("probe", &self.token.probe).finish()
    }
}

#[cfg(all(test, envelope_loom))]
mod loom_model {
    use super::*;

    fn config(half_open_calls: u32) -> Config {
        Config::builder().count_window(2).minimum_calls(2).half_open_calls(half_open_calls).build().unwrap()
    }

    /// Two concurrent callers in half-open with one probe: exactly one is admitted while the probe is out, and
    /// its success closes the breaker.
    #[test]
    fn half_open_admits_exactly_one_of_two() {
        loom::model(|| {
            let b = CircuitBreaker::new("loom", config(1));
            b.transition_to(State::HalfOpen);
            let other = b.clone();
            let t = loom::thread::spawn(move || other.try_acquire_owned().ok());
            let mine = b.try_acquire_owned().ok();
            let theirs = t.join().unwrap();
            let admitted: Vec<_> = mine.into_iter().chain(theirs).collect();
            assert_eq!(admitted.len(), 1);
            for p in admitted {
                p.record(Outcome::Ok);
            }
            assert_eq!(b.state(), State::Closed);
        });
    }

    /// Two failures recorded concurrently in a window of two open the breaker exactly once.
    #[test]
    fn concurrent_failures_open_exactly_once() {
        loom::model(|| {
            let b = CircuitBreaker::new("loom", config(1));
            let p1 = b.try_acquire().unwrap();
            let p2 = b.try_acquire_owned().unwrap();
            let t = loom::thread::spawn(move || p2.record(Outcome::Failure));
            p1.record(Outcome::Failure);
            t.join().unwrap();
            assert_eq!(b.state(), State::Open);
            let m = b.metrics();
            assert_eq!(m.consecutive_opens, 1, "one transition, not two");
        });
    }

    /// A probe released (dropped) concurrently with another caller's admission never lets more than the allowed
    /// number of probes be outstanding.
    #[test]
    fn released_probe_and_new_admission() {
        loom::model(|| {
            let b = CircuitBreaker::new("loom", config(1));
            b.transition_to(State::HalfOpen);
            let first = b.try_acquire().unwrap();
            let other = b.clone();
            let t = loom::thread::spawn(move || other.try_acquire().map(|p| std::mem::forget(p)).is_ok());
            drop(first);
            let got = t.join().unwrap();
            let now = b.try_acquire().map(|p| std::mem::forget(p)).is_ok();
            assert!(!(got && now), "at most one probe outstanding after the release");
            assert!(got || now, "the released slot is usable");
        });
    }
}
