use super::*;
use crate::decide::plan::{ClusterFacts, plan};
use crate::render::prerequisites::PullSecretSource;
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
    serde_json::from_value(module_manifest(w).unwrap().clone()).unwrap()
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
    // The Module's config is the last, after the namespace the MCM asks for by default.
    let module_config = w.spec.manifest_configs.last().unwrap();
    let rules = &module_config.feedback_rules[0];
    assert_eq!(rules.json_paths.len(), 9);
    assert_eq!(
        rules.json_paths[6].path,
        ".status.moduleLoader.availableNumber"
    );
    assert_eq!(module_config.resource_identifier.resource, "modules");
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
    let none = render_manifestwork_as(
        &m,
        "c",
        &[ready("k", "r/x:1")],
        None,
        &PullSecretSource::None,
    )
    .unwrap();
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

const WITH_ACCOUNTS: &str = r#"
spokeNamespace: labsv2
selector: {}
moduleSpec:
  selector: {}
  imageRepoSecret: {name: pull}
  moduleLoader:
    serviceAccountName: loader-sa
    container:
      modprobe: {moduleName: m}
      kernelMappings: [{regexp: '.*', containerImage: 'r/x:1'}]
  devicePlugin:
    serviceAccountName: dp-sa
    container: {image: 'r/dp:1'}
"#;

fn kinds(w: &ManifestWork) -> Vec<String> {
    w.spec
        .workload
        .manifests
        .iter()
        .map(|m| {
            format!(
                "{}/{}",
                m.0["kind"].as_str().unwrap_or("?"),
                m.0["metadata"]["name"].as_str().unwrap_or("?")
            )
        })
        .collect()
}

fn copy(data: &[u8]) -> PullSecretSource {
    PullSecretSource::Copy {
        name: "pull".into(),
        dockerconfigjson: data.to_vec(),
    }
}

/// By default the work creates the namespace (Pod Security `privileged`) and the named
/// ServiceAccounts before the Module, server-side applied, and orphans them on deletion;
/// the pull secret is not copied unless asked for.
#[test]
fn default_prerequisites_namespace_and_service_accounts_before_the_module() {
    let m = mcm(WITH_ACCOUNTS);
    let w = render_manifestwork_as(
        &m,
        "c",
        &[ready("k", "r/x:1")],
        None,
        &copy(b"{\"auths\":{}}"),
    )
    .unwrap();
    assert_eq!(
        kinds(&w),
        [
            "Namespace/labsv2",
            "ServiceAccount/dp-sa",
            "ServiceAccount/loader-sa",
            "Module/mod-example"
        ]
    );
    let ns = &w.spec.workload.manifests[0].0;
    assert_eq!(ns["apiVersion"], "v1");
    assert_eq!(
        ns["metadata"]["labels"],
        json!({"pod-security.kubernetes.io/enforce": "privileged"})
    );
    assert_eq!(
        w.spec.workload.manifests[1].0["metadata"]["namespace"],
        "labsv2"
    );
    let configs: Vec<(&str, &str, Option<&str>)> = w
        .spec
        .manifest_configs
        .iter()
        .map(|c| {
            (
                c.resource_identifier.resource.as_str(),
                c.resource_identifier.name.as_str(),
                c.update_strategy.as_ref().map(|u| u.type_.as_str()),
            )
        })
        .collect();
    assert_eq!(
        configs,
        [
            ("namespaces", "labsv2", Some("ServerSideApply")),
            ("serviceaccounts", "dp-sa", Some("ServerSideApply")),
            ("serviceaccounts", "loader-sa", Some("ServerSideApply")),
            ("modules", "mod-example", Some("ServerSideApply")),
        ]
    );
    let delete = serde_json::to_value(&w.spec.delete_option).unwrap();
    assert_eq!(
        delete,
        json!({"propagationPolicy": "SelectivelyOrphan", "selectivelyOrphans": {"orphaningRules": [
            {"group": "", "resource": "namespaces", "namespace": "", "name": "labsv2"},
            {"group": "", "resource": "serviceaccounts", "namespace": "labsv2", "name": "dp-sa"},
            {"group": "", "resource": "serviceaccounts", "namespace": "labsv2", "name": "loader-sa"},
        ]}})
    );
    assert_eq!(shipped_mappings(&w).len(), 1, "the Module is still found");
}

/// Unnamed ServiceAccounts are the namespace's `default`: nothing to create. Everything off:
/// the upstream work, one Module and OCM's default deletion.
#[test]
fn prerequisites_can_be_turned_off_and_default_accounts_are_not_shipped() {
    let m = mcm(
        "spokeNamespace: ns\nselector: {}\nmoduleSpec:\n  selector: {}\n  moduleLoader:\n    container:\n      modprobe: {moduleName: m}\n      kernelMappings: [{regexp: '.*', containerImage: 'r/x:1'}]\n",
    );
    let w = render_manifestwork(&m, "c", &[ready("k", "r/x:1")]).unwrap();
    assert_eq!(kinds(&w), ["Namespace/ns", "Module/mod-example"]);
    let off = mcm(&format!(
        "{WITH_ACCOUNTS}spokePrerequisites: {{namespace: false, serviceAccounts: false, pullSecret: false}}\n"
    ));
    let w = render_manifestwork_as(&off, "c", &[ready("k", "r/x:1")], None, &copy(b"{}")).unwrap();
    assert_eq!(kinds(&w), ["Module/mod-example"]);
    assert_eq!(w.spec.delete_option, None);
    assert_eq!(w.spec.manifest_configs.len(), 1);
}

/// `pullSecret: true` copies the hub's `.dockerconfigjson` as a dockerconfigjson Secret of
/// the same name, deleted with the work (not orphaned); a changed secret changes the work;
/// an unreadable one ships nothing new (the caller keeps the shipped work).
#[test]
fn the_pull_secret_is_copied_only_when_asked_and_follows_the_hubs() {
    let m = mcm(&format!(
        "{WITH_ACCOUNTS}spokePrerequisites: {{pullSecret: true}}\n"
    ));
    let r = [ready("k", "r/x:1")];
    let w = render_manifestwork_as(&m, "c", &r, None, &copy(b"{\"auths\":{}}")).unwrap();
    assert_eq!(
        kinds(&w),
        [
            "Namespace/labsv2",
            "ServiceAccount/dp-sa",
            "ServiceAccount/loader-sa",
            "Secret/pull",
            "Module/mod-example"
        ]
    );
    let secret = &w.spec.workload.manifests[3].0;
    assert_eq!(secret["type"], "kubernetes.io/dockerconfigjson");
    assert_eq!(secret["metadata"]["namespace"], "labsv2");
    assert_eq!(
        secret["data"],
        json!({".dockerconfigjson": "eyJhdXRocyI6e319"}),
        "base64 of the hub's content"
    );
    let rules = &w.spec.delete_option.as_ref().unwrap().selectively_orphans;
    assert!(
        !rules
            .as_ref()
            .unwrap()
            .orphaning_rules
            .iter()
            .any(|r| r.resource == "secrets"),
        "the copy goes with the work"
    );
    let changed =
        render_manifestwork_as(&m, "c", &r, None, &copy(b"{\"auths\":{\"x\":{}}}")).unwrap();
    assert_ne!(
        w.annotations(),
        changed.annotations(),
        "re-shipped on change"
    );
    let why = "pull secret hub/pull (spec.moduleSpec.imageRepoSecret) does not exist";
    let e = render_manifestwork_as(
        &m,
        "c",
        &r,
        None,
        &PullSecretSource::Unavailable(why.into()),
    )
    .unwrap_err();
    assert_eq!(e.reason(), "PullSecretUnavailable");
    assert!(e.to_string().contains(why), "{e}");
    assert_eq!(
        format!("{:?}", copy(b"c2VjcmV0")),
        "Copy { name: \"pull\" }",
        "never the content"
    );
}
