//! The Module reconciler's writes to the API, one call each: apply and delete DaemonSets,
//! release and delete loader pods, apply and remove node labels. Each counts its write in
//! the metrics and reads "already gone" as done where that is the wanted end state.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde_json::json;
use shared_api::labels::{LOADER_POD_FINALIZER, SPOKE_DAEMONSET_MANAGER, is_module_node_label};

use super::Context;
use super::module::node_label_manager;
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

pub async fn release_pod(pod: &Pod, ctx: &Context) -> Result<(), ReconcileError> {
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

pub async fn delete_pod(pod: &Pod, ctx: &Context) -> Result<(), ReconcileError> {
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

pub async fn apply_node_labels(
    node: &Node,
    namespace: &str,
    name: &str,
    desired: &BTreeMap<String, String>,
    annotations: &BTreeMap<String, String>,
    ctx: &Context,
) -> Result<(), ReconcileError> {
    let node_name = node.name_any();
    let mut meta = json!({ "name": node_name });
    if !desired.is_empty() {
        meta["labels"] = json!(desired);
    }
    if !annotations.is_empty() {
        meta["annotations"] = json!(annotations);
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

pub async fn remove_labels(
    node: &str,
    keys: &[String],
    ctx: &Context,
) -> Result<(), ReconcileError> {
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
