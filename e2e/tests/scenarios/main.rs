//! End-to-end scenarios on the sandbox: the real `kmm-hub` and `kmm-spoke` binaries, installed
//! from manifests/ and running under their ServiceAccounts, on a hub and two spokes with two
//! kernels and a Secure Boot node.
//!
//! - `labs_acceptance_and_bad_input`: every KMM lab as an MCM across both spokes, checked on
//!   the simulated nodes' module lists; the upstream acceptance cases that apply (SPEC §7:
//!   ManifestWork shape, a cluster without the kernel claim, builds before works, status
//!   counts, relabelling, deletion, the claim, ready labels and events); a Secure Boot node
//!   refusing an unsigned module; bad input rejected by the webhook or reported in status
//!   while nothing that already runs changes.
//! - `faults`: the hub killed mid-rollout (no duplicate builds), a spoke agent restarted,
//!   the registry down and back, a spoke API server restarted, a cluster removed from the fleet.
//!
//! Each test shares one sandbox between its scenarios (one namespace or MCM each), runs them
//! all, and fails at the end listing every failed scenario; on failure it prints the fleet
//! (objects, events, simulator logs) and the agents' logs.
#![allow(clippy::unwrap_used)]

mod acceptance;
mod faults;
mod lifecycle;
mod observe;
mod runner;
mod secure_boot;

use std::time::{Duration, Instant};

use kmm_e2e::sandbox::progress::Progress;
use kmm_e2e::sandbox::{Sandbox, SandboxOptions};

use crate::acceptance::{
    builds_and_signing, dashboard, events_and_labels, kernel_claims, labs_on_the_right_nodes,
    status_counts, work_shape,
};
use crate::faults::{
    cluster_removed, hub_killed_mid_rollout, registry_down_and_back, spoke_agent_restarted,
    spoke_apiserver_restarted,
};
use crate::lifecycle::{bad_input, claim_added_later, ordered_upgrade, relabel_then_delete};
use crate::runner::{Runner, with_sandbox};
use crate::secure_boot::{
    secure_boot_loads_what_the_hub_signed, secure_boot_refuses_unsigned,
    secure_boot_rejects_a_foreign_key,
};

const DEADLINE: Duration = Duration::from_secs(120);

const CONVERGE: Duration = Duration::from_secs(300);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labs_acceptance_and_bad_input() -> anyhow::Result<()> {
    let opts = SandboxOptions {
        hub_resync: Duration::from_secs(5),
        ..Default::default()
    };
    with_sandbox(opts, async |sb: &mut Sandbox, progress: &Progress| {
        sb.apply_labs(progress).await?;
        let t = Instant::now();
        sb.wait_converged(CONVERGE, progress).await?;
        eprintln!("every lab converged in {:.1?}", t.elapsed());
        let sb: &Sandbox = sb;
        let mut r = Runner::default();
        r.run(
            "labs: modules on exactly the targeted nodes",
            labs_on_the_right_nodes(sb),
        )
        .await;
        r.run(
            "spec 7.1: ManifestWork shape (literal mappings, pinned, no build/sign, feedback)",
            work_shape(sb),
        )
        .await;
        r.run(
            "spec 7.3: one build per distinct image, signed by the hub",
            builds_and_signing(sb),
        )
        .await;
        r.run("spec 7.7: status counts", status_counts(sb)).await;
        r.run("spec 7.8: kernel claims", kernel_claims(sb)).await;
        r.run(
            "spec 7.10: ready labels and ModuleLoaded events",
            events_and_labels(sb),
        )
        .await;
        r.run(
            "dashboard: viewer token reads, nobody is refused",
            dashboard(sb),
        )
        .await;
        r.run(
            "secure boot: an unsigned module is refused",
            secure_boot_refuses_unsigned(sb),
        )
        .await;
        r.run(
            "secure boot: a module the hub signed with an unenrolled key is rejected",
            secure_boot_rejects_a_foreign_key(sb),
        )
        .await;
        r.run(
            "secure boot: a module the hub signed with the enrolled key loads, on the real kernel too",
            secure_boot_loads_what_the_hub_signed(sb),
        )
        .await;
        r.run(
            "spec 7.5/7.6: relabel a cluster out, then delete the MCM",
            relabel_then_delete(sb),
        )
        .await;
        r.run(
            "spec 7.2: a cluster without the claim, then with it",
            claim_added_later(sb),
        )
        .await;
        r.run(
            "bad input: rejected or reported, nothing running changes",
            bad_input(sb),
        )
        .await;
        r.run(
            "ordered upgrade (the lab, scripted)",
            ordered_upgrade(sb, progress),
        )
        .await;
        r.finish()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults() -> anyhow::Result<()> {
    let opts = SandboxOptions {
        hub_resync: Duration::from_secs(5),
        labs: [
            "kmm-ci-a",
            "labs-signed-module",
            "kmm-ci-a-load",
            "kmm-ci-a-in-tree",
        ]
        .map(String::from)
        .to_vec(),
        ..Default::default()
    };
    with_sandbox(opts, async |sb: &mut Sandbox, progress: &Progress| {
        let mut r = Runner::default();
        r.run(
            "hub killed mid-rollout and restarted: no duplicate builds",
            hub_killed_mid_rollout(sb, progress),
        )
        .await;
        r.run(
            "spoke agent restarted: nothing changes",
            spoke_agent_restarted(sb),
        )
        .await;
        r.run("registry down and back", registry_down_and_back(sb))
            .await;
        r.run(
            "spoke API server restarted, then a new module",
            spoke_apiserver_restarted(sb),
        )
        .await;
        r.run(
            "cluster removed from the fleet: its work goes, nothing else changes",
            cluster_removed(sb),
        )
        .await;
        r.finish()
    })
    .await
}
