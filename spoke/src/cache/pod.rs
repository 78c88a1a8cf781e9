//! The agent's own view of a pod: what the reconcilers read of the loader, device-plugin and
//! DRA pods, and nothing else. At 1,000 nodes × 10 Modules the agent caches 10,000 pods; a
//! stripped `k8s_openapi` `Pod` costs about 5.5 KB each there (its spec and status structs
//! are 2.2 KB inline even when empty, and the labels and annotations each take a map), this
//! about a fifth of it (`spoke/tests/cache_footprint.rs` counts both).
//!
//! It is read from the API like a `Pod` (same kind and path) and converted while decoded, so
//! nothing but this stays. The labels the agent matches on are fields, not a map;
//! [`CachedPod::labels`] answers for them under their keys.

use std::borrow::Cow;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;
use shared_api::labels::{
    MODULE_NAME_LABEL, MODULE_VERSION_LABEL, ROLE_LABEL, TARGET_KERNEL_LABEL,
};

use crate::render::TEMPLATE_HASH_ANNOTATION;

/// A pod of the agent, as cached. `metadata` keeps name, namespace, uid, resourceVersion,
/// deletion and finalizers (what the agent's writes to a pod need); the rest is below.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(from = "Pod")]
pub struct CachedPod {
    pub metadata: ObjectMeta,
    labels: PodLabelValues,
    /// The loader's `template-hash` annotation.
    template_hash: Option<String>,
    pub spec: Option<CachedPodSpec>,
    pub status: Option<CachedPodStatus>,
}

/// The values of the labels the agent sets on its pods (all it matches on).
#[derive(Debug, Clone, Default, PartialEq)]
struct PodLabelValues {
    module_name: Option<String>,
    role: Option<String>,
    target_kernel: Option<String>,
    module_version: Option<String>,
}

impl PodLabelValues {
    fn slot(&self, key: &str) -> Option<&Option<String>> {
        match key {
            MODULE_NAME_LABEL => Some(&self.module_name),
            ROLE_LABEL => Some(&self.role),
            TARGET_KERNEL_LABEL => Some(&self.target_kernel),
            MODULE_VERSION_LABEL => Some(&self.module_version),
            _ => None,
        }
    }
}

/// The labels of a cached pod the agent reads, by key; other keys are not kept and read as
/// absent.
#[derive(Debug, Clone, Copy)]
pub struct PodLabels<'a>(&'a PodLabelValues);

impl<'a> PodLabels<'a> {
    pub fn get(&self, key: &str) -> Option<&'a String> {
        self.0.slot(key)?.as_ref()
    }
    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }
}

/// The annotations of a cached pod the agent reads (the loader's template hash).
#[derive(Debug, Clone, Copy)]
pub struct PodAnnotations<'a>(Option<&'a String>);

impl<'a> PodAnnotations<'a> {
    pub fn get(&self, key: &str) -> Option<&'a String> {
        self.0.filter(|_| key == TEMPLATE_HASH_ANNOTATION)
    }
}

/// `spec.nodeName`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CachedPodSpec {
    pub node_name: Option<String>,
}

/// `status`: the phase, whether the Ready condition is `True`, and the containers' states.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CachedPodStatus {
    pub phase: Option<String>,
    pub ready: bool,
    pub container_statuses: Vec<CachedContainerStatus>,
}

/// A container's name, restart count, state and last state.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CachedContainerStatus {
    pub name: String,
    pub restart_count: i32,
    pub state: Option<CachedContainerState>,
    /// Why the container last ended: what a CrashLoopBackOff is about.
    pub last_state: Option<CachedContainerState>,
}

/// A container's state, as the kubelet reports it.
#[derive(Debug, Clone, PartialEq)]
pub enum CachedContainerState {
    Waiting {
        reason: Option<String>,
        message: Option<String>,
    },
    Running,
    Terminated {
        exit_code: i32,
        reason: Option<String>,
        message: Option<String>,
    },
}

impl CachedContainerState {
    pub fn is_running(&self) -> bool {
        matches!(self, Self::Running)
    }
    /// `(exit code, message or else reason)` of a terminated container.
    pub fn terminated(&self) -> Option<(i32, &str)> {
        match self {
            Self::Terminated {
                exit_code,
                reason,
                message,
            } => Some((
                *exit_code,
                message.as_deref().or(reason.as_deref()).unwrap_or_default(),
            )),
            _ => None,
        }
    }
}

impl CachedPod {
    /// The agent's labels on the pod (module name, role, target kernel, module version).
    /// Shadows `ResourceExt::labels`, which sees none of them.
    pub fn labels(&self) -> PodLabels<'_> {
        PodLabels(&self.labels)
    }
    /// The loader's template-hash annotation; shadows `ResourceExt::annotations`.
    pub fn annotations(&self) -> PodAnnotations<'_> {
        PodAnnotations(self.template_hash.as_ref())
    }
    /// The Module (`namespace`, `name`) the pod belongs to, by its owner label.
    pub fn module_key(&self) -> Option<(String, String)> {
        Some((
            self.metadata.namespace.clone().unwrap_or_default(),
            self.labels.module_name.clone()?,
        ))
    }
    /// The container statuses (none before the kubelet reported).
    pub fn containers(&self) -> &[CachedContainerStatus] {
        self.status
            .as_ref()
            .map_or(&[], |s| s.container_statuses.as_slice())
    }
}

#[cfg(test)]
impl CachedPod {
    /// Set one of the labels the cache keeps (tests).
    pub(crate) fn set_label(&mut self, key: &str, value: &str) {
        let v = Some(value.to_string());
        let l = &mut self.labels;
        match key {
            MODULE_NAME_LABEL => l.module_name = v,
            ROLE_LABEL => l.role = v,
            TARGET_KERNEL_LABEL => l.target_kernel = v,
            MODULE_VERSION_LABEL => l.module_version = v,
            _ => panic!("the cache keeps no label {key}"),
        }
    }
    /// Set the template-hash annotation (tests).
    pub(crate) fn set_template_hash(&mut self, hash: &str) {
        self.template_hash = Some(hash.into());
    }
}

impl kube::Resource for CachedPod {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        <Pod as kube::Resource>::kind(&())
    }
    fn group(_: &()) -> Cow<'_, str> {
        <Pod as kube::Resource>::group(&())
    }
    fn version(_: &()) -> Cow<'_, str> {
        <Pod as kube::Resource>::version(&())
    }
    fn plural(_: &()) -> Cow<'_, str> {
        <Pod as kube::Resource>::plural(&())
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

fn container(c: ContainerStatus) -> CachedContainerStatus {
    let state = |s: k8s_openapi::api::core::v1::ContainerState| {
        if let Some(t) = s.terminated {
            Some(CachedContainerState::Terminated {
                exit_code: t.exit_code,
                reason: t.reason,
                message: t.message,
            })
        } else if s.running.is_some() {
            Some(CachedContainerState::Running)
        } else {
            s.waiting.map(|w| CachedContainerState::Waiting {
                reason: w.reason,
                message: w.message,
            })
        }
    };
    CachedContainerStatus {
        name: c.name,
        restart_count: c.restart_count,
        state: c.state.and_then(state),
        last_state: c.last_state.and_then(state),
    }
}

impl From<Pod> for CachedPod {
    fn from(p: Pod) -> Self {
        let mut meta = p.metadata;
        let mut labels = meta.labels.take().unwrap_or_default();
        let template_hash = meta
            .annotations
            .take()
            .and_then(|mut a| a.remove(TEMPLATE_HASH_ANNOTATION));
        let status = p.status.map(|s| CachedPodStatus {
            phase: s.phase,
            ready: s
                .conditions
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True"),
            container_statuses: s
                .init_container_statuses
                .into_iter()
                .flatten()
                .chain(s.container_statuses.into_iter().flatten())
                .map(container)
                .collect(),
        });
        CachedPod {
            metadata: ObjectMeta {
                name: meta.name,
                namespace: meta.namespace,
                uid: meta.uid,
                resource_version: meta.resource_version,
                deletion_timestamp: meta.deletion_timestamp,
                finalizers: meta.finalizers.filter(|f| !f.is_empty()),
                ..Default::default()
            },
            labels: PodLabelValues {
                module_name: labels.remove(MODULE_NAME_LABEL),
                role: labels.remove(ROLE_LABEL),
                target_kernel: labels.remove(TARGET_KERNEL_LABEL),
                module_version: labels.remove(MODULE_VERSION_LABEL),
            },
            template_hash,
            spec: p.spec.map(|s| CachedPodSpec {
                node_name: s.node_name,
            }),
            status,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use kube::ResourceExt;
    use serde_json::json;

    use super::*;

    fn decoded() -> CachedPod {
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": "m-worker-abc", "namespace": "ns", "uid": "u1", "resourceVersion": "7",
                "deletionTimestamp": "2026-12-07T20:00:00Z",
                "finalizers": ["kmm.node.kubernetes.io/loader-pod"],
                "labels": {
                    MODULE_NAME_LABEL: "m", ROLE_LABEL: "module-loader",
                    TARGET_KERNEL_LABEL: "6.8.0", MODULE_VERSION_LABEL: "1.0",
                    "controller-revision-hash": "abc"
                },
                "annotations": {TEMPLATE_HASH_ANNOTATION: "h1", "other": "x"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet",
                    "name": "m-worker", "uid": "d1"}],
                "managedFields": [{"manager": "kube-controller-manager", "operation": "Update"}]
            },
            "spec": {"nodeName": "n1", "containers": [{"name": "worker", "image": "i"}]},
            "status": {
                "phase": "Running",
                "conditions": [{"type": "PodScheduled", "status": "True"},
                               {"type": "Ready", "status": "True"}],
                "initContainerStatuses": [{"name": "init", "ready": true, "restartCount": 0,
                    "image": "i", "imageID": "",
                    "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}}],
                "containerStatuses": [{"name": "worker", "ready": true, "restartCount": 2,
                    "image": "i", "imageID": "",
                    "state": {"running": {"startedAt": "2026-12-07T19:00:00Z"}},
                    "lastState": {"terminated": {"exitCode": 3, "reason": "Error",
                        "message": "modprobe: FATAL: Module m is in use\n"}}}]
            }
        }))
        .unwrap()
    }

    #[test]
    fn keeps_what_the_agent_reads_and_nothing_else() {
        let p = decoded();
        assert_eq!(p.name_any(), "m-worker-abc");
        assert_eq!(p.namespace().as_deref(), Some("ns"));
        assert_eq!(p.uid().as_deref(), Some("u1"));
        assert_eq!(p.resource_version().as_deref(), Some("7"));
        assert!(p.metadata.deletion_timestamp.is_some());
        assert_eq!(p.finalizers(), ["kmm.node.kubernetes.io/loader-pod"]);
        assert!(p.metadata.managed_fields.is_none());
        assert!(p.metadata.owner_references.is_none());
        assert!(p.metadata.labels.is_none() && p.metadata.annotations.is_none());
        assert_eq!(p.module_key(), Some(("ns".into(), "m".into())));
        assert_eq!(p.spec.as_ref().unwrap().node_name.as_deref(), Some("n1"));
        let s = p.status.as_ref().unwrap();
        assert_eq!(s.phase.as_deref(), Some("Running"));
        assert!(s.ready);
        let names: Vec<_> = p.containers().iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["init", "worker"]);
        let worker = &p.containers()[1];
        assert_eq!(worker.restart_count, 2);
        assert!(worker.state.as_ref().unwrap().is_running());
        assert_eq!(
            worker.last_state.as_ref().unwrap().terminated(),
            Some((3, "modprobe: FATAL: Module m is in use\n"))
        );
    }

    #[test]
    fn labels_and_annotations_answer_by_key_even_through_an_arc() {
        // Method resolution must reach the inherent `labels`, not `ResourceExt::labels`
        // (which sees an empty map), however the pod is held.
        let p = Arc::new(decoded());
        let by_ref: &Arc<CachedPod> = &p;
        for (key, value) in [
            (MODULE_NAME_LABEL, "m"),
            (ROLE_LABEL, "module-loader"),
            (TARGET_KERNEL_LABEL, "6.8.0"),
            (MODULE_VERSION_LABEL, "1.0"),
        ] {
            assert_eq!(p.labels().get(key).map(String::as_str), Some(value));
            assert_eq!(by_ref.labels().get(key).map(String::as_str), Some(value));
        }
        assert!(p.labels().get("controller-revision-hash").is_none());
        assert_eq!(
            by_ref
                .annotations()
                .get(TEMPLATE_HASH_ANNOTATION)
                .map(String::as_str),
            Some("h1")
        );
        assert!(p.annotations().get("other").is_none());
    }

    #[test]
    fn a_ready_condition_other_than_true_is_not_ready() {
        let p: CachedPod = serde_json::from_value(json!({
            "metadata": {"name": "p"},
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "False"}],
                "containerStatuses": [{"name": "w", "ready": false, "restartCount": 0,
                    "image": "i", "imageID": "",
                    "state": {"waiting": {"reason": "ErrImagePull", "message": "not found"}}}]}
        }))
        .unwrap();
        assert!(!p.status.as_ref().unwrap().ready);
        assert_eq!(
            p.containers()[0].state,
            Some(CachedContainerState::Waiting {
                reason: Some("ErrImagePull".into()),
                message: Some("not found".into())
            })
        );
    }
}
