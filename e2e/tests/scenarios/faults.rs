//! Faults: the hub killed mid-rollout, a spoke agent restarted, the registry down and back,
//! a spoke API server restarted, a cluster removed; what already ran keeps running.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{Context as _, ensure};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kmm_e2e::labs::LAB_NAMESPACE;
use kmm_e2e::sandbox::converge::condition;
use kmm_e2e::sandbox::install::BUILD_NAMESPACE;
use kmm_e2e::sandbox::progress::Progress;
use kmm_e2e::sandbox::{Sandbox, apply_mcm};
use kmm_e2e::testkit::eventually;
use kube::api::{Api, DeleteParams, ListParams};
use kube::{Client, ResourceExt as _};
use serde_json::json;
use shared_api::ManagedCluster;

use crate::observe::{
    delete_mcm, labs_converge_again, labs_still_converged, loaded_now, mcm, prebuilt_mcm,
    push_module, status_text, work_generations, worker_selector, works,
};
use crate::{CONVERGE, DEADLINE};

async fn build_jobs(hub: &Client) -> anyhow::Result<Vec<Job>> {
    Ok(Api::<Job>::namespaced(hub.clone(), BUILD_NAMESPACE)
        .list(&ListParams::default())
        .await?
        .items)
}

pub(crate) async fn hub_killed_mid_rollout(
    sb: &mut Sandbox,
    progress: &Progress,
) -> anyhow::Result<()> {
    let hub = sb.hub_client().await;
    sb.prepare_lab_inputs().await?;
    for lab in sb.labs().to_vec() {
        apply_mcm(&hub, &lab.mcm).await?;
    }
    eventually("a first build Job", DEADLINE, || async {
        let n = build_jobs(&hub).await?.len();
        Ok(if n > 0 { Ok(()) } else { Err("none".into()) })
    })
    .await?;
    sb.hub.kill().await;
    let at_kill: BTreeSet<String> = build_jobs(&hub)
        .await?
        .iter()
        .map(|j| j.name_any())
        .collect();
    eprintln!(
        "hub killed with {} build Job(s): {at_kill:?}",
        at_kill.len()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    sb.hub.start(Duration::from_secs(60)).await?;
    sb.wait_converged(CONVERGE, progress).await?;
    let jobs = build_jobs(&hub).await?;
    let names: BTreeSet<String> = jobs.iter().map(|j| j.name_any()).collect();
    ensure!(
        jobs.len() == 4 && names.len() == 4,
        "4 distinct images, 4 Jobs; got {names:?}"
    );
    ensure!(
        at_kill.is_subset(&names),
        "a Job of the first hub was replaced: {at_kill:?} vs {names:?}"
    );
    let created = sb
        .hub
        .metric("kmm_hub_builds_total{outcome=\"created\"}")
        .await?;
    // A build that failed (e.g. the registry refused a push) is retried with a new Job: that
    // is a retry, not a duplicate.
    let failed = sb
        .hub
        .metric("kmm_hub_builds_total{outcome=\"failed\"}")
        .await
        .unwrap_or(0.0);
    ensure!(
        (created - failed) as usize == 4 - at_kill.len(),
        "the restarted hub created {created} Jobs ({failed} after failed builds); {} existed",
        at_kill.len()
    );
    Ok(())
}

/// Everything the spokes run: loaded modules, DaemonSet and loader pod UIDs, work generations.
async fn running_state(sb: &Sandbox) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out: BTreeMap<String, String> = loaded_now(sb)
        .await?
        .into_iter()
        .map(|(k, v)| (format!("node {k}"), v.join(",")))
        .collect();
    for (cluster, c) in sb.spoke_clients().await {
        for d in Api::<DaemonSet>::namespaced(c.clone(), LAB_NAMESPACE)
            .list(&ListParams::default())
            .await?
            .items
        {
            out.insert(
                format!("ds {cluster}/{}", d.name_any()),
                d.uid().unwrap_or_default(),
            );
        }
        for p in Api::<Pod>::namespaced(c.clone(), LAB_NAMESPACE)
            .list(&ListParams::default())
            .await?
            .items
        {
            out.insert(
                format!("pod {cluster}/{}", p.name_any()),
                p.uid().unwrap_or_default(),
            );
        }
    }
    for (k, g) in work_generations(sb).await? {
        out.insert(format!("work {k}"), g.to_string());
    }
    Ok(out)
}

fn diff(before: &BTreeMap<String, String>, after: &BTreeMap<String, String>) -> Vec<String> {
    let keys: BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    keys.into_iter()
        .filter(|k| before.get(*k) != after.get(*k))
        .map(|k| format!("{k}: {:?} -> {:?}", before.get(k), after.get(k)))
        .collect()
}

pub(crate) async fn spoke_agent_restarted(sb: &mut Sandbox) -> anyhow::Result<()> {
    let before = running_state(sb).await?;
    sb.spoke_agent_mut(1)
        .restart(Duration::from_secs(60))
        .await?;
    tokio::time::sleep(Duration::from_secs(8)).await;
    labs_still_converged(sb).await?;
    let d = diff(&before, &running_state(sb).await?);
    ensure!(d.is_empty(), "after the restart:\n{}", d.join("\n"));
    Ok(())
}

pub(crate) async fn registry_down_and_back(sb: &mut Sandbox) -> anyhow::Result<()> {
    let hub = sb.hub_client().await;
    let before = running_state(sb).await?;
    sb.fleet_mut().registry_mut().stop().await;
    let seen = eventually(
        "an MCM Degraded because the registry is down",
        DEADLINE,
        || async {
            for lab in sb.labs() {
                if let Some(m) = mcm(&hub, lab.name).await?
                    && let Some((s, reason, msg)) = condition(&m, "Degraded")
                    && s == "True"
                {
                    return Ok(Ok(format!("{}: {reason}: {msg}", lab.name)));
                }
            }
            Ok(Err("no Degraded MCM".into()))
        },
    )
    .await;
    let during = running_state(sb).await?;
    sb.fleet_mut().registry_mut().start().await?;
    let seen = seen?;
    eprintln!("while the registry was down: {seen}");
    let d = diff(&before, &during);
    ensure!(
        d.is_empty(),
        "while the registry was down:\n{}",
        d.join("\n")
    );
    eventually("Degraded cleared on every MCM", DEADLINE, || async {
        let mut still = Vec::new();
        for lab in sb.labs() {
            if let Some(m) = mcm(&hub, lab.name).await?
                && condition(&m, "Degraded").is_some_and(|(s, _, _)| s == "True")
            {
                still.push(lab.name);
            }
        }
        Ok(if still.is_empty() {
            Ok(())
        } else {
            Err(format!("{still:?}"))
        })
    })
    .await?;
    labs_still_converged(sb).await?;
    let d = diff(&before, &running_state(sb).await?);
    ensure!(
        d.is_empty(),
        "after the registry came back:\n{}",
        d.join("\n")
    );
    Ok(())
}

pub(crate) async fn spoke_apiserver_restarted(sb: &mut Sandbox) -> anyhow::Result<()> {
    const NAME: &str = "scn-after-restart";
    let before = running_state(sb).await?;
    let hub = sb.hub_client().await;
    // The spoke-2 agent is frozen across the restart and until the new Module is on the
    // spoke: its watches come back with resource versions the new API server has expired
    // (410), so it learns of the Module only from its relist, never from a watch event.
    let agent = sb.spokes[1].pid().context("the spoke-2 agent's pid")?;
    kmm_e2e::process::signal(agent, libc::SIGSTOP);
    let frozen = async {
        sb.fleet_mut().spoke_mut(2).restart_apiserver().await?;
        let image = push_module(sb, "scenario/after-restart:v1", "kmm-scn-restart", true).await?;
        apply_mcm(
            &hub,
            &prebuilt_mcm(
                NAME,
                LAB_NAMESPACE,
                json!({}),
                worker_selector(),
                &image,
                "kmm-scn-restart",
            ),
        )
        .await?;
        let modules = Api::<shared_api::Module>::namespaced(
            sb.fleet().spoke(2).client().await,
            LAB_NAMESPACE,
        );
        eventually(
            "the work agent puts the Module on spoke-2",
            DEADLINE,
            || async {
                Ok(match modules.get_opt(NAME).await? {
                    Some(_) => Ok(()),
                    None => Err("not yet".to_string()),
                })
            },
        )
        .await
    }
    .await;
    kmm_e2e::process::signal(agent, libc::SIGCONT);
    frozen?;
    // Frozen past its lease's renew deadline (a slow restart on a busy machine), the agent
    // steps down and exits, as a spoke that lost its lease must; the kubelet restarts its
    // Deployment's pod (restartPolicy Always). The sandbox runs it as a process: restart it
    // the same way if it exited.
    let resumed = std::time::Instant::now();
    while resumed.elapsed() < Duration::from_secs(15) && sb.spokes[1].running() {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    if !sb.spokes[1].running() {
        eprintln!(
            "    the spoke-2 agent exited after the freeze (lease lost); restarting it as the kubelet would"
        );
        sb.spokes[1].restart(Duration::from_secs(60)).await?;
    }
    eventually(
        "kmm_scn_restart on every worker of spoke-2",
        CONVERGE,
        || async {
            let l = loaded_now(sb).await?;
            let missing: Vec<&String> = l
                .iter()
                .filter(|(n, mods)| {
                    n.starts_with("spoke-2/") && !mods.iter().any(|m| m == "kmm_scn_restart")
                })
                .map(|(n, _)| n)
                .collect();
            Ok(if missing.is_empty() {
                Ok(())
            } else {
                Err(format!("missing on {missing:?}"))
            })
        },
    )
    .await?;
    // OCM's work agent deletes on work deletion only what its AppliedManifestWork has recorded,
    // which lags behind the Module (more so after the restart): deleted at once, the MCM's work
    // must be held by the hub until the work agent reports the Module recorded
    // (kmm_hub::reconcile::release), or the Module stays behind.
    delete_mcm(&hub, NAME).await?;
    eventually("kmm_scn_restart unloaded", DEADLINE, || async {
        let d = diff(&before, &running_state(sb).await?);
        Ok(if d.is_empty() {
            Ok(())
        } else {
            Err(d.join("\n"))
        })
    })
    .await?;
    // Nothing running changed (above); the spoke's status reports catch up with the restarted
    // API server (kube-controller-manager re-observes the DaemonSets) within the deadline.
    labs_converge_again(sb).await
}

pub(crate) async fn cluster_removed(sb: &mut Sandbox) -> anyhow::Result<()> {
    let hub = sb.hub_client().await;
    let before = running_state(sb).await?;
    Api::<ManagedCluster>::all(hub.clone())
        .delete("spoke-2", &DeleteParams::default())
        .await?;
    let spoke2 = sb.fleet().spoke(2).client().await;
    eventually(
        "spoke-2's works, Modules and modules gone",
        DEADLINE,
        || async {
            let mut left = Vec::new();
            for lab in sb.labs() {
                if works(&hub, lab.name).await?.contains_key("spoke-2") {
                    left.push(format!("work {}", lab.name));
                }
            }
            let modules = Api::<shared_api::Module>::namespaced(spoke2.clone(), LAB_NAMESPACE)
                .list(&ListParams::default())
                .await?
                .items;
            left.extend(modules.iter().map(|m| format!("Module {}", m.name_any())));
            for (node, mods) in loaded_now(sb).await? {
                if node.starts_with("spoke-2/") && mods.iter().any(|m| m.starts_with("kmm_")) {
                    left.push(format!("{node}: {mods:?}"));
                }
            }
            Ok(if left.is_empty() {
                Ok(())
            } else {
                Err(format!("{left:?}"))
            })
        },
    )
    .await?;
    let after = running_state(sb).await?;
    let spoke1_changes: Vec<String> = diff(&before, &after)
        .into_iter()
        .filter(|d| !d.contains("spoke-2"))
        .collect();
    ensure!(
        spoke1_changes.is_empty(),
        "outside spoke-2:\n{}",
        spoke1_changes.join("\n")
    );
    eventually(
        "every MCM Ready on the one remaining cluster",
        DEADLINE,
        || async {
            let mut bad = Vec::new();
            for lab in sb.labs() {
                let m = mcm(&hub, lab.name).await?.context("MCM")?;
                let s = m.status.clone().unwrap_or_default();
                if s.number_desired != 1
                    || condition(&m, "Ready").is_none_or(|(s, _, _)| s != "True")
                {
                    bad.push(format!("{}: {}", lab.name, status_text(&m)));
                }
            }
            Ok(if bad.is_empty() {
                Ok(())
            } else {
                Err(bad.join("\n"))
            })
        },
    )
    .await
}
