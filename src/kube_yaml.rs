//! Reading and writing streams of Kubernetes objects: multi-document YAML (split by
//! [`mesh_translate::split_yaml_stream`], the one splitter every reader uses), or one or more
//! concatenated JSON objects. Documents are numbered from 1, counting non-empty ones.

use serde_json::Value;

/// Input/output format of a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Yaml,
    Json,
}

/// One parsed document.
#[derive(Debug, Clone)]
pub struct Doc {
    /// 1-based index among the non-empty documents of the stream.
    pub index: usize,
    /// 1-based line where the document starts.
    pub line: usize,
    pub value: Value,
}

#[derive(Debug, thiserror::Error)]
#[error("document {index} (line {line}): {message}")]
pub struct ParseError {
    pub index: usize,
    pub line: usize,
    pub message: String,
}

/// JSON if the first meaningful character opens a JSON object or array.
pub fn detect(text: &str) -> Format {
    match text.trim_start().chars().next() {
        Some('{') | Some('[') => Format::Json,
        _ => Format::Yaml,
    }
}

/// Parse a stream into documents (empty and null documents skipped).
pub fn parse_stream(text: &str) -> Result<(Format, Vec<Doc>), ParseError> {
    let format = detect(text);
    let docs = match format {
        Format::Json => parse_json(text)?,
        Format::Yaml => parse_yaml(text)?,
    };
    Ok((format, docs))
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

fn parse_json(text: &str) -> Result<Vec<Doc>, ParseError> {
    let mut docs = Vec::new();
    let mut stream = serde_json::Deserializer::from_str(text).into_iter::<Value>();
    loop {
        let start = stream.byte_offset();
        let start = start + (text[start..].len() - text[start..].trim_start().len());
        match stream.next() {
            None => break,
            Some(Ok(Value::Null)) => {}
            Some(Ok(value)) => docs.push(Doc {
                index: docs.len() + 1,
                line: line_of(text, start),
                value,
            }),
            Some(Err(e)) => {
                return Err(ParseError {
                    index: docs.len() + 1,
                    line: e.line(),
                    message: format!("invalid JSON: {e}"),
                });
            }
        }
    }
    Ok(docs)
}

fn parse_yaml(text: &str) -> Result<Vec<Doc>, ParseError> {
    let mut docs = Vec::new();
    for d in mesh_translate::split_yaml_stream(text) {
        let value: Value = d.parse().map_err(|e| ParseError {
            index: e.index,
            line: e.line,
            message: format!("invalid YAML: {}", e.message),
        })?;
        if value.is_null() {
            continue;
        }
        docs.push(Doc {
            index: d.index,
            line: d.line,
            value,
        });
    }
    Ok(docs)
}

/// Render documents in the given format (YAML separated by `---`, JSON one per value).
pub fn render(values: &[Value], format: Format) -> Result<String, String> {
    let mut out = String::new();
    for (i, v) in values.iter().enumerate() {
        match format {
            Format::Yaml => {
                if i > 0 {
                    out.push_str("---\n");
                }
                out.push_str(&serde_saphyr::to_string(v).map_err(|e| e.to_string())?);
                if !out.ends_with('\n') {
                    out.push('\n');
                }
            }
            Format::Json => {
                out.push_str(&serde_json::to_string_pretty(v).map_err(|e| e.to_string())?);
                out.push('\n');
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_stream_indices_and_lines() {
        let t = "---\n# c\n---\na: 1\n---\n\n---   # x\nb: [1, 2]\n...\n";
        let (f, d) = parse_stream(t).unwrap();
        assert_eq!(f, Format::Yaml);
        assert_eq!(d.len(), 2);
        assert_eq!((d[0].index, d[0].line), (1, 4));
        assert_eq!((d[1].index, d[1].line), (2, 8));
        assert_eq!(d[1].value["b"][1], 2);
        let e = parse_stream("a: 1\n---\nb: 1\nc: [\n").unwrap_err();
        assert_eq!((e.index, e.line), (2, 4), "{e}");
    }

    #[test]
    fn json_stream() {
        let (f, d) = parse_stream("{\"a\":1}\n\n{\"b\":2}").unwrap();
        assert_eq!(f, Format::Json);
        assert_eq!(d.len(), 2);
        assert_eq!(d[1].line, 3);
        let e = parse_stream("{\"a\":1}\n{\"b\":").unwrap_err();
        assert_eq!(e.index, 2);
    }
}
