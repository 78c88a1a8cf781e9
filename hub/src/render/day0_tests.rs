#![allow(clippy::unwrap_used, clippy::expect_used)]

use kube::ResourceExt as _;
use shared_api::mcm::ManagedClusterModuleSpec;

use super::*;
use crate::decide::cluster::{Shipped, decide_cluster};
use crate::decide::day0::{BaseImage, BaseLookup, plan_day0};
use crate::decide::image::ImageOutcome;
use crate::decide::plan::{ClusterFacts, plan};
use crate::render::day1::kinds;
use crate::render::prerequisites::PullSecretSource;
use crate::render::{SPEC_HASH_ANNOTATION, render_manifestwork};

const BASE: &str =
    "reg:5000/rhcos@sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const DIGEST_A: &str = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const LAYERED: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
const K1: &str = "5.14.0-427.13.1.el9_4.x86_64";

const SPEC: &str = r#"
spokeNamespace: spoke-ns
selector: {}
moduleSpec:
  selector: {}
  devicePlugin: {container: {image: 'r/dp:1'}}
day0:
  machineConfigPool: worker
  containerImage: reg:5000/os/rhcos-kmod
  build: {dockerfileConfigMap: {name: layering}}
"#;

fn mcm(spec: &str) -> ManagedClusterModule {
    let spec: ManagedClusterModuleSpec = serde_yaml::from_str(spec).unwrap();
    let mut m = ManagedClusterModule::new("simple-kmod", spec);
    m.metadata.uid = Some("uid-1".into());
    m
}

fn shipped(url: &str) -> ShippedDay0 {
    ShippedDay0 {
        name: "99-worker-kmm-day0-simple-kmod".into(),
        os_image_url: url.into(),
        base_image: BASE.into(),
        kernel: K1.into(),
    }
}

#[test]
fn the_machine_config_points_the_pool_at_the_pinned_layered_image() {
    let m = mcm(SPEC);
    let mut w = render_manifestwork(&m, "c1", &[]).unwrap();
    let before = w.annotations()[SPEC_HASH_ANNOTATION].clone();
    let url = format!("reg:5000/os/rhcos-kmod@{LAYERED}");
    add_day0(&mut w, &m, &shipped(&url)).unwrap();
    let k = kinds(&w);
    assert_eq!(
        &k[k.len() - 2..],
        ["MachineConfig", "MachineConfigPool"],
        "{k:?}"
    );
    assert_eq!(
        k[0], "Namespace",
        "the Module and its prerequisites come first: {k:?}"
    );
    assert_ne!(w.annotations()[SPEC_HASH_ANNOTATION], before, "re-hashed");
    let mc = &w.spec.workload.manifests[k.len() - 2].0;
    assert_eq!(
        *mc,
        json!({
            "apiVersion": "machineconfiguration.openshift.io/v1",
            "kind": "MachineConfig",
            "metadata": {
                "name": "99-worker-kmm-day0-simple-kmod",
                "labels": {"machineconfiguration.openshift.io/role": "worker"},
                "annotations": {
                    "hub.kmm.sigs.x-k8s.io/day0-os-image": BASE,
                    "hub.kmm.sigs.x-k8s.io/day0-kernel": K1,
                },
            },
            "spec": {"osImageURL": url},
        })
    );
    // The pool is read only, orphaned, with its counts as feedback (as for Day 1).
    let pool_cfg = w
        .spec
        .manifest_configs
        .iter()
        .find(|c| c.resource_identifier.resource == "machineconfigpools")
        .unwrap();
    assert_eq!(pool_cfg.update_strategy.as_ref().unwrap().type_, "ReadOnly");
    assert_eq!(pool_cfg.feedback_rules[0].json_paths.len(), 3);
    let orphans = &w.spec.delete_option.as_ref().unwrap();
    assert_eq!(orphans.propagation_policy, "SelectivelyOrphan");
    // Read back from the work, and not taken for a Day-1 MachineConfig.
    assert_eq!(shipped_day0(&w), Some(shipped(&url)));
    assert!(crate::render::day1::shipped_day1(&w).is_none());
}

#[test]
fn an_unpinned_image_is_never_shipped() {
    let m = mcm(SPEC);
    let mut w = render_manifestwork(&m, "c1", &[]).unwrap();
    let e = add_day0(&mut w, &m, &shipped("reg:5000/os/rhcos-kmod:latest")).unwrap_err();
    assert!(matches!(e, RenderError::NotPinned(_)), "{e:?}");
}

fn facts(name: &str, openshift: bool) -> ClusterFacts {
    ClusterFacts {
        name: name.into(),
        openshift,
        os_image: Some(BASE.into()),
        available: true,
        ..Default::default()
    }
}

fn bases(kernel: Option<&str>) -> BTreeMap<String, BaseLookup> {
    [(
        BASE.to_string(),
        Ok(BaseImage {
            digest: DIGEST_A.into(),
            kernel: kernel.map(str::to_string),
        }),
    )]
    .into()
}

/// The whole decision: OpenShift clusters get the MachineConfig with the layered image once
/// it is ready; a plain cluster the Module only; while building, nothing unpinned ships.
#[test]
fn openshift_clusters_get_the_layered_image_once_ready() {
    let m = mcm(SPEC);
    let cs = [facts("ocp", true), facts("k8s", false)];
    let mut p = plan(&m, &cs).unwrap();
    plan_day0(&m, &mut p, &cs, &bases(Some(K1)));
    let image = format!("reg:5000/os/rhcos-kmod:{K1}-aaaaaaaaaaaa");
    assert_eq!(p.images.keys().collect::<Vec<_>>(), vec![&image]);
    let decide = |outcomes: &BTreeMap<String, ImageOutcome>, old: Option<&ShippedDay0>| {
        p.clusters
            .iter()
            .map(|cp| {
                let s = Shipped {
                    mappings: &[],
                    day0: old,
                };
                let d = decide_cluster(&m, cp, outcomes, s, None, &PullSecretSource::None);
                (cp.cluster.clone(), d)
            })
            .collect::<BTreeMap<_, _>>()
    };
    let building: BTreeMap<String, ImageOutcome> =
        [(image.clone(), ImageOutcome::building("Job running".into()))].into();
    let d = decide(&building, None);
    assert!(!kinds(d["ocp"].desired.as_ref().unwrap()).contains(&"MachineConfig".to_string()));
    assert_eq!(
        d["ocp"].day0.as_ref().unwrap().waiting.as_ref().unwrap().0,
        "ImageBuilding"
    );
    let ready: BTreeMap<String, ImageOutcome> =
        [(image.clone(), ImageOutcome::ready(LAYERED.into()))].into();
    let d = decide(&ready, None);
    let ocp = d["ocp"].desired.as_ref().unwrap();
    assert_eq!(
        shipped_day0(ocp).unwrap().os_image_url,
        format!("reg:5000/os/rhcos-kmod@{LAYERED}")
    );
    let k8s = kinds(d["k8s"].desired.as_ref().unwrap());
    assert!(k8s.contains(&"Module".to_string()) && !k8s.contains(&"MachineConfig".to_string()));
    assert!(d["k8s"].day0.is_none());
    // The kernel label missing later (or the registry down): the shipped one stays.
    let mut p2 = plan(&m, &cs).unwrap();
    plan_day0(&m, &mut p2, &cs, &bases(None));
    let old = shipped(&format!("reg:5000/os/rhcos-kmod@{LAYERED}"));
    let s = Shipped {
        mappings: &[],
        day0: Some(&old),
    };
    let d = decide_cluster(
        &m,
        &p2.clusters[1],
        &BTreeMap::new(),
        s,
        None,
        &PullSecretSource::None,
    );
    assert_eq!(p2.clusters[1].cluster, "ocp");
    assert_eq!(shipped_day0(d.desired.as_ref().unwrap()), Some(old));
    assert_eq!(
        d.day0.unwrap().waiting.unwrap().0,
        crate::decide::day0::OS_IMAGE_KERNEL_UNKNOWN
    );
}

#[test]
fn status_shows_the_pool_and_what_the_cluster_waits_for() {
    let want = Day0Want {
        os_image: Some(BASE.into()),
        kernel: Some(K1.into()),
        image: Some("reg:5000/os/rhcos-kmod:x".into()),
        waiting: Some(("ImageBuilding".into(), "build Job running".into())),
    };
    let old = shipped(&format!("reg:5000/os/rhcos-kmod@{LAYERED}"));
    let fb: BTreeMap<String, i64> = [
        ("day1.machineCount".to_string(), 3),
        ("day1.updatedMachineCount".to_string(), 3),
        ("day1.degradedMachineCount".to_string(), 0),
    ]
    .into();
    let s = cluster_status("c1", &want, Some(&old), &fb);
    assert_eq!(s.pool, "Updated");
    assert_eq!(s.image.as_deref(), Some(old.os_image_url.as_str()));
    assert_eq!(s.machine_config.as_deref(), Some(old.name.as_str()));
    assert_eq!(s.reason.as_deref(), Some("ImageBuilding"));
    assert_eq!(s.machine_count, Some(3));
    let s = cluster_status("c1", &Day0Want::default(), None, &fb);
    assert_eq!((s.pool.as_str(), s.image), ("", None));
}
