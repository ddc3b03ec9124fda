//! Reading and writing streams of Kubernetes objects: multi-document YAML, or one or more
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

/// Is this line a document separator (`---`, optionally followed by a comment)?
fn is_separator(line: &str) -> bool {
    line.strip_prefix("---").is_some_and(|rest| {
        let rest = rest.trim();
        rest.is_empty() || rest.starts_with('#')
    })
}

fn parse_yaml(text: &str) -> Result<Vec<Doc>, ParseError> {
    let mut chunks: Vec<(usize, String)> = Vec::new();
    let mut cur = String::new();
    let mut start = 1;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        if is_separator(line.trim_end_matches(['\n', '\r'])) {
            chunks.push((start, std::mem::take(&mut cur)));
            start = i + 2;
        } else if line.trim_end() != "..." {
            cur.push_str(line);
        }
    }
    chunks.push((start, cur));
    let mut docs = Vec::new();
    for (line, chunk) in chunks {
        let meaningful = chunk.lines().any(|l| {
            let t = l.trim();
            !t.is_empty() && !t.starts_with('#')
        });
        if !meaningful {
            continue;
        }
        let index = docs.len() + 1;
        let value: Value = serde_saphyr::from_str(&chunk).map_err(|e| ParseError {
            index,
            line,
            message: format!("invalid YAML: {e}"),
        })?;
        if value.is_null() {
            continue;
        }
        docs.push(Doc { index, line, value });
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
        let e = parse_stream("a: 1\n---\nb: [\n").unwrap_err();
        assert_eq!((e.index, e.line), (2, 3), "{e}");
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
