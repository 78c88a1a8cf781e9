//! The agent: caches, the Module and kernel-facts reconcilers, node events, leader election.

pub mod events;
pub mod facts;
pub mod labels;
pub mod module;
pub mod orphans;
pub mod sequence;
pub mod status;
#[cfg(test)]
mod testkit;
pub mod writes;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Node, Pod};
use kmm_runtime::ErrorCategory;
use kmm_runtime::admin::{Health, ReadyGate};
use kmm_runtime::backoff::KeyedBackoff;
use kmm_runtime::lease::{Campaign, Leadership, LeaseConfig};
use kmm_runtime::queue::{Action, WorkQueue};
use kmm_runtime::runtime::LEASE_GATE;
use kmm_runtime::shutdown::{self, CancellationToken};
use kube::api::Api;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use prometheus_client::registry::Registry;
use shared_api::labels::{KERNEL_LABEL, MODULE_NAME_LABEL, ROLE_LABEL};
use shared_api::{ClusterClaim, Module};

use crate::cache::{self, run_informer};
use crate::error::{AgentError, ReconcileError};
use crate::metrics::Metrics;
use crate::render::RenderSettings;
use crate::render::nodes::node_kernel;
use events::{EventSink, NodeEvent, ready_transitions};

/// `(namespace, name)` of a Module.
pub type ModuleKey = (String, String);

const MODULE_CONTROLLER: &str = "module";
const FACTS_CONTROLLER: &str = "kernel-facts";

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
        }
    }
}

/// The caches the reconcilers read.
#[derive(Clone)]
pub struct Stores {
    pub modules: Store<Module>,
    pub daemonsets: Store<DaemonSet>,
    pub pods: Store<Pod>,
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
        let (pods, w_pods) = reflector::store::<Pod>();
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
        let module_queue = Arc::new(WorkQueue::<ModuleKey>::new());
        let facts_queue = Arc::new(WorkQueue::<()>::new());

        let mut tasks = Vec::new();
        let role_selector = watcher::Config::default().labels(ROLE_LABEL);
        tasks.push(tokio::spawn(informer_modules(
            Api::all(client.clone()),
            w_modules,
            module_queue.clone(),
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
            module_queue.clone(),
            stores.modules.clone(),
            gd,
            token.clone(),
        )));
        tasks.push(tokio::spawn(informer_owned::<Pod>(
            "pods",
            Api::all(client.clone()),
            role_selector,
            w_pods,
            cache::strip_pod,
            module_queue.clone(),
            stores.modules.clone(),
            gp,
            token.clone(),
        )));
        tasks.push(tokio::spawn(informer_nodes(
            Api::all(client.clone()),
            w_nodes,
            module_queue.clone(),
            facts_queue.clone(),
            stores.modules.clone(),
            sink,
            gn,
            token.clone(),
        )));
        if let (Some(w), Some(g)) = (w_claims, gc) {
            let q = facts_queue.clone();
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

        // Reconcile everything whenever leadership is (re)gained.
        {
            let (mut l, mq, fq, st) = (
                leadership.clone(),
                module_queue.clone(),
                facts_queue.clone(),
                stores.clone(),
            );
            let (t, mut synced) = (token.clone(), synced.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    l.wait_for(true).await;
                    let _ = synced.wait_for(|s| *s).await;
                    enqueue_all(&st.modules, &mq);
                    fq.add(());
                    tokio::select! {
                        _ = t.cancelled() => break,
                        _ = l.wait_for(false) => {}
                    }
                }
            }));
        }

        let mut workers = Vec::new();
        for _ in 0..cfg.workers.max(1) {
            let (ctx, q, l, st) = (
                ctx.clone(),
                module_queue.clone(),
                leadership.clone(),
                synced.clone(),
            );
            workers.push(tokio::spawn(worker(
                MODULE_CONTROLLER,
                q,
                l,
                st,
                campaign.clone(),
                token.clone(),
                ctx.clone(),
                move |key: ModuleKey| {
                    let ctx = ctx.clone();
                    async move { module::reconcile(&key, &ctx).await }
                },
            )));
        }
        {
            let (ctx, q, l, st) = (
                ctx.clone(),
                facts_queue.clone(),
                leadership.clone(),
                synced.clone(),
            );
            workers.push(tokio::spawn(worker(
                FACTS_CONTROLLER,
                q,
                l,
                st,
                campaign.clone(),
                token.clone(),
                ctx.clone(),
                move |_: ()| {
                    let ctx = ctx.clone();
                    async move { facts::reconcile(&ctx).await }
                },
            )));
        }

        tokio::select! {
            _ = token.cancelled() => {}
            _ = campaign.lost() => {}
        }
        let lost = campaign.is_lost() && !outer.is_cancelled();
        tracing::info!(lost_lease = lost, "draining");
        module_queue.close();
        facts_queue.close();
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

fn parse_minor(minor: &str) -> Option<u32> {
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

fn module_key(m: &Module) -> ModuleKey {
    (m.namespace().unwrap_or_default(), m.name_any())
}

fn enqueue_all(modules: &Store<Module>, queue: &WorkQueue<ModuleKey>) {
    for m in modules.state() {
        queue.add(module_key(&m));
    }
}

/// Take keys once leading, reconcile, requeue per the result or the key's backoff; stop when
/// the queue closes or the lease is lost.
#[allow(clippy::too_many_arguments)]
async fn worker<K, F, Fut>(
    controller: &'static str,
    queue: Arc<WorkQueue<K>>,
    mut leadership: Leadership,
    mut synced: tokio::sync::watch::Receiver<bool>,
    campaign: Campaign,
    stop: CancellationToken,
    ctx: Arc<Context>,
    reconcile: F,
) where
    K: std::hash::Hash + Eq + Clone + std::fmt::Debug + Send + Sync + 'static,
    F: Fn(K) -> Fut,
    Fut: Future<Output = Result<Action, ReconcileError>>,
{
    let backoff = KeyedBackoff::<K>::default();
    tokio::select! {
        _ = async {
            let _ = synced.wait_for(|s| *s).await;
            leadership.wait_for(true).await;
        } => {}
        _ = stop.cancelled() => return,
    }
    tracing::debug!(controller, "worker started");
    loop {
        let Some(key) = queue.next().await else { break };
        tracing::debug!(controller, key = ?key, "reconciling");
        ctx.metrics
            .controllers
            .set_queue_depth(controller, queue.len());
        let started = Instant::now();
        // Losing the lease drops the reconcile where it stands (its client is fenced too) and
        // stops the agent.
        let result = tokio::select! {
            biased;
            _ = campaign.lost() => {
                tracing::info!(controller, key = ?key, "lost the lease: reconcile abandoned");
                queue.done(&key);
                break;
            }
            r = reconcile(key.clone()) => r,
        };
        match result {
            Ok(action) => {
                ctx.metrics
                    .controllers
                    .observe(controller, started.elapsed(), None);
                backoff.reset(&key);
                if let Action::Requeue(after) = action {
                    queue.add_after(key.clone(), after);
                }
            }
            Err(e) => {
                ctx.metrics
                    .controllers
                    .observe(controller, started.elapsed(), Some(e.category()));
                let delay = backoff.next(&key);
                tracing::warn!(controller, key = ?key, error = %e, category = e.category(), retry_in = ?delay, "reconcile failed");
                queue.add_after(key.clone(), delay);
            }
        }
        queue.done(&key);
    }
}

async fn informer_modules(
    api: Api<Module>,
    writer: reflector::store::Writer<Module>,
    queue: Arc<WorkQueue<ModuleKey>>,
    metrics: Metrics,
    gate: ReadyGate,
    token: CancellationToken,
) {
    let reader = writer.as_reader();
    let q = queue.clone();
    run_informer(
        "modules",
        api,
        watcher::Config::default(),
        writer,
        cache::strip_module,
        // (keys, and whether every Module of the new list is due too)
        |store: &Store<Module>, ev: &watcher::Event<Module>| match ev {
            watcher::Event::Apply(m) | watcher::Event::Delete(m) => (vec![module_key(m)], false),
            // After a (re)list: the Modules that vanished meanwhile need their cleanup (the
            // store still holds the old list here), and those that appeared or changed
            // meanwhile (an API server restart, an expired watch) their reconcile: the new
            // list is in the store only after this event, so `after` enqueues it.
            watcher::Event::InitDone => {
                (store.state().iter().map(|m| module_key(m)).collect(), true)
            }
            _ => (Vec::new(), false),
        },
        move |(keys, relisted): (Vec<ModuleKey>, bool)| {
            for k in keys {
                q.add(k);
            }
            if relisted {
                enqueue_all(&reader, &q);
            }
            metrics.modules.set(reader.len() as i64);
        },
        gate,
        token,
    )
    .await;
    let _ = queue;
}

/// DaemonSets and pods: map each object to its Module by owner label.
#[allow(clippy::too_many_arguments)]
async fn informer_owned<K>(
    kind: &'static str,
    api: Api<K>,
    config: watcher::Config,
    writer: reflector::store::Writer<K>,
    strip: fn(&mut K),
    queue: Arc<WorkQueue<ModuleKey>>,
    modules: Store<Module>,
    gate: ReadyGate,
    token: CancellationToken,
) where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    run_informer(
        kind,
        api,
        config,
        writer,
        strip,
        |_store: &Store<K>, ev: &watcher::Event<K>| match ev {
            watcher::Event::Apply(o) | watcher::Event::Delete(o) => {
                owner_key(o).into_iter().collect::<Vec<_>>()
            }
            watcher::Event::InitDone => vec![("".into(), "".into())],
            _ => Vec::new(),
        },
        move |keys: Vec<ModuleKey>| {
            for k in keys {
                if k.0.is_empty() {
                    enqueue_all(&modules, &queue);
                } else {
                    queue.add(k);
                }
            }
        },
        gate,
        token,
    )
    .await;
}

fn owner_key<K: kube::Resource>(o: &K) -> Option<ModuleKey> {
    let name = o.meta().labels.as_ref()?.get(MODULE_NAME_LABEL)?.clone();
    Some((o.meta().namespace.clone().unwrap_or_default(), name))
}

#[derive(Default)]
struct NodeTriggers {
    all_modules: bool,
    facts: bool,
    events: Vec<NodeEvent>,
}

/// What of a node matters to the reconcilers: labels, taints, kernel, deletion.
fn node_changed(old: &Node, new: &Node) -> bool {
    old.metadata.labels != new.metadata.labels
        || old.spec.as_ref().map(|s| &s.taints) != new.spec.as_ref().map(|s| &s.taints)
        || node_kernel(old) != node_kernel(new)
        || old.metadata.deletion_timestamp.is_some() != new.metadata.deletion_timestamp.is_some()
        || old.metadata.uid != new.metadata.uid
}

#[allow(clippy::too_many_arguments)]
async fn informer_nodes(
    api: Api<Node>,
    writer: reflector::store::Writer<Node>,
    module_queue: Arc<WorkQueue<ModuleKey>>,
    facts_queue: Arc<WorkQueue<()>>,
    modules: Store<Module>,
    sink: EventSink,
    gate: ReadyGate,
    token: CancellationToken,
) {
    let modules_for_events = modules.clone();
    run_informer(
        "nodes",
        api,
        watcher::Config::default(),
        writer,
        cache::strip_node,
        move |store: &Store<Node>, ev: &watcher::Event<Node>| {
            let mut t = NodeTriggers::default();
            match ev {
                watcher::Event::Apply(new) | watcher::Event::InitApply(new) => match store
                    .get(&ObjectRef::from_obj(new))
                {
                    None => {
                        t.all_modules = true;
                        t.facts = true;
                    }
                    Some(old) => {
                        if node_changed(&old, new) {
                            t.all_modules = true;
                            // Someone may have removed our kernel label.
                            t.facts = node_kernel(&old) != node_kernel(new)
                                || old.labels().get(KERNEL_LABEL) != new.labels().get(KERNEL_LABEL)
                                || old.metadata.uid != new.metadata.uid;
                            t.events = ready_transitions(&old, new, &modules_for_events);
                        }
                    }
                },
                watcher::Event::Delete(_) | watcher::Event::InitDone => {
                    t.all_modules = true;
                    t.facts = true;
                }
                watcher::Event::Init => {}
            }
            t
        },
        move |t: NodeTriggers| {
            for e in t.events {
                sink.send(e);
            }
            if t.all_modules {
                enqueue_all(&modules, &module_queue);
            }
            if t.facts {
                facts_queue.add(());
            }
        },
        gate,
        token,
    )
    .await;
}
