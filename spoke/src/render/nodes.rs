//! Node facts: which nodes a Module targets, the labels the agent wants on a node, and the
//! kernel ClusterClaim values.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Node, Taint, Toleration};
use kube::ResourceExt;
use shared_api::Module;
use shared_api::labels::{
    MODULE_NAME_LABEL, MODULE_VERSION_LABEL, ROLE_DEVICE_PLUGIN, ROLE_DRA, ROLE_LABEL, ROLE_LOADER,
    device_plugin_ready_label, dra_ready_label, module_ready_label, module_version_ready_label,
};

use crate::cache::CachedPod;

/// Taints the DaemonSet controller tolerates on its own (DaemonSet pods get these
/// tolerations automatically), so they do not make a node unschedulable for our loaders.
const DAEMONSET_TOLERATED: [(&str, &str); 6] = [
    ("node.kubernetes.io/not-ready", "NoExecute"),
    ("node.kubernetes.io/unreachable", "NoExecute"),
    ("node.kubernetes.io/disk-pressure", "NoSchedule"),
    ("node.kubernetes.io/memory-pressure", "NoSchedule"),
    ("node.kubernetes.io/pid-pressure", "NoSchedule"),
    ("node.kubernetes.io/unschedulable", "NoSchedule"),
];

/// Whether a role label value names a plugin (device plugin or DRA driver): a pod that may
/// hold its driver's devices, so it leaves a node before the loader unloads the module.
pub fn is_plugin_role(role: Option<&str>) -> bool {
    matches!(role, Some(ROLE_DEVICE_PLUGIN | ROLE_DRA))
}

/// Whether the Module runs a plugin (`devicePlugin` or `dra`) next to its loader.
pub fn has_plugin(module: &Module) -> bool {
    module.spec.device_plugin.is_some() || module.spec.dra.is_some()
}

/// The node's kernel (`status.nodeInfo.kernelVersion`), when reported.
pub fn node_kernel(node: &Node) -> Option<&str> {
    node.status
        .as_ref()?
        .node_info
        .as_ref()
        .map(|i| i.kernel_version.as_str())
        .filter(|k| !k.trim().is_empty())
}

/// The node's boot ID (`status.nodeInfo.bootID`), when it reports one.
pub fn node_boot_id(node: &Node) -> Option<&str> {
    node.status
        .as_ref()?
        .node_info
        .as_ref()
        .map(|i| i.boot_id.as_str())
        .filter(|b| !b.trim().is_empty())
}

/// Equality selector: every key present with the same value (an empty selector matches all).
pub fn selector_matches(
    selector: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Whether one toleration tolerates one taint (Kubernetes semantics).
pub fn tolerates(t: &Toleration, taint: &Taint) -> bool {
    let effect_ok = t
        .effect
        .as_deref()
        .is_none_or(|e| e.is_empty() || e == taint.effect);
    if !effect_ok {
        return false;
    }
    let key = t.key.as_deref().unwrap_or("");
    match t.operator.as_deref().unwrap_or("Equal") {
        "Exists" => key.is_empty() || key == taint.key,
        "Equal" | "" => {
            key == taint.key
                && t.value.as_deref().unwrap_or("") == taint.value.as_deref().unwrap_or("")
        }
        _ => false,
    }
}

/// Whether a DaemonSet pod with `tolerations` can run on the node: every NoSchedule and
/// NoExecute taint is tolerated, by them or by the DaemonSet controller's own tolerations.
pub fn node_schedulable_for(node: &Node, tolerations: &[Toleration]) -> bool {
    let taints = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_deref())
        .unwrap_or_default();
    taints
        .iter()
        .filter(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
        .all(|taint| {
            DAEMONSET_TOLERATED
                .iter()
                .any(|(k, e)| taint.key == *k && taint.effect == *e)
                || tolerations.iter().any(|t| tolerates(t, taint))
        })
}

/// The nodes a Module targets: matching `spec.selector`, schedulable for its tolerations,
/// not being deleted.
pub fn targeted_nodes<'a>(
    module: &Module,
    nodes: impl IntoIterator<Item = &'a Node>,
) -> Vec<&'a Node> {
    nodes
        .into_iter()
        .filter(|n| n.metadata.deletion_timestamp.is_none())
        .filter(|n| selector_matches(&module.spec.selector, n.labels()))
        .filter(|n| node_schedulable_for(n, &module.spec.tolerations))
        .collect()
}

/// A pod that runs, is Ready and is not terminating.
pub fn pod_ready(pod: &CachedPod) -> bool {
    pod.metadata.deletion_timestamp.is_none() && pod_was_ready(pod)
}

/// The node a pod is bound to.
pub fn pod_node(pod: &CachedPod) -> Option<&str> {
    pod.spec
        .as_ref()?
        .node_name
        .as_deref()
        .filter(|n| !n.is_empty())
}

/// Whether a pod was Ready when it last reported, terminating or not: a loader pod being
/// deleted still has its module loaded until its preStop hook has unloaded it and the pod
/// is gone.
fn pod_was_ready(pod: &CachedPod) -> bool {
    pod.status
        .as_ref()
        .is_some_and(|s| s.phase.as_deref() == Some("Running") && s.ready)
}

/// A deleted loader pod whose container stopped with its module still in the kernel (the
/// preStop unload failed; the loader exits [`super::loader::UNLOAD_FAILED_EXIT`]): the
/// termination message, which carries the kernel's words.
pub fn loader_unload_failed(pod: &CachedPod) -> Option<String> {
    pod.metadata.deletion_timestamp.as_ref()?;
    pod.containers()
        .iter()
        .filter(|c| c.name == super::loader::LOADER_CONTAINER)
        .filter_map(|c| c.state.as_ref()?.terminated())
        .find(|(code, _)| *code == super::loader::UNLOAD_FAILED_EXIT)
        .map(|(_, why)| why.trim_end().to_string())
}

/// A loader pod whose module is in the kernel as far as its status says: Ready, or stopped
/// after a failed unload.
pub fn loader_holds_module(pod: &CachedPod) -> bool {
    pod.labels().get(ROLE_LABEL).map(String::as_str) == Some(ROLE_LOADER)
        && (pod_was_ready(pod) || loader_unload_failed(pod).is_some())
}

/// Which run of a pod's loader container this is: `<pod uid>/<restartCount>`. It changes when
/// the kubelet restarts the container (after a reboot, too) or the pod is replaced.
pub fn loader_run(pod: &CachedPod) -> String {
    let restarts = pod
        .containers()
        .iter()
        .find(|c| c.name == super::loader::LOADER_CONTAINER)
        .map_or(0, |c| c.restart_count);
    format!(
        "{}/{restarts}",
        pod.metadata.uid.as_deref().unwrap_or_default()
    )
}

/// A deleted pod none of whose containers runs any more (or that never started one).
pub fn pod_stopped(pod: &CachedPod) -> bool {
    if pod.metadata.deletion_timestamp.is_none() {
        return false;
    }
    let Some(status) = pod.status.as_ref() else {
        return true;
    };
    matches!(
        status.phase.as_deref(),
        Some("Succeeded" | "Failed" | "Pending")
    ) || status
        .container_statuses
        .iter()
        .all(|c| c.state.as_ref().is_none_or(|s| !s.is_running()))
}

/// The labels the agent keeps on `node` for the Module `namespace/name`, given the pods of
/// that Module: `<ns>.<name>.ready=""` (+ `.version.ready=<version>` for a versioned loader)
/// while a Ready loader pod runs there — until it stopped, since the module stays loaded
/// while the pod terminates and its preStop hook unloads it, and for as long as a stopped
/// loader pod says its unload failed (the module is still in the kernel) — and
/// `<ns>.<name>.device-plugin-ready=""` while a Ready, not terminating, device-plugin pod
/// runs there.
pub fn node_labels<'a>(
    namespace: &str,
    name: &str,
    node: &str,
    pods: impl IntoIterator<Item = &'a CachedPod>,
) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut versions: BTreeSet<&str> = BTreeSet::new();
    for pod in pods {
        if pod.metadata.namespace.as_deref() != Some(namespace)
            || pod.labels().get(MODULE_NAME_LABEL).map(String::as_str) != Some(name)
            || pod_node(pod) != Some(node)
            || !(pod_was_ready(pod) || loader_unload_failed(pod).is_some())
        {
            continue;
        }
        match pod.labels().get(ROLE_LABEL).map(String::as_str) {
            Some(ROLE_LOADER) => {
                labels.insert(module_ready_label(namespace, name), String::new());
                if let Some(v) = pod.labels().get(MODULE_VERSION_LABEL) {
                    versions.insert(v);
                }
            }
            Some(ROLE_DEVICE_PLUGIN) if pod_ready(pod) => {
                labels.insert(device_plugin_ready_label(namespace, name), String::new());
            }
            Some(ROLE_DRA) if pod_ready(pod) => {
                labels.insert(dra_ready_label(namespace, name), String::new());
            }
            _ => {}
        }
    }
    // Two ready versions on one node only overlap for a moment; report the greatest.
    if let Some(v) = versions.iter().next_back() {
        labels.insert(module_version_ready_label(namespace, name), v.to_string());
    }
    labels
}

/// The distinct node kernels, sorted.
pub fn distinct_kernels<'a>(nodes: impl IntoIterator<Item = &'a Node>) -> Vec<String> {
    let set: BTreeSet<String> = nodes
        .into_iter()
        .filter_map(node_kernel)
        .map(|k| k.trim().to_string())
        .collect();
    set.into_iter().collect()
}

/// Kernel → Driver Toolkit image for these nodes, through their OS version
/// (`status.nodeInfo.osImage`) and the Driver Toolkit ImageStream's tags (OS version → image).
/// Kernels are spelled as in the kernel claim.
pub fn kernel_dtk_images<'a>(
    nodes: impl IntoIterator<Item = &'a Node>,
    tags: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let pairs: Vec<(&str, &str)> = nodes
        .into_iter()
        .filter_map(|n| {
            let info = n.status.as_ref()?.node_info.as_ref()?;
            Some((info.kernel_version.trim(), info.os_image.as_str()))
        })
        .collect();
    shared_api::dtk::kernel_dtk_images(pairs, tags)
}

/// The kernel ClusterClaims `(name, value)` for these nodes, split when longer than 1024.
pub fn kernel_claims<'a>(nodes: impl IntoIterator<Item = &'a Node>) -> Vec<(String, String)> {
    shared_api::ocm::split_kernel_claims(&distinct_kernels(nodes))
}
