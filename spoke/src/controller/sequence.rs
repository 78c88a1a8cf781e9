//! Sequencing of one Module's loaders and device plugin on each node, as pure decisions: the
//! ordered-upgrade worker/schedule label table, which outdated loader pods to replace (one
//! node at a time), and what becomes of stopped loader pods. The reconciler reads its caches,
//! asks these functions, and writes what they decide.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Node;
use kube::ResourceExt;
use shared_api::Module;
use shared_api::labels::{
    LOADER_POD_FINALIZER, MODULE_VERSION_LABEL, ROLE_LABEL, ROLE_LOADER, TARGET_KERNEL_LABEL,
    module_ready_label, schedule_version_label, version_module_label, worker_version_label,
};

use crate::cache::CachedPod;
use crate::render::loader::loader_daemonset_name;
use crate::render::nodes::{
    has_plugin, is_plugin_role, loader_holds_module, loader_unload_failed, pod_node, pod_ready,
    pod_stopped, targeted_nodes,
};
use crate::render::{TEMPLATE_HASH_ANNOTATION, module_version};

fn has_role(pod: &CachedPod, role: &str) -> bool {
    pod.labels().get(ROLE_LABEL).map(String::as_str) == Some(role)
}

/// A device-plugin or DRA driver pod.
pub fn is_plugin_pod(pod: &CachedPod) -> bool {
    is_plugin_role(pod.labels().get(ROLE_LABEL).map(String::as_str))
}

/// The worker label value the node is headed for: on a targeted node of a Module not being
/// deleted, the user's `version-module` label for a versioned Module (none without it), `""`
/// for an unversioned one.
pub fn worker_target(module: &Module, node: &Node) -> Option<String> {
    let (ns, name) = (module.namespace().unwrap_or_default(), module.name_any());
    (module.metadata.deletion_timestamp.is_none()
        && !targeted_nodes(module, std::iter::once(node)).is_empty())
    .then(|| match module_version(module) {
        None => Some(String::new()),
        Some(_) => node
            .labels()
            .get(&version_module_label(&ns, &name))
            .cloned(),
    })
    .flatten()
}

/// The worker label (`version-worker-pod`, the loader DaemonSets' nodeSelector) and schedule
/// label (`version-schedule-pod`, the device plugin's) this node should carry now — upstream's
/// ordered-upgrade state table, applied to every Module with a loader: the device plugin
/// leaves first (schedule label off), the loader only once no plugin pod is left on the node
/// (worker label off: its pod stops and unloads), the next loader only once the kernel no
/// longer has the module (ready label gone), the plugin again once the worker label is the
/// one wanted. `desired` holds the Module's pod-derived labels for the node (the ready label
/// among them); `pods_on_node` the Module's pods bound to it.
pub fn worker_and_schedule(
    module: &Module,
    node: &Node,
    desired: &BTreeMap<String, String>,
    pods_on_node: &[&CachedPod],
    replacing_here: bool,
) -> (Option<String>, Option<String>) {
    let (ns, name) = (module.namespace().unwrap_or_default(), module.name_any());
    let target = worker_target(module, node);
    let has_plugin = has_plugin(module);
    let loaded = desired.contains_key(&module_ready_label(&ns, &name));
    let plugin_on_node = pods_on_node.iter().any(|p| is_plugin_pod(p));
    let mut w = node
        .labels()
        .get(&worker_version_label(&ns, &name))
        .cloned();
    let mut s = node
        .labels()
        .get(&schedule_version_label(&ns, &name))
        .cloned();
    if s.is_some() && (!has_plugin || target.is_none() || w != target || s != w || replacing_here) {
        s = None;
    }
    if w.is_some() && w != target && s.is_none() && !plugin_on_node {
        w = None;
    }
    if w.is_none() && target.is_some() && !loaded {
        w = target.clone();
    }
    if has_plugin && w.is_some() && w == target && s.is_none() && !replacing_here {
        s = w.clone();
    }
    (w, s)
}

/// Loader pods to replace because their DaemonSet's template changed (`OnDelete`).
#[derive(Debug, Default)]
pub struct Replacement {
    /// Outdated pods that are not ready: they hold nothing, replaced at once.
    pub idle: Vec<Arc<CachedPod>>,
    /// The one Ready outdated pod to replace now: only while every other loader pod of the
    /// Module is Ready and none is stopping, so at most one node unloads at a time.
    pub next: Option<Arc<CachedPod>>,
}

/// Which of the Module's loader `pods` to replace. `daemonset` finds a DaemonSet of the
/// Module's namespace by name (a pod is outdated when its template hash differs from its
/// DaemonSet's); `node` finds a node by name (a replacement already under way — its node's
/// schedule label taken off — goes on first).
pub fn loader_replacement(
    module: &Module,
    pods: &[Arc<CachedPod>],
    daemonset: impl Fn(&str) -> Option<Arc<DaemonSet>>,
    node: impl Fn(&str) -> Option<Arc<Node>>,
) -> Replacement {
    let (ns, name) = (module.namespace().unwrap_or_default(), module.name_any());
    let loaders: Vec<&Arc<CachedPod>> = pods.iter().filter(|p| has_role(p, ROLE_LOADER)).collect();
    let outdated = |p: &CachedPod| -> bool {
        let l = p.labels();
        let Some(kernel) = l.get(TARGET_KERNEL_LABEL) else {
            return false;
        };
        let ds_name = loader_daemonset_name(
            &name,
            kernel,
            l.get(MODULE_VERSION_LABEL).map(String::as_str),
        );
        let want = daemonset(&ds_name)
            .and_then(|d| d.annotations().get(TEMPLATE_HASH_ANNOTATION).cloned());
        let have = p.annotations().get(TEMPLATE_HASH_ANNOTATION);
        want.is_some_and(|w| have != Some(&w))
    };
    let live = |p: &&&Arc<CachedPod>| p.metadata.deletion_timestamp.is_none();
    let idle: Vec<Arc<CachedPod>> = loaders
        .iter()
        .filter(live)
        .filter(|p| !pod_ready(p) && outdated(p))
        .map(|p| (*p).clone())
        .collect();
    let busy = loaders
        .iter()
        .any(|p| p.metadata.deletion_timestamp.is_some() || (!pod_ready(p) && !outdated(p)));
    let skey = schedule_version_label(&ns, &name);
    let mut candidates: Vec<&Arc<CachedPod>> = loaders
        .iter()
        .filter(live)
        .filter(|p| pod_ready(p) && outdated(p))
        .copied()
        .collect();
    candidates.sort_by_key(|p| pod_node(p).unwrap_or_default().to_string());
    // One already under way (its node's schedule label taken off) goes on first.
    let started = candidates.iter().find(|p| {
        has_plugin(module)
            && pod_node(p)
                .and_then(&node)
                .is_some_and(|n| !n.labels().contains_key(&skey))
    });
    let next = match started {
        Some(p) => Some((*p).clone()),
        None if !busy => candidates.first().map(|p| (*p).clone()),
        None => None,
    };
    Replacement { idle, next }
}

/// Whether the loader pod chosen for replacement ([`Replacement::next`]) may be deleted now:
/// its node's device plugin is gone — the node (`node`, as cached now; `None` when gone) no
/// longer carries the schedule label and no plugin pod of the Module (`pods`) is left there —
/// or the Module has no device plugin.
pub fn replacement_may_go(
    module: &Module,
    pod: &CachedPod,
    node: Option<&Node>,
    pods: &[Arc<CachedPod>],
) -> bool {
    let (ns, name) = (module.namespace().unwrap_or_default(), module.name_any());
    let node_name = pod_node(pod).unwrap_or_default();
    let skey = schedule_version_label(&ns, &name);
    let schedule_off = node.is_none_or(|n| !n.labels().contains_key(&skey));
    let plugin_left = pods
        .iter()
        .any(|p| pod_node(p) == Some(node_name) && is_plugin_pod(p));
    !has_plugin(module) || (schedule_off && !plugin_left)
}

/// Whether the agent must hold `pod` with its finalizer before it stops it (deletes its
/// DaemonSet or the pod, or takes the worker label off its node): a loader pod whose module is
/// in the kernel, not yet stopping and not yet held. The hold keeps the pod, and the node's
/// ready label, until the agent has read whether the unload worked ([`stopped_loaders`]).
/// Loader pods are not held otherwise: one that goes because its node rebooted into another
/// kernel holds nothing.
pub fn needs_hold(pod: &CachedPod) -> bool {
    loader_holds_module(pod)
        && pod.metadata.deletion_timestamp.is_none()
        && !pod.finalizers().iter().any(|f| f == LOADER_POD_FINALIZER)
}

/// What becomes of a stopped (deleted) loader pod that still carries the agent's finalizer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoppedLoader {
    /// The kernel no longer has its module, or its node is gone: remove the finalizer.
    Release,
    /// Its unload failed (the kernel's words): keep it, and the node's ready label, and say so.
    UnloadFailed(String),
}

/// The stopped loader pods among `pods` and what to do with each, in `pods`' order.
/// `node_exists` tells whether a node of that name is cached. Pods still stopping are left.
pub fn stopped_loaders(
    pods: &[Arc<CachedPod>],
    node_exists: impl Fn(&str) -> bool,
) -> Vec<(&Arc<CachedPod>, StoppedLoader)> {
    let mut out = Vec::new();
    for pod in pods {
        if !has_role(pod, ROLE_LOADER)
            || pod.metadata.deletion_timestamp.is_none()
            || !pod.finalizers().iter().any(|f| f == LOADER_POD_FINALIZER)
        {
            continue;
        }
        let node_gone = pod_node(pod).is_none_or(|n| !node_exists(n));
        if let Some(why) = loader_unload_failed(pod).filter(|_| !node_gone) {
            out.push((pod, StoppedLoader::UnloadFailed(why)));
        } else if pod_stopped(pod) || node_gone {
            out.push((pod, StoppedLoader::Release));
        }
    }
    out
}

#[cfg(test)]
mod tests;
