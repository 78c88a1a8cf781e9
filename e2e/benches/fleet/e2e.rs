//! End to end on the sandbox (`--skip-e2e` to leave it out): a hub with OCM's real hub
//! controllers, spokes that joined through OCM's real registration and work agents, the
//! `kmm-hub` and `kmm-spoke` binaries installed from manifests/ and running under their
//! ServiceAccounts (`kmm_e2e::sandbox`), simulated worker nodes on a few kernels and, with
//! `--e2e-vm`, one real-kernel node (Debian's kernel in a VM) on `spoke-1`.
//!
//! Measured from watches started before each action:
//! 1. an MCM applied on the hub → every selected cluster's ManifestWork written (hub) → the
//!    Module on every spoke (OCM delivery: the work agent applied it) → the Module's ready label
//!    on every selected node, with the module in the node's loaded list (spoke);
//! 2. on each spoke in turn, one simulated node reboots into a kernel no node there ran → the
//!    spoke agent's ClusterClaim lists it (spoke agent) → the ManagedCluster's claim on the hub
//!    (OCM registration) → the cluster's ManifestWork rewritten with the new kernel's mapping
//!    (hub) → the Module on the spoke with it (OCM delivery) → the module loaded and labelled
//!    on that node (spoke).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures::StreamExt as _;
use futures::stream::BoxStream;
use k8s_openapi::api::core::v1::{Node, Secret};
use kmm_e2e::fleet::{WORKER_ROLE_LABEL, spoke_name, worker_node};
use kmm_e2e::oci::{KmodImage, push_kmod_image};
use kmm_e2e::sandbox::install::HUB_NAMESPACE;
use kmm_e2e::sandbox::progress::Progress;
use kmm_e2e::sandbox::{Sandbox, SandboxOptions, apply_mcm};
use kmm_e2e::sim::{LOADED_MODULES_ANNOTATION, SimNode};
use kube::api::{Api, PostParams};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};
use kube::{Client, Resource, ResourceExt as _};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use shared_api::Module;
use shared_api::labels::module_ready_label;
use shared_api::ocm::{
    ClusterClaim, KERNEL_VERSIONS_CLAIM, ManagedCluster, ManifestWork, claim_part_of,
};

use crate::results::{E2eApply, E2eChange, E2eCluster, EndToEnd, Outcome};

/// The MCM, the Module on the spokes and their namespace there.
const MCM: &str = "kmm-bench-e2e";
const SPOKE_NS: &str = "kmm-bench-e2e";
const MODULE: &str = "kmm_bench";
const PULL_SECRET: &str = "kmm-bench-pull";
/// Simulated kernels: nodes take the first `--e2e-kernels` round-robin; the kernel change
/// reboots a node into the next one.
const KERNELS: [&str; 6] = [
    "5.14.0-284.36.1.el9_2.x86_64",
    "6.1.0-18-amd64",
    "5.10.0-26-amd64",
    "5.14.0-362.8.1.el9_3.x86_64",
    "6.1.0-13-amd64",
    "6.1.0-21-amd64",
];
/// How long each measured phase may take.
const LIMIT: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Copy)]
pub struct Config {
    pub spokes: usize,
    pub nodes: usize,
    pub kernels: usize,
    pub vm: bool,
}

fn node_name(spoke: usize, i: usize) -> String {
    format!("{}-w{i}", spoke_name(spoke))
}

const VM_NODE: &str = "spoke-1-real";

pub async fn run(hub_bin: &Path, spoke_bin: &Path, cfg: Config) -> anyhow::Result<EndToEnd> {
    anyhow::ensure!(
        cfg.spokes >= 1 && cfg.nodes >= 1,
        "at least one spoke and one node"
    );
    anyhow::ensure!(
        (1..KERNELS.len()).contains(&cfg.kernels),
        "--e2e-kernels: 1 to {}",
        KERNELS.len() - 1
    );
    let kernels: Vec<&str> = KERNELS[..cfg.kernels].to_vec();
    let vm_kernel = if cfg.vm {
        Some(kmm_e2e::testkit::real_kernel().context(
            "--e2e-vm: no real kernel provisioned (bash e2e/provision/provision.sh unpacks Debian's)",
        )?)
    } else {
        None
    };
    let mut topology: Vec<Vec<SimNode>> = (1..=cfg.spokes)
        .map(|s| {
            (0..cfg.nodes)
                .map(|i| worker_node(&node_name(s, i), kernels[i % kernels.len()]))
                .collect()
        })
        .collect();
    if vm_kernel.is_some() {
        topology[0].push(SimNode::real(
            VM_NODE,
            BTreeMap::from([(WORKER_ROLE_LABEL.to_string(), String::new())]),
        ));
    }
    eprintln!(
        "kmm-bench: end to end: starting the sandbox ({} spokes × {} simulated nodes{}, real OCM agents, kmm-hub and kmm-spoke)",
        cfg.spokes,
        cfg.nodes,
        if cfg.vm { " + 1 VM node" } else { "" }
    );
    let started = Instant::now();
    let opts = SandboxOptions {
        hub_bin: Some(hub_bin.to_path_buf()),
        spoke_bin: Some(spoke_bin.to_path_buf()),
        nodes: Some(topology),
        ..Default::default()
    };
    let sandbox = Sandbox::start(opts, &Progress::plain(6)).await?;
    let sandbox_start = started.elapsed();
    eprintln!(
        "kmm-bench: sandbox up in {:.1} s",
        sandbox_start.as_secs_f64()
    );
    let result = measure(&sandbox, cfg, &kernels, vm_kernel.as_deref()).await;
    if let Err(e) = &result {
        eprintln!(
            "kmm-bench: end to end failed: {e:#}\n{}",
            sandbox.dump().await
        );
    }
    sandbox.stop().await;
    result.map(|mut r| {
        r.sandbox_start_s = sandbox_start.as_secs_f64();
        r
    })
}

async fn measure(
    sb: &Sandbox,
    cfg: Config,
    kernels: &[&str],
    vm_kernel: Option<&str>,
) -> anyhow::Result<EndToEnd> {
    let fleet = sb.fleet();
    let hub = sb.hub_client().await;
    let spokes = sb.spoke_clients().await;
    let new_kernel = KERNELS[cfg.kernels];

    // One prebuilt image per kernel (the new kernel's too), pulled with a secret that the
    // MCM copies to the spokes.
    let registry = fleet.registry();
    let all: Vec<&str> = kernels
        .iter()
        .copied()
        .chain([new_kernel])
        .chain(vm_kernel)
        .collect();
    for k in &all {
        push_kmod_image(
            &registry.access(),
            &format!("{}/bench/kmm-bench:{k}", registry.host()),
            &KmodImage::new(&[k], &[MODULE]),
        )
        .await
        .with_context(|| format!("pushing the image for {k}"))?;
    }
    Api::<Secret>::namespaced(hub.clone(), HUB_NAMESPACE)
        .create(
            &PostParams::default(),
            &registry.dockerconfigjson_secret(PULL_SECRET, HUB_NAMESPACE),
        )
        .await?;
    // Measured on a booted VM, as on a machine that is up: its boot is not in the figures.
    let vm_boot_s = if vm_kernel.is_some() {
        let vms = fleet.node_sim(&spoke_name(1)).vms_booted().await?;
        vms.first().map(|(_, vm)| vm.boot_time().as_secs_f64())
    } else {
        None
    };

    // Every spoke's kernels on the hub before the MCM, as in a fleet that runs: the MCM's
    // time must not include the spoke agents' first claims.
    for (i, (name, _)) in spokes.iter().enumerate() {
        let mut want: Vec<String> = (0..cfg.nodes.min(kernels.len()))
            .map(|k| kernels[k].to_string())
            .chain(vm_kernel.filter(|_| i == 0).map(str::to_string))
            .collect();
        want.sort();
        let api = Api::<ManagedCluster>::all(hub.clone());
        kmm_e2e::testkit::eventually(
            &format!("{name}'s kernels on the hub"),
            Duration::from_secs(120),
            async || {
                let got = api
                    .get(name)
                    .await?
                    .status
                    .and_then(|s| s.kernel_versions())
                    .unwrap_or_default();
                Ok(if got == want {
                    Ok(())
                } else {
                    Err(format!("{got:?}, want {want:?}"))
                })
            },
        )
        .await?;
    }
    let apply = apply_phase(sb, &hub, &spokes).await?;
    eprintln!(
        "kmm-bench: end to end: MCM → works {:.2} s, → Modules {:.2} s, → loaded {:.2} s",
        apply.works_s, apply.modules_s, apply.loaded_s
    );
    // Let the status writes and events that follow the loads pass.
    tokio::time::sleep(Duration::from_secs(3)).await;
    // One kernel change per spoke, one after the other.
    let mut change = Vec::new();
    for (i, (name, client)) in spokes.iter().enumerate() {
        change.push(
            match change_phase(sb, &hub, i + 1, client, kernels[0], new_kernel).await {
                Ok(c) => {
                    eprintln!(
                        "kmm-bench: end to end: kernel change on {name}: loaded after {:.2} s",
                        c.loaded_s
                    );
                    Outcome::Done(c)
                }
                Err(e) => {
                    eprintln!(
                        "kmm-bench: end to end: kernel change on {name} failed: {e:#}\n{}",
                        sb.dump().await
                    );
                    Outcome::todo(format!("TODO: the kernel change on {name} failed: {e:#}"))
                }
            },
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    Ok(EndToEnd {
        measured_at: chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
        spokes: cfg.spokes,
        nodes_per_spoke: cfg.nodes,
        kernels: kernels.iter().map(|k| k.to_string()).collect(),
        new_kernel: new_kernel.to_string(),
        vm_kernel: vm_kernel.map(str::to_string),
        vm_boot_s,
        sandbox_start_s: 0.0,
        apply,
        change,
    })
}

fn mcm(registry: &str) -> Value {
    json!({
        "apiVersion": "hub.kmm.sigs.x-k8s.io/v1beta1", "kind": "ManagedClusterModule",
        "metadata": {"name": MCM},
        "spec": {
            "spokeNamespace": SPOKE_NS,
            "selector": {},
            "spokePrerequisites": {"pullSecret": true},
            "moduleSpec": {
                "selector": {WORKER_ROLE_LABEL: ""},
                "imageRepoSecret": {"name": PULL_SECRET},
                "moduleLoader": {"container": {
                    "modprobe": {"moduleName": MODULE},
                    "kernelMappings": [{"regexp": "^.*$",
                        "containerImage": format!("{registry}/bench/kmm-bench:${{KERNEL_FULL_VERSION}}")}]
                }}
            }
        }
    })
}

/// The node carries the Module's ready label and its loaded list has the module.
fn loaded(n: &Node) -> bool {
    n.labels().contains_key(&module_ready_label(SPOKE_NS, MCM))
        && n.annotations()
            .get(LOADED_MODULES_ANNOTATION)
            .is_some_and(|v| v.split(',').any(|m| m == MODULE))
}

fn is_worker(n: &Node) -> bool {
    n.labels().contains_key(WORKER_ROLE_LABEL)
}

fn named(name: &str) -> watcher::Config {
    watcher::Config::default().fields(&format!("metadata.name={name}"))
}

async fn apply_phase(
    sb: &Sandbox,
    hub: &Client,
    spokes: &[(String, Client)],
) -> anyhow::Result<E2eApply> {
    let n = spokes.len();
    let works = Watch::start(Api::<ManifestWork>::all(hub.clone()), named(MCM)).await?;
    let mut modules = Vec::new();
    let mut nodes = Vec::new();
    for (_, c) in spokes {
        modules.push(Watch::start(Api::<Module>::all(c.clone()), named(MCM)).await?);
        nodes.push(Watch::start(Api::<Node>::all(c.clone()), watcher::Config::default()).await?);
    }
    let workers: Vec<usize> = nodes
        .iter()
        .map(|w| w.store.values().filter(|n| is_worker(n)).count())
        .collect();

    let mut work_at: BTreeMap<String, Duration> = BTreeMap::new();
    let node_at: Mutex<BTreeMap<(String, String), Duration>> = Mutex::default();
    let body = mcm(&sb.registry_host());
    let t0 = Instant::now();
    let (applied, works_t, modules_t, loaded_t) = {
        let work_at = &mut work_at;
        let works_f = works.until(t0, "every ManifestWork on the hub".into(), |s| {
            for w in s.values() {
                if let Some(ns) = w.namespace() {
                    work_at.entry(ns).or_insert_with(|| t0.elapsed());
                }
            }
            work_at.len() >= n
        });
        let modules_f =
            futures::future::try_join_all(modules.into_iter().zip(spokes).map(|(w, (name, _))| {
                w.until(t0, format!("the Module on {name}"), |s| !s.is_empty())
            }));
        let loaded_f =
            futures::future::try_join_all(nodes.into_iter().zip(spokes).zip(&workers).map(
                |((w, (name, _)), &want)| {
                    let node_at = &node_at;
                    w.until(t0, format!("the module loaded on {name}"), move |s| {
                        let mut at = node_at.lock().unwrap_or_else(|e| e.into_inner());
                        let mut done = 0;
                        for node in s.values().filter(|x| is_worker(x) && loaded(x)) {
                            at.entry((name.clone(), node.name_any()))
                                .or_insert_with(|| t0.elapsed());
                            done += 1;
                        }
                        done >= want
                    })
                },
            ));
        tokio::join!(apply_mcm(hub, &body), works_f, modules_f, loaded_f)
    };
    applied.context("applying the MCM")?;
    let works_t = works_t?;
    let modules_t = modules_t?;
    let loaded_t = loaded_t?;
    let secs = |d: Duration| d.as_secs_f64();
    let max = |v: &[Duration]| v.iter().copied().max().unwrap_or_default();
    let clusters = spokes
        .iter()
        .enumerate()
        .map(|(i, (name, _))| E2eCluster {
            name: name.clone(),
            work_s: work_at.get(name).copied().map_or(0.0, secs),
            module_s: secs(modules_t[i]),
            loaded_s: secs(loaded_t[i]),
            nodes: workers[i],
        })
        .collect();
    let (works_s, modules_s, loaded_s) =
        (secs(works_t), secs(max(&modules_t)), secs(max(&loaded_t)));
    let node_at = node_at.into_inner().unwrap_or_else(|e| e.into_inner());
    let vm_loaded_s = node_at
        .iter()
        .filter(|((_, node), _)| node == VM_NODE)
        .map(|((_, node), d)| (node.clone(), secs(*d)))
        .collect();
    let simulated_loaded_s = node_at
        .iter()
        .filter(|((_, node), _)| node != VM_NODE)
        .map(|(_, d)| secs(*d))
        .fold(0.0, f64::max);
    Ok(E2eApply {
        works_s,
        modules_s,
        loaded_s,
        hub_s: works_s,
        ocm_s: modules_s - works_s,
        spoke_s: loaded_s - modules_s,
        nodes: workers.iter().sum(),
        clusters,
        vm_loaded_s,
        simulated_loaded_s,
    })
}

/// Node 0 of spoke `n` reboots from `from` into `to`, a kernel the spoke did not run.
async fn change_phase(
    sb: &Sandbox,
    hub: &Client,
    n: usize,
    spoke: &Client,
    from: &str,
    to: &str,
) -> anyhow::Result<E2eChange> {
    let cluster = spoke_name(n);
    let node = node_name(n, 0);
    let sim = sb.fleet().node_sim(&cluster);
    let lists = |text: &str| text.lines().any(|l| l.trim() == to);
    let claims = Watch::start(Api::<ClusterClaim>::all(spoke.clone()), Default::default()).await?;
    let managed = Watch::start(Api::<ManagedCluster>::all(hub.clone()), named(&cluster)).await?;
    let works = Watch::start(
        Api::<ManifestWork>::namespaced(hub.clone(), &cluster),
        named(MCM),
    )
    .await?;
    let modules = Watch::start(
        Api::<Module>::namespaced(spoke.clone(), SPOKE_NS),
        named(MCM),
    )
    .await?;
    let nodes = Watch::start(Api::<Node>::all(spoke.clone()), named(&node)).await?;
    let mentions = |v: &Value| v.to_string().contains(&format!("\"{to}\""));

    let t0 = Instant::now();
    let (rebooted, claim_t, hub_claim_t, work_t, module_t, loaded_t) = tokio::join!(
        sim.set_kernel(&node, to),
        claims.until(t0, "the ClusterClaim on the spoke".into(), |s| {
            s.values().any(|c| {
                claim_part_of(KERNEL_VERSIONS_CLAIM, &c.name_any()).is_some()
                    && lists(&c.spec.value)
            })
        }),
        managed.until(t0, "the claim on the hub's ManagedCluster".into(), |s| {
            s.values().any(|m| {
                m.status
                    .as_ref()
                    .and_then(|st| st.kernel_versions())
                    .is_some_and(|ks| ks.iter().any(|k| k == to))
            })
        }),
        works.until(t0, "the ManifestWork rewritten".into(), |s| {
            s.values()
                .any(|w| serde_json::to_value(&w.spec.workload).is_ok_and(|v| mentions(&v)))
        }),
        modules.until(t0, "the Module on the spoke".into(), |s| {
            s.values()
                .any(|m| serde_json::to_value(&m.spec).is_ok_and(|v| mentions(&v)))
        }),
        nodes.until(t0, "the module loaded on the node".into(), |s| {
            // The simulator's own list: the Node annotation may still show the old boot's.
            s.values().any(|n| {
                n.status
                    .as_ref()
                    .and_then(|st| st.node_info.as_ref())
                    .is_some_and(|i| i.kernel_version == to)
                    && n.labels().contains_key(&module_ready_label(SPOKE_NS, MCM))
                    && sim.loaded_modules(&node).iter().any(|m| m == MODULE)
            })
        }),
    );
    rebooted?;
    let secs = |d: anyhow::Result<Duration>| d.map(|d| d.as_secs_f64());
    let (claim_spoke_s, claim_hub_s, work_s, module_s, loaded_s) = (
        secs(claim_t)?,
        secs(hub_claim_t)?,
        secs(work_t)?,
        secs(module_t)?,
        secs(loaded_t)?,
    );
    Ok(E2eChange {
        cluster,
        node,
        from: from.into(),
        to: to.into(),
        claim_spoke_s,
        claim_hub_s,
        work_s,
        module_s,
        loaded_s,
        spoke_agent_s: claim_spoke_s,
        registration_s: claim_hub_s - claim_spoke_s,
        hub_s: work_s - claim_hub_s,
        ocm_s: module_s - work_s,
        spoke_s: loaded_s - module_s,
    })
}

/// A watch whose initial listing is done: the objects as they are, then their changes.
struct Watch<K: 'static> {
    stream: BoxStream<'static, Result<Event<K>, watcher::Error>>,
    store: BTreeMap<String, K>,
}

fn key<K: Resource>(o: &K) -> String {
    format!(
        "{}/{}",
        o.meta().namespace.as_deref().unwrap_or_default(),
        o.meta().name.as_deref().unwrap_or_default()
    )
}

impl<K> Watch<K>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
    K::DynamicType: Default,
{
    async fn start(api: Api<K>, cfg: watcher::Config) -> anyhow::Result<Self> {
        let mut w = Self {
            stream: watcher::watcher(api, cfg).default_backoff().boxed(),
            store: BTreeMap::new(),
        };
        let mut listing = Some(BTreeMap::new());
        while listing.is_some() {
            w.next(&mut listing).await?;
        }
        Ok(w)
    }

    /// One event into the store (a relisting is gathered in `listing` until it is done).
    async fn next(&mut self, listing: &mut Option<BTreeMap<String, K>>) -> anyhow::Result<()> {
        match self.stream.next().await {
            None => bail!("the watch ended"),
            // Transient (the watcher backs off and retries); the store stays as it was.
            Some(Err(e)) => eprintln!("kmm-bench: watch error: {e}"),
            Some(Ok(Event::Init)) => *listing = Some(BTreeMap::new()),
            Some(Ok(Event::InitApply(o))) => {
                listing.get_or_insert_default().insert(key(&o), o);
            }
            Some(Ok(Event::InitDone)) => self.store = listing.take().unwrap_or_default(),
            Some(Ok(Event::Apply(o))) => {
                self.store.insert(key(&o), o);
            }
            Some(Ok(Event::Delete(o))) => {
                self.store.remove(&key(&o));
            }
        }
        Ok(())
    }

    /// The time from `t0` until `done` holds on the watched objects (asked now and after
    /// every event), at most [`LIMIT`].
    async fn until(
        mut self,
        t0: Instant,
        what: String,
        mut done: impl FnMut(&BTreeMap<String, K>) -> bool,
    ) -> anyhow::Result<Duration> {
        let wait = async {
            let mut listing = None;
            loop {
                if listing.is_none() && done(&self.store) {
                    return anyhow::Ok(t0.elapsed());
                }
                self.next(&mut listing).await?;
            }
        };
        tokio::time::timeout(LIMIT, wait)
            .await
            .with_context(|| format!("{what}: not within {LIMIT:?}"))?
    }
}
