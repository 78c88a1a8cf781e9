//! The RHCOS image claim of OpenShift spokes: the agent publishes the `baseOSContainerImage`
//! of the Machine Config Operator's ConfigMap as `os-image.kmm.node.kubernetes.io`, follows
//! it, and removes the claim when the ConfigMap goes; another ConfigMap of that namespace,
//! or none at all, publishes nothing.

use k8s_openapi::api::core::v1::ConfigMap;
use kmm_e2e::fleet::{Fleet, worker_node};
use kmm_e2e::testkit::ensure_namespace;
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde_json::json;
use shared_api::ClusterClaim;
use shared_api::day0::{BASE_OS_IMAGE_KEY, MCO_NAMESPACE, OS_IMAGE_CLAIM, OS_IMAGE_URL_CONFIGMAP};
use shared_api::ocm::KERNEL_VERSIONS_CLAIM;

use crate::setup::{RunningAgent, eventually};
use crate::{K1, ONE_FLEET_AT_A_TIME};

const RHCOS_A: &str = "quay.io/openshift-release-dev/ocp-v4.0-art-dev@sha256:aaaa";
const RHCOS_B: &str = "quay.io/openshift-release-dev/ocp-v4.0-art-dev@sha256:bbbb";
const PROMPT: std::time::Duration = std::time::Duration::from_secs(30);

async fn claim(client: &Client, name: &str) -> anyhow::Result<Option<String>> {
    Ok(Api::<ClusterClaim>::all(client.clone())
        .get_opt(name)
        .await?
        .map(|c| c.spec.value))
}

/// Within [`PROMPT`]: shorter than the agent's resync (60 s), so that the watch, not the
/// periodic relist, is what makes the claim follow.
async fn os_claim_is(client: &Client, want: Option<&str>) -> anyhow::Result<()> {
    let what = format!("RHCOS image claim {want:?}");
    kmm_e2e::testkit::eventually(&what, PROMPT, async || {
        let got = claim(client, OS_IMAGE_CLAIM).await?;
        Ok(if got.as_deref() == want {
            Ok(())
        } else {
            Err(format!("{got:?}"))
        })
    })
    .await
}

async fn put_configmap(client: &Client, name: &str, image: &str) -> anyhow::Result<()> {
    let cm = json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": MCO_NAMESPACE},
        "data": {BASE_OS_IMAGE_KEY: image}});
    Api::<ConfigMap>::namespaced(client.clone(), MCO_NAMESPACE)
        .patch(
            name,
            &PatchParams::apply("e2e-mco").force(),
            &Patch::Apply(cm),
        )
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rhcos_image_claim_follows_the_mco_configmap() -> anyhow::Result<()> {
    let _one = ONE_FLEET_AT_A_TIME.lock().await;
    Fleet::builder()
        .spoke_nodes(1, vec![worker_node("n1", K1)])
        .run(async |fleet: &mut Fleet| {
            let client = fleet.spoke(1).client().await;
            let agent = RunningAgent::start(client.clone());
            // Not OpenShift: no namespace, no claim (the kernel claim comes first).
            eventually("the kernel claim", async || {
                Ok(match claim(&client, KERNEL_VERSIONS_CLAIM).await? {
                    Some(_) => Ok(()),
                    None => Err("not yet".to_string()),
                })
            })
            .await?;
            os_claim_is(&client, None).await?;

            // Another ConfigMap of the namespace is not read.
            ensure_namespace(&client, MCO_NAMESPACE).await?;
            put_configmap(&client, "machine-config-operator-images", RHCOS_B).await?;
            put_configmap(&client, OS_IMAGE_URL_CONFIGMAP, RHCOS_A).await?;
            os_claim_is(&client, Some(RHCOS_A)).await?;

            // An upgrade changes it; the claim follows.
            put_configmap(&client, OS_IMAGE_URL_CONFIGMAP, RHCOS_B).await?;
            os_claim_is(&client, Some(RHCOS_B)).await?;

            // The ConfigMap goes: so does the claim.
            Api::<ConfigMap>::namespaced(client.clone(), MCO_NAMESPACE)
                .delete(OS_IMAGE_URL_CONFIGMAP, &DeleteParams::default())
                .await?;
            os_claim_is(&client, None).await?;
            agent.stop().await;
            Ok(())
        })
        .await
}
