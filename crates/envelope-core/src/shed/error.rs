use std::fmt;

use super::Priority;

/// The call was shed: the service is at its concurrency limit for the call's priority.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overloaded {
    pub(crate) priority: Priority,
    pub(crate) limit: usize,
}

impl Overloaded {
    /// The priority of the shed call.
    pub fn priority(&self) -> Priority {
        self.priority
    }

    /// The concurrency limit in force when it was shed.
    pub fn limit(&self) -> usize {
        self.limit
    }
}

impl fmt::Display for Overloaded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "overloaded: {} call shed at limit {}", self.priority, self.limit)
    }
}

impl std::error::Error for Overloaded {}
