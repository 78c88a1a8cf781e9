//! Day 0 by CoreOS layering through the hub (`spec.day0`): what a selected OpenShift
//! cluster's ManifestWork carries after its Module — a MachineConfig for the pool whose
//! `osImageURL` is the layered image the hub built and pinned for that cluster's RHCOS image,
//! and the pool, read only, with its machine counts as feedback (shared with Day 1:
//! [`super::day1::add_machine_config`]). Pure.
//!
//! The MachineConfig is deleted with the work: the MCO then rolls the pool back to the
//! release's own image.

use std::collections::BTreeMap;

use serde_json::{Value, json};
use shared_api::ManagedClusterModule;
use shared_api::day0::{BASE_IMAGE_ANNOTATION, KERNEL_ANNOTATION};
use shared_api::mcm::Day0ClusterStatus;
use shared_api::ocm::{Manifest, ManifestWork};

use super::RenderError;
use super::day1::{add_machine_config, pool_state};
use super::machineconfig::{MC_API_VERSION, ROLE_LABEL};

/// A Day-0 MachineConfig's content: the layered image and what it was built from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ShippedDay0 {
    /// The MachineConfig's name.
    pub name: String,
    /// `repo@sha256:…` of the layered image.
    pub os_image_url: String,
    /// The RHCOS image it was built on, and that image's kernel.
    pub base_image: String,
    pub kernel: String,
}

/// The Day-0 MachineConfig for pool `pool`.
pub fn day0_machine_config(pool: &str, d: &ShippedDay0) -> Value {
    json!({
        "apiVersion": MC_API_VERSION,
        "kind": "MachineConfig",
        "metadata": {
            "name": d.name,
            "labels": {ROLE_LABEL: pool},
            "annotations": {
                BASE_IMAGE_ANNOTATION: d.base_image,
                KERNEL_ANNOTATION: d.kernel,
            },
        },
        "spec": {"osImageURL": d.os_image_url},
    })
}

/// Adds the Day-0 MachineConfig (named as `d` says, for the MCM's pool) and the read-only
/// pool to a rendered work, after its Module. An unpinned image is refused: a node would
/// boot whatever the tag points to.
pub fn add_day0(
    work: &mut ManifestWork,
    mcm: &ManagedClusterModule,
    d: &ShippedDay0,
) -> Result<(), RenderError> {
    let Some(spec) = mcm.spec.day0.as_ref() else {
        return Ok(());
    };
    if !d.os_image_url.contains("@sha256:") {
        return Err(RenderError::NotPinned(d.os_image_url.clone()));
    }
    let pool = &spec.machine_config_pool;
    let mc = day0_machine_config(pool, d);
    add_machine_config(work, mc, &d.name, pool)
}

/// The Day-0 MachineConfig a shipped work carries (the one with an `osImageURL`).
pub fn shipped_day0(work: &ManifestWork) -> Option<ShippedDay0> {
    let mc = work
        .spec
        .workload
        .manifests
        .iter()
        .map(|Manifest(m)| m)
        .find(|m| m["kind"] == "MachineConfig" && m["spec"]["osImageURL"].is_string())?;
    let annotation = |k: &str| {
        mc["metadata"]["annotations"][k]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    Some(ShippedDay0 {
        name: mc["metadata"]["name"].as_str()?.to_string(),
        os_image_url: mc["spec"]["osImageURL"].as_str()?.to_string(),
        base_image: annotation(BASE_IMAGE_ANNOTATION),
        kernel: annotation(KERNEL_ANNOTATION),
    })
}

/// What one OpenShift cluster should run and why it does not yet, if so.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Day0Want {
    pub os_image: Option<String>,
    pub kernel: Option<String>,
    /// The layered image (unpinned) it should boot.
    pub image: Option<String>,
    /// `(reason, message)` while it does not get it.
    pub waiting: Option<(String, String)>,
}

/// A cluster's Day-0 status from what it should run, what it was shipped and the pool's
/// feedback.
pub fn cluster_status(
    cluster: &str,
    want: &Day0Want,
    shipped: Option<&ShippedDay0>,
    feedback: &BTreeMap<String, i64>,
) -> Day0ClusterStatus {
    let mut s = Day0ClusterStatus {
        name: cluster.to_string(),
        os_image: want.os_image.clone(),
        kernel: want.kernel.clone(),
        reason: want.waiting.as_ref().map(|w| w.0.clone()),
        message: want.waiting.as_ref().map(|w| w.1.clone()),
        ..Default::default()
    };
    if let Some(d) = shipped {
        let p = pool_state(feedback);
        s.image = Some(d.os_image_url.clone());
        s.machine_config = Some(d.name.clone());
        s.pool = p.pool.to_string();
        s.machine_count = p.machines;
        s.updated_machine_count = p.updated;
        s.degraded_machine_count = p.degraded;
        // Waiting for a new image, the cluster runs the one it had: say which.
        if want.waiting.is_some() {
            s.os_image = s.os_image.or_else(|| Some(d.base_image.clone()));
            s.kernel = s.kernel.or_else(|| Some(d.kernel.clone()));
        }
    }
    s
}

#[cfg(test)]
#[path = "day0_tests.rs"]
mod tests;
