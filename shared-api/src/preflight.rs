//! `FleetPreflightValidation` (`hub.kmm.sigs.x-k8s.io/v1beta1`, cluster-scoped): "will every
//! ManagedClusterModule work on the kernel the next OS update brings?", asked of the whole
//! fleet. Shaped on upstream KMM's `PreflightValidation` (v1beta2): target kernels, a switch
//! to build and push the missing images ahead, and a result per module — here per MCM and
//! kernel.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

use crate::validate::Violation;

/// At most this many entries are kept in `status.results` (failures first); the rest are
/// counted in `resultsOmitted`. The counts always cover every result.
pub const RESULTS_LIMIT: usize = 256;
/// At most this many kernels per object.
pub const MAX_KERNELS: usize = 16;

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "hub.kmm.sigs.x-k8s.io",
    version = "v1beta1",
    kind = "FleetPreflightValidation",
    plural = "fleetpreflightvalidations",
    shortname = "fpv",
    status = "FleetPreflightValidationStatus",
    printcolumn = r#"{"name":"Kernels","type":"string","jsonPath":".spec.kernelVersions"}"#,
    printcolumn = r#"{"name":"Success","type":"integer","jsonPath":".status.success"}"#,
    printcolumn = r#"{"name":"Failure","type":"integer","jsonPath":".status.failure"}"#,
    printcolumn = r#"{"name":"InProgress","type":"integer","jsonPath":".status.inProgress"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct FleetPreflightValidationSpec {
    /// The kernels to check every ManagedClusterModule against, as `uname -r` prints them
    /// (upstream's `kernelVersion`, here one or more). Each must be non-empty and split on
    /// `.`, `,` or `-` into at least three parts.
    #[schemars(schema_with = "kernel_versions")]
    pub kernel_versions: Vec<String>,
    /// ManagedCluster labels (equality). When set, only the MCMs that select at least one
    /// cluster with these labels are checked — the clusters about to get the kernel. Unset or
    /// empty: every MCM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_selector: Option<BTreeMap<String, String>>,
    /// Build (and sign) the images that are missing for these kernels ahead of the upgrade,
    /// through the hub's normal image pipeline (one build per image for the fleet), so that a
    /// cluster moving to the kernel later finds its image ready. Off: only check.
    #[serde(default)]
    pub push_built_image: bool,
}

/// `minItems`/`maxItems`, and per kernel a non-empty string with at least two of `.,-` (the
/// webhook and `validate_preflight` give the field path; this keeps an object applied with no
/// webhook answering from being stored at all).
fn kernel_versions(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "minItems": 1,
        "maxItems": MAX_KERNELS,
        "items": {
            "type": "string",
            "minLength": 1,
            "maxLength": 256,
            "pattern": "^[^.,-]*[.,-][^.,-]*[.,-]"
        }
    })
}

/// The outcome of one check (upstream's `verificationStatus`).
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
pub enum VerificationStatus {
    /// The MCM will not work on the kernel as things are: `reason` says what is missing.
    Failure,
    /// Not known yet (a build running, the registry not answering): looked at again.
    #[default]
    InProgress,
    /// The MCM will work on the kernel (its image exists, or the hub can build/sign it).
    Success,
}

impl VerificationStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            VerificationStatus::Success => "Success",
            VerificationStatus::Failure => "Failure",
            VerificationStatus::InProgress => "InProgress",
        }
    }
}

/// How far a check got (upstream's `verificationStage` has `Image` and `Done`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum VerificationStage {
    /// Finding the mapping and asking the registry for the image.
    #[default]
    Image,
    /// Building the image ahead (`pushBuiltImage`).
    Build,
    /// Signing the image ahead (`pushBuiltImage`).
    Sign,
    /// Nothing more to do.
    Done,
}

/// The result for one MCM and one kernel.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PreflightResult {
    /// The ManagedClusterModule.
    pub mcm: String,
    /// The kernel checked.
    pub kernel: String,
    pub verification_status: VerificationStatus,
    pub verification_stage: VerificationStage,
    /// A short CamelCase reason: `ImageExists`, `WouldBuild`, `WouldSign`,
    /// `WouldBuildAndSign`, `ImageBuilt`, `NoKernelModule` (Success); `NoMapping`,
    /// `MappingError`, `InvalidSpec`, `ImageMissing`, `UnsignedImageMissing`,
    /// `DockerfileMissing`, `BuildSecretMissing`, `DriverToolkitMissing`,
    /// `SigningKeyMissing`, `PullSecretMissing`, `RegistryUnauthorized`, `BuildFailed`,
    /// `SignFailed` (Failure); `RegistryUnavailable`, `Checking`, `Building`, `Signing`
    /// (InProgress).
    pub reason: String,
    /// What was found, and what to do about it.
    pub message: String,
    /// The image the MCM would ship for this kernel (kernel substituted), when a mapping matches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// When `verificationStatus` last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<Time>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FleetPreflightValidationStatus {
    /// ManagedClusterModules checked.
    #[serde(default)]
    pub mcms: i32,
    /// Results (MCM × kernel) by verification status.
    #[serde(default)]
    pub success: i32,
    #[serde(default)]
    pub failure: i32,
    #[serde(default)]
    pub in_progress: i32,
    /// `Ready`: True when every result is Success; reason `Verified`, `Failed` or `InProgress`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::schema::conditions")]
    pub conditions: Vec<Condition>,
    /// One entry per MCM and kernel, failures first (bounded, see `resultsOmitted`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub results: Vec<PreflightResult>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub results_omitted: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

fn is_zero(n: &i32) -> bool {
    *n == 0
}

/// Upstream's rule for a kernel version: non-empty, and split on `.`, `,` or `-` into at
/// least three parts.
pub fn kernel_version_problem(kernel: &str) -> Option<String> {
    if kernel.trim().is_empty() {
        return Some("must not be empty".into());
    }
    let parts = kernel.split(['.', ',', '-']).count();
    (parts < 3).then(|| {
        format!(
            "{kernel:?} is not a kernel version: it must split on '.', ',' or '-' into at least 3 parts (like 5.14.0-284.el9.x86_64)"
        )
    })
}

/// Every violation of a FleetPreflightValidation, with its field path.
pub fn validate_preflight(p: &FleetPreflightValidation) -> Vec<Violation> {
    let mut out = Vec::new();
    let ks = &p.spec.kernel_versions;
    if ks.is_empty() {
        out.push(Violation {
            path: "spec.kernelVersions".into(),
            reason: "at least one kernel is required".into(),
        });
    }
    if ks.len() > MAX_KERNELS {
        out.push(Violation {
            path: "spec.kernelVersions".into(),
            reason: format!("at most {MAX_KERNELS} kernels per object"),
        });
    }
    for (i, k) in ks.iter().enumerate() {
        if let Some(reason) = kernel_version_problem(k) {
            out.push(Violation {
                path: format!("spec.kernelVersions[{i}]"),
                reason,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fpv(kernels: &[&str]) -> FleetPreflightValidation {
        FleetPreflightValidation::new(
            "next",
            FleetPreflightValidationSpec {
                kernel_versions: kernels.iter().map(|k| k.to_string()).collect(),
                ..Default::default()
            },
        )
    }

    #[test]
    fn kernels_are_checked_like_upstream() {
        assert!(validate_preflight(&fpv(&["5.14.0-284.el9.x86_64", "6.1.0-13-amd64"])).is_empty());
        assert!(validate_preflight(&fpv(&["5,14,0"])).is_empty());
        let v = validate_preflight(&fpv(&["6.1.0-1", "", "6.1"]));
        let paths: Vec<&str> = v.iter().map(|v| v.path.as_str()).collect();
        assert_eq!(
            paths,
            ["spec.kernelVersions[1]", "spec.kernelVersions[2]"],
            "{v:?}"
        );
        assert!(v[1].reason.contains("at least 3 parts"), "{v:?}");
        let v = validate_preflight(&fpv(&[]));
        assert_eq!(v[0].path, "spec.kernelVersions");
    }

    /// The CRD pattern agrees with the rule on the usual shapes.
    #[test]
    fn the_schema_pattern_is_the_rule() {
        let re = regex::Regex::new("^[^.,-]*[.,-][^.,-]*[.,-]").unwrap();
        for k in ["5.14.0-1", "6.1.0", "a-b-c", "6.1", "6", "6.1+x"] {
            assert_eq!(re.is_match(k), kernel_version_problem(k).is_none(), "{k}");
        }
    }

    #[test]
    fn spec_reads_upstream_like_yaml() {
        let s: FleetPreflightValidationSpec = serde_yaml::from_str(
            "kernelVersions: [5.14.0-570.el9.x86_64]\nclusterSelector: {ring: canary}\npushBuiltImage: true\n",
        )
        .unwrap();
        assert!(s.push_built_image);
        assert_eq!(s.cluster_selector.unwrap()["ring"], "canary");
    }
}
