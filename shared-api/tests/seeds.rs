//! The seeds' examples are acceptance cases: every lab Module parses and validates
//! (also wrapped as a ManagedClusterModule), and the annotated reference examples
//! report exactly their real problems.

#![allow(clippy::unwrap_used)] // test fixtures

use std::path::PathBuf;

use shared_api::ManagedClusterModule;
use shared_api::mcm::ManagedClusterModuleSpec;
use shared_api::module::Module;
use shared_api::parse::{Object, parse_documents};
use shared_api::validate::{Context, validate_mcm, validate_module};

fn fixture(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/seeds")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn modules(name: &str) -> Vec<Module> {
    let docs = parse_documents(&fixture(name)).unwrap();
    for d in &docs {
        assert!(
            d.unknown_fields.is_empty(),
            "{name}: unknown fields {:?}",
            d.unknown_fields
        );
    }
    docs.into_iter()
        .filter_map(|d| match d.object {
            Object::Module(m) => Some(*m),
            _ => None,
        })
        .collect()
}

fn wrap(m: &Module) -> ManagedClusterModule {
    let mut mcm = ManagedClusterModule::new(
        m.metadata.name.as_deref().unwrap(),
        ManagedClusterModuleSpec {
            module_spec: m.spec.clone(),
            spoke_namespace: m
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into()),
            selector: [("name".to_string(), "spoke-1".to_string())].into(),
            ..Default::default()
        },
    );
    mcm.metadata.labels = None;
    mcm
}

const LABS: [&str; 7] = [
    "lab_in_cluster_build.yaml",
    "lab_build_and_sign.yaml",
    "lab_load.yaml",
    "lab_remove_in_tree.yaml",
    "lab_device_plugin.yaml",
    "lab_build_with_version.yaml",
    "lab_load_dependencies.yaml",
];

#[test]
fn every_lab_module_is_valid_alone_and_as_an_mcm() {
    for lab in LABS {
        let ms = modules(lab);
        assert_eq!(ms.len(), 1, "{lab}");
        for m in ms {
            assert_eq!(validate_module(&m, Context::default()), vec![], "{lab}");
            assert_eq!(
                validate_module(
                    &m,
                    Context {
                        kubernetes_minor: Some(20)
                    }
                ),
                vec![],
                "{lab}"
            );
            assert_eq!(validate_mcm(&wrap(&m)), vec![], "{lab} as MCM");
        }
    }
}

#[test]
fn labs_carry_what_they_teach() {
    let load = &modules("lab_load.yaml")[0];
    let c = &load.spec.module_loader.as_ref().unwrap().container;
    assert_eq!(c.modprobe.module_name.as_deref(), Some("kmm-ci-a"));
    assert_eq!(
        load.spec
            .selector
            .get("node-role.kubernetes.io/worker")
            .map(String::as_str),
        Some("")
    );
    let intree = &modules("lab_remove_in_tree.yaml")[0];
    assert_eq!(
        intree
            .spec
            .module_loader
            .as_ref()
            .unwrap()
            .container
            .in_tree_removals(),
        vec!["joydev"]
    );
    let deps = &modules("lab_load_dependencies.yaml")[0];
    let order = deps
        .spec
        .module_loader
        .as_ref()
        .unwrap()
        .container
        .modprobe
        .modules_loading_order
        .clone();
    assert_eq!(order.unwrap(), vec!["kmm-ci-a", "kmm-ci-b"]);
    let signed = &modules("lab_build_and_sign.yaml")[0];
    let m0 = &signed
        .spec
        .module_loader
        .as_ref()
        .unwrap()
        .container
        .kernel_mappings[0];
    assert_eq!(
        m0.sign.as_ref().unwrap().key_secret.as_ref().unwrap().name,
        "mykey"
    );
    let dp = &modules("lab_device_plugin.yaml")[0];
    assert_eq!(
        dp.spec.device_plugin.as_ref().unwrap().container.args,
        vec!["-config=config-labs.yaml"]
    );
    let v = &modules("lab_build_with_version.yaml")[0];
    assert_eq!(
        v.spec
            .module_loader
            .as_ref()
            .unwrap()
            .container
            .version
            .as_deref(),
        Some("0.9")
    );
}

fn paths_of(violations: &[shared_api::validate::Violation]) -> Vec<&str> {
    let mut p: Vec<&str> = violations.iter().map(|v| v.path.as_str()).collect();
    p.sort();
    p
}

#[test]
fn annotated_upstream_reference_reports_only_the_in_tree_conflict() {
    let m = &modules("reference_module_annotated.yaml")[0];
    let v = validate_module(m, Context::default());
    assert_eq!(
        paths_of(&v),
        vec![
            "spec.moduleLoader.container.inTreeModuleToRemove",
            "spec.moduleLoader.container.kernelMappings[2].inTreeModuleToRemove",
        ],
        "{v:#?}"
    );
    assert!(v.iter().all(|x| {
        x.reason
            .contains("cannot be used together with inTreeModulesToRemove")
    }));
}

#[test]
fn annotated_openshift_reference_reports_its_placeholders() {
    let m = &modules("reference_module_openshift.yaml")[0];
    let v = validate_module(m, Context::default());
    assert_eq!(
        paths_of(&v),
        vec![
            "metadata.name",
            "spec.devicePlugin.serviceAccountName",
            "spec.devicePlugin.volumes[0].name",
            "spec.imageRepoSecret.name",
            "spec.moduleLoader.container.kernelMappings[1].containerImage",
            "spec.moduleLoader.container.kernelMappings[2].build.dockerfileConfigMap.name",
            "spec.moduleLoader.container.kernelMappings[2].build.secrets[0].name",
            "spec.moduleLoader.container.kernelMappings[2].containerImage",
            "spec.moduleLoader.container.kernelMappings[2].sign.certSecret.name",
            "spec.moduleLoader.container.kernelMappings[2].sign.keySecret.name",
            "spec.moduleLoader.container.modprobe.moduleName",
            "spec.moduleLoader.serviceAccountName",
        ],
        "{v:#?}"
    );
    assert!(
        v.iter().all(|x| x.reason.contains('<')),
        "each reason names the placeholder: {v:#?}"
    );
}

#[test]
fn openshift_mcm_snippet_reports_placeholders_and_its_empty_module_spec() {
    let docs = parse_documents(&fixture("reference_mcm_openshift.yaml")).unwrap();
    let Object::ManagedClusterModule(mcm) = &docs[0].object else {
        panic!("not an MCM")
    };
    let v = validate_mcm(mcm);
    assert_eq!(
        paths_of(&v),
        vec!["metadata.name", "spec.moduleSpec", "spec.spokeNamespace"],
        "{v:#?}"
    );
}

#[test]
fn the_openshift_dockerfile_configmap_is_not_ours_to_check() {
    let docs = parse_documents(&fixture("openshift_dockerfile_configmap.yaml")).unwrap();
    assert!(matches!(&docs[0].object, Object::Other { kind, .. } if kind == "ConfigMap"));
}
