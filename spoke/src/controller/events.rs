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

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeEvent {
    pub node: String,
    pub node_uid: Option<String>,
    pub reason: &'static str,
    pub module_namespace: String,
    pub module_name: String,
    pub module_uid: Option<String>,
    /// What went wrong (for [`MODULE_UNLOAD_FAILED`]).
    pub detail: String,
}

impl NodeEvent {
    pub fn message(&self) -> String {
        let (ns, name) = (&self.module_namespace, &self.module_name);
        if self.reason == MODULE_LOADED {
            format!("Module {ns}/{name} loaded into the kernel")
        } else if self.reason == MODULE_UNLOAD_FAILED {
            format!(
                "Module {ns}/{name} could not be unloaded; it stays in the kernel: {}",
                self.detail
            )
        } else {
            format!("Module {ns}/{name} unloaded from the kernel")
        }
    }
}

/// Ready-label transitions between two states of a node, for the Modules known now.
pub fn ready_transitions(old: &Node, new: &Node, modules: &Store<Module>) -> Vec<NodeEvent> {
    let empty = BTreeMap::new();
    let old_labels = old.metadata.labels.as_ref().unwrap_or(&empty);
    let new_labels = new.metadata.labels.as_ref().unwrap_or(&empty);
    let mut out = Vec::new();
    for module in modules.state() {
        let ns = module.namespace().unwrap_or_default();
        let name = module.name_any();
        let key = module_ready_label(&ns, &name);
        let reason = match (old_labels.contains_key(&key), new_labels.contains_key(&key)) {
            (false, true) => MODULE_LOADED,
            (true, false) => MODULE_UNLOADED,
            _ => continue,
        };
        out.push(NodeEvent {
            node: new.name_any(),
            node_uid: new.uid(),
            reason,
            module_namespace: ns,
            module_name: name,
            module_uid: module.uid(),
            detail: String::new(),
        });
    }
    out
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
                module = %format!("{}/{}", ev.module_namespace, ev.module_name),
            );
            match api
                .create(&PostParams::default(), &event)
                .instrument(span)
                .await
            {
                Ok(_) => {
                    metrics.write("event");
                    metrics.event(ev.reason);
                    tracing::info!(node = %ev.node, module = %format!("{}/{}", ev.module_namespace, ev.module_name), reason = ev.reason, "node event");
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
                format!("{}/{}", ev.module_namespace, ev.module_name),
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
        related: Some(ObjectReference {
            api_version: Some(Module::api_version(&()).into_owned()),
            kind: Some(Module::kind(&()).into_owned()),
            namespace: Some(ev.module_namespace.clone()),
            name: Some(ev.module_name.clone()),
            uid: ev.module_uid.clone(),
            ..Default::default()
        }),
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
            module_namespace: "ns".into(),
            module_name: "m".into(),
            module_uid: None,
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
}
