//! The agent itself: the kernel claim, idle memory, leadership, and the unload order.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::api::core::v1::Pod;
use kmm_e2e::fleet::{Fleet, worker_node};
use kmm_e2e::oci::push_files;
use kmm_runtime::shutdown::CancellationToken;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use shared_api::conditions::{READY, condition_status};
use shared_api::labels::*;
use shared_api::ocm::KERNEL_VERSIONS_CLAIM;
use shared_api::{ClusterClaim, ManagedCluster, Module};

use crate::setup::{
    RunningAgent, apply_module, eventually, lab_module, label_node, loaded, node, node_events,
    prepare_namespace, push_kmod, push_lab_kmod,
};
use crate::{K1, K2, NS, ONE_FLEET_AT_A_TIME, SPOKE, deadline};

async fn claims(client: &Client) -> anyhow::Result<BTreeMap<String, String>> {
    Ok(Api::<ClusterClaim>::all(client.clone())
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|c| c.name_any().starts_with(KERNEL_VERSIONS_CLAIM))
        .map(|c| (c.name_any(), c.spec.value))
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_claim_is_sorted_distinct_and_split_when_long() -> anyhow::Result<()> {
    let _one = ONE_FLEET_AT_A_TIME.lock().await;
    let nodes = ["b", "a1", "a2", "b", "a1"]
        .iter()
        .enumerate()
        .map(|(i, k)| worker_node(&format!("n{i}"), k))
        .collect();
    Fleet::builder()
        .spoke_nodes(1, nodes)
        .run(async |fleet: &mut Fleet| {
            let client = fleet.spoke(1).client().await;
            let agent = RunningAgent::start(client.clone());
            let want =
                BTreeMap::from([(KERNEL_VERSIONS_CLAIM.to_string(), "a1\na2\nb".to_string())]);
            eventually("claim a1\\na2\\nb", async || {
                let got = claims(&client).await?;
                Ok(if got == want {
                    Ok(())
                } else {
                    Err(format!("{got:?}"))
                })
            })
            .await?;
            // The hub sees it through the (simulated) registration agent.
            eventually("claim on the hub", async || {
                let mc = Api::<ManagedCluster>::all(fleet.hub().client().await)
                    .get(SPOKE)
                    .await?;
                let k = mc.status.and_then(|s| s.kernel_versions());
                Ok(
                    if k.as_deref() == Some(&["a1".to_string(), "a2".into(), "b".into()][..]) {
                        Ok(())
                    } else {
                        Err(format!("{k:?}"))
                    },
                )
            })
            .await?;

            // 20 long kernels overflow one claim (1024 characters).
            let long: Vec<String> = (0..20)
                .map(|i| format!("5.14.0-{i:03}.{}.el9_2.x86_64", "x".repeat(40)))
                .collect();
            for (i, k) in long.iter().enumerate() {
                fleet
                    .node_sim(SPOKE)
                    .add_node(worker_node(&format!("long-{i}"), k))
                    .await?;
            }
            let mut all: Vec<String> = long.clone();
            all.extend(["a1".into(), "a2".into(), "b".into()]);
            all.sort();
            eventually("split claims", async || {
                let got = claims(&client).await?;
                let mut joined: Vec<String> = got
                    .values()
                    .flat_map(|v| v.lines().map(str::to_string))
                    .collect();
                joined.sort();
                let ok = got.len() >= 2
                    && got.contains_key(&format!("{KERNEL_VERSIONS_CLAIM}.1"))
                    && got.values().all(|v| v.len() <= 1024)
                    && joined == all;
                Ok(if ok {
                    Ok(())
                } else {
                    Err(format!(
                        "{} claims, sizes {:?}",
                        got.len(),
                        got.values().map(String::len).collect::<Vec<_>>()
                    ))
                })
            })
            .await?;
            // Back to short kernels: the numbered claims are deleted.
            for i in 0..20 {
                fleet
                    .node_sim(SPOKE)
                    .set_kernel(&format!("long-{i}"), "b")
                    .await?;
            }
            eventually("one claim again", async || {
                let got = claims(&client).await?;
                Ok(if got == want {
                    Ok(())
                } else {
                    Err(format!("{:?}", got.keys().collect::<Vec<_>>()))
                })
            })
            .await?;
            agent.stop().await;
            Ok(())
        })
        .await
}

/// Idle footprint of the real binary: 3 Modules on 50 nodes. Needs a built binary:
/// `cargo build --release -p kmm-spoke && KMM_SPOKE_BIN=target/release/kmm-spoke cargo test
/// -p kmm-e2e --test spoke idle_rss -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement: needs KMM_SPOKE_BIN (a release build) and several minutes"]
async fn idle_rss_with_3_modules_on_50_nodes() -> anyhow::Result<()> {
    let _one = ONE_FLEET_AT_A_TIME.lock().await;
    let bin =
        std::env::var("KMM_SPOKE_BIN").context("set KMM_SPOKE_BIN to the kmm-spoke binary")?;
    let nodes = (0..50)
        .map(|i| worker_node(&format!("worker-{i:02}"), if i % 2 == 0 { K1 } else { K2 }))
        .collect();
    Fleet::builder()
        .spoke_nodes(1, nodes)
        .run(async |fleet: &mut Fleet| {
            let client = fleet.spoke(1).client().await;
            prepare_namespace(fleet, &client).await?;
            let mut modules = Vec::new();
            for (i, name) in ["kmm-ci-a", "kmm-ci-b", "kmm-ci-c"].iter().enumerate() {
                let image =
                    push_kmod(fleet, &format!("labs/mod{i}:v1"), &[K1, K2], &[name]).await?;
                let mut m = lab_module(&image);
                m.metadata.name = Some(name.to_string());
                m.spec
                    .module_loader
                    .as_mut()
                    .unwrap()
                    .container
                    .modprobe
                    .module_name = Some(name.to_string());
                modules.push(m);
            }
            let mut child = tokio::process::Command::new(&bin)
                .args(["run", "--kubeconfig"])
                .arg(fleet.spoke(1).kubeconfig_path())
                .args(["--admin-address", "127.0.0.1:0"])
                .env("RUST_LOG", "warn")
                // Extra environment for the measurement, e.g. glibc malloc tunables:
                // KMM_SPOKE_ENV="MALLOC_ARENA_MAX=1,MALLOC_TRIM_THRESHOLD_=65536".
                .envs(
                    std::env::var("KMM_SPOKE_ENV")
                        .unwrap_or_default()
                        .split(',')
                        .filter_map(|kv| kv.split_once('='))
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect::<Vec<_>>(),
                )
                .kill_on_drop(true)
                .spawn()
                .context("starting kmm-spoke")?;
            let pid = child.id().context("pid")?;
            for m in &modules {
                apply_module(&client, m).await?;
            }
            for i in 0..50 {
                let n = format!("worker-{i:02}");
                eventually(&format!("3 modules on {n}"), async || {
                    let got = loaded(fleet, &n);
                    Ok(if got.len() == 3 {
                        Ok(())
                    } else {
                        Err(format!("{got:?}"))
                    })
                })
                .await?;
            }
            // Idle: every Module Ready; then let the agent settle before reading its footprint.
            for m in &modules {
                eventually("Module Ready", async || {
                    let st = Api::<Module>::namespaced(client.clone(), NS)
                        .get(&m.name_any())
                        .await?
                        .status
                        .unwrap_or_default();
                    Ok(if condition_status(&st.conditions, READY) == Some("True") {
                        Ok(())
                    } else {
                        Err(format!("{:?}", st.module_loader))
                    })
                })
                .await?;
            }
            tokio::time::sleep(Duration::from_secs(20)).await;
            let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
            for l in status
                .lines()
                .filter(|l| l.starts_with("Rss") || l.starts_with("Threads"))
            {
                eprintln!("kmm-spoke {l}");
            }
            let rss = status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))
                .unwrap_or("VmRSS: ?")
                .to_string();
            let hwm = status
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .unwrap_or("VmHWM: ?")
                .to_string();
            eprintln!("kmm-spoke idle with 3 Modules on 50 nodes: {rss}, peak {hwm}");
            let kib: u64 = rss
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse().ok())
                .unwrap_or(u64::MAX);
            let _ = child.kill().await;
            assert!(kib <= 20 * 1024, "idle RSS {kib} KiB is above 20 MiB");
            Ok(())
        })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_lease_is_exclusive_and_released_on_shutdown() -> anyhow::Result<()> {
    use kmm_runtime::lease::{self, LeaseConfig};
    let _one = ONE_FLEET_AT_A_TIME.lock().await;
    Fleet::builder()
        .simulators(false)
        .run(async |fleet: &mut Fleet| {
            let client = fleet.spoke(1).client().await;
            let cfg = |id: &str| {
                let mut c = LeaseConfig::new("kmm-spoke", "default", id);
                c.retry_period = Duration::from_millis(200);
                c
            };
            let (t1, t2) = (CancellationToken::new(), CancellationToken::new());
            let (mut a, task_a) = lease::spawn(client.clone(), cfg("a"), t1.clone());
            tokio::time::timeout(deadline(), a.wait_for(true))
                .await
                .context("a never led")?;
            let (b, task_b) = lease::spawn(client.clone(), cfg("b"), t2.clone());
            // b keeps trying while a renews; a lease lasts 15 s, so b must not lead within a few rounds.
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_millis(200)).await;
                assert!(a.is_leader() && !b.is_leader(), "only one leader at a time");
            }
            // a shuts down and releases: b takes over without waiting for expiry.
            t1.cancel();
            task_a.await?;
            assert!(!a.is_leader());
            let mut b2 = b.clone();
            tokio::time::timeout(deadline(), b2.wait_for(true))
                .await
                .context("b never took over")?;
            let lease = Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(
                client.clone(),
                "default",
            )
            .get("kmm-spoke")
            .await?;
            let spec = lease.spec.unwrap_or_default();
            assert_eq!(spec.holder_identity.as_deref(), Some("b"));
            assert_eq!(spec.lease_transitions, Some(1));
            t2.cancel();
            task_b.await?;
            Ok(())
        })
        .await
}

/// Issue 15, points 9 and 11. The device plugin holds its driver (the test keeps `kmm_ci_a`
/// "in use" on the node while a plugin pod of the Module is there, as a real plugin holding
/// the device would). Relabelling the node directly from 1.0 to 2.0 stops the plugin before
/// the 1.0 loader unloads — no "in use" failure — and ends with 2.0 loaded and its plugin
/// back. Then, with the driver held for good, deleting the Module stops the plugin first and
/// the loader's unload fails: the node keeps its ready label (the kernel still has the
/// module), the Module reports `UnloadFailed`, and a Warning `ModuleUnloadFailed` names the
/// node; deletion waits until someone releases the pod.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_stops_before_the_unload_and_a_failed_unload_keeps_the_node_labelled()
-> anyhow::Result<()> {
    let _one = ONE_FLEET_AT_A_TIME.lock().await;
    Fleet::builder()
        .spoke_nodes(1, vec![worker_node("worker-0", K1)])
        .run(async |fleet: &mut Fleet| {
            let client = fleet.spoke(1).client().await;
            prepare_namespace(fleet, &client).await?;
            let v1 = push_lab_kmod(fleet, "1.0").await?;
            let v2 = push_lab_kmod(fleet, "2.0").await?;
            let plugin = format!(
                "{}/labs/simple-device-plugin:latest",
                fleet.registry().host()
            );
            push_files(
                &fleet.registry().access(),
                &plugin,
                &BTreeMap::from([("/usr/bin/plugin".to_string(), b"#!/bin/sh\n".to_vec())]),
                &BTreeMap::new(),
            )
            .await?;
            let agent = RunningAgent::start(client.clone());
            let versioned = |image: &str, v: &str| -> anyhow::Result<Module> {
                let mut m = lab_module(image);
                m.spec.module_loader.as_mut().unwrap().container.version = Some(v.into());
                m.spec.device_plugin = Some(serde_json::from_value(json!({
                    "serviceAccountName": "labsv2sa",
                    "container": { "image": plugin }
                }))?);
                Ok(m)
            };
            let pods_api = Api::<Pod>::namespaced(client.clone(), NS);
            // The plugin holds the driver while its containers run on the node.
            let sim = fleet.node_sim(SPOKE).kernels();
            sim.hold_while_running(ROLE_LABEL, ROLE_DEVICE_PLUGIN, "kmm_ci_a");
            let version_label = version_module_label(NS, "kmm-ci-a");
            let labels = async || -> anyhow::Result<BTreeMap<String, String>> {
                Ok(node(&client, "worker-0").await?.labels().clone())
            };
            label_node(&client, "worker-0", &version_label, Some("1.0")).await?;
            apply_module(&client, &versioned(&v1, "1.0")?).await?;
            let dp_ready = device_plugin_ready_label(NS, "kmm-ci-a");
            let version_ready = module_version_ready_label(NS, "kmm-ci-a");
            eventually("1.0 loaded with its plugin", async || {
                let l = labels().await?;
                Ok(
                    if l.get(&version_ready).map(String::as_str) == Some("1.0")
                        && l.contains_key(&dp_ready)
                    {
                        Ok(())
                    } else {
                        Err(format!("{l:?}"))
                    },
                )
            })
            .await?;

            // Directly from 1.0 to 2.0.
            apply_module(&client, &versioned(&v2, "2.0")?).await?;
            label_node(&client, "worker-0", &version_label, Some("2.0")).await?;
            eventually("2.0 loaded with its plugin", async || {
                let l = labels().await?;
                let pods = pods_api
                    .list(&ListParams::default().labels(&format!("{ROLE_LABEL}={ROLE_LOADER}")))
                    .await?
                    .items;
                let images: Vec<String> = pods
                    .iter()
                    .filter_map(|p| p.spec.as_ref()?.containers[0].image.clone())
                    .collect();
                Ok(
                    if l.get(&version_ready).map(String::as_str) == Some("2.0")
                        && l.contains_key(&dp_ready)
                        && images == [v2.clone()]
                        && loaded(fleet, "worker-0") == ["kmm_ci_a"]
                    {
                        Ok(())
                    } else {
                        Err(format!("labels {l:?}, loader images {images:?}"))
                    },
                )
            })
            .await?;
            let in_use: Vec<String> = fleet
                .node_sim(SPOKE)
                .logs()
                .into_iter()
                .filter(|l| l.contains("is in use"))
                .collect();
            assert!(
                in_use.is_empty(),
                "the 1.0 loader unloaded while its plugin held the driver: {in_use:?}"
            );
            let unloaded = node_events(&client, "ModuleUnloaded").await?;
            assert!(
                !unloaded.is_empty(),
                "the upgrade unloaded 1.0 (ModuleUnloaded on the node)"
            );

            // The driver stays held: deleting the Module cannot unload it.
            sim.clear_hold_rules();
            sim.hold_module("worker-0", "kmm_ci_a", true);
            Api::<Module>::namespaced(client.clone(), NS)
                .delete("kmm-ci-a", &DeleteParams::default())
                .await?;
            let ready = module_ready_label(NS, "kmm-ci-a");
            let degraded = eventually("UnloadFailed on the Module", async || {
                let m = Api::<Module>::namespaced(client.clone(), NS)
                    .get("kmm-ci-a")
                    .await?;
                let c = m.status.unwrap_or_default().conditions;
                Ok(
                    match c
                        .iter()
                        .find(|c| c.type_ == "Degraded" && c.reason == "UnloadFailed")
                    {
                        Some(c) => Ok(c.message.clone()),
                        None => Err(format!("{c:?}")),
                    },
                )
            })
            .await?;
            assert!(
                degraded.contains("worker-0") && degraded.contains("is in use"),
                "{degraded}"
            );
            // Node labels follow within the node writer's window.
            let l = eventually("the plugin label gone", async || {
                let l = labels().await?;
                Ok(if l.contains_key(&dp_ready) {
                    Err(format!("{l:?}"))
                } else {
                    Ok(l)
                })
            })
            .await?;
            assert!(
                l.contains_key(&ready),
                "the kernel still has the module: {l:?}"
            );
            assert_eq!(loaded(fleet, "worker-0"), ["kmm_ci_a"]);
            let warn = eventually("ModuleUnloadFailed event", async || {
                let ev = node_events(&client, "ModuleUnloadFailed").await?;
                Ok(ev.into_iter().next().ok_or_else(|| "none yet".to_string()))
            })
            .await?;
            assert_eq!(warn.type_.as_deref(), Some("Warning"));
            assert_eq!(
                warn.regarding.as_ref().and_then(|r| r.name.as_deref()),
                Some("worker-0")
            );
            assert!(
                warn.note
                    .as_deref()
                    .unwrap_or_default()
                    .contains("is in use"),
                "{warn:?}"
            );

            // The way out (docs/spoke.md): unload by hand, then release the pod.
            sim.hold_module("worker-0", "kmm_ci_a", false);
            for p in pods_api
                .list(&ListParams::default().labels(&format!("{ROLE_LABEL}={ROLE_LOADER}")))
                .await?
                .items
            {
                pods_api
                    .patch(
                        &p.name_any(),
                        &PatchParams::default(),
                        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
                    )
                    .await?;
            }
            eventually("the Module gone and its labels with it", async || {
                let gone = Api::<Module>::namespaced(client.clone(), NS)
                    .get_opt("kmm-ci-a")
                    .await?
                    .is_none();
                let l = labels().await?;
                let left: Vec<&String> = l
                    .keys()
                    .filter(|k| is_module_node_label(k, NS, "kmm-ci-a"))
                    .collect();
                Ok(if gone && left.is_empty() {
                    Ok(())
                } else {
                    Err(format!("gone {gone}, labels {left:?}"))
                })
            })
            .await?;
            agent.stop().await;
            Ok(())
        })
        .await
}
