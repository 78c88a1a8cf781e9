//! Events on the MCM: published once per reconcile, and kept for the dashboard.

use k8s_openapi::jiff::Timestamp;
use kube::runtime::events::{Event as KubeEvent, EventType};
use kube::{Resource, ResourceExt};
use shared_api::ManagedClusterModule;

use super::Context;
use crate::cache::RecentEvent;
use crate::pipeline::McmEvent;

/// Publish an event on the MCM (and keep it for the dashboard).
pub async fn event(
    ctx: &Context,
    mcm: &ManagedClusterModule,
    type_: EventType,
    reason: &str,
    note: &str,
) {
    ctx.caches.record_event(RecentEvent {
        time: Timestamp::now().to_string(),
        kind: "ManagedClusterModule".into(),
        name: mcm.name_any(),
        type_: if type_ == EventType::Warning {
            "Warning".into()
        } else {
            "Normal".into()
        },
        reason: reason.into(),
        message: note.into(),
    });
    let ev = KubeEvent {
        type_,
        reason: reason.into(),
        note: Some(note.chars().take(1000).collect()),
        action: "Reconcile".into(),
        secondary: None,
    };
    // Events of cluster-scoped objects live in `default`; 1.20 servers also require the
    // reference to name that namespace.
    let mut reference = mcm.object_ref(&());
    reference.namespace = Some("default".into());
    if let Err(e) = ctx.recorder.publish(&ev, &reference).await {
        tracing::warn!(error = %e, reason, "event not published");
    }
}

/// Publish what the image pipeline reported, in order.
pub async fn publish(ctx: &Context, mcm: &ManagedClusterModule, events: &[McmEvent]) {
    for e in events {
        event(ctx, mcm, e.type_, &e.reason, &e.note).await;
    }
}
