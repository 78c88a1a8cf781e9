//! Renderer tests: the seed labs as Modules, over a small set of nodes.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Container, Node, Toleration};
use kube::ResourceExt;
use serde_json::json;
use shared_api::Module;
use shared_api::fixtures::Lab;
use shared_api::labels::*;
use shared_api::validate::{Context, validate_module};

use super::loader::loader_daemonset_name;
use super::nodes::{kernel_claims, node_labels};
use super::*;
use crate::cache::CachedPod;

const K1: &str = "5.14.0-284.36.1.el9_2.x86_64";
const K2: &str = "5.15.0-1.el9.x86_64";

/// A lab of the seeds, as the spoke receives it (no build or sign sections), with a UID.
fn fixture(lab: Lab) -> Module {
    let m = Module::lab(lab).as_shipped().with_uid("uid-1");
    assert_eq!(
        validate_module(
            &m,
            Context {
                kubernetes_minor: Some(20)
            }
        ),
        vec![],
        "{lab:?} must be valid"
    );
    m
}

fn node(name: &str, kernel: &str, labels: &[(&str, &str)]) -> Node {
    let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
    serde_json::from_value(json!({
        "metadata": { "name": name, "labels": labels },
        "status": { "nodeInfo": { "kernelVersion": kernel, "architecture": "", "bootID": "", "containerRuntimeVersion": "",
            "kubeProxyVersion": "", "kubeletVersion": "", "machineID": "", "operatingSystem": "", "osImage": "", "systemUUID": "" } }
    }))
    .unwrap()
}

fn worker(name: &str, kernel: &str) -> Node {
    node(name, kernel, &[("node-role.kubernetes.io/worker", "")])
}

fn loader_container(ds: &DaemonSet) -> &Container {
    &ds.spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0]
}

fn env(c: &Container) -> BTreeMap<String, String> {
    c.env
        .as_ref()
        .unwrap()
        .iter()
        .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
        .collect()
}

fn pod_spec(ds: &DaemonSet) -> &k8s_openapi::api::core::v1::PodSpec {
    ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap()
}

#[test]
fn prebuilt_image_loads_on_workers_only() {
    let m = fixture(Lab::Load);
    let nodes = [
        worker("w0", K1),
        worker("w1", K1),
        node("cp", K1, &[("node-role.kubernetes.io/control-plane", "")]),
    ];
    let plan = plan_module(&m, nodes.iter(), &RenderSettings::default());
    assert_eq!(plan.targeted_nodes, vec!["w0", "w1"]);
    assert_eq!(plan.loaders.len(), 1);
    assert!(plan.device_plugin.is_none());
    let ds = &plan.loaders[0];
    assert_eq!(ds.name_any(), loader_daemonset_name("kmm-ci-a", K1, None));
    assert!(
        ds.name_any().starts_with("kmm-ci-a-loader-")
            && ds.name_any().len() == "kmm-ci-a-loader-".len() + 10
    );
    assert_eq!(ds.namespace().as_deref(), Some("labsv2"));
    let labels = ds.labels();
    assert_eq!(labels[MODULE_NAME_LABEL], "kmm-ci-a");
    assert_eq!(labels[ROLE_LABEL], ROLE_LOADER);
    assert_eq!(labels[TARGET_KERNEL_LABEL], K1);
    assert!(!labels.contains_key(MODULE_VERSION_LABEL));
    let owner = &ds.owner_references()[0];
    assert_eq!(
        (
            owner.kind.as_str(),
            owner.name.as_str(),
            owner.uid.as_str(),
            owner.controller
        ),
        ("Module", "kmm-ci-a", "uid-1", Some(true))
    );

    let spec = pod_spec(ds);
    // The agent's worker label stands for `spec.selector` (it leaves a node only once the
    // device plugin is gone from it).
    assert_eq!(
        spec.node_selector.clone().unwrap(),
        BTreeMap::from([
            (KERNEL_LABEL.to_string(), K1.to_string()),
            (worker_version_label("labsv2", "kmm-ci-a"), String::new()),
        ])
    );
    assert_eq!(
        spec.priority_class_name.as_deref(),
        Some("system-node-critical"),
        "evicting a loader unloads its driver"
    );
    let strategy = ds.spec.as_ref().unwrap().update_strategy.as_ref().unwrap();
    assert_eq!(strategy.type_.as_deref(), Some("OnDelete"));
    assert_eq!(spec.service_account_name.as_deref(), Some("labsv2sa"));
    assert_eq!(
        spec.image_pull_secrets.as_ref().unwrap()[0].name,
        "myrepo-pull-secret"
    );
    let tmpl_meta = ds
        .spec
        .as_ref()
        .unwrap()
        .template
        .metadata
        .as_ref()
        .unwrap();
    assert_eq!(
        tmpl_meta.annotations.as_ref().unwrap()[MODULE_ANNOTATION],
        "labsv2/kmm-ci-a"
    );
    assert_eq!(tmpl_meta.labels.as_ref().unwrap()[TARGET_KERNEL_LABEL], K1);

    let c = loader_container(ds);
    assert_eq!(c.name, "module-loader");
    assert_eq!(
        c.image.as_deref(),
        Some("myrepo.xyz/kmm-labs:kmm-kmod-5.14.0-284.36.1.el9_2.x86_64-v1.0")
    );
    assert_eq!(c.command.clone().unwrap(), vec!["/bin/sh", "-c"]);
    assert_eq!(c.args.clone().unwrap(), vec![LOADER_SCRIPT.to_string()]);
    let pre_stop = c
        .lifecycle
        .as_ref()
        .unwrap()
        .pre_stop
        .as_ref()
        .unwrap()
        .exec
        .as_ref()
        .unwrap()
        .command
        .clone()
        .unwrap();
    assert_eq!(
        pre_stop,
        vec!["/bin/sh", "-c", LOADER_SCRIPT, "loader", "unload"]
    );
    let probe = c
        .readiness_probe
        .as_ref()
        .unwrap()
        .exec
        .as_ref()
        .unwrap()
        .command
        .clone()
        .unwrap();
    assert_eq!(
        probe,
        vec!["/bin/sh", "-c", LOADER_SCRIPT, "loader", "check"]
    );
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.run_as_user, Some(0));
    assert_eq!(
        sc.se_linux_options.as_ref().unwrap().type_.as_deref(),
        Some("spc_t")
    );
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    let res = c.resources.as_ref().unwrap();
    let requests = res.requests.as_ref().unwrap();
    assert!(
        requests.contains_key("cpu") && requests.contains_key("memory"),
        "not BestEffort: {requests:?}"
    );
    // No finalizer from the template: the agent holds a loader pod itself before it stops
    // one (controller::sequence::needs_hold), so a reboot's replaced pods cost no release.
    assert_eq!(tmpl_meta.finalizers, None);
    assert_eq!(
        sc.capabilities.as_ref().unwrap().add.clone().unwrap(),
        vec!["SYS_MODULE"]
    );
    assert_eq!(sc.privileged, None, "not privileged without firmware");
    assert_eq!(
        env(c),
        BTreeMap::from([
            ("KMM_MODULE_NAME".into(), "kmm-ci-a".into()),
            ("KMM_DIR_NAME".into(), "/opt".into()),
            ("KMM_MODULE_KEY".into(), "labsv2.kmm-ci-a".into()),
        ])
    );
    // Only the kernel's own module tree, read-only.
    let vols = spec.volumes.as_ref().unwrap();
    assert_eq!(vols.len(), 1);
    let own = format!("/lib/modules/{K1}");
    assert_eq!(vols[0].host_path.as_ref().unwrap().path, own);
    let mount = &c.volume_mounts.as_ref().unwrap()[0];
    assert_eq!(
        (mount.mount_path.as_str(), mount.read_only),
        (own.as_str(), Some(true))
    );
}

#[test]
fn in_tree_removal_reaches_the_loader() {
    let m = fixture(Lab::RemoveInTree);
    let plan = plan_module(&m, [worker("w0", K1)].iter(), &RenderSettings::default());
    let e = env(loader_container(&plan.loaders[0]));
    assert_eq!(e["KMM_IN_TREE_REMOVE"], "joydev");
    assert_eq!(e["KMM_MODULE_NAME"], "kmm-ci-a");
}

#[test]
fn device_plugin_runs_where_the_module_is_ready() {
    let m = fixture(Lab::DevicePlugin);
    let plan = plan_module(&m, [worker("w0", K1)].iter(), &RenderSettings::default());
    let dp = plan.device_plugin.as_ref().unwrap();
    assert_eq!(dp.name_any(), "kmm-ci-a-device-plugin");
    assert_eq!(dp.labels()[ROLE_LABEL], ROLE_DEVICE_PLUGIN);
    assert_eq!(dp.labels()[MODULE_NAME_LABEL], "kmm-ci-a");
    let spec = pod_spec(dp);
    assert_eq!(
        spec.node_selector.clone().unwrap(),
        BTreeMap::from([
            (module_ready_label("labsv2", "kmm-ci-a"), String::new()),
            (schedule_version_label("labsv2", "kmm-ci-a"), String::new()),
        ])
    );
    assert_eq!(
        spec.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert_eq!(spec.service_account_name.as_deref(), Some("labsv2sa"));
    assert_eq!(
        spec.image_pull_secrets.as_ref().unwrap()[0].name,
        "myrepo-pull-secret"
    );
    assert!(spec.init_containers.is_none());
    let c = &spec.containers[0];
    assert_eq!(c.name, "device-plugin");
    assert_eq!(
        c.image.as_deref(),
        Some("myrepo.xyz/simple-device-plugin:latest")
    );
    assert_eq!(c.image_pull_policy.as_deref(), Some("Always"));
    assert_eq!(c.args.clone().unwrap(), vec!["-config=config-labs.yaml"]);
    assert_eq!(c.security_context.as_ref().unwrap().privileged, Some(true));
    assert_eq!(
        c.volume_mounts.as_ref().unwrap()[0].mount_path,
        DEVICE_PLUGIN_HOST_PATH
    );
    let v = &spec.volumes.as_ref().unwrap()[0];
    assert_eq!(v.host_path.as_ref().unwrap().path, DEVICE_PLUGIN_HOST_PATH);

    // Without a loader, the plugin follows the Module's selector; an init container is rendered.
    let mut no_loader = m.clone();
    no_loader.spec.module_loader = None;
    let mut dp_spec = no_loader.spec.device_plugin.clone().unwrap();
    dp_spec.init_container = Some(dp_spec.container.clone());
    no_loader.spec.device_plugin = Some(dp_spec);
    let plan = plan_module(
        &no_loader,
        [worker("w0", K1)].iter(),
        &RenderSettings::default(),
    );
    assert!(plan.loaders.is_empty());
    let spec = pod_spec(plan.device_plugin.as_ref().unwrap()).clone();
    assert_eq!(spec.node_selector.unwrap(), no_loader.spec.selector);
    let init = &spec.init_containers.unwrap()[0];
    assert_eq!(init.name, "device-plugin-init");
    assert_eq!(
        init.security_context.as_ref().unwrap().privileged,
        Some(true)
    );
}

#[test]
fn versioned_module_selects_on_the_agents_worker_label() {
    let m = fixture(Lab::BuildWithVersion);
    let plan = plan_module(&m, [worker("w0", K1)].iter(), &RenderSettings::default());
    let ds = &plan.loaders[0];
    assert_eq!(ds.labels()[MODULE_VERSION_LABEL], "0.9");
    let sel = pod_spec(ds).node_selector.clone().unwrap();
    // The agent copies the user's version-module label into it, in order (docs/spoke.md).
    assert_eq!(sel[&worker_version_label("labsv2", "kmm-ci-a")], "0.9");
    assert!(!sel.contains_key(&version_module_label("labsv2", "kmm-ci-a")));
    assert_eq!(sel[KERNEL_LABEL], K1);
    assert_eq!(
        loader_container(ds).image.as_deref(),
        Some(format!("myrepo.xyz/kmm-labs:kmm-kmod-{K1}-v0.9").as_str())
    );

    let mut v10 = m.clone();
    let c = &mut v10.spec.module_loader.as_mut().unwrap().container;
    c.version = Some("1.0".into());
    c.kernel_mappings[0].container_image =
        "myrepo.xyz/kmm-labs:kmm-kmod-${KERNEL_FULL_VERSION}-v1.0".into();
    v10.spec.device_plugin = fixture(Lab::DevicePlugin).spec.device_plugin;
    let plan10 = plan_module(&v10, [worker("w0", K1)].iter(), &RenderSettings::default());
    assert_ne!(
        plan10.loaders[0].name_any(),
        ds.name_any(),
        "one DaemonSet per version"
    );
    let dp = plan10.device_plugin.unwrap();
    assert_eq!(dp.name_any(), "kmm-ci-a-device-plugin-1.0");
    let dp_sel = pod_spec(&dp).node_selector.clone().unwrap();
    assert_eq!(
        dp_sel[&module_version_ready_label("labsv2", "kmm-ci-a")],
        "1.0"
    );
    assert_eq!(dp_sel[&schedule_version_label("labsv2", "kmm-ci-a")], "1.0");
}

#[test]
fn soft_dependencies_become_the_loading_order() {
    let m = fixture(Lab::LoadDependencies);
    let plan = plan_module(&m, [worker("w0", K1)].iter(), &RenderSettings::default());
    let e = env(loader_container(&plan.loaders[0]));
    assert_eq!(e["KMM_LOADING_ORDER"], "kmm-ci-a\nkmm-ci-b");
    assert_eq!(
        loader_container(&plan.loaders[0]).image.as_deref(),
        Some(format!("quay.io/myrepo/kmmo-lab:kmm-kmod-{K1}").as_str())
    );
}

#[test]
fn two_kernels_two_daemonsets_and_an_unmapped_kernel_none() {
    let m = fixture(Lab::LoadDependencies); // maps only ^.*\.x86_64$
    let nodes = [
        worker("w0", K1),
        worker("w1", K2),
        worker("w2", K1),
        worker("arm", "6.1.0-18-arm64"),
    ];
    let plan = plan_module(&m, nodes.iter(), &RenderSettings::default());
    let kernels: Vec<&str> = plan
        .loaders
        .iter()
        .map(|d| d.labels()[TARGET_KERNEL_LABEL].as_str())
        .collect();
    assert_eq!(kernels, vec![K1, K2]);
    assert_ne!(plan.loaders[0].name_any(), plan.loaders[1].name_any());
    assert_eq!(
        plan.unmapped_kernels.iter().collect::<Vec<_>>(),
        vec!["6.1.0-18-arm64"]
    );
    assert!(plan.failed_kernels.is_empty());
}

#[test]
fn taints_need_tolerations() {
    let mut m = fixture(Lab::Load);
    let mut tainted = worker("t", K2);
    tainted.spec = Some(
        serde_json::from_value(
            json!({ "taints": [{ "key": "dedicated", "value": "gpu", "effect": "NoSchedule" }] }),
        )
        .unwrap(),
    );
    let mut not_ready = worker("nr", K2);
    not_ready.spec = Some(serde_json::from_value(json!({ "taints": [{ "key": "node.kubernetes.io/not-ready", "effect": "NoSchedule" }] })).unwrap());
    let mut pressure = worker("p", K1);
    pressure.spec = Some(serde_json::from_value(json!({ "taints": [{ "key": "node.kubernetes.io/disk-pressure", "effect": "NoSchedule" }] })).unwrap());
    let nodes = [tainted, not_ready, pressure];
    let plan = plan_module(&m, nodes.iter(), &RenderSettings::default());
    assert_eq!(
        plan.targeted_nodes,
        vec!["p"],
        "DaemonSets tolerate pressure taints, not foreign ones or not-ready/NoSchedule"
    );
    m.spec.tolerations = vec![Toleration {
        key: Some("dedicated".into()),
        operator: Some("Equal".into()),
        value: Some("gpu".into()),
        effect: Some("NoSchedule".into()),
        ..Default::default()
    }];
    let plan = plan_module(&m, nodes.iter(), &RenderSettings::default());
    assert_eq!(plan.targeted_nodes, vec!["t", "p"]);
    assert_eq!(
        pod_spec(&plan.loaders[0]).tolerations.clone().unwrap()[..1],
        m.spec.tolerations[..]
    );
}

#[test]
fn firmware_makes_the_loader_privileged_with_the_host_directory() {
    let mut m = fixture(Lab::Load);
    m.spec
        .module_loader
        .as_mut()
        .unwrap()
        .container
        .modprobe
        .firmware_path = Some("/firmware".into());
    let settings = RenderSettings {
        firmware_host_path: "/lib/firmware/updates".into(),
        loader_run_as_user: 1000,
        loader_selinux_type: "kmm_loader_t".into(),
        ..Default::default()
    };
    let plan = plan_module(&m, [worker("w0", K1)].iter(), &settings);
    let ds = &plan.loaders[0];
    let c = loader_container(ds);
    // Upstream's worker.runAsUser and worker.seLinuxType reach the loader.
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.run_as_user, Some(1000));
    assert_eq!(
        sc.se_linux_options.as_ref().unwrap().type_.as_deref(),
        Some("kmm_loader_t")
    );
    assert_eq!(c.security_context.as_ref().unwrap().privileged, Some(true));
    let e = env(c);
    assert_eq!(
        (
            e["KMM_FIRMWARE_PATH"].as_str(),
            e["KMM_FIRMWARE_HOST_PATH"].as_str()
        ),
        ("/firmware", "/lib/firmware/updates")
    );
    let fw = pod_spec(ds)
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == "firmware")
        .unwrap();
    let hp = fw.host_path.as_ref().unwrap();
    assert_eq!(
        (hp.path.as_str(), hp.type_.as_deref()),
        ("/lib/firmware/updates", Some("DirectoryOrCreate"))
    );
    assert!(
        c.volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .any(|m| m.mount_path == "/lib/firmware/updates")
    );
}

#[test]
fn raw_args_replace_the_module_name() {
    let mut m = fixture(Lab::Load);
    let mp = &mut m.spec.module_loader.as_mut().unwrap().container.modprobe;
    mp.module_name = None;
    mp.raw_args = Some(shared_api::module::ModprobeArgs {
        load: vec!["-v".into(), "kmm_ci_a".into()],
        unload: vec!["-rv".into(), "kmm_ci_a".into()],
    });
    mp.dir_name = Some("/usr".into());
    let plan = plan_module(&m, [worker("w0", K1)].iter(), &RenderSettings::default());
    let e = env(loader_container(&plan.loaders[0]));
    assert!(!e.contains_key("KMM_MODULE_NAME"));
    assert_eq!(
        (
            e["KMM_RAW_LOAD"].as_str(),
            e["KMM_RAW_UNLOAD"].as_str(),
            e["KMM_DIR_NAME"].as_str()
        ),
        ("-v\nkmm_ci_a", "-rv\nkmm_ci_a", "/usr")
    );
}

#[test]
fn hash_follows_content_and_names_stay_short() {
    let m = fixture(Lab::Load);
    let a = plan_module(&m, [worker("w0", K1)].iter(), &RenderSettings::default())
        .loaders
        .remove(0);
    let b = plan_module(&m, [worker("w0", K1)].iter(), &RenderSettings::default())
        .loaders
        .remove(0);
    assert_eq!(spec_hash(&a), spec_hash(&b));
    let mut m2 = m.clone();
    m2.spec
        .module_loader
        .as_mut()
        .unwrap()
        .container
        .kernel_mappings[0]
        .container_image = "myrepo.xyz/kmm-labs:other".into();
    let c = plan_module(&m2, [worker("w0", K1)].iter(), &RenderSettings::default())
        .loaders
        .remove(0);
    assert_eq!(a.name_any(), c.name_any());
    assert_ne!(spec_hash(&a), spec_hash(&c));
    let long = loader_daemonset_name(&"m".repeat(60), K1, Some("1.0"));
    assert!(long.len() <= 63, "{long}");
    assert!(
        super::device_plugin::device_plugin_daemonset_name(&"m".repeat(60), Some("1.0")).len()
            <= 63
    );
    assert_eq!(
        super::device_plugin::device_plugin_daemonset_name("m", Some("V_1")),
        format!("m-device-plugin-v{}", short_hash("V_1", 8))
    );
}

fn pod(
    ns: &str,
    module: &str,
    role: &str,
    node: &str,
    ready: bool,
    version: Option<&str>,
) -> CachedPod {
    let mut labels = BTreeMap::from([(MODULE_NAME_LABEL, module), (ROLE_LABEL, role)]);
    if let Some(v) = version {
        labels.insert(MODULE_VERSION_LABEL, v);
    }
    serde_json::from_value(json!({
        "metadata": { "name": format!("{module}-{role}-{node}"), "namespace": ns, "labels": labels },
        "spec": { "nodeName": node, "containers": [] },
        "status": { "phase": "Running", "conditions": [{ "type": "Ready", "status": if ready { "True" } else { "False" } }] }
    }))
    .unwrap()
}

#[test]
fn node_labels_follow_ready_pods() {
    let pods = [
        pod("labsv2", "kmm-ci-a", ROLE_LOADER, "w0", true, Some("1.0")),
        pod("labsv2", "kmm-ci-a", ROLE_DEVICE_PLUGIN, "w0", true, None),
        pod("labsv2", "kmm-ci-a", ROLE_LOADER, "w1", false, None),
        pod("other", "kmm-ci-a", ROLE_LOADER, "w1", true, None),
        pod("labsv2", "kmm-ci-b", ROLE_LOADER, "w1", true, None),
    ];
    let w0 = node_labels("labsv2", "kmm-ci-a", "w0", pods.iter());
    assert_eq!(
        w0,
        BTreeMap::from([
            (module_ready_label("labsv2", "kmm-ci-a"), String::new()),
            (
                module_version_ready_label("labsv2", "kmm-ci-a"),
                "1.0".to_string()
            ),
            (
                device_plugin_ready_label("labsv2", "kmm-ci-a"),
                String::new()
            ),
        ])
    );
    assert!(
        node_labels("labsv2", "kmm-ci-a", "w1", pods.iter()).is_empty(),
        "unready, other namespace, other module"
    );
    let mut terminating = pod("labsv2", "kmm-ci-a", ROLE_LOADER, "w2", true, None);
    terminating.metadata.deletion_timestamp =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
        ));
    assert_eq!(
        node_labels("labsv2", "kmm-ci-a", "w2", [terminating.clone()].iter()),
        BTreeMap::from([(module_ready_label("labsv2", "kmm-ci-a"), String::new())]),
        "a terminating loader pod has not unloaded yet: the module is loaded until it is gone"
    );
    let mut plugin = pod("labsv2", "kmm-ci-a", ROLE_DEVICE_PLUGIN, "w2", true, None);
    plugin.metadata.deletion_timestamp = terminating.metadata.deletion_timestamp.clone();
    assert!(
        node_labels("labsv2", "kmm-ci-a", "w2", [plugin].iter()).is_empty(),
        "a terminating device plugin no longer serves"
    );
}

#[test]
fn kernel_claim_is_distinct_sorted_and_split_when_long() {
    let nodes = [
        worker("1", "b"),
        worker("2", "a1"),
        worker("3", "a2"),
        worker("4", "b"),
        worker("5", "a1"),
    ];
    assert_eq!(
        kernel_claims(nodes.iter()),
        vec![(
            shared_api::ocm::KERNEL_VERSIONS_CLAIM.to_string(),
            "a1\na2\nb".to_string()
        )]
    );
    let many: Vec<Node> = (0..80)
        .map(|i| worker(&format!("n{i}"), &format!("5.14.0-{i:03}.el9_2.x86_64")))
        .collect();
    let claims = kernel_claims(many.iter());
    assert!(claims.len() >= 2, "{} claims", claims.len());
    assert!(claims.iter().all(|(_, v)| v.len() <= 1024));
    assert_eq!(
        claims[1].0,
        format!("{}.1", shared_api::ocm::KERNEL_VERSIONS_CLAIM)
    );
    let joined: Vec<String> = claims
        .iter()
        .flat_map(|(_, v)| v.lines().map(str::to_string))
        .collect();
    assert_eq!(joined.len(), 80);
}
