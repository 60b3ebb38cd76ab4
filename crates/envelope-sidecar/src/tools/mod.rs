//! Operator tools built from the same config: the demo, generated Prometheus rules and Grafana dashboards, and
//! `envelope verify`.

pub mod demo;
pub mod generate;
pub mod verify;
