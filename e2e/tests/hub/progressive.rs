//! `spec.rolloutStrategy` on three spokes with the spoke agent running, so that the loaders
//! really start (or fail) and the works' status feedback says whether the module is
//! available: a `Progressive` rollout with `maxConcurrency: 1` moves one cluster at a time
//! and only after the previous one loaded the module; a broken image halts it after
//! `maxFailures` with the untouched clusters still on their old work, and resuming goes on;
//! `ProgressivePerGroup` with a canary group goes canary first.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use k8s_openapi::jiff::Timestamp;
use kmm_e2e::fleet::{Fleet, spoke_name, worker_node};
use kmm_e2e::oci::{KmodImage, push_kmod_image};
use kmm_e2e::testkit::{HubProcess, ensure_namespace, eventually, put_pull_secret};
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use shared_api::ManagedClusterModule;
use shared_api::ocm::ManifestWork;
use shared_api::rollout::{
    AVAILABLE_SINCE_ANNOTATION, RESUME_ANNOTATION, RolloutPhase, RolloutStatus,
    STARTED_AT_ANNOTATION,
};

use crate::setup::{apply_mcm, mcm, mcm_status, start_hub, work_images, works};
use crate::spoke_agent::RunningAgent;
use crate::{BUILD_NS, HUB_NS, PULL_SECRET};

const KERNEL: &str = "5.14.0-284.36.1.el9_2.x86_64";
const NAME: &str = "kmm-ci-a";
const STEP: Duration = Duration::from_secs(240);
const MIN_SUCCESS: i64 = 3;

fn tag(fleet: &Fleet, version: &str) -> String {
    format!(
        "{}/kmm/kmm-ci-a:{KERNEL}-{version}",
        fleet.registry().host()
    )
}

/// The MCM at image version `version` with this rollout strategy.
fn versioned(
    fleet: &Fleet,
    version: &str,
    strategy: serde_json::Value,
) -> anyhow::Result<ManagedClusterModule> {
    let mut m = mcm(fleet, NAME, json!({}))?;
    let loader = m
        .spec
        .module_spec
        .module_loader
        .as_mut()
        .context("loader")?;
    loader.container.kernel_mappings[0].container_image = format!(
        "{}/kmm/kmm-ci-a:${{KERNEL_FULL_VERSION}}-{version}",
        fleet.registry().host()
    );
    m.spec.spoke_prerequisites = Some(serde_json::from_value(json!({"pullSecret": true}))?);
    m.spec.rollout_strategy = Some(serde_json::from_value(strategy)?);
    Ok(m)
}

/// Per spoke: whether its work ships `digest`, and its rollout annotations.
struct Seen {
    at: BTreeMap<String, bool>,
    works: BTreeMap<String, ManifestWork>,
}

async fn seen(hub: &Client, digest: &str) -> anyhow::Result<Seen> {
    let works = works(hub, NAME).await?;
    let at = works
        .iter()
        .map(|(c, w)| {
            (
                c.clone(),
                work_images(w).iter().any(|i| i.ends_with(digest)),
            )
        })
        .collect();
    Ok(Seen { at, works })
}

fn stamp(w: &ManifestWork, key: &str) -> Option<Timestamp> {
    w.annotations().get(key).and_then(|t| t.parse().ok())
}

/// Every desired loader pod available, from the work's status feedback.
fn available(w: &ManifestWork) -> bool {
    kmm_hub::decide::facts::WorkEntry::from_work(w).is_some_and(|e| e.module_available())
}

async fn rollout(hub: &Client) -> anyhow::Result<RolloutStatus> {
    mcm_status(hub, NAME)
        .await?
        .status
        .and_then(|s| s.rollout)
        .context("no status.rollout")
}

async fn wait_rollout(
    hub: &Client,
    what: &str,
    ok: impl Fn(&RolloutStatus) -> bool,
) -> anyhow::Result<RolloutStatus> {
    eventually(what, STEP, || async {
        let r = rollout(hub).await?;
        Ok(if ok(&r) { Ok(r) } else { Err(format!("{r:?}")) })
    })
    .await
}

async fn event_with(hub: &Client, reason: &str, text: &str) -> anyhow::Result<()> {
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(hub.clone(), "default");
    eventually(
        &format!("a {reason} event"),
        Duration::from_secs(30),
        || async {
            let list = events.list(&Default::default()).await?;
            let found = list.items.iter().any(|e| {
                e.reason.as_deref() == Some(reason)
                    && e.note.as_deref().unwrap_or("").contains(text)
            });
            Ok(if found {
                Ok(())
            } else {
                Err(format!(
                    "{:?}",
                    list.items
                        .iter()
                        .map(|e| (e.reason.clone(), e.note.clone()))
                        .collect::<Vec<_>>()
                ))
            })
        },
    )
    .await
}

/// Watch the works until every spoke ships `digest`, checking at every look that at most
/// `limit` moved clusters are not yet available; returns the final works.
async fn watch_until_all(
    hub: &Client,
    digest: &str,
    limit: usize,
) -> anyhow::Result<BTreeMap<String, ManifestWork>> {
    let deadline = tokio::time::Instant::now() + STEP * 2;
    loop {
        let s = seen(hub, digest).await?;
        let moving: Vec<&String> = s
            .works
            .iter()
            .filter(|(c, w)| s.at[*c] && !available(w))
            .map(|(c, _)| c)
            .collect();
        ensure!(
            moving.len() <= limit,
            "more than {limit} cluster(s) moving at once: {moving:?}"
        );
        if s.at.len() == 3 && s.at.values().all(|b| *b) {
            return Ok(s.works);
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "not every cluster reached {digest}: {:?}",
            s.at
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// `started_at` of each listed cluster comes after the previous one's success was held.
fn check_sequence(works: &BTreeMap<String, ManifestWork>, order: &[String]) -> anyhow::Result<()> {
    for pair in order.windows(2) {
        let (a, b) = (&works[&pair[0]], &works[&pair[1]]);
        let since = stamp(a, AVAILABLE_SINCE_ANNOTATION).context("available-since")?;
        let started = stamp(b, STARTED_AT_ANNOTATION).context("started-at")?;
        ensure!(
            started.as_second() >= since.as_second() + MIN_SUCCESS,
            "{} moved at {started}, before {} held success ({since} + {MIN_SUCCESS}s)",
            pair[1],
            pair[0]
        );
    }
    Ok(())
}

async fn resume(hub: &Client) -> anyhow::Result<()> {
    Api::<ManagedClusterModule>::all(hub.clone())
        .patch(
            NAME,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {RESUME_ANNOTATION: "now"}}})),
        )
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progressive_rollout_halt_resume_and_canary() -> anyhow::Result<()> {
    Fleet::builder()
        .spokes(3)
        .nodes_with(|_, spoke| vec![worker_node(&format!("{spoke}-w1"), KERNEL)])
        .spoke_labels(3, [("ring".to_string(), "canary".to_string())].into())
        .run(async |fleet: &mut Fleet| {
            let hub = fleet.hub().client().await;
            ensure_namespace(&hub, HUB_NS).await?;
            ensure_namespace(&hub, BUILD_NS).await?;
            put_pull_secret(&hub, fleet.registry(), PULL_SECRET, HUB_NS).await?;
            let access = fleet.registry().access();
            // Each version its own manifest (an annotation), so its own digest.
            let version = |kernel: &str, v: &str| KmodImage {
                annotations: [(
                    "org.opencontainers.image.version".to_string(),
                    v.to_string(),
                )]
                .into(),
                ..KmodImage::new(&[kernel], &["kmm_ci_a"])
            };
            let d1 = push_kmod_image(&access, &tag(fleet, "v1"), &version(KERNEL, "v1")).await?;
            let d2 = push_kmod_image(&access, &tag(fleet, "v2"), &version(KERNEL, "v2")).await?;
            // Modules for another kernel: the loader's modprobe finds nothing on these nodes.
            let broken = version("6.1.0-13-amd64", "v3");
            let d3 = push_kmod_image(&access, &tag(fleet, "v3"), &broken).await?;
            let d4 = push_kmod_image(&access, &tag(fleet, "v4"), &version(KERNEL, "v4")).await?;
            ensure!(
                d1 != d2 && d2 != d3 && d3 != d4 && d1 != d4,
                "distinct digests"
            );

            let mut agents = Vec::new();
            for i in 1..=3 {
                agents.push(RunningAgent::start(fleet.spoke(i).client().await));
            }
            let hub_proc = start_hub(fleet, Duration::from_secs(3));
            let outcome = scenario(fleet, &hub, &hub_proc, [&d1, &d2, &d3, &d4]).await;
            hub_proc.stop().await;
            for a in agents {
                a.stop().await;
            }
            outcome
        })
        .await
}

async fn scenario(
    fleet: &Fleet,
    hub: &Client,
    hub_proc: &HubProcess,
    [d1, d2, d3, d4]: [&String; 4],
) -> anyhow::Result<()> {
    let spokes: Vec<String> = (1..=3).map(spoke_name).collect();

    // v1 everywhere at once (type All: today's behaviour, no rollout status).
    apply_mcm(hub, &versioned(fleet, "v1", json!({"type": "All"}))?).await?;
    eventually("v1 available on every spoke", STEP, || async {
        let s = seen(hub, d1).await?;
        let ok = s.at.len() == 3 && s.works.values().all(available) && s.at.values().all(|b| *b);
        Ok(if ok {
            Ok(())
        } else {
            Err(format!("{:?}", s.at))
        })
    })
    .await?;
    ensure!(
        mcm_status(hub, NAME)
            .await?
            .status
            .and_then(|s| s.rollout)
            .is_none(),
        "no rollout status for All"
    );

    // (a) v2, Progressive, one cluster at a time.
    let progressive = |deadline: &str| {
        json!({"type": "Progressive", "progressive": {
            "maxConcurrency": 1, "minSuccessTime": format!("{MIN_SUCCESS}s"),
            "progressDeadline": deadline, "maxFailures": 0}})
    };
    apply_mcm(hub, &versioned(fleet, "v2", progressive("120s"))?).await?;
    let first = wait_rollout(hub, "the v2 rollout to start", |r| {
        r.in_progress == 1 && r.pending == 2
    })
    .await?;
    ensure!(first.wave == 1 && first.total == 3, "{first:?}");
    let v2 = watch_until_all(hub, d2, 1).await?;
    check_sequence(&v2, &spokes)?;
    let done = wait_rollout(hub, "the v2 rollout to complete", |r| {
        r.phase == RolloutPhase::Complete
    })
    .await?;
    ensure!(done.updated == 3 && done.failed == 0, "{done:?}");
    event_with(hub, "RolloutCompleted", &done.revision).await?;
    let moved = hub_proc
        .metric("kmm_hub_rollout_clusters_moved_total")
        .await?;
    ensure!(moved >= 3.0, "moved metric {moved}");

    // (b) v3 is broken: spoke-1 never loads it, fails at the deadline, the rollout halts;
    // spoke-2 and spoke-3 keep their v2 work untouched.
    apply_mcm(hub, &versioned(fleet, "v3", progressive("8s"))?).await?;
    let halted = wait_rollout(hub, "the v3 rollout to halt", |r| {
        r.phase == RolloutPhase::Halted
    })
    .await?;
    ensure!(
        halted.failed_clusters == vec![spokes[0].clone()],
        "{halted:?}"
    );
    let reason = halted.halt_reason.clone().unwrap_or_default();
    ensure!(reason.contains(&spokes[0]), "{reason}");
    event_with(hub, "RolloutHalted", &spokes[0]).await?;
    let degraded = crate::setup::condition(&mcm_status(hub, NAME).await?, "Degraded");
    ensure!(
        degraded
            .as_ref()
            .is_some_and(|d| d.0 == "True" && d.2.contains(&spokes[0])),
        "{degraded:?}"
    );
    tokio::time::sleep(Duration::from_secs(6)).await; // two resyncs: still nothing moves
    let s = seen(hub, d2).await?;
    for c in &spokes[1..] {
        ensure!(s.at[c], "{c} left v2 while halted");
        ensure!(
            s.works[c].metadata.generation == v2[c].metadata.generation,
            "{c}'s work was rewritten"
        );
    }
    ensure!(seen(hub, d3).await?.at[&spokes[0]], "spoke-1 carries v3");
    ensure!(
        hub_proc
            .metric("kmm_hub_rollouts{phase=\"Halted\"}")
            .await?
            == 1.0,
        "halted gauge"
    );

    // Resume: spoke-1's failure is accepted, spoke-2 moves (and fails too: halted again).
    resume(hub).await?;
    let again = wait_rollout(hub, "spoke-2 to fail after the resume", |r| {
        r.phase == RolloutPhase::Halted && r.failed == 2
    })
    .await?;
    ensure!(again.failed_clusters == spokes[..2].to_vec(), "{again:?}");
    ensure!(
        seen(hub, d2).await?.at[&spokes[2]],
        "spoke-3 is still on v2"
    );
    let m = mcm_status(hub, NAME).await?;
    ensure!(
        !m.annotations().contains_key(RESUME_ANNOTATION),
        "the resume annotation is removed"
    );
    event_with(hub, "RolloutProgressing", "resumed").await?;

    // (c) v4, ProgressivePerGroup with the canary group (spoke-3, ring=canary) first; the
    // new revision lifts the halt.
    apply_mcm(
        hub,
        &versioned(
            fleet,
            "v4",
            json!({"type": "ProgressivePerGroup", "progressivePerGroup": {
                "minSuccessTime": format!("{MIN_SUCCESS}s"), "progressDeadline": "120s",
                "mandatoryDecisionGroups": [{"groupName": "canary",
                    "clusterSelector": {"matchLabels": {"ring": "canary"}}}]}}),
        )?,
    )
    .await?;
    let canary = wait_rollout(hub, "the canary group first", |r| {
        r.current_group.as_deref() == Some("canary") && r.in_progress == 1
    })
    .await?;
    ensure!(canary.pending == 2, "{canary:?}");
    let s = seen(hub, d4).await?;
    ensure!(
        s.at[&spokes[2]] && !s.at[&spokes[0]] && !s.at[&spokes[1]],
        "only the canary moved: {:?}",
        s.at
    );
    let v4 = watch_until_all(hub, d4, 3).await?;
    let c3 = &v4[&spokes[2]];
    let since = stamp(c3, AVAILABLE_SINCE_ANNOTATION).context("canary available-since")?;
    for c in &spokes[..2] {
        let started = stamp(&v4[c], STARTED_AT_ANNOTATION).context("started-at")?;
        ensure!(
            started.as_second() >= since.as_second() + MIN_SUCCESS,
            "{c} moved at {started} before the canary held success at {since}"
        );
    }
    let done = wait_rollout(hub, "the v4 rollout to complete", |r| {
        r.phase == RolloutPhase::Complete
    })
    .await?;
    ensure!(done.updated == 3 && done.failed == 0, "{done:?}");
    Ok(())
}
