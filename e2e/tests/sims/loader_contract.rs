//! The module-loader contract on simulated nodes.

use std::collections::BTreeMap;

use anyhow::ensure;
use k8s_openapi::api::core::v1::Pod;
use kmm_e2e::fleet::Fleet;
use kmm_e2e::kmod;
use kmm_e2e::oci::{self, KmodImage, SignWith};
use kmm_e2e::sim::read_loaded_modules;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;
use shared_api::labels;

use kmm_e2e::testkit::ensure_namespace;

use crate::{
    K1, K2, Keys, container_state, eventually, failure_message, pod_ready, pull_secret, waiting,
};

struct LoaderSpec<'a> {
    name: &'a str,
    node: &'a str,
    image: String,
    module: &'a str,
    order: &'a [&'a str],
    in_tree: &'a [&'a str],
    firmware: Option<&'a str>,
}

const LOADER_SCRIPT: &str =
    "# the spoke's loader script; its behaviour is emulated by the node simulator";

fn loader_pod(ns: &str, s: &LoaderSpec) -> anyhow::Result<Pod> {
    let mut env = vec![
        json!({"name": "KMM_MODULE_NAME", "value": s.module}),
        json!({"name": "KMM_DIR_NAME", "value": "/opt"}),
        json!({"name": "KMM_LOADING_ORDER", "value": s.order.join("\n")}),
        json!({"name": "KMM_IN_TREE_REMOVE", "value": s.in_tree.join("\n")}),
    ];
    if let Some(fw) = s.firmware {
        env.push(json!({"name": "KMM_FIRMWARE_PATH", "value": fw}));
    }
    Ok(serde_json::from_value(json!({
        "metadata": {
            "name": s.name, "namespace": ns,
            "labels": {
                labels::MODULE_NAME_LABEL: s.name,
                labels::ROLE_LABEL: labels::ROLE_LOADER,
                labels::TARGET_KERNEL_LABEL: labels::kernel_label_value(K1),
            },
            "annotations": {labels::MODULE_ANNOTATION: format!("{ns}/{}", s.name)},
        },
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": s.node},
            "imagePullSecrets": [{"name": "pull"}],
            "containers": [{
                "name": "module-loader",
                "image": s.image,
                "command": ["/bin/sh", "-c"],
                "args": [LOADER_SCRIPT],
                "env": env,
                "lifecycle": {"preStop": {"exec": {"command": ["/bin/sh", "-c", LOADER_SCRIPT, "loader", "unload"]}}},
                "readinessProbe": {"exec": {"command": ["cat", "/tmp/kmm-loaded"]}},
            }],
        },
    }))?)
}

/// (b) The loader contract: signature checks on a Secure Boot node, vermagic, soft
/// dependencies, in-tree removal, firmware, unload on deletion.
pub(crate) async fn loader_contract(fleet: &Fleet, k: &Keys) -> anyhow::Result<()> {
    let client = fleet.spoke(1).client().await;
    let sim = fleet.node_sim("spoke-1");
    let ns = "sim-loader";
    ensure_namespace(&client, ns).await?;
    pull_secret(fleet, &client, ns).await?;
    let access = fleet.registry().access();
    let host = fleet.registry().host();
    let sign_a = SignWith {
        key: k.key_a.clone(),
        cert: k.cert_a.clone(),
    };
    let sign_b = SignWith {
        key: k.key_b.clone(),
        cert: k.cert_b.clone(),
    };
    let mut signed = KmodImage::new(&[K1, K2], &["kmm_ci_a", "kmm_ci_b"]);
    signed.sign = Some(sign_a);
    signed
        .firmware
        .insert("/firmware/kmm/fw.bin".into(), b"firmware".to_vec());
    let img_signed = format!("{host}/sims/kmm-ci:signed-a");
    oci::push_kmod_image(&access, &img_signed, &signed).await?;
    let img_unsigned = format!("{host}/sims/kmm-ci:unsigned");
    oci::push_kmod_image(
        &access,
        &img_unsigned,
        &KmodImage::new(&[K1], &["kmm_ci_a", "unsigned_mod"]),
    )
    .await?;
    let mut other = KmodImage::new(&[K1], &["otherkey_mod"]);
    other.sign = Some(sign_b);
    let img_other = format!("{host}/sims/kmm-ci:signed-b");
    oci::push_kmod_image(&access, &img_other, &other).await?;
    // A module built for K2 placed where modprobe looks for K1's.
    let img_mismatch = format!("{host}/sims/kmm-ci:mismatch");
    let files = BTreeMap::from([(
        format!("/opt/lib/modules/{K1}/mismatch_mod.ko"),
        kmod::fake_module("mismatch_mod", K2),
    )]);
    oci::push_files(&access, &img_mismatch, &files, &BTreeMap::new()).await?;

    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let specs = [
        LoaderSpec {
            name: "signed",
            node: "node-b",
            image: img_signed.clone(),
            module: "kmm-ci-a",
            order: &["kmm-ci-a", "kmm-ci-b"],
            in_tree: &[],
            firmware: Some("/firmware"),
        },
        LoaderSpec {
            name: "unsigned",
            node: "node-b",
            image: img_unsigned.clone(),
            module: "unsigned_mod",
            order: &[],
            in_tree: &[],
            firmware: None,
        },
        LoaderSpec {
            name: "other-key",
            node: "node-b",
            image: img_other,
            module: "otherkey_mod",
            order: &[],
            in_tree: &[],
            firmware: None,
        },
        LoaderSpec {
            name: "mismatch",
            node: "node-a",
            image: img_mismatch,
            module: "mismatch_mod",
            order: &[],
            in_tree: &[],
            firmware: None,
        },
        LoaderSpec {
            name: "in-tree",
            node: "node-a",
            image: img_unsigned,
            module: "kmm_ci_a",
            order: &[],
            in_tree: &["dummy"],
            firmware: None,
        },
        LoaderSpec {
            name: "not-found",
            node: "node-c",
            image: img_signed.clone(),
            module: "kmm_ci_c",
            order: &[],
            in_tree: &[],
            firmware: None,
        },
    ];
    for s in &specs {
        pods.create(&PostParams::default(), &loader_pod(ns, s)?)
            .await?;
    }
    eventually(
        "signed module and its soft dependency loaded on the Secure Boot node",
        || async {
            let p = pods.get("signed").await?;
            let loaded = sim.loaded_modules("node-b");
            Ok(if pod_ready(&p) && loaded == ["kmm_ci_b", "kmm_ci_a"] {
                Ok(())
            } else {
                Err(format!("loaded {loaded:?}; {}", container_state(&p)))
            })
        },
    )
    .await?;
    let failures = [
        (
            "unsigned",
            "modprobe: ERROR: could not insert 'unsigned_mod': Key was rejected by service"
                .to_string(),
        ),
        (
            "other-key",
            "modprobe: ERROR: could not insert 'otherkey_mod': Key was rejected by service"
                .to_string(),
        ),
        (
            "mismatch",
            "modprobe: ERROR: could not insert 'mismatch_mod': Exec format error".to_string(),
        ),
        (
            "not-found",
            format!(
                "modprobe: FATAL: Module kmm_ci_c not found in directory /opt/lib/modules/{K2}"
            ),
        ),
    ];
    for (name, want) in &failures {
        eventually(&format!("loader {name} fails with {want:?}"), || async {
            let p = pods.get(name).await?;
            let msg = failure_message(&p);
            Ok(if msg.as_deref() == Some(want.as_str()) && !pod_ready(&p) {
                Ok(())
            } else {
                Err(container_state(&p))
            })
        })
        .await?;
    }
    eventually("a failing loader goes into CrashLoopBackOff", || async {
        let p = pods.get("unsigned").await?;
        Ok(match waiting(&p) {
            Some((r, _)) if r == "CrashLoopBackOff" => Ok(()),
            _ => Err(container_state(&p)),
        })
    })
    .await?;
    eventually(
        "in-tree dummy removed and kmm_ci_a loaded on node-a",
        || async {
            let p = pods.get("in-tree").await?;
            let loaded = sim.loaded_modules("node-a");
            Ok(if pod_ready(&p) && loaded == ["kmm_ci_a"] {
                Ok(())
            } else {
                Err(format!("loaded {loaded:?}; {}", container_state(&p)))
            })
        },
    )
    .await?;
    eventually(
        "node annotations mirror loaded modules and firmware",
        || async {
            let loaded = read_loaded_modules(&client, "node-b").await?;
            let node = Api::<k8s_openapi::api::core::v1::Node>::all(client.clone())
                .get("node-b")
                .await?;
            let fw = node
                .annotations()
                .get(kmm_e2e::sim::FIRMWARE_ANNOTATION)
                .cloned()
                .unwrap_or_default();
            Ok(
                if loaded == ["kmm_ci_b", "kmm_ci_a"] && fw == "/var/lib/firmware/kmm/fw.bin" {
                    Ok(())
                } else {
                    Err(format!("annotation {loaded:?}, firmware {fw:?}"))
                },
            )
        },
    )
    .await?;
    // Deleting the loader pod runs the preStop: unload in stop order, firmware removed.
    pods.delete("signed", &DeleteParams::default()).await?;
    eventually(
        "signed loader pod gone and its modules unloaded",
        || async {
            let gone = pods.get_opt("signed").await?.is_none();
            let loaded = sim.loaded_modules("node-b");
            let fw = sim.firmware("node-b");
            Ok(if gone && loaded.is_empty() && fw.is_empty() {
                Ok(())
            } else {
                Err(format!("gone {gone} loaded {loaded:?} firmware {fw:?}"))
            })
        },
    )
    .await?;
    // A kernel upgrade reboots the node: a new bootID and only in-tree modules again.
    let before = Api::<k8s_openapi::api::core::v1::Node>::all(client.clone())
        .get("node-a")
        .await?;
    sim.set_kernel("node-a", K2).await?;
    let after = Api::<k8s_openapi::api::core::v1::Node>::all(client.clone())
        .get("node-a")
        .await?;
    let info = |n: &k8s_openapi::api::core::v1::Node| {
        n.status
            .as_ref()
            .and_then(|s| s.node_info.clone())
            .unwrap_or_default()
    };
    ensure!(
        info(&after).kernel_version == K2,
        "kernel after upgrade {:?}",
        info(&after).kernel_version
    );
    ensure!(
        info(&after).boot_id != info(&before).boot_id,
        "bootID unchanged"
    );
    // The restarted in-tree loader removes dummy again and fails for lack of a K2 module.
    eventually(
        "after the reboot the loader on node-a fails for the new kernel",
        || async {
            let p = pods.get("in-tree").await?;
            let msg = failure_message(&p).unwrap_or_default();
            let loaded = sim.loaded_modules("node-a");
            Ok(
                if msg.contains(&format!("not found in directory /opt/lib/modules/{K2}"))
                    && loaded.is_empty()
                {
                    Ok(())
                } else {
                    Err(format!("loaded {loaded:?}; {}", container_state(&p)))
                },
            )
        },
    )
    .await?;
    Ok(())
}
