//! Versions and kernels: the ordered upgrade, two kernels with two loaders, an unmapped upgrade.
#![allow(clippy::unwrap_used)]

use anyhow::Context as _;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Pod;
use kmm_e2e::fleet::{Fleet, worker_node};
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use shared_api::Module;
use shared_api::conditions::READY;
use shared_api::labels::*;

use crate::setup::{
    RunningAgent, apply_module, delete_and_wait_clean, eventually, lab_module, label_node, loaded,
    loader_daemonsets, node, prepare_namespace, push_kmod, push_lab_kmod, wait_loaded,
};
use crate::{K1, K2, K3, NS, ONE_FLEET_AT_A_TIME, SPOKE};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordered_upgrade_from_0_9_to_1_0() -> anyhow::Result<()> {
    let _one = ONE_FLEET_AT_A_TIME.lock().await;
    let nodes = vec![worker_node("worker-0", K1), worker_node("worker-1", K1)];
    Fleet::builder()
        .spoke_nodes(1, nodes)
        .run(async |fleet: &mut Fleet| {
            let client = fleet.spoke(1).client().await;
            prepare_namespace(fleet, &client).await?;
            let v09 = push_lab_kmod(fleet, "0.9").await?;
            let v10 = push_lab_kmod(fleet, "1.0").await?;
            let agent = RunningAgent::start(client.clone());
            let version_label = version_module_label(NS, "kmm-ci-a");
            let version_ready = module_version_ready_label(NS, "kmm-ci-a");
            let versioned = |image: &str, version: &str| {
                let mut m = lab_module(&image.replace(K1, "${KERNEL_FULL_VERSION}"));
                m.spec.module_loader.as_mut().unwrap().container.version = Some(version.into());
                m
            };
            let loader_on = async |node_name: &str| -> anyhow::Result<Option<Pod>> {
                let pods = Api::<Pod>::namespaced(client.clone(), NS)
                    .list(&ListParams::default().labels(&format!("{ROLE_LABEL}={ROLE_LOADER}")))
                    .await?
                    .items;
                Ok(pods.into_iter().find(|p| {
                    p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node_name)
                        && p.metadata.deletion_timestamp.is_none()
                }))
            };

            // 1. The user labels worker-0 with 0.9 and applies the 0.9 Module.
            label_node(&client, "worker-0", &version_label, Some("0.9")).await?;
            apply_module(&client, &versioned(&v09, "0.9")).await?;
            wait_loaded(fleet, "worker-0", &["kmm_ci_a"]).await?;
            assert!(
                loaded(fleet, "worker-1").is_empty(),
                "worker-1 is not labelled for any version"
            );
            eventually("version.ready=0.9", async || {
                let l = node(&client, "worker-0").await?.labels().clone();
                Ok(
                    if l.get(&version_ready).map(String::as_str) == Some("0.9") {
                        Ok(())
                    } else {
                        Err(format!("{l:?}"))
                    },
                )
            })
            .await?;
            let pod = loader_on("worker-0")
                .await?
                .context("a loader pod on worker-0")?;
            assert_eq!(
                pod.labels().get(MODULE_VERSION_LABEL).map(String::as_str),
                Some("0.9")
            );

            // 2. Unlabelling stops the 0.9 loader there: the module is unloaded.
            label_node(&client, "worker-0", &version_label, None).await?;
            wait_loaded(fleet, "worker-0", &[]).await?;
            eventually("ready labels gone", async || {
                let l = node(&client, "worker-0").await?.labels().clone();
                let left: Vec<&String> = l
                    .keys()
                    .filter(|k| is_module_node_label(k, NS, "kmm-ci-a"))
                    .collect();
                Ok(if left.is_empty() {
                    Ok(())
                } else {
                    Err(format!("{left:?}"))
                })
            })
            .await?;

            // 3. Relabel with 1.0 and move the Module to 1.0 with the new image.
            label_node(&client, "worker-0", &version_label, Some("1.0")).await?;
            apply_module(&client, &versioned(&v10, "1.0")).await?;
            wait_loaded(fleet, "worker-0", &["kmm_ci_a"]).await?;
            let pod = eventually("the 1.0 loader on worker-0", async || {
                Ok(match loader_on("worker-0").await? {
                    Some(p)
                        if p.labels().get(MODULE_VERSION_LABEL).map(String::as_str)
                            == Some("1.0") =>
                    {
                        Ok(p)
                    }
                    other => Err(format!("{:?}", other.map(|p| p.labels().clone()))),
                })
            })
            .await?;
            assert_eq!(
                pod.spec.as_ref().unwrap().containers[0].image.as_deref(),
                Some(v10.as_str())
            );
            eventually("version.ready=1.0", async || {
                let l = node(&client, "worker-0").await?.labels().clone();
                Ok(
                    if l.get(&version_ready).map(String::as_str) == Some("1.0") {
                        Ok(())
                    } else {
                        Err(format!("{l:?}"))
                    },
                )
            })
            .await?;
            // 4. The 0.9 DaemonSet targets no node any more and is deleted.
            eventually("only the 1.0 loader DaemonSet left", async || {
                let ds = loader_daemonsets(&client).await?;
                let versions: Vec<String> = ds
                    .iter()
                    .filter_map(|d| d.labels().get(MODULE_VERSION_LABEL).cloned())
                    .collect();
                Ok(if versions == ["1.0"] {
                    Ok(())
                } else {
                    Err(format!("{versions:?}"))
                })
            })
            .await?;
            assert!(loaded(fleet, "worker-1").is_empty());
            delete_and_wait_clean(fleet, &client, &["worker-0", "worker-1"]).await?;
            agent.stop().await;
            Ok(())
        })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_kernels_two_loaders_and_an_unmapped_upgrade_unloads() -> anyhow::Result<()> {
    let _one = ONE_FLEET_AT_A_TIME.lock().await;
    let nodes = vec![worker_node("worker-0", K1), worker_node("worker-1", K2)];
    Fleet::builder()
        .spoke_nodes(1, nodes)
        .run(async |fleet: &mut Fleet| {
            let client = fleet.spoke(1).client().await;
            prepare_namespace(fleet, &client).await?;
            let image =
                push_kmod(fleet, &format!("labs/kmm-kmod:{K1}"), &[K1], &["kmm-ci-a"]).await?;
            push_kmod(fleet, &format!("labs/kmm-kmod:{K2}"), &[K2], &["kmm-ci-a"]).await?;
            let agent = RunningAgent::start(client.clone());
            let mut m = lab_module(&image.replace(K1, "${KERNEL_FULL_VERSION}"));
            m.spec
                .module_loader
                .as_mut()
                .unwrap()
                .container
                .kernel_mappings[0]
                .regexp = Some(r"^5\.14\.0-.*\.x86_64$".into());
            apply_module(&client, &m).await?;
            wait_loaded(fleet, "worker-0", &["kmm_ci_a"]).await?;
            wait_loaded(fleet, "worker-1", &["kmm_ci_a"]).await?;
            let kernels = |ds: &[DaemonSet]| -> Vec<String> {
                ds.iter()
                    .filter_map(|d| d.labels().get(TARGET_KERNEL_LABEL).cloned())
                    .collect()
            };
            let ds = loader_daemonsets(&client).await?;
            let mut got = kernels(&ds);
            got.sort();
            assert_eq!(
                got,
                vec![K1.to_string(), K2.to_string()],
                "one loader DaemonSet per kernel"
            );

            // worker-1 reboots into a kernel no mapping matches.
            fleet.node_sim(SPOKE).set_kernel("worker-1", K3).await?;
            let ready = module_ready_label(NS, "kmm-ci-a");
            eventually(
                "worker-1 without the module and its ready label",
                async || {
                    let n = node(&client, "worker-1").await?;
                    let ok = !n.labels().contains_key(&ready)
                        && n.labels().get(KERNEL_LABEL).map(String::as_str) == Some(K3)
                        && loaded(fleet, "worker-1").is_empty();
                    Ok(if ok {
                        Ok(())
                    } else {
                        Err(format!(
                            "{:?} loaded {:?}",
                            n.labels(),
                            loaded(fleet, "worker-1")
                        ))
                    })
                },
            )
            .await?;
            eventually("the K2 loader deleted", async || {
                let got = kernels(&loader_daemonsets(&client).await?);
                Ok(if got == [K1] {
                    Ok(())
                } else {
                    Err(format!("{got:?}"))
                })
            })
            .await?;
            assert_eq!(
                loaded(fleet, "worker-0"),
                vec!["kmm_ci_a"],
                "the other node keeps it"
            );
            let st = Api::<Module>::namespaced(client.clone(), NS)
                .get("kmm-ci-a")
                .await?
                .status
                .unwrap_or_default();
            let msg = st
                .conditions
                .iter()
                .find(|c| c.type_ == READY)
                .map(|c| c.message.clone())
                .unwrap_or_default();
            assert!(msg.contains(K3), "the unmapped kernel is reported: {msg}");
            delete_and_wait_clean(fleet, &client, &["worker-0", "worker-1"]).await?;
            agent.stop().await;
            Ok(())
        })
        .await
}
