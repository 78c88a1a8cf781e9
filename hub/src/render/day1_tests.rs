#![allow(clippy::unwrap_used, clippy::expect_used)]

use kube::ResourceExt as _;
use shared_api::mcm::ManagedClusterModuleSpec;
use shared_api::module::TlsOptions;

use super::*;
use crate::decide::cluster::decide_cluster;
use crate::decide::plan::{ClusterFacts, plan};
use crate::render::prerequisites::PullSecretSource;
use crate::render::{pin, render_manifestwork};

const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

const SPEC: &str = r#"
spokeNamespace: spoke-ns
selector: {}
day1: {machineConfigPool: worker}
moduleSpec:
  selector: {}
  moduleLoader:
    container:
      modprobe: {moduleName: sfc}
      kernelMappings:
        - regexp: '^.*$'
          containerImage: reg/sfc:${KERNEL_FULL_VERSION}
          inTreeModulesToRemove: [sfc_old]
"#;

fn mcm(spec: &str) -> ManagedClusterModule {
    let spec: ManagedClusterModuleSpec = serde_yaml::from_str(spec).unwrap();
    let mut m = ManagedClusterModule::new("sfc-day1", spec);
    m.metadata.uid = Some("uid-1".into());
    m
}

fn ready(kernel: &str, digest: &str) -> ReadyMapping {
    ReadyMapping {
        kernel: kernel.into(),
        pinned_image: pin(&format!("reg/sfc:{kernel}"), digest),
        registry_tls: TlsOptions::default(),
        in_tree_modules_to_remove: vec!["sfc_old".into()],
    }
}

fn files(mc: &Value) -> BTreeMap<String, String> {
    mc["spec"]["config"]["storage"]["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["path"].as_str().unwrap().to_string(),
                decode_data_url(f["contents"]["source"].as_str().unwrap()).unwrap(),
            )
        })
        .collect()
}

#[test]
fn the_machine_config_and_the_read_only_pool_follow_the_module() {
    let m = mcm(SPEC);
    let mappings = [ready("5.14.0-1", D1), ready("5.14.0-3", D2)];
    let mut w = render_manifestwork(&m, "c1", &mappings).unwrap();
    let before = w.annotations()[SPEC_HASH_ANNOTATION].clone();
    add_day1(&mut w, &m, &mappings).unwrap();
    let kinds = kinds(&w);
    assert_eq!(
        &kinds[kinds.len() - 3..],
        ["Module", "MachineConfig", "MachineConfigPool"]
    );
    assert_ne!(w.annotations()[SPEC_HASH_ANNOTATION], before, "re-hashed");
    assert_eq!(
        w.annotations()[SPEC_HASH_ANNOTATION],
        crate::render::spec_hash(&w.spec)
    );

    let mc = &w.spec.workload.manifests[kinds.len() - 2].0;
    assert_eq!(mc["metadata"]["name"], "99-worker-kmm-sfc-day1");
    assert_eq!(
        mc["metadata"]["labels"]["machineconfiguration.openshift.io/role"],
        "worker"
    );
    let f = files(mc);
    assert_eq!(
        f["/etc/kmm-day1/sfc.images"],
        format!("5.14.0-1 reg/sfc@{D1}\n5.14.0-3 reg/sfc@{D2}\n",)
    );
    let units = mc["spec"]["config"]["systemd"]["units"].to_string();
    assert!(
        units.contains("kmm-day1-load @/etc/kmm-day1/sfc.images sfc sfc_old"),
        "the mapping's in-tree module is the default: {units}"
    );

    // The pool: only its name, never written, its counts fed back.
    let pool = &w.spec.workload.manifests[kinds.len() - 1].0;
    assert_eq!(
        pool,
        &json!({"apiVersion": MC_API_VERSION, "kind": "MachineConfigPool",
                "metadata": {"name": "worker"}})
    );
    let configs = &w.spec.manifest_configs;
    let pool_cfg = configs
        .iter()
        .find(|c| c.resource_identifier.resource == "machineconfigpools")
        .unwrap();
    assert_eq!(pool_cfg.update_strategy.as_ref().unwrap().type_, "ReadOnly");
    assert_eq!(pool_cfg.resource_identifier.group, MC_GROUP);
    assert_eq!(pool_cfg.resource_identifier.namespace, "");
    let paths: Vec<&str> = pool_cfg.feedback_rules[0]
        .json_paths
        .iter()
        .map(|p| p.path.as_str())
        .collect();
    assert_eq!(
        paths,
        [
            ".status.machineCount",
            ".status.updatedMachineCount",
            ".status.degradedMachineCount"
        ]
    );
    let orphans = &w
        .spec
        .delete_option
        .as_ref()
        .unwrap()
        .selectively_orphans
        .as_ref()
        .unwrap()
        .orphaning_rules;
    assert!(
        orphans
            .iter()
            .any(|o| o.resource == "machineconfigpools" && o.name == "worker"),
        "the pool is never deleted with the work: {orphans:?}"
    );
    assert!(
        !orphans.iter().any(|o| o.resource == "machineconfigs"),
        "the MachineConfig goes with the work"
    );
    let mc_cfg = configs
        .iter()
        .find(|c| c.resource_identifier.resource == "machineconfigs")
        .unwrap();
    assert_eq!(mc_cfg.resource_identifier.name, "99-worker-kmm-sfc-day1");
    assert_eq!(
        mc_cfg.update_strategy.as_ref().unwrap().type_,
        "ServerSideApply"
    );

    // Read back from the work as the status reports it.
    let (name, images) = shipped_day1(&w).unwrap();
    assert_eq!(name, "99-worker-kmm-sfc-day1");
    assert_eq!(
        images,
        vec![
            format!("5.14.0-1=reg/sfc@{D1}"),
            format!("5.14.0-3=reg/sfc@{D2}")
        ]
    );
}

#[test]
fn without_day1_the_work_is_untouched_and_names_and_modules_can_be_set() {
    let plain = mcm(&SPEC.replace("day1: {machineConfigPool: worker}\n", ""));
    let mappings = [ready("5.14.0-1", D1)];
    let mut w = render_manifestwork(&plain, "c1", &mappings).unwrap();
    let before = w.clone();
    add_day1(&mut w, &plain, &mappings).unwrap();
    assert_eq!(
        serde_json::to_value(&w).unwrap(),
        serde_json::to_value(&before).unwrap()
    );
    assert!(shipped_day1(&w).is_none());

    let named = mcm(&SPEC.replace(
        "day1: {machineConfigPool: worker}",
        "day1: {machineConfigPool: infra, machineConfigName: 50-infra-sfc, inTreeModule: sfc_x}",
    ));
    let mut w = render_manifestwork(&named, "c1", &mappings).unwrap();
    add_day1(&mut w, &named, &mappings).unwrap();
    let mc = &w
        .spec
        .workload
        .manifests
        .iter()
        .find(|m| m.0["kind"] == "MachineConfig")
        .unwrap()
        .0;
    assert_eq!(mc["metadata"]["name"], "50-infra-sfc");
    assert_eq!(
        mc["metadata"]["labels"]["machineconfiguration.openshift.io/role"],
        "infra"
    );
    assert!(mc.to_string().contains("sfc sfc_x"), "{mc}");
}

#[test]
fn only_openshift_clusters_get_the_machine_config() {
    let m = mcm(SPEC);
    let facts = |name: &str, openshift: bool| ClusterFacts {
        name: name.into(),
        kernels: Some(vec!["5.14.0-1".into()]),
        openshift,
        ..Default::default()
    };
    let (ocp, k8s) = (facts("ocp", true), facts("k8s", false));
    let p = plan(&m, [&ocp, &k8s]).unwrap();
    let outcomes = BTreeMap::from([(
        "reg/sfc:5.14.0-1".to_string(),
        crate::decide::image::ImageOutcome::ready(D1.into()),
    )]);
    let got: BTreeMap<String, Vec<String>> = p
        .clusters
        .iter()
        .map(|cp| {
            let d = decide_cluster(
                &m,
                cp,
                &outcomes,
                Default::default(),
                None,
                &PullSecretSource::None,
            );
            (cp.cluster.clone(), kinds(&d.desired.unwrap()))
        })
        .collect();
    assert!(got["ocp"].contains(&"MachineConfig".to_string()));
    assert!(!got["k8s"].contains(&"MachineConfig".to_string()));
    assert!(got["k8s"].contains(&"Module".to_string()));
}

#[test]
fn pool_states_from_feedback() {
    let shipped = || ("mc".to_string(), vec!["k=i".to_string()]);
    let fb = |m: Option<i64>, u: Option<i64>, d: Option<i64>| {
        let mut f = BTreeMap::new();
        for (k, v) in [
            ("day1.machineCount", m),
            ("day1.updatedMachineCount", u),
            ("day1.degradedMachineCount", d),
        ] {
            if let Some(v) = v {
                f.insert(k.to_string(), v);
            }
        }
        f
    };
    let state = |f| cluster_status("c", shipped(), &f).pool;
    assert_eq!(state(fb(None, None, None)), "Unknown");
    assert_eq!(state(fb(Some(3), Some(1), Some(0))), "Updating");
    assert_eq!(state(fb(Some(3), Some(3), Some(0))), "Updated");
    assert_eq!(state(fb(Some(3), Some(3), Some(1))), "Degraded");
    let s = cluster_status("c", shipped(), &fb(Some(2), Some(1), None));
    assert_eq!(
        (
            s.machine_count,
            s.updated_machine_count,
            s.degraded_machine_count
        ),
        (Some(2), Some(1), None)
    );
}

#[test]
fn openshift_by_label_or_claim() {
    let labels = |v: &str| BTreeMap::from([(VENDOR_LABEL.to_string(), v.to_string())]);
    assert!(is_openshift(&labels("OpenShift"), None));
    assert!(is_openshift(&BTreeMap::new(), Some("OpenShift")));
    assert!(!is_openshift(&labels("EKS"), Some("EKS")));
    assert!(!is_openshift(&BTreeMap::new(), None));
}
