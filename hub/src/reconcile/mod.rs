//! The ManagedClusterModule reconciler: plan → image pipeline → one ManifestWork per
//! selected cluster (applied only when changed) → garbage collection → status.
//! It reads caches, asks `decide` what to do, writes, and publishes events; the decisions
//! themselves are pure and tested in `decide`.

pub mod error;
pub mod events;
pub mod release;
pub mod writes;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kmm_runtime::backoff::KeyedBackoff;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{EventType, Recorder};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Client, ResourceExt};
use shared_api::ManagedClusterModule;
use shared_api::labels::MCM_FINALIZER;
use shared_api::mcm::ClusterProblem;
use shared_api::ocm::ManifestWork;
use shared_api::rollout::RESUME_ANNOTATION;
use shared_api::validate::validate_mcm;
use tracing::Instrument;

pub use error::{Error, WorkWriteError};
pub use events::event;
pub use writes::delete_work;

use crate::cache::Caches;
use crate::decide::cluster::{Shipped, decide_cluster, render_cluster_work, stage_cluster};
use crate::decide::facts::{ClusterFacts, WorkEntry};
use crate::decide::plan::plan;
use crate::decide::rollout;
use crate::decide::status::{
    Findings, Next, image_statuses, invalid_spec_status, mcm_status, placement_hold_status,
    plan_error_status,
};
use crate::last_decisions::{McmView, Views};
use crate::metrics::Metrics;
use crate::pipeline::{Deps, ImageOutcome, ImagePipeline, McmInputs, Report, inputs};
use crate::registry::Resolver;
use crate::render::RenderError;
use writes::{apply_works, delete_works, write_status};

/// The controller label of the MCM reconciler in the shared controller metrics.
pub const MCM_CONTROLLER: &str = "mcm";

/// Everything a reconcile needs; shared by all reconciles.
pub struct Context {
    pub client: Client,
    pub operator_namespace: String,
    /// Parallel ManifestWork writes within one reconcile.
    pub write_concurrency: usize,
    pub caches: Arc<Caches>,
    pub resolver: Resolver,
    pub images: ImagePipeline,
    pub metrics: Metrics,
    pub recorder: Recorder,
    pub backoff: KeyedBackoff<String>,
    pub views: Arc<Views>,
    pub resync: Duration,
    pub config: crate::config::HubConfig,
    /// Image signing and verification: limits, work directory, CPU permits.
    pub signing: crate::sign::SignRuntime,
    /// The spoke ServiceAccount works are applied as (`--work-executor`).
    pub work_executor: Option<shared_api::ocm::ManifestWorkExecutor>,
    /// Held and released work deletions (`--release-after`).
    pub release: release::Releaser,
    /// The Secrets of the hub namespace (a reflector's store; see `cache::watch_secrets`).
    pub secrets: kube::runtime::reflector::Store<Secret>,
}

impl Context {
    /// A Secret of the hub namespace, from the store (never an API call).
    pub fn secret(&self, name: &str) -> Option<Arc<Secret>> {
        self.secrets
            .get(&kube::runtime::reflector::ObjectRef::new(name).within(&self.operator_namespace))
    }

    /// What the image pipeline may use.
    fn pipeline_deps(&self) -> Deps<'_> {
        Deps {
            client: &self.client,
            resolver: &self.resolver,
            caches: &self.caches,
            metrics: &self.metrics,
            config: &self.config,
            signing: &self.signing,
            operator_namespace: &self.operator_namespace,
        }
    }
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("operator_namespace", &self.operator_namespace)
            .finish()
    }
}

pub async fn reconcile(mcm: Arc<ManagedClusterModule>, ctx: Arc<Context>) -> Result<Action, Error> {
    let span = tracing::info_span!("reconcile", mcm = %mcm.name_any());
    reconcile_in_span(mcm, ctx).instrument(span).await
}

async fn reconcile_in_span(
    mcm: Arc<ManagedClusterModule>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let started = Instant::now();
    let api: Api<ManagedClusterModule> = Api::all(ctx.client.clone());
    let name = mcm.name_any();
    let result = finalizer(&api, MCM_FINALIZER, mcm, |event| async {
        match event {
            Finalizer::Apply(mcm) => apply(&mcm, &ctx).await,
            Finalizer::Cleanup(mcm) => cleanup(&mcm, &ctx).await,
        }
    })
    .await
    .map_err(|e| match e {
        kube::runtime::finalizer::Error::ApplyFailed(e)
        | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
        other => Error::Finalizer(Box::new(other)),
    });
    ctx.metrics
        .controller
        .observe_result(MCM_CONTROLLER, started.elapsed(), &result);
    if result.is_ok() {
        ctx.backoff.reset(&name);
    }
    result
}

pub fn error_policy(mcm: Arc<ManagedClusterModule>, error: &Error, ctx: Arc<Context>) -> Action {
    let name = mcm.name_any();
    let delay = match error {
        // Waiting on works is no failure: look again when their deadline passes.
        Error::DeletionHeld { retry, .. } => *retry,
        // Jittered, so that MCMs failing together do not retry together.
        _ => crate::registry::jittered(ctx.backoff.next(&name)),
    };
    tracing::info!(mcm = %name, error = %error, retry_in = ?delay, "reconcile will be retried");
    Action::requeue(delay)
}

async fn apply(mcm: &ManagedClusterModule, ctx: &Context) -> Result<Action, Error> {
    let name = mcm.name_any();
    let now = Timestamp::now();

    // Invalid input: report every violation, change nothing that already runs.
    let violations = validate_mcm(mcm);
    if !violations.is_empty() {
        let msg = violations
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        let status = invalid_spec_status(mcm, &msg, &ctx.caches.works_of(&name), now);
        if write_status(ctx, mcm, status).await? {
            event(ctx, mcm, EventType::Warning, "InvalidSpec", &msg).await;
        }
        return Ok(Action::requeue(ctx.resync));
    }

    let clusters = ctx.caches.cluster_facts();
    // spec.placementRef: exactly the decided clusters; a missing or undecided Placement
    // changes nothing that runs (the watch of Placements brings the MCM back).
    let placed = match &mcm.spec.placement_ref {
        None => None,
        Some(p) => match ctx
            .caches
            .placement_clusters(&p.name, &ctx.operator_namespace)
        {
            Ok(groups) => Some(groups),
            Err(hold) => {
                let status = placement_hold_status(mcm, &hold, &ctx.caches.works_of(&name), now);
                if write_status(ctx, mcm, status).await? {
                    event(ctx, mcm, EventType::Warning, hold.reason, &hold.message).await;
                }
                return Ok(Action::requeue(ctx.resync));
            }
        },
    };
    let candidates = clusters
        .iter()
        .map(|c| &**c)
        .filter(|c| placed.as_ref().is_none_or(|g| g.contains_key(&c.name)));
    let mut plan = match plan(mcm, candidates) {
        Ok(p) => p,
        Err(e) => {
            write_status(ctx, mcm, plan_error_status(mcm, &e.to_string(), now)).await?;
            return Ok(Action::requeue(ctx.resync));
        }
    };
    if let Some(groups) = &placed {
        crate::decide::placement::assign_groups(&mut plan, groups);
    }

    // What the images need from the hub's namespace, read once; then the images.
    let secret = |n: &str| ctx.secret(n);
    let creds = inputs::docker_config(mcm, &ctx.operator_namespace, secret);

    // spec.day0: the clusters' RHCOS images and their kernels (from the registry, with the
    // MCM's pull secret), then one layered image per distinct (RHCOS image, kernel).
    if mcm.spec.day0.is_some() {
        let bases = day0_bases(ctx, mcm, &plan, &clusters, creds.as_ref()).await;
        crate::decide::day0::plan_day0(mcm, &mut plan, clusters.iter().map(|c| &**c), &bases);
    }
    let report = match &creds {
        Ok(creds) => {
            let inputs = McmInputs::read(mcm, &plan, &ctx.operator_namespace, secret);
            ctx.images
                .resolve(ctx.pipeline_deps(), mcm, &plan, &inputs, creds)
                .await
        }
        Err(reason) => Report {
            outcomes: plan
                .images
                .keys()
                .map(|i| (i.clone(), ImageOutcome::failed(reason.to_string())))
                .collect(),
            events: Vec::new(),
        },
    };
    events::publish(ctx, mcm, &report.events).await;
    let outcomes = report.outcomes;

    // Decide cluster by cluster without rendering; the works to write are queued as plan
    // indexes and each is rendered only when its write starts (`apply_works` keeps
    // `write_concurrency` in flight), so a fleet's worth of rendered works is never held.
    let existing = ctx.caches.works_of(&name);
    // The pull-secret copy (spokePrerequisites.pullSecret), read once for every cluster.
    let pull = inputs::pull_secret_source(mcm, &ctx.operator_namespace, secret);
    let selected: BTreeSet<&str> = plan.clusters.iter().map(|c| c.cluster.as_str()).collect();
    let shipped_of = |cluster: &str| Shipped::of(existing.get(cluster).map(|e| &**e));
    let mut decisions = Vec::with_capacity(plan.clusters.len());
    let mut queue: Vec<Queued> = Vec::new();
    let executor = ctx.work_executor.as_ref();
    let settings = rollout::Settings::of(mcm);
    let mut rolled = None;
    match &settings {
        // `All`: every cluster gets its work at once (as always).
        None => {
            for (index, cp) in plan.clusters.iter().enumerate() {
                let decision = stage_cluster(mcm, cp, &outcomes, shipped_of(&cp.cluster));
                if decision.renders {
                    queue.push(Queued {
                        index,
                        rollout: None,
                    });
                }
                decisions.push(decision);
            }
        }
        Some(settings) => {
            // First the revision of every cluster (its desired spec hash), keeping none of
            // the rendered works; then the rollout's decision; then the works it ships,
            // rendered again one at a time when written.
            let mut hashes: BTreeMap<String, String> = BTreeMap::new();
            for cp in &plan.clusters {
                let shipped = shipped_of(&cp.cluster);
                let mut decision = decide_cluster(mcm, cp, &outcomes, shipped, executor, &pull);
                if let Some(h) = decision.desired.take().and_then(|w| {
                    w.annotations()
                        .get(crate::render::SPEC_HASH_ANNOTATION)
                        .cloned()
                }) {
                    hashes.insert(cp.cluster.clone(), h);
                }
                decisions.push(decision);
            }
            let facts: BTreeMap<&str, &ClusterFacts> =
                clusters.iter().map(|c| (c.name.as_str(), &**c)).collect();
            // The Placement decision group of each cluster (`spec.placementRef`); none with
            // a label selector.
            let decision_groups: BTreeMap<&str, (i32, &str)> = plan
                .clusters
                .iter()
                .filter_map(|c| Some((c.cluster.as_str(), c.decision_group.as_ref()?.as_tuple())))
                .collect();
            let no_labels = BTreeMap::new();
            let members: Vec<rollout::Member<'_>> = hashes
                .iter()
                .map(|(cluster, hash)| rollout::Member {
                    cluster,
                    labels: facts
                        .get(cluster.as_str())
                        .map_or(&no_labels, |f| &f.labels),
                    decision_group: decision_groups.get(cluster.as_str()).copied(),
                    desired_hash: hash,
                    work: existing.get(cluster).map(|e| &**e),
                })
                .collect();
            let previous = mcm.status.as_ref();
            let images = image_statuses(
                &plan,
                &outcomes,
                previous.map_or(&[][..], |s| s.images.as_slice()),
            );
            let revision = rollout::revision(mcm, &images);
            let d = rollout::decide(
                &members,
                rollout::Inputs {
                    settings,
                    revision: &revision,
                    previous: previous.and_then(|s| s.rollout.as_ref()),
                    resume: mcm.annotations().contains_key(RESUME_ANNOTATION),
                    spec_changed: previous.and_then(|s| s.observed_generation)
                        != mcm.metadata.generation,
                    now,
                },
            );
            for (index, (cp, decision)) in
                plan.clusters.iter().zip(decisions.iter_mut()).enumerate()
            {
                let Some(step) = d.steps.get(&cp.cluster) else {
                    continue;
                };
                decision.view.rollout = Some(step.state.as_str().to_string());
                if step.ship && decision.renders && decision.render_error.is_none() {
                    queue.push(Queued {
                        index,
                        rollout: Some(step.annotations.clone()),
                    });
                }
            }
            ctx.metrics.rollout_moved.inc_by(d.moved as u64);
            rolled = Some(d);
        }
    }
    // The writes: each queued work rendered as its turn comes, dropped when the cached one
    // already carries it.
    let mut refused: Vec<(usize, RenderError)> = Vec::new();
    let mut created = 0usize;
    let works = queue.into_iter().filter_map(|q| {
        let cp = &plan.clusters[q.index];
        let _cluster = tracing::debug_span!("cluster", cluster = %cp.cluster).entered();
        let work = existing.get(&cp.cluster).map(|e| &**e);
        let shipped = shipped_of(&cp.cluster);
        match render_cluster_work(mcm, cp, &outcomes, shipped, executor, &pull) {
            Ok(w) => {
                let w = to_write(ctx, work, w, q.rollout.as_ref())?;
                created += usize::from(work.is_none());
                Some(w)
            }
            Err(e) => {
                refused.push((q.index, e));
                None
            }
        }
    });
    let write_errors = apply_works(ctx, works).await;
    for (index, e) in refused {
        if let Some(d) = decisions.get_mut(index) {
            d.refused(e);
        }
    }

    // Garbage: works of clusters no longer selected, or where nothing matches any more.
    let mut deletions: Vec<String> = existing
        .keys()
        .filter(|c| !selected.contains(c.as_str()))
        .cloned()
        .collect();
    deletions.extend(
        decisions
            .iter()
            .filter(|d| d.delete && existing.contains_key(&d.view.name))
            .map(|d| d.view.name.clone()),
    );
    // A work whose Module the work agent has not recorded yet would leave it behind.
    let deletions = release::deletable_now(ctx, &name, &existing, deletions);
    let removed = deletions.len();
    let delete_errors = delete_works(ctx, &name, &deletions).await;

    // Status.
    let works = ctx.caches.works_of(&name);
    let problems: Vec<ClusterProblem> =
        decisions.iter().filter_map(|d| d.problem.clone()).collect();
    let write_error_texts: Vec<String> = write_errors.iter().map(ToString::to_string).collect();
    let pull_secret_error = creds.as_ref().err().map(ToString::to_string);
    let day0_wants: BTreeMap<String, crate::render::day0::Day0Want> = decisions
        .iter()
        .filter_map(|d| Some((d.view.name.clone(), d.day0.clone()?)))
        .collect();
    let findings = Findings {
        plan: &plan,
        outcomes: &outcomes,
        works: &works,
        selected: &selected,
        problems: &problems,
        pull_secret_error: pull_secret_error.as_deref(),
        write_errors: &write_error_texts,
        day0: &day0_wants,
    };
    let mut decided = mcm_status(mcm, findings, now);
    rollout::fill_status(
        &mut decided.status,
        rolled.as_ref().map(|d| &d.status),
        mcm.metadata.generation,
        now,
    );

    let view_changed = ctx.views.put(McmView {
        name: name.clone(),
        clusters: decisions.into_iter().map(|d| d.view).collect(),
        images: decided.status.images.clone(),
        rollout: decided.status.rollout.clone(),
        last_error: decided.degraded_reasons.first().cloned(),
    });
    if view_changed {
        ctx.caches.bump();
        ctx.metrics.set_rollouts(&ctx.views.rollouts());
    }
    write_status(ctx, mcm, decided.status).await?;
    if let Some(d) = &rolled {
        rollout_events(ctx, mcm, d).await;
    }
    if mcm.annotations().contains_key(RESUME_ANNOTATION) {
        remove_resume_annotation(ctx, mcm).await?;
    }
    if created > 0 {
        let msg = format!("{created} cluster(s) received the module");
        event(ctx, mcm, EventType::Normal, "ManifestWorksCreated", &msg).await;
    }
    if removed > 0 {
        let msg = format!("{removed} cluster(s) no longer selected or matched");
        event(ctx, mcm, EventType::Normal, "ManifestWorksDeleted", &msg).await;
    }

    let failed_writes = write_errors.into_iter().chain(delete_errors).collect();
    if let Some(e) = Error::writes(failed_writes) {
        return Err(e);
    }
    // A rollout's minSuccessTime or progressDeadline running out: look again then.
    let wake = rolled.as_ref().and_then(|d| d.requeue_after);
    let soonest = |d: Duration| wake.map_or(d, |w| w.min(d));
    // An RHCOS image the registry could not read, or without its kernel label, is retried
    // like a missing image.
    let day0_retry: Vec<String> = plan
        .clusters
        .iter()
        .filter_map(|c| c.day0.as_ref())
        .filter(|w| {
            w.waiting.as_ref().is_some_and(|(r, _)| {
                r == crate::decide::day0::OS_IMAGE_LOOKUP_FAILED
                    || r == crate::decide::day0::OS_IMAGE_KERNEL_UNKNOWN
            })
        })
        .filter_map(|w| w.os_image.clone())
        .collect();
    match decided.next {
        // Missing or unreachable images: retry with the per-MCM capped backoff.
        Next::RetryImages(images) => Err(Error::ImagesPending(images)),
        Next::Resync if !day0_retry.is_empty() => Err(Error::ImagesPending(day0_retry)),
        // Being built or signed: look again soon.
        Next::WaitForImages => Ok(Action::requeue(soonest(Duration::from_secs(5)))),
        Next::Resync => Ok(Action::requeue(soonest(ctx.resync))),
    }
}

/// The RHCOS images of the MCM's OpenShift clusters, looked up once each: digest and kernel.
async fn day0_bases(
    ctx: &Context,
    mcm: &ManagedClusterModule,
    plan: &crate::decide::plan::Plan,
    clusters: &[std::sync::Arc<ClusterFacts>],
    creds: Result<&crate::registry::DockerConfig, &inputs::InputError>,
) -> BTreeMap<String, crate::decide::day0::BaseLookup> {
    use crate::decide::day0::BaseImage;
    let images =
        crate::decide::day0::os_images_to_look_up(mcm, plan, clusters.iter().map(|c| &**c));
    let creds = match creds {
        Ok(c) => c,
        Err(e) => {
            return images
                .into_iter()
                .map(|i| (i, Err(e.to_string())))
                .collect();
        }
    };
    let lookups = images.into_iter().map(|image| async move {
        let found = ctx
            .resolver
            .os_image(&image, Default::default(), creds)
            .await
            .map(|(digest, kernel)| BaseImage { digest, kernel })
            .map_err(|e| e.to_string());
        (image, found)
    });
    futures::stream::iter(lookups)
        .buffer_unordered(ctx.images.lookup_concurrency.max(1))
        .collect()
        .await
}

/// A work queued for writing: its cluster's index in the plan and, in a progressive
/// rollout, the annotations of its step. Rendered only when its write starts.
struct Queued {
    index: usize,
    rollout: Option<BTreeMap<String, String>>,
}

/// The rendered work to write, unless the cached one already carries it (same spec hash and,
/// in a progressive rollout, the same rollout annotations) or is being deleted.
fn to_write(
    ctx: &Context,
    existing: Option<&WorkEntry>,
    mut w: ManifestWork,
    rollout_annotations: Option<&BTreeMap<String, String>>,
) -> Option<ManifestWork> {
    if let Some(a) = rollout_annotations {
        w.annotations_mut()
            .extend(a.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    match existing {
        // Being deleted: writing to it is pointless; its removal triggers a new reconcile.
        Some(e) if e.deleting => None,
        Some(e)
            if e.spec_hash.as_deref()
                == w.annotations()
                    .get(crate::render::SPEC_HASH_ANNOTATION)
                    .map(String::as_str)
                && rollout_annotations.is_none_or(|a| *a == e.rollout) =>
        {
            ctx.metrics.writes_skipped.inc();
            None
        }
        _ => Some(w),
    }
}

/// The rollout's few events: a revision starting or resuming, a halt, the end. Each has an
/// action of its own (revision and failure count), so that a later halt or resume of the
/// same rollout is a new event with its own message rather than a repeat of the first.
async fn rollout_events(ctx: &Context, mcm: &ManagedClusterModule, d: &rollout::Decision) {
    let action = format!("Rollout/{}/{}", d.status.revision, d.status.failed);
    for e in &d.events {
        let (type_, reason, note) = match e {
            rollout::RolloutEvent::Progressing(m) => (EventType::Normal, "RolloutProgressing", m),
            rollout::RolloutEvent::Halted(m) => {
                ctx.metrics.rollout_halts.inc();
                (EventType::Warning, "RolloutHalted", m)
            }
            rollout::RolloutEvent::Completed(m) => (EventType::Normal, "RolloutCompleted", m),
        };
        events::event_as(ctx, mcm, type_, reason, &action, note).await;
    }
}

/// The resume annotation has been acted on (or there was nothing to resume): remove it, so
/// that a later halt needs a new resume.
async fn remove_resume_annotation(ctx: &Context, mcm: &ManagedClusterModule) -> Result<(), Error> {
    let api: Api<ManagedClusterModule> = Api::all(ctx.client.clone());
    let patch = serde_json::json!({"metadata": {"annotations": {RESUME_ANNOTATION: null}}});
    api.patch(
        &mcm.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await?;
    Ok(())
}

/// Drop everything kept in memory for an MCM (views, image pipeline memory, backoff).
pub fn forget_mcm(ctx: &Context, name: &str) {
    ctx.views.remove(name);
    ctx.metrics.set_rollouts(&ctx.views.rollouts());
    ctx.images.forget(name);
    ctx.backoff.reset(&name.to_string());
    ctx.caches.bump();
}

/// On deletion: delete every work of this MCM, and hold the finalizer until they are gone
/// (or released: see [`release`]).
async fn cleanup(mcm: &ManagedClusterModule, ctx: &Context) -> Result<Action, Error> {
    let name = mcm.name_any();
    let works = ctx.caches.works_of(&name);
    if works.is_empty() {
        forget_mcm(ctx, &name);
        return Ok(Action::await_change());
    }
    // Not done until the watch sees them gone (the work agent removes its finalizer first).
    release::cleanup_works(ctx, mcm, &works).await?;
    Err(Error::WorksRemaining(works.len()))
}
