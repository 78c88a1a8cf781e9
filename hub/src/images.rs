//! The image pipeline: for every distinct image of a plan, find out whether it is ready
//! (digest known, signed as required) and, where it is not, move it along: one build Job
//! per missing image for the whole fleet, then signing in this process.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, PostParams, PropagationPolicy};
use kube::runtime::events::EventType;
use shared_api::ManagedClusterModule;
use shared_api::mcm::{ImageState, MovedTagPolicy};

use crate::build::{BuildInputs, job_name, render_build_job, wants_dtk_auto};
use crate::metrics::OutcomeLabel;
use crate::plan::{ImageNeed, Plan};
use crate::reconcile::{Context, event};
use crate::registry::{DockerConfig, LookupError, parse_reference};
use crate::sign::HashAlgorithm;
use crate::sign::Signer;
use crate::sign::image::{ImageSignRequest, is_signed_with, sign_image};

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ImageOutcome {
    pub state: ImageState,
    pub digest: Option<String>,
    pub reason: Option<String>,
    /// The tag moved to this digest and was not re-pinned (`digest` is the one kept).
    pub moved_to: Option<String>,
}

impl ImageOutcome {
    pub fn ready(digest: String) -> Self {
        Self {
            state: ImageState::Ready,
            digest: Some(digest),
            reason: None,
            moved_to: None,
        }
    }
    pub fn failed(reason: String) -> Self {
        Self {
            state: ImageState::Failed,
            digest: None,
            reason: Some(reason),
            moved_to: None,
        }
    }
    pub fn missing(reason: String) -> Self {
        Self {
            state: ImageState::Missing,
            digest: None,
            reason: Some(reason),
            moved_to: None,
        }
    }
    fn building(reason: String) -> Self {
        Self {
            state: ImageState::Building,
            digest: None,
            reason: Some(reason),
            moved_to: None,
        }
    }
}

/// First retry of a failed build after this long, doubling per attempt up to [`BUILD_RETRY_MAX`].
pub const BUILD_RETRY_BASE: Duration = Duration::from_secs(30);
pub const BUILD_RETRY_MAX: Duration = Duration::from_secs(30 * 60);

pub fn build_retry_delay(attempt: u32) -> Duration {
    let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(16));
    BUILD_RETRY_BASE.saturating_mul(factor).min(BUILD_RETRY_MAX)
}

/// Per-MCM memory of the pipeline: rebuild triggers seen, events already published.
#[derive(Debug, Default)]
pub struct ImagePipeline {
    triggers: Mutex<HashMap<String, Option<i32>>>,
    /// Job UIDs whose outcome event was published.
    announced: Mutex<HashSet<String>>,
    /// Failure text of failed Jobs, by UID (read once from the pod).
    failures: Mutex<HashMap<String, String>>,
    /// The attempt number of the next build Job, by Job name, across its re-creations
    /// (with the MCM it belongs to, so that it goes with the MCM).
    attempts: Mutex<HashMap<String, (String, u32)>>,
    /// Moved tags already announced by an event, per MCM: image → the digest it moved to.
    moved_announced: Mutex<HashMap<String, BTreeMap<String, String>>>,
    pub lookup_concurrency: usize,
}

impl ImagePipeline {
    pub fn new(lookup_concurrency: usize) -> Self {
        Self {
            lookup_concurrency,
            ..Default::default()
        }
    }

    /// The MCM is gone: forget everything kept for it.
    pub fn forget(&self, mcm: &str) {
        if let Ok(mut t) = self.triggers.lock() {
            t.remove(mcm);
        }
        if let Ok(mut a) = self.attempts.lock() {
            a.retain(|_, (m, _)| m != mcm);
        }
        if let Ok(mut m) = self.moved_announced.lock() {
            m.remove(mcm);
        }
    }

    /// Keep per-Job memory (announced outcomes, failure texts) only for Jobs that exist.
    pub fn prune_jobs(&self, live_uids: &HashSet<String>) {
        if let Ok(mut a) = self.announced.lock() {
            a.retain(|k| {
                k.rsplit_once('/')
                    .is_some_and(|(uid, _)| live_uids.contains(uid))
            });
        }
        if let Ok(mut f) = self.failures.lock() {
            f.retain(|uid, _| live_uids.contains(uid));
        }
    }

    /// Sizes of the per-object memories (announced, failures, attempts, triggers, moved), for tests.
    pub fn sizes(&self) -> [usize; 5] {
        [
            self.announced.lock().map(|a| a.len()).unwrap_or(0),
            self.failures.lock().map(|a| a.len()).unwrap_or(0),
            self.attempts.lock().map(|a| a.len()).unwrap_or(0),
            self.triggers.lock().map(|a| a.len()).unwrap_or(0),
            self.moved_announced.lock().map(|a| a.len()).unwrap_or(0),
        ]
    }

    fn first_time(&self, uid: &str, what: &str) -> bool {
        self.announced
            .lock()
            .map(|mut a| a.insert(format!("{uid}/{what}")))
            .unwrap_or(false)
    }

    fn unmark(&self, uid: &str, what: &str) {
        if let Ok(mut a) = self.announced.lock() {
            a.remove(&format!("{uid}/{what}"));
        }
    }

    /// Resolve every distinct image of the plan once, building and signing where needed.
    pub async fn resolve(
        &self,
        ctx: &Context,
        mcm: &ManagedClusterModule,
        plan: &Plan,
        creds: &DockerConfig,
    ) -> BTreeMap<String, ImageOutcome> {
        let live: HashSet<String> = ctx
            .caches
            .jobs
            .read()
            .map(|j| j.values().map(|e| e.uid.clone()).collect())
            .unwrap_or_default();
        self.prune_jobs(&live);
        let trigger = mcm.spec.module_spec.image_rebuild_trigger_generation;
        let changed = self
            .triggers
            .lock()
            .map(|mut t| {
                t.insert(mcm.name_any(), trigger)
                    .is_some_and(|old| old != trigger)
            })
            .unwrap_or(false);
        if changed {
            tracing::info!(mcm = %mcm.name_any(), ?trigger, "imageRebuildTriggerGeneration changed: re-verifying every image");
            ctx.resolver
                .invalidate(plan.images.keys().map(String::as_str));
        }
        let needs: Vec<ImageNeed> = plan.images.values().cloned().collect();
        futures::stream::iter(needs)
            .map(|need| async move {
                let outcome = self.resolve_one(ctx, mcm, &need, creds).await;
                (need.image, outcome)
            })
            .buffer_unordered(self.lookup_concurrency.max(1))
            .collect()
            .await
    }

    async fn resolve_one(
        &self,
        ctx: &Context,
        mcm: &ManagedClusterModule,
        need: &ImageNeed,
        creds: &DockerConfig,
    ) -> ImageOutcome {
        let job = job_name(&mcm.name_any(), &need.image);
        // A finished build is news: look again instead of trusting the cache.
        if let Some(j) = ctx.caches.job(&job)
            && j.succeeded
            && j.image == need.image
        {
            ctx.resolver.invalidate([need.image.as_str()]);
        }
        let found = match &need.sign {
            Some(_) => ctx
                .resolver
                .annotations(&need.image, need.registry_tls, creds)
                .await
                .map(Some),
            None => ctx
                .resolver
                .digest(&need.image, need.registry_tls, creds)
                .await
                .map(|d| Some((d, BTreeMap::new()))),
        };
        let found = match found {
            Ok(f) => f,
            Err(LookupError::NotFound(_)) => None,
            Err(e) => return ImageOutcome::failed(e.to_string()),
        };
        if let Some((digest, _)) = &found
            && let Some(kept) = self.hold_moved_tag(ctx, mcm, need, digest, &job).await
        {
            return kept;
        }
        match (found, &need.build, &need.sign) {
            (Some((digest, _)), _, None) => {
                self.collect_finished_job(ctx, mcm, &job, need).await;
                ImageOutcome::ready(digest)
            }
            (Some((digest, annotations)), _, Some(_)) => {
                self.collect_finished_job(ctx, mcm, &job, need).await;
                self.ensure_signed(
                    ctx,
                    mcm,
                    need,
                    creds,
                    &digest,
                    &annotations,
                    need.build.is_some(),
                )
                .await
            }
            (None, Some(_), _) => self.ensure_built(ctx, mcm, need, &job).await,
            (None, None, Some(sign)) => match &sign.unsigned_image {
                // Sign a prebuilt unsigned image into containerImage.
                Some(_) => {
                    self.ensure_signed(ctx, mcm, need, creds, "", &BTreeMap::new(), false)
                        .await
                }
                None => ImageOutcome::missing(format!(
                    "image {} does not exist and there is no build or unsignedImage",
                    need.image
                )),
            },
            (None, None, None) => ImageOutcome::missing(format!(
                "image {} does not exist in the registry and the mapping has no build section",
                need.image
            )),
        }
    }

    /// A tag that moved away from the digest this MCM ships, when re-pinning is off: keep
    /// the shipped digest (and do nothing with the new content, e.g. not sign it), say so
    /// once with an event. `None`: take `digest` as usual.
    async fn hold_moved_tag(
        &self,
        ctx: &Context,
        mcm: &ManagedClusterModule,
        need: &ImageNeed,
        digest: &str,
        job: &str,
    ) -> Option<ImageOutcome> {
        let keep = match mcm.spec.moved_tag_policy {
            Some(MovedTagPolicy::Repin) => false,
            Some(MovedTagPolicy::Keep) => true,
            None => need.sign.is_some(),
        };
        if !keep || crate::registry::pinned_digest(&need.image).is_some() {
            return None;
        }
        let status = mcm.status.as_ref()?;
        let accepted = status
            .images
            .iter()
            .find(|i| i.image == need.image)
            .and_then(|i| i.digest.clone())?;
        if accepted == digest
            // Asked for: re-verify and take what the tags point to now.
            || mcm.spec.module_spec.image_rebuild_trigger_generation
                != status.image_rebuild_trigger_generation
            // Ours: the hub pushed it (signing) or its build Job just did.
            || ctx.resolver.produced(&need.image, digest)
            || ctx
                .caches
                .job(job)
                .is_some_and(|j| j.succeeded && j.image == need.image)
        {
            return None;
        }
        let policy = match mcm.spec.moved_tag_policy {
            Some(_) => "spec.movedTagPolicy is Keep",
            None => "spec.movedTagPolicy is unset: Keep for images the hub signs",
        };
        let msg = format!(
            "tag {} moved from {accepted} to {digest}; still shipping {accepted} ({policy}; set movedTagPolicy: Repin or change imageRebuildTriggerGeneration to take the new digest)",
            need.image
        );
        let first = self
            .moved_announced
            .lock()
            .map(|mut m| {
                m.entry(mcm.name_any())
                    .or_default()
                    .insert(need.image.clone(), digest.to_string())
                    .as_deref()
                    != Some(digest)
            })
            .unwrap_or(false);
        if first {
            event(ctx, mcm, EventType::Warning, "TagMoved", &msg).await;
        }
        Some(ImageOutcome {
            state: ImageState::Ready,
            digest: Some(accepted),
            reason: Some(msg),
            moved_to: Some(digest.to_string()),
        })
    }

    /// Publish the build's success once and clean the Job up after the configured delay.
    async fn collect_finished_job(
        &self,
        ctx: &Context,
        mcm: &ManagedClusterModule,
        job: &str,
        need: &ImageNeed,
    ) {
        let Some(j) = ctx.caches.job(job) else { return };
        if !j.succeeded || j.deleting {
            return;
        }
        if self.first_time(&j.uid, "succeeded") {
            ctx.metrics
                .builds
                .get_or_create(&OutcomeLabel {
                    outcome: "succeeded",
                })
                .inc();
            let msg = format!(
                "Build of {} for kernel {} succeeded",
                need.image,
                need.build_kernel()
            );
            event(ctx, mcm, EventType::Normal, "BuildSucceeded", &msg).await;
        }
        let old_enough = j.finished_at.is_none_or(|t| {
            Timestamp::now().duration_since(t).unsigned_abs() >= ctx.config.job_gc_delay
        });
        if old_enough {
            if let Ok(mut a) = self.attempts.lock() {
                a.remove(job);
            }
            delete_job(ctx, job).await;
        }
    }

    async fn ensure_built(
        &self,
        ctx: &Context,
        mcm: &ManagedClusterModule,
        need: &ImageNeed,
        job: &str,
    ) -> ImageOutcome {
        let Some(build) = &need.build else {
            return ImageOutcome::missing(String::new());
        };
        let kernel = need.build_kernel();
        let ns = &ctx.operator_namespace;
        let build_ns = &ctx.config.build_namespace;
        // The Dockerfile, from the operator namespace.
        let cm_name = build
            .dockerfile_config_map
            .as_ref()
            .map(|c| c.name.clone())
            .unwrap_or_default();
        let dockerfile = match Api::<ConfigMap>::namespaced(ctx.client.clone(), ns)
            .get_opt(&cm_name)
            .await
        {
            Ok(Some(cm)) => match cm.data.and_then(|d| d.get("dockerfile").cloned()) {
                Some(d) => d,
                None => {
                    return ImageOutcome::failed(format!(
                        "ConfigMap {ns}/{cm_name} has no 'dockerfile' key"
                    ));
                }
            },
            Ok(None) => {
                return ImageOutcome::failed(format!(
                    "Dockerfile ConfigMap {ns}/{cm_name} does not exist"
                ));
            }
            Err(e) => {
                return ImageOutcome::failed(format!("cannot read ConfigMap {ns}/{cm_name}: {e}"));
            }
        };
        let dtk = if wants_dtk_auto(&dockerfile) {
            match ctx.config.dtk.image_for(kernel) {
                Some(i) => Some(i.to_string()),
                None => {
                    return ImageOutcome::failed(format!(
                        "the Dockerfile declares DTK_AUTO but the hub's driverToolkit table has no image for kernel {kernel}; build not started"
                    ));
                }
            }
        } else {
            None
        };
        let existing = ctx.caches.job(job);
        let attempt = existing
            .as_ref()
            .map(|j| j.attempt)
            .or_else(|| {
                self.attempts
                    .lock()
                    .ok()
                    .and_then(|a| a.get(job).map(|(_, n)| *n))
            })
            .unwrap_or(1);
        let inputs = BuildInputs {
            mcm: &mcm.name_any(),
            namespace: build_ns,
            image: &need.image,
            kernel,
            mod_name: &mcm.name_any(),
            mod_namespace: &mcm.spec.spoke_namespace,
            build,
            dockerfile: &dockerfile,
            registry_tls: need.registry_tls,
            registry_secret: mcm.spec.module_spec.image_repo_secret.is_some(),
            kaniko_image: &ctx.config.kaniko_image,
            dtk_image: dtk.as_deref(),
            attempt,
            resources: &ctx.config.build_resources,
            deadline: ctx.config.build_deadline,
        };
        let desired = render_build_job(&inputs);
        let hash = desired
            .annotations()
            .get(shared_api::labels::BUILD_HASH_ANNOTATION)
            .cloned()
            .unwrap_or_default();
        let stage = || {
            crate::buildns::read(
                |name| ctx.secret(name),
                ns,
                &mcm.name_any(),
                &dockerfile,
                mcm.spec
                    .module_spec
                    .image_repo_secret
                    .as_ref()
                    .map(|s| s.name.as_str()),
                &build.secrets,
            )
        };
        match existing {
            None => {
                // Every original first: a missing one stops the build before a Job exists.
                let staged = stage();
                match staged {
                    Ok(inputs) => self.create_job(ctx, mcm, need, desired, &inputs).await,
                    Err(e) => ImageOutcome::failed(format!("build not started: {e}")),
                }
            }
            Some(j) if j.deleting => ImageOutcome::building(format!("replacing build Job {job}")),
            Some(j) if j.build_hash != hash && !j.active => {
                // A changed Dockerfile or argument: start over now, not after the backoff.
                delete_job(ctx, job).await;
                ImageOutcome::building(format!("build inputs changed; restarting build Job {job}"))
            }
            Some(j) if j.active => {
                // A hub stopped between creating a Job and writing its inputs leaves the pod
                // waiting for volumes nobody writes: write them again, once per Job and process
                // (the same inputs: the build hash matches).
                if self.first_time(&j.uid, "staged") {
                    let owner = Job {
                        metadata: kube::api::ObjectMeta {
                            name: Some(j.name.clone()),
                            namespace: Some(build_ns.to_string()),
                            uid: Some(j.uid.clone()),
                            ..Default::default()
                        },
                        ..Default::default()
                    };
                    let written = match stage() {
                        Ok(inputs) => crate::buildns::write(&ctx.client, &owner, &inputs).await,
                        Err(e) => Err(e),
                    };
                    if let Err(e) = written {
                        self.unmark(&j.uid, "staged");
                        return ImageOutcome::failed(format!(
                            "cannot prepare build Job {build_ns}/{job}: {e}"
                        ));
                    }
                }
                ImageOutcome::building(format!(
                    "build Job {build_ns}/{job} is running (attempt {})",
                    j.attempt
                ))
            }
            Some(j) => {
                // Failed, or succeeded while the image is still not in the registry (pushed
                // elsewhere, or lost): a failed attempt either way, retried after the backoff.
                let reason = if j.failed {
                    self.failure_reason(ctx, &j).await
                } else {
                    format!(
                        "the build succeeded but {} is not in the registry",
                        need.image
                    )
                };
                if self.first_time(&j.uid, "failed") {
                    ctx.metrics
                        .builds
                        .get_or_create(&OutcomeLabel { outcome: "failed" })
                        .inc();
                    let msg = format!(
                        "Build of {} for kernel {kernel} failed: {reason}",
                        need.image
                    );
                    event(ctx, mcm, EventType::Warning, "BuildFailed", &msg).await;
                }
                let wait = build_retry_delay(j.attempt);
                let since = j
                    .finished_at
                    .map_or(wait, |t| Timestamp::now().duration_since(t).unsigned_abs());
                if since >= wait {
                    if let Ok(mut a) = self.attempts.lock() {
                        a.insert(job.to_string(), (mcm.name_any(), j.attempt + 1));
                    }
                    delete_job(ctx, job).await;
                    return ImageOutcome::failed(format!(
                        "build failed ({reason}); retrying now (attempt {})",
                        j.attempt + 1
                    ));
                }
                ImageOutcome::failed(format!(
                    "build Job {build_ns}/{job} failed: {reason}; next attempt in {}s",
                    (wait - since).as_secs()
                ))
            }
        }
    }

    async fn create_job(
        &self,
        ctx: &Context,
        mcm: &ManagedClusterModule,
        need: &ImageNeed,
        job: Job,
        inputs: &crate::buildns::Inputs,
    ) -> ImageOutcome {
        let ns = &ctx.config.build_namespace;
        let name = job.name_any();
        match Api::<Job>::namespaced(ctx.client.clone(), ns)
            .create(&PostParams::default(), &job)
            .await
        {
            Ok(created) => {
                ctx.caches.put_job(&created);
                // The pod waits for its volumes: the copies follow the Job they belong to.
                if let Some(uid) = created.uid() {
                    self.first_time(&uid, "staged");
                }
                let staged = crate::buildns::write(&ctx.client, &created, inputs).await;
                if let Err(e) = staged {
                    delete_job(ctx, &name).await;
                    return ImageOutcome::failed(format!(
                        "cannot prepare build Job {ns}/{name}: {e}"
                    ));
                }
                ctx.metrics
                    .builds
                    .get_or_create(&OutcomeLabel { outcome: "created" })
                    .inc();
                let msg = format!(
                    "Build created for kernel {} (image {}, Job {name})",
                    need.build_kernel(),
                    need.image
                );
                event(ctx, mcm, EventType::Normal, "BuildCreated", &msg).await;
                ImageOutcome::building(format!("build Job {ns}/{name} created"))
            }
            Err(kube::Error::Api(e)) if e.code == 409 => {
                ImageOutcome::building(format!("build Job {ns}/{name} exists"))
            }
            Err(e) => ImageOutcome::failed(format!("cannot create build Job {ns}/{name}: {e}")),
        }
    }

    /// The message of the failed build pod's container, read once per Job.
    async fn failure_reason(&self, ctx: &Context, job: &crate::cache::JobEntry) -> String {
        if let Some(r) = self
            .failures
            .lock()
            .ok()
            .and_then(|f| f.get(&job.uid).cloned())
        {
            return r;
        }
        let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ctx.config.build_namespace);
        let reason = match pods
            .list(&ListParams::default().labels(&format!("job-name={}", job.name)))
            .await
        {
            Ok(list) => list
                .items
                .iter()
                .flat_map(|p| {
                    p.status
                        .iter()
                        .flat_map(|s| s.container_statuses.iter().flatten())
                })
                .find_map(|cs| {
                    let t = cs.state.as_ref()?.terminated.as_ref()?;
                    Some(
                        t.message
                            .clone()
                            .or_else(|| t.reason.clone())
                            .unwrap_or_else(|| format!("exit code {}", t.exit_code)),
                    )
                })
                .unwrap_or_else(|| "the build pod failed".into()),
            Err(_) => "the build pod failed".into(),
        };
        let reason: String = reason.trim().chars().take(300).collect();
        if let Ok(mut f) = self.failures.lock() {
            f.insert(job.uid.clone(), reason.clone());
        }
        reason
    }

    /// Ready when the image carries the current certificate's signature; otherwise sign it
    /// here (from the built image in place, or from `sign.unsignedImage`) and push.
    #[allow(clippy::too_many_arguments)]
    async fn ensure_signed(
        &self,
        ctx: &Context,
        mcm: &ManagedClusterModule,
        need: &ImageNeed,
        creds: &DockerConfig,
        digest: &str,
        annotations: &BTreeMap<String, String>,
        from_build: bool,
    ) -> ImageOutcome {
        let Some(sign) = &need.sign else {
            return ImageOutcome::ready(digest.to_string());
        };
        let signer = match read_signer(ctx, sign).await {
            Ok(s) => s,
            Err(reason) => {
                ctx.metrics
                    .signs
                    .get_or_create(&OutcomeLabel { outcome: "failed" })
                    .inc();
                return ImageOutcome::failed(reason);
            }
        };
        if !digest.is_empty() && is_signed_with(annotations, signer.cert()) {
            // The annotation is a claim: ship the digest only if its modules verify.
            return crate::sign::gate::verified_outcome(
                ctx,
                mcm,
                need,
                creds,
                digest,
                &sign.files_to_sign,
                signer.cert(),
            )
            .await;
        }
        let source = if from_build || sign.unsigned_image.is_none() {
            need.image.clone()
        } else {
            sign.unsigned_image.clone().unwrap_or_default()
        };
        let (src_ref, dst_ref) = match (parse_reference(&source), parse_reference(&need.image)) {
            (Ok(s), Ok(d)) => (s, d),
            (Err(e), _) | (_, Err(e)) => return ImageOutcome::failed(e.to_string()),
        };
        let src_tls = sign
            .unsigned_image_registry_tls
            .unwrap_or(need.registry_tls);
        let client = ctx
            .resolver
            .fresh_client(src_ref.resolve_registry(), src_tls);
        let req = ImageSignRequest {
            source: &src_ref,
            source_auth: &creds.auth_for(src_ref.resolve_registry()),
            destination: &dst_ref,
            destination_auth: &creds.auth_for(dst_ref.resolve_registry()),
            files_to_sign: &sign.files_to_sign,
            signer: &signer,
            hash: HashAlgorithm::Sha256,
        };
        match sign_image(&client, &req, &ctx.signing).await {
            Ok(signed) => {
                ctx.resolver.invalidate([need.image.as_str()]);
                ctx.resolver.store(&need.image, &signed.digest);
                ctx.metrics
                    .signs
                    .get_or_create(&OutcomeLabel {
                        outcome: "succeeded",
                    })
                    .inc();
                let msg = format!(
                    "Signed {} file(s) of {} for kernel {} with certificate {}",
                    signed.signed_files.len(),
                    need.image,
                    need.build_kernel(),
                    &signed.cert_sha256[..16.min(signed.cert_sha256.len())]
                );
                event(ctx, mcm, EventType::Normal, "Signed", &msg).await;
                ImageOutcome::ready(signed.digest)
            }
            Err(e) => {
                ctx.metrics
                    .signs
                    .get_or_create(&OutcomeLabel { outcome: "failed" })
                    .inc();
                let msg = format!(
                    "{}Signing {} for kernel {} failed: {e}",
                    e.status_reason()
                        .map(|r| format!("{r}: "))
                        .unwrap_or_default(),
                    need.image,
                    need.build_kernel()
                );
                event(ctx, mcm, EventType::Warning, "SignFailed", &msg).await;
                ImageOutcome::failed(msg)
            }
        }
    }
}

async fn delete_job(ctx: &Context, name: &str) {
    let api: Api<Job> = Api::namespaced(ctx.client.clone(), &ctx.config.build_namespace);
    let dp = DeleteParams {
        propagation_policy: Some(PropagationPolicy::Background),
        ..Default::default()
    };
    match api.delete(name, &dp).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => tracing::warn!(job = name, error = %e, "cannot delete build Job"),
    }
}

/// The signing key and certificate from the operator namespace (`key` and `cert` entries).
/// Errors name the secret, never its content.
async fn read_signer(ctx: &Context, sign: &shared_api::module::Sign) -> Result<Signer, String> {
    let ns = &ctx.operator_namespace;
    let entry = |secret: Option<&shared_api::module::LocalObjectReference>, key: &'static str| {
        let name = secret.map(|s| s.name.clone()).unwrap_or_default();
        match ctx.secret(&name) {
            Some(s) => s
                .data
                .as_ref()
                .and_then(|d| d.get(key).map(|b| b.0.clone()))
                .ok_or_else(|| format!("secret {ns}/{name} has no '{key}' entry")),
            None => Err(format!("signing secret {ns}/{name} does not exist")),
        }
    };
    let key = entry(sign.key_secret.as_ref(), "key")?;
    let cert = entry(sign.cert_secret.as_ref(), "cert")?;
    Signer::from_pem_or_der(&key, &cert).map_err(|e| format!("signing key/certificate: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_retry_backs_off_with_a_cap() {
        assert_eq!(build_retry_delay(1), Duration::from_secs(30));
        assert_eq!(build_retry_delay(2), Duration::from_secs(60));
        assert_eq!(build_retry_delay(30), BUILD_RETRY_MAX);
    }
}
