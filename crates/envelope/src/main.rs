//! `envelope`: the sidecar binary. Load config, build, run, exit code; everything else lives in
//! `envelope-sidecar`.

use std::process::ExitCode;

fn main() -> ExitCode {
    let _ = envelope_sidecar::envelope_http::envelope_core::Outcome::Ok;
    eprintln!("envelope: the sidecar is not built yet; the policy engine is the `envelope-core` crate.");
    eprintln!("Try `cargo run --example flaky_dependency` to see the policies at work.");
    ExitCode::from(2)
}
