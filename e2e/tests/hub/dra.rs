//! Issue 17 point 2, hub side: an MCM with `moduleSpec.dra` ships to the clusters whose
//! ManagedCluster reports Kubernetes 1.34 or later (the test world's spoke runs v1.37), while
//! a cluster that reports an older one gets no work and is named in the MCM's status with
//! `DRANotSupported`, until it reports 1.34.

use std::time::Duration;

use kmm_e2e::fleet::{Fleet, spoke_name};
use kmm_e2e::testkit::{ensure_namespace, eventually};
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use shared_api::ManagedCluster;
use shared_api::ocm::KERNEL_VERSIONS_CLAIM;

use crate::setup::{apply_mcm, mcm, mcm_status, prepare, push, start_hub, works};

const OLD: &str = "old-spoke";

/// A ManagedCluster's status as the registration agent of a spoke on `version` with nodes on
/// `kernel` reports it.
async fn report(hub: &Client, cluster: &str, version: &str, kernel: &str) -> anyhow::Result<()> {
    Api::<ManagedCluster>::all(hub.clone())
        .patch_status(
            cluster,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {
                "version": {"kubernetes": version},
                "clusterClaims": [{"name": KERNEL_VERSIONS_CLAIM, "value": kernel}]}})),
        )
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dra_ships_only_to_clusters_reporting_1_34_or_later() -> anyhow::Result<()> {
    Fleet::builder()
        .spokes(1)
        .simulators(false)
        .run(async |fleet: &mut Fleet| {
            let k = "5.14.0-1.fake";
            prepare(fleet, &[&[k]]).await?;
            push(fleet, k).await?;
            let hub = fleet.hub().client().await;
            let cluster: ManagedCluster = serde_json::from_value(json!({
                "apiVersion": "cluster.open-cluster-management.io/v1", "kind": "ManagedCluster",
                "metadata": {"name": OLD}, "spec": {"hubAcceptsClient": true}}))?;
            Api::<ManagedCluster>::all(hub.clone())
                .create(&PostParams::default(), &cluster)
                .await?;
            ensure_namespace(&hub, OLD).await?;
            report(&hub, OLD, "v1.33.4", k).await?;
            // The fleet runs without OCM agents here: spoke-1's status as its agent reports it
            // (the test world's API servers are v1.37).
            report(&hub, &spoke_name(1), "v1.37.2", k).await?;

            let mut m = mcm(fleet, "dra-mod", json!({}))?;
            let mut spec = serde_json::to_value(&m.spec)?;
            spec["moduleSpec"]["dra"] = json!({
                "driverName": "gpu.example.com",
                "container": {"image": format!("{}/kmm/dra-driver:1", fleet.registry().host())},
                "deviceClasses": [{"name": "gpu.example.com"}]});
            m.spec = serde_json::from_value(spec)?;
            let hubp = start_hub(fleet, Duration::from_secs(3));
            apply_mcm(&hub, &m).await?;

            let spoke = spoke_name(1);
            eventually(
                "a work with the DRA Module for the v1.37 spoke, none and DRANotSupported for the v1.33 one",
                Duration::from_secs(60),
                async || {
                    let w = works(&hub, "dra-mod").await?;
                    let st = mcm_status(&hub, "dra-mod").await?.status;
                    let problem = st
                        .as_ref()
                        .and_then(|s| s.clusters.iter().find(|c| c.name == OLD).cloned());
                    let dra_shipped = w.get(&spoke).is_some_and(|w| {
                        kmm_hub::render::module_manifest(w)
                            .is_some_and(|m| m["spec"]["dra"]["driverName"] == "gpu.example.com")
                    });
                    Ok(match problem {
                        Some(p)
                            if dra_shipped
                                && !w.contains_key(OLD)
                                && p.reason == "DRANotSupported"
                                && p.message.contains("1.33") =>
                        {
                            Ok(())
                        }
                        p => Err(format!(
                            "works {:?}, DRA shipped to {spoke}: {dra_shipped}, {OLD}: {p:?}; all: {:?}",
                            w.keys().collect::<Vec<_>>(),
                            st.as_ref().map(|s| &s.clusters)
                        )),
                    })
                },
            )
            .await?;

            // The old cluster is upgraded: its agent now reports 1.34, and it gets the work.
            report(&hub, OLD, "v1.34.1", k).await?;
            eventually(
                "a work for the upgraded cluster",
                Duration::from_secs(60),
                async || {
                    let w = works(&hub, "dra-mod").await?;
                    let st = mcm_status(&hub, "dra-mod").await?.status;
                    // (No work agent runs here: the cluster may still be named for its
                    // work not being applied, never again for DRA.)
                    let named = st.as_ref().is_some_and(|s| {
                        s.clusters
                            .iter()
                            .any(|c| c.name == OLD && c.reason == "DRANotSupported")
                    });
                    Ok(if w.contains_key(OLD) && !named {
                        Ok(())
                    } else {
                        Err(format!(
                            "works {:?}, {OLD} still DRANotSupported: {named}",
                            w.keys().collect::<Vec<_>>()
                        ))
                    })
                },
            )
            .await?;
            hubp.stop().await;
            Ok(())
        })
        .await
}
