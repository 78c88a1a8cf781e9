//! Truth tables of the sequencing decisions.

use super::*;
use crate::controller::testkit::*;
use shared_api::labels::{kernel_label_value, module_ready_label};

fn ready() -> BTreeMap<String, String> {
    BTreeMap::from([(module_ready_label(NS, NAME), String::new())])
}

fn names(pods: &[Arc<CachedPod>]) -> Vec<String> {
    pods.iter().map(|p| p.name_any()).collect()
}

/// A node relabelled directly from 1.0 to 2.0 while 1.0 is loaded and its plugin runs:
/// plugin off first, then the 1.0 loader, then 2.0 once the kernel is free, then the
/// plugin again — never two steps at once.
#[test]
fn a_direct_relabel_is_sequenced_plugin_loader_loader_plugin() {
    let m = module().version("2.0");
    let ready = ready();
    let none = BTreeMap::new();
    let plugin = plugin_pod("n");
    // 1.0 loaded, plugin running; the user relabels to 2.0.
    let n = node("n").user_version("2.0").worker("1.0").schedule("1.0");
    assert_eq!(
        worker_and_schedule(&m, &n, &ready, &[&plugin], false),
        (Some("1.0".into()), None),
        "the plugin goes first; the loader stays while a plugin pod is there"
    );
    let n = node("n").user_version("2.0").worker("1.0");
    assert_eq!(
        worker_and_schedule(&m, &n, &ready, &[&plugin], false),
        (Some("1.0".into()), None)
    );
    // The plugin pod is gone: the 1.0 loader goes (its pod unloads).
    assert_eq!(
        worker_and_schedule(&m, &n, &ready, &[], false),
        (None, None),
        "no new loader while the kernel still has the module"
    );
    let n = node("n").user_version("2.0");
    assert_eq!(
        worker_and_schedule(&m, &n, &ready, &[], false),
        (None, None)
    );
    // Unloaded: 2.0 may load, and its plugin may follow once it is ready.
    assert_eq!(
        worker_and_schedule(&m, &n, &none, &[], false),
        (Some("2.0".into()), Some("2.0".into()))
    );
    // Deselected: the plugin first again.
    let n = node("n")
        .deselected()
        .user_version("2.0")
        .worker("2.0")
        .schedule("2.0");
    assert_eq!(
        worker_and_schedule(&m, &n, &ready, &[&plugin], false),
        (Some("2.0".into()), None)
    );
    // Replacing the loader on this node: the plugin leaves, the loader label stays.
    let n = node("n").user_version("2.0").worker("2.0").schedule("2.0");
    assert_eq!(
        worker_and_schedule(&m, &n, &ready, &[&plugin], true),
        (Some("2.0".into()), None)
    );
}

/// Deselection and deletion of an unversioned Module: the schedule label goes while the
/// worker label stays for as long as a plugin pod is on the node (even a stopping one).
#[test]
fn the_plugin_leaves_before_the_loader() {
    let plugin = plugin_pod("n").ready();
    let stopping = plugin_pod("n").deleting();
    let loaded = node("n").worker("").schedule("").loaded();
    for (m, n, why) in [
        (module(), loaded.clone().deselected(), "deselected"),
        (module().deleting(), loaded.clone(), "Module deleted"),
    ] {
        for p in [&plugin, &stopping] {
            assert_eq!(
                worker_and_schedule(&m, &n, &ready(), &[p], false),
                (Some(String::new()), None),
                "{why}: schedule off, worker kept while a plugin pod is there"
            );
        }
        let n = n.unlabel(&schedule_version_label(NS, NAME));
        assert_eq!(
            worker_and_schedule(&m, &n, &ready(), &[&plugin], false),
            (Some(String::new()), None),
            "{why}: the worker label waits for the plugin pod"
        );
        assert_eq!(
            worker_and_schedule(&m, &n, &ready(), &[], false),
            (None, None),
            "{why}: no plugin pod left, the loader goes"
        );
    }
    // Only the Module's plugin pods on this node hold the loader (callers pass those).
    let m = module();
    let n = node("n").deselected().worker("");
    assert_eq!(
        worker_and_schedule(&m, &n, &ready(), &[], false),
        (None, None)
    );
}

#[test]
fn the_next_loader_waits_until_the_ready_label_is_gone() {
    let m = module().version("2.0");
    let n = node("n").user_version("2.0");
    assert_eq!(
        worker_and_schedule(&m, &n, &ready(), &[], false),
        (None, None),
        "the kernel still has the old module"
    );
    assert_eq!(
        worker_and_schedule(&m, &n, &BTreeMap::new(), &[], false),
        (Some("2.0".into()), Some("2.0".into()))
    );
    // Unversioned: the same wait for the first loader.
    let m = module();
    assert_eq!(
        worker_and_schedule(&m, &node("n"), &ready(), &[], false),
        (None, None)
    );
    assert_eq!(
        worker_and_schedule(&m, &node("n"), &BTreeMap::new(), &[], false),
        (Some(String::new()), Some(String::new()))
    );
    // A versioned node the user has not labelled gets nothing.
    let m = module().version("2.0");
    assert_eq!(
        worker_and_schedule(&m, &node("n"), &BTreeMap::new(), &[], false),
        (None, None)
    );
}

#[test]
fn steady_state_keeps_both_labels_and_no_plugin_means_no_schedule_label() {
    let m = module();
    let n = node("n").worker("").schedule("").loaded();
    assert_eq!(
        worker_and_schedule(&m, &n, &ready(), &[&plugin_pod("n").ready()], false),
        (Some(String::new()), Some(String::new()))
    );
    let m = module().without_device_plugin();
    assert_eq!(
        worker_and_schedule(&m, &n, &ready(), &[], false),
        (Some(String::new()), None),
        "a schedule label without a device plugin is taken off"
    );
    assert_eq!(
        worker_and_schedule(&m, &node("n"), &BTreeMap::new(), &[], false),
        (Some(String::new()), None)
    );
}

/// Loader pods whose template hash is `old` while their DaemonSet's is `new`.
fn outdated_world(
    pods: Vec<CachedPod>,
    nodes: Vec<Node>,
    m: &Module,
) -> (Replacement, Vec<Arc<CachedPod>>) {
    let pods = cached(pods);
    let daemonsets = cached([loader_ds(&kernel_label_value(KERNEL), None).template_hash("new")]);
    let nodes = cached(nodes);
    let r = loader_replacement(m, &pods, by_name(&daemonsets), by_name(&nodes));
    (r, pods)
}

#[test]
fn outdated_loaders_are_replaced_one_node_at_a_time() {
    let m = module();
    let nodes = vec![
        node("n1").worker("").schedule(""),
        node("n2").worker("").schedule(""),
        node("n3").worker("").schedule(""),
    ];
    let (r, _) = outdated_world(
        vec![
            loader_pod("n3").ready().template_hash("old"),
            loader_pod("n1").ready().template_hash("old"),
            loader_pod("n2").ready().template_hash("old"),
        ],
        nodes.clone(),
        &m,
    );
    assert!(r.idle.is_empty());
    assert_eq!(
        r.next.map(|p| p.name_any()),
        Some(loader_pod("n1").name_any()),
        "one pod, the first node by name"
    );
    // Up to date: nothing to do.
    let (r, _) = outdated_world(
        vec![loader_pod("n1").ready().template_hash("new")],
        nodes.clone(),
        &m,
    );
    assert!(r.idle.is_empty() && r.next.is_none());
    // A pod without a hash while the DaemonSet has one is outdated too.
    let (r, _) = outdated_world(vec![loader_pod("n2").ready()], nodes.clone(), &m);
    assert_eq!(
        r.next.map(|p| p.name_any()),
        Some(loader_pod("n2").name_any())
    );
    // A pod is compared with its own DaemonSet (kernel and version): a 1.0 pod whose
    // DaemonSet is not cached is left to the ordered upgrade.
    let m = module().version("2.0");
    let pods = cached([
        loader_pod("n1").ready().version("1.0").template_hash("old"),
        loader_pod("n2").ready().version("2.0").template_hash("old"),
    ]);
    let daemonsets =
        cached([loader_ds(&kernel_label_value(KERNEL), Some("2.0")).template_hash("new")]);
    let r = loader_replacement(&m, &pods, by_name(&daemonsets), by_name(&cached(nodes)));
    assert_eq!(r.next.map(|p| p.name_any()), Some(pods[1].name_any()));
}

#[test]
fn idle_outdated_loaders_go_at_once_and_ready_ones_wait_for_the_others() {
    let m = module();
    let nodes = vec![
        node("n1").worker("").schedule(""),
        node("n2").worker("").schedule(""),
        node("n3").worker("").schedule(""),
    ];
    // Not ready and outdated: idle, replaced at once, and no reason to wait.
    let (r, _) = outdated_world(
        vec![
            loader_pod("n1").template_hash("old"),
            loader_pod("n2").ready().template_hash("old"),
        ],
        nodes.clone(),
        &m,
    );
    assert_eq!(names(&r.idle), vec![loader_pod("n1").name_any()]);
    assert_eq!(
        r.next.map(|p| p.name_any()),
        Some(loader_pod("n2").name_any())
    );
    // Another loader stopping (deleted, any template): no ready one is touched.
    let (r, _) = outdated_world(
        vec![
            loader_pod("n1").ready().template_hash("new").deleting(),
            loader_pod("n2").ready().template_hash("old"),
        ],
        nodes.clone(),
        &m,
    );
    assert!(r.idle.is_empty());
    assert!(
        r.next.is_none(),
        "none while another loader pod is stopping"
    );
    // A current loader not ready yet (the last replacement still loading): wait too.
    let (r, _) = outdated_world(
        vec![
            loader_pod("n1").template_hash("new"),
            loader_pod("n2").ready().template_hash("old"),
            loader_pod("n3").template_hash("old"),
        ],
        nodes,
        &m,
    );
    assert_eq!(names(&r.idle), vec![loader_pod("n3").name_any()]);
    assert!(
        r.next.is_none(),
        "none while another loader pod is not ready"
    );
}

#[test]
fn a_replacement_under_way_goes_on_first() {
    let m = module();
    // n2's schedule label is already off: its replacement started, it goes on even
    // while another pod is busy and although n1 sorts first.
    let (r, _) = outdated_world(
        vec![
            loader_pod("n1").ready().template_hash("old"),
            loader_pod("n2").ready().template_hash("old"),
            loader_pod("n3").deleting(),
        ],
        vec![node("n1").worker("").schedule(""), node("n2").worker("")],
        &m,
    );
    assert_eq!(
        r.next.map(|p| p.name_any()),
        Some(loader_pod("n2").name_any())
    );
    // Without a device plugin there is no schedule label to read: busy means wait.
    let m = module().without_device_plugin();
    let (r, _) = outdated_world(
        vec![
            loader_pod("n1").ready().template_hash("old"),
            loader_pod("n2").ready().template_hash("old"),
            loader_pod("n3").deleting(),
        ],
        vec![node("n1").worker(""), node("n2").worker("")],
        &m,
    );
    assert!(r.next.is_none());
}

#[test]
fn the_chosen_loader_goes_only_once_its_device_plugin_is_gone() {
    let m = module();
    let pod = loader_pod("n1").ready().template_hash("old");
    let scheduled = node("n1").worker("").schedule("");
    let unscheduled = node("n1").worker("");
    let plugin_here = cached([plugin_pod("n1").deleting()]);
    let plugin_elsewhere = cached([plugin_pod("n2").ready()]);
    assert!(!replacement_may_go(&m, &pod, Some(&scheduled), &[]));
    assert!(!replacement_may_go(
        &m,
        &pod,
        Some(&unscheduled),
        &plugin_here
    ));
    assert!(replacement_may_go(
        &m,
        &pod,
        Some(&unscheduled),
        &plugin_elsewhere
    ));
    assert!(replacement_may_go(&m, &pod, None, &[]), "node gone");
    let m = module().without_device_plugin();
    assert!(replacement_may_go(&m, &pod, Some(&scheduled), &plugin_here));
}

#[test]
fn stopped_loaders_are_released_unless_their_unload_failed() {
    let mut no_finalizer = loader_pod("n1").deleting().exited(0, "");
    no_finalizer.metadata.finalizers = None;
    let pods = cached([
        loader_pod("n1").ready(),                             // running: left
        loader_pod("n2").deleting().exited(0, "unloaded"),    // stopped: released
        loader_pod("n3").ready().deleting(),                  // still stopping: left
        loader_pod("n4").unload_failed("Module m is in use"), // kept, reported
        loader_pod("gone").unload_failed("in use"),           // node gone: released
        loader_pod("n5").ready().deleting(),                  // node gone: released
        no_finalizer,                                         // not ours any more
        plugin_pod("n6").deleting().exited(0, ""),            // not a loader
    ]);
    let exists = |n: &str| n != "gone" && n != "n5";
    let fates: Vec<(String, StoppedLoader)> = stopped_loaders(&pods, exists)
        .into_iter()
        .map(|(p, f)| (pod_node(p).unwrap_or_default().to_string(), f))
        .collect();
    assert_eq!(
        fates,
        vec![
            ("n2".into(), StoppedLoader::Release),
            (
                "n4".into(),
                StoppedLoader::UnloadFailed("Module m is in use".into())
            ),
            ("gone".into(), StoppedLoader::Release),
            ("n5".into(), StoppedLoader::Release),
        ]
    );
}

/// A DRA driver holds its devices like a device plugin: it leaves the node before the loader
/// unloads, and the loader goes only once no driver pod is left there.
#[test]
fn a_dra_driver_leaves_before_the_loader_like_a_plugin() {
    let m = module().with_dra().version("2.0");
    let driver = dra_pod("n").ready();
    let n = node("n").user_version("2.0").worker("1.0").schedule("1.0");
    assert_eq!(
        worker_and_schedule(&m, &n, &ready(), &[&driver], false),
        (Some("1.0".into()), None),
        "the driver's schedule label goes first; the loader stays while its pod is there"
    );
    let n = node("n").user_version("2.0").worker("1.0");
    assert_eq!(
        worker_and_schedule(&m, &n, &ready(), &[&driver], false),
        (Some("1.0".into()), None)
    );
    assert_eq!(
        worker_and_schedule(&m, &n, &ready(), &[], false),
        (None, None)
    );
    // Loaded and wanted: the driver is scheduled again.
    let n = node("n").user_version("2.0").worker("2.0");
    assert_eq!(
        worker_and_schedule(&m, &n, &ready(), &[], false),
        (Some("2.0".into()), Some("2.0".into()))
    );
    let pod = loader_pod("n").ready();
    assert!(!replacement_may_go(
        &m,
        &pod,
        Some(&node("n")),
        &cached([dra_pod("n").deleting()])
    ));
    assert!(replacement_may_go(&m, &pod, Some(&node("n")), &[]));
}

#[test]
fn only_a_loader_holding_its_module_is_held_before_it_stops() {
    let unheld = |p: CachedPod| {
        let mut p = p;
        p.metadata.finalizers = None;
        p
    };
    // Ready (its module in the kernel), not stopping, not yet held: held first.
    assert!(needs_hold(&unheld(loader_pod("n1").ready())));
    // Already held, already stopping, or never Ready (holds nothing): left alone.
    assert!(!needs_hold(&loader_pod("n1").ready()));
    assert!(!needs_hold(&unheld(loader_pod("n1").ready().deleting())));
    assert!(!needs_hold(&unheld(loader_pod("n1"))));
    // Device-plugin pods hold no module.
    assert!(!needs_hold(&unheld(plugin_pod("n1").ready())));
}
