//! Offline injection of a whole stream (`meshctl inject`): text in, text out, no I/O.

use serde_json::Value;

use crate::inject::workload::{TemplateReport, inject_value};
use crate::inject::{InjectionConfig, Mode, NamespaceInfo};
use crate::kube_yaml::{self, Format};

/// Offline-inject error, naming the source, the document and the field.
#[derive(Debug, thiserror::Error)]
pub enum OfflineError {
    #[error("{source_name}: {err}")]
    Parse {
        source_name: String,
        err: kube_yaml::ParseError,
    },
    #[error("{source_name}: document {index} (line {line}{object}): {field}: {message}")]
    Field {
        source_name: String,
        index: usize,
        line: usize,
        object: String,
        field: String,
        message: String,
    },
    #[error("{source_name}: rendering output: {message}")]
    Render {
        source_name: String,
        message: String,
    },
}

/// Result of injecting one stream.
#[derive(Debug, Clone)]
pub struct Output {
    pub format: Format,
    pub docs: Vec<Value>,
    /// One entry per pod template found, in document order.
    pub reports: Vec<(usize, TemplateReport)>,
}

/// Parse a stream and inject every pod-bearing object.
pub fn inject_text(
    source_name: &str,
    text: &str,
    cfg: &InjectionConfig,
    namespace: Option<&str>,
) -> Result<Output, OfflineError> {
    let (format, docs) = kube_yaml::parse_stream(text).map_err(|err| OfflineError::Parse {
        source_name: source_name.to_owned(),
        err,
    })?;
    let ns = NamespaceInfo {
        name: namespace.map(str::to_owned),
        labels: Default::default(),
    };
    let mut out = Vec::with_capacity(docs.len());
    let mut reports = Vec::new();
    for doc in docs {
        let mut v = doc.value;
        let object = describe(&v);
        match inject_value(&mut v, &ns, cfg, Mode::Offline) {
            Ok(r) => reports.extend(r.into_iter().map(|r| (doc.index, r))),
            Err(e) => {
                return Err(OfflineError::Field {
                    source_name: source_name.to_owned(),
                    index: doc.index,
                    line: doc.line,
                    object,
                    field: if e.field.is_empty() {
                        "(document)".into()
                    } else {
                        e.field
                    },
                    message: e.message,
                });
            }
        }
        out.push(v);
    }
    Ok(Output {
        format,
        docs: out,
        reports,
    })
}

/// `, Kind/name` for error messages, when known.
fn describe(v: &Value) -> String {
    let kind = v.get("kind").and_then(Value::as_str);
    let name = v
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str);
    match (kind, name) {
        (Some(k), Some(n)) => format!(", {k}/{n}"),
        (Some(k), None) => format!(", {k}"),
        _ => String::new(),
    }
}

/// Render the output in `format` (defaults to the input's format).
pub fn render(
    source_name: &str,
    out: &Output,
    format: Option<Format>,
) -> Result<String, OfflineError> {
    kube_yaml::render(&out.docs, format.unwrap_or(out.format)).map_err(|message| {
        OfflineError::Render {
            source_name: source_name.to_owned(),
            message,
        }
    })
}
