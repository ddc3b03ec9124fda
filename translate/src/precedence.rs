//! Gateway API HTTPRoute match precedence, as a sort key.
//!
//! From the HTTPRoute spec, continuing on ties: an Exact path match; a Prefix path match with
//! the largest number of characters; a method match; the largest number of header matches; the
//! largest number of query param matches. Across routes: the oldest creationTimestamp, then
//! `namespace/name` alphabetically. Within a route: the first rule (and first match) in list
//! order. RegularExpression paths (implementation-specific) come after every prefix.

use std::cmp::Reverse;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use mesh_config::{PathMatch, RouteMatch};

/// Sort key of one match; smaller sorts first (wins).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PrecedenceKey {
    /// 0 Exact, 1 Prefix, 2 RegularExpression.
    path_kind: u8,
    /// Prefix length (characters), longest first.
    prefix_len: Reverse<usize>,
    /// `false` (has a method) first.
    no_method: bool,
    headers: Reverse<usize>,
    query_params: Reverse<usize>,
    /// Oldest first; objects without a timestamp after those with one.
    created: (bool, Option<Time>),
    /// `namespace/name`.
    route: String,
    rule: usize,
    match_index: usize,
}

impl PrecedenceKey {
    pub fn new(
        m: &RouteMatch,
        created: Option<&Time>,
        namespace: &str,
        name: &str,
        rule: usize,
        match_index: usize,
    ) -> Self {
        let (path_kind, prefix_len) = match &m.path {
            PathMatch::Exact(_) => (0, 0),
            PathMatch::Prefix(p) => (1, p.chars().count()),
            PathMatch::Regex(_) => (2, 0),
        };
        PrecedenceKey {
            path_kind,
            prefix_len: Reverse(prefix_len),
            no_method: m.method.is_none(),
            headers: Reverse(m.headers.len()),
            query_params: Reverse(m.query_params.len()),
            created: (created.is_none(), created.cloned()),
            route: format!("{namespace}/{name}"),
            rule,
            match_index,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_config::{HeaderMatch, QueryParamMatch, StringMatch};

    fn m(path: PathMatch, method: Option<&str>, headers: usize, query: usize) -> RouteMatch {
        RouteMatch {
            path,
            method: method.map(str::to_string),
            headers: (0..headers)
                .map(|i| HeaderMatch {
                    name: format!("h{i}"),
                    value: StringMatch::Exact("v".into()),
                })
                .collect(),
            query_params: (0..query)
                .map(|i| QueryParamMatch {
                    name: format!("q{i}"),
                    value: StringMatch::Exact("v".into()),
                })
                .collect(),
        }
    }

    fn key(rm: &RouteMatch) -> PrecedenceKey {
        PrecedenceKey::new(rm, None, "ns", "r", 0, 0)
    }

    fn ts(s: &str) -> Time {
        Time(s.parse().unwrap())
    }

    fn exact(p: &str) -> PathMatch {
        PathMatch::Exact(p.into())
    }
    fn prefix(p: &str) -> PathMatch {
        PathMatch::Prefix(p.into())
    }
    fn regex(p: &str) -> PathMatch {
        PathMatch::Regex(p.into())
    }

    #[test]
    fn exact_beats_any_prefix_and_regex() {
        let e = key(&m(exact("/"), None, 0, 0));
        let p = key(&m(prefix("/a/very/long/prefix"), Some("GET"), 5, 5));
        let r = key(&m(regex("/.*"), Some("GET"), 5, 5));
        assert!(e < p);
        assert!(e < r);
        assert!(p < r);
    }

    #[test]
    fn longer_prefix_first() {
        assert!(key(&m(prefix("/other"), None, 0, 0)) < key(&m(prefix("/"), None, 0, 0)));
        assert!(key(&m(prefix("/abc"), None, 0, 0)) < key(&m(prefix("/ab"), Some("GET"), 3, 3)));
    }

    #[test]
    fn method_then_headers_then_query() {
        let with_method = key(&m(prefix("/"), Some("GET"), 0, 0));
        let many_headers = key(&m(prefix("/"), None, 3, 3));
        assert!(with_method < many_headers);
        assert!(key(&m(prefix("/"), None, 2, 0)) < key(&m(prefix("/"), None, 1, 5)));
        assert!(key(&m(prefix("/"), None, 1, 2)) < key(&m(prefix("/"), None, 1, 1)));
        assert!(key(&m(prefix("/"), Some("GET"), 1, 0)) < key(&m(prefix("/"), Some("POST"), 0, 0)));
    }

    #[test]
    fn ties_oldest_route_then_name_then_rule_then_match() {
        let rm = m(prefix("/"), None, 0, 0);
        let old = ts("2024-01-01T00:00:00Z");
        let new = ts("2025-01-01T00:00:00Z");
        let a = PrecedenceKey::new(&rm, Some(&new), "a", "a", 0, 0);
        let z = PrecedenceKey::new(&rm, Some(&old), "z", "z", 0, 0);
        assert!(z < a, "oldest wins over alphabetical");
        let none = PrecedenceKey::new(&rm, None, "a", "a", 0, 0);
        assert!(a < none, "a timestamp beats no timestamp");
        let ns_a = PrecedenceKey::new(&rm, None, "a", "z", 0, 0);
        let ns_b = PrecedenceKey::new(&rm, None, "b", "a", 0, 0);
        assert!(ns_a < ns_b, "namespace/name alphabetical");
        let r0 = PrecedenceKey::new(&rm, None, "a", "a", 0, 1);
        let r1 = PrecedenceKey::new(&rm, None, "a", "a", 1, 0);
        assert!(r0 < r1, "rule order");
        assert!(
            PrecedenceKey::new(&rm, None, "a", "a", 1, 0)
                < PrecedenceKey::new(&rm, None, "a", "a", 1, 1),
            "match order"
        );
    }

    #[test]
    fn specificity_beats_age() {
        let old = ts("2020-01-01T00:00:00Z");
        let new = ts("2025-01-01T00:00:00Z");
        let specific = PrecedenceKey::new(&m(prefix("/a"), None, 0, 0), Some(&new), "z", "z", 3, 3);
        let general = PrecedenceKey::new(&m(prefix("/"), None, 0, 0), Some(&old), "a", "a", 0, 0);
        assert!(specific < general);
    }

    #[test]
    fn full_sort() {
        let mut keys = [
            ("regex", m(regex("/x.*"), None, 0, 0)),
            ("root", m(prefix("/"), None, 0, 0)),
            ("root-get", m(prefix("/"), Some("GET"), 0, 0)),
            ("other", m(prefix("/other"), None, 0, 0)),
            ("exact-root", m(exact("/"), None, 0, 0)),
            ("root-h1", m(prefix("/"), None, 1, 0)),
            ("root-q1", m(prefix("/"), None, 0, 1)),
            ("root-h1q1", m(prefix("/"), None, 1, 1)),
        ]
        .map(|(n, rm)| (key(&rm), n));
        keys.sort();
        let order: Vec<_> = keys.iter().map(|(_, n)| *n).collect();
        assert_eq!(
            order,
            [
                "exact-root",
                "other",
                "root-get",
                "root-h1q1",
                "root-h1",
                "root-q1",
                "root",
                "regex"
            ]
        );
    }
}
