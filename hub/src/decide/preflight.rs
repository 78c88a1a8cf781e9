//! Fleet preflight, as pure functions: what one MCM would need for one kernel (the same plan
//! code as the reconciler, on a cluster that runs only that kernel), and the verdict from
//! what the registry and the hub's namespace said. The controller and `kmm-hub preflight`
//! gather those facts their own way and share these decisions.

use std::collections::{BTreeMap, BTreeSet};

use shared_api::ManagedClusterModule;
use shared_api::preflight::{
    FleetPreflightValidationStatus, PreflightResult, RESULTS_LIMIT, VerificationStage,
    VerificationStatus,
};

use super::plan::{ClusterFacts, ImageNeed, Plan, plan, selects};

/// What an MCM needs for one kernel.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// No `moduleLoader`: nothing depends on the kernel.
    NoLoader,
    /// No kernel mapping matches the kernel.
    NoMapping,
    /// The mapping cannot be resolved (substitution, a regexp that does not compile).
    Invalid(String),
    /// The image the MCM would ship for this kernel, with its build and sign sections.
    Image(Box<ImageNeed>),
}

/// The cluster the plan is asked about: the MCM's own selector as its labels (so it is
/// selected), the kernel as its only claimed kernel, no Kubernetes version (not held back).
fn probe(mcm: &ManagedClusterModule, kernel: &str) -> ClusterFacts {
    ClusterFacts {
        name: "preflight".into(),
        labels: mcm.spec.selector.clone(),
        kernels: Some(vec![kernel.to_string()]),
        available: true,
        ..Default::default()
    }
}

/// The image `mcm` would want for `kernel`: exactly what its reconcile computes for a cluster
/// running that kernel, so an image built ahead is the one the upgrade looks for.
pub fn target(mcm: &ManagedClusterModule, kernel: &str) -> Target {
    let probe = probe(mcm, kernel);
    let p = match plan(mcm, [&probe]) {
        Ok(p) => p,
        Err(e) => return Target::Invalid(e.to_string()),
    };
    if !p.has_loader {
        return Target::NoLoader;
    }
    if let Some(problem) = p.clusters.first().and_then(|c| c.problem.as_ref())
        && problem.reason == "MappingError"
    {
        return Target::Invalid(problem.message.clone());
    }
    match p.images.into_values().next() {
        Some(need) => Target::Image(Box::new(need)),
        None => Target::NoMapping,
    }
}

/// A one-image plan for the image pipeline (build ahead).
pub fn plan_of(need: &ImageNeed) -> Plan {
    Plan {
        clusters: Vec::new(),
        images: BTreeMap::from([(need.image.clone(), need.clone())]),
        has_loader: true,
    }
}

/// Whether the preflight looks at this MCM: with a cluster selector, only MCMs that select at
/// least one cluster carrying those labels (the clusters about to get the kernel).
pub fn in_scope<'a>(
    mcm: &ManagedClusterModule,
    cluster_selector: Option<&BTreeMap<String, String>>,
    clusters: impl IntoIterator<Item = &'a ClusterFacts>,
) -> bool {
    match cluster_selector.filter(|s| !s.is_empty()) {
        None => true,
        Some(sel) => clusters
            .into_iter()
            .any(|c| selects(sel, &c.labels) && selects(&mcm.spec.selector, &c.labels)),
    }
}

/// What the registry said about an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// It exists; for an image that must be signed, whether the current certificate signed
    /// it (`None`: not known, e.g. offline from a digest list).
    Exists {
        signed: Option<bool>,
    },
    Missing,
    /// The registry did not answer: not known yet.
    Unreachable(String),
    /// The registry refused the credentials, or the reference is not one.
    Refused(String),
}

/// What a build of the image would have: its Dockerfile and inputs, and a Driver Toolkit
/// image when the Dockerfile asks for `DTK_AUTO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuildCheck {
    /// Not looked at (offline without the hub's ConfigMaps and Secrets).
    NotChecked,
    Ready,
    /// What is missing: a reason and a message that names it.
    Missing(&'static str, String),
    /// Could not be read now (the API server did not answer): not known yet.
    Unknown(String),
}

/// Everything looked up for one MCM and kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checks {
    /// The MCM's `imageRepoSecret`: readable, or why not.
    pub pull_secret: Result<(), String>,
    pub image: Found,
    /// For a missing image with a `build` section.
    pub build: BuildCheck,
    /// For a `sign` section: the key and certificate (`None`: not checked, offline).
    pub signer: Option<Result<(), String>>,
    /// For a missing image signed from `sign.unsignedImage` without a build.
    pub unsigned: Option<Found>,
}

/// One MCM × kernel verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub status: VerificationStatus,
    pub stage: VerificationStage,
    pub reason: &'static str,
    pub message: String,
    pub image: Option<String>,
}

impl Verdict {
    pub fn new(
        status: VerificationStatus,
        stage: VerificationStage,
        reason: &'static str,
        message: String,
        image: Option<String>,
    ) -> Self {
        Self {
            status,
            stage,
            reason,
            message,
            image,
        }
    }
    fn done(status: VerificationStatus, reason: &'static str, message: String) -> Self {
        Self::new(status, VerificationStage::Done, reason, message, None)
    }
    pub fn is_success(&self) -> bool {
        self.status == VerificationStatus::Success
    }
}

/// The verdict for a target without an image (or with an invalid mapping).
pub fn verdict_without_image(target: &Target, kernel: &str) -> Option<Verdict> {
    use VerificationStatus::*;
    match target {
        Target::NoLoader => Some(Verdict::done(
            Success,
            "NoKernelModule",
            "the MCM loads no kernel module (no moduleLoader): nothing depends on the kernel"
                .into(),
        )),
        Target::NoMapping => Some(Verdict::done(
            Failure,
            "NoMapping",
            format!(
                "no kernel mapping matches {kernel}: nodes upgraded to it would lose the module; add a mapping (literal or regexp) for it"
            ),
        )),
        Target::Invalid(e) => Some(Verdict::done(
            Failure,
            "MappingError",
            format!("kernel {kernel}: {e}"),
        )),
        Target::Image(_) => None,
    }
}

/// The verdict for an image the MCM would ship.
pub fn verdict(need: &ImageNeed, c: &Checks) -> Verdict {
    use VerificationStatus::*;
    let kernel = need.build_kernel();
    let image = &need.image;
    let at = |status, stage, reason, message: String| {
        Verdict::new(status, stage, reason, message, Some(image.clone()))
    };
    let done = |status, reason, message| at(status, VerificationStage::Done, reason, message);
    if let Err(e) = &c.pull_secret {
        return done(
            Failure,
            "PullSecretMissing",
            format!(
                "{e}: the hub cannot look up or push {image}; create it in the hub's namespace"
            ),
        );
    }
    let signer_problem = match (&need.sign, &c.signer) {
        (Some(_), Some(Err(e))) => Some(e.clone()),
        _ => None,
    };
    let sign_failure = |e: String| {
        done(
            Failure,
            "SigningKeyMissing",
            format!(
                "{e}: {image} must be signed for kernel {kernel}; create the key and certificate Secrets in the hub's namespace"
            ),
        )
    };
    match &c.image {
        Found::Unreachable(e) => {
            return at(
                InProgress,
                VerificationStage::Image,
                "RegistryUnavailable",
                format!("{e}; asking again"),
            );
        }
        Found::Refused(e) => {
            return done(
                Failure,
                "RegistryUnauthorized",
                format!("{e}: check spec.moduleSpec.imageRepoSecret and the image reference"),
            );
        }
        Found::Exists { signed } => {
            return match (&need.sign, signed, signer_problem) {
                (None, _, _) | (Some(_), Some(true), None) => done(
                    Success,
                    "ImageExists",
                    format!("{image} exists for kernel {kernel}"),
                ),
                (Some(_), _, Some(e)) => sign_failure(e),
                (Some(_), None, None) => done(
                    Success,
                    "ImageExists",
                    format!(
                        "{image} exists for kernel {kernel} (its signature is checked when it ships)"
                    ),
                ),
                (Some(_), Some(false), None) => done(
                    Success,
                    "WouldSign",
                    format!(
                        "{image} exists but is not signed with the current certificate: the hub will sign it"
                    ),
                ),
            };
        }
        Found::Missing => {}
    }
    // Missing: can the hub make it?
    match (&need.build, &need.sign) {
        (Some(_), sign) => {
            if let BuildCheck::Unknown(e) = &c.build {
                return at(
                    InProgress,
                    VerificationStage::Image,
                    "Checking",
                    format!("{e}; looking again"),
                );
            }
            if let BuildCheck::Missing(reason, message) = &c.build {
                return done(
                    Failure,
                    *reason,
                    format!(
                        "{image} does not exist and cannot be built for kernel {kernel}: {message}"
                    ),
                );
            }
            if let Some(e) = signer_problem {
                return sign_failure(e);
            }
            let unchecked = if c.build == BuildCheck::NotChecked {
                " (its Dockerfile and secrets were not checked: pass the hub's ConfigMaps and Secrets)"
            } else {
                ""
            };
            let (reason, what) = match sign {
                Some(_) => ("WouldBuildAndSign", "build and sign"),
                None => ("WouldBuild", "build"),
            };
            done(
                Success,
                reason,
                format!(
                    "{image} does not exist yet; the hub will {what} it for kernel {kernel}{unchecked}"
                ),
            )
        }
        (None, Some(sign)) => {
            let Some(unsigned) = &sign.unsigned_image else {
                return done(
                    Failure,
                    "ImageMissing",
                    format!(
                        "{image} does not exist and the mapping has no build and no sign.unsignedImage"
                    ),
                );
            };
            if let Some(e) = signer_problem {
                return sign_failure(e);
            }
            match &c.unsigned {
                Some(Found::Missing) => done(
                    Failure,
                    "UnsignedImageMissing",
                    format!(
                        "{image} does not exist and neither does sign.unsignedImage {unsigned}; push the unsigned image for kernel {kernel}"
                    ),
                ),
                Some(Found::Unreachable(e)) => at(
                    InProgress,
                    VerificationStage::Image,
                    "RegistryUnavailable",
                    format!("{e}; asking again"),
                ),
                Some(Found::Refused(e)) => done(Failure, "RegistryUnauthorized", e.clone()),
                Some(Found::Exists { .. }) | None => done(
                    Success,
                    "WouldSign",
                    format!("{image} does not exist yet; the hub will sign {unsigned} into it"),
                ),
            }
        }
        (None, None) => done(
            Failure,
            "ImageMissing",
            format!(
                "{image} does not exist in its registry and the mapping has no build section: push it before nodes move to kernel {kernel}"
            ),
        ),
    }
}

/// The Driver Toolkit check of a Dockerfile: `DTK_AUTO` needs an image for the kernel.
pub fn dtk_check(wants_dtk: bool, kernel: &str, dtk: Option<&str>) -> BuildCheck {
    match (wants_dtk, dtk) {
        (true, None) => BuildCheck::Missing(
            "DriverToolkitMissing",
            format!(
                "the Dockerfile declares DTK_AUTO but no Driver Toolkit image is known for kernel {kernel}: no OpenShift spoke running it publishes one (kernel-dtk-images claim) and the hub configuration has no driverToolkit row for it"
            ),
        ),
        _ => BuildCheck::Ready,
    }
}

/// The status of a preflight from its verdicts, keeping `lastTransitionTime` of results whose
/// verification status did not change.
pub fn status(
    old: Option<&FleetPreflightValidationStatus>,
    verdicts: &[(String, String, Verdict)],
    mcms: usize,
    generation: Option<i64>,
    now: k8s_openapi::jiff::Timestamp,
) -> FleetPreflightValidationStatus {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    let before: BTreeMap<(&str, &str), &PreflightResult> = old
        .map(|s| {
            s.results
                .iter()
                .map(|r| ((r.mcm.as_str(), r.kernel.as_str()), r))
                .collect()
        })
        .unwrap_or_default();
    let mut results: Vec<PreflightResult> = verdicts
        .iter()
        .map(|(mcm, kernel, v)| {
            let since = before
                .get(&(mcm.as_str(), kernel.as_str()))
                .filter(|r| r.verification_status == v.status)
                .and_then(|r| r.last_transition_time.clone())
                .unwrap_or(Time(now));
            PreflightResult {
                mcm: mcm.clone(),
                kernel: kernel.clone(),
                verification_status: v.status,
                verification_stage: v.stage,
                reason: v.reason.to_string(),
                message: v.message.clone(),
                image: v.image.clone(),
                last_transition_time: Some(since),
            }
        })
        .collect();
    let count = |s| {
        results
            .iter()
            .filter(|r| r.verification_status == s)
            .count() as i32
    };
    let (success, failure, in_progress) = (
        count(VerificationStatus::Success),
        count(VerificationStatus::Failure),
        count(VerificationStatus::InProgress),
    );
    // Failures first, then what is still open, then successes.
    results.sort_by(|a, b| {
        (a.verification_status, &a.mcm, &a.kernel).cmp(&(b.verification_status, &b.mcm, &b.kernel))
    });
    let omitted = results.len().saturating_sub(RESULTS_LIMIT) as i32;
    results.truncate(RESULTS_LIMIT);
    let mut conditions = old.map(|s| s.conditions.clone()).unwrap_or_default();
    let (ready, reason, message) = if failure > 0 {
        let names: BTreeSet<&str> = results
            .iter()
            .filter(|r| r.verification_status == VerificationStatus::Failure)
            .map(|r| r.mcm.as_str())
            .collect();
        let names: Vec<&str> = names.into_iter().take(5).collect();
        (
            false,
            "Failed",
            format!(
                "{failure} check(s) failed ({}{}); see status.results",
                names.join(", "),
                if failure as usize > names.len() {
                    ", …"
                } else {
                    ""
                }
            ),
        )
    } else if in_progress > 0 {
        (
            false,
            "InProgress",
            format!("{in_progress} check(s) still in progress"),
        )
    } else {
        (
            true,
            "Verified",
            format!("all {mcms} ManagedClusterModule(s) would work on every kernel listed"),
        )
    };
    shared_api::conditions::set_condition(
        &mut conditions,
        shared_api::conditions::READY,
        ready,
        reason,
        &message,
        generation,
        now,
    );
    FleetPreflightValidationStatus {
        mcms: mcms as i32,
        success,
        failure,
        in_progress,
        conditions,
        results,
        results_omitted: omitted,
        observed_generation: generation,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::plan::tests::{cluster, mcm};

    const K: &str = "5.14.0-570.el9.x86_64";

    const BUILT: &str = r#"
spokeNamespace: spoke-ns
selector: {wants: "yes"}
moduleSpec:
  selector: {}
  moduleLoader:
    container:
      modprobe: {moduleName: m}
      kernelMappings:
        - regexp: '^5\.14.*$'
          containerImage: reg/x/$MOD_NAMESPACE:${KERNEL_FULL_VERSION}
          build: {dockerfileConfigMap: {name: df}}
"#;

    fn need_of(spec: &str, kernel: &str) -> ImageNeed {
        match target(&mcm(spec), kernel) {
            Target::Image(n) => *n,
            other => panic!("{other:?}"),
        }
    }

    fn checks(image: Found) -> Checks {
        Checks {
            pull_secret: Ok(()),
            image,
            build: BuildCheck::Ready,
            signer: Some(Ok(())),
            unsigned: None,
        }
    }

    /// The target is the reconciler's plan for a cluster on that kernel: same image, same
    /// build section, the spoke namespace substituted.
    #[test]
    fn the_target_is_what_the_reconciler_would_want() {
        let m = mcm(BUILT);
        let need = need_of(BUILT, K);
        let fleet = crate::decide::plan::plan(&m, [&cluster("c", &[("wants", "yes")], Some(&[K]))])
            .unwrap();
        assert_eq!(fleet.images.values().next(), Some(&need));
        assert_eq!(need.image, format!("reg/x/spoke-ns:{K}"));
        assert_eq!(need.build_kernel(), K);
        assert_eq!(plan_of(&need).images.len(), 1);
        assert_eq!(target(&m, "6.1.0-13-amd64"), Target::NoMapping);
        let dp = mcm(
            "spokeNamespace: ns\nselector: {}\nmoduleSpec:\n  selector: {}\n  devicePlugin:\n    container: {image: 'r/dp:1'}\n",
        );
        assert_eq!(target(&dp, K), Target::NoLoader);
        let v = verdict_without_image(&Target::NoMapping, "6.1.0-13-amd64").unwrap();
        assert_eq!(
            (v.status, v.reason),
            (VerificationStatus::Failure, "NoMapping")
        );
        assert!(v.message.contains("6.1.0-13-amd64"));
    }

    #[test]
    fn a_substitution_error_is_a_mapping_error() {
        let bad = BUILT.replace("${KERNEL_FULL_VERSION}", "${KERNEL_X}");
        match target(&mcm(&bad), "5.14") {
            Target::Invalid(e) => assert!(e.contains("KERNEL_X"), "{e}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn existing_missing_buildable_and_unbuildable() {
        let need = need_of(BUILT, K);
        let v = verdict(&need, &checks(Found::Exists { signed: None }));
        assert_eq!(
            (v.status, v.reason),
            (VerificationStatus::Success, "ImageExists")
        );
        let v = verdict(&need, &checks(Found::Missing));
        assert_eq!(
            (v.status, v.reason),
            (VerificationStatus::Success, "WouldBuild")
        );
        let mut c = checks(Found::Missing);
        c.build = BuildCheck::Missing(
            "DockerfileMissing",
            "Dockerfile ConfigMap kmm-hub/df does not exist".into(),
        );
        let v = verdict(&need, &c);
        assert_eq!(
            (v.status, v.stage, v.reason),
            (
                VerificationStatus::Failure,
                VerificationStage::Done,
                "DockerfileMissing"
            )
        );
        assert!(v.message.contains("kmm-hub/df"), "{}", v.message);
        c.build = dtk_check(true, K, None);
        let v = verdict(&need, &c);
        assert_eq!(v.reason, "DriverToolkitMissing");
        c.build = BuildCheck::NotChecked;
        let v = verdict(&need, &c);
        assert_eq!(v.reason, "WouldBuild");
        assert!(v.message.contains("not checked"), "{}", v.message);
        // No build section: a missing image is a failure.
        let prebuilt = BUILT.replace("          build: {dockerfileConfigMap: {name: df}}\n", "");
        let v = verdict(&need_of(&prebuilt, K), &checks(Found::Missing));
        assert_eq!(
            (v.status, v.reason),
            (VerificationStatus::Failure, "ImageMissing")
        );
    }

    #[test]
    fn registry_and_credentials() {
        let need = need_of(BUILT, K);
        let v = verdict(
            &need,
            &checks(Found::Unreachable("connection refused".into())),
        );
        assert_eq!(
            (v.status, v.reason),
            (VerificationStatus::InProgress, "RegistryUnavailable")
        );
        let v = verdict(&need, &checks(Found::Refused("denied".into())));
        assert_eq!(v.reason, "RegistryUnauthorized");
        let mut c = checks(Found::Missing);
        c.pull_secret = Err("pull secret kmm-hub/p does not exist".into());
        assert_eq!(verdict(&need, &c).reason, "PullSecretMissing");
    }

    #[test]
    fn signing() {
        let signed = BUILT.replace(
            "          build: {dockerfileConfigMap: {name: df}}\n",
            "          build: {dockerfileConfigMap: {name: df}}\n          sign: {keySecret: {name: k}, certSecret: {name: c}, filesToSign: [/opt/m.ko]}\n",
        );
        let need = need_of(&signed, K);
        assert_eq!(
            verdict(&need, &checks(Found::Missing)).reason,
            "WouldBuildAndSign"
        );
        let v = verdict(
            &need,
            &checks(Found::Exists {
                signed: Some(false),
            }),
        );
        assert_eq!(
            (v.status, v.reason),
            (VerificationStatus::Success, "WouldSign")
        );
        let v = verdict(&need, &checks(Found::Exists { signed: Some(true) }));
        assert_eq!(v.reason, "ImageExists");
        let mut c = checks(Found::Missing);
        c.signer = Some(Err("signing secret kmm-hub/k does not exist".into()));
        let v = verdict(&need, &c);
        assert_eq!(
            (v.status, v.reason),
            (VerificationStatus::Failure, "SigningKeyMissing")
        );
        // Sign a vendor's unsigned image: it must exist.
        let vendor = signed
            .replace("          build: {dockerfileConfigMap: {name: df}}\n", "")
            .replace(
                "sign: {",
                "sign: {unsignedImage: 'reg/u:${KERNEL_FULL_VERSION}', ",
            );
        let need = need_of(&vendor, K);
        let mut c = checks(Found::Missing);
        c.unsigned = Some(Found::Missing);
        let v = verdict(&need, &c);
        assert_eq!(v.reason, "UnsignedImageMissing");
        assert!(v.message.contains(&format!("reg/u:{K}")), "{}", v.message);
        c.unsigned = Some(Found::Exists { signed: None });
        assert_eq!(verdict(&need, &c).reason, "WouldSign");
    }

    #[test]
    fn scope_by_cluster_selector() {
        let m = mcm(BUILT);
        let cs = [
            cluster("a", &[("wants", "yes"), ("ring", "canary")], None),
            cluster("b", &[("wants", "no"), ("ring", "main")], None),
        ];
        assert!(in_scope(&m, None, &cs));
        assert!(in_scope(&m, Some(&BTreeMap::new()), &cs));
        let canary = BTreeMap::from([("ring".to_string(), "canary".to_string())]);
        let main = BTreeMap::from([("ring".to_string(), "main".to_string())]);
        assert!(in_scope(&m, Some(&canary), &cs));
        assert!(
            !in_scope(&m, Some(&main), &cs),
            "b is not selected by the MCM"
        );
    }

    #[test]
    fn status_counts_orders_and_keeps_transition_times() {
        let t0 = k8s_openapi::jiff::Timestamp::from_second(1_000).unwrap();
        let t1 = k8s_openapi::jiff::Timestamp::from_second(2_000).unwrap();
        let ok = Verdict::done(VerificationStatus::Success, "ImageExists", "x".into());
        let bad = Verdict::done(VerificationStatus::Failure, "NoMapping", "y".into());
        let vs = vec![
            ("a".to_string(), K.to_string(), ok.clone()),
            ("b".to_string(), K.to_string(), bad.clone()),
        ];
        let s = status(None, &vs, 2, Some(1), t0);
        assert_eq!((s.success, s.failure, s.in_progress), (1, 1, 0));
        assert_eq!(s.results[0].mcm, "b", "failures first");
        assert_eq!(s.conditions[0].status, "False");
        assert!(s.conditions[0].message.contains('b'), "{:?}", s.conditions);
        // b fixed later: its time moves, a's stays.
        let vs = vec![
            ("a".to_string(), K.to_string(), ok.clone()),
            ("b".to_string(), K.to_string(), ok),
        ];
        let s2 = status(Some(&s), &vs, 2, Some(1), t1);
        let time = |s: &FleetPreflightValidationStatus, m: &str| {
            s.results
                .iter()
                .find(|r| r.mcm == m)
                .and_then(|r| r.last_transition_time.clone())
                .map(|t| t.0)
        };
        assert_eq!(time(&s2, "a"), Some(t0));
        assert_eq!(time(&s2, "b"), Some(t1));
        assert_eq!(s2.conditions[0].status, "True");
        assert_eq!(s2.conditions[0].reason, "Verified");
    }
}
