//! The FleetPreflightValidation reconciler: every MCM in scope against every kernel listed,
//! a result per pair in status; with `pushBuiltImage`, the missing images handed to the
//! image pipeline the MCM reconciler uses (same build Job per image, same registry), so that
//! a cluster moving to the kernel later finds its image ready.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{FutureExt as _, StreamExt};
use k8s_openapi::jiff::Timestamp;
use kmm_runtime::backoff::KeyedBackoff;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::Store;
use shared_api::ManagedClusterModule;
use shared_api::mcm::ImageState;
use shared_api::preflight::{
    FleetPreflightValidation, FleetPreflightValidationStatus, VerificationStage,
    VerificationStatus, validate_preflight,
};
use shared_api::validate::validate_mcm;
use tracing::Instrument;

use super::check::{Gathered, Sources, gather};
use super::metrics::PreflightMetrics;
use crate::decide::preflight::{
    Target, Verdict, in_scope, plan_of, status, target, verdict, verdict_without_image,
};
use crate::pipeline::{Deps, McmEvent, McmInputs};
use crate::registry::{DockerConfig, LookupError};
use crate::render::build_job::job_name;

/// The controller label of this reconciler in the shared controller metrics.
pub const PREFLIGHT_CONTROLLER: &str = "preflight";

/// How soon a preflight with a build running (or the registry not answering) looks again.
pub const IN_PROGRESS_REQUEUE: Duration = Duration::from_secs(5);

/// Checks of one reconcile run at once (each asks the registry at most twice).
const CHECK_CONCURRENCY: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("writing status: {0}")]
    Status(#[source] kube::Error),
    #[error("encoding status: {0}")]
    Encode(#[source] serde_json::Error),
}

impl kmm_runtime::ErrorCategory for Error {
    fn category(&self) -> &'static str {
        match self {
            Error::Status(_) => "status_write",
            Error::Encode(_) => "encode",
        }
    }
}

/// What the reconciler shares with the MCM reconciler (client, caches, registry client,
/// image pipeline, configuration) and its own.
pub struct Context {
    pub hub: Arc<crate::reconcile::Context>,
    pub mcms: Store<ManagedClusterModule>,
    pub preflights: Store<FleetPreflightValidation>,
    pub metrics: PreflightMetrics,
    pub backoff: KeyedBackoff<String>,
    /// Result counts per preflight (for the gauges), kept only for preflights that exist.
    counts: Mutex<BTreeMap<String, [i64; 3]>>,
}

impl Context {
    pub fn new(
        hub: Arc<crate::reconcile::Context>,
        mcms: Store<ManagedClusterModule>,
        preflights: Store<FleetPreflightValidation>,
        metrics: PreflightMetrics,
    ) -> Self {
        Self {
            hub,
            mcms,
            preflights,
            metrics,
            backoff: KeyedBackoff::new(Duration::from_secs(1), Duration::from_secs(300)),
            counts: Mutex::new(BTreeMap::new()),
        }
    }

    fn deps(&self) -> Deps<'_> {
        let h = &self.hub;
        Deps {
            client: &h.client,
            resolver: &h.resolver,
            caches: &h.caches,
            metrics: &h.metrics,
            config: &h.config,
            signing: &h.signing,
            operator_namespace: &h.operator_namespace,
        }
    }

    /// Set the gauges from this preflight's counts and forget preflights that are gone.
    fn count(&self, name: &str, s: &FleetPreflightValidationStatus) {
        let live: std::collections::BTreeSet<String> = self
            .preflights
            .state()
            .iter()
            .map(|p| p.name_any())
            .collect();
        self.metrics.validations.set(live.len() as i64);
        let Ok(mut counts) = self.counts.lock() else {
            return;
        };
        counts.insert(
            name.to_string(),
            [s.success.into(), s.failure.into(), s.in_progress.into()],
        );
        counts.retain(|n, _| live.contains(n));
        let mut total = [0i64; 3];
        for c in counts.values() {
            for (t, n) in total.iter_mut().zip(c) {
                *t += n;
            }
        }
        for (status, n) in [
            VerificationStatus::Success,
            VerificationStatus::Failure,
            VerificationStatus::InProgress,
        ]
        .into_iter()
        .zip(total)
        {
            self.metrics.results_of(status).set(n);
        }
    }
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("preflight::Context").finish()
    }
}

/// The cluster as the source of facts: the Secret store, the API for Dockerfiles, the hub's
/// registry client (and its cache), the Driver Toolkit table the builds use.
struct ClusterSources<'a> {
    hub: &'a crate::reconcile::Context,
}

impl Sources for ClusterSources<'_> {
    fn namespace(&self) -> &str {
        &self.hub.operator_namespace
    }
    fn inputs_known(&self) -> bool {
        true
    }
    fn secret(&self, name: &str) -> Option<Arc<k8s_openapi::api::core::v1::Secret>> {
        self.hub.secret(name)
    }
    fn dockerfile<'a>(
        &'a self,
        inputs: &'a McmInputs,
        name: &'a str,
    ) -> impl std::future::Future<Output = Result<String, crate::pipeline::InputError>> + Send + 'a
    {
        inputs.dockerfile(&self.hub.client, name)
    }
    async fn lookup(
        &self,
        image: &str,
        tls: shared_api::module::TlsOptions,
        creds: &DockerConfig,
        annotations: bool,
    ) -> Result<(String, BTreeMap<String, String>), LookupError> {
        let r = &self.hub.resolver;
        if annotations {
            r.annotations(image, tls, creds).await
        } else {
            r.digest(image, tls, creds)
                .await
                .map(|d| (d, BTreeMap::new()))
        }
    }
    fn knows_annotations(&self) -> bool {
        true
    }
    fn dtk(&self, kernel: &str) -> Option<String> {
        // As the build pipeline resolves `DTK_AUTO`: the hub's table, then the clusters'
        // Driver Toolkit claims.
        self.hub
            .caches
            .dtk_image(kernel, &self.hub.config.dtk)
            .ok()
            .map(|d| d.image)
    }
}

pub async fn reconcile(
    fpv: Arc<FleetPreflightValidation>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let span = tracing::info_span!("preflight", name = %fpv.name_any());
    let started = Instant::now();
    let result = apply(&fpv, &ctx).instrument(span).await;
    ctx.hub
        .metrics
        .controller
        .observe_result(PREFLIGHT_CONTROLLER, started.elapsed(), &result);
    result
}

pub fn error_policy(
    fpv: Arc<FleetPreflightValidation>,
    error: &Error,
    ctx: Arc<Context>,
) -> Action {
    let name = fpv.name_any();
    let delay = crate::registry::jittered(ctx.backoff.next(&name));
    tracing::info!(preflight = %name, error = %error, retry_in = ?delay, "preflight will be retried");
    Action::requeue(delay)
}

async fn apply(fpv: &FleetPreflightValidation, ctx: &Context) -> Result<Action, Error> {
    let name = fpv.name_any();
    // What the caches and the MCM store say is only an answer once they are filled.
    if !ctx.hub.caches.synced() || ctx.mcms.wait_until_ready().now_or_never().is_none() {
        return Ok(Action::requeue(Duration::from_millis(200)));
    }
    let now = Timestamp::now();
    let generation = fpv.metadata.generation;
    let violations = validate_preflight(fpv);
    if !violations.is_empty() {
        let msg = violations
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        let mut s = fpv.status.clone().unwrap_or_default();
        shared_api::conditions::set_condition(
            &mut s.conditions,
            shared_api::conditions::READY,
            false,
            "InvalidSpec",
            &msg,
            generation,
            now,
        );
        s.observed_generation = generation;
        write_status(ctx, fpv, &s).await?;
        return Ok(Action::requeue(ctx.hub.resync));
    }

    let clusters = ctx.hub.caches.cluster_facts();
    let selector = fpv.spec.cluster_selector.as_ref();
    let mut mcms: Vec<Arc<ManagedClusterModule>> = ctx
        .mcms
        .state()
        .into_iter()
        .filter(|m| m.metadata.deletion_timestamp.is_none())
        .filter(|m| in_scope(m, selector, clusters.iter().map(|c| &**c)))
        .collect();
    mcms.sort_by_key(|m| m.name_any());
    let pairs: Vec<(Arc<ManagedClusterModule>, String)> = mcms
        .iter()
        .flat_map(|m| {
            fpv.spec
                .kernel_versions
                .iter()
                .map(move |k| (m.clone(), k.clone()))
        })
        .collect();
    let push = fpv.spec.push_built_image;
    let done: Vec<(String, String, Verdict, Vec<McmEvent>)> = futures::stream::iter(pairs)
        .map(|(m, kernel)| async move {
            let span = tracing::info_span!("check", mcm = %m.name_any(), kernel = %kernel);
            let mut events = Vec::new();
            let v = check(ctx, &m, &kernel, push, &mut events)
                .instrument(span)
                .await;
            (m.name_any(), kernel, v, events)
        })
        .buffer_unordered(CHECK_CONCURRENCY)
        .collect()
        .await;
    let mut verdicts = Vec::with_capacity(done.len());
    for (mcm, kernel, v, events) in done {
        for e in events {
            event(ctx, fpv, e.type_, &e.reason, &format!("{mcm}: {}", e.note)).await;
        }
        verdicts.push((mcm, kernel, v));
    }
    let new = status(fpv.status.as_ref(), &verdicts, mcms.len(), generation, now);
    let failed_before = fpv.status.as_ref().map_or(0, |s| s.failure);
    if fpv.status.as_ref() != Some(&new) {
        write_status(ctx, fpv, &new).await?;
        if new.failure > 0 && new.failure != failed_before {
            let msg = new
                .conditions
                .iter()
                .find(|c| c.type_ == shared_api::conditions::READY)
                .map(|c| c.message.clone())
                .unwrap_or_default();
            event(ctx, fpv, EventType::Warning, "PreflightFailed", &msg).await;
        }
    }
    ctx.count(&name, &new);
    let unreachable = verdicts
        .iter()
        .any(|(_, _, v)| v.reason == "RegistryUnavailable" || v.reason == "Checking");
    let waiting = verdicts
        .iter()
        .any(|(_, _, v)| v.status == VerificationStatus::InProgress);
    Ok(if unreachable {
        // Not known: ask again with the capped backoff, not every few seconds.
        Action::requeue(crate::registry::jittered(ctx.backoff.next(&name)))
    } else if waiting {
        ctx.backoff.reset(&name);
        Action::requeue(IN_PROGRESS_REQUEUE)
    } else {
        ctx.backoff.reset(&name);
        Action::requeue(ctx.hub.resync)
    })
}

/// One MCM against one kernel; with `push`, a missing image goes to the image pipeline.
async fn check(
    ctx: &Context,
    mcm: &ManagedClusterModule,
    kernel: &str,
    push: bool,
    events: &mut Vec<McmEvent>,
) -> Verdict {
    let violations = validate_mcm(mcm);
    if !violations.is_empty() {
        let msg = violations
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        return Verdict::new(
            VerificationStatus::Failure,
            VerificationStage::Done,
            "InvalidSpec",
            format!("the MCM is invalid: {msg}"),
            None,
        );
    }
    let t = target(mcm, kernel);
    if let Some(v) = verdict_without_image(&t, kernel) {
        return v;
    }
    let Target::Image(need) = t else {
        return verdict_without_image(&Target::NoMapping, kernel).unwrap_or_else(|| {
            Verdict::new(
                VerificationStatus::Failure,
                VerificationStage::Done,
                "NoMapping",
                String::new(),
                None,
            )
        });
    };
    let src = ClusterSources { hub: &ctx.hub };
    let Gathered {
        checks,
        inputs,
        creds,
    } = gather(&src, mcm, &need).await;
    let v = verdict(&need, &checks);
    let would = matches!(v.reason, "WouldBuild" | "WouldBuildAndSign" | "WouldSign");
    // A Job built ahead that finished: the pipeline announces it and cleans it up.
    let left_job = ctx
        .hub
        .caches
        .job(&job_name(&mcm.name_any(), &need.image))
        .is_some();
    let Some(creds) = creds.filter(|_| push && (would || (v.is_success() && left_job))) else {
        return v;
    };
    let report = ctx
        .hub
        .images
        .resolve(ctx.deps(), mcm, &plan_of(&need), &inputs, &creds)
        .await;
    events.extend(report.events);
    let Some(outcome) = report.outcomes.get(&need.image) else {
        return v;
    };
    let image = Some(need.image.clone());
    let reason = outcome.reason.clone().unwrap_or_default();
    match outcome.state {
        ImageState::Ready if would || left_job => Verdict::new(
            VerificationStatus::Success,
            VerificationStage::Done,
            "ImageBuilt",
            format!(
                "{} is ready for kernel {kernel} ({}): built ahead",
                need.image,
                outcome.digest.as_deref().unwrap_or("")
            ),
            image,
        ),
        ImageState::Ready => v,
        ImageState::Building | ImageState::Pending => Verdict::new(
            VerificationStatus::InProgress,
            VerificationStage::Build,
            "Building",
            reason,
            image,
        ),
        ImageState::Signing => Verdict::new(
            VerificationStatus::InProgress,
            VerificationStage::Sign,
            "Signing",
            reason,
            image,
        ),
        ImageState::Failed | ImageState::Missing => {
            let signing = v.reason == "WouldSign" || reason.to_lowercase().contains("sign");
            let (stage, why) = if signing {
                (VerificationStage::Sign, "SignFailed")
            } else {
                (VerificationStage::Build, "BuildFailed")
            };
            Verdict::new(VerificationStatus::Failure, stage, why, reason, image)
        }
    }
}

/// Write the status: the diff against the status read, members left out sent as null (a
/// merge patch would keep them), as the MCM reconciler writes its status.
async fn write_status(
    ctx: &Context,
    fpv: &FleetPreflightValidation,
    s: &FleetPreflightValidationStatus,
) -> Result<(), Error> {
    let new = serde_json::to_value(s).map_err(Error::Encode)?;
    let old = match &fpv.status {
        Some(old) => serde_json::to_value(old).map_err(Error::Encode)?,
        None => serde_json::Value::Null,
    };
    let v = crate::reconcile::writes::merge_patch(&old, &new);
    Api::<FleetPreflightValidation>::all(ctx.hub.client.clone())
        .patch_status(
            &fpv.name_any(),
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({ "status": v })),
        )
        .await
        .map_err(Error::Status)?;
    ctx.hub
        .metrics
        .objects_written
        .get_or_create(&crate::metrics::KindLabel {
            kind: "FleetPreflightValidationStatus",
        })
        .inc();
    Ok(())
}

/// An event on the preflight (in `default`, like every cluster-scoped object's), also kept
/// for the dashboard.
async fn event(
    ctx: &Context,
    fpv: &FleetPreflightValidation,
    type_: EventType,
    reason: &str,
    note: &str,
) {
    crate::reconcile::events::event_on(&ctx.hub, fpv, type_, reason, "Preflight", note).await;
}

/// The names and generations of the MCMs: a spec change (not a status write) re-runs every
/// preflight.
fn fingerprint(mcms: &Store<ManagedClusterModule>) -> Vec<(String, Option<i64>)> {
    let mut now: Vec<(String, Option<i64>)> = mcms
        .state()
        .iter()
        .map(|m| (m.name_any(), m.metadata.generation))
        .collect();
    now.sort();
    now
}

/// Run the preflight controller until `shutdown`; it shares `hub` with the MCM reconciler.
pub async fn run(
    client: kube::Client,
    hub: Arc<crate::reconcile::Context>,
    mcms: Store<ManagedClusterModule>,
    metrics: PreflightMetrics,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    use kube::runtime::{Controller, watcher};
    let controller = Controller::new(
        Api::<FleetPreflightValidation>::all(client),
        watcher::Config::default(),
    );
    let ctx = Arc::new(Context::new(hub, mcms.clone(), controller.store(), metrics));
    // At most once a second: every preflight looks again when an MCM's spec changed.
    let changes = futures::stream::unfold((mcms, None), |(mcms, last)| async move {
        let mut last: Option<Vec<(String, Option<i64>)>> = last;
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = fingerprint(&mcms);
            let changed = last.as_ref().is_some_and(|l| *l != now);
            last = Some(now);
            if changed {
                return Some(((), (mcms, last)));
            }
        }
    });
    controller
        .reconcile_all_on(changes)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "preflight controller event");
            }
        })
        .await;
}
