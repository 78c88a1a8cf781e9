//! Rendering one cluster's ManifestWork: a trimmed Module (no build/sign, one literal,
//! digest-pinned mapping per ready kernel) plus JSONPath feedback rules, after the spoke
//! prerequisites the MCM asks for (see [`super::prerequisites`]). Pure.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::ObjectMeta;
use kube::{Resource, ResourceExt};
use serde_json::json;
use sha2::{Digest, Sha256};
use shared_api::labels::MCM_OWNER_LABEL;
use shared_api::module::{KernelMapping, ModuleSpec, TlsOptions};
use shared_api::ocm::{
    FeedbackRule, JsonPath, Manifest, ManifestConfigOption, ManifestWork, ManifestWorkExecutor,
    ManifestWorkSpec, ManifestsTemplate, ResourceIdentifier, UpdateStrategy,
};
use shared_api::{ManagedClusterModule, Module};

use super::prerequisites::{self, PullSecretSource};

/// OCM rejects ManifestWorks whose manifests exceed this many bytes (as [`ocm_manifest_size`]
/// counts them).
pub const MAX_MANIFESTS_BYTES: usize = 512_000;

/// The size OCM's ManifestWork webhook counts for one manifest of `json_len` bytes: the
/// protobuf size of its `RawExtension` (a field tag, the length as a varint, the bytes), so
/// a manifest of 512,000 JSON bytes counts 512,004 and is refused.
pub fn ocm_manifest_size(json_len: usize) -> usize {
    let mut varint = 1;
    let mut rest = json_len >> 7;
    while rest > 0 {
        varint += 1;
        rest >>= 7;
    }
    json_len + 1 + varint
}
/// The spoke ServiceAccount works are applied as, unless `--work-executor` says otherwise:
/// installed with the spoke agent (manifests/spoke/work-executor.yaml), allowed to manage
/// Modules and nothing else.
pub const DEFAULT_WORK_EXECUTOR: &str = "kmm-spoke/kmm-work-executor";

/// Parse `namespace/name` of the executor ServiceAccount; an empty text means none (the
/// work agent's own identity, which OCM installs with far wider rights).
pub fn parse_executor(text: &str) -> Result<Option<ManifestWorkExecutor>, String> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    let bad = |why: String| {
        format!(
            "work executor {text:?}: want <namespace>/<serviceaccount> (or empty for none): {why}"
        )
    };
    let (ns, name) = text.split_once('/').ok_or_else(|| bad("no '/'".into()))?;
    shared_api::names::dns_label(ns).map_err(|e| bad(format!("namespace: {e}")))?;
    shared_api::names::dns_subdomain(name).map_err(|e| bad(format!("name: {e}")))?;
    Ok(Some(ManifestWorkExecutor::service_account(ns, name)))
}

/// Annotation holding a hash of what we rendered, so an unchanged work is never rewritten.
pub use shared_api::labels::SPEC_HASH_ANNOTATION;

/// Feedback names reported by the spoke Module, as upstream names them.
pub const FEEDBACK_FIELDS: [&str; 9] = [
    "devicePlugin.availableNumber",
    "devicePlugin.desiredNumber",
    "devicePlugin.nodesMatchingSelectorNumber",
    "dra.availableNumber",
    "dra.desiredNumber",
    "dra.nodesMatchingSelectorNumber",
    "moduleLoader.availableNumber",
    "moduleLoader.desiredNumber",
    "moduleLoader.nodesMatchingSelectorNumber",
];

/// One kernel whose image is ready, with the image pinned by digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadyMapping {
    pub kernel: String,
    pub pinned_image: String,
    pub registry_tls: TlsOptions,
    pub in_tree_modules_to_remove: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    #[error(
        "no kernel of this cluster has a ready image, and a Module needs at least one kernel mapping"
    )]
    NoReadyMapping,
    #[error(
        "the ManifestWork's manifests would be {0} bytes, over OCM's limit of {MAX_MANIFESTS_BYTES}"
    )]
    TooLarge(usize),
    #[error("image {0:?} is not pinned by digest")]
    NotPinned(String),
    /// `spokePrerequisites.pullSecret` is set and the hub's pull secret cannot be copied; the
    /// work already shipped is kept (dropping the copy would delete it on the spoke).
    #[error("the pull secret cannot be copied to the spoke (spokePrerequisites.pullSecret): {0}")]
    PullSecretUnavailable(String),
    /// `spec.day1` cannot be rendered into a MachineConfig (admission refuses what it can
    /// see; this is what only the shipped images can show).
    #[error("the Day-1 MachineConfig cannot be rendered (spec.day1): {0}")]
    Day1(String),
}

impl RenderError {
    pub fn reason(&self) -> &'static str {
        match self {
            RenderError::NoReadyMapping => "ImagesPending",
            RenderError::TooLarge(_) => "ManifestTooLarge",
            RenderError::NotPinned(_) => "NotPinned",
            RenderError::PullSecretUnavailable(_) => "PullSecretUnavailable",
            RenderError::Day1(_) => "Day1Invalid",
        }
    }
}

/// `repo[:tag]` + `sha256:…` → `repo@sha256:…` (an existing tag or digest is dropped).
pub fn pin(image: &str, digest: &str) -> String {
    let name = image.split('@').next().unwrap_or(image);
    let repo = match (name.rfind(':'), name.rfind('/')) {
        (Some(colon), Some(slash)) if colon > slash => &name[..colon],
        (Some(colon), None) => &name[..colon],
        _ => name,
    };
    format!("{repo}@{digest}")
}

/// The trimmed Module spec a spoke receives.
pub fn spoke_module_spec(spec: &ModuleSpec, mappings: &[ReadyMapping]) -> ModuleSpec {
    let mut spec = spec.clone();
    if let Some(loader) = spec.module_loader.as_mut() {
        let c = &mut loader.container;
        c.build = None;
        c.sign = None;
        // Resolved into every mapping below; keeping them would mix singular and plural.
        c.in_tree_module_to_remove = None;
        c.in_tree_modules_to_remove = None;
        c.container_image = None;
        c.registry_tls = None;
        c.kernel_mappings = mappings
            .iter()
            .map(|m| KernelMapping {
                literal: Some(m.kernel.clone()),
                container_image: m.pinned_image.clone(),
                registry_tls: (m.registry_tls != TlsOptions::default()).then_some(m.registry_tls),
                in_tree_modules_to_remove: (!m.in_tree_modules_to_remove.is_empty())
                    .then(|| m.in_tree_modules_to_remove.clone()),
                ..Default::default()
            })
            .collect();
    }
    spec
}

/// Render the ManifestWork for one cluster, executed as [`DEFAULT_WORK_EXECUTOR`], without a
/// pull-secret copy, or say why none can be shipped.
pub fn render_manifestwork(
    mcm: &ManagedClusterModule,
    cluster: &str,
    mappings: &[ReadyMapping],
) -> Result<ManifestWork, RenderError> {
    let executor = parse_executor(DEFAULT_WORK_EXECUTOR).ok().flatten();
    render_manifestwork_as(
        mcm,
        cluster,
        mappings,
        executor.as_ref(),
        &PullSecretSource::None,
    )
}

/// Render the ManifestWork for one cluster with that executor (`None`: the work agent's own
/// identity) and that pull secret to copy, or say why none can be shipped.
pub fn render_manifestwork_as(
    mcm: &ManagedClusterModule,
    cluster: &str,
    mappings: &[ReadyMapping],
    executor: Option<&ManifestWorkExecutor>,
    pull: &PullSecretSource,
) -> Result<ManifestWork, RenderError> {
    let name = mcm.name_any();
    if let PullSecretSource::Unavailable(why) = pull {
        return Err(RenderError::PullSecretUnavailable(why.clone()));
    }
    let spoke_ns = &mcm.spec.spoke_namespace;
    if mcm.spec.module_spec.module_loader.is_some() {
        if mappings.is_empty() {
            return Err(RenderError::NoReadyMapping);
        }
        if let Some(m) = mappings
            .iter()
            .find(|m| !m.pinned_image.contains("@sha256:"))
        {
            return Err(RenderError::NotPinned(m.pinned_image.clone()));
        }
    }
    let module = Module {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(spoke_ns.clone()),
            ..Default::default()
        },
        spec: spoke_module_spec(&mcm.spec.module_spec, mappings),
        status: None,
    };
    let mut module_json = serde_json::to_value(&module).unwrap_or_default();
    if let Some(obj) = module_json.as_object_mut() {
        obj.insert("apiVersion".into(), json!(Module::api_version(&())));
        obj.insert("kind".into(), json!(Module::kind(&())));
        obj.remove("status");
    }
    let extras = prerequisites::prerequisites(mcm, pull);
    let size = extras
        .iter()
        .map(|p| &p.manifest)
        .chain([&module_json])
        .map(|m| {
            serde_json::to_vec(m)
                .map(|v| ocm_manifest_size(v.len()))
                .unwrap_or(usize::MAX)
        })
        .fold(0usize, usize::saturating_add);
    if size > MAX_MANIFESTS_BYTES {
        return Err(RenderError::TooLarge(size));
    }
    let delete_option = prerequisites::delete_option(&extras);
    let mut configs: Vec<ManifestConfigOption> =
        extras.iter().map(prerequisites::config_of).collect();
    // The prerequisites first: the work agent applies the manifests in order.
    let mut manifests: Vec<Manifest> = extras.into_iter().map(|p| Manifest(p.manifest)).collect();
    manifests.push(Manifest(module_json));
    configs.push(ManifestConfigOption {
        resource_identifier: ResourceIdentifier {
            group: Module::group(&()).to_string(),
            resource: Module::plural(&()).to_string(),
            name: name.clone(),
            namespace: spoke_ns.clone(),
        },
        feedback_rules: vec![FeedbackRule {
            type_: "JSONPaths".into(),
            json_paths: FEEDBACK_FIELDS
                .iter()
                .map(|f| JsonPath {
                    name: (*f).into(),
                    path: format!(".status.{f}"),
                    version: None,
                })
                .collect(),
        }],
        // The real work agent's default (`Update`) replaces the whole object; server-side
        // apply leaves fields others own (and the status) alone.
        update_strategy: Some(UpdateStrategy {
            type_: "ServerSideApply".into(),
        }),
    });
    let spec = ManifestWorkSpec {
        workload: ManifestsTemplate { manifests },
        delete_option,
        manifest_configs: configs,
        executor: executor.cloned(),
    };
    let hash = spec_hash(&spec);
    let owner = mcm.controller_owner_ref(&()).map(|mut o: OwnerReference| {
        o.block_owner_deletion = Some(true);
        o
    });
    Ok(ManifestWork {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(cluster.to_string()),
            labels: Some(BTreeMap::from([(MCM_OWNER_LABEL.to_string(), name)])),
            annotations: Some(BTreeMap::from([(SPEC_HASH_ANNOTATION.to_string(), hash)])),
            owner_references: owner.map(|o| vec![o]),
            ..Default::default()
        },
        spec,
        status: None,
    })
}

/// A stable hash of a work's spec (serde_json maps are ordered, so this is deterministic).
pub fn spec_hash(spec: &ManifestWorkSpec) -> String {
    let bytes = serde_json::to_vec(spec).unwrap_or_default();
    let mut h = hex::encode(Sha256::digest(&bytes));
    h.truncate(16);
    h
}

/// The Module manifest of a work (the other manifests are its prerequisites).
pub fn module_manifest(work: &ManifestWork) -> Option<&serde_json::Value> {
    work.spec
        .workload
        .manifests
        .iter()
        .map(|Manifest(m)| m)
        .find(|m| m.get("kind").and_then(|k| k.as_str()) == Some(Module::kind(&()).as_ref()))
}

/// The `(kernel, image)` pairs a shipped work carries, read back from its Module.
pub fn shipped_mappings(work: &ManifestWork) -> Vec<ReadyMapping> {
    let Some(module) = module_manifest(work) else {
        return Vec::new();
    };
    let Ok(m) = serde_json::from_value::<Module>(module.clone()) else {
        return Vec::new();
    };
    let Some(loader) = m.spec.module_loader else {
        return Vec::new();
    };
    loader
        .container
        .kernel_mappings
        .into_iter()
        .filter_map(|km| {
            let kernel = km.literal.clone()?;
            let in_tree = km.in_tree_removals().unwrap_or_default();
            Some(ReadyMapping {
                kernel,
                pinned_image: km.container_image,
                registry_tls: km.registry_tls.unwrap_or_default(),
                in_tree_modules_to_remove: in_tree,
            })
        })
        .collect()
}

#[cfg(test)]
#[path = "manifestwork_tests.rs"]
mod tests;
