//! `spec.spokePrerequisites`: an MCM applied to a spoke prepared by nobody (no namespace, no
//! ServiceAccount, no pull secret; only the spoke agent and the OCM agents) converges, because
//! its ManifestWork carries the namespace, the loader's ServiceAccount and a copy of the pull
//! secret; the copy follows the hub's Secret; deleting the MCM removes the Module and the copy
//! and leaves the namespace and the ServiceAccount.

use std::time::Duration;

use anyhow::{Context as _, ensure};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Namespace, Secret, ServiceAccount};
use kmm_e2e::fleet::{Fleet, spoke_name, worker_node};
use kmm_e2e::oci::{KmodImage, push_kmod_image};
use kmm_e2e::testkit::{ensure_namespace, eventually, put_pull_secret};
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde_json::json;
use shared_api::{ManagedClusterModule, Module};

use crate::setup::{apply_mcm, mcm_status, start_hub, works};
use crate::spoke_agent::RunningAgent;
use crate::{HUB_NS, PULL_SECRET};

const KERNEL: &str = "5.14.0-284.36.1.el9_2.x86_64";
/// A namespace no one creates on the spoke.
const FRESH_NS: &str = "kmm-fresh";
const LOADER_SA: &str = "kmm-fresh-loader";
const NAME: &str = "kmm-ci-fresh";
const DEADLINE: Duration = Duration::from_secs(180);

fn fresh_mcm(fleet: &Fleet) -> anyhow::Result<ManagedClusterModule> {
    let host = fleet.registry().host();
    Ok(serde_json::from_value(json!({
        "apiVersion": "hub.kmm.sigs.x-k8s.io/v1beta1", "kind": "ManagedClusterModule",
        "metadata": {"name": NAME},
        "spec": {
            "spokeNamespace": FRESH_NS,
            "selector": {},
            "spokePrerequisites": {"pullSecret": true},
            "moduleSpec": {
                "selector": {"node-role.kubernetes.io/worker": ""},
                "imageRepoSecret": {"name": PULL_SECRET},
                "moduleLoader": {
                    "serviceAccountName": LOADER_SA,
                    "container": {
                        "modprobe": {"moduleName": "kmm_ci_a"},
                        "kernelMappings": [{"regexp": "^.*$",
                            "containerImage": format!("{host}/kmm/kmm-ci-fresh:${{KERNEL_FULL_VERSION}}")}]
                    }
                }
            }
        }
    }))?)
}

fn dockerconfigjson(s: &Secret) -> Option<Vec<u8>> {
    s.data
        .as_ref()?
        .get(".dockerconfigjson")
        .map(|b| b.0.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_spoke_needs_no_preparation() -> anyhow::Result<()> {
    Fleet::builder()
        .spokes(1)
        .nodes_with(|_, spoke| vec![worker_node(&format!("{spoke}-w1"), KERNEL)])
        // Pulls need the credential: without the copy the loader cannot start.
        .registry_auth(true)
        .run(async |fleet: &mut Fleet| {
            let hub = fleet.hub().client().await;
            ensure_namespace(&hub, HUB_NS).await?;
            put_pull_secret(&hub, fleet.registry(), PULL_SECRET, HUB_NS).await?;
            push_kmod_image(
                &fleet.registry().access(),
                &format!("{}/kmm/kmm-ci-fresh:{KERNEL}", fleet.registry().host()),
                &KmodImage::new(&[KERNEL], &["kmm_ci_a"]),
            )
            .await?;
            // On the spoke: only the agent (which publishes the kernel claim).
            let spoke = fleet.spoke(1).client().await;
            ensure!(
                Api::<Namespace>::all(spoke.clone())
                    .get_opt(FRESH_NS)
                    .await?
                    .is_none(),
                "the namespace must not exist before"
            );
            let agent = RunningAgent::start(spoke.clone());
            let hub_proc = start_hub(fleet, Duration::from_secs(3));
            let outcome = async {
                apply_mcm(&hub, &fresh_mcm(fleet)?).await?;
                let node = format!("{}-w1", spoke_name(1));
                eventually("kmm_ci_a loaded on the fresh spoke", DEADLINE, || async {
                    let got = fleet.node_sim(&spoke_name(1)).loaded_modules(&node);
                    Ok(if got == ["kmm_ci_a"] {
                        Ok(())
                    } else {
                        Err(format!("{got:?}"))
                    })
                })
                .await?;

                // What the work made: the labelled namespace, the ServiceAccount, the copy.
                let ns = Api::<Namespace>::all(spoke.clone()).get(FRESH_NS).await?;
                ensure!(
                    ns.metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get("pod-security.kubernetes.io/enforce"))
                        .map(String::as_str)
                        == Some("privileged"),
                    "namespace labels {:?}",
                    ns.metadata.labels
                );
                let sas: Api<ServiceAccount> = Api::namespaced(spoke.clone(), FRESH_NS);
                sas.get(LOADER_SA).await.context("the loader's ServiceAccount")?;
                let secrets: Api<Secret> = Api::namespaced(spoke.clone(), FRESH_NS);
                let copy = secrets.get(PULL_SECRET).await.context("the pull secret copy")?;
                ensure!(
                    copy.type_.as_deref() == Some("kubernetes.io/dockerconfigjson")
                        && dockerconfigjson(&copy)
                            == Some(fleet.registry().dockerconfigjson().into_bytes()),
                    "the copy is the hub's dockerconfigjson"
                );

                // The hub's Secret changes: the copy follows.
                let changed = format!(
                    r#"{{"auths":{{"{}":{{"auth":"cm90YXRlZDpjcmVkZW50aWFs"}}}}}}"#,
                    fleet.registry().host()
                );
                let patch = json!({"data": {".dockerconfigjson": ByteString(changed.clone().into_bytes())}});
                Api::<Secret>::namespaced(hub.clone(), HUB_NS)
                    .patch(PULL_SECRET, &PatchParams::default(), &Patch::Merge(&patch))
                    .await?;
                eventually("the copy follows the hub's Secret", DEADLINE, || async {
                    let s = secrets.get(PULL_SECRET).await?;
                    Ok(if dockerconfigjson(&s) == Some(changed.clone().into_bytes()) {
                        Ok(())
                    } else {
                        Err("still the old content".to_string())
                    })
                })
                .await?;
                // Never in the MCM's status.
                let status = serde_json::to_string(&mcm_status(&hub, NAME).await?.status)?;
                ensure!(
                    !status.contains("cm90YXRlZDpjcmVkZW50aWFs") && !status.contains("auths"),
                    "credential in status: {status}"
                );

                // Back to the working credential (unloading may pull the image again).
                put_pull_secret(&hub, fleet.registry(), PULL_SECRET, HUB_NS).await?;
                let original = fleet.registry().dockerconfigjson().into_bytes();
                eventually("the copy is restored", DEADLINE, || async {
                    let s = secrets.get(PULL_SECRET).await?;
                    Ok(if dockerconfigjson(&s) == Some(original.clone()) {
                        Ok(())
                    } else {
                        Err("still the changed content".to_string())
                    })
                })
                .await?;

                // Deleting the MCM: the Module and the copy go, the namespace and the
                // ServiceAccount stay (they may serve others).
                Api::<ManagedClusterModule>::all(hub.clone())
                    .delete(NAME, &DeleteParams::default())
                    .await?;
                eventually("the work is gone", DEADLINE, || async {
                    let ws = works(&hub, NAME).await?;
                    Ok(if ws.is_empty() { Ok(()) } else { Err(format!("{:?}", ws.keys())) })
                })
                .await?;
                let modules: Api<Module> = Api::namespaced(spoke.clone(), FRESH_NS);
                eventually("Module and copy removed from the spoke", DEADLINE, || async {
                    let m = modules.get_opt(NAME).await?.is_some();
                    let s = secrets.get_opt(PULL_SECRET).await?.is_some();
                    Ok(if !m && !s { Ok(()) } else { Err(format!("module {m}, secret {s}")) })
                })
                .await?;
                let ns = Api::<Namespace>::all(spoke.clone()).get(FRESH_NS).await?;
                ensure!(
                    ns.metadata.deletion_timestamp.is_none(),
                    "the namespace is orphaned, not deleted"
                );
                sas.get(LOADER_SA)
                    .await
                    .context("the ServiceAccount is orphaned, not deleted")?;
                anyhow::Ok(())
            }
            .await;
            hub_proc.stop().await;
            agent.stop().await;
            outcome
        })
        .await
}
