//! W3C Trace Context (`traceparent`): keep a valid incoming trace, or start one, and pass it on.
//!
//! `traceparent: 00-<trace-id: 32 hex>-<parent-id: 16 hex>-<flags: 2 hex>`. A hop keeps the trace id and sends its
//! own span id as the parent id, so the upstream's spans hang under this hop. An invalid header (wrong length,
//! not lowercase hex, all-zero ids, version `ff`) is treated as absent: a new trace starts.

use http::{HeaderMap, HeaderName, HeaderValue};

/// The `traceparent` header.
pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// A position in a trace: the trace, this hop's span, and the trace flags (bit 0: sampled).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    /// The trace id.
    pub trace_id: u128,
    /// This hop's span id.
    pub span_id: u64,
    /// The span this one continues (from the incoming `traceparent`), if any.
    pub parent_id: Option<u64>,
    /// The trace flags.
    pub flags: u8,
}

impl TraceContext {
    /// Continues the trace of `headers` with a new span of this hop, or starts a new, sampled trace.
    pub fn continue_or_start(headers: &HeaderMap) -> TraceContext {
        match crate::headers::find(headers, &TRACEPARENT).and_then(parse) {
            Some((trace_id, parent, flags)) => {
                TraceContext { trace_id, span_id: span_id(), parent_id: Some(parent), flags }
            }
            None => TraceContext { trace_id: trace_id(), span_id: span_id(), parent_id: None, flags: 1 },
        }
    }

    /// A new span in the same trace, under this one (e.g. one attempt of a request).
    pub fn child(&self) -> TraceContext {
        TraceContext { trace_id: self.trace_id, span_id: span_id(), parent_id: Some(self.span_id), flags: self.flags }
    }

    /// The trace id as 32 lowercase hex digits (for logs and exemplars).
    pub fn trace_id_hex(&self) -> String {
        let mut hex = [0u8; 32];
        lower_hex(&mut hex, self.trace_id);
        hex.iter().map(|&b| char::from(b)).collect()
    }

    /// The `traceparent` value that makes this hop's span the parent of the next one.
    pub fn header_value(&self) -> HeaderValue {
        HeaderValue::from_bytes(&self.traceparent()).expect("hex digits and dashes are a valid header value")
    }

    /// The same value as bytes, on the stack (for a writer that needs no [`HeaderValue`]).
    pub fn traceparent(&self) -> [u8; 55] {
        // Written by hand: one per request, and `format!` of a u128 in hex costs more than the rest of it.
        let mut v = [0u8; 55];
        v[..3].copy_from_slice(b"00-");
        lower_hex(&mut v[3..35], self.trace_id);
        v[35] = b'-';
        lower_hex(&mut v[36..52], u128::from(self.span_id));
        v[52] = b'-';
        lower_hex(&mut v[53..55], u128::from(self.flags));
        v
    }
}

/// Fills `out` with the low `out.len()` hex digits of `value`, zero-padded, lower case (`out.len()` even).
pub(crate) fn lower_hex(out: &mut [u8], mut value: u128) {
    // Two digits per step, from a table of the 256 byte values.
    const PAIRS: [[u8; 2]; 256] = {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut t = [[0u8; 2]; 256];
        let mut i = 0;
        while i < 256 {
            t[i] = [DIGITS[i >> 4], DIGITS[i & 0xf]];
            i += 1;
        }
        t
    };
    for pair in out.rchunks_exact_mut(2) {
        pair.copy_from_slice(&PAIRS[(value & 0xff) as usize]);
        value >>= 8;
    }
}

fn trace_id() -> u128 {
    loop {
        let id = fastrand::u128(..);
        if id != 0 {
            return id;
        }
    }
}

fn span_id() -> u64 {
    loop {
        let id = fastrand::u64(..);
        if id != 0 {
            return id;
        }
    }
}

/// `(trace_id, parent_id, flags)` of a valid `traceparent`.
fn parse(value: &HeaderValue) -> Option<(u128, u64, u8)> {
    let s = value.to_str().ok()?;
    let mut parts = s.split('-');
    let (version, trace, parent, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex =
        |p: &str, len: usize| p.len() == len && p.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !hex(version, 2) || version == "ff" || !hex(trace, 32) || !hex(parent, 16) || !hex(flags, 2) {
        return None;
    }
    // Version 00 has exactly four fields; later versions may append more.
    if version == "00" && parts.next().is_some() {
        return None;
    }
    let trace_id = u128::from_str_radix(trace, 16).ok().filter(|t| *t != 0)?;
    let parent_id = u64::from_str_radix(parent, 16).ok().filter(|p| *p != 0)?;
    Some((trace_id, parent_id, u8::from_str_radix(flags, 16).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT.clone(), HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn a_valid_trace_is_continued_with_a_new_span() {
        let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let t = TraceContext::continue_or_start(&headers(incoming));
        assert_eq!(t.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(t.span_id, 0x00f0_67aa_0ba9_02b7, "this hop's own span");
        assert_eq!(t.parent_id, Some(0x00f0_67aa_0ba9_02b7), "under the caller's");
        let attempt = t.child();
        assert_eq!((attempt.trace_id, attempt.parent_id, attempt.flags), (t.trace_id, Some(t.span_id), t.flags));
        assert_ne!(attempt.span_id, t.span_id);
        assert_eq!(t.flags, 1);
        let out = t.header_value();
        let s = out.to_str().unwrap();
        assert!(s.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-") && s.ends_with("-01") && s.len() == 55, "{s}");
        assert!(parse(&out).is_some());
    }

    #[test]
    fn the_traceparent_is_written_exactly() {
        let t = TraceContext {
            trace_id: 0x0af7_6519_16cd_43dd_8448_eb21_1c80_319c,
            span_id: 0xb7,
            parent_id: None,
            flags: 1,
        };
        assert_eq!(&t.traceparent(), b"00-0af7651916cd43dd8448eb211c80319c-00000000000000b7-01");
        let t = TraceContext { trace_id: u128::MAX, span_id: u64::MAX, parent_id: None, flags: 0 };
        assert_eq!(t.header_value(), "00-ffffffffffffffffffffffffffffffff-ffffffffffffffff-00");
    }

    #[test]
    fn invalid_traces_start_a_new_one() {
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "garbage",
        ] {
            let t = TraceContext::continue_or_start(&headers(bad));
            assert_ne!(t.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736", "{bad}");
            assert!(parse(&t.header_value()).is_some(), "a valid new trace for {bad}");
        }
        let t = TraceContext::continue_or_start(&HeaderMap::new());
        assert_eq!(t.flags, 1, "new traces are sampled");
    }
}
