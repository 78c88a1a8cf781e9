//! Has the fleet converged? For every lab: its MCM is Ready, and on every node it targets
//! its modules are loaded (the node simulator's list, read from the Node annotation), the
//! in-tree modules it removes are gone, the spoke marked the node ready, and its device
//! plugin runs. When not, say exactly what is missing, with the MCM status and the loader
//! pods of the nodes concerned.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt as _};
use shared_api::ManagedClusterModule;
use shared_api::labels::{
    MODULE_NAME_LABEL, ROLE_LABEL, device_plugin_ready_label, module_ready_label,
};

use crate::labs::{LAB_NAMESPACE, Lab};
use crate::sim::{LOADED_MODULES_ANNOTATION, SECURE_BOOT_ANNOTATION};

/// One node as seen through its cluster's API.
#[derive(Debug, Clone)]
pub struct NodeState {
    pub cluster: String,
    pub name: String,
    pub kernel: String,
    pub secure_boot: bool,
    pub labels: BTreeMap<String, String>,
    /// Loaded modules in load order (the node simulator's annotation: for a real-kernel node,
    /// what its kernel's `/proc/modules` lists beyond the modules it booted with).
    pub loaded: Vec<String>,
    /// A real kernel in a VM, not a simulated one.
    pub real_kernel: bool,
}

/// Nodes of every spoke and the labs' MCMs, read at one moment.
#[derive(Debug, Clone, Default)]
pub struct Observation {
    pub nodes: Vec<NodeState>,
    pub mcms: BTreeMap<String, ManagedClusterModule>,
}

impl Observation {
    pub fn node(&self, cluster: &str, node: &str) -> Option<&NodeState> {
        self.nodes
            .iter()
            .find(|n| n.cluster == cluster && n.name == node)
    }
}

/// Read the nodes of `spokes` (name, admin client) and every MCM of the hub.
pub async fn observe(hub: &Client, spokes: &[(String, Client)]) -> anyhow::Result<Observation> {
    let mut nodes = Vec::new();
    for (cluster, client) in spokes {
        for n in Api::<Node>::all(client.clone())
            .list(&ListParams::default())
            .await?
            .items
        {
            nodes.push(node_state(cluster, &n));
        }
    }
    let mcms = Api::<ManagedClusterModule>::all(hub.clone())
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .map(|m| (m.name_any(), m))
        .collect();
    Ok(Observation { nodes, mcms })
}

pub fn node_state(cluster: &str, n: &Node) -> NodeState {
    let ann = n.annotations();
    NodeState {
        cluster: cluster.to_string(),
        name: n.name_any(),
        kernel: n
            .status
            .as_ref()
            .and_then(|s| s.node_info.as_ref())
            .map(|i| i.kernel_version.clone())
            .unwrap_or_default(),
        secure_boot: ann.get(SECURE_BOOT_ANNOTATION).is_some_and(|v| v == "true"),
        real_kernel: ann
            .get(crate::sim::REAL_KERNEL_ANNOTATION)
            .is_some_and(|v| v == "true"),
        labels: n.labels().clone(),
        loaded: ann
            .get(LOADED_MODULES_ANNOTATION)
            .map(|v| {
                v.split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default(),
    }
}

/// The verdict on one lab.
#[derive(Debug, Clone)]
pub struct LabVerdict {
    pub name: String,
    pub converged: bool,
    /// Targeted nodes where everything of the lab is in place.
    pub nodes_done: usize,
    pub nodes_targeted: usize,
    /// One short line: the MCM's Ready condition or image states.
    pub summary: String,
    /// What is not right yet, one item per problem.
    pub problems: Vec<String>,
    /// `(cluster, node)` of targeted nodes that are not done.
    pub pending_nodes: Vec<(String, String)>,
}

/// The condition `type_` of an MCM: (status, reason, message).
pub fn condition(m: &ManagedClusterModule, type_: &str) -> Option<(String, String, String)> {
    m.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// Judge `lab` on `obs`; `targets` are the `(cluster, node)` pairs it should be on.
pub fn evaluate(lab: &Lab, targets: &[(String, String)], obs: &Observation) -> LabVerdict {
    evaluate_in(lab, LAB_NAMESPACE, targets, obs)
}

/// As [`evaluate`], for a lab whose Modules live in `namespace` on the spokes.
pub fn evaluate_in(
    lab: &Lab,
    namespace: &str,
    targets: &[(String, String)],
    obs: &Observation,
) -> LabVerdict {
    let mut problems = Vec::new();
    let summary;
    let mut ready = false;
    match obs.mcms.get(lab.name) {
        None => {
            summary = "not applied".to_string();
            problems.push(format!("MCM {} does not exist", lab.name));
        }
        Some(m) => {
            let st = m.status.clone().unwrap_or_default();
            match condition(m, "Ready") {
                Some((s, _, msg)) if s == "True" => {
                    ready = true;
                    summary = format!("Ready ({msg})");
                }
                Some((_, reason2, msg)) => {
                    let images: Vec<String> = st
                        .images
                        .iter()
                        .filter(|i| i.state != shared_api::mcm::ImageState::Ready)
                        .map(|i| i.state.as_str().to_string())
                        .collect();
                    summary = if images.is_empty() {
                        format!("{reason2}: {msg}")
                    } else {
                        format!("images {}; {reason2}", images.join(","))
                    };
                    problems.push(format!("MCM {} not Ready: {reason2}: {msg}", lab.name));
                }
                None => {
                    summary = "no status yet".to_string();
                    problems.push(format!("MCM {} has no Ready condition yet", lab.name));
                }
            }
        }
    }
    let ready_label = module_ready_label(namespace, lab.name);
    let dp_label = device_plugin_ready_label(namespace, lab.name);
    let mut done = 0;
    let mut pending = Vec::new();
    for (cluster, node) in targets {
        let Some(n) = obs.node(cluster, node) else {
            problems.push(format!("{cluster}/{node}: node not found"));
            pending.push((cluster.clone(), node.clone()));
            continue;
        };
        let mut wrong = Vec::new();
        let missing: Vec<&str> = lab
            .modules
            .iter()
            .copied()
            .filter(|m| !n.loaded.iter().any(|l| l == m))
            .collect();
        if !missing.is_empty() {
            wrong.push(format!("{} not loaded", missing.join(", ")));
        }
        let still: Vec<&str> = lab
            .removes
            .iter()
            .copied()
            .filter(|m| n.loaded.iter().any(|l| l == m))
            .collect();
        if !still.is_empty() {
            wrong.push(format!("in-tree {} still loaded", still.join(", ")));
        }
        if !n.labels.contains_key(&ready_label) {
            wrong.push(format!("no label {ready_label}"));
        }
        if lab.device_plugin && !n.labels.contains_key(&dp_label) {
            wrong.push("device plugin not ready".to_string());
        }
        if wrong.is_empty() {
            done += 1;
        } else {
            problems.push(format!(
                "{cluster}/{node}: {} (loaded: [{}])",
                wrong.join("; "),
                n.loaded.join(", ")
            ));
            pending.push((cluster.clone(), node.clone()));
        }
    }
    // Nothing of the lab on nodes it does not target.
    for n in &obs.nodes {
        let targeted = targets
            .iter()
            .any(|(c, name)| *c == n.cluster && *name == n.name);
        if !targeted && n.labels.contains_key(&ready_label) {
            problems.push(format!(
                "{}/{}: marked ready for {} but not targeted",
                n.cluster, n.name, lab.name
            ));
        }
    }
    LabVerdict {
        name: lab.name.to_string(),
        converged: ready && problems.is_empty(),
        nodes_done: done,
        nodes_targeted: targets.len(),
        summary,
        problems,
        pending_nodes: pending,
    }
}

/// A readable account of a lab that did not converge: its verdict, the MCM's conditions,
/// images and cluster problems, and the loader pods on the nodes that are not done.
pub async fn explain(
    verdict: &LabVerdict,
    namespace: &str,
    obs: &Observation,
    spokes: &[(String, Client)],
) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "lab {}: NOT converged", verdict.name);
    for p in &verdict.problems {
        let _ = writeln!(out, "  - {p}");
    }
    if let Some(m) = obs.mcms.get(&verdict.name) {
        let st = m.status.clone().unwrap_or_default();
        let _ = writeln!(
            out,
            "  MCM status: desired {} applied {} available {} degraded {}",
            st.number_desired, st.number_applied, st.number_available, st.number_degraded
        );
        for c in &st.conditions {
            let _ = writeln!(
                out,
                "    condition {}={} {}: {}",
                c.type_, c.status, c.reason, c.message
            );
        }
        for i in &st.images {
            let _ = writeln!(
                out,
                "    image {} (kernel {}): {}{}{}",
                i.image,
                i.kernel,
                i.state.as_str(),
                i.digest
                    .as_deref()
                    .map(|d| format!(" {d}"))
                    .unwrap_or_default(),
                i.reason
                    .as_deref()
                    .map(|r| format!(" — {r}"))
                    .unwrap_or_default()
            );
        }
        for c in &st.clusters {
            let _ = writeln!(out, "    cluster {}: {}: {}", c.name, c.reason, c.message);
        }
    }
    for (cluster, node) in &verdict.pending_nodes {
        let Some((_, client)) = spokes.iter().find(|(c, _)| c == cluster) else {
            continue;
        };
        let _ = writeln!(
            out,
            "  {cluster}/{node}: {}",
            pod_states(client, namespace, &verdict.name, node).await
        );
    }
    out
}

/// The module-loader and device-plugin pods of `module` on `node`, with their container states.
pub async fn pod_states(client: &Client, namespace: &str, module: &str, node: &str) -> String {
    let pods = match Api::<Pod>::namespaced(client.clone(), namespace)
        .list(&ListParams::default().labels(&format!("{ROLE_LABEL},{MODULE_NAME_LABEL}={module}")))
        .await
    {
        Ok(l) => l.items,
        Err(e) => return format!("cannot list pods: {e}"),
    };
    let mut parts = Vec::new();
    for p in pods {
        let on_node = p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node);
        if !on_node {
            continue;
        }
        let role = p.labels().get(ROLE_LABEL).cloned().unwrap_or_default();
        let st = p.status.clone().unwrap_or_default();
        let mut states = Vec::new();
        for c in st.container_statuses.unwrap_or_default() {
            let s = c.state.unwrap_or_default();
            let desc = if let Some(w) = s.waiting {
                format!(
                    "waiting {}: {}",
                    w.reason.unwrap_or_default(),
                    w.message.unwrap_or_default()
                )
            } else if let Some(t) = s.terminated {
                format!(
                    "terminated {}: {}",
                    t.reason.unwrap_or_default(),
                    t.message.unwrap_or_default()
                )
            } else if c.ready {
                "running, ready".to_string()
            } else {
                "running".to_string()
            };
            let last = c
                .last_state
                .and_then(|l| l.terminated)
                .and_then(|t| t.message)
                .map(|m| format!(" (last: {m})"))
                .unwrap_or_default();
            states.push(format!("{}: {desc}{last}", c.name));
        }
        parts.push(format!(
            "{role} pod {} phase {}: {}",
            p.name_any(),
            st.phase.unwrap_or_default(),
            if states.is_empty() {
                "no container status".to_string()
            } else {
                states.join("; ")
            }
        ));
    }
    if parts.is_empty() {
        "no pod of the module on the node".into()
    } else {
        parts.join(" | ")
    }
}

/// The summary table: cluster, node, kernel, Secure Boot, modules loaded, labs ready there.
pub fn node_table(obs: &Observation, namespace: &str) -> String {
    let prefix = format!("{}/{namespace}.", shared_api::labels::PREFIX);
    let rows: Vec<[String; 6]> = obs
        .nodes
        .iter()
        .map(|n| {
            let mut ready: Vec<String> = n
                .labels
                .keys()
                .filter_map(|k| k.strip_prefix(&prefix)?.strip_suffix(".ready"))
                .filter(|k| !k.ends_with(".version"))
                .map(str::to_string)
                .collect();
            ready.sort();
            [
                n.cluster.clone(),
                n.name.clone(),
                if n.real_kernel {
                    format!("{} (real, VM)", n.kernel)
                } else {
                    n.kernel.clone()
                },
                if n.secure_boot { "on" } else { "off" }.to_string(),
                if n.loaded.is_empty() {
                    "-".into()
                } else {
                    n.loaded.join(",")
                },
                if ready.is_empty() {
                    "-".into()
                } else {
                    ready.join(",")
                },
            ]
        })
        .collect();
    table(
        &[
            "CLUSTER",
            "NODE",
            "KERNEL",
            "SECURE BOOT",
            "MODULES LOADED",
            "LABS READY",
        ],
        &rows,
    )
}

/// A plain text table with columns padded to their widest cell.
pub fn table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) -> String {
    let mut width = header.map(str::len);
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            width[i] = width[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == N {
                l.push_str(c);
            } else {
                let _ = write!(l, "{c:<w$}  ", w = width[i]);
            }
        }
        let _ = writeln!(out, "{}", l.trim_end());
    };
    line(header.to_vec(), &mut out);
    for r in rows {
        line(r.iter().map(String::as_str).collect(), &mut out);
    }
    out
}
