//! A whole test fleet: one etcd, a hub and N spoke control planes, a registry, the real Open
//! Cluster Management programs (hub controllers, a klusterlet agent per spoke) and the node
//! simulators (nodes and kubelets per cluster).
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let fleet = kmm_e2e::fleet::Fleet::builder().spokes(2).start().await?;
//! let hub = fleet.hub().client().await;
//! let spoke1 = fleet.spoke(1); // named "spoke-1"
//! # let _ = (hub, spoke1);
//! fleet.stop().await;
//! # Ok(()) }
//! ```
//!
//! Spokes are numbered from 1, as in their names (`spoke(1)` is `spoke-1`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, ObjectMeta, Patch, PatchParams};

use crate::cluster::{Cluster, ClusterConfig, Etcd, FIELD_MANAGER};
use crate::ocm::{OcmAgent, OcmHub};
use crate::pki::Ca;
use crate::registry::Registry;
use crate::sim::{NodeSim, SimNode};

/// Name of the hub cluster.
pub const HUB: &str = "hub";
/// Kernel of the hub's build node.
pub const HUB_BUILD_KERNEL: &str = "6.1.0-13-amd64";
/// Label every simulated worker node carries.
pub const WORKER_ROLE_LABEL: &str = "node-role.kubernetes.io/worker";

/// The name of spoke `n` (1-based).
pub fn spoke_name(n: usize) -> String {
    format!("spoke-{n}")
}

/// A worker node with the given name and kernel.
pub fn worker_node(name: &str, kernel: &str) -> SimNode {
    SimNode {
        name: name.to_string(),
        kernel: kernel.to_string(),
        labels: BTreeMap::from([(WORKER_ROLE_LABEL.to_string(), String::new())]),
        ..Default::default()
    }
}

type NodesFn = Arc<dyn Fn(usize, &str) -> Vec<SimNode> + Send + Sync>;

/// Configures a [`Fleet`]; see [`Fleet::builder`].
#[derive(Clone)]
pub struct FleetBuilder {
    spokes: usize,
    spoke_nodes: BTreeMap<usize, Vec<SimNode>>,
    nodes_fn: Option<NodesFn>,
    spoke_labels: BTreeMap<usize, BTreeMap<String, String>>,
    hub_build_node: bool,
    registry_auth: bool,
    simulators: bool,
    dir: Option<PathBuf>,
}

impl std::fmt::Debug for FleetBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetBuilder")
            .field("spokes", &self.spokes)
            .field("spoke_nodes", &self.spoke_nodes)
            .field("hub_build_node", &self.hub_build_node)
            .field("registry_auth", &self.registry_auth)
            .field("simulators", &self.simulators)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Default for FleetBuilder {
    fn default() -> Self {
        Self {
            spokes: 1,
            spoke_nodes: BTreeMap::new(),
            nodes_fn: None,
            spoke_labels: BTreeMap::new(),
            hub_build_node: true,
            registry_auth: false,
            simulators: true,
            dir: None,
        }
    }
}

impl FleetBuilder {
    /// Number of spoke clusters (default 1).
    pub fn spokes(mut self, n: usize) -> Self {
        self.spokes = n;
        self
    }

    /// The simulated nodes of spoke `n` (1-based). Overrides [`FleetBuilder::nodes_with`].
    pub fn spoke_nodes(mut self, n: usize, nodes: Vec<SimNode>) -> Self {
        self.spoke_nodes.insert(n, nodes);
        self
    }

    /// Nodes for every spoke without explicit [`FleetBuilder::spoke_nodes`]: called with
    /// the spoke number (1-based) and name.
    pub fn nodes_with(
        mut self,
        f: impl Fn(usize, &str) -> Vec<SimNode> + Send + Sync + 'static,
    ) -> Self {
        self.nodes_fn = Some(Arc::new(f));
        self
    }

    /// Extra labels of spoke `n`'s ManagedCluster (it always has `name=<spoke>`).
    pub fn spoke_labels(mut self, n: usize, labels: BTreeMap<String, String>) -> Self {
        self.spoke_labels.entry(n).or_default().extend(labels);
        self
    }

    /// One simulated worker node on the hub so build Jobs can run (default true).
    pub fn hub_build_node(mut self, yes: bool) -> Self {
        self.hub_build_node = yes;
        self
    }

    /// htpasswd authentication on the registry (default false).
    pub fn registry_auth(mut self, yes: bool) -> Self {
        self.registry_auth = yes;
        self
    }

    /// Start the node simulators and the real OCM programs (default true); spokes then join
    /// the hub through OCM's registration. Without them the fleet is just control planes and
    /// a registry, and each spoke's ManagedCluster is written directly (accepted, no agent).
    pub fn simulators(mut self, yes: bool) -> Self {
        self.simulators = yes;
        self
    }

    /// Put the fleet in `dir` (kept afterwards). Default: a temporary directory, removed
    /// when the fleet stops unless `KMM_FLEET_KEEP=1`.
    pub fn dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.dir = Some(dir.into());
        self
    }

    fn nodes_of(&self, n: usize) -> Vec<SimNode> {
        if let Some(nodes) = self.spoke_nodes.get(&n) {
            return nodes.clone();
        }
        self.nodes_fn
            .as_ref()
            .map(|f| f(n, &spoke_name(n)))
            .unwrap_or_default()
    }

    /// Starts everything; prints step timings to stderr.
    pub async fn start(self) -> anyhow::Result<Fleet> {
        Fleet::start(self).await
    }

    /// Starts the fleet, runs `test` on it, prints [`Fleet::dump`] to stderr when the test
    /// fails (error or panic), stops the fleet, and returns the test's result.
    pub async fn run<T>(
        self,
        test: impl AsyncFnOnce(&mut Fleet) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        use futures::FutureExt as _;
        let mut fleet = self.start().await?;
        let outcome = std::panic::AssertUnwindSafe(test(&mut fleet))
            .catch_unwind()
            .await;
        match &outcome {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => eprintln!("kmm-fleet: test failed: {e:#}\n{}", fleet.dump().await),
            Err(_) => eprintln!("kmm-fleet: test panicked\n{}", fleet.dump().await),
        }
        fleet.stop().await;
        match outcome {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

/// Where the fleet's files live.
#[derive(Debug)]
enum FleetDir {
    Temp(tempfile::TempDir),
    Kept(PathBuf),
}

impl FleetDir {
    fn path(&self) -> &Path {
        match self {
            Self::Temp(t) => t.path(),
            Self::Kept(p) => p,
        }
    }
}

/// A running fleet. Dropping it kills every process it started (SIGKILL) and removes its
/// temporary directory; [`Fleet::stop`] shuts down in order.
pub struct Fleet {
    // Field order is drop order: simulators, then clusters, registry, etcd, and the
    // directory last.
    node_sims: BTreeMap<String, NodeSim>,
    ocm_agents: Vec<OcmAgent>,
    ocm_hub: Option<OcmHub>,
    hub: Cluster,
    spokes: Vec<Cluster>,
    registry: Registry,
    etcd: Option<Etcd>,
    dir: FleetDir,
    started_in: Duration,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("dir", &self.dir.path())
            .field("hub", &self.hub.server_url())
            .field(
                "spokes",
                &self.spokes.iter().map(Cluster::name).collect::<Vec<_>>(),
            )
            .field("registry", &self.registry.host())
            .finish_non_exhaustive()
    }
}

fn step(what: &str, t: Instant) {
    eprintln!("kmm-fleet: {what} in {:.2?}", t.elapsed());
}

impl Fleet {
    pub fn builder() -> FleetBuilder {
        FleetBuilder::default()
    }

    async fn start(b: FleetBuilder) -> anyhow::Result<Self> {
        let t0 = Instant::now();
        // Blocking (minutes on a cold machine) but spawns nothing that must outlive it.
        let binaries = tokio::task::spawn_blocking(crate::provision::ensure_provisioned)
            .await
            .context("provisioning task panicked")??;
        step("provisioning checked", t0);

        let keep = std::env::var("KMM_FLEET_KEEP").is_ok_and(|v| v == "1");
        let dir = match &b.dir {
            Some(d) => {
                std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
                FleetDir::Kept(d.clone())
            }
            None => {
                let t = tempfile::Builder::new()
                    .prefix("kmm-fleet-")
                    .tempdir()
                    .context("creating fleet dir")?;
                if keep {
                    FleetDir::Kept(t.keep())
                } else {
                    FleetDir::Temp(t)
                }
            }
        };
        let root = dir.path().to_path_buf();
        eprintln!("kmm-fleet: fleet directory {}", root.display());

        let t = Instant::now();
        let ca = Ca::new("kmm-fleet-ca")?;
        let etcd = Etcd::start(&binaries, &root).await?;
        step("etcd started", t);

        // Hub, spokes and the registry start concurrently, all from this task: their
        // processes are forked by runtime worker threads, which live as long as the runtime.
        let t = Instant::now();
        let names: Vec<String> = std::iter::once(HUB.to_string())
            .chain((1..=b.spokes).map(spoke_name))
            .collect();
        let dirs: Vec<PathBuf> = names.iter().map(|n| root.join(n)).collect();
        for d in &dirs {
            // A reused directory (`kmm-fleet up --dir`): stale kubeconfigs and logs would mislead.
            if d.exists() {
                std::fs::remove_dir_all(d).with_context(|| format!("clearing {}", d.display()))?;
            }
        }
        let hub_crds = [binaries.ocm_crds.join("hub")];
        let spoke_crds = [binaries.ocm_crds.join("spoke")];
        let clusters = futures::future::try_join_all(names.iter().zip(&dirs).map(|(name, dir)| {
            Cluster::start(ClusterConfig {
                name,
                dir,
                binaries: &binaries,
                etcd_url: etcd.url(),
                ca: &ca,
                crd_dirs: if name == HUB { &hub_crds } else { &spoke_crds },
            })
        }));
        let registry_dir = root.join("registry");
        let registry = Registry::run(&binaries, &registry_dir, b.registry_auth);
        let (clusters, registry) = tokio::join!(clusters, registry);
        let mut clusters = clusters?;
        let registry = registry?;
        step(
            &format!("{} control planes and the registry started", clusters.len()),
            t,
        );
        let hub = clusters.remove(0);
        let spokes = clusters;

        let mut fleet = Self {
            node_sims: BTreeMap::new(),
            ocm_agents: Vec::new(),
            ocm_hub: None,
            hub,
            spokes,
            registry,
            etcd: Some(etcd),
            dir,
            started_in: Duration::ZERO,
        };

        if b.simulators {
            let t = Instant::now();
            fleet.join_spokes(&b, &binaries, &ca).await?;
            step("spokes joined the hub through OCM", t);
            let t = Instant::now();
            fleet.start_simulators(&b).await?;
            step("node simulators started", t);
        } else {
            let t = Instant::now();
            fleet.register_spokes(&b).await?;
            step("ManagedClusters written on the hub", t);
        }
        fleet.started_in = t0.elapsed();
        fleet.write_env_file()?;
        eprintln!(
            "kmm-fleet: fleet with {} spokes ready in {:.2?}",
            fleet.spokes.len(),
            fleet.started_in
        );
        Ok(fleet)
    }

    /// Starts OCM's hub controllers and a klusterlet agent per spoke, waits until every spoke
    /// joined (CSR signed, ManagedCluster accepted and available), then labels the
    /// ManagedClusters (`name=<spoke>` plus the builder's) as an admin would.
    async fn join_spokes(
        &mut self,
        b: &FleetBuilder,
        binaries: &crate::provision::Binaries,
        ca: &Ca,
    ) -> anyhow::Result<()> {
        let root = self.dir().to_path_buf();
        let hub = OcmHub::start(&self.hub, binaries, ca, &root.join("hub").join("ocm"))
            .await
            .context("starting OCM's hub controllers")?;
        let bootstrap = hub.bootstrap_kubeconfig().to_string();
        self.ocm_hub = Some(hub);
        for spoke in &self.spokes {
            let agent = OcmAgent::start(
                spoke,
                self.hub.client().await,
                binaries,
                &bootstrap,
                &root.join(spoke.name()).join("ocm"),
            )
            .await
            .with_context(|| format!("starting the OCM agents of {}", spoke.name()))?;
            self.ocm_agents.push(agent);
        }
        let client = self.hub.client().await;
        futures::future::try_join_all(self.spokes.iter().map(|s| {
            crate::ocm::accept_and_wait_joined(&client, s.name(), Duration::from_secs(120))
        }))
        .await?;
        let managed: Api<shared_api::ManagedCluster> = Api::all(client);
        for (i, spoke) in self.spokes.iter().enumerate() {
            let name = spoke.name();
            let mut labels = BTreeMap::from([("name".to_string(), name.to_string())]);
            labels.extend(b.spoke_labels.get(&(i + 1)).cloned().unwrap_or_default());
            let patch = serde_json::json!({"metadata": {"labels": labels}});
            managed
                .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .with_context(|| format!("labelling ManagedCluster {name}"))?;
        }
        Ok(())
    }

    /// Without OCM's programs: on the hub a namespace and a ManagedCluster per spoke (label
    /// `name=<spoke>` plus the builder's, `hubAcceptsClient: true`, the spoke's URL and CA).
    async fn register_spokes(&self, b: &FleetBuilder) -> anyhow::Result<()> {
        use base64::Engine as _;
        let client = self.hub.client().await;
        let pp = PatchParams::apply(FIELD_MANAGER).force();
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let managed: Api<shared_api::ManagedCluster> = Api::all(client);
        for (i, spoke) in self.spokes.iter().enumerate() {
            let name = spoke.name();
            let mut labels = BTreeMap::from([("name".to_string(), name.to_string())]);
            labels.extend(b.spoke_labels.get(&(i + 1)).cloned().unwrap_or_default());
            let ns = Namespace {
                metadata: ObjectMeta {
                    name: Some(name.into()),
                    ..Default::default()
                },
                ..Default::default()
            };
            namespaces
                .patch(name, &pp, &Patch::Apply(&ns))
                .await
                .with_context(|| format!("creating namespace {name} on the hub"))?;
            let mut mc = shared_api::ManagedCluster::new(
                name,
                shared_api::ocm::ManagedClusterSpec {
                    hub_accepts_client: true,
                    managed_cluster_client_configs: vec![shared_api::ocm::ClientConfig {
                        url: spoke.server_url(),
                        ca_bundle: Some(
                            base64::engine::general_purpose::STANDARD.encode(spoke.ca_pem()),
                        ),
                    }],
                    ..Default::default()
                },
            );
            mc.metadata.labels = Some(labels);
            managed
                .patch(name, &pp, &Patch::Apply(&mc))
                .await
                .with_context(|| format!("creating ManagedCluster {name} on the hub"))?;
        }
        Ok(())
    }

    async fn start_simulators(&mut self, b: &FleetBuilder) -> anyhow::Result<()> {
        let access = self.registry.access();
        let hub_nodes = if b.hub_build_node {
            vec![worker_node("hub-build-1", HUB_BUILD_KERNEL)]
        } else {
            vec![]
        };
        let mut plans = vec![(
            self.hub.name().to_string(),
            self.hub.client().await,
            hub_nodes,
        )];
        for (i, spoke) in self.spokes.iter().enumerate() {
            plans.push((
                spoke.name().to_string(),
                spoke.client().await,
                b.nodes_of(i + 1),
            ));
        }
        let sims = futures::future::try_join_all(plans.into_iter().map(|(name, client, nodes)| {
            let access = access.clone();
            async move {
                let sim = NodeSim::start(&name, client, access, nodes)
                    .await
                    .with_context(|| format!("starting the node simulator of {name}"))?;
                anyhow::Ok((name, sim))
            }
        }))
        .await?;
        self.node_sims = sims.into_iter().collect();
        Ok(())
    }

    /// `DIR/fleet.env`: shell-sourceable paths and addresses, for people and scripts.
    fn write_env_file(&self) -> anyhow::Result<()> {
        let mut s = String::new();
        let _ = writeln!(s, "KMM_FLEET_DIR={}", self.dir().display());
        let _ = writeln!(s, "KMM_FLEET_REGISTRY={}", self.registry.host());
        if let Some((u, p)) = self.registry.credentials() {
            let _ = writeln!(
                s,
                "KMM_FLEET_REGISTRY_USER={u}\nKMM_FLEET_REGISTRY_PASSWORD={p}"
            );
        }
        for c in self.clusters() {
            let var = c.name().to_uppercase().replace('-', "_");
            let _ = writeln!(s, "KUBECONFIG_{var}={}", c.kubeconfig_path().display());
        }
        std::fs::write(self.dir().join("fleet.env"), s).context("writing fleet.env")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// How long [`FleetBuilder::start`] took.
    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    pub fn hub(&self) -> &Cluster {
        &self.hub
    }

    pub fn hub_mut(&mut self) -> &mut Cluster {
        &mut self.hub
    }

    /// Spoke `n`, 1-based like its name. Panics when there is no such spoke (a test bug).
    pub fn spoke(&self, n: usize) -> &Cluster {
        let count = self.spokes.len();
        n.checked_sub(1)
            .and_then(|i| self.spokes.get(i))
            .unwrap_or_else(|| panic!("no spoke {n}: spokes are numbered 1..={count}"))
    }

    /// Spoke `n`, mutable (to restart its API server).
    pub fn spoke_mut(&mut self, n: usize) -> &mut Cluster {
        let count = self.spokes.len();
        n.checked_sub(1)
            .and_then(|i| self.spokes.get_mut(i))
            .unwrap_or_else(|| panic!("no spoke {n}: spokes are numbered 1..={count}"))
    }

    pub fn spokes(&self) -> &[Cluster] {
        &self.spokes
    }

    /// The hub, then the spokes.
    pub fn clusters(&self) -> impl Iterator<Item = &Cluster> {
        std::iter::once(&self.hub).chain(&self.spokes)
    }

    /// A cluster by name (`hub`, `spoke-1`, …).
    pub fn cluster(&self, name: &str) -> Option<&Cluster> {
        self.clusters().find(|c| c.name() == name)
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Mutable registry (to stop and start it).
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// The node simulator of a cluster. Panics for an unknown name or when simulators
    /// are off (a test bug).
    pub fn node_sim(&self, cluster: &str) -> &NodeSim {
        self.node_sims.get(cluster).unwrap_or_else(|| {
            panic!(
                "no node simulator for cluster {cluster:?} (have: {:?}; simulators off?)",
                self.node_sims.keys().collect::<Vec<_>>()
            )
        })
    }

    /// OCM's hub controllers, when simulators are on.
    pub fn ocm_hub(&self) -> Option<&OcmHub> {
        self.ocm_hub.as_ref()
    }

    /// The OCM agents of every spoke, when simulators are on.
    pub fn ocm_agents(&self) -> &[OcmAgent] {
        &self.ocm_agents
    }

    /// `(cluster or "fleet", component, pid)` of every process the fleet runs.
    pub fn pids(&self) -> Vec<(String, String, u32)> {
        let mut out = Vec::new();
        if let Some(e) = &self.etcd {
            out.push(("fleet".to_string(), "etcd".to_string(), e.pid()));
        }
        if let Some(pid) = self.registry.pid() {
            out.push(("fleet".to_string(), "docker-registry".to_string(), pid));
        }
        for c in self.clusters() {
            out.extend(
                c.pids()
                    .into_iter()
                    .map(|(comp, pid)| (c.name().to_string(), comp.to_string(), pid)),
            );
        }
        if let Some(hub) = &self.ocm_hub {
            out.extend(
                hub.pids()
                    .into_iter()
                    .map(|(comp, pid)| (HUB.to_string(), comp, pid)),
            );
        }
        for a in &self.ocm_agents {
            out.extend(
                a.pids()
                    .into_iter()
                    .map(|(comp, pid)| (a.cluster().to_string(), comp, pid)),
            );
        }
        for (cluster, sim) in &self.node_sims {
            out.extend(
                sim.vms()
                    .into_iter()
                    .map(|(node, vm)| (cluster.clone(), format!("qemu {node}"), vm.pid())),
            );
        }
        out
    }

    /// Resident memory of every process, one line each (for reports).
    pub fn memory_report(&self) -> String {
        let mut s = String::new();
        for (cluster, comp, pid) in self.pids() {
            let rss = crate::process::rss_bytes(pid).map(|b| b / (1024 * 1024));
            let _ = writeln!(
                s,
                "{cluster:<10} {comp:<24} pid {pid:<7} rss {} MiB",
                rss.unwrap_or(0)
            );
        }
        s
    }

    /// Stops simulators, control planes, the registry and etcd (only our own PIDs), then
    /// removes the temporary directory (kept with `KMM_FLEET_KEEP=1` or `.dir(…)`).
    pub async fn stop(mut self) {
        let t = Instant::now();
        for (_, sim) in std::mem::take(&mut self.node_sims) {
            sim.stop().await;
        }
        for agent in std::mem::take(&mut self.ocm_agents) {
            agent.stop().await;
        }
        if let Some(hub) = self.ocm_hub.take() {
            hub.stop().await;
        }
        futures::future::join_all(
            std::iter::once(&mut self.hub)
                .chain(self.spokes.iter_mut())
                .map(|c| c.stop()),
        )
        .await;
        self.registry.stop().await;
        if let Some(etcd) = self.etcd.take() {
            etcd.stop().await;
        }
        if let FleetDir::Kept(p) = &self.dir {
            eprintln!("kmm-fleet: kept fleet directory {}", p.display());
        }
        step("fleet stopped", t);
    }

    /// A readable snapshot of the fleet for failing tests: per cluster nodes, pods,
    /// DaemonSets, Modules and events; on the hub ManagedClusters, ManifestWorks and
    /// ManagedClusterModules; then simulator logs.
    pub async fn dump(&self) -> String {
        let mut out = String::new();
        for c in self.clusters() {
            out.push_str(&dump::cluster(c, c.name() == HUB).await);
        }
        for (name, sim) in &self.node_sims {
            let _ = writeln!(out, "==== node simulator {name} (last 100 lines)");
            let logs = sim.logs();
            for l in &logs[logs.len().saturating_sub(100)..] {
                let _ = writeln!(out, "  {l}");
            }
        }
        let ocm_logs = self
            .ocm_hub
            .iter()
            .flat_map(OcmHub::log_paths)
            .chain(self.ocm_agents.iter().flat_map(OcmAgent::log_paths));
        for path in ocm_logs {
            let _ = writeln!(out, "==== {} (last 40 lines)", path.display());
            for l in crate::process::log_tail(&path, 40).lines() {
                let _ = writeln!(out, "  {l}");
            }
        }
        let _ = writeln!(out, "==== logs: {}", self.dir().display());
        out
    }
}

mod dump;
