//! A real-kernel node reboots under a loaded Module.

use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use shared_api::labels::{ROLE_LABEL, ROLE_LOADER, module_ready_label, ready_boot_annotation};

use super::*;

const MODULE: &str = "kmm-ci-reboot";

/// The node's `bootID` and whether it carries the Module's ready label.
async fn boot_and_ready(client: &Client) -> anyhow::Result<(String, bool)> {
    let n = Api::<Node>::all(client.clone()).get(NODE).await?;
    let boot = n
        .status
        .as_ref()
        .and_then(|s| s.node_info.as_ref())
        .map(|i| i.boot_id.clone())
        .unwrap_or_default();
    Ok((
        boot,
        n.labels().contains_key(&module_ready_label(NS, MODULE)),
    ))
}

/// Whether the Module's loader pod on the node says Ready.
async fn loader_says_ready(client: &Client) -> anyhow::Result<bool> {
    let pods = Api::<Pod>::namespaced(client.clone(), NS)
        .list(&ListParams::default().labels(&format!("{ROLE_LABEL}={ROLE_LOADER}")))
        .await?;
    Ok(pods.items.iter().any(|p| {
        p.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
    }))
}

/// The node reboots: the kernel comes back without the module. While the kubelet is not
/// back, the loader pod still says Ready from before, yet the agent takes the ready label
/// away (the node reports another boot); once the kubelet restarts the loader, the module is
/// in the kernel again and the label comes back, recorded for the new boot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebooted_real_kernel_node_loads_the_module_again() -> anyhow::Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    with_real_spoke(
        vec![SimNode::real(NODE, worker_labels(false))],
        async |fleet, client, vms| {
            let vm = &vms[0].1;
            let files = BTreeMap::from([(
                module_path("kmm_ci_a"),
                real_module("kmm_ci_a", "1.0", None)?,
            )]);
            let image = push_real_image(fleet, "reboot/kmm-ci-a:1.0", files).await?;
            apply_module(client, MODULE, &simple_spec("kmm_ci_a", &image)).await?;
            wait_modules(vm, "kmm_ci_a loaded", |m| m.iter().any(|x| x == "kmm_ci_a")).await?;
            let (boot0, _) = eventually("the ready label", async || {
                let (boot, ready) = boot_and_ready(client).await?;
                Ok(if ready { Ok((boot, ready)) } else { Err(boot) })
            })
            .await?;

            let held = fleet.node_sim(SPOKE).reboot_held(NODE).await?;
            let vms = fleet.node_sim(SPOKE).vms_booted().await?;
            let vm = vms[0].1.clone();
            let after = vm.modules().await?;
            ensure!(
                !after.iter().any(|m| m == "kmm_ci_a"),
                "a rebooted kernel still has kmm_ci_a: {after:?}"
            );
            ensure!(
                loader_says_ready(client).await?,
                "the loader pod's status should still be the one from before the reboot"
            );
            eventually("the ready label gone after the reboot", async || {
                let (boot, ready) = boot_and_ready(client).await?;
                Ok(if boot != boot0 && !ready {
                    Ok(())
                } else {
                    Err(format!("boot {boot} (was {boot0}), ready label {ready}"))
                })
            })
            .await?;

            held.release();
            wait_modules(&vm, "kmm_ci_a loaded again", |m| {
                m.iter().any(|x| x == "kmm_ci_a")
            })
            .await?;
            let boot1 = eventually("the ready label back", async || {
                let (boot, ready) = boot_and_ready(client).await?;
                Ok(if ready { Ok(boot) } else { Err(boot) })
            })
            .await?;
            let n = Api::<Node>::all(client.clone()).get(NODE).await?;
            let recorded = n
                .annotations()
                .get(&ready_boot_annotation(NS, MODULE))
                .cloned()
                .unwrap_or_default();
            ensure!(
                recorded.starts_with(&format!("{boot1} ")),
                "the node records the ready label's boot as {recorded:?}, booted {boot1}"
            );
            delete_module(client, MODULE).await?;
            wait_modules(&vm, "kmm_ci_a unloaded", |m| {
                !m.iter().any(|x| x == "kmm_ci_a")
            })
            .await?;
            Ok(())
        },
    )
    .await
}
