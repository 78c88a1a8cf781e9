#![allow(clippy::unwrap_used)]

use super::*;
use serde_json::{Value, json};

fn request(
    op: &str,
    resource: &str,
    name: &str,
    namespace: Option<&str>,
    object: Value,
    old: Value,
) -> AdmissionRequest<DynamicObject> {
    let (group, kind) = if resource == "modules" {
        ("kmm.sigs.x-k8s.io", "Module")
    } else {
        ("", "Namespace")
    };
    let version = if group.is_empty() { "v1" } else { "v1beta1" };
    let review: AdmissionReview<DynamicObject> = serde_json::from_value(json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "u1", "operation": op,
            "kind": {"group": group, "version": version, "kind": kind},
            "resource": {"group": group, "version": version, "resource": resource},
            "name": name, "namespace": namespace,
            "userInfo": {"username": "alice"},
            "object": object, "oldObject": old, "dryRun": false
        }
    }))
    .unwrap();
    review.try_into().unwrap()
}

fn module(name: &str, regexp: &str, version: Option<&str>) -> Value {
    let mut container = json!({"modprobe": {"moduleName": "m"},
        "kernelMappings": [{"regexp": regexp, "containerImage": "r/x:1"}]});
    if let Some(v) = version {
        container["version"] = json!(v);
    }
    json!({"apiVersion": "kmm.sigs.x-k8s.io/v1beta1", "kind": "Module",
        "metadata": {"name": name},
        "spec": {"selector": {}, "moduleLoader": {"container": container}}})
}

fn message(resp: &AdmissionResponse) -> String {
    resp.result.message.clone()
}

#[test]
fn a_valid_module_is_admitted() {
    let req = request(
        "CREATE",
        "modules",
        "m",
        Some("ns"),
        module("m", "^.+$", None),
        Value::Null,
    );
    assert!(decide_module(&req, Some(34)).allowed);
}

#[test]
fn an_overlong_name_plus_namespace_is_refused_with_the_field_path() {
    let name = "a".repeat(30);
    let ns = "b".repeat(12);
    let req = request(
        "CREATE",
        "modules",
        &name,
        Some(&ns),
        module(&name, "^.+$", None),
        Value::Null,
    );
    let resp = decide_module(&req, None);
    assert!(!resp.allowed);
    assert!(
        message(&resp).starts_with("metadata.name: name and namespace together must be at most 41"),
        "{}",
        message(&resp)
    );
}

#[test]
fn every_violation_is_reported_with_its_path() {
    let req = request(
        "CREATE",
        "modules",
        "m",
        Some("ns"),
        module("m", "([", None),
        Value::Null,
    );
    let resp = decide_module(&req, None);
    assert!(!resp.allowed);
    assert!(
        message(&resp).contains("spec.moduleLoader.container.kernelMappings[0].regexp"),
        "{}",
        message(&resp)
    );
}

#[test]
fn version_may_not_switch_between_set_and_unset() {
    let req = request(
        "UPDATE",
        "modules",
        "m",
        Some("ns"),
        module("m", "^.+$", Some("v2")),
        module("m", "^.+$", None),
    );
    let resp = decide_module(&req, None);
    assert!(!resp.allowed);
    assert!(
        message(&resp).contains("spec.moduleLoader.container.version"),
        "{}",
        message(&resp)
    );
}

#[test]
fn metadata_only_updates_and_deleting_modules_are_admitted() {
    // An invalid spec, already stored: removing the finalizer must still work.
    let mut old = module("m", "([", None);
    let mut new = old.clone();
    new["metadata"]["finalizers"] = json!([]);
    old["metadata"]["finalizers"] = json!(["kmm.node.kubernetes.io/module-finalizer"]);
    let req = request("UPDATE", "modules", "m", Some("ns"), new, old.clone());
    assert!(decide_module(&req, None).allowed);
    let mut deleting = module("m", "((", None);
    deleting["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
    let req = request("UPDATE", "modules", "m", Some("ns"), deleting, old);
    assert!(decide_module(&req, None).allowed);
}

#[test]
fn the_dra_gate_uses_the_server_version() {
    let mut m = module("m", "^.+$", None);
    m["spec"]["dra"] = json!({"driverName": "gpu.example.com", "container": {"image": "r/d:1"}});
    let req = request("CREATE", "modules", "m", Some("ns"), m, Value::Null);
    let resp = decide_module(&req, Some(33));
    assert!(!resp.allowed);
    assert!(
        message(&resp).contains("spec.dra: DRA requires Kubernetes 1.34"),
        "{}",
        message(&resp)
    );
    assert!(decide_module(&req, Some(34)).allowed);
}

fn namespace_delete(name: &str) -> AdmissionRequest<DynamicObject> {
    request(
        "DELETE",
        "namespaces",
        name,
        None,
        Value::Null,
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}),
    )
}

#[test]
fn a_namespace_holding_modules_is_not_deleted_and_the_refusal_names_them() {
    let req = namespace_delete("labs");
    let resp = decide_namespace(&req, Ok(vec!["b".into(), "a".into()]));
    assert!(!resp.allowed);
    assert_eq!(
        message(&resp),
        "namespace labs still holds Modules (a, b); delete them first and wait until they are gone (kmm-spoke unloads their kernel modules), then delete the namespace"
    );
    let many: Vec<String> = (0..12).map(|i| format!("m{i:02}")).collect();
    let resp = decide_namespace(&req, Ok(many));
    assert!(
        message(&resp).contains("m09 and 2 more"),
        "{}",
        message(&resp)
    );
}

#[test]
fn an_empty_namespace_is_deleted_and_an_unanswered_list_refuses() {
    let req = namespace_delete("labs");
    assert!(decide_namespace(&req, Ok(vec![])).allowed);
    let resp = decide_namespace(&req, Err(WebhookError::Timeout(LIST_TIMEOUT)));
    assert!(!resp.allowed);
    assert!(message(&resp).contains("cannot tell whether namespace labs still holds Modules"));
}
