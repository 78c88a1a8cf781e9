//! The seeds' labs teach one thing each; this checks that what the agent renders for a lab
//! (through the real `kmm-spoke render`) carries that thing to the nodes: the module modprobe
//! loads, the in-tree module it removes first, the loading order, the device plugin's
//! arguments, the version that gates an ordered upgrade, and where it all runs.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test fixtures

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use serde_json::Value;

fn seed(name: &str) -> String {
    format!(
        "{}/../shared-api/tests/fixtures/seeds/{name}",
        env!("CARGO_MANIFEST_DIR")
    )
}

const NODES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/nodes.yaml");

/// The rendered DaemonSets and the summary document of one lab.
struct Rendered {
    daemonsets: Vec<Value>,
    summary: Value,
}

impl Rendered {
    fn of(lab: &str) -> Self {
        Self::on(lab, NODES)
    }

    fn on(lab: &str, nodes: &str) -> Self {
        let out = Command::new(env!("CARGO_BIN_EXE_kmm-spoke"))
            .args(["render", "--module", &seed(lab), "--nodes", nodes])
            .env_remove("KMM_SPOKE_FIRMWARE_HOST_PATH")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{lab}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut docs: Vec<Value> = serde_yaml::Deserializer::from_str(&stdout)
            .map(|d| serde::Deserialize::deserialize(d).unwrap())
            .collect();
        let summary = docs.pop().expect("a summary document");
        assert!(
            docs.iter().all(|d| d["kind"] == "DaemonSet"),
            "{lab}: {stdout}"
        );
        Rendered {
            daemonsets: docs,
            summary,
        }
    }

    fn with_role(&self, role: &str) -> Vec<&Value> {
        self.daemonsets
            .iter()
            .filter(|d| d["metadata"]["labels"]["kmm.node.kubernetes.io/role"] == role)
            .collect()
    }

    fn loaders(&self) -> Vec<&Value> {
        let l = self.with_role("module-loader");
        assert!(!l.is_empty(), "no loader DaemonSet");
        l
    }

    /// Nodes the summary says each DaemonSet is scheduled on, over all DaemonSets.
    fn scheduled_nodes(&self) -> BTreeSet<String> {
        self.summary["scheduledOn"]
            .as_object()
            .into_iter()
            .flatten()
            .flat_map(|(_, v)| v.as_array().cloned().unwrap_or_default())
            .filter_map(|n| n.as_str().map(str::to_string))
            .collect()
    }
}

fn container(ds: &Value) -> &Value {
    &ds["spec"]["template"]["spec"]["containers"][0]
}

fn env(ds: &Value) -> BTreeMap<String, String> {
    container(ds)["env"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            (
                e["name"].as_str().unwrap_or_default().to_string(),
                e["value"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// Every lab: the loader runs the lab's module from the lab's image, on the kernel it was
/// rendered for, only on nodes the lab selects (workers; never the control plane).
fn common(lab: &str, module_name: &str, image: &str) -> Rendered {
    check(Rendered::of(lab), lab, module_name, image)
}

fn check(r: Rendered, lab: &str, module_name: &str, image: &str) -> Rendered {
    for ds in r.loaders() {
        let kernel = ds["metadata"]["labels"]["kmm.node.kubernetes.io/target-kernel"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(
            ds["spec"]["template"]["spec"]["nodeSelector"]["kmm.node.kubernetes.io/kernel-version.full"],
            kernel.as_str(),
            "{lab}: the loader runs on its own kernel only"
        );
        assert_eq!(
            env(ds).get("KMM_MODULE_NAME").map(String::as_str),
            Some(module_name),
            "{lab}"
        );
        let image = image.replace("${KERNEL_FULL_VERSION}", &kernel);
        assert_eq!(container(ds)["image"], image.as_str(), "{lab}");
        let script = container(ds)["args"][0].as_str().unwrap_or_default();
        assert!(
            script.contains("modprobe"),
            "{lab}: the loader script runs modprobe"
        );
    }
    let on = r.scheduled_nodes();
    assert!(!on.is_empty(), "{lab}: scheduled nowhere: {}", r.summary);
    assert!(
        on.iter().all(|n| n.starts_with("worker-")),
        "{lab}: only worker nodes: {on:?}"
    );
    assert!(!on.contains("worker-tainted"), "{lab}: {on:?}");
    r
}

const IMAGE: &str = "myrepo.xyz/kmm-labs:kmm-kmod-5.14.0-284.36.1.el9_2.x86_64-v1.0";

#[test]
fn the_load_lab_loads_its_module_on_workers() {
    let r = common("lab_load.yaml", "kmm-ci-a", IMAGE);
    assert!(r.with_role("device-plugin").is_empty());
    for ds in r.loaders() {
        let e = env(ds);
        assert!(!e.contains_key("KMM_IN_TREE_REMOVE"), "{e:?}");
        assert!(!e.contains_key("KMM_LOADING_ORDER"), "{e:?}");
    }
}

#[test]
fn the_in_tree_lab_removes_joydev_before_loading() {
    let r = common(
        "lab_remove_in_tree.yaml",
        "kmm-ci-a",
        "quay.io/ebelarte/kmm-labs:kmm-kmod-5.14.0-284.36.1.el9_2.x86_64-v1.0",
    );
    for ds in r.loaders() {
        assert_eq!(
            env(ds).get("KMM_IN_TREE_REMOVE").map(String::as_str),
            Some("joydev")
        );
        // That the script removes it before loading is run in loader_script's own tests.
    }
}

#[test]
fn the_dependencies_lab_loads_in_its_order() {
    let r = common(
        "lab_load_dependencies.yaml",
        "kmm-ci-a",
        "quay.io/myrepo/kmmo-lab:kmm-kmod-5.14.0-284.36.1.el9_2.x86_64",
    );
    for ds in r.loaders() {
        let order = env(ds)
            .get("KMM_LOADING_ORDER")
            .cloned()
            .unwrap_or_default();
        let order: Vec<&str> = order.split_whitespace().collect();
        assert_eq!(order, vec!["kmm-ci-a", "kmm-ci-b"]);
    }
}

#[test]
fn the_device_plugin_lab_runs_its_plugin_with_its_arguments_where_the_module_is_ready() {
    let r = common("lab_device_plugin.yaml", "kmm-ci-a", IMAGE);
    let plugins = r.with_role("device-plugin");
    assert_eq!(plugins.len(), 1, "one device plugin DaemonSet");
    let p = plugins[0];
    assert_eq!(
        container(p)["args"],
        serde_json::json!(["-config=config-labs.yaml"])
    );
    let selector = p["spec"]["template"]["spec"]["nodeSelector"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    assert!(
        selector
            .keys()
            .any(|k| k == &shared_api::labels::module_ready_label("labsv2", "kmm-ci-a")),
        "the plugin waits for the module: {selector:?}"
    );
}

#[test]
fn the_version_lab_loads_only_where_the_admin_asked_for_its_version() {
    const LAB: &str = "lab_build_with_version.yaml";
    const IMAGE: &str = "myrepo.xyz/kmm-labs:kmm-kmod-${KERNEL_FULL_VERSION}-v0.9";
    // Without `version-module.<ns>.<name>` on a node, a versioned Module loads nowhere.
    let unlabelled = Rendered::of(LAB);
    assert!(
        unlabelled.scheduled_nodes().is_empty(),
        "{}",
        unlabelled.summary
    );
    // The admin asks for 0.9 on the workers: the loaders run there, gated on the version.
    let dir = tempfile::tempdir().unwrap();
    let nodes = dir.path().join("nodes.yaml");
    std::fs::write(
        &nodes,
        std::fs::read_to_string(NODES).unwrap().replace(
            r#"labels: {node-role.kubernetes.io/worker: ""}"#,
            r#"labels: {node-role.kubernetes.io/worker: "", kmm.node.kubernetes.io/version-module.labsv2.kmm-ci-a: "0.9"}"#,
        ),
    )
    .unwrap();
    let r = check(
        Rendered::on(LAB, nodes.to_str().unwrap()),
        LAB,
        "kmm-ci-a",
        IMAGE,
    );
    for ds in r.loaders() {
        assert_eq!(
            ds["metadata"]["labels"]["kmm.node.kubernetes.io/module-version"],
            "0.9"
        );
        let selector = &ds["spec"]["template"]["spec"]["nodeSelector"];
        let gated = selector
            .as_object()
            .into_iter()
            .flatten()
            .any(|(k, v)| k.contains("version-worker-pod.labsv2.kmm-ci-a") && v == "0.9");
        assert!(
            gated,
            "the loader runs where version 0.9 is wanted: {selector}"
        );
    }
}

#[test]
fn the_build_labs_load_the_image_their_build_pushes() {
    // The spoke never builds: it loads the image the hub's build pushes, named by the lab.
    for (lab, module, image) in [
        (
            "lab_in_cluster_build.yaml",
            "kmm-ci-a",
            "myrepo.xyz/kmm-labs:kmm-kmod-${KERNEL_FULL_VERSION}-v1.0",
        ),
        (
            "lab_build_and_sign.yaml",
            "kmm_ci_a",
            "myrepo.xyz/kmm-labs:signed-module-1.0",
        ),
    ] {
        let r = common(lab, module, image);
        for ds in r.loaders() {
            let spec = serde_json::to_string(ds).unwrap();
            assert!(
                !spec.contains("dockerfile") && !spec.contains("keySecret"),
                "{lab}: nothing of the build or the key reaches the node"
            );
        }
    }
}
