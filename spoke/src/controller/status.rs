//! A Module's status as a pure function of the Module, its render, the nodes and the
//! DaemonSets and pods it owns: the DaemonSet counts and the conditions `Valid`, `Ready`,
//! `Progressing` and `Degraded` (with the reason that matters most, `UnloadFailed` first).

use std::collections::BTreeSet;
use std::sync::Arc;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use shared_api::Module;
use shared_api::conditions::{DEGRADED, PROGRESSING, READY, VALID, set_condition};
use shared_api::labels::{
    ROLE_DEVICE_PLUGIN, ROLE_DRA, ROLE_LABEL, ROLE_LOADER, TARGET_KERNEL_LABEL, kernel_label_value,
    version_module_label,
};
use shared_api::module::{DaemonSetStatus, ModuleStatus};
use shared_api::validate;

use crate::cache::CachedPod;
use crate::cache::pod::CachedContainerState;
use crate::render::nodes::{
    loader_unload_failed, node_kernel, pod_node, pod_ready, targeted_nodes,
};
use crate::render::{ModulePlan, module_version};

/// Condition reason while a stopped loader left its module in the kernel.
pub const UNLOAD_FAILED: &str = "UnloadFailed";
/// Condition reason of a Module applied on a spoke whose mapping for a node's kernel has
/// `build` or `sign`: those run only on the hub.
pub const BUILD_UNSUPPORTED_ON_SPOKE: &str = "BuildUnsupportedOnSpoke";

/// Why nothing loads on the kernels in `kernels` (see [`BUILD_UNSUPPORTED_ON_SPOKE`]).
pub fn needs_hub_message<'a>(kernels: impl IntoIterator<Item = &'a String>) -> String {
    let kernels: Vec<&str> = kernels.into_iter().map(String::as_str).collect();
    format!(
        "the kernel mapping for {} has build or sign, which kmm-spoke does not run: images are built and signed only on the hub; apply this module as a ManagedClusterModule (hub.kmm.sigs.x-k8s.io) on the hub, or give the mapping an image that is already built and signed and no build or sign section",
        kernels.join(", ")
    )
}

/// Desired and available pods over the DaemonSets. A DaemonSet the DaemonSet controller has not
/// yet observed (no status, or one for an older generation) counts at least one desired pod:
/// the agent writes a DaemonSet only for a kernel some selected node runs, and a fresh
/// DaemonSet's `desiredNumberScheduled` of 0 would otherwise read as "nothing to do" and make
/// the Module look available before anything loaded.
///
/// A loader DaemonSet always counts at least one desired pod (`at_least_one`), observed or
/// not: its pods run only on nodes the agent has labelled for it (the ordered-upgrade worker
/// label), so before that label is set the DaemonSet desires nothing although a selected node
/// runs its kernel.
pub fn sum_status(daemonsets: &[&Arc<DaemonSet>], at_least_one: bool) -> (i32, i32) {
    daemonsets.iter().fold((0, 0), |(d, a), ds| {
        let st = ds.status.as_ref();
        let observed = st.is_some_and(|s| {
            s.observed_generation.unwrap_or(0) >= ds.metadata.generation.unwrap_or(0)
        });
        let desired = st.map_or(0, |s| s.desired_number_scheduled);
        (
            d + if observed && !at_least_one {
                desired
            } else {
                desired.max(1)
            },
            a + st.and_then(|s| s.number_available).unwrap_or(0),
        )
    })
}

/// The Module's status: `owned` are the DaemonSets it owns (by owner label), `pods` its
/// loader and device-plugin pods, `now` the time for condition transitions. Without a `plan`
/// (an invalid spec) only the counts and the validity conditions are set.
pub fn module_status(
    module: &Module,
    violations: &[validate::Violation],
    plan: Option<&ModulePlan>,
    nodes: &[Arc<Node>],
    owned: &[Arc<DaemonSet>],
    pods: &[Arc<CachedPod>],
    now: Timestamp,
) -> ModuleStatus {
    let (namespace, name) = (module.namespace().unwrap_or_default(), module.name_any());
    let generation = module.metadata.generation;
    let mut status = module.status.clone().unwrap_or_default();
    let live: Vec<&Arc<DaemonSet>> = owned
        .iter()
        .filter(|d| d.metadata.deletion_timestamp.is_none())
        .collect();
    let role =
        |d: &&Arc<DaemonSet>, r: &str| d.labels().get(ROLE_LABEL).map(String::as_str) == Some(r);
    let loaders: Vec<&Arc<DaemonSet>> = live
        .iter()
        .filter(|d| role(d, ROLE_LOADER))
        .copied()
        .collect();
    let plugins: Vec<&Arc<DaemonSet>> = live
        .iter()
        .filter(|d| role(d, ROLE_DEVICE_PLUGIN))
        .copied()
        .collect();
    let drivers: Vec<&Arc<DaemonSet>> =
        live.iter().filter(|d| role(d, ROLE_DRA)).copied().collect();
    let targeted = targeted_nodes(module, nodes.iter().map(Arc::as_ref)).len() as i32;

    status.module_loader = module.spec.module_loader.as_ref().map(|_| {
        let (desired, available) = sum_status(&loaders, true);
        DaemonSetStatus {
            nodes_matching_selector_number: targeted,
            desired_number: desired,
            available_number: available,
        }
    });
    status.device_plugin = module.spec.device_plugin.as_ref().map(|_| {
        let (desired, available) = sum_status(&plugins, false);
        DaemonSetStatus {
            nodes_matching_selector_number: targeted,
            desired_number: desired,
            available_number: available,
        }
    });
    status.dra = module.spec.dra.as_ref().map(|_| {
        let (desired, available) = sum_status(&drivers, false);
        DaemonSetStatus {
            nodes_matching_selector_number: targeted,
            desired_number: desired,
            available_number: available,
        }
    });
    status.observed_generation = generation;

    let conds = &mut status.conditions;
    if !violations.is_empty() {
        let msg = violations
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        set_condition(conds, VALID, false, "InvalidSpec", &msg, generation, now);
        set_condition(
            conds,
            READY,
            false,
            "InvalidSpec",
            "the spec is invalid; existing DaemonSets are left as they are",
            generation,
            now,
        );
        set_condition(
            conds,
            PROGRESSING,
            false,
            "InvalidSpec",
            "",
            generation,
            now,
        );
        set_condition(conds, DEGRADED, true, "InvalidSpec", &msg, generation, now);
        return status;
    }
    set_condition(conds, VALID, true, "Valid", "", generation, now);
    let Some(plan) = plan else { return status };

    // Progress: every DaemonSet of the current render has all its pods available.
    let desired_names = plan.names();
    let current: Vec<&&Arc<DaemonSet>> = live
        .iter()
        .filter(|d| desired_names.contains(&d.name_any()))
        .collect();
    let missing = desired_names.len().saturating_sub(current.len());
    let pending: Vec<String> = current
        .iter()
        .filter(|d| {
            let st = d.status.clone().unwrap_or_default();
            st.observed_generation.unwrap_or(0) < d.metadata.generation.unwrap_or(0)
                || st.number_available.unwrap_or(0) < st.desired_number_scheduled
                || st.updated_number_scheduled.unwrap_or(0) < st.desired_number_scheduled
        })
        .map(|d| d.name_any())
        .collect();
    // The nodes that should run the current version: targeted, with a mapped kernel and,
    // for ordered upgrade, labelled by the user for this version.
    let mapped: BTreeSet<String> = plan
        .loaders
        .iter()
        .filter_map(|d| d.labels().get(TARGET_KERNEL_LABEL).cloned())
        .collect();
    let version = module_version(module);
    let version_key = version_module_label(&namespace, &name);
    let expected = targeted_nodes(module, nodes.iter().map(Arc::as_ref))
        .into_iter()
        .filter(|n| node_kernel(n).is_some_and(|k| mapped.contains(&kernel_label_value(k))))
        .filter(|n| {
            version.is_none_or(|v| n.labels().get(&version_key).map(String::as_str) == Some(v))
        })
        .count() as i32;
    let current_loaders: Vec<&Arc<DaemonSet>> = current
        .iter()
        .map(|d| **d)
        .filter(|d| role(d, ROLE_LOADER))
        .collect();
    let (_, available) = sum_status(&current_loaders, false);
    let mut info =
        format!("module loaded on {available} of {expected} nodes ({targeted} selected)");
    if !plan.unmapped_kernels.is_empty() {
        let kernels: Vec<&str> = plan.unmapped_kernels.iter().map(String::as_str).collect();
        info.push_str(&format!("; no kernel mapping for {}", kernels.join(", ")));
    }
    if !plan.needs_hub.is_empty() {
        info.push_str(&format!(
            "; not loaded on kernels {} (build or sign)",
            plan.needs_hub
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if !plan.needs_hub.is_empty() && missing == 0 && pending.is_empty() && available >= expected {
        let msg = format!("{}; {info}", needs_hub_message(&plan.needs_hub));
        set_condition(
            conds,
            READY,
            false,
            BUILD_UNSUPPORTED_ON_SPOKE,
            &msg,
            generation,
            now,
        );
        set_condition(
            conds,
            PROGRESSING,
            false,
            BUILD_UNSUPPORTED_ON_SPOKE,
            "",
            generation,
            now,
        );
    } else if missing == 0 && pending.is_empty() && available >= expected {
        set_condition(conds, READY, true, "Available", &info, generation, now);
        set_condition(conds, PROGRESSING, false, "Available", "", generation, now);
    } else {
        let msg = if pending.is_empty() {
            format!("creating DaemonSets; {info}")
        } else {
            format!("waiting for {}; {info}", pending.join(", "))
        };
        set_condition(conds, READY, false, "Progressing", &msg, generation, now);
        set_condition(
            conds,
            PROGRESSING,
            true,
            "Progressing",
            &msg,
            generation,
            now,
        );
    }

    let mut problems: Vec<String> = plan.failed_kernels.values().cloned().collect();
    problems.extend(plan.failed_device_classes.values().cloned());
    if !plan.needs_hub.is_empty() {
        problems.push(needs_hub_message(&plan.needs_hub));
    }
    let unloads = unload_failures(pods);
    problems.extend(
        unloads
            .iter()
            .map(|f| format!("module still loaded after its loader stopped on {f}")),
    );
    problems.extend(failing_pods(pods));
    let reason = if !unloads.is_empty() {
        UNLOAD_FAILED
    } else if !plan.failed_kernels.is_empty() {
        "MappingFailed"
    } else if !plan.failed_device_classes.is_empty() {
        "DeviceClassFailed"
    } else if !plan.needs_hub.is_empty() {
        BUILD_UNSUPPORTED_ON_SPOKE
    } else {
        "PodsFailing"
    };
    if problems.is_empty() {
        set_condition(conds, DEGRADED, false, "AsExpected", "", generation, now);
    } else {
        set_condition(
            conds,
            DEGRADED,
            true,
            reason,
            &problems.join("; "),
            generation,
            now,
        );
    }
    status
}

/// The pods among `pods` (a Module's loaders and device plugins) that are failing, as `node: reason: message`.
pub fn failing_pods(pods: &[Arc<CachedPod>]) -> Vec<String> {
    const BAD: [&str; 6] = [
        "ErrImagePull",
        "ImagePullBackOff",
        "CrashLoopBackOff",
        "InvalidImageName",
        "CreateContainerConfigError",
        "RunContainerError",
    ];
    let mut out = BTreeSet::new();
    for pod in pods {
        if pod_ready(pod) || loader_unload_failed(pod).is_some() {
            continue;
        }
        let node = pod_node(pod).unwrap_or("<unscheduled>").to_string();
        for c in pod.containers() {
            // A crash loop is about why the container last ended (the kernel's words, for a
            // loader), not about the back-off.
            let last_exit = c
                .last_state
                .as_ref()
                .and_then(CachedContainerState::terminated)
                .filter(|(code, _)| *code != 0)
                .map(|(code, why)| format!("; last exited {code}: {}", why.trim_end()))
                .unwrap_or_default();
            let problem = match &c.state {
                Some(CachedContainerState::Waiting { reason, message })
                    if reason.as_deref().is_some_and(|r| BAD.contains(&r)) =>
                {
                    Some(format!(
                        "{}: {}{last_exit}",
                        reason.as_deref().unwrap_or_default(),
                        message.as_deref().unwrap_or_default()
                    ))
                }
                Some(t) => t
                    .terminated()
                    .filter(|(code, _)| *code != 0)
                    .map(|(code, why)| format!("exited {code}: {why}")),
                None => None,
            };
            if let Some(p) = problem {
                out.insert(format!(
                    "pod {} on {node}: {}",
                    pod.name_any(),
                    p.trim_end_matches([':', ' '])
                ));
            }
        }
    }
    out.into_iter().take(10).collect()
}

/// `node: message` of every stopped loader pod among `pods` whose unload failed.
pub fn unload_failures(pods: &[Arc<CachedPod>]) -> Vec<String> {
    pods.iter()
        .filter_map(|p| {
            loader_unload_failed(p)
                .map(|why| format!("{}: {why}", pod_node(p).unwrap_or("<unscheduled>")))
        })
        .collect()
}

#[cfg(test)]
mod tests;
