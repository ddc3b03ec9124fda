//! Hostnames as the Gateway API defines them (and as the proxy matches them): a lowercase DNS
//! name of RFC 1123 labels, or a wildcard `*.example.com`. The translator validates
//! Kubernetes objects with this rule and `ProxyConfig::validate` validates virtual hosts with
//! it, so nothing the translator accepts is refused by a proxy, and the reverse.

/// At most 253 characters; labels of 1 to 63 lowercase letters, digits and `-`, neither
/// starting nor ending with `-`; optionally `*.` in front. A bare `*` is not a hostname (a
/// virtual host's catch-all is checked for separately).
pub fn check_hostname(h: &str) -> Result<(), String> {
    let rest = h.strip_prefix("*.").unwrap_or(h);
    let ok = !rest.is_empty()
        && h.len() <= 253
        && rest.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{h:?} is not a lowercase DNS name or wildcard (*.example.com)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::check_hostname;

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
}
