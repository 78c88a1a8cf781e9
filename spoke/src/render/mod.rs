//! Pure renderers: what the agent wants in the cluster for a Module and a set of Nodes.
//! No client calls here; the reconcilers apply what these functions return, and
//! `kmm-spoke render` prints it.

pub mod device_plugin;
pub mod dra;
pub mod loader;
pub mod loader_script;
pub mod nodes;
pub mod plan;

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{DaemonSet, DaemonSetSpec};
use k8s_openapi::api::core::v1::{PodSpec, PodTemplateSpec, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use kube::Resource;
use shared_api::Module;
use shared_api::labels::{MODULE_ANNOTATION, short_hash};

pub use device_plugin::render_device_plugin_daemonset;
pub use dra::{render_device_classes, render_dra_daemonset};
pub use loader::{LoaderTarget, render_loader_daemonset};
pub use loader_script::LOADER_SCRIPT;
pub use nodes::{node_kernel, node_labels, node_schedulable_for, targeted_nodes};
pub use plan::{ModulePlan, plan_module};

/// Annotation on our DaemonSets: hash of the rendered object, so an unchanged render is
/// recognised in the cache without comparing defaulted specs.
pub use shared_api::labels::SPEC_HASH_ANNOTATION;
/// Annotation on loader DaemonSets and their pod template (so on their pods): hash of the pod
/// template. A pod whose hash differs from its DaemonSet's is outdated; with `OnDelete` the
/// agent replaces it, one node at a time.
pub const TEMPLATE_HASH_ANNOTATION: &str = "kmm.node.kubernetes.io/template-hash";
/// The default firmware directory on the host.
pub const DEFAULT_FIRMWARE_HOST_PATH: &str = "/var/lib/firmware";
/// The default SELinux type of loader containers (as upstream's `worker.seLinuxType`).
pub const DEFAULT_LOADER_SELINUX_TYPE: &str = "spc_t";
/// The default service account of loader pods.
pub const DEFAULT_LOADER_SERVICE_ACCOUNT: &str = "default";
/// The kubelet's device-plugin socket directory.
pub const DEVICE_PLUGIN_HOST_PATH: &str = "/var/lib/kubelet/device-plugins";

/// The taints every pod the agent makes tolerates besides the Module's `spec.tolerations`
/// (upstream's internal tolerations): a node under disk, memory or PID pressure can still
/// load, unload and serve its driver.
pub const BUILTIN_TOLERATED_TAINTS: [&str; 3] = [
    "node.kubernetes.io/disk-pressure",
    "node.kubernetes.io/memory-pressure",
    "node.kubernetes.io/pid-pressure",
];

/// The tolerations of the agent's pods: the Module's, then the built-in ones
/// ([`BUILTIN_TOLERATED_TAINTS`], `Exists`, `NoSchedule`) the Module does not list already.
pub fn pod_tolerations(module: &Module) -> Vec<Toleration> {
    let mut out = module.spec.tolerations.clone();
    for key in BUILTIN_TOLERATED_TAINTS {
        let builtin = Toleration {
            key: Some(key.to_string()),
            operator: Some("Exists".into()),
            effect: Some("NoSchedule".into()),
            ..Default::default()
        };
        if !out.contains(&builtin) {
            out.push(builtin);
        }
    }
    out
}

/// Settings of the agent that shape what it renders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderSettings {
    /// Host directory firmware files are copied into.
    pub firmware_host_path: String,
    /// Service account of loader pods when the Module names none.
    pub loader_service_account: String,
    /// Whether device-plugin pods get `priorityClassName: system-node-critical`.
    pub device_plugin_priority_class: Option<String>,
    /// Priority class of loader pods (evicting one unloads its driver).
    pub loader_priority_class: Option<String>,
    /// `runAsUser` of loader containers (upstream's `worker.runAsUser`).
    pub loader_run_as_user: i64,
    /// SELinux type of loader containers (upstream's `worker.seLinuxType`).
    pub loader_selinux_type: String,
}

impl Default for RenderSettings {
    fn default() -> Self {
        Self {
            firmware_host_path: DEFAULT_FIRMWARE_HOST_PATH.to_string(),
            loader_service_account: DEFAULT_LOADER_SERVICE_ACCOUNT.to_string(),
            device_plugin_priority_class: Some("system-node-critical".to_string()),
            loader_priority_class: Some("system-node-critical".to_string()),
            loader_run_as_user: 0,
            loader_selinux_type: DEFAULT_LOADER_SELINUX_TYPE.to_string(),
        }
    }
}

/// `(namespace, name)` of a Module; the namespace defaults to `default` for offline input.
pub fn module_key(module: &Module) -> (String, String) {
    let ns = module
        .metadata
        .namespace
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "default".into());
    (ns, module.metadata.name.clone().unwrap_or_default())
}

/// The Module's `moduleLoader.container.version`, when set and non-empty.
pub fn module_version(module: &Module) -> Option<&str> {
    module
        .spec
        .module_loader
        .as_ref()
        .and_then(|l| l.container.version.as_deref())
        .filter(|v| !v.is_empty())
}

/// The controller owner reference to the Module; `None` offline (no uid).
pub fn owner_reference(module: &Module) -> Option<OwnerReference> {
    let uid = module.metadata.uid.clone().filter(|u| !u.is_empty())?;
    Some(OwnerReference {
        api_version: Module::api_version(&()).into_owned(),
        kind: Module::kind(&()).into_owned(),
        name: module.metadata.name.clone().unwrap_or_default(),
        uid,
        controller: Some(true),
        block_owner_deletion: Some(true),
    })
}

/// The labels every DaemonSet of a Module carries (also its selector and its pods' labels):
/// the Module name, the role (`loader`, `device-plugin`) and the version when there is one.
pub fn role_labels(
    module_name: &str,
    role: &str,
    version: Option<&str>,
) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::from([
        (
            shared_api::labels::MODULE_NAME_LABEL.to_string(),
            module_name.to_string(),
        ),
        (shared_api::labels::ROLE_LABEL.to_string(), role.to_string()),
    ]);
    if let Some(v) = version {
        labels.insert(
            shared_api::labels::MODULE_VERSION_LABEL.to_string(),
            v.to_string(),
        );
    }
    labels
}

/// `<prefix><suffix>` shortened to 63 characters by trimming the prefix (names we derive
/// from Modules stay valid even for long Module names).
pub fn bounded_name(prefix: &str, suffix: &str) -> String {
    let room = 63usize.saturating_sub(suffix.len());
    let mut p: String = prefix.chars().take(room).collect();
    while p.ends_with(['-', '.']) {
        p.pop();
    }
    format!("{p}{suffix}")
}

/// One of the agent's DaemonSets for `module`: `labels` on the object, as its selector and on
/// its pods, the pods annotated with the Module's `namespace/name`, owned by the Module, and
/// stamped with [`SPEC_HASH_ANNOTATION`].
pub fn module_daemonset(
    module: &Module,
    name: String,
    labels: BTreeMap<String, String>,
    pod_spec: PodSpec,
) -> DaemonSet {
    let (namespace, module_name) = module_key(module);
    let mut ds = DaemonSet {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(namespace.clone()),
            labels: Some(labels.clone()),
            owner_references: owner_reference(module).map(|o| vec![o]),
            ..Default::default()
        },
        spec: Some(DaemonSetSpec {
            selector: LabelSelector {
                match_labels: Some(labels.clone()),
                match_expressions: None,
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    annotations: Some(BTreeMap::from([(
                        MODULE_ANNOTATION.to_string(),
                        format!("{namespace}/{module_name}"),
                    )])),
                    ..Default::default()
                }),
                spec: Some(pod_spec),
            },
            ..Default::default()
        }),
        status: None,
    };
    stamp_hash(&mut ds);
    ds
}

/// Set [`SPEC_HASH_ANNOTATION`] to the hash of everything else in the object.
pub fn stamp_hash(ds: &mut DaemonSet) {
    if let Some(a) = ds.metadata.annotations.as_mut() {
        a.remove(SPEC_HASH_ANNOTATION);
    }
    let json = serde_json::to_string(&ds).unwrap_or_default();
    let hash = short_hash(&json, 16);
    ds.metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(SPEC_HASH_ANNOTATION.into(), hash);
}

/// The hash stamped on a DaemonSet, if any.
pub fn spec_hash(ds: &DaemonSet) -> Option<&str> {
    ds.metadata
        .annotations
        .as_ref()?
        .get(SPEC_HASH_ANNOTATION)
        .map(String::as_str)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
