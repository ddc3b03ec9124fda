//! The overlay: deep merge of YAML trees and the `--set` path grammar.
//!
//! Maps merge key by key, recursively; everything else (scalars, lists) replaces. Every leaf
//! written remembers its source (a file name or a `--set` argument) so that a validation
//! error after merging can name where the offending value came from.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

/// Where each written path came from: dotted path → source.
#[derive(Debug, Default, Clone)]
pub struct Provenance(BTreeMap<String, String>);

impl Provenance {
    pub fn record(&mut self, path: &str, source: &str) {
        // A replaced subtree forgets the sources of what it replaced.
        let prefix = format!("{path}.");
        self.0.retain(|k, _| !k.starts_with(&prefix));
        self.0.insert(path.to_owned(), source.to_owned());
    }

    /// The source of `path` or of its nearest recorded ancestor.
    pub fn source_of(&self, path: &str) -> Option<&str> {
        let mut p = path.to_owned();
        loop {
            if let Some(s) = self.0.get(&p) {
                return Some(s);
            }
            match p.rfind(['.', '[']) {
                Some(i) => p.truncate(i),
                None => return None,
            }
        }
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

/// Merge `over` into `base`: maps deeply, anything else replaces.
pub fn merge(base: &mut Value, over: Value, source: &str, prov: &mut Provenance) {
    merge_at(base, over, "", source, prov);
}

fn merge_at(base: &mut Value, over: Value, path: &str, source: &str, prov: &mut Provenance) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                let p = join(path, &k);
                match b.get_mut(&k) {
                    Some(existing) if existing.is_object() && v.is_object() => {
                        merge_at(existing, v, &p, source, prov)
                    }
                    _ => {
                        prov.record(&p, source);
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, o) => {
            prov.record(path, source);
            *b = o;
        }
    }
}

/// One step of a `--set` path.
#[derive(Debug, Clone, PartialEq)]
pub enum Segment {
    /// A map key.
    Key(String),
    /// A list element by position (`list[2]`); the length itself appends.
    Index(usize),
    /// The list element whose `key` field equals `value` (`list.[name:foo]`).
    Select { key: String, value: String },
}

/// A `--set` error: the argument and what is wrong with it.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("--set {arg}: {message}")]
pub struct SetError {
    pub arg: String,
    pub message: String,
}

/// Parse `a.b\.c.list[0].[name:x].d` into segments.
pub fn parse_path(path: &str) -> Result<Vec<Segment>, String> {
    // Split on unescaped dots, dropping the escapes.
    let mut pieces = vec![String::new()];
    let mut chars = path.chars().peekable();
    let mut in_brackets = false;
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'.') => {
                chars.next();
                pieces.last_mut().expect("non-empty").push('.');
            }
            '[' => {
                in_brackets = true;
                pieces.last_mut().expect("non-empty").push(c);
            }
            ']' => {
                in_brackets = false;
                pieces.last_mut().expect("non-empty").push(c);
            }
            '.' if !in_brackets => pieces.push(String::new()),
            _ => pieces.last_mut().expect("non-empty").push(c),
        }
    }
    let mut segs = Vec::new();
    for piece in pieces {
        if piece.is_empty() {
            return Err("empty path segment".into());
        }
        if let Some(inner) = piece.strip_prefix('[').and_then(|p| p.strip_suffix(']'))
            && !inner.contains('[')
        {
            if let Some((k, v)) = inner.split_once(':') {
                if k.is_empty() {
                    return Err(format!("[{inner}]: empty key"));
                }
                segs.push(Segment::Select {
                    key: k.to_owned(),
                    value: v.to_owned(),
                });
                continue;
            }
            return Err(format!("[{inner}]: expected [key:value] or name[index]"));
        }
        // name, optionally followed by [N][M]...
        let (name, mut rest) = match piece.find('[') {
            Some(i) => (&piece[..i], &piece[i..]),
            None => (piece.as_str(), ""),
        };
        if name.is_empty() {
            return Err(format!("{piece}: missing key before ["));
        }
        segs.push(Segment::Key(name.to_owned()));
        while !rest.is_empty() {
            let close = rest
                .find(']')
                .filter(|_| rest.starts_with('['))
                .ok_or_else(|| format!("{piece}: unbalanced brackets"))?;
            let idx = &rest[1..close];
            let n: usize = idx
                .parse()
                .map_err(|_| format!("{piece}: {idx:?} is not a list index"))?;
            segs.push(Segment::Index(n));
            rest = &rest[close + 1..];
        }
    }
    Ok(segs)
}

/// Type a `--set` value: int, then float, then bool, else string.
pub fn typed_value(raw: &str) -> Value {
    if let Ok(i) = raw.parse::<i64>() {
        return Value::from(i);
    }
    if let Ok(f) = raw.parse::<f64>()
        && f.is_finite()
        && raw.chars().any(|c| c.is_ascii_digit())
    {
        return Value::from(f);
    }
    match raw {
        "true" => Value::Bool(true),
        "false" => Value::Bool(false),
        _ => Value::String(raw.to_owned()),
    }
}

fn display_path(segs: &[Segment]) -> String {
    let mut out = String::new();
    for s in segs {
        match s {
            Segment::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Segment::Index(i) => out.push_str(&format!("[{i}]")),
            Segment::Select { key, value } => out.push_str(&format!(".[{key}:{value}]")),
        }
    }
    out
}

/// Apply one `--set path=value` to `root`, creating maps on the way.
pub fn apply_set(root: &mut Value, arg: &str, prov: &mut Provenance) -> Result<(), SetError> {
    let err = |message: String| SetError {
        arg: arg.to_owned(),
        message,
    };
    let (path, raw) = arg
        .split_once('=')
        .ok_or_else(|| err("expected path=value".into()))?;
    let segs = parse_path(path).map_err(err)?;
    let mut cur = root;
    let mut walked: Vec<Segment> = Vec::new();
    for (i, seg) in segs.iter().enumerate() {
        let last = i + 1 == segs.len();
        let here = display_path(&walked);
        cur = match seg {
            Segment::Key(k) => {
                if cur.is_null() {
                    *cur = Value::Object(Map::new());
                }
                let obj = cur
                    .as_object_mut()
                    .ok_or_else(|| err(format!("{here} is not a map")))?;
                if last {
                    obj.insert(k.clone(), Value::Null);
                }
                obj.entry(k.clone()).or_insert(Value::Null)
            }
            Segment::Index(n) => {
                if cur.is_null() {
                    *cur = Value::Array(Vec::new());
                }
                let list = cur
                    .as_array_mut()
                    .ok_or_else(|| err(format!("{here} is not a list")))?;
                if *n == list.len() {
                    list.push(Value::Null);
                } else if *n > list.len() {
                    return Err(err(format!(
                        "{here}[{n}]: index out of range (the list has {} elements)",
                        list.len()
                    )));
                }
                &mut list[*n]
            }
            Segment::Select { key, value } => {
                let list = cur
                    .as_array_mut()
                    .ok_or_else(|| err(format!("{here} is not a list")))?;
                let pos = list
                    .iter()
                    .position(|e| match e.get(key) {
                        Some(Value::String(s)) => s == value,
                        Some(other) if !other.is_null() => typed_value(value) == *other,
                        _ => false,
                    })
                    .ok_or_else(|| err(format!("{here}: no element with {key}={value}")))?;
                &mut list[pos]
            }
        };
        walked.push(seg.clone());
    }
    *cur = typed_value(raw);
    prov.record(&display_path(&segs), &format!("--set {arg}"));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn set(root: &mut Value, arg: &str) -> Result<(), SetError> {
        apply_set(root, arg, &mut Provenance::default())
    }

    #[test]
    fn merge_maps_deeply_lists_replace() {
        let mut base = json!({"a": {"b": 1, "c": [1, 2, 3], "d": {"e": "x"}}, "k": true});
        let mut prov = Provenance::default();
        merge(
            &mut base,
            json!({"a": {"c": [9], "d": {"f": 2}}, "n": null}),
            "f1.yaml",
            &mut prov,
        );
        assert_eq!(
            base,
            json!({"a": {"b": 1, "c": [9], "d": {"e": "x", "f": 2}}, "k": true, "n": null})
        );
        assert_eq!(prov.source_of("a.c"), Some("f1.yaml"));
        assert_eq!(prov.source_of("a.d.f"), Some("f1.yaml"));
        assert_eq!(prov.source_of("a.b"), None);
        // A scalar replaced by a map, and a map replaced by a scalar.
        merge(
            &mut base,
            json!({"k": {"x": 1}, "a": 5}),
            "f2.yaml",
            &mut prov,
        );
        assert_eq!(base, json!({"a": 5, "k": {"x": 1}, "n": null}));
        assert_eq!(
            prov.source_of("a.d.f"),
            Some("f2.yaml"),
            "subtree forgotten"
        );
        assert_eq!(prov.source_of("k.x"), Some("f2.yaml"));
    }

    #[test]
    fn path_grammar() {
        use Segment::*;
        assert_eq!(
            parse_path("a.b.c").unwrap(),
            [Key("a".into()), Key("b".into()), Key("c".into())]
        );
        assert_eq!(
            parse_path("a.list[2].x").unwrap(),
            [
                Key("a".into()),
                Key("list".into()),
                Index(2),
                Key("x".into())
            ]
        );
        assert_eq!(
            parse_path("m[0][1]").unwrap(),
            [Key("m".into()), Index(0), Index(1)]
        );
        assert_eq!(
            parse_path("gws.[name:in.gw].type").unwrap(),
            [
                Key("gws".into()),
                Select {
                    key: "name".into(),
                    value: "in.gw".into()
                },
                Key("type".into())
            ]
        );
        assert_eq!(
            parse_path(r"annotations.prometheus\.io/scrape").unwrap(),
            [
                Key("annotations".into()),
                Key("prometheus.io/scrape".into())
            ]
        );
        for bad in ["", "a..b", "a.", "[x]", "a[x]", "a[1", "[1]", "a.[:v]"] {
            assert!(parse_path(bad).is_err(), "{bad:?} should fail");
        }
    }

    #[test]
    fn values_are_typed() {
        assert_eq!(typed_value("3"), json!(3));
        assert_eq!(typed_value("-7"), json!(-7));
        assert_eq!(typed_value("0.5"), json!(0.5));
        assert_eq!(typed_value("true"), json!(true));
        assert_eq!(typed_value("false"), json!(false));
        assert_eq!(typed_value("1.2.3"), json!("1.2.3"));
        assert_eq!(typed_value("NodePort"), json!("NodePort"));
        assert_eq!(typed_value("inf"), json!("inf"));
        assert_eq!(typed_value("NaN"), json!("NaN"));
        assert_eq!(typed_value(""), json!(""));
        assert_eq!(typed_value("a=b"), json!("a=b"));
    }

    #[test]
    fn set_creates_maps_indexes_and_selects() {
        let mut v = json!({"gws": [{"name": "a", "type": "LB"}, {"name": "b"}], "l": [1, 2]});
        set(&mut v, "x.y.z=1").unwrap();
        set(&mut v, "gws[1].type=NodePort").unwrap();
        set(&mut v, "gws.[name:a].enabled=false").unwrap();
        set(&mut v, "l[2]=3").unwrap();
        set(&mut v, "l[0]=zero").unwrap();
        set(&mut v, r"ann.a\.b/c=x=y").unwrap();
        set(&mut v, "new[0].k=v").unwrap();
        assert_eq!(
            v,
            json!({
                "gws": [{"name": "a", "type": "LB", "enabled": false}, {"name": "b", "type": "NodePort"}],
                "l": ["zero", 2, 3],
                "x": {"y": {"z": 1}},
                "ann": {"a.b/c": "x=y"},
                "new": [{"k": "v"}],
            })
        );
        let mut prov = Provenance::default();
        apply_set(&mut v, "x.y.z=2", &mut prov).unwrap();
        assert_eq!(prov.source_of("x.y.z"), Some("--set x.y.z=2"));
    }

    #[test]
    fn set_errors_name_the_argument() {
        let mut v = json!({"l": [1], "s": "str", "gws": [{"name": "a"}]});
        let e = set(&mut v, "l[5]=1").unwrap_err();
        assert_eq!(e.arg, "l[5]=1");
        assert!(e.message.contains("out of range"), "{e}");
        assert!(
            set(&mut v, "s.x=1")
                .unwrap_err()
                .message
                .contains("s is not a map")
        );
        assert!(
            set(&mut v, "s[0]=1")
                .unwrap_err()
                .message
                .contains("not a list")
        );
        assert!(
            set(&mut v, "gws.[name:zz].x=1")
                .unwrap_err()
                .message
                .contains("no element")
        );
        assert!(
            set(&mut v, "novalue")
                .unwrap_err()
                .message
                .contains("path=value")
        );
        assert_eq!(
            set(&mut v, "a..b=1").unwrap_err().to_string(),
            "--set a..b=1: empty path segment"
        );
    }
}
