//! `ManagedClusterModule` (`hub.kmm.sigs.x-k8s.io/v1beta1`, cluster-scoped).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::module::ModuleSpec;
use crate::rollout::{RolloutStatus, RolloutStrategy};

/// At most this many entries are kept in `status.images` and `status.clusters`;
/// the rest are counted in the matching `…Omitted` field.
pub const STATUS_LIST_LIMIT: usize = 64;

// CEL: what `validate_mcm` checks and a CRD can express (the webhook checks everything).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[kube(
    validation = Rule::new("self.metadata.name.size() + self.spec.spokeNamespace.size() <= 41")
        .message("metadata.name and spec.spokeNamespace together must be at most 41 characters: the spoke Module <spokeNamespace>/<name> would be rejected there")
        .field_path(".spec.spokeNamespace"),
    validation = Rule::new("!has(self.spec.placementRef) || size(self.spec.selector) == 0")
        .message("must be empty when spec.placementRef is set: the Placement chooses the clusters")
        .field_path(".spec.selector"),
    validation = Rule::new("!has(self.spec.day0) || !has(self.spec.day1)")
        .message("spec.day0 and spec.day1 cannot both be set: a node boots the layered OS image with the module in it, or loads the module at boot, not both")
        .field_path(".spec.day0"),
    group = "hub.kmm.sigs.x-k8s.io",
    version = "v1beta1",
    kind = "ManagedClusterModule",
    plural = "managedclustermodules",
    shortname = "mcm",
    status = "ManagedClusterModuleStatus",
    printcolumn = r#"{"name":"Desired","type":"integer","jsonPath":".status.numberDesired"}"#,
    printcolumn = r#"{"name":"Applied","type":"integer","jsonPath":".status.numberApplied"}"#,
    printcolumn = r#"{"name":"Available","type":"integer","jsonPath":".status.numberAvailable"}"#,
    printcolumn = r#"{"name":"Degraded","type":"integer","jsonPath":".status.numberDegraded"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Rollout","type":"string","jsonPath":".status.rollout.phase"}"#,
    printcolumn = r#"{"name":"Updated","type":"integer","jsonPath":".status.rollout.updated"}"#,
    printcolumn = r#"{"name":"Failed","type":"integer","jsonPath":".status.rollout.failed","priority":1}"#,
    printcolumn = r#"{"name":"Revision","type":"string","jsonPath":".status.rollout.revision","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ManagedClusterModuleSpec {
    /// The Module spec delivered to every selected cluster (build and sign run on the hub).
    pub module_spec: ModuleSpec,
    /// Namespace of the Module on the spokes (created there by the work unless
    /// `spokePrerequisites.namespace` is false).
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')")
        .message("must be a DNS label (lower case letters, digits and '-', starting and ending with a letter or digit)"))]
    #[schemars(length(min = 1, max = 63))]
    pub spoke_namespace: String,
    /// Label equality selector over ManagedClusters; empty selects all (unless
    /// `placementRef` is set, which requires it empty).
    pub selector: BTreeMap<String, String>,
    /// kmm-fleet addition. An OCM `Placement` (`cluster.open-cluster-management.io/v1beta1`)
    /// in the hub's namespace that chooses the clusters instead of `selector` (which must then
    /// be empty): the hub ships to exactly the clusters of its PlacementDecisions and follows
    /// them as they change. While the Placement is missing or has not decided yet, the clusters
    /// keep what they were shipped (condition reason `PlacementNotFound` / `PlacementPending`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement_ref: Option<PlacementRef>,
    /// kmm-fleet addition. What the hub does when an image tag it pinned now points to
    /// another digest (someone pushed to the tag): `Repin` ships the new digest at the next
    /// lookup; `Keep` keeps shipping the pinned digest and reports the moved tag (condition
    /// `TagMoved`, event `TagMoved`). Unset: `Keep` for images the hub signs (`sign` set),
    /// `Repin` for the others. Digests the hub produced (its builds, its signing) and a
    /// change of `imageRebuildTriggerGeneration` are always taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moved_tag_policy: Option<MovedTagPolicy>,
    /// kmm-fleet addition. What the hub creates on each selected cluster, in the same
    /// ManifestWork as the Module, so that a fresh spoke needs no preparation by hand. Unset
    /// fields take their defaults: `namespace` and `serviceAccounts` true, `pullSecret` false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spoke_prerequisites: Option<SpokePrerequisites>,
    /// kmm-fleet addition. Day-1 loading on the selected OpenShift clusters: besides the
    /// Module, each one's ManifestWork carries a MachineConfig for `machineConfigPool` whose
    /// services load the module at boot, before the network (see docs/day0-day1.md), with the
    /// images the hub pinned for that cluster's kernels. Selected clusters that are not
    /// OpenShift get the Module only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub day1: Option<Day1Loading>,
    /// kmm-fleet addition. Day 0 by CoreOS layering on the selected OpenShift clusters: the
    /// hub builds (and signs, when asked) a layered OS image `FROM` each cluster's RHCOS
    /// image with the module in it, once per distinct (RHCOS image, kernel) of the fleet,
    /// and ships each cluster, after the Module, a MachineConfig for `machineConfigPool`
    /// whose `osImageURL` is that image pinned by digest (see docs/day0-day1.md). Selected
    /// clusters that are not OpenShift get the Module only. Cannot be combined with `day1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub day0: Option<Day0Layering>,
    /// How a new revision of the clusters' ManifestWorks reaches the selected clusters (OCM's
    /// `RolloutStrategy` vocabulary). Unset or `type: All`: every cluster at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout_strategy: Option<RolloutStrategy>,
}

/// See `spec.day1`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Day1Loading {
    /// The MachineConfigPool whose nodes load the module at boot: `worker`, `master` or a
    /// pool that exists on the spokes (the hub creates no pool).
    #[schemars(length(min = 1, max = 63))]
    pub machine_config_pool: String,
    /// The MachineConfig's name on the spokes; default `99-<pool>-kmm-<MCM name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_config_name: Option<String>,
    /// The in-tree module unloaded before the out-of-tree one loads; default: the first of
    /// the kernel mapping's `inTreeModulesToRemove`, else the module itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_tree_module: Option<String>,
}

impl Day1Loading {
    /// The MachineConfig's name for the MCM `mcm`.
    pub fn machine_config_name(&self, mcm: &str) -> String {
        self.machine_config_name
            .clone()
            .unwrap_or_else(|| format!("99-{}-kmm-{mcm}", self.machine_config_pool))
    }
}

/// See `spec.day0`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Day0Layering {
    /// The MachineConfigPool whose nodes boot the layered image: `worker`, `master` or a
    /// pool that exists on the spokes (the hub creates no pool).
    #[schemars(length(min = 1, max = 63))]
    pub machine_config_pool: String,
    /// The MachineConfig's name on the spokes; default `99-<pool>-kmm-day0-<MCM name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_config_name: Option<String>,
    /// The layered image's repository, with an optional tag template. Variables:
    /// `${KERNEL_FULL_VERSION}` (the kernel of the RHCOS image) and `${OS_IMAGE_DIGEST}`
    /// (the first 12 hex digits of the RHCOS image's digest), plus the Module variables. A
    /// tag must use both, so that distinct (RHCOS image, kernel) pairs never share a tag;
    /// without a tag the hub tags `<kernel>-<12 hex>`.
    #[schemars(length(min = 1))]
    pub container_image: String,
    /// How the layered image is built: a Dockerfile `FROM ${RHCOS_IMAGE}` (ConfigMap in the
    /// hub's namespace) and build arguments. The hub adds `RHCOS_IMAGE` (the cluster's RHCOS
    /// image pinned by digest), `DTK_IMAGE` and `DTK_AUTO` (the Driver Toolkit image for the
    /// kernel), `KERNEL_VERSION` and `KERNEL_FULL_VERSION`.
    pub build: crate::module::Build,
    /// Sign the module files of the layered image with the hub's signer: `filesToSign` are
    /// paths inside the image (e.g. `/usr/lib/modules/${KERNEL_FULL_VERSION}/m.ko`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sign: Option<crate::module::Sign>,
    /// The RHCOS image to layer on for every selected cluster, instead of the one each
    /// cluster publishes (ClusterClaim `os-image.kmm.node.kubernetes.io`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os_image: Option<String>,
}

impl Day0Layering {
    /// The MachineConfig's name for the MCM `mcm`.
    pub fn machine_config_name(&self, mcm: &str) -> String {
        self.machine_config_name
            .clone()
            .unwrap_or_else(|| format!("99-{}-kmm-day0-{mcm}", self.machine_config_pool))
    }
}

/// See `spec.spokePrerequisites`. Each field is optional; the defaults are those of
/// [`SpokePrerequisites::effective`].
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SpokePrerequisites {
    /// Create `spokeNamespace`, labelled `pod-security.kubernetes.io/enforce: privileged`
    /// (loader and device-plugin pods are privileged). Never deleted by the hub: it is left
    /// on the spoke when the work goes. Default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<bool>,
    /// Create the ServiceAccounts named by `moduleLoader.serviceAccountName`,
    /// `devicePlugin.serviceAccountName` and `dra.serviceAccountName` in `spokeNamespace` (unnamed: the namespace's
    /// `default`, which Kubernetes makes). Never deleted by the hub. Default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_accounts: Option<bool>,
    /// Copy the hub's `imageRepoSecret` (its `.dockerconfigjson`) to `spokeNamespace` on
    /// every selected cluster, as a `kubernetes.io/dockerconfigjson` Secret of the same name,
    /// kept in step with the hub's and deleted with the work. This hands the registry
    /// credential to every selected cluster. Default false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_secret: Option<bool>,
}

/// The prerequisites an MCM asks for, with the defaults applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prerequisites {
    pub namespace: bool,
    pub service_accounts: bool,
    pub pull_secret: bool,
}

impl SpokePrerequisites {
    /// The defaults applied: namespace and ServiceAccounts yes, pull secret no.
    pub fn effective(this: Option<&Self>) -> Prerequisites {
        let this = this.copied().unwrap_or_default();
        Prerequisites {
            namespace: this.namespace.unwrap_or(true),
            service_accounts: this.service_accounts.unwrap_or(true),
            pull_secret: this.pull_secret.unwrap_or(false),
        }
    }
}

impl ManagedClusterModuleSpec {
    /// `spec.spokePrerequisites` with its defaults.
    pub fn prerequisites(&self) -> Prerequisites {
        SpokePrerequisites::effective(self.spoke_prerequisites.as_ref())
    }
}

/// See `spec.placementRef`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct PlacementRef {
    /// Name of the Placement, in the hub's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// See `spec.movedTagPolicy`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum MovedTagPolicy {
    /// Ship the digest the tag points to now.
    Repin,
    /// Keep shipping the digest pinned before; report the moved tag.
    Keep,
}

/// Condition type on an MCM: an image tag moved and was not re-pinned.
pub const TAG_MOVED: &str = "TagMoved";

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ManagedClusterModuleStatus {
    /// ManifestWorks written for selected clusters.
    #[serde(default)]
    pub number_desired: i32,
    /// ManifestWorks whose `Applied` condition is True.
    #[serde(default)]
    pub number_applied: i32,
    /// ManifestWorks whose Module reports every desired loader and device-plugin pod available.
    #[serde(default)]
    pub number_available: i32,
    /// ManifestWorks whose `Degraded` condition is True.
    #[serde(default)]
    pub number_degraded: i32,

    /// `Ready`, `Progressing`, `Degraded`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::schema::conditions")]
    pub conditions: Vec<Condition>,

    /// One entry per distinct target image (bounded, see `imagesOmitted`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<ImageStatus>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub images_omitted: i32,

    /// Selected clusters that cannot get (all of) their work, with the reason (bounded).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clusters: Vec<ClusterProblem>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub clusters_omitted: i32,

    /// Day-1 loading (`spec.day1`): what each selected OpenShift cluster was shipped and the
    /// state of its MachineConfigPool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub day1: Option<Day1Status>,

    /// Day 0 by CoreOS layering (`spec.day0`): per selected OpenShift cluster, its RHCOS
    /// image and kernel, the layered image shipped as `osImageURL` and the state of its pool,
    /// or what it waits for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub day0: Option<Day0Status>,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_rebuild_trigger_generation: Option<i32>,

    /// The progressive rollout (`spec.rolloutStrategy` other than `All`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutStatus>,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

fn is_zero(n: &i32) -> bool {
    *n == 0
}

/// The state of one distinct target image of the image plan.
#[derive(
    Serialize,
    Deserialize,
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    JsonSchema,
)]
pub enum ImageState {
    /// Digest known, signed as required.
    Ready,
    /// Not resolved yet.
    #[default]
    Pending,
    /// A build Job is running.
    Building,
    /// Being signed by the hub.
    Signing,
    /// Not in the registry and there is no build section.
    Missing,
    /// Build or signing failed, or the registry could not be asked.
    Failed,
}

impl ImageState {
    pub fn as_str(self) -> &'static str {
        match self {
            ImageState::Ready => "Ready",
            ImageState::Pending => "Pending",
            ImageState::Building => "Building",
            ImageState::Signing => "Signing",
            ImageState::Missing => "Missing",
            ImageState::Failed => "Failed",
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageStatus {
    pub image: String,
    /// A kernel this image serves (the first in sort order when several share it).
    pub kernel: String,
    /// The digest shipped for this image (kept while the registry cannot be asked; a tag
    /// that moves away from it is re-pinned or reported, see `spec.movedTagPolicy`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    pub state: ImageState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Number of selected clusters that need this image.
    #[serde(default)]
    pub clusters: i32,
}

/// See `status.day1`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Day1Status {
    /// Clusters whose ManifestWork carries the Day-1 MachineConfig.
    #[serde(default)]
    pub shipped: i32,
    /// Of those, clusters whose pool reports every machine updated.
    #[serde(default)]
    pub updated: i32,
    /// Of those, clusters whose pool reports degraded machines.
    #[serde(default)]
    pub degraded: i32,
    /// Selected clusters that are not OpenShift: no MachineConfig there, the Module only.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub not_open_shift: i32,
    /// Per cluster, degraded and updating pools first (bounded, see `clustersOmitted`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clusters: Vec<Day1ClusterStatus>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub clusters_omitted: i32,
}

/// One cluster's Day-1 MachineConfig and its pool.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Day1ClusterStatus {
    pub name: String,
    pub machine_config: String,
    /// `kernel=image@digest`, one per kernel the MachineConfig loads for.
    pub images: Vec<String>,
    /// `Updated` (every machine of the pool runs the rendered config), `Updating`,
    /// `Degraded`, or `Unknown` (no report from the spoke yet, or no such pool there).
    pub pool: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_count: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_machine_count: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub degraded_machine_count: Option<i64>,
}

/// See `status.day0`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Day0Status {
    /// Clusters whose ManifestWork carries the Day-0 MachineConfig.
    #[serde(default)]
    pub shipped: i32,
    /// Of those, clusters whose pool reports every machine updated.
    #[serde(default)]
    pub updated: i32,
    /// Of those, clusters whose pool reports degraded machines.
    #[serde(default)]
    pub degraded: i32,
    /// OpenShift clusters waiting for their layered image (RHCOS image or its kernel
    /// unknown, no Driver Toolkit, being built, failed); a cluster shipped an earlier image
    /// keeps it meanwhile and counts here too.
    #[serde(default)]
    pub waiting: i32,
    /// Selected clusters that are not OpenShift: no MachineConfig there, the Module only.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub not_open_shift: i32,
    /// Per cluster, waiting, degraded and updating first (bounded, see `clustersOmitted`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clusters: Vec<Day0ClusterStatus>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub clusters_omitted: i32,
}

/// One OpenShift cluster's Day-0 state.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Day0ClusterStatus {
    pub name: String,
    /// The RHCOS image the layered image is built on (from the cluster or `spec.day0.osImage`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os_image: Option<String>,
    /// The kernel of that image (its `ostree.linux` label).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    /// The layered image shipped as `osImageURL` (`repo@sha256:…`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The MachineConfig shipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_config: Option<String>,
    /// `Updated`, `Updating`, `Degraded` or `Unknown` (see `status.day1`); empty while
    /// nothing was shipped.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pool: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_count: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_machine_count: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub degraded_machine_count: Option<i64>,
    /// Why the cluster does not (yet) run the layered image it should: `OSImageUnknown`,
    /// `OSImageKernelUnknown`, `DriverToolkitUnknown`, `ImageBuilding`, `ImageFailed`, ….
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterProblem {
    pub name: String,
    /// A short CamelCase reason, e.g. `NoKernelClaim`, `NoMatchingKernel`, `ImagesPending`,
    /// `DRANotSupported`.
    pub reason: String,
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prerequisites_default_to_namespace_and_service_accounts_only() {
        let spec: ManagedClusterModuleSpec =
            serde_yaml::from_str("spokeNamespace: ns\nselector: {}\nmoduleSpec: {selector: {}}\n")
                .unwrap();
        let all = Prerequisites {
            namespace: true,
            service_accounts: true,
            pull_secret: false,
        };
        assert_eq!(spec.prerequisites(), all);
        let spec: ManagedClusterModuleSpec = serde_yaml::from_str(
            "spokeNamespace: ns\nselector: {}\nmoduleSpec: {selector: {}}\nspokePrerequisites: {namespace: false, pullSecret: true}\n",
        )
        .unwrap();
        assert_eq!(
            spec.prerequisites(),
            Prerequisites {
                namespace: false,
                service_accounts: true,
                pull_secret: true,
            }
        );
    }
}
