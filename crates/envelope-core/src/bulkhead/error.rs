use std::fmt;

/// The bulkhead had no free permit: its queue was full, or the wait in the queue ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BulkheadFull {
    pub(crate) waited: bool,
}

impl BulkheadFull {
    /// True if the call waited in the queue and the wait ran out; false if it was rejected at once.
    pub fn waited(&self) -> bool {
        self.waited
    }
}

impl fmt::Display for BulkheadFull {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.waited { f.write_str("bulkhead queue wait timed out") } else { f.write_str("bulkhead is full") }
    }
}

impl std::error::Error for BulkheadFull {}
