//! A breaker's link to its fleet (distributed mode, [`crate::distributed`]): the outcomes it recorded since the
//! last sync, whether the fleet or the breaker itself decides its transitions, and an operator's transition
//! waiting to be sent to the fleet.
//!
//! A linked breaker still admits every call by itself, from its own state word: the fleet never sits on the call
//! path. What changes while the fleet decides ("delegated"): the breaker's own window no longer trips it, an open
//! breaker does not move to half-open by itself, and half-open probes are only those the fleet granted it; the
//! fleet's transitions arrive through [`super::CircuitBreaker`]'s `follow`. When the fleet cannot be reached the
//! link is released and the breaker decides alone again, from its own window.

use super::state::{Snapshot, State};
use crate::sync::{AtomicBool, AtomicU64, Mutex, Ordering, lock};

/// Outcomes recorded since the last sync, and the probes among them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Delta {
    /// Calls recorded in the closed state.
    pub window: Snapshot,
    /// Half-open probes recorded.
    pub probes: Snapshot,
}

#[derive(Debug, Default)]
pub(crate) struct Link {
    /// While true, the fleet decides the breaker's transitions.
    pub(crate) delegated: AtomicBool,
    /// The fleet epoch whose state the breaker follows now (0: none yet).
    pub(crate) epoch: AtomicU64,
    /// Window outcomes since the last sync, packed: calls, failures, slow (21 bits each).
    window: AtomicU64,
    /// Probe outcomes since the last sync, packed the same way.
    probes: AtomicU64,
    /// An operator's transition (force open, force closed, reset) for the fleet.
    pub(crate) intent: Mutex<Option<State>>,
}

const FIELD: u32 = 21;
const MASK: u64 = (1 << FIELD) - 1;

fn packed(failed: bool, slow: bool) -> u64 {
    1 | u64::from(failed) << FIELD | u64::from(slow) << (2 * FIELD)
}

fn unpack(bits: u64) -> Snapshot {
    Snapshot {
        calls: (bits & MASK) as u32,
        failures: (bits >> FIELD & MASK) as u32,
        slow: (bits >> (2 * FIELD) & MASK) as u32,
    }
}

impl Link {
    /// Counts one recorded call (one `fetch_add`; the sync takes the counts at least every few hundred
    /// milliseconds, far below the 2 million calls a field holds).
    #[inline]
    pub(crate) fn add(&self, failed: bool, slow: bool) {
        self.window.fetch_add(packed(failed, slow), Ordering::Relaxed);
    }

    pub(crate) fn add_probe(&self, failed: bool, slow: bool) {
        self.probes.fetch_add(packed(failed, slow), Ordering::Relaxed);
    }

    /// Takes the counts since the last take.
    pub(crate) fn take(&self) -> Delta {
        Delta {
            window: unpack(self.window.swap(0, Ordering::AcqRel)),
            probes: unpack(self.probes.swap(0, Ordering::AcqRel)),
        }
    }

    pub(crate) fn is_delegated(&self) -> bool {
        self.delegated.load(Ordering::Acquire)
    }

    pub(crate) fn set_intent(&self, state: State) {
        *lock(&self.intent) = Some(state);
    }

    pub(crate) fn take_intent(&self) -> Option<State> {
        lock(&self.intent).take()
    }
}
