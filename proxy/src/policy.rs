//! The request path's policy checks, in one place. Before routing: the request head's size,
//! its host (RFC 9112 §3.2, RFC 9113 §8.3.1) and its path (normalized in place, so routes,
//! policies and the backend all see the same path). After routing: the rate limits of the
//! listener, the route and the chosen backend. A check that needs the matched route (an
//! authorization check) belongs in [`check_route`], beside the limits.

use std::borrow::Cow;

use http::header;
use http::uri::PathAndQuery;
use http::{Request, Uri, Version};

use crate::config::{HttpLimits, PathNormalization};
use crate::context::{RequestContext, Stop};
use crate::error::ProxyError;
use crate::headers;
use crate::ratelimit::{RateLimitDecision, RateLimiter};
use crate::routing::CompiledRoute;

/// What is checked of every request before it is routed: the listener's header limits (431),
/// the host rules (400) and path normalization (400 when the path cannot be normalized).
pub fn check_request<B>(cx: &RequestContext<'_>, req: &mut Request<B>) -> Result<(), ProxyError> {
    check_head_size(&cx.listener.table.limits, req)?;
    check_host(req)?;
    normalize_path(req, cx.listener.snapshot.http.path_normalization)
}

/// The listener's limit: every request it gets, routed or not.
pub fn check_listener(cx: &mut RequestContext<'_>) -> Result<(), Stop> {
    let limit = cx.listener.table.rate_limit.as_ref();
    check_limit(cx, limit)
}

/// What is checked once the route is known: its limit.
pub fn check_route(cx: &mut RequestContext<'_>, route: &CompiledRoute) -> Result<(), Stop> {
    check_limit(cx, route.rate_limit.as_ref())
}

/// Takes a token from `limit` (if there is one). Refused: the limit's local reply ends the
/// request. Let through: the limit's headers go on the response.
pub fn check_limit(cx: &mut RequestContext<'_>, limit: Option<&RateLimiter>) -> Result<(), Stop> {
    let Some(limit) = limit else {
        return Ok(());
    };
    match limit.check() {
        RateLimitDecision::Allowed { headers } => {
            cx.limit_headers.extend(headers);
            Ok(())
        }
        RateLimitDecision::Limited(l) => Err(Stop::Limited(l)),
    }
}

/// More header fields, or more header bytes, than the listener allows → 431.
fn check_head_size<B>(limits: &HttpLimits, req: &Request<B>) -> Result<(), ProxyError> {
    let head = headers::head_size(
        req.method().as_str(),
        req.uri().path_and_query().map_or(1, |p| p.as_str().len()),
        req.headers(),
    );
    if req.headers().len() > limits.max_headers as usize || head > limits.max_header_bytes as usize
    {
        return Err(ProxyError::HeadersTooLarge);
    }
    Ok(())
}

/// Host rules of RFC 9112 §3.2 and RFC 9113 §8.3.1, checked before anything is routed: an
/// HTTP/1.1 request without a Host, with more than one, or with an invalid one is refused;
/// so is an authority with userinfo (RFC 9110 §4.2.4) and an HTTP/2 request whose Host
/// names another authority than its `:authority`. HTTP/1.0 may omit Host.
fn check_host<B>(req: &Request<B>) -> Result<(), ProxyError> {
    let bad = |why: &str| Err(ProxyError::BadRequest(why.to_string()));
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return bad("more than one Host header");
    }
    if let Some(h) = host
        && !valid_authority(h.as_bytes())
    {
        return bad("invalid Host header");
    }
    match req.uri().authority() {
        Some(a) => {
            if a.as_str().contains('@') {
                return bad("the request target has userinfo");
            }
            if !valid_authority(a.as_str().as_bytes()) {
                return bad("invalid authority in the request target");
            }
            // Absolute-form (HTTP/1.1): the target's authority wins and is what is forwarded,
            // so a differing Host cannot route one way and reach the backend another. HTTP/2:
            // the two must agree.
            if req.version() == Version::HTTP_2
                && let Some(h) = host
                && !h.as_bytes().eq_ignore_ascii_case(a.as_str().as_bytes())
            {
                return bad("Host differs from :authority");
            }
        }
        None if host.is_none() && req.version() == Version::HTTP_2 => {
            return bad("missing :authority");
        }
        None => {}
    }
    if host.is_none() && req.version() == Version::HTTP_11 {
        return bad("missing Host header");
    }
    Ok(())
}

/// `host [ ":" port ]` (RFC 3986 §3.2.2): a bracketed IPv6 literal or a reg-name of
/// unreserved, sub-delims and percent-encoded characters; a port of digits.
fn valid_authority(a: &[u8]) -> bool {
    let (host, port) = if a.first() == Some(&b'[') {
        let Some(end) = a.iter().position(|&c| c == b']') else {
            return false;
        };
        let lit = &a[1..end];
        if lit.is_empty()
            || !lit
                .iter()
                .all(|&c| c.is_ascii_hexdigit() || c == b':' || c == b'.')
        {
            return false;
        }
        match &a[end + 1..] {
            [] => (&a[..0], None),
            [b':', port @ ..] => (&a[..0], Some(port)),
            _ => return false,
        }
    } else {
        match a.iter().rposition(|&c| c == b':') {
            Some(i) => (&a[..i], Some(&a[i + 1..])),
            None => (a, None),
        }
    };
    let reg_name_ok = host
        .iter()
        .all(|&c| c.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=%".contains(&c));
    let port_ok = port.is_none_or(|p| {
        p.len() <= 5
            && p.iter().all(u8::is_ascii_digit)
            && std::str::from_utf8(p)
                .ok()
                .and_then(|p| {
                    if p.is_empty() {
                        Some(0)
                    } else {
                        p.parse::<u32>().ok()
                    }
                })
                .is_some_and(|n| n <= 65535)
    });
    reg_name_ok && port_ok && !(host.is_empty() && a.first() != Some(&b'['))
}

/// Normalizes the request's path in place (see [`crate::normalize`]); the request is rebuilt
/// only when the path changes.
fn normalize_path<B>(req: &mut Request<B>, mode: PathNormalization) -> Result<(), ProxyError> {
    let normalized = match crate::normalize::normalize(req.uri().path(), mode) {
        Ok(Cow::Borrowed(_)) => return Ok(()),
        Ok(Cow::Owned(p)) => p,
        Err(e) => return Err(ProxyError::BadRequest(e.to_string())),
    };
    let pq = match req.uri().query() {
        Some(q) => format!("{normalized}?{q}"),
        None => normalized,
    };
    let mut parts = req.uri().clone().into_parts();
    parts.path_and_query =
        Some(PathAndQuery::try_from(pq).map_err(|e| ProxyError::BadRequest(e.to_string()))?);
    *req.uri_mut() = Uri::from_parts(parts).map_err(|e| ProxyError::BadRequest(e.to_string()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(version: Version, target: &str, hosts: &[&str]) -> Request<()> {
        let mut b = Request::get(target).version(version);
        for h in hosts {
            b = b.header(header::HOST, *h);
        }
        b.body(()).unwrap()
    }

    fn why(r: Result<(), ProxyError>) -> String {
        match r {
            Ok(()) => "ok".into(),
            Err(ProxyError::BadRequest(why)) => why,
            Err(e) => panic!("not a bad request: {e}"),
        }
    }

    #[test]
    fn host_rules() {
        use Version as V;
        let cases: [(V, &str, &[&str], &str); 9] = [
            (V::HTTP_11, "/", &["shop.example:8080"], "ok"),
            (V::HTTP_11, "/", &["[::1]:80"], "ok"),
            (V::HTTP_10, "/", &[], "ok"),
            (V::HTTP_11, "/", &[], "missing Host header"),
            (V::HTTP_11, "/", &["a", "b"], "more than one Host header"),
            (V::HTTP_11, "/", &["bad host"], "invalid Host header"),
            (V::HTTP_11, "/", &["a:99999"], "invalid Host header"),
            (
                V::HTTP_11,
                "http://u@a/",
                &["a"],
                "the request target has userinfo",
            ),
            (
                V::HTTP_2,
                "http://a/",
                &["b"],
                "Host differs from :authority",
            ),
        ];
        for (version, target, hosts, want) in cases {
            let r = req(version, target, hosts);
            assert_eq!(why(check_host(&r)), want, "{version:?} {target} {hosts:?}");
        }
    }

    #[test]
    fn a_path_is_rewritten_only_when_normalization_changes_it() {
        let mut r = req(Version::HTTP_11, "/a/./b/../c?q=1", &["h"]);
        normalize_path(&mut r, PathNormalization::Base).unwrap();
        assert_eq!(r.uri().path_and_query().unwrap().as_str(), "/a/c?q=1");
        let mut clean = req(Version::HTTP_11, "/a//c", &["h"]);
        normalize_path(&mut clean, PathNormalization::Base).unwrap();
        assert_eq!(clean.uri().path(), "/a//c");
        normalize_path(&mut clean, PathNormalization::MergeSlashes).unwrap();
        assert_eq!(clean.uri().path(), "/a/c");
    }
}
