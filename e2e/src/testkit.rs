//! Helpers shared by the integration tests, the sandbox and the benchmarks: polling with a
//! deadline, namespaces, the labs' namespace on a spoke, node labels, reading an MCM and its
//! works, and the hub run in-process with its admin port scraped.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use k8s_openapi::api::core::v1::{Namespace, Node, Secret, ServiceAccount};
use kube::api::{Api, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt as _};
use serde_json::json;
use shared_api::labels::MCM_OWNER_LABEL;
use shared_api::ocm::KERNEL_VERSIONS_CLAIM;
use shared_api::{ClusterClaim, ManagedClusterModule, ManifestWork};
use tokio_util::sync::CancellationToken;

use crate::labs::{LAB_NAMESPACE, LAB_SERVICE_ACCOUNT, PULL_SECRET};
use crate::registry::Registry;

/// Poll `check` until it yields `Ok(Ok(v))`; on timeout fail with the last thing it saw
/// (`Ok(Err(seen))` or an error), so a failing test says what it was looking at.
pub async fn eventually<T>(
    what: &str,
    timeout: Duration,
    check: impl AsyncFnMut() -> anyhow::Result<Result<T, String>>,
) -> anyhow::Result<T> {
    eventually_every(what, timeout, Duration::from_millis(250), check).await
}

/// [`eventually`], polling every `every` (checks that cost something, e.g. in a VM).
pub async fn eventually_every<T>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut check: impl AsyncFnMut() -> anyhow::Result<Result<T, String>>,
) -> anyhow::Result<T> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let last = match check().await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(seen)) => seen,
            Err(e) => format!("error: {e:#}"),
        };
        if tokio::time::Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}; last seen: {last}");
        }
        tokio::time::sleep(every).await;
    }
}

/// Create a namespace if it does not exist.
pub async fn ensure_namespace(client: &Client, name: &str) -> anyhow::Result<()> {
    let api: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": name}}))?;
    match api.create(&PostParams::default(), &ns).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The labs' namespace on a spoke as the seeds expect it: the namespace, the labs'
/// ServiceAccount and their pull secret for `registry`, applied server-side by `manager`.
pub async fn prepare_lab_namespace(
    client: &Client,
    registry: &Registry,
    manager: &str,
) -> anyhow::Result<()> {
    let pp = PatchParams::apply(manager).force();
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(LAB_NAMESPACE.into()),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<Namespace>::all(client.clone())
        .patch(LAB_NAMESPACE, &pp, &Patch::Apply(&ns))
        .await?;
    let sa = ServiceAccount {
        metadata: ObjectMeta {
            name: Some(LAB_SERVICE_ACCOUNT.into()),
            namespace: Some(LAB_NAMESPACE.into()),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<ServiceAccount>::namespaced(client.clone(), LAB_NAMESPACE)
        .patch(LAB_SERVICE_ACCOUNT, &pp, &Patch::Apply(&sa))
        .await?;
    let secret = registry.dockerconfigjson_secret(PULL_SECRET, LAB_NAMESPACE);
    Api::<Secret>::namespaced(client.clone(), LAB_NAMESPACE)
        .patch(PULL_SECRET, &pp, &Patch::Apply(&secret))
        .await?;
    Ok(())
}

/// The registry's dockerconfigjson Secret `name` in namespace `ns` (server-side apply).
pub async fn put_pull_secret(
    client: &Client,
    registry: &Registry,
    name: &str,
    ns: &str,
) -> anyhow::Result<()> {
    Api::<Secret>::namespaced(client.clone(), ns)
        .patch(
            name,
            &PatchParams::apply("test").force(),
            &Patch::Apply(registry.dockerconfigjson_secret(name, ns)),
        )
        .await?;
    Ok(())
}

/// The spoke's kernel ClusterClaim listing `kernels`, as its agent would publish it.
pub async fn set_kernel_claim(spoke: &Client, kernels: &[&str]) -> anyhow::Result<()> {
    let claim = json!({"apiVersion": "cluster.open-cluster-management.io/v1alpha1", "kind": "ClusterClaim",
        "metadata": {"name": KERNEL_VERSIONS_CLAIM}, "spec": {"value": kernels.join("\n")}});
    Api::<ClusterClaim>::all(spoke.clone())
        .patch(
            KERNEL_VERSIONS_CLAIM,
            &PatchParams::apply("test").force(),
            &Patch::Apply(claim),
        )
        .await?;
    Ok(())
}

/// Set (`Some`) or remove (`None`) one label of a node.
pub async fn label_node(
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

/// The works of an MCM, by cluster namespace.
pub async fn works(hub: &Client, mcm: &str) -> anyhow::Result<BTreeMap<String, ManifestWork>> {
    let list = Api::<ManifestWork>::all(hub.clone())
        .list(&ListParams::default().labels(&format!("{MCM_OWNER_LABEL}={mcm}")))
        .await?;
    Ok(list
        .items
        .into_iter()
        .map(|w| (w.namespace().unwrap_or_default(), w))
        .collect())
}

/// An MCM as the hub has it now (status included).
/// The Module a ManifestWork ships, as JSON (the spoke prerequisites come before it).
pub fn work_module(w: &ManifestWork) -> Option<serde_json::Value> {
    let v = serde_json::to_value(w).ok()?;
    v["spec"]["workload"]["manifests"]
        .as_array()?
        .iter()
        .find(|m| m["kind"] == "Module")
        .cloned()
}

pub async fn mcm_status(hub: &Client, name: &str) -> anyhow::Result<ManagedClusterModule> {
    Ok(Api::<ManagedClusterModule>::all(hub.clone())
        .get(name)
        .await?)
}

/// The kernel release of the real-kernel nodes (Debian's, in VMs), when provisioning has
/// unpacked it.
pub fn real_kernel() -> Option<String> {
    crate::vm::KernelDist::locate(&crate::provision::cache_dir()).map(|d| d.release)
}

/// The hub running in this process.
pub struct HubProcess {
    token: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    pub admin: SocketAddr,
}

/// Options for [`HubProcess::start`] beyond the defaults of `kmm-hub run`.
#[derive(Debug, Clone)]
pub struct HubOptions {
    pub kubeconfig: PathBuf,
    pub operator_namespace: String,
    pub resync: Duration,
    pub leader_elect: bool,
    pub config: Option<PathBuf>,
    pub webhook: Option<(SocketAddr, PathBuf, PathBuf)>,
    pub dashboard: Option<SocketAddr>,
    /// PEM certificate and key of the dashboard (HTTPS).
    pub dashboard_tls: Option<(PathBuf, PathBuf)>,
    /// `--work-executor` (default: the shipped one).
    pub work_executor: String,
    /// `--release-after`.
    pub release_after: Duration,
    /// Image signing flags (work directory, limits).
    pub sign: kmm_hub::sign::SignArgs,
}

impl HubOptions {
    pub fn new(kubeconfig: PathBuf, operator_namespace: &str) -> Self {
        Self {
            kubeconfig,
            operator_namespace: operator_namespace.into(),
            resync: Duration::from_secs(30),
            leader_elect: true,
            config: None,
            webhook: None,
            dashboard: None,
            dashboard_tls: None,
            work_executor: kmm_hub::render::DEFAULT_WORK_EXECUTOR.into(),
            release_after: Duration::from_secs(600),
            sign: kmm_hub::sign::SignArgs::default(),
        }
    }
}

impl HubProcess {
    pub fn start(o: HubOptions) -> anyhow::Result<Self> {
        // Warnings of the in-process hub go to the test's output (RUST_LOG overrides).
        let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into());
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
        let admin: SocketAddr = format!("127.0.0.1:{}", crate::process::free_port()?).parse()?;
        let args = kmm_hub::run::RunArgs {
            kubeconfig: Some(o.kubeconfig),
            operator_namespace: o.operator_namespace,
            webhook_address: o.webhook.as_ref().map(|w| w.0),
            webhook_cert: o.webhook.as_ref().map(|w| w.1.clone()),
            webhook_key: o.webhook.as_ref().map(|w| w.2.clone()),
            config: o.config,
            upstream_config: None,
            job_gc_delay: None,
            dashboard_address: o.dashboard,
            dashboard_cert: o.dashboard_tls.as_ref().map(|t| t.0.clone()),
            dashboard_key: o.dashboard_tls.as_ref().map(|t| t.1.clone()),
            dashboard_audience: kmm_hub::dashboard::auth::DEFAULT_AUDIENCE.into(),
            concurrency: 2,
            write_concurrency: 16,
            common: kmm_runtime::cli::CommonArgs {
                log_format: kmm_runtime::telemetry::LogFormat::Plain,
                log_filter: "info".into(),
                admin_address: Some(admin),
                metrics_address: None,
                leader_elect: o.leader_elect,
                lease_name: "kmm-hub.sigs.x-k8s.io".into(),
                resync: o.resync,
            },
            work_executor: o.work_executor,
            release_after: o.release_after,
            sign: o.sign,
        };
        let token = CancellationToken::new();
        let t = token.clone();
        Ok(Self {
            token,
            task: tokio::spawn(async move { kmm_hub::run::run(args, t).await }),
            admin,
        })
    }

    /// Stop it and wait (bounded) for it to finish.
    pub async fn stop(self) {
        self.token.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(20), self.task).await;
    }

    /// Wait (at most `timeout`) for the hub to end by itself; its result, or an error when
    /// it still runs (it is then stopped).
    pub async fn wait(self, timeout: Duration) -> anyhow::Result<anyhow::Result<()>> {
        let mut task = self.task;
        match tokio::time::timeout(timeout, &mut task).await {
            Ok(joined) => Ok(joined.unwrap_or_else(|e| Err(anyhow::anyhow!("hub task: {e}")))),
            Err(_) => {
                self.token.cancel();
                let _ = tokio::time::timeout(Duration::from_secs(20), task).await;
                bail!("the hub still ran after {timeout:?}")
            }
        }
    }

    /// A sample from the hub's /metrics, e.g. `kmm_hub_objects_written_total{kind="ManifestWork"}`
    /// (0 when absent).
    pub async fn metric(&self, name_and_labels: &str) -> anyhow::Result<f64> {
        let (_, text) = crate::process::http_get(&self.admin.to_string(), "/metrics").await?;
        Ok(text
            .lines()
            .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0))
    }

    pub async fn works_written(&self) -> anyhow::Result<f64> {
        self.metric("kmm_hub_objects_written_total{kind=\"ManifestWork\"}")
            .await
    }
}
