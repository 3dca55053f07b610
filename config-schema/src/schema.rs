//! The JSON Schema of config files, generated from the config types so that it
//! cannot drift from what the loader accepts (a test checks the checked-in copy).

/// The JSON Schema of a config tree, as checked in at `config-schema/blob-access.schema.json`.
pub fn json_schema() -> serde_json::Value {
    let mut schema = schemars::schema_for!(crate::Node);
    schema.insert("title".into(), "blob-access config".into());
    schema.insert(
        "description".into(),
        "A tree of blob-access backends and decorators; each node is a single key naming its kind."
            .into(),
    );
    schema.to_value()
}
