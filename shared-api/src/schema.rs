//! Hand-made schema fragments for fields whose shape the API server must not prune.

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};

/// An embedded Kubernetes object kept verbatim.
pub fn embedded_object(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
        "x-kubernetes-embedded-resource": true
    })
}

/// A list of arbitrary objects kept verbatim.
pub fn preserve_unknown_list(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "items": { "type": "object", "x-kubernetes-preserve-unknown-fields": true }
    })
}

/// A `metav1.Condition` list with the server-side-apply list markers of upstream.
pub fn conditions(generator: &mut SchemaGenerator) -> Schema {
    let item = k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition::json_schema(generator);
    json_schema!({
        "type": "array",
        "items": item,
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["type"]
    })
}

/// A `Toleration` list whose items carry upstream's toleration rules as CEL (the rules
/// `validate` also checks, with the item's field path). The allowed operators and effects are
/// schema enums: the list and its strings have no maximum size, and the API server refuses
/// rules whose estimated cost over such a list is too high (a comparison with three or four
/// literals already is).
pub fn tolerations(generator: &mut SchemaGenerator) -> Schema {
    let mut item = k8s_openapi::api::core::v1::Toleration::json_schema(generator);
    for (field, allowed) in [
        ("operator", &["", "Equal", "Exists"][..]),
        (
            "effect",
            &["", "NoSchedule", "PreferNoSchedule", "NoExecute"][..],
        ),
    ] {
        if let Some(p) = item
            .get_mut("properties")
            .and_then(|p| p.get_mut(field))
            .and_then(serde_json::Value::as_object_mut)
        {
            p.insert("enum".into(), serde_json::json!(allowed));
        }
    }
    item.insert(
        "x-kubernetes-validations".into(),
        serde_json::json!([
            {
                "rule": "(has(self.key) && self.key != '') || (has(self.operator) && self.operator == 'Exists')",
                "message": "must be Exists when key is empty (matching every taint)",
                "fieldPath": ".operator"
            },
            {
                "rule": "!has(self.operator) || self.operator != 'Exists' || !has(self.value) || self.value == ''",
                "message": "must be empty when operator is Exists",
                "fieldPath": ".value"
            },
            {
                "rule": "!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
                "message": "may only be set with effect NoExecute",
                "fieldPath": ".tolerationSeconds"
            }
        ]),
    );
    json_schema!({
        "type": "array",
        "items": item
    })
}
