//! What the agent's caches cost per object, counted by the allocator: a loader pod and a
//! node as the API server sends them, through the same deserialize-and-strip path as the
//! informers, into a reflector store. The spoke at 1,000 nodes × 10 Modules caches 10,000
//! pods and 1,000 nodes, so these bytes decide its memory (docs/benchmarks.md).
#![allow(clippy::unwrap_used)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use k8s_openapi::api::core::v1::Node;
use kmm_spoke::cache::{CachedPod, strip_node};
use kube::runtime::reflector;
use kube::runtime::watcher::Event;
use serde_json::{Value, json};

/// Bytes live in the heap, with glibc's per-chunk overhead (8 bytes, 16-byte granules).
static LIVE: AtomicIsize = AtomicIsize::new(0);

struct Counting;

fn chunk(size: usize) -> isize {
    (size + 8).max(32).next_multiple_of(16) as isize
}

// SAFETY: every call goes to the system allocator unchanged; only sizes are counted.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(chunk(l.size()), Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(chunk(l.size()), Ordering::Relaxed);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(chunk(new) - chunk(l.size()), Ordering::Relaxed);
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static A: Counting = Counting;

/// A loader pod of Module `module` on `node`, as the DaemonSet controller makes it and a
/// kubelet reports it: full spec, managed fields, five conditions, one container status.
fn loader_pod(module: usize, node: usize) -> Value {
    let name = format!("mod-{module}");
    let kernel = "6.8.0-45-generic";
    let conditions: Vec<Value> = [
        "Initialized",
        "Ready",
        "ContainersReady",
        "PodScheduled",
        "PodReadyToStartContainers",
    ]
    .iter()
    .map(|t| json!({"type": t, "status": "True", "lastTransitionTime": "2026-12-07T19:40:02Z"}))
    .collect();
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": format!("{name}-worker-6-8-0-45-generic-{node:05x}"),
            "generateName": format!("{name}-worker-6-8-0-45-generic-"),
            "namespace": "kmm-bench",
            "uid": format!("0b5e1c2a-4d1f-4a8e-9c6b-{node:06x}{module:06x}"),
            "resourceVersion": format!("{}", 100_000 + node * 10 + module),
            "creationTimestamp": "2026-12-07T19:40:00Z",
            "labels": {
                "kmm.node.kubernetes.io/module.name": name,
                "kmm.node.kubernetes.io/role": "module-loader",
                "kmm.node.kubernetes.io/target-kernel": kernel,
                "controller-revision-hash": "5d8f7c9b6d",
                "pod-template-generation": "1"
            },
            "annotations": {"kmm.node.kubernetes.io/template-hash": "3f2a9c41d7e0b865"},
            "ownerReferences": [{
                "apiVersion": "apps/v1", "kind": "DaemonSet", "name": format!("{name}-worker"),
                "uid": "8a3c2d1e-0f4b-4c5d-9e6f-7a8b9c0d1e2f", "controller": true,
                "blockOwnerDeletion": true
            }],
            "managedFields": [
                {"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1",
                 "time": "2026-12-07T19:40:00Z", "fieldsType": "FieldsV1",
                 "fieldsV1": {"f:metadata": {"f:generateName": {}, "f:labels": {".": {},
                   "f:controller-revision-hash": {}, "f:pod-template-generation": {}},
                   "f:ownerReferences": {}}, "f:spec": {"f:affinity": {}, "f:containers": {},
                   "f:tolerations": {}, "f:volumes": {}}}},
                {"manager": "kmm-sim-kubelet", "operation": "Update", "apiVersion": "v1",
                 "time": "2026-12-07T19:40:02Z", "fieldsType": "FieldsV1", "subresource": "status",
                 "fieldsV1": {"f:status": {"f:conditions": {}, "f:containerStatuses": {},
                   "f:phase": {}, "f:podIP": {}, "f:startTime": {}}}}
            ]
        },
        "spec": {
            "nodeName": format!("node-{node:04}"),
            "serviceAccountName": "default",
            "priorityClassName": "system-node-critical",
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchFields": [{"key": "metadata.name",
                  "operator": "In", "values": [format!("node-{node:04}")]}]}]}}},
            "nodeSelector": {format!("kmm.node.kubernetes.io/kmm-bench.{name}.worker"): ""},
            "containers": [{
                "name": "worker", "image": "registry.local/kmod@sha256:0123456789abcdef",
                "command": ["/bin/sh", "-c"], "args": ["exec /kmm/loader load"],
                "lifecycle": {"preStop": {"exec": {"command": ["/kmm/loader", "unload"]}}},
                "securityContext": {"privileged": true},
                "volumeMounts": [{"name": "lib-modules", "mountPath": "/lib/modules"},
                                 {"name": "firmware", "mountPath": "/var/lib/firmware"}]
            }],
            "volumes": [{"name": "lib-modules", "hostPath": {"path": "/lib/modules"}},
                        {"name": "firmware", "hostPath": {"path": "/var/lib/firmware"}}],
            "tolerations": [
                {"key": "node.kubernetes.io/disk-pressure", "operator": "Exists", "effect": "NoSchedule"},
                {"key": "node.kubernetes.io/memory-pressure", "operator": "Exists", "effect": "NoSchedule"},
                {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute"}
            ]
        },
        "status": {
            "phase": "Running",
            "conditions": conditions,
            "hostIP": "10.0.0.1", "podIP": "10.0.0.1", "podIPs": [{"ip": "10.0.0.1"}],
            "startTime": "2026-12-07T19:40:01Z", "qosClass": "BestEffort",
            "containerStatuses": [{
                "name": "worker", "ready": true, "restartCount": 0, "started": true,
                "image": "registry.local/kmod@sha256:0123456789abcdef",
                "imageID": "registry.local/kmod@sha256:0123456789abcdef",
                "containerID": "containerd://0123456789abcdef0123456789abcdef",
                "state": {"running": {"startedAt": "2026-12-07T19:40:02Z"}}
            }]
        }
    })
}

/// A worker node carrying the ready labels and boot-fence annotations of `modules` Modules.
fn node(node: usize, modules: usize) -> Value {
    let mut labels = serde_json::Map::new();
    for (k, v) in [
        ("kubernetes.io/arch", "amd64"),
        ("kubernetes.io/os", "linux"),
        ("node-role.kubernetes.io/worker", ""),
        (
            "kmm.node.kubernetes.io/kernel-version.full",
            "6.8.0-45-generic",
        ),
    ] {
        labels.insert(k.into(), v.into());
    }
    labels.insert(
        "kubernetes.io/hostname".into(),
        format!("node-{node:04}").into(),
    );
    let mut annotations = serde_json::Map::new();
    annotations.insert("node.alpha.kubernetes.io/ttl".into(), "0".into());
    for m in 0..modules {
        labels.insert(
            format!("kmm.node.kubernetes.io/kmm-bench.mod-{m}.ready"),
            "".into(),
        );
        labels.insert(
            format!("kmm.node.kubernetes.io/kmm-bench.mod-{m}.worker"),
            "".into(),
        );
        annotations.insert(
            format!("kmm.node.kubernetes.io/kmm-bench.mod-{m}.ready-boot"),
            "1f0e2d3c-4b5a-6978-8796-a5b4c3d2e1f0".into(),
        );
    }
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {
            "name": format!("node-{node:04}"),
            "uid": format!("6c1d2e3f-4a5b-4c6d-8e7f-{node:012x}"),
            "resourceVersion": format!("{}", 50_000 + node),
            "creationTimestamp": "2026-12-07T19:30:00Z",
            "labels": labels, "annotations": annotations,
            "managedFields": [{"manager": "kmm-sim", "operation": "Update", "apiVersion": "v1",
                "time": "2026-12-07T19:30:00Z", "fieldsType": "FieldsV1",
                "fieldsV1": {"f:metadata": {"f:labels": {}}}}]
        },
        "spec": {"podCIDR": "10.244.0.0/24", "podCIDRs": ["10.244.0.0/24"]},
        "status": {
            "nodeInfo": {"kernelVersion": "6.8.0-45-generic", "bootID": "1f0e2d3c-4b5a-6978-8796-a5b4c3d2e1f0",
                "osImage": "Ubuntu 24.04.1 LTS", "architecture": "amd64", "containerRuntimeVersion": "containerd://1.7.22",
                "kubeletVersion": "v1.34.1", "kubeProxyVersion": "", "machineID": "0123", "systemUUID": "4567",
                "operatingSystem": "linux"},
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                "message": "kubelet is posting ready status", "lastHeartbeatTime": "2026-12-07T19:30:00Z",
                "lastTransitionTime": "2026-12-07T19:30:00Z"}],
            "addresses": [{"type": "InternalIP", "address": "10.0.0.1"}],
            "capacity": {"cpu": "2", "memory": "4Gi", "pods": "110"},
            "allocatable": {"cpu": "2", "memory": "4Gi", "pods": "110"}
        }
    })
}

/// Live heap bytes per object after `n` objects of `make` went through `decode` into a store.
fn per_object<K>(n: usize, make: impl Fn(usize) -> Value, decode: impl Fn(&str) -> K) -> isize
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    let texts: Vec<String> = (0..n).map(|i| make(i).to_string()).collect();
    let (store, mut writer) = reflector::store::<K>();
    let before = LIVE.load(Ordering::Relaxed);
    writer.apply_watcher_event(&Event::Init);
    for t in &texts {
        writer.apply_watcher_event(&Event::InitApply(decode(t)));
    }
    writer.apply_watcher_event(&Event::InitDone);
    let after = LIVE.load(Ordering::Relaxed);
    assert_eq!(store.state().len(), n);
    (after - before) / n as isize
}

#[test]
fn a_cached_loader_pod_and_node_stay_small() {
    let pod = per_object(
        2_000,
        |i| loader_pod(i % 10, i / 10),
        |t| serde_json::from_str::<CachedPod>(t).unwrap(),
    );
    let node = per_object(
        200,
        |i| node(i, 10),
        |t| {
            let mut n: Node = serde_json::from_str(t).unwrap();
            strip_node(&mut n);
            n
        },
    );
    eprintln!("cached loader pod: {pod} B; cached node with 10 Modules: {node} B");
    // 1,511 B and 5,942 B when written (a stripped k8s-openapi `Pod` cost 5,527 B): 10,000
    // pods and 1,000 nodes in about 20 MiB. The margin is for dependency updates, not growth.
    assert!(pod <= 1_700, "a cached loader pod costs {pod} B");
    assert!(node <= 6_500, "a cached node costs {node} B");
}
