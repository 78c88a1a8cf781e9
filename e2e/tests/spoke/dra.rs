//! Issue 17, points 1 and 2 on the test world's Kubernetes: a Module's DRA driver runs where
//! the module is loaded, its DeviceClasses are accepted by the real API server, a simulated
//! node's ResourceSlice makes a claim allocatable by the real scheduler; and every pod the
//! agent makes tolerates the Module's taints plus the built-in pressure taints.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Node, Pod, Toleration};
use k8s_openapi::api::resource::v1::{DeviceClass, ResourceClaim, ResourceSlice};
use kmm_e2e::fleet::{Fleet, worker_node};
use kmm_e2e::labs::PULL_SECRET;
use kmm_e2e::oci::push_files;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use shared_api::Module;
use shared_api::conditions::DEGRADED;
use shared_api::labels::*;

use crate::setup::{
    RunningAgent, apply_module, delete_and_wait_clean, eventually, lab_module, node,
    prepare_namespace, push_kmod, wait_loaded,
};
use crate::{K1, NS, ONE_FLEET_AT_A_TIME};

const DRIVER: &str = "gpu.kmm-e2e.example.com";
const CLASS: &str = "kmm-e2e-gpu";
const CLASS_ANY: &str = "kmm-e2e-gpu-any";
const BUILTIN: [&str; 3] = [
    "node.kubernetes.io/disk-pressure",
    "node.kubernetes.io/memory-pressure",
    "node.kubernetes.io/pid-pressure",
];

/// A plain image the simulated kubelet runs (the DRA driver, the claim's consumer).
async fn push_plain_image(fleet: &Fleet, repo_tag: &str) -> anyhow::Result<String> {
    let image = format!("{}/{repo_tag}", fleet.registry().host());
    push_files(
        &fleet.registry().access(),
        &image,
        &BTreeMap::from([("/usr/bin/driver".to_string(), b"#!/bin/sh\n".to_vec())]),
        &BTreeMap::new(),
    )
    .await?;
    Ok(image)
}

async fn module_pods(client: &Client, role: &str) -> anyhow::Result<Vec<Pod>> {
    Ok(Api::<Pod>::namespaced(client.clone(), NS)
        .list(
            &ListParams::default()
                .labels(&format!("{MODULE_NAME_LABEL}=kmm-ci-a,{ROLE_LABEL}={role}")),
        )
        .await?
        .items)
}

async fn our_classes(client: &Client) -> anyhow::Result<Vec<String>> {
    let mut names: Vec<String> = Api::<DeviceClass>::all(client.clone())
        .list(&ListParams::default().labels(&format!(
            "{MODULE_NAME_LABEL}=kmm-ci-a,{MODULE_NAMESPACE_LABEL}={NS}"
        )))
        .await?
        .items
        .iter()
        .map(|c| c.name_any())
        .collect();
    names.sort();
    Ok(names)
}

fn tolerated_keys(spec: &k8s_openapi::api::core::v1::PodSpec) -> Vec<String> {
    spec.tolerations
        .iter()
        .flatten()
        .filter_map(|t| t.key.clone())
        .collect()
}

/// The loader first, then the DRA driver on the node where the module is ready; the
/// DeviceClasses written (the API server compiles their CEL selectors); the driver's
/// ResourceSlice makes a claim for the class allocatable; a class the API server refuses is
/// reported on the Module; a class no longer listed goes; deleting the Module removes the
/// driver, the classes and the node labels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dra_driver_device_classes_and_an_allocatable_claim() -> anyhow::Result<()> {
    let _one = ONE_FLEET_AT_A_TIME.lock().await;
    let nodes = vec![worker_node("worker-0", K1)];
    Fleet::builder()
        .spoke_nodes(1, nodes)
        .run(async |fleet: &mut Fleet| {
            let client = fleet.spoke(1).client().await;
            prepare_namespace(fleet, &client).await?;
            let image = push_kmod(fleet, &format!("labs/kmm-kmod:{K1}-v1.0"), &[K1], &["kmm-ci-a"]).await?;
            let driver = push_plain_image(fleet, "labs/dra-driver:latest").await?;
            let agent = RunningAgent::start(client.clone());

            let mut m = lab_module(&image);
            m.spec.dra = Some(serde_json::from_value(json!({
                "driverName": DRIVER,
                "container": { "image": driver, "env": [{ "name": "DRIVER_NAME", "value": DRIVER }] },
                "deviceClasses": [
                    { "name": CLASS, "selectors": [{ "cel": { "expression": format!("device.driver == '{DRIVER}'") } }] },
                    { "name": CLASS_ANY }
                ]
            }))?);
            apply_module(&client, &m).await?;

            wait_loaded(fleet, "worker-0", &["kmm_ci_a"]).await?;
            let dra_ready = dra_ready_label(NS, "kmm-ci-a");
            eventually("dra-ready on worker-0", async || {
                let l = node(&client, "worker-0").await?.labels().clone();
                Ok(if l.contains_key(&dra_ready) { Ok(()) } else { Err(format!("{l:?}")) })
            })
            .await?;
            // The driver's DaemonSet waits for the module: it selects the ready label.
            let ds = Api::<DaemonSet>::namespaced(client.clone(), NS).get("kmm-ci-a-dra").await?;
            assert_eq!(ds.labels()[ROLE_LABEL], ROLE_DRA);
            let pods = module_pods(&client, ROLE_DRA).await?;
            assert_eq!(pods.len(), 1);
            let spec = pods[0].spec.clone().unwrap();
            assert!(spec.node_selector.unwrap().contains_key(&module_ready_label(NS, "kmm-ci-a")));
            assert_eq!(spec.host_network, Some(true));
            assert_eq!(spec.priority_class_name.as_deref(), Some("system-node-critical"));
            let mounts: Vec<String> = spec.containers[0].volume_mounts.iter().flatten().map(|v| v.mount_path.clone()).collect();
            for p in ["/var/lib/kubelet/plugins/", "/var/lib/kubelet/plugins_registry/", "/var/run/cdi"] {
                assert!(mounts.contains(&p.to_string()), "{p} in {mounts:?}");
            }

            eventually("both DeviceClasses", async || {
                let got = our_classes(&client).await?;
                Ok(if got == [CLASS, CLASS_ANY] { Ok(()) } else { Err(format!("{got:?}")) })
            })
            .await?;
            eventually("dra status", async || {
                let st = Api::<Module>::namespaced(client.clone(), NS).get("kmm-ci-a").await?.status.unwrap_or_default();
                let d = st.dra.unwrap_or_default();
                Ok(if (d.nodes_matching_selector_number, d.desired_number, d.available_number) == (1, 1, 1) { Ok(()) } else { Err(format!("{d:?}")) })
            })
            .await?;

            // The driver publishes its device for worker-0, as a kubelet plugin does.
            let slice: ResourceSlice = serde_json::from_value(json!({
                "apiVersion": "resource.k8s.io/v1", "kind": "ResourceSlice",
                "metadata": { "name": "worker-0-gpu" },
                "spec": {
                    "driver": DRIVER, "nodeName": "worker-0",
                    "pool": { "name": "worker-0", "generation": 1, "resourceSliceCount": 1 },
                    "devices": [{ "name": "gpu-0", "attributes": { "model": { "string": "kmm-e2e" } } }]
                }
            }))?;
            Api::<ResourceSlice>::all(client.clone()).create(&PostParams::default(), &slice).await?;
            let claim: ResourceClaim = serde_json::from_value(json!({
                "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
                "metadata": { "name": "gpu-claim", "namespace": NS },
                "spec": { "devices": { "requests": [{ "name": "gpu", "exactly": { "deviceClassName": CLASS } }] } }
            }))?;
            let claims = Api::<ResourceClaim>::namespaced(client.clone(), NS);
            claims.create(&PostParams::default(), &claim).await?;
            let consumer: Pod = serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": { "name": "gpu-consumer", "namespace": NS },
                "spec": {
                    "imagePullSecrets": [{ "name": PULL_SECRET }],
                    "containers": [{ "name": "c", "image": driver, "resources": { "claims": [{ "name": "gpu" }] } }],
                    "resourceClaims": [{ "name": "gpu", "resourceClaimName": "gpu-claim" }]
                }
            }))?;
            let pods = Api::<Pod>::namespaced(client.clone(), NS);
            pods.create(&PostParams::default(), &consumer).await?;
            // The real scheduler allocates the claim from the slice and binds the pod.
            eventually("the claim allocated to gpu-0", async || {
                let c = claims.get("gpu-claim").await?;
                let results = c.status.and_then(|s| s.allocation).and_then(|a| a.devices).and_then(|d| d.results).unwrap_or_default();
                Ok(match results.first() {
                    Some(r) if r.device == "gpu-0" && r.driver == DRIVER && r.pool == "worker-0" => Ok(()),
                    _ => Err(format!("{results:?}")),
                })
            })
            .await?;
            eventually("the consumer bound to worker-0", async || {
                let n = pods.get("gpu-consumer").await?.spec.and_then(|s| s.node_name);
                Ok(if n.as_deref() == Some("worker-0") { Ok(()) } else { Err(format!("{n:?}")) })
            })
            .await?;

            // A selector the API server refuses (not CEL) is reported; the other class stays.
            let mut bad = m.clone();
            bad.spec.dra.as_mut().unwrap().device_classes[1].selectors = vec![json!({ "cel": { "expression": "device.driver ==" } })];
            apply_module(&client, &bad).await?;
            eventually("Degraded DeviceClassFailed", async || {
                let st = Api::<Module>::namespaced(client.clone(), NS).get("kmm-ci-a").await?.status.unwrap_or_default();
                let c = st.conditions.iter().find(|c| c.type_ == DEGRADED).cloned();
                Ok(match c {
                    Some(c) if c.reason == "DeviceClassFailed" && c.message.contains(CLASS_ANY) => Ok(()),
                    other => Err(format!("{other:?}")),
                })
            })
            .await?;
            assert_eq!(our_classes(&client).await?, [CLASS, CLASS_ANY], "nothing deleted for bad input");

            // A class no longer listed goes.
            let mut one = m.clone();
            one.spec.dra.as_mut().unwrap().device_classes.truncate(1);
            apply_module(&client, &one).await?;
            eventually("only the first class", async || {
                let got = our_classes(&client).await?;
                Ok(if got == [CLASS] { Ok(()) } else { Err(format!("{got:?}")) })
            })
            .await?;

            pods.delete("gpu-consumer", &DeleteParams::default().grace_period(0)).await?;
            claims.delete("gpu-claim", &DeleteParams::default()).await?;
            delete_and_wait_clean(fleet, &client, &["worker-0"]).await?;
            assert!(our_classes(&client).await?.is_empty(), "the DeviceClasses went with the Module");
            assert!(Api::<DeviceClass>::all(client.clone()).get_opt(CLASS).await?.is_none());
            agent.stop().await;
            Ok(())
        })
        .await
}

/// A Module tolerating a custom `NoSchedule` taint loads on a node carrying it; without the
/// toleration the node is not targeted. Loader pods carry the Module's toleration and the
/// built-in pressure tolerations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tolerated_taint_loads_and_pods_carry_the_builtin_tolerations() -> anyhow::Result<()> {
    let _one = ONE_FLEET_AT_A_TIME.lock().await;
    let nodes = vec![worker_node("worker-0", K1)];
    Fleet::builder()
        .spoke_nodes(1, nodes)
        .run(async |fleet: &mut Fleet| {
            let client = fleet.spoke(1).client().await;
            prepare_namespace(fleet, &client).await?;
            let image = push_kmod(fleet, &format!("labs/kmm-kmod:{K1}-v1.0"), &[K1], &["kmm-ci-a"]).await?;
            // The node is dedicated: nothing that does not tolerate it is scheduled there.
            let taint = json!({ "key": "kmm-e2e/dedicated", "value": "drivers", "effect": "NoSchedule" });
            Api::<Node>::all(client.clone())
                .patch("worker-0", &PatchParams::default(), &Patch::Merge(json!({ "spec": { "taints": [taint] } })))
                .await?;
            let agent = RunningAgent::start(client.clone());

            let mut m = lab_module(&image);
            apply_module(&client, &m).await?;
            eventually("no node targeted without the toleration", async || {
                let st = Api::<Module>::namespaced(client.clone(), NS).get("kmm-ci-a").await?.status.unwrap_or_default();
                let l = st.module_loader.unwrap_or_default();
                Ok(if st.observed_generation.is_some() && l.nodes_matching_selector_number == 0 { Ok(()) } else { Err(format!("{l:?}")) })
            })
            .await?;

            let toleration: Toleration = serde_json::from_value(json!({
                "key": "kmm-e2e/dedicated", "operator": "Equal", "value": "drivers", "effect": "NoSchedule"
            }))?;
            m.spec.tolerations = vec![toleration.clone()];
            apply_module(&client, &m).await?;
            wait_loaded(fleet, "worker-0", &["kmm_ci_a"]).await?;

            let loaders = module_pods(&client, ROLE_LOADER).await?;
            let spec = loaders[0].spec.clone().unwrap();
            assert_eq!(spec.node_name.as_deref(), Some("worker-0"));
            assert_eq!(spec.tolerations.as_ref().unwrap()[0], toleration, "the Module's first");
            let keys = tolerated_keys(&spec);
            for k in BUILTIN {
                assert_eq!(keys.iter().filter(|t| *t == k).count(), 1, "{k} once in {keys:?}");
            }
            let ds = Api::<DaemonSet>::namespaced(client.clone(), NS)
                .list(&ListParams::default().labels(&format!("{MODULE_NAME_LABEL}=kmm-ci-a,{ROLE_LABEL}={ROLE_LOADER}")))
                .await?
                .items;
            let template = ds[0].spec.clone().unwrap().template.spec.unwrap();
            let builtin: Vec<&Toleration> = template
                .tolerations
                .iter()
                .flatten()
                .filter(|t| t.key.as_deref().is_some_and(|k| BUILTIN.contains(&k)))
                .collect();
            assert_eq!(builtin.len(), 3, "{builtin:?}");
            assert!(builtin.iter().all(|t| t.operator.as_deref() == Some("Exists") && t.effect.as_deref() == Some("NoSchedule")));

            delete_and_wait_clean(fleet, &client, &["worker-0"]).await?;
            agent.stop().await;
            Ok(())
        })
        .await
}
