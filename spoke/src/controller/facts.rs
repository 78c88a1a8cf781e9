//! Kernel facts: every node labelled with its kernel, the kernel ClusterClaim(s) and, on
//! OpenShift spokes, the Driver Toolkit ClusterClaim(s) (kernel → toolkit image) and the
//! RHCOS image claim.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Node;
use kmm_runtime::queue::Action;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Resource, ResourceExt};
use serde_json::json;
use shared_api::ClusterClaim;
use shared_api::day0::OS_IMAGE_CLAIM;
use shared_api::labels::{KERNEL_LABEL, SPOKE_CLAIM_MANAGER, kernel_label_value};
use shared_api::ocm::{DTK_IMAGES_CLAIM, claim_part_index, claim_part_of, split_dtk_claims};

use super::Context;
use crate::error::ReconcileError;
use crate::render::nodes::{distinct_kernels, kernel_claims, kernel_dtk_images, node_kernel};

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
            // Written with the node's Module labels, by the node writer.
            ctx.node_writes.kernel(&node.name_any(), &want);
            tracing::debug!(node = %node.name_any(), kernel = %want, "node kernel label wanted");
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
    apply_claims(&desired, claims, ctx, "kernel claim published").await?;
    let wanted: BTreeSet<&str> = desired.iter().map(|(n, _)| n.as_str()).collect();
    let stale: Vec<String> = claims
        .state()
        .iter()
        .map(|c| c.name_any())
        .filter(|n| claim_part_index(n).is_some_and(|i| i > 0) && !wanted.contains(n.as_str()))
        .collect();
    delete_claims(&stale, ctx, "stale kernel claim deleted").await?;
    publish_dtk_claims(&nodes, claims, ctx).await?;
    publish_os_image_claim(claims, ctx).await?;
    Ok(Action::Requeue(ctx.resync))
}

/// The RHCOS image claim of OpenShift spokes (`spec.day0` on the hub layers on it); deleted
/// when the MCO's ConfigMap goes.
async fn publish_os_image_claim(
    claims: &Store<ClusterClaim>,
    ctx: &Context,
) -> Result<(), ReconcileError> {
    let image = ctx.os_image.read().ok().and_then(|i| i.clone());
    match image {
        Some(v) => {
            let desired = [(OS_IMAGE_CLAIM.to_string(), v)];
            apply_claims(&desired, claims, ctx, "RHCOS image claim published").await
        }
        None if claims.get(&ObjectRef::new(OS_IMAGE_CLAIM)).is_some() => {
            let stale = [OS_IMAGE_CLAIM.to_string()];
            delete_claims(&stale, ctx, "RHCOS image claim deleted").await
        }
        None => Ok(()),
    }
}

/// The Driver Toolkit claims: kernel → toolkit image for the kernels whose nodes run an OS
/// version the ImageStream has a tag for. None (and any left over deleted) without the
/// ImageStream or without a kernel it covers.
async fn publish_dtk_claims(
    nodes: &[Arc<Node>],
    claims: &Store<ClusterClaim>,
    ctx: &Context,
) -> Result<(), ReconcileError> {
    let images = match ctx.dtk_tags.read().ok().and_then(|t| t.clone()) {
        Some(tags) => kernel_dtk_images(
            nodes
                .iter()
                .filter(|n| n.metadata.deletion_timestamp.is_none())
                .map(|n| n.as_ref()),
            &tags,
        ),
        None => BTreeMap::new(),
    };
    let (desired, left_out) = split_dtk_claims(&images);
    if !left_out.is_empty() {
        tracing::warn!(
            kernels = ?left_out,
            "Driver Toolkit images that do not fit the claims are not published"
        );
    }
    apply_claims(&desired, claims, ctx, "Driver Toolkit claim published").await?;
    let wanted: BTreeSet<&str> = desired.iter().map(|(n, _)| n.as_str()).collect();
    let stale: Vec<String> = claims
        .state()
        .iter()
        .map(|c| c.name_any())
        .filter(|n| claim_part_of(DTK_IMAGES_CLAIM, n).is_some() && !wanted.contains(n.as_str()))
        .collect();
    delete_claims(&stale, ctx, "stale Driver Toolkit claim deleted").await
}

/// Server-side apply the claims whose value differs from the cached one.
async fn apply_claims(
    desired: &[(String, String)],
    claims: &Store<ClusterClaim>,
    ctx: &Context,
    what: &str,
) -> Result<(), ReconcileError> {
    let api: Api<ClusterClaim> = Api::all(ctx.client.clone());
    for (name, value) in desired {
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
        tracing::info!(claim = %name, lines = value.lines().count(), "{what}");
    }
    Ok(())
}

/// Delete claims (already gone is fine).
async fn delete_claims(names: &[String], ctx: &Context, what: &str) -> Result<(), ReconcileError> {
    let api: Api<ClusterClaim> = Api::all(ctx.client.clone());
    for name in names {
        match api.delete(name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(source) => {
                return Err(ReconcileError::Claim {
                    name: name.clone(),
                    source,
                });
            }
        }
        ctx.metrics.write("cluster-claim");
        tracing::info!(claim = %name, "{what}");
    }
    Ok(())
}
