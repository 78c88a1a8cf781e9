//! The MCM's status from what one reconcile found: counts from the cached works, the
//! bounded per-image and per-cluster lists, the Ready / Progressing / Degraded / TagMoved
//! conditions, and what the reconciler does next.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::jiff::Timestamp;
use shared_api::ManagedClusterModule;
use shared_api::conditions::{DEGRADED, PROGRESSING, READY, set_condition};
use shared_api::mcm::{
    ClusterProblem, Day0ClusterStatus, Day0Status, Day1Status, ImageState, ImageStatus,
    ManagedClusterModuleStatus, STATUS_LIST_LIMIT, TAG_MOVED,
};

use super::facts::{WorkEntry, Works};
use super::image::ImageOutcome;
use super::placement::{PLACEMENT_NOT_FOUND, PlacementHold};
use super::plan::Plan;
use crate::render::day0::Day0Want;

/// Counts from the cached works of the selected clusters (all works when `selected` is None).
pub fn fill_counts(
    status: &mut ManagedClusterModuleStatus,
    works: &Works,
    selected: Option<&BTreeSet<&str>>,
) {
    let relevant: Vec<&WorkEntry> = works
        .values()
        .map(|w| &**w)
        .filter(|w| !w.deleting && selected.is_none_or(|s| s.contains(w.cluster.as_str())))
        .collect();
    status.number_desired = relevant.len() as i32;
    status.number_applied = relevant.iter().filter(|w| w.applied).count() as i32;
    status.number_degraded = relevant.iter().filter(|w| w.degraded).count() as i32;
    status.number_available = relevant.iter().filter(|w| w.module_available()).count() as i32;
}

/// One entry per image; an image whose lookup failed keeps the digest recorded before
/// (the one still shipped), which is also what a moved tag is compared against.
pub fn image_statuses(
    plan: &Plan,
    outcomes: &BTreeMap<String, ImageOutcome>,
    previous: &[ImageStatus],
) -> Vec<ImageStatus> {
    plan.images
        .values()
        .map(|need| {
            let o = outcomes.get(&need.image);
            let before = || {
                previous
                    .iter()
                    .find(|p| p.image == need.image)
                    .and_then(|p| p.digest.clone())
            };
            ImageStatus {
                image: need.image.clone(),
                kernel: need.build_kernel().to_string(),
                digest: o.and_then(|o| o.digest.clone()).or_else(before),
                state: o.map_or(ImageState::Pending, |o| o.state),
                reason: o.and_then(|o| o.reason.clone()),
                clusters: need.clusters as i32,
            }
        })
        .collect()
}

/// The status of an MCM whose spec is invalid: Degraded with every violation, nothing else
/// changed (what already runs keeps running).
pub fn invalid_spec_status(
    mcm: &ManagedClusterModule,
    message: &str,
    works: &Works,
    now: Timestamp,
) -> ManagedClusterModuleStatus {
    let generation = mcm.metadata.generation;
    let mut status = mcm.status.clone().unwrap_or_default();
    status.observed_generation = generation;
    let c = &mut status.conditions;
    set_condition(c, DEGRADED, true, "InvalidSpec", message, generation, now);
    let ready_msg = "the spec is invalid; see Degraded";
    set_condition(c, READY, false, "InvalidSpec", ready_msg, generation, now);
    let progress_msg = "waiting for a valid spec";
    set_condition(
        c,
        PROGRESSING,
        false,
        "InvalidSpec",
        progress_msg,
        generation,
        now,
    );
    fill_counts(&mut status, works, None);
    status
}

/// The status while `spec.placementRef`'s Placement is missing (Degraded) or has not decided
/// yet (Progressing): the works stay as they are, and are counted as they are.
pub fn placement_hold_status(
    mcm: &ManagedClusterModule,
    hold: &PlacementHold,
    works: &Works,
    now: Timestamp,
) -> ManagedClusterModuleStatus {
    let generation = mcm.metadata.generation;
    let mut status = mcm.status.clone().unwrap_or_default();
    status.observed_generation = generation;
    let missing = hold.reason == PLACEMENT_NOT_FOUND;
    let c = &mut status.conditions;
    let r = hold.reason;
    let m = hold.message.as_str();
    set_condition(c, DEGRADED, missing, r, m, generation, now);
    set_condition(c, READY, false, r, m, generation, now);
    set_condition(c, PROGRESSING, !missing, r, m, generation, now);
    fill_counts(&mut status, works, None);
    status
}

/// The status when the plan cannot be made (validation compiles the same mappings, so this
/// is unexpected; reported the same way).
pub fn plan_error_status(
    mcm: &ManagedClusterModule,
    message: &str,
    now: Timestamp,
) -> ManagedClusterModuleStatus {
    let generation = mcm.metadata.generation;
    let mut status = mcm.status.clone().unwrap_or_default();
    status.observed_generation = generation;
    set_condition(
        &mut status.conditions,
        DEGRADED,
        true,
        "InvalidSpec",
        message,
        generation,
        now,
    );
    status
}

/// What one reconcile found, for its status.
#[derive(Debug, Clone, Copy)]
pub struct Findings<'a> {
    pub plan: &'a Plan,
    pub outcomes: &'a BTreeMap<String, ImageOutcome>,
    /// The cached works of the MCM after this reconcile's writes, by cluster.
    pub works: &'a Works,
    pub selected: &'a BTreeSet<&'a str>,
    pub problems: &'a [ClusterProblem],
    /// Why the pull secret could not be used, if so.
    pub pull_secret_error: Option<&'a str>,
    /// The ManifestWork writes that failed, as text.
    pub write_errors: &'a [String],
    /// `spec.day0`: each OpenShift cluster's layered image and why it waits, as decided.
    pub day0: &'a BTreeMap<String, Day0Want>,
}

/// What to do after the status is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Everything is as wanted: look again at the periodic resync.
    Resync,
    /// Images are being built or signed: a state to wait in; look again soon.
    WaitForImages,
    /// Images are missing, failed or unreachable: retry with the per-MCM capped backoff.
    RetryImages(Vec<String>),
}

/// The status and the reasons it is Degraded (the first is the dashboard's last error).
#[derive(Debug, Clone)]
pub struct StatusDecision {
    pub status: ManagedClusterModuleStatus,
    pub degraded_reasons: Vec<String>,
    pub next: Next,
}

/// The MCM's new status from what this reconcile found.
pub fn mcm_status(mcm: &ManagedClusterModule, f: Findings<'_>, now: Timestamp) -> StatusDecision {
    let generation = mcm.metadata.generation;
    let mut status = mcm.status.clone().unwrap_or_default();
    status.observed_generation = generation;
    let selected = f.selected.len();
    let images = image_statuses(f.plan, f.outcomes, &status.images);
    fill_counts(&mut status, f.works, Some(f.selected));
    status.images_omitted = images.len().saturating_sub(STATUS_LIST_LIMIT) as i32;
    status.images = images.into_iter().take(STATUS_LIST_LIMIT).collect();
    status.clusters_omitted = f.problems.len().saturating_sub(STATUS_LIST_LIMIT) as i32;
    status.clusters = f.problems.iter().take(STATUS_LIST_LIMIT).cloned().collect();
    status.image_rebuild_trigger_generation = mcm.spec.module_spec.image_rebuild_trigger_generation;
    status.day1 = day1_status(mcm, &f);
    status.day0 = day0_status(mcm, &f);

    let failed: Vec<ImageStatus> = status
        .images
        .iter()
        .filter(|i| i.state == ImageState::Failed)
        .cloned()
        .collect();
    let pending: Vec<&ImageStatus> = status
        .images
        .iter()
        .filter(|i| i.state != ImageState::Ready)
        .collect();
    let mut degraded_reasons: Vec<String> = failed
        .iter()
        .map(|i| format!("{}: {}", i.image, i.reason.clone().unwrap_or_default()))
        .collect();
    if let Some(reason) = f.pull_secret_error {
        degraded_reasons.insert(0, reason.to_string());
    }
    if let Some(first) = f.write_errors.first() {
        degraded_reasons.push(format!(
            "{} ManifestWork write(s) failed: {first}",
            f.write_errors.len()
        ));
    }
    let degraded_works = status.number_degraded;
    if degraded_works > 0 {
        degraded_reasons.push(format!("{degraded_works} ManifestWork(s) report Degraded"));
    }
    if let Some(d) = status.day1.as_ref().filter(|d| d.degraded > 0) {
        degraded_reasons.push(format!(
            "{} cluster(s) report degraded machines in the Day-1 MachineConfigPool",
            d.degraded
        ));
    }
    let day0_degraded = status.day0.as_ref().map_or(0, |d| d.degraded);
    if day0_degraded > 0 {
        degraded_reasons.push(format!(
            "{day0_degraded} cluster(s) report degraded machines in the Day-0 MachineConfigPool"
        ));
    }
    let degraded = !degraded_reasons.is_empty();
    let degraded_reason = if !degraded {
        "AsExpected"
    } else if f.pull_secret_error.is_some() {
        "PullSecretError"
    } else if let Some(reason) = crate::sign::status_reason_of(&failed) {
        reason
    } else if !failed.is_empty() {
        "ImagesFailed"
    } else if !f.write_errors.is_empty() {
        "WriteFailed"
    } else if degraded_works == 0 && day0_degraded > 0 {
        "Day0PoolDegraded"
    } else if degraded_works == 0 {
        "Day1PoolDegraded"
    } else {
        "ManifestWorksDegraded"
    };
    // spec.day0: an OpenShift cluster without the layered image it should boot is not done.
    let day0_waiting = status.day0.as_ref().map_or(0, |d| d.waiting);
    let all_available = status.number_available == selected as i32
        && f.problems.is_empty()
        && pending.is_empty()
        && day0_waiting == 0;
    // Rolling out: something is on its way (an image being resolved, built or signed, or a
    // shipped work not yet available); failures alone are Degraded, not progress.
    let in_flight = pending.iter().any(|i| {
        matches!(
            i.state,
            ImageState::Pending | ImageState::Building | ImageState::Signing
        )
    }) || status.number_available < status.number_desired;
    let progressing = !all_available && in_flight;
    let progress = progress_message(&status, selected, pending.len(), f.problems);
    let mut ready_msg = format!(
        "{} of {selected} selected cluster(s) have the module available",
        status.number_available
    );
    if day0_waiting > 0 {
        ready_msg.push_str(&format!(
            "; {day0_waiting} OpenShift cluster(s) wait for their Day-0 layered image (status.day0)"
        ));
    }
    let next = if pending
        .iter()
        .any(|i| i.state != ImageState::Building && i.state != ImageState::Signing)
    {
        Next::RetryImages(pending.iter().map(|i| i.image.clone()).collect())
    } else if !pending.is_empty() {
        Next::WaitForImages
    } else {
        Next::Resync
    };

    let c = &mut status.conditions;
    let why = degraded_reasons.join("; ");
    set_condition(
        c,
        DEGRADED,
        degraded,
        degraded_reason,
        &why,
        generation,
        now,
    );
    let reason = if progressing { "RollingOut" } else { "Idle" };
    set_condition(
        c,
        PROGRESSING,
        progressing,
        reason,
        &progress,
        generation,
        now,
    );
    let reason = if all_available {
        "AllClustersAvailable"
    } else {
        "NotAllClustersAvailable"
    };
    set_condition(c, READY, all_available, reason, &ready_msg, generation, now);

    // Tags that moved and were not re-pinned (see spec.movedTagPolicy).
    let moved: Vec<String> = f
        .outcomes
        .values()
        .filter(|o| o.moved_to.is_some())
        .filter_map(|o| o.reason.clone())
        .collect();
    if !moved.is_empty() {
        let msg = moved.join("; ");
        set_condition(
            c,
            TAG_MOVED,
            true,
            "TagMovedNotRepinned",
            &msg,
            generation,
            now,
        );
    } else if c.iter().any(|c| c.type_ == TAG_MOVED) {
        let msg = "every image is pinned to the digest its tag points to";
        set_condition(c, TAG_MOVED, false, "AsExpected", msg, generation, now);
    }
    StatusDecision {
        status,
        degraded_reasons,
        next,
    }
}

/// `status.day1`: per selected cluster whose work carries the Day-1 MachineConfig, what it
/// carries and its pool's state; `None` without `spec.day1`.
fn day1_status(mcm: &ManagedClusterModule, f: &Findings<'_>) -> Option<Day1Status> {
    mcm.spec.day1.as_ref()?;
    let mut clusters: Vec<_> = f
        .works
        .values()
        .filter(|w| !w.deleting && f.selected.contains(w.cluster.as_str()))
        .filter_map(|w| {
            let shipped = w.day1.clone()?;
            Some(crate::render::day1::cluster_status(
                &w.cluster,
                shipped,
                &w.feedback,
            ))
        })
        .collect();
    let rank = |pool: &str| match pool {
        "Degraded" => 0,
        "Updating" => 1,
        "Unknown" => 2,
        _ => 3,
    };
    clusters.sort_by(|a, b| {
        rank(&a.pool)
            .cmp(&rank(&b.pool))
            .then_with(|| a.name.cmp(&b.name))
    });
    let count = |state: &str| clusters.iter().filter(|c| c.pool == state).count() as i32;
    let mut d = Day1Status {
        shipped: clusters.len() as i32,
        updated: count("Updated"),
        degraded: count("Degraded"),
        not_open_shift: f.plan.clusters.iter().filter(|c| !c.openshift).count() as i32,
        clusters_omitted: clusters.len().saturating_sub(STATUS_LIST_LIMIT) as i32,
        clusters: Vec::new(),
    };
    clusters.truncate(STATUS_LIST_LIMIT);
    d.clusters = clusters;
    Some(d)
}

/// `status.day0`: per selected OpenShift cluster, its RHCOS image and kernel, the layered
/// image shipped and its pool's state, or why it waits; `None` without `spec.day0`.
fn day0_status(mcm: &ManagedClusterModule, f: &Findings<'_>) -> Option<Day0Status> {
    mcm.spec.day0.as_ref()?;
    let none = BTreeMap::new();
    let mut clusters: Vec<Day0ClusterStatus> = f
        .plan
        .clusters
        .iter()
        .filter(|c| c.openshift)
        .map(|c| {
            let work = f.works.get(&c.cluster).filter(|w| !w.deleting);
            let want = f
                .day0
                .get(&c.cluster)
                .cloned()
                .or_else(|| c.day0.clone())
                .unwrap_or_default();
            crate::render::day0::cluster_status(
                &c.cluster,
                &want,
                work.and_then(|w| w.day0.as_ref()),
                work.map_or(&none, |w| &w.feedback),
            )
        })
        .collect();
    let rank = |c: &Day0ClusterStatus| match (c.pool.as_str(), c.reason.is_some()) {
        ("Degraded", _) => 0,
        (_, true) => 1,
        ("Updating", _) => 2,
        ("Unknown", _) => 3,
        _ => 4,
    };
    clusters.sort_by(|a, b| rank(a).cmp(&rank(b)).then_with(|| a.name.cmp(&b.name)));
    let shipped = clusters.iter().filter(|c| c.image.is_some()).count() as i32;
    let count = |state: &str| clusters.iter().filter(|c| c.pool == state).count() as i32;
    let mut d = Day0Status {
        shipped,
        updated: count("Updated"),
        degraded: count("Degraded"),
        waiting: clusters.iter().filter(|c| c.reason.is_some()).count() as i32,
        not_open_shift: f.plan.clusters.iter().filter(|c| !c.openshift).count() as i32,
        clusters_omitted: clusters.len().saturating_sub(STATUS_LIST_LIMIT) as i32,
        clusters: Vec::new(),
    };
    clusters.truncate(STATUS_LIST_LIMIT);
    d.clusters = clusters;
    Some(d)
}

fn progress_message(
    status: &ManagedClusterModuleStatus,
    selected: usize,
    pending: usize,
    problems: &[ClusterProblem],
) -> String {
    let mut parts = vec![format!(
        "{}/{} ManifestWorks applied, {} available",
        status.number_applied, selected, status.number_available
    )];
    if pending > 0 {
        parts.push(format!("{pending} image(s) not ready"));
    }
    if let Some(first) = problems.first() {
        parts.push(format!(
            "{} cluster(s) waiting: {}",
            problems.len(),
            first.message
        ));
    }
    parts.join("; ")
}

#[cfg(test)]
#[path = "status_tests.rs"]
mod tests;
