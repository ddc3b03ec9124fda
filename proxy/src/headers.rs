//! Header handling of the forwarding path: hop-by-hop removal, X-Forwarded-*, request ids.

use std::net::IpAddr;

use http::HeaderMap;
use http::header::{self, Entry, HeaderName, HeaderValue};

pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
const HTTP2_SETTINGS: HeaderName = HeaderName::from_static("http2-settings");

/// Headers that describe one connection, never forwarded (RFC 9110 §7.6.1; `HTTP2-Settings`
/// belongs to an h2c upgrade, RFC 7540 §3.2.1).
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    HTTP2_SETTINGS,
];

/// Whether the request asks for a protocol upgrade (`Connection: upgrade` and `Upgrade`).
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE) && connection_has(headers, "upgrade")
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Removes hop-by-hop headers, including those the `Connection` header names. With
/// `keep_upgrade`, `Upgrade` survives and `Connection: upgrade` is put back.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Most messages carry none of these: one pass over the names present is cheaper than a
    // hashed removal per hop-by-hop name.
    let any = headers
        .keys()
        .any(|k| *k == header::UPGRADE || HOP_BY_HOP.contains(k));
    if !any {
        if keep_upgrade {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        return;
    }
    // A message with both framings was framed by Transfer-Encoding (RFC 9112 §6.3); the
    // next hop frames it anew, so the stale Content-Length must go, or the body it carries
    // would be cut to that length.
    if headers.contains_key(header::TRANSFER_ENCODING) {
        headers.remove(header::CONTENT_LENGTH);
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for n in named {
        if !(keep_upgrade && n == header::UPGRADE) {
            headers.remove(n);
        }
    }
    for n in &HOP_BY_HOP {
        headers.remove(n);
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

/// Appends the client address to `x-forwarded-for` and sets `x-forwarded-proto`.
pub fn set_forwarded(headers: &mut HeaderMap, client: IpAddr, proto: &'static str) {
    let mut buf = IpBuf::default();
    let ip = buf.format(client.to_canonical());
    let value = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prev) if !prev.trim().is_empty() => {
            HeaderValue::from_str(&format!("{prev}, {ip}")).ok()
        }
        // Digits, dots and colons: always a valid header value.
        _ => HeaderValue::from_str(ip).ok(),
    };
    if let Some(v) = value {
        headers.insert(X_FORWARDED_FOR, v);
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
}

/// Formats an IP address on the stack (IPv4 without the `fmt` machinery: this runs on every
/// forwarded request).
#[derive(Default)]
struct IpBuf {
    buf: [u8; 16],
    owned: String,
}

impl IpBuf {
    fn format(&mut self, ip: IpAddr) -> &str {
        match ip {
            IpAddr::V4(v4) => {
                let mut n = 0;
                for (i, octet) in v4.octets().into_iter().enumerate() {
                    if i > 0 {
                        self.buf[n] = b'.';
                        n += 1;
                    }
                    if octet >= 100 {
                        self.buf[n] = b'0' + octet / 100;
                        n += 1;
                    }
                    if octet >= 10 {
                        self.buf[n] = b'0' + octet / 10 % 10;
                        n += 1;
                    }
                    self.buf[n] = b'0' + octet % 10;
                    n += 1;
                }
                std::str::from_utf8(&self.buf[..n]).unwrap_or_default()
            }
            IpAddr::V6(v6) => {
                self.owned = v6.to_string();
                &self.owned
            }
        }
    }
}

/// Returns the request's `x-request-id`, generating (and inserting) a UUID-v4-shaped one if
/// absent or empty. One map lookup.
pub fn ensure_request_id(headers: &mut HeaderMap) -> &HeaderValue {
    let generated =
        || HeaderValue::from_bytes(&request_id_bytes()).expect("hex is a valid header value");
    match headers.entry(X_REQUEST_ID) {
        Entry::Occupied(mut e) => {
            if e.get().is_empty() {
                e.insert(generated());
            }
            e.into_mut()
        }
        Entry::Vacant(e) => e.insert(generated()),
    }
}

/// A random UUID (version 4 layout).
pub fn new_request_id() -> String {
    String::from_utf8_lossy(&request_id_bytes()).into_owned()
}

/// A random UUID (version 4 layout) as ASCII, formatted without allocating.
fn request_id_bytes() -> [u8; 36] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let hi = fastrand::u64(..);
    let lo = fastrand::u64(..);
    let hi = (hi & 0xffff_ffff_ffff_0fff) | 0x0000_0000_0000_4000;
    let lo = (lo & 0x3fff_ffff_ffff_ffff) | 0x8000_0000_0000_0000;
    let mut out = [b'-'; 36];
    let mut pos = 0;
    for nibble in 0..32 {
        if matches!(nibble, 8 | 12 | 16 | 20) {
            pos += 1; // the dash already there
        }
        let word = if nibble < 16 { hi } else { lo };
        let shift = 60 - 4 * (nibble % 16);
        out[pos] = HEX[((word >> shift) & 0xf) as usize];
        pos += 1;
    }
    out
}

/// Approximate size of a request head on the wire: request line plus `name: value\r\n` lines.
pub fn head_size(method: &str, uri_len: usize, headers: &HeaderMap) -> usize {
    method.len()
        + uri_len
        + 12
        + headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 4)
            .sum::<usize>()
}

/// `X-Forwarded-Client-Cert`.
pub static X_FORWARDED_CLIENT_CERT: HeaderName = HeaderName::from_static("x-forwarded-client-cert");

/// Envoy's `APPEND_FORWARD` as Istio's sidecars use it: over mutual TLS, `element` (the
/// peer's certificate details) is appended to the header; without it, whatever the client
/// sent is removed, so an app never trusts a value a client made up.
pub fn set_client_cert(headers: &mut HeaderMap, element: Option<&HeaderValue>) {
    match element {
        None => {
            headers.remove(&X_FORWARDED_CLIENT_CERT);
        }
        Some(e) => {
            let value = match headers.get(&X_FORWARDED_CLIENT_CERT) {
                Some(prev) if !prev.is_empty() => {
                    let mut v = Vec::with_capacity(prev.len() + 1 + e.len());
                    v.extend_from_slice(prev.as_bytes());
                    v.push(b',');
                    v.extend_from_slice(e.as_bytes());
                    HeaderValue::from_bytes(&v).unwrap_or_else(|_| e.clone())
                }
                _ => e.clone(),
            };
            headers.insert(X_FORWARDED_CLIENT_CERT.clone(), value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-keep"));
    }

    #[test]
    fn upgrade_survives_when_asked() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(is_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h[header::UPGRADE], "websocket");
        assert_eq!(h[header::CONNECTION], "upgrade");
    }

    #[test]
    fn forwarded_for_appends() {
        let mut h = HeaderMap::new();
        set_forwarded(&mut h, "10.0.0.1".parse().unwrap(), "http");
        set_forwarded(&mut h, "::ffff:10.0.0.2".parse().unwrap(), "http");
        assert_eq!(h[X_FORWARDED_FOR], "10.0.0.1, 10.0.0.2");
        assert_eq!(h[X_FORWARDED_PROTO], "http");
        for ip in ["0.0.0.0", "255.255.255.255", "10.0.100.9", "192.168.1.20"] {
            let mut h = HeaderMap::new();
            set_forwarded(&mut h, ip.parse().unwrap(), "http");
            assert_eq!(h[X_FORWARDED_FOR], ip);
        }
        let mut h = HeaderMap::new();
        set_forwarded(&mut h, "2001:db8::1".parse().unwrap(), "https");
        assert_eq!(h[X_FORWARDED_FOR], "2001:db8::1");
    }

    #[test]
    fn request_ids_are_kept_or_generated() {
        let mut h = HeaderMap::new();
        let id = ensure_request_id(&mut h).clone();
        assert_eq!(id.len(), 36);
        assert_eq!(*ensure_request_id(&mut h), id);
        assert_ne!(new_request_id(), new_request_id());
        // The UUID v4 layout: 8-4-4-4-12 lowercase hex, version 4, variant 10xx.
        for _ in 0..100 {
            let id = new_request_id();
            let groups: Vec<&str> = id.split('-').collect();
            assert_eq!(
                groups.iter().map(|g| g.len()).collect::<Vec<_>>(),
                [8, 4, 4, 4, 12]
            );
            assert!(
                id.bytes()
                    .all(|c| c == b'-' || c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
            );
            assert!(groups[2].starts_with('4'), "{id}");
            assert!("89ab".contains(&groups[3][..1]), "{id}");
        }
    }

    #[test]
    fn the_client_cert_header_is_appended_over_mtls_and_dropped_otherwise() {
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-client-cert",
            HeaderValue::from_static("URI=forged"),
        );
        set_client_cert(&mut h, None);
        assert!(h.get("x-forwarded-client-cert").is_none());
        let mine = HeaderValue::from_static("By=a;Hash=1;Subject=\"\";URI=b");
        set_client_cert(&mut h, Some(&mine));
        assert_eq!(h["x-forwarded-client-cert"], mine);
        set_client_cert(&mut h, Some(&HeaderValue::from_static("By=c;URI=a")));
        assert_eq!(
            h["x-forwarded-client-cert"],
            "By=a;Hash=1;Subject=\"\";URI=b,By=c;URI=a"
        );
    }
}
