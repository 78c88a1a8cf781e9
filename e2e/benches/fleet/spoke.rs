//! The spoke agent's idle footprint: the `kmm-spoke` binary against a spoke with 50
//! simulated nodes and 3 Modules, once every module is loaded everywhere and it is idle.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kmm_e2e::fleet::{Fleet, worker_node};
use kmm_e2e::oci::{KmodImage, push_kmod_image};
use kmm_e2e::process::{ManagedProcess, free_port};
use kube::api::{Api, ObjectMeta, Patch, PatchParams};
use serde_json::json;
use shared_api::Module;

use crate::results::SpokeIdle;
use crate::world::{cpu_seconds, memory_mib, rss_parts_mib};

const NODES: usize = 50;
const NS: &str = "kmm-bench";
const MODULES: [&str; 3] = ["kmm_bench_a", "kmm_bench_b", "kmm_bench_c"];
const KERNELS: [&str; 2] = ["5.14.0-284.36.1.el9_2.x86_64", "6.1.0-18-amd64"];
const IDLE: Duration = Duration::from_secs(30);
const DEADLINE: Duration = Duration::from_secs(300);

pub async fn run(bin: &Path, logs: &Path) -> anyhow::Result<SpokeIdle> {
    let nodes = (0..NODES)
        .map(|i| worker_node(&format!("worker-{i:02}"), KERNELS[i % KERNELS.len()]))
        .collect();
    eprintln!("kmm-bench: spoke agent: starting a spoke with {NODES} simulated nodes");
    let fleet = Fleet::builder()
        .spokes(1)
        .spoke_nodes(1, nodes)
        .hub_build_node(false)
        .start()
        .await?;
    let result = measure(&fleet, bin, logs).await;
    fleet.stop().await;
    result
}

async fn measure(fleet: &Fleet, bin: &Path, logs: &Path) -> anyhow::Result<SpokeIdle> {
    let spoke = fleet.spoke(1);
    let client = spoke.client().await;
    let pp = PatchParams::apply("kmm-bench").force();
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
    let secret = fleet
        .registry()
        .dockerconfigjson_secret("registry-pull", NS);
    Api::<Secret>::namespaced(client.clone(), NS)
        .patch("registry-pull", &pp, &Patch::Apply(&secret))
        .await?;

    let admin = format!("127.0.0.1:{}", free_port()?);
    let args: Vec<String> = vec![
        "run".into(),
        format!("--kubeconfig={}", spoke.kubeconfig_path().display()),
        format!("--admin-address={admin}"),
    ];
    let mut agent = ManagedProcess::spawn("kmm-spoke", bin, &args, &logs.join("spoke.log"))?;

    for m in MODULES {
        let image = format!("{}/bench/{m}:v1", fleet.registry().host());
        push_kmod_image(
            &fleet.registry().access(),
            &image,
            &KmodImage::new(&KERNELS, &[m]),
        )
        .await?;
        let module = json!({
            "apiVersion": "kmm.sigs.x-k8s.io/v1beta1", "kind": "Module",
            "metadata": {"name": m.replace('_', "-"), "namespace": NS},
            "spec": {
                "selector": {"node-role.kubernetes.io/worker": ""},
                "imageRepoSecret": {"name": "registry-pull"},
                "moduleLoader": {"container": {
                    "modprobe": {"moduleName": m},
                    "kernelMappings": [{"regexp": "^.*$", "containerImage": image}]
                }}
            }
        });
        Api::<Module>::namespaced(client.clone(), NS)
            .patch(&m.replace('_', "-"), &pp, &Patch::Apply(&module))
            .await
            .with_context(|| format!("applying Module {m}"))?;
    }

    // Every module loaded on every node.
    let sim = fleet.node_sim(spoke.name());
    let started = Instant::now();
    loop {
        let loaded: BTreeMap<String, usize> = (0..NODES)
            .map(|i| {
                let n = format!("worker-{i:02}");
                let count = sim
                    .loaded_modules(&n)
                    .iter()
                    .filter(|m| MODULES.contains(&m.as_str()))
                    .count();
                (n, count)
            })
            .collect();
        let done = loaded.values().filter(|c| **c == MODULES.len()).count();
        if done == NODES {
            break;
        }
        if let Some(status) = agent.exited() {
            bail!("kmm-spoke exited ({status}): {}", agent.log_tail(20));
        }
        if started.elapsed() > DEADLINE {
            bail!(
                "after {DEADLINE:?} only {done} of {NODES} nodes have the 3 modules loaded; agent log:\n{}",
                agent.log_tail(20)
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!(
        "kmm-bench: 3 modules loaded on {NODES} nodes after {:.1} s; idling {} s",
        started.elapsed().as_secs_f64(),
        IDLE.as_secs()
    );
    let cpu0 = cpu_seconds(agent.pid());
    tokio::time::sleep(IDLE).await;
    let cpu1 = cpu_seconds(agent.pid());
    let (rss, hwm) = memory_mib(agent.pid());
    let (anon, file) = rss_parts_mib(agent.pid());
    let binary_mib = std::fs::metadata(bin).map_or(0.0, |m| m.len() as f64 / 1024.0 / 1024.0);
    agent.stop(Duration::from_secs(5)).await;
    Ok(SpokeIdle {
        nodes: NODES,
        modules: MODULES.len(),
        loader_pods_running: NODES * MODULES.len(),
        rss_mib: rss,
        peak_mib: hwm,
        rss_anon_mib: anon,
        rss_file_mib: file,
        binary_mib,
        idle_s: IDLE.as_secs_f64(),
        idle_cpu_s: cpu1 - cpu0,
    })
}
