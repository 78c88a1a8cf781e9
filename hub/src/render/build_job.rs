//! Build Jobs, rendered: one kaniko Job per distinct missing image, in the build namespace
//! (never the hub's own, which holds the signing keys). A build pod mounts only per-Job
//! copies of what it needs ([`dockerfile_copy`], [`registry_copy`], [`secret_copy`]), which
//! `pipeline::build_copies` writes next to the Job. Rendering is pure (`render_build_job`); the
//! pipeline (`pipeline::build`, steps from `decide::build_job`) decides when.
//!
//! kaniko unpacks base images and runs `RUN` steps as root inside its container, so build
//! pods cannot be `runAsNonRoot`; they get what can be taken away instead: no privilege
//! escalation, `RuntimeDefault` seccomp, no `NET_RAW`, no service account token, no service
//! links, requests and limits, a deadline, and none of the Module's (spoke) tolerations.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, KeyToPath, LocalObjectReference as CoreRef,
    PodSecurityContext, PodSpec, PodTemplateSpec, ResourceRequirements, SeccompProfile,
    SecretVolumeSource, SecurityContext, Volume, VolumeMount,
};
use kube::api::ObjectMeta;
use regex::Regex;
use serde::Deserialize;
use shared_api::kernel::{Variables, build_args_for};
use shared_api::labels::{
    BUILD_HASH_ANNOTATION, BUILD_IMAGE_ANNOTATION, IMAGE_HASH_LABEL, MCM_OWNER_LABEL,
    RESOURCE_TYPE_LABEL, TARGET_KERNEL_LABEL, kernel_label_value, short_hash,
};
use shared_api::module::{Build, TlsOptions};

use crate::registry::is_loopback_registry;

pub const DEFAULT_KANIKO_IMAGE: &str = "gcr.io/kaniko-project/executor:latest";
/// Annotation on build Jobs: which attempt this is (1-based), for the retry backoff.
pub const ATTEMPT_ANNOTATION: &str = "kmm.node.kubernetes.io/build-attempt";

/// One row of the Driver Toolkit table: kernels matching `kernel` build from `image`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DtkEntry {
    pub kernel: String,
    pub image: String,
}

/// The Driver Toolkit table, compiled.
#[derive(Debug, Clone, Default)]
pub struct DtkTable(Vec<(Regex, String)>);

impl DtkTable {
    pub fn new(entries: &[DtkEntry]) -> Result<Self, String> {
        entries
            .iter()
            .enumerate()
            .map(|(i, e)| {
                Regex::new(&e.kernel)
                    .map(|r| (r, e.image.clone()))
                    .map_err(|err| format!("driverToolkit[{i}].kernel {:?}: {err}", e.kernel))
            })
            .collect::<Result<_, _>>()
            .map(DtkTable)
    }

    /// The toolkit image for a kernel: the first matching row.
    pub fn image_for(&self, kernel: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(r, _)| r.is_match(kernel))
            .map(|(_, i)| i.as_str())
    }
}

/// Whether a Dockerfile declares `ARG DTK_AUTO` (with or without a default).
pub fn wants_dtk_auto(dockerfile: &str) -> bool {
    dockerfile.lines().any(|l| {
        let mut words = l.split_whitespace();
        words.next().is_some_and(|w| w.eq_ignore_ascii_case("ARG"))
            && words
                .next()
                .is_some_and(|w| w == "DTK_AUTO" || w.starts_with("DTK_AUTO="))
    })
}

/// Replace the tag of the kaniko image, keeping a registry port intact
/// (upstream cut at the first ':' and broke `registry:5000/kaniko`).
pub fn with_tag(image: &str, tag: &str) -> String {
    let name = image.split('@').next().unwrap_or(image);
    let repo = match (name.rfind(':'), name.rfind('/')) {
        (Some(colon), Some(slash)) if colon > slash => &name[..colon],
        (Some(colon), None) => &name[..colon],
        _ => name,
    };
    format!("{repo}:{tag}")
}

/// Everything that defines one build.
#[derive(Debug, Clone)]
pub struct BuildInputs<'a> {
    pub mcm: &'a str,
    pub namespace: &'a str,
    pub image: &'a str,
    pub kernel: &'a str,
    /// The Module's name and namespace on the spokes (MOD_NAME / MOD_NAMESPACE).
    pub mod_name: &'a str,
    pub mod_namespace: &'a str,
    pub build: &'a Build,
    pub dockerfile: &'a str,
    pub registry_tls: TlsOptions,
    /// Whether the MCM has an `imageRepoSecret` (copied as [`registry_copy`]).
    pub registry_secret: bool,
    pub kaniko_image: &'a str,
    pub dtk_image: Option<&'a str>,
    pub attempt: u32,
    pub resources: &'a ResourceRequirements,
    /// `activeDeadlineSeconds` of the Job.
    pub deadline: Duration,
    /// Arguments the hub sets besides the user's and the kernel's (`spec.day0`:
    /// `RHCOS_IMAGE`, `DTK_IMAGE`); they win over the user's.
    pub extra_args: BTreeMap<String, String>,
}

/// The copy of the Dockerfile ConfigMap a build Job mounts (key `dockerfile`).
pub fn dockerfile_copy(job: &str) -> String {
    format!("{job}-dockerfile")
}

/// The copy of the `imageRepoSecret` a build Job pushes and pulls with.
pub fn registry_copy(job: &str) -> String {
    format!("{job}-registry")
}

/// The copy of `build.secrets[i]` a build Job mounts at `/run/secrets/<original name>`.
pub fn secret_copy(job: &str, i: usize) -> String {
    format!("{job}-secret-{i}")
}

/// The Job name: `<mcm>-build-<hash of the image>` (≤ 63 characters by validation).
pub fn job_name(mcm: &str, image: &str) -> String {
    format!("{mcm}-build-{}", short_hash(image, 10))
}

/// A hash of everything that defines the build: a changed Dockerfile or argument starts a new build.
pub fn build_hash(inputs: &BuildInputs<'_>, args: &BTreeMap<String, String>) -> String {
    let material = serde_json::json!({
        "image": inputs.image,
        "dockerfile": inputs.dockerfile,
        "args": args,
        "secrets": inputs.build.secrets,
        "selector": inputs.build.selector,
        "baseTLS": inputs.build.base_image_registry_tls,
        "tls": inputs.registry_tls,
        "kaniko": inputs.kaniko_image,
        "kanikoTag": inputs.build.kaniko_params.as_ref().and_then(|k| k.tag.clone()),
    });
    short_hash(&material.to_string(), 16)
}

pub fn render_build_job(inputs: &BuildInputs<'_>) -> Job {
    let vars = Variables::new(inputs.kernel, inputs.mod_name, inputs.mod_namespace);
    let mut args_map = build_args_for(inputs.build, &vars);
    if let Some(dtk) = inputs.dtk_image {
        args_map.insert("DTK_AUTO".into(), dtk.to_string());
    }
    args_map.extend(inputs.extra_args.clone());
    let hash = build_hash(inputs, &args_map);
    let registry = inputs.image.split('/').next().unwrap_or_default();
    let mut args = vec![
        "--dockerfile=/workspace/Dockerfile".to_string(),
        "--context=dir:///workspace/".to_string(),
        format!("--destination={}", inputs.image),
    ];
    // Registries on loopback speak plain HTTP, as for the hub's own lookups.
    if inputs.registry_tls.insecure
        || (inputs.image.contains('/') && is_loopback_registry(registry))
    {
        args.push("--insecure".into());
    }
    if inputs.registry_tls.insecure_skip_tls_verify {
        args.push("--skip-tls-verify".into());
    }
    let base = inputs.build.base_image_registry_tls.unwrap_or_default();
    if base.insecure {
        args.push("--insecure-pull".into());
    }
    if base.insecure_skip_tls_verify {
        args.push("--skip-tls-verify-pull".into());
    }
    args.extend(args_map.iter().map(|(k, v)| format!("--build-arg={k}={v}")));

    let job = job_name(inputs.mcm, inputs.image);
    let cm = dockerfile_copy(&job);
    let pull_secret = inputs.registry_secret.then(|| registry_copy(&job));
    let mut volumes = vec![Volume {
        name: "dockerfile".into(),
        config_map: Some(ConfigMapVolumeSource {
            name: cm,
            items: Some(vec![KeyToPath {
                key: "dockerfile".into(),
                path: "Dockerfile".into(),
                mode: None,
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }];
    let mut mounts = vec![VolumeMount {
        name: "dockerfile".into(),
        mount_path: "/workspace".into(),
        read_only: Some(true),
        ..Default::default()
    }];
    if let Some(secret) = &pull_secret {
        volumes.push(Volume {
            name: "docker-config".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret.clone()),
                items: Some(vec![KeyToPath {
                    key: ".dockerconfigjson".into(),
                    path: "config.json".into(),
                    mode: None,
                }]),
                ..Default::default()
            }),
            ..Default::default()
        });
        mounts.push(VolumeMount {
            name: "docker-config".into(),
            mount_path: "/kaniko/.docker".into(),
            read_only: Some(true),
            ..Default::default()
        });
    }
    for (i, s) in inputs.build.secrets.iter().enumerate() {
        let name = format!("build-secret-{i}");
        volumes.push(Volume {
            name: name.clone(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret_copy(&job, i)),
                ..Default::default()
            }),
            ..Default::default()
        });
        mounts.push(VolumeMount {
            name,
            mount_path: format!("/run/secrets/{}", s.name),
            read_only: Some(true),
            ..Default::default()
        });
    }
    let kaniko = match inputs
        .build
        .kaniko_params
        .as_ref()
        .and_then(|k| k.tag.as_deref())
    {
        Some(tag) => with_tag(inputs.kaniko_image, tag),
        None => inputs.kaniko_image.to_string(),
    };
    let labels = BTreeMap::from([
        (MCM_OWNER_LABEL.to_string(), inputs.mcm.to_string()),
        (
            TARGET_KERNEL_LABEL.to_string(),
            kernel_label_value(inputs.kernel),
        ),
        (RESOURCE_TYPE_LABEL.to_string(), "BuildImage".to_string()),
        (IMAGE_HASH_LABEL.to_string(), short_hash(inputs.image, 10)),
        (
            "app.kubernetes.io/name".to_string(),
            "kmm-fleet".to_string(),
        ),
        (
            "app.kubernetes.io/component".to_string(),
            "build".to_string(),
        ),
    ]);
    Job {
        metadata: ObjectMeta {
            name: Some(job.clone()),
            namespace: Some(inputs.namespace.to_string()),
            labels: Some(labels.clone()),
            annotations: Some(BTreeMap::from([
                (BUILD_HASH_ANNOTATION.to_string(), hash),
                (BUILD_IMAGE_ANNOTATION.to_string(), inputs.image.to_string()),
                (ATTEMPT_ANNOTATION.to_string(), inputs.attempt.to_string()),
            ])),
            ..Default::default()
        },
        spec: Some(JobSpec {
            // Retries are ours, with a capped backoff; the Job runs once.
            backoff_limit: Some(0),
            active_deadline_seconds: Some(inputs.deadline.as_secs().max(1) as i64),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    restart_policy: Some("Never".into()),
                    containers: vec![Container {
                        name: "kaniko".into(),
                        image: Some(kaniko),
                        args: Some(args),
                        volume_mounts: Some(mounts),
                        resources: Some(inputs.resources.clone()),
                        security_context: Some(SecurityContext {
                            // kaniko needs root (see the module comment); nothing more.
                            allow_privilege_escalation: Some(false),
                            privileged: Some(false),
                            capabilities: Some(Capabilities {
                                drop: Some(vec!["NET_RAW".into()]),
                                add: None,
                            }),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }],
                    volumes: Some(volumes),
                    node_selector: (!inputs.build.selector.is_empty())
                        .then(|| inputs.build.selector.clone()),
                    // The Module's tolerations are for spoke nodes: not copied to hub builds.
                    tolerations: None,
                    automount_service_account_token: Some(false),
                    enable_service_links: Some(false),
                    security_context: Some(PodSecurityContext {
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            localhost_profile: None,
                        }),
                        ..Default::default()
                    }),
                    image_pull_secrets: pull_secret.map(|name| vec![CoreRef { name }]),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        status: None,
    }
}

#[cfg(test)]
#[path = "build_job_tests.rs"]
mod tests;
