//! `Module` (`kmm.sigs.x-k8s.io/v1beta1`): the user-facing KMM API, field for field.
//!
//! Optional fields are `Option`/empty so that a Module round-trips through the
//! API server unchanged; defaults (`dirName: /opt`, pull policy) are applied
//! where they are used, not on the wire.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{EnvVar, ResourceRequirements, Toleration, Volume, VolumeMount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The default `modprobe.dirName`.
pub const DEFAULT_DIR_NAME: &str = "/opt";

// The `x_kube` validation rules below are the part of `validate` a CRD can express in CEL; the
// API server enforces them even when no webhook answers. The webhooks check everything else.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[x_kube(validation = Rule::new("has(self.moduleLoader) || has(self.devicePlugin) || has(self.dra)")
    .message("at least one of moduleLoader, devicePlugin or dra must be set"))]
#[x_kube(validation = Rule::new("!(has(self.dra) && has(self.devicePlugin))")
    .message("dra and devicePlugin cannot both be set"))]
#[kube(
    group = "kmm.sigs.x-k8s.io",
    version = "v1beta1",
    kind = "Module",
    plural = "modules",
    namespaced,
    status = "ModuleStatus",
    printcolumn = r#"{"name":"Loader desired","type":"integer","jsonPath":".status.moduleLoader.desiredNumber"}"#,
    printcolumn = r#"{"name":"Loader available","type":"integer","jsonPath":".status.moduleLoader.availableNumber"}"#,
    printcolumn = r#"{"name":"Plugin available","type":"integer","jsonPath":".status.devicePlugin.availableNumber"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ModuleSpec {
    /// How to load the kernel module. Optional: a Module may run only a device plugin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module_loader: Option<ModuleLoaderSpec>,

    /// A device plugin DaemonSet, scheduled on nodes where the module is ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_plugin: Option<DevicePluginSpec>,

    /// A Dynamic Resource Allocation driver DaemonSet and its DeviceClasses (upstream main;
    /// Kubernetes 1.34+). Mutually exclusive with `devicePlugin`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dra: Option<DraSpec>,

    /// A dockerconfigjson Secret used to pull (and, on the hub, push) images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_repo_secret: Option<LocalObjectReference>,

    /// Change (or set) to force re-verification of every image and rebuilds where missing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_rebuild_trigger_generation: Option<i32>,

    /// Node label equality selector; an empty map selects every node.
    pub selector: BTreeMap<String, String>,

    /// Tolerations added to every pod this Module causes on the spoke (loader, device plugin,
    /// DRA driver), besides the built-in NoSchedule tolerations of the disk-, memory- and
    /// pid-pressure taints; never to the hub's build Jobs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::schema::tolerations")]
    pub tolerations: Vec<Toleration>,
}

/// A reference to an object in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct LocalObjectReference {
    pub name: String,
}

impl LocalObjectReference {
    pub fn new(name: impl Into<String>) -> Self {
        Self { name: name.into() }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModuleLoaderSpec {
    pub container: ModuleLoaderContainerSpec,
    /// Service account of the loader pods (default: `default`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[x_kube(validation = Rule::new("size(self.kernelMappings) > 0")
    .message("at least one kernel mapping is required").field_path(".kernelMappings"))]
#[x_kube(validation = Rule::new("!(has(self.inTreeModuleToRemove) && has(self.inTreeModulesToRemove))")
    .message("the deprecated inTreeModuleToRemove cannot be used together with inTreeModulesToRemove; use only inTreeModulesToRemove")
    .field_path(".inTreeModuleToRemove"))]
#[x_kube(validation = Rule::new("(has(self.version) && self.version != '') == (has(oldSelf.version) && oldSelf.version != '')")
    .message("cannot change between set and unset on an existing object; delete and re-create it to switch to or from ordered upgrade")
    .field_path(".version"))]
#[serde(rename_all = "camelCase")]
pub struct ModuleLoaderContainerSpec {
    pub modprobe: ModprobeSpec,

    /// At least one mapping; the first that matches a node's kernel wins.
    pub kernel_mappings: Vec<KernelMapping>,

    /// Fallback image for mappings without their own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_image: Option<String>,

    /// `Always`, `IfNotPresent` or `Never`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<String>,

    /// Enables ordered upgrade: only nodes labelled
    /// `kmm.node.kubernetes.io/version-module.<ns>.<name>=<version>` load this version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,

    /// Default registry TLS options for the mappings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(rename = "registryTLS")]
    pub registry_tls: Option<TlsOptions>,

    /// Default build instructions for the mappings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<Build>,

    /// Default signing instructions for the mappings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sign: Option<Sign>,

    /// In-tree modules unloaded before the module is loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_tree_modules_to_remove: Option<Vec<String>>,

    /// Deprecated: use `inTreeModulesToRemove`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_tree_module_to_remove: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModprobeSpec {
    /// The module to load; required unless `rawArgs` is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module_name: Option<String>,

    /// Module parameters passed to modprobe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Vec<String>>,

    /// Root of the module tree in the image (`<dirName>/lib/modules/<kernel>`); default `/opt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir_name: Option<String>,

    /// Extra modprobe arguments for load and unload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<ModprobeArgs>,

    /// Full modprobe command lines for load and unload, replacing the generated ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw_args: Option<ModprobeArgs>,

    /// Directory in the image whose files are copied to the host firmware directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware_path: Option<String>,

    /// Soft dependencies: `[moduleName, dep1, dep2…]`, loaded from last to first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modules_loading_order: Option<Vec<String>>,
}

impl ModprobeSpec {
    pub fn dir_name(&self) -> &str {
        self.dir_name
            .as_deref()
            .filter(|d| !d.is_empty())
            .unwrap_or(DEFAULT_DIR_NAME)
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct ModprobeArgs {
    #[serde(default)]
    pub load: Vec<String>,
    #[serde(default)]
    pub unload: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[x_kube(validation = Rule::new("has(self.literal) != has(self.regexp)")
    .message("exactly one of literal and regexp must be set"))]
#[x_kube(validation = Rule::new("!(has(self.inTreeModuleToRemove) && has(self.inTreeModulesToRemove))")
    .message("the deprecated inTreeModuleToRemove cannot be used together with inTreeModulesToRemove; use only inTreeModulesToRemove")
    .field_path(".inTreeModuleToRemove"))]
#[serde(rename_all = "camelCase")]
pub struct KernelMapping {
    /// The exact kernel version this mapping is for. Exactly one of `literal` and `regexp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub literal: Option<String>,

    /// A regular expression over kernel versions (unanchored unless anchored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regexp: Option<String>,

    /// The kmod image; may use `${KERNEL_FULL_VERSION}` and the other variables.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub container_image: String,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(rename = "registryTLS")]
    pub registry_tls: Option<TlsOptions>,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<Build>,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sign: Option<Sign>,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_tree_modules_to_remove: Option<Vec<String>>,

    /// Deprecated: use `inTreeModulesToRemove`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_tree_module_to_remove: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TlsOptions {
    /// Use plain HTTP.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure: bool,
    /// Use TLS without verifying the server's certificate.
    #[serde(
        default,
        skip_serializing_if = "std::ops::Not::not",
        rename = "insecureSkipTLSVerify"
    )]
    pub insecure_skip_tls_verify: bool,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Build {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub build_args: Vec<BuildArg>,

    /// ConfigMap whose `dockerfile` key holds the Dockerfile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dockerfile_config_map: Option<LocalObjectReference>,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(rename = "baseImageRegistryTLS")]
    pub base_image_registry_tls: Option<TlsOptions>,

    /// Secrets mounted at `/run/secrets/<name>` during the build.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<LocalObjectReference>,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kaniko_params: Option<KanikoParams>,

    /// Node selector of the build pod.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub selector: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct BuildArg {
    pub name: String,
    #[serde(default)]
    pub value: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct KanikoParams {
    /// Tag of the kaniko executor image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Sign {
    /// Image to sign when there is no build.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unsigned_image: Option<String>,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(rename = "unsignedImageRegistryTLS")]
    pub unsigned_image_registry_tls: Option<TlsOptions>,

    /// Secret with the private key under `key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_secret: Option<LocalObjectReference>,

    /// Secret with the certificate under `cert`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_secret: Option<LocalObjectReference>,

    /// Absolute paths or globs under `dirName`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files_to_sign: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DevicePluginSpec {
    pub container: DevicePluginContainerSpec,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_container: Option<DevicePluginContainerSpec>,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,

    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<Volume>,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub automount_service_account_token: Option<bool>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DevicePluginContainerSpec {
    pub image: String,

    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,

    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,

    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<String>,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volume_mounts: Vec<VolumeMount>,
}

/// Dynamic Resource Allocation driver (upstream main). The spoke runs it on Kubernetes 1.34
/// and later and rejects it as invalid on older servers.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DraSpec {
    pub container: DevicePluginContainerSpec,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_container: Option<DevicePluginContainerSpec>,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,

    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<Volume>,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub automount_service_account_token: Option<bool>,

    pub driver_name: String,

    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub device_classes: Vec<DraDeviceClass>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct DraDeviceClass {
    pub name: String,
    /// `resource.k8s.io` DeviceSelectors, kept verbatim.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::schema::preserve_unknown_list")]
    pub selectors: Vec<serde_json::Value>,
    /// `resource.k8s.io` DeviceClassConfiguration, kept verbatim.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::schema::preserve_unknown_list")]
    pub config: Vec<serde_json::Value>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModuleStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module_loader: Option<DaemonSetStatus>,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_plugin: Option<DaemonSetStatus>,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dra: Option<DaemonSetStatus>,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_rebuild_trigger_generation: Option<i32>,

    /// `Valid`, `Ready`, `Progressing`, `Degraded` (kmm-fleet addition).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DaemonSetStatus {
    #[serde(default)]
    pub nodes_matching_selector_number: i32,
    #[serde(default)]
    pub desired_number: i32,
    #[serde(default)]
    pub available_number: i32,
}

impl ModuleLoaderContainerSpec {
    /// The in-tree modules to remove at container level, whichever field was used.
    pub fn in_tree_removals(&self) -> Vec<String> {
        in_tree_list(
            &self.in_tree_modules_to_remove,
            &self.in_tree_module_to_remove,
        )
    }
}

impl KernelMapping {
    /// The in-tree modules to remove set on this mapping, if any field was used.
    pub fn in_tree_removals(&self) -> Option<Vec<String>> {
        if self.in_tree_modules_to_remove.is_none() && self.in_tree_module_to_remove.is_none() {
            return None;
        }
        Some(in_tree_list(
            &self.in_tree_modules_to_remove,
            &self.in_tree_module_to_remove,
        ))
    }
}

fn in_tree_list(plural: &Option<Vec<String>>, singular: &Option<String>) -> Vec<String> {
    match (plural, singular) {
        (Some(list), _) => list.clone(),
        (None, Some(one)) if !one.is_empty() => vec![one.clone()],
        _ => Vec::new(),
    }
}
