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

/// The gRPC header parsers (`grpc-timeout`, `grpc-status`, `content-type`) and encoders (`grpc-timeout`,
/// `grpc-message`): a value is accepted only in its documented form, and what is encoded is a valid header value
/// that decodes back (a time left, to at least itself).
pub fn grpc(data: &[u8]) {
    use envelope_http::grpc;
    if let Some(t) = grpc::parse_timeout(data) {
        let (unit, digits) = data.split_last().expect("a timeout has a unit");
        assert!(b"HMSmun".contains(unit) && (1..=8).contains(&digits.len()), "{t:?}");
        // What the sidecar tells an upstream for a time left reads back as at least that, and is a valid header.
        let told = grpc::format_timeout(t);
        assert!(grpc::parse_timeout(told.as_bytes()).is_some_and(|back| back >= t), "{t:?} -> {told}");
        assert!(http::HeaderValue::from_str(&told).is_ok());
    }
    if let Some(code) = grpc::parse_status(data) {
        assert!(code <= 999 && data.iter().all(u8::is_ascii_digit));
        let _ = (grpc::outcome(code), grpc::retryable(code));
    }
    if let Ok(value) = http::HeaderValue::from_bytes(data) {
        let mut headers = http::HeaderMap::new();
        headers.insert(http::header::CONTENT_TYPE, value);
        let _ = grpc::is_grpc(&headers);
    }
    let text = String::from_utf8_lossy(data);
    let encoded = grpc::encode_message(&text);
    let bytes = encoded.as_bytes();
    assert!(bytes.iter().all(|b| (0x20..=0x7e).contains(b)), "printable ASCII only");
    let mut decoded = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).expect("two hex digits");
            decoded.push(u8::from_str_radix(hex, 16).expect("hex"));
            i += 3;
        } else {
            decoded.push(bytes[i]);
            i += 1;
        }
    }
    assert_eq!(decoded, text.as_bytes(), "decodes back");
}
