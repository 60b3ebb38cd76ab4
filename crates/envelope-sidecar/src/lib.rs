//! The `envelope` sidecar as a library: configuration, the server stack, the admin listener.
//!
//! Its content is being built (see the project's issues); the binary in `crates/envelope` stays a thin shell
//! around it.

pub use envelope_http;
