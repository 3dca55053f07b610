//! The JSON Schema of config files, generated from the config types so that it
//! cannot drift from what the loader accepts (a test checks the checked-in copy).

/// The JSON Schema of a config file, as checked in at `config-schema/blob-access.schema.json`:
/// a node, or a map of the trees `content_addressable_storage`, `action_cache` and `execution`.
pub fn json_schema() -> serde_json::Value {
    let mut schema = schemars::schema_for!(crate::Node);
    let node = schema.as_object_mut().expect("a schema is an object");
    let defs = node.remove("$defs");
    let node_schema = serde_json::Value::Object(std::mem::take(node));
    let node_ref = serde_json::json!({"$ref": "#/$defs/Node"});
    let mut defs = match defs {
        Some(serde_json::Value::Object(d)) => d,
        _ => Default::default(),
    };
    let mut node_schema = node_schema;
    if let Some(o) = node_schema.as_object_mut() {
        o.remove("$schema");
        o.remove("title");
    }
    defs.insert("Node".into(), node_schema);
    let mut defs = serde_json::Value::Object(defs);
    // The node type was the root: its recursive references (`#`) now name it.
    retarget_root_refs(&mut defs);
    serde_json::json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "blob-access config",
        "description": "A tree of blob-access backends and decorators (each node a single key naming its kind), or for `serve` a CAS tree, an action cache tree and an execution tree. Kinds a tree refuses (existence_caching in an action cache; all but grpc, resumable_grpc, demultiplexing and error_logging in an execution tree) and kinds only an action cache takes (completeness_checking) are checked by `blob-access validate`.",
        "oneOf": [
            node_ref,
            {
                "type": "object",
                "properties": {
                    "content_addressable_storage": node_ref,
                    "action_cache": node_ref,
                    "execution": node_ref
                },
                "required": ["content_addressable_storage"],
                "additionalProperties": false
            }
        ],
        "$defs": defs
    })
}

fn retarget_root_refs(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(o) => {
            if o.get("$ref").and_then(|r| r.as_str()) == Some("#") {
                o.insert("$ref".into(), "#/$defs/Node".into());
            }
            o.values_mut().for_each(retarget_root_refs);
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(retarget_root_refs),
        _ => {}
    }
}
