//! One cluster's ManifestWork: for each kernel, the freshly pinned image when known, the
//! shipped one when the registry could not answer (never erase a working digest), otherwise
//! pending; then the rendered work, or why there is none. Used by the reconciler and by
//! `kmm-hub render`.

use std::collections::BTreeMap;

use shared_api::ManagedClusterModule;
use shared_api::mcm::{ClusterProblem, ImageState};
use shared_api::ocm::{ManifestWork, ManifestWorkExecutor};

use super::image::ImageOutcome;
use super::plan::{ClusterPlan, KernelTarget};
use crate::last_decisions::{ClusterView, KernelView};
use crate::render::day0::{Day0Want, ShippedDay0};
use crate::render::prerequisites::PullSecretSource;
use crate::render::{ReadyMapping, RenderError, pin, render_manifestwork_as};

/// What a cluster's current work carries.
#[derive(Debug, Clone, Copy, Default)]
pub struct Shipped<'a> {
    pub mappings: &'a [ReadyMapping],
    pub day0: Option<&'a ShippedDay0>,
}

impl<'a> Shipped<'a> {
    /// What the cached work carries; nothing without one.
    pub fn of(work: Option<&'a crate::decide::facts::WorkEntry>) -> Self {
        Self {
            mappings: work.map_or(&[][..], |e| e.shipped.as_slice()),
            day0: work.and_then(|e| e.day0.as_ref()),
        }
    }
}

/// What one reconcile decided about one cluster.
#[derive(Debug, Clone)]
pub struct ClusterDecision {
    pub view: ClusterView,
    /// The work to ship (written only when it differs from the cached one). Boxed: the
    /// reconciler keeps a decision per selected cluster, and most hold no work.
    pub desired: Option<Box<ManifestWork>>,
    /// Why the cluster has no work, or not all of its kernels.
    pub problem: Option<ClusterProblem>,
    /// Delete an existing work (nothing of the cluster matches any more).
    pub delete: bool,
    /// Rendering was tried and refused (the problem says the same for status).
    pub render_error: Option<RenderError>,
    /// `spec.day0` on an OpenShift cluster: the layered image it should boot, and why it
    /// does not get it (yet), if so.
    pub day0: Option<Day0Want>,
    /// A work is to be rendered for the cluster (its plan has no problem): by
    /// [`decide_cluster`] at once, or by the reconciler when its write starts
    /// ([`stage_cluster`], [`render_cluster_work`]).
    pub renders: bool,
}

impl ClusterDecision {
    /// Take the outcome of rendering the cluster's work: the work to ship, or why none.
    pub fn rendered(&mut self, rendered: Result<ManifestWork, RenderError>) {
        match rendered {
            Ok(w) => self.desired = Some(Box::new(w)),
            Err(e) => self.refused(e),
        }
    }

    /// Rendering the cluster's work was refused: the problem says why (a cluster waiting for
    /// all of its images keeps its `ImagesPending`).
    pub fn refused(&mut self, e: RenderError) {
        let p = match (&e, self.problem.take()) {
            (RenderError::NoReadyMapping, Some(p)) => p,
            _ => ClusterProblem {
                name: self.view.name.clone(),
                reason: e.reason().into(),
                message: e.to_string(),
            },
        };
        self.view.problem = Some(p.clone());
        self.problem = Some(p);
        self.desired = None;
        self.render_error = Some(e);
    }
}

/// Decide one cluster of the plan. `outcomes`: the image pipeline's, by image; `shipped`: the
/// mappings the cluster's current work carries (and its Day-0 MachineConfig); `pull`: the
/// pull secret to copy.
pub fn decide_cluster(
    mcm: &ManagedClusterModule,
    cp: &ClusterPlan,
    outcomes: &BTreeMap<String, ImageOutcome>,
    shipped: Shipped<'_>,
    executor: Option<&ManifestWorkExecutor>,
    pull: &PullSecretSource,
) -> ClusterDecision {
    let mut decision = stage_cluster(mcm, cp, outcomes, shipped);
    if decision.renders {
        decision.rendered(render_cluster_work(
            mcm, cp, outcomes, shipped, executor, pull,
        ));
    }
    decision
}

/// The image one kernel of the cluster ships: freshly pinned when its image is ready, the
/// shipped one when the registry could not answer, none while pending.
fn chosen(
    t: &KernelTarget,
    outcome: Option<&ImageOutcome>,
    shipped: &BTreeMap<&str, &ReadyMapping>,
) -> Option<ReadyMapping> {
    let fresh = outcome
        .filter(|o| o.state == ImageState::Ready)
        .and_then(|o| o.digest.as_deref());
    match (fresh, shipped.get(t.kernel.as_str())) {
        (Some(d), _) => Some(ReadyMapping {
            kernel: t.kernel.clone(),
            pinned_image: pin(&t.image, d),
            registry_tls: t.registry_tls,
            in_tree_modules_to_remove: t.in_tree_modules_to_remove.clone(),
        }),
        (None, Some(old)) => Some((*old).clone()),
        (None, None) => None,
    }
}

fn by_kernel(shipped: &[ReadyMapping]) -> BTreeMap<&str, &ReadyMapping> {
    shipped.iter().map(|m| (m.kernel.as_str(), m)).collect()
}

/// Everything [`decide_cluster`] decides about one cluster except its rendered work:
/// `renders` says whether one is due, [`render_cluster_work`] makes it from the same inputs
/// and [`ClusterDecision::rendered`] takes the outcome. The reconciler renders a work only
/// when its write starts, so that a fleet's worth of rendered works is never held at once.
pub fn stage_cluster(
    mcm: &ManagedClusterModule,
    cp: &ClusterPlan,
    outcomes: &BTreeMap<String, ImageOutcome>,
    shipped: Shipped<'_>,
) -> ClusterDecision {
    // Day 0: the fresh layered image, else the one shipped before.
    let day0 = cp
        .day0
        .as_ref()
        .map(|want| super::day0::choose(mcm, want, outcomes, shipped.day0).1);
    let shipped = by_kernel(shipped.mappings);
    let mut kernels = Vec::new();
    let mut pending = Vec::new();
    for t in &cp.targets {
        let outcome = outcomes.get(&t.image);
        let chosen = chosen(t, outcome, &shipped);
        kernels.push(KernelView {
            kernel: t.kernel.clone(),
            image: t.image.clone(),
            pinned: chosen.map(|c| c.pinned_image),
            state: outcome.map_or(ImageState::Pending, |o| o.state),
            reason: outcome.and_then(|o| o.reason.clone()),
        });
        if kernels.last().is_some_and(|k| k.pinned.is_none()) {
            pending.push(t.image.clone());
        }
    }
    let view = ClusterView {
        name: cp.cluster.clone(),
        kernels,
        unmapped_kernels: cp.unmapped_kernels.clone(),
        problem: None,
        rollout: None,
    };
    let decision = |view, problem: Option<ClusterProblem>, delete, renders| {
        let mut view: ClusterView = view;
        view.problem = problem.clone();
        ClusterDecision {
            view,
            desired: None,
            problem,
            delete,
            render_error: None,
            day0: day0.clone(),
            renders,
        }
    };
    if let Some(p) = &cp.problem {
        // No kernel matches any more: the work goes. Other problems keep what was shipped.
        let delete = p.reason == "NoMatchingKernel";
        return decision(view, Some(p.clone()), delete, false);
    }
    let problem = (!pending.is_empty()).then(|| ClusterProblem {
        name: cp.cluster.clone(),
        reason: "ImagesPending".into(),
        message: format!("waiting for image(s): {}", pending.join(", ")),
    });
    decision(view, problem, false, true)
}

/// The work [`decide_cluster`] ships to the cluster (same inputs, same work), or why none.
pub fn render_cluster_work(
    mcm: &ManagedClusterModule,
    cp: &ClusterPlan,
    outcomes: &BTreeMap<String, ImageOutcome>,
    shipped: Shipped<'_>,
    executor: Option<&ManifestWorkExecutor>,
    pull: &PullSecretSource,
) -> Result<ManifestWork, RenderError> {
    let day0_mc = cp
        .day0
        .as_ref()
        .and_then(|want| super::day0::choose(mcm, want, outcomes, shipped.day0).0);
    let shipped = by_kernel(shipped.mappings);
    let ready: Vec<ReadyMapping> = cp
        .targets
        .iter()
        .filter_map(|t| chosen(t, outcomes.get(&t.image), &shipped))
        .collect();
    let mut w = render_manifestwork_as(mcm, &cp.cluster, &ready, executor, pull)?;
    // Day 1 (spec.day1) on OpenShift clusters: the MachineConfig follows the Module.
    if cp.openshift {
        crate::render::day1::add_day1(&mut w, mcm, &ready)?;
    }
    // Day 0 (spec.day0): the MachineConfig with the layered image, after the Module.
    if let Some(mc) = &day0_mc {
        crate::render::day0::add_day0(&mut w, mcm, mc)?;
    }
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::plan::tests::{SPEC, cluster, mcm};
    use crate::decide::plan::{ClusterPlan, plan};
    use crate::render::shipped_mappings;

    const OLD: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const NEW: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";
    const IMAGE_1: &str = "reg/x/spoke-ns:5.14.0-1";
    const IMAGE_3: &str = "reg/x/spoke-ns:5.14.0-3";

    fn cluster_plan(kernels: Option<&[&str]>) -> ClusterPlan {
        let p = plan(&mcm(SPEC), &[cluster("c1", &[("wants", "yes")], kernels)]).unwrap();
        p.clusters.into_iter().next().unwrap()
    }

    fn outcomes(list: &[(&str, ImageOutcome)]) -> BTreeMap<String, ImageOutcome> {
        list.iter()
            .map(|(i, o)| (i.to_string(), o.clone()))
            .collect()
    }

    fn shipped(kernel: &str, image: &str, digest: &str) -> ReadyMapping {
        ReadyMapping {
            kernel: kernel.into(),
            pinned_image: pin(image, digest),
            registry_tls: Default::default(),
            in_tree_modules_to_remove: vec![],
        }
    }

    fn decide(
        cp: &ClusterPlan,
        o: &BTreeMap<String, ImageOutcome>,
        s: &[ReadyMapping],
    ) -> ClusterDecision {
        let shipped = Shipped {
            mappings: s,
            day0: None,
        };
        decide_cluster(&mcm(SPEC), cp, o, shipped, None, &PullSecretSource::None)
    }

    fn pinned_in(d: &ClusterDecision) -> Vec<String> {
        shipped_mappings(d.desired.as_ref().expect("a work"))
            .into_iter()
            .map(|m| m.pinned_image)
            .collect()
    }

    #[test]
    fn a_ready_image_is_pinned_by_its_fresh_digest() {
        let cp = cluster_plan(Some(&["5.14.0-1"]));
        let d = decide(
            &cp,
            &outcomes(&[(IMAGE_1, ImageOutcome::ready(NEW.into()))]),
            &[shipped("5.14.0-1", IMAGE_1, OLD)],
        );
        assert_eq!(pinned_in(&d), vec![pin(IMAGE_1, NEW)]);
        assert!(d.problem.is_none() && !d.delete);
    }

    #[test]
    fn registry_down_keeps_the_shipped_digest() {
        let cp = cluster_plan(Some(&["5.14.0-1"]));
        let down = ImageOutcome::failed("the registry cannot be reached".into());
        let d = decide(
            &cp,
            &outcomes(&[(IMAGE_1, down)]),
            &[shipped("5.14.0-1", IMAGE_1, OLD)],
        );
        assert_eq!(pinned_in(&d), vec![pin(IMAGE_1, OLD)]);
        assert!(d.problem.is_none(), "nothing is waiting: {:?}", d.problem);
        let k = &d.view.kernels[0];
        assert_eq!(
            k.state,
            ImageState::Failed,
            "the view still tells the truth"
        );
        assert_eq!(k.pinned, Some(pin(IMAGE_1, OLD)));
    }

    #[test]
    fn a_pending_kernel_waits_while_ready_kernels_ship() {
        let cp = cluster_plan(Some(&["5.14.0-1", "5.14.0-3"]));
        let d = decide(
            &cp,
            &outcomes(&[
                (IMAGE_1, ImageOutcome::ready(NEW.into())),
                (IMAGE_3, ImageOutcome::building("build Job running".into())),
            ]),
            &[],
        );
        assert_eq!(pinned_in(&d), vec![pin(IMAGE_1, NEW)]);
        let p = d.problem.unwrap();
        assert_eq!(p.reason, "ImagesPending");
        assert_eq!(p.message, format!("waiting for image(s): {IMAGE_3}"));
        assert_eq!(d.view.problem.as_ref(), Some(&p));
    }

    #[test]
    fn nothing_ready_ships_no_work_and_keeps_the_existing_one() {
        let cp = cluster_plan(Some(&["5.14.0-1"]));
        let d = decide(&cp, &outcomes(&[]), &[]);
        assert!(d.desired.is_none());
        assert!(!d.delete, "a work already there stays");
        assert_eq!(d.problem.unwrap().reason, "ImagesPending");
        assert_eq!(d.render_error, Some(RenderError::NoReadyMapping));
    }

    #[test]
    fn no_matching_kernel_deletes_the_work() {
        let cp = cluster_plan(Some(&["6.1.0"]));
        let d = decide(&cp, &outcomes(&[]), &[shipped("5.14.0-1", IMAGE_1, OLD)]);
        assert!(d.delete);
        assert!(d.desired.is_none());
        assert_eq!(d.problem.unwrap().reason, "NoMatchingKernel");
    }

    #[test]
    fn no_kernel_claim_keeps_the_work() {
        let cp = cluster_plan(None);
        let d = decide(&cp, &outcomes(&[]), &[shipped("5.14.0-1", IMAGE_1, OLD)]);
        assert!(!d.delete, "the cluster keeps what it was shipped");
        assert!(d.desired.is_none(), "and nothing is rewritten");
        assert_eq!(d.problem.unwrap().reason, "NoKernelClaim");
    }

    /// A cluster too old for `dra` keeps its work and is reported, not written.
    #[test]
    fn a_cluster_without_dra_keeps_the_work() {
        let cp = ClusterPlan {
            cluster: "c1".into(),
            problem: Some(ClusterProblem {
                name: "c1".into(),
                reason: "DRANotSupported".into(),
                message: "too old".into(),
            }),
            ..Default::default()
        };
        let d = decide(
            &cp,
            &outcomes(&[(IMAGE_1, ImageOutcome::ready(NEW.into()))]),
            &[shipped("5.14.0-1", IMAGE_1, OLD)],
        );
        assert!(!d.delete && d.desired.is_none());
        assert_eq!(d.view.problem.unwrap().reason, "DRANotSupported");
    }
}
