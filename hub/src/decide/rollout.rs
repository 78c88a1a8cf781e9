//! The progressive rollout of `spec.rolloutStrategy` (`Progressive`, `ProgressivePerGroup`):
//! which clusters move to the new revision of their ManifestWork now, which keep exactly the
//! work they have, and the rollout's status. Pure: the reconciler passes the clock and the
//! cached works; everything time-based is kept in annotations on the works (see
//! [`shared_api::rollout`]) and in `status.rollout`, so a restarted hub picks up where it was.
//!
//! A cluster's *revision* is the spec hash of the work the hub would write for it now. A
//! cluster whose work carries that hash has been *moved*; it is
//! - **failed** when the work reports Degraded, or when its Module never became available
//!   within `progressDeadline` of the move;
//! - **updated** once the work is applied (at its current generation) and the Module is
//!   available on every selected node, continuously for `minSuccessTime`; a cluster that
//!   succeeded stays updated (a node joining later does not fail a finished rollout);
//! - **in progress** otherwise.
//!
//! Every other cluster is **pending** and keeps its work untouched (or has none). Mandatory
//! groups move first, one group at a time, and tolerate no failure; then `Progressive` moves
//! at most `maxConcurrency` clusters at a time (failed ones free their place while within
//! `maxFailures`), `ProgressivePerGroup` one decision group at a time. A cluster that joins
//! mid-rollout is pending like any other and moves when the strategy reaches it. Past
//! `maxFailures` the rollout halts until the revision changes or the admin resumes it.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use sha2::{Digest, Sha256};
use shared_api::ManagedClusterModule;
use shared_api::conditions::{DEGRADED, PROGRESSING, set_condition};
use shared_api::mcm::{ImageStatus, ManagedClusterModuleStatus, STATUS_LIST_LIMIT};
use shared_api::rollout::{
    AVAILABLE_SINCE_ANNOTATION, FAILURE_ACCEPTED_ANNOTATION, MandatoryDecisionGroup, RolloutPhase,
    RolloutStatus, RolloutType, STARTED_AT_ANNOTATION, parse_deadline, parse_duration, scaled,
};

use super::facts::WorkEntry;

/// The strategy's settings, parsed (the spec was validated before).
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub kind: RolloutType,
    pub groups: Vec<MandatoryDecisionGroup>,
    pub max_concurrency: Option<IntOrString>,
    pub min_success: Duration,
    pub deadline: Option<Duration>,
    pub max_failures: IntOrString,
}

impl Settings {
    /// `None` for `All` (or no strategy): today's behaviour, every cluster at once.
    pub fn of(mcm: &ManagedClusterModule) -> Option<Self> {
        let s = mcm.spec.rollout_strategy.as_ref()?;
        let c = s.config()?;
        Some(Self {
            kind: s.type_,
            groups: c.mandatory_decision_groups,
            max_concurrency: c
                .max_concurrency
                .filter(|_| s.type_ == RolloutType::Progressive),
            min_success: c
                .min_success_time
                .as_deref()
                .and_then(|t| parse_duration(t).ok())
                .unwrap_or_default(),
            deadline: parse_deadline(c.progress_deadline.as_deref())
                .ok()
                .flatten(),
            max_failures: c.max_failures.unwrap_or(IntOrString::Int(0)),
        })
    }
}

/// What the selected clusters' Modules are: the parts of the spec that shape a cluster's
/// work (not the selector, nor the strategy) and the pinned images. A short hash.
pub fn revision(mcm: &ManagedClusterModule, images: &[ImageStatus]) -> String {
    let pinned: Vec<(&str, Option<&str>)> = images
        .iter()
        .map(|i| (i.image.as_str(), i.digest.as_deref()))
        .collect();
    let text = match &mcm.spec.day0 {
        // Day 0 joins the revision only where it is set (other MCMs keep theirs); its
        // layered images are among `images`.
        Some(day0) => serde_json::to_string(&(
            &mcm.spec.module_spec,
            &mcm.spec.spoke_namespace,
            &mcm.spec.spoke_prerequisites,
            &mcm.spec.day1,
            pinned,
            day0,
        )),
        None => serde_json::to_string(&(
            &mcm.spec.module_spec,
            &mcm.spec.spoke_namespace,
            &mcm.spec.spoke_prerequisites,
            &mcm.spec.day1,
            pinned,
        )),
    }
    .unwrap_or_default();
    hex::encode(Sha256::digest(text.as_bytes()))[..10].to_string()
}

/// One cluster of the rollout: selected, with a work to ship this reconcile.
#[derive(Debug, Clone, Copy)]
pub struct Member<'a> {
    pub cluster: &'a str,
    pub labels: &'a BTreeMap<String, String>,
    /// The Placement decision group `(index, name)` of the cluster, when the MCM follows a
    /// Placement; `None` otherwise.
    pub decision_group: Option<(i32, &'a str)>,
    /// The spec hash of the work the hub would write for it now.
    pub desired_hash: &'a str,
    /// Its current work, if any.
    pub work: Option<&'a WorkEntry>,
}

/// Where a cluster stands in the rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub enum ClusterState {
    Updated,
    InProgress,
    Failed,
    Pending,
}

impl ClusterState {
    pub fn as_str(self) -> &'static str {
        match self {
            ClusterState::Updated => "Updated",
            ClusterState::InProgress => "InProgress",
            ClusterState::Failed => "Failed",
            ClusterState::Pending => "Pending",
        }
    }
}

/// What to do with one cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub state: ClusterState,
    /// Ship the desired work, with `annotations`; otherwise keep the existing work exactly.
    pub ship: bool,
    /// The rollout annotations the shipped work carries.
    pub annotations: BTreeMap<String, String>,
}

/// An event to publish (few: a rollout starting or resuming, halting, completing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RolloutEvent {
    Progressing(String),
    Halted(String),
    Completed(String),
}

#[derive(Debug, Clone)]
pub struct Decision {
    pub steps: BTreeMap<String, Step>,
    pub status: RolloutStatus,
    /// When to look again (a `minSuccessTime` or `progressDeadline` running out).
    pub requeue_after: Option<Duration>,
    pub events: Vec<RolloutEvent>,
    /// Clusters moved to the revision by this decision.
    pub moved: usize,
}

/// The rollout's inputs besides the members.
#[derive(Debug, Clone, Copy)]
pub struct Inputs<'a> {
    pub settings: &'a Settings,
    pub revision: &'a str,
    /// The `status.rollout` written before.
    pub previous: Option<&'a RolloutStatus>,
    /// The MCM carries the resume annotation.
    pub resume: bool,
    /// The spec changed since the last status (a new generation): a halt is decided afresh
    /// (raising `maxFailures` may lift it).
    pub spec_changed: bool,
    pub now: Timestamp,
}

fn at(text: Option<&String>) -> Option<Timestamp> {
    text.and_then(|t| t.parse().ok())
}

fn plus(t: Timestamp, d: Duration) -> Timestamp {
    t.checked_add(SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX))
        .unwrap_or(Timestamp::MAX)
}

fn until(now: Timestamp, then: Timestamp) -> Duration {
    Duration::try_from(then.duration_since(now)).unwrap_or(Duration::ZERO)
}

struct Tracked {
    state: ClusterState,
    accepted: bool,
    annotations: BTreeMap<String, String>,
    wake: Option<Timestamp>,
    /// Mandatory group position, if any.
    mandatory: Option<usize>,
    /// Order among the others: decision group index (none last), then name.
    rest_key: (i64, String),
    ship: bool,
}

/// A moved cluster's state from its work, and its annotations and wake-up time.
fn track(
    m: &Member<'_>,
    s: &Settings,
    now: Timestamp,
) -> (
    ClusterState,
    bool,
    BTreeMap<String, String>,
    Option<Timestamp>,
) {
    let Some(w) = m
        .work
        .filter(|w| !w.deleting && w.spec_hash.as_deref() == Some(m.desired_hash))
    else {
        return (ClusterState::Pending, false, BTreeMap::new(), None);
    };
    let started = at(w.rollout.get(STARTED_AT_ANNOTATION)).unwrap_or(now);
    let since = at(w.rollout.get(AVAILABLE_SINCE_ANNOTATION));
    let accepted = w
        .rollout
        .get(FAILURE_ACCEPTED_ANNOTATION)
        .map(String::as_str)
        == Some("true");
    let held = |since: Timestamp| plus(since, s.min_success) <= now;
    let up = w.applied_current && w.module_available();
    let (state, since, wake) = if w.degraded {
        (ClusterState::Failed, since.filter(|t| held(*t)), None)
    } else if up {
        let since = since.unwrap_or(now);
        if held(since) {
            (ClusterState::Updated, Some(since), None)
        } else {
            (
                ClusterState::InProgress,
                Some(since),
                Some(plus(since, s.min_success)),
            )
        }
    } else if let Some(since) = since.filter(|t| held(*t)) {
        // Succeeded before: stays updated.
        (ClusterState::Updated, Some(since), None)
    } else {
        match s.deadline.map(|d| plus(started, d)) {
            Some(deadline) if deadline <= now => (ClusterState::Failed, None, None),
            deadline => (ClusterState::InProgress, None, deadline),
        }
    };
    let mut a = BTreeMap::from([(STARTED_AT_ANNOTATION.to_string(), started.to_string())]);
    if let Some(since) = since {
        a.insert(AVAILABLE_SINCE_ANNOTATION.to_string(), since.to_string());
    }
    if accepted {
        a.insert(FAILURE_ACCEPTED_ANNOTATION.to_string(), "true".to_string());
    }
    (state, accepted, a, wake)
}

/// Decide the rollout over `members`.
pub fn decide(members: &[Member<'_>], inputs: Inputs<'_>) -> Decision {
    let s = inputs.settings;
    let now = inputs.now;
    let mut tracked: BTreeMap<String, Tracked> = members
        .iter()
        .map(|m| {
            let (state, accepted, annotations, wake) = track(m, s, now);
            let mandatory = s
                .groups
                .iter()
                .position(|g| g.contains(m.labels, m.decision_group));
            let rest_key = (
                m.decision_group.map_or(i64::MAX, |(i, _)| i64::from(i)),
                m.cluster.to_string(),
            );
            let ship = state != ClusterState::Pending;
            (
                m.cluster.to_string(),
                Tracked {
                    state,
                    accepted,
                    annotations,
                    wake,
                    mandatory,
                    rest_key,
                    ship,
                },
            )
        })
        .collect();
    let total = tracked.len();
    let previous = inputs
        .previous
        .filter(|p| p.revision == inputs.revision && p.strategy == s.kind.as_str());

    // Halting: a failure in a mandatory group, or more than maxFailures among the others.
    let mut halt = halt_reason(&tracked, s, total);
    let mut resumed = 0;
    let sticky = !inputs.spec_changed && previous.is_some_and(|p| p.phase == RolloutPhase::Halted);
    if (halt.is_some() || sticky) && inputs.resume {
        for t in tracked.values_mut() {
            if t.state == ClusterState::Failed && !t.accepted {
                t.accepted = true;
                t.annotations
                    .insert(FAILURE_ACCEPTED_ANNOTATION.to_string(), "true".to_string());
                resumed += 1;
            }
        }
        halt = halt_reason(&tracked, s, total);
    } else if halt.is_none() && sticky {
        halt = previous.and_then(|p| p.halt_reason.clone()).or(Some(
            "halted earlier at this revision; resume it or change the spec".to_string(),
        ));
    }
    let resumed_now = inputs.resume && (sticky || resumed > 0) && halt.is_none();

    // Moving (nothing while halted; the wave and group are still reported).
    let mut moved = 0;
    let (wave, current_group) = advance(&mut tracked, s, total, now, halt.is_none(), &mut moved);

    let count = |st: ClusterState| tracked.values().filter(|t| t.state == st).count() as i32;
    let failed_clusters: Vec<String> = tracked
        .iter()
        .filter(|(_, t)| t.state == ClusterState::Failed)
        .map(|(n, _)| n.clone())
        .collect();
    let (pending, in_progress) = (
        count(ClusterState::Pending),
        count(ClusterState::InProgress),
    );
    let phase = if halt.is_some() {
        RolloutPhase::Halted
    } else if pending == 0 && in_progress == 0 {
        RolloutPhase::Complete
    } else {
        RolloutPhase::Progressing
    };
    let status = RolloutStatus {
        revision: inputs.revision.to_string(),
        strategy: s.kind.as_str().to_string(),
        phase,
        total: total as i32,
        updated: count(ClusterState::Updated),
        in_progress,
        failed: count(ClusterState::Failed),
        pending,
        wave,
        current_group,
        halt_reason: halt.clone(),
        failed_clusters_omitted: failed_clusters.len().saturating_sub(STATUS_LIST_LIMIT) as i32,
        failed_clusters: failed_clusters
            .into_iter()
            .take(STATUS_LIST_LIMIT)
            .collect(),
    };

    let mut events = Vec::new();
    let new_revision = previous.is_none();
    if new_revision && phase == RolloutPhase::Progressing {
        events.push(RolloutEvent::Progressing(format!(
            "rolling out revision {} ({}) to {total} cluster(s): {} pending",
            inputs.revision,
            s.kind.as_str(),
            status.pending + moved as i32,
        )));
    }
    if resumed_now {
        events.push(RolloutEvent::Progressing(format!(
            "rollout of revision {} resumed: {resumed} failed cluster(s) accepted",
            inputs.revision
        )));
    }
    let was_halted = previous.is_some_and(|p| p.phase == RolloutPhase::Halted);
    if let Some(reason) = &halt
        && !was_halted
    {
        events.push(RolloutEvent::Halted(reason.clone()));
    }
    if phase == RolloutPhase::Complete
        && inputs.previous.is_some()
        && previous.is_none_or(|p| p.phase != RolloutPhase::Complete)
    {
        events.push(RolloutEvent::Completed(format!(
            "revision {} runs on {} cluster(s) ({} updated, {} failed and accepted)",
            inputs.revision, total, status.updated, status.failed
        )));
    }

    let requeue_after = tracked
        .values()
        .filter_map(|t| t.wake)
        .min()
        .map(|w| until(now, w) + Duration::from_secs(1));
    let steps = tracked
        .into_iter()
        .map(|(name, t)| {
            (
                name,
                Step {
                    state: t.state,
                    ship: t.ship,
                    annotations: if t.ship {
                        t.annotations
                    } else {
                        BTreeMap::new()
                    },
                },
            )
        })
        .collect();
    Decision {
        steps,
        status,
        requeue_after,
        events,
        moved,
    }
}

fn counted_failure(t: &Tracked) -> bool {
    t.state == ClusterState::Failed && !t.accepted
}

fn halt_reason(tracked: &BTreeMap<String, Tracked>, s: &Settings, total: usize) -> Option<String> {
    let list = |names: Vec<&String>| {
        let n = names.len();
        let shown: Vec<&str> = names.iter().take(10).map(|s| s.as_str()).collect();
        let more = if n > 10 {
            format!(" and {} more", n - 10)
        } else {
            String::new()
        };
        format!("{}{more}", shown.join(", "))
    };
    for (gi, g) in s.groups.iter().enumerate() {
        let failed: Vec<&String> = tracked
            .iter()
            .filter(|(_, t)| t.mandatory == Some(gi) && counted_failure(t))
            .map(|(n, _)| n)
            .collect();
        if !failed.is_empty() {
            return Some(format!(
                "mandatory group {:?} tolerates no failure; failed: {}",
                g.display_name(gi),
                list(failed)
            ));
        }
    }
    let rest = tracked.iter().filter(|(_, t)| t.mandatory.is_none());
    match s.kind {
        RolloutType::ProgressivePerGroup => {
            let mut groups: BTreeMap<i64, Vec<(&String, &Tracked)>> = BTreeMap::new();
            for (n, t) in rest {
                groups.entry(t.rest_key.0).or_default().push((n, t));
            }
            for (key, members) in groups {
                let allowed = scaled(&s.max_failures, members.len(), false).unwrap_or(0);
                let failed: Vec<&String> = members
                    .iter()
                    .filter(|(_, t)| counted_failure(t))
                    .map(|(n, _)| *n)
                    .collect();
                if failed.len() > allowed {
                    return Some(format!(
                        "{} of {} failed, more than maxFailures ({allowed}); failed: {}",
                        failed.len(),
                        group_name(key),
                        list(failed)
                    ));
                }
            }
            None
        }
        _ => {
            let allowed = scaled(&s.max_failures, total, false).unwrap_or(0);
            let failed: Vec<&String> = rest
                .filter(|(_, t)| counted_failure(t))
                .map(|(n, _)| n)
                .collect();
            (failed.len() > allowed).then(|| {
                format!(
                    "{} cluster(s) failed, more than maxFailures ({allowed}); failed: {}",
                    failed.len(),
                    list(failed)
                )
            })
        }
    }
}

fn group_name(key: i64) -> String {
    if key == i64::MAX {
        "the remaining clusters".to_string()
    } else {
        format!("decision group {key}")
    }
}

fn done(t: &Tracked) -> bool {
    t.state == ClusterState::Updated || (t.state == ClusterState::Failed && t.accepted)
}

fn move_now(t: &mut Tracked, s: &Settings, now: Timestamp, allowed: bool, moved: &mut usize) {
    if !allowed {
        return;
    }
    t.state = ClusterState::InProgress;
    t.ship = true;
    t.annotations = BTreeMap::from([(STARTED_AT_ANNOTATION.to_string(), now.to_string())]);
    t.wake = s.deadline.map(|d| plus(now, d));
    *moved += 1;
}

/// Move what the strategy allows now; returns the wave and the current group.
fn advance(
    tracked: &mut BTreeMap<String, Tracked>,
    s: &Settings,
    total: usize,
    now: Timestamp,
    allowed: bool,
    moved: &mut usize,
) -> (i32, Option<String>) {
    // Mandatory groups, one at a time, each as a whole.
    let mut wave = 0;
    for (gi, g) in s.groups.iter().enumerate() {
        if !tracked.values().any(|t| t.mandatory == Some(gi)) {
            continue;
        }
        wave += 1;
        if tracked
            .values()
            .filter(|t| t.mandatory == Some(gi))
            .all(done)
        {
            continue;
        }
        for t in tracked.values_mut().filter(|t| t.mandatory == Some(gi)) {
            if t.state == ClusterState::Pending {
                move_now(t, s, now, allowed, moved);
            }
        }
        return (wave, Some(g.display_name(gi)));
    }
    let mut order: Vec<((i64, String), String)> = tracked
        .iter()
        .filter(|(_, t)| t.mandatory.is_none())
        .map(|(n, t)| (t.rest_key.clone(), n.clone()))
        .collect();
    order.sort();
    if order.is_empty() {
        return (wave, None);
    }
    match s.kind {
        RolloutType::ProgressivePerGroup => {
            let mut keys: Vec<i64> = order.iter().map(|(k, _)| k.0).collect();
            keys.dedup();
            for (position, key) in keys.iter().enumerate() {
                let names: Vec<&String> = order
                    .iter()
                    .filter(|(k, _)| k.0 == *key)
                    .map(|(_, n)| n)
                    .collect();
                if names.iter().all(|n| done(&tracked[*n])) {
                    continue;
                }
                // The group moves when every earlier group is done; failures within
                // maxFailures count as done here (halting is decided before).
                for n in &names {
                    let t = tracked.get_mut(*n).expect("member");
                    if t.state == ClusterState::Pending {
                        move_now(t, s, now, allowed, moved);
                    }
                }
                let finished = names.iter().all(|n| {
                    let t = &tracked[*n];
                    t.state == ClusterState::Updated || t.state == ClusterState::Failed
                });
                if !finished {
                    return (wave + position as i32 + 1, Some(group_name(*key)));
                }
            }
            (wave + keys.len() as i32, None)
        }
        _ => {
            let limit = s
                .max_concurrency
                .as_ref()
                .map(|c| scaled(c, total, true).unwrap_or(1).max(1))
                .unwrap_or(usize::MAX);
            let busy = order
                .iter()
                .filter(|(_, n)| tracked[n].state == ClusterState::InProgress)
                .count();
            let mut free = limit.saturating_sub(busy);
            for (_, n) in &order {
                if free == 0 {
                    break;
                }
                let t = tracked.get_mut(n).expect("member");
                if t.state == ClusterState::Pending {
                    move_now(t, s, now, allowed, moved);
                    free -= 1;
                    if !allowed {
                        break;
                    }
                }
            }
            let reached = order
                .iter()
                .filter(|(_, n)| tracked[n].state != ClusterState::Pending)
                .count();
            let waves = if limit == usize::MAX {
                1
            } else {
                reached.div_ceil(limit).max(1)
            };
            (wave + waves as i32, None)
        }
    }
}

/// Put the rollout into the MCM's status: `status.rollout`, and the conditions it changes
/// (`Progressing` while clusters are to be moved or moving, `Degraded` when halted).
/// Without a progressive rollout `status.rollout` goes.
pub fn fill_status(
    status: &mut ManagedClusterModuleStatus,
    rollout: Option<&RolloutStatus>,
    generation: Option<i64>,
    now: Timestamp,
) {
    status.rollout = rollout.cloned();
    let Some(r) = rollout else {
        return;
    };
    let summary = format!(
        "rollout of revision {}: {} updated, {} in progress, {} failed, {} pending of {} (wave {}{})",
        r.revision,
        r.updated,
        r.in_progress,
        r.failed,
        r.pending,
        r.total,
        r.wave,
        r.current_group
            .as_deref()
            .map(|g| format!(", group {g}"))
            .unwrap_or_default()
    );
    let c = &mut status.conditions;
    match r.phase {
        RolloutPhase::Progressing => {
            set_condition(
                c,
                PROGRESSING,
                true,
                "RolloutInProgress",
                &summary,
                generation,
                now,
            );
        }
        RolloutPhase::Halted => {
            let why = format!(
                "{summary}; halted: {}",
                r.halt_reason.as_deref().unwrap_or_default()
            );
            let degraded = c.iter().find(|c| c.type_ == DEGRADED && c.status == "True");
            let message = match degraded {
                Some(d) if d.reason != "RolloutHalted" => format!("{}; {why}", d.message),
                _ => why.clone(),
            };
            let reason = match degraded {
                Some(d) if d.reason != "RolloutHalted" => d.reason.clone(),
                _ => "RolloutHalted".to_string(),
            };
            set_condition(c, DEGRADED, true, &reason, &message, generation, now);
            set_condition(
                c,
                PROGRESSING,
                false,
                "RolloutHalted",
                &why,
                generation,
                now,
            );
        }
        RolloutPhase::Complete => {}
    }
}

#[cfg(test)]
#[path = "rollout_tests.rs"]
mod tests;
