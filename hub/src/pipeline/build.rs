//! Builds: carry out the build-Job step `decide::build_job` chooses for a missing image
//! (create the Job with its input copies, wait, restart, retry after the backoff), and say
//! what happened.

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, PostParams, PropagationPolicy};
use tracing::Instrument;

use super::{Deps, ImageOutcome, ImagePipeline, McmEvent, Run, build_copies};
use crate::decide::build_job::{BuildStep, attempt, build_step};
use crate::decide::facts::JobEntry;
use crate::decide::plan::ImageNeed;
use crate::metrics::OutcomeLabel;
use crate::render::build_job::{BuildInputs, render_build_job, wants_dtk_auto};

impl ImagePipeline {
    pub(super) async fn ensure_built(
        &self,
        run: &mut Run<'_>,
        need: &ImageNeed,
        job: &str,
    ) -> ImageOutcome {
        let span = tracing::info_span!("build", job);
        self.ensure_built_inner(run, need, job)
            .instrument(span)
            .await
    }

    async fn ensure_built_inner(
        &self,
        run: &mut Run<'_>,
        need: &ImageNeed,
        job: &str,
    ) -> ImageOutcome {
        let deps = run.deps;
        let mcm = run.mcm;
        let Some(build) = &need.build else {
            return ImageOutcome::missing(String::new());
        };
        let kernel = need.build_kernel();
        let build_ns = &deps.config.build_namespace;
        let cm_name = build
            .dockerfile_config_map
            .as_ref()
            .map(|c| c.name.clone())
            .unwrap_or_default();
        let dockerfile = match run.inputs.dockerfile(deps.client, &cm_name).await {
            Ok(d) => d,
            Err(e) => return ImageOutcome::failed(e.to_string()),
        };
        // A layered OS image (spec.day0) always needs the toolkit of its kernel (DTK_IMAGE).
        let layering = need.layering.as_ref();
        let dtk = if layering.is_some() || wants_dtk_auto(&dockerfile) {
            // Unknown is something to wait for (a spoke publishing its toolkit, a table
            // row), not a failed build: no Job, retried with the MCM's backoff and whenever a
            // cluster's Driver Toolkit claim changes.
            match deps.caches.dtk_image(kernel, &deps.config.dtk) {
                Ok(d) => {
                    tracing::debug!(image = %d.image, source = ?d.source, "DTK_AUTO");
                    Some(d.image)
                }
                Err(reason) => return ImageOutcome::missing(reason),
            }
        } else {
            None
        };
        let existing = deps.caches.job(job);
        let remembered = self
            .attempts
            .lock()
            .ok()
            .and_then(|a| a.get(job).map(|(_, n)| *n));
        let mcm_name = mcm.name_any();
        let inputs = BuildInputs {
            mcm: &mcm_name,
            namespace: build_ns,
            image: &need.image,
            kernel,
            mod_name: &mcm_name,
            mod_namespace: &mcm.spec.spoke_namespace,
            build,
            dockerfile: &dockerfile,
            registry_tls: need.registry_tls,
            registry_secret: mcm.spec.module_spec.image_repo_secret.is_some(),
            kaniko_image: &deps.config.kaniko_image,
            dtk_image: dtk.as_deref(),
            attempt: attempt(existing.as_ref(), remembered),
            resources: &deps.config.build_resources,
            deadline: deps.config.build_deadline,
            extra_args: layering
                .map(|l| {
                    [
                        (
                            shared_api::day0::RHCOS_IMAGE_ARG.to_string(),
                            l.base_image.clone(),
                        ),
                        (
                            shared_api::day0::DTK_IMAGE_ARG.to_string(),
                            dtk.clone().unwrap_or_default(),
                        ),
                    ]
                    .into()
                })
                .unwrap_or_default(),
        };
        let desired = render_build_job(&inputs);
        let hash = desired
            .annotations()
            .get(shared_api::labels::BUILD_HASH_ANNOTATION)
            .cloned()
            .unwrap_or_default();
        match build_step(existing.as_ref(), &hash, Timestamp::now()) {
            BuildStep::Create => {
                // Every original first: a missing one stops the build before a Job exists.
                let staged = read_copies(run, &dockerfile, build);
                match staged {
                    Ok(inputs) => self.create_job(run, need, desired, &inputs).await,
                    Err(e) => ImageOutcome::failed(format!("build not started: {e}")),
                }
            }
            BuildStep::Replacing => ImageOutcome::building(format!("replacing build Job {job}")),
            BuildStep::Restart => {
                // A changed Dockerfile or argument: start over now, not after the backoff.
                delete_job(deps, job).await;
                ImageOutcome::building(format!("build inputs changed; restarting build Job {job}"))
            }
            BuildStep::Running { attempt } => {
                // A hub stopped between creating a Job and writing its inputs leaves the pod
                // waiting for volumes nobody writes: write them again, once per Job and process
                // (the same inputs: the build hash matches).
                if let Some(j) = existing.as_ref()
                    && self.first_time(&j.uid, "staged")
                {
                    let owner = Job {
                        metadata: kube::api::ObjectMeta {
                            name: Some(j.name.clone()),
                            namespace: Some(build_ns.to_string()),
                            uid: Some(j.uid.clone()),
                            ..Default::default()
                        },
                        ..Default::default()
                    };
                    let staged = read_copies(run, &dockerfile, build);
                    let written = match staged {
                        Ok(inputs) => build_copies::write(deps.client, &owner, &inputs)
                            .await
                            .map_err(|e| e.to_string()),
                        Err(e) => Err(e.to_string()),
                    };
                    if let Err(e) = written {
                        self.unmark(&j.uid, "staged");
                        return ImageOutcome::failed(format!(
                            "cannot prepare build Job {build_ns}/{job}: {e}"
                        ));
                    }
                }
                ImageOutcome::building(format!(
                    "build Job {build_ns}/{job} is running (attempt {attempt})"
                ))
            }
            BuildStep::Retry {
                failed,
                next_attempt,
            } => {
                let reason = self
                    .build_failed(run, need, existing.as_ref(), failed)
                    .await;
                if let Ok(mut a) = self.attempts.lock() {
                    a.insert(job.to_string(), (mcm_name, next_attempt));
                }
                delete_job(deps, job).await;
                ImageOutcome::failed(format!(
                    "build failed ({reason}); retrying now (attempt {next_attempt})"
                ))
            }
            BuildStep::BackOff { failed, left, .. } => {
                let reason = self
                    .build_failed(run, need, existing.as_ref(), failed)
                    .await;
                ImageOutcome::failed(format!(
                    "build Job {build_ns}/{job} failed: {reason}; next attempt in {}s",
                    left.as_secs()
                ))
            }
        }
    }

    /// A Job that finished without the image: it failed, or succeeded while the image is
    /// still not in the registry (pushed elsewhere, or lost); a failed attempt either way,
    /// announced once. Returns why.
    async fn build_failed(
        &self,
        run: &mut Run<'_>,
        need: &ImageNeed,
        job: Option<&JobEntry>,
        failed: bool,
    ) -> String {
        let deps = run.deps;
        let reason = match job {
            Some(j) if failed => self.failure_reason(deps, j).await,
            _ => format!(
                "the build succeeded but {} is not in the registry",
                need.image
            ),
        };
        if let Some(j) = job
            && self.first_time(&j.uid, "failed")
        {
            deps.metrics
                .builds
                .get_or_create(&OutcomeLabel { outcome: "failed" })
                .inc();
            let msg = format!(
                "Buildimage job failed for kernel {} (image {}): {reason}",
                need.build_kernel(),
                need.image
            );
            run.events.push(McmEvent::warning(
                crate::reconcile::events::BUILD_FAILED,
                msg,
            ));
        }
        reason
    }

    /// The message of the failed build pod's container, read once per Job.
    async fn failure_reason(&self, deps: Deps<'_>, job: &JobEntry) -> String {
        if let Some(r) = self
            .failures
            .lock()
            .ok()
            .and_then(|f| f.get(&job.uid).cloned())
        {
            return r;
        }
        let pods: Api<Pod> = Api::namespaced(deps.client.clone(), &deps.config.build_namespace);
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
}

/// The originals of what a build Job mounts (Dockerfile, pull secret, `build.secrets`), from
/// the Secrets read once for this reconcile.
fn read_copies(
    run: &Run<'_>,
    dockerfile: &str,
    build: &shared_api::module::Build,
) -> Result<build_copies::Inputs, build_copies::CopyError> {
    build_copies::read(
        |name| run.inputs.secret(name),
        run.deps.operator_namespace,
        &run.mcm.name_any(),
        dockerfile,
        run.mcm
            .spec
            .module_spec
            .image_repo_secret
            .as_ref()
            .map(|s| s.name.as_str()),
        &build.secrets,
    )
}

impl ImagePipeline {
    async fn create_job(
        &self,
        run: &mut Run<'_>,
        need: &ImageNeed,
        job: Job,
        inputs: &build_copies::Inputs,
    ) -> ImageOutcome {
        let deps = run.deps;
        let ns = &deps.config.build_namespace;
        let name = job.name_any();
        match Api::<Job>::namespaced(deps.client.clone(), ns)
            .create(&PostParams::default(), &job)
            .await
        {
            Ok(created) => {
                deps.caches.put_job(&created);
                if let Some(uid) = created.uid() {
                    self.first_time(&uid, "staged");
                }
                // The pod waits for its volumes: the copies follow the Job they belong to.
                let staged = build_copies::write(deps.client, &created, inputs).await;
                if let Err(e) = staged {
                    delete_job(deps, &name).await;
                    return ImageOutcome::failed(format!(
                        "cannot prepare build Job {ns}/{name}: {e}"
                    ));
                }
                deps.metrics
                    .builds
                    .get_or_create(&OutcomeLabel { outcome: "created" })
                    .inc();
                let msg = format!(
                    "Buildimage created for kernel {} (image {}, Job {name})",
                    need.build_kernel(),
                    need.image
                );
                run.events.push(McmEvent::normal(
                    crate::reconcile::events::BUILD_CREATED,
                    msg,
                ));
                ImageOutcome::building(format!("build Job {ns}/{name} created"))
            }
            Err(kube::Error::Api(e)) if e.code == 409 => {
                ImageOutcome::building(format!("build Job {ns}/{name} exists"))
            }
            Err(e) => ImageOutcome::failed(format!("cannot create build Job {ns}/{name}: {e}")),
        }
    }
}

/// Delete a build Job (and, through their owner reference, its input copies).
pub(super) async fn delete_job(deps: Deps<'_>, name: &str) {
    let api: Api<Job> = Api::namespaced(deps.client.clone(), &deps.config.build_namespace);
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
