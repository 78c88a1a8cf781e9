//! The Module reconciler's writes to the API, one call each: apply and delete DaemonSets,
//! release and delete loader pods (node labels go through [`super::node_writes`]). Each
//! counts its write in the metrics and reads "already gone" as done where that is the wanted
//! end state.

use std::sync::Arc;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde_json::json;
use shared_api::labels::{LOADER_POD_FINALIZER, SPOKE_DAEMONSET_MANAGER};

use super::Context;
use super::sequence::needs_hold;
use crate::cache::CachedPod;
use crate::error::ReconcileError;
use crate::render::{ModulePlan, spec_hash};

pub async fn apply_daemonsets(
    plan: &ModulePlan,
    owned: &[Arc<DaemonSet>],
    ctx: &Context,
) -> Result<(), ReconcileError> {
    for desired in plan
        .loaders
        .iter()
        .chain(plan.device_plugin.as_ref())
        .chain(plan.dra.as_ref())
    {
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

pub async fn delete_daemonset(ds: &DaemonSet, ctx: &Context) -> Result<(), ReconcileError> {
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

pub async fn release_pod(pod: &CachedPod, ctx: &Context) -> Result<(), ReconcileError> {
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

/// Hold a loader pod with the agent's finalizer before the agent stops it ([`needs_hold`]):
/// a merge patch of the pod's finalizers plus ours, on the condition that the pod is still the
/// version the cache holds (`resourceVersion`; a pod changed meanwhile is retried, so nobody
/// else's finalizer is lost). A pod gone meanwhile needs no hold.
pub async fn hold_pod(pod: &CachedPod, ctx: &Context) -> Result<(), ReconcileError> {
    if !needs_hold(pod) {
        return Ok(());
    }
    let ns = pod.namespace().unwrap_or_default();
    let name = pod.name_any();
    let mut finalizers = pod.finalizers().to_vec();
    finalizers.push(LOADER_POD_FINALIZER.to_string());
    let patch = json!({
        "metadata": {
            "resourceVersion": pod.resource_version(),
            "finalizers": finalizers,
        },
    });
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    match api
        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => {
            ctx.metrics.write("pod-finalizer");
            tracing::debug!(pod = %format!("{ns}/{name}"), "holding a loader pod before it stops");
            Ok(())
        }
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(source) => Err(ReconcileError::Pod {
            namespace: ns,
            name,
            source,
        }),
    }
}

/// [`hold_pod`] each of `pods` that needs it.
pub async fn hold_pods(pods: &[Arc<CachedPod>], ctx: &Context) -> Result<(), ReconcileError> {
    for p in pods {
        hold_pod(p, ctx).await?;
    }
    Ok(())
}

pub async fn delete_pod(pod: &CachedPod, ctx: &Context) -> Result<(), ReconcileError> {
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
