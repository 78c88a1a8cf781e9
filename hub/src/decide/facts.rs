//! What the hub keeps of the objects it watches: compact, pure projections of
//! ManagedClusters, its ManifestWorks and its build Jobs (the watch caches hold these).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::ResourceExt;
use serde::Serialize;
use shared_api::labels::MCM_OWNER_LABEL;
use shared_api::ocm::{ManifestWork, work_conditions};

use crate::render::{ReadyMapping, SPEC_HASH_ANNOTATION, shipped_mappings};

/// The prefix of the annotations a progressive rollout keeps on a ManifestWork.
pub const ROLLOUT_ANNOTATION_PREFIX: &str = "hub.kmm.sigs.x-k8s.io/rollout-";

/// What the hub knows about one ManagedCluster.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterFacts {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Kernels from the `kernel-versions` claim(s); `None` when the cluster published none.
    pub kernels: Option<Vec<String>>,
    /// OCM reports the cluster available (`ManagedClusterConditionAvailable` True).
    pub available: bool,
    /// `(major, minor)` of the Kubernetes version OCM reports (`status.version.kubernetes`);
    /// `None` when not reported or not understood.
    pub kubernetes: Option<(u32, u32)>,
    /// The cluster runs OpenShift (label `vendor=OpenShift` or claim
    /// `product.open-cluster-management.io=OpenShift`): Day-1 MachineConfigs apply there.
    pub openshift: bool,
    /// Kernel → Driver Toolkit image from the `kernel-dtk-images` claim(s) (OpenShift
    /// spokes); empty when the cluster published none.
    pub dtk_images: BTreeMap<String, String>,
    /// The RHCOS image the cluster runs (claim `os-image.kmm.node.kubernetes.io`,
    /// OpenShift spokes); what `spec.day0` layers on.
    pub os_image: Option<String>,
}

/// `(major, minor)` of a Kubernetes version as OCM reports it (`v1.33.2`,
/// `v1.34.0+k3s1`, `v1.34.1-gke.100`, `1.34`); `None` for anything else.
pub fn parse_kubernetes_version(version: &str) -> Option<(u32, u32)> {
    let v = version.trim();
    let v = v.strip_prefix('v').unwrap_or(v);
    let mut parts = v.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor: String = parts
        .next()?
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    Some((major, minor.parse().ok()?))
}

impl ClusterFacts {
    pub fn from_cluster(c: &shared_api::ManagedCluster) -> Self {
        Self {
            name: c.metadata.name.clone().unwrap_or_default(),
            labels: c.metadata.labels.clone().unwrap_or_default(),
            kernels: c.status.as_ref().and_then(|s| s.kernel_versions()),
            available: c.status.as_ref().is_some_and(|s| s.available()),
            kubernetes: c
                .status
                .as_ref()
                .and_then(|s| s.version.as_ref())
                .and_then(|v| parse_kubernetes_version(&v.kubernetes)),
            openshift: crate::render::day1::is_openshift(
                c.metadata.labels.as_ref().unwrap_or(&BTreeMap::new()),
                c.status.as_ref().and_then(|s| {
                    s.cluster_claims
                        .iter()
                        .find(|cl| cl.name == crate::render::day1::PRODUCT_CLAIM)
                        .map(|cl| cl.value.as_str())
                }),
            ),
            dtk_images: c
                .status
                .as_ref()
                .map(|s| s.dtk_images())
                .unwrap_or_default(),
            os_image: c.status.as_ref().and_then(|s| s.os_image()),
        }
    }
}

/// The cached works of one MCM, by cluster: the cache's own entries, shared.
pub type Works = BTreeMap<String, std::sync::Arc<WorkEntry>>;

/// What the hub keeps of one of its ManifestWorks.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkEntry {
    pub mcm: String,
    pub cluster: String,
    pub spec_hash: Option<String>,
    #[serde(skip)]
    pub shipped: Vec<ReadyMapping>,
    pub applied: bool,
    /// `Applied` is True for the work's current generation (the agent applied this spec,
    /// not an earlier one).
    #[serde(skip)]
    pub applied_current: bool,
    /// The progressive-rollout annotations (`hub.kmm.sigs.x-k8s.io/rollout-*`).
    #[serde(skip)]
    pub rollout: BTreeMap<String, String>,
    pub available: bool,
    pub degraded: bool,
    pub feedback: BTreeMap<String, i64>,
    /// The Day-1 MachineConfig shipped (`spec.day1`): its name and `kernel=image` lines.
    #[serde(skip)]
    pub day1: Option<(String, Vec<String>)>,
    /// The Day-0 MachineConfig shipped (`spec.day0`).
    #[serde(skip)]
    pub day0: Option<crate::render::day0::ShippedDay0>,
    pub conditions: Vec<Condition>,
    pub deleting: bool,
    /// The work's finalizers (OCM's work agent holds one until it cleaned up).
    #[serde(skip)]
    pub finalizers: Vec<String>,
}

impl WorkEntry {
    pub fn from_work(w: &ManifestWork) -> Option<Self> {
        let mcm = w.labels().get(MCM_OWNER_LABEL)?.clone();
        let status = w.status.clone().unwrap_or_default();
        let feedback: BTreeMap<String, i64> = crate::render::FEEDBACK_FIELDS
            .iter()
            .copied()
            .chain(
                crate::render::day1::POOL_FEEDBACK
                    .iter()
                    .map(|(name, _)| *name),
            )
            .filter_map(|f| status.feedback_integer(f).map(|v| (f.to_string(), v)))
            .collect();
        Some(Self {
            mcm,
            cluster: w.namespace().unwrap_or_default(),
            spec_hash: w.annotations().get(SPEC_HASH_ANNOTATION).cloned(),
            shipped: shipped_mappings(w),
            applied: status.condition_true(work_conditions::APPLIED),
            applied_current: status.conditions.iter().any(|c| {
                c.type_ == work_conditions::APPLIED
                    && c.status == "True"
                    && c.observed_generation
                        .is_none_or(|g| Some(g) == w.metadata.generation)
            }),
            rollout: w
                .annotations()
                .iter()
                .filter(|(k, _)| k.starts_with(ROLLOUT_ANNOTATION_PREFIX))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            available: status.condition_true(work_conditions::AVAILABLE),
            degraded: status.condition_true(work_conditions::DEGRADED),
            feedback,
            day1: crate::render::day1::shipped_day1(w),
            day0: crate::render::day0::shipped_day0(w),
            conditions: status.conditions,
            deleting: w.metadata.deletion_timestamp.is_some(),
            finalizers: w.finalizers().to_vec(),
        })
    }

    /// Every desired loader, device-plugin and DRA driver pod available on the spoke.
    pub fn module_available(&self) -> bool {
        let f = |k: &str| self.feedback.get(k).copied();
        let part = |prefix: &str| match (
            f(&format!("{prefix}.desiredNumber")),
            f(&format!("{prefix}.availableNumber")),
        ) {
            (Some(d), Some(a)) => a >= d,
            (None, None) => true,
            _ => false,
        };
        let reported = self.feedback.contains_key("moduleLoader.desiredNumber")
            || self.feedback.contains_key("devicePlugin.desiredNumber")
            || self.feedback.contains_key("dra.desiredNumber");
        self.available && reported && part("moduleLoader") && part("devicePlugin") && part("dra")
    }
}

/// What the hub keeps of one of its build Jobs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobEntry {
    pub name: String,
    pub uid: String,
    pub mcm: String,
    pub image: String,
    pub build_hash: String,
    pub attempt: u32,
    pub active: bool,
    pub succeeded: bool,
    pub failed: bool,
    /// When the Job finished (success or failure).
    pub finished_at: Option<k8s_openapi::jiff::Timestamp>,
    pub deleting: bool,
}

impl JobEntry {
    pub fn from_job(j: &k8s_openapi::api::batch::v1::Job) -> Option<Self> {
        use shared_api::labels::{BUILD_HASH_ANNOTATION, BUILD_IMAGE_ANNOTATION};
        let mcm = j.labels().get(MCM_OWNER_LABEL)?.clone();
        let a = j.annotations();
        let status = j.status.clone().unwrap_or_default();
        let cond = |t: &str| {
            status
                .conditions
                .iter()
                .flatten()
                .find(|c| c.type_ == t && c.status == "True")
        };
        let failed = cond("Failed").is_some()
            || status.failed.unwrap_or(0) > 0 && status.active.unwrap_or(0) == 0;
        let succeeded = cond("Complete").is_some() || status.succeeded.unwrap_or(0) > 0;
        let finished_at =
            status.completion_time.as_ref().map(|t| t.0).or_else(|| {
                cond("Failed").and_then(|c| c.last_transition_time.as_ref().map(|t| t.0))
            });
        Some(Self {
            name: j.name_any(),
            uid: j.uid().unwrap_or_default(),
            mcm,
            image: a.get(BUILD_IMAGE_ANNOTATION).cloned().unwrap_or_default(),
            build_hash: a.get(BUILD_HASH_ANNOTATION).cloned().unwrap_or_default(),
            attempt: a
                .get(crate::render::build_job::ATTEMPT_ANNOTATION)
                .and_then(|v| v.parse().ok())
                .unwrap_or(1),
            active: !failed && !succeeded,
            succeeded,
            failed,
            finished_at,
            deleting: j.metadata.deletion_timestamp.is_some(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn available_needs_feedback_showing_every_pod_available() {
        let mut w = WorkEntry {
            mcm: "m".into(),
            cluster: "c1".into(),
            applied: true,
            ..Default::default()
        };
        w.available = true;
        assert!(!w.module_available(), "no feedback yet");
        w.feedback.insert("moduleLoader.desiredNumber".into(), 3);
        w.feedback.insert("moduleLoader.availableNumber".into(), 2);
        assert!(!w.module_available());
        w.feedback.insert("moduleLoader.availableNumber".into(), 3);
        assert!(w.module_available());
        w.feedback.insert("devicePlugin.desiredNumber".into(), 3);
        assert!(
            !w.module_available(),
            "device plugin reported desired but not available"
        );
        w.feedback.remove("devicePlugin.desiredNumber");
        w.feedback.insert("dra.desiredNumber".into(), 3);
        w.feedback.insert("dra.availableNumber".into(), 1);
        assert!(!w.module_available(), "a DRA driver still starting");
        w.feedback.insert("dra.availableNumber".into(), 3);
        assert!(w.module_available());
    }

    #[test]
    fn kubernetes_versions_as_ocm_reports_them() {
        for (v, want) in [
            ("v1.33.2", Some((1, 33))),
            ("v1.34.0+k3s1", Some((1, 34))),
            ("v1.34.1-gke.1000", Some((1, 34))),
            ("1.37", Some((1, 37))),
            (" v1.35.0 ", Some((1, 35))),
            ("", None),
            ("v1", None),
            ("latest", None),
            ("v1.x.0", None),
        ] {
            assert_eq!(parse_kubernetes_version(v), want, "{v:?}");
        }
        let mc: shared_api::ManagedCluster = serde_json::from_value(serde_json::json!({
            "apiVersion": "cluster.open-cluster-management.io/v1", "kind": "ManagedCluster",
            "metadata": {"name": "c1"}, "spec": {},
            "status": {"version": {"kubernetes": "v1.33.2"}}
        }))
        .unwrap();
        assert_eq!(ClusterFacts::from_cluster(&mc).kubernetes, Some((1, 33)));
    }
}
