//! Entry points for the fuzz targets in `fuzz/` (cargo-fuzz): each feeds arbitrary bytes to one of the sidecar's
//! parsers and checks what must hold whatever the input. Not an API: hidden from the documentation, kept here so
//! that the parsers can stay private to the crate.

use crate::data::inbound::h1;
use crate::data::outbound::client;

/// The listener's request head parser, with the listener's default limits: served, read on, handed over or
/// refused, never a panic; a request it serves consumed exactly its head and body.
pub fn request_head(data: &[u8]) {
    h1::fuzz_parse(data);
}

/// The upstream client's chunked body decoder, fed `data` in pieces whose sizes come from its first bytes.
pub fn chunked(data: &[u8]) {
    client::fuzz_chunked(data);
}

/// The upstream client's response head reader, then its body decoder on what follows the head.
pub fn response(data: &[u8]) {
    client::fuzz_response(data);
}

/// The config loader: any text is a config or an error that names a place in it, never a panic.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Err(e) = crate::config::Config::parse("fuzz.toml", text) {
        let _ = e.to_string();
    }
}
