//! `kmm-spoke render`: the agent's render code on files, for review before a rollout.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use k8s_openapi::api::core::v1::Node;
use kube::ResourceExt;
use serde::Deserialize;
use shared_api::Module;
use shared_api::labels::{
    KERNEL_LABEL, kernel_label_value, version_module_label, worker_version_label,
};
use shared_api::parse::{Object, parse_documents};
use shared_api::validate::{Context, validate_module};

use crate::render::nodes::{node_kernel, node_schedulable_for, selector_matches, targeted_nodes};
use crate::render::{RenderSettings, plan_module};

/// What went wrong, as lines for the user; the command exits non-zero.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("{0}")]
    Input(String),
    #[error("the Module is invalid:\n{}", .0.join("\n"))]
    Invalid(Vec<String>),
    #[error("some kernels cannot be rendered:\n{}", .0.join("\n"))]
    Kernels(Vec<String>),
}

impl kmm_runtime::ErrorCategory for RenderError {
    fn category(&self) -> &'static str {
        match self {
            RenderError::Input(_) => "input",
            RenderError::Invalid(_) => "invalid",
            RenderError::Kernels(_) => "kernels",
        }
    }
}

/// Parse the Module file (the first Module document).
pub fn read_module(text: &str) -> Result<(Module, Vec<String>), RenderError> {
    let docs = parse_documents(text).map_err(|e| RenderError::Input(e.to_string()))?;
    for d in docs {
        if let Object::Module(m) = d.object {
            let warnings = d
                .unknown_fields
                .iter()
                .map(|f| format!("unknown field {f} (ignored)"))
                .collect();
            return Ok((*m, warnings));
        }
    }
    Err(RenderError::Input(
        "no Module (kmm.sigs.x-k8s.io/v1beta1) in the module file".into(),
    ))
}

/// Parse Nodes: a YAML list, a `kind: List`, or one Node per document.
pub fn read_nodes(text: &str) -> Result<Vec<Node>, RenderError> {
    let mut nodes = Vec::new();
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = serde_json::Value::deserialize(de).map_err(|e| {
            RenderError::Input(format!("nodes document {}: not valid YAML: {e}", i + 1))
        })?;
        let items = match value {
            serde_json::Value::Null => continue,
            serde_json::Value::Array(items) => items,
            v if v
                .get("kind")
                .and_then(|k| k.as_str())
                .is_some_and(|k| k.ends_with("List")) =>
            {
                v.get("items")
                    .and_then(|i| i.as_array())
                    .cloned()
                    .unwrap_or_default()
            }
            v => vec![v],
        };
        for (j, item) in items.into_iter().enumerate() {
            let node: Node = serde_json::from_value(item).map_err(|e| {
                RenderError::Input(format!(
                    "nodes document {}, item {}: not a Node: {e}",
                    i + 1,
                    j + 1
                ))
            })?;
            nodes.push(node);
        }
    }
    Ok(nodes)
}

/// Drop `build` and `sign` from the container and every mapping, as the hub does when it ships
/// a Module; `true` when there were any.
fn strip_build_and_sign(module: &mut Module) -> bool {
    let Some(c) = module.spec.module_loader.as_mut().map(|l| &mut l.container) else {
        return false;
    };
    let mut had = c.build.take().is_some() | c.sign.take().is_some();
    for m in &mut c.kernel_mappings {
        had |= m.build.take().is_some() | m.sign.take().is_some();
    }
    had
}

/// Render: the YAML to print, and warnings for stderr.
pub fn render(
    module_text: &str,
    nodes_text: &str,
    settings: &RenderSettings,
    kubernetes_minor: Option<u32>,
) -> Result<(String, Vec<String>), RenderError> {
    let (mut module, mut warnings) = read_module(module_text)?;
    let mut nodes = read_nodes(nodes_text)?;
    let violations = validate_module(&module, Context { kubernetes_minor });
    if !violations.is_empty() {
        return Err(RenderError::Invalid(
            violations.iter().map(ToString::to_string).collect(),
        ));
    }
    if strip_build_and_sign(&mut module) {
        warnings.push(
            "build and sign run on the hub: rendered as the hub ships this Module (loading the images they produce); applied directly on a spoke, kernels whose mapping builds or signs get no loader (BuildUnsupportedOnSpoke)".into(),
        );
    }
    // The agent labels every node with its kernel first; the loaders select on it.
    let mut node_labels: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for node in &mut nodes {
        let Some(kernel) = node_kernel(node).map(kernel_label_value) else {
            warnings.push(format!(
                "node {} reports no kernel (status.nodeInfo.kernelVersion)",
                node.name_any()
            ));
            continue;
        };
        node.labels_mut()
            .insert(KERNEL_LABEL.into(), kernel.clone());
        node_labels
            .entry(node.name_any())
            .or_default()
            .insert(KERNEL_LABEL.into(), kernel);
    }
    // And, with nothing loaded yet, the worker label on every targeted node (the user's
    // version for a versioned Module); the loaders select on it.
    if module.spec.module_loader.is_some() {
        let (ns, name) = crate::render::module_key(&module);
        let targeted: Vec<String> = targeted_nodes(&module, nodes.iter())
            .iter()
            .map(|n| n.name_any())
            .collect();
        for node in &mut nodes {
            if !targeted.contains(&node.name_any()) {
                continue;
            }
            let worker = match crate::render::module_version(&module) {
                None => Some(String::new()),
                Some(_) => node
                    .labels()
                    .get(&version_module_label(&ns, &name))
                    .cloned(),
            };
            if let Some(w) = worker {
                let key = worker_version_label(&ns, &name);
                node.labels_mut().insert(key.clone(), w.clone());
                node_labels
                    .entry(node.name_any())
                    .or_default()
                    .insert(key, w);
            }
        }
    }
    let plan = plan_module(&module, nodes.iter(), settings);
    if !plan.failed_kernels.is_empty() {
        return Err(RenderError::Kernels(
            plan.failed_kernels.values().cloned().collect(),
        ));
    }
    for k in &plan.unmapped_kernels {
        warnings.push(format!(
            "no kernel mapping matches {k}: no loader for nodes running it"
        ));
    }
    let mut out = String::new();
    let mut scheduled: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for ds in plan
        .loaders
        .iter()
        .chain(plan.device_plugin.as_ref())
        .chain(plan.dra.as_ref())
    {
        let yaml = serde_yaml::to_string(ds)
            .map_err(|e| RenderError::Input(format!("cannot encode YAML: {e}")))?;
        let _ = write!(out, "---\n{yaml}");
        let pod = ds.spec.as_ref().and_then(|s| s.template.spec.as_ref());
        let selector = pod
            .and_then(|p| p.node_selector.clone())
            .unwrap_or_default();
        let tolerations = pod.and_then(|p| p.tolerations.clone()).unwrap_or_default();
        let on: Vec<String> = nodes
            .iter()
            .filter(|n| {
                selector_matches(&selector, n.labels()) && node_schedulable_for(n, &tolerations)
            })
            .map(|n| n.name_any())
            .collect();
        scheduled.insert(ds.name_any(), on);
    }
    for class in &plan.device_classes {
        let mut body = serde_json::to_value(class)
            .map_err(|e| RenderError::Input(format!("cannot encode YAML: {e}")))?;
        body["apiVersion"] = serde_json::json!("resource.k8s.io/v1");
        body["kind"] = serde_json::json!("DeviceClass");
        let yaml = serde_yaml::to_string(&body)
            .map_err(|e| RenderError::Input(format!("cannot encode YAML: {e}")))?;
        let _ = write!(out, "---\n{yaml}");
    }
    warnings.extend(plan.failed_device_classes.values().cloned());
    let summary = serde_json::json!({
        "nodeLabels": node_labels,
        "scheduledOn": scheduled,
        "note": "module ready labels (<ns>.<name>.ready) follow the loader pods once they run; the device plugin or DRA driver follows them",
    });
    let yaml = serde_yaml::to_string(&summary)
        .map_err(|e| RenderError::Input(format!("cannot encode YAML: {e}")))?;
    let _ = write!(out, "---\n{yaml}");
    Ok((out, warnings))
}
