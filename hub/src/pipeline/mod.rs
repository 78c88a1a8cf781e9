//! The image pipeline: for every distinct image of a plan, find out whether it is ready
//! (digest known, signed as required) and, where it is not, move it along: one build Job
//! per missing image for the whole fleet, then signing in this process.
//!
//! It takes narrow inputs ([`Deps`], [`McmInputs`] read once per reconcile) and returns what
//! happened ([`Report`]: outcomes and the events to publish); the reconciler publishes.
//! The decisions it applies are `decide`'s (moved tags, build-Job steps).

pub mod build;
pub mod build_copies;
pub mod inputs;
pub mod sign;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;

use futures::StreamExt;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::events::EventType;
use shared_api::ManagedClusterModule;
use tracing::Instrument;

pub use crate::decide::build_job::{BUILD_RETRY_BASE, BUILD_RETRY_MAX, build_retry_delay};
pub use crate::decide::image::ImageOutcome;
pub use inputs::{InputError, McmInputs};

use crate::cache::Caches;
use crate::config::HubConfig;
use crate::decide::image::held_moved_tag;
use crate::decide::plan::{ImageNeed, Plan};
use crate::metrics::{Metrics, OutcomeLabel};
use crate::registry::{DockerConfig, LookupError, Resolver};
use crate::render::build_job::job_name;
use crate::sign::SignRuntime;

/// What the pipeline uses of the hub: clients, caches and settings, nothing of the reconciler.
#[derive(Clone, Copy)]
pub struct Deps<'a> {
    pub client: &'a kube::Client,
    pub resolver: &'a Resolver,
    /// The build Jobs (read, and updated with the Jobs created).
    pub caches: &'a Caches,
    pub metrics: &'a Metrics,
    pub config: &'a HubConfig,
    pub signing: &'a SignRuntime,
    /// The hub's namespace (Secrets, ConfigMaps).
    pub operator_namespace: &'a str,
}

/// An event for the MCM, to be published by the reconciler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct McmEvent {
    pub type_: EventType,
    pub reason: String,
    pub note: String,
}

impl McmEvent {
    pub fn normal(reason: &str, note: String) -> Self {
        Self {
            type_: EventType::Normal,
            reason: reason.into(),
            note,
        }
    }
    pub fn warning(reason: &str, note: String) -> Self {
        Self {
            type_: EventType::Warning,
            reason: reason.into(),
            note,
        }
    }
}

/// What one run of the pipeline found and did.
#[derive(Debug, Default)]
pub struct Report {
    pub outcomes: BTreeMap<String, ImageOutcome>,
    /// In the order they happened per image, images in the order they finished.
    pub events: Vec<McmEvent>,
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

/// One image's run: the MCM, its inputs and the events it produced.
struct Run<'a> {
    deps: Deps<'a>,
    mcm: &'a ManagedClusterModule,
    inputs: &'a McmInputs,
    creds: &'a DockerConfig,
    events: Vec<McmEvent>,
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
        deps: Deps<'_>,
        mcm: &ManagedClusterModule,
        plan: &Plan,
        inputs: &McmInputs,
        creds: &DockerConfig,
    ) -> Report {
        let live: HashSet<String> = deps
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
            tracing::info!(
                ?trigger,
                "imageRebuildTriggerGeneration changed: re-verifying every image"
            );
            deps.resolver
                .invalidate(plan.images.keys().map(String::as_str));
        }
        let needs: Vec<ImageNeed> = plan.images.values().cloned().collect();
        let done: Vec<(String, ImageOutcome, Vec<McmEvent>)> = futures::stream::iter(needs)
            .map(|need| {
                let span = tracing::info_span!(
                    "image",
                    mcm = %mcm.name_any(),
                    image = %need.image,
                    kernel = %need.build_kernel(),
                );
                async move {
                    let mut run = Run {
                        deps,
                        mcm,
                        inputs,
                        creds,
                        events: Vec::new(),
                    };
                    let outcome = self.resolve_one(&mut run, &need).await;
                    (need.image, outcome, run.events)
                }
                .instrument(span)
            })
            .buffer_unordered(self.lookup_concurrency.max(1))
            .collect()
            .await;
        let mut report = Report::default();
        for (image, outcome, events) in done {
            report.outcomes.insert(image, outcome);
            report.events.extend(events);
        }
        report
    }

    async fn resolve_one(&self, run: &mut Run<'_>, need: &ImageNeed) -> ImageOutcome {
        let deps = run.deps;
        let job = job_name(&run.mcm.name_any(), &need.image);
        let job_built_it = deps
            .caches
            .job(&job)
            .is_some_and(|j| j.succeeded && j.image == need.image);
        // A finished build is news: look again instead of trusting the cache.
        if job_built_it {
            deps.resolver.invalidate([need.image.as_str()]);
        }
        let found = match &need.sign {
            Some(_) => deps
                .resolver
                .annotations(&need.image, need.registry_tls, run.creds)
                .await
                .map(Some),
            None => deps
                .resolver
                .digest(&need.image, need.registry_tls, run.creds)
                .await
                .map(|d| Some((d, BTreeMap::new()))),
        };
        let found = match found {
            Ok(f) => f,
            Err(LookupError::NotFound(_)) => None,
            Err(e) => return ImageOutcome::failed(e.to_string()),
        };
        if let Some((digest, _)) = &found {
            let ours = deps.resolver.produced(&need.image, digest) || job_built_it;
            if let Some(held) = held_moved_tag(run.mcm, need, digest, ours) {
                self.announce_moved_tag(run, need, digest, &held);
                return held;
            }
        }
        match (found, &need.build, &need.sign) {
            (Some((digest, _)), _, None) => {
                self.collect_finished_job(run, &job, need).await;
                ImageOutcome::ready(digest)
            }
            (Some((digest, annotations)), _, Some(_)) => {
                self.collect_finished_job(run, &job, need).await;
                let from_build = need.build.is_some();
                sign::ensure_signed(run, need, &digest, &annotations, from_build).await
            }
            (None, Some(_), _) => self.ensure_built(run, need, &job).await,
            (None, None, Some(sign)) => match &sign.unsigned_image {
                // Sign a prebuilt unsigned image into containerImage.
                Some(_) => sign::ensure_signed(run, need, "", &BTreeMap::new(), false).await,
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

    /// Say once per (image, new digest) that a moved tag is held.
    fn announce_moved_tag(
        &self,
        run: &mut Run<'_>,
        need: &ImageNeed,
        digest: &str,
        held: &ImageOutcome,
    ) {
        let first = self
            .moved_announced
            .lock()
            .map(|mut m| {
                m.entry(run.mcm.name_any())
                    .or_default()
                    .insert(need.image.clone(), digest.to_string())
                    .as_deref()
                    != Some(digest)
            })
            .unwrap_or(false);
        if first {
            let msg = held.reason.clone().unwrap_or_default();
            run.events.push(McmEvent::warning("TagMoved", msg));
        }
    }

    /// Publish the build's success once and clean the Job up after the configured delay.
    async fn collect_finished_job(&self, run: &mut Run<'_>, job: &str, need: &ImageNeed) {
        let deps = run.deps;
        let Some(j) = deps.caches.job(job) else {
            return;
        };
        if !j.succeeded || j.deleting {
            return;
        }
        if self.first_time(&j.uid, "succeeded") {
            deps.metrics
                .builds
                .get_or_create(&OutcomeLabel {
                    outcome: "succeeded",
                })
                .inc();
            let msg = format!(
                "Buildimage job succeeded for kernel {} (image {})",
                need.build_kernel(),
                need.image
            );
            run.events.push(McmEvent::normal(
                crate::reconcile::events::BUILD_SUCCEEDED,
                msg,
            ));
        }
        let old_enough = j.finished_at.is_none_or(|t| {
            Timestamp::now().duration_since(t).unsigned_abs() >= deps.config.job_gc_delay
        });
        if old_enough {
            if let Ok(mut a) = self.attempts.lock() {
                a.remove(job);
            }
            build::delete_job(deps, job).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_keyed_by_job_uid_goes_with_the_jobs_and_the_mcm() {
        let p = ImagePipeline::new(1);
        assert!(p.first_time("uid-1", "failed"));
        assert!(!p.first_time("uid-1", "failed"), "announced once");
        assert!(p.first_time("uid-2", "succeeded"));
        if let Ok(mut f) = p.failures.lock() {
            f.insert("uid-1".into(), "exit code 1".into());
        }
        if let Ok(mut a) = p.attempts.lock() {
            a.insert("m-build-x".into(), ("m".into(), 2));
        }
        assert_eq!(p.sizes(), [2, 1, 1, 0, 0]);
        p.prune_jobs(&["uid-2".to_string()].into());
        assert_eq!(p.sizes(), [1, 0, 1, 0, 0], "uid-1's Job is gone");
        p.forget("m");
        assert_eq!(p.sizes(), [1, 0, 0, 0, 0]);
    }
}
