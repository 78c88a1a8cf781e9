//! `ModuleLoaded` / `ModuleUnloaded` events on Nodes (`events.k8s.io/v1`), recorded when a
//! Module's ready label appears on or disappears from a node, as seen in the Node watch.

use std::collections::BTreeMap;
use tracing::Instrument;

use k8s_openapi::api::core::v1::{Node, ObjectReference};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kmm_runtime::lease::Leadership;
use kube::api::{Api, PostParams};
use kube::runtime::reflector::Store;
use kube::{Client, Resource, ResourceExt};
use shared_api::Module;
use shared_api::labels::{
    MODULE_ANNOTATION, module_ready_label, ready_boot_annotation, recorded_boot_id,
};
use tokio::sync::mpsc;
use tokio::time::{Duration, Instant};

use crate::metrics::Metrics;
use crate::render::nodes::node_boot_id;

/// The reporting controller of our events.
pub const REPORTING_CONTROLLER: &str = "kmm-spoke";
pub const MODULE_LOADED: &str = "ModuleLoaded";
pub const MODULE_UNLOADED: &str = "ModuleUnloaded";
/// Warning: a loader stopped with its module still in the kernel.
pub const MODULE_UNLOAD_FAILED: &str = "ModuleUnloadFailed";
/// Where the Node events live: `default`, as upstream's recorder writes them. Events about
/// cluster-scoped objects (with `eventTime` set) may only be in `default` or `kube-system`: the
/// API server rejects them elsewhere ("involvedObject.namespace does not match event.namespace").
pub const EVENT_NAMESPACE: &str = "default";

/// A Module an event is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleRef {
    pub namespace: String,
    pub name: String,
    pub uid: Option<String>,
}

impl ModuleRef {
    fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// One event on a node: the same transition of one Module or of several at once (the node
/// writer sets every Module's labels on a node in one write, so a reboot unloads and loads
/// them together).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeEvent {
    pub node: String,
    pub node_uid: Option<String>,
    pub reason: &'static str,
    /// At least one, sorted.
    pub modules: Vec<ModuleRef>,
    /// What went wrong (for [`MODULE_UNLOAD_FAILED`]).
    pub detail: String,
    /// [`MODULE_UNLOADED`]: the modules left the kernel with a reboot of the node (the ready
    /// label went because the node reports another boot). [`MODULE_LOADED`]: loaded again
    /// after such a reboot ([`RebootMerge`]).
    pub reboot: bool,
    /// The node's boot ID when the transition was seen (what tells the withdrawals of one
    /// reboot, seen in several node writes, from a second reboot).
    pub boot: Option<String>,
}

impl NodeEvent {
    /// `ns/name` of each Module, comma-separated: the `module` annotation (upstream's, for
    /// one Module) and the log field.
    pub fn module_keys(&self) -> String {
        self.modules
            .iter()
            .map(ModuleRef::key)
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn message(&self) -> String {
        let keys: Vec<String> = self.modules.iter().map(ModuleRef::key).collect();
        let (what, them) = match keys.as_slice() {
            [one] => ("Module", one.clone()),
            many => ("Modules", many.join(", ")),
        };
        if self.reason == MODULE_LOADED && self.reboot {
            format!("{what} {them} loaded into the kernel again after the node rebooted")
        } else if self.reason == MODULE_LOADED {
            format!("{what} {them} loaded into the kernel")
        } else if self.reason == MODULE_UNLOADED && self.reboot {
            format!("{what} {them} left the kernel with a reboot of the node")
        } else if self.reason == MODULE_UNLOAD_FAILED {
            format!(
                "{what} {them} could not be unloaded; it stays in the kernel: {}",
                self.detail
            )
        } else {
            format!("{what} {them} unloaded from the kernel")
        }
    }
}

/// Ready-label transitions between two states of a node, for the Modules known now: one
/// event per reason, naming every Module that made that transition.
pub fn ready_transitions(old: &Node, new: &Node, modules: &Store<Module>) -> Vec<NodeEvent> {
    let empty = BTreeMap::new();
    let old_labels = old.metadata.labels.as_ref().unwrap_or(&empty);
    let new_labels = new.metadata.labels.as_ref().unwrap_or(&empty);
    let mut loaded = Vec::new();
    let mut unloaded = Vec::new();
    let mut rebooted = Vec::new();
    let boot = node_boot_id(new);
    for module in modules.state() {
        let ns = module.namespace().unwrap_or_default();
        let name = module.name_any();
        let key = module_ready_label(&ns, &name);
        // The label confirmed in another boot than the node's: gone with a reboot.
        let lost_in_reboot = || {
            let recorded = new.annotations().get(&ready_boot_annotation(&ns, &name));
            let recorded_boot = recorded.and_then(|r| recorded_boot_id(r));
            recorded_boot.is_some() && boot.is_some() && recorded_boot != boot
        };
        let to = match (old_labels.contains_key(&key), new_labels.contains_key(&key)) {
            (false, true) => &mut loaded,
            (true, false) if lost_in_reboot() => &mut rebooted,
            (true, false) => &mut unloaded,
            _ => continue,
        };
        to.push(ModuleRef {
            namespace: ns,
            name,
            uid: module.uid(),
        });
    }
    [
        (MODULE_UNLOADED, true, rebooted),
        (MODULE_UNLOADED, false, unloaded),
        (MODULE_LOADED, false, loaded),
    ]
    .into_iter()
    .filter(|(_, _, m)| !m.is_empty())
    .map(|(reason, reboot, modules)| NodeEvent {
        node: new.name_any(),
        node_uid: new.uid(),
        reason,
        modules: sorted(modules),
        detail: String::new(),
        reboot,
        boot: boot.map(str::to_string),
    })
    .collect()
}

/// How long the modules a reboot took out of a node's kernel may take to load again and be
/// recorded as one `ModuleLoaded` event ("loaded into the kernel again after the node
/// rebooted") instead of a `ModuleUnloaded` and a `ModuleLoaded`.
pub const REBOOT_MERGE_WINDOW: Duration = Duration::from_secs(60);

/// A node event to write, with the time it happened.
pub type Timed = (NodeEvent, Timestamp);

/// The events of reboots held back: a reboot's `ModuleUnloaded` waits up to
/// [`REBOOT_MERGE_WINDOW`] for the same modules' `ModuleLoaded` on that node, and they become
/// one event, written when the last of them is back ("loaded into the kernel again after the
/// node rebooted"), however many node writes brought their labels back. Modules not back in
/// time get their `ModuleUnloaded`, with the time the reboot took them out, and those back by
/// then their merged `ModuleLoaded`.
#[derive(Debug, Default)]
pub struct RebootMerge {
    parked: BTreeMap<String, Parked>,
}

/// One node's reboot, held back.
#[derive(Debug)]
struct Parked {
    deadline: Instant,
    /// The reboot's unload: the modules not back yet.
    unloaded: Timed,
    /// The modules back already, and when the newest came back (the reboot's time while none
    /// is).
    back: Vec<ModuleRef>,
    back_at: Timestamp,
}

impl Parked {
    /// What is held, as the events to write now: the modules back (one merged `ModuleLoaded`),
    /// then those that are not (the reboot's `ModuleUnloaded`).
    fn release(self) -> Vec<Timed> {
        let (unloaded, at) = self.unloaded;
        let mut out = Vec::new();
        if !self.back.is_empty() {
            out.push((
                NodeEvent {
                    reason: MODULE_LOADED,
                    modules: self.back,
                    ..unloaded.clone()
                },
                self.back_at,
            ));
        }
        if !unloaded.modules.is_empty() {
            out.push((unloaded, at));
        }
        out
    }
}

fn sorted(mut modules: Vec<ModuleRef>) -> Vec<ModuleRef> {
    modules.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    modules
}

impl RebootMerge {
    /// The events to write now for `ev`, seen at `now` (`at` as a timestamp).
    pub fn offer(&mut self, ev: NodeEvent, now: Instant, at: Timestamp) -> Vec<Timed> {
        if ev.reason == MODULE_UNLOADED && ev.reboot {
            // More of the same reboot's withdrawals (a later node write of that boot): held
            // with the first ones.
            if let Some(parked) = self.parked.get_mut(&ev.node)
                && ev.boot.is_some()
                && parked.unloaded.0.boot == ev.boot
            {
                let unloaded = &mut parked.unloaded.0.modules;
                for m in ev.modules {
                    if !unloaded.iter().any(|p| p.key() == m.key()) {
                        unloaded.push(m);
                    }
                }
                *unloaded = sorted(std::mem::take(unloaded));
                return Vec::new();
            }
            // A second reboot before the first one's modules were all back: the first one's
            // events go now.
            let out = self
                .parked
                .remove(&ev.node)
                .map(Parked::release)
                .unwrap_or_default();
            self.parked.insert(
                ev.node.clone(),
                Parked {
                    deadline: now + REBOOT_MERGE_WINDOW,
                    unloaded: (ev, at),
                    back: Vec::new(),
                    back_at: at,
                },
            );
            return out;
        }
        let Some(mut parked) = self.parked.remove(&ev.node) else {
            return vec![(ev, at)];
        };
        if ev.reason != MODULE_LOADED {
            // Another transition of a module already back: what is held about it goes first.
            let touches = |m: &ModuleRef| ev.modules.iter().any(|e| e.key() == m.key());
            if !parked.back.iter().any(touches) {
                self.parked.insert(ev.node.clone(), parked);
                return vec![(ev, at)];
            }
            let mut out = parked.release();
            out.push((ev, at));
            return out;
        }
        let unloaded = &mut parked.unloaded.0.modules;
        let (again, fresh): (Vec<ModuleRef>, Vec<ModuleRef>) = ev
            .modules
            .iter()
            .cloned()
            .partition(|m| unloaded.iter().any(|p| p.key() == m.key()));
        unloaded.retain(|p| !again.iter().any(|m| m.key() == p.key()));
        if !again.is_empty() {
            parked.back = sorted(parked.back.into_iter().chain(again).collect());
            parked.back_at = at;
        }
        let mut out = Vec::new();
        if !fresh.is_empty() {
            out.push((
                NodeEvent {
                    modules: fresh,
                    ..ev.clone()
                },
                at,
            ));
        }
        if parked.unloaded.0.modules.is_empty() {
            out.extend(parked.release());
        } else {
            self.parked.insert(ev.node, parked);
        }
        out
    }

    /// The held-back events whose window ended by `now`.
    pub fn due(&mut self, now: Instant) -> Vec<Timed> {
        let nodes: Vec<String> = self
            .parked
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(n, _)| n.clone())
            .collect();
        nodes
            .into_iter()
            .filter_map(|n| self.parked.remove(&n))
            .flat_map(Parked::release)
            .collect()
    }

    /// When the next held-back event is due.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.parked.values().map(|p| p.deadline).min()
    }
}

/// Where informers send events; a background task writes them (only while leading).
#[derive(Clone, Debug)]
pub struct EventSink {
    tx: mpsc::UnboundedSender<NodeEvent>,
}

impl EventSink {
    pub fn send(&self, ev: NodeEvent) {
        // The writer task ends only at shutdown; events after that are dropped on purpose.
        let _ = self.tx.send(ev);
    }
}

/// Start the event writer task.
pub fn spawn_writer(
    client: Client,
    identity: String,
    leadership: Leadership,
    metrics: Metrics,
) -> EventSink {
    let (tx, mut rx) = mpsc::unbounded_channel::<NodeEvent>();
    tokio::spawn(async move {
        let api: Api<Event> = Api::namespaced(client, EVENT_NAMESPACE);
        let mut merge = RebootMerge::default();
        let mut last = Timestamp::UNIX_EPOCH;
        loop {
            let deadline = merge.next_deadline();
            let ready = tokio::select! {
                ev = rx.recv() => match ev {
                    Some(ev) => merge.offer(ev, Instant::now(), Timestamp::now()),
                    None => break,
                },
                _ = async {
                    match deadline {
                        Some(d) => tokio::time::sleep_until(d).await,
                        None => std::future::pending().await,
                    }
                } => merge.due(Instant::now()),
            };
            if !leadership.is_leader() {
                continue;
            }
            for (ev, at) in ready {
                // The event's name comes from its time: two events of one node never share it.
                let at = unique_after(at, &mut last);
                write_event(&api, &ev, &identity, at, &metrics).await;
            }
        }
    });
    EventSink { tx }
}

/// `at`, or a nanosecond after `last` when `at` is not later (two events released together
/// carry one time), and remembered in `last`.
fn unique_after(at: Timestamp, last: &mut Timestamp) -> Timestamp {
    let at = if at > *last {
        at
    } else {
        last.checked_add(k8s_openapi::jiff::SignedDuration::from_nanos(1))
            .unwrap_or(at)
    };
    *last = at;
    at
}

/// Create one node event.
async fn write_event(
    api: &Api<Event>,
    ev: &NodeEvent,
    identity: &str,
    at: Timestamp,
    metrics: &Metrics,
) {
    let event = render_event(ev, identity, at);
    let span = tracing::info_span!("node_event", node = %ev.node, module = %ev.module_keys());
    match api
        .create(&PostParams::default(), &event)
        .instrument(span)
        .await
    {
        Ok(_) => {
            metrics.write("event");
            metrics.event(ev.reason);
            tracing::info!(node = %ev.node, module = %ev.module_keys(), reason = ev.reason, "node event");
        }
        Err(e) => {
            tracing::warn!(node = %ev.node, reason = ev.reason, error = %e, "cannot record node event")
        }
    }
}

/// The `events.k8s.io/v1` Event for one transition.
pub fn render_event(ev: &NodeEvent, identity: &str, now: Timestamp) -> Event {
    Event {
        metadata: ObjectMeta {
            name: Some(format!("{}.{:x}", ev.node, now.as_nanosecond())),
            namespace: Some(EVENT_NAMESPACE.into()),
            annotations: Some(BTreeMap::from([(
                MODULE_ANNOTATION.to_string(),
                ev.module_keys(),
            )])),
            ..Default::default()
        },
        action: Some(if ev.reason == MODULE_LOADED {
            "Load".into()
        } else {
            "Unload".into()
        }),
        reason: Some(ev.reason.into()),
        note: Some(ev.message()),
        type_: Some(if ev.reason == MODULE_UNLOAD_FAILED {
            "Warning".into()
        } else {
            "Normal".into()
        }),
        event_time: Some(MicroTime(now)),
        reporting_controller: Some(REPORTING_CONTROLLER.into()),
        reporting_instance: Some(identity.chars().take(128).collect()),
        regarding: Some(ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(ev.node.clone()),
            uid: ev.node_uid.clone(),
            ..Default::default()
        }),
        // One related object: the Module, when the event is about one.
        related: match ev.modules.as_slice() {
            [m] => Some(ObjectReference {
                api_version: Some(Module::api_version(&()).into_owned()),
                kind: Some(Module::kind(&()).into_owned()),
                namespace: Some(m.namespace.clone()),
                name: Some(m.name.clone()),
                uid: m.uid.clone(),
                ..Default::default()
            }),
            _ => None,
        },
        ..Default::default()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn node_event(reason: &'static str) -> NodeEvent {
        NodeEvent {
            node: "n1".into(),
            node_uid: Some("u1".into()),
            reason,
            modules: vec![ModuleRef {
                namespace: "ns".into(),
                name: "m".into(),
                uid: None,
            }],
            detail: String::new(),
            reboot: false,
            boot: None,
        }
    }

    /// Reason, type, note and the `module` annotation as upstream KMM records them on Nodes.
    #[test]
    fn node_events_have_upstreams_shape() {
        assert_eq!(MODULE_LOADED, "ModuleLoaded");
        assert_eq!(MODULE_UNLOADED, "ModuleUnloaded");
        for (reason, note) in [
            (MODULE_LOADED, "Module ns/m loaded into the kernel"),
            (MODULE_UNLOADED, "Module ns/m unloaded from the kernel"),
        ] {
            let ev = render_event(&node_event(reason), "me", Timestamp::UNIX_EPOCH);
            assert_eq!(ev.reason.as_deref(), Some(reason));
            assert_eq!(ev.type_.as_deref(), Some("Normal"));
            assert_eq!(ev.note.as_deref(), Some(note));
            assert_eq!(
                ev.metadata
                    .annotations
                    .unwrap()
                    .get("module")
                    .map(String::as_str),
                Some("ns/m")
            );
            let regarding = ev.regarding.unwrap();
            assert_eq!(regarding.kind.as_deref(), Some("Node"));
            assert_eq!(regarding.name.as_deref(), Some("n1"));
        }
        let failed = render_event(
            &node_event(MODULE_UNLOAD_FAILED),
            "me",
            Timestamp::UNIX_EPOCH,
        );
        assert_eq!(failed.type_.as_deref(), Some("Warning"));
    }

    fn module(name: &str) -> ModuleRef {
        ModuleRef {
            namespace: "ns".into(),
            name: name.into(),
            uid: None,
        }
    }

    fn on(reason: &'static str, reboot: bool, names: &[&str]) -> NodeEvent {
        NodeEvent {
            reboot,
            modules: names.iter().map(|n| module(n)).collect(),
            ..node_event(reason)
        }
    }

    /// A reboot's unload and the reloads that follow, however many, become one event, written
    /// when the last module is back; what does not come back in time is recorded as unloaded,
    /// with the reboot's time, beside one event for those that did.
    #[test]
    fn a_reboot_and_its_reloads_are_one_event() {
        let mut merge = RebootMerge::default();
        let t0 = Instant::now();
        let at = |s: i64| Timestamp::from_second(s).unwrap();
        assert!(
            merge
                .offer(on(MODULE_UNLOADED, true, &["a", "b", "c"]), t0, at(0))
                .is_empty()
        );
        assert_eq!(merge.next_deadline(), Some(t0 + REBOOT_MERGE_WINDOW));
        // b is back, with d that was never there: d's own event now, b's held.
        assert_eq!(
            merge.offer(on(MODULE_LOADED, false, &["b", "d"]), t0, at(1)),
            vec![(on(MODULE_LOADED, false, &["d"]), at(1))]
        );
        // a and c are back in a later node write: one event for the three.
        let out = merge.offer(on(MODULE_LOADED, false, &["a", "c"]), t0, at(2));
        assert_eq!(
            out,
            vec![(on(MODULE_LOADED, true, &["a", "b", "c"]), at(2))]
        );
        assert_eq!(
            out[0].0.message(),
            "Modules ns/a, ns/b, ns/c loaded into the kernel again after the node rebooted"
        );
        assert_eq!(merge.next_deadline(), None);

        // c never comes back: at the window's end, a and b as loaded again, c as unloaded.
        merge.offer(on(MODULE_UNLOADED, true, &["a", "b", "c"]), t0, at(10));
        assert!(
            merge
                .offer(on(MODULE_LOADED, false, &["a", "b"]), t0, at(11))
                .is_empty()
        );
        assert!(merge.due(t0).is_empty());
        assert_eq!(
            merge.due(t0 + REBOOT_MERGE_WINDOW),
            vec![
                (on(MODULE_LOADED, true, &["a", "b"]), at(11)),
                (on(MODULE_UNLOADED, true, &["c"]), at(10)),
            ]
        );
        assert_eq!(merge.next_deadline(), None);

        // A module back and then unloaded for good: its reload is written before its unload.
        merge.offer(on(MODULE_UNLOADED, true, &["a", "b"]), t0, at(20));
        merge.offer(on(MODULE_LOADED, false, &["a"]), t0, at(21));
        assert_eq!(
            merge.offer(on(MODULE_UNLOADED, false, &["a"]), t0, at(22)),
            vec![
                (on(MODULE_LOADED, true, &["a"]), at(21)),
                (on(MODULE_UNLOADED, true, &["b"]), at(20)),
                (on(MODULE_UNLOADED, false, &["a"]), at(22)),
            ]
        );
        // A second reboot before the first one's modules are back: the first one's go.
        merge.offer(on(MODULE_UNLOADED, true, &["a", "b"]), t0, at(30));
        merge.offer(on(MODULE_LOADED, false, &["a"]), t0, at(31));
        assert_eq!(
            merge.offer(on(MODULE_UNLOADED, true, &["a"]), t0, at(32)),
            vec![
                (on(MODULE_LOADED, true, &["a"]), at(31)),
                (on(MODULE_UNLOADED, true, &["b"]), at(30)),
            ]
        );
        merge.due(t0 + REBOOT_MERGE_WINDOW);

        // Unloads that are not reboots, and loads with nothing held, pass straight through.
        let plain = on(MODULE_UNLOADED, false, &["a"]);
        assert_eq!(merge.offer(plain.clone(), t0, at(0)), vec![(plain, at(0))]);
        let load = on(MODULE_LOADED, false, &["a"]);
        assert_eq!(merge.offer(load.clone(), t0, at(0)), vec![(load, at(0))]);
    }

    /// A reboot's withdrawals seen in two node writes are one reboot: the second joins the
    /// first, and one event follows when all are back. Another boot is a second reboot.
    #[test]
    fn one_reboots_withdrawals_in_two_writes_are_held_together() {
        let mut merge = RebootMerge::default();
        let t0 = Instant::now();
        let at = |s: i64| Timestamp::from_second(s).unwrap();
        let in_boot = |boot: &str, ev: NodeEvent| NodeEvent {
            boot: Some(boot.into()),
            ..ev
        };
        let first = in_boot("b2", on(MODULE_UNLOADED, true, &["a", "b"]));
        assert!(merge.offer(first, t0, at(0)).is_empty());
        let later = in_boot("b2", on(MODULE_UNLOADED, true, &["c"]));
        assert!(merge.offer(later, t0, at(1)).is_empty());
        assert!(
            merge
                .offer(on(MODULE_LOADED, false, &["a", "b"]), t0, at(2))
                .is_empty()
        );
        let out = merge.offer(on(MODULE_LOADED, false, &["c"]), t0, at(3));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].0.reason, MODULE_LOADED);
        assert!(out[0].0.reboot);
        assert_eq!(out[0].0.module_keys(), "ns/a,ns/b,ns/c");
        // Another boot before they are back: the first reboot's unload goes.
        merge.offer(in_boot("b3", on(MODULE_UNLOADED, true, &["a"])), t0, at(4));
        let second = merge.offer(in_boot("b4", on(MODULE_UNLOADED, true, &["a"])), t0, at(5));
        assert_eq!(second.len(), 1);
        assert_eq!(second[0].0.boot.as_deref(), Some("b3"));
    }

    /// Events released together get distinct times, so distinct names.
    #[test]
    fn events_of_one_moment_get_distinct_names() {
        let mut last = Timestamp::UNIX_EPOCH;
        let t = Timestamp::from_second(5).unwrap();
        let first = unique_after(t, &mut last);
        let second = unique_after(t, &mut last);
        assert_eq!(first, t);
        assert!(second > first);
        let a = render_event(&node_event(MODULE_LOADED), "me", first);
        let b = render_event(&node_event(MODULE_LOADED), "me", second);
        assert_ne!(a.metadata.name, b.metadata.name);
        // A later time is kept as it is.
        let later = Timestamp::from_second(6).unwrap();
        assert_eq!(unique_after(later, &mut last), later);
    }

    /// A ready label that goes while the node reports another boot than the one it was
    /// confirmed in is a reboot's; one that goes otherwise is an unload.
    #[test]
    fn a_label_gone_with_a_reboot_is_told_apart() {
        use crate::controller::testkit::{NodeFixture, module, node};
        use kube::runtime::watcher;
        let (store, mut writer) = kube::runtime::reflector::store::<Module>();
        writer.apply_watcher_event(&watcher::Event::Apply(module()));
        let ready = module_ready_label("ns", "m");
        let fence = ready_boot_annotation("ns", "m");
        let booted = |boot: &str, recorded: &str, labelled: bool| {
            let mut n = node("n1");
            if labelled {
                n = n.label(&ready, "");
            }
            if let Some(i) = n.status.as_mut().and_then(|s| s.node_info.as_mut()) {
                i.boot_id = boot.into();
            }
            n.annotations_mut().insert(fence.clone(), recorded.into());
            n
        };
        let gone = ready_transitions(
            &booted("b2", "b1 p/0", true),
            &booted("b2", "b1 p/0", false),
            &store,
        );
        assert_eq!(gone.len(), 1);
        assert!(gone[0].reboot && gone[0].reason == MODULE_UNLOADED);
        let unloaded = ready_transitions(
            &booted("b1", "b1 p/0", true),
            &booted("b1", "b1 p/0", false),
            &store,
        );
        assert!(!unloaded[0].reboot && unloaded[0].reason == MODULE_UNLOADED);
    }

    /// Several Modules that load together (one node write) make one event naming them all.
    #[test]
    fn modules_that_change_together_share_one_event() {
        let mut ev = node_event(MODULE_LOADED);
        ev.modules.push(ModuleRef {
            namespace: "ns".into(),
            name: "n".into(),
            uid: None,
        });
        let e = render_event(&ev, "me", Timestamp::UNIX_EPOCH);
        assert_eq!(
            e.note.as_deref(),
            Some("Modules ns/m, ns/n loaded into the kernel")
        );
        assert_eq!(
            e.metadata
                .annotations
                .unwrap()
                .get("module")
                .map(String::as_str),
            Some("ns/m,ns/n")
        );
        assert!(e.related.is_none());
    }
}
