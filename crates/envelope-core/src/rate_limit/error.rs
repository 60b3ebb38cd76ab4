use std::fmt;
use std::time::Duration;

/// A local rate limit rejected the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimited {
    pub(crate) retry_after: Duration,
}

impl RateLimited {
    /// How long until a call would be allowed (a good `Retry-After`).
    pub fn retry_after(&self) -> Duration {
        self.retry_after
    }
}

impl fmt::Display for RateLimited {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rate limited; retry after {:?}", self.retry_after)
    }
}

impl std::error::Error for RateLimited {}
