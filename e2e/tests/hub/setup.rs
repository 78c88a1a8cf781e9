//! The hub in-process on a fleet: spoke preparation, kernel claims, images, MCMs, and reading
//! works and status back.

use std::time::Duration;

use kmm_e2e::fleet::Fleet;
use kmm_e2e::oci::{KmodImage, push_kmod_image};
use kmm_e2e::testkit::{HubOptions, HubProcess, ensure_namespace};
pub(crate) use kmm_e2e::testkit::{mcm_status, works};
use kmm_e2e::testkit::{put_pull_secret, set_kernel_claim};
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use shared_api::ocm::ManifestWork;
use shared_api::{ManagedClusterModule, Module};

use crate::{BUILD_NS, HUB_NS, PULL_SECRET, SPOKE_NS};

pub(crate) fn start_hub(fleet: &Fleet, resync: Duration) -> HubProcess {
    let mut o = HubOptions::new(fleet.hub().kubeconfig_path(), HUB_NS);
    o.resync = resync;
    HubProcess::start(o).expect("hub starts")
}

/// Hub namespace with the registry pull secret; spoke namespaces; kernel claims on spokes.
pub(crate) async fn prepare(fleet: &Fleet, kernels: &[&[&str]]) -> anyhow::Result<()> {
    let hub = fleet.hub().client().await;
    ensure_namespace(&hub, HUB_NS).await?;
    ensure_namespace(&hub, BUILD_NS).await?;
    put_pull_secret(&hub, fleet.registry(), PULL_SECRET, HUB_NS).await?;
    for (i, ks) in kernels.iter().enumerate() {
        let spoke = fleet.spoke(i + 1).client().await;
        ensure_namespace(&spoke, SPOKE_NS).await?;
        set_kernel_claim(&spoke, ks).await?;
    }
    Ok(())
}

pub(crate) fn image(fleet: &Fleet, kernel: &str) -> String {
    format!("{}/kmm/kmm-ci-a:{kernel}", fleet.registry().host())
}

pub(crate) async fn push(fleet: &Fleet, kernel: &str) -> anyhow::Result<String> {
    let img = KmodImage::new(&[kernel], &["kmm_ci_a"]);
    Ok(push_kmod_image(&fleet.registry().access(), &image(fleet, kernel), &img).await?)
}

pub(crate) fn mcm(
    fleet: &Fleet,
    name: &str,
    selector: serde_json::Value,
) -> anyhow::Result<ManagedClusterModule> {
    let host = fleet.registry().host();
    Ok(serde_json::from_value(json!({
        "apiVersion": "hub.kmm.sigs.x-k8s.io/v1beta1", "kind": "ManagedClusterModule",
        "metadata": {"name": name},
        "spec": {
            "spokeNamespace": SPOKE_NS,
            "selector": selector,
            "moduleSpec": {
                "selector": {"node-role.kubernetes.io/worker": ""},
                "imageRepoSecret": {"name": PULL_SECRET},
                "moduleLoader": {"container": {
                    "modprobe": {"moduleName": "kmm_ci_a"},
                    "kernelMappings": [{"regexp": "^.*$", "containerImage": format!("{host}/kmm/kmm-ci-a:${{KERNEL_FULL_VERSION}}")}]
                }}
            }
        }
    }))?)
}

pub(crate) async fn apply_mcm(hub: &Client, m: &ManagedClusterModule) -> anyhow::Result<()> {
    let api: Api<ManagedClusterModule> = Api::all(hub.clone());
    api.patch(
        &m.name_any(),
        &PatchParams::apply("test").force(),
        &Patch::Apply(m),
    )
    .await?;
    Ok(())
}

pub(crate) fn work_images(w: &ManifestWork) -> Vec<String> {
    let module = kmm_hub::render::module_manifest(w)
        .cloned()
        .unwrap_or_default();
    let m: Module =
        serde_json::from_value(module).unwrap_or_else(|_| Module::new("x", Default::default()));
    m.spec
        .module_loader
        .map(|l| {
            l.container
                .kernel_mappings
                .into_iter()
                .map(|k| format!("{}={}", k.literal.unwrap_or_default(), k.container_image))
                .collect()
        })
        .unwrap_or_default()
}

pub(crate) fn condition(m: &ManagedClusterModule, t: &str) -> Option<(String, String, String)> {
    m.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == t)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}
