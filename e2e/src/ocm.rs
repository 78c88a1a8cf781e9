//! The real Open Cluster Management programs of the test world (built by `provision` from the
//! published `open-cluster-management.io/ocm` module):
//! - on the hub: the registration controller (CSR and ManagedCluster auto-approval for the
//!   bootstrap service account), the placement controller, the ManifestWork admission webhook
//!   and the policy propagator;
//! - per spoke: the klusterlet agent in its singleton mode (registration + work in one
//!   process) and the configuration policy controller.
//!
//! Spokes join the way `clusteradm join` makes them: a bootstrap kubeconfig (a bound token of
//! the hub's `agent-registration-bootstrap` service account, bound to OCM's released
//! `open-cluster-management:bootstrap` ClusterRole), a CertificateSigningRequest approved by
//! the registration controller and signed by kube-controller-manager, a ManagedCluster
//! accepted by the hub. What the kubelet would do for these pods is done here: a process that
//! exits is started again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use k8s_openapi::api::admissionregistration::v1::{
    RuleWithOperations, ValidatingWebhook, ValidatingWebhookConfiguration, WebhookClientConfig,
};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, Patch, PatchParams};

use crate::cluster::{Cluster, FIELD_MANAGER};
use crate::pki::Ca;
use crate::process::{ManagedProcess, free_port};
use crate::provision::Binaries;

/// Where the hub controllers keep their events and leases.
pub const HUB_NAMESPACE: &str = "open-cluster-management-hub";
/// The namespace of the bootstrap service account (as `clusteradm init` makes it).
pub const BOOTSTRAP_NAMESPACE: &str = "open-cluster-management";
pub const BOOTSTRAP_SERVICE_ACCOUNT: &str = "agent-registration-bootstrap";
/// The klusterlet agent's namespace on a spoke (its hub kubeconfig Secret lives there).
pub const AGENT_NAMESPACE: &str = "open-cluster-management-agent";
/// The ManifestWork validating webhook's path (OCM's own webhook server).
pub const WORK_WEBHOOK_PATH: &str = "/validate-work-open-cluster-management-io-v1-manifestwork";
/// OCM's finalizer on ManifestWorks: the work agent removes it after cleaning up.
pub const WORK_FINALIZER: &str = "cluster.open-cluster-management.io/manifest-work-cleanup";
/// How often the work agent reads back applied objects for status feedback (OCM's default is
/// 10 s; the test world wants quicker answers).
pub const STATUS_SYNC_INTERVAL: &str = "1s";

/// A process that is started again when it exits, as the kubelet restarts a container.
pub struct Supervised {
    name: String,
    current: Arc<Mutex<Option<ManagedProcess>>>,
    restarts: Arc<Mutex<u32>>,
    task: tokio::task::JoinHandle<()>,
    log: PathBuf,
}

impl std::fmt::Debug for Supervised {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervised")
            .field("name", &self.name)
            .field("pid", &self.pid())
            .finish_non_exhaustive()
    }
}

impl Supervised {
    /// Spawns `program args` (environment `env` added) and restarts it one second after it
    /// exits, as long as this value lives.
    pub fn start(
        name: &str,
        program: &Path,
        args: Vec<String>,
        env: Vec<(String, String)>,
        log: &Path,
    ) -> anyhow::Result<Self> {
        let first = ManagedProcess::spawn_with_env(name, program, &args, &env, log)?;
        let current = Arc::new(Mutex::new(Some(first)));
        let restarts = Arc::new(Mutex::new(0));
        let task = {
            let (current, restarts) = (current.clone(), restarts.clone());
            let (name, program, log) = (name.to_string(), program.to_path_buf(), log.to_path_buf());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    let exited = {
                        let mut guard = current.lock().unwrap_or_else(|e| e.into_inner());
                        guard.as_mut().and_then(ManagedProcess::exited)
                    };
                    let Some(status) = exited else { continue };
                    tracing::info!(%name, %status, "test world: process exited; starting it again");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    match ManagedProcess::spawn_with_env(&name, &program, &args, &env, &log) {
                        Ok(p) => {
                            *current.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
                            *restarts.lock().unwrap_or_else(|e| e.into_inner()) += 1;
                        }
                        Err(e) => tracing::warn!(%name, "restarting: {e:#}"),
                    }
                }
            })
        };
        Ok(Self {
            name: name.to_string(),
            current,
            restarts,
            task,
            log: log.to_path_buf(),
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(ManagedProcess::pid)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// How often the process was started again.
    pub fn restarts(&self) -> u32 {
        *self.restarts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stops supervising, then stops the process.
    pub async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
        let p = self
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(mut p) = p {
            p.stop(Duration::from_secs(3)).await;
        }
    }
}

/// OCM's hub side.
#[derive(Debug)]
pub struct OcmHub {
    processes: Vec<Supervised>,
    bootstrap_kubeconfig: String,
    dir: PathBuf,
}

async fn apply<K>(api: &Api<K>, name: &str, obj: &K) -> anyhow::Result<()>
where
    K: kube::Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.patch(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(obj),
    )
    .await
    .with_context(|| format!("applying {name}"))?;
    Ok(())
}

fn meta(name: &str, namespace: Option<&str>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: namespace.map(Into::into),
        ..Default::default()
    }
}

/// Creates `name` (with the labels) on the cluster, or updates its labels.
pub async fn ensure_namespace(
    client: &kube::Client,
    name: &str,
    labels: BTreeMap<String, String>,
) -> anyhow::Result<()> {
    let api: Api<Namespace> = Api::all(client.clone());
    let mut ns = Namespace {
        metadata: meta(name, None),
        ..Default::default()
    };
    if !labels.is_empty() {
        ns.metadata.labels = Some(labels);
    }
    apply(&api, name, &ns).await
}

impl OcmHub {
    /// Installs the bootstrap identity and the ManifestWork webhook on `hub` and starts the hub
    /// controllers. The hub's OCM CRDs are installed with the cluster.
    pub async fn start(
        hub: &Cluster,
        binaries: &Binaries,
        ca: &Ca,
        dir: &Path,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let client = hub.client().await;
        for ns in [HUB_NAMESPACE, BOOTSTRAP_NAMESPACE] {
            ensure_namespace(&client, ns, BTreeMap::new()).await?;
        }
        // The bootstrap identity: OCM's released ClusterRole, bound to a service account.
        let role_file = binaries.ocm_rbac().join("bootstrap-clusterrole.yaml");
        let role: ClusterRole = serde_yaml::from_str(
            &std::fs::read_to_string(&role_file)
                .with_context(|| format!("reading {}", role_file.display()))?,
        )
        .with_context(|| format!("parsing {}", role_file.display()))?;
        let role_name = role.metadata.name.clone().unwrap_or_default();
        apply(&Api::<ClusterRole>::all(client.clone()), &role_name, &role).await?;
        let sa = ServiceAccount {
            metadata: meta(BOOTSTRAP_SERVICE_ACCOUNT, Some(BOOTSTRAP_NAMESPACE)),
            ..Default::default()
        };
        apply(
            &Api::<ServiceAccount>::namespaced(client.clone(), BOOTSTRAP_NAMESPACE),
            BOOTSTRAP_SERVICE_ACCOUNT,
            &sa,
        )
        .await?;
        let binding_name = "open-cluster-management:bootstrap:agent-registration";
        let binding = ClusterRoleBinding {
            metadata: meta(binding_name, None),
            role_ref: RoleRef {
                api_group: "rbac.authorization.k8s.io".into(),
                kind: "ClusterRole".into(),
                name: role_name,
            },
            subjects: Some(vec![Subject {
                kind: "ServiceAccount".into(),
                name: BOOTSTRAP_SERVICE_ACCOUNT.into(),
                namespace: Some(BOOTSTRAP_NAMESPACE.into()),
                ..Default::default()
            }]),
        };
        apply(
            &Api::<ClusterRoleBinding>::all(client.clone()),
            binding_name,
            &binding,
        )
        .await?;
        let token = hub
            .service_account_token(BOOTSTRAP_NAMESPACE, BOOTSTRAP_SERVICE_ACCOUNT)
            .await?;
        let bootstrap_kubeconfig =
            crate::cluster::token_kubeconfig_yaml("hub", &hub.server_url(), hub.ca_pem(), &token);

        // The ManifestWork webhook: OCM's own server, reached by URL on loopback.
        let cert_dir = dir.join("work-webhook-certs");
        std::fs::create_dir_all(&cert_dir)?;
        let serving = ca.serving_cert("ocm-work-webhook", &["127.0.0.1", "localhost"])?;
        std::fs::write(cert_dir.join("tls.crt"), &serving.cert_pem)?;
        std::fs::write(cert_dir.join("tls.key"), &serving.key_pem)?;
        let webhook_port = free_port()?;

        let kubeconfig = hub.kubeconfig_path().display().to_string();
        let env = vec![("KUBECONFIG".to_string(), kubeconfig.clone())];
        let common = |extra: &[&str]| -> anyhow::Result<Vec<String>> {
            let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
            args.extend([
                format!("--kubeconfig={kubeconfig}"),
                format!("--namespace={HUB_NAMESPACE}"),
                "--disable-leader-election".into(),
                format!("--listen=127.0.0.1:{}", free_port()?),
            ]);
            Ok(args)
        };
        let mut processes = Vec::new();
        processes.push(Supervised::start(
            "ocm-registration-controller",
            &binaries.ocm_registration,
            common(&["controller"])?,
            env.clone(),
            &dir.join("registration-controller.log"),
        )?);
        processes.push(Supervised::start(
            "ocm-placement-controller",
            &binaries.ocm_placement,
            common(&["controller"])?,
            env.clone(),
            &dir.join("placement-controller.log"),
        )?);
        processes.push(Supervised::start(
            "ocm-work-webhook",
            &binaries.ocm_work_webhook,
            vec![
                "--host=127.0.0.1".into(),
                format!("--port={webhook_port}"),
                format!("--certdir={}", cert_dir.display()),
                format!("--kubeconfig={kubeconfig}"),
            ],
            env.clone(),
            &dir.join("work-webhook.log"),
        )?);
        processes.push(Supervised::start(
            "governance-policy-propagator",
            &binaries.policy_propagator,
            vec![
                "--leader-elect=false".into(),
                "--enable-webhooks=false".into(),
                "--metrics-bind-address=0".into(),
                format!("--health-probe-bind-address=127.0.0.1:{}", free_port()?),
            ],
            // As in the propagator's own Deployment: empty means every namespace.
            env.into_iter()
                .chain([("WATCH_NAMESPACE".to_string(), String::new())])
                .collect(),
            &dir.join("policy-propagator.log"),
        )?);

        let hub_ocm = Self {
            processes,
            bootstrap_kubeconfig,
            dir: dir.to_path_buf(),
        };
        hub_ocm
            .install_work_webhook(&client, ca, webhook_port)
            .await?;
        Ok(hub_ocm)
    }

    /// Registers OCM's ManifestWork webhook (as the cluster manager does, by URL here) once its
    /// server answers, so that no write is refused for want of a server.
    async fn install_work_webhook(
        &self,
        client: &kube::Client,
        ca: &Ca,
        port: u16,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            if Instant::now() > deadline {
                bail!(
                    "the OCM work webhook did not listen on 127.0.0.1:{port} within 60 s; log {}",
                    self.dir.join("work-webhook.log").display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let name = "manifestworkvalidators.admission.work.open-cluster-management.io";
        let config = ValidatingWebhookConfiguration {
            metadata: meta(name, None),
            webhooks: Some(vec![ValidatingWebhook {
                name: name.into(),
                admission_review_versions: vec!["v1beta1".into(), "v1".into()],
                client_config: WebhookClientConfig {
                    url: Some(format!("https://127.0.0.1:{port}{WORK_WEBHOOK_PATH}")),
                    ca_bundle: Some(k8s_openapi::ByteString(ca.cert_pem().as_bytes().to_vec())),
                    service: None,
                },
                failure_policy: Some("Fail".into()),
                rules: Some(vec![RuleWithOperations {
                    api_groups: Some(vec!["work.open-cluster-management.io".into()]),
                    api_versions: Some(vec!["*".into()]),
                    operations: Some(vec!["CREATE".into(), "UPDATE".into()]),
                    resources: Some(vec!["manifestworks".into()]),
                    scope: None,
                }]),
                side_effects: "None".into(),
                timeout_seconds: Some(10),
                ..Default::default()
            }]),
        };
        apply(
            &Api::<ValidatingWebhookConfiguration>::all(client.clone()),
            name,
            &config,
        )
        .await
    }

    /// The kubeconfig (YAML) a spoke's agent joins with.
    pub fn bootstrap_kubeconfig(&self) -> &str {
        &self.bootstrap_kubeconfig
    }

    /// `(component, pid)` of the running hub programs.
    pub fn pids(&self) -> Vec<(String, u32)> {
        self.processes
            .iter()
            .filter_map(|p| Some((p.name().to_string(), p.pid()?)))
            .collect()
    }

    pub fn log_paths(&self) -> Vec<PathBuf> {
        self.processes
            .iter()
            .map(|p| p.log_path().to_path_buf())
            .collect()
    }

    pub async fn stop(self) {
        for p in self.processes {
            p.stop().await;
        }
    }
}

/// OCM's side on one spoke: the klusterlet agent and the configuration policy controller
/// (real), and the policy framework addon's synchronisation (simulated: its module is refused
/// by the proxy, see `crate::sim::policy`).
#[derive(Debug)]
pub struct OcmAgent {
    cluster: String,
    processes: Vec<Supervised>,
    policy_sync: Option<crate::sim::policy::PolicyFrameworkSim>,
}

impl OcmAgent {
    /// Starts the klusterlet agent of `spoke` (joining with `bootstrap_kubeconfig`) and its
    /// configuration policy controller. Returns at once; see [`accept_and_wait_joined`].
    pub async fn start(
        spoke: &Cluster,
        hub: kube::Client,
        binaries: &Binaries,
        bootstrap_kubeconfig: &str,
        dir: &Path,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let client = spoke.client().await;
        ensure_namespace(&client, AGENT_NAMESPACE, BTreeMap::new()).await?;
        ensure_namespace(&client, spoke.name(), BTreeMap::new()).await?;
        install_work_executor(&client).await?;
        let bootstrap = dir.join("bootstrap-hub.kubeconfig");
        crate::cluster::write_private(&bootstrap, bootstrap_kubeconfig)?;
        let kubeconfig = spoke.kubeconfig_path().display().to_string();
        let env = vec![("KUBECONFIG".to_string(), kubeconfig.clone())];
        let klusterlet = Supervised::start(
            "ocm-klusterlet-agent",
            &binaries.ocm_klusterlet,
            vec![
                "agent".into(),
                format!("--spoke-cluster-name={}", spoke.name()),
                format!("--bootstrap-kubeconfig={}", bootstrap.display()),
                format!("--kubeconfig={kubeconfig}"),
                format!(
                    "--hub-kubeconfig-dir={}",
                    dir.join("hub-kubeconfig").display()
                ),
                // The work half of the singleton agent reads its hub kubeconfig from here
                // (default `/spoke/hub-kubeconfig/kubeconfig`, the in-cluster mount).
                format!(
                    "--workload-source-config={}",
                    dir.join("hub-kubeconfig").join("kubeconfig").display()
                ),
                format!("--namespace={AGENT_NAMESPACE}"),
                "--disable-leader-election".into(),
                format!("--listen=127.0.0.1:{}", free_port()?),
                format!("--spoke-external-server-urls={}", spoke.server_url()),
                format!("--status-sync-interval={STATUS_SYNC_INTERVAL}"),
            ],
            env.clone(),
            &dir.join("klusterlet-agent.log"),
        )?;
        let config_policy = Supervised::start(
            "config-policy-controller",
            &binaries.config_policy_controller,
            vec![
                "controller".into(),
                format!("--cluster-name={}", spoke.name()),
                "--leader-elect=false".into(),
                "--enable-operator-policy=false".into(),
                "--metrics-bind-address=0".into(),
                format!("--health-probe-bind-address=127.0.0.1:{}", free_port()?),
                "--evaluation-concurrency=2".into(),
            ],
            {
                let mut env = env;
                env.push(("WATCH_NAMESPACE".into(), spoke.name().into()));
                env
            },
            &dir.join("config-policy-controller.log"),
        )?;
        let policy_sync = crate::sim::policy::PolicyFrameworkSim::start(hub, client, spoke.name());
        Ok(Self {
            cluster: spoke.name().to_string(),
            processes: vec![klusterlet, config_policy],
            policy_sync: Some(policy_sync),
        })
    }

    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    pub fn pids(&self) -> Vec<(String, u32)> {
        self.processes
            .iter()
            .filter_map(|p| Some((p.name().to_string(), p.pid()?)))
            .collect()
    }

    pub fn log_paths(&self) -> Vec<PathBuf> {
        self.processes
            .iter()
            .map(|p| p.log_path().to_path_buf())
            .collect()
    }

    /// What the policy framework simulator reported (distinct failures).
    pub fn policy_sync_logs(&self) -> Vec<String> {
        self.policy_sync
            .as_ref()
            .map(|p| p.logs())
            .unwrap_or_default()
    }

    pub async fn stop(self) {
        if let Some(p) = self.policy_sync {
            p.stop().await;
        }
        for p in self.processes {
            p.stop().await;
        }
    }
}

/// manifests/spoke/work-executor.yaml: the ServiceAccount the hub's ManifestWorks are executed
/// as, and its rights. Part of the spoke agent's install (the Policy); every spoke of the test
/// world has it, as every spoke of a fleet has the agent.
pub const WORK_EXECUTOR_YAML: &str = include_str!("../../manifests/spoke/work-executor.yaml");

/// Applies [`WORK_EXECUTOR_YAML`] (and its namespace) to a spoke.
pub async fn install_work_executor(client: &kube::Client) -> anyhow::Result<()> {
    let mut namespaces = std::collections::BTreeSet::new();
    for doc in serde_yaml::Deserializer::from_str(WORK_EXECUTOR_YAML) {
        let v = <serde_json::Value as serde::Deserialize>::deserialize(doc)
            .context("parsing work-executor.yaml")?;
        let name = v["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        match v["kind"].as_str().unwrap_or_default() {
            "ServiceAccount" => {
                let sa: ServiceAccount = serde_json::from_value(v)?;
                let ns = sa.metadata.namespace.clone().unwrap_or_default();
                if namespaces.insert(ns.clone()) {
                    ensure_namespace(client, &ns, BTreeMap::new()).await?;
                }
                apply(
                    &Api::<ServiceAccount>::namespaced(client.clone(), &ns),
                    &name,
                    &sa,
                )
                .await?;
            }
            "ClusterRole" => {
                let r: ClusterRole = serde_json::from_value(v)?;
                apply(&Api::<ClusterRole>::all(client.clone()), &name, &r).await?;
            }
            "ClusterRoleBinding" => {
                let b: ClusterRoleBinding = serde_json::from_value(v)?;
                apply(&Api::<ClusterRoleBinding>::all(client.clone()), &name, &b).await?;
            }
            other => bail!("work-executor.yaml: unexpected {other} {name}"),
        }
    }
    Ok(())
}

/// Accepts `cluster` as `clusteradm accept` does, then waits until the hub shows it joined
/// and available.
///
/// Accepting: once the agent's ManagedCluster exists, its bootstrap CertificateSigningRequest
/// (labelled with the cluster name, requested by the bootstrap service account) is approved
/// and `hubAcceptsClient` set. The hub's own auto-approval (`--auto-approved-csr-users`) is not
/// used: it approves the CSR at once, and the agent then ends its bootstrap phase before its
/// ManagedCluster create has returned (`context canceled`), never to create it again — seen
/// with OCM v1.2.1; see docs/test-world.md.
pub async fn accept_and_wait_joined(
    hub: &kube::Client,
    cluster: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
    use kube::api::ListParams;
    let api: Api<shared_api::ManagedCluster> = Api::all(hub.clone());
    let csrs: Api<CertificateSigningRequest> = Api::all(hub.clone());
    let bootstrap_user =
        format!("system:serviceaccount:{BOOTSTRAP_NAMESPACE}:{BOOTSTRAP_SERVICE_ACCOUNT}");
    let deadline = Instant::now() + timeout;
    let mut last = String::from("no ManagedCluster yet");
    loop {
        match api.get_opt(cluster).await {
            Ok(Some(mc)) => {
                if !mc.spec.hub_accepts_client {
                    let patch = serde_json::json!({"spec": {"hubAcceptsClient": true}});
                    api.patch(cluster, &PatchParams::default(), &Patch::Merge(&patch))
                        .await
                        .with_context(|| format!("accepting ManagedCluster {cluster}"))?;
                }
                let pending = csrs
                    .list(&ListParams::default().labels(&format!(
                        "open-cluster-management.io/cluster-name={cluster}"
                    )))
                    .await?
                    .items
                    .into_iter()
                    .filter(|c| c.spec.username.as_deref() == Some(bootstrap_user.as_str()))
                    .filter(|c| {
                        c.status
                            .as_ref()
                            .and_then(|s| s.conditions.as_ref())
                            .is_none_or(Vec::is_empty)
                    });
                for csr in pending {
                    let name = csr.metadata.name.clone().unwrap_or_default();
                    let approval = serde_json::json!({"status": {"conditions": [{
                        "type": "Approved", "status": "True",
                        "reason": "AcceptedByTestWorld",
                        "message": format!("the test world accepted {cluster}, as `clusteradm accept` does"),
                    }]}});
                    csrs.patch_approval(&name, &PatchParams::default(), &Patch::Merge(&approval))
                        .await
                        .with_context(|| format!("approving CSR {name}"))?;
                }
                let conds = mc
                    .status
                    .as_ref()
                    .map(|s| s.conditions.clone())
                    .unwrap_or_default();
                let is_true = |t: &str| conds.iter().any(|c| c.type_ == t && c.status == "True");
                if mc.spec.hub_accepts_client
                    && is_true("ManagedClusterJoined")
                    && is_true("ManagedClusterConditionAvailable")
                {
                    return Ok(());
                }
                last = format!(
                    "hubAcceptsClient={}, conditions {:?}",
                    mc.spec.hub_accepts_client,
                    conds
                        .iter()
                        .map(|c| format!("{}={}", c.type_, c.status))
                        .collect::<Vec<_>>()
                );
            }
            Ok(None) => {}
            Err(e) => last = format!("reading ManagedCluster {cluster}: {e}"),
        }
        if Instant::now() > deadline {
            bail!("{cluster} did not join the hub within {timeout:?} ({last})");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
