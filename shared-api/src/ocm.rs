//! The Open Cluster Management types kmm-fleet reads and writes, with OCM's exact
//! group/version/kind and field names (a subset of fields: the ones we touch).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The ClusterClaim the spoke publishes: distinct node kernels, sorted, newline-joined.
pub const KERNEL_VERSIONS_CLAIM: &str = "kernel-versions.kmm.node.kubernetes.io";
/// OCM caps a ClusterClaim value at this many characters.
pub const CLAIM_VALUE_MAX: usize = 1024;
/// The ClusterClaim an OpenShift spoke publishes: `<kernel>=<Driver Toolkit image>` lines,
/// sorted by kernel, spread over numbered claims like the kernel list.
pub const DTK_IMAGES_CLAIM: &str = "kernel-dtk-images.kmm.node.kubernetes.io";
/// At most this many Driver Toolkit claims (the main one and `.1` … `.4`): the spoke's RBAC
/// names each, and OCM syncs only a few custom claims per cluster.
pub const DTK_CLAIMS_MAX: usize = 5;

/// `ManagedCluster` (`cluster.open-cluster-management.io/v1`, cluster-scoped).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "cluster.open-cluster-management.io",
    version = "v1",
    kind = "ManagedCluster",
    plural = "managedclusters",
    status = "ManagedClusterStatus",
    printcolumn = r#"{"name":"Hub accepted","type":"boolean","jsonPath":".spec.hubAcceptsClient"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ManagedClusterSpec {
    #[serde(default)]
    pub hub_accepts_client: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub managed_cluster_client_configs: Vec<ClientConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_duration_seconds: Option<i32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub taints: Vec<Taint>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClientConfig {
    #[serde(default)]
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_bundle: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Taint {
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    pub effect: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_added: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ManagedClusterStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cluster_claims: Vec<ManagedClusterClaim>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<ManagedClusterVersion>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct ManagedClusterClaim {
    pub name: String,
    #[serde(default)]
    pub value: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct ManagedClusterVersion {
    #[serde(default)]
    pub kubernetes: String,
}

/// `ClusterClaim` (`cluster.open-cluster-management.io/v1alpha1`, cluster-scoped, on spokes).
#[derive(
    CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema,
)]
#[kube(
    group = "cluster.open-cluster-management.io",
    version = "v1alpha1",
    kind = "ClusterClaim",
    plural = "clusterclaims"
)]
pub struct ClusterClaimSpec {
    /// At most 1024 characters.
    #[schemars(length(max = 1024))]
    #[serde(default)]
    pub value: String,
}

/// `Placement` (`cluster.open-cluster-management.io/v1beta1`, namespaced): which managed
/// clusters a consumer gets. The hub only needs to know it exists (`spec.placementRef` of an
/// MCM names one in the hub's namespace); OCM's placement controller writes the decisions.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "cluster.open-cluster-management.io",
    version = "v1beta1",
    kind = "Placement",
    plural = "placements",
    namespaced
)]
pub struct PlacementSpec {
    /// The ManagedClusterSets it selects from (bound to its namespace).
    #[serde(default, rename = "clusterSets", skip_serializing_if = "Vec::is_empty")]
    pub cluster_sets: Vec<String>,
}

/// `PlacementDecision` (`cluster.open-cluster-management.io/v1beta1`, namespaced): one page
/// of a Placement's decisions, labelled [`PLACEMENT_LABEL`] with the Placement's name and
/// [`DECISION_GROUP_INDEX_LABEL`] / [`DECISION_GROUP_NAME_LABEL`] with its decision group.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct PlacementDecision {
    #[serde(default, rename = "apiVersion")]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<PlacementDecisionStatus>,
}

impl kube::Resource for PlacementDecision {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;

    fn kind(_: &()) -> std::borrow::Cow<'_, str> {
        "PlacementDecision".into()
    }
    fn group(_: &()) -> std::borrow::Cow<'_, str> {
        "cluster.open-cluster-management.io".into()
    }
    fn version(_: &()) -> std::borrow::Cow<'_, str> {
        "v1beta1".into()
    }
    fn plural(_: &()) -> std::borrow::Cow<'_, str> {
        "placementdecisions".into()
    }
    fn meta(&self) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        &mut self.metadata
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct PlacementDecisionStatus {
    #[serde(default)]
    pub decisions: Vec<ClusterDecision>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterDecision {
    /// Empty when the Placement wants more clusters than there are.
    #[serde(default)]
    pub cluster_name: String,
    #[serde(default)]
    pub reason: String,
}

/// Label on PlacementDecisions: the name of their Placement.
pub const PLACEMENT_LABEL: &str = "cluster.open-cluster-management.io/placement";
/// Label on PlacementDecisions: the index of their decision group (`0`, `1`, …).
pub const DECISION_GROUP_INDEX_LABEL: &str =
    "cluster.open-cluster-management.io/decision-group-index";
/// Label on PlacementDecisions: the name of their decision group (empty when unnamed).
pub const DECISION_GROUP_NAME_LABEL: &str =
    "cluster.open-cluster-management.io/decision-group-name";

/// `ManifestWork` (`work.open-cluster-management.io/v1`, in the cluster's namespace on the hub).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "work.open-cluster-management.io",
    version = "v1",
    kind = "ManifestWork",
    plural = "manifestworks",
    namespaced,
    status = "ManifestWorkStatus"
)]
#[serde(rename_all = "camelCase")]
pub struct ManifestWorkSpec {
    #[serde(default)]
    pub workload: ManifestsTemplate,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delete_option: Option<DeleteOption>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub manifest_configs: Vec<ManifestConfigOption>,
    /// Who the work agent applies the manifests as: it checks, by SubjectAccessReviews on the
    /// spoke, that this subject may create, get, update, patch and delete every manifest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub executor: Option<ManifestWorkExecutor>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct ManifestWorkExecutor {
    pub subject: ManifestWorkExecutorSubject,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ManifestWorkExecutorSubject {
    /// `ServiceAccount` (the only type OCM supports).
    #[serde(rename = "type")]
    pub type_: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<ManifestWorkSubjectServiceAccount>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct ManifestWorkSubjectServiceAccount {
    pub namespace: String,
    pub name: String,
}

impl ManifestWorkExecutor {
    /// The service account `namespace/name` on the spoke.
    pub fn service_account(namespace: &str, name: &str) -> Self {
        Self {
            subject: ManifestWorkExecutorSubject {
                type_: "ServiceAccount".into(),
                service_account: Some(ManifestWorkSubjectServiceAccount {
                    namespace: namespace.into(),
                    name: name.into(),
                }),
            },
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct ManifestsTemplate {
    #[serde(default)]
    pub manifests: Vec<Manifest>,
}

/// One embedded Kubernetes object (OCM's `runtime.RawExtension`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(transparent)]
pub struct Manifest(
    #[schemars(schema_with = "crate::schema::embedded_object")] pub serde_json::Value,
);

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeleteOption {
    /// `Foreground`, `Orphan` or `SelectivelyOrphan`.
    #[serde(default)]
    pub propagation_policy: String,
    /// With `SelectivelyOrphan`: the manifests left on the spoke when the work is deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selectively_orphans: Option<SelectivelyOrphan>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SelectivelyOrphan {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub orphaning_rules: Vec<OrphaningRule>,
}

/// One manifest of the work, by group, resource, namespace (empty: cluster-scoped) and name.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct OrphaningRule {
    #[serde(default)]
    pub group: String,
    pub resource: String,
    #[serde(default)]
    pub namespace: String,
    pub name: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ManifestConfigOption {
    pub resource_identifier: ResourceIdentifier,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub feedback_rules: Vec<FeedbackRule>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_strategy: Option<UpdateStrategy>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct ResourceIdentifier {
    #[serde(default)]
    pub group: String,
    pub resource: String,
    pub name: String,
    #[serde(default)]
    pub namespace: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FeedbackRule {
    /// `WellKnownStatus` or `JSONPaths`.
    #[serde(rename = "type")]
    pub type_: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub json_paths: Vec<JsonPath>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct JsonPath {
    pub name: String,
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UpdateStrategy {
    /// `Update`, `CreateOnly` or `ServerSideApply`.
    #[serde(rename = "type")]
    pub type_: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ManifestWorkStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_status: Option<ManifestResourceStatus>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct ManifestResourceStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub manifests: Vec<ManifestCondition>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ManifestCondition {
    pub resource_meta: ManifestResourceMeta,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_feedback: Option<StatusFeedbackResult>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct ManifestResourceMeta {
    #[serde(default)]
    pub ordinal: i32,
    #[serde(default)]
    pub group: String,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub resource: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub namespace: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct StatusFeedbackResult {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<FeedbackValue>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FeedbackValue {
    pub name: String,
    pub field_value: FieldValue,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FieldValue {
    /// `Integer`, `String`, `Boolean` or `JsonRaw`.
    #[serde(rename = "type")]
    pub type_: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub integer: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub string: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boolean: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub json_raw: Option<String>,
}

/// OCM's finalizer on ManifestWorks: the work agent removes it once it deleted what it applied.
pub const WORK_FINALIZER: &str = "cluster.open-cluster-management.io/manifest-work-cleanup";
/// The ManagedCluster condition OCM keeps `True` while the cluster's agent renews its lease.
pub const MANAGED_CLUSTER_AVAILABLE: &str = "ManagedClusterConditionAvailable";

/// ManifestWork condition types (OCM).
pub mod work_conditions {
    pub const APPLIED: &str = "Applied";
    pub const AVAILABLE: &str = "Available";
    pub const PROGRESSING: &str = "Progressing";
    pub const DEGRADED: &str = "Degraded";
}

impl ManifestWorkStatus {
    /// Whether the condition of that type is `True`.
    pub fn condition_true(&self, type_: &str) -> bool {
        self.conditions
            .iter()
            .any(|c| c.type_ == type_ && c.status == "True")
    }

    /// The integer feedback value of that name on the first manifest that reports it.
    pub fn feedback_integer(&self, name: &str) -> Option<i64> {
        self.resource_status
            .as_ref()?
            .manifests
            .iter()
            .find_map(|m| {
                m.status_feedback
                    .as_ref()?
                    .values
                    .iter()
                    .find(|v| v.name == name)
                    .and_then(|v| v.field_value.integer)
            })
    }
}

impl ManagedClusterStatus {
    /// Whether OCM reports the cluster available (its agent renews its lease).
    pub fn available(&self) -> bool {
        self.conditions
            .iter()
            .any(|c| c.type_ == MANAGED_CLUSTER_AVAILABLE && c.status == "True")
    }

    /// The kernels a spoke published, from the claim and its numbered overflow claims
    /// (`<claim>`, `<claim>.1`, `<claim>.2`, …), distinct and sorted. `None` without any claim.
    pub fn kernel_versions(&self) -> Option<Vec<String>> {
        let mut kernels: Vec<String> = self
            .claim_lines(KERNEL_VERSIONS_CLAIM)?
            .into_iter()
            .map(str::to_string)
            .collect();
        kernels.sort();
        kernels.dedup();
        Some(kernels)
    }

    /// Kernel → Driver Toolkit image, from the [`DTK_IMAGES_CLAIM`] claim and its numbered
    /// overflow claims (`<kernel>=<image>` lines); empty when the cluster published none.
    /// Lines without `=` are skipped; a kernel listed twice keeps its first image.
    pub fn dtk_images(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for line in self.claim_lines(DTK_IMAGES_CLAIM).unwrap_or_default() {
            if let Some((k, i)) = line.split_once('=')
                && !k.trim().is_empty()
                && !i.trim().is_empty()
            {
                out.entry(k.trim().to_string())
                    .or_insert_with(|| i.trim().to_string());
            }
        }
        out
    }

    /// The RHCOS image the cluster runs (claim [`crate::day0::OS_IMAGE_CLAIM`], OpenShift
    /// spokes); `None` without the claim or with an empty one.
    pub fn os_image(&self) -> Option<String> {
        self.cluster_claims
            .iter()
            .find(|c| c.name == crate::day0::OS_IMAGE_CLAIM)
            .map(|c| c.value.trim().to_string())
            .filter(|v| !v.is_empty())
    }

    /// The non-empty lines of a claim and its numbered overflow claims, in claim order;
    /// `None` when the cluster has none of them.
    fn claim_lines(&self, base: &str) -> Option<Vec<&str>> {
        let mut parts: Vec<(usize, &str)> = self
            .cluster_claims
            .iter()
            .filter_map(|c| claim_part_of(base, &c.name).map(|i| (i, c.value.as_str())))
            .collect();
        if parts.is_empty() {
            return None;
        }
        parts.sort_by_key(|(i, _)| *i);
        Some(
            parts
                .iter()
                .flat_map(|(_, v)| v.split('\n'))
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect(),
        )
    }
}

/// 0 for the kernel-versions claim, n for `<claim>.n`.
pub fn claim_part_index(name: &str) -> Option<usize> {
    claim_part_of(KERNEL_VERSIONS_CLAIM, name)
}

/// 0 for the claim named `base`, n for its overflow claim `<base>.n` (n > 0).
pub fn claim_part_of(base: &str, name: &str) -> Option<usize> {
    if name == base {
        return Some(0);
    }
    name.strip_prefix(base)?
        .strip_prefix('.')?
        .parse()
        .ok()
        .filter(|n: &usize| *n > 0)
}

/// Split sorted kernels into claim values of at most [`CLAIM_VALUE_MAX`] characters:
/// `(claim name, value)`, the first under [`KERNEL_VERSIONS_CLAIM`], then `.1`, `.2`, ….
/// A single kernel longer than the cap is truncated (kernels are far shorter in practice).
pub fn split_kernel_claims(kernels: &[String]) -> Vec<(String, String)> {
    let lines: Vec<String> = kernels
        .iter()
        .map(|k| k.chars().take(CLAIM_VALUE_MAX).collect())
        .collect();
    let mut parts = split_lines(KERNEL_VERSIONS_CLAIM, &lines);
    if parts.is_empty() {
        parts.push((KERNEL_VERSIONS_CLAIM.to_string(), String::new()));
    }
    parts
}

/// The Driver Toolkit claims for `kernel → image`: `<kernel>=<image>` lines in kernel order,
/// spread over [`DTK_IMAGES_CLAIM`], `.1`, … up to [`DTK_CLAIMS_MAX`] claims. Nothing for an
/// empty map (a cluster without a Driver Toolkit publishes no claim). Returns the claims and
/// the kernels left out (a line longer than [`CLAIM_VALUE_MAX`], or past the last claim).
pub fn split_dtk_claims(images: &BTreeMap<String, String>) -> (Vec<(String, String)>, Vec<String>) {
    let mut left_out = Vec::new();
    let lines: Vec<String> = images
        .iter()
        .filter_map(|(k, i)| {
            let line = format!("{k}={i}");
            if line.len() > CLAIM_VALUE_MAX || k.contains('=') || line.contains('\n') {
                left_out.push(k.clone());
                None
            } else {
                Some(line)
            }
        })
        .collect();
    let mut parts = split_lines(DTK_IMAGES_CLAIM, &lines);
    if parts.len() > DTK_CLAIMS_MAX {
        for (_, v) in parts.drain(DTK_CLAIMS_MAX..) {
            left_out.extend(
                v.lines()
                    .filter_map(|l| l.split_once('=').map(|(k, _)| k.to_string())),
            );
        }
    }
    (parts, left_out)
}

/// Pack lines (each at most [`CLAIM_VALUE_MAX`]) into newline-joined values of at most the
/// cap, named `base`, `base.1`, `base.2`, …; nothing for no lines.
fn split_lines(base: &str, lines: &[String]) -> Vec<(String, String)> {
    let mut values: Vec<String> = Vec::new();
    let mut current = String::new();
    for l in lines {
        let needed = if current.is_empty() {
            l.len()
        } else {
            current.len() + 1 + l.len()
        };
        if needed > CLAIM_VALUE_MAX && !current.is_empty() {
            values.push(std::mem::take(&mut current));
        }
        if !current.is_empty() {
            current.push('\n');
        }
        current.push_str(l);
    }
    if !current.is_empty() {
        values.push(current);
    }
    values
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            let name = if i == 0 {
                base.to_string()
            } else {
                format!("{base}.{i}")
            };
            (name, v)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(pairs: &[(String, String)]) -> ManagedClusterStatus {
        ManagedClusterStatus {
            cluster_claims: pairs
                .iter()
                .map(|(n, v)| ManagedClusterClaim {
                    name: n.clone(),
                    value: v.clone(),
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn claims_split_and_join_round_trip() {
        let kernels: Vec<String> = (0..200)
            .map(|i| format!("5.14.0-{i:03}.el9_2.x86_64"))
            .collect();
        let parts = split_kernel_claims(&kernels);
        assert!(parts.len() > 1, "200 kernels must overflow one claim");
        assert!(parts.iter().all(|(_, v)| v.len() <= CLAIM_VALUE_MAX));
        assert_eq!(parts[1].0, format!("{KERNEL_VERSIONS_CLAIM}.1"));
        assert_eq!(claims(&parts).kernel_versions().unwrap(), kernels);
    }

    #[test]
    fn no_claim_is_none_and_unrelated_claims_are_ignored() {
        let st = claims(&[("id.k8s.io".into(), "x".into())]);
        assert_eq!(st.kernel_versions(), None);
        assert_eq!(
            claim_part_index("kernel-versions.kmm.node.kubernetes.io.x"),
            None
        );
        assert_eq!(
            claim_part_index("kernel-versions.kmm.node.kubernetes.io.0"),
            None
        );
    }

    #[test]
    fn dtk_claims_round_trip_and_overflow() {
        let images: BTreeMap<String, String> = (0..30)
            .map(|i| {
                (
                    format!("5.14.0-{i:03}.el9_2.x86_64"),
                    format!("quay.io/openshift-release-dev/ocp-v4.0-art-dev@sha256:{i:064}"),
                )
            })
            .collect();
        let (parts, left_out) = split_dtk_claims(&images);
        assert!(left_out.is_empty());
        assert!(parts.len() > 1, "30 entries must overflow one claim");
        assert!(parts.len() <= DTK_CLAIMS_MAX);
        assert_eq!(parts[0].0, DTK_IMAGES_CLAIM);
        assert_eq!(parts[1].0, format!("{DTK_IMAGES_CLAIM}.1"));
        assert!(parts.iter().all(|(_, v)| v.len() <= CLAIM_VALUE_MAX));
        let st = claims(&parts);
        assert_eq!(st.dtk_images(), images);
        assert_eq!(
            st.kernel_versions(),
            None,
            "the DTK claims are not kernel claims"
        );

        // Past the last claim: entries are left out, never written to a sixth claim.
        let many: BTreeMap<String, String> = (0..100)
            .map(|i| {
                (
                    format!("k{i:03}"),
                    format!("registry.example/dtk@sha256:{i:064}"),
                )
            })
            .collect();
        let (parts, left_out) = split_dtk_claims(&many);
        assert_eq!(parts.len(), DTK_CLAIMS_MAX);
        let kept = claims(&parts).dtk_images();
        assert_eq!(kept.len() + left_out.len(), 100);
        assert!(left_out.iter().all(|k| !kept.contains_key(k)));

        // Nothing known: no claim at all; an entry too long for a claim is left out.
        assert!(split_dtk_claims(&BTreeMap::new()).0.is_empty());
        let long = BTreeMap::from([("k".to_string(), "x".repeat(CLAIM_VALUE_MAX))]);
        assert_eq!(split_dtk_claims(&long), (vec![], vec!["k".to_string()]));
    }

    #[test]
    fn dtk_claim_parsing_is_lenient() {
        let st = claims(&[
            (format!("{DTK_IMAGES_CLAIM}.1"), "k2=img2\nk1=second".into()),
            (DTK_IMAGES_CLAIM.into(), "k1=img1\nbroken\n=x\nk3=\n".into()),
            (KERNEL_VERSIONS_CLAIM.into(), "k1".into()),
        ]);
        assert_eq!(
            st.dtk_images(),
            BTreeMap::from([
                ("k1".to_string(), "img1".to_string()),
                ("k2".to_string(), "img2".to_string())
            ])
        );
        assert_eq!(claim_part_of(DTK_IMAGES_CLAIM, KERNEL_VERSIONS_CLAIM), None);
    }

    #[test]
    fn claim_value_is_sorted_and_distinct() {
        let st = claims(&[(KERNEL_VERSIONS_CLAIM.into(), "b\na1\n\na2\nb".into())]);
        assert_eq!(st.kernel_versions().unwrap(), vec!["a1", "a2", "b"]);
    }
}
