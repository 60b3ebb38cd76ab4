//! Header hygiene for a proxy: hop-by-hop headers are not forwarded, and `X-Forwarded-For` records the client.

use std::net::IpAddr;

use http::{HeaderMap, HeaderName, HeaderValue, header};

/// `X-Forwarded-For`.
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// The hop-by-hop headers of RFC 9110 §7.6.1 (plus the legacy `Keep-Alive` and `Proxy-Connection`).
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Whether the raw header name `name` is one of the hop-by-hop headers of RFC 9110 (case-insensitive). Headers
/// that `Connection` names are hop-by-hop too: a message with `Connection` needs [`strip_hop_by_hop`].
pub fn is_hop_by_hop(name: &[u8]) -> bool {
    HOP_BY_HOP.iter().any(|h| name_is(name, h.as_bytes()))
}

/// Whether the raw header name `name` is `lower`, ignoring ASCII case. `lower` is a name as written in code: lower
/// case letters, digits and `-` only; `name` may hold any bytes.
///
/// Eight bytes at a time: a raw name may differ from `lower` only in bit 5 (0x20), and only where `lower` has a
/// letter — the bytes with bit 6 (0x40) set, among those `lower` may hold. Header names are compared on every
/// message, most of them against a literal of their own length, which a byte-by-byte case fold makes slow.
#[inline]
pub fn name_is(name: &[u8], lower: &[u8]) -> bool {
    debug_assert!(lower.iter().all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'), "{lower:?}");
    if name.len() != lower.len() {
        return false;
    }
    // Differences allowed: 0x20 where `lower` has a letter.
    let differs = |a: u64, l: u64| (a ^ l) & !((l & 0x4040_4040_4040_4040) >> 1) != 0;
    let n = name.len();
    if n < 8 {
        return name.iter().zip(lower).all(|(&a, &l)| (a ^ l) & !((l & 0x40) >> 1) == 0);
    }
    let word = |s: &[u8], at: usize| u64::from_le_bytes(s[at..at + 8].try_into().expect("eight bytes"));
    let mut at = 0;
    while at + 8 < n {
        if differs(word(name, at), word(lower, at)) {
            return false;
        }
        at += 8;
    }
    // The last eight bytes, overlapping the words before if `n` is not a multiple of eight.
    !differs(word(name, n - 8), word(lower, n - 8))
}

/// Maps with at most this many values are searched by comparing names rather than by hashing one.
const SCAN_AT_MOST: usize = 8;

/// The first value of `name`, as [`HeaderMap::get`]. A request carries few headers as a rule, and comparing a few
/// names is cheaper than hashing the one looked for (which `get` does for every name the proxy reads).
pub fn find<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<&'a HeaderValue> {
    if headers.len() <= SCAN_AT_MOST {
        headers.iter().find_map(|(k, v)| (k == name).then_some(v))
    } else {
        headers.get(name)
    }
}

/// Every value of `name` in order, as [`HeaderMap::get_all`] (see [`find`]).
pub fn find_all<'a>(headers: &'a HeaderMap, name: &'a HeaderName) -> impl Iterator<Item = &'a HeaderValue> + 'a {
    let small = headers.len() <= SCAN_AT_MOST;
    let scanned = small.then(|| headers.iter().filter_map(move |(k, v)| (k == name).then_some(v)));
    let hashed = (!small).then(|| headers.get_all(name).iter());
    scanned.into_iter().flatten().chain(hashed.into_iter().flatten())
}

/// Removes hop-by-hop headers, including every header named in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over the names, no lookups.
    if !headers.keys().any(|k| HOP_BY_HOP.contains(&k.as_str())) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Appends `client` to `X-Forwarded-For` (creating it if absent; several incoming values are joined).
pub fn append_forwarded_for(headers: &mut HeaderMap, client: IpAddr) {
    let value = forwarded_for(headers, &forwarded_value(client));
    headers.insert(X_FORWARDED_FOR.clone(), value);
}

/// `client` as an `X-Forwarded-For` value: made once per connection, appended to each of its requests with
/// [`forwarded_for`].
pub fn forwarded_value(client: IpAddr) -> HeaderValue {
    // The formatted string becomes the value's buffer (no second copy).
    HeaderValue::from_maybe_shared(bytes::Bytes::from(client.to_string())).expect("an IP address is a valid value")
}

/// The `X-Forwarded-For` a request with `headers` is forwarded with: its own (several values joined) with `client`
/// (from [`forwarded_value`]) appended, or just `client`.
pub fn forwarded_for(headers: &HeaderMap, client: &HeaderValue) -> HeaderValue {
    let mut existing = find_all(headers, &X_FORWARDED_FOR).filter_map(|v| v.to_str().ok()).map(str::trim).peekable();
    if existing.peek().is_none() {
        return client.clone();
    }
    let mut value = existing.collect::<Vec<_>>().join(", ");
    value.push_str(", ");
    value.push_str(client.to_str().unwrap_or_default());
    HeaderValue::from_maybe_shared(bytes::Bytes::from(value)).unwrap_or_else(|_| client.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// `find` and `find_all` answer as `get` and `get_all` do, for maps small enough to be scanned and larger,
        /// with repeated names.
        #[test]
        fn find_agrees_with_the_maps_own_lookups(
            entries in proptest::collection::vec((0usize..6, "[a-z0-9]{0,6}"), 0..20),
            looked_for in 0usize..6,
        ) {
            const NAMES: [&str; 6] = ["x-request-id", "traceparent", "x-forwarded-for", "host", "x-a", "x-b"];
            let mut headers = HeaderMap::new();
            for (name, value) in &entries {
                headers.append(NAMES[*name], HeaderValue::from_str(value).unwrap());
            }
            let name = HeaderName::from_static(NAMES[looked_for]);
            proptest::prop_assert_eq!(find(&headers, &name), headers.get(&name));
            let all: Vec<_> = find_all(&headers, &name).collect();
            let expected: Vec<_> = headers.get_all(&name).iter().collect();
            proptest::prop_assert_eq!(all, expected);
        }

        /// `name_is` agrees with a plain case-insensitive comparison for any bytes against every name the proxy
        /// compares with, and for any case of those names.
        #[test]
        fn name_is_matches_ascii_case_folding(
            raw in proptest::collection::vec(proptest::num::u8::ANY, 0..24),
            pick in 0usize..13,
            flips in proptest::num::u32::ANY,
        ) {
            const NAMES: [&str; 13] = ["connection", "keep-alive", "proxy-connection", "proxy-authenticate",
                "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade", "content-length",
                "x-request-id", "date", "x-b3-traceid-2"];
            let lower = NAMES[pick].as_bytes();
            proptest::prop_assert_eq!(name_is(&raw, lower), raw.eq_ignore_ascii_case(lower));
            // The name itself, in a random mix of cases, and the same with one byte changed.
            let mixed: Vec<u8> = lower.iter().enumerate()
                .map(|(i, &b)| if flips >> (i % 32) & 1 == 1 { b.to_ascii_uppercase() } else { b })
                .collect();
            proptest::prop_assert!(name_is(&mixed, lower));
            for i in 0..mixed.len() {
                for delta in [0x01u8, 0x20, 0x40, 0x80] {
                    let mut changed = mixed.clone();
                    changed[i] ^= delta;
                    proptest::prop_assert_eq!(name_is(&changed, lower), changed.eq_ignore_ascii_case(lower));
                }
            }
        }
    }

    #[test]
    fn strips_standard_and_connection_named_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, X-Secret-Hop"));
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-end-to-end", HeaderValue::from_static("kept"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert_eq!(h["x-end-to-end"], "kept");
    }

    #[test]
    fn hop_by_hop_names_are_recognised_in_any_case() {
        for name in ["Connection", "KEEP-ALIVE", "te", "Transfer-Encoding", "upgrade", "Proxy-Authorization"] {
            assert!(is_hop_by_hop(name.as_bytes()), "{name}");
        }
        for name in ["content-length", "date", "tee", "x-connection", ""] {
            assert!(!is_hop_by_hop(name.as_bytes()), "{name}");
        }
    }

    #[test]
    fn forwarded_for_is_appended() {
        let mut h = HeaderMap::new();
        append_forwarded_for(&mut h, "10.0.0.1".parse().unwrap());
        assert_eq!(h[&X_FORWARDED_FOR], "10.0.0.1");
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.2"));
        append_forwarded_for(&mut h, "::1".parse().unwrap());
        assert_eq!(h[&X_FORWARDED_FOR], "10.0.0.1, 10.0.0.2, ::1");
        assert_eq!(h.get_all(&X_FORWARDED_FOR).iter().count(), 1);
    }
}
