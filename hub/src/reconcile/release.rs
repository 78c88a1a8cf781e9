//! Deleting ManifestWorks safely and without hanging.
//!
//! - **Hold**: OCM's work agent deletes, when a work goes, only what its AppliedManifestWork
//!   recorded, and it records a manifest in the same pass that first reports the work's
//!   `Applied` condition. A work deleted before that pass leaves its Module behind on the
//!   spoke. So a work is deleted only once its status shows the pass done: `Applied` reported,
//!   and, when the Module was applied, `Available` reported too (the agent read the Module
//!   back after the pass). Bounded by the release deadline.
//! - **Release**: a deleted work keeps OCM's finalizer until the work agent has removed what
//!   it applied, and the MCM keeps its finalizer until its works are gone. On a spoke that is
//!   offline or detached (ManagedCluster `ManagedClusterConditionAvailable` not `True`, or no
//!   ManagedCluster any more) that never happens: after the deadline (`--release-after`), or
//!   at once with the force-release annotation on the MCM, the hub removes OCM's finalizer
//!   from the works of the MCM being deleted, and says so in an event.
//!
//! A released work's Module stays on the spoke until its work agent comes back, finds the
//! AppliedManifestWork without a ManifestWork and evicts it (and the Module it owns) after
//! its `--appliedmanifestwork-eviction-grace-period` (OCM default 60 min).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use serde_json::json;
use shared_api::ManagedClusterModule;
use shared_api::ocm::{ManifestWork, WORK_FINALIZER};

use super::{Context, Error, WorkWriteError, event};
use crate::cache::{WorkEntry, Works};
pub use crate::decide::release::{Step, recorded, step};

/// On a ManagedClusterModule being deleted, `"true"` releases all its works at once, whatever
/// their cluster's state (docs/install.md, "Uninstalling").
pub const FORCE_RELEASE_ANNOTATION: &str = "hub.kmm.sigs.x-k8s.io/force-release";

/// The default of `--release-after`.
pub const DEFAULT_RELEASE_AFTER: Duration = Duration::from_secs(600);

/// Longest wait between two looks at a held deletion.
const RECHECK: Duration = Duration::from_secs(30);

/// The release deadline and when each held deletion of a selected-away cluster was first
/// wanted (an MCM being deleted counts from its deletion timestamp instead).
#[derive(Debug)]
pub struct Releaser {
    pub deadline: Duration,
    first_wanted: Mutex<BTreeMap<(String, String), Instant>>,
}

impl Releaser {
    pub fn new(deadline: Duration) -> Self {
        Self {
            deadline,
            first_wanted: Mutex::new(BTreeMap::new()),
        }
    }

    /// How long the deletion of `mcm`'s work on `cluster` has been wanted, starting now if new.
    fn waited(&self, mcm: &str, cluster: &str) -> Duration {
        let mut m = self.first_wanted.lock().unwrap_or_else(|e| e.into_inner());
        m.entry((mcm.to_string(), cluster.to_string()))
            .or_insert_with(Instant::now)
            .elapsed()
    }

    /// Forget the clocks of `mcm` except for `keep`'s clusters.
    fn prune(&self, mcm: &str, keep: &BTreeSet<&str>) {
        let mut m = self.first_wanted.lock().unwrap_or_else(|e| e.into_inner());
        m.retain(|(n, c), _| n != mcm || keep.contains(c.as_str()));
    }
}

impl Default for Releaser {
    fn default() -> Self {
        Self::new(DEFAULT_RELEASE_AFTER)
    }
}

fn cluster_available(ctx: &Context, cluster: &str) -> bool {
    ctx.caches
        .clusters
        .read()
        .map(|c| c.get(cluster).is_some_and(|f| f.available))
        .unwrap_or(false)
}

/// Of the works `wanted` (by cluster) to go while the MCM lives on, the clusters whose work
/// may be deleted now; the others are held until their status shows the Module recorded.
pub fn deletable_now(
    ctx: &Context,
    mcm: &str,
    existing: &Works,
    wanted: Vec<String>,
) -> Vec<String> {
    let r = &ctx.release;
    let mut held = BTreeSet::new();
    let mut now = Vec::new();
    for cluster in wanted {
        let Some(w) = existing.get(&cluster) else {
            continue;
        };
        let waited = r.waited(mcm, &cluster);
        match step(w, true, waited, r.deadline, false, false) {
            Step::Delete => now.push(cluster),
            Step::Hold => {
                tracing::info!(mcm, %cluster, "holding the ManifestWork's deletion until the work agent reports the Module recorded");
                held.insert(cluster.as_str().to_owned());
            }
            Step::Wait | Step::Release => {}
        }
    }
    let keep: BTreeSet<&str> = held.iter().map(String::as_str).collect();
    r.prune(mcm, &keep);
    now
}

/// The MCM is being deleted: delete, hold or release each of its works. Always an error
/// while works remain (the finalizer stays); the error says when to look again.
pub async fn cleanup_works(
    ctx: &Context,
    mcm: &ManagedClusterModule,
    works: &Works,
) -> Result<(), Error> {
    let name = mcm.name_any();
    // Deleting the MCM counts from its deletion timestamp: no clocks of its own any more.
    ctx.release.prune(&name, &BTreeSet::new());
    let deadline = ctx.release.deadline;
    let force = mcm
        .annotations()
        .get(FORCE_RELEASE_ANNOTATION)
        .is_some_and(|v| v == "true");
    let waited = mcm
        .meta()
        .deletion_timestamp
        .as_ref()
        .map(|t| {
            let secs = Timestamp::now().as_second() - t.0.as_second();
            Duration::from_secs(secs.max(0) as u64)
        })
        .unwrap_or_default();
    let mut errors = Vec::new();
    let mut released = Vec::new();
    let mut held = 0;
    for w in works.values() {
        let available = cluster_available(ctx, &w.cluster);
        match step(w, available, waited, deadline, true, force) {
            Step::Delete => {
                if let Err(e) = crate::reconcile::delete_work(ctx, &w.cluster, &name).await {
                    errors.push(e);
                }
            }
            Step::Hold => held += 1,
            Step::Wait => {}
            Step::Release => match release(ctx, w, &name).await {
                Ok(()) => released.push(w.cluster.clone()),
                Err(e) => errors.push(e),
            },
        }
    }
    if !released.is_empty() {
        let why = if force {
            format!("the {FORCE_RELEASE_ANNOTATION} annotation")
        } else {
            format!(
                "their cluster(s) unavailable {} after the deletion",
                humantime::format_duration(deadline)
            )
        };
        let msg = format!(
            "released the ManifestWork(s) of {} cluster(s) without the work agent's clean-up ({why}): {}; a Module left there is removed when that cluster's work agent returns and evicts the orphaned AppliedManifestWork",
            released.len(),
            released.join(", ")
        );
        tracing::warn!(mcm = %name, "{msg}");
        event(ctx, mcm, EventType::Warning, "ManifestWorksReleased", &msg).await;
    }
    if let Some(e) = Error::writes(errors) {
        return Err(e);
    }
    // Look again when the deadline passes (status changes of the works come as events).
    let retry = deadline
        .saturating_sub(waited)
        .clamp(Duration::from_secs(1), RECHECK);
    Err(Error::DeletionHeld {
        works: works.len(),
        held,
        retry,
    })
}

/// Delete the work if not done, then take OCM's finalizer off it (a JSON patch that tests
/// the finalizer is still where we saw it).
async fn release(ctx: &Context, w: &WorkEntry, name: &str) -> Result<(), WorkWriteError> {
    if !w.deleting {
        crate::reconcile::delete_work(ctx, &w.cluster, name).await?;
    }
    let Some(i) = w.finalizers.iter().position(|f| f == WORK_FINALIZER) else {
        return Ok(());
    };
    let patch: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": format!("/metadata/finalizers/{i}"), "value": WORK_FINALIZER},
        {"op": "remove", "path": format!("/metadata/finalizers/{i}")},
    ]))
    .map_err(|source| WorkWriteError::ReleasePatch {
        cluster: w.cluster.clone(),
        name: name.to_string(),
        source,
    })?;
    let api: Api<ManifestWork> = Api::namespaced(ctx.client.clone(), &w.cluster);
    match api
        .patch(name, &PatchParams::default(), &Patch::<()>::Json(patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => {
            ctx.caches.remove_work(&w.cluster, name);
            Ok(())
        }
        Err(source) => Err(WorkWriteError::Release {
            cluster: w.cluster.clone(),
            name: name.to_string(),
            source,
        }),
    }
}
