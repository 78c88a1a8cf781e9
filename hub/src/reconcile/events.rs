//! Events on the MCM: published once per reconcile, and kept for the dashboard.

use k8s_openapi::jiff::Timestamp;
use kube::runtime::events::{Event as KubeEvent, EventType};
use kube::{Resource, ResourceExt};
use shared_api::ManagedClusterModule;

use super::Context;
use crate::cache::RecentEvent;
use crate::pipeline::McmEvent;

// Build and sign reasons as upstream KMM emits them on the owner (upstream derives them from
// the pod's `resource-type` label, `buildimage`/`signimage`, title-cased: hence the lower-case
// "image"). Upstream's documentation still says `BuildCreated`/`SignSucceeded`; the code wins.
/// A build Job was created for a kernel.
pub const BUILD_CREATED: &str = "BuildimageCreated";
/// A build finished and its image was pushed.
pub const BUILD_SUCCEEDED: &str = "BuildimageSucceeded";
/// A build failed (Warning).
pub const BUILD_FAILED: &str = "BuildimageFailed";
/// An image was signed and pushed (the hub signs in-process: there is no "Created" step).
pub const SIGN_SUCCEEDED: &str = "SignimageSucceeded";
/// Signing failed (Warning).
pub const SIGN_FAILED: &str = "SignimageFailed";

/// Publish an event on the MCM (and keep it for the dashboard).
pub async fn event(
    ctx: &Context,
    mcm: &ManagedClusterModule,
    type_: EventType,
    reason: &str,
    note: &str,
) {
    event_as(ctx, mcm, type_, reason, "Reconcile", note).await;
}

/// [`event`] with its own `action`. The recorder counts an event again (keeping its first
/// note) when type, reason and action repeat; a distinct action makes a new event.
pub async fn event_as(
    ctx: &Context,
    mcm: &ManagedClusterModule,
    type_: EventType,
    reason: &str,
    action: &str,
    note: &str,
) {
    event_on(ctx, mcm, type_, reason, action, note).await;
}

/// Publish an event on a cluster-scoped object of ours (an MCM, a preflight) and keep it for
/// the dashboard.
pub async fn event_on<K>(
    ctx: &Context,
    obj: &K,
    type_: EventType,
    reason: &str,
    action: &str,
    note: &str,
) where
    K: Resource<DynamicType = ()>,
{
    ctx.caches.record_event(RecentEvent {
        time: Timestamp::now().to_string(),
        kind: K::kind(&()).into_owned(),
        name: obj.name_any(),
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
        action: action.into(),
        secondary: None,
    };
    // Events of cluster-scoped objects live in `default`; 1.20 servers also require the
    // reference to name that namespace.
    let mut reference = obj.object_ref(&());
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The reasons upstream KMM's build/sign events reconciler emits today
    /// (`<Title(resource-type)><Created|Succeeded|Failed>`).
    #[test]
    fn build_and_sign_reasons_are_upstreams() {
        assert_eq!(BUILD_CREATED, "BuildimageCreated");
        assert_eq!(BUILD_SUCCEEDED, "BuildimageSucceeded");
        assert_eq!(BUILD_FAILED, "BuildimageFailed");
        assert_eq!(SIGN_SUCCEEDED, "SignimageSucceeded");
        assert_eq!(SIGN_FAILED, "SignimageFailed");
    }
}
