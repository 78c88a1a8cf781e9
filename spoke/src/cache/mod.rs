//! The agent's caches: one watch per kind, filtered where the API allows it and stripped
//! of everything the reconcilers do not read, so that the agent stays small.
//!
//! Each informer applies watch events to a reflector store and, for every event, tells the
//! caller what changed (with the store still holding the previous state), so triggers can
//! be computed from real transitions; the triggers are dispatched after the store update.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::hash::Hash;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Node, NodeSpec, NodeStatus, NodeSystemInfo};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kmm_runtime::admin::ReadyGate;
use kmm_runtime::shutdown::CancellationToken;
use kube::Resource;
use kube::api::Api;
use kube::runtime::reflector::Store;
use kube::runtime::reflector::store::Writer;
use kube::runtime::{WatchStreamExt, watcher};
use serde::de::DeserializeOwned;
use shared_api::labels::is_ready_boot_annotation;
use shared_api::{ClusterClaim, Module};

use crate::render::{SPEC_HASH_ANNOTATION, TEMPLATE_HASH_ANNOTATION};

pub mod pod;
pub use pod::CachedPod;

/// Run one informer until `token` is cancelled. `before` sees each (stripped) event with
/// the store in its previous state and returns triggers; `after` receives them once the
/// store is updated. `gate` opens at the first complete list.
#[allow(clippy::too_many_arguments)]
pub async fn run_informer<K, T>(
    kind: &'static str,
    api: Api<K>,
    config: watcher::Config,
    mut writer: Writer<K>,
    strip: fn(&mut K),
    mut before: impl FnMut(&Store<K>, &watcher::Event<K>) -> T,
    mut after: impl FnMut(T),
    gate: ReadyGate,
    token: CancellationToken,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone,
{
    let reader = writer.as_reader();
    let mut stream = watcher(api, config).default_backoff().boxed();
    loop {
        let item = tokio::select! {
            _ = token.cancelled() => break,
            item = stream.next() => item,
        };
        let Some(item) = item else { break };
        match item {
            Ok(mut event) => {
                match &mut event {
                    watcher::Event::Apply(o)
                    | watcher::Event::Delete(o)
                    | watcher::Event::InitApply(o) => strip(o),
                    watcher::Event::Init | watcher::Event::InitDone => {}
                }
                let triggers = before(&reader, &event);
                writer.apply_watcher_event(&event);
                if matches!(event, watcher::Event::InitDone) {
                    gate.set(true);
                    tracing::debug!(kind, objects = reader.len(), "cache synced");
                }
                after(triggers);
            }
            Err(e) => {
                tracing::warn!(kind, error = %e, "watch failed; retrying with backoff");
            }
        }
    }
}

fn strip_meta(meta: &mut ObjectMeta) {
    meta.managed_fields = None;
    meta.self_link = None;
}

/// Modules are kept whole (they are the input), less managed fields.
pub fn strip_module(m: &mut Module) {
    strip_meta(&mut m.metadata);
    m.metadata.annotations = None;
}

/// Claims are small; managed fields go.
pub fn strip_claim(c: &mut ClusterClaim) {
    strip_meta(&mut c.metadata);
    c.metadata.annotations = None;
}

/// Nodes: name, uid, labels, taints, deletion, kernel, boot ID and the agent's own
/// ready-boot annotations. The rest (images, conditions, addresses, other annotations) is
/// dropped.
pub fn strip_node(n: &mut Node) {
    strip_meta(&mut n.metadata);
    n.metadata.annotations = n
        .metadata
        .annotations
        .take()
        .map(|a| {
            a.into_iter()
                .filter(|(k, _)| is_ready_boot_annotation(k))
                .collect::<BTreeMap<_, _>>()
        })
        .filter(|a| !a.is_empty());
    n.metadata.owner_references = None;
    let spec = n.spec.take().unwrap_or_default();
    n.spec = Some(NodeSpec {
        taints: spec.taints,
        unschedulable: spec.unschedulable,
        ..Default::default()
    });
    // The OS image names the RHCOS version on OpenShift: the Driver Toolkit claim needs it.
    let (kernel, boot_id, os_image) = n
        .status
        .as_ref()
        .and_then(|s| s.node_info.as_ref())
        .map(|i| {
            (
                i.kernel_version.clone(),
                i.boot_id.clone(),
                i.os_image.clone(),
            )
        })
        .unwrap_or_default();
    n.status = Some(NodeStatus {
        node_info: Some(NodeSystemInfo {
            kernel_version: kernel,
            boot_id,
            os_image,
            ..Default::default()
        }),
        ..Default::default()
    });
}

/// Pods need no stripping: [`CachedPod`] keeps only what the reconcilers read.
pub fn strip_pod(_: &mut CachedPod) {}

/// DaemonSets: metadata (labels, owners, generation, our hash annotation) and status; the
/// spec is never read back (the hash annotation stands for it).
pub fn strip_daemonset(d: &mut DaemonSet) {
    strip_meta(&mut d.metadata);
    let hash = d
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(SPEC_HASH_ANNOTATION).cloned());
    let template = d
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(TEMPLATE_HASH_ANNOTATION).cloned());
    let mut kept = BTreeMap::new();
    if let Some(h) = hash {
        kept.insert(SPEC_HASH_ANNOTATION.to_string(), h);
    }
    if let Some(h) = template {
        kept.insert(TEMPLATE_HASH_ANNOTATION.to_string(), h);
    }
    d.metadata.annotations = (!kept.is_empty()).then_some(kept);
    d.spec = None;
}
