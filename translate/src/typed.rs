//! Deserializing a `serde_json::Value` into a typed object, reporting the path of a type error
//! and of every unknown field.

use gateway_api::apis::standard::httproutes::{
    HttpRouteRulesBackendRefsFilters, HttpRouteRulesFilters,
};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::FieldProblem;

/// Fields that exist in the Gateway API (experimental channel) or Kubernetes schemas but that
/// meshctl does not support: a clearer message than "unknown field".
const KNOWN_UNSUPPORTED: &[(&str, &str)] = &[
    (
        "spec.rules[].sessionPersistence",
        "not supported by meshctl (HTTPRoute session persistence, experimental channel)",
    ),
    (
        "spec.rules[].retry",
        "not supported by meshctl (HTTPRoute retries, experimental channel)",
    ),
    (
        "spec.useDefaultGateways",
        "not supported by meshctl (experimental channel)",
    ),
    (
        "spec.rules[].filters[].externalAuth",
        "not supported by meshctl (ExternalAuth filter, experimental channel)",
    ),
];

/// Deserializes `value` into `T`. `prefix` is prepended to reported paths (e.g.
/// `spec.configPatches[0].patch.value`); `skip_root` names top-level keys that are expected but
/// not part of `T` (e.g. `apiVersion`, `kind`).
pub(crate) fn from_value<T: DeserializeOwned>(
    value: Value,
    prefix: &str,
    skip_root: &[&str],
) -> Result<T, Vec<FieldProblem>> {
    let mut unknown = Vec::new();
    let mut callback = |path: serde_ignored::Path| {
        let p = ignored_path(&path);
        if !skip_root.contains(&p.as_str()) {
            unknown.push(p);
        }
    };
    let de = serde_ignored::Deserializer::new(value, &mut callback);
    let result: Result<T, _> = serde_path_to_error::deserialize(de);
    let join = |p: &str| -> String {
        match (prefix.is_empty(), p.is_empty() || p == ".") {
            (_, true) => prefix.to_string(),
            (true, false) => p.to_string(),
            (false, false) if p.starts_with('[') => format!("{prefix}{p}"),
            (false, false) => format!("{prefix}.{p}"),
        }
    };
    let mut problems: Vec<FieldProblem> = unknown
        .iter()
        .map(|p| FieldProblem::new(join(p), unknown_message(p)))
        .collect();
    match result {
        Ok(v) if problems.is_empty() => Ok(v),
        Ok(_) => Err(problems),
        Err(e) => {
            let path = e.path().to_string();
            let inner = e.into_inner().to_string();
            problems.push(FieldProblem::new(join(&path), inner));
            Err(problems)
        }
    }
}

fn unknown_message(path: &str) -> String {
    let generic = normalize(path);
    for (p, m) in KNOWN_UNSUPPORTED {
        if *p == generic && !m.is_empty() {
            return (*m).to_string();
        }
    }
    "unknown field".to_string()
}

/// `spec.rules[3].retry` → `spec.rules[].retry`.
fn normalize(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut in_index = false;
    for c in path.chars() {
        match c {
            '[' => {
                in_index = true;
                out.push('[');
            }
            ']' => {
                in_index = false;
                out.push(']');
            }
            _ if in_index => {}
            _ => out.push(c),
        }
    }
    out
}

/// serde_ignored's path as `a.b[0].c`.
fn ignored_path(path: &serde_ignored::Path) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", ignored_path(parent)),
        Path::Map { parent, key } => {
            let p = ignored_path(parent);
            if p.is_empty() {
                key.clone()
            } else {
                format!("{p}.{key}")
            }
        }
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => ignored_path(parent),
    }
}

/// A backendRef-level HTTPRoute filter read as a rule-level one: the two generated types have
/// one shape, so validation and translation handle both through the rule-level type.
pub(crate) fn backend_filter_as_rule_filter(
    f: &HttpRouteRulesBackendRefsFilters,
) -> HttpRouteRulesFilters {
    serde_json::to_value(f)
        .and_then(serde_json::from_value)
        .expect("backendRef filters and rule filters have the same schema")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_strips_indices() {
        assert_eq!(
            normalize("spec.rules[3].backendRefs[10].x"),
            "spec.rules[].backendRefs[].x"
        );
    }
}
