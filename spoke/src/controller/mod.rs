//! The agent: caches, the Module reconciler on kube's `Controller`, the kernel-facts loop,
//! the orphan sweep, node events, leader election.

pub mod device_classes;
pub mod dtk;
pub mod events;
pub mod facts;
pub mod labels;
pub mod module;
mod named;
pub mod namespace_label;
pub mod node_writes;
pub mod orphans;
pub mod os_image;
pub mod sequence;
pub mod status;
pub mod status_gate;
pub mod sweep;
#[cfg(test)]
mod testkit;
pub mod triggers;
mod worker;
pub mod writes;

use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Node;
use kmm_runtime::backoff::KeyedBackoff;
use kmm_runtime::lease::{Campaign, LeaseConfig};
use kmm_runtime::runtime::LEASE_GATE;
use kmm_runtime::shutdown::{self, CancellationToken};
use kube::api::Api;
use kube::runtime::controller::{self, Controller};
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use prometheus_client::registry::Registry;
use shared_api::labels::ROLE_LABEL;
use shared_api::{ClusterClaim, Module};

use crate::cache::{self, CachedPod, run_informer};
use crate::error::AgentError;
use crate::metrics::Metrics;
use crate::render::RenderSettings;
use events::EventSink;
use kmm_runtime::admin::Health;
use triggers::{Triggers, informer_modules, informer_nodes, informer_owned, owner_ref};
use worker::worker;

/// `(namespace, name)` of a Module.
pub type ModuleKey = (String, String);

/// The metric label of the Module reconciles.
pub const MODULE_CONTROLLER: &str = "module";
const FACTS_CONTROLLER: &str = "kernel-facts";
const NODE_WRITER: &str = "node-writer";
/// The default of [`AgentConfig::node_write_delay`].
pub const DEFAULT_NODE_WRITE_DELAY: Duration = Duration::from_millis(500);
/// The default of [`AgentConfig::node_write_interval`].
pub const DEFAULT_NODE_WRITE_INTERVAL: Duration = Duration::from_secs(2);
/// The default of [`AgentConfig::status_write_delay`].
pub const DEFAULT_STATUS_WRITE_DELAY: Duration = Duration::from_secs(2);

/// How the agent runs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub settings: RenderSettings,
    /// Every Module and the kernel facts are reconciled at least this often.
    pub resync: Duration,
    /// Leader election; `None` runs as leader from the start. Ignored when the agent is given
    /// the campaign of its process ([`Agent::with_campaign`]).
    pub leader_election: Option<LeaseConfig>,
    /// Publish the kernel ClusterClaim(s) (needs the OCM ClusterClaim CRD).
    pub cluster_claims: bool,
    /// Reporting instance of events and the lease holder identity.
    pub identity: String,
    /// Concurrent Module reconciles.
    pub workers: usize,
    /// How long a node's label writes are gathered before the one write that carries them
    /// all ([`node_writes`]).
    pub node_write_delay: Duration,
    /// The least time between two writes of one node ([`node_writes`]).
    pub node_write_interval: Duration,
    /// How long a status change under the same spec must last to be written
    /// ([`status_gate`]).
    pub status_write_delay: Duration,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            settings: RenderSettings::default(),
            resync: Duration::from_secs(600),
            leader_election: None,
            cluster_claims: true,
            identity: "kmm-spoke".into(),
            workers: 2,
            node_write_delay: DEFAULT_NODE_WRITE_DELAY,
            node_write_interval: DEFAULT_NODE_WRITE_INTERVAL,
            status_write_delay: DEFAULT_STATUS_WRITE_DELAY,
        }
    }
}

/// The caches the reconcilers read.
#[derive(Clone)]
pub struct Stores {
    pub modules: Store<Module>,
    pub daemonsets: Store<DaemonSet>,
    pub pods: Store<CachedPod>,
    pub nodes: Store<Node>,
    pub claims: Option<Store<ClusterClaim>>,
}

/// What every reconcile gets.
pub struct Context {
    pub client: Client,
    pub settings: RenderSettings,
    pub stores: Stores,
    pub kubernetes_minor: Option<u32>,
    pub resync: Duration,
    pub metrics: Metrics,
    /// Node events (unload failures; loads and unloads come from label transitions).
    pub events: EventSink,
    /// Loader pods whose failed unload was already announced (by pod uid).
    pub unload_failures_reported: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Failures in a row per Module: the `Controller`'s retry delays.
    pub module_backoff: KeyedBackoff<ModuleKey>,
    /// Namespaces this process labelled as holding Modules, and when ([`namespace_label`]).
    pub labelled_namespaces:
        std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>,
    /// The Driver Toolkit ImageStream's tags on OpenShift spokes ([`dtk`]).
    pub dtk_tags: dtk::DtkTags,
    /// The RHCOS image of OpenShift spokes ([`os_image`]).
    pub os_image: os_image::OsImage,
    /// The node writes the reconcilers ask for, gathered per node ([`node_writes`]).
    pub node_writes: node_writes::NodeWrites,
    /// When Module statuses are written ([`status_gate`]).
    pub status_gate: status_gate::StatusGate,
}

/// The spoke agent. Build with [`Agent::new`] (registers metrics and readiness gates), then
/// [`Agent::run`] until the token is cancelled or the lease is lost.
pub struct Agent {
    client: Client,
    cfg: AgentConfig,
    metrics: Metrics,
    health: Health,
    campaign: Option<Campaign>,
}

impl Agent {
    pub fn new(client: Client, cfg: AgentConfig, registry: &mut Registry, health: &Health) -> Self {
        let metrics = Metrics::register(registry);
        Self {
            client,
            cfg,
            metrics,
            health: health.clone(),
            campaign: None,
        }
    }

    /// Follow the lease campaign of the process (see `kmm_runtime::Runtime`) instead of
    /// campaigning with `AgentConfig::leader_election`.
    pub fn with_campaign(mut self, campaign: Campaign) -> Self {
        self.campaign = Some(campaign);
        self
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Run until `token` is cancelled; in-flight reconciles finish first. A lost lease stops
    /// the agent at once (in-flight reconciles are dropped where they stand; their client is
    /// fenced too) with [`AgentError::LostLease`]: another replica may lead now, and the
    /// process exits to restart and campaign afresh.
    pub async fn run(self, token: CancellationToken) -> Result<(), AgentError> {
        let Agent {
            client,
            cfg,
            metrics,
            health,
            campaign,
        } = self;
        // Everything the agent starts stops with it, also when it stops for a lost lease.
        let outer = token;
        let token = outer.child_token();
        let info = client
            .apiserver_version()
            .await
            .map_err(AgentError::ServerVersion)?;
        // An unstamped build reports 0.0 (or nothing): treat the version as unknown.
        let kubernetes_minor = if info.major == "1" {
            parse_minor(&info.minor)
        } else {
            None
        };
        tracing::info!(server = %info.git_version, "connected to the API server");

        // Readiness: every cache synced, and the lease when electing.
        let gate = |n: &str| health.gate(n);
        let (gm, gd, gp, gn) = (
            gate("cache/modules"),
            gate("cache/daemonsets"),
            gate("cache/pods"),
            gate("cache/nodes"),
        );
        let gc = cfg.cluster_claims.then(|| gate("cache/clusterclaims"));
        let (campaign, lease_task) = match campaign {
            Some(c) => (c, None),
            None => {
                let lease_gate = cfg.leader_election.as_ref().map(|_| gate(LEASE_GATE));
                Campaign::start(
                    client.clone(),
                    cfg.leader_election.clone(),
                    lease_gate,
                    token.clone(),
                )
            }
        };
        let leadership = campaign.leadership.clone();

        let (modules, w_modules) = reflector::store::<Module>();
        let (daemonsets, w_ds) = reflector::store::<DaemonSet>();
        let (pods, w_pods) = reflector::store::<CachedPod>();
        let (nodes, w_nodes) = reflector::store::<Node>();
        let (claims, w_claims) = if cfg.cluster_claims {
            let (s, w) = reflector::store::<ClusterClaim>();
            (Some(s), Some(w))
        } else {
            (None, None)
        };
        let stores = Stores {
            modules,
            daemonsets,
            pods,
            nodes,
            claims,
        };
        // The reconcilers write through a client that refuses writes while not leading.
        let sink = events::spawn_writer(
            client.clone(),
            cfg.identity.clone(),
            leadership.clone(),
            metrics.clone(),
        );
        let ctx = Arc::new(Context {
            client: leadership.fence(client.clone()),
            settings: cfg.settings.clone(),
            stores: stores.clone(),
            kubernetes_minor,
            resync: cfg.resync,
            metrics: metrics.clone(),
            events: sink.clone(),
            unload_failures_reported: Default::default(),
            module_backoff: KeyedBackoff::default(),
            labelled_namespaces: Default::default(),
            dtk_tags: Default::default(),
            os_image: Default::default(),
            node_writes: node_writes::NodeWrites::new(
                cfg.node_write_delay,
                cfg.node_write_interval,
            ),
            status_gate: status_gate::StatusGate::new(cfg.status_write_delay),
        });
        // One task waits on the stores (a store's readiness wakes only one waiter) and
        // publishes "synced" to everyone else.
        let (synced_tx, synced) = tokio::sync::watch::channel(false);
        {
            let st = stores.clone();
            tokio::spawn(async move {
                wait_synced(&st).await;
                let _ = synced_tx.send(true);
                // Keep the sender so receivers never see a closed channel.
                std::future::pending::<()>().await;
            });
        }
        // Synced and leading: when the loops may start.
        let ready = {
            let (mut synced, mut leadership) = (synced.clone(), leadership.clone());
            async move {
                let _ = synced.wait_for(|s| *s).await;
                leadership.wait_for(true).await;
            }
            .boxed()
            .shared()
        };
        let (triggers, streams) = Triggers::new();

        let mut tasks = Vec::new();
        // What a burst of work (a relist, a fleet of pods starting) left in the heap goes
        // back to the system once the agent is quiet again.
        tasks.push(tokio::spawn(kmm_runtime::alloc::release_free_when_quiet(
            Duration::from_secs(10),
        )));
        let role_selector = watcher::Config::default().labels(ROLE_LABEL);
        tasks.push(tokio::spawn(informer_modules(
            Api::all(client.clone()),
            w_modules,
            triggers.clone(),
            metrics.clone(),
            gm,
            token.clone(),
        )));
        tasks.push(tokio::spawn(informer_owned::<DaemonSet>(
            "daemonsets",
            Api::all(client.clone()),
            role_selector.clone(),
            w_ds,
            cache::strip_daemonset,
            triggers::send_daemonset,
            triggers.clone(),
            gd,
            token.clone(),
        )));
        tasks.push(tokio::spawn(informer_owned::<CachedPod>(
            "pods",
            Api::all(client.clone()),
            role_selector,
            w_pods,
            cache::strip_pod,
            triggers::send_pod,
            triggers.clone(),
            gp,
            token.clone(),
        )));
        tasks.push(tokio::spawn(informer_nodes(
            Api::all(client.clone()),
            w_nodes,
            triggers.clone(),
            stores.modules.clone(),
            sink,
            gn,
            token.clone(),
        )));
        if cfg.cluster_claims {
            // OpenShift spokes: the Driver Toolkit ImageStream (looked for, never required).
            tasks.push(tokio::spawn(dtk::watch(
                client.clone(),
                ctx.dtk_tags.clone(),
                triggers.facts.clone(),
                cfg.resync,
                token.clone(),
            )));
            // OpenShift spokes: the RHCOS image the MCO keeps (nothing elsewhere).
            tasks.push(tokio::spawn(os_image::watch(
                client.clone(),
                ctx.os_image.clone(),
                triggers.facts.clone(),
                token.clone(),
            )));
        }
        if let (Some(w), Some(g)) = (w_claims, gc) {
            let q = triggers.facts.clone();
            tasks.push(tokio::spawn(run_informer(
                "clusterclaims",
                Api::<ClusterClaim>::all(client.clone()),
                watcher::Config::default(),
                w,
                cache::strip_claim,
                |_, _| (),
                move |_| q.add(()),
                g,
                token.clone(),
            )));
        }

        // The loops that are not per object: the kernel facts, and the sweep of what Modules
        // gone without our finalizer left (looked for at the start and every resync too).
        let mut workers = Vec::new();
        {
            let c = ctx.clone();
            workers.push(tokio::spawn(worker(
                FACTS_CONTROLLER,
                triggers.facts.clone(),
                ready.clone(),
                campaign.clone(),
                token.clone(),
                ctx.clone(),
                move |_: ()| {
                    let ctx = c.clone();
                    async move { facts::reconcile(&ctx).await }
                },
            )));
            let c = ctx.clone();
            workers.push(tokio::spawn(worker(
                NODE_WRITER,
                ctx.node_writes.queue(),
                ready.clone(),
                campaign.clone(),
                token.clone(),
                ctx.clone(),
                move |node: String| {
                    let ctx = c.clone();
                    async move { node_writes::reconcile(node, &ctx).await }
                },
            )));
            let c = ctx.clone();
            workers.push(tokio::spawn(worker(
                sweep::SWEEP_CONTROLLER,
                triggers.orphans.clone(),
                ready.clone(),
                campaign.clone(),
                token.clone(),
                ctx.clone(),
                move |key: ModuleKey| {
                    let ctx = c.clone();
                    async move { module::cleanup_absent(&key, &ctx).await }
                },
            )));
            let (t, st, every, ready) =
                (triggers.clone(), stores.clone(), cfg.resync, ready.clone());
            tasks.push(tokio::spawn(async move {
                ready.await;
                t.facts.add(());
                loop {
                    for key in sweep::absent_owners(&st) {
                        t.orphans.add(key);
                    }
                    tokio::time::sleep(every).await;
                }
            }));
        }

        // The Module reconciler, once synced and leading. A lost lease stops it at once:
        // in-flight reconciles are dropped where they stand (their client is fenced too).
        let stopping = {
            let (t, c) = (token.clone(), campaign.clone());
            async move {
                tokio::select! {
                    _ = t.cancelled() => {}
                    _ = c.lost() => {}
                }
            }
            .boxed()
            .shared()
        };
        let started = tokio::select! {
            _ = ready => true,
            _ = stopping.clone() => false,
        };
        if started {
            let controller =
                Controller::for_stream(streams.modules.map(Ok), stores.modules.clone())
                    .watches_stream(streams.daemonsets.map(Ok), owner_ref)
                    .watches_stream(streams.pods.map(Ok), owner_ref)
                    .reconcile_all_on(streams.all)
                    .with_config(
                        controller::Config::default()
                            .concurrency(u16::try_from(cfg.workers.max(1)).unwrap_or(u16::MAX)),
                    )
                    .graceful_shutdown_on(stopping);
            triggers.open();
            let lost = campaign.clone();
            controller
                .run(
                    move |m, ctx| {
                        let lost = lost.clone();
                        let key = module_key(&m);
                        async move {
                            tokio::select! {
                                biased;
                                _ = lost.lost() => {
                                    tracing::info!(controller = MODULE_CONTROLLER, module = %format!("{}/{}", key.0, key.1), "lost the lease: reconcile abandoned");
                                    Ok(controller::Action::await_change())
                                }
                                r = module::reconcile(m, ctx) => r,
                            }
                        }
                    },
                    module::error_policy,
                    ctx.clone(),
                )
                .for_each(|r| async move {
                    if let Err(e) = r {
                        tracing::debug!(controller = MODULE_CONTROLLER, error = %e, "controller event");
                    }
                })
                .await;
        }
        let lost = campaign.is_lost() && !outer.is_cancelled();
        tracing::info!(lost_lease = lost, "draining");
        triggers.orphans.close();
        triggers.facts.close();
        ctx.node_writes.queue().close();
        for w in workers {
            let _ = w.await;
        }
        for t in tasks {
            t.abort();
        }
        token.cancel();
        if let Some(t) = lease_task {
            let _ = shutdown::drain(t, Duration::from_secs(5)).await;
        }
        if lost {
            return Err(AgentError::LostLease);
        }
        Ok(())
    }
}

/// The minor version of a Kubernetes version string (`"34"`, `"34+"`); `None` when unreadable.
pub fn parse_minor(minor: &str) -> Option<u32> {
    let digits: String = minor.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Wait for every store. Only one task may wait on a store at a time: a store's readiness
/// signal wakes a single waiter.
async fn wait_synced(stores: &Stores) {
    let _ = stores.modules.wait_until_ready().await;
    let _ = stores.daemonsets.wait_until_ready().await;
    let _ = stores.pods.wait_until_ready().await;
    let _ = stores.nodes.wait_until_ready().await;
    if let Some(c) = &stores.claims {
        let _ = c.wait_until_ready().await;
    }
}

/// The key of a Module: `(namespace, name)`.
pub fn module_key(m: &Module) -> ModuleKey {
    (m.namespace().unwrap_or_default(), m.name_any())
}
