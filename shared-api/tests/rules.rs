//! One rejecting test (at least) per validation rule, checking the field path and reason.

#![allow(clippy::unwrap_used)] // test fixtures

use shared_api::ManagedClusterModule;
use shared_api::module::Module;
use shared_api::validate::{Context, Violation, validate_mcm, validate_module, validate_update};

const BASE: &str = r#"
apiVersion: kmm.sigs.x-k8s.io/v1beta1
kind: Module
metadata: {name: kmm-ci-a, namespace: labsv2}
spec:
  selector: {node-role.kubernetes.io/worker: ""}
  moduleLoader:
    container:
      modprobe: {moduleName: kmm-ci-a}
      kernelMappings:
        - regexp: '^.*'
          containerImage: myrepo.xyz/kmm-labs:kmm-kmod-${KERNEL_FULL_VERSION}-v1.0
"#;

/// The base Module with a JSON merge patch applied.
fn module(patch: serde_json::Value) -> Module {
    let mut v: serde_json::Value = serde_yaml::from_str(BASE).unwrap();
    merge(&mut v, patch);
    serde_json::from_value(v).unwrap()
}

fn merge(a: &mut serde_json::Value, b: serde_json::Value) {
    match (a, b) {
        (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
            for (k, v) in b {
                if v.is_null() {
                    a.remove(&k);
                } else {
                    merge(a.entry(k).or_insert(serde_json::Value::Null), v);
                }
            }
        }
        (a, b) => *a = b,
    }
}

#[track_caller]
fn rejects(violations: Vec<Violation>, path: &str, reason_part: &str) {
    assert!(
        violations
            .iter()
            .any(|v| v.path == path && v.reason.contains(reason_part)),
        "expected {path}: …{reason_part}…, got {violations:#?}"
    );
}

fn check(patch: serde_json::Value) -> Vec<Violation> {
    validate_module(&module(patch), Context::default())
}

use serde_json::json;

#[test]
fn base_is_valid() {
    assert_eq!(check(json!({})), vec![]);
}

#[test]
fn name_plus_namespace_limit() {
    let v = check(
        json!({"metadata": {"name": "a-very-long-module-name-indeed", "namespace": "and-a-long-namespace"}}),
    );
    rejects(v, "metadata.name", "at most 41 characters");
}

#[test]
fn names_must_be_dns() {
    rejects(
        check(json!({"metadata": {"name": "Bad_Name"}})),
        "metadata.name",
        "DNS-1123 subdomain",
    );
    rejects(
        check(json!({"spec": {"imageRepoSecret": {"name": "UPPER"}}})),
        "spec.imageRepoSecret.name",
        "DNS-1123",
    );
    rejects(
        check(json!({"spec": {"moduleLoader": {"serviceAccountName": "a b"}}})),
        "spec.moduleLoader.serviceAccountName",
        "DNS-1123",
    );
}

#[test]
fn tolerations() {
    let t = |tol: serde_json::Value| check(json!({"spec": {"tolerations": [tol]}}));
    rejects(
        t(json!({"key": "bad key!", "operator": "Exists"})),
        "spec.tolerations[0].key",
        "qualified name",
    );
    rejects(
        t(json!({"operator": "Equal", "value": "x"})),
        "spec.tolerations[0].operator",
        "must be Exists when key is empty",
    );
    rejects(
        t(
            json!({"key": "k", "operator": "Exists", "effect": "NoSchedule", "tolerationSeconds": 5}),
        ),
        "spec.tolerations[0].tolerationSeconds",
        "NoExecute",
    );
    rejects(
        t(json!({"key": "k", "operator": "Equal", "value": "-bad-"})),
        "spec.tolerations[0].value",
        "label value",
    );
    rejects(
        t(json!({"key": "k", "operator": "Exists", "value": "v"})),
        "spec.tolerations[0].value",
        "must be empty",
    );
    rejects(
        t(json!({"key": "k", "operator": "Gt"})),
        "spec.tolerations[0].operator",
        "is not Equal or Exists",
    );
    rejects(
        t(json!({"key": "k", "operator": "Exists", "effect": "Sometimes"})),
        "spec.tolerations[0].effect",
        "is not NoSchedule",
    );
    assert_eq!(
        t(json!({"key": "k", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 5})),
        vec![]
    );
}

#[test]
fn dra_rules() {
    let dra = json!({"driverName": "Bad Driver", "container": {"image": "r/dra:1"},
        "deviceClasses": [{"name": "gpu"}, {"name": "gpu"}]});
    let v =
        check(json!({"spec": {"dra": dra, "devicePlugin": {"container": {"image": "r/dp:1"}}}}));
    rejects(v.clone(), "spec", "dra and devicePlugin cannot both be set");
    rejects(v.clone(), "spec.dra.driverName", "DNS-1123");
    rejects(
        v,
        "spec.dra.deviceClasses[1].name",
        "duplicate device class",
    );
    let ok = json!({"driverName": "gpu.example.com", "container": {"image": "r/dra:1"}});
    let old = validate_module(
        &module(json!({"spec": {"dra": ok}})),
        Context {
            kubernetes_minor: Some(20),
        },
    );
    rejects(old, "spec.dra", "requires Kubernetes 1.34");
}

#[test]
fn host_path_volumes_must_stay_under_allowed_roots() {
    for (path, ok) in [
        ("/dev", true),
        ("/var/lib/x", true),
        ("/devious", false),
        ("/dev/../etc", false),
        ("/", false),
    ] {
        let v = check(
            json!({"spec": {"devicePlugin": {"container": {"image": "r/dp:1"},
            "volumes": [{"name": "host", "hostPath": {"path": path}}]}}}),
        );
        if ok {
            assert_eq!(v, vec![], "{path}");
        } else {
            rejects(
                v,
                "spec.devicePlugin.volumes[0].hostPath.path",
                "is not allowed",
            );
        }
    }
}

#[test]
fn in_tree_singular_and_plural_never_together() {
    let v = check(
        json!({"spec": {"moduleLoader": {"container": {"inTreeModuleToRemove": "joydev",
        "kernelMappings": [{"regexp": ".*", "containerImage": "r/x:1", "inTreeModulesToRemove": ["a"]}]}}}}),
    );
    rejects(
        v,
        "spec.moduleLoader.container.inTreeModuleToRemove",
        "kernelMappings[0].inTreeModulesToRemove",
    );
    let both_in_mapping = check(
        json!({"spec": {"moduleLoader": {"container": {"kernelMappings": [
        {"regexp": ".*", "containerImage": "r/x:1", "inTreeModuleToRemove": "a", "inTreeModulesToRemove": ["b"]}]}}}}),
    );
    rejects(
        both_in_mapping,
        "spec.moduleLoader.container.kernelMappings[0].inTreeModuleToRemove",
        "use only inTreeModulesToRemove",
    );
}

#[test]
fn mapping_rules() {
    let m = |mapping: serde_json::Value| {
        check(json!({"spec": {"moduleLoader": {"container": {"kernelMappings": [mapping]}}}}))
    };
    rejects(
        m(json!({"literal": "1", "regexp": "x", "containerImage": "r/x:1"})),
        "spec.moduleLoader.container.kernelMappings[0]",
        "not both",
    );
    rejects(
        m(json!({"containerImage": "r/x:1"})),
        "spec.moduleLoader.container.kernelMappings[0]",
        "exactly one of literal and regexp",
    );
    rejects(
        m(json!({"regexp": "(", "containerImage": "r/x:1"})),
        "spec.moduleLoader.container.kernelMappings[0].regexp",
        "not a valid regular expression",
    );
    rejects(
        m(json!({"regexp": ".*"})),
        "spec.moduleLoader.container.kernelMappings[0].containerImage",
        "required",
    );
    rejects(
        m(json!({"regexp": ".*", "containerImage": "r/x"})),
        "spec.moduleLoader.container.kernelMappings[0].containerImage",
        "needs a tag or a digest",
    );
    rejects(
        m(json!({"regexp": ".*", "containerImage": "r/X:1"})),
        "spec.moduleLoader.container.kernelMappings[0].containerImage",
        "not a valid image reference",
    );
    rejects(
        m(json!({"regexp": ".*", "containerImage": "r/x:$NOPE"})),
        "spec.moduleLoader.container.kernelMappings[0].containerImage",
        "unknown variable ${NOPE}",
    );
    let empty = check(json!({"spec": {"moduleLoader": {"container": {"kernelMappings": []}}}}));
    rejects(
        empty,
        "spec.moduleLoader.container.kernelMappings",
        "at least one kernel mapping",
    );
    let top = check(
        json!({"spec": {"moduleLoader": {"container": {"containerImage": "r/top:${KERNEL_XYZ}", "kernelMappings": [{"regexp": ".*"}]}}}}),
    );
    assert_eq!(top, vec![]);
}

#[test]
fn modprobe_rules() {
    let mp = |modprobe: serde_json::Value| {
        check(json!({"spec": {"moduleLoader": {"container": {"modprobe": modprobe}}}}))
    };
    rejects(
        mp(json!({"moduleName": "a", "rawArgs": {"load": ["x"], "unload": ["y"]}})),
        "spec.moduleLoader.container.modprobe.rawArgs",
        "must be empty when moduleName",
    );
    rejects(
        mp(json!({"moduleName": null, "rawArgs": {"load": ["x"]}})),
        "spec.moduleLoader.container.modprobe.rawArgs.unload",
        "required when moduleName is not set",
    );
    for (fw, why) in [
        ("/", "the image's root"),
        ("//", "the image's root"),
        ("/firmware/../etc", "must not contain '..'"),
        ("/..", "must not contain '..'"),
        ("firmware", "absolute path"),
    ] {
        rejects(
            mp(json!({"moduleName": "a", "firmwarePath": fw})),
            "spec.moduleLoader.container.modprobe.firmwarePath",
            why,
        );
    }
    rejects(
        mp(json!({"modulesLoadingOrder": ["kmm-ci-a"]})),
        "spec.moduleLoader.container.modprobe.modulesLoadingOrder",
        "2 or more",
    );
    rejects(
        mp(json!({"modulesLoadingOrder": ["kmm-ci-b", "kmm-ci-a"]})),
        "spec.moduleLoader.container.modprobe.modulesLoadingOrder[0]",
        "must be the moduleName",
    );
    rejects(
        mp(json!({"modulesLoadingOrder": ["kmm-ci-a", "b", "b"]})),
        "spec.moduleLoader.container.modprobe.modulesLoadingOrder[2]",
        "duplicate module",
    );
    rejects(
        mp(
            json!({"moduleName": null, "rawArgs": {"load": ["a"], "unload": ["a"]}, "modulesLoadingOrder": ["a", "b"]}),
        ),
        "spec.moduleLoader.container.modprobe.modulesLoadingOrder",
        "requires moduleName",
    );
    rejects(
        mp(json!({"moduleName": "<my_kmod>"})),
        "spec.moduleLoader.container.modprobe.moduleName",
        "not a kernel module name",
    );
    rejects(
        mp(json!({"args": {"load": ["-v"]}})),
        "spec.moduleLoader.container.modprobe.args.unload",
        "at least one item",
    );
    rejects(
        mp(json!({"dirName": "opt"})),
        "spec.moduleLoader.container.modprobe.dirName",
        "absolute path",
    );
    assert_eq!(
        mp(json!({"modulesLoadingOrder": ["kmm_ci_a", "kmm-ci-b"]})),
        vec![],
        "'-' and '_' are alike"
    );
}

#[test]
fn sign_rules() {
    let s = |sign: serde_json::Value| {
        check(json!({"spec": {"moduleLoader": {"container": {"sign": sign,
        "kernelMappings": [{"regexp": ".*", "containerImage": "r/x:1", "build": {"dockerfileConfigMap": {"name": "df"}}}]}}}}))
    };
    rejects(
        s(json!({"keySecret": {"name": "k"}, "certSecret": {"name": "c"}})),
        "spec.moduleLoader.container.sign.filesToSign",
        "at least one file",
    );
    rejects(
        s(
            json!({"keySecret": {"name": "k"}, "certSecret": {"name": "c"}, "filesToSign": ["/usr/lib/x.ko"]}),
        ),
        "spec.moduleLoader.container.sign.filesToSign[0]",
        "must be under the module directory \"/opt/\"",
    );
    rejects(
        s(json!({"certSecret": {"name": "c"}, "filesToSign": ["/opt/x.ko"]})),
        "spec.moduleLoader.container.kernelMappings[0].sign.keySecret",
        "required",
    );
    let no_build = check(
        json!({"spec": {"moduleLoader": {"container": {"kernelMappings": [{"regexp": ".*", "containerImage": "r/x:1",
        "sign": {"keySecret": {"name": "k"}, "certSecret": {"name": "c"}, "filesToSign": ["/opt/x.ko"]}}]}}}}),
    );
    rejects(
        no_build,
        "spec.moduleLoader.container.kernelMappings[0].sign.unsignedImage",
        "required when there is no build",
    );
}

#[test]
fn build_rules() {
    let v = check(
        json!({"spec": {"moduleLoader": {"container": {"kernelMappings": [{"regexp": ".*", "containerImage": "r/x:1",
        "build": {"buildArgs": [{"name": "A B", "value": "1"}], "kanikoParams": {"tag": "reg:5000/x"}}}]}}}}),
    );
    rejects(
        v.clone(),
        "spec.moduleLoader.container.kernelMappings[0].build.dockerfileConfigMap",
        "required",
    );
    rejects(
        v.clone(),
        "spec.moduleLoader.container.kernelMappings[0].build.buildArgs[0].name",
        "not a build argument name",
    );
    rejects(
        v,
        "spec.moduleLoader.container.kernelMappings[0].build.kanikoParams.tag",
        "is not an image tag",
    );
}

#[test]
fn device_plugin_and_pull_policy_and_selector() {
    let v = check(
        json!({"spec": {"selector": {"bad key!": "x"}, "devicePlugin": {"container": {"image": "", "imagePullPolicy": "Sometimes"}}}}),
    );
    rejects(v.clone(), "spec.devicePlugin.container.image", "required");
    rejects(
        v.clone(),
        "spec.devicePlugin.container.imagePullPolicy",
        "is not one of Always, IfNotPresent, Never",
    );
    rejects(v, "spec.selector[bad key!]", "qualified name");
    let nothing = check(json!({"spec": {"moduleLoader": null}}));
    rejects(
        nothing,
        "spec",
        "at least one of moduleLoader, devicePlugin or dra",
    );
}

#[test]
fn version_cannot_flip_on_update() {
    let old = module(json!({}));
    let new = module(json!({"spec": {"moduleLoader": {"container": {"version": "1.0"}}}}));
    rejects(
        validate_update("spec", &old.spec, &new.spec),
        "spec.moduleLoader.container.version",
        "delete and re-create",
    );
    rejects(
        validate_update("spec", &new.spec, &old.spec),
        "spec.moduleLoader.container.version",
        "cannot change",
    );
    let newer = module(json!({"spec": {"moduleLoader": {"container": {"version": "1.1"}}}}));
    assert_eq!(validate_update("spec", &new.spec, &newer.spec), vec![]);
    rejects(
        check(json!({"spec": {"moduleLoader": {"container": {"version": "not ok!"}}}})),
        "spec.moduleLoader.container.version",
        "label value",
    );
}

#[test]
fn mcm_rules() {
    let mcm: ManagedClusterModule = serde_json::from_value(json!({
        "apiVersion": "hub.kmm.sigs.x-k8s.io/v1beta1", "kind": "ManagedClusterModule",
        "metadata": {"name": "a-very-long-managed-cluster-module"},
        "spec": {"spokeNamespace": "Not_A_Namespace", "selector": {"name": "-bad-"},
                 "moduleSpec": {"selector": {}, "moduleLoader": {"container": {"modprobe": {"moduleName": "m"},
                   "kernelMappings": [{"regexp": "[", "containerImage": "r/x:1"}]}}}}
    })).unwrap();
    let v = validate_mcm(&mcm);
    rejects(v.clone(), "spec.spokeNamespace", "DNS-1123 label");
    rejects(
        v.clone(),
        "metadata.name",
        "spoke Module <spokeNamespace>/<name> would be rejected",
    );
    rejects(v.clone(), "spec.selector[name]", "label value");
    rejects(
        v,
        "spec.moduleSpec.moduleLoader.container.kernelMappings[0].regexp",
        "not a valid regular expression",
    );
}

#[test]
fn day1_rules() {
    let with = |day1: serde_json::Value, loader: bool| {
        let mut spec = json!({"spokeNamespace": "ns", "selector": {},
            "moduleSpec": {"selector": {}, "moduleLoader": {"container": {"modprobe": {"moduleName": "m"},
              "kernelMappings": [{"regexp": "^.*$", "containerImage": "r/x:1"}]}}},
            "day1": day1});
        if !loader {
            spec["moduleSpec"] =
                json!({"selector": {}, "devicePlugin": {"container": {"image": "r/dp:1"}}});
        }
        let mcm: ManagedClusterModule = serde_json::from_value(json!({
            "apiVersion": "hub.kmm.sigs.x-k8s.io/v1beta1", "kind": "ManagedClusterModule",
            "metadata": {"name": "sfc"}, "spec": spec,
        }))
        .unwrap();
        validate_mcm(&mcm)
    };
    let ok = with(json!({"machineConfigPool": "worker"}), true);
    assert!(ok.is_empty(), "{ok:#?}");
    rejects(
        with(json!({"machineConfigPool": "Worker Pool"}), true),
        "spec.day1.machineConfigPool",
        "label value",
    );
    rejects(
        with(
            json!({"machineConfigPool": "worker", "machineConfigName": "99_Bad"}),
            true,
        ),
        "spec.day1.machineConfigName",
        "MachineConfig name",
    );
    rejects(
        with(
            json!({"machineConfigPool": "worker", "inTreeModule": "a b"}),
            true,
        ),
        "spec.day1.inTreeModule",
        "kernel module name",
    );
    rejects(
        with(json!({"machineConfigPool": "worker"}), false),
        "spec.day1",
        "needs spec.moduleSpec.moduleLoader",
    );
}

#[test]
fn day0_rules() {
    let with = |patch: serde_json::Value| {
        let mut day0 = json!({"machineConfigPool": "worker",
            "containerImage": "reg:5000/os/rhcos-kmod",
            "build": {"dockerfileConfigMap": {"name": "layering"}}});
        merge(&mut day0, patch);
        let mcm: ManagedClusterModule = serde_json::from_value(json!({
            "apiVersion": "hub.kmm.sigs.x-k8s.io/v1beta1", "kind": "ManagedClusterModule",
            "metadata": {"name": "sfc"},
            "spec": {"spokeNamespace": "ns", "selector": {},
                "moduleSpec": {"selector": {}, "devicePlugin": {"container": {"image": "r/dp:1"}}},
                "day0": day0},
        }))
        .unwrap();
        validate_mcm(&mcm)
    };
    let ok = with(json!({}));
    assert!(ok.is_empty(), "{ok:#?}");
    let ok = with(json!({
        "containerImage": "reg/os:${KERNEL_FULL_VERSION}-${OS_IMAGE_DIGEST}",
        "osImage": "quay.io/openshift-release-dev/ocp-v4.0-art-dev@sha256:127670aaa6073e97bd6d919e1b57bd16b60435410b096aeefce7cd64f6c83d24",
        "sign": {"keySecret": {"name": "k"}, "certSecret": {"name": "c"},
                 "filesToSign": ["/usr/lib/modules/${KERNEL_FULL_VERSION}/simple-kmod.ko"]}}));
    assert!(ok.is_empty(), "{ok:#?}");
    rejects(
        with(json!({"containerImage": "reg/os:${KERNEL_FULL_VERSION}"})),
        "spec.day0.containerImage",
        "both ${KERNEL_FULL_VERSION} and ${OS_IMAGE_DIGEST}",
    );
    rejects(
        with(json!({"containerImage": "reg/os:fixed"})),
        "spec.day0.containerImage",
        "must contain both",
    );
    rejects(
        with(json!({"containerImage": "reg/os@sha256:0000"})),
        "spec.day0.containerImage",
        "must not carry a digest",
    );
    rejects(
        with(json!({"containerImage": "reg/OS"})),
        "spec.day0.containerImage",
        "not a valid image reference",
    );
    rejects(
        with(json!({"containerImage": "reg/os/${NOPE}"})),
        "spec.day0.containerImage",
        "unknown variable",
    );
    rejects(
        with(json!({"machineConfigPool": "Worker Pool"})),
        "spec.day0.machineConfigPool",
        "label value",
    );
    rejects(
        with(json!({"machineConfigName": "99_Bad"})),
        "spec.day0.machineConfigName",
        "MachineConfig name",
    );
    rejects(
        with(json!({"build": {"dockerfileConfigMap": null}})),
        "spec.day0.build.dockerfileConfigMap",
        "is required",
    );
    rejects(
        with(json!({"sign": {"certSecret": {"name": "c"}, "filesToSign": ["/m.ko"]}})),
        "spec.day0.sign.keySecret",
        "is required",
    );
    rejects(
        with(
            json!({"sign": {"keySecret": {"name": "k"}, "certSecret": {"name": "c"}, "filesToSign": []}}),
        ),
        "spec.day0.sign.filesToSign",
        "at least one file",
    );
    rejects(
        with(json!({"osImage": "rhcos"})),
        "spec.day0.osImage",
        "needs a tag or a digest",
    );
    // Not together with Day 1.
    let both: ManagedClusterModule = serde_json::from_value(json!({
        "apiVersion": "hub.kmm.sigs.x-k8s.io/v1beta1", "kind": "ManagedClusterModule",
        "metadata": {"name": "sfc"},
        "spec": {"spokeNamespace": "ns", "selector": {},
            "moduleSpec": {"selector": {}, "moduleLoader": {"container": {"modprobe": {"moduleName": "m"},
              "kernelMappings": [{"regexp": "^.*$", "containerImage": "r/x:1"}]}}},
            "day1": {"machineConfigPool": "worker"},
            "day0": {"machineConfigPool": "worker", "containerImage": "reg/os",
                     "build": {"dockerfileConfigMap": {"name": "layering"}}}},
    }))
    .unwrap();
    rejects(validate_mcm(&both), "spec.day0", "cannot both be set");
}

fn mcm_with_rollout(strategy: serde_json::Value) -> ManagedClusterModule {
    serde_json::from_value(json!({
        "apiVersion": "hub.kmm.sigs.x-k8s.io/v1beta1", "kind": "ManagedClusterModule",
        "metadata": {"name": "mod"},
        "spec": {"spokeNamespace": "ns", "selector": {},
                 "moduleSpec": {"selector": {}, "moduleLoader": {"container": {"modprobe": {"moduleName": "m"},
                   "kernelMappings": [{"regexp": "^.*$", "containerImage": "r/x:1"}]}}},
                 "rolloutStrategy": strategy}
    }))
    .unwrap()
}

#[test]
fn rollout_strategy_rules() {
    let ok = mcm_with_rollout(json!({"type": "Progressive", "progressive": {
        "maxConcurrency": "25%", "minSuccessTime": "1h30m", "progressDeadline": "None", "maxFailures": 2,
        "mandatoryDecisionGroups": [{"groupName": "canary", "clusterSelector": {"matchLabels": {"ring": "canary"}}},
                                    {"groupIndex": 0}]}}));
    assert_eq!(validate_mcm(&ok), vec![]);
    let ok = mcm_with_rollout(
        json!({"type": "ProgressivePerGroup", "progressivePerGroup": {"maxFailures": "10%"}}),
    );
    assert_eq!(validate_mcm(&ok), vec![]);
    assert_eq!(
        validate_mcm(&mcm_with_rollout(json!({}))),
        vec![],
        "unset type is All"
    );

    let p = "spec.rolloutStrategy.progressive";
    let v = validate_mcm(&mcm_with_rollout(
        json!({"type": "Progressive", "progressive": {
        "maxConcurrency": 0, "minSuccessTime": "soon", "progressDeadline": "5", "maxFailures": "150%",
        "mandatoryDecisionGroups": [{}, {"clusterSelector": {"matchLabels": {}}},
                                    {"groupIndex": -1},
                                    {"groupIndex": 1, "clusterSelector": {"matchLabels": {"a": "-bad-"}}}]}}),
    ));
    rejects(v.clone(), &format!("{p}.maxConcurrency"), "more than 0");
    rejects(v.clone(), &format!("{p}.minSuccessTime"), "not a duration");
    rejects(v.clone(), &format!("{p}.progressDeadline"), "or None");
    rejects(
        v.clone(),
        &format!("{p}.maxFailures"),
        "percentage from 0% to 100%",
    );
    rejects(
        v.clone(),
        &format!("{p}.mandatoryDecisionGroups[0]"),
        "needs clusterSelector, groupName or groupIndex",
    );
    rejects(
        v.clone(),
        &format!("{p}.mandatoryDecisionGroups[1].clusterSelector.matchLabels"),
        "must not be empty",
    );
    rejects(
        v.clone(),
        &format!("{p}.mandatoryDecisionGroups[2].groupIndex"),
        "negative",
    );
    rejects(
        v.clone(),
        &format!("{p}.mandatoryDecisionGroups[3].groupIndex"),
        "cannot be combined",
    );
    rejects(
        v,
        &format!("{p}.mandatoryDecisionGroups[3].clusterSelector.matchLabels[a]"),
        "label value",
    );

    let v = validate_mcm(&mcm_with_rollout(json!({"type": "All", "progressive": {}})));
    rejects(v, "spec.rolloutStrategy.progressive", "type is All");
    let v = validate_mcm(&mcm_with_rollout(json!({"type": "ProgressivePerGroup",
        "progressive": {}, "progressivePerGroup": {"maxConcurrency": 1}})));
    rejects(
        v.clone(),
        "spec.rolloutStrategy.progressive",
        "type is ProgressivePerGroup",
    );
    rejects(
        v,
        "spec.rolloutStrategy.progressivePerGroup.maxConcurrency",
        "only to type Progressive",
    );
}

#[test]
fn placement_ref_rules() {
    let with = |selector: serde_json::Value, placement: &str| -> ManagedClusterModule {
        serde_json::from_value(json!({
            "apiVersion": "hub.kmm.sigs.x-k8s.io/v1beta1", "kind": "ManagedClusterModule",
            "metadata": {"name": "m"},
            "spec": {"spokeNamespace": "ns", "selector": selector,
                     "placementRef": {"name": placement},
                     "moduleSpec": {"selector": {}, "moduleLoader": {"container": {"modprobe": {"moduleName": "m"},
                       "kernelMappings": [{"regexp": "^.*$", "containerImage": "r/x:1"}]}}}}
        }))
        .unwrap()
    };
    assert_eq!(validate_mcm(&with(json!({}), "prod")), vec![]);
    rejects(
        validate_mcm(&with(json!({"env": "prod"}), "prod")),
        "spec.selector",
        "must be empty when spec.placementRef is set",
    );
    rejects(
        validate_mcm(&with(json!({}), "Not_A_Name")),
        "spec.placementRef.name",
        "DNS-1123 subdomain",
    );
}
