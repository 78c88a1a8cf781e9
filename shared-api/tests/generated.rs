//! The committed CRDs must be exactly what the generator prints.
//! Regenerate with `just generate` (`cargo run -p kmm-hub -- crd --dir manifests/crds`).

#![allow(clippy::unwrap_used)] // test fixtures

use std::path::Path;

#[test]
fn committed_crds_match_the_generator() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/crds");
    let mut stale = Vec::new();
    for (rel, yaml) in shared_api::crd_files() {
        let path = root.join(&rel);
        match std::fs::read_to_string(&path) {
            Ok(committed) if committed == yaml => {}
            Ok(_) => stale.push(format!("{rel} differs")),
            Err(e) => stale.push(format!("{rel}: {e}")),
        }
    }
    assert!(
        stale.is_empty(),
        "manifests/crds is out of date ({}); run `just generate`",
        stale.join("; ")
    );
}

#[test]
fn crds_are_structural_enough_for_the_api_server() {
    for crd in shared_api::crds() {
        for v in &crd.spec.versions {
            let schema = v
                .schema
                .as_ref()
                .and_then(|s| s.open_api_v3_schema.as_ref());
            let schema = schema.unwrap_or_else(|| panic!("{} has no schema", crd.spec.names.kind));
            assert_eq!(
                schema.type_.as_deref(),
                Some("object"),
                "{}",
                crd.spec.names.kind
            );
            let json = serde_json::to_string(schema).unwrap();
            // Structural schemas have no $ref and no anyOf/oneOf with types inside.
            assert!(
                !json.contains("\"$ref\""),
                "{} schema has $ref",
                crd.spec.names.kind
            );
        }
    }
}

#[test]
fn committed_crd_reference_matches_the_generator() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/crd-reference.md");
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == shared_api::reference::crd_reference_markdown(),
        "docs/crd-reference.md is out of date; run `just generate`"
    );
}
