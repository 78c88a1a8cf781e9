//! Truth tables of the Module status: counts, and Ready vs Progressing vs Degraded.

use shared_api::labels::kernel_label_value;
use shared_api::module::ModuleStatus;

use super::*;
use crate::controller::testkit::*;
use crate::render::{RenderSettings, plan_module};

const NOW: Timestamp = Timestamp::UNIX_EPOCH;

fn kernel() -> String {
    kernel_label_value(KERNEL)
}

/// The status of `m` over `nodes` with the given DaemonSets and pods, rendered as the
/// reconciler renders it.
fn status_of(
    m: &Module,
    nodes: Vec<Node>,
    owned: Vec<DaemonSet>,
    pods: Vec<CachedPod>,
) -> ModuleStatus {
    let nodes = cached(nodes);
    let plan = plan_module(m, nodes.iter().map(Arc::as_ref), &RenderSettings::default());
    module_status(
        m,
        &[],
        Some(&plan),
        &nodes,
        &cached(owned),
        &cached(pods),
        NOW,
    )
}

fn two_nodes() -> Vec<Node> {
    vec![node("n1"), node("n2")]
}

fn available() -> Vec<DaemonSet> {
    vec![
        loader_ds(&kernel(), None).observed(2, 2),
        plugin_ds(None).observed(2, 2),
    ]
}

#[test]
fn an_unobserved_daemonset_is_never_read_as_nothing_to_do() {
    let ds = |generation: i64, status: Option<(i64, i32, i32)>| -> Arc<DaemonSet> {
        let mut d = DaemonSet::default();
        d.metadata.generation = Some(generation);
        d.status = status.map(|(observed, desired, available)| {
            k8s_openapi::api::apps::v1::DaemonSetStatus {
                observed_generation: Some(observed),
                desired_number_scheduled: desired,
                number_available: Some(available),
                ..Default::default()
            }
        });
        Arc::new(d)
    };
    // Fresh: no status yet.
    assert_eq!(sum_status(&[&ds(1, None)], false), (1, 0));
    // A status of the previous generation.
    assert_eq!(sum_status(&[&ds(2, Some((1, 0, 0)))], false), (1, 0));
    // Observed: the controller's word counts, zero included...
    assert_eq!(sum_status(&[&ds(2, Some((2, 0, 0)))], false), (0, 0));
    // ...but not for loaders: one whose node is not yet labelled still has a node to load.
    assert_eq!(sum_status(&[&ds(2, Some((2, 0, 0)))], true), (1, 0));
    assert_eq!(
        sum_status(&[&ds(1, Some((1, 3, 2))), &ds(1, Some((1, 1, 1)))], true),
        (4, 3)
    );
}

#[test]
fn ready_when_every_expected_node_has_the_module() {
    let st = status_of(&module(), two_nodes(), available(), vec![]);
    let c = &st.conditions;
    assert_eq!(condition(c, VALID).0, "True");
    assert_eq!(
        condition(c, READY),
        (
            "True",
            "Available",
            "module loaded on 2 of 2 nodes (2 selected)"
        )
    );
    assert_eq!(condition(c, PROGRESSING), ("False", "Available", ""));
    assert_eq!(condition(c, DEGRADED), ("False", "AsExpected", ""));
    let counts = |d: Option<DaemonSetStatus>| {
        d.map(|d| {
            (
                d.nodes_matching_selector_number,
                d.desired_number,
                d.available_number,
            )
        })
    };
    assert_eq!(counts(st.module_loader), Some((2, 2, 2)));
    assert_eq!(counts(st.device_plugin), Some((2, 2, 2)));
    assert_eq!(st.observed_generation, Some(1));
}

#[test]
fn progressing_until_every_daemonset_is_there_observed_and_available() {
    let loader = || loader_ds(&kernel(), None);
    let loader_name = loader().name_any();
    let plugin = || plugin_ds(None).observed(2, 2);
    for (owned, message) in [
        (
            vec![plugin()],
            "creating DaemonSets; module loaded on 0 of 2 nodes (2 selected)".to_string(),
        ),
        (
            vec![loader().observed(2, 1), plugin()],
            format!("waiting for {loader_name}; module loaded on 1 of 2 nodes (2 selected)"),
        ),
        (
            vec![loader(), plugin()],
            format!("waiting for {loader_name}; module loaded on 0 of 2 nodes (2 selected)"),
        ),
        (
            vec![loader().observed(2, 2).bumped(), plugin()],
            format!("waiting for {loader_name}; module loaded on 2 of 2 nodes (2 selected)"),
        ),
        // Observed with nothing scheduled: the worker labels are not set yet.
        (
            vec![loader().observed(0, 0), plugin()],
            "creating DaemonSets; module loaded on 0 of 2 nodes (2 selected)".to_string(),
        ),
        // Being deleted counts as missing.
        (
            vec![loader().observed(2, 2).deleting(), plugin()],
            "creating DaemonSets; module loaded on 0 of 2 nodes (2 selected)".to_string(),
        ),
    ] {
        let st = status_of(&module(), two_nodes(), owned, vec![]);
        let c = &st.conditions;
        assert_eq!(
            condition(c, READY),
            ("False", "Progressing", message.as_str())
        );
        assert_eq!(
            condition(c, PROGRESSING),
            ("True", "Progressing", message.as_str())
        );
        assert_eq!(condition(c, DEGRADED).0, "False");
    }
    // A loader with nothing scheduled still desires a pod.
    let st = status_of(
        &module(),
        two_nodes(),
        vec![loader().observed(0, 0), plugin()],
        vec![],
    );
    assert_eq!(st.module_loader.map(|d| d.desired_number), Some(1));
}

#[test]
fn every_targeted_kernel_needs_its_loader() {
    let nodes = vec![node("n1"), node("n2").kernel("6.1.0-14-amd64")];
    let st = status_of(&module(), nodes.clone(), available(), vec![]);
    assert_eq!(
        condition(&st.conditions, READY),
        (
            "False",
            "Progressing",
            "creating DaemonSets; module loaded on 2 of 2 nodes (2 selected)"
        )
    );
    let mut owned = available();
    owned.push(loader_ds(&kernel_label_value("6.1.0-14-amd64"), None).observed(1, 1));
    let st = status_of(&module(), nodes, owned, vec![]);
    assert_eq!(condition(&st.conditions, READY).0, "True");
    assert_eq!(st.module_loader.map(|d| d.desired_number), Some(3));
}

#[test]
fn only_nodes_labelled_for_the_version_are_expected() {
    let m = module().version("2.0");
    let nodes = vec![
        node("n1").user_version("2.0"),
        node("n2").user_version("1.0"),
    ];
    let owned = vec![
        loader_ds(&kernel(), Some("2.0")).observed(1, 1),
        plugin_ds(Some("2.0")).observed(1, 1),
    ];
    let st = status_of(&m, nodes, owned, vec![]);
    assert_eq!(
        condition(&st.conditions, READY),
        (
            "True",
            "Available",
            "module loaded on 1 of 1 nodes (2 selected)"
        )
    );
}

#[test]
fn kernels_without_a_mapping_are_named() {
    let st = status_of(
        &module().mapping_nothing(),
        two_nodes(),
        vec![plugin_ds(None).observed(0, 0)],
        vec![],
    );
    assert_eq!(
        condition(&st.conditions, READY),
        (
            "True",
            "Available",
            "module loaded on 0 of 0 nodes (2 selected); no kernel mapping for 6.1.0-13-amd64"
        )
    );
}

#[test]
fn degraded_names_failing_pods() {
    let pods = vec![
        plugin_pod("n1").waiting("ErrImagePull", "pull failed"),
        loader_pod("n2").exited(1, "modprobe: FATAL: Module m not found"),
        loader_pod("n1").ready(),
        // Starting up is not failing.
        plugin_pod("n2").waiting("ContainerCreating", ""),
    ];
    let st = status_of(&module(), two_nodes(), available(), pods);
    assert_eq!(
        condition(&st.conditions, DEGRADED),
        (
            "True",
            "PodsFailing",
            "pod m-device-plugin-n1 on n1: ErrImagePull: pull failed; \
             pod m-loader-n2 on n2: exited 1: modprobe: FATAL: Module m not found"
        )
    );
    // Degraded does not hide progress: the DaemonSets' numbers still decide Ready.
    assert_eq!(condition(&st.conditions, READY).0, "True");
}

#[test]
fn unload_failed_outranks_every_other_problem() {
    let m = module();
    let pods = vec![
        loader_pod("n1").unload_failed("modprobe: FATAL: Module m is in use"),
        plugin_pod("n2").waiting("ErrImagePull", "pull failed"),
    ];
    let st = status_of(&m, two_nodes(), available(), pods.clone());
    assert_eq!(
        condition(&st.conditions, DEGRADED),
        (
            "True",
            UNLOAD_FAILED,
            "module still loaded after its loader stopped on n1: modprobe: FATAL: Module m is \
             in use; pod m-device-plugin-n2 on n2: ErrImagePull: pull failed"
        )
    );
    // Over a kernel whose mapping failed too.
    let nodes = cached(two_nodes());
    let mut plan = plan_module(
        &m,
        nodes.iter().map(Arc::as_ref),
        &RenderSettings::default(),
    );
    plan.failed_kernels
        .insert("k".into(), "kernel k: bad".into());
    let st = module_status(
        &m,
        &[],
        Some(&plan),
        &nodes,
        &cached(available()),
        &cached(pods),
        NOW,
    );
    assert_eq!(condition(&st.conditions, DEGRADED).1, UNLOAD_FAILED);
    assert!(
        condition(&st.conditions, DEGRADED)
            .2
            .starts_with("kernel k: bad; module still")
    );
    // Without the unload failure: the mapping.
    let st = module_status(&m, &[], Some(&plan), &nodes, &cached(available()), &[], NOW);
    assert_eq!(
        condition(&st.conditions, DEGRADED),
        ("True", "MappingFailed", "kernel k: bad")
    );
    assert_eq!(
        unload_failures(&cached([loader_pod("n1").ready()])),
        Vec::<String>::new()
    );
}

#[test]
fn an_invalid_spec_is_degraded_and_touches_nothing_else() {
    let m = module();
    let violations = [validate::Violation {
        path: "spec.selector".into(),
        reason: "bad".into(),
    }];
    let nodes = cached(two_nodes());
    let st = module_status(
        &m,
        &violations,
        None,
        &nodes,
        &cached(available()),
        &[],
        NOW,
    );
    let c = &st.conditions;
    assert_eq!(
        condition(c, VALID),
        ("False", "InvalidSpec", "spec.selector: bad")
    );
    assert_eq!(
        condition(c, READY),
        (
            "False",
            "InvalidSpec",
            "the spec is invalid; existing DaemonSets are left as they are"
        )
    );
    assert_eq!(condition(c, PROGRESSING), ("False", "InvalidSpec", ""));
    assert_eq!(
        condition(c, DEGRADED),
        ("True", "InvalidSpec", "spec.selector: bad")
    );
    // The counts still describe what runs.
    assert_eq!(st.module_loader.map(|d| d.available_number), Some(2));
}

#[test]
fn dra_counts_come_from_the_driver_daemonset_and_refused_classes_degrade() {
    let m = module().with_dra();
    let owned = vec![
        loader_ds(&kernel(), None).observed(2, 2),
        dra_ds(None).observed(2, 1),
    ];
    let st = status_of(&m, two_nodes(), owned.clone(), vec![]);
    let dra = st.dra.unwrap();
    assert_eq!(
        (
            dra.nodes_matching_selector_number,
            dra.desired_number,
            dra.available_number
        ),
        (2, 2, 1)
    );
    assert!(st.device_plugin.is_none());
    assert_eq!(
        condition(&st.conditions, READY).0,
        "False",
        "driver pending"
    );
    assert_eq!(condition(&st.conditions, DEGRADED).0, "False");

    let owned = vec![
        loader_ds(&kernel(), None).observed(2, 2),
        dra_ds(None).observed(2, 2),
    ];
    assert_eq!(
        condition(
            &status_of(&m, two_nodes(), owned.clone(), vec![]).conditions,
            READY
        )
        .0,
        "True"
    );
    // A class the API server refused is reported, the rest stands.
    let nodes = cached(two_nodes());
    let mut plan = plan_module(
        &m,
        nodes.iter().map(Arc::as_ref),
        &RenderSettings::default(),
    );
    plan.failed_device_classes
        .insert("gpu".into(), "DeviceClass gpu: invalid CEL".into());
    let st = module_status(&m, &[], Some(&plan), &nodes, &cached(owned), &[], NOW);
    assert_eq!(
        condition(&st.conditions, DEGRADED),
        ("True", "DeviceClassFailed", "DeviceClass gpu: invalid CEL")
    );
    // Without `dra`, no dra status.
    assert!(
        status_of(&module(), two_nodes(), available(), vec![])
            .dra
            .is_none()
    );
}

#[test]
fn a_kernel_whose_mapping_builds_gets_no_loader_and_points_to_the_hub() {
    let mut m = module();
    if let Some(l) = m.spec.module_loader.as_mut() {
        l.container.build = Some(shared_api::module::Build {
            dockerfile_config_map: Some(shared_api::module::LocalObjectReference::new("df")),
            ..Default::default()
        });
    }
    let nodes = cached(two_nodes());
    let plan = plan_module(
        &m,
        nodes.iter().map(Arc::as_ref),
        &RenderSettings::default(),
    );
    assert!(
        plan.loaders.is_empty(),
        "no loader for a kernel that needs a build"
    );
    assert_eq!(plan.needs_hub.len(), 1);
    let st = status_of(
        &m,
        two_nodes(),
        vec![plugin_ds(None).observed(0, 0)],
        vec![],
    );
    let (status, reason, msg) = condition(&st.conditions, READY);
    assert_eq!((status, reason), ("False", BUILD_UNSUPPORTED_ON_SPOKE));
    assert!(msg.contains("ManagedClusterModule"), "{msg}");
    let (status, reason, msg) = condition(&st.conditions, DEGRADED);
    assert_eq!((status, reason), ("True", BUILD_UNSUPPORTED_ON_SPOKE));
    assert!(
        msg.contains("images are built and signed only on the hub"),
        "{msg}"
    );
}

#[test]
fn a_shipped_module_without_build_or_sign_loads_as_before() {
    let nodes = cached(two_nodes());
    let plan = plan_module(
        &module(),
        nodes.iter().map(Arc::as_ref),
        &RenderSettings::default(),
    );
    assert!(plan.needs_hub.is_empty());
    assert_eq!(plan.loaders.len(), 1);
}
