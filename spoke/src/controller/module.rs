//! The Module reconciler: validate, render, apply the DaemonSets, delete orphans, keep the
//! Module's node labels, write status; on deletion clean up and release the finalizer.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::jiff::Timestamp;
use kmm_runtime::ErrorCategory;
use kmm_runtime::queue::Action as QueueAction;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Error as FinalizerError, Event as FinalizerEvent, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use serde_json::json;
use shared_api::Module;
use shared_api::conditions::{DEGRADED, READY, set_condition};
use shared_api::labels::{
    MODULE_FINALIZER, MODULE_NAME_LABEL, ROLE_LABEL, SPOKE_STATUS_MANAGER, deprecated_ready_label,
    worker_version_label,
};
use shared_api::module::ModuleStatus;
use shared_api::validate::{self, validate_module};
use tracing::Instrument;

use super::device_classes::{delete_device_classes, sync_device_classes};
use super::events::{MODULE_UNLOAD_FAILED, ModuleRef, NodeEvent};
use super::labels::{LabelScope, current_node_annotations, current_node_labels, node_label_writes};
use super::node_writes::ModuleWant;
use super::orphans::orphans;
use super::sequence::{
    StoppedLoader, is_plugin_pod, loader_replacement, replacement_may_go, stopped_loaders,
};
use super::status::{self, UNLOAD_FAILED};
use super::status_gate::StatusWrite;
use super::writes::{
    apply_daemonsets, delete_daemonset, delete_pod, hold_pod, hold_pods, release_pod,
};
use super::{Context, MODULE_CONTROLLER, ModuleKey, module_key, namespace_label};
use crate::cache::CachedPod;
use crate::error::ReconcileError;
use crate::render::nodes::{is_plugin_role, pod_node};
use crate::render::{ModulePlan, plan_module};

/// How often a deletion that waits for loader pods to unload looks again, at most (pod and
/// DaemonSet events bring it back sooner).
pub const UNLOAD_RECHECK: Duration = Duration::from_secs(30);

/// The Module reconciler, run by kube's `Controller`: [`finalizer()`] around [`apply`] and
/// [`finalize`], with the reconcile metrics and the per-Module backoff cleared on success.
pub async fn reconcile(module: Arc<Module>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let started = Instant::now();
    let key = module_key(&module);
    let span = tracing::info_span!("reconcile_module", module = %format!("{}/{}", key.0, key.1));
    let result = with_finalizer(module, &key, &ctx).instrument(span).await;
    // Waiting for pods to unload is a state: a reconcile like any other, not a failure.
    let failure = result
        .as_ref()
        .err()
        .filter(|e| !e.is_waiting())
        .map(ErrorCategory::category);
    ctx.metrics
        .controllers
        .observe(MODULE_CONTROLLER, started.elapsed(), failure);
    if failure.is_none() {
        ctx.module_backoff.reset(&key);
    }
    result
}

/// What follows a failed reconcile: the same delay again while deletion waits for loader
/// pods, else the Module's capped backoff (about 1 s doubling to 5 min).
pub fn error_policy(module: Arc<Module>, error: &ReconcileError, ctx: Arc<Context>) -> Action {
    if error.is_waiting() {
        return Action::requeue(UNLOAD_RECHECK.min(ctx.resync));
    }
    let key = module_key(&module);
    let delay = ctx.module_backoff.next(&key);
    tracing::warn!(controller = MODULE_CONTROLLER, module = %format!("{}/{}", key.0, key.1), error = %error, category = error.category(), retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

async fn with_finalizer(
    module: Arc<Module>,
    key: &ModuleKey,
    ctx: &Context,
) -> Result<Action, ReconcileError> {
    let (namespace, name) = key;
    let api: Api<Module> = Api::namespaced(ctx.client.clone(), namespace);
    let held = module.finalizers().iter().any(|f| f == MODULE_FINALIZER);
    let deleting = module.metadata.deletion_timestamp.is_some();
    let result = finalizer(&api, MODULE_FINALIZER, module, |event| async {
        match event {
            FinalizerEvent::Apply(m) => apply(&m, ctx).await,
            FinalizerEvent::Cleanup(m) => finalize(&m, ctx).await,
        }
    })
    .await;
    match result {
        Ok(action) => {
            // Added before the first apply, or removed after the clean-up.
            if held == deleting {
                ctx.metrics.write("finalizer");
            }
            if held && deleting {
                tracing::info!(module = %format!("{namespace}/{name}"), "Module cleaned up");
            }
            Ok(action)
        }
        Err(FinalizerError::ApplyFailed(e) | FinalizerError::CleanupFailed(e)) => Err(e),
        // Gone meanwhile: there is no finalizer left to hold.
        Err(FinalizerError::AddFinalizer(kube::Error::Api(s)))
        | Err(FinalizerError::RemoveFinalizer(kube::Error::Api(s)))
            if s.code == 404 =>
        {
            Ok(Action::await_change())
        }
        Err(source) => Err(ReconcileError::Finalizer {
            namespace: namespace.clone(),
            name: name.clone(),
            source: Box::new(source),
        }),
    }
}

/// A Module that is not being deleted (and holds the finalizer): render, apply the
/// DaemonSets, delete orphans, keep the node labels, write status.
async fn apply(module: &Module, ctx: &Context) -> Result<Action, ReconcileError> {
    let (namespace, name) = module_key(module);
    namespace_label::ensure(&namespace, true, ctx).await?;
    let nodes = ctx.stores.nodes.state();
    let owned = owned_daemonsets(module, ctx);
    let violations = validate_module(
        module,
        validate::Context {
            kubernetes_minor: ctx.kubernetes_minor,
        },
    );
    let plan = if violations.is_empty() {
        let mut plan = plan_module(module, nodes.iter().map(Arc::as_ref), &ctx.settings);
        apply_daemonsets(&plan, &owned, ctx).await?;
        sync_device_classes(module, &mut plan, ctx).await?;
        delete_orphans(module, &plan, &owned, ctx).await?;
        Some(plan)
    } else {
        // Bad input never deletes what works: existing DaemonSets are left as they are.
        tracing::info!(module = %format!("{namespace}/{name}"), violations = violations.len(), "invalid Module");
        None
    };

    sync_node_labels(&namespace, &name, Some(module), false, ctx).await?;
    let status = compute_status(module, &violations, plan.as_ref(), &nodes, ctx);
    let differs = module.status.as_ref() != Some(&status);
    let new_spec =
        module.metadata.generation != module.status.as_ref().and_then(|s| s.observed_generation);
    match ctx.status_gate.decide(
        &(namespace, name),
        differs,
        new_spec,
        std::time::Instant::now(),
    ) {
        StatusWrite::Unchanged => Ok(Action::requeue(ctx.resync)),
        StatusWrite::Now => {
            write_status(module, status, ctx).await?;
            Ok(Action::requeue(ctx.resync))
        }
        StatusWrite::After(wait) => Ok(Action::requeue(wait.min(ctx.resync))),
    }
}

/// What is left of a Module that is gone from the cache without our finalizer (removed by
/// hand, or deleted while no agent ran): its DaemonSets and node labels. kube's `Controller`
/// reconciles only objects in its store, so these keys come through the orphan sweep
/// ([`super::sweep`]). A Module present again is the `Controller`'s.
#[tracing::instrument(name = "sweep_module", skip_all, fields(module = %format!("{}/{}", key.0, key.1)))]
pub async fn cleanup_absent(key: &ModuleKey, ctx: &Context) -> Result<QueueAction, ReconcileError> {
    let (namespace, name) = key;
    if ctx
        .stores
        .modules
        .get(&ObjectRef::<Module>::new(name).within(namespace))
        .is_none()
    {
        cleanup(key, ctx, None).await?;
    }
    Ok(QueueAction::AwaitChange)
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
    let orphaned = orphans(module, plan, owned);
    if orphaned.is_empty() {
        return Ok(());
    }
    let pods = module_pods(
        &module.namespace().unwrap_or_default(),
        &module.name_any(),
        ctx,
    );
    for ds in orphaned {
        hold_pods(&pods_of(ds, &pods), ctx).await?;
        delete_daemonset(ds, ctx).await?;
    }
    Ok(())
}

/// The pods of `ds` among the Module's `pods`: those carrying all its labels (the agent's
/// DaemonSets select their pods by exactly their own labels; the cache keeps no owner
/// references).
fn pods_of(ds: &DaemonSet, pods: &[Arc<CachedPod>]) -> Vec<Arc<CachedPod>> {
    let want = ds.labels();
    if want.is_empty() {
        return Vec::new();
    }
    pods.iter()
        .filter(|p| want.iter().all(|(k, v)| p.labels().get(k) == Some(v)))
        .cloned()
        .collect()
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
    // Said to the node writer, which writes each node once for every Module and the kernel.
    let key = (namespace.to_string(), name.to_string());
    let worker = worker_version_label(namespace, name);
    for write in node_label_writes(&scope, &nodes, &ctx.stores.modules.state()) {
        // The worker label leaving (or changing) stops the node's loader: held first.
        let worker_now = write.node.labels().get(&worker);
        if worker_now.is_some()
            && write
                .apply
                .as_ref()
                .is_some_and(|d| d.get(&worker) != worker_now)
        {
            let node_name = write.node.name_any();
            let here: Vec<Arc<CachedPod>> = pods
                .iter()
                .filter(|p| pod_node(p) == Some(node_name.as_str()))
                .cloned()
                .collect();
            hold_pods(&here, ctx).await?;
        }
        ctx.node_writes.module(
            &write.node.name_any(),
            &key,
            ModuleWant {
                labels: write.apply,
                annotations: write.annotations,
                remove: if write.remove_deprecated {
                    vec![deprecated.clone()]
                } else {
                    Vec::new()
                },
            },
        );
    }
    // The chosen node's loader goes once its device plugin is gone.
    if let (Some(m), Some(pod)) = (sequenced, replacing.and_then(|r| r.next)) {
        let node = pod_node(&pod).unwrap_or_default();
        let cached = ctx.stores.nodes.get(&ObjectRef::new(node));
        if replacement_may_go(m, &pod, cached.as_deref(), &pods) {
            tracing::info!(module = %format!("{namespace}/{name}"), node, pod = %pod.name_any(), "replacing an outdated loader pod");
            hold_pod(&pod, ctx).await?;
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
    pods: &[Arc<CachedPod>],
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
fn report_unload_failure(module: Option<&Module>, pod: &CachedPod, why: String, ctx: &Context) {
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
        modules: vec![ModuleRef {
            namespace: pod.namespace().unwrap_or_default(),
            name: pod
                .labels()
                .get(MODULE_NAME_LABEL)
                .cloned()
                .unwrap_or_default(),
            uid: module.and_then(|m| m.uid()),
        }],
        reboot: false,
        boot: None,
        detail: why,
    });
}

/// `node: message` of every stopped loader pod of the Module whose unload failed.
fn unload_failures(namespace: &str, name: &str, ctx: &Context) -> Vec<String> {
    status::unload_failures(&module_pods(namespace, name, ctx))
}

/// The Module's loader and device-plugin pods in the cache.
fn module_pods(namespace: &str, name: &str, ctx: &Context) -> Vec<Arc<CachedPod>> {
    ctx.stores.pods.state_filter(|p| {
        p.namespace().as_deref() == Some(namespace)
            && p.labels().get(MODULE_NAME_LABEL).map(String::as_str) == Some(name)
    })
}

/// Deletion (`finalizer()`'s clean-up): delete the DaemonSets (their pods unload through
/// preStop) and, once the loader pods are gone, drop the node labels; `finalizer()` then
/// releases the finalizer. Until then [`ReconcileError::StillUnloading`] keeps it.
async fn finalize(module: &Module, ctx: &Context) -> Result<Action, ReconcileError> {
    let key = module_key(module);
    if !cleanup(&key, ctx, Some(module)).await? {
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
        // Keeps the finalizer; pod and DaemonSet events bring us back.
        let (namespace, name) = key;
        return Err(ReconcileError::StillUnloading { namespace, name });
    }
    // The namespace's last Module: its deletion is no longer refused.
    let (namespace, name) = &key;
    let names: Vec<String> = ctx
        .stores
        .modules
        .state_filter(|m| m.namespace().as_deref() == Some(namespace.as_str()))
        .iter()
        .map(|m| m.name_any())
        .collect();
    if !namespace_label::others_left(name, &names) {
        namespace_label::ensure(namespace, false, ctx).await?;
    }
    ctx.status_gate.forget(&key);
    Ok(Action::await_change())
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
    let is_plugin =
        |l: &BTreeMap<String, String>| is_plugin_role(l.get(ROLE_LABEL).map(String::as_str));
    // Device plugins first: a plugin holds its driver's devices, and the kernel refuses to
    // unload a module in use ("Module … is in use"). Loaders go once no plugin pod is left.
    let plugins_left =
        daemonsets.iter().any(|d| is_plugin(d.labels())) || pods.iter().any(|p| is_plugin_pod(p));
    for ds in &daemonsets {
        if ds.metadata.deletion_timestamp.is_none() && (is_plugin(ds.labels()) || !plugins_left) {
            // Loaders stop with their DaemonSet: held first, to read what the unload did.
            hold_pods(&pods_of(ds, &pods), ctx).await?;
            delete_daemonset(ds, ctx).await?;
        }
    }
    // DeviceClasses are cluster-scoped: no owner reference deletes them with the Module.
    let had_dra = module
        .is_none_or(|m| m.spec.dra.is_some() || m.status.as_ref().is_some_and(|s| s.dra.is_some()));
    if had_dra {
        delete_device_classes(namespace, name, ctx).await?;
    }
    let pods_left = pods.len();
    // Labels follow the pods while they terminate (a loader whose unload failed keeps them:
    // the module is still in the kernel); once they are gone none may remain.
    sync_node_labels(namespace, name, module, pods_left == 0, ctx).await?;
    // Done once the node writer has taken every label and annotation of the Module off.
    let marks_left = ctx.node_writes.pending_for(key)
        || ctx.stores.nodes.state().iter().any(|n| {
            n.metadata.deletion_timestamp.is_none()
                && (!current_node_labels(n, namespace, name).is_empty()
                    || !current_node_annotations(n, namespace, name).is_empty())
        });
    Ok(daemonsets.is_empty() && pods_left == 0 && !marks_left)
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
