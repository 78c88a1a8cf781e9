//! The Module reconciler: validate, render, apply the DaemonSets, delete orphans, keep the
//! Module's node labels, write status; on deletion clean up and release the finalizer.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::jiff::Timestamp;
use kmm_runtime::queue::Action;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use serde_json::json;
use shared_api::Module;
use shared_api::conditions::{DEGRADED, READY, set_condition};
use shared_api::labels::{
    MODULE_FINALIZER, MODULE_NAME_LABEL, ROLE_DEVICE_PLUGIN, ROLE_LABEL, SPOKE_STATUS_MANAGER,
    deprecated_ready_label,
};
use shared_api::module::ModuleStatus;
use shared_api::validate::{self, validate_module};

use super::events::{MODULE_UNLOAD_FAILED, NodeEvent};
use super::labels::{LabelScope, node_label_writes};
use super::orphans::orphans;
use super::sequence::{StoppedLoader, loader_replacement, replacement_may_go, stopped_loaders};
use super::status::{self, UNLOAD_FAILED};
use super::writes::{
    apply_daemonsets, apply_node_labels, delete_daemonset, delete_pod, release_pod, remove_labels,
};
use super::{Context, ModuleKey};
use crate::error::ReconcileError;
use crate::render::nodes::pod_node;
use crate::render::{ModulePlan, plan_module};

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

async fn delete_orphans(
    module: &Module,
    plan: &ModulePlan,
    owned: &[Arc<DaemonSet>],
    ctx: &Context,
) -> Result<(), ReconcileError> {
    for ds in orphans(module, plan, owned) {
        delete_daemonset(ds, ctx).await?;
    }
    Ok(())
}

/// Bring this Module's labels on every node in line with its pods and the kernel
/// (`drop_all`: none): the ready labels from the loader pods (a stopped loader whose unload
/// failed keeps them), the device-plugin label, and the agent's worker and schedule labels
/// that sequence loaders and device plugins ([`super::sequence::worker_and_schedule`]). Also
/// releases stopped loader pods, replaces outdated ones one node at a time, and removes the
/// deprecated `<name>.ready` label where seen. The choices are made in [`super::sequence`]
/// and [`super::labels`]; this function writes them.
pub async fn sync_node_labels(
    namespace: &str,
    name: &str,
    module: Option<&Module>,
    drop_all: bool,
    ctx: &Context,
) -> Result<(), ReconcileError> {
    let pods = module_pods(namespace, name, ctx);
    release_stopped_loaders(module, &pods, ctx).await?;
    let sequenced = module.filter(|m| m.spec.module_loader.is_some());
    let replacing = sequenced.map(|m| {
        loader_replacement(
            m,
            &pods,
            |ds| {
                ctx.stores
                    .daemonsets
                    .get(&ObjectRef::new(ds).within(namespace))
            },
            |n| ctx.stores.nodes.get(&ObjectRef::new(n)),
        )
    });
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
    let scope = LabelScope {
        namespace,
        name,
        sequenced,
        pods: &pods,
        replace_on: replace_on.as_deref(),
        drop_all,
    };
    let nodes = ctx.stores.nodes.state();
    let deprecated = deprecated_ready_label(name);
    for write in node_label_writes(&scope, &nodes, &ctx.stores.modules.state()) {
        if let Some(desired) = &write.apply {
            apply_node_labels(write.node, namespace, name, desired, ctx).await?;
        }
        if write.remove_deprecated {
            let node_name = write.node.name_any();
            remove_labels(&node_name, std::slice::from_ref(&deprecated), ctx).await?;
        }
    }
    // The chosen node's loader goes once its device plugin is gone.
    if let (Some(m), Some(pod)) = (sequenced, replacing.and_then(|r| r.next)) {
        let node = pod_node(&pod).unwrap_or_default();
        let cached = ctx.stores.nodes.get(&ObjectRef::new(node));
        if replacement_may_go(m, &pod, cached.as_deref(), &pods) {
            tracing::info!(module = %format!("{namespace}/{name}"), node, pod = %pod.name_any(), "replacing an outdated loader pod");
            delete_pod(&pod, ctx).await?;
        }
    }
    Ok(())
}

/// Stopped loader pods: released (finalizer removed) when the kernel no longer has their
/// module or their node is gone; kept, with a Warning event, when their unload failed
/// ([`stopped_loaders`]).
async fn release_stopped_loaders(
    module: Option<&Module>,
    pods: &[Arc<Pod>],
    ctx: &Context,
) -> Result<(), ReconcileError> {
    let node_exists = |n: &str| ctx.stores.nodes.get(&ObjectRef::<Node>::new(n)).is_some();
    for (pod, fate) in stopped_loaders(pods, node_exists) {
        match fate {
            StoppedLoader::UnloadFailed(why) => report_unload_failure(module, pod, why, ctx),
            StoppedLoader::Release => release_pod(pod, ctx).await?,
        }
    }
    Ok(())
}

/// A Warning event on the node, once per loader pod, for a stopped loader whose unload failed.
fn report_unload_failure(module: Option<&Module>, pod: &Pod, why: String, ctx: &Context) {
    let first = pod.uid().is_some_and(|uid| {
        ctx.unload_failures_reported
            .lock()
            .map(|mut s| s.insert(uid))
            .unwrap_or(false)
    });
    if !first {
        return;
    }
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

/// `node: message` of every stopped loader pod of the Module whose unload failed.
fn unload_failures(namespace: &str, name: &str, ctx: &Context) -> Vec<String> {
    status::unload_failures(&module_pods(namespace, name, ctx))
}

/// The Module's loader and device-plugin pods in the cache.
fn module_pods(namespace: &str, name: &str, ctx: &Context) -> Vec<Arc<Pod>> {
    ctx.stores.pods.state_filter(|p| {
        p.namespace().as_deref() == Some(namespace)
            && p.labels().get(MODULE_NAME_LABEL).map(String::as_str) == Some(name)
    })
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

/// The Module's status from the caches ([`status::module_status`]).
fn compute_status(
    module: &Module,
    violations: &[validate::Violation],
    plan: Option<&ModulePlan>,
    nodes: &[Arc<Node>],
    ctx: &Context,
) -> ModuleStatus {
    let (namespace, name) = (module.namespace().unwrap_or_default(), module.name_any());
    status::module_status(
        module,
        violations,
        plan,
        nodes,
        &owned_daemonsets(module, ctx),
        &module_pods(&namespace, &name, ctx),
        Timestamp::now(),
    )
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
