//! The hub's ManifestWorks against the real OCM v1.2.1 work agent and webhook:
//! - works are executed as the spoke's `kmm-work-executor` ServiceAccount, whose rights
//!   (manifests/spoke/work-executor.yaml) cover Modules and the spoke prerequisites only: the
//!   hub's works apply, a work carrying anything else (a ClusterRoleBinding) as that executor
//!   is refused by the work agent;
//! - deleting an MCM does not hang on an unavailable spoke: its works are released after
//!   `--release-after`, or at once with the force-release annotation, with an event.

use std::time::Duration;

use anyhow::{Context as _, ensure};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
use kmm_e2e::fleet::{Fleet, spoke_name, worker_node};
use kmm_e2e::oci::{KmodImage, push_kmod_image};
use kmm_e2e::testkit::{
    HubOptions, HubProcess, ensure_namespace, eventually, put_pull_secret, set_kernel_claim, works,
};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use shared_api::ocm::{
    MANAGED_CLUSTER_AVAILABLE, ManifestWork, ManifestWorkExecutor, WORK_FINALIZER,
};
use shared_api::{ManagedCluster, ManagedClusterModule, Module};

const HUB_NS: &str = "kmm-hub";
const SPOKE_NS: &str = "kmm-labs";
const PULL_SECRET: &str = "registry-pull";
const KERNEL: &str = "5.14.0-284.36.1.el9_2.x86_64";
const DEADLINE: Duration = Duration::from_secs(90);

fn start_hub(fleet: &Fleet, release_after: Duration) -> HubProcess {
    let mut o = HubOptions::new(fleet.hub().kubeconfig_path(), HUB_NS);
    o.resync = Duration::from_secs(3);
    o.release_after = release_after;
    HubProcess::start(o).expect("hub starts")
}

/// The pull secret on the hub; on every spoke the Module namespace and the kernel claim; the
/// module image in the registry.
async fn prepare(fleet: &Fleet) -> anyhow::Result<()> {
    let hub = fleet.hub().client().await;
    ensure_namespace(&hub, HUB_NS).await?;
    put_pull_secret(&hub, fleet.registry(), PULL_SECRET, HUB_NS).await?;
    for spoke in fleet.spokes() {
        let c = spoke.client().await;
        ensure_namespace(&c, SPOKE_NS).await?;
        set_kernel_claim(&c, &[KERNEL]).await?;
    }
    push_kmod_image(
        &fleet.registry().access(),
        &format!("{}/kmm/kmm-ci-a:{KERNEL}", fleet.registry().host()),
        &KmodImage::new(&[KERNEL], &["kmm_ci_a"]),
    )
    .await?;
    Ok(())
}

async fn apply_mcm(fleet: &Fleet, name: &str) -> anyhow::Result<()> {
    let host = fleet.registry().host();
    let m: ManagedClusterModule = serde_json::from_value(json!({
        "apiVersion": "hub.kmm.sigs.x-k8s.io/v1beta1", "kind": "ManagedClusterModule",
        "metadata": {"name": name},
        "spec": {"spokeNamespace": SPOKE_NS, "selector": {},
            "moduleSpec": {"selector": {"node-role.kubernetes.io/worker": ""},
                "imageRepoSecret": {"name": PULL_SECRET},
                "moduleLoader": {"container": {"modprobe": {"moduleName": "kmm_ci_a"},
                    "kernelMappings": [{"regexp": "^.*$",
                        "containerImage": format!("{host}/kmm/kmm-ci-a:${{KERNEL_FULL_VERSION}}")}]}}}}
    }))?;
    Api::<ManagedClusterModule>::all(fleet.hub().client().await)
        .patch(name, &PatchParams::apply("test").force(), &Patch::Apply(&m))
        .await?;
    Ok(())
}

/// Waits for the Module `name` on spoke `n` (delivered by the work agent).
async fn module_on(fleet: &Fleet, n: usize, name: &str) -> anyhow::Result<()> {
    let modules: Api<Module> = Api::namespaced(fleet.spoke(n).client().await, SPOKE_NS);
    eventually(&format!("Module {name} on spoke-{n}"), DEADLINE, || async {
        Ok(match modules.get_opt(name).await? {
            Some(_) => Ok(()),
            None => Err("not yet".to_string()),
        })
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn works_run_as_an_executor_that_may_only_manage_modules() -> anyhow::Result<()> {
    Fleet::builder()
        .spokes(1)
        .nodes_with(|_, spoke| vec![worker_node(&format!("{spoke}-w1"), KERNEL)])
        .registry_auth(true)
        .run(async |fleet: &mut Fleet| {
            prepare(fleet).await?;
            let hub = fleet.hub().client().await;
            let hub_proc = start_hub(fleet, Duration::from_secs(600));
            let outcome = async {
                apply_mcm(fleet, "kmm-ci-a").await?;
                // The hub's work names the executor (admitted by OCM's webhook after its
                // execute-as check of the hub), and the work agent applies it as that account.
                let w = eventually("the work", DEADLINE, || async {
                    Ok(works(&hub, "kmm-ci-a")
                        .await?
                        .remove(&spoke_name(1))
                        .ok_or_else(|| "no work yet".to_string()))
                })
                .await?;
                ensure!(
                    w.spec.executor
                        == Some(ManifestWorkExecutor::service_account(
                            "kmm-spoke",
                            "kmm-work-executor"
                        )),
                    "the work's executor: {:?}",
                    w.spec.executor
                );
                module_on(fleet, 1, "kmm-ci-a").await?;

                // Anything else as the same executor: refused by the work agent, not applied.
                let escalate: ManifestWork = serde_json::from_value(json!({
                    "apiVersion": "work.open-cluster-management.io/v1", "kind": "ManifestWork",
                    "metadata": {"name": "escalate", "namespace": spoke_name(1)},
                    "spec": {
                        "executor": w.spec.executor,
                        "workload": {"manifests": [{
                            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                            "metadata": {"name": "escalate"},
                            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
                            "subjects": [{"kind": "ServiceAccount", "name": "default", "namespace": "default"}]
                        }]}
                    }
                }))?;
                let api: Api<ManifestWork> = Api::namespaced(hub.clone(), &spoke_name(1));
                api.create(&PostParams::default(), &escalate).await?;
                let refusal = eventually("the work agent's refusal", DEADLINE, || async {
                    let st = api.get("escalate").await?.status.unwrap_or_default();
                    let manifest = st
                        .resource_status
                        .as_ref()
                        .and_then(|r| r.manifests.first())
                        .and_then(|m| m.conditions.iter().find(|c| c.type_ == "Applied"));
                    Ok(match manifest {
                        Some(c) if c.status == "False" => Ok(c.message.clone()),
                        other => Err(format!("{other:?}")),
                    })
                })
                .await?;
                ensure!(
                    refusal.contains("not allowed"),
                    "the refusal names the missing right: {refusal}"
                );
                let crb = Api::<ClusterRoleBinding>::all(fleet.spoke(1).client().await)
                    .get_opt("escalate")
                    .await?;
                ensure!(crb.is_none(), "the ClusterRoleBinding reached the spoke");
                api.delete("escalate", &DeleteParams::default()).await?;
                Ok(())
            }
            .await;
            hub_proc.stop().await;
            outcome
        })
        .await
}

/// Freezes spoke `n`'s klusterlet agent and marks its ManagedCluster unavailable, as OCM's
/// lease controller does once the agent stops renewing its lease.
async fn take_offline(fleet: &Fleet, n: usize) -> anyhow::Result<u32> {
    let pid = fleet.ocm_agents()[n - 1]
        .pids()
        .into_iter()
        .find(|(name, _)| name == "ocm-klusterlet-agent")
        .map(|(_, pid)| pid)
        .context("the klusterlet agent's pid")?;
    kmm_e2e::process::signal(pid, libc::SIGSTOP);
    let api: Api<ManagedCluster> = Api::all(fleet.hub().client().await);
    let name = spoke_name(n);
    let mut conds = api
        .get(&name)
        .await?
        .status
        .map(|s| s.conditions)
        .unwrap_or_default();
    for c in conds
        .iter_mut()
        .filter(|c| c.type_ == MANAGED_CLUSTER_AVAILABLE)
    {
        c.status = "Unknown".into();
        c.reason = "ManagedClusterLeaseUpdateStopped".into();
        c.message = "Registration agent stopped updating its lease.".into();
    }
    api.patch_status(
        &name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"conditions": conds}})),
    )
    .await?;
    Ok(pid)
}

async fn released_event(hub: &Client, mcm: &str) -> anyhow::Result<String> {
    let events: Api<Event> = Api::namespaced(hub.clone(), "default");
    eventually(
        &format!("a ManifestWorksReleased event on {mcm}"),
        DEADLINE,
        || async {
            let list = events.list(&ListParams::default()).await?;
            Ok(list
                .items
                .iter()
                .find(|e| {
                    e.reason.as_deref() == Some("ManifestWorksReleased")
                        && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(mcm)
                })
                .map(|e| e.note.clone().unwrap_or_default())
                .ok_or_else(|| format!("{} events", list.items.len())))
        },
    )
    .await
}

async fn mcm_gone(hub: &Client, name: &str) -> anyhow::Result<()> {
    let api: Api<ManagedClusterModule> = Api::all(hub.clone());
    eventually(
        &format!("MCM {name} and its works gone"),
        DEADLINE,
        || async {
            let m = api.get_opt(name).await?;
            let w = works(hub, name).await?;
            Ok(if m.is_none() && w.is_empty() {
                Ok(())
            } else {
                Err(format!(
                    "MCM finalizers {:?}, works {:?}",
                    m.map(|m| m.finalizers().to_vec()),
                    w.iter()
                        .map(|(c, w)| format!("{c}: {:?}", w.finalizers()))
                        .collect::<Vec<_>>()
                ))
            })
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_an_mcm_releases_the_works_of_an_unavailable_cluster() -> anyhow::Result<()> {
    Fleet::builder()
        .spokes(2)
        .nodes_with(|_, spoke| vec![worker_node(&format!("{spoke}-w1"), KERNEL)])
        .registry_auth(true)
        .run(async |fleet: &mut Fleet| {
            prepare(fleet).await?;
            let hub = fleet.hub().client().await;
            let mut hub_proc = Some(start_hub(fleet, Duration::from_secs(3600)));
            let mut frozen = None;
            let outcome = async {
                for name in ["forced", "late"] {
                    apply_mcm(fleet, name).await?;
                    for n in 1..=2 {
                        module_on(fleet, n, name).await?;
                    }
                }
                frozen = Some(take_offline(fleet, 2).await?);
                let mcms: Api<ManagedClusterModule> = Api::all(hub.clone());

                // Deadline an hour away: the available spoke cleans up, the unavailable one
                // holds the MCM through its work's finalizer...
                mcms.delete("forced", &DeleteParams::default()).await?;
                let spoke1: Api<Module> = Api::namespaced(fleet.spoke(1).client().await, SPOKE_NS);
                eventually("spoke-1 clean, spoke-2's work stuck", DEADLINE, || async {
                    let ws = works(&hub, "forced").await?;
                    let stuck = ws.get(&spoke_name(2)).is_some_and(|w| {
                        w.metadata.deletion_timestamp.is_some()
                            && w.finalizers().iter().any(|f| f == WORK_FINALIZER)
                    });
                    let m1 = spoke1.get_opt("forced").await?;
                    Ok(if ws.len() == 1 && stuck && m1.is_none() {
                        Ok(())
                    } else {
                        Err(format!(
                            "works {:?}, Module on spoke-1 {}",
                            ws.keys(),
                            m1.is_some()
                        ))
                    })
                })
                .await?;
                ensure!(
                    mcms.get_opt("forced").await?.is_some(),
                    "the MCM went with a work left"
                );
                // ...until the force-release annotation.
                mcms.patch(
                    "forced",
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {"annotations": {
                        kmm_hub::reconcile::release::FORCE_RELEASE_ANNOTATION: "true"}}})),
                )
                .await?;
                mcm_gone(&hub, "forced").await?;
                let note = released_event(&hub, "forced").await?;
                ensure!(
                    note.contains(&spoke_name(2)) && note.contains("force-release"),
                    "the event says what was released and why: {note}"
                );

                // A hub with a short deadline releases on its own.
                if let Some(h) = hub_proc.take() {
                    h.stop().await;
                }
                hub_proc = Some(start_hub(fleet, Duration::from_secs(5)));
                mcms.delete("late", &DeleteParams::default()).await?;
                mcm_gone(&hub, "late").await?;
                let note = released_event(&hub, "late").await?;
                ensure!(
                    note.contains(&spoke_name(2)) && note.contains("unavailable"),
                    "the event says what was released and why: {note}"
                );
                // The Modules stay on the spoke that was away (its work agent evicts them
                // when it returns, after OCM's grace period).
                let spoke2: Api<Module> = Api::namespaced(fleet.spoke(2).client().await, SPOKE_NS);
                for name in ["forced", "late"] {
                    ensure!(
                        spoke2.get_opt(name).await?.is_some(),
                        "Module {name} on spoke-2"
                    );
                }
                Ok(())
            }
            .await;
            if let Some(pid) = frozen {
                kmm_e2e::process::signal(pid, libc::SIGCONT);
            }
            if let Some(h) = hub_proc {
                h.stop().await;
            }
            outcome
        })
        .await
}
