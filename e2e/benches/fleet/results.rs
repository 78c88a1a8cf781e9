//! The machine-readable results (`target/bench/results.json`), from which the page is made.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Results {
    pub generated_at: String,
    pub duration_s: f64,
    pub machine: Machine,
    pub settings: Settings,
    pub fanout: Vec<FanOut>,
    /// The spoke agent runs (one per size), or why one was not measured.
    pub spoke: Vec<Outcome<SpokeIdle>>,
    /// Signing cases from `hub/benches/sign.rs`, or why there are none.
    pub signing: Outcome<Signing>,
    pub upstream: Vec<Upstream>,
    pub targets: Vec<Target>,
    /// End to end on the sandbox (real OCM agents), or why it was not measured.
    #[serde(default)]
    pub e2e: Outcome<EndToEnd>,
}

/// A measurement, or a TODO saying why it is missing.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Outcome<T> {
    Done(T),
    Todo { todo: String },
}

impl<T> Default for Outcome<T> {
    fn default() -> Self {
        Outcome::Todo {
            todo: "not run".into(),
        }
    }
}

impl<T> Outcome<T> {
    pub fn todo(why: impl Into<String>) -> Self {
        Outcome::Todo { todo: why.into() }
    }

    pub fn done(&self) -> Option<&T> {
        match self {
            Outcome::Done(t) => Some(t),
            Outcome::Todo { .. } => None,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Machine {
    /// `model name` of /proc/cpuinfo.
    #[serde(default)]
    pub cpu: String,
    pub cores: usize,
    pub memory_gib: f64,
    pub kernel: String,
    /// 1-minute load average when the run started and ended (other work on the machine).
    pub load_start: f64,
    pub load_end: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Settings {
    pub write_concurrency: usize,
    pub kernels_per_cluster: usize,
    pub distinct_kernels: usize,
    pub apiserver: String,
    /// The measured binaries (`TARGET/…` when in the target directory).
    #[serde(default)]
    pub hub_bin: String,
    #[serde(default)]
    pub spoke_bin: String,
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Rate {
    pub count: usize,
    pub seconds: f64,
    pub per_second: f64,
}

impl Rate {
    pub fn of(count: usize, took: Duration) -> Self {
        let seconds = took.as_secs_f64();
        Self {
            count,
            seconds,
            per_second: if seconds > 0.0 {
                count as f64 / seconds
            } else {
                0.0
            },
        }
    }

    pub fn show(&self) -> String {
        format!(
            "{} in {:.2} s = {:.0}/s",
            self.count, self.seconds, self.per_second
        )
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Memory {
    /// Ready, before the MCM exists.
    pub idle_mib: f64,
    /// VmHWM (and the highest VmRSS sampled).
    pub peak_mib: f64,
    /// VmRSS at the end.
    pub after_mib: f64,
    /// The parts of `after_mib`: heap and stacks, and pages mapped from files.
    #[serde(default)]
    pub after_anon_mib: f64,
    #[serde(default)]
    pub after_file_mib: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Cpu {
    pub hub_s: f64,
    pub apiserver_s: f64,
    pub etcd_s: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FanOut {
    pub clusters: usize,
    pub works: usize,
    /// Namespaces, ManagedClusters and kernel claims (setup, not measured against anything).
    pub setup_s: f64,
    /// Hub process start until /readyz (caches of N clusters synced, lease held).
    pub hub_ready_s: f64,
    /// MCM applied → N-th ManifestWork written.
    pub hub: Rate,
    pub first_write_s: f64,
    /// First to last write.
    pub write_phase: Rate,
    pub create_before: Rate,
    pub create_after: Rate,
    pub apply_plain: Rate,
    /// The better of the two create rates.
    pub limit_per_second: f64,
    /// hub / limit.
    pub ratio: f64,
    /// hub / plain server-side apply.
    pub ratio_vs_apply: f64,
    pub registry_lookups: u64,
    pub registry_http_total: u64,
    pub registry_http: BTreeMap<String, u64>,
    /// The hub's own count of objects written, by kind.
    pub hub_writes: BTreeMap<String, u64>,
    /// Mutating requests the API server answered during the fan-out (every client).
    pub apiserver_writes: BTreeMap<String, u64>,
    pub reconciles: u64,
    /// CPU used during the fan-out window.
    pub cpu: Cpu,
    /// The baselines wrote exactly the hub's bodies (same spec and spec hash).
    pub identical_bodies: bool,
    pub memory: Memory,
    pub steady: Steady,
    pub resync: Resync,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Steady {
    pub cluster: String,
    /// Claim patch sent → the rewritten work seen on a watch.
    pub latency_ms: f64,
    pub total_writes: u64,
    pub hub_writes: BTreeMap<String, u64>,
    /// Mutating requests of everyone but the claim patch and lease renewals.
    pub apiserver_writes: BTreeMap<String, u64>,
    pub lease_renewals: u64,
    pub reconciles: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Resync {
    pub resync: String,
    pub restart_ready_s: f64,
    /// Writes of the restarted hub's start-up reconcile.
    pub restart_writes: u64,
    pub resyncs: u64,
    pub resync_writes: u64,
    /// Registry lookups (and HTTP requests) over all the resyncs.
    pub registry_lookups: u64,
    pub registry_http: u64,
    pub noop_reconcile_ms: f64,
    pub memory: Memory,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SpokeIdle {
    pub nodes: usize,
    pub modules: usize,
    pub loader_pods_running: usize,
    pub rss_mib: f64,
    pub peak_mib: f64,
    /// The parts of `rss_mib`: heap and stacks, and pages mapped from the binary and libraries.
    #[serde(default)]
    pub rss_anon_mib: f64,
    #[serde(default)]
    pub rss_file_mib: f64,
    /// Size of the binary on disk.
    #[serde(default)]
    pub binary_mib: f64,
    /// Seconds idle before the reading.
    pub idle_s: f64,
    /// CPU the agent used while idle.
    pub idle_cpu_s: f64,
    /// The agent's API writes while idle (`kmm_spoke_api_writes_total`).
    #[serde(default)]
    pub idle_writes: u64,
    /// Starting the spoke with its simulated nodes (setup, not measured against anything).
    #[serde(default)]
    pub fleet_start_s: f64,
    /// Modules applied → every module loaded on every node.
    #[serde(default)]
    pub converge_s: f64,
    /// One node's kernel change, when measured.
    #[serde(default)]
    pub change: Option<KernelChange>,
}

/// One simulated node reboots into another kernel (one the other nodes run, so the loader
/// DaemonSets for it exist): what the agent does about it, and how long the node is without
/// its modules.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct KernelChange {
    pub node: String,
    pub from: String,
    pub to: String,
    /// Kernel changed → the node's loader pods are all of the new kernel's DaemonSets and
    /// Ready (the old ones gone).
    pub replaced_ms: f64,
    /// → every module loaded again on the node (the node simulator's view).
    pub loaded_ms: f64,
    /// → every Module's ready label back on the node, confirmed in the new boot (its
    /// ready-boot annotation names the node's new boot ID).
    pub labelled_ms: f64,
    /// The agent's API writes for the change, by kind (`kmm_spoke_api_writes_total`), until
    /// it wrote nothing for a few seconds.
    pub writes: BTreeMap<String, u64>,
    pub total_writes: u64,
    /// Mutating requests of every client at the spoke's API server in the same window (the
    /// DaemonSet controller, the scheduler and the node simulator included).
    pub apiserver_writes: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Signing {
    pub runs: u64,
    pub sign_file: String,
    pub cases: Vec<SignCase>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SignCase {
    pub module: String,
    pub bytes: u64,
    pub key: String,
    pub sign_file_us: f64,
    pub kmm_hub_cli_us: f64,
    pub library_us: f64,
    pub library_with_key_load_us: f64,
    pub speedup_cli: f64,
    pub speedup_library: f64,
}

/// What upstream KMM-hub's design (a MIC per MCM × cluster, a pull pod per image per MIC,
/// builds per MIC) would create for the same fan-out, next to what we measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Upstream {
    pub clusters: usize,
    pub upstream_mics: u64,
    pub upstream_pull_pods: u64,
    pub upstream_image_pulls: u64,
    pub upstream_build_pods_if_unbuilt: u64,
    pub upstream_api_writes_min: u64,
    pub ours_pull_pods: u64,
    pub ours_registry_lookups: u64,
    pub ours_registry_http: u64,
    pub ours_build_jobs_if_unbuilt: u64,
    pub ours_api_writes: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Target {
    pub name: String,
    pub target: String,
    pub measured: String,
    pub met: Option<bool>,
}

/// End to end on the sandbox: the hub and spokes with OCM's real agents, the `kmm-hub` and
/// `kmm-spoke` binaries under their ServiceAccounts, simulated nodes (and a VM node with
/// `--e2e-vm`). Times in seconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EndToEnd {
    /// When this part ran (it can be run alone: `--skip-fanout --skip-spoke`).
    pub measured_at: String,
    pub spokes: usize,
    /// Simulated worker nodes per spoke, kernels round-robin from `kernels`.
    pub nodes_per_spoke: usize,
    pub kernels: Vec<String>,
    /// The kernel one node reboots into for the kernel change.
    pub new_kernel: String,
    /// Kernel of the real-kernel node on spoke-1 (`--e2e-vm`), and its VM's boot (qemu start
    /// to its agent's `ready`; over before the measurements start).
    #[serde(default)]
    pub vm_kernel: Option<String>,
    #[serde(default)]
    pub vm_boot_s: Option<f64>,
    /// Starting the sandbox (setup, not measured against anything).
    pub sandbox_start_s: f64,
    pub apply: E2eApply,
    /// One kernel change per spoke, in turn.
    pub change: Vec<Outcome<E2eChange>>,
}

/// An MCM applied on the hub until its module is loaded on every selected node.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct E2eApply {
    /// MCM applied → every selected cluster's ManifestWork seen on the hub.
    pub works_s: f64,
    /// → the Module seen on every spoke (applied by OCM's work agent).
    pub modules_s: f64,
    /// → the Module's ready label on every selected node, its module in the node's list.
    pub loaded_s: f64,
    /// The legs: hub (`works_s`), OCM delivery (`modules_s - works_s`), spoke (`loaded_s - modules_s`).
    pub hub_s: f64,
    pub ocm_s: f64,
    pub spoke_s: f64,
    /// Selected nodes over all spokes.
    pub nodes: usize,
    pub clusters: Vec<E2eCluster>,
    /// Real-kernel node → MCM applied → loaded there.
    #[serde(default)]
    pub vm_loaded_s: BTreeMap<String, f64>,
    /// MCM applied → loaded on the last simulated node.
    #[serde(default)]
    pub simulated_loaded_s: f64,
}

/// One spoke's times in the MCM apply, from the apply.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct E2eCluster {
    pub name: String,
    pub work_s: f64,
    pub module_s: f64,
    pub loaded_s: f64,
    pub nodes: usize,
}

/// One node reboots into a kernel its spoke did not run: the claim, the hub's new work, its
/// delivery and the load. Cumulative times from the reboot, then each leg.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct E2eChange {
    pub cluster: String,
    pub node: String,
    pub from: String,
    pub to: String,
    /// → the spoke's kernel ClusterClaim lists the new kernel.
    pub claim_spoke_s: f64,
    /// → the ManagedCluster's claim on the hub does (OCM registration agent).
    pub claim_hub_s: f64,
    /// → the cluster's ManifestWork maps it.
    pub work_s: f64,
    /// → the Module on the spoke maps it (OCM work agent).
    pub module_s: f64,
    /// → the module loaded on the node and its ready label there.
    pub loaded_s: f64,
    /// Legs: spoke agent, OCM registration, hub, OCM delivery, spoke (load).
    pub spoke_agent_s: f64,
    pub registration_s: f64,
    pub hub_s: f64,
    pub ocm_s: f64,
    pub spoke_s: f64,
}
