//! The JSON shapes of the fleet API. Their JSON Schemas (schemars) make the OpenAPI
//! document, so the document describes exactly what is served.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use schemars::JsonSchema;
use serde::Serialize;
use shared_api::mcm::{ImageState, ImageStatus};
use shared_api::rollout::RolloutStatus;

/// `GET /api/v1/managedclustermodules`.
#[derive(Debug, Clone, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct McmList {
    pub items: Vec<McmSummary>,
}

/// One ManagedClusterModule as its status reports it.
#[derive(Debug, Clone, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct McmSummary {
    pub name: String,
    pub generation: Option<i64>,
    /// The generation the last written status describes.
    pub observed_generation: Option<i64>,
    /// Being deleted: its ManifestWorks are being removed.
    pub deleting: bool,
    /// Namespace of the Module on the spokes.
    pub spoke_namespace: String,
    /// Equality selector over ManagedCluster labels; empty selects every cluster.
    pub selector: BTreeMap<String, String>,
    pub counts: Counts,
    /// `Ready`, `Progressing`, `Degraded`.
    pub conditions: Vec<Condition>,
    pub images: ImageCounts,
    /// The progressive rollout (`status.rollout`), when `spec.rolloutStrategy` is
    /// `Progressive` or `ProgressivePerGroup`.
    pub rollout: Option<RolloutStatus>,
}

/// ManifestWork counts from the MCM status, plus the clusters its selector matches now.
#[derive(Debug, Clone, Default, PartialEq, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Counts {
    /// Known ManagedClusters that the selector matches now.
    pub selected: u32,
    /// ManifestWorks written for selected clusters.
    pub desired: i32,
    /// ManifestWorks whose `Applied` condition is True.
    pub applied: i32,
    /// ManifestWorks whose Module reports every desired pod available.
    pub available: i32,
    /// ManifestWorks whose `Degraded` condition is True.
    pub degraded: i32,
}

/// Distinct images of the image plan, by state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageCounts {
    pub total: u32,
    pub ready: u32,
    pub pending: u32,
    pub building: u32,
    pub signing: u32,
    pub missing: u32,
    pub failed: u32,
    /// Images beyond the status list limit (not counted by state).
    pub omitted: u32,
}

/// `GET /api/v1/managedclustermodules/{name}`.
#[derive(Debug, Clone, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct McmDetail {
    #[serde(flatten)]
    pub summary: McmSummary,
    /// Whether the hub has reconciled this MCM since it started (else per-kernel facts are unknown).
    pub reconciled: bool,
    /// The first reason the last reconcile reported the MCM degraded.
    pub last_error: Option<String>,
    /// Every distinct image with its state, digest and reason.
    pub image_plan: Vec<ImageStatus>,
    /// Selected clusters, and clusters whose ManifestWork is still being removed; by name.
    pub clusters: Vec<ClusterRollout>,
}

/// Where one cluster is in the rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, JsonSchema)]
pub enum Phase {
    /// Every desired loader and device-plugin pod is available.
    Available,
    /// The ManifestWork reports Degraded.
    Degraded,
    /// The cluster cannot get (all of) its work yet; see `problem`.
    Waiting,
    /// Work written, not everything available yet.
    Progressing,
    /// Selected, not reconciled yet.
    Pending,
    /// No longer selected, or the work is being deleted.
    Removing,
}

#[derive(Debug, Clone, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterRollout {
    pub name: String,
    /// Whether the selector matches the cluster's labels now.
    pub selected: bool,
    pub phase: Phase,
    /// Per kernel of the cluster, the image it needs and its state.
    pub kernels: Vec<KernelRollout>,
    /// Kernels of the cluster that no kernel mapping matches.
    pub unmapped_kernels: Vec<String>,
    pub problem: Option<Problem>,
    /// Where the cluster is in the MCM's progressive rollout (none for `All`).
    pub rollout_state: Option<RolloutState>,
    /// The cluster's ManifestWork, when there is one.
    pub work: Option<WorkStatus>,
}

/// A cluster's state in a progressive rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, JsonSchema)]
pub enum RolloutState {
    /// At the revision, succeeded and held for `minSuccessTime`.
    Updated,
    /// Moved to the revision, not succeeded or failed yet.
    InProgress,
    /// At the revision, Degraded or past `progressDeadline`.
    Failed,
    /// Not moved yet: keeps the ManifestWork it had.
    Pending,
}

impl RolloutState {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "Updated" => Some(Self::Updated),
            "InProgress" => Some(Self::InProgress),
            "Failed" => Some(Self::Failed),
            "Pending" => Some(Self::Pending),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KernelRollout {
    pub kernel: String,
    /// The image before pinning.
    pub image: String,
    /// What the ManifestWork carries (or will), `repo@sha256:…`.
    pub pinned_image: Option<String>,
    pub digest: Option<String>,
    pub state: ImageState,
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Problem {
    /// A short CamelCase reason such as `NoKernelClaim` or `ImagesPending`.
    pub reason: String,
    pub message: String,
}

/// The cluster's ManifestWork as the work agent reports it.
#[derive(Debug, Clone, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkStatus {
    pub applied: bool,
    pub available: bool,
    pub degraded: bool,
    /// Every desired loader and device-plugin pod available (from the feedback).
    pub module_available: bool,
    pub deleting: bool,
    pub conditions: Vec<Condition>,
    pub feedback: Feedback,
}

/// The spoke Module's numbers, from the ManifestWork's status feedback.
#[derive(Debug, Clone, Default, PartialEq, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Feedback {
    pub module_loader: Option<PodNumbers>,
    pub device_plugin: Option<PodNumbers>,
    pub dra: Option<PodNumbers>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodNumbers {
    /// Nodes matching the Module's selector.
    pub nodes_matching: Option<i64>,
    pub desired: Option<i64>,
    pub available: Option<i64>,
}

/// `GET /api/v1/clusters`.
#[derive(Debug, Clone, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterList {
    pub items: Vec<ClusterSummary>,
}

#[derive(Debug, Clone, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterSummary {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Whether the cluster publishes the kernel-versions claim.
    pub kernel_claim: bool,
    /// Distinct kernels of the cluster's nodes, sorted.
    pub kernels: Vec<String>,
    /// ManagedClusterModules whose selector matches the cluster.
    pub managed_cluster_modules: Vec<String>,
}

/// `GET /api/v1/events`.
#[derive(Debug, Clone, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EventList {
    /// Newest first.
    pub items: Vec<EventItem>,
}

#[derive(Debug, Clone, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EventItem {
    /// RFC 3339.
    pub time: String,
    /// Kind of the object the event is about.
    pub kind: String,
    pub name: String,
    /// `Normal` or `Warning`.
    #[serde(rename = "type")]
    pub type_: String,
    pub reason: String,
    pub message: String,
}

/// The data of every `change` event of `GET /api/v1/stream`.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Change {
    /// Grows with every change of the hub's caches; refetch when it differs from the last seen.
    pub revision: u64,
}

/// A stream ticket: pass it as `GET /api/v1/stream?ticket=…` within its lifetime; it is
/// good for one connection of the user it was issued to.
#[derive(Debug, Clone, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StreamTicket {
    pub ticket: String,
    pub expires_in_seconds: u64,
}

/// Every error answer.
#[derive(Debug, Clone, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ErrorBody {
    /// A short category: `unauthenticated`, `forbidden`, `rate_limited`, `not_found`,
    /// `bad_request`, `method_not_allowed`, `unavailable`.
    pub error: String,
    /// For people; never internal details.
    pub reason: String,
}
