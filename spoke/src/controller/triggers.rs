//! The agent's informers and what their events trigger: the Module `Controller`'s streams
//! (Modules, owned DaemonSets and pods mapped to their Module, "every Module" on node changes
//! and relists), the orphan sweep, the kernel facts and the node events.
//!
//! Triggers are computed before a store update (so node transitions compare the old object
//! with the new) and sent after it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::channel::mpsc::{UnboundedReceiver, UnboundedSender, unbounded};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Node;
use kmm_runtime::admin::ReadyGate;
use kmm_runtime::queue::WorkQueue;
use kmm_runtime::shutdown::CancellationToken;
use kube::api::Api;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use shared_api::Module;
use shared_api::labels::{KERNEL_LABEL, MODULE_NAME_LABEL};

use super::events::{EventSink, NodeEvent, ready_transitions};
use super::{ModuleKey, module_key};
use crate::cache::{self, CachedPod, run_informer};
use crate::metrics::Metrics;
use crate::render::nodes::{node_boot_id, node_kernel};

/// Where the informers send what they saw. The `Controller`'s streams stay closed until it
/// runs (synced and leading): before that nothing is kept, and its first act is to reconcile
/// every Module.
#[derive(Clone)]
pub struct Triggers {
    open: Arc<AtomicBool>,
    modules: UnboundedSender<Module>,
    daemonsets: UnboundedSender<DaemonSet>,
    pods: UnboundedSender<CachedPod>,
    all: UnboundedSender<()>,
    /// Keys of Modules that may be gone (the sweep skips those in the store).
    pub orphans: Arc<WorkQueue<ModuleKey>>,
    pub facts: Arc<WorkQueue<()>>,
}

/// The receiving ends of the `Controller`'s streams.
pub struct ControllerStreams {
    pub modules: UnboundedReceiver<Module>,
    pub daemonsets: UnboundedReceiver<DaemonSet>,
    pub pods: UnboundedReceiver<CachedPod>,
    pub all: UnboundedReceiver<()>,
}

impl Triggers {
    pub fn new() -> (Self, ControllerStreams) {
        let (modules, modules_rx) = unbounded();
        let (daemonsets, daemonsets_rx) = unbounded();
        let (pods, pods_rx) = unbounded();
        let (all, all_rx) = unbounded();
        let triggers = Self {
            open: Arc::new(AtomicBool::new(false)),
            modules,
            daemonsets,
            pods,
            all,
            orphans: Arc::new(WorkQueue::new()),
            facts: Arc::new(WorkQueue::new()),
        };
        let streams = ControllerStreams {
            modules: modules_rx,
            daemonsets: daemonsets_rx,
            pods: pods_rx,
            all: all_rx,
        };
        (triggers, streams)
    }

    /// The `Controller` runs: pass triggers on from now, starting with every Module.
    pub fn open(&self) {
        self.open.store(true, Ordering::SeqCst);
        self.all_modules();
    }

    fn is_open(&self) -> bool {
        self.open.load(Ordering::SeqCst)
    }

    pub fn all_modules(&self) {
        if self.is_open() {
            let _ = self.all.unbounded_send(());
        }
    }

    fn module(&self, m: &Module) {
        if self.is_open() {
            let _ = self.modules.unbounded_send(m.clone());
        }
    }

    fn daemonset(&self, ds: &DaemonSet) {
        if self.is_open() {
            let _ = self.daemonsets.unbounded_send(ds.clone());
        }
    }

    fn pod(&self, p: &CachedPod) {
        if self.is_open() {
            let _ = self.pods.unbounded_send(p.clone());
        }
    }
}

/// What the agent makes for a Module (its DaemonSets and pods): which Module it belongs to,
/// by its owner label.
pub trait Owned {
    fn module_key(&self) -> Option<ModuleKey>;
}

impl Owned for DaemonSet {
    fn module_key(&self) -> Option<ModuleKey> {
        let name = self.labels().get(MODULE_NAME_LABEL)?.clone();
        Some((self.namespace().unwrap_or_default(), name))
    }
}

impl Owned for CachedPod {
    fn module_key(&self) -> Option<ModuleKey> {
        CachedPod::module_key(self)
    }
}

/// [`Owned::module_key`] as the `Controller`'s mapper.
pub fn owner_ref<K: Owned>(o: K) -> Option<ObjectRef<Module>> {
    o.module_key()
        .map(|(ns, name)| ObjectRef::new(&name).within(&ns))
}

enum ModuleTrigger {
    None,
    Applied(Box<Module>),
    /// The key's Module may be gone: the sweep looks.
    Deleted(ModuleKey),
    /// After a (re)list: the Modules of the previous list (the store still holds it here)
    /// that vanished meanwhile need their clean-up; the new list its reconcile.
    Relisted(Vec<ModuleKey>),
}

pub async fn informer_modules(
    api: Api<Module>,
    writer: reflector::store::Writer<Module>,
    triggers: Triggers,
    metrics: Metrics,
    gate: ReadyGate,
    token: CancellationToken,
) {
    let reader = writer.as_reader();
    run_informer(
        "modules",
        api,
        watcher::Config::default(),
        writer,
        cache::strip_module,
        |store: &Store<Module>, ev: &watcher::Event<Module>| match ev {
            watcher::Event::Apply(m) => ModuleTrigger::Applied(Box::new(m.clone())),
            watcher::Event::Delete(m) => ModuleTrigger::Deleted(module_key(m)),
            watcher::Event::InitDone => {
                ModuleTrigger::Relisted(store.state().iter().map(|m| module_key(m)).collect())
            }
            _ => ModuleTrigger::None,
        },
        move |t: ModuleTrigger| {
            match t {
                ModuleTrigger::None => {}
                ModuleTrigger::Applied(m) => triggers.module(&m),
                ModuleTrigger::Deleted(k) => triggers.orphans.add(k),
                ModuleTrigger::Relisted(keys) => {
                    for k in keys {
                        triggers.orphans.add(k);
                    }
                    triggers.all_modules();
                }
            }
            metrics.modules.set(reader.len() as i64);
        },
        gate,
        token,
    )
    .await;
}

/// DaemonSets and pods: each event triggers its Module (by owner label), or the sweep when
/// that Module is gone.
#[allow(clippy::too_many_arguments)]
pub async fn informer_owned<K>(
    kind: &'static str,
    api: Api<K>,
    config: watcher::Config,
    writer: reflector::store::Writer<K>,
    strip: fn(&mut K),
    send: fn(&Triggers, &K),
    triggers: Triggers,
    gate: ReadyGate,
    token: CancellationToken,
) where
    K: Resource<DynamicType = ()>
        + Owned
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
                o.module_key().map(|k| (Some((o.clone(), k)), false))
            }
            watcher::Event::InitDone => Some((None, true)),
            _ => None,
        },
        move |t: Option<(Option<(K, ModuleKey)>, bool)>| {
            let Some((object, relisted)) = t else { return };
            if let Some((o, key)) = object {
                send(&triggers, &o);
                triggers.orphans.add(key);
            }
            if relisted {
                triggers.all_modules();
            }
        },
        gate,
        token,
    )
    .await;
}

pub fn send_daemonset(t: &Triggers, ds: &DaemonSet) {
    t.daemonset(ds);
}

pub fn send_pod(t: &Triggers, p: &CachedPod) {
    t.pod(p);
}

#[derive(Default)]
struct NodeTriggers {
    all_modules: bool,
    facts: bool,
    events: Vec<NodeEvent>,
}

/// What of a node matters to the reconcilers: labels, the agent's annotations, taints,
/// kernel, boot (a reboot unloads every module), deletion.
/// `status.nodeInfo.osImage`, empty when not reported.
fn node_os_image(n: &Node) -> &str {
    n.status
        .as_ref()
        .and_then(|s| s.node_info.as_ref())
        .map_or("", |i| i.os_image.as_str())
}

fn node_changed(old: &Node, new: &Node) -> bool {
    old.metadata.labels != new.metadata.labels
        || old.metadata.annotations != new.metadata.annotations
        || old.spec.as_ref().map(|s| &s.taints) != new.spec.as_ref().map(|s| &s.taints)
        || node_kernel(old) != node_kernel(new)
        || node_boot_id(old) != node_boot_id(new)
        || old.metadata.deletion_timestamp.is_some() != new.metadata.deletion_timestamp.is_some()
        || old.metadata.uid != new.metadata.uid
}

pub async fn informer_nodes(
    api: Api<Node>,
    writer: reflector::store::Writer<Node>,
    triggers: Triggers,
    modules: Store<Module>,
    sink: EventSink,
    gate: ReadyGate,
    token: CancellationToken,
) {
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
                            t.events = ready_transitions(&old, new, &modules);
                        }
                        // An OS update changes the Driver Toolkit of the node's kernel.
                        t.facts |= node_os_image(&old) != node_os_image(new);
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
                triggers.all_modules();
            }
            if t.facts {
                triggers.facts.add(());
            }
        },
        gate,
        token,
    )
    .await;
}
