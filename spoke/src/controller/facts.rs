//! Kernel facts: every node labelled with its kernel, and the kernel ClusterClaim(s).

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::Node;
use kmm_runtime::queue::Action;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use serde_json::json;
use shared_api::ClusterClaim;
use shared_api::labels::{
    KERNEL_LABEL, SPOKE_CLAIM_MANAGER, SPOKE_NODE_MANAGER, kernel_label_value,
};
use shared_api::ocm::claim_part_index;

use super::Context;
use crate::error::ReconcileError;
use crate::render::nodes::{distinct_kernels, kernel_claims, node_kernel};

#[tracing::instrument(name = "reconcile_kernel_facts", skip_all)]
pub async fn reconcile(ctx: &Context) -> Result<Action, ReconcileError> {
    let nodes = ctx.stores.nodes.state();
    tracing::debug!(nodes = nodes.len(), "reconciling kernel facts");
    ctx.metrics.nodes.set(nodes.len() as i64);
    for node in &nodes {
        if node.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let Some(kernel) = node_kernel(node) else {
            continue;
        };
        let want = kernel_label_value(kernel);
        if node.labels().get(KERNEL_LABEL) != Some(&want) {
            label_kernel(node, &want, ctx).await?;
        }
    }
    ctx.metrics
        .kernels
        .set(distinct_kernels(nodes.iter().map(|n| n.as_ref())).len() as i64);

    let Some(claims) = ctx.stores.claims.as_ref() else {
        return Ok(Action::Requeue(ctx.resync));
    };
    let desired = kernel_claims(
        nodes
            .iter()
            .filter(|n| n.metadata.deletion_timestamp.is_none())
            .map(|n| n.as_ref()),
    );
    let api: Api<ClusterClaim> = Api::all(ctx.client.clone());
    for (name, value) in &desired {
        let current = claims.get(&ObjectRef::new(name));
        if current.as_ref().is_some_and(|c| &c.spec.value == value) {
            continue;
        }
        let body = json!({
            "apiVersion": ClusterClaim::api_version(&()),
            "kind": ClusterClaim::kind(&()),
            "metadata": { "name": name },
            "spec": { "value": value },
        });
        api.patch(
            name,
            &PatchParams::apply(SPOKE_CLAIM_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await
        .map_err(|source| ReconcileError::Claim {
            name: name.clone(),
            source,
        })?;
        ctx.metrics.write("cluster-claim");
        tracing::info!(claim = %name, kernels = value.lines().count(), "kernel claim published");
    }
    let wanted: BTreeSet<&str> = desired.iter().map(|(n, _)| n.as_str()).collect();
    for stale in claims.state().iter().filter(|c| {
        let name = c.name_any();
        claim_part_index(&name).is_some_and(|i| i > 0) && !wanted.contains(name.as_str())
    }) {
        let name = stale.name_any();
        match api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(source) => return Err(ReconcileError::Claim { name, source }),
        }
        ctx.metrics.write("cluster-claim");
        tracing::info!(claim = %name, "stale kernel claim deleted");
    }
    Ok(Action::Requeue(ctx.resync))
}

#[tracing::instrument(skip_all, fields(node = %node.name_any(), kernel = value))]
async fn label_kernel(node: &Node, value: &str, ctx: &Context) -> Result<(), ReconcileError> {
    let name = node.name_any();
    let mut meta = json!({ "name": name, "labels": { KERNEL_LABEL: value } });
    if let Some(uid) = node.uid() {
        meta["uid"] = json!(uid);
    }
    let body = json!({ "apiVersion": "v1", "kind": "Node", "metadata": meta });
    let api: Api<Node> = Api::all(ctx.client.clone());
    api.patch(
        &name,
        &PatchParams::apply(SPOKE_NODE_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await
    .map_err(|source| ReconcileError::NodeLabels {
        node: name.clone(),
        source,
    })?;
    ctx.metrics.write("kernel-label");
    tracing::info!(node = %name, kernel = value, "node kernel labelled");
    Ok(())
}
