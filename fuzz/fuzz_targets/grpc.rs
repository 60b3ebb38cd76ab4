//! Fuzz target: `envelope_sidecar::fuzz::grpc` (see that module for what it checks).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| envelope_sidecar::fuzz::grpc(data));
