//! Splitting a multi-document YAML stream into its documents: the one splitter of the mesh,
//! used by every reader of Kubernetes YAML (`mesh-proxy run --resources` and the control
//! plane through [`crate::load`], `meshctl inject`, `meshctl install`'s profiles and rendered
//! templates). Documents are numbered from 1 among the non-empty ones (a document of only
//! comments, or nothing, is skipped), and each knows the line it starts on, so an error can
//! name the document and the line in the whole stream.

use serde::de::DeserializeOwned;

/// One non-empty document of a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct YamlDocument {
    /// 1-based index among the non-empty documents of the stream.
    pub index: usize,
    /// 1-based line of the stream where the document's text starts.
    pub line: usize,
    /// The document's text, without its `---` separator.
    pub text: String,
}

/// A document that is not valid YAML (or not of the expected shape).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("document {index} (line {line}): invalid YAML: {message}")]
pub struct YamlError {
    /// The document's 1-based index.
    pub index: usize,
    /// 1-based line of the stream where the problem is (the document's first line when the
    /// parser does not say).
    pub line: usize,
    /// What is wrong, as the parser says it (without its position, which is relative to the
    /// document: [`YamlError::line`] is the position in the stream).
    pub message: String,
}

impl YamlDocument {
    /// Parses the document; an error names the document and its line in the stream.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, YamlError> {
        serde_saphyr::from_str(&self.text).map_err(|e| {
            let line = e
                .location()
                .map(|l| self.line + (l.line() as usize).saturating_sub(1))
                .unwrap_or(self.line);
            // The parser's first line says what is wrong (after its own position); the rest
            // is a snippet of the text.
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("").trim();
            let first = first.strip_prefix("error: ").unwrap_or(first);
            let message = match first.split_once(": ") {
                Some((at, rest)) if at.starts_with("line ") && at.contains(" column ") => rest,
                _ => first,
            };
            YamlError {
                index: self.index,
                line,
                message: message.to_string(),
            }
        })
    }
}

/// `---` starts a document; what follows it on the line (a comment, or the start of the
/// document's content) is not a separator.
fn separator(line: &str) -> Option<&str> {
    let rest = line.strip_prefix("---")?;
    if rest.is_empty() {
        return Some("");
    }
    if !rest.starts_with([' ', '\t']) {
        return None;
    }
    let rest = rest.trim();
    Some(if rest.starts_with('#') { "" } else { rest })
}

/// The non-empty documents of a YAML stream, in order.
pub fn split_yaml_stream(text: &str) -> Vec<YamlDocument> {
    let mut chunks: Vec<(usize, String)> = Vec::new();
    let mut cur = String::new();
    let mut start = 1;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let bare = line.trim_end_matches(['\n', '\r']);
        if let Some(content) = separator(bare) {
            chunks.push((start, std::mem::take(&mut cur)));
            if content.is_empty() {
                start = i + 2;
            } else {
                // `--- {a: 1}`: the document starts on the separator's line.
                start = i + 1;
                cur.push_str(content);
                cur.push('\n');
            }
        } else if bare.trim_end() != "..." {
            cur.push_str(line);
        }
    }
    chunks.push((start, cur));
    let mut out = Vec::new();
    for (line, text) in chunks {
        let meaningful = text.lines().any(|l| {
            let t = l.trim();
            !t.is_empty() && !t.starts_with('#')
        });
        if meaningful {
            out.push(YamlDocument {
                index: out.len() + 1,
                line,
                text,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn documents_indices_and_lines() {
        let t = "---\n# c\n---\na: 1\n---\n\n---   # x\nb: [1, 2]\n...\n--- {c: 3}\n";
        let d = split_yaml_stream(t);
        let at: Vec<(usize, usize)> = d.iter().map(|d| (d.index, d.line)).collect();
        assert_eq!(at, [(1, 4), (2, 8), (3, 10)]);
        let v: Value = d[1].parse().unwrap();
        assert_eq!(v["b"][1], 2);
        let v: Value = d[2].parse().unwrap();
        assert_eq!(v["c"], 3);
        // Not separators: `----`, `---x`, an indented `---` inside a block scalar.
        let d = split_yaml_stream("a: |\n  ---\n----: 1\n");
        assert_eq!(d.len(), 1);
    }

    #[test]
    fn errors_name_the_document_and_the_stream_line() {
        let d = split_yaml_stream("a: 1\n---\nb: 1\nc: [\n");
        let e = d[1].parse::<Value>().unwrap_err();
        assert_eq!(e.index, 2);
        assert_eq!(e.line, 4, "{e}");
        assert_eq!(
            e.to_string(),
            "document 2 (line 4): invalid YAML: unclosed bracket '['"
        );
    }
}
