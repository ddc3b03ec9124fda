//! Edits for the property tests of outside input: a change at a path of a JSON tree, and a
//! line or byte edit of a text file. Shared by meshctl's `tests/fuzz_inputs.rs` and
//! mesh-translate's `translate/tests/fuzz.rs` (each includes this file as a module); each
//! passes the keys, values and lines of its own vocabulary.

use proptest::prelude::*;
use serde_json::Value;

/// One change at a path of a JSON value: replace, remove, or add a key.
#[derive(Debug, Clone)]
pub enum Edit {
    Replace(Vec<prop::sample::Index>, Value),
    Remove(Vec<prop::sample::Index>),
    Insert(Vec<prop::sample::Index>, String, Value),
}

pub fn edit<K, V>(key: K, value: V) -> impl Strategy<Value = Edit>
where
    K: Strategy<Value = String>,
    V: Strategy<Value = Value> + 'static,
{
    let value = value.boxed();
    let path = prop::collection::vec(any::<prop::sample::Index>(), 0..8);
    prop_oneof![
        3 => (path.clone(), value.clone()).prop_map(|(p, v)| Edit::Replace(p, v)),
        2 => path.clone().prop_map(Edit::Remove),
        2 => (path, key, value).prop_map(|(p, k, v)| Edit::Insert(p, k, v)),
    ]
}

/// Walks `path` (each step picks a child of a map or list) as far as it goes.
fn walk<'a>(mut v: &'a mut Value, path: &[prop::sample::Index]) -> &'a mut Value {
    for i in path {
        let len = match &*v {
            Value::Object(m) if !m.is_empty() => m.len(),
            Value::Array(a) if !a.is_empty() => a.len(),
            _ => break,
        };
        let at = i.index(len);
        v = match v {
            Value::Object(m) => m.values_mut().nth(at).expect("in range"),
            Value::Array(a) => &mut a[at],
            _ => unreachable!("checked above"),
        };
    }
    v
}

pub fn apply_edit(root: &mut Value, e: &Edit) {
    match e {
        Edit::Replace(p, new) => *walk(root, p) = new.clone(),
        Edit::Remove(p) => {
            let Some((last, parent)) = p.split_last() else {
                return;
            };
            match walk(root, parent) {
                Value::Object(m) if !m.is_empty() => {
                    let k = m
                        .keys()
                        .nth(last.index(m.len()))
                        .cloned()
                        .expect("in range");
                    m.remove(&k);
                }
                Value::Array(a) if !a.is_empty() => {
                    a.remove(last.index(a.len()));
                }
                _ => {}
            }
        }
        Edit::Insert(p, k, new) => {
            if let Value::Object(m) = walk(root, p) {
                m.insert(k.clone(), new.clone());
            }
        }
    }
}

/// One edit of a text file, as a careless hand or a truncated write makes them.
#[derive(Debug, Clone)]
pub enum TextEdit {
    DeleteLine(prop::sample::Index),
    DuplicateLine(prop::sample::Index),
    ReplaceLine(prop::sample::Index, String),
    Indent(prop::sample::Index, usize),
    Insert(prop::sample::Index, String),
    Truncate(prop::sample::Index),
}

/// Text edits whose new lines are YAML-ish junk or a `key: value` line from `entry`.
pub fn text_edit<E>(entry: E) -> impl Strategy<Value = TextEdit>
where
    E: Strategy<Value = String> + 'static,
{
    let junk = prop_oneof![
        "[ -~]{0,20}",
        "\\PC{0,10}",
        prop::sample::select(vec![
            "- ",
            ": ",
            "&a ",
            "*a",
            "!!binary",
            "---",
            "...",
            "[",
            "{",
            "'",
            "\"",
            "\t",
            "? ",
            "|",
            ">",
            "%YAML 1.2",
            "<<: *a",
            "- name: x",
            "  port: 99999",
        ])
        .prop_map(String::from),
        entry.boxed(),
    ];
    let i = any::<prop::sample::Index>();
    prop_oneof![
        i.clone().prop_map(TextEdit::DeleteLine),
        i.clone().prop_map(TextEdit::DuplicateLine),
        (i.clone(), junk.clone()).prop_map(|(i, j)| TextEdit::ReplaceLine(i, j)),
        (i.clone(), 0usize..8).prop_map(|(i, n)| TextEdit::Indent(i, n)),
        (i.clone(), junk).prop_map(|(i, j)| TextEdit::Insert(i, j)),
        i.prop_map(TextEdit::Truncate),
    ]
}

fn char_floor(text: &str, mut at: usize) -> usize {
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

pub fn apply_text_edit(text: &str, e: &TextEdit) -> String {
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    if lines.is_empty() {
        lines.push(String::new());
    }
    let n = lines.len();
    match e {
        TextEdit::DeleteLine(i) => {
            lines.remove(i.index(n));
        }
        TextEdit::DuplicateLine(i) => {
            let at = i.index(n);
            lines.insert(at, lines[at].clone());
        }
        TextEdit::ReplaceLine(i, j) => lines[i.index(n)] = j.clone(),
        TextEdit::Indent(i, k) => {
            let at = i.index(n);
            lines[at] = format!("{}{}", " ".repeat(*k), lines[at].trim_start());
        }
        TextEdit::Insert(i, j) => {
            let at = char_floor(text, i.index(text.len() + 1));
            return format!("{}{j}{}", &text[..at], &text[at..]);
        }
        TextEdit::Truncate(i) => {
            let at = char_floor(text, i.index(text.len() + 1));
            return text[..at].to_string();
        }
    }
    lines.join("\n")
}
