//! JSONPatch for the webhook: the difference between the object as received and the
//! injected object. Objects are diffed key by key; arrays and scalars that differ are
//! replaced whole (index-shifting element patches are fragile and hard to read).

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation, RemoveOperation, ReplaceOperation};
use serde_json::Value;

/// A patch turning `before` into `after`; empty when they are equal.
pub fn diff(before: &Value, after: &Value) -> Patch {
    let mut ops = Vec::new();
    let mut path = PointerBuf::new();
    walk(before, after, &mut path, &mut ops);
    Patch(ops)
}

fn walk(a: &Value, b: &Value, path: &mut PointerBuf, ops: &mut Vec<PatchOperation>) {
    match (a, b) {
        (Value::Object(ao), Value::Object(bo)) => {
            for (k, bv) in bo {
                path.push_back(k.as_str());
                match ao.get(k) {
                    Some(av) => walk(av, bv, path, ops),
                    None => ops.push(PatchOperation::Add(AddOperation {
                        path: path.clone(),
                        value: bv.clone(),
                    })),
                }
                path.pop_back();
            }
            for k in ao.keys().filter(|k| !bo.contains_key(*k)) {
                path.push_back(k.as_str());
                ops.push(PatchOperation::Remove(RemoveOperation {
                    path: path.clone(),
                }));
                path.pop_back();
            }
        }
        _ if a == b => {}
        _ => ops.push(PatchOperation::Replace(ReplaceOperation {
            path: path.clone(),
            value: b.clone(),
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn arrays_replaced_whole_and_keys_escaped() {
        let a = json!({"metadata": {"annotations": {"x": "1"}}, "spec": {"containers": [1, 2]}});
        let b = json!({"metadata": {"annotations": {"x": "1", "a/b~c": "2"}}, "spec": {"containers": [0, 1, 2], "volumes": []}});
        let p = diff(&a, &b);
        let s = serde_json::to_value(&p).unwrap();
        assert_eq!(
            s,
            json!([
                {"op": "add", "path": "/metadata/annotations/a~1b~0c", "value": "2"},
                {"op": "replace", "path": "/spec/containers", "value": [0, 1, 2]},
                {"op": "add", "path": "/spec/volumes", "value": []}
            ])
        );
        let mut c = a.clone();
        json_patch::patch(&mut c, &p).unwrap();
        assert_eq!(c, b);
        assert!(diff(&a, &a).0.is_empty());
    }
}
