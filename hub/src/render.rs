//! Rendering one cluster's ManifestWork: a trimmed Module (no build/sign, one literal,
//! digest-pinned mapping per ready kernel) plus JSONPath feedback rules. Pure.

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
pub const SPEC_HASH_ANNOTATION: &str = "kmm.node.kubernetes.io/spec-hash";

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
}

impl RenderError {
    pub fn reason(&self) -> &'static str {
        match self {
            RenderError::NoReadyMapping => "ImagesPending",
            RenderError::TooLarge(_) => "ManifestTooLarge",
            RenderError::NotPinned(_) => "NotPinned",
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

/// Render the ManifestWork for one cluster, executed as [`DEFAULT_WORK_EXECUTOR`], or say
/// why none can be shipped.
pub fn render_manifestwork(
    mcm: &ManagedClusterModule,
    cluster: &str,
    mappings: &[ReadyMapping],
) -> Result<ManifestWork, RenderError> {
    let executor = parse_executor(DEFAULT_WORK_EXECUTOR).ok().flatten();
    render_manifestwork_as(mcm, cluster, mappings, executor.as_ref())
}

/// Render the ManifestWork for one cluster with that executor (`None`: the work agent's own
/// identity), or say why none can be shipped.
pub fn render_manifestwork_as(
    mcm: &ManagedClusterModule,
    cluster: &str,
    mappings: &[ReadyMapping],
    executor: Option<&ManifestWorkExecutor>,
) -> Result<ManifestWork, RenderError> {
    let name = mcm.name_any();
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
    let size = serde_json::to_vec(&module_json)
        .map(|v| ocm_manifest_size(v.len()))
        .unwrap_or(usize::MAX);
    if size > MAX_MANIFESTS_BYTES {
        return Err(RenderError::TooLarge(size));
    }
    let spec = ManifestWorkSpec {
        workload: ManifestsTemplate {
            manifests: vec![Manifest(module_json)],
        },
        delete_option: None,
        manifest_configs: vec![ManifestConfigOption {
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
        }],
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

/// The `(kernel, image)` pairs a shipped work carries, read back from its Module.
pub fn shipped_mappings(work: &ManifestWork) -> Vec<ReadyMapping> {
    let Some(Manifest(module)) = work.spec.workload.manifests.first() else {
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
mod tests {
    use super::*;
    use crate::plan::{ClusterFacts, plan};
    use shared_api::mcm::ManagedClusterModuleSpec;

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

    fn mcm(spec: &str) -> ManagedClusterModule {
        let spec: ManagedClusterModuleSpec = serde_yaml::from_str(spec).unwrap();
        let mut m = ManagedClusterModule::new("mod-example", spec);
        m.metadata.uid = Some("uid-1".into());
        m
    }

    fn ready(kernel: &str, image: &str) -> ReadyMapping {
        ReadyMapping {
            kernel: kernel.into(),
            pinned_image: pin(image, D1),
            registry_tls: TlsOptions::default(),
            in_tree_modules_to_remove: vec![],
        }
    }

    fn module_of(w: &ManifestWork) -> Module {
        serde_json::from_value(w.spec.workload.manifests[0].0.clone()).unwrap()
    }

    /// SPEC §7 case 1: one matching kernel of two, one literal mapping, no build/sign,
    /// the owner label and controller reference, nine feedback paths.
    #[test]
    fn case_1_trimmed_module_with_one_literal_mapping() {
        let m = mcm(r#"
spokeNamespace: spoke-ns
selector: {}
moduleSpec:
  selector: {}
  moduleLoader:
    container:
      modprobe: {moduleName: m}
      build: {dockerfileConfigMap: {name: df}}
      kernelMappings:
        - regexp: '^5\.14.*$'
          containerImage: reg/x:${KERNEL_FULL_VERSION}
          sign: {keySecret: {name: k}, certSecret: {name: c}, filesToSign: [/opt/m.ko]}
"#);
        let facts = ClusterFacts {
            name: "c1".into(),
            kernels: Some(vec!["5.14.0-1".into(), "5.15.0-2".into()]),
            ..Default::default()
        };
        let p = plan(&m, [&facts]).unwrap();
        let t = &p.clusters[0].targets;
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].image, "reg/x:5.14.0-1");
        let w = render_manifestwork(&m, "c1", &[ready("5.14.0-1", &t[0].image)]).unwrap();
        assert_eq!(w.metadata.name.as_deref(), Some("mod-example"));
        assert_eq!(w.metadata.namespace.as_deref(), Some("c1"));
        assert_eq!(
            w.metadata.labels.as_ref().unwrap()[MCM_OWNER_LABEL],
            "mod-example"
        );
        let owner = &w.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.controller),
            ("ManagedClusterModule", Some(true))
        );
        let module = module_of(&w);
        assert_eq!(module.metadata.namespace.as_deref(), Some("spoke-ns"));
        let c = module.spec.module_loader.unwrap().container;
        assert!(c.build.is_none() && c.sign.is_none());
        assert_eq!(c.kernel_mappings.len(), 1);
        let km = &c.kernel_mappings[0];
        assert_eq!(km.literal.as_deref(), Some("5.14.0-1"));
        assert_eq!(km.container_image, format!("reg/x@{D1}"));
        assert!(km.regexp.is_none() && km.build.is_none() && km.sign.is_none());
        let rules = &w.spec.manifest_configs[0].feedback_rules[0];
        assert_eq!(rules.json_paths.len(), 9);
        assert_eq!(
            rules.json_paths[6].path,
            ".status.moduleLoader.availableNumber"
        );
        assert_eq!(
            w.spec.manifest_configs[0].resource_identifier.resource,
            "modules"
        );
    }

    #[test]
    fn never_an_empty_mapping_list_or_a_tag() {
        let m = mcm(
            "spokeNamespace: ns\nselector: {}\nmoduleSpec:\n  selector: {}\n  moduleLoader:\n    container:\n      modprobe: {moduleName: m}\n      kernelMappings: [{regexp: '.*', containerImage: 'r/x:1'}]\n",
        );
        assert_eq!(
            render_manifestwork(&m, "c", &[]).unwrap_err(),
            RenderError::NoReadyMapping
        );
        let mut tagged = ready("k", "r/x:1");
        tagged.pinned_image = "r/x:1".into();
        assert!(matches!(
            render_manifestwork(&m, "c", &[tagged]),
            Err(RenderError::NotPinned(_))
        ));
    }

    #[test]
    fn registry_tls_per_mapping_survives_and_in_tree_is_resolved() {
        let m = mcm(r#"
spokeNamespace: ns
selector: {}
moduleSpec:
  selector: {}
  moduleLoader:
    container:
      modprobe: {moduleName: m}
      inTreeModuleToRemove: joydev
      registryTLS: {insecureSkipTLSVerify: true}
      kernelMappings:
        - literal: 6.1.0-1
          containerImage: r/a:1
          registryTLS: {insecure: true}
        - regexp: '.*'
          containerImage: r/b:1
"#);
        let facts = ClusterFacts {
            name: "c".into(),
            kernels: Some(vec!["6.1.0-1".into(), "6.1.0-2".into()]),
            ..Default::default()
        };
        let p = plan(&m, [&facts]).unwrap();
        let mappings: Vec<ReadyMapping> = p.clusters[0]
            .targets
            .iter()
            .map(|t| ReadyMapping {
                kernel: t.kernel.clone(),
                pinned_image: pin(&t.image, D1),
                registry_tls: t.registry_tls,
                in_tree_modules_to_remove: t.in_tree_modules_to_remove.clone(),
            })
            .collect();
        let w = render_manifestwork(&m, "c", &mappings).unwrap();
        let c = module_of(&w).spec.module_loader.unwrap().container;
        assert!(c.kernel_mappings[0].registry_tls.unwrap().insecure);
        assert!(
            c.kernel_mappings[1]
                .registry_tls
                .unwrap()
                .insecure_skip_tls_verify
        );
        assert!(c.in_tree_module_to_remove.is_none() && c.in_tree_modules_to_remove.is_none());
        assert_eq!(
            c.kernel_mappings[1].in_tree_modules_to_remove.as_deref(),
            Some(&["joydev".to_string()][..])
        );
        assert_eq!(shipped_mappings(&w), mappings);
        // What the spoke receives passes the spoke's validation.
        let module = module_of(&w);
        let spoke = shared_api::validate::validate_module(
            &module,
            shared_api::validate::Context {
                kubernetes_minor: Some(20),
            },
        );
        assert_eq!(spoke, vec![]);
    }

    #[test]
    fn device_plugin_only_work() {
        let m = mcm(
            "spokeNamespace: ns\nselector: {}\nmoduleSpec:\n  selector: {}\n  devicePlugin:\n    container: {image: 'r/dp:1'}\n",
        );
        let w = render_manifestwork(&m, "c", &[]).unwrap();
        let module = module_of(&w);
        assert!(module.spec.module_loader.is_none());
        assert_eq!(module.spec.device_plugin.unwrap().container.image, "r/dp:1");
    }

    #[test]
    fn too_large_is_refused() {
        let big: Vec<String> = (0..20_000)
            .map(|i| format!("p{i}=xxxxxxxxxxxxxxxxxxxxxxxx"))
            .collect();
        let mut m = mcm(
            "spokeNamespace: ns\nselector: {}\nmoduleSpec:\n  selector: {}\n  moduleLoader:\n    container:\n      modprobe: {moduleName: m}\n      kernelMappings: [{regexp: '.*', containerImage: 'r/x:1'}]\n",
        );
        m.spec
            .module_spec
            .module_loader
            .as_mut()
            .unwrap()
            .container
            .modprobe
            .parameters = Some(big);
        assert!(matches!(
            render_manifestwork(&m, "c", &[ready("k", "r/x:1")]),
            Err(RenderError::TooLarge(_))
        ));
    }

    #[test]
    fn manifest_size_counts_as_ocm_does() {
        // Tag byte plus the varint length: 1, 2, 3 bytes at the varint boundaries.
        assert_eq!(ocm_manifest_size(0), 2);
        assert_eq!(ocm_manifest_size(127), 129);
        assert_eq!(ocm_manifest_size(128), 131);
        assert_eq!(ocm_manifest_size(16_383), 16_386);
        assert_eq!(ocm_manifest_size(16_384), 16_388);
        // Measured against OCM's webhook (e2e sims): 512,001 JSON bytes count 512,005.
        assert_eq!(ocm_manifest_size(512_001), 512_005);
        assert_eq!(ocm_manifest_size(511_996), MAX_MANIFESTS_BYTES);
    }

    #[test]
    fn hash_is_stable_and_sensitive() {
        let m = mcm(
            "spokeNamespace: ns\nselector: {}\nmoduleSpec:\n  selector: {}\n  moduleLoader:\n    container:\n      modprobe: {moduleName: m}\n      kernelMappings: [{regexp: '.*', containerImage: 'r/x:1'}]\n",
        );
        let a = render_manifestwork(&m, "c", &[ready("k", "r/x:1")]).unwrap();
        let b = render_manifestwork(&m, "c", &[ready("k", "r/x:1")]).unwrap();
        assert_eq!(a.annotations(), b.annotations());
        let mut other = ready("k", "r/x:1");
        other.pinned_image = pin(
            "r/x:1",
            "sha256:2222222222222222222222222222222222222222222222222222222222222222",
        );
        let c = render_manifestwork(&m, "c", &[other]).unwrap();
        assert_ne!(a.annotations(), c.annotations());
    }

    #[test]
    fn works_carry_the_executor_and_it_is_hashed() {
        let m = mcm(
            "spokeNamespace: ns\nselector: {}\nmoduleSpec:\n  selector: {}\n  moduleLoader:\n    container:\n      modprobe: {moduleName: m}\n      kernelMappings: [{regexp: '.*', containerImage: 'r/x:1'}]\n",
        );
        let w = render_manifestwork(&m, "c", &[ready("k", "r/x:1")]).unwrap();
        let json = serde_json::to_value(&w.spec).unwrap();
        assert_eq!(
            json["executor"],
            json!({"subject": {"type": "ServiceAccount",
                "serviceAccount": {"namespace": "kmm-spoke", "name": "kmm-work-executor"}}})
        );
        let none = render_manifestwork_as(&m, "c", &[ready("k", "r/x:1")], None).unwrap();
        assert!(none.spec.executor.is_none());
        assert_ne!(
            w.annotations(),
            none.annotations(),
            "an executor change rewrites works"
        );
        assert_eq!(parse_executor(" ").unwrap(), None);
        assert_eq!(
            parse_executor("a/b").unwrap(),
            Some(ManifestWorkExecutor::service_account("a", "b"))
        );
        for bad in ["a", "/b", "a/", "a/b/c", "A/b"] {
            assert!(parse_executor(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn pinning() {
        assert_eq!(
            pin("127.0.0.1:5000/a/b:tag", D1),
            format!("127.0.0.1:5000/a/b@{D1}")
        );
        assert_eq!(pin("a/b", D1), format!("a/b@{D1}"));
        assert_eq!(pin(&format!("a/b:t@{D1}"), D1), format!("a/b@{D1}"));
    }
}
