use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, PodSpec, Toleration};
use kube::ResourceExt;
use serde_json::json;
use shared_api::Module;
use shared_api::fixtures::Lab;
use shared_api::labels::*;
use shared_api::module::DraSpec;

use super::*;
use crate::render::{BUILTIN_TOLERATED_TAINTS, plan_module};

/// The seeds' device-plugin lab with a DRA driver in place of the device plugin.
fn dra_module(with_loader: bool) -> Module {
    let mut m = Module::lab(Lab::DevicePlugin)
        .as_shipped()
        .with_uid("uid-1");
    let dp = m.spec.device_plugin.take().unwrap();
    m.spec.dra = Some(DraSpec {
        container: dp.container,
        service_account_name: Some("dra-sa".into()),
        driver_name: "gpu.example.com".into(),
        device_classes: serde_json::from_value(json!([
            { "name": "kmm-gpu", "selectors": [{ "cel": { "expression": "device.driver == 'gpu.example.com'" } }] },
            { "name": "kmm-gpu-any" }
        ]))
        .unwrap(),
        ..Default::default()
    });
    if !with_loader {
        m.spec.module_loader = None;
    }
    m
}

fn pod_spec(ds: &DaemonSet) -> &PodSpec {
    ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap()
}

fn worker(name: &str) -> Node {
    serde_json::from_value(json!({
        "metadata": { "name": name, "labels": { "node-role.kubernetes.io/worker": "" } },
        "status": { "nodeInfo": { "kernelVersion": "5.14.0-284.36.1.el9_2.x86_64", "architecture": "", "bootID": "",
            "containerRuntimeVersion": "", "kubeProxyVersion": "", "kubeletVersion": "", "machineID": "",
            "operatingSystem": "", "osImage": "", "systemUUID": "" } }
    }))
    .unwrap()
}

#[test]
fn dra_driver_daemonset_has_upstreams_shape() {
    let m = dra_module(true);
    let ds = render_dra_daemonset(&m, &RenderSettings::default()).unwrap();
    assert_eq!(ds.name_any(), "kmm-ci-a-dra");
    assert_eq!(ds.labels()[ROLE_LABEL], ROLE_DRA);
    assert_eq!(ds.labels()[MODULE_NAME_LABEL], "kmm-ci-a");
    let spec = pod_spec(&ds);
    assert_eq!(spec.host_network, Some(true));
    assert_eq!(
        spec.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert_eq!(spec.service_account_name.as_deref(), Some("dra-sa"));
    // Like the device plugin: only where the module is ready and the agent allows it.
    assert_eq!(
        spec.node_selector.clone().unwrap(),
        BTreeMap::from([
            (module_ready_label("labsv2", "kmm-ci-a"), String::new()),
            (schedule_version_label("labsv2", "kmm-ci-a"), String::new()),
        ])
    );
    let c = &spec.containers[0];
    assert_eq!(c.name, "dra");
    assert_eq!(c.security_context.as_ref().unwrap().privileged, Some(true));
    let mounts: Vec<&str> = c
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .map(|v| v.mount_path.as_str())
        .collect();
    assert_eq!(
        &mounts[..3],
        [KUBELET_PLUGINS_PATH, KUBELET_REGISTRY_PATH, CDI_PATH]
    );
    let volumes: Vec<(&str, &str)> = spec
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .filter_map(|v| Some((v.name.as_str(), v.host_path.as_ref()?.path.as_str())))
        .collect();
    assert!(volumes.contains(&("kubelet-plugins-registry", KUBELET_REGISTRY_PATH)));
    assert!(volumes.contains(&("cdi", CDI_PATH)));
    let env: Vec<&str> = c
        .env
        .as_ref()
        .unwrap()
        .iter()
        .map(|e| e.name.as_str())
        .collect();
    assert_eq!(
        &env[..6],
        [
            "NODE_NAME",
            "POD_UID",
            "CDI_ROOT",
            "KUBELET_REGISTRAR_DIRECTORY_PATH",
            "KUBELET_PLUGINS_DIRECTORY_PATH",
            "HEALTHCHECK_PORT"
        ]
    );
    let probe = c.liveness_probe.as_ref().unwrap().grpc.as_ref().unwrap();
    assert_eq!(probe.port, DRA_HEALTHCHECK_PORT);
    assert_eq!(probe.service.as_deref(), Some("liveness"));
    // Without `dra`, nothing.
    let mut plain = m.clone();
    plain.spec.dra = None;
    assert!(render_dra_daemonset(&plain, &RenderSettings::default()).is_none());
}

#[test]
fn without_a_loader_the_driver_follows_the_selector() {
    let m = dra_module(false);
    let ds = render_dra_daemonset(&m, &RenderSettings::default()).unwrap();
    assert_eq!(
        pod_spec(&ds).node_selector.clone().unwrap(),
        m.spec.selector
    );
}

#[test]
fn a_versioned_driver_is_named_and_scheduled_by_version() {
    let mut m = dra_module(true);
    m.spec.module_loader.as_mut().unwrap().container.version = Some("1.0".into());
    let ds = render_dra_daemonset(&m, &RenderSettings::default()).unwrap();
    assert_eq!(ds.name_any(), "kmm-ci-a-dra-1.0");
    assert_eq!(ds.labels()[MODULE_VERSION_LABEL], "1.0");
    let sel = pod_spec(&ds).node_selector.clone().unwrap();
    assert_eq!(sel[&schedule_version_label("labsv2", "kmm-ci-a")], "1.0");
    assert_eq!(
        sel[&module_version_ready_label("labsv2", "kmm-ci-a")],
        "1.0"
    );
}

#[test]
fn the_plan_holds_the_driver_and_its_device_classes() {
    let m = dra_module(true);
    let plan = plan_module(&m, [worker("w0")].iter(), &RenderSettings::default());
    assert!(plan.device_plugin.is_none());
    assert!(plan.names().contains("kmm-ci-a-dra"));
    let names: Vec<String> = plan.device_classes.iter().map(|c| c.name_any()).collect();
    assert_eq!(names, ["kmm-gpu", "kmm-gpu-any"]);
    for c in &plan.device_classes {
        assert_eq!(c.labels()[MODULE_NAME_LABEL], "kmm-ci-a");
        assert_eq!(c.labels()[MODULE_NAMESPACE_LABEL], "labsv2");
        assert!(c.metadata.owner_references.is_none());
    }
    let cel = &plan.device_classes[0].spec.selectors.as_ref().unwrap()[0];
    assert_eq!(
        cel.cel.as_ref().unwrap().expression,
        "device.driver == 'gpu.example.com'"
    );
    assert!(plan.device_classes[1].spec.selectors.is_none());
    assert!(plan.failed_device_classes.is_empty());
}

#[test]
fn a_device_class_that_does_not_decode_is_reported_not_rendered() {
    let mut m = dra_module(true);
    m.spec.dra.as_mut().unwrap().device_classes[0].selectors =
        vec![json!({ "cel": "not an object" })];
    let (classes, failed) = render_device_classes(&m);
    assert_eq!(classes.len(), 1);
    assert!(
        failed["kmm-gpu"].starts_with("spec.dra.deviceClasses[0] (kmm-gpu)"),
        "{failed:?}"
    );
}

#[test]
fn every_pod_gets_the_builtin_tolerations_after_the_modules() {
    let mut m = dra_module(true);
    let custom = Toleration {
        key: Some("dedicated".into()),
        operator: Some("Equal".into()),
        value: Some("gpu".into()),
        effect: Some("NoSchedule".into()),
        ..Default::default()
    };
    let dup = Toleration {
        key: Some("node.kubernetes.io/memory-pressure".into()),
        operator: Some("Exists".into()),
        effect: Some("NoSchedule".into()),
        ..Default::default()
    };
    m.spec.tolerations = vec![custom.clone(), dup.clone()];
    let plan = plan_module(&m, [worker("w0")].iter(), &RenderSettings::default());
    let mut dp_module = Module::lab(Lab::DevicePlugin).as_shipped().with_uid("u");
    dp_module.spec.tolerations = m.spec.tolerations.clone();
    let dp = crate::render::render_device_plugin_daemonset(&dp_module, &RenderSettings::default())
        .unwrap();
    for ds in [&plan.loaders[0], plan.dra.as_ref().unwrap(), &dp] {
        let t = pod_spec(ds).tolerations.clone().unwrap();
        assert_eq!(t[..2], [custom.clone(), dup.clone()], "{}", ds.name_any());
        let keys: Vec<&str> = t.iter().filter_map(|t| t.key.as_deref()).collect();
        assert_eq!(
            keys,
            [
                "dedicated",
                "node.kubernetes.io/memory-pressure",
                "node.kubernetes.io/disk-pressure",
                "node.kubernetes.io/pid-pressure"
            ],
            "user's first, built-ins once: {}",
            ds.name_any()
        );
        for b in &t[2..] {
            assert!(BUILTIN_TOLERATED_TAINTS.contains(&b.key.as_deref().unwrap()));
            assert_eq!(
                (
                    b.operator.as_deref(),
                    b.effect.as_deref(),
                    b.value.as_deref()
                ),
                (Some("Exists"), Some("NoSchedule"), None)
            );
        }
    }
    // With none of its own, a Module's pods still carry the three.
    m.spec.tolerations.clear();
    let t = crate::render::pod_tolerations(&m);
    assert_eq!(t.len(), 3);
}

/// The built-in tolerations do not make running loaders outdated: the loader template hash is
/// the one of the pod spec with the Module's tolerations only (what earlier agents rendered).
#[test]
fn builtin_tolerations_leave_the_loader_template_hash_alone() {
    let mut m = dra_module(true);
    let hash_of = |m: &Module| {
        let plan = plan_module(m, [worker("w0")].iter(), &RenderSettings::default());
        let ds = plan.loaders[0].clone();
        let mut spec = ds.spec.unwrap().template.spec.unwrap();
        let got = ds.metadata.annotations.unwrap()[crate::render::TEMPLATE_HASH_ANNOTATION].clone();
        assert_eq!(
            spec.tolerations.as_ref().unwrap().len(),
            m.spec.tolerations.len() + 3
        );
        spec.tolerations = (!m.spec.tolerations.is_empty()).then(|| m.spec.tolerations.clone());
        let before = short_hash(&serde_json::to_string(&Some(spec)).unwrap(), 16);
        (got, before)
    };
    let (got, before) = hash_of(&m);
    assert_eq!(got, before, "no tolerations of its own");
    m.spec.tolerations = vec![Toleration {
        key: Some("dedicated".into()),
        operator: Some("Exists".into()),
        ..Default::default()
    }];
    let (got2, before2) = hash_of(&m);
    assert_eq!(got2, before2);
    assert_ne!(got, got2, "the Module's own tolerations still count");
}
