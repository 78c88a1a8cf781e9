//! Relabelling, deletion, a kernel claim that appears late, bad input, the ordered upgrade.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use k8s_openapi::api::events::v1::Event;
use kmm_e2e::labs::{KERNEL_A, LAB_NAMESPACE};
use kmm_e2e::sandbox::converge::condition;
use kmm_e2e::sandbox::progress::Progress;
use kmm_e2e::sandbox::{Sandbox, apply_mcm};
use kmm_e2e::testkit::eventually;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use shared_api::ManagedCluster;
use shared_api::ocm::KERNEL_VERSIONS_CLAIM;

use crate::DEADLINE;
use crate::observe::{
    delete_mcm, label_cluster, labs_converge_again, labs_still_converged, loaded_back_to,
    loaded_now, mcm, prebuilt_mcm, push_module, status_text, work_generations, worker_selector,
    works,
};

pub(crate) async fn relabel_then_delete(sb: &Sandbox) -> anyhow::Result<()> {
    const NS: &str = "scn-select";
    const NAME: &str = "scn-select";
    let hub = sb.hub_client().await;
    for (_, c) in sb.spoke_clients().await {
        sb.prepare_spoke_namespace(&c, NS).await?;
    }
    let image = push_module(sb, "scenario/select:v1", "kmm-scn-select", true).await?;
    for c in ["spoke-1", "spoke-2"] {
        label_cluster(&hub, c, "scenario", Some("select")).await?;
    }
    let before = loaded_now(sb).await?;
    apply_mcm(
        &hub,
        &prebuilt_mcm(
            NAME,
            NS,
            json!({"scenario": "select"}),
            worker_selector(),
            &image,
            "kmm-scn-select",
        ),
    )
    .await?;
    let workers: Vec<String> = before
        .keys()
        .filter(|k| !k.contains("control-plane"))
        .cloned()
        .collect();
    let has = |l: &BTreeMap<String, Vec<String>>, node: &str| {
        l[node].iter().any(|m| m == "kmm_scn_select")
    };
    eventually("kmm_scn_select on every worker", DEADLINE, || async {
        let l = loaded_now(sb).await?;
        let missing: Vec<&String> = workers.iter().filter(|w| !has(&l, w)).collect();
        Ok(if missing.is_empty() {
            Ok(())
        } else {
            Err(format!("missing on {missing:?}: {l:?}"))
        })
    })
    .await?;
    let first = works(&hub, NAME).await?;
    ensure!(first.len() == 2, "works {:?}", first.keys());

    // spoke-2 leaves the selector: its work goes, spoke-1's is untouched.
    label_cluster(&hub, "spoke-2", "scenario", None).await?;
    eventually(
        "spoke-2's work gone and its module unloaded",
        DEADLINE,
        || async {
            let ws = works(&hub, NAME).await?;
            let l = loaded_now(sb).await?;
            let on2: Vec<&String> = workers
                .iter()
                .filter(|w| w.starts_with("spoke-2/") && has(&l, w))
                .collect();
            Ok(
                if ws.keys().cloned().collect::<Vec<_>>() == vec!["spoke-1"] && on2.is_empty() {
                    Ok(())
                } else {
                    Err(format!("works {:?}, still on {on2:?}", ws.keys()))
                },
            )
        },
    )
    .await?;
    let kept = works(&hub, NAME).await?;
    ensure!(
        kept["spoke-1"].metadata.generation == first["spoke-1"].metadata.generation,
        "spoke-1's work rewritten"
    );
    let l = loaded_now(sb).await?;
    for w in workers.iter().filter(|w| w.starts_with("spoke-1/")) {
        ensure!(has(&l, w), "kmm_scn_select unloaded from {w}");
    }
    eventually("counts drop", DEADLINE, || async {
        let s = mcm(&hub, NAME)
            .await?
            .and_then(|m| m.status)
            .unwrap_or_default();
        Ok(if s.number_desired == 1 && s.number_available == 1 {
            Ok(())
        } else {
            Err(format!("{s:?}"))
        })
    })
    .await?;

    // Deleting the MCM: works gone, then the MCM; the module unloaded, other modules untouched.
    delete_mcm(&hub, NAME).await?;
    loaded_back_to(sb, &before, "kmm_scn_select unloaded everywhere").await?;
    let spoke1 = sb.fleet().spoke(1).client().await;
    let unloaded = Api::<Event>::namespaced(spoke1, kmm_spoke::controller::events::EVENT_NAMESPACE)
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some(kmm_spoke::controller::events::MODULE_UNLOADED))
        .count();
    ensure!(unloaded > 0, "no ModuleUnloaded event on spoke-1");
    label_cluster(&hub, "spoke-1", "scenario", None).await?;
    labs_still_converged(sb).await
}

pub(crate) async fn claim_added_later(sb: &Sandbox) -> anyhow::Result<()> {
    const GHOST: &str = "spoke-ghost";
    const NAME: &str = "scn-ghost";
    let hub = sb.hub_client().await;
    kmm_e2e::testkit::ensure_namespace(&hub, GHOST).await?;
    let mc: ManagedCluster = serde_json::from_value(json!({
        "apiVersion": "cluster.open-cluster-management.io/v1", "kind": "ManagedCluster",
        "metadata": {"name": GHOST, "labels": {"name": GHOST, "scenario": "ghost"}},
        "spec": {"hubAcceptsClient": true}}))?;
    Api::<ManagedCluster>::all(hub.clone())
        .create(&PostParams::default(), &mc)
        .await?;
    let image = format!(
        "{}/vendor/kmm-labs:kmm-kmod-{KERNEL_A}-v1.0",
        sb.registry_host()
    );
    apply_mcm(
        &hub,
        &prebuilt_mcm(
            NAME,
            LAB_NAMESPACE,
            json!({"scenario": "ghost"}),
            worker_selector(),
            &image,
            "kmm-ci-a",
        ),
    )
    .await?;
    // Reconciled (status written for this generation), yet no work: the cluster has no claim.
    eventually("the MCM reconciled", DEADLINE, || async {
        let m = mcm(&hub, NAME).await?.context("MCM")?;
        Ok(
            if m.status
                .as_ref()
                .and_then(|s| s.observed_generation)
                .is_some()
            {
                Ok(())
            } else {
                Err(status_text(&m))
            },
        )
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(6)).await; // more than a resync
    let ws = works(&hub, NAME).await?;
    ensure!(
        ws.is_empty(),
        "a work for a cluster without the kernel claim: {:?}",
        ws.keys()
    );
    // The claim appears: the work follows.
    Api::<ManagedCluster>::all(hub.clone())
        .patch_status(
            GHOST,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {
            "clusterClaims": [{"name": KERNEL_VERSIONS_CLAIM, "value": KERNEL_A}]}})),
        )
        .await?;
    let w = eventually("the work for the ghost cluster", DEADLINE, || async {
        let ws = works(&hub, NAME).await?;
        Ok(ws
            .get(GHOST)
            .cloned()
            .ok_or_else(|| format!("{:?}", ws.keys())))
    })
    .await?;
    let m = kmm_e2e::testkit::work_module(&w).context("no Module in the work")?;
    let lit = &m["spec"]["moduleLoader"]["container"]["kernelMappings"][0]["literal"];
    ensure!(lit == KERNEL_A, "mapping {lit}");
    delete_mcm(&hub, NAME).await?;
    // The labs select every cluster: the ghost one counted against them until it goes.
    Api::<ManagedCluster>::all(hub.clone())
        .delete(GHOST, &DeleteParams::default())
        .await?;
    labs_converge_again(sb).await
}

pub(crate) async fn bad_input(sb: &Sandbox) -> anyhow::Result<()> {
    let hub = sb.hub_client().await;
    let host = sb.registry_host();
    let loaded_before = loaded_now(sb).await?;
    let works_before = work_generations(sb).await?;
    let good = |name: &str| {
        prebuilt_mcm(
            name,
            "scn-bad",
            json!({}),
            worker_selector(),
            &format!("{host}/vendor/kmm-labs:kmm-kmod-{KERNEL_A}-v1.0"),
            "kmm-ci-a",
        )
    };
    let mapping = "/spec/moduleSpec/moduleLoader/container/kernelMappings/0";

    // Rejected at admission, with the field path.
    let mut rejected = Vec::new();
    let mut m = good("bad-regexp");
    m.pointer_mut(mapping).unwrap()["regexp"] = json!("^5\\.14(.*$");
    rejected.push((
        m,
        "spec.moduleSpec.moduleLoader.container.kernelMappings[0].regexp",
    ));
    let mut m = good("bad-literal-and-regexp");
    m.pointer_mut(mapping).unwrap()["literal"] = json!(KERNEL_A);
    rejected.push((
        m,
        "spec.moduleSpec.moduleLoader.container.kernelMappings[0]",
    ));
    let mut m = good("bad-files-to-sign");
    m.pointer_mut(mapping).unwrap()["sign"] = json!({"keySecret": {"name": "mykey"}, "certSecret": {"name": "mycert"},
        "unsignedImage": format!("{host}/vendor/kmm-labs:kmm-kmod-{KERNEL_A}-v1.0"),
        "filesToSign": ["/lib/modules/$KERNEL_FULL_VERSION/kmm_ci_a.ko"]});
    rejected.push((
        m,
        "spec.moduleSpec.moduleLoader.container.kernelMappings[0].sign.filesToSign[0]",
    ));
    let long = "bad-a-name-that-is-too-long-for-the-spoke";
    rejected.push((good(long), "metadata.name"));
    for (m, path) in &rejected {
        let name = m["metadata"]["name"].as_str().unwrap().to_string();
        match apply_mcm(&hub, m).await {
            Ok(()) => bail!("{name} was admitted"),
            Err(e) => {
                let text = format!("{e:#}");
                // Refused by the webhook, or first by the CRD's own CEL rules (422 Invalid);
                // both name the field.
                let refused = text.contains("denied the request")
                    || (text.contains("is invalid") && text.contains("Invalid value"));
                ensure!(refused && text.contains(path), "{name}: {text}");
            }
        }
        ensure!(mcm(&hub, &name).await?.is_none(), "{name} exists");
    }

    // Admitted, then reported in status with the reason; nothing shipped.
    let mut reported = Vec::new();
    let mut m = good("bad-dockerfile");
    m.pointer_mut(mapping).unwrap()["containerImage"] = json!(format!(
        "{host}/scenario/never-built:${{KERNEL_FULL_VERSION}}"
    ));
    m.pointer_mut(mapping).unwrap()["build"] =
        json!({"dockerfileConfigMap": {"name": "no-such-dockerfile"}});
    reported.push((
        m,
        vec!["no-such-dockerfile".to_string(), "does not exist".into()],
    ));
    let mut m = good("bad-key-secret");
    m.pointer_mut(mapping).unwrap()["containerImage"] = json!(format!(
        "{host}/scenario/never-signed:${{KERNEL_FULL_VERSION}}"
    ));
    m.pointer_mut(mapping).unwrap()["sign"] = json!({"keySecret": {"name": "no-such-key"}, "certSecret": {"name": "mycert"},
        "unsignedImage": format!("{host}/vendor/kmm-labs:kmm-kmod-{KERNEL_A}-v1.0"),
        "filesToSign": ["/opt/lib/modules/$KERNEL_FULL_VERSION/kmm_ci_a.ko"]});
    reported.push((m, vec!["no-such-key".to_string(), "does not exist".into()]));
    let mut m = good("bad-pull-secret");
    m["spec"]["moduleSpec"]["imageRepoSecret"]["name"] = json!("no-such-pull-secret");
    reported.push((
        m,
        vec!["no-such-pull-secret".to_string(), "does not exist".into()],
    ));
    let mut m = good("bad-image");
    m.pointer_mut(mapping).unwrap()["containerImage"] =
        json!(format!("{host}/nowhere/kmm-ci-a:${{KERNEL_FULL_VERSION}}"));
    reported.push((
        m,
        vec![
            format!("{host}/nowhere/kmm-ci-a:{KERNEL_A}"),
            "does not exist".into(),
        ],
    ));
    for (m, _) in &reported {
        apply_mcm(&hub, m).await?;
    }
    let mut problems = Vec::new();
    for (m, words) in &reported {
        let name = m["metadata"]["name"].as_str().unwrap().to_string();
        let r = eventually(&format!("{name} reported"), DEADLINE, || async {
            let m = mcm(&hub, &name).await?.context("MCM")?;
            let text = status_text(&m);
            let not_ready = condition(&m, "Ready").is_some_and(|(s, _, _)| s == "False");
            Ok(
                if not_ready && words.iter().all(|w| text.contains(w.as_str())) {
                    Ok(())
                } else {
                    Err(text)
                },
            )
        })
        .await;
        if let Err(e) = r {
            problems.push(format!("{name}: {e:#}"));
        }
        let ws = works(&hub, &name).await?;
        if !ws.is_empty() {
            problems.push(format!("{name}: shipped works to {:?}", ws.keys()));
        }
    }
    tokio::time::sleep(Duration::from_secs(6)).await; // a resync with every bad MCM in place
    let loaded_after = loaded_now(sb).await?;
    if loaded_after != loaded_before {
        problems.push(format!(
            "loaded modules changed:\nbefore {loaded_before:?}\nafter  {loaded_after:?}"
        ));
    }
    let works_after = work_generations(sb).await?;
    if works_after != works_before {
        problems.push(format!(
            "lab works changed:\nbefore {works_before:?}\nafter  {works_after:?}"
        ));
    }
    if let Err(e) = labs_still_converged(sb).await {
        problems.push(format!("{e:#}"));
    }
    for (m, _) in &reported {
        delete_mcm(&hub, m["metadata"]["name"].as_str().unwrap()).await?;
    }
    ensure!(problems.is_empty(), "{}", problems.join("\n"));
    Ok(())
}

pub(crate) async fn ordered_upgrade(sb: &Sandbox, progress: &Progress) -> anyhow::Result<()> {
    let before = loaded_now(sb).await?;
    kmm_e2e::sandbox::upgrade::ordered_upgrade(sb, progress).await?;
    let hub = sb.hub_client().await;
    delete_mcm(&hub, kmm_e2e::sandbox::upgrade::NAME).await?;
    loaded_back_to(sb, &before, "the upgraded module unloaded").await?;
    labs_still_converged(sb).await
}
