//! Workload identities as strings: `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`,
//! as Istio names them. The one place that knows their shape: the translator builds them, the
//! config validation and the mesh CA check them, and `mesh-tls`'s `SpiffeId` is built on
//! these functions, so an identity one part of the mesh accepts is one every other part
//! accepts too.

use std::fmt;

use crate::hostname::{is_dns_label, is_dns_subdomain};

/// The trust domain when the install profile names none (Istio's default).
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// The longest trust domain (the SPIFFE ID specification: a trust domain is a DNS-like name).
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// What a trust domain may hold, for messages.
pub const TRUST_DOMAIN_RULE: &str =
    "lowercase letters, digits, '.', '-' and '_', at most 255 characters (e.g. cluster.local)";

/// A workload identity that is not `spiffe://<trust domain>/ns/<namespace>/sa/<service
/// account>`, and which part is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{id:?} is not a workload identity, spiffe://<trust domain>/ns/<namespace>/sa/<service account>: {problem}"
)]
pub struct SpiffeIdError {
    /// The identity as given.
    pub id: String,
    /// What is wrong with it.
    pub problem: String,
}

/// The three parts of a workload identity, borrowed. Its `Display` is the identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpiffeIdParts<'a> {
    pub trust_domain: &'a str,
    pub namespace: &'a str,
    pub service_account: &'a str,
}

impl fmt::Display for SpiffeIdParts<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl<'a> SpiffeIdParts<'a> {
    pub fn new(
        trust_domain: &'a str,
        namespace: &'a str,
        service_account: &'a str,
    ) -> SpiffeIdParts<'a> {
        SpiffeIdParts {
            trust_domain,
            namespace,
            service_account,
        }
    }

    /// Checks each part: a trust domain (see [`check_trust_domain`]), a Kubernetes namespace
    /// (an RFC 1123 label) and a Kubernetes service account name (an RFC 1123 subdomain).
    pub fn check(&self) -> Result<(), SpiffeIdError> {
        let fail = |problem: String| SpiffeIdError {
            id: self.to_string(),
            problem,
        };
        check_trust_domain(self.trust_domain).map_err(|e| fail(e.to_string()))?;
        if !is_dns_label(self.namespace) {
            return Err(fail(format!(
                "the namespace {:?} is not a Kubernetes namespace name (lowercase letters, \
                 digits and '-', at most 63 characters, starting and ending with a letter or digit)",
                self.namespace
            )));
        }
        if !is_dns_subdomain(self.service_account) {
            return Err(fail(format!(
                "the service account {:?} is not a Kubernetes object name (lowercase letters, \
                 digits, '-' and '.', at most 253 characters, each part between dots starting \
                 and ending with a letter or digit)",
                self.service_account
            )));
        }
        Ok(())
    }
}

/// A trust domain that is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the trust domain {trust_domain:?} {problem} (a trust domain holds {TRUST_DOMAIN_RULE})")]
pub struct TrustDomainError {
    pub trust_domain: String,
    pub problem: String,
}

/// Checks that `td` can be a trust domain: lowercase letters, digits, `.`, `-` and `_` (the
/// SPIFFE ID specification), not empty, at most [`MAX_TRUST_DOMAIN_LEN`] characters.
pub fn check_trust_domain(td: &str) -> Result<(), TrustDomainError> {
    let problem = if td.is_empty() {
        Some("is empty".to_string())
    } else if td.len() > MAX_TRUST_DOMAIN_LEN {
        Some(format!("is {} characters long", td.len()))
    } else {
        td.chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(*c)))
            .map(|c| format!("holds {c:?}"))
    };
    match problem {
        None => Ok(()),
        Some(problem) => Err(TrustDomainError {
            trust_domain: td.to_string(),
            problem,
        }),
    }
}

/// Whether `td` can be a trust domain (see [`check_trust_domain`]).
pub fn valid_trust_domain(td: &str) -> bool {
    check_trust_domain(td).is_ok()
}

/// The SPIFFE ID of a workload: `spiffe://<trust domain>/ns/<namespace>/sa/<service
/// account>`. The parts are not checked (the translator builds identities from names the API
/// server validated); [`checked_spiffe_id`] checks them.
pub fn spiffe_id(trust_domain: &str, namespace: &str, service_account: &str) -> String {
    SpiffeIdParts::new(trust_domain, namespace, service_account).to_string()
}

/// [`spiffe_id`], when every part is what a workload identity may hold.
pub fn checked_spiffe_id(
    trust_domain: &str,
    namespace: &str,
    service_account: &str,
) -> Result<String, SpiffeIdError> {
    let parts = SpiffeIdParts::new(trust_domain, namespace, service_account);
    parts.check()?;
    Ok(parts.to_string())
}

/// Reads `spiffe://<trust domain>/ns/<namespace>/sa/<service account>` into its parts, each
/// checked as [`SpiffeIdParts::check`] does.
pub fn parse_spiffe_id(id: &str) -> Result<SpiffeIdParts<'_>, SpiffeIdError> {
    let fail = |problem: &str| SpiffeIdError {
        id: id.to_string(),
        problem: problem.to_string(),
    };
    let rest = id
        .strip_prefix("spiffe://")
        .ok_or_else(|| fail("it does not start with spiffe://"))?;
    let mut segments = rest.split('/');
    let parts = match (
        segments.next(),
        segments.next(),
        segments.next(),
        segments.next(),
        segments.next(),
        segments.next(),
    ) {
        (Some(td), Some("ns"), Some(ns), Some("sa"), Some(sa), None) => {
            SpiffeIdParts::new(td, ns, sa)
        }
        _ => {
            return Err(fail("its path is not /ns/<namespace>/sa/<service account>"));
        }
    };
    parts.check()?;
    Ok(parts)
}

/// Whether `id` is a workload identity this mesh issues (see [`parse_spiffe_id`]).
pub fn is_spiffe_id(id: &str) -> bool {
    parse_spiffe_id(id).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_print_and_parse_the_same() {
        let id = spiffe_id("cluster.local", "shop", "cart");
        assert_eq!(id, "spiffe://cluster.local/ns/shop/sa/cart");
        assert_eq!(
            parse_spiffe_id(&id).unwrap(),
            SpiffeIdParts::new("cluster.local", "shop", "cart")
        );
        assert_eq!(
            checked_spiffe_id("corp_1.example", "a-b", "build.bot").unwrap(),
            "spiffe://corp_1.example/ns/a-b/sa/build.bot"
        );
        assert!(is_spiffe_id("spiffe://td/ns/a/sa/b"));
    }

    #[test]
    fn malformed_identities_are_refused_saying_what_is_wrong() {
        for (bad, says) in [
            ("", "does not start with spiffe://"),
            (
                "http://cluster.local/ns/a/sa/b",
                "does not start with spiffe://",
            ),
            ("spiffe://", "path is not /ns/"),
            ("spiffe://cluster.local/ns/a/sa/b/c", "path is not /ns/"),
            ("spiffe://cluster.local/sa/b/ns/a", "path is not /ns/"),
            (
                "spiffe://cluster.local/ns/a/sa/",
                "the service account \"\" is not",
            ),
            ("spiffe:///ns/a/sa/b", "the trust domain \"\" is empty"),
            ("spiffe://Cluster.local/ns/a/sa/b", "holds 'C'"),
            (
                "spiffe://cluster.local/ns/A/sa/b",
                "the namespace \"A\" is not",
            ),
            (
                "spiffe://cluster.local/ns/a.b/sa/c",
                "the namespace \"a.b\" is not",
            ),
            (
                "spiffe://cluster.local/ns/a/sa/b_c",
                "the service account \"b_c\" is not",
            ),
            (
                "spiffe://cluster.local/ns/-a/sa/c",
                "the namespace \"-a\" is not",
            ),
            (
                "spiffe://cluster.local/ns/a/sa/b..c",
                "the service account \"b..c\" is not",
            ),
        ] {
            let e = parse_spiffe_id(bad).expect_err(bad).to_string();
            assert!(e.contains(says), "{bad:?}: {e}");
            assert!(
                e.starts_with(&format!("{bad:?} is not a workload identity")),
                "{e}"
            );
            assert!(!is_spiffe_id(bad));
        }
        let long = "a".repeat(64);
        let e = checked_spiffe_id("td", &long, "b").unwrap_err();
        assert!(e.problem.contains("at most 63 characters"), "{e}");
    }

    #[test]
    fn trust_domains_are_dns_like_names() {
        for ok in [
            "cluster.local",
            "example.org",
            "a_b-c.d",
            DEFAULT_TRUST_DOMAIN,
        ] {
            check_trust_domain(ok).unwrap();
        }
        for (bad, says) in [
            ("", "is empty"),
            ("Example.org", "holds 'E'"),
            ("a/b", "holds '/'"),
            (&"a".repeat(256), "256 characters long"),
        ] {
            let e = check_trust_domain(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad:?}: {e}");
            assert!(e.contains(TRUST_DOMAIN_RULE), "{e}");
            assert!(!valid_trust_domain(bad));
        }
    }
}
