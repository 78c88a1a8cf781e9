//! The Driver Toolkit claim of OpenShift spokes: kernel → toolkit image through the nodes' OS
//! version and the `openshift/driver-toolkit` ImageStream (its CRD generated from OpenShift's
//! API module); following the ImageStream and the nodes; nothing without them.

use std::collections::BTreeMap;

use kmm_e2e::fleet::{Fleet, worker_node};
use kmm_e2e::openshift::{install_imagestream_crd, put_dtk_imagestream, rhcos_os_image};
use kmm_e2e::sim::SimNode;
use kube::api::{Api, DeleteParams, ListParams};
use kube::{Client, ResourceExt};
use shared_api::ClusterClaim;
use shared_api::dtk::{DTK_IMAGESTREAM_NAME, DTK_IMAGESTREAM_NAMESPACE, ImageStream};
use shared_api::ocm::{DTK_IMAGES_CLAIM, KERNEL_VERSIONS_CLAIM};

use crate::setup::{RunningAgent, eventually};
use crate::{K1, K2, K3, ONE_FLEET_AT_A_TIME};

const OS_A: &str = "416.94.202409191851-0";
const OS_B: &str = "417.94.202410211619-0";
const OS_C: &str = "418.94.202501221327-0";
const DTK_A: &str = "quay.io/openshift-release-dev/ocp-v4.0-art-dev@sha256:aaaa";
const DTK_B: &str = "quay.io/openshift-release-dev/ocp-v4.0-art-dev@sha256:bbbb";
const DTK_C: &str = "quay.io/openshift-release-dev/ocp-v4.0-art-dev@sha256:cccc";
const K4: &str = "5.14.0-427.50.1.el9_4.x86_64";

/// Every claim of the cluster, by name.
async fn all_claims(client: &Client) -> anyhow::Result<BTreeMap<String, String>> {
    Ok(Api::<ClusterClaim>::all(client.clone())
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .map(|c| (c.name_any(), c.spec.value))
        .collect())
}

async fn dtk_claim_is(client: &Client, want: Option<&str>) -> anyhow::Result<()> {
    eventually(&format!("Driver Toolkit claim {want:?}"), async || {
        let got = all_claims(client).await?;
        let dtk: Vec<(&String, &String)> = got
            .iter()
            .filter(|(n, _)| n.starts_with(DTK_IMAGES_CLAIM))
            .collect();
        let ok = match want {
            None => dtk.is_empty(),
            Some(v) => dtk.len() == 1 && dtk[0].0 == DTK_IMAGES_CLAIM && dtk[0].1 == v,
        };
        Ok(if ok { Ok(()) } else { Err(format!("{dtk:?}")) })
    })
    .await
}

fn rhcos(name: &str, kernel: &str, os: &str) -> SimNode {
    SimNode {
        os_image: Some(rhcos_os_image(os)),
        ..worker_node(name, kernel)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn driver_toolkit_claim_follows_the_imagestream_and_the_nodes() -> anyhow::Result<()> {
    let _one = ONE_FLEET_AT_A_TIME.lock().await;
    let binaries = kmm_e2e::provision::ensure_provisioned()?;
    let nodes = vec![
        rhcos("n1", K1, OS_A),
        rhcos("n2", K2, OS_B),
        // Not RHCOS: no OS version, no toolkit.
        worker_node("n3", K3),
    ];
    Fleet::builder()
        .spoke_nodes(1, nodes)
        .run(async |fleet: &mut Fleet| {
            let client = fleet.spoke(1).client().await;
            install_imagestream_crd(&client, &binaries).await?;
            let agent = RunningAgent::start(client.clone());
            // The API is served but the ImageStream does not exist: the kernel claim only.
            eventually("the kernel claim", async || {
                let got = all_claims(&client).await?;
                Ok(if got.contains_key(KERNEL_VERSIONS_CLAIM) {
                    Ok(())
                } else {
                    Err(format!("{got:?}"))
                })
            })
            .await?;
            dtk_claim_is(&client, None).await?;

            // Tags for both OS versions (and `latest`, never mapped).
            put_dtk_imagestream(&client, &[(OS_A, DTK_A), (OS_B, DTK_B)]).await?;
            dtk_claim_is(&client, Some(&format!("{K1}={DTK_A}\n{K2}={DTK_B}"))).await?;

            // n2 updates to a release the ImageStream does not list yet: its kernel has no
            // toolkit until the tag arrives.
            fleet
                .node_sim(crate::SPOKE)
                .upgrade_os("n2", K4, &rhcos_os_image(OS_C))
                .await?;
            dtk_claim_is(&client, Some(&format!("{K1}={DTK_A}"))).await?;
            put_dtk_imagestream(&client, &[(OS_A, DTK_A), (OS_B, DTK_B), (OS_C, DTK_C)]).await?;
            dtk_claim_is(&client, Some(&format!("{K1}={DTK_A}\n{K4}={DTK_C}"))).await?;

            // The ImageStream goes: so does the claim; the kernel claim stays.
            Api::<ImageStream>::namespaced(client.clone(), DTK_IMAGESTREAM_NAMESPACE)
                .delete(DTK_IMAGESTREAM_NAME, &DeleteParams::default())
                .await?;
            dtk_claim_is(&client, None).await?;
            assert!(
                all_claims(&client)
                    .await?
                    .contains_key(KERNEL_VERSIONS_CLAIM)
            );
            agent.stop().await;
            Ok(())
        })
        .await
}
