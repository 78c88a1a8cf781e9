//! Truth tables of the MCM status: feed what a reconcile found, assert on the status.

use std::sync::Arc;

use super::*;
use crate::decide::plan::plan;
use crate::decide::plan::tests::{SPEC, cluster, mcm};
use shared_api::conditions::condition_status;

const D: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";
const IMAGE: &str = "reg/x/spoke-ns:5.14.0-1";

fn entry(cluster: &str, applied: bool, degraded: bool) -> WorkEntry {
    WorkEntry {
        mcm: "m".into(),
        cluster: cluster.into(),
        applied,
        degraded,
        ..Default::default()
    }
}

/// A work whose Module is loaded everywhere it should be.
fn available(cluster: &str) -> WorkEntry {
    let mut w = entry(cluster, true, false);
    w.available = true;
    w.feedback.insert("moduleLoader.desiredNumber".into(), 1);
    w.feedback.insert("moduleLoader.availableNumber".into(), 1);
    w
}

fn now() -> Timestamp {
    "2026-01-01T12:00:00Z".parse().unwrap()
}

/// One selected cluster `c1` on one kernel, one image.
struct World {
    mcm: ManagedClusterModule,
    plan: Plan,
    outcomes: BTreeMap<String, ImageOutcome>,
    works: Works,
    problems: Vec<ClusterProblem>,
    pull_secret_error: Option<String>,
    write_errors: Vec<String>,
    day0: BTreeMap<String, crate::render::day0::Day0Want>,
}

impl World {
    fn new(image: ImageOutcome, work: Option<WorkEntry>) -> Self {
        let mcm = mcm(SPEC);
        let plan = plan(
            &mcm,
            &[cluster("c1", &[("wants", "yes")], Some(&["5.14.0-1"]))],
        )
        .unwrap();
        Self {
            mcm,
            plan,
            outcomes: [(IMAGE.to_string(), image)].into(),
            works: work
                .map(|w| (w.cluster.clone(), Arc::new(w)))
                .into_iter()
                .collect(),
            problems: vec![],
            pull_secret_error: None,
            write_errors: vec![],
            day0: BTreeMap::new(),
        }
    }

    fn status(&self) -> StatusDecision {
        let selected: BTreeSet<&str> = ["c1"].into();
        let f = Findings {
            plan: &self.plan,
            outcomes: &self.outcomes,
            works: &self.works,
            selected: &selected,
            problems: &self.problems,
            pull_secret_error: self.pull_secret_error.as_deref(),
            write_errors: &self.write_errors,
            day0: &self.day0,
        };
        mcm_status(&self.mcm, f, now())
    }
}

/// (Ready, Progressing, Degraded) and the Degraded reason.
fn conditions(d: &StatusDecision) -> (&str, &str, &str, String) {
    let c = &d.status.conditions;
    let reason = c
        .iter()
        .find(|c| c.type_ == DEGRADED)
        .map(|c| c.reason.clone())
        .unwrap_or_default();
    (
        condition_status(c, READY).unwrap_or_default(),
        condition_status(c, PROGRESSING).unwrap_or_default(),
        condition_status(c, DEGRADED).unwrap_or_default(),
        reason,
    )
}

/// SPEC §7 case 7: works {Applied=True}, {Degraded=True} → desired 2, applied 1, degraded 1.
#[test]
fn status_counts_from_work_conditions() {
    let works = BTreeMap::from([
        ("c1".to_string(), Arc::new(entry("c1", true, false))),
        ("c2".to_string(), Arc::new(entry("c2", false, true))),
    ]);
    let mut s = ManagedClusterModuleStatus::default();
    fill_counts(&mut s, &works, None);
    assert_eq!(
        (
            s.number_desired,
            s.number_applied,
            s.number_degraded,
            s.number_available
        ),
        (2, 1, 1, 0)
    );
    // Only selected clusters count; a work being deleted does not.
    let selected: BTreeSet<&str> = ["c1"].into();
    fill_counts(&mut s, &works, Some(&selected));
    assert_eq!((s.number_desired, s.number_applied), (1, 1));
}

#[test]
fn everything_available_is_ready_and_idle() {
    let d = World::new(ImageOutcome::ready(D.into()), Some(available("c1"))).status();
    assert_eq!(
        conditions(&d),
        ("True", "False", "False", "AsExpected".into())
    );
    assert_eq!(d.next, Next::Resync);
    assert!(d.degraded_reasons.is_empty());
    assert_eq!(d.status.images[0].digest.as_deref(), Some(D));
}

#[test]
fn a_build_in_progress_is_progressing_not_degraded() {
    let d = World::new(ImageOutcome::building("running".into()), None).status();
    assert_eq!(
        conditions(&d),
        ("False", "True", "False", "AsExpected".into())
    );
    assert_eq!(
        d.next,
        Next::WaitForImages,
        "waiting is a state, not an error"
    );
}

#[test]
fn a_work_not_yet_available_is_progressing() {
    let d = World::new(
        ImageOutcome::ready(D.into()),
        Some(entry("c1", true, false)),
    )
    .status();
    assert_eq!(
        conditions(&d),
        ("False", "True", "False", "AsExpected".into())
    );
    assert_eq!(d.next, Next::Resync);
}

#[test]
fn a_failed_image_alone_is_degraded_not_progressing() {
    let failed = ImageOutcome::failed("build failed".into());
    let d = World::new(failed, Some(available("c1"))).status();
    assert_eq!(
        conditions(&d),
        ("False", "False", "True", "ImagesFailed".into())
    );
    assert_eq!(d.degraded_reasons, vec![format!("{IMAGE}: build failed")]);
    assert_eq!(d.next, Next::RetryImages(vec![IMAGE.to_string()]));
}

#[test]
fn registry_down_keeps_the_digest_recorded_before() {
    let mut w = World::new(
        ImageOutcome::failed("unreachable".into()),
        Some(available("c1")),
    );
    w.mcm.status = Some(ManagedClusterModuleStatus {
        images: vec![ImageStatus {
            image: IMAGE.into(),
            digest: Some(D.into()),
            state: ImageState::Ready,
            ..Default::default()
        }],
        ..Default::default()
    });
    let d = w.status();
    assert_eq!(d.status.images[0].digest.as_deref(), Some(D));
    assert_eq!(d.status.images[0].state, ImageState::Failed);
}

#[test]
fn degraded_reasons_in_order_of_precedence() {
    let mut w = World::new(ImageOutcome::failed("x".into()), Some(available("c1")));
    w.pull_secret_error = Some("pull secret ns/s does not exist".into());
    w.write_errors = vec!["c1/m: conflict".into()];
    let d = w.status();
    assert_eq!(conditions(&d).3, "PullSecretError");
    assert_eq!(d.degraded_reasons[0], "pull secret ns/s does not exist");
    assert_eq!(
        d.degraded_reasons.last().unwrap(),
        "1 ManifestWork write(s) failed: c1/m: conflict"
    );

    let mut w = World::new(
        ImageOutcome::failed("SignatureInvalid: bad".into()),
        Some(available("c1")),
    );
    w.write_errors = vec!["e".into()];
    assert_eq!(conditions(&w.status()).3, "SignatureInvalid");

    let mut w = World::new(ImageOutcome::ready(D.into()), Some(available("c1")));
    w.write_errors = vec!["e".into()];
    assert_eq!(conditions(&w.status()).3, "WriteFailed");

    let mut degraded = available("c1");
    degraded.degraded = true;
    let d = World::new(ImageOutcome::ready(D.into()), Some(degraded)).status();
    assert_eq!(conditions(&d).3, "ManifestWorksDegraded");
    assert_eq!(
        d.degraded_reasons,
        vec!["1 ManifestWork(s) report Degraded"]
    );
}

#[test]
fn a_waiting_cluster_is_not_ready_and_says_why() {
    let mut w = World::new(ImageOutcome::ready(D.into()), Some(available("c1")));
    w.problems = vec![ClusterProblem {
        name: "c1".into(),
        reason: "NoKernelClaim".into(),
        message: "no claim yet".into(),
    }];
    let d = w.status();
    assert_eq!(conditions(&d).0, "False");
    let progress = d
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == PROGRESSING)
        .unwrap();
    assert!(
        progress
            .message
            .ends_with("1 cluster(s) waiting: no claim yet"),
        "{}",
        progress.message
    );
    assert_eq!(d.status.clusters.len(), 1);
}

#[test]
fn tag_moved_is_reported_while_held_and_cleared_after() {
    let held = ImageOutcome {
        moved_to: Some("sha256:new".into()),
        reason: Some("tag moved".into()),
        ..ImageOutcome::ready(D.into())
    };
    let mut w = World::new(held, Some(available("c1")));
    let d = w.status();
    assert_eq!(
        condition_status(&d.status.conditions, TAG_MOVED),
        Some("True")
    );
    // Never reported: no condition at all.
    let fresh = World::new(ImageOutcome::ready(D.into()), Some(available("c1"))).status();
    assert_eq!(condition_status(&fresh.status.conditions, TAG_MOVED), None);
    // Reported before, now re-pinned: False.
    w.mcm.status = Some(d.status);
    w.outcomes = [(IMAGE.to_string(), ImageOutcome::ready(D.into()))].into();
    let after = w.status();
    assert_eq!(
        condition_status(&after.status.conditions, TAG_MOVED),
        Some("False")
    );
}

#[test]
fn an_invalid_spec_is_degraded_and_changes_nothing_else() {
    let m = mcm(SPEC);
    let works = BTreeMap::from([("c1".to_string(), Arc::new(available("c1")))]);
    let s = invalid_spec_status(&m, "spec.x: bad", &works, now());
    let c = &s.conditions;
    assert_eq!(condition_status(c, DEGRADED), Some("True"));
    assert_eq!(condition_status(c, READY), Some("False"));
    assert_eq!(condition_status(c, PROGRESSING), Some("False"));
    assert_eq!((s.number_desired, s.number_available), (1, 1));
}

/// `status.day0`: shipped and waiting clusters, the pool's state, and a degraded pool making
/// the MCM Degraded (`Day0PoolDegraded`).
#[test]
fn day0_status_and_a_degraded_pool() {
    use crate::render::day0::{Day0Want, ShippedDay0};
    let mut w = World::new(ImageOutcome::ready(D.into()), Some(available("c1")));
    let spec = format!(
        "{SPEC}day0:\n  machineConfigPool: worker\n  containerImage: reg/os\n  build: {{dockerfileConfigMap: {{name: layering}}}}\n"
    );
    w.mcm = mcm(&spec);
    let facts = |name: &str, openshift: bool| crate::decide::plan::ClusterFacts {
        openshift,
        ..cluster(name, &[("wants", "yes")], Some(&["5.14.0-1"]))
    };
    w.plan = plan(
        &w.mcm,
        &[facts("c1", true), facts("c2", true), facts("k8s", false)],
    )
    .unwrap();
    let work = std::sync::Arc::make_mut(w.works.get_mut("c1").unwrap());
    work.day0 = Some(ShippedDay0 {
        name: "99-worker-kmm-day0-mod-example".into(),
        os_image_url: format!("reg/os@{D}"),
        base_image: "reg/rhcos@sha256:aa".into(),
        kernel: "5.14.0-1".into(),
    });
    work.feedback.insert("day1.machineCount".into(), 3);
    work.feedback.insert("day1.updatedMachineCount".into(), 3);
    work.feedback.insert("day1.degradedMachineCount".into(), 0);
    w.day0 = BTreeMap::from([
        (
            "c1".to_string(),
            Day0Want {
                os_image: Some("reg/rhcos@sha256:aa".into()),
                kernel: Some("5.14.0-1".into()),
                image: Some("reg/os:5.14.0-1-aa".into()),
                waiting: None,
            },
        ),
        (
            "c2".to_string(),
            Day0Want {
                waiting: Some(("OSImageUnknown".into(), "no claim".into())),
                ..Default::default()
            },
        ),
    ]);
    let d = w.status();
    let s = d.status.day0.clone().unwrap();
    assert_eq!(
        (
            s.shipped,
            s.updated,
            s.degraded,
            s.waiting,
            s.not_open_shift
        ),
        (1, 1, 0, 1, 1)
    );
    assert_eq!(s.clusters[0].name, "c2", "waiting first");
    assert_eq!(s.clusters[0].reason.as_deref(), Some("OSImageUnknown"));
    assert_eq!(s.clusters[1].pool, "Updated");
    assert_eq!(
        s.clusters[1].image.as_deref(),
        Some(format!("reg/os@{D}").as_str())
    );
    assert_ne!(conditions(&d).3, "Day0PoolDegraded");
    // A cluster waiting for its layered image: not Ready, and the message says why.
    assert_eq!(conditions(&d).0, "False");
    let ready = d
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == READY)
        .unwrap();
    assert!(
        ready.message.contains("1 OpenShift cluster(s) wait"),
        "{ready:?}"
    );

    std::sync::Arc::make_mut(w.works.get_mut("c1").unwrap())
        .feedback
        .insert("day1.degradedMachineCount".into(), 1);
    let d = w.status();
    assert_eq!(d.status.day0.as_ref().unwrap().degraded, 1);
    let (_, _, degraded, reason) = conditions(&d);
    assert_eq!((degraded, reason.as_str()), ("True", "Day0PoolDegraded"));
    assert!(
        d.degraded_reasons
            .iter()
            .any(|r| r.contains("Day-0 MachineConfigPool")),
        "{:?}",
        d.degraded_reasons
    );
}
