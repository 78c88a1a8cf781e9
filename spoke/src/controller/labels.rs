//! The labels one Module wants on each node, and the label writes that follow: pure, from the
//! cached nodes and the Module's pods.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Node;
use kube::ResourceExt;
use shared_api::Module;
use shared_api::labels::{
    TARGET_KERNEL_LABEL, deprecated_ready_label, is_module_node_label, kernel_label_value,
    module_ready_label, module_version_ready_label, ready_boot_annotation, recorded_boot_id,
    schedule_version_label, worker_version_label,
};

use super::sequence::worker_and_schedule;
use crate::cache::CachedPod;
use crate::render::nodes::{
    loader_holds_module, loader_run, node_boot_id, node_kernel, node_labels, pod_node,
};

/// One Module's view for its node labels.
#[derive(Debug, Clone, Copy)]
pub struct LabelScope<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    /// The Module when it has a loader: its worker and schedule labels are sequenced
    /// ([`worker_and_schedule`]). `None` for a Module without a loader or one already gone.
    pub sequenced: Option<&'a Module>,
    /// The Module's pods (loaders and device plugins) on every node.
    pub pods: &'a [Arc<CachedPod>],
    /// The node whose outdated loader pod is being replaced now, if any.
    pub replace_on: Option<&'a str>,
    /// Drop every label of the Module (cleanup once its pods are gone).
    pub drop_all: bool,
}

/// What a reboot means for one Module's ready label on one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootFence {
    /// The loader pods' Ready may be believed: the node did not reboot since the ready label
    /// was confirmed, or a loader container started since.
    pub ready_allowed: bool,
    /// The node's [`ready_boot_annotation`] value to keep (`None`: none).
    pub annotation: Option<String>,
}

/// The reboot fence. The ready label is confirmed in a boot (`bootID`) by one run of a loader
/// container (`runs`: those on the node that hold the module, [`loader_run`]); that pair is
/// kept in the node annotation `recorded`. When the node reports another boot, the module is
/// gone from its kernel, but the pod's Ready may still be the one from before the reboot until
/// the kubelet restarts the container: the ready label is withheld until a run other than the
/// recorded one is Ready. A node without a boot ID is not fenced.
pub fn boot_fence(boot_id: Option<&str>, recorded: Option<&str>, runs: &[String]) -> BootFence {
    let Some(boot) = boot_id else {
        return BootFence {
            ready_allowed: true,
            annotation: None,
        };
    };
    let keep = || recorded.map(str::to_string);
    let Some(newest) = runs.iter().max() else {
        // No run to believe: what was recorded stays, and a Ready that is not a run of this
        // kernel (a loader of the kernel before the reboot) is not believed after a reboot.
        let recorded_boot = recorded.and_then(recorded_boot_id);
        return BootFence {
            ready_allowed: recorded_boot.is_none_or(|b| b == boot),
            annotation: keep(),
        };
    };
    let confirm = |run: &str| BootFence {
        ready_allowed: true,
        annotation: Some(format!("{boot} {run}")),
    };
    let Some((recorded_boot, recorded_run)) = recorded.and_then(|r| r.split_once(' ')) else {
        return confirm(newest);
    };
    if recorded_boot == boot {
        if runs.iter().any(|r| r == recorded_run) {
            return BootFence {
                ready_allowed: true,
                annotation: keep(),
            };
        }
        return confirm(newest);
    }
    match runs.iter().filter(|r| *r != recorded_run).max() {
        Some(fresh) => confirm(fresh),
        None => BootFence {
            ready_allowed: false,
            annotation: keep(),
        },
    }
}

/// [`boot_fence`] for the Module on `node`, whose pods of the Module are `on_node`. Only the
/// loaders of the kernel the node runs count as runs: after a reboot into another kernel, the
/// previous kernel's loader (Ready, restarted, or terminating) has not loaded the module into
/// this kernel.
fn fence_on(scope: &LabelScope<'_>, node: &Node, on_node: &[&CachedPod]) -> BootFence {
    let kernel = node_kernel(node).map(kernel_label_value);
    let this_kernel = |p: &CachedPod| match (&kernel, p.labels().get(TARGET_KERNEL_LABEL)) {
        (Some(k), Some(target)) => k == target,
        _ => true,
    };
    let runs: Vec<String> = on_node
        .iter()
        .filter(|p| loader_holds_module(p) && this_kernel(p))
        .map(|p| loader_run(p))
        .collect();
    let key = ready_boot_annotation(scope.namespace, scope.name);
    boot_fence(
        node_boot_id(node),
        node.annotations().get(&key).map(String::as_str),
        &runs,
    )
}

/// The Module's annotations that `node` should carry: its [`ready_boot_annotation`].
pub fn desired_node_annotations(
    scope: &LabelScope<'_>,
    node: &Node,
    on_node: &[&CachedPod],
) -> BTreeMap<String, String> {
    if scope.drop_all {
        return BTreeMap::new();
    }
    let key = ready_boot_annotation(scope.namespace, scope.name);
    fence_on(scope, node, on_node)
        .annotation
        .map(|v| BTreeMap::from([(key, v)]))
        .unwrap_or_default()
}

/// The Module's annotations `node` carries now.
pub fn current_node_annotations(
    node: &Node,
    namespace: &str,
    name: &str,
) -> BTreeMap<String, String> {
    let key = ready_boot_annotation(namespace, name);
    node.annotations()
        .get(&key)
        .map(|v| BTreeMap::from([(key, v.clone())]))
        .unwrap_or_default()
}

/// Every label of the Module that `node` should carry: the ready and device-plugin labels
/// from the pods ([`node_labels`]; the ready labels withheld after a reboot until a loader
/// ran again, [`boot_fence`]) and, for a sequenced Module, the worker and schedule labels.
/// `on_node` are the Module's pods on `node`.
pub fn desired_node_labels(
    scope: &LabelScope<'_>,
    node: &Node,
    on_node: &[&CachedPod],
) -> BTreeMap<String, String> {
    let (namespace, name) = (scope.namespace, scope.name);
    if scope.drop_all {
        return BTreeMap::new();
    }
    let node_name = node.name_any();
    let mut desired = node_labels(namespace, name, &node_name, on_node.iter().copied());
    if !fence_on(scope, node, on_node).ready_allowed {
        desired.remove(&module_ready_label(namespace, name));
        desired.remove(&module_version_ready_label(namespace, name));
    }
    if let Some(m) = scope.sequenced {
        let replacing_here = scope.replace_on == Some(node_name.as_str());
        let (w, sched) = worker_and_schedule(m, node, &desired, on_node, replacing_here);
        if let Some(w) = w {
            desired.insert(worker_version_label(namespace, name), w);
        }
        if let Some(sched) = sched {
            desired.insert(schedule_version_label(namespace, name), sched);
        }
    }
    desired
}

/// The Module's labels `node` carries now.
pub fn current_node_labels(node: &Node, namespace: &str, name: &str) -> BTreeMap<String, String> {
    node.labels()
        .iter()
        .filter(|(k, _)| is_module_node_label(k, namespace, name))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Whether the deprecated `<name>.ready` key is some cached Module's current ready label
/// (then it is never removed).
pub fn deprecated_label_is_live(name: &str, modules: &[Arc<Module>]) -> bool {
    let deprecated = deprecated_ready_label(name);
    modules.iter().any(|m| {
        module_ready_label(&m.namespace().unwrap_or_default(), &m.name_any()) == deprecated
    })
}

/// The label writes for one node.
#[derive(Debug, Clone)]
pub struct NodeLabelWrite<'a> {
    pub node: &'a Node,
    /// The Module's complete set of labels for the node, to apply under its field manager
    /// (an empty set drops them all); `None` when the node already carries exactly these or
    /// is being deleted.
    pub apply: Option<BTreeMap<String, String>>,
    /// The Module's complete set of annotations for the node, applied with `apply`.
    pub annotations: BTreeMap<String, String>,
    /// Remove the deprecated `<name>.ready` label.
    pub remove_deprecated: bool,
}

/// What to write on each of `nodes` for the Module, in `nodes`' order; nodes with nothing to
/// write are left out. `modules` are all cached Modules (for the deprecated label).
pub fn node_label_writes<'n>(
    scope: &LabelScope<'_>,
    nodes: &'n [Arc<Node>],
    modules: &[Arc<Module>],
) -> Vec<NodeLabelWrite<'n>> {
    let deprecated = deprecated_ready_label(scope.name);
    let deprecated_is_live = deprecated_label_is_live(scope.name, modules);
    // The pods by node once: every node below looks only at its own.
    let mut by_node: HashMap<&str, Vec<&CachedPod>> = HashMap::new();
    for p in scope.pods {
        if let Some(n) = pod_node(p) {
            by_node.entry(n).or_default().push(p);
        }
    }
    nodes
        .iter()
        .map(|node| {
            let on_node = by_node
                .get(node.name_any().as_str())
                .map_or(&[][..], Vec::as_slice);
            let desired = desired_node_labels(scope, node, on_node);
            let current = current_node_labels(node, scope.namespace, scope.name);
            let annotations = desired_node_annotations(scope, node, on_node);
            let changed = desired != current
                || annotations != current_node_annotations(node, scope.namespace, scope.name);
            NodeLabelWrite {
                node: node.as_ref(),
                apply: (changed && node.metadata.deletion_timestamp.is_none()).then_some(desired),
                annotations,
                remove_deprecated: !deprecated_is_live && node.labels().contains_key(&deprecated),
            }
        })
        .filter(|w| w.apply.is_some() || w.remove_deprecated)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::testkit::*;
    use shared_api::labels::device_plugin_ready_label;

    fn scope<'a>(m: Option<&'a Module>, pods: &'a [Arc<CachedPod>]) -> LabelScope<'a> {
        LabelScope {
            namespace: NS,
            name: NAME,
            sequenced: m,
            pods,
            replace_on: None,
            drop_all: false,
        }
    }

    fn labels(pairs: &[(String, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.clone(), v.to_string()))
            .collect()
    }

    /// `(node, labels applied, deprecated removed)` of one write.
    type Write = (String, Option<BTreeMap<String, String>>, bool);

    fn writes(scope: &LabelScope<'_>, nodes: Vec<Node>, modules: &[Arc<Module>]) -> Vec<Write> {
        node_label_writes(scope, &cached(nodes), modules)
            .into_iter()
            .map(|w| (w.node.name_any(), w.apply, w.remove_deprecated))
            .collect()
    }

    #[test]
    fn labels_follow_the_pods_and_the_sequence() {
        let m = module();
        let (ready, dp, w, s) = (
            module_ready_label(NS, NAME),
            device_plugin_ready_label(NS, NAME),
            worker_version_label(NS, NAME),
            schedule_version_label(NS, NAME),
        );
        let pods = cached([
            loader_pod("n1").ready(),
            plugin_pod("n1").ready(),
            loader_pod("n2").ready(),
            plugin_pod("n2").ready(),
        ]);
        let all = labels(&[
            (ready.clone(), ""),
            (dp.clone(), ""),
            (w.clone(), ""),
            (s.clone(), ""),
        ]);
        let nodes = vec![
            node("n1").worker("").schedule(""),
            node("n2").worker("").schedule("").loaded().label(&dp, ""),
            node("n3"),
            node("n4").worker("").deleting(),
            node("n5").deselected(),
        ];
        assert_eq!(
            writes(&scope(Some(&m), &pods), nodes.clone(), &[]),
            vec![
                ("n1".into(), Some(all), false),
                // n2 carries them all already; n4 is going; n5 is not selected.
                (
                    "n3".into(),
                    Some(labels(&[(w.clone(), ""), (s.clone(), "")])),
                    false
                ),
            ]
        );
        // A Module without a loader is not sequenced: pod labels only.
        assert_eq!(
            writes(&scope(None, &pods), vec![node("n1")], &[]),
            vec![(
                "n1".into(),
                Some(labels(&[(ready.clone(), ""), (dp.clone(), "")])),
                false
            )]
        );
        // Cleanup once the pods are gone: every node carrying a label gets none.
        let mut sc = scope(Some(&m), &pods);
        sc.drop_all = true;
        assert_eq!(
            writes(&sc, nodes, &[]),
            vec![
                ("n1".into(), Some(BTreeMap::new()), false),
                ("n2".into(), Some(BTreeMap::new()), false),
            ]
        );
    }

    #[test]
    fn a_loaded_node_being_deselected_loses_the_schedule_label_first() {
        let m = module();
        let (ready, w) = (module_ready_label(NS, NAME), worker_version_label(NS, NAME));
        let pods = cached([loader_pod("n1").ready(), plugin_pod("n1").ready()]);
        let n1 = || node("n1").deselected().worker("").schedule("").loaded();
        assert_eq!(
            writes(&scope(Some(&m), &pods), vec![n1()], &[]),
            vec![(
                "n1".into(),
                Some(labels(&[
                    (ready.clone(), ""),
                    (w.clone(), ""),
                    (device_plugin_ready_label(NS, NAME), "")
                ])),
                false
            )],
            "schedule label off, the worker label stays while the plugin pod runs"
        );
        // The plugin pod is gone: the worker label goes, the ready label follows the pod.
        let pods = cached([loader_pod("n1").ready()]);
        let n1 = n1().unlabel(&schedule_version_label(NS, NAME));
        assert_eq!(
            writes(&scope(Some(&m), &pods), vec![n1], &[]),
            vec![("n1".into(), Some(labels(&[(ready, "")])), false)]
        );
    }

    #[test]
    fn replacing_takes_the_schedule_label_off_that_node_only() {
        let m = module();
        let pods = cached([loader_pod("n1").ready(), loader_pod("n2").ready()]);
        let mut sc = scope(Some(&m), &pods);
        sc.replace_on = Some("n2");
        let loaded = |n: &str| node(n).worker("").schedule("").loaded();
        assert_eq!(
            writes(&sc, vec![loaded("n1"), loaded("n2")], &[]),
            vec![(
                "n2".into(),
                Some(labels(&[
                    (module_ready_label(NS, NAME), ""),
                    (worker_version_label(NS, NAME), "")
                ])),
                false
            )]
        );
    }

    #[test]
    fn the_deprecated_label_goes_unless_another_module_owns_the_key() {
        let old = deprecated_ready_label(NAME);
        let n = node("n1").deselected().label(&old, "");
        assert_eq!(
            writes(&scope(None, &[]), vec![n.clone()], &cached([module()])),
            vec![("n1".into(), None, true)]
        );
        // A Module named `ns.m` elsewhere: its deprecated key is `ns/m`'s ready label.
        assert!(deprecated_label_is_live("ns.m", &cached([module()])));
        assert!(!deprecated_label_is_live(NAME, &cached([module()])));
        let mut sc = scope(None, &[]);
        sc.name = "ns.m";
        let n = node("n1").deselected().loaded();
        assert_eq!(writes(&sc, vec![n], &cached([module()])), vec![]);
    }

    #[test]
    fn the_boot_fence_withholds_ready_until_a_loader_ran_in_the_new_boot() {
        let runs = |r: &[&str]| r.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let fence = |allowed: bool, a: Option<&str>| BootFence {
            ready_allowed: allowed,
            annotation: a.map(str::to_string),
        };
        // No boot ID reported: no fence.
        assert_eq!(
            boot_fence(None, Some("b1 p/0"), &runs(&["p/0"])),
            fence(true, None)
        );
        // Nothing loaded in this kernel: whatever was recorded stays; after a reboot, no
        // Ready is believed (a loader of the kernel before it has not loaded this one).
        assert_eq!(
            boot_fence(Some("b1"), Some("b0 p/0"), &[]),
            fence(false, Some("b0 p/0"))
        );
        assert_eq!(
            boot_fence(Some("b1"), Some("b1 p/0"), &[]),
            fence(true, Some("b1 p/0"))
        );
        assert_eq!(boot_fence(Some("b1"), None, &[]), fence(true, None));
        // First sight: confirmed in this boot.
        assert_eq!(
            boot_fence(Some("b1"), None, &runs(&["p/0"])),
            fence(true, Some("b1 p/0"))
        );
        // Same boot, same run: nothing to write; a restarted container is recorded.
        assert_eq!(
            boot_fence(Some("b1"), Some("b1 p/0"), &runs(&["p/0"])),
            fence(true, Some("b1 p/0"))
        );
        assert_eq!(
            boot_fence(Some("b1"), Some("b1 p/0"), &runs(&["p/1"])),
            fence(true, Some("b1 p/1"))
        );
        // Rebooted, the pod still says Ready from before: withheld, the record kept.
        assert_eq!(
            boot_fence(Some("b2"), Some("b1 p/0"), &runs(&["p/0"])),
            fence(false, Some("b1 p/0"))
        );
        // The kubelet restarted the container (or the pod was replaced): believed again.
        assert_eq!(
            boot_fence(Some("b2"), Some("b1 p/0"), &runs(&["p/1"])),
            fence(true, Some("b2 p/1"))
        );
        assert_eq!(
            boot_fence(Some("b2"), Some("b1 p/0"), &runs(&["p/0", "q/0"])),
            fence(true, Some("b2 q/0"))
        );
        // A record we cannot read is replaced.
        assert_eq!(
            boot_fence(Some("b2"), Some("garbage"), &runs(&["p/0"])),
            fence(true, Some("b2 p/0"))
        );
    }

    #[test]
    fn after_a_reboot_the_ready_label_waits_for_the_loader_to_run_again() {
        let key = shared_api::labels::ready_boot_annotation(NS, NAME);
        let booted = |boot: &str, recorded: Option<&str>| {
            let mut n = node("n1").worker("").loaded();
            if let Some(i) = n.status.as_mut().and_then(|s| s.node_info.as_mut()) {
                i.boot_id = boot.into();
            }
            if let Some(r) = recorded {
                n.annotations_mut().insert(key.clone(), r.into());
            }
            n
        };
        let m = module();
        let ready_pod = loader_pod("n1").ready();
        let run0 = loader_run(&ready_pod);
        let pods = cached([ready_pod.clone()]);
        let one = |n: Node, pods: &[Arc<CachedPod>]| {
            let sc = scope(Some(&m), pods);
            node_label_writes(&sc, &cached([n]), &[])
                .into_iter()
                .map(|w| (w.apply, w.annotations))
                .collect::<Vec<_>>()
        };
        let ready = module_ready_label(NS, NAME);
        let w = worker_version_label(NS, NAME);
        let s = schedule_version_label(NS, NAME);
        // First sight of a loaded node: the boot is recorded along with the labels.
        let recorded = format!("b1 {run0}");
        assert_eq!(
            one(booted("b1", None), &pods),
            vec![(
                Some(labels(&[
                    (ready.clone(), ""),
                    (w.clone(), ""),
                    (s.clone(), "")
                ])),
                BTreeMap::from([(key.clone(), recorded.clone())])
            )]
        );
        // Rebooted: the stale Ready pod no longer makes the node ready (the device plugin's
        // nodeSelector needs the ready label); the record stays.
        assert_eq!(
            one(booted("b2", Some(&recorded)), &pods),
            vec![(
                Some(labels(&[(w.clone(), ""), (s.clone(), "")])),
                BTreeMap::from([(key.clone(), recorded.clone())])
            )]
        );
        // The kubelet restarted the loader and it is Ready: ready again, in boot b2.
        let mut restarted = ready_pod.clone();
        if let Some(c) = restarted
            .status
            .as_mut()
            .and_then(|s| s.container_statuses.first_mut())
        {
            c.restart_count = 1;
        }
        let run1 = loader_run(&restarted);
        assert_ne!(run0, run1);
        let mut n = booted("b2", Some(&recorded));
        n.labels_mut().remove(&ready);
        assert_eq!(
            one(n, &cached([restarted])),
            vec![(
                Some(labels(&[
                    (ready.clone(), ""),
                    (w.clone(), ""),
                    (s.clone(), "")
                ])),
                BTreeMap::from([(key.clone(), format!("b2 {run1}"))])
            )]
        );
    }

    /// After a reboot into another kernel, the previous kernel's loader, restarted by the
    /// kubelet and Ready, has not loaded the module into this kernel: the ready label waits
    /// for the new kernel's loader.
    #[test]
    fn after_a_kernel_change_only_the_new_kernels_loader_counts() {
        let key = shared_api::labels::ready_boot_annotation(NS, NAME);
        let ready = module_ready_label(NS, NAME);
        let old = loader_pod("n1").ready();
        let recorded = format!("b1 {}", loader_run(&old));
        let mut rebooted = node("n1").label(&ready, "").kernel("6.12.0-1-amd64");
        if let Some(i) = rebooted.status.as_mut().and_then(|s| s.node_info.as_mut()) {
            i.boot_id = "b2".into();
        }
        rebooted
            .annotations_mut()
            .insert(key.clone(), recorded.clone());
        let mut restarted = old.clone();
        if let Some(c) = restarted
            .status
            .as_mut()
            .and_then(|s| s.container_statuses.first_mut())
        {
            c.restart_count = 1;
        }
        let ready_on = |pods: &[Arc<CachedPod>]| {
            let sc = scope(None, pods);
            let on_node: Vec<&CachedPod> = pods.iter().map(AsRef::as_ref).collect();
            (
                desired_node_labels(&sc, &rebooted, &on_node).contains_key(&ready),
                desired_node_annotations(&sc, &rebooted, &on_node).remove(&key),
            )
        };
        assert_eq!(
            ready_on(&cached([restarted.clone()])),
            (false, Some(recorded.clone()))
        );
        // Only the previous kernel's loader, still Ready from before the reboot: not believed.
        assert_eq!(ready_on(&cached([old])), (false, Some(recorded)));
        // The new kernel's loader is Ready: ready, confirmed in b2 by its run.
        let mut new = loader_pod("n1").ready();
        new.set_label(TARGET_KERNEL_LABEL, &kernel_label_value("6.12.0-1-amd64"));
        new.metadata.uid = Some("uid-new".into());
        let run = loader_run(&new);
        assert_eq!(
            ready_on(&cached([restarted, new])),
            (true, Some(format!("b2 {run}")))
        );
    }
}
