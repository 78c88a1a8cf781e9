//! What a build Job may see: per-Job copies, in the build namespace, of the Dockerfile, the
//! MCM's registry credentials and its `build.secrets` — read by the hub in its own namespace
//! and owned by the Job, so Kubernetes deletes them with it. Signing keys are never copied:
//! a build pod cannot mount a Secret of another namespace, and the build namespace holds
//! nothing but these copies.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, ObjectMeta, Patch, PatchParams};
use kube::{Client, ResourceExt};
use shared_api::labels::MCM_OWNER_LABEL;
use shared_api::module::LocalObjectReference;

use crate::render::build_job::{dockerfile_copy, registry_copy, secret_copy};

const MANAGER: &str = "kmm-hub";

/// Why a build's input copies could not be made. Messages name objects, never content.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("secret {namespace}/{name} ({field}) does not exist")]
    Missing {
        namespace: String,
        name: String,
        field: &'static str,
    },
    #[error("build Job {0} has no uid")]
    NoUid(String),
    #[error("cannot write ConfigMap {namespace}/{name}: {source}")]
    WriteConfigMap {
        namespace: String,
        name: String,
        source: Box<kube::Error>,
    },
    #[error("cannot write secret {namespace}/{name} (copy of {original}): {source}")]
    WriteSecret {
        namespace: String,
        name: String,
        original: String,
        source: Box<kube::Error>,
    },
}

impl kmm_runtime::ErrorCategory for CopyError {
    /// A short static category for metrics and logs.
    fn category(&self) -> &'static str {
        match self {
            CopyError::Missing { .. } => "build_input_missing",
            CopyError::NoUid(_) => "build_job_invalid",
            CopyError::WriteConfigMap { .. } | CopyError::WriteSecret { .. } => "kube_api",
        }
    }
}

/// The originals a build needs, read from the hub's namespace before its Job is created
/// (a missing one stops the build before anything is written).
pub struct Inputs {
    mcm: String,
    dockerfile: String,
    /// The registry secret first, then the build secrets, each with its original.
    secrets: Vec<(Copy, Secret)>,
}

#[derive(Debug, Clone, Copy)]
enum Copy {
    Registry,
    Build(usize),
}

/// Read the originals (through `lookup`: the hub's watch-fed cache of its namespace `from`).
/// Errors name objects, never their content.
pub fn read(
    lookup: impl Fn(&str) -> Option<std::sync::Arc<Secret>>,
    from: &str,
    mcm: &str,
    dockerfile: &str,
    registry_secret: Option<&str>,
    build_secrets: &[LocalObjectReference],
) -> Result<Inputs, CopyError> {
    let mut wanted: Vec<(Copy, &str, &str)> = Vec::new();
    if let Some(s) = registry_secret {
        wanted.push((Copy::Registry, s, "spec.moduleSpec.imageRepoSecret"));
    }
    for (i, s) in build_secrets.iter().enumerate() {
        wanted.push((Copy::Build(i), s.name.as_str(), "build.secrets"));
    }
    let mut secrets = Vec::new();
    for (copy, name, field) in wanted {
        match lookup(name) {
            Some(o) => secrets.push((copy, (*o).clone())),
            None => {
                return Err(CopyError::Missing {
                    namespace: from.to_string(),
                    name: name.to_string(),
                    field,
                });
            }
        }
    }
    Ok(Inputs {
        mcm: mcm.to_string(),
        dockerfile: dockerfile.to_string(),
        secrets,
    })
}

fn meta(job: &Job, mcm: &str, name: String) -> Result<ObjectMeta, CopyError> {
    let uid = job.uid().ok_or_else(|| CopyError::NoUid(job.name_any()))?;
    Ok(ObjectMeta {
        name: Some(name),
        namespace: job.namespace(),
        labels: Some(BTreeMap::from([
            (MCM_OWNER_LABEL.to_string(), mcm.to_string()),
            (
                "app.kubernetes.io/component".to_string(),
                "build-input".to_string(),
            ),
        ])),
        owner_references: Some(vec![OwnerReference {
            api_version: "batch/v1".into(),
            kind: "Job".into(),
            name: job.name_any(),
            uid,
            controller: Some(true),
            block_owner_deletion: None,
        }]),
        ..Default::default()
    })
}

/// Write every copy the created Job mounts, owned by it.
pub async fn write(client: &Client, job: &Job, inputs: &Inputs) -> Result<(), CopyError> {
    let ns = job.namespace().unwrap_or_default();
    let name = job.name_any();
    let pp = PatchParams::apply(MANAGER).force();
    let cm_name = dockerfile_copy(&name);
    let cm = ConfigMap {
        metadata: meta(job, &inputs.mcm, cm_name.clone())?,
        data: Some(BTreeMap::from([(
            "dockerfile".to_string(),
            inputs.dockerfile.clone(),
        )])),
        ..Default::default()
    };
    Api::<ConfigMap>::namespaced(client.clone(), &ns)
        .patch(&cm_name, &pp, &Patch::Apply(&cm))
        .await
        .map_err(|e| CopyError::WriteConfigMap {
            namespace: ns.clone(),
            name: cm_name.clone(),
            source: Box::new(e),
        })?;
    let copies: Api<Secret> = Api::namespaced(client.clone(), &ns);
    for (copy, original) in &inputs.secrets {
        let copy_name = match copy {
            Copy::Registry => registry_copy(&name),
            Copy::Build(i) => secret_copy(&name, *i),
        };
        let s = Secret {
            metadata: meta(job, &inputs.mcm, copy_name.clone())?,
            type_: original.type_.clone(),
            data: original.data.clone(),
            ..Default::default()
        };
        copies
            .patch(&copy_name, &pp, &Patch::Apply(&s))
            .await
            .map_err(|e| CopyError::WriteSecret {
                namespace: ns.clone(),
                name: copy_name.clone(),
                original: original.name_any(),
                source: Box::new(e),
            })?;
    }
    Ok(())
}
