//! Gateway API hostname rules: wildcard matching, listener/route intersection, specificity.

use std::cmp::Reverse;

/// Does the pattern (`example.com`, `*.example.com`, `*`) match the host? A wildcard matches
/// one or more labels: `*.example.com` matches `a.example.com` and `a.b.example.com`, not
/// `example.com`.
pub fn matches(pattern: &str, host: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    match pattern.strip_prefix('*') {
        // `*.example.com` → suffix `.example.com`, with at least one character before it.
        Some(suffix) => {
            if let Some(h) = host.strip_prefix('*') {
                // a wildcard host is covered by a wildcard pattern with an equal or shorter
                // suffix: `*.example.com` covers `*.a.example.com`
                h.ends_with(suffix)
            } else {
                host.len() > suffix.len() && host.ends_with(suffix)
            }
        }
        None => pattern == host,
    }
}

/// The hostnames a route serves on a listener (Gateway API `HTTPRoute.spec.hostnames`
/// intersection rules). `None` → the route does not attach (no intersection).
///
/// - listener without hostname: the route's hostnames, or `*` when it has none;
/// - route without hostnames: the listener's hostname;
/// - otherwise every pair that intersects contributes the more specific of the two.
pub fn intersect(listener: Option<&str>, route: &[String]) -> Option<Vec<String>> {
    let listener = listener.filter(|l| !l.is_empty() && *l != "*");
    let out: Vec<String> = match (listener, route.is_empty()) {
        (None, true) => vec!["*".to_string()],
        (None, false) => route.to_vec(),
        (Some(l), true) => vec![l.to_string()],
        (Some(l), false) => {
            let mut out = Vec::new();
            for r in route {
                if matches(l, r) {
                    out.push(r.clone());
                } else if matches(r, l) {
                    out.push(l.to_string());
                }
            }
            out
        }
    };
    let mut out: Vec<String> = out.into_iter().map(|h| h.to_ascii_lowercase()).collect();
    out.sort();
    out.dedup();
    if out.is_empty() { None } else { Some(out) }
}

/// Sort key: the most specific hostname first. Exact names before wildcards; among
/// wildcards the longest suffix first; `*` last; then alphabetical.
pub fn specificity(h: &str) -> (u8, Reverse<usize>, String) {
    if h == "*" {
        (2, Reverse(0), String::new())
    } else if let Some(s) = h.strip_prefix('*') {
        (1, Reverse(s.len()), h.to_string())
    } else {
        (0, Reverse(h.len()), h.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn wildcard_matches_one_or_more_labels() {
        assert!(matches("*.example.com", "a.example.com"));
        assert!(matches("*.example.com", "a.b.example.com"));
        assert!(!matches("*.example.com", "example.com"));
        assert!(!matches("*.example.com", "aexample.com"));
        assert!(matches("*", "anything.io"));
        assert!(matches("foo.com", "foo.com"));
        assert!(!matches("foo.com", "bar.foo.com"));
        assert!(matches("*.example.com", "*.a.example.com"));
        assert!(matches("*.example.com", "*.example.com"));
        assert!(!matches("*.a.example.com", "*.example.com"));
    }

    #[test]
    fn intersection_rules() {
        // no listener hostname
        assert_eq!(intersect(None, &[]), Some(v(&["*"])));
        assert_eq!(intersect(None, &v(&["a.com"])), Some(v(&["a.com"])));
        assert_eq!(intersect(Some("*"), &v(&["a.com"])), Some(v(&["a.com"])));
        // no route hostnames
        assert_eq!(intersect(Some("*.x.com"), &[]), Some(v(&["*.x.com"])));
        // exact/exact
        assert_eq!(
            intersect(Some("a.com"), &v(&["a.com", "b.com"])),
            Some(v(&["a.com"]))
        );
        assert_eq!(intersect(Some("a.com"), &v(&["b.com"])), None);
        // listener wildcard, route exact
        assert_eq!(
            intersect(
                Some("*.example.com"),
                &v(&["foo.example.com", "example.com", "foo.other.com"])
            ),
            Some(v(&["foo.example.com"]))
        );
        // listener exact, route wildcard
        assert_eq!(
            intersect(Some("foo.example.com"), &v(&["*.example.com"])),
            Some(v(&["foo.example.com"]))
        );
        // wildcard/wildcard: the more specific one
        assert_eq!(
            intersect(Some("*.example.com"), &v(&["*.foo.example.com"])),
            Some(v(&["*.foo.example.com"]))
        );
        assert_eq!(
            intersect(Some("*.foo.example.com"), &v(&["*.example.com"])),
            Some(v(&["*.foo.example.com"]))
        );
        assert_eq!(intersect(Some("*.a.com"), &v(&["*.b.com"])), None);
    }

    #[test]
    fn specificity_order() {
        let mut hs = v(&[
            "*",
            "*.example.com",
            "a.example.com",
            "*.a.example.com",
            "b.io",
        ]);
        hs.sort_by_key(|h| specificity(h));
        assert_eq!(
            hs,
            v(&[
                "a.example.com",
                "b.io",
                "*.a.example.com",
                "*.example.com",
                "*"
            ])
        );
    }
}
