use std::fmt;
use std::time::Duration;

/// The timeout fired before the call finished; the call was cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed {
    pub(crate) after: Duration,
}

impl Elapsed {
    /// A timeout that fired after `after`.
    pub fn new(after: Duration) -> Self {
        Elapsed { after }
    }

    /// The timeout that fired.
    pub fn after(&self) -> Duration {
        self.after
    }
}

impl fmt::Display for Elapsed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "timed out after {:?}", self.after)
    }
}

impl std::error::Error for Elapsed {}
