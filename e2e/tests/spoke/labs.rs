//! The seed labs as Modules: prebuilt image, in-tree removal, device plugin, soft dependencies.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use kmm_e2e::fleet::{Fleet, worker_node};
use kmm_e2e::oci::push_files;
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use serde_json::json;
use shared_api::Module;
use shared_api::conditions::{READY, VALID, condition_status};
use shared_api::labels::*;

use crate::setup::{
    RunningAgent, apply_module, delete_and_wait_clean, eventually, lab_module, loaded,
    loader_daemonsets, module_from_yaml, node, node_events, prepare_namespace, push_kmod,
    push_lab_kmod, sim_node, wait_loaded,
};
use crate::{K1, K3, NS, ONE_FLEET_AT_A_TIME, SPOKE};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prebuilt_image_loads_on_workers_only_and_deletion_cleans_up() -> anyhow::Result<()> {
    let _one = ONE_FLEET_AT_A_TIME.lock().await;
    let nodes = vec![
        worker_node("worker-0", K1),
        worker_node("worker-1", K1),
        sim_node(
            "control-plane-0",
            K1,
            &[("node-role.kubernetes.io/control-plane", "")],
            &[],
        ),
    ];
    Fleet::builder()
        .spoke_nodes(1, nodes)
        .run(async |fleet: &mut Fleet| {
            let client = fleet.spoke(1).client().await;
            prepare_namespace(fleet, &client).await?;
            let image = push_lab_kmod(fleet, "1.0").await?;
            let agent = RunningAgent::start(client.clone());
            apply_module(&client, &lab_module(&image)).await?;

            wait_loaded(fleet, "worker-0", &["kmm_ci_a"]).await?;
            wait_loaded(fleet, "worker-1", &["kmm_ci_a"]).await?;
            assert!(loaded(fleet, "control-plane-0").is_empty(), "not selected");
            let ready = module_ready_label(NS, "kmm-ci-a");
            for n in ["worker-0", "worker-1"] {
                eventually(&format!("ready label on {n}"), async || {
                    let l = node(&client, n).await?.labels().clone();
                    Ok(if l.contains_key(&ready) {
                        Ok(())
                    } else {
                        Err(format!("{l:?}"))
                    })
                })
                .await?;
            }
            let cp = node(&client, "control-plane-0").await?;
            assert!(!cp.labels().contains_key(&ready));
            assert_eq!(
                cp.labels().get(KERNEL_LABEL).map(String::as_str),
                Some(K1),
                "every node carries its kernel"
            );
            assert!(
                agent.health.is_ready(),
                "ready once caches are synced: {:?}",
                agent.health.waiting_for()
            );

            let status = eventually("Module status", async || {
                let m = Api::<Module>::namespaced(client.clone(), NS)
                    .get("kmm-ci-a")
                    .await?;
                let st = m.status.clone().unwrap_or_default();
                let loader = st.module_loader.unwrap_or_default();
                let ok = (
                    loader.nodes_matching_selector_number,
                    loader.desired_number,
                    loader.available_number,
                ) == (2, 2, 2)
                    && condition_status(&st.conditions, READY) == Some("True")
                    && m.finalizers().iter().any(|f| f == MODULE_FINALIZER);
                Ok(if ok {
                    Ok(st)
                } else {
                    Err(format!("{st:?} finalizers {:?}", m.finalizers()))
                })
            })
            .await?;
            assert_eq!(condition_status(&status.conditions, VALID), Some("True"));
            let events = eventually("ModuleLoaded events", async || {
                let ev = node_events(&client, "ModuleLoaded").await?;
                Ok(if ev.len() == 2 {
                    Ok(ev)
                } else {
                    Err(format!("{} events", ev.len()))
                })
            })
            .await?;
            assert!(events.iter().all(
                |e| e.note.as_deref() == Some("Module labsv2/kmm-ci-a loaded into the kernel")
            ));
            assert!(
                events
                    .iter()
                    .all(|e| e.regarding.as_ref().and_then(|r| r.kind.as_deref()) == Some("Node"))
            );
            // As upstream: Normal events carrying the annotation module=<namespace>/<name>.
            assert!(
                events.iter().all(|e| e.type_.as_deref() == Some("Normal")
                    && e.metadata
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get("module"))
                        == Some(&"labsv2/kmm-ci-a".to_string())),
                "{events:#?}"
            );

            // Bad input never deletes what works: an invalid edit is reported, the loaders stay.
            let before = loader_daemonsets(&client).await?;
            let mut invalid = lab_module(&image);
            invalid
                .spec
                .module_loader
                .as_mut()
                .unwrap()
                .container
                .modprobe
                .modules_loading_order = Some(vec!["kmm-ci-b".into()]);
            invalid
                .spec
                .module_loader
                .as_mut()
                .unwrap()
                .container
                .kernel_mappings[0]
                .regexp = Some("([".into());
            apply_module(&client, &invalid).await?;
            let msg = eventually("Valid=False", async || {
                let m = Api::<Module>::namespaced(client.clone(), NS)
                    .get("kmm-ci-a")
                    .await?;
                let st = m.status.clone().unwrap_or_default();
                let c = st.conditions.iter().find(|c| c.type_ == VALID).cloned();
                Ok(match c {
                    Some(c)
                        if c.status == "False"
                            && st.observed_generation == m.metadata.generation =>
                    {
                        Ok(c.message)
                    }
                    other => Err(format!("{other:?}")),
                })
            })
            .await?;
            for path in ["modulesLoadingOrder", "kernelMappings[0].regexp"] {
                assert!(msg.contains(path), "{path} not in {msg}");
            }
            let after = loader_daemonsets(&client).await?;
            assert_eq!(
                before.iter().map(|d| d.name_any()).collect::<Vec<_>>(),
                after.iter().map(|d| d.name_any()).collect::<Vec<_>>()
            );
            assert_eq!(loaded(fleet, "worker-0"), vec!["kmm_ci_a"]);
            apply_module(&client, &lab_module(&image)).await?;

            delete_and_wait_clean(fleet, &client, &["worker-0", "worker-1"]).await?;
            eventually("ModuleUnloaded events", async || {
                let ev = node_events(&client, "ModuleUnloaded").await?;
                Ok(if ev.len() == 2 {
                    Ok(())
                } else {
                    Err(format!("{} events", ev.len()))
                })
            })
            .await?;
            agent.stop().await;
            Ok(())
        })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_tree_joydev_is_removed_before_kmm_ci_a_loads() -> anyhow::Result<()> {
    let _one = ONE_FLEET_AT_A_TIME.lock().await;
    let nodes = vec![sim_node(
        "worker-0",
        K1,
        &[("node-role.kubernetes.io/worker", "")],
        &["joydev"],
    )];
    Fleet::builder()
        .spoke_nodes(1, nodes)
        .run(async |fleet: &mut Fleet| {
            let client = fleet.spoke(1).client().await;
            prepare_namespace(fleet, &client).await?;
            assert_eq!(loaded(fleet, "worker-0"), vec!["joydev"]);
            let image = push_lab_kmod(fleet, "1.0").await?;
            let agent = RunningAgent::start(client.clone());
            let mut m = lab_module(&image);
            m.spec
                .module_loader
                .as_mut()
                .unwrap()
                .container
                .in_tree_module_to_remove = Some("joydev".into());
            apply_module(&client, &m).await?;
            wait_loaded(fleet, "worker-0", &["kmm_ci_a"]).await?;
            let logs = fleet.node_sim(SPOKE).logs();
            let removed = logs.iter().position(|l| l.contains("modprobe -r joydev"));
            let inserted = logs
                .iter()
                .position(|l| l.contains("insmod") && l.contains("kmm_ci_a.ko"));
            assert!(
                matches!((removed, inserted), (Some(r), Some(i)) if r < i),
                "joydev removed before the load: {logs:#?}"
            );
            delete_and_wait_clean(fleet, &client, &["worker-0"]).await?;
            agent.stop().await;
            Ok(())
        })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_plugin_runs_only_on_ready_nodes() -> anyhow::Result<()> {
    let _one = ONE_FLEET_AT_A_TIME.lock().await;
    // worker-1's kernel has no mapping: the module never gets ready there.
    let nodes = vec![worker_node("worker-0", K1), worker_node("worker-1", K3)];
    Fleet::builder().spoke_nodes(1, nodes).run(async |fleet: &mut Fleet| {
        let client = fleet.spoke(1).client().await;
        prepare_namespace(fleet, &client).await?;
        let image = push_kmod(fleet, &format!("labs/kmm-kmod:{K1}-v1.0"), &[K1], &["kmm-ci-a"]).await?;
        let plugin = format!("{}/labs/simple-device-plugin:latest", fleet.registry().host());
        push_files(&fleet.registry().access(), &plugin, &BTreeMap::from([("/usr/bin/plugin".to_string(), b"#!/bin/sh\n".to_vec())]), &BTreeMap::new()).await?;
        let agent = RunningAgent::start(client.clone());
        let mut m = lab_module(&image);
        m.spec.module_loader.as_mut().unwrap().container.kernel_mappings[0].regexp = Some(r"\.el9_2\.x86_64$".into());
        m.spec.device_plugin = Some(serde_json::from_value(json!({
            "serviceAccountName": "labsv2sa",
            "container": { "image": plugin, "imagePullPolicy": "Always", "args": ["-config=config-labs.yaml"] }
        }))?);
        apply_module(&client, &m).await?;

        wait_loaded(fleet, "worker-0", &["kmm_ci_a"]).await?;
        let dp_ready = device_plugin_ready_label(NS, "kmm-ci-a");
        eventually("device-plugin-ready on worker-0", async || {
            let l = node(&client, "worker-0").await?.labels().clone();
            Ok(if l.contains_key(&dp_ready) { Ok(()) } else { Err(format!("{l:?}")) })
        })
        .await?;
        // system-node-critical was accepted outside kube-system: the pod exists and runs.
        let pods = Api::<Pod>::namespaced(client.clone(), NS)
            .list(&ListParams::default().labels(&format!("{ROLE_LABEL}={ROLE_DEVICE_PLUGIN}")))
            .await?
            .items;
        let on: Vec<String> = pods.iter().filter_map(|p| p.spec.as_ref()?.node_name.clone()).collect();
        assert_eq!(on, vec!["worker-0"], "device plugin only where the module is ready");
        assert_eq!(pods[0].spec.as_ref().unwrap().priority_class_name.as_deref(), Some("system-node-critical"));
        let w1 = node(&client, "worker-1").await?;
        assert!(!w1.labels().contains_key(&dp_ready) && !w1.labels().contains_key(&module_ready_label(NS, "kmm-ci-a")));
        assert!(loaded(fleet, "worker-1").is_empty());
        eventually("devicePlugin status", async || {
            let st = Api::<Module>::namespaced(client.clone(), NS).get("kmm-ci-a").await?.status.unwrap_or_default();
            let dp = st.device_plugin.unwrap_or_default();
            Ok(if (dp.desired_number, dp.available_number) == (1, 1) { Ok(()) } else { Err(format!("{dp:?}")) })
        })
        .await?;
        delete_and_wait_clean(fleet, &client, &["worker-0", "worker-1"]).await?;
        agent.stop().await;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soft_dependencies_load_first_and_unload_last() -> anyhow::Result<()> {
    let _one = ONE_FLEET_AT_A_TIME.lock().await;
    Fleet::builder()
        .spoke_nodes(1, vec![worker_node("worker-0", K1)])
        .run(async |fleet: &mut Fleet| {
            let client = fleet.spoke(1).client().await;
            prepare_namespace(fleet, &client).await?;
            let image = push_kmod(
                fleet,
                "myrepo/kmmo-lab:kmm-kmod-${KERNEL_FULL_VERSION}"
                    .replace("${KERNEL_FULL_VERSION}", K1)
                    .as_str(),
                &[K1],
                &["kmm-ci-a", "kmm-ci-b"],
            )
            .await?;
            let agent = RunningAgent::start(client.clone());
            let template = image.replace(K1, "${KERNEL_FULL_VERSION}");
            let m = module_from_yaml(&format!(
                r#"
apiVersion: kmm.sigs.x-k8s.io/v1beta1
kind: Module
metadata: {{ name: kmm-ci-a, namespace: {NS} }}
spec:
  moduleLoader:
    serviceAccountName: labsv2sa
    container:
      modprobe:
        moduleName: kmm-ci-a
        modulesLoadingOrder: [kmm-ci-a, kmm-ci-b]
      kernelMappings:
        - regexp: '^.*\.x86_64$'
          containerImage: {template}
  imageRepoSecret: {{ name: myrepo-pull-secret }}
  selector: {{ node-role.kubernetes.io/worker: "" }}
"#
            ));
            apply_module(&client, &m).await?;
            wait_loaded(fleet, "worker-0", &["kmm_ci_b", "kmm_ci_a"]).await?;
            delete_and_wait_clean(fleet, &client, &["worker-0"]).await?;
            let logs = fleet.node_sim(SPOKE).logs();
            let a = logs.iter().position(|l| l.contains("rmmod kmm_ci_a"));
            let b = logs.iter().position(|l| l.contains("rmmod kmm_ci_b"));
            assert!(
                matches!((a, b), (Some(a), Some(b)) if a < b),
                "kmm_ci_a unloaded before kmm_ci_b: {logs:#?}"
            );
            agent.stop().await;
            Ok(())
        })
        .await
}
