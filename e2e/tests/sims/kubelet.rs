//! DaemonSets on exactly the matching nodes, and image pull failures.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Pod;
use kmm_e2e::fleet::Fleet;
use kmm_e2e::oci::{self};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::json;

use kmm_e2e::testkit::ensure_namespace;

use crate::{container_state, eventually, pod_ready, pull_secret, waiting};

/// (a) The real DaemonSet controller plus the node simulator: Running, Ready pods on
/// exactly the matching nodes; a pod whose image is missing shows ErrImagePull.
pub(crate) async fn daemonset_on_matching_nodes(fleet: &Fleet) -> anyhow::Result<()> {
    let client = fleet.spoke(1).client().await;
    let ns = "sim-ds";
    ensure_namespace(&client, ns).await?;
    pull_secret(fleet, &client, ns).await?;
    let host = fleet.registry().host();
    let image = format!("{host}/sims/plain:1");
    oci::push_files(
        &fleet.registry().access(),
        &image,
        &BTreeMap::from([("/bin/app".to_string(), b"x".to_vec())]),
        &BTreeMap::new(),
    )
    .await?;
    let ds: DaemonSet = serde_json::from_value(json!({
        "metadata": {"name": "plain", "namespace": ns},
        "spec": {
            "selector": {"matchLabels": {"app": "plain"}},
            "template": {
                "metadata": {"labels": {"app": "plain"}},
                "spec": {
                    "nodeSelector": {"sim-test": "ds"},
                    "imagePullSecrets": [{"name": "pull"}],
                    "containers": [{"name": "app", "image": image}],
                },
            },
        },
    }))?;
    Api::<DaemonSet>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &ds)
        .await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    eventually(
        "DaemonSet pods Running and Ready on node-a and node-c",
        || async {
            let list = pods
                .list(&ListParams::default().labels("app=plain"))
                .await?;
            let mut on: Vec<String> = list
                .items
                .iter()
                .filter(|p| {
                    pod_ready(p)
                        && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                })
                .filter_map(|p| p.spec.as_ref().and_then(|s| s.node_name.clone()))
                .collect();
            on.sort();
            if on == ["node-a", "node-c"] && list.items.len() == 2 {
                Ok(Ok(()))
            } else {
                Ok(Err(list
                    .items
                    .iter()
                    .map(container_state)
                    .collect::<Vec<_>>()
                    .join(" | ")))
            }
        },
    )
    .await?;
    let dsa: Api<DaemonSet> = Api::namespaced(client.clone(), ns);
    eventually("DaemonSet status numberReady 2 of desired 2", || async {
        let st = dsa.get("plain").await?.status.unwrap_or_default();
        Ok(
            if st.desired_number_scheduled == 2 && st.number_ready == 2 {
                Ok(())
            } else {
                Err(format!("{st:?}"))
            },
        )
    })
    .await?;

    // A missing image, and an existing one without the pull secret.
    for (name, img, secret, want) in [
        (
            "missing",
            format!("{host}/sims/missing:1"),
            true,
            "not found",
        ),
        ("no-secret", image.clone(), false, "authoriz"),
    ] {
        let mut spec = json!({
            "nodeSelector": {"kubernetes.io/hostname": "node-a"},
            "containers": [{"name": "app", "image": img}],
        });
        if secret {
            spec["imagePullSecrets"] = json!([{"name": "pull"}]);
        }
        let pod: Pod = serde_json::from_value(
            json!({"metadata": {"name": name, "namespace": ns}, "spec": spec}),
        )?;
        pods.create(&PostParams::default(), &pod).await?;
        eventually(
            &format!("pod {name}: ErrImagePull/ImagePullBackOff ({want})"),
            || async {
                let p = pods.get(name).await?;
                Ok(match waiting(&p) {
                    Some((r, m)) if r == "ErrImagePull" && m.contains(want) => Ok(()),
                    _ => Err(container_state(&p)),
                })
            },
        )
        .await?;
        eventually(&format!("pod {name}: ImagePullBackOff later"), || async {
            let p = pods.get(name).await?;
            Ok(match waiting(&p) {
                Some((r, _)) if r == "ImagePullBackOff" => Ok(()),
                _ => Err(container_state(&p)),
            })
        })
        .await?;
    }
    // Deleting the DaemonSet removes its pods (graceful delete, completed by the kubelet).
    dsa.delete("plain", &DeleteParams::foreground()).await?;
    eventually("DaemonSet pods gone", || async {
        let n = pods
            .list(&ListParams::default().labels("app=plain"))
            .await?
            .items
            .len();
        Ok(if n == 0 {
            Ok(())
        } else {
            Err(format!("{n} pods left"))
        })
    })
    .await?;
    Ok(())
}
