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
use shared_api::labels::{MODULE_ANNOTATION, module_ready_label};
use tokio::sync::mpsc;

use crate::metrics::Metrics;

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
        if self.reason == MODULE_LOADED {
            format!("{what} {them} loaded into the kernel")
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
    for module in modules.state() {
        let ns = module.namespace().unwrap_or_default();
        let name = module.name_any();
        let key = module_ready_label(&ns, &name);
        let to = match (old_labels.contains_key(&key), new_labels.contains_key(&key)) {
            (false, true) => &mut loaded,
            (true, false) => &mut unloaded,
            _ => continue,
        };
        to.push(ModuleRef {
            namespace: ns,
            name,
            uid: module.uid(),
        });
    }
    [(MODULE_UNLOADED, unloaded), (MODULE_LOADED, loaded)]
        .into_iter()
        .filter(|(_, m)| !m.is_empty())
        .map(|(reason, mut modules)| {
            modules.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
            NodeEvent {
                node: new.name_any(),
                node_uid: new.uid(),
                reason,
                modules,
                detail: String::new(),
            }
        })
        .collect()
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
        while let Some(ev) = rx.recv().await {
            if !leadership.is_leader() {
                continue;
            }
            let event = render_event(&ev, &identity, Timestamp::now());
            let span = tracing::info_span!(
                "node_event",
                node = %ev.node,
                module = %ev.module_keys(),
            );
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
    });
    EventSink { tx }
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
