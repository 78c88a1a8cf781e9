//! Leader election against a real API server.
//!
//! - A leader whose lease calls hang (its API connection stalls: the server accepts and never
//!   answers) steps down within its renew deadline, its fenced client refuses every write
//!   from then on, and a second candidate takes the lease over.
//! - A hub that loses its lease while a reconcile is in flight (stuck on a registry that never
//!   answers) drops that reconcile and writes nothing more: the MCM, its events and works are
//!   as they were when the lease was taken over.
//! - A spoke agent whose lease is taken over stops, as the hub does (its binary then exits
//!   non-zero and the pod restarts and campaigns again).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context as _, bail};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::events::v1::Event;
use kmm_e2e::fleet::{Fleet, worker_node};
use kmm_e2e::testkit::{HubOptions, HubProcess, ensure_namespace};
use kmm_runtime::lease::{self, LeaseConfig, is_not_leading};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config, ResourceExt};
use serde_json::json;
use shared_api::ManagedClusterModule;
use shared_api::ocm::{ClusterClaim, KERNEL_VERSIONS_CLAIM, ManifestWork};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const NS: &str = "kmm-hub";
const KERNEL: &str = "5.14.0-284.36.1.el9_2.x86_64";
/// A guard against hanging tests; what is awaited is an event, not a duration.
const GUARD: Duration = Duration::from_secs(90);

/// A TCP forwarder to the API server that can stop forwarding: requests then hang, as behind
/// a stalled network path or an API server that accepts and never answers.
struct StallProxy {
    port: u16,
    paused: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl StallProxy {
    async fn start(upstream_port: u16) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let (paused, rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                let rx = rx.clone();
                tokio::spawn(async move {
                    let Ok(up) = TcpStream::connect(("127.0.0.1", upstream_port)).await else {
                        return;
                    };
                    let (dr, dw) = down.into_split();
                    let (ur, uw) = up.into_split();
                    tokio::join!(pump(dr, uw, rx.clone()), pump(ur, dw, rx));
                });
            }
        });
        Ok(Self { port, paused, task })
    }

    fn pause(&self) {
        self.paused.send_replace(true);
    }
}

impl Drop for StallProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut paused: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if paused.wait_for(|p| !*p).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A client of the hub's API server whose connections go through `proxy`.
async fn client_via(fleet: &Fleet, proxy: &StallProxy) -> anyhow::Result<Client> {
    let kc = Kubeconfig::read_from(fleet.hub().kubeconfig_path())?;
    let mut config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    config.cluster_url = format!("https://127.0.0.1:{}", proxy.port).parse()?;
    Ok(Client::try_from(config)?)
}

fn quick(identity: &str) -> LeaseConfig {
    let mut c = LeaseConfig::new("lease-test", NS, identity);
    c.lease_duration = Duration::from_secs(4);
    c.renew_deadline = Duration::from_secs(3);
    c.retry_period = Duration::from_millis(500);
    c
}

fn config_map(name: &str) -> anyhow::Result<ConfigMap> {
    Ok(serde_json::from_value(
        json!({"metadata": {"name": name, "namespace": NS}}),
    )?)
}

async fn within<T>(what: &str, f: impl Future<Output = T>) -> anyhow::Result<T> {
    tokio::time::timeout(GUARD, f)
        .await
        .with_context(|| format!("not within {GUARD:?}: {what}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_lease_calls_hang_steps_down_and_writes_nothing_more() -> anyhow::Result<()>
{
    Fleet::builder()
        .spokes(0)
        .run(async |fleet: &mut Fleet| {
            let admin = fleet.hub().client().await;
            ensure_namespace(&admin, NS).await?;
            let proxy = StallProxy::start(fleet.hub().port()).await?;
            let token = CancellationToken::new();

            let (mut a, _a_task) =
                lease::spawn(client_via(fleet, &proxy).await?, quick("a"), token.clone());
            within("candidate a leads", a.wait_for(true)).await?;
            // What a's reconcilers write with: fenced by a's leadership.
            let a_writes: Api<ConfigMap> = Api::namespaced(a.fence(admin.clone()), NS);
            a_writes
                .create(&PostParams::default(), &config_map("while-leading")?)
                .await
                .context("a fenced client writes while leading")?;

            // a's API path stalls: its lease calls hang. It must step down by its renew deadline.
            proxy.pause();
            within(
                "the leader with hanging lease calls to step down",
                a.wait_for(false),
            )
            .await?;
            match a_writes
                .create(&PostParams::default(), &config_map("after-loss")?)
                .await
            {
                Err(e) if is_not_leading(&e) => {}
                other => bail!("a write after the loss was not refused: {other:?}"),
            }
            let cms: Api<ConfigMap> = Api::namespaced(admin.clone(), NS);
            assert!(cms.get_opt("after-loss").await?.is_none());

            // A second candidate takes over once a's record stops changing for a lease duration.
            let (mut b, _b_task) = lease::spawn(admin.clone(), quick("b"), token.clone());
            within("candidate b to take over", b.wait_for(true)).await?;
            let held = Api::<Lease>::namespaced(admin.clone(), NS)
                .get("lease-test")
                .await?;
            assert_eq!(
                held.spec.and_then(|s| s.holder_identity).as_deref(),
                Some("b")
            );
            assert!(!a.is_leader());
            token.cancel();
            Ok(())
        })
        .await
}

/// A registry that accepts connections and never answers; sends one message per connection.
async fn stalled_registry() -> anyhow::Result<(
    u16,
    tokio::sync::mpsc::UnboundedReceiver<()>,
    tokio::task::JoinHandle<()>,
)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
            let _ = tx.send(());
        }
    });
    Ok((port, rx, task))
}

/// What the hub has written, as far as later writes would change it.
#[derive(Debug, PartialEq)]
struct Written {
    mcm_version: Option<String>,
    events: BTreeMap<String, Option<String>>,
    works: BTreeMap<String, Option<i64>>,
}

async fn written(hub: &Client, mcm: &str) -> anyhow::Result<Written> {
    let mcm_version = Api::<ManagedClusterModule>::all(hub.clone())
        .get(mcm)
        .await?
        .resource_version();
    let events = Api::<Event>::all(hub.clone())
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|e| e.reporting_controller.as_deref() == Some("kmm-hub"))
        .map(|e| {
            (
                format!("{}/{}", e.namespace().unwrap_or_default(), e.name_any()),
                e.resource_version(),
            )
        })
        .collect();
    let works = Api::<ManifestWork>::all(hub.clone())
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .map(|w| {
            (
                format!("{}/{}", w.namespace().unwrap_or_default(), w.name_any()),
                w.metadata.generation,
            )
        })
        .collect();
    Ok(Written {
        mcm_version,
        events,
        works,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_that_loses_its_lease_drops_the_reconcile_in_flight_and_writes_nothing()
-> anyhow::Result<()> {
    Fleet::builder()
        .spokes(1)
        .nodes_with(|_, spoke| vec![worker_node(&format!("{spoke}-w1"), KERNEL)])
        .spoke_labels(1, BTreeMap::from([("lease".into(), "yes".into())]))
        .run(async |fleet: &mut Fleet| {
            let hub = fleet.hub().client().await;
            ensure_namespace(&hub, NS).await?;
            Api::<ClusterClaim>::all(fleet.spoke(1).client().await)
                .patch(
                    KERNEL_VERSIONS_CLAIM,
                    &PatchParams::apply("test").force(),
                    &Patch::Apply(json!({"apiVersion": "cluster.open-cluster-management.io/v1alpha1", "kind": "ClusterClaim",
                        "metadata": {"name": KERNEL_VERSIONS_CLAIM}, "spec": {"value": KERNEL}})),
                )
                .await?;
            let (registry_port, mut connections, registry) = stalled_registry().await?;

            let hub_proc = HubProcess::start(HubOptions::new(fleet.hub().kubeconfig_path(), NS))?;
            let mcm: ManagedClusterModule = serde_json::from_value(json!({
                "apiVersion": "hub.kmm.sigs.x-k8s.io/v1beta1", "kind": "ManagedClusterModule",
                "metadata": {"name": "lease-loss"},
                "spec": {
                    "spokeNamespace": "kmm-labs",
                    "selector": {"lease": "yes"},
                    "moduleSpec": {
                        "selector": {"node-role.kubernetes.io/worker": ""},
                        "moduleLoader": {"container": {
                            "modprobe": {"moduleName": "kmm_ci_a"},
                            "kernelMappings": [{"regexp": "^.*$",
                                "containerImage": format!("127.0.0.1:{registry_port}/kmm/stalled:${{KERNEL_FULL_VERSION}}")}]
                        }}
                    }
                }
            }))?;
            Api::<ManagedClusterModule>::all(hub.clone())
                .patch("lease-loss", &PatchParams::apply("test").force(), &Patch::Apply(&mcm))
                .await?;

            // The leader's reconcile is in flight: it waits for the registry.
            within("the reconcile to reach the registry", connections.recv()).await?;
            let before = written(&hub, "lease-loss").await?;

            // Someone else takes the lease over.
            let now = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string();
            Api::<Lease>::namespaced(hub.clone(), NS)
                .patch(
                    "kmm-hub.sigs.x-k8s.io",
                    &PatchParams::default(),
                    &Patch::Merge(json!({"spec": {"holderIdentity": "intruder", "renewTime": now,
                        "acquireTime": now, "leaseDurationSeconds": 3600}})),
                )
                .await?;

            // The old leader stops: its run ends (in-flight reconciles finished or dropped).
            let ended = hub_proc.wait(GUARD).await?;
            match ended {
                Err(e) if format!("{e:#}").contains("lost leadership") => {}
                other => bail!("the hub should end with `lost leadership`: {other:?}"),
            }
            // The registry lets go of the stalled requests; nobody may be waiting for them.
            registry.abort();
            let after = written(&hub, "lease-loss").await?;
            assert_eq!(
                before, after,
                "the old leader wrote after losing the lease"
            );
            Ok(())
        })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spoke_that_loses_its_lease_stops() -> anyhow::Result<()> {
    use kmm_spoke::error::AgentError;
    use kmm_spoke::{Agent, AgentConfig};
    Fleet::builder()
        .simulators(false)
        .run(async |fleet: &mut Fleet| {
            let client = fleet.spoke(1).client().await;
            let mut lease_cfg = quick("spoke-a");
            lease_cfg.namespace = "default".into();
            let cfg = AgentConfig {
                leader_election: Some(lease_cfg),
                cluster_claims: false,
                identity: "spoke-a".into(),
                ..Default::default()
            };
            let health = kmm_runtime::admin::Health::new();
            let mut registry = prometheus_client::registry::Registry::default();
            let agent = Agent::new(client.clone(), cfg, &mut registry, &health);
            let token = CancellationToken::new();
            let run = tokio::spawn(agent.run(token.clone()));

            let leases = Api::<Lease>::namespaced(client.clone(), "default");
            let holder = async || -> anyhow::Result<Option<String>> {
                Ok(leases
                    .get_opt("lease-test")
                    .await?
                    .and_then(|l| l.spec)
                    .and_then(|s| s.holder_identity))
            };
            within("the agent to lead", async {
                while holder().await?.as_deref() != Some("spoke-a") {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                anyhow::Ok(())
            })
            .await??;
            // Another replica takes the lease over.
            leases
                .patch(
                    "lease-test",
                    &PatchParams::default(),
                    &Patch::Merge(json!({"spec": {"holderIdentity": "spoke-b"}})),
                )
                .await?;
            match within("the agent to stop", run).await?? {
                Err(AgentError::LostLease) => {}
                other => bail!("the agent should stop with LostLease: {other:?}"),
            }
            assert!(
                health.waiting_for().iter().any(|g| g == "lease"),
                "readiness drops the lease: {:?}",
                health.waiting_for()
            );
            assert_eq!(holder().await?.as_deref(), Some("spoke-b"));
            token.cancel();
            Ok(())
        })
        .await
}
