//! The spoke agent against a real control plane with simulated nodes: each seed lab as a
//! Module, ordered upgrade, kernel changes, deletion, and the kernel ClusterClaim.
//!
//! The agent runs in-process with the spoke's admin client. One fleet per test, one test at
//! a time (a fleet is two control planes). Every wait polls with a generous deadline.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context as _, bail};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Secret, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use kmm_e2e::fleet::{Fleet, worker_node};
use kmm_e2e::oci::{KmodImage, push_files, push_kmod_image};
use kmm_e2e::sim::SimNode;
use kmm_runtime::admin::Health;
use kmm_runtime::shutdown::CancellationToken;
use kmm_spoke::{Agent, AgentConfig};
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use shared_api::conditions::{READY, VALID, condition_status};
use shared_api::labels::*;
use shared_api::ocm::KERNEL_VERSIONS_CLAIM;
use shared_api::{ClusterClaim, ManagedCluster, Module};

const K1: &str = "5.14.0-284.36.1.el9_2.x86_64";
const K2: &str = "5.14.0-362.8.1.el9_3.x86_64";
const K3: &str = "6.1.0-18-amd64";
const NS: &str = "labsv2";
const SPOKE: &str = "spoke-1";
const TEST_MANAGER: &str = "e2e-test";
const DEADLINE: Duration = Duration::from_secs(180);
fn deadline() -> Duration {
    std::env::var("KMM_E2E_DEADLINE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(DEADLINE)
}

static ONE_FLEET_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The agent running in this process against the spoke.
struct RunningAgent {
    token: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    health: Health,
}

impl RunningAgent {
    fn start(client: Client) -> Self {
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter(
                std::env::var("RUST_LOG")
                    .unwrap_or_else(|_| "kmm_spoke=info,shared_api=info".into()),
            )
            .try_init();
        let cfg = AgentConfig {
            resync: Duration::from_secs(60),
            identity: "kmm-spoke-e2e".into(),
            ..Default::default()
        };
        let mut registry = prometheus_client::registry::Registry::default();
        let health = Health::new();
        let agent = Agent::new(client, cfg, &mut registry, &health);
        let token = CancellationToken::new();
        let t = token.clone();
        let task = tokio::spawn(async move {
            if let Err(e) = agent.run(t).await {
                eprintln!("kmm-spoke agent failed: {e}");
            }
        });
        Self {
            token,
            task,
            health,
        }
    }

    async fn stop(self) {
        self.token.cancel();
        let _ = self.task.await;
    }
}

/// Poll `f` until it returns `Some`, or fail after [`DEADLINE`] with the last observation.
async fn eventually<T>(
    what: &str,
    mut f: impl AsyncFnMut() -> anyhow::Result<Result<T, String>>,
) -> anyhow::Result<T> {
    let start = std::time::Instant::now();
    let mut last = String::from("never checked");
    while start.elapsed() < deadline() {
        match f().await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(seen)) => last = seen,
            Err(e) => last = format!("error: {e:#}"),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    bail!(
        "{what}: not reached within {:?}; last seen: {last}",
        deadline()
    )
}

fn sim_node(name: &str, kernel: &str, labels: &[(&str, &str)], in_tree: &[&str]) -> SimNode {
    SimNode {
        name: name.into(),
        kernel: kernel.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        in_tree_modules: in_tree.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// Namespace, the labs' service account and the pull secret.
async fn prepare_namespace(fleet: &Fleet, client: &Client) -> anyhow::Result<()> {
    let pp = PatchParams::apply(TEST_MANAGER).force();
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(NS.into()),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<Namespace>::all(client.clone())
        .patch(NS, &pp, &Patch::Apply(&ns))
        .await?;
    let sa = ServiceAccount {
        metadata: ObjectMeta {
            name: Some("labsv2sa".into()),
            namespace: Some(NS.into()),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<ServiceAccount>::namespaced(client.clone(), NS)
        .patch("labsv2sa", &pp, &Patch::Apply(&sa))
        .await?;
    let secret = fleet
        .registry()
        .dockerconfigjson_secret("myrepo-pull-secret", NS);
    Api::<Secret>::namespaced(client.clone(), NS)
        .patch("myrepo-pull-secret", &pp, &Patch::Apply(&secret))
        .await?;
    Ok(())
}

/// Push a kmod image with `modules` for `kernels`; returns its reference.
async fn push_kmod(
    fleet: &Fleet,
    repo_tag: &str,
    kernels: &[&str],
    modules: &[&str],
) -> anyhow::Result<String> {
    let reference = format!("{}/{repo_tag}", fleet.registry().host());
    push_kmod_image(
        &fleet.registry().access(),
        &reference,
        &KmodImage::new(kernels, modules),
    )
    .await?;
    Ok(reference)
}

fn module_from_yaml(yaml: &str) -> Module {
    serde_yaml::from_str(yaml).unwrap()
}

async fn apply_module(client: &Client, module: &Module) -> anyhow::Result<()> {
    let mut body = serde_json::to_value(module)?;
    body["apiVersion"] = json!("kmm.sigs.x-k8s.io/v1beta1");
    body["kind"] = json!("Module");
    if let Some(m) = body["metadata"].as_object_mut() {
        m.remove("uid");
        m.remove("resourceVersion");
    }
    Api::<Module>::namespaced(client.clone(), NS)
        .patch(
            &module.name_any(),
            &PatchParams::apply(TEST_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await
        .context("applying the Module")?;
    Ok(())
}

fn lab_module(image: &str) -> Module {
    module_from_yaml(&format!(
        r#"
apiVersion: kmm.sigs.x-k8s.io/v1beta1
kind: Module
metadata: {{ name: kmm-ci-a, namespace: {NS} }}
spec:
  moduleLoader:
    serviceAccountName: labsv2sa
    container:
      modprobe: {{ moduleName: kmm-ci-a }}
      kernelMappings:
        - regexp: '^.*'
          containerImage: {image}
  imageRepoSecret: {{ name: myrepo-pull-secret }}
  selector: {{ node-role.kubernetes.io/worker: "" }}
"#
    ))
}

async fn node(client: &Client, name: &str) -> anyhow::Result<Node> {
    Ok(Api::<Node>::all(client.clone()).get(name).await?)
}

async fn label_node(
    client: &Client,
    name: &str,
    key: &str,
    value: Option<&str>,
) -> anyhow::Result<()> {
    Api::<Node>::all(client.clone())
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "metadata": { "labels": { key: value } } })),
        )
        .await?;
    Ok(())
}

fn loaded(fleet: &Fleet, node: &str) -> Vec<String> {
    fleet.node_sim(SPOKE).loaded_modules(node)
}

/// Wait until the node's loaded modules are exactly `want`.
async fn wait_loaded(fleet: &Fleet, node: &str, want: &[&str]) -> anyhow::Result<()> {
    eventually(&format!("modules {want:?} on {node}"), async || {
        let got = loaded(fleet, node);
        Ok(if got == want {
            Ok(())
        } else {
            Err(format!("{got:?}"))
        })
    })
    .await
}

async fn loader_daemonsets(client: &Client) -> anyhow::Result<Vec<DaemonSet>> {
    let lp = ListParams::default().labels(&format!(
        "{MODULE_NAME_LABEL}=kmm-ci-a,{ROLE_LABEL}={ROLE_LOADER}"
    ));
    Ok(Api::<DaemonSet>::namespaced(client.clone(), NS)
        .list(&lp)
        .await?
        .items)
}

async fn node_events(client: &Client, reason: &str) -> anyhow::Result<Vec<Event>> {
    let all = Api::<Event>::namespaced(
        client.clone(),
        kmm_spoke::controller::events::EVENT_NAMESPACE,
    )
    .list(&ListParams::default())
    .await?
    .items;
    Ok(all
        .into_iter()
        .filter(|e| {
            e.reason.as_deref() == Some(reason)
                && e.reporting_controller.as_deref() == Some("kmm-spoke")
        })
        .collect())
}

/// Delete the Module and wait until it is gone with nothing of it left on the nodes.
async fn delete_and_wait_clean(
    fleet: &Fleet,
    client: &Client,
    nodes: &[&str],
) -> anyhow::Result<()> {
    Api::<Module>::namespaced(client.clone(), NS)
        .delete("kmm-ci-a", &DeleteParams::default())
        .await?;
    eventually("the Module deleted (finalizer released)", async || {
        let m = Api::<Module>::namespaced(client.clone(), NS)
            .get_opt("kmm-ci-a")
            .await?;
        Ok(match m {
            None => Ok(()),
            Some(m) => Err(format!(
                "finalizers {:?}, status {:?}",
                m.finalizers(),
                m.status
            )),
        })
    })
    .await?;
    for n in nodes {
        wait_loaded(fleet, n, &[]).await?;
        let labels = node(client, n).await?.labels().clone();
        let ours: Vec<&String> = labels
            .keys()
            .filter(|k| is_module_node_label(k, NS, "kmm-ci-a"))
            .collect();
        if !ours.is_empty() {
            bail!("node {n} still has {ours:?}");
        }
    }
    let left = Api::<DaemonSet>::namespaced(client.clone(), NS)
        .list(&ListParams::default().labels(&format!("{MODULE_NAME_LABEL}=kmm-ci-a")))
        .await?
        .items;
    if !left.is_empty() {
        bail!(
            "DaemonSets left: {:?}",
            left.iter().map(|d| d.name_any()).collect::<Vec<_>>()
        );
    }
    Ok(())
}

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
            let image = push_kmod(
                fleet,
                &format!("labs/kmm-kmod:{K1}-v1.0"),
                &[K1],
                &["kmm-ci-a"],
            )
            .await?;
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
            let image = push_kmod(
                fleet,
                &format!("labs/kmm-kmod:{K1}-v1.0"),
                &[K1],
                &["kmm-ci-a"],
            )
            .await?;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordered_upgrade_from_0_9_to_1_0() -> anyhow::Result<()> {
    let _one = ONE_FLEET_AT_A_TIME.lock().await;
    let nodes = vec![worker_node("worker-0", K1), worker_node("worker-1", K1)];
    Fleet::builder()
        .spoke_nodes(1, nodes)
        .run(async |fleet: &mut Fleet| {
            let client = fleet.spoke(1).client().await;
            prepare_namespace(fleet, &client).await?;
            let v09 = push_kmod(
                fleet,
                &format!("labs/kmm-kmod:{K1}-v0.9"),
                &[K1],
                &["kmm-ci-a"],
            )
            .await?;
            let v10 = push_kmod(
                fleet,
                &format!("labs/kmm-kmod:{K1}-v1.0"),
                &[K1],
                &["kmm-ci-a"],
            )
            .await?;
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
            let v1 = push_kmod(
                fleet,
                &format!("labs/kmm-kmod:{K1}-v1.0"),
                &[K1],
                &["kmm-ci-a"],
            )
            .await?;
            let v2 = push_kmod(
                fleet,
                &format!("labs/kmm-kmod:{K1}-v2.0"),
                &[K1],
                &["kmm-ci-a"],
            )
            .await?;
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
            let l = labels().await?;
            assert!(
                l.contains_key(&ready),
                "the kernel still has the module: {l:?}"
            );
            assert!(!l.contains_key(&dp_ready), "the plugin went first: {l:?}");
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
