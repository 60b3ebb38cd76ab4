//! Control: the sidecar's life (start, reload, drain, signals) and its admin API and dashboard.

pub(crate) mod admin;
pub mod server;
pub(crate) mod shared;
