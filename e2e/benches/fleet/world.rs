//! The hub-only test world of the fan-out runs: a fresh fleet per size (no spokes, no
//! simulators), the prebuilt kmod images, N ManagedClusters with kernel claims written the
//! way the OCM registration agent writes them, and the `kmm-hub` binary as its own process.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kmm_e2e::fleet::Fleet;
use kmm_e2e::oci::{KmodImage, docker_config_json, push_kmod_image};
use kmm_e2e::process::{ManagedProcess, free_port, http_get};
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt as _};
use serde_json::json;
use shared_api::ocm::{KERNEL_VERSIONS_CLAIM, ManagedClusterSpec};
use shared_api::{ManagedCluster, ManagedClusterModule};

use crate::proxy::CountingProxy;

pub const HUB_NS: &str = "kmm-hub";
pub const MCM: &str = "kmm-bench";
pub const SPOKE_NS: &str = "kmm-bench";
pub const PULL_SECRET: &str = "registry-pull";
pub const MODULE: &str = "kmm_bench";
pub const KERNELS_PER_CLUSTER: usize = 3;
/// Label every benchmark cluster carries; the MCM selects it.
pub const CLUSTER_LABEL: (&str, &str) = ("kmm-bench", "fleet");
/// Concurrency of the setup writes (namespaces, clusters, claims).
const SETUP_CONCURRENCY: usize = 64;

/// The 20 distinct kernels of the fleet.
pub fn kernels() -> Vec<String> {
    (0..10)
        .map(|i| format!("5.14.0-{}.el9_{}.x86_64", 284 + 11 * i, 2 + i % 3))
        .chain((10..20).map(|i| format!("6.1.0-{i}-amd64")))
        .collect()
}

/// Cluster `i`'s three kernels (offsets 0, 7, 13 of 20: distinct, and all 20 are used).
pub fn kernels_of(i: usize, all: &[String]) -> Vec<String> {
    let mut ks: Vec<String> = [0, 7, 13]
        .iter()
        .map(|o| all[(i + o) % all.len()].clone())
        .collect();
    ks.sort();
    ks
}

pub fn cluster_name(i: usize) -> String {
    format!("cluster-{i:05}")
}

pub fn claim_status(kernels: &[String]) -> serde_json::Value {
    json!({"status": {"clusterClaims": [{"name": KERNEL_VERSIONS_CLAIM, "value": kernels.join("\n")}]}})
}

/// A fresh hub fleet with the images pushed (through the counting proxy's address).
pub struct HubWorld {
    pub fleet: Fleet,
    pub client: Client,
    pub proxy: CountingProxy,
    /// Kernel → manifest digest of its image.
    pub digests: BTreeMap<String, String>,
    pub kernels: Vec<String>,
    kcm_pid: Option<u32>,
}

impl HubWorld {
    pub async fn start() -> anyhow::Result<Self> {
        let fleet = Fleet::builder()
            .spokes(0)
            .simulators(false)
            .hub_build_node(false)
            .registry_auth(true)
            .start()
            .await?;
        // kube-controller-manager would spend minutes making a ServiceAccount and a token
        // Secret for every cluster namespace at its default 20 QPS: setup noise that a real
        // hub finished long ago. Nothing in these runs needs it, so it is paused meanwhile.
        let kcm_pid = fleet
            .pids()
            .into_iter()
            .find(|(c, comp, _)| c == "hub" && *comp == "kube-controller-manager")
            .map(|(_, _, pid)| pid);
        if let Some(pid) = kcm_pid {
            kmm_e2e::process::signal(pid, libc::SIGSTOP);
        }
        let client = fleet.hub().client().await;
        let proxy = CountingProxy::start(fleet.registry().host()).await?;
        let kernels = kernels();
        let access = fleet.registry().access();
        let registry = fleet.registry().host();
        let digests: BTreeMap<String, String> = futures::stream::iter(kernels.clone())
            .map(|k| {
                let access = access.clone();
                let reference = format!("{registry}/bench/kmod:{k}");
                async move {
                    let d = push_kmod_image(&access, &reference, &KmodImage::new(&[&k], &[MODULE]))
                        .await
                        .with_context(|| format!("pushing {reference}"))?;
                    anyhow::Ok((k, d))
                }
            })
            .buffer_unordered(4)
            .try_collect()
            .await?;
        let world = Self {
            fleet,
            client,
            proxy,
            digests,
            kernels,
            kcm_pid,
        };
        world.prepare_operator_namespace().await?;
        Ok(world)
    }

    /// The operator namespace with a pull secret for the proxy's address.
    async fn prepare_operator_namespace(&self) -> anyhow::Result<()> {
        kmm_e2e::testkit::ensure_namespace(&self.client, HUB_NS).await?;
        let (user, password) = self
            .fleet
            .registry()
            .credentials()
            .context("the bench registry has authentication")?;
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(PULL_SECRET.into()),
                namespace: Some(HUB_NS.into()),
                ..Default::default()
            },
            type_: Some("kubernetes.io/dockerconfigjson".into()),
            string_data: Some(BTreeMap::from([(
                ".dockerconfigjson".to_string(),
                docker_config_json(&self.proxy.host, user, password),
            )])),
            ..Default::default()
        };
        Api::<Secret>::namespaced(self.client.clone(), HUB_NS)
            .create(&PostParams::default(), &secret)
            .await?;
        Ok(())
    }

    /// The image of a kernel as the MCM names it (through the proxy).
    pub fn image(&self, kernel: &str) -> String {
        format!("{}/bench/kmod:{kernel}", self.proxy.host)
    }

    /// Namespace, ManagedCluster and kernel claim (status subresource) of clusters `0..n`.
    pub async fn create_clusters(&self, n: usize) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let client = &self.client;
        let kernels = &self.kernels;
        futures::stream::iter(0..n)
            .map(|i| async move {
                let name = cluster_name(i);
                let ns = Namespace {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        ..Default::default()
                    },
                    ..Default::default()
                };
                Api::<Namespace>::all(client.clone())
                    .create(&PostParams::default(), &ns)
                    .await?;
                let mut mc = ManagedCluster::new(
                    &name,
                    ManagedClusterSpec {
                        hub_accepts_client: true,
                        ..Default::default()
                    },
                );
                mc.metadata.labels = Some(BTreeMap::from([
                    ("name".to_string(), name.clone()),
                    (CLUSTER_LABEL.0.to_string(), CLUSTER_LABEL.1.to_string()),
                ]));
                let api = Api::<ManagedCluster>::all(client.clone());
                api.create(&PostParams::default(), &mc).await?;
                api.patch_status(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(claim_status(&kernels_of(i, kernels))),
                )
                .await?;
                anyhow::Ok(())
            })
            .buffer_unordered(SETUP_CONCURRENCY)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(started.elapsed())
    }

    /// The benchmark's ManagedClusterModule: every cluster, one regexp mapping to the
    /// per-kernel prebuilt image, pulled with the operator namespace's secret.
    pub fn mcm(&self) -> anyhow::Result<ManagedClusterModule> {
        Ok(serde_json::from_value(json!({
            "apiVersion": "hub.kmm.sigs.x-k8s.io/v1beta1", "kind": "ManagedClusterModule",
            "metadata": {"name": MCM},
            "spec": {
                "spokeNamespace": SPOKE_NS,
                "selector": {CLUSTER_LABEL.0: CLUSTER_LABEL.1},
                "moduleSpec": {
                    "selector": {"node-role.kubernetes.io/worker": ""},
                    "imageRepoSecret": {"name": PULL_SECRET},
                    "moduleLoader": {"container": {
                        "modprobe": {"moduleName": MODULE},
                        "kernelMappings": [{"regexp": "^.*$",
                            "containerImage": format!("{}/bench/kmod:${{KERNEL_FULL_VERSION}}", self.proxy.host)}]
                    }}
                }
            }
        }))?)
    }

    pub async fn apply_mcm(&self) -> anyhow::Result<()> {
        let m = self.mcm()?;
        Api::<ManagedClusterModule>::all(self.client.clone())
            .patch(
                &m.name_any(),
                &PatchParams::apply("kmm-bench").force(),
                &Patch::Apply(&m),
            )
            .await?;
        Ok(())
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.fleet.hub().kubeconfig_path()
    }

    pub fn apiserver_pid(&self) -> Option<u32> {
        self.fleet
            .pids()
            .into_iter()
            .find(|(c, comp, _)| c == "hub" && *comp == "kube-apiserver")
            .map(|(_, _, pid)| pid)
    }

    pub fn etcd_pid(&self) -> Option<u32> {
        self.fleet
            .pids()
            .into_iter()
            .find(|(_, comp, _)| *comp == "etcd")
            .map(|(_, _, pid)| pid)
    }

    pub async fn stop(self) {
        if let Some(pid) = self.kcm_pid {
            kmm_e2e::process::signal(pid, libc::SIGCONT);
        }
        self.fleet.stop().await;
    }
}

/// Fields of /proc/PID/status in MiB (0 when missing).
fn status_mib<const N: usize>(pid: u32, names: [&str; N]) -> [f64; N] {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    names.map(|name| {
        status
            .lines()
            .find(|l| l.split(':').next() == Some(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map_or(0.0, |kib| kib / 1024.0)
    })
}

/// Resident memory of a process: `(VmRSS, VmHWM)` in MiB.
pub fn memory_mib(pid: u32) -> (f64, f64) {
    let [rss, hwm] = status_mib(pid, ["VmRSS", "VmHWM"]);
    (rss, hwm)
}

/// The two parts of a process's resident memory in MiB: `(RssAnon, RssFile)`, i.e. heap
/// and stacks, and the pages of the binary and libraries mapped from files.
pub fn rss_parts_mib(pid: u32) -> (f64, f64) {
    let [anon, file] = status_mib(pid, ["RssAnon", "RssFile"]);
    (anon, file)
}

/// CPU time (user + system) a process has used, from /proc/PID/stat.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // After the command: state is field 3, utime 14 and stime 15 (1-based), i.e. 11 and 12 here.
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / clock_ticks()
}

fn clock_ticks() -> f64 {
    // sysconf(_SC_CLK_TCK) is 100 on every Linux we run on.
    100.0
}

/// The `kmm-hub` binary running as its own process (so its memory is its own).
pub struct HubBin {
    process: ManagedProcess,
    pub admin: String,
}

impl HubBin {
    /// Start `kmm-hub run` and wait until /readyz answers 200; returns the time that took.
    pub async fn start(
        bin: &Path,
        kubeconfig: &Path,
        resync: &str,
        write_concurrency: usize,
        log: &Path,
    ) -> anyhow::Result<(Self, Duration)> {
        let admin = format!("127.0.0.1:{}", free_port()?);
        let args: Vec<String> = vec![
            "run".into(),
            format!("--kubeconfig={}", kubeconfig.display()),
            format!("--operator-namespace={HUB_NS}"),
            format!("--admin-address={admin}"),
            format!("--resync={resync}"),
            format!("--write-concurrency={write_concurrency}"),
            "--log-filter=warn".into(),
        ];
        let started = Instant::now();
        let mut process = ManagedProcess::spawn("kmm-hub", bin, &args, log)?;
        let hub = loop {
            if let Ok((200, _)) = http_get(&admin, "/readyz").await {
                break Self { process, admin };
            }
            if let Some(status) = process.exited() {
                bail!("kmm-hub exited ({status}): {}", process.log_tail(20));
            }
            if started.elapsed() > Duration::from_secs(180) {
                bail!("kmm-hub not ready after 180 s: {}", process.log_tail(20));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        Ok((hub, started.elapsed()))
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub async fn metrics(&self) -> anyhow::Result<Samples> {
        let (status, text) = http_get(&self.admin, "/metrics").await?;
        if status != 200 {
            bail!("hub /metrics answered {status}");
        }
        Ok(Samples::parse(&text))
    }

    pub fn exited(&mut self) -> bool {
        self.process.exited().is_some()
    }

    pub fn log_tail(&self) -> String {
        self.process.log_tail(30)
    }

    pub async fn stop(mut self) {
        self.process.stop(Duration::from_secs(10)).await;
    }
}

/// One Prometheus text exposition: `name{labels}` → value.
#[derive(Debug, Clone, Default)]
pub struct Samples(pub BTreeMap<String, f64>);

impl Samples {
    pub fn parse(text: &str) -> Self {
        Self(
            text.lines()
                .filter(|l| !l.starts_with('#') && !l.is_empty())
                .filter_map(|l| {
                    let (series, value) = l.rsplit_once(' ')?;
                    Some((series.to_string(), value.parse().ok()?))
                })
                .collect(),
        )
    }

    pub fn get(&self, series: &str) -> f64 {
        self.0.get(series).copied().unwrap_or(0.0)
    }

    /// Every series of one metric name, by its labels text.
    pub fn family(&self, name: &str) -> BTreeMap<String, f64> {
        self.0
            .iter()
            .filter_map(|(k, v)| {
                let rest = k.strip_prefix(name)?;
                (rest.is_empty() || rest.starts_with('{')).then(|| (rest.to_string(), *v))
            })
            .collect()
    }

    pub fn works_written(&self) -> f64 {
        self.get("kmm_hub_objects_written_total{kind=\"ManifestWork\"}")
    }

    /// Objects written by kind (`ManifestWork`, `ManagedClusterModuleStatus`, …).
    pub fn writes_by_kind(&self) -> BTreeMap<String, f64> {
        self.family("kmm_hub_objects_written_total")
            .into_iter()
            .map(|(labels, v)| (label(&labels, "kind").unwrap_or(labels), v))
            .collect()
    }

    pub fn ok_reconciles(&self) -> f64 {
        self.get("kmm_hub_reconcile_total{controller=\"mcm\"}")
    }

    pub fn registry_lookups(&self) -> f64 {
        self.get("kmm_hub_registry_lookups_total")
    }
}

/// The value of one label in a `{a="x",b="y"}` text.
pub fn label(labels: &str, key: &str) -> Option<String> {
    let pat = format!("{key}=\"");
    let start = labels.find(&pat)? + pat.len();
    let end = labels[start..].find('"')? + start;
    Some(labels[start..end].to_string())
}

/// Mutating requests the API server has answered, by `VERB resource[/subresource]`
/// (`apiserver_request_total`, every client).
pub async fn apiserver_writes(client: &Client) -> anyhow::Result<BTreeMap<String, f64>> {
    let req = http::Request::get("/metrics").body(Vec::new())?;
    let text = client.request_text(req).await?;
    let mut out: BTreeMap<String, f64> = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
    {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let verb = label(series, "verb").unwrap_or_default();
        if !matches!(
            verb.as_str(),
            "POST" | "PUT" | "PATCH" | "APPLY" | "DELETE" | "DELETECOLLECTION"
        ) {
            continue;
        }
        let mut resource = label(series, "resource").unwrap_or_default();
        if let Some(sub) = label(series, "subresource").filter(|s| !s.is_empty()) {
            resource = format!("{resource}/{sub}");
        }
        *out.entry(format!("{verb} {resource}")).or_default() +=
            value.parse::<f64>().unwrap_or(0.0);
    }
    Ok(out)
}

/// `after - before`, without the zero entries.
pub fn delta(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
) -> BTreeMap<String, u64> {
    after
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                (v - before.get(k).copied().unwrap_or(0.0)).round(),
            )
        })
        .filter(|(_, d)| *d > 0.0)
        .map(|(k, d)| (k, d as u64))
        .collect()
}
