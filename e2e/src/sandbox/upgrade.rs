//! The labs' ordered upgrade, scripted: a versioned MCM loads version 0.9 only on the node
//! labelled with it; unlabelling the node stops and unloads it; relabelling it with 1.0 and
//! changing the MCM's version and image together loads 1.0 there. `kmm-sandbox
//! --ordered-upgrade` shows it after the labs; the scenario suite checks it.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Client;
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::json;
use shared_api::labels::{
    MODULE_NAME_LABEL, ROLE_LABEL, ROLE_LOADER, module_ready_label, module_version_ready_label,
    version_module_label,
};

use super::Sandbox;
use super::progress::Progress;
use crate::labs::{LAB_NAMESPACE, LAB_SERVICE_ACCOUNT, PULL_SECRET, WORKER_LABEL};
use crate::oci::{KmodImage, SignWith, push_kmod_image};

/// The MCM (and Module) of the demonstration.
pub const NAME: &str = "kmm-ci-a-upgrade";
/// The node upgraded, on spoke-1.
pub const NODE: &str = "spoke-1-worker-1";
/// The kernel module it loads (its own, so the other labs are not disturbed).
pub const MODULE: &str = "kmm_upgrade";

fn mcm(image: &str, version: &str) -> serde_json::Value {
    json!({
        "apiVersion": "hub.kmm.sigs.x-k8s.io/v1beta1", "kind": "ManagedClusterModule",
        "metadata": {"name": NAME},
        "spec": {"spokeNamespace": LAB_NAMESPACE, "selector": {"name": "spoke-1"},
            "spokePrerequisites": {"pullSecret": true},
            "moduleSpec": {
                "imageRepoSecret": {"name": PULL_SECRET},
                "selector": {WORKER_LABEL: ""},
                "moduleLoader": {"serviceAccountName": LAB_SERVICE_ACCOUNT, "container": {
                    "version": version,
                    "modprobe": {"moduleName": MODULE},
                    "kernelMappings": [{"regexp": "^.*", "containerImage": image}]}}}}
    })
}

async fn label(spoke: &Client, value: Option<&str>) -> anyhow::Result<()> {
    Api::<Node>::all(spoke.clone())
        .patch(
            NODE,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {
                version_module_label(LAB_NAMESPACE, NAME): value}}})),
        )
        .await?;
    Ok(())
}

/// `(loaded on NODE, node labels, images of the loader pods on NODE)`.
async fn state(spoke: &Client) -> anyhow::Result<(bool, BTreeMap<String, String>, Vec<String>)> {
    let node = Api::<Node>::all(spoke.clone()).get(NODE).await?;
    let obs = super::converge::node_state("spoke-1", &node);
    let pods = Api::<Pod>::namespaced(spoke.clone(), LAB_NAMESPACE)
        .list(&ListParams::default().labels(&format!(
            "{ROLE_LABEL}={ROLE_LOADER},{MODULE_NAME_LABEL}={NAME}"
        )))
        .await?
        .items;
    let images = pods
        .iter()
        .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(NODE))
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .flat_map(|p| p.spec.iter().flat_map(|s| s.containers.iter()))
        .filter_map(|c| c.image.clone())
        .collect();
    Ok((obs.loaded.iter().any(|m| m == MODULE), obs.labels, images))
}

async fn wait_for(
    what: &str,
    spoke: &Client,
    ok: impl Fn(bool, &BTreeMap<String, String>, &[String]) -> bool,
) -> anyhow::Result<()> {
    crate::testkit::eventually(what, Duration::from_secs(120), || async {
        let (loaded, labels, images) = state(spoke).await?;
        Ok(if ok(loaded, &labels, &images) {
            Ok(())
        } else {
            Err(format!(
                "{MODULE} loaded: {loaded}; loader images {images:?}; kmm labels {:?}",
                labels
                    .iter()
                    .filter(|(k, _)| k.contains(NAME))
                    .collect::<BTreeMap<_, _>>()
            ))
        })
    })
    .await
}

/// Run the ordered upgrade on spoke-1 (four steps of `progress`). Leaves version 1.0 running.
pub async fn ordered_upgrade(sb: &Sandbox, progress: &Progress) -> anyhow::Result<()> {
    let spoke = sb.fleet().spoke(1).client().await;
    let hub = sb.hub_client().await;
    let host = sb.registry_host();
    let (v09, v10) = (
        format!("{host}/upgrade/kmm-kmod:v0.9"),
        format!("{host}/upgrade/kmm-kmod:v1.0"),
    );
    let step = progress.step("Ordered upgrade: pushing the 0.9 and 1.0 images");
    let mut digests = Vec::new();
    for (image, version) in [(&v09, "0.9"), (&v10, "1.0")] {
        let mut k = KmodImage::new(&[crate::labs::KERNEL_A, crate::labs::KERNEL_B], &[MODULE]);
        k.sign = Some(SignWith {
            key: sb.keys.key_pem_path.clone(),
            cert: sb.keys.cert_pem_path.clone(),
        });
        k.annotations.insert("version".into(), version.into());
        digests.push(push_kmod_image(&sb.fleet().registry().access(), image, &k).await?);
    }
    step.done(format!("{v09}, {v10}"));

    let version_label = version_module_label(LAB_NAMESPACE, NAME);
    let version_ready = module_version_ready_label(LAB_NAMESPACE, NAME);
    let ready = module_ready_label(LAB_NAMESPACE, NAME);
    let step = progress.step(&format!(
        "Ordered upgrade: label {NODE} {version_label}=0.9, apply {NAME} version 0.9"
    ));
    label(&spoke, Some("0.9")).await?;
    super::apply_mcm(&hub, &mcm(&v09, "0.9")).await?;
    let d09 = digests[0].clone();
    wait_for(
        "0.9 loaded on the labelled node",
        &spoke,
        |loaded, labels, images| {
            loaded
                && labels.get(&version_ready).map(String::as_str) == Some("0.9")
                && images.iter().all(|i| i.ends_with(&d09))
                && !images.is_empty()
        },
    )
    .await?;
    // Only the labelled node runs a versioned module.
    let other = Api::<Node>::all(spoke.clone())
        .get("spoke-1-worker-sb")
        .await?;
    let other = super::converge::node_state("spoke-1", &other);
    ensure!(
        !other.loaded.iter().any(|m| m == MODULE),
        "{MODULE} on spoke-1-worker-sb, which has no version label"
    );
    step.done(format!("{MODULE} 0.9 loaded on {NODE} only"));

    let step = progress.step(&format!(
        "Ordered upgrade: unlabel {NODE}: the 0.9 loader stops and unloads"
    ));
    label(&spoke, None).await?;
    wait_for("0.9 unloaded", &spoke, |loaded, labels, images| {
        !loaded && !labels.contains_key(&ready) && images.is_empty()
    })
    .await?;
    step.done(format!("{MODULE} unloaded from {NODE}"));

    let step = progress.step(&format!(
        "Ordered upgrade: label {NODE} with 1.0, set version 1.0 and the v1.0 image"
    ));
    label(&spoke, Some("1.0")).await?;
    super::apply_mcm(&hub, &mcm(&v10, "1.0")).await?;
    let d10 = digests[1].clone();
    wait_for("1.0 loaded", &spoke, |loaded, labels, images| {
        loaded
            && labels.get(&version_ready).map(String::as_str) == Some("1.0")
            && !images.is_empty()
            && images.iter().all(|i| i.ends_with(&d10))
    })
    .await
    .context("after the upgrade")?;
    step.done(format!("{MODULE} 1.0 loaded on {NODE}"));
    Ok(())
}
