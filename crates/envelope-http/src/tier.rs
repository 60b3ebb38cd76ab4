//! The priority of a request by its path, when nothing says otherwise: the same rule for the sidecar's routes
//! (their tier) and the Python middleware's requests.
//!
//! Authentication, login, payments and checkout are critical (shed last); analytics, reports and exports
//! non-critical (shed first); everything else default. The first path segment decides, by prefix.

use envelope_core::shed::Priority;

/// The priority of a request or route for `path` (a path or a route's path prefix).
pub fn priority_by_path(path: &str) -> Priority {
    let first = path.trim_start_matches('/').split('/').next().unwrap_or("");
    let starts = |names: &[&str]| names.iter().any(|n| first.starts_with(n));
    if starts(&["auth", "login", "payment", "checkout"]) {
        Priority::Critical
    } else if starts(&["analytics", "report", "export"]) {
        Priority::NonCritical
    } else {
        Priority::Default
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_segment_decides() {
        for (path, p) in [
            ("/auth/token", Priority::Critical),
            ("/payments/42", Priority::Critical),
            ("/checkout", Priority::Critical),
            ("/reports/daily", Priority::NonCritical),
            ("/export", Priority::NonCritical),
            ("/items/1", Priority::Default),
            ("/", Priority::Default),
            ("/api/payments", Priority::Default),
        ] {
            assert_eq!(priority_by_path(path), p, "{path}");
        }
    }
}
