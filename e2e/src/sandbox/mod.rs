//! The sandbox: the test world's hub and two spokes with a mix of kernels and a Secure Boot
//! node, kmm-fleet installed from manifests/ (RBAC, webhook, configuration), the real
//! `kmm-hub` and `kmm-spoke` binaries running under their ServiceAccounts, and the KMM labs
//! applied as ManagedClusterModules. `kmm-sandbox` shows it to people; the scenario suite
//! (`e2e/tests/scenarios/`) drives the same thing through faults and bad input.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use kmm_e2e::sandbox::{Sandbox, SandboxOptions, progress::Progress};
//! let progress = Progress::plain(8);
//! let sandbox = Sandbox::start(SandboxOptions::default(), &progress).await?;
//! sandbox.apply_labs(&progress).await?;
//! sandbox.wait_converged(std::time::Duration::from_secs(600), &progress).await?;
//! sandbox.stop().await;
//! # Ok(()) }
//! ```

pub mod agents;
pub mod converge;
mod inputs;
pub mod install;
pub mod progress;
pub mod upgrade;
pub mod world;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use kube::Client;
use serde_json::Value;

use crate::fleet::{Fleet, spoke_name};
use crate::labs::{self, ClusterNodes, LAB_NAMESPACE, Lab};
use crate::sim::SimNode;
use agents::Agent;
use converge::{LabVerdict, Observation};
use install::HUB_NAMESPACE;
use progress::Progress;
pub use world::{SigningKeys, topology};

/// How long an agent may take to become ready.
const AGENT_READY: Duration = Duration::from_secs(90);

/// What to start.
#[derive(Debug, Clone)]
pub struct SandboxOptions {
    /// Fleet directory (kept); a temporary one when `None`.
    pub dir: Option<PathBuf>,
    /// Labs to apply by name; all when empty.
    pub labs: Vec<String>,
    /// The hub's resync period.
    pub hub_resync: Duration,
    /// Prebuilt binaries; found next to the running executable (and built) otherwise.
    pub hub_bin: Option<PathBuf>,
    pub spoke_bin: Option<PathBuf>,
    /// The nodes of each spoke, one list per spoke (`spoke-1` first); the sandbox's mixed
    /// topology ([`topology`]: two spokes, two kernels, Secure Boot and real-kernel nodes)
    /// when `None`.
    pub nodes: Option<Vec<Vec<SimNode>>>,
}

impl Default for SandboxOptions {
    fn default() -> Self {
        Self {
            dir: None,
            labs: Vec::new(),
            hub_resync: Duration::from_secs(30),
            hub_bin: None,
            spoke_bin: None,
            nodes: None,
        }
    }
}

/// A running sandbox.
pub struct Sandbox {
    fleet: Fleet,
    pub hub: Agent,
    /// The spoke agents, index 0 = spoke-1.
    pub spokes: Vec<Agent>,
    pub keys: SigningKeys,
    pub dashboard_url: String,
    pub dashboard_token: String,
    pub webhook: SocketAddr,
    pub kubeconfig: PathBuf,
    labs: Vec<Lab>,
    nodes: Vec<Vec<SimNode>>,
    started_in: Duration,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("dir", &self.fleet.dir())
            .finish_non_exhaustive()
    }
}

impl Sandbox {
    /// Start everything up to (not including) the labs. Six steps of `progress`.
    pub async fn start(opts: SandboxOptions, progress: &Progress) -> anyhow::Result<Self> {
        let t0 = Instant::now();
        let known: Vec<&str> = labs::labs("registry").iter().map(|l| l.name).collect();
        for want in &opts.labs {
            if !known.contains(&want.as_str()) {
                bail!("no lab {want:?}; the labs are: {}", known.join(", "));
            }
        }
        let scratch = tempfile::Builder::new()
            .prefix("kmm-sandbox-")
            .tempdir()
            .context("creating a scratch directory")?;

        let step = progress.step("kmm-hub and kmm-spoke binaries (built with cargo when needed)");
        let build_log = scratch.path().join("cargo-build.log");
        let (hub_bin, spoke_bin) =
            match agents::locate_binaries(opts.hub_bin.clone(), opts.spoke_bin.clone(), &build_log)
                .await
            {
                Ok(b) => b,
                Err(e) => {
                    step.failed(format!("{e:#}"));
                    return Err(e);
                }
            };
        step.done(format!(
            "{}",
            hub_bin.parent().unwrap_or(Path::new("")).display()
        ));

        let step = progress.step("Making the module signing key (openssl)");
        let keys = SigningKeys::generate(&scratch.path().join("keys"), "kmm-sandbox-signing")?;
        step.done("RSA 2048, enrolled on the Secure Boot node");

        let nodes = opts
            .nodes
            .clone()
            .unwrap_or_else(|| topology(&keys.cert_der));
        let real = nodes.iter().flatten().any(|n| n.real_kernel);
        let step = progress.step(&format!(
            "Starting the fleet: hub + {} spokes (Kubernetes and OCM from their Go modules), registry, simulated{} nodes",
            nodes.len(),
            if real { " and real-kernel" } else { "" }
        ));
        let mut builder = Fleet::builder().spokes(nodes.len()).registry_auth(true);
        for (i, ns) in nodes.iter().enumerate() {
            builder = builder.spoke_nodes(i + 1, ns.clone());
        }
        if let Some(d) = &opts.dir {
            builder = builder.dir(d);
        }
        let fleet = match builder.start().await {
            Ok(f) => f,
            Err(e) => {
                step.failed(format!("{e:#}"));
                return Err(e);
            }
        };
        step.done(format!("{}", fleet.dir().display()));
        let dir = fleet.dir().join("sandbox");
        std::fs::create_dir_all(dir.join("logs"))?;
        // Keep the key material and the build log with the rest of the fleet's files.
        let keys = SigningKeys {
            key_pem_path: copy_into(&keys.key_pem_path, &dir)?,
            cert_pem_path: copy_into(&keys.cert_pem_path, &dir)?,
            ..keys
        };
        let _ = std::fs::copy(&build_log, dir.join("logs").join("cargo-build.log"));

        match install_and_run(&fleet, &dir, &opts, &hub_bin, &spoke_bin, progress).await {
            Ok(parts) => {
                let all = labs::labs(&fleet.registry().host());
                let labs: Vec<Lab> = if opts.labs.is_empty() {
                    all
                } else {
                    all.into_iter()
                        .filter(|l| opts.labs.iter().any(|w| w == l.name))
                        .collect()
                };
                Ok(Self {
                    hub: parts.hub,
                    spokes: parts.spokes,
                    keys,
                    dashboard_url: parts.dashboard_url,
                    dashboard_token: parts.dashboard_token,
                    webhook: parts.webhook,
                    kubeconfig: parts.kubeconfig,
                    labs,
                    nodes,
                    started_in: t0.elapsed(),
                    fleet,
                })
            }
            Err(e) => {
                fleet.stop().await;
                Err(e)
            }
        }
    }

    pub fn fleet(&self) -> &Fleet {
        &self.fleet
    }

    pub fn fleet_mut(&mut self) -> &mut Fleet {
        &mut self.fleet
    }

    pub fn labs(&self) -> &[Lab] {
        &self.labs
    }

    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    /// The sandbox's own files (logs, kubeconfigs, keys) under the fleet directory.
    pub fn dir(&self) -> PathBuf {
        self.fleet.dir().join("sandbox")
    }

    pub fn registry_host(&self) -> String {
        self.fleet.registry().host()
    }

    /// The spoke agent of spoke `n` (1-based).
    pub fn spoke_agent_mut(&mut self, n: usize) -> &mut Agent {
        &mut self.spokes[n - 1]
    }

    /// The clusters as the labs see them: ManagedCluster labels (`name=<spoke>`) and nodes.
    pub fn clusters(&self) -> Vec<ClusterNodes> {
        self.nodes
            .iter()
            .enumerate()
            .map(|(i, nodes)| ClusterNodes {
                name: spoke_name(i + 1),
                labels: BTreeMap::from([("name".to_string(), spoke_name(i + 1))]),
                nodes: nodes.clone(),
            })
            .collect()
    }

    /// `(cluster, node)` pairs `mcm` targets in this fleet.
    pub fn targets(&self, mcm: &Value) -> Vec<(String, String)> {
        labs::targeted_nodes(mcm, &self.clusters())
    }

    /// `(name, admin client)` of every spoke.
    pub async fn spoke_clients(&self) -> Vec<(String, Client)> {
        let mut out = Vec::new();
        for s in self.fleet.spokes() {
            out.push((s.name().to_string(), s.client().await));
        }
        out
    }

    pub async fn hub_client(&self) -> Client {
        self.fleet.hub().client().await
    }

    /// What the labs need besides their MCMs: on the hub the pull secret, the Dockerfile
    /// ConfigMaps and the signing secrets in the hub's namespace; in the registry the prebuilt
    /// images and the device plugin. Nothing on the spokes: each lab's ManifestWork carries
    /// the labs' namespace, ServiceAccount and pull-secret copy (`spokePrerequisites`).
    /// Idempotent.
    /// Apply every lab's MCM on the hub (through the admission webhook). Two steps.
    pub async fn apply_labs(&self, progress: &Progress) -> anyhow::Result<()> {
        let step =
            progress.step("Preparing the labs' inputs (secrets, Dockerfiles, prebuilt images)");
        let n = self.prepare_lab_inputs().await?;
        step.done(format!("{n} objects and images"));
        let step = progress.step(&format!(
            "Applying {} labs as ManagedClusterModules",
            self.labs.len()
        ));
        let hub = self.hub_client().await;
        for lab in &self.labs {
            step.message(lab.name);
            apply_mcm(&hub, &lab.mcm).await?;
        }
        step.done(
            self.labs
                .iter()
                .map(|l| l.name)
                .collect::<Vec<_>>()
                .join(", "),
        );
        Ok(())
    }

    /// Read nodes and MCMs now.
    pub async fn observe(&self) -> anyhow::Result<Observation> {
        converge::observe(&self.hub_client().await, &self.spoke_clients().await).await
    }

    /// The verdict on every lab for `obs`.
    pub fn verdicts(&self, obs: &Observation) -> Vec<LabVerdict> {
        self.labs
            .iter()
            .map(|l| converge::evaluate(l, &self.targets(&l.mcm), obs))
            .collect()
    }

    /// Wait until every lab has converged, with a bar per lab (one step). On timeout the
    /// error explains every lab that did not converge.
    pub async fn wait_converged(
        &self,
        timeout: Duration,
        progress: &Progress,
    ) -> anyhow::Result<Observation> {
        let step = progress.step("Waiting for every lab to converge");
        let bars: Vec<_> = self
            .labs
            .iter()
            .map(|l| progress.bar(l.name, self.targets(&l.mcm).len() as u64))
            .collect();
        let started = Instant::now();
        let mut last_report = Instant::now();
        let mut reported: BTreeMap<String, bool> = BTreeMap::new();
        loop {
            let obs = self.observe().await;
            let (obs, verdicts) = match obs {
                Ok(o) => {
                    let v = self.verdicts(&o);
                    (o, v)
                }
                Err(e) if started.elapsed() > timeout => {
                    step.failed(format!("{e:#}"));
                    bail!("cannot read the fleet after {timeout:?}: {e:#}");
                }
                Err(e) => {
                    step.message(format!("reading the fleet: {e:#}"));
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            for (bar, v) in bars.iter().zip(&verdicts) {
                bar.set_position(v.nodes_done as u64);
                bar.set_message(if v.converged {
                    "✓ converged".to_string()
                } else {
                    v.summary.clone()
                });
                if v.converged && !reported.get(&v.name).copied().unwrap_or(false) {
                    reported.insert(v.name.clone(), true);
                    if !progress.interactive() {
                        progress.println(format!(
                            "lab {} converged ({}/{} nodes) after {:.1?}",
                            v.name,
                            v.nodes_done,
                            v.nodes_targeted,
                            started.elapsed()
                        ));
                    }
                }
            }
            let done = verdicts.iter().filter(|v| v.converged).count();
            if done == verdicts.len() {
                for b in &bars {
                    b.finish();
                }
                step.done(format!("{done} labs converged"));
                return Ok(obs);
            }
            if !progress.interactive() && last_report.elapsed() > Duration::from_secs(30) {
                last_report = Instant::now();
                progress.println(format!(
                    "{done}/{} labs converged; waiting for {}",
                    verdicts.len(),
                    verdicts
                        .iter()
                        .filter(|v| !v.converged)
                        .map(|v| format!("{} ({})", v.name, v.summary))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            if started.elapsed() > timeout {
                for b in &bars {
                    b.abandon();
                }
                step.failed(format!(
                    "{done}/{} labs converged within {timeout:?}",
                    verdicts.len()
                ));
                let spokes = self.spoke_clients().await;
                let mut report = String::new();
                for v in verdicts.iter().filter(|v| !v.converged) {
                    report.push_str(&converge::explain(v, LAB_NAMESPACE, &obs, &spokes).await);
                }
                report.push_str("\nNodes:\n");
                report.push_str(&converge::node_table(&obs, LAB_NAMESPACE));
                bail!(
                    "not converged after {timeout:?}:\n{report}\nlogs: {}",
                    self.dir().join("logs").display()
                );
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// The node table, the dashboard and how to explore.
    pub fn summary(&self, obs: &Observation) -> String {
        let mut s = String::new();
        use std::fmt::Write as _;
        let _ = writeln!(s, "{}", converge::node_table(obs, LAB_NAMESPACE));
        let rows: Vec<[String; 3]> = self
            .labs
            .iter()
            .map(|l| {
                let st = obs
                    .mcms
                    .get(l.name)
                    .and_then(|m| converge::condition(m, "Ready"));
                [
                    l.name.to_string(),
                    st.map(|(s, r, _)| format!("Ready={s} ({r})"))
                        .unwrap_or_else(|| "-".into()),
                    l.title.to_string(),
                ]
            })
            .collect();
        let _ = writeln!(s, "{}", converge::table(&["MCM", "STATUS", "LAB"], &rows));
        let _ = writeln!(s, "Dashboard  {}", self.dashboard_url);
        let _ = writeln!(
            s,
            "  token    {} (also in {})",
            self.dashboard_token,
            self.dir().join("dashboard-token").display()
        );
        let _ = writeln!(
            s,
            "kubectl    export KUBECONFIG={}",
            self.kubeconfig.display()
        );
        let _ = writeln!(
            s,
            "           kubectl --context hub get managedclustermodules; kubectl --context spoke-1 get nodes -L {}",
            labs::SECURE_BOOT_LABEL
        );
        let _ = writeln!(
            s,
            "Registry   {} (user {}, password in {})",
            self.registry_host(),
            self.fleet
                .registry()
                .credentials()
                .map(|(u, _)| u)
                .unwrap_or("-"),
            self.fleet.dir().join("fleet.env").display()
        );
        let _ = writeln!(
            s,
            "Metrics    http://{}/metrics (kmm-hub){}",
            self.hub.admin,
            self.spokes
                .iter()
                .map(|a| format!(", http://{}/metrics ({})", a.admin, a.name))
                .collect::<String>()
        );
        let _ = writeln!(s, "Logs       {}", self.dir().join("logs").display());
        for cluster in self.fleet.spokes() {
            for (node, vm) in self.fleet.node_sim(cluster.name()).vms() {
                let _ = writeln!(
                    s,
                    "VM         {node}: kernel {}{}, booted in {:.1}s, qemu RSS {} MiB, console {}",
                    vm.release(),
                    if vm.secure_boot() {
                        " (UEFI Secure Boot, locked down)"
                    } else {
                        ""
                    },
                    vm.boot_time().as_secs_f32(),
                    vm.rss_bytes().unwrap_or(0) >> 20,
                    vm.console_log().display()
                );
            }
        }
        s
    }

    /// Stop the agents, then the fleet.
    pub async fn stop(mut self) {
        self.hub.stop().await;
        for a in &mut self.spokes {
            a.stop().await;
        }
        self.fleet.stop().await;
    }

    /// Like [`Sandbox::stop`], printing the fleet's dump first (for failing tests).
    pub async fn dump(&self) -> String {
        let mut s = self.fleet.dump().await;
        s.push_str("\n==== kmm-hub log (last 60 lines)\n");
        s.push_str(&self.hub.log_tail(60));
        for a in &self.spokes {
            s.push_str(&format!("\n==== {} log (last 40 lines)\n", a.name));
            s.push_str(&a.log_tail(40));
        }
        s
    }
}

/// What [`install_and_run`] started.
struct Parts {
    hub: Agent,
    spokes: Vec<Agent>,
    dashboard_url: String,
    dashboard_token: String,
    webhook: SocketAddr,
    kubeconfig: PathBuf,
}

/// Install kmm-fleet from manifests/ and start the agents (two steps of `progress`).
async fn install_and_run(
    fleet: &Fleet,
    dir: &Path,
    opts: &SandboxOptions,
    hub_bin: &Path,
    spoke_bin: &Path,
    progress: &Progress,
) -> anyhow::Result<Parts> {
    let step = progress.step(
        "Installing kmm-fleet from manifests/ (hub namespace, RBAC, webhook; the spoke agent's objects through manifests/policy and OCM's policy framework)",
    );
    let hub_client = fleet.hub().client().await;
    let mut objects = install::install_hub_rbac(&hub_client).await?;
    if fleet.ocm_hub().is_some() {
        let mut spokes = Vec::new();
        for s in fleet.spokes() {
            spokes.push((s.name().to_string(), s.client().await));
        }
        objects +=
            install::roll_out_spoke_policy(&hub_client, &spokes, Duration::from_secs(180)).await?;
    } else {
        // No OCM in this fleet (a bare one): the spoke manifests, applied directly.
        for s in fleet.spokes() {
            objects += install::install_spoke_rbac(&s.client().await).await?;
        }
    }
    let hub_token = fleet
        .hub()
        .service_account_token(HUB_NAMESPACE, install::HUB_SERVICE_ACCOUNT)
        .await?;
    let hub_kubeconfig = dir.join("kmm-hub.kubeconfig");
    install::token_kubeconfig(fleet.hub(), &hub_token, &hub_kubeconfig)?;
    let mut spoke_kubeconfigs = Vec::new();
    for s in fleet.spokes() {
        let token = s
            .service_account_token(install::SPOKE_NAMESPACE, install::SPOKE_SERVICE_ACCOUNT)
            .await?;
        let path = dir.join(format!("kmm-spoke-{}.kubeconfig", s.name()));
        install::token_kubeconfig(s, &token, &path)?;
        spoke_kubeconfigs.push(path);
    }
    // `kubectl create token kmm-dashboard-viewer --audience kmm-fleet-dashboard`: the
    // dashboard takes only tokens issued for its audience.
    let dashboard_token = fleet
        .hub()
        .service_account_token_for(
            HUB_NAMESPACE,
            install::VIEWER_SERVICE_ACCOUNT,
            Some(kmm_hub::dashboard::auth::DEFAULT_AUDIENCE),
        )
        .await?;
    install::write_private(
        &dir.join("dashboard-token"),
        &format!("{dashboard_token}\n"),
    )?;
    let config = dir.join("kmm-hub-config.yaml");
    std::fs::write(&config, install::hub_config()?)?;
    let ca = crate::pki::Ca::new("kmm-sandbox-webhook-ca")?;
    let serving = ca.serving_cert("kmm-hub-webhook", &["127.0.0.1", "localhost"])?;
    let (cert, key) = (dir.join("webhook.crt"), dir.join("webhook.key"));
    std::fs::write(&cert, &serving.cert_pem)?;
    install::write_private(&key, &serving.key_pem)?;
    let kubeconfig = fleet.dir().join("kubeconfig");
    install::merged_kubeconfig(fleet.clusters(), &kubeconfig)?;
    step.done(format!(
        "{objects} objects; ServiceAccount tokens for kmm-hub, kmm-spoke, dashboard-viewer"
    ));

    let step = progress.step("Starting kmm-hub and the kmm-spoke agents (real binaries)");
    let webhook: SocketAddr = format!("127.0.0.1:{}", crate::process::free_port()?).parse()?;
    let dashboard: SocketAddr = format!("127.0.0.1:{}", crate::process::free_port()?).parse()?;
    let mut hub = Agent::hub(
        hub_bin,
        &hub_kubeconfig,
        &config,
        webhook,
        (&cert, &key),
        dashboard,
        opts.hub_resync,
        dir.join("logs").join("kmm-hub.log"),
    )?;
    let mut spokes = Vec::new();
    for (s, kc) in fleet.spokes().iter().zip(&spoke_kubeconfigs) {
        spokes.push(Agent::spoke(
            spoke_bin,
            s.name(),
            kc,
            dir.join("logs").join(format!("kmm-spoke-{}.log", s.name())),
        )?);
    }
    let (h, s) = tokio::join!(
        hub.start(AGENT_READY),
        futures::future::join_all(spokes.iter_mut().map(|a| a.start(AGENT_READY)))
    );
    if let Err(e) = h.and_then(|()| s.into_iter().collect::<anyhow::Result<Vec<()>>>()) {
        step.failed(format!("{e:#}"));
        return Err(e);
    }
    install::register_webhook(&hub_client, &format!("https://{webhook}"), ca.cert_pem()).await?;
    step.done(format!(
        "hub pid {}, spoke agents pids {}",
        hub.pid().unwrap_or_default(),
        spokes
            .iter()
            .map(|a| a.pid().unwrap_or_default().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    ));
    Ok(Parts {
        hub,
        spokes,
        dashboard_url: format!("http://{dashboard}/"),
        dashboard_token,
        webhook,
        kubeconfig,
    })
}

fn copy_into(file: &Path, dir: &Path) -> anyhow::Result<PathBuf> {
    let to = dir.join(file.file_name().context("file without a name")?);
    std::fs::copy(file, &to).with_context(|| format!("copying {}", file.display()))?;
    Ok(to)
}

/// Server-side apply of an MCM on the hub, retrying while the webhook is not reachable
/// yet (a refusal by the webhook is returned at once).
pub async fn apply_mcm(hub: &Client, mcm: &Value) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match install::apply(hub, mcm).await {
            Ok(()) => return Ok(()),
            Err(e) => {
                let text = format!("{e:#}");
                let unreachable =
                    text.contains("failed calling webhook") && !text.contains("denied");
                if !unreachable || Instant::now() > deadline {
                    return Err(e);
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}
