//! When a ManifestWork that should go may be deleted, held or released (the reasons are
//! in `reconcile::release`, which carries the steps out).

use std::time::Duration;

use shared_api::ocm::{WORK_FINALIZER, work_conditions};

use super::facts::WorkEntry;

/// What to do now with one work that should go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Delete it: the work agent recorded what it applied (or the hold is over).
    Delete,
    /// Not yet: the work agent has not reported the pass that records the Module.
    Hold,
    /// Being deleted: the work agent removes the Module, then OCM's finalizer.
    Wait,
    /// Delete it (if not done) and remove OCM's finalizer: nobody on the spoke will.
    Release,
}

/// Whether the work's status shows the agent's pass that records applied manifests (see the
/// module documentation): `Applied` reported, and when it is `True`, `Available` reported
/// (the status controller read the Module back). The Module's status feedback is not waited
/// for: it needs the spoke agent, and a Module nobody serves must still go at once.
pub fn recorded(w: &WorkEntry) -> bool {
    // The work agent adds its finalizer before it applies anything: without it, nothing
    // was applied (and nothing will be: the deletion goes through at once).
    if !w.finalizers.iter().any(|f| f == WORK_FINALIZER) {
        return true;
    }
    let reported = |t: &str| w.conditions.iter().any(|c| c.type_ == t);
    reported(work_conditions::APPLIED) && (!w.applied || reported(work_conditions::AVAILABLE))
}

/// The step for one work. `waited`: since the deletion was wanted; `releasable`: the MCM is
/// being deleted (works of clusters merely deselected are never released).
pub fn step(
    w: &WorkEntry,
    cluster_available: bool,
    waited: Duration,
    deadline: Duration,
    releasable: bool,
    force: bool,
) -> Step {
    let overdue = waited >= deadline;
    if releasable && (force || (!cluster_available && overdue)) {
        return Step::Release;
    }
    if w.deleting {
        Step::Wait
    } else if recorded(w) || overdue {
        Step::Delete
    } else {
        Step::Hold
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
    use k8s_openapi::jiff::Timestamp;

    fn cond(t: &str, status: &str) -> Condition {
        Condition {
            type_: t.into(),
            status: status.into(),
            reason: "R".into(),
            message: String::new(),
            last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                Timestamp::now(),
            ),
            observed_generation: None,
        }
    }

    fn work(conds: &[(&str, &str)]) -> WorkEntry {
        WorkEntry {
            mcm: "m".into(),
            cluster: "c".into(),
            applied: conds.iter().any(|(t, s)| *t == "Applied" && *s == "True"),
            conditions: conds.iter().map(|(t, s)| cond(t, s)).collect(),
            finalizers: vec![WORK_FINALIZER.into()],
            ..Default::default()
        }
    }

    const D: Duration = Duration::from_secs(600);

    #[test]
    fn a_work_is_deleted_only_once_the_agent_recorded_the_module() {
        let s = |w: &WorkEntry| step(w, true, Duration::ZERO, D, true, false);
        assert_eq!(s(&work(&[])), Step::Hold, "no status yet");
        let mut untouched = work(&[]);
        untouched.finalizers.clear();
        assert_eq!(
            s(&untouched),
            Step::Delete,
            "the work agent never took it up"
        );
        assert_eq!(s(&work(&[("Applied", "True")])), Step::Hold);
        assert_eq!(
            s(&work(&[("Applied", "True"), ("Available", "Unknown")])),
            Step::Delete
        );
        // Refused by the agent (e.g. the executor may not): nothing applied to record.
        assert_eq!(s(&work(&[("Applied", "False")])), Step::Delete);
        // The hold is bounded.
        assert_eq!(step(&work(&[]), true, D, D, true, false), Step::Delete);
    }

    #[test]
    fn only_works_of_a_deleted_mcm_on_an_unavailable_cluster_are_released() {
        let mut w = work(&[("Applied", "True"), ("Available", "True")]);
        w.deleting = true;
        assert_eq!(step(&w, true, D * 2, D, true, false), Step::Wait);
        assert_eq!(step(&w, false, D / 2, D, true, false), Step::Wait);
        assert_eq!(step(&w, false, D, D, true, false), Step::Release);
        assert_eq!(
            step(&w, false, D, D, false, false),
            Step::Wait,
            "deselected"
        );
        // Forced: at once, available or not, deleted yet or not.
        assert_eq!(step(&w, true, Duration::ZERO, D, true, true), Step::Release);
        assert_eq!(
            step(&work(&[]), true, Duration::ZERO, D, true, true),
            Step::Release
        );
        // Not yet deleted on an unavailable cluster: deleted, then released at the deadline.
        let mut fresh = work(&[("Applied", "True"), ("Available", "True")]);
        fresh
            .feedback
            .insert("moduleLoader.desiredNumber".into(), 1);
        assert_eq!(
            step(&fresh, false, Duration::ZERO, D, true, false),
            Step::Delete
        );
        assert_eq!(step(&fresh, false, D, D, true, false), Step::Release);
    }
}
