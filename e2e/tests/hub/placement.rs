//! `spec.placementRef`: an MCM follows an OCM Placement's decisions (OCM's own placement
//! controller decides, over the `global` ManagedClusterSet bound to the hub namespace); a
//! missing Placement changes nothing that runs.

use std::time::Duration;

use kmm_e2e::fleet::{Fleet, spoke_name, worker_node};
use kmm_e2e::testkit::eventually;
use kube::Client;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::json;
use shared_api::ManagedCluster;
use shared_api::ocm::ManifestWork;

use crate::HUB_NS;
use crate::setup::{apply_mcm, condition, mcm, mcm_status, prepare, push, start_hub, works};

const KERNEL: &str = "5.14.0-284.36.1.el9_2.x86_64";

async fn apply_ocm(
    hub: &Client,
    kind: &str,
    version: &str,
    obj: serde_json::Value,
) -> anyhow::Result<()> {
    let gvk = GroupVersionKind::gvk("cluster.open-cluster-management.io", version, kind);
    let ar = ApiResource::from_gvk(&gvk);
    let api: Api<DynamicObject> = Api::namespaced_with(hub.clone(), HUB_NS, &ar);
    let name = obj["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    api.patch(
        &name,
        &PatchParams::apply("test").force(),
        &Patch::Apply(obj),
    )
    .await?;
    Ok(())
}

async fn label(hub: &Client, cluster: &str, env: &str) -> anyhow::Result<()> {
    Api::<ManagedCluster>::all(hub.clone())
        .patch(
            cluster,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"env": env}}})),
        )
        .await?;
    Ok(())
}

async fn work_clusters(hub: &Client) -> anyhow::Result<Vec<String>> {
    Ok(works(hub, "kmm-ci-a").await?.into_keys().collect())
}

async fn clusters_are(hub: &Client, want: &[usize]) -> anyhow::Result<()> {
    let want: Vec<String> = want.iter().map(|i| spoke_name(*i)).collect();
    eventually(
        &format!("works on {want:?}"),
        Duration::from_secs(90),
        || async {
            let got = work_clusters(hub).await?;
            Ok(if got == want {
                Ok(())
            } else {
                Err(format!("{got:?}"))
            })
        },
    )
    .await
}

fn generation(w: &ManifestWork) -> Option<i64> {
    w.metadata.generation
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mcm_follows_its_placement_decisions() -> anyhow::Result<()> {
    Fleet::builder()
        .spokes(3)
        .nodes_with(|_, spoke| vec![worker_node(&format!("{spoke}-w1"), KERNEL)])
        .registry_auth(true)
        .run(async |fleet: &mut Fleet| {
            prepare(fleet, &[&[KERNEL], &[KERNEL], &[KERNEL]]).await?;
            push(fleet, KERNEL).await?;
            let hub = fleet.hub().client().await;
            let _hub_proc = start_hub(fleet, Duration::from_secs(3));
            label(&hub, &spoke_name(1), "prod").await?;
            label(&hub, &spoke_name(2), "prod").await?;
            label(&hub, &spoke_name(3), "dev").await?;

            // A label selector first: every cluster has the module.
            apply_mcm(&hub, &mcm(fleet, "kmm-ci-a", json!({}))?).await?;
            clusters_are(&hub, &[1, 2, 3]).await?;
            let before = works(&hub, "kmm-ci-a").await?;

            // A Placement that does not exist yet: nothing that runs changes.
            let mut placed = mcm(fleet, "kmm-ci-a", json!({}))?;
            placed.spec.placement_ref = Some(shared_api::mcm::PlacementRef {
                name: "prod".into(),
            });
            apply_mcm(&hub, &placed).await?;
            eventually("PlacementNotFound", Duration::from_secs(60), || async {
                let m = mcm_status(&hub, "kmm-ci-a").await?;
                Ok(match condition(&m, "Degraded") {
                    Some((s, r, msg)) if s == "True" && r == "PlacementNotFound" => Ok(msg),
                    other => Err(format!("{other:?}")),
                })
            })
            .await?;
            tokio::time::sleep(Duration::from_secs(4)).await; // more than a resync period
            let held = works(&hub, "kmm-ci-a").await?;
            assert_eq!(
                held.keys().collect::<Vec<_>>(),
                before.keys().collect::<Vec<_>>()
            );
            for (c, w) in &held {
                assert_eq!(
                    generation(w),
                    generation(&before[c]),
                    "{c}'s work untouched"
                );
            }

            // The Placement (env=prod over the global set bound to the hub namespace): exactly
            // its decisions.
            apply_ocm(
                &hub,
                "ManagedClusterSetBinding",
                "v1beta2",
                json!({"apiVersion": "cluster.open-cluster-management.io/v1beta2",
                    "kind": "ManagedClusterSetBinding",
                    "metadata": {"name": "global", "namespace": HUB_NS},
                    "spec": {"clusterSet": "global"}}),
            )
            .await?;
            apply_ocm(
                &hub,
                "Placement",
                "v1beta1",
                json!({"apiVersion": "cluster.open-cluster-management.io/v1beta1",
                    "kind": "Placement",
                    "metadata": {"name": "prod", "namespace": HUB_NS},
                    "spec": {"clusterSets": ["global"],
                        "predicates": [{"requiredClusterSelector":
                            {"labelSelector": {"matchLabels": {"env": "prod"}}}}]}}),
            )
            .await?;
            clusters_are(&hub, &[1, 2]).await?;
            let kept = works(&hub, "kmm-ci-a").await?;
            assert_eq!(
                generation(&kept[&spoke_name(1)]),
                generation(&before[&spoke_name(1)]),
                "a cluster that stays keeps its work as it was"
            );
            eventually("Ready again", Duration::from_secs(60), || async {
                let m = mcm_status(&hub, "kmm-ci-a").await?;
                Ok(match condition(&m, "Degraded") {
                    Some((s, _, _)) if s == "False" => Ok(()),
                    other => Err(format!("{other:?}")),
                })
            })
            .await?;

            // The Placement's predicate now picks other clusters: the works follow.
            label(&hub, &spoke_name(2), "dev").await?;
            label(&hub, &spoke_name(3), "prod").await?;
            clusters_are(&hub, &[1, 3]).await?;

            // No cluster matches: the Placement decides none, and the works go.
            label(&hub, &spoke_name(1), "dev").await?;
            label(&hub, &spoke_name(3), "dev").await?;
            clusters_are(&hub, &[]).await?;
            eventually("no cluster desired", Duration::from_secs(30), || async {
                let s = mcm_status(&hub, "kmm-ci-a")
                    .await?
                    .status
                    .unwrap_or_default();
                Ok(if s.number_desired == 0 {
                    Ok(())
                } else {
                    Err(format!("{s:?}"))
                })
            })
            .await?;
            Ok(())
        })
        .await
}
