//! Day-1 loading through the hub (`spec.day1`): what a selected OpenShift cluster's
//! ManifestWork carries after its Module — the Day-1 MachineConfig with the images the hub
//! pinned for that cluster's kernels ([`super::machineconfig`]), and the cluster's
//! MachineConfigPool, read only (`updateStrategy: ReadOnly`), whose machine counts come back
//! as status feedback. Pure.
//!
//! The MachineConfig is deleted with the work (the MCO then rolls the pool back to its other
//! configs); the pool is never written, and is orphaned (`deleteOption`), so that the work
//! agent neither deletes it nor asks the executor's right to (OCM checks the executor's
//! create, update, patch and get for every manifest, read-only ones included).

use std::collections::BTreeMap;

use serde_json::{Value, json};
use shared_api::ManagedClusterModule;
use shared_api::mcm::Day1ClusterStatus;
use shared_api::ocm::{
    DeleteOption, FeedbackRule, JsonPath, Manifest, ManifestConfigOption, ManifestWork,
    OrphaningRule, ResourceIdentifier, SelectivelyOrphan, UpdateStrategy,
};

use super::machineconfig::{Day1, Day1Images, MC_API_VERSION, day1_machine_config};
use super::{MAX_MANIFESTS_BYTES, ReadyMapping, RenderError, SPEC_HASH_ANNOTATION};

pub const MC_GROUP: &str = "machineconfiguration.openshift.io";

/// The pool's status fields reported back through the work (feedback name, JSON path);
/// Day 0 uses the same names (works shipped before Day 0 keep their spec hash).
pub const POOL_FEEDBACK: [(&str, &str); 3] = [
    ("day1.machineCount", ".status.machineCount"),
    ("day1.updatedMachineCount", ".status.updatedMachineCount"),
    ("day1.degradedMachineCount", ".status.degradedMachineCount"),
];

/// The cluster label and claim that say a ManagedCluster runs OpenShift (RHACM sets both).
pub const VENDOR_LABEL: &str = "vendor";
pub const PRODUCT_CLAIM: &str = "product.open-cluster-management.io";
pub const OPENSHIFT: &str = "OpenShift";

/// The Day-1 description of one cluster: the MachineConfig's inputs.
pub fn day1_of(mcm: &ManagedClusterModule, mappings: &[ReadyMapping]) -> Option<Day1> {
    let d = mcm.spec.day1.as_ref()?;
    let module = mcm
        .spec
        .module_spec
        .module_loader
        .as_ref()?
        .container
        .modprobe
        .module_name
        .clone()?;
    let images: BTreeMap<String, String> = mappings
        .iter()
        .map(|m| (m.kernel.clone(), m.pinned_image.clone()))
        .collect();
    let in_tree = d.in_tree_module.clone().or_else(|| {
        mappings
            .iter()
            .find_map(|m| m.in_tree_modules_to_remove.first().cloned())
    });
    Some(Day1 {
        name: d.machine_config_name(mcm.metadata.name.as_deref().unwrap_or_default()),
        pool: d.machine_config_pool.clone(),
        images: Day1Images::PerKernel(images),
        module,
        in_tree_module: in_tree,
    })
}

/// Adds the Day-1 MachineConfig and the read-only pool to a rendered work (after its
/// Module), and re-hashes it.
pub fn add_day1(
    work: &mut ManifestWork,
    mcm: &ManagedClusterModule,
    mappings: &[ReadyMapping],
) -> Result<(), RenderError> {
    let Some(d) = day1_of(mcm, mappings) else {
        return Ok(());
    };
    let mc = day1_machine_config(&d).map_err(|e| RenderError::Day1(e.to_string()))?;
    add_machine_config(work, mc, &d.name, &d.pool)
}

/// Adds a MachineConfig `mc` (named `name`, server-side applied) and the read-only pool
/// `pool` with its machine counts as feedback (orphaned: never deleted with the work) to a
/// rendered work, after what it carries, and re-hashes it. Shared by Day 1 and Day 0.
pub fn add_machine_config(
    work: &mut ManifestWork,
    mc: Value,
    name: &str,
    pool: &str,
) -> Result<(), RenderError> {
    let pool_manifest = json!({
        "apiVersion": MC_API_VERSION,
        "kind": "MachineConfigPool",
        "metadata": {"name": pool},
    });
    let size = work
        .spec
        .workload
        .manifests
        .iter()
        .map(|Manifest(m)| m)
        .chain([&mc, &pool_manifest])
        .map(|m| {
            serde_json::to_vec(m)
                .map(|v| super::ocm_manifest_size(v.len()))
                .unwrap_or(usize::MAX)
        })
        .fold(0usize, usize::saturating_add);
    if size > MAX_MANIFESTS_BYTES {
        return Err(RenderError::TooLarge(size));
    }
    let id = |resource: &str, name: &str| ResourceIdentifier {
        group: MC_GROUP.into(),
        resource: resource.into(),
        name: name.into(),
        namespace: String::new(),
    };
    work.spec.manifest_configs.push(ManifestConfigOption {
        resource_identifier: id("machineconfigs", name),
        feedback_rules: Vec::new(),
        update_strategy: Some(UpdateStrategy {
            type_: "ServerSideApply".into(),
        }),
    });
    work.spec.manifest_configs.push(ManifestConfigOption {
        resource_identifier: id("machineconfigpools", pool),
        feedback_rules: vec![FeedbackRule {
            type_: "JSONPaths".into(),
            json_paths: POOL_FEEDBACK
                .iter()
                .map(|(name, path)| JsonPath {
                    name: (*name).into(),
                    path: (*path).into(),
                    version: None,
                })
                .collect(),
        }],
        update_strategy: Some(UpdateStrategy {
            type_: "ReadOnly".into(),
        }),
    });
    // Never deleted with the work: the pool joins the orphaned manifests.
    let orphan = OrphaningRule {
        group: MC_GROUP.into(),
        resource: "machineconfigpools".into(),
        namespace: String::new(),
        name: pool.to_string(),
    };
    let delete = work.spec.delete_option.get_or_insert_with(|| DeleteOption {
        propagation_policy: "SelectivelyOrphan".into(),
        selectively_orphans: None,
    });
    delete.propagation_policy = "SelectivelyOrphan".into();
    delete
        .selectively_orphans
        .get_or_insert_with(SelectivelyOrphan::default)
        .orphaning_rules
        .push(orphan);
    work.spec.workload.manifests.push(Manifest(mc));
    work.spec.workload.manifests.push(Manifest(pool_manifest));
    let hash = super::spec_hash(&work.spec);
    work.metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(SPEC_HASH_ANNOTATION.to_string(), hash);
    Ok(())
}

/// The Day-1 MachineConfig a shipped work carries: its name and its `kernel=image` lines.
pub fn shipped_day1(work: &ManifestWork) -> Option<(String, Vec<String>)> {
    let mc = work
        .spec
        .workload
        .manifests
        .iter()
        .map(|Manifest(m)| m)
        .find(|m| m["kind"] == "MachineConfig" && m["spec"]["osImageURL"].is_null())?;
    let name = mc["metadata"]["name"].as_str()?.to_string();
    let images = mc["spec"]["config"]["storage"]["files"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|f| {
            f["path"]
                .as_str()
                .is_some_and(|p| p.starts_with(super::machineconfig::IMAGES_DIR))
        })
        .filter_map(|f| f["contents"]["source"].as_str())
        .filter_map(decode_data_url)
        .flat_map(|text| {
            text.lines()
                .filter_map(|l| l.split_once(' '))
                .map(|(k, i)| format!("{k}={i}"))
                .collect::<Vec<_>>()
        })
        .collect();
    Some((name, images))
}

fn decode_data_url(source: &str) -> Option<String> {
    use base64::Engine as _;
    let (_, data) = source.split_once(";base64,")?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data)
        .ok()?;
    String::from_utf8(bytes).ok()
}

/// A cluster's Day-1 state from what it was shipped and the pool's feedback.
pub fn cluster_status(
    cluster: &str,
    shipped: (String, Vec<String>),
    feedback: &BTreeMap<String, i64>,
) -> Day1ClusterStatus {
    let PoolState {
        pool,
        machines,
        updated,
        degraded,
    } = pool_state(feedback);
    Day1ClusterStatus {
        name: cluster.to_string(),
        machine_config: shipped.0,
        images: shipped.1,
        pool: pool.to_string(),
        machine_count: machines,
        updated_machine_count: updated,
        degraded_machine_count: degraded,
    }
}

/// A pool's state from the work's feedback ([`POOL_FEEDBACK`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolState {
    /// `Updated`, `Updating`, `Degraded` or `Unknown`.
    pub pool: &'static str,
    pub machines: Option<i64>,
    pub updated: Option<i64>,
    pub degraded: Option<i64>,
}

/// The pool's state: degraded machines first, then every machine updated or not.
pub fn pool_state(feedback: &BTreeMap<String, i64>) -> PoolState {
    let f = |k: &str| feedback.get(k).copied();
    let (machines, updated, degraded) = (
        f("day1.machineCount"),
        f("day1.updatedMachineCount"),
        f("day1.degradedMachineCount"),
    );
    let pool = match (machines, updated, degraded) {
        (_, _, Some(d)) if d > 0 => "Degraded",
        (Some(m), Some(u), _) if u >= m => "Updated",
        (Some(_), Some(_), _) => "Updating",
        _ => "Unknown",
    };
    PoolState {
        pool,
        machines,
        updated,
        degraded,
    }
}

/// Whether a cluster runs OpenShift, by its `vendor` label or its product claim.
pub fn is_openshift(labels: &BTreeMap<String, String>, product_claim: Option<&str>) -> bool {
    labels.get(VENDOR_LABEL).map(String::as_str) == Some(OPENSHIFT)
        || product_claim == Some(OPENSHIFT)
}

/// The manifests' JSON kinds, for tests and views.
pub fn kinds(work: &ManifestWork) -> Vec<String> {
    work.spec
        .workload
        .manifests
        .iter()
        .map(|Manifest(m): &Manifest| {
            m.get("kind")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        })
        .collect()
}

#[cfg(test)]
#[path = "day1_tests.rs"]
mod tests;
