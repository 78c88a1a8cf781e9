//! Day 1 through the hub (`spec.day1`): an OpenShift spoke (the MachineConfig CRDs of
//! OpenShift's API module installed, `vendor=OpenShift` on its ManagedCluster) receives, after
//! the Module, the Day-1 MachineConfig with the digest the hub pinned for its kernel, applied
//! by the real OCM work agent under the executor's rights; a plain spoke gets the Module only.
//! The pool's machine counts (written here as the MCO would) come back through the work's
//! status feedback into `status.day1`; deleting the MCM removes the MachineConfig and leaves
//! the pool.

use std::time::Duration;

use anyhow::{Context as _, ensure};
use base64::Engine as _;
use kmm_e2e::fleet::{Fleet, spoke_name, worker_node};
use kmm_e2e::testkit::eventually;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams,
};
use serde_json::{Value, json};
use shared_api::{ManagedCluster, ManagedClusterModule, Module};

use crate::SPOKE_NS;
use crate::setup::{apply_mcm, mcm, mcm_status, prepare, push, start_hub};

const KERNEL: &str = "5.14.0-427.13.1.el9_4.x86_64";
const NAME: &str = "kmm-ci-day1";
const MC_NAME: &str = "99-worker-kmm-kmm-ci-day1";
const DEADLINE: Duration = Duration::from_secs(180);
const MANAGER: &str = "e2e-mco";

fn mc_api(client: &kube::Client, kind: &str, plural: &str) -> Api<DynamicObject> {
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("machineconfiguration.openshift.io", "v1", kind),
        plural,
    );
    Api::all_with(client.clone(), &ar)
}

/// The text of the Ignition file at `path` of a MachineConfig.
fn ignition_file(mc: &Value, path: &str) -> Option<String> {
    let f = mc["spec"]["config"]["storage"]["files"]
        .as_array()?
        .iter()
        .find(|f| f["path"] == path)?;
    let (_, data) = f["contents"]["source"].as_str()?.split_once(";base64,")?;
    String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(data)
            .ok()?,
    )
    .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn day1_machine_config_reaches_openshift_spokes_only() -> anyhow::Result<()> {
    let binaries = tokio::task::spawn_blocking(kmm_e2e::provision::ensure_provisioned).await??;
    Fleet::builder()
        .spokes(2)
        .nodes_with(|_, spoke| vec![worker_node(&format!("{spoke}-w1"), KERNEL)])
        .registry_auth(true)
        .run(async |fleet: &mut Fleet| {
            prepare(fleet, &[&[KERNEL], &[KERNEL]]).await?;
            let digest = push(fleet, KERNEL).await?;
            let hub = fleet.hub().client().await;
            let openshift = fleet.spoke(1).client().await;
            let plain = fleet.spoke(2).client().await;

            // Spoke 1 is OpenShift: the MachineConfig API, a worker pool, the vendor label.
            kmm_e2e::cluster::install_machineconfig_crds(&openshift, &binaries, MANAGER).await?;
            let pools = mc_api(&openshift, "MachineConfigPool", "machineconfigpools");
            let pool = json!({
                "apiVersion": "machineconfiguration.openshift.io/v1",
                "kind": "MachineConfigPool",
                "metadata": {"name": "worker"},
                "spec": {"machineConfigSelector": {"matchLabels": {
                    "machineconfiguration.openshift.io/role": "worker"}}},
            });
            pools
                .patch("worker", &PatchParams::apply(MANAGER).force(), &Patch::Apply(&pool))
                .await
                .context("creating the worker pool")?;
            Api::<ManagedCluster>::all(hub.clone())
                .patch(
                    &spoke_name(1),
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {"labels": {"vendor": "OpenShift"}}})),
                )
                .await?;

            let hub_proc = start_hub(fleet, Duration::from_secs(3));
            let mut m = mcm(fleet, NAME, json!({}))?;
            m.spec.day1 = Some(serde_json::from_value(
                json!({"machineConfigPool": "worker"}),
            )?);
            apply_mcm(&hub, &m).await?;

            // The MachineConfig on the OpenShift spoke: the pinned image for its kernel.
            let mcs = mc_api(&openshift, "MachineConfig", "machineconfigs");
            let mc = eventually("the Day-1 MachineConfig on spoke 1", DEADLINE, || async {
                Ok(match mcs.get_opt(MC_NAME).await? {
                    Some(mc) => Ok(serde_json::to_value(mc)?),
                    None => Err("not there".to_string()),
                })
            })
            .await?;
            let pinned = format!("{}/kmm/kmm-ci-a@{digest}", fleet.registry().host());
            let images = ignition_file(&mc, "/etc/kmm-day1/kmm_ci_a.images");
            ensure!(
                images.as_deref() == Some(format!("{KERNEL} {pinned}\n").as_str()),
                "images file {images:?}"
            );
            ensure!(
                mc["metadata"]["labels"]["machineconfiguration.openshift.io/role"] == "worker",
                "{}",
                mc["metadata"]
            );
            let units = mc["spec"]["config"]["systemd"]["units"].to_string();
            ensure!(
                units.contains(
                    "ExecStart=/usr/local/bin/kmm-day1-load @/etc/kmm-day1/kmm_ci_a.images kmm_ci_a kmm_ci_a"
                ),
                "{units}"
            );
            // Both spokes have the Module; the plain one no MachineConfig API at all.
            for c in [&openshift, &plain] {
                eventually("the Module on both spokes", DEADLINE, || async {
                    let got = Api::<Module>::namespaced(c.clone(), SPOKE_NS)
                        .get_opt(NAME)
                        .await?;
                    Ok(got.map(|_| ()).ok_or_else(|| "not yet".to_string()))
                })
                .await?;
            }

            // The pool's counts, as the MCO writes them, come back into status.day1.
            let set_pool = |machines: i64, updated: i64| {
                let pools = pools.clone();
                async move {
                    pools
                        .patch_status(
                            "worker",
                            &PatchParams::apply(MANAGER).force(),
                            &Patch::Apply(json!({
                                "apiVersion": "machineconfiguration.openshift.io/v1",
                                "kind": "MachineConfigPool",
                                "metadata": {"name": "worker"},
                                "status": {"machineCount": machines,
                                    "updatedMachineCount": updated,
                                    "readyMachineCount": updated,
                                    "unavailableMachineCount": machines - updated,
                                    "degradedMachineCount": 0},
                            })),
                        )
                        .await
                }
            };
            set_pool(3, 1).await?;
            let day1 = |want_pool: &'static str| {
                let hub = hub.clone();
                async move {
                    eventually(
                        &format!("status.day1 says the pool is {want_pool}"),
                        DEADLINE,
                        || async {
                            let s = mcm_status(&hub, NAME).await?.status.unwrap_or_default();
                            let d = s.day1.clone().unwrap_or_default();
                            Ok(match d.clusters.first() {
                                Some(c) if c.pool == want_pool => Ok(d),
                                _ => Err(format!("{d:?}")),
                            })
                        },
                    )
                    .await
                }
            };
            let d = day1("Updating").await?;
            assert_eq!((d.shipped, d.updated, d.not_open_shift), (1, 0, 1));
            let c = &d.clusters[0];
            assert_eq!(c.name, spoke_name(1));
            assert_eq!(c.machine_config, MC_NAME);
            assert_eq!(c.images, vec![format!("{KERNEL}={pinned}")]);
            assert_eq!(
                (c.machine_count, c.updated_machine_count),
                (Some(3), Some(1))
            );
            set_pool(3, 3).await?;
            let d = day1("Updated").await?;
            assert_eq!(d.updated, 1);

            // Deleting the MCM removes the MachineConfig; the pool stays.
            Api::<ManagedClusterModule>::all(hub.clone())
                .delete(NAME, &DeleteParams::default())
                .await?;
            eventually("the MachineConfig removed", DEADLINE, || async {
                Ok(match mcs.get_opt(MC_NAME).await? {
                    None => Ok(()),
                    Some(_) => Err("still there".to_string()),
                })
            })
            .await?;
            ensure!(pools.get_opt("worker").await?.is_some(), "the pool stays");
            hub_proc.stop().await;
            Ok(())
        })
        .await
}
