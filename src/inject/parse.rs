//! The syntax of values that both the injection config and pod annotations and labels carry:
//! boolean flags, resource quantities, label selectors. A leaf module: the config validates
//! with it, the decision and the template read pods with it.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::core::{Selector, SelectorExt};

/// Parse a boolean-ish label/annotation value; `None` when it is not one.
pub fn parse_flag(v: &str) -> Option<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" | "yes" | "y" | "enabled" | "on" => Some(true),
        "false" | "no" | "n" | "disabled" | "off" => Some(false),
        _ => None,
    }
}

/// A Kubernetes resource quantity (`100m`, `1.5Gi`, `2`, `1e3`).
pub fn is_quantity(s: &str) -> bool {
    const SUFFIXES: [&str; 13] = [
        "Ki", "Mi", "Gi", "Ti", "Pi", "Ei", "m", "k", "M", "G", "T", "P", "E",
    ];
    let s = s.strip_prefix('+').unwrap_or(s);
    let (num, _) = SUFFIXES
        .iter()
        .find_map(|suf| s.strip_suffix(suf).map(|n| (n, *suf)))
        .or_else(|| {
            s.find(['e', 'E'])
                .filter(|i| {
                    let exp = &s[i + 1..];
                    let exp = exp.strip_prefix(['+', '-']).unwrap_or(exp);
                    !exp.is_empty() && exp.bytes().all(|b| b.is_ascii_digit())
                })
                .map(|i| (&s[..i], ""))
        })
        .unwrap_or((s, ""));
    let mut parts = num.splitn(2, '.');
    let int = parts.next().unwrap_or("");
    let frac = parts.next();
    let digits = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
    !num.is_empty()
        && digits(int)
        && frac.is_none_or(digits)
        && (!int.is_empty() || frac.is_some_and(|f| !f.is_empty()))
}

/// Check a selector is well formed (known operators, values where required), with a message
/// naming the requirement; kube's conversion alone accepts `In` with an empty list and
/// `Exists` with values, and does not say which operator it did not know.
pub fn validate_selector(sel: &LabelSelector) -> Result<(), String> {
    for r in sel.match_expressions.iter().flatten() {
        let n = r.values.as_ref().map_or(0, Vec::len);
        match r.operator.as_str() {
            "In" | "NotIn" if n == 0 => {
                return Err(format!(
                    "{} with operator {} needs values",
                    r.key, r.operator
                ));
            }
            "Exists" | "DoesNotExist" if n > 0 => {
                return Err(format!(
                    "{} with operator {} takes no values",
                    r.key, r.operator
                ));
            }
            "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
            op => return Err(format!("unknown selector operator {op:?}")),
        }
    }
    Selector::try_from(sel.clone())
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Kubernetes label-selector semantics (kube's [`Selector`]); an empty selector matches
/// everything, one that does not convert (an unknown operator) matches nothing.
pub fn selector_matches(sel: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    Selector::try_from(sel.clone()).is_ok_and(|s| s.matches(labels))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities() {
        for q in [
            "100m", "1", "1.5Gi", "2000m", "128Mi", "1e3", "0.5", "+1", "1E-2",
        ] {
            assert!(is_quantity(q), "{q}");
        }
        for q in ["", "m", "lots", "1.2.3", "1 Gi", "-", "Gi", ".", "1e"] {
            assert!(!is_quantity(q), "{q}");
        }
    }
}
