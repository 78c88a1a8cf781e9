//! `kmm-spoke must-gather`: the spoke's support bundle (see docs/operations.md, "Support
//! bundle"). What is read: Modules, the loader and device-plugin DaemonSets and their pods
//! (status, termination messages, logs), Nodes reduced to what KMM looks at, our Node events
//! in default and the events of the Modules' namespaces, the kernel ClusterClaims, the
//! agent's Deployment, pods, logs and ConfigMaps, and Secrets as names.

use std::collections::BTreeSet;

use kmm_runtime::gather::collect::{
    CLUSTER_CLAIM, CONFIG_MAP, DAEMON_SET, DEPLOYMENT, Kind, NODE, Scope, keep,
};
use kmm_runtime::gather::{Bundle, GatherArgs, Gatherer, Written};
use kube::ResourceExt;
use kube::api::DynamicObject;
use serde_json::{Map, Value, json};
use shared_api::labels::{BETA_PREFIX, PREFIX, ROLE_LABEL};
use shared_api::ocm::{DTK_IMAGES_CLAIM, KERNEL_VERSIONS_CLAIM};

use crate::controller::events::{EVENT_NAMESPACE, REPORTING_CONTROLLER};

/// The namespace of manifests/spoke.
pub const DEFAULT_NAMESPACE: &str = "kmm-spoke";

const MODULE: Kind = Kind::new("kmm.sigs.x-k8s.io", "v1beta1", "Module", "modules");

/// Gather the spoke into the bundle directory (and tarball).
pub async fn run(args: &GatherArgs) -> anyhow::Result<Written> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ns = args
        .namespace
        .clone()
        .unwrap_or_else(|| DEFAULT_NAMESPACE.into());
    let client = kmm_runtime::gather::client(args.kubeconfig.as_deref()).await?;
    let bundle = Bundle::create(&args.output_dir(), "kmm-spoke must-gather")?;
    let mut g = Gatherer::new(client, bundle, args.since);
    g.bundle.note(format!("agent namespace: {ns}"));

    let modules = g.objects(MODULE, Scope::All, None, keep).await;
    let module_namespaces: BTreeSet<String> = modules
        .iter()
        .filter_map(DynamicObject::namespace)
        .collect();
    g.objects(DAEMON_SET, Scope::All, Some(ROLE_LABEL), keep)
        .await;
    g.pods_with_logs(Scope::All, Some(ROLE_LABEL)).await;
    g.objects(NODE, Scope::All, None, reduce_node).await;
    g.objects_where(CLUSTER_CLAIM, Scope::All, None, is_kernel_claim, keep)
        .await;
    g.events(
        EVENT_NAMESPACE,
        Some(&format!("reportingComponent={REPORTING_CONTROLLER}")),
        Some(REPORTING_CONTROLLER),
    )
    .await;

    g.objects(DEPLOYMENT, Scope::Namespace(&ns), None, keep)
        .await;
    g.pods_with_logs(Scope::Namespace(&ns), None).await;
    g.objects(CONFIG_MAP, Scope::Namespace(&ns), None, keep)
        .await;
    g.secret_names(&ns).await;
    g.events(&ns, None, None).await;
    for m in &module_namespaces {
        if *m != ns {
            g.events(m, None, None).await;
            g.secret_names(m).await;
        }
    }
    Ok(g.bundle.finish(args.tar)?)
}

/// The kernel claims and the Driver Toolkit claims (with their numbered overflow claims).
fn is_kernel_claim(o: &DynamicObject) -> bool {
    let name = o.name_any();
    name.starts_with(KERNEL_VERSIONS_CLAIM) || name.starts_with(DTK_IMAGES_CLAIM)
}

/// A Node as KMM sees it: name, kernel, boot ID, taints, readiness, and only the
/// `kmm.node.kubernetes.io/…` and `beta.kmm.node.kubernetes.io/…` labels and annotations.
pub fn reduce_node(v: Value) -> Value {
    let ours = |m: Option<&Value>| -> Map<String, Value> {
        m.and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .filter(|(k, _)| {
                        k.starts_with(&format!("{PREFIX}/"))
                            || k.starts_with(&format!("{BETA_PREFIX}/"))
                    })
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            })
            .unwrap_or_default()
    };
    let meta = v.get("metadata");
    let info = v.pointer("/status/nodeInfo");
    let ready = v
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .and_then(|cs| {
            cs.iter()
                .find(|c| c.get("type").and_then(Value::as_str) == Some("Ready"))
        })
        .and_then(|c| c.get("status"))
        .cloned();
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": meta.and_then(|m| m.get("name")),
            "labels": ours(meta.and_then(|m| m.get("labels"))),
            "annotations": ours(meta.and_then(|m| m.get("annotations"))),
        },
        "spec": {"taints": v.pointer("/spec/taints").cloned().unwrap_or(json!([]))},
        "status": {
            "kernelVersion": info.and_then(|i| i.get("kernelVersion")),
            "bootID": info.and_then(|i| i.get("bootID")),
            "ready": ready,
        },
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn nodes_keep_only_what_kmm_looks_at() {
        let node = json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "n1", "uid": "u",
                "labels": {"kubernetes.io/hostname": "n1",
                    "kmm.node.kubernetes.io/labs.a.ready": "",
                    "beta.kmm.node.kubernetes.io/version-module-loader.labs.a": "1"},
                "annotations": {"node.alpha.kubernetes.io/ttl": "0",
                    "kmm.node.kubernetes.io/x": "y"}},
            "spec": {"taints": [{"key": "k", "effect": "NoSchedule"}], "podCIDR": "10.0.0.0/24"},
            "status": {"nodeInfo": {"kernelVersion": "6.1.0-57-amd64", "bootID": "b-1",
                    "machineID": "m"},
                "addresses": [{"type": "InternalIP", "address": "10.0.0.1"}],
                "conditions": [{"type": "Ready", "status": "True"}]}
        });
        assert_eq!(
            reduce_node(node),
            json!({"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": "n1",
                    "labels": {"kmm.node.kubernetes.io/labs.a.ready": "",
                        "beta.kmm.node.kubernetes.io/version-module-loader.labs.a": "1"},
                    "annotations": {"kmm.node.kubernetes.io/x": "y"}},
                "spec": {"taints": [{"key": "k", "effect": "NoSchedule"}]},
                "status": {"kernelVersion": "6.1.0-57-amd64", "bootID": "b-1", "ready": "True"}})
        );
    }

    #[test]
    fn only_our_claims_are_kept() {
        let claim = |n: &str| DynamicObject {
            types: None,
            metadata: kube::api::ObjectMeta {
                name: Some(n.into()),
                ..Default::default()
            },
            data: json!({}),
        };
        assert!(is_kernel_claim(&claim(KERNEL_VERSIONS_CLAIM)));
        assert!(is_kernel_claim(&claim(&format!(
            "{KERNEL_VERSIONS_CLAIM}.1"
        ))));
        assert!(!is_kernel_claim(&claim("id.k8s.io")));
        assert!(is_kernel_claim(&claim(DTK_IMAGES_CLAIM)));
    }
}
