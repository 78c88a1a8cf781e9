//! The Module reconciler: validate, render, apply the DaemonSets, delete orphans, keep the
//! Module's node labels, write status; on deletion clean up and release the finalizer.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::jiff::Timestamp;
use kmm_runtime::queue::Action;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use serde_json::json;
use shared_api::Module;
use shared_api::conditions::{DEGRADED, PROGRESSING, READY, VALID, set_condition};
use shared_api::labels::{
    LOADER_POD_FINALIZER, MODULE_FINALIZER, MODULE_NAME_LABEL, MODULE_VERSION_LABEL,
    ROLE_DEVICE_PLUGIN, ROLE_LABEL, ROLE_LOADER, SPOKE_DAEMONSET_MANAGER, SPOKE_STATUS_MANAGER,
    TARGET_KERNEL_LABEL, deprecated_ready_label, is_module_node_label, kernel_label_value,
    module_ready_label, schedule_version_label, version_module_label, worker_version_label,
};
use shared_api::module::{DaemonSetStatus, ModuleStatus};
use shared_api::validate::{self, validate_module};

use super::events::{MODULE_UNLOAD_FAILED, NodeEvent};
use super::{Context, ModuleKey};
use crate::error::ReconcileError;
use crate::render::loader::loader_daemonset_name;
use crate::render::nodes::{
    loader_unload_failed, node_kernel, node_labels, pod_node, pod_ready, pod_stopped,
    targeted_nodes,
};
use crate::render::{ModulePlan, TEMPLATE_HASH_ANNOTATION, module_version, plan_module, spec_hash};

/// Condition reason while a stopped loader left its module in the kernel.
const UNLOAD_FAILED: &str = "UnloadFailed";

/// The field manager of one Module's node labels: several Modules co-own labels on a node,
/// and dropping a Module's labels is an apply of none under its manager.
pub fn node_label_manager(namespace: &str, name: &str) -> String {
    format!("kmm-spoke/{namespace}.{name}")
}

#[tracing::instrument(name = "reconcile_module", skip_all, fields(module = %format!("{}/{}", key.0, key.1)))]
pub async fn reconcile(key: &ModuleKey, ctx: &Context) -> Result<Action, ReconcileError> {
    let (namespace, name) = key;
    let Some(module) = ctx
        .stores
        .modules
        .get(&ObjectRef::<Module>::new(name).within(namespace))
    else {
        // Gone without our finalizer (or removed by hand): drop what is left of it.
        cleanup(key, ctx, None).await?;
        return Ok(Action::AwaitChange);
    };
    if module.metadata.deletion_timestamp.is_some() {
        return finalize(&module, key, ctx).await;
    }
    if !module.finalizers().iter().any(|f| f == MODULE_FINALIZER) {
        add_finalizer(&module, ctx).await?;
    }

    let nodes = ctx.stores.nodes.state();
    let owned = owned_daemonsets(&module, ctx);
    let violations = validate_module(
        &module,
        validate::Context {
            kubernetes_minor: ctx.kubernetes_minor,
        },
    );
    let plan = if violations.is_empty() {
        let plan = plan_module(&module, nodes.iter().map(Arc::as_ref), &ctx.settings);
        apply_daemonsets(&plan, &owned, ctx).await?;
        delete_orphans(&module, &plan, &owned, ctx).await?;
        Some(plan)
    } else {
        // Bad input never deletes what works: existing DaemonSets are left as they are.
        tracing::info!(module = %format!("{namespace}/{name}"), violations = violations.len(), "invalid Module");
        None
    };

    sync_node_labels(namespace, name, Some(&module), false, ctx).await?;
    let status = compute_status(&module, &violations, plan.as_ref(), &nodes, ctx);
    write_status(&module, status, ctx).await?;
    Ok(Action::Requeue(ctx.resync))
}

/// The DaemonSets of this Module in the cache (by owner label; owned by this Module's uid
/// when they carry an owner reference).
fn owned_daemonsets(module: &Module, ctx: &Context) -> Vec<Arc<DaemonSet>> {
    let ns = module.namespace().unwrap_or_default();
    let name = module.name_any();
    let uid = module.uid();
    ctx.stores.daemonsets.state_filter(|ds| {
        ds.namespace().as_deref() == Some(ns.as_str())
            && ds.labels().get(MODULE_NAME_LABEL) == Some(&name)
            && (ds.owner_references().is_empty()
                || ds
                    .owner_references()
                    .iter()
                    .any(|o| Some(&o.uid) == uid.as_ref()))
    })
}

async fn apply_daemonsets(
    plan: &ModulePlan,
    owned: &[Arc<DaemonSet>],
    ctx: &Context,
) -> Result<(), ReconcileError> {
    for desired in plan.loaders.iter().chain(plan.device_plugin.as_ref()) {
        let name = desired.name_any();
        let ns = desired.namespace().unwrap_or_default();
        let current = owned.iter().find(|d| d.name_any() == name);
        if current.is_some_and(|c| {
            spec_hash(c) == spec_hash(desired) && c.metadata.deletion_timestamp.is_none()
        }) {
            continue;
        }
        let mut body = serde_json::to_value(desired).map_err(|source| ReconcileError::Encode {
            what: "DaemonSet",
            source,
        })?;
        body["apiVersion"] = json!("apps/v1");
        body["kind"] = json!("DaemonSet");
        let api: Api<DaemonSet> = Api::namespaced(ctx.client.clone(), &ns);
        api.patch(
            &name,
            &PatchParams::apply(SPOKE_DAEMONSET_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await
        .map_err(|source| ReconcileError::ApplyDaemonSet {
            namespace: ns.clone(),
            name: name.clone(),
            source,
        })?;
        ctx.metrics.write("daemonset-apply");
        tracing::info!(daemonset = %format!("{ns}/{name}"), "applied DaemonSet");
    }
    Ok(())
}

/// Whether a DaemonSet's status says it targets no node for its current spec.
fn targets_no_node(ds: &DaemonSet) -> bool {
    let Some(st) = ds.status.as_ref() else {
        return false;
    };
    st.desired_number_scheduled == 0
        && st.observed_generation.unwrap_or(0) >= ds.metadata.generation.unwrap_or(0)
}

async fn delete_orphans(
    module: &Module,
    plan: &ModulePlan,
    owned: &[Arc<DaemonSet>],
    ctx: &Context,
) -> Result<(), ReconcileError> {
    let wanted = plan.names();
    let version = module_version(module);
    for ds in owned {
        let name = ds.name_any();
        if wanted.contains(&name) || ds.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let labels = ds.labels();
        let ds_version = labels.get(MODULE_VERSION_LABEL).map(String::as_str);
        let role = labels.get(ROLE_LABEL).map(String::as_str);
        if role == Some(ROLE_LOADER)
            && ds_version == version
            && labels
                .get(TARGET_KERNEL_LABEL)
                .is_some_and(|k| plan.failed_kernels.contains_key(k))
        {
            continue; // its kernel failed to render this time: keep what works
        }
        let older_version = version.is_some() && ds_version.is_some() && ds_version != version;
        if role == Some(ROLE_DEVICE_PLUGIN)
            && module.spec.device_plugin.is_some()
            && older_version
            && !targets_no_node(ds)
        {
            continue;
        }
        if role == Some(ROLE_LOADER) && older_version && !targets_no_node(ds) {
            continue; // ordered upgrade: nodes still labelled for the old version keep it
        }
        delete_daemonset(ds, ctx).await?;
    }
    Ok(())
}

async fn delete_daemonset(ds: &DaemonSet, ctx: &Context) -> Result<(), ReconcileError> {
    let name = ds.name_any();
    let ns = ds.namespace().unwrap_or_default();
    let api: Api<DaemonSet> = Api::namespaced(ctx.client.clone(), &ns);
    match api.delete(&name, &DeleteParams::background()).await {
        Ok(_) => {
            ctx.metrics.write("daemonset-delete");
            tracing::info!(daemonset = %format!("{ns}/{name}"), "deleted DaemonSet");
            Ok(())
        }
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(source) => Err(ReconcileError::DeleteDaemonSet {
            namespace: ns,
            name,
            source,
        }),
    }
}

/// Bring this Module's labels on every node in line with its pods and the kernel
/// (`drop_all`: none): the ready labels from the loader pods (a stopped loader whose unload
/// failed keeps them), the device-plugin label, and the agent's worker and schedule labels
/// that sequence loaders and device plugins ([`worker_and_schedule`]). Also releases stopped
/// loader pods, replaces outdated ones one node at a time, and removes the deprecated
/// `<name>.ready` label where seen.
pub async fn sync_node_labels(
    namespace: &str,
    name: &str,
    module: Option<&Module>,
    drop_all: bool,
    ctx: &Context,
) -> Result<(), ReconcileError> {
    let pods: Vec<Arc<Pod>> = ctx.stores.pods.state_filter(|p| {
        p.namespace().as_deref() == Some(namespace)
            && p.labels().get(MODULE_NAME_LABEL).map(String::as_str) == Some(name)
    });
    release_stopped_loaders(module, &pods, ctx).await?;
    let sequenced = module.filter(|m| m.spec.module_loader.is_some());
    let replacing = sequenced.map(|m| loader_replacement(m, &pods, ctx));
    if let Some(r) = &replacing {
        // Outdated loader pods that are not ready hold nothing: replaced at once.
        for p in &r.idle {
            delete_pod(p, ctx).await?;
        }
    }
    let replace_on = replacing
        .as_ref()
        .and_then(|r| r.next.as_ref())
        .and_then(|p| pod_node(p).map(str::to_string));
    let deprecated = deprecated_ready_label(name);
    // Never remove a key that is some other Module's current ready label.
    let deprecated_is_live = ctx.stores.modules.state().iter().any(|m| {
        module_ready_label(&m.namespace().unwrap_or_default(), &m.name_any()) == deprecated
    });
    for node in ctx.stores.nodes.state() {
        let node_name = node.name_any();
        let mut desired = if drop_all {
            BTreeMap::new()
        } else {
            node_labels(namespace, name, &node_name, pods.iter().map(Arc::as_ref))
        };
        if let Some(m) = sequenced.filter(|_| !drop_all) {
            let on_node: Vec<&Pod> = pods
                .iter()
                .map(Arc::as_ref)
                .filter(|p| pod_node(p) == Some(node_name.as_str()))
                .collect();
            let replacing_here = replace_on.as_deref() == Some(node_name.as_str());
            let (w, sched) = worker_and_schedule(m, &node, &desired, &on_node, replacing_here);
            if let Some(w) = w {
                desired.insert(worker_version_label(namespace, name), w);
            }
            if let Some(sched) = sched {
                desired.insert(schedule_version_label(namespace, name), sched);
            }
        }
        let current: BTreeMap<String, String> = node
            .labels()
            .iter()
            .filter(|(k, _)| is_module_node_label(k, namespace, name))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if desired != current && node.metadata.deletion_timestamp.is_none() {
            apply_node_labels(&node, namespace, name, &desired, ctx).await?;
        }
        if !deprecated_is_live && node.labels().contains_key(&deprecated) {
            remove_labels(&node_name, std::slice::from_ref(&deprecated), ctx).await?;
        }
    }
    // The chosen node's loader goes once its device plugin is gone (its schedule label is
    // off the node and no plugin pod is left there).
    if let (Some(m), Some(pod)) = (sequenced, replacing.and_then(|r| r.next)) {
        let node = pod_node(&pod).unwrap_or_default();
        let skey = schedule_version_label(namespace, name);
        let schedule_off = ctx
            .stores
            .nodes
            .get(&ObjectRef::new(node))
            .is_none_or(|n| !n.labels().contains_key(&skey));
        let plugin_left = pods.iter().any(|p| {
            pod_node(p) == Some(node)
                && p.labels().get(ROLE_LABEL).map(String::as_str) == Some(ROLE_DEVICE_PLUGIN)
        });
        if m.spec.device_plugin.is_none() || (schedule_off && !plugin_left) {
            tracing::info!(module = %format!("{namespace}/{name}"), node, pod = %pod.name_any(), "replacing an outdated loader pod");
            delete_pod(&pod, ctx).await?;
        }
    }
    Ok(())
}

/// The worker label (`version-worker-pod`, the loader DaemonSets' nodeSelector) and schedule
/// label (`version-schedule-pod`, the device plugin's) this node should carry now — upstream's
/// ordered-upgrade state table, applied to every Module with a loader: the device plugin
/// leaves first (schedule label off), the loader only once no plugin pod is left on the node
/// (worker label off: its pod stops and unloads), the next loader only once the kernel no
/// longer has the module (ready label gone), the plugin again once the worker label is the
/// one wanted.
fn worker_and_schedule(
    module: &Module,
    node: &Node,
    desired: &BTreeMap<String, String>,
    pods_on_node: &[&Pod],
    replacing_here: bool,
) -> (Option<String>, Option<String>) {
    let (ns, name) = (module.namespace().unwrap_or_default(), module.name_any());
    let target = (module.metadata.deletion_timestamp.is_none()
        && !targeted_nodes(module, std::iter::once(node)).is_empty())
    .then(|| match module_version(module) {
        None => Some(String::new()),
        Some(_) => node
            .labels()
            .get(&version_module_label(&ns, &name))
            .cloned(),
    })
    .flatten();
    let has_plugin = module.spec.device_plugin.is_some();
    let loaded = desired.contains_key(&module_ready_label(&ns, &name));
    let plugin_on_node = pods_on_node
        .iter()
        .any(|p| p.labels().get(ROLE_LABEL).map(String::as_str) == Some(ROLE_DEVICE_PLUGIN));
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
struct Replacement {
    /// Outdated pods that are not ready: they hold nothing, replaced at once.
    idle: Vec<Arc<Pod>>,
    /// The one Ready outdated pod to replace now: only while every other loader pod of the
    /// Module is Ready and none is stopping, so at most one node unloads at a time.
    next: Option<Arc<Pod>>,
}

fn loader_replacement(module: &Module, pods: &[Arc<Pod>], ctx: &Context) -> Replacement {
    let (ns, name) = (module.namespace().unwrap_or_default(), module.name_any());
    let loaders: Vec<&Arc<Pod>> = pods
        .iter()
        .filter(|p| p.labels().get(ROLE_LABEL).map(String::as_str) == Some(ROLE_LOADER))
        .collect();
    let outdated = |p: &Pod| -> bool {
        let l = p.labels();
        let Some(kernel) = l.get(TARGET_KERNEL_LABEL) else {
            return false;
        };
        let ds_name = loader_daemonset_name(
            &name,
            kernel,
            l.get(MODULE_VERSION_LABEL).map(String::as_str),
        );
        let want = ctx
            .stores
            .daemonsets
            .get(&ObjectRef::new(&ds_name).within(&ns))
            .and_then(|d| d.annotations().get(TEMPLATE_HASH_ANNOTATION).cloned());
        let have = p.annotations().get(TEMPLATE_HASH_ANNOTATION);
        want.is_some_and(|w| have != Some(&w))
    };
    let live = |p: &&&Arc<Pod>| p.metadata.deletion_timestamp.is_none();
    let idle: Vec<Arc<Pod>> = loaders
        .iter()
        .filter(live)
        .filter(|p| !pod_ready(p) && outdated(p))
        .map(|p| (*p).clone())
        .collect();
    let busy = loaders
        .iter()
        .any(|p| p.metadata.deletion_timestamp.is_some() || (!pod_ready(p) && !outdated(p)));
    let skey = schedule_version_label(&ns, &name);
    let mut candidates: Vec<&Arc<Pod>> = loaders
        .iter()
        .filter(live)
        .filter(|p| pod_ready(p) && outdated(p))
        .copied()
        .collect();
    candidates.sort_by_key(|p| pod_node(p).unwrap_or_default().to_string());
    // One already under way (its node's schedule label taken off) goes on first.
    let started = candidates.iter().find(|p| {
        module.spec.device_plugin.is_some()
            && pod_node(p)
                .and_then(|n| ctx.stores.nodes.get(&ObjectRef::new(n)))
                .is_some_and(|n| !n.labels().contains_key(&skey))
    });
    let next = match started {
        Some(p) => Some((*p).clone()),
        None if !busy => candidates.first().map(|p| (*p).clone()),
        None => None,
    };
    Replacement { idle, next }
}

/// Stopped loader pods: released (finalizer removed) when the kernel no longer has their
/// module or their node is gone; kept, with a Warning event, when their unload failed.
async fn release_stopped_loaders(
    module: Option<&Module>,
    pods: &[Arc<Pod>],
    ctx: &Context,
) -> Result<(), ReconcileError> {
    for pod in pods {
        if pod.labels().get(ROLE_LABEL).map(String::as_str) != Some(ROLE_LOADER)
            || pod.metadata.deletion_timestamp.is_none()
            || !pod.finalizers().iter().any(|f| f == LOADER_POD_FINALIZER)
        {
            continue;
        }
        let node_gone = pod_node(pod)
            .is_none_or(|n| ctx.stores.nodes.get(&ObjectRef::<Node>::new(n)).is_none());
        if let Some(why) = loader_unload_failed(pod).filter(|_| !node_gone) {
            let first = pod.uid().is_some_and(|uid| {
                ctx.unload_failures_reported
                    .lock()
                    .map(|mut s| s.insert(uid))
                    .unwrap_or(false)
            });
            if first {
                let node = pod_node(pod).unwrap_or_default().to_string();
                tracing::warn!(pod = %pod.name_any(), node, reason = %why, "loader stopped with its module still loaded");
                ctx.events.send(NodeEvent {
                    node_uid: ctx
                        .stores
                        .nodes
                        .get(&ObjectRef::<Node>::new(&node))
                        .and_then(|n| n.uid()),
                    node,
                    reason: MODULE_UNLOAD_FAILED,
                    module_namespace: pod.namespace().unwrap_or_default(),
                    module_name: pod
                        .labels()
                        .get(MODULE_NAME_LABEL)
                        .cloned()
                        .unwrap_or_default(),
                    module_uid: module.and_then(|m| m.uid()),
                    detail: why,
                });
            }
            continue;
        }
        if pod_stopped(pod) || node_gone {
            release_pod(pod, ctx).await?;
        }
    }
    Ok(())
}

async fn release_pod(pod: &Pod, ctx: &Context) -> Result<(), ReconcileError> {
    let Some(index) = pod
        .finalizers()
        .iter()
        .position(|f| f == LOADER_POD_FINALIZER)
    else {
        return Ok(());
    };
    let ns = pod.namespace().unwrap_or_default();
    let name = pod.name_any();
    let patch: json_patch::Patch = serde_json::from_value(json!([
        { "op": "test", "path": format!("/metadata/finalizers/{index}"), "value": LOADER_POD_FINALIZER },
        { "op": "remove", "path": format!("/metadata/finalizers/{index}") }
    ]))
    .map_err(|source| ReconcileError::Encode {
        what: "pod finalizer patch",
        source,
    })?;
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    match api
        .patch(&name, &PatchParams::default(), &Patch::<()>::Json(patch))
        .await
    {
        Ok(_) => {
            ctx.metrics.write("pod-finalizer");
            tracing::debug!(pod = %format!("{ns}/{name}"), "released a stopped loader pod");
            Ok(())
        }
        // Gone, or changed meanwhile: the next event brings us back.
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 422 || s.code == 409 => Ok(()),
        Err(source) => Err(ReconcileError::Pod {
            namespace: ns,
            name,
            source,
        }),
    }
}

async fn delete_pod(pod: &Pod, ctx: &Context) -> Result<(), ReconcileError> {
    let ns = pod.namespace().unwrap_or_default();
    let name = pod.name_any();
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let dp = DeleteParams {
        preconditions: pod.uid().map(|uid| kube::api::Preconditions {
            uid: Some(uid),
            resource_version: None,
        }),
        ..Default::default()
    };
    match api.delete(&name, &dp).await {
        Ok(_) => {
            ctx.metrics.write("pod-delete");
            Ok(())
        }
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(()),
        Err(source) => Err(ReconcileError::Pod {
            namespace: ns,
            name,
            source,
        }),
    }
}

/// `node: message` of every stopped loader pod of the Module whose unload failed.
fn unload_failures(namespace: &str, name: &str, ctx: &Context) -> Vec<String> {
    ctx.stores
        .pods
        .state_filter(|p| {
            p.namespace().as_deref() == Some(namespace)
                && p.labels().get(MODULE_NAME_LABEL).map(String::as_str) == Some(name)
        })
        .iter()
        .filter_map(|p| {
            loader_unload_failed(p)
                .map(|why| format!("{}: {why}", pod_node(p).unwrap_or("<unscheduled>")))
        })
        .collect()
}

async fn apply_node_labels(
    node: &Node,
    namespace: &str,
    name: &str,
    desired: &BTreeMap<String, String>,
    ctx: &Context,
) -> Result<(), ReconcileError> {
    let node_name = node.name_any();
    let mut meta = json!({ "name": node_name });
    if !desired.is_empty() {
        meta["labels"] = json!(desired);
    }
    // The uid makes a write to a node that was replaced under the same name fail.
    if let Some(uid) = node.uid() {
        meta["uid"] = json!(uid);
    }
    let body = json!({ "apiVersion": "v1", "kind": "Node", "metadata": meta });
    let api: Api<Node> = Api::all(ctx.client.clone());
    let manager = node_label_manager(namespace, name);
    let result = api
        .patch(
            &node_name,
            &PatchParams::apply(&manager).force(),
            &Patch::Apply(&body),
        )
        .await
        .map_err(|source| ReconcileError::NodeLabels {
            node: node_name.clone(),
            source,
        })?;
    ctx.metrics.write("node-labels");
    // Labels of ours that someone else also owns survive an apply; take them off directly.
    let leftover: Vec<String> = result
        .labels()
        .keys()
        .filter(|k| is_module_node_label(k, namespace, name) && !desired.contains_key(*k))
        .cloned()
        .collect();
    if !leftover.is_empty() {
        remove_labels(&node_name, &leftover, ctx).await?;
    }
    tracing::debug!(node = %node_name, module = %format!("{namespace}/{name}"), labels = ?desired, "node labels applied");
    Ok(())
}

async fn remove_labels(node: &str, keys: &[String], ctx: &Context) -> Result<(), ReconcileError> {
    let labels: serde_json::Map<String, serde_json::Value> = keys
        .iter()
        .map(|k| (k.clone(), serde_json::Value::Null))
        .collect();
    let api: Api<Node> = Api::all(ctx.client.clone());
    api.patch(
        node,
        &PatchParams::default(),
        &Patch::Merge(&json!({ "metadata": { "labels": labels } })),
    )
    .await
    .map_err(|source| ReconcileError::NodeLabels {
        node: node.to_string(),
        source,
    })?;
    ctx.metrics.write("node-labels");
    Ok(())
}

async fn add_finalizer(module: &Module, ctx: &Context) -> Result<(), ReconcileError> {
    let ns = module.namespace().unwrap_or_default();
    let name = module.name_any();
    let patch = if module.finalizers().is_empty() {
        json!([
            { "op": "test", "path": "/metadata/resourceVersion", "value": module.resource_version() },
            { "op": "add", "path": "/metadata/finalizers", "value": [MODULE_FINALIZER] }
        ])
    } else {
        json!([
            { "op": "test", "path": "/metadata/resourceVersion", "value": module.resource_version() },
            { "op": "add", "path": "/metadata/finalizers/-", "value": MODULE_FINALIZER }
        ])
    };
    json_patch_module(&ns, &name, patch, ctx).await
}

async fn remove_finalizer(module: &Module, ctx: &Context) -> Result<(), ReconcileError> {
    let ns = module.namespace().unwrap_or_default();
    let name = module.name_any();
    let Some(index) = module
        .finalizers()
        .iter()
        .position(|f| f == MODULE_FINALIZER)
    else {
        return Ok(());
    };
    let patch = json!([
        { "op": "test", "path": format!("/metadata/finalizers/{index}"), "value": MODULE_FINALIZER },
        { "op": "remove", "path": format!("/metadata/finalizers/{index}") }
    ]);
    json_patch_module(&ns, &name, patch, ctx).await
}

async fn json_patch_module(
    ns: &str,
    name: &str,
    patch: serde_json::Value,
    ctx: &Context,
) -> Result<(), ReconcileError> {
    let patch: json_patch::Patch =
        serde_json::from_value(patch).map_err(|source| ReconcileError::Encode {
            what: "finalizer patch",
            source,
        })?;
    let api: Api<Module> = Api::namespaced(ctx.client.clone(), ns);
    match api
        .patch(name, &PatchParams::default(), &Patch::<()>::Json(patch))
        .await
    {
        Ok(_) => {
            ctx.metrics.write("finalizer");
            Ok(())
        }
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(source) => Err(ReconcileError::Finalizer {
            namespace: ns.to_string(),
            name: name.to_string(),
            source,
        }),
    }
}

/// Deletion: delete the DaemonSets (their pods unload through preStop), wait for the loader
/// pods to be gone, drop the node labels, then release the finalizer.
async fn finalize(
    module: &Module,
    key: &ModuleKey,
    ctx: &Context,
) -> Result<Action, ReconcileError> {
    if !module.finalizers().iter().any(|f| f == MODULE_FINALIZER) {
        return Ok(Action::AwaitChange);
    }
    if !cleanup(key, ctx, Some(module)).await? {
        let failures = unload_failures(&key.0, &key.1, ctx);
        if !failures.is_empty() {
            let mut status = module.status.clone().unwrap_or_default();
            let msg = format!(
                "deletion waits: the module is still loaded on {}",
                failures.join("; ")
            );
            let generation = module.metadata.generation;
            let now = Timestamp::now();
            set_condition(
                &mut status.conditions,
                DEGRADED,
                true,
                UNLOAD_FAILED,
                &msg,
                generation,
                now,
            );
            set_condition(
                &mut status.conditions,
                READY,
                false,
                UNLOAD_FAILED,
                &msg,
                generation,
                now,
            );
            write_status(module, status, ctx).await?;
        }
        // Pod and DaemonSet events bring us back; the requeue is a safety net.
        return Ok(Action::Requeue(
            std::time::Duration::from_secs(30).min(ctx.resync),
        ));
    }
    remove_finalizer(module, ctx).await?;
    tracing::info!(module = %format!("{}/{}", key.0, key.1), "Module cleaned up");
    Ok(Action::AwaitChange)
}

/// Delete the Module's DaemonSets and labels; `true` once nothing of it is left.
async fn cleanup(
    key: &ModuleKey,
    ctx: &Context,
    module: Option<&Module>,
) -> Result<bool, ReconcileError> {
    let (namespace, name) = key;
    let daemonsets = match module {
        Some(m) => owned_daemonsets(m, ctx),
        None => ctx.stores.daemonsets.state_filter(|ds| {
            ds.namespace().as_deref() == Some(namespace.as_str())
                && ds.labels().get(MODULE_NAME_LABEL) == Some(name)
        }),
    };
    let pods = ctx.stores.pods.state_filter(|p| {
        p.namespace().as_deref() == Some(namespace.as_str())
            && p.labels().get(MODULE_NAME_LABEL) == Some(name)
    });
    let is_plugin = |l: &BTreeMap<String, String>| {
        l.get(ROLE_LABEL).map(String::as_str) == Some(ROLE_DEVICE_PLUGIN)
    };
    // Device plugins first: a plugin holds its driver's devices, and the kernel refuses to
    // unload a module in use ("Module … is in use"). Loaders go once no plugin pod is left.
    let plugins_left = daemonsets.iter().any(|d| is_plugin(d.labels()))
        || pods.iter().any(|p| is_plugin(p.labels()));
    for ds in &daemonsets {
        if ds.metadata.deletion_timestamp.is_none() && (is_plugin(ds.labels()) || !plugins_left) {
            delete_daemonset(ds, ctx).await?;
        }
    }
    let pods_left = pods.len();
    // Labels follow the pods while they terminate (a loader whose unload failed keeps them:
    // the module is still in the kernel); once they are gone none may remain.
    sync_node_labels(namespace, name, module, pods_left == 0, ctx).await?;
    Ok(daemonsets.is_empty() && pods_left == 0)
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
fn sum_status(daemonsets: &[&Arc<DaemonSet>], at_least_one: bool) -> (i32, i32) {
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

fn compute_status(
    module: &Module,
    violations: &[validate::Violation],
    plan: Option<&ModulePlan>,
    nodes: &[Arc<Node>],
    ctx: &Context,
) -> ModuleStatus {
    let (namespace, name) = (module.namespace().unwrap_or_default(), module.name_any());
    let generation = module.metadata.generation;
    let now = Timestamp::now();
    let mut status = module.status.clone().unwrap_or_default();
    let owned = owned_daemonsets(module, ctx);
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
    status.dra = None;
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
    if missing == 0 && pending.is_empty() && available >= expected {
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
    if module.spec.dra.is_some() {
        problems.push(
            "spec.dra: kmm-spoke does not run DRA drivers; nothing was created for it".into(),
        );
    }
    let unloads = unload_failures(&namespace, &name, ctx);
    problems.extend(
        unloads
            .iter()
            .map(|f| format!("module still loaded after its loader stopped on {f}")),
    );
    problems.extend(failing_pods(&namespace, &name, ctx));
    let reason = if !unloads.is_empty() {
        UNLOAD_FAILED
    } else if !plan.failed_kernels.is_empty() {
        "MappingFailed"
    } else if module.spec.dra.is_some() {
        "DRANotSupported"
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

/// Loader and device-plugin pods of the Module that are failing, as `node: reason: message`.
fn failing_pods(namespace: &str, name: &str, ctx: &Context) -> Vec<String> {
    const BAD: [&str; 6] = [
        "ErrImagePull",
        "ImagePullBackOff",
        "CrashLoopBackOff",
        "InvalidImageName",
        "CreateContainerConfigError",
        "RunContainerError",
    ];
    let mut out = BTreeSet::new();
    for pod in ctx.stores.pods.state() {
        if pod.namespace().as_deref() != Some(namespace)
            || pod.labels().get(MODULE_NAME_LABEL).map(String::as_str) != Some(name)
            || pod_ready(&pod)
            || loader_unload_failed(&pod).is_some()
        {
            continue;
        }
        let node = pod_node(&pod).unwrap_or("<unscheduled>").to_string();
        let statuses = pod
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.clone())
            .unwrap_or_default();
        for c in statuses {
            let state = c.state.unwrap_or_default();
            // A crash loop is about why the container last ended (the kernel's words, for a
            // loader), not about the back-off.
            let last_exit = c
                .last_state
                .and_then(|l| l.terminated)
                .filter(|t| t.exit_code != 0)
                .map(|t| {
                    format!(
                        "; last exited {}: {}",
                        t.exit_code,
                        t.message.or(t.reason).unwrap_or_default().trim_end()
                    )
                })
                .unwrap_or_default();
            let problem = match (state.waiting, state.terminated) {
                (Some(w), _) if w.reason.as_deref().is_some_and(|r| BAD.contains(&r)) => {
                    Some(format!(
                        "{}: {}{last_exit}",
                        w.reason.unwrap_or_default(),
                        w.message.unwrap_or_default()
                    ))
                }
                (_, Some(t)) if t.exit_code != 0 => Some(format!(
                    "exited {}: {}",
                    t.exit_code,
                    t.message.or(t.reason).unwrap_or_default()
                )),
                _ => None,
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

async fn write_status(
    module: &Module,
    status: ModuleStatus,
    ctx: &Context,
) -> Result<(), ReconcileError> {
    if module.status.as_ref() == Some(&status) {
        return Ok(());
    }
    let ns = module.namespace().unwrap_or_default();
    let name = module.name_any();
    let body = json!({
        "apiVersion": Module::api_version(&()),
        "kind": Module::kind(&()),
        "metadata": { "name": name },
        "status": status,
    });
    let api: Api<Module> = Api::namespaced(ctx.client.clone(), &ns);
    match api
        .patch_status(
            &name,
            &PatchParams::apply(SPOKE_STATUS_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await
    {
        Ok(_) => {
            ctx.metrics.write("status");
            Ok(())
        }
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(source) => Err(ReconcileError::Status {
            namespace: ns,
            name,
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::DaemonSetStatus as DsStatus;

    fn ds(generation: i64, status: Option<(i64, i32, i32)>) -> Arc<DaemonSet> {
        let mut d = DaemonSet::default();
        d.metadata.generation = Some(generation);
        d.status = status.map(|(observed, desired, available)| DsStatus {
            observed_generation: Some(observed),
            desired_number_scheduled: desired,
            number_available: Some(available),
            ..Default::default()
        });
        Arc::new(d)
    }

    fn versioned_module() -> Module {
        let mut m: Module = serde_json::from_value(serde_json::json!({
            "apiVersion": "kmm.sigs.x-k8s.io/v1beta1", "kind": "Module",
            "metadata": {"name": "m", "namespace": "ns"},
            "spec": {
                "selector": {"w": ""},
                "moduleLoader": {"container": {
                    "version": "2.0",
                    "modprobe": {"moduleName": "m"},
                    "kernelMappings": [{"regexp": ".*", "containerImage": "r/m:1"}]}},
                "devicePlugin": {"container": {"image": "r/dp:1"}}
            }
        }))
        .unwrap();
        m.metadata.uid = Some("u".into());
        m
    }

    fn node_with(labels: &[(&str, &str)]) -> Node {
        let mut n = Node::default();
        n.metadata.name = Some("n".into());
        n.metadata.labels = Some(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        n
    }

    fn plugin_pod() -> Pod {
        let mut p = Pod::default();
        p.metadata.labels = Some(BTreeMap::from([(
            ROLE_LABEL.to_string(),
            ROLE_DEVICE_PLUGIN.to_string(),
        )]));
        p
    }

    /// A node relabelled directly from 1.0 to 2.0 while 1.0 is loaded and its plugin runs:
    /// plugin off first, then the 1.0 loader, then 2.0 once the kernel is free, then the
    /// plugin again — never two steps at once.
    #[test]
    fn a_direct_relabel_is_sequenced_plugin_loader_loader_plugin() {
        let m = versioned_module();
        let (user, w, s) = (
            version_module_label("ns", "m"),
            worker_version_label("ns", "m"),
            schedule_version_label("ns", "m"),
        );
        let ready = BTreeMap::from([(module_ready_label("ns", "m"), String::new())]);
        let none = BTreeMap::new();
        let plugin = plugin_pod();
        // 1.0 loaded, plugin running; the user relabels to 2.0.
        let n = node_with(&[("w", ""), (&user, "2.0"), (&w, "1.0"), (&s, "1.0")]);
        assert_eq!(
            worker_and_schedule(&m, &n, &ready, &[&plugin], false),
            (Some("1.0".into()), None),
            "the plugin goes first; the loader stays while a plugin pod is there"
        );
        let n = node_with(&[("w", ""), (&user, "2.0"), (&w, "1.0")]);
        assert_eq!(
            worker_and_schedule(&m, &n, &ready, &[&plugin], false),
            (Some("1.0".into()), None)
        );
        // The plugin pod is gone: the 1.0 loader goes (its pod unloads).
        assert_eq!(
            worker_and_schedule(&m, &n, &ready, &[], false),
            (None, None),
            "no new loader while the kernel still has the module"
        );
        let n = node_with(&[("w", ""), (&user, "2.0")]);
        assert_eq!(
            worker_and_schedule(&m, &n, &ready, &[], false),
            (None, None)
        );
        // Unloaded: 2.0 may load, and its plugin may follow once it is ready.
        assert_eq!(
            worker_and_schedule(&m, &n, &none, &[], false),
            (Some("2.0".into()), Some("2.0".into()))
        );
        // Deselected: the plugin first again.
        let n = node_with(&[(&user, "2.0"), (&w, "2.0"), (&s, "2.0")]);
        assert_eq!(
            worker_and_schedule(&m, &n, &ready, &[&plugin], false),
            (Some("2.0".into()), None)
        );
        // Replacing the loader on this node: the plugin leaves, the loader label stays.
        let n = node_with(&[("w", ""), (&user, "2.0"), (&w, "2.0"), (&s, "2.0")]);
        assert_eq!(
            worker_and_schedule(&m, &n, &ready, &[&plugin], true),
            (Some("2.0".into()), None)
        );
    }

    #[test]
    fn an_unobserved_daemonset_is_never_read_as_nothing_to_do() {
        // Fresh: no status yet.
        assert_eq!(sum_status(&[&ds(1, None)], false), (1, 0));
        // A status of the previous generation.
        assert_eq!(sum_status(&[&ds(2, Some((1, 0, 0)))], false), (1, 0));
        // Observed: the controller's word counts, zero included...
        assert_eq!(sum_status(&[&ds(2, Some((2, 0, 0)))], false), (0, 0));
        // ...but not for loaders: one whose node is not yet labelled still has a node to load.
        assert_eq!(sum_status(&[&ds(2, Some((2, 0, 0)))], true), (1, 0));
        assert_eq!(
            sum_status(&[&ds(1, Some((1, 3, 2))), &ds(1, Some((1, 1, 1)))], true),
            (4, 3)
        );
    }
}
