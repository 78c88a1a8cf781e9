//! The ManagedClusterModule reconciler: plan → image states → one ManifestWork per
//! selected cluster (applied only when changed) → garbage collection → status.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kmm_runtime::backoff::KeyedBackoff;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use shared_api::ManagedClusterModule;
use shared_api::conditions::{DEGRADED, PROGRESSING, READY, set_condition};
use shared_api::labels::{HUB_MANIFESTWORK_MANAGER, MCM_FINALIZER};
use shared_api::mcm::{
    ClusterProblem, ImageState, ImageStatus, ManagedClusterModuleStatus, STATUS_LIST_LIMIT,
    TAG_MOVED,
};
use shared_api::ocm::ManifestWork;
use shared_api::validate::validate_mcm;

use crate::cache::{Caches, RecentEvent, WorkEntry};
use crate::images::{ImageOutcome, ImagePipeline};
use crate::metrics::{CategoryLabel, KindLabel, Metrics, OutcomeLabel};
use crate::plan::{ClusterPlan, plan};
use crate::registry::{DockerConfig, Resolver};
use crate::render::{ReadyMapping, RenderError, pin, render_manifestwork_as};
use crate::views::{ClusterView, KernelView, McmView, Views};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(String),
    #[error("{0} ManifestWork write(s) failed; first: {1}")]
    Writes(usize, String),
    #[error("images not ready: {0}")]
    ImagesPending(String),
    #[error(
        "waiting for {works} ManifestWork(s) to be deleted ({held} held until their Module is recorded)"
    )]
    DeletionHeld {
        works: usize,
        held: usize,
        /// When to look again (the release deadline, at most 30 s away).
        retry: Duration,
    },
}

impl Error {
    pub fn category(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube_api",
            Error::Finalizer(_) => "finalizer",
            Error::Writes(..) => "manifestwork_write",
            Error::ImagesPending(_) => "images_pending",
            Error::DeletionHeld { .. } => "deletion_held",
        }
    }
}

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
    pub release: crate::release::Releaser,
    /// The Secrets of the hub namespace (a reflector's store; see `cache::watch_secrets`).
    pub secrets: kube::runtime::reflector::Store<Secret>,
}

impl Context {
    /// A Secret of the hub namespace, from the store (never an API call).
    pub fn secret(&self, name: &str) -> Option<Arc<Secret>> {
        self.secrets
            .get(&kube::runtime::reflector::ObjectRef::new(name).within(&self.operator_namespace))
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
        other => Error::Finalizer(other.to_string()),
    });
    ctx.metrics
        .reconcile_duration
        .observe(started.elapsed().as_secs_f64());
    let outcome = if result.is_ok() { "ok" } else { "error" };
    ctx.metrics
        .reconciles
        .get_or_create(&OutcomeLabel { outcome })
        .inc();
    if result.is_ok() {
        ctx.backoff.reset(&name);
    }
    result
}

pub fn error_policy(mcm: Arc<ManagedClusterModule>, error: &Error, ctx: Arc<Context>) -> Action {
    let name = mcm.name_any();
    ctx.metrics
        .errors
        .get_or_create(&CategoryLabel::new(error.category()))
        .inc();
    let delay = match error {
        // Waiting on works is no failure: look again when their deadline passes.
        Error::DeletionHeld { retry, .. } => *retry,
        // Jittered, so that MCMs failing together do not retry together.
        _ => crate::registry::jittered(ctx.backoff.next(&name)),
    };
    tracing::info!(mcm = %name, error = %error, retry_in = ?delay, "reconcile will be retried");
    Action::requeue(delay)
}

/// What one reconcile decided about one cluster.
struct ClusterOutcome {
    view: ClusterView,
    desired: Option<ManifestWork>,
    problem: Option<ClusterProblem>,
    /// Delete an existing work (nothing of the cluster matches any more).
    delete: bool,
}

async fn apply(mcm: &ManagedClusterModule, ctx: &Context) -> Result<Action, Error> {
    let name = mcm.name_any();
    let span = tracing::info_span!("reconcile", mcm = %name);
    let _guard = span.enter();
    let now = Timestamp::now();
    let generation = mcm.metadata.generation;
    let mut status = mcm.status.clone().unwrap_or_default();
    status.observed_generation = generation;

    // Invalid input: report every violation, change nothing that already runs.
    let violations = validate_mcm(mcm);
    if !violations.is_empty() {
        let msg = violations
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        set_condition(
            &mut status.conditions,
            DEGRADED,
            true,
            "InvalidSpec",
            &msg,
            generation,
            now,
        );
        set_condition(
            &mut status.conditions,
            READY,
            false,
            "InvalidSpec",
            "the spec is invalid; see Degraded",
            generation,
            now,
        );
        set_condition(
            &mut status.conditions,
            PROGRESSING,
            false,
            "InvalidSpec",
            "waiting for a valid spec",
            generation,
            now,
        );
        fill_counts(&mut status, &ctx.caches.works_of(&name), None);
        let changed = write_status(ctx, mcm, status).await?;
        if changed {
            event(ctx, mcm, EventType::Warning, "InvalidSpec", &msg).await;
        }
        return Ok(Action::requeue(ctx.resync));
    }

    let clusters = ctx.caches.cluster_facts();
    let plan = match plan(mcm, clusters.iter()) {
        Ok(p) => p,
        Err(e) => {
            // Validation compiles the same mappings, so this is unexpected; report it the same way.
            set_condition(
                &mut status.conditions,
                DEGRADED,
                true,
                "InvalidSpec",
                &e.to_string(),
                generation,
                now,
            );
            write_status(ctx, mcm, status).await?;
            return Ok(Action::requeue(ctx.resync));
        }
    };

    // Credentials for the registries, from the operator namespace.
    let creds = match &mcm.spec.module_spec.image_repo_secret {
        None => Ok(DockerConfig::default()),
        Some(s) => read_docker_config(ctx, &s.name).await,
    };
    let outcomes: BTreeMap<String, ImageOutcome> = match &creds {
        Ok(creds) => ctx.images.resolve(ctx, mcm, &plan, creds).await,
        Err(reason) => plan
            .images
            .keys()
            .map(|i| (i.clone(), ImageOutcome::failed(reason.clone())))
            .collect(),
    };

    // Decide cluster by cluster and keep only the works to write: an unchanged work is
    // dropped at once and a changed one moved, so a fleet's worth of rendered works is never
    // held (or copied) at the same time.
    let existing = ctx.caches.works_of(&name);
    let selected: BTreeSet<&str> = plan.clusters.iter().map(|c| c.cluster.as_str()).collect();
    let mut cluster_outcomes = Vec::with_capacity(plan.clusters.len());
    let mut writes: Vec<ManifestWork> = Vec::new();
    for cp in &plan.clusters {
        let mut outcome = decide_cluster(
            mcm,
            cp,
            &outcomes,
            existing.get(&cp.cluster),
            ctx.work_executor.as_ref(),
        );
        if let Some(w) = outcome.desired.take() {
            match existing.get(&cp.cluster) {
                // Being deleted: writing to it is pointless; its removal triggers a new reconcile.
                Some(e) if e.deleting => {}
                Some(e)
                    if e.spec_hash.as_deref()
                        == w.annotations()
                            .get(crate::render::SPEC_HASH_ANNOTATION)
                            .map(String::as_str) =>
                {
                    ctx.metrics.writes_skipped.inc();
                }
                _ => writes.push(w),
            }
        }
        cluster_outcomes.push(outcome);
    }
    let created = writes
        .iter()
        .filter(|w| !existing.contains_key(&w.namespace().unwrap_or_default()))
        .count();
    let write_errors = apply_works(ctx, writes).await;

    // Garbage: works of clusters no longer selected, or where nothing matches any more.
    let mut deletions: Vec<String> = existing
        .keys()
        .filter(|c| !selected.contains(c.as_str()))
        .cloned()
        .collect();
    deletions.extend(
        cluster_outcomes
            .iter()
            .filter(|o| o.delete && existing.contains_key(&o.view.name))
            .map(|o| o.view.name.clone()),
    );
    // A work whose Module the work agent has not recorded yet would leave it behind.
    let deletions = crate::release::deletable_now(ctx, &name, &existing, deletions);
    let removed = deletions.len();
    let delete_errors = delete_works(ctx, &name, &deletions).await;

    // Status.
    let works = ctx.caches.works_of(&name);
    let problems: Vec<ClusterProblem> = cluster_outcomes
        .iter()
        .filter_map(|o| o.problem.clone())
        .collect();
    let images = image_statuses(&plan, &outcomes, &status.images);
    fill_counts(&mut status, &works, Some(&selected));
    status.images_omitted = images.len().saturating_sub(STATUS_LIST_LIMIT) as i32;
    status.images = images.into_iter().take(STATUS_LIST_LIMIT).collect();
    status.clusters_omitted = problems.len().saturating_sub(STATUS_LIST_LIMIT) as i32;
    status.clusters = problems.iter().take(STATUS_LIST_LIMIT).cloned().collect();
    status.image_rebuild_trigger_generation = mcm.spec.module_spec.image_rebuild_trigger_generation;

    let failed: Vec<ImageStatus> = status
        .images
        .iter()
        .filter(|i| i.state == ImageState::Failed)
        .cloned()
        .collect();
    let pending: Vec<ImageStatus> = status
        .images
        .iter()
        .filter(|i| i.state != ImageState::Ready)
        .cloned()
        .collect();
    let mut degraded_reasons: Vec<String> = failed
        .iter()
        .map(|i| format!("{}: {}", i.image, i.reason.clone().unwrap_or_default()))
        .collect();
    if let Err(reason) = &creds {
        degraded_reasons.insert(0, reason.clone());
    }
    if !write_errors.is_empty() {
        degraded_reasons.push(format!(
            "{} ManifestWork write(s) failed: {}",
            write_errors.len(),
            write_errors[0]
        ));
    }
    let degraded_works = status.number_degraded;
    if degraded_works > 0 {
        degraded_reasons.push(format!("{degraded_works} ManifestWork(s) report Degraded"));
    }
    let degraded = !degraded_reasons.is_empty();
    set_condition(
        &mut status.conditions,
        DEGRADED,
        degraded,
        if degraded {
            degraded_reason(&creds, &failed, &write_errors)
        } else {
            "AsExpected"
        },
        &degraded_reasons.join("; "),
        generation,
        now,
    );
    let all_available = status.number_available == selected.len() as i32
        && problems.is_empty()
        && pending.is_empty();
    // Rolling out: something is on its way (an image being resolved, built or signed, or a
    // shipped work not yet available); failures alone are Degraded, not progress.
    let in_flight = pending.iter().any(|i| {
        matches!(
            i.state,
            ImageState::Pending | ImageState::Building | ImageState::Signing
        )
    }) || status.number_available < status.number_desired;
    let progressing = !all_available && in_flight;
    let progress = progress_message(&status, selected.len(), &pending, &problems);
    set_condition(
        &mut status.conditions,
        PROGRESSING,
        progressing,
        if progressing { "RollingOut" } else { "Idle" },
        &progress,
        generation,
        now,
    );
    let ready_msg = format!(
        "{} of {} selected cluster(s) have the module available",
        status.number_available,
        selected.len()
    );
    set_condition(
        &mut status.conditions,
        READY,
        all_available,
        if all_available {
            "AllClustersAvailable"
        } else {
            "NotAllClustersAvailable"
        },
        &ready_msg,
        generation,
        now,
    );

    // Tags that moved and were not re-pinned (see spec.movedTagPolicy).
    let moved: Vec<String> = outcomes
        .values()
        .filter(|o| o.moved_to.is_some())
        .filter_map(|o| o.reason.clone())
        .collect();
    if !moved.is_empty() {
        set_condition(
            &mut status.conditions,
            TAG_MOVED,
            true,
            "TagMovedNotRepinned",
            &moved.join("; "),
            generation,
            now,
        );
    } else if status.conditions.iter().any(|c| c.type_ == TAG_MOVED) {
        set_condition(
            &mut status.conditions,
            TAG_MOVED,
            false,
            "AsExpected",
            "every image is pinned to the digest its tag points to",
            generation,
            now,
        );
    }

    let view_changed = ctx.views.put(McmView {
        name: name.clone(),
        clusters: cluster_outcomes.into_iter().map(|o| o.view).collect(),
        images: status.images.clone(),
        last_error: degraded_reasons.first().cloned(),
    });
    if view_changed {
        ctx.caches.bump();
    }
    write_status(ctx, mcm, status).await?;
    if created > 0 {
        event(
            ctx,
            mcm,
            EventType::Normal,
            "ManifestWorksCreated",
            &format!("{created} cluster(s) received the module"),
        )
        .await;
    }
    if removed > 0 {
        event(
            ctx,
            mcm,
            EventType::Normal,
            "ManifestWorksDeleted",
            &format!("{removed} cluster(s) no longer selected or matched"),
        )
        .await;
    }

    if !write_errors.is_empty() || !delete_errors.is_empty() {
        let first = write_errors
            .first()
            .or(delete_errors.first())
            .cloned()
            .unwrap_or_default();
        return Err(Error::Writes(
            write_errors.len() + delete_errors.len(),
            first,
        ));
    }
    if pending
        .iter()
        .any(|i| i.state != ImageState::Building && i.state != ImageState::Signing)
    {
        // Missing or unreachable images: retry with the per-MCM capped backoff.
        return Err(Error::ImagesPending(
            pending
                .iter()
                .map(|i| i.image.clone())
                .collect::<Vec<_>>()
                .join(", "),
        ));
    }
    if !pending.is_empty() {
        return Ok(Action::requeue(Duration::from_secs(5)));
    }
    Ok(Action::requeue(ctx.resync))
}

fn degraded_reason(
    creds: &Result<DockerConfig, String>,
    failed: &[ImageStatus],
    write_errors: &[String],
) -> &'static str {
    if creds.is_err() {
        "PullSecretError"
    } else if let Some(reason) = crate::sign::status_reason_of(failed) {
        reason
    } else if !failed.is_empty() {
        "ImagesFailed"
    } else if !write_errors.is_empty() {
        "WriteFailed"
    } else {
        "ManifestWorksDegraded"
    }
}

fn progress_message(
    status: &ManagedClusterModuleStatus,
    selected: usize,
    pending: &[ImageStatus],
    problems: &[ClusterProblem],
) -> String {
    let mut parts = vec![format!(
        "{}/{} ManifestWorks applied, {} available",
        status.number_applied, selected, status.number_available
    )];
    if !pending.is_empty() {
        parts.push(format!("{} image(s) not ready", pending.len()));
    }
    if !problems.is_empty() {
        parts.push(format!(
            "{} cluster(s) waiting: {}",
            problems.len(),
            problems[0].message
        ));
    }
    parts.join("; ")
}

/// Choose each kernel's mapping: the freshly pinned image when known; the shipped one when
/// the registry could not answer (never erase a working digest); otherwise pending.
fn decide_cluster(
    mcm: &ManagedClusterModule,
    cp: &ClusterPlan,
    outcomes: &BTreeMap<String, ImageOutcome>,
    existing: Option<&WorkEntry>,
    executor: Option<&shared_api::ocm::ManifestWorkExecutor>,
) -> ClusterOutcome {
    let shipped: BTreeMap<&str, &ReadyMapping> = existing
        .map(|e| e.shipped.iter().map(|m| (m.kernel.as_str(), m)).collect())
        .unwrap_or_default();
    let mut ready = Vec::new();
    let mut kernels = Vec::new();
    let mut pending = Vec::new();
    for t in &cp.targets {
        let outcome = outcomes.get(&t.image);
        let fresh = outcome
            .and_then(|o| o.digest.as_deref())
            .filter(|_| outcome.is_some_and(|o| o.state == ImageState::Ready));
        let chosen = match (fresh, shipped.get(t.kernel.as_str())) {
            (Some(d), _) => Some(ReadyMapping {
                kernel: t.kernel.clone(),
                pinned_image: pin(&t.image, d),
                registry_tls: t.registry_tls,
                in_tree_modules_to_remove: t.in_tree_modules_to_remove.clone(),
            }),
            (None, Some(old)) => Some((*old).clone()),
            (None, None) => None,
        };
        kernels.push(KernelView {
            kernel: t.kernel.clone(),
            image: t.image.clone(),
            pinned: chosen.as_ref().map(|c| c.pinned_image.clone()),
            state: outcome.map_or(ImageState::Pending, |o| o.state),
            reason: outcome.and_then(|o| o.reason.clone()),
        });
        match chosen {
            Some(c) => ready.push(c),
            None => pending.push(t.image.clone()),
        }
    }
    let mut view = ClusterView {
        name: cp.cluster.clone(),
        kernels,
        unmapped_kernels: cp.unmapped_kernels.clone(),
        problem: None,
    };
    if let Some(p) = &cp.problem {
        view.problem = Some(p.clone());
        let delete = p.reason == "NoMatchingKernel";
        return ClusterOutcome {
            view,
            desired: None,
            problem: Some(p.clone()),
            delete,
        };
    }
    let problem = (!pending.is_empty()).then(|| ClusterProblem {
        name: cp.cluster.clone(),
        reason: "ImagesPending".into(),
        message: format!("waiting for image(s): {}", pending.join(", ")),
    });
    match render_manifestwork_as(mcm, &cp.cluster, &ready, executor) {
        Ok(w) => {
            view.problem = problem.clone();
            ClusterOutcome {
                view,
                desired: Some(w),
                problem,
                delete: false,
            }
        }
        Err(RenderError::NoReadyMapping) => {
            let p = problem.unwrap_or_else(|| ClusterProblem {
                name: cp.cluster.clone(),
                reason: RenderError::NoReadyMapping.reason().into(),
                message: RenderError::NoReadyMapping.to_string(),
            });
            view.problem = Some(p.clone());
            ClusterOutcome {
                view,
                desired: None,
                problem: Some(p),
                delete: false,
            }
        }
        Err(e) => {
            let p = ClusterProblem {
                name: cp.cluster.clone(),
                reason: e.reason().into(),
                message: e.to_string(),
            };
            view.problem = Some(p.clone());
            ClusterOutcome {
                view,
                desired: None,
                problem: Some(p),
                delete: false,
            }
        }
    }
}

async fn apply_works(ctx: &Context, works: Vec<ManifestWork>) -> Vec<String> {
    let pp = PatchParams::apply(HUB_MANIFESTWORK_MANAGER).force();
    let results: Vec<Result<(), String>> = futures::stream::iter(works)
        .map(|w| {
            let pp = pp.clone();
            async move {
                let ns = w.namespace().unwrap_or_default();
                let api: Api<ManifestWork> = Api::namespaced(ctx.client.clone(), &ns);
                match api.patch(&w.name_any(), &pp, &Patch::Apply(&w)).await {
                    Ok(applied) => {
                        ctx.metrics
                            .objects_written
                            .get_or_create(&KindLabel {
                                kind: "ManifestWork",
                            })
                            .inc();
                        ctx.caches.put_work(&applied);
                        Ok(())
                    }
                    Err(e) => Err(format!("{ns}/{}: {e}", w.name_any())),
                }
            }
        })
        .buffer_unordered(ctx.write_concurrency.max(1))
        .collect()
        .await;
    results.into_iter().filter_map(Result::err).collect()
}

async fn delete_works(ctx: &Context, name: &str, clusters: &[String]) -> Vec<String> {
    let results: Vec<Result<(), String>> = futures::stream::iter(clusters.iter().cloned())
        .map(|cluster| async move { delete_work(ctx, &cluster, name).await })
        .buffer_unordered(ctx.write_concurrency.max(1))
        .collect()
        .await;
    results.into_iter().filter_map(Result::err).collect()
}

/// Delete one ManifestWork; one already gone leaves the cache too.
pub(crate) async fn delete_work(ctx: &Context, cluster: &str, name: &str) -> Result<(), String> {
    let api: Api<ManifestWork> = Api::namespaced(ctx.client.clone(), cluster);
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => {
            ctx.metrics
                .objects_deleted
                .get_or_create(&KindLabel {
                    kind: "ManifestWork",
                })
                .inc();
            Ok(())
        }
        Err(kube::Error::Api(s)) if s.code == 404 => {
            ctx.caches.remove_work(cluster, name);
            Ok(())
        }
        Err(e) => Err(format!("{cluster}/{name}: {e}")),
    }
}

/// Drop everything kept in memory for an MCM (views, image pipeline memory, backoff).
pub fn forget_mcm(ctx: &Context, name: &str) {
    ctx.views.remove(name);
    ctx.images.forget(name);
    ctx.backoff.reset(&name.to_string());
    ctx.caches.bump();
}

/// On deletion: delete every work of this MCM, and hold the finalizer until they are gone
/// (or released: see `crate::release`).
async fn cleanup(mcm: &ManagedClusterModule, ctx: &Context) -> Result<Action, Error> {
    let name = mcm.name_any();
    let works = ctx.caches.works_of(&name);
    if works.is_empty() {
        forget_mcm(ctx, &name);
        return Ok(Action::await_change());
    }
    // Not done until the watch sees them gone (the work agent removes its finalizer first).
    crate::release::cleanup_works(ctx, mcm, &works).await?;
    Err(Error::Finalizer(format!(
        "waiting for {} ManifestWork(s) to be deleted",
        works.len()
    )))
}

/// Counts from the cached works of the selected clusters.
fn fill_counts(
    status: &mut ManagedClusterModuleStatus,
    works: &BTreeMap<String, WorkEntry>,
    selected: Option<&BTreeSet<&str>>,
) {
    let relevant: Vec<&WorkEntry> = works
        .values()
        .filter(|w| !w.deleting && selected.is_none_or(|s| s.contains(w.cluster.as_str())))
        .collect();
    status.number_desired = relevant.len() as i32;
    status.number_applied = relevant.iter().filter(|w| w.applied).count() as i32;
    status.number_degraded = relevant.iter().filter(|w| w.degraded).count() as i32;
    status.number_available = relevant.iter().filter(|w| w.module_available()).count() as i32;
}

/// One entry per image; an image whose lookup failed keeps the digest recorded before
/// (the one still shipped), which is also what a moved tag is compared against.
fn image_statuses(
    plan: &crate::plan::Plan,
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

/// Write status only when it changed; returns whether it did.
async fn write_status(
    ctx: &Context,
    mcm: &ManagedClusterModule,
    status: ManagedClusterModuleStatus,
) -> Result<bool, Error> {
    if mcm.status.as_ref() == Some(&status) {
        ctx.metrics.writes_skipped.inc();
        return Ok(false);
    }
    let api: Api<ManagedClusterModule> = Api::all(ctx.client.clone());
    api.patch_status(
        &mcm.name_any(),
        &PatchParams::default(),
        &Patch::Merge(json!({ "status": status })),
    )
    .await?;
    ctx.metrics
        .objects_written
        .get_or_create(&KindLabel {
            kind: "ManagedClusterModuleStatus",
        })
        .inc();
    ctx.caches.bump();
    Ok(true)
}

async fn read_docker_config(ctx: &Context, secret: &str) -> Result<DockerConfig, String> {
    let ns = &ctx.operator_namespace;
    match ctx.secret(secret) {
        Some(s) => {
            let bytes = s
                .data
                .as_ref()
                .and_then(|d| d.get(".dockerconfigjson"))
                .ok_or_else(|| format!("pull secret {ns}/{secret} has no .dockerconfigjson key"))?;
            DockerConfig::parse(&bytes.0)
                .map(|c| c.from_secret(secret))
                .map_err(|e| format!("pull secret {ns}/{secret}: {e}"))
        }
        None => Err(format!(
            "pull secret {ns}/{secret} (spec.moduleSpec.imageRepoSecret) does not exist"
        )),
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(cluster: &str, applied: bool, degraded: bool) -> WorkEntry {
        WorkEntry {
            mcm: "m".into(),
            cluster: cluster.into(),
            applied,
            degraded,
            ..Default::default()
        }
    }

    /// SPEC §7 case 7: works {Applied=True}, {Degraded=True} → desired 2, applied 1, degraded 1.
    #[test]
    fn status_counts_from_work_conditions() {
        let works = BTreeMap::from([
            ("c1".to_string(), entry("c1", true, false)),
            ("c2".to_string(), entry("c2", false, true)),
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
    fn available_needs_feedback_showing_every_pod_available() {
        let mut w = entry("c1", true, false);
        w.available = true;
        assert!(!w.module_available(), "no feedback yet");
        w.feedback.insert("moduleLoader.desiredNumber".into(), 3);
        w.feedback.insert("moduleLoader.availableNumber".into(), 2);
        assert!(!w.module_available());
        w.feedback.insert("moduleLoader.availableNumber".into(), 3);
        assert!(w.module_available());
        w.feedback.insert("devicePlugin.desiredNumber".into(), 3);
        assert!(
            !w.module_available(),
            "device plugin reported desired but not available"
        );
    }
}
