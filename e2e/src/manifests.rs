//! The shipped manifests as users apply them (`kubectl kustomize manifests/<dir>`), and the
//! spoke Policy generated from them: `manifests/policy/policy.yaml` is written by
//! `just generate` (`kmm-fleet generate-policy`) and checked for drift by the `install` tests.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, ensure};
use serde::Deserialize as _;
use serde_json::{Value, json};

/// The root Policy that installs the spoke agent, and its namespace on the hub.
pub const POLICY: &str = "install-kmm-spoke";
pub const POLICY_NS: &str = "kmm-policies";
/// The generated Policy, relative to the repository.
pub const POLICY_FILE: &str = "manifests/policy/policy.yaml";

const POLICY_HEADER: &str = "\
# Generated from `kubectl kustomize manifests/spoke`; do not edit. Regenerate with
# `just generate`.
# The RHACM/OCM governance Policy that installs the spoke agent on every cluster that
# placement.yaml selects: the Module CRD, the agent's namespace, ServiceAccount, RBAC and
# Deployment, and the work agent's right to manage Modules.
";

/// The repository's root directory.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The YAML documents of `text` (empty documents dropped).
pub fn yaml_docs(text: &str) -> anyhow::Result<Vec<Value>> {
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(text) {
        let v = Value::deserialize(doc)?;
        if !v.is_null() {
            docs.push(v);
        }
    }
    Ok(docs)
}

/// `kubectl kustomize manifests/<dir>`: what users apply.
pub fn kustomize(dir: &str) -> anyhow::Result<Vec<Value>> {
    let path = repo().join("manifests").join(dir);
    let kubectl = crate::provision::ensure_provisioned()?.kubectl;
    let out = std::process::Command::new(kubectl)
        .arg("kustomize")
        .arg(&path)
        .output()
        .context("running kubectl kustomize")?;
    ensure!(
        out.status.success(),
        "kubectl kustomize manifests/{dir} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    yaml_docs(&String::from_utf8(out.stdout)?)
        .with_context(|| format!("parsing the output of kubectl kustomize manifests/{dir}"))
}

/// The Policy for the spoke manifests: one ConfigurationPolicy, every object `mustonlyhave`.
pub fn policy_for(spoke: &[Value]) -> Value {
    let templates: Vec<Value> = spoke
        .iter()
        .map(|o| json!({"complianceType": "mustonlyhave", "objectDefinition": o}))
        .collect();
    json!({
        "apiVersion": "policy.open-cluster-management.io/v1",
        "kind": "Policy",
        "metadata": {
            "name": POLICY,
            "namespace": POLICY_NS,
            "annotations": {
                "policy.open-cluster-management.io/standards": "NIST SP 800-53",
                "policy.open-cluster-management.io/categories": "CM Configuration Management",
                "policy.open-cluster-management.io/controls": "CM-2 Baseline Configuration",
            },
        },
        "spec": {
            "disabled": false,
            "remediationAction": "enforce",
            "policy-templates": [{
                "objectDefinition": {
                    "apiVersion": "policy.open-cluster-management.io/v1",
                    "kind": "ConfigurationPolicy",
                    "metadata": {"name": POLICY},
                    "spec": {
                        "remediationAction": "enforce",
                        "severity": "high",
                        "object-templates": templates,
                    },
                },
            }],
        },
    })
}

/// The Policy generated from `manifests/spoke`, and the text of [`POLICY_FILE`] for it.
pub fn generate_policy() -> anyhow::Result<(Value, String)> {
    let policy = policy_for(&kustomize("spoke")?);
    let text = format!("{POLICY_HEADER}{}", serde_yaml::to_string(&policy)?);
    Ok((policy, text))
}

/// Write [`POLICY_FILE`] from `manifests/spoke`; its path.
pub fn write_policy() -> anyhow::Result<PathBuf> {
    let (_, text) = generate_policy()?;
    let path = repo().join(POLICY_FILE);
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}
