use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;
use shared_api::rollout::{
    AVAILABLE_SINCE_ANNOTATION, FAILURE_ACCEPTED_ANNOTATION, GroupClusterSelector,
    MandatoryDecisionGroup, RolloutPhase, RolloutStatus, RolloutType, STARTED_AT_ANNOTATION,
};

use super::*;
use crate::decide::facts::WorkEntry;

const NEW: &str = "new-hash";
const OLD: &str = "old-hash";
const REV: &str = "rev2";

fn t(secs: i64) -> Timestamp {
    Timestamp::from_second(1_700_000_000 + secs).unwrap()
}

fn settings(kind: RolloutType) -> Settings {
    Settings {
        kind,
        groups: vec![],
        max_concurrency: Some(IntOrString::Int(1)),
        min_success: Duration::from_secs(10),
        deadline: Some(Duration::from_secs(60)),
        max_failures: IntOrString::Int(0),
    }
}

/// A cluster's work: its hash, whether the Module is up, and its rollout annotations.
#[derive(Clone)]
struct W {
    hash: &'static str,
    up: bool,
    degraded: bool,
    current: bool,
    started: Option<i64>,
    since: Option<i64>,
    accepted: bool,
}

fn old() -> W {
    W {
        hash: OLD,
        up: true,
        degraded: false,
        current: true,
        started: None,
        since: None,
        accepted: false,
    }
}

fn moved(started: i64) -> W {
    W {
        hash: NEW,
        up: false,
        started: Some(started),
        ..old()
    }
}

fn up(started: i64, since: i64) -> W {
    W {
        up: true,
        since: Some(since),
        ..moved(started)
    }
}

fn entry(name: &str, w: &W) -> WorkEntry {
    let mut e = WorkEntry {
        mcm: "m".into(),
        cluster: name.into(),
        spec_hash: Some(w.hash.into()),
        applied: true,
        applied_current: w.current,
        available: true,
        degraded: w.degraded,
        ..Default::default()
    };
    e.feedback.insert("moduleLoader.desiredNumber".into(), 2);
    e.feedback.insert(
        "moduleLoader.availableNumber".into(),
        if w.up { 2 } else { 0 },
    );
    if let Some(s) = w.started {
        e.rollout
            .insert(STARTED_AT_ANNOTATION.into(), t(s).to_string());
    }
    if let Some(s) = w.since {
        e.rollout
            .insert(AVAILABLE_SINCE_ANNOTATION.into(), t(s).to_string());
    }
    if w.accepted {
        e.rollout
            .insert(FAILURE_ACCEPTED_ANNOTATION.into(), "true".into());
    }
    e
}

struct Fleet {
    names: Vec<String>,
    labels: Vec<BTreeMap<String, String>>,
    groups: Vec<Option<(i32, String)>>,
    works: Vec<Option<WorkEntry>>,
}

impl Fleet {
    fn new(works: &[(&str, Option<W>)]) -> Self {
        Self {
            names: works.iter().map(|(n, _)| n.to_string()).collect(),
            labels: works.iter().map(|_| BTreeMap::new()).collect(),
            groups: works.iter().map(|_| None).collect(),
            works: works
                .iter()
                .map(|(n, w)| w.as_ref().map(|w| entry(n, w)))
                .collect(),
        }
    }

    fn label(mut self, i: usize, k: &str, v: &str) -> Self {
        self.labels[i].insert(k.into(), v.into());
        self
    }

    fn group(mut self, i: usize, index: i32, name: &str) -> Self {
        self.groups[i] = Some((index, name.into()));
        self
    }

    fn decide(
        &self,
        s: &Settings,
        previous: Option<&RolloutStatus>,
        resume: bool,
        now: i64,
    ) -> Decision {
        self.decide_changed(s, previous, resume, false, now)
    }

    fn decide_changed(
        &self,
        s: &Settings,
        previous: Option<&RolloutStatus>,
        resume: bool,
        spec_changed: bool,
        now: i64,
    ) -> Decision {
        let members: Vec<Member<'_>> = (0..self.names.len())
            .map(|i| Member {
                cluster: &self.names[i],
                labels: &self.labels[i],
                decision_group: self.groups[i].as_ref().map(|(i, n)| (*i, n.as_str())),
                desired_hash: NEW,
                work: self.works[i].as_ref(),
            })
            .collect();
        decide(
            &members,
            Inputs {
                settings: s,
                revision: REV,
                previous,
                resume,
                spec_changed,
                now: t(now),
            },
        )
    }
}

fn states(d: &Decision) -> Vec<(String, ClusterState, bool)> {
    d.steps
        .iter()
        .map(|(n, s)| (n.clone(), s.state, s.ship))
        .collect()
}

use ClusterState::{Failed, InProgress, Pending, Updated};

fn st(list: &[(&str, ClusterState, bool)]) -> Vec<(String, ClusterState, bool)> {
    list.iter()
        .map(|(n, s, b)| (n.to_string(), *s, *b))
        .collect()
}

#[test]
fn all_or_unset_is_not_a_rollout() {
    let m = crate::decide::plan::tests::mcm(crate::decide::plan::tests::SPEC);
    assert_eq!(Settings::of(&m), None);
    let mut m2 = m.clone();
    m2.spec.rollout_strategy =
        Some(serde_json::from_value(serde_json::json!({"type": "All"})).unwrap());
    assert_eq!(Settings::of(&m2), None);
    m2.spec.rollout_strategy = Some(
        serde_json::from_value(serde_json::json!({"type": "Progressive", "progressive": {
            "maxConcurrency": "25%", "minSuccessTime": "1m", "progressDeadline": "None", "maxFailures": 2}}))
        .unwrap(),
    );
    let s = Settings::of(&m2).unwrap();
    assert_eq!(s.min_success, Duration::from_secs(60));
    assert_eq!(s.deadline, None);
    assert_eq!(s.max_failures, IntOrString::Int(2));
    assert_eq!(s.max_concurrency, Some(IntOrString::String("25%".into())));
}

#[test]
fn the_revision_is_what_the_clusters_run_not_how_they_are_chosen() {
    use shared_api::mcm::ImageStatus;
    let m = crate::decide::plan::tests::mcm(crate::decide::plan::tests::SPEC);
    let img = |d: &str| ImageStatus {
        image: "reg/x:1".into(),
        digest: Some(d.into()),
        ..Default::default()
    };
    let r = revision(&m, &[img("sha256:1")]);
    assert_eq!(r.len(), 10);
    let mut other = m.clone();
    other.spec.selector.insert("more".into(), "x".into());
    other.spec.rollout_strategy = Some(Default::default());
    assert_eq!(
        revision(&other, &[img("sha256:1")]),
        r,
        "selector and strategy do not count"
    );
    assert_ne!(
        revision(&m, &[img("sha256:2")]),
        r,
        "a new digest is a new revision"
    );
    other.spec.spoke_namespace = "elsewhere".into();
    assert_ne!(revision(&other, &[img("sha256:1")]), r);
}

/// maxConcurrency 1: one cluster at a time, the next only after the previous succeeded and
/// held for minSuccessTime.
#[test]
fn progressive_moves_one_cluster_at_a_time() {
    let s = settings(RolloutType::Progressive);
    let f = Fleet::new(&[
        ("c1", Some(old())),
        ("c2", Some(old())),
        ("c3", Some(old())),
    ]);
    let d = f.decide(&s, None, false, 0);
    assert_eq!(
        states(&d),
        st(&[
            ("c1", InProgress, true),
            ("c2", Pending, false),
            ("c3", Pending, false)
        ])
    );
    assert_eq!(d.moved, 1);
    assert_eq!(
        d.steps["c1"].annotations,
        BTreeMap::from([(STARTED_AT_ANNOTATION.to_string(), t(0).to_string())])
    );
    assert!(d.steps["c2"].annotations.is_empty());
    assert_eq!(d.status.phase, RolloutPhase::Progressing);
    assert_eq!(
        (d.status.pending, d.status.in_progress, d.status.wave),
        (2, 1, 1)
    );
    assert!(matches!(&d.events[..], [RolloutEvent::Progressing(m)] if m.contains("rev2")));
    assert_eq!(
        d.requeue_after,
        Some(Duration::from_secs(61)),
        "the deadline"
    );
    let prev = d.status;

    // Applied, not available yet: nothing more moves.
    let f = Fleet::new(&[
        ("c1", Some(moved(0))),
        ("c2", Some(old())),
        ("c3", Some(old())),
    ]);
    let d = f.decide(&s, Some(&prev), false, 5);
    assert_eq!(states(&d)[1], ("c2".into(), Pending, false));
    assert!(d.events.is_empty());

    // Available: the hold starts now and is written down.
    let mut w = moved(0);
    w.up = true;
    let f = Fleet::new(&[("c1", Some(w)), ("c2", Some(old())), ("c3", Some(old()))]);
    let d = f.decide(&s, Some(&prev), false, 20);
    assert_eq!(d.steps["c1"].state, InProgress);
    assert_eq!(
        d.steps["c1"].annotations.get(AVAILABLE_SINCE_ANNOTATION),
        Some(&t(20).to_string())
    );
    assert_eq!(d.steps["c2"].state, Pending);
    assert_eq!(
        d.requeue_after,
        Some(Duration::from_secs(11)),
        "minSuccessTime runs out"
    );

    // Held for minSuccessTime: c1 is updated and c2 moves.
    let f = Fleet::new(&[
        ("c1", Some(up(0, 20))),
        ("c2", Some(old())),
        ("c3", Some(old())),
    ]);
    let d = f.decide(&s, Some(&prev), false, 30);
    assert_eq!(
        states(&d),
        st(&[
            ("c1", Updated, true),
            ("c2", InProgress, true),
            ("c3", Pending, false)
        ])
    );
    assert_eq!((d.status.updated, d.status.wave), (1, 2));

    // Everything updated: complete, once.
    let f = Fleet::new(&[
        ("c1", Some(up(0, 20))),
        ("c2", Some(up(30, 40))),
        ("c3", Some(up(50, 60))),
    ]);
    let d = f.decide(&s, Some(&prev), false, 100);
    assert_eq!(d.status.phase, RolloutPhase::Complete);
    assert!(matches!(&d.events[..], [RolloutEvent::Completed(_)]));
    let again = f.decide(&s, Some(&d.status), false, 200);
    assert!(again.events.is_empty());
    assert_eq!(again.requeue_after, None);
}

#[test]
fn an_interrupted_hold_starts_again() {
    let s = settings(RolloutType::Progressive);
    let mut w = up(0, 20);
    w.up = false;
    let f = Fleet::new(&[("c1", Some(w)), ("c2", Some(old()))]);
    let d = f.decide(&s, None, false, 25);
    assert_eq!(d.steps["c1"].state, InProgress);
    assert_eq!(
        d.steps["c1"].annotations.get(AVAILABLE_SINCE_ANNOTATION),
        None
    );
    assert_eq!(d.steps["c2"].state, Pending);
}

#[test]
fn an_updated_cluster_stays_updated_when_a_node_joins() {
    let s = settings(RolloutType::Progressive);
    let mut w = up(0, 10);
    w.up = false;
    let f = Fleet::new(&[("c1", Some(w)), ("c2", Some(old()))]);
    let d = f.decide(&s, None, false, 500);
    assert_eq!(d.steps["c1"].state, Updated);
    assert_eq!(d.steps["c2"].state, InProgress, "the rollout goes on");
}

#[test]
fn applied_at_an_older_generation_is_not_success() {
    let s = settings(RolloutType::Progressive);
    let mut w = up(0, 0);
    w.since = None;
    w.current = false;
    let f = Fleet::new(&[("c1", Some(w)), ("c2", Some(old()))]);
    let d = f.decide(&s, None, false, 30);
    assert_eq!(d.steps["c1"].state, InProgress);
    assert_eq!(d.steps["c2"].state, Pending);
}

/// Past the deadline without success: failed; with maxFailures 0 the rollout halts and
/// nothing else moves; the untouched clusters keep their work.
#[test]
fn a_missed_deadline_fails_and_halts() {
    let s = settings(RolloutType::Progressive);
    let f = Fleet::new(&[("c1", Some(moved(0))), ("c2", Some(old())), ("c3", None)]);
    let d = f.decide(&s, None, false, 61);
    assert_eq!(
        states(&d),
        st(&[
            ("c1", Failed, true),
            ("c2", Pending, false),
            ("c3", Pending, false)
        ])
    );
    assert_eq!(d.status.phase, RolloutPhase::Halted);
    assert_eq!(d.status.failed_clusters, vec!["c1"]);
    let reason = d.status.halt_reason.clone().unwrap();
    assert!(
        reason.contains("c1") && reason.contains("maxFailures (0)"),
        "{reason}"
    );
    assert!(
        matches!(&d.events[..], [RolloutEvent::Halted(r)] if r == &reason),
        "{:?}",
        d.events
    );
    assert_eq!(d.moved, 0);

    // Halted stays halted, even if the failed cluster recovers, and says so once.
    let prev = d.status;
    let f = Fleet::new(&[("c1", Some(up(0, 70))), ("c2", Some(old())), ("c3", None)]);
    let d = f.decide(&s, Some(&prev), false, 200);
    assert_eq!(d.status.phase, RolloutPhase::Halted);
    assert_eq!(d.steps["c2"].state, Pending);
    assert!(d.events.is_empty(), "{:?}", d.events);
    assert_eq!(d.status.halt_reason, prev.halt_reason);
}

#[test]
fn degraded_is_failed_at_once() {
    let s = settings(RolloutType::Progressive);
    let mut w = moved(0);
    w.degraded = true;
    let f = Fleet::new(&[("c1", Some(w)), ("c2", Some(old()))]);
    let d = f.decide(&s, None, false, 1);
    assert_eq!(d.steps["c1"].state, Failed);
    assert_eq!(d.status.phase, RolloutPhase::Halted);
}

/// Failures within maxFailures free their place; one more halts.
#[test]
fn max_failures_is_tolerated_then_halts() {
    let mut s = settings(RolloutType::Progressive);
    s.max_failures = IntOrString::Int(1);
    let f = Fleet::new(&[
        ("c1", Some(moved(0))),
        ("c2", Some(old())),
        ("c3", Some(old())),
    ]);
    let d = f.decide(&s, None, false, 61);
    assert_eq!(
        states(&d),
        st(&[
            ("c1", Failed, true),
            ("c2", InProgress, true),
            ("c3", Pending, false)
        ])
    );
    let f = Fleet::new(&[
        ("c1", Some(moved(0))),
        ("c2", Some(moved(61))),
        ("c3", Some(old())),
    ]);
    let d = f.decide(&s, Some(&d.status), false, 122);
    assert_eq!(d.status.phase, RolloutPhase::Halted);
    assert_eq!(d.status.failed_clusters, vec!["c1", "c2"]);
    assert_eq!(d.steps["c3"].state, Pending);
    // A percentage of the clusters, rounded down: 50% of 3 is 1.
    s.max_failures = IntOrString::String("50%".into());
    let d = f.decide(&s, None, false, 122);
    assert_eq!(d.status.phase, RolloutPhase::Halted);
}

/// Resuming accepts the failures so far and goes on; a new failure halts again.
#[test]
fn resume_accepts_the_failures_and_continues() {
    let s = settings(RolloutType::Progressive);
    let f = Fleet::new(&[
        ("c1", Some(moved(0))),
        ("c2", Some(old())),
        ("c3", Some(old())),
    ]);
    let halted = f.decide(&s, None, false, 61).status;
    let d = f.decide(&s, Some(&halted), true, 70);
    assert_eq!(
        states(&d),
        st(&[
            ("c1", Failed, true),
            ("c2", InProgress, true),
            ("c3", Pending, false)
        ])
    );
    assert_eq!(
        d.steps["c1"]
            .annotations
            .get(FAILURE_ACCEPTED_ANNOTATION)
            .map(String::as_str),
        Some("true")
    );
    assert_eq!(d.status.phase, RolloutPhase::Progressing);
    assert!(
        matches!(&d.events[..], [RolloutEvent::Progressing(m)] if m.contains("resumed") && m.contains("1 failed"))
    );
    // The acceptance is on the work: the next reconcile does not halt for c1.
    let mut c1 = moved(0);
    c1.accepted = true;
    let f = Fleet::new(&[
        ("c1", Some(c1.clone())),
        ("c2", Some(moved(70))),
        ("c3", Some(old())),
    ]);
    let d = f.decide(&s, Some(&d.status), false, 80);
    assert_eq!(d.status.phase, RolloutPhase::Progressing);
    // c2 fails too: halted again.
    let d2 = f.decide(&s, Some(&d.status), false, 131);
    assert_eq!(d2.status.phase, RolloutPhase::Halted);
    assert_eq!(d2.status.failed_clusters, vec!["c1", "c2"]);
    assert!(
        d2.status
            .halt_reason
            .unwrap()
            .contains("1 cluster(s) failed")
    );
    // Resume when not halted changes nothing.
    let d3 = f.decide(&s, Some(&d.status), true, 80);
    assert_eq!(states(&d3), states(&d));
    assert!(d3.events.is_empty());
}

/// A new revision starts over: the halt of the old one does not hold it.
#[test]
fn a_new_revision_lifts_the_halt() {
    let s = settings(RolloutType::Progressive);
    let f = Fleet::new(&[("c1", Some(old())), ("c2", Some(old()))]);
    let old_halt = RolloutStatus {
        revision: "rev1".into(),
        strategy: "Progressive".into(),
        phase: RolloutPhase::Halted,
        halt_reason: Some("earlier".into()),
        ..Default::default()
    };
    let d = f.decide(&s, Some(&old_halt), false, 0);
    assert_eq!(d.status.phase, RolloutPhase::Progressing);
    assert_eq!(d.steps["c1"].state, InProgress);
    assert!(matches!(&d.events[..], [RolloutEvent::Progressing(_)]));
}

/// A canary group chosen by label goes first, as a whole, and tolerates no failure.
#[test]
fn the_canary_group_goes_first() {
    let mut s = settings(RolloutType::Progressive);
    s.max_failures = IntOrString::Int(5);
    s.groups = vec![MandatoryDecisionGroup {
        group_name: Some("canary".into()),
        cluster_selector: Some(GroupClusterSelector {
            match_labels: [("ring".to_string(), "canary".to_string())].into(),
        }),
        ..Default::default()
    }];
    let mk = |w1: W, w2: W, w3: W, w4: W| {
        Fleet::new(&[
            ("a", Some(w1)),
            ("b", Some(w2)),
            ("y", Some(w3)),
            ("z", Some(w4)),
        ])
        .label(2, "ring", "canary")
        .label(3, "ring", "canary")
    };
    let d = mk(old(), old(), old(), old()).decide(&s, None, false, 0);
    assert_eq!(
        states(&d),
        st(&[
            ("a", Pending, false),
            ("b", Pending, false),
            ("y", InProgress, true),
            ("z", InProgress, true)
        ]),
        "the whole group, above maxConcurrency"
    );
    assert_eq!(d.status.current_group.as_deref(), Some("canary"));
    assert_eq!(d.status.wave, 1);
    // One canary done, the other not yet: still waiting.
    let d = mk(old(), old(), up(0, 0), moved(0)).decide(&s, Some(&d.status), false, 20);
    assert_eq!(d.steps["a"].state, Pending);
    // Both done: the rest, one at a time.
    let d = mk(old(), old(), up(0, 0), up(0, 5)).decide(&s, Some(&d.status), false, 20);
    assert_eq!(
        states(&d)[..2],
        st(&[("a", InProgress, true), ("b", Pending, false)])[..]
    );
    assert_eq!((d.status.wave, d.status.current_group.clone()), (2, None));
    // A canary failure halts though maxFailures is 5.
    let d = mk(old(), old(), up(0, 0), moved(0)).decide(&s, None, false, 61);
    assert_eq!(d.status.phase, RolloutPhase::Halted);
    assert!(d.status.halt_reason.unwrap().contains("\"canary\""));
    assert_eq!(d.steps["a"].state, Pending);
}

/// ProgressivePerGroup: the canary group, then each decision group as a whole, then the
/// clusters in no group.
#[test]
fn per_group_moves_whole_groups() {
    let mut s = settings(RolloutType::ProgressivePerGroup);
    s.max_concurrency = None;
    s.groups = vec![MandatoryDecisionGroup {
        group_name: Some("canary".into()),
        ..Default::default()
    }];
    let mk = |ws: [W; 4]| {
        let [a, b, c, d] = ws;
        Fleet::new(&[
            ("a", Some(a)),
            ("b", Some(b)),
            ("c", Some(c)),
            ("d", Some(d)),
        ])
        .group(0, 0, "canary")
        .group(1, 1, "east")
        .group(2, 1, "east")
    };
    let d = mk([old(), old(), old(), old()]).decide(&s, None, false, 0);
    assert_eq!(
        states(&d),
        st(&[
            ("a", InProgress, true),
            ("b", Pending, false),
            ("c", Pending, false),
            ("d", Pending, false)
        ])
    );
    assert_eq!(d.status.current_group.as_deref(), Some("canary"));
    let d = mk([up(0, 0), old(), old(), old()]).decide(&s, Some(&d.status), false, 20);
    assert_eq!(
        states(&d),
        st(&[
            ("a", Updated, true),
            ("b", InProgress, true),
            ("c", InProgress, true),
            ("d", Pending, false)
        ])
    );
    assert_eq!(d.status.current_group.as_deref(), Some("decision group 1"));
    assert_eq!(d.status.wave, 2);
    let d = mk([up(0, 0), up(20, 20), up(20, 25), old()]).decide(&s, Some(&d.status), false, 40);
    assert_eq!(d.steps["d"].state, InProgress);
    assert_eq!(
        d.status.current_group.as_deref(),
        Some("the remaining clusters")
    );
    assert_eq!(d.status.wave, 3);
}

/// Without groups, ProgressivePerGroup moves everything at once (one group).
#[test]
fn per_group_without_groups_is_one_wave() {
    let mut s = settings(RolloutType::ProgressivePerGroup);
    s.max_concurrency = None;
    let f = Fleet::new(&[("a", Some(old())), ("b", None)]);
    let d = f.decide(&s, None, false, 0);
    assert_eq!(
        states(&d),
        st(&[("a", InProgress, true), ("b", InProgress, true)])
    );
}

/// A cluster joining mid-rollout (no work at all) waits for its turn like any other.
#[test]
fn a_joining_cluster_waits_its_turn() {
    let s = settings(RolloutType::Progressive);
    let f = Fleet::new(&[("c1", Some(moved(0))), ("c0", None)]);
    let d = f.decide(&s, None, false, 5);
    assert_eq!(d.steps["c0"].state, Pending);
    assert!(!d.steps["c0"].ship, "no work yet");
    let f = Fleet::new(&[("c1", Some(up(0, 0))), ("c0", None)]);
    let d = f.decide(&s, None, false, 20);
    assert_eq!(d.steps["c0"].state, InProgress);
    assert!(d.steps["c0"].ship);
}

#[test]
fn max_concurrency_as_a_percentage_rounds_up() {
    let mut s = settings(RolloutType::Progressive);
    s.max_concurrency = Some(IntOrString::String("30%".into()));
    let f = Fleet::new(&[
        ("a", Some(old())),
        ("b", Some(old())),
        ("c", Some(old())),
        ("d", Some(old())),
        ("e", Some(old())),
    ]);
    let d = f.decide(&s, None, false, 0);
    assert_eq!(d.moved, 2, "30% of 5 is 1.5: 2");
    s.max_concurrency = None;
    assert_eq!(f.decide(&s, None, false, 0).moved, 5, "unset: no limit");
}

/// A work written before the strategy (or by `All`) at the revision is tracked from now on.
#[test]
fn a_work_without_annotations_is_tracked_from_now() {
    let s = settings(RolloutType::Progressive);
    let mut w = old();
    w.hash = NEW;
    let f = Fleet::new(&[("c1", Some(w))]);
    let d = f.decide(&s, None, false, 7);
    assert_eq!(d.steps["c1"].state, InProgress);
    assert_eq!(
        d.steps["c1"].annotations,
        BTreeMap::from([
            (STARTED_AT_ANNOTATION.to_string(), t(7).to_string()),
            (AVAILABLE_SINCE_ANNOTATION.to_string(), t(7).to_string()),
        ])
    );
    assert_eq!(d.status.phase, RolloutPhase::Progressing);
}

#[test]
fn no_deadline_waits_for_ever() {
    let mut s = settings(RolloutType::Progressive);
    s.deadline = None;
    let f = Fleet::new(&[("c1", Some(moved(0))), ("c2", Some(old()))]);
    let d = f.decide(&s, None, false, 100_000);
    assert_eq!(d.steps["c1"].state, InProgress);
    assert_eq!(d.requeue_after, None);
}

#[test]
fn failed_clusters_are_bounded() {
    let mut s = settings(RolloutType::Progressive);
    s.max_concurrency = None;
    s.max_failures = IntOrString::String("100%".into());
    let names: Vec<String> = (0..70).map(|i| format!("c{i:02}")).collect();
    let list: Vec<(&str, Option<W>)> = names.iter().map(|n| (n.as_str(), Some(moved(0)))).collect();
    let d = Fleet::new(&list).decide(&s, None, false, 100);
    assert_eq!(d.status.failed, 70);
    assert_eq!(d.status.failed_clusters.len(), 64);
    assert_eq!(d.status.failed_clusters_omitted, 6);
    assert_eq!(
        d.status.phase,
        RolloutPhase::Complete,
        "all failed within tolerance"
    );
}

/// Raising maxFailures (a spec change at the same revision) lifts a halt it no longer
/// justifies; without a spec change the halt holds.
#[test]
fn a_spec_change_decides_the_halt_afresh() {
    let mut s = settings(RolloutType::Progressive);
    let f = Fleet::new(&[("c1", Some(moved(0))), ("c2", Some(old()))]);
    let halted = f.decide(&s, None, false, 61).status;
    assert_eq!(halted.phase, RolloutPhase::Halted);
    s.max_failures = IntOrString::Int(1);
    assert_eq!(
        f.decide(&s, Some(&halted), false, 70).status.phase,
        RolloutPhase::Halted
    );
    let d = f.decide_changed(&s, Some(&halted), false, true, 70);
    assert_eq!(d.status.phase, RolloutPhase::Progressing);
    assert_eq!(d.steps["c2"].state, InProgress);
    // Still too many: halted again, without a second event.
    s.max_failures = IntOrString::Int(0);
    let d = f.decide_changed(&s, Some(&halted), false, true, 70);
    assert_eq!(d.status.phase, RolloutPhase::Halted);
    assert!(d.events.is_empty(), "{:?}", d.events);
}
