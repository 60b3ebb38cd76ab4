//! Call priorities: which calls a shedder sheds first.

use std::fmt;

/// How important a call is; lower priorities are shed first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Priority {
    /// Analytics, reports, prefetch: shed first.
    NonCritical,
    /// Ordinary API traffic.
    Default,
    /// Authentication, payments: shed last.
    Critical,
}

impl Priority {
    /// The stable name used in metrics and config.
    pub const fn as_str(self) -> &'static str {
        match self {
            Priority::NonCritical => "non_critical",
            Priority::Default => "default",
            Priority::Critical => "critical",
        }
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
