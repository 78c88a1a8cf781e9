//! The agent in-process on a spoke, the labs' namespace, kmod images, Modules, and what the
//! nodes show.
#![allow(clippy::unwrap_used)]

use anyhow::{Context as _, bail};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::events::v1::Event;
use kmm_e2e::fleet::Fleet;
use kmm_e2e::oci::{KmodImage, push_kmod_image};
use kmm_e2e::sim::SimNode;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use shared_api::Module;
use shared_api::fixtures::Lab;
use shared_api::labels::*;

pub(crate) use kmm_e2e::testkit::label_node;

pub(crate) use crate::spoke_agent::RunningAgent;
use crate::{K1, NS, SPOKE, TEST_MANAGER, deadline};

/// Poll `f` until it returns `Ok(Ok(_))`, or fail after [`deadline()`] with the last observation.
pub(crate) async fn eventually<T>(
    what: &str,
    f: impl AsyncFnMut() -> anyhow::Result<Result<T, String>>,
) -> anyhow::Result<T> {
    kmm_e2e::testkit::eventually(what, deadline(), f).await
}

pub(crate) fn sim_node(
    name: &str,
    kernel: &str,
    labels: &[(&str, &str)],
    in_tree: &[&str],
) -> SimNode {
    SimNode {
        name: name.into(),
        kernel: kernel.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        in_tree_modules: in_tree.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// Namespace, the labs' service account and the pull secret.
pub(crate) async fn prepare_namespace(fleet: &Fleet, client: &Client) -> anyhow::Result<()> {
    kmm_e2e::testkit::prepare_lab_namespace(client, fleet.registry(), TEST_MANAGER).await
}

/// Push a kmod image with `modules` for `kernels`; returns its reference.
pub(crate) async fn push_kmod(
    fleet: &Fleet,
    repo_tag: &str,
    kernels: &[&str],
    modules: &[&str],
) -> anyhow::Result<String> {
    let reference = format!("{}/{repo_tag}", fleet.registry().host());
    push_kmod_image(
        &fleet.registry().access(),
        &reference,
        &KmodImage::new(kernels, modules),
    )
    .await?;
    Ok(reference)
}

/// The lab's `kmm-ci-a` image for kernel `K1`, tagged `labs/kmm-kmod:<K1>-v<version>`.
pub(crate) async fn push_lab_kmod(fleet: &Fleet, version: &str) -> anyhow::Result<String> {
    push_kmod(
        fleet,
        &format!("labs/kmm-kmod:{K1}-v{version}"),
        &[K1],
        &["kmm-ci-a"],
    )
    .await
}

pub(crate) fn module_from_yaml(yaml: &str) -> Module {
    serde_yaml::from_str(yaml).unwrap()
}

pub(crate) async fn apply_module(client: &Client, module: &Module) -> anyhow::Result<()> {
    let mut body = serde_json::to_value(module)?;
    body["apiVersion"] = json!("kmm.sigs.x-k8s.io/v1beta1");
    body["kind"] = json!("Module");
    if let Some(m) = body["metadata"].as_object_mut() {
        m.remove("uid");
        m.remove("resourceVersion");
    }
    Api::<Module>::namespaced(client.clone(), NS)
        .patch(
            &module.name_any(),
            &PatchParams::apply(TEST_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await
        .context("applying the Module")?;
    Ok(())
}

/// The seeds' "load an existing image" lab, loading `image`.
pub(crate) fn lab_module(image: &str) -> Module {
    Module::lab(Lab::Load).in_namespace(NS).with_image(image)
}

pub(crate) async fn node(client: &Client, name: &str) -> anyhow::Result<Node> {
    Ok(Api::<Node>::all(client.clone()).get(name).await?)
}

pub(crate) fn loaded(fleet: &Fleet, node: &str) -> Vec<String> {
    fleet.node_sim(SPOKE).loaded_modules(node)
}

/// Wait until the node's loaded modules are exactly `want`.
pub(crate) async fn wait_loaded(fleet: &Fleet, node: &str, want: &[&str]) -> anyhow::Result<()> {
    eventually(&format!("modules {want:?} on {node}"), async || {
        let got = loaded(fleet, node);
        Ok(if got == want {
            Ok(())
        } else {
            Err(format!("{got:?}"))
        })
    })
    .await
}

pub(crate) async fn loader_daemonsets(client: &Client) -> anyhow::Result<Vec<DaemonSet>> {
    let lp = ListParams::default().labels(&format!(
        "{MODULE_NAME_LABEL}=kmm-ci-a,{ROLE_LABEL}={ROLE_LOADER}"
    ));
    Ok(Api::<DaemonSet>::namespaced(client.clone(), NS)
        .list(&lp)
        .await?
        .items)
}

pub(crate) async fn node_events(client: &Client, reason: &str) -> anyhow::Result<Vec<Event>> {
    let all = Api::<Event>::namespaced(
        client.clone(),
        kmm_spoke::controller::events::EVENT_NAMESPACE,
    )
    .list(&ListParams::default())
    .await?
    .items;
    Ok(all
        .into_iter()
        .filter(|e| {
            e.reason.as_deref() == Some(reason)
                && e.reporting_controller.as_deref() == Some("kmm-spoke")
        })
        .collect())
}

/// Delete the Module and wait until it is gone with nothing of it left on the nodes.
pub(crate) async fn delete_and_wait_clean(
    fleet: &Fleet,
    client: &Client,
    nodes: &[&str],
) -> anyhow::Result<()> {
    Api::<Module>::namespaced(client.clone(), NS)
        .delete("kmm-ci-a", &DeleteParams::default())
        .await?;
    eventually("the Module deleted (finalizer released)", async || {
        let m = Api::<Module>::namespaced(client.clone(), NS)
            .get_opt("kmm-ci-a")
            .await?;
        Ok(match m {
            None => Ok(()),
            Some(m) => Err(format!(
                "finalizers {:?}, status {:?}",
                m.finalizers(),
                m.status
            )),
        })
    })
    .await?;
    for n in nodes {
        wait_loaded(fleet, n, &[]).await?;
        let labels = node(client, n).await?.labels().clone();
        let ours: Vec<&String> = labels
            .keys()
            .filter(|k| is_module_node_label(k, NS, "kmm-ci-a"))
            .collect();
        if !ours.is_empty() {
            bail!("node {n} still has {ours:?}");
        }
    }
    let left = Api::<DaemonSet>::namespaced(client.clone(), NS)
        .list(&ListParams::default().labels(&format!("{MODULE_NAME_LABEL}=kmm-ci-a")))
        .await?
        .items;
    if !left.is_empty() {
        bail!(
            "DaemonSets left: {:?}",
            left.iter().map(|d| d.name_any()).collect::<Vec<_>>()
        );
    }
    Ok(())
}
