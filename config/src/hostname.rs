//! Hostnames as the Gateway API defines them (and as the proxy matches them): a lowercase DNS
//! name of RFC 1123 labels, or a wildcard `*.example.com`. The translator validates
//! Kubernetes objects with this rule and `ProxyConfig::validate` validates virtual hosts with
//! it, so nothing the translator accepts is refused by a proxy, and the reverse.

/// An RFC 1123 label: 1 to 63 lowercase letters, digits and `-`, neither starting nor ending
/// with `-` (Kubernetes namespaces, Service and port names).
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// An RFC 1123 subdomain: at most 253 characters, [`is_dns_label`]s joined by dots (most
/// Kubernetes object names, service accounts among them).
pub fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// A DNS subdomain ([`is_dns_subdomain`]), optionally with `*.` in front, at most 253
/// characters in all. A bare `*` is not a hostname (a virtual host's catch-all is checked for
/// separately).
pub fn check_hostname(h: &str) -> Result<(), String> {
    let rest = h.strip_prefix("*.").unwrap_or(h);
    if h.len() <= 253 && is_dns_subdomain(rest) {
        Ok(())
    } else {
        Err(format!(
            "{h:?} is not a lowercase DNS name or wildcard (*.example.com)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_names_and_wildcards() {
        for ok in [
            "example.com",
            "*.example.com",
            "a-b.c0",
            "x",
            &"a".repeat(63),
        ] {
            assert_eq!(check_hostname(ok), Ok(()), "{ok}");
        }
        let label = "a".repeat(63);
        let long = format!("{label}.{label}.{label}.{label}.com");
        for bad in [
            "",
            "*",
            "*.",
            "Example.com",
            "-a.com",
            "a-.com",
            "a..com",
            "a.*.com",
            "a_b.com",
            &"a".repeat(64),
            &long,
        ] {
            let e = check_hostname(bad).unwrap_err();
            assert!(e.contains("is not a lowercase DNS name"), "{bad}: {e}");
        }
    }

    #[test]
    fn kubernetes_names_are_labels_or_subdomains() {
        assert!(is_dns_label("shop-1"));
        assert!(!is_dns_label("shop.1"));
        assert!(!is_dns_label(&"a".repeat(64)));
        assert!(is_dns_subdomain("build.bot"));
        for bad in ["", "a..b", "-a", "a-", "A", "a_b"] {
            assert!(!is_dns_label(bad), "{bad}");
            assert!(!is_dns_subdomain(bad), "{bad}");
        }
    }
}
