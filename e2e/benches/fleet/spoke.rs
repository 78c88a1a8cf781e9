//! The spoke agent at a size (`--spoke-runs NODESxMODULES`): the `kmm-spoke` binary against a
//! spoke with that many simulated nodes and Modules (the spoke's own kube-controller-manager
//! makes the loader pods, the node simulator runs them), once every module is loaded
//! everywhere: idle memory, CPU and writes; then, on the last run, one node's kernel change
//! (a reboot into the other kernel of the spoke): until its loader pods are replaced, and
//! the API writes the agent makes for it.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Secret};
use kmm_e2e::fleet::{Fleet, worker_node};
use kmm_e2e::oci::{KmodImage, push_kmod_image};
use kmm_e2e::process::{ManagedProcess, free_port, http_get};
use kmm_spoke::render::nodes::node_boot_id;
use kube::api::{Api, ListParams, ObjectMeta, Patch, PatchParams};
use kube::{Client, ResourceExt as _};
use serde_json::json;
use shared_api::Module;
use shared_api::labels::{
    ROLE_LABEL, ROLE_LOADER, TARGET_KERNEL_LABEL, kernel_label_value, module_ready_label,
    ready_boot_annotation, recorded_boot_id,
};

use crate::results::{KernelChange, SpokeIdle};
use crate::world::{
    Samples, apiserver_writes, cpu_seconds, delta, label, memory_mib, rss_parts_mib,
};

const NS: &str = "kmm-bench";
const KERNELS: [&str; 2] = ["5.14.0-284.36.1.el9_2.x86_64", "6.1.0-18-amd64"];
const IDLE: Duration = Duration::from_secs(30);
/// The agent has written nothing for this long: it is done with a change.
const QUIET: Duration = Duration::from_secs(5);

/// One spoke run: simulated nodes, and Modules loaded on every node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size {
    pub nodes: usize,
    pub modules: usize,
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}", self.nodes, self.modules)
    }
}

impl FromStr for Size {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("{s:?}: want NODESxMODULES, e.g. 1000x10");
        let (n, m) = s.trim().split_once('x').ok_or_else(bad)?;
        let size = Self {
            nodes: n.parse().map_err(|_| bad())?,
            modules: m.parse().map_err(|_| bad())?,
        };
        if size.nodes == 0 || size.modules == 0 {
            return Err(bad());
        }
        Ok(size)
    }
}

fn node_name(i: usize) -> String {
    format!("worker-{i:04}")
}

fn module_name(i: usize) -> String {
    format!("kmm_bench_{i:02}")
}

/// The Module object of a module (`kmm_bench_00` → `kmm-bench-00`).
fn object_name(module: &str) -> String {
    module.replace('_', "-")
}

pub async fn run(bin: &Path, logs: &Path, size: Size, change: bool) -> anyhow::Result<SpokeIdle> {
    let nodes = (0..size.nodes)
        .map(|i| worker_node(&node_name(i), KERNELS[i % KERNELS.len()]))
        .collect();
    eprintln!(
        "kmm-bench: spoke agent: starting a spoke with {} simulated nodes",
        size.nodes
    );
    let started = Instant::now();
    let fleet = Fleet::builder()
        .spokes(1)
        .spoke_nodes(1, nodes)
        .hub_build_node(false)
        .start()
        .await?;
    let fleet_start = started.elapsed();
    eprintln!(
        "kmm-bench: spoke with {} nodes up in {:.1} s",
        size.nodes,
        fleet_start.as_secs_f64()
    );
    let result = measure(&fleet, bin, logs, size, change).await;
    fleet.stop().await;
    result.map(|mut r| {
        r.fleet_start_s = fleet_start.as_secs_f64();
        r
    })
}

/// The agent's writes so far, by kind.
async fn agent_writes(admin: &str) -> anyhow::Result<BTreeMap<String, f64>> {
    let (status, text) = http_get(admin, "/metrics").await?;
    if status != 200 {
        bail!("kmm-spoke /metrics answered {status}");
    }
    Ok(Samples::parse(&text)
        .family("kmm_spoke_api_writes_total")
        .into_iter()
        .map(|(labels, v)| (label(&labels, "kind").unwrap_or(labels), v))
        .collect())
}

fn total(m: &BTreeMap<String, f64>) -> f64 {
    m.values().sum()
}

/// Wait until the agent has written nothing for [`QUIET`] (at most `limit`).
async fn quiet(admin: &str, limit: Duration) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut last = total(&agent_writes(admin).await?);
    let mut since = Instant::now();
    while since.elapsed() < QUIET && started.elapsed() < limit {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = total(&agent_writes(admin).await?);
        if now != last {
            last = now;
            since = Instant::now();
        }
    }
    Ok(())
}

async fn measure(
    fleet: &Fleet,
    bin: &Path,
    logs: &Path,
    size: Size,
    change: bool,
) -> anyhow::Result<SpokeIdle> {
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
    let log = logs.join(format!("spoke-{size}.log"));
    let mut agent = ManagedProcess::spawn("kmm-spoke", bin, &args, &log)?;

    let modules: Vec<String> = (0..size.modules).map(module_name).collect();
    for m in &modules {
        let image = format!("{}/bench/{m}:v1", fleet.registry().host());
        push_kmod_image(
            &fleet.registry().access(),
            &image,
            &KmodImage::new(&KERNELS, &[m.as_str()]),
        )
        .await?;
    }
    let converging = Instant::now();
    for m in &modules {
        let image = format!("{}/bench/{m}:v1", fleet.registry().host());
        let module = json!({
            "apiVersion": "kmm.sigs.x-k8s.io/v1beta1", "kind": "Module",
            "metadata": {"name": object_name(m), "namespace": NS},
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
            .patch(&object_name(m), &pp, &Patch::Apply(&module))
            .await
            .with_context(|| format!("applying Module {m}"))?;
    }

    // Every module loaded on every node.
    let sim = fleet.node_sim(spoke.name());
    let pods = size.nodes * size.modules;
    let deadline = Duration::from_secs(300) + Duration::from_millis(60 * pods as u64);
    let mut last_report = Instant::now();
    loop {
        let done = (0..size.nodes)
            .filter(|&i| {
                let loaded = sim.loaded_modules(&node_name(i));
                modules.iter().all(|m| loaded.contains(m))
            })
            .count();
        if done == size.nodes {
            break;
        }
        if let Some(status) = agent.exited() {
            bail!("kmm-spoke exited ({status}): {}", agent.log_tail(20));
        }
        if converging.elapsed() > deadline {
            bail!(
                "after {deadline:?} only {done} of {} nodes have the {} modules loaded; agent log:\n{}",
                size.nodes,
                size.modules,
                agent.log_tail(20)
            );
        }
        if last_report.elapsed() > Duration::from_secs(30) {
            eprintln!(
                "kmm-bench: {done} of {} nodes have every module after {:.0} s",
                size.nodes,
                converging.elapsed().as_secs_f64()
            );
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let converge = converging.elapsed();
    eprintln!(
        "kmm-bench: {} modules loaded on {} nodes after {:.1} s; waiting for the agent to go quiet, then idling {} s",
        size.modules,
        size.nodes,
        converge.as_secs_f64(),
        IDLE.as_secs()
    );
    // The ready labels and events of the last nodes follow the loads.
    quiet(&admin, Duration::from_secs(120)).await?;
    let writes0 = agent_writes(&admin).await?;
    let cpu0 = cpu_seconds(agent.pid());
    tokio::time::sleep(IDLE).await;
    let cpu1 = cpu_seconds(agent.pid());
    let writes1 = agent_writes(&admin).await?;
    let (rss, hwm) = memory_mib(agent.pid());
    let (anon, file) = rss_parts_mib(agent.pid());
    let binary_mib = std::fs::metadata(bin).map_or(0.0, |m| m.len() as f64 / 1024.0 / 1024.0);
    eprintln!(
        "kmm-bench: spoke agent idle: {rss:.1} MiB (peak {hwm:.1} MiB), {:.2} s CPU in {} s",
        cpu1 - cpu0,
        IDLE.as_secs()
    );

    let change = if change {
        let c = kernel_change(&client, sim, &admin, &modules).await;
        if c.is_err() {
            eprintln!("kmm-bench: agent log:\n{}", agent.log_tail(30));
        }
        Some(c?)
    } else {
        None
    };
    let (_, peak) = memory_mib(agent.pid());
    agent.stop(Duration::from_secs(5)).await;
    Ok(SpokeIdle {
        nodes: size.nodes,
        modules: size.modules,
        loader_pods_running: pods,
        rss_mib: rss,
        peak_mib: peak.max(hwm),
        rss_anon_mib: anon,
        rss_file_mib: file,
        binary_mib,
        idle_s: IDLE.as_secs_f64(),
        idle_cpu_s: cpu1 - cpu0,
        idle_writes: (total(&writes1) - total(&writes0)).round() as u64,
        fleet_start_s: 0.0,
        converge_s: converge.as_secs_f64(),
        change,
    })
}

fn ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Node 0 reboots from its kernel into the other one.
async fn kernel_change(
    client: &Client,
    sim: &kmm_e2e::sim::NodeSim,
    admin: &str,
    modules: &[String],
) -> anyhow::Result<KernelChange> {
    let node = node_name(0);
    let (from, to) = (KERNELS[0], KERNELS[1]);
    let (old_label, new_label) = (kernel_label_value(from), kernel_label_value(to));
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let nodes: Api<Node> = Api::all(client.clone());
    let lp = ListParams::default()
        .fields(&format!("spec.nodeName={node}"))
        .labels(&format!("{ROLE_LABEL}={ROLE_LOADER}"));
    let ready_labels: Vec<(String, String)> = modules
        .iter()
        .map(|m| {
            (
                module_ready_label(NS, &object_name(m)),
                ready_boot_annotation(NS, &object_name(m)),
            )
        })
        .collect();
    let boot_before = node_boot_id(&nodes.get(&node).await?)
        .unwrap_or_default()
        .to_string();

    let writes0 = agent_writes(admin).await?;
    let api0 = apiserver_writes(client).await?;
    let started = Instant::now();
    sim.set_kernel(&node, to).await?;
    let (mut replaced, mut loaded, mut labelled) = (None, None, None);
    while labelled.is_none() || replaced.is_none() {
        if started.elapsed() > Duration::from_secs(300) {
            bail!(
                "{node}'s kernel change not done after 300 s (replaced {replaced:?}, loaded {loaded:?}, labelled {labelled:?})"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let at = started.elapsed();
        if replaced.is_none() {
            let list = pods.list(&lp).await?;
            let kernel = |p: &Pod| p.labels().get(TARGET_KERNEL_LABEL).cloned();
            let old = list
                .items
                .iter()
                .filter(|p| kernel(p).as_deref() == Some(old_label.as_str()))
                .count();
            let new = list
                .items
                .iter()
                .filter(|p| kernel(p).as_deref() == Some(new_label.as_str()))
                .filter(|p| p.metadata.deletion_timestamp.is_none() && ready(p))
                .count();
            if old == 0 && new == modules.len() {
                replaced = Some(at);
            }
        }
        if loaded.is_none() {
            let now = sim.loaded_modules(&node);
            if modules.iter().all(|m| now.contains(m)) {
                loaded = Some(at);
            }
        }
        // The ready labels stay until the agent sees the reboot: they count as back once each
        // is confirmed in the node's new boot (its ready-boot annotation names that boot).
        if loaded.is_some() && labelled.is_none() {
            let n = nodes.get(&node).await?;
            let boot = node_boot_id(&n).unwrap_or_default();
            let confirmed = |(label, fence): &(String, String)| {
                n.labels().contains_key(label)
                    && n.annotations()
                        .get(fence)
                        .is_some_and(|v| recorded_boot_id(v) == Some(boot))
            };
            if boot != boot_before.as_str() && ready_labels.iter().all(confirmed) {
                labelled = Some(at);
            }
        }
    }
    quiet(admin, Duration::from_secs(120)).await?;
    // What the agent's events said about the node (their count is among the writes).
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(
        client.clone(),
        kmm_spoke::controller::events::EVENT_NAMESPACE,
    );
    for e in events
        .list(&ListParams::default().fields(&format!("involvedObject.name={node}")))
        .await?
        .items
    {
        eprintln!(
            "kmm-bench: event on {node}: {} {}",
            e.reason.unwrap_or_default(),
            e.message.unwrap_or_default()
        );
    }
    let writes1 = agent_writes(admin).await?;
    let api1 = apiserver_writes(client).await?;
    let writes = delta(&writes0, &writes1);
    let ms = |d: Option<Duration>| d.map_or(0.0, |d| d.as_secs_f64() * 1e3);
    let c = KernelChange {
        node,
        from: from.into(),
        to: to.into(),
        replaced_ms: ms(replaced),
        loaded_ms: ms(loaded),
        labelled_ms: ms(labelled),
        total_writes: writes.values().sum(),
        writes,
        apiserver_writes: delta(&api0, &api1),
    };
    eprintln!(
        "kmm-bench: kernel change on {}: loader pods replaced after {:.0} ms, agent writes {:?}",
        c.node, c.replaced_ms, c.writes
    );
    Ok(c)
}
