//! Objects as the agent's caches hold them, for the controller's decision tests: one Module
//! `ns/m` and its Nodes, Pods and DaemonSets, each built by a constructor and refined with
//! chained methods (`loader_pod("n1").ready().outdated()`).

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::apps::v1::{DaemonSet, DaemonSetStatus};
use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStatus, Node, NodeStatus, NodeSystemInfo, Pod,
    PodSpec, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use shared_api::Module;
use shared_api::labels::{
    LOADER_POD_FINALIZER, MODULE_VERSION_LABEL, kernel_label_value, module_ready_label,
    schedule_version_label, version_module_label, worker_version_label,
};

use crate::cache::CachedPod;
use crate::cache::pod::CachedContainerState;
use crate::render::TEMPLATE_HASH_ANNOTATION;
use crate::render::device_plugin::{device_plugin_daemonset_name, device_plugin_labels};
use crate::render::dra::dra_daemonset_name;
use crate::render::loader::{LOADER_CONTAINER, loader_daemonset_name, loader_labels};

pub const NS: &str = "ns";
pub const NAME: &str = "m";
/// The kernel of every test node unless told otherwise.
pub const KERNEL: &str = "6.1.0-13-amd64";
/// The node label `spec.selector` of [`module`] asks for.
pub const SELECTED: &str = "w";

fn deleted() -> Option<Time> {
    Some(Time(Timestamp::UNIX_EPOCH))
}

/// `Module` `ns/m`: selects nodes labelled `w`, a loader for every kernel (`.*`), a device
/// plugin, unversioned.
pub fn module() -> Module {
    let mut m: Module = serde_json::from_value(serde_json::json!({
        "apiVersion": "kmm.sigs.x-k8s.io/v1beta1", "kind": "Module",
        "metadata": {"name": NAME, "namespace": NS, "uid": "u", "generation": 1},
        "spec": {
            "selector": {SELECTED: ""},
            "moduleLoader": {"container": {
                "modprobe": {"moduleName": NAME},
                "kernelMappings": [{"regexp": ".*", "containerImage": "r/m:1"}]}},
            "devicePlugin": {"container": {"image": "r/dp:1"}}
        }
    }))
    .expect("a valid Module");
    m.metadata.uid = Some("u".into());
    m
}

pub trait ModuleFixture: Sized {
    /// `moduleLoader.container.version`.
    fn version(self, v: &str) -> Self;
    fn without_device_plugin(self) -> Self;
    /// A DRA driver (`r/dra:1`, driver `gpu.example.com`) in place of the device plugin.
    fn with_dra(self) -> Self;
    fn deleting(self) -> Self;
    /// Kernel mappings that match nothing.
    fn mapping_nothing(self) -> Self;
}

impl ModuleFixture for Module {
    fn version(mut self, v: &str) -> Self {
        if let Some(l) = self.spec.module_loader.as_mut() {
            l.container.version = Some(v.into());
        }
        self
    }
    fn without_device_plugin(mut self) -> Self {
        self.spec.device_plugin = None;
        self
    }
    fn with_dra(mut self) -> Self {
        self.spec.device_plugin = None;
        self.spec.dra = serde_json::from_value(serde_json::json!({
            "container": {"image": "r/dra:1"}, "driverName": "gpu.example.com",
            "deviceClasses": [{"name": "gpu"}]
        }))
        .ok();
        self
    }
    fn deleting(mut self) -> Self {
        self.metadata.deletion_timestamp = deleted();
        self
    }
    fn mapping_nothing(mut self) -> Self {
        if let Some(l) = self.spec.module_loader.as_mut() {
            for k in &mut l.container.kernel_mappings {
                k.regexp = Some("^no-such-kernel$".into());
            }
        }
        self
    }
}

/// A node selected by [`module`], running [`KERNEL`].
pub fn node(name: &str) -> Node {
    Node {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            uid: Some(format!("uid-{name}")),
            labels: Some(BTreeMap::from([(SELECTED.to_string(), String::new())])),
            ..Default::default()
        },
        spec: None,
        status: Some(NodeStatus {
            node_info: Some(NodeSystemInfo {
                kernel_version: KERNEL.into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

pub trait NodeFixture: Sized {
    fn label(self, key: &str, value: &str) -> Self;
    fn unlabel(self, key: &str) -> Self;
    fn kernel(self, kernel: &str) -> Self;
    fn deleting(self) -> Self;
    /// Not selected by the Module any more.
    fn deselected(self) -> Self {
        self.unlabel(SELECTED)
    }
    /// The user's `version-module` label of `ns/m`.
    fn user_version(self, v: &str) -> Self {
        self.label(&version_module_label(NS, NAME), v)
    }
    /// The agent's worker label of `ns/m` (the loaders' nodeSelector).
    fn worker(self, v: &str) -> Self {
        self.label(&worker_version_label(NS, NAME), v)
    }
    /// The agent's schedule label of `ns/m` (the device plugin's nodeSelector).
    fn schedule(self, v: &str) -> Self {
        self.label(&schedule_version_label(NS, NAME), v)
    }
    /// The ready label of `ns/m`: the kernel has the module.
    fn loaded(self) -> Self {
        self.label(&module_ready_label(NS, NAME), "")
    }
}

impl NodeFixture for Node {
    fn label(mut self, key: &str, value: &str) -> Self {
        self.labels_mut().insert(key.into(), value.into());
        self
    }
    fn unlabel(mut self, key: &str) -> Self {
        self.labels_mut().remove(key);
        self
    }
    fn kernel(mut self, kernel: &str) -> Self {
        if let Some(i) = self.status.as_mut().and_then(|s| s.node_info.as_mut()) {
            i.kernel_version = kernel.into();
        }
        self
    }
    fn deleting(mut self) -> Self {
        self.metadata.deletion_timestamp = deleted();
        self
    }
}

fn pod(name: String, node: &str, labels: BTreeMap<String, String>, container: &str) -> CachedPod {
    Pod {
        metadata: kube::api::ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(NS.into()),
            uid: Some(format!("uid-{name}")),
            labels: Some(labels),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.into()),
            ..Default::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            container_statuses: Some(vec![ContainerStatus {
                name: container.into(),
                state: Some(ContainerState {
                    running: Some(ContainerStateRunning::default()),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
            ..Default::default()
        }),
    }
    .into()
}

/// A running, not yet Ready, unversioned loader pod of `ns/m` on `node` for [`KERNEL`],
/// with the agent's pod finalizer.
pub fn loader_pod(node: &str) -> CachedPod {
    let mut p = pod(
        format!("{NAME}-loader-{node}"),
        node,
        loader_labels(NAME, &kernel_label_value(KERNEL), None),
        LOADER_CONTAINER,
    );
    p.metadata.finalizers = Some(vec![LOADER_POD_FINALIZER.into()]);
    p
}

/// A running, not yet Ready, unversioned device-plugin pod of `ns/m` on `node`.
pub fn plugin_pod(node: &str) -> CachedPod {
    pod(
        format!("{NAME}-device-plugin-{node}"),
        node,
        device_plugin_labels(NAME, None),
        "device-plugin",
    )
}

/// A running, not yet Ready, unversioned DRA driver pod of `ns/m` on `node`.
pub fn dra_pod(node: &str) -> CachedPod {
    pod(
        format!("{NAME}-dra-{node}"),
        node,
        crate::render::role_labels(NAME, shared_api::labels::ROLE_DRA, None),
        "dra",
    )
}

pub trait PodFixture: Sized {
    fn ready(self) -> Self;
    fn deleting(self) -> Self;
    /// The `module-version` label (a versioned loader's pods carry it).
    fn version(self, v: &str) -> Self;
    fn template_hash(self, hash: &str) -> Self;
    /// Its container ended with `code` and `message`.
    fn exited(self, code: i32, message: &str) -> Self;
    /// Its container waits for `reason` (e.g. `ErrImagePull`).
    fn waiting(self, reason: &str, message: &str) -> Self;
    /// Deleted, its container stopped with the module still loaded (the loader's exit 3).
    fn unload_failed(self, message: &str) -> Self {
        self.deleting()
            .exited(crate::render::loader::UNLOAD_FAILED_EXIT, message)
    }
}

impl PodFixture for CachedPod {
    fn ready(mut self) -> Self {
        if let Some(s) = self.status.as_mut() {
            s.ready = true;
        }
        self
    }
    fn deleting(mut self) -> Self {
        self.metadata.deletion_timestamp = deleted();
        self
    }
    fn version(mut self, v: &str) -> Self {
        self.set_label(MODULE_VERSION_LABEL, v);
        self
    }
    fn template_hash(mut self, hash: &str) -> Self {
        self.set_template_hash(hash);
        self
    }
    fn exited(mut self, code: i32, message: &str) -> Self {
        if let Some(c) = container(&mut self) {
            c.state = Some(CachedContainerState::Terminated {
                exit_code: code,
                reason: None,
                message: Some(message.into()),
            });
        }
        self
    }
    fn waiting(mut self, reason: &str, message: &str) -> Self {
        if let Some(c) = container(&mut self) {
            c.state = Some(CachedContainerState::Waiting {
                reason: Some(reason.into()),
                message: Some(message.into()),
            });
        }
        self
    }
}

fn container(pod: &mut CachedPod) -> Option<&mut crate::cache::pod::CachedContainerStatus> {
    pod.status.as_mut()?.container_statuses.first_mut()
}

fn daemonset(name: String, labels: BTreeMap<String, String>) -> DaemonSet {
    DaemonSet {
        metadata: kube::api::ObjectMeta {
            name: Some(name),
            namespace: Some(NS.into()),
            labels: Some(labels),
            generation: Some(1),
            ..Default::default()
        },
        spec: None,
        status: None,
    }
}

/// The loader DaemonSet of `ns/m` for a kernel (label form) and version, not yet observed by
/// the DaemonSet controller (no status).
pub fn loader_ds(kernel_label: &str, version: Option<&str>) -> DaemonSet {
    daemonset(
        loader_daemonset_name(NAME, kernel_label, version),
        loader_labels(NAME, kernel_label, version),
    )
}

/// The device-plugin DaemonSet of `ns/m` for a version, not yet observed.
pub fn plugin_ds(version: Option<&str>) -> DaemonSet {
    daemonset(
        device_plugin_daemonset_name(NAME, version),
        device_plugin_labels(NAME, version),
    )
}

/// The DRA driver DaemonSet of `ns/m` for a version, not yet observed.
pub fn dra_ds(version: Option<&str>) -> DaemonSet {
    daemonset(
        dra_daemonset_name(NAME, version),
        crate::render::role_labels(NAME, shared_api::labels::ROLE_DRA, version),
    )
}

pub trait DaemonSetFixture: Sized {
    /// Observed at its generation: `desired` pods scheduled (all updated), `available` of them
    /// available.
    fn observed(self, desired: i32, available: i32) -> Self;
    /// A newer spec than the status describes.
    fn bumped(self) -> Self;
    fn template_hash(self, hash: &str) -> Self;
    fn deleting(self) -> Self;
}

impl DaemonSetFixture for DaemonSet {
    fn observed(mut self, desired: i32, available: i32) -> Self {
        self.status = Some(DaemonSetStatus {
            observed_generation: self.metadata.generation,
            desired_number_scheduled: desired,
            current_number_scheduled: desired,
            updated_number_scheduled: Some(desired),
            number_available: Some(available),
            number_ready: available,
            ..Default::default()
        });
        self
    }
    fn bumped(mut self) -> Self {
        self.metadata.generation = Some(self.metadata.generation.unwrap_or(0) + 1);
        self
    }
    fn template_hash(mut self, hash: &str) -> Self {
        self.annotations_mut()
            .insert(TEMPLATE_HASH_ANNOTATION.into(), hash.into());
        self
    }
    fn deleting(mut self) -> Self {
        self.metadata.deletion_timestamp = deleted();
        self
    }
}

/// Objects as a cache returns them.
pub fn cached<T>(objects: impl IntoIterator<Item = T>) -> Vec<Arc<T>> {
    objects.into_iter().map(Arc::new).collect()
}

/// A by-name lookup over cached objects, as the reconciler's stores answer it.
pub fn by_name<T: kube::Resource>(objects: &[Arc<T>]) -> impl Fn(&str) -> Option<Arc<T>> + '_ {
    move |name| {
        objects
            .iter()
            .find(|o| o.meta().name.as_deref() == Some(name))
            .cloned()
    }
}

/// `(status, reason)` of a condition, and its message.
pub fn condition<'a>(conditions: &'a [Condition], type_: &str) -> (&'a str, &'a str, &'a str) {
    let c = conditions
        .iter()
        .find(|c| c.type_ == type_)
        .unwrap_or_else(|| panic!("no {type_} condition in {conditions:?}"));
    (c.status.as_str(), c.reason.as_str(), c.message.as_str())
}
