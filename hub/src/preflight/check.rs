//! Gathering what a preflight verdict needs for one MCM and kernel: the pull secret, the
//! image (and the unsigned image) in the registry, the build's Dockerfile, secrets and Driver
//! Toolkit, the signing key — from the hub's caches and registry client in the controller, or
//! from files and a digest list in `kmm-hub preflight`. The decisions are
//! `decide::preflight`'s.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use shared_api::ManagedClusterModule;
use shared_api::module::TlsOptions;

use crate::decide::plan::ImageNeed;
use crate::decide::preflight::{BuildCheck, Checks, Found, dtk_check, plan_of};
use crate::pipeline::build_copies;
use crate::pipeline::inputs::{self, InputError, McmInputs};
use crate::registry::{DockerConfig, LookupError};
use crate::render::build_job::wants_dtk_auto;

/// Where the facts come from.
pub trait Sources: Sync {
    /// The hub's namespace (Secrets, ConfigMaps).
    fn namespace(&self) -> &str;
    /// Whether the hub's Secrets and ConfigMaps are known (offline they may not be given).
    fn inputs_known(&self) -> bool;
    /// A Secret of the hub's namespace.
    fn secret(&self, name: &str) -> Option<Arc<Secret>>;
    /// The Dockerfile of a ConfigMap of the hub's namespace.
    fn dockerfile<'a>(
        &'a self,
        inputs: &'a McmInputs,
        name: &'a str,
    ) -> impl Future<Output = Result<String, InputError>> + Send + 'a;
    /// The digest of an image, and its annotations when asked for (signed images).
    fn lookup<'a>(
        &'a self,
        image: &'a str,
        tls: TlsOptions,
        creds: &'a DockerConfig,
        annotations: bool,
    ) -> impl Future<Output = Result<(String, BTreeMap<String, String>), LookupError>> + Send + 'a;
    /// Whether annotations from [`Sources::lookup`] are real (a digest list has none).
    fn knows_annotations(&self) -> bool;
    /// The Driver Toolkit image for `DTK_AUTO` and a kernel.
    fn dtk(&self, kernel: &str) -> Option<String>;
}

fn found(
    r: Result<(String, BTreeMap<String, String>), LookupError>,
) -> (Found, BTreeMap<String, String>) {
    match r {
        Ok((_, a)) => (Found::Exists { signed: None }, a),
        Err(LookupError::NotFound(_)) => (Found::Missing, BTreeMap::new()),
        Err(e @ LookupError::Unavailable { .. }) => {
            (Found::Unreachable(e.to_string()), BTreeMap::new())
        }
        Err(e) => (Found::Refused(e.to_string()), BTreeMap::new()),
    }
}

/// Everything the verdict needs, and the inputs and credentials read (for a build ahead).
pub struct Gathered {
    pub checks: Checks,
    pub inputs: McmInputs,
    pub creds: Option<DockerConfig>,
}

/// Look everything up for one image an MCM would ship.
pub async fn gather(src: &impl Sources, mcm: &ManagedClusterModule, need: &ImageNeed) -> Gathered {
    let ns = src.namespace();
    let secret = |n: &str| src.secret(n);
    let plan = plan_of(need);
    let inputs = McmInputs::read(mcm, &plan, ns, secret);
    let creds = if src.inputs_known() {
        inputs::docker_config(mcm, ns, secret)
    } else {
        Ok(DockerConfig::default())
    };
    let creds = match creds {
        Ok(c) => c,
        Err(e) => {
            return Gathered {
                checks: Checks {
                    pull_secret: Err(e.to_string()),
                    image: Found::Missing,
                    build: BuildCheck::NotChecked,
                    signer: None,
                    unsigned: None,
                },
                inputs,
                creds: None,
            };
        }
    };
    let signer = match &need.sign {
        Some(s) if src.inputs_known() => {
            Some(inputs.signer(s).map(|_| ()).map_err(|e| e.to_string()))
        }
        _ => None,
    };
    let (mut image, annotations) = found(
        src.lookup(&need.image, need.registry_tls, &creds, need.sign.is_some())
            .await,
    );
    if let (Found::Exists { signed }, Some(s), true) =
        (&mut image, &need.sign, src.knows_annotations())
        && let Ok(signer) = inputs.signer(s)
    {
        *signed = Some(crate::sign::image::is_signed_with(
            &annotations,
            signer.cert(),
        ));
    }
    let mut checks = Checks {
        pull_secret: Ok(()),
        image,
        build: BuildCheck::NotChecked,
        signer,
        unsigned: None,
    };
    if checks.image != Found::Missing {
        return Gathered {
            checks,
            inputs,
            creds: Some(creds),
        };
    }
    if let Some(build) = &need.build
        && src.inputs_known()
    {
        checks.build = build_check(src, mcm, need, build, &inputs).await;
    }
    if need.build.is_none()
        && let Some(unsigned) = need.sign.as_ref().and_then(|s| {
            s.unsigned_image.as_ref().map(|u| {
                (
                    u,
                    s.unsigned_image_registry_tls.unwrap_or(need.registry_tls),
                )
            })
        })
    {
        checks.unsigned = Some(found(src.lookup(unsigned.0, unsigned.1, &creds, false).await).0);
    }
    Gathered {
        checks,
        inputs,
        creds: Some(creds),
    }
}

/// What a build Job for the image would read: the Dockerfile, the copies of its secrets
/// (the same check the pipeline makes before creating a Job), the Driver Toolkit image.
async fn build_check(
    src: &impl Sources,
    mcm: &ManagedClusterModule,
    need: &ImageNeed,
    build: &shared_api::module::Build,
    inputs: &McmInputs,
) -> BuildCheck {
    let cm = build
        .dockerfile_config_map
        .as_ref()
        .map(|c| c.name.as_str())
        .unwrap_or_default();
    let dockerfile = match src.dockerfile(inputs, cm).await {
        Ok(d) => d,
        Err(e @ (InputError::ConfigMapMissing { .. } | InputError::ConfigMapNoKey { .. })) => {
            return BuildCheck::Missing("DockerfileMissing", e.to_string());
        }
        Err(e) => return BuildCheck::Unknown(e.to_string()),
    };
    let copies = build_copies::read(
        |n| inputs.secret(n),
        src.namespace(),
        &mcm.name_any(),
        &dockerfile,
        mcm.spec
            .module_spec
            .image_repo_secret
            .as_ref()
            .map(|s| s.name.as_str()),
        &build.secrets,
    );
    if let Err(e) = copies {
        return BuildCheck::Missing("BuildSecretMissing", e.to_string());
    }
    let kernel = need.build_kernel();
    dtk_check(
        wants_dtk_auto(&dockerfile),
        kernel,
        src.dtk(kernel).as_deref(),
    )
}
