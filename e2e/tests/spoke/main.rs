//! The spoke agent against a real control plane with simulated nodes: each seed lab as a
//! Module, ordered upgrade, kernel changes, deletion, and the kernel ClusterClaim.
//!
//! The agent runs in-process with the spoke's admin client. One fleet per test, one test at
//! a time (a fleet is two control planes). Every wait polls with a generous deadline.
#![allow(clippy::unwrap_used)]

mod agent;
mod dra;
mod dtk;
mod guard;
mod labs;
mod os_image;
mod setup;
#[path = "../common/spoke_agent.rs"]
mod spoke_agent;
mod upgrades;

use std::time::Duration;

const K1: &str = "5.14.0-284.36.1.el9_2.x86_64";

const K2: &str = "5.14.0-362.8.1.el9_3.x86_64";

const K3: &str = "6.1.0-18-amd64";

const NS: &str = "labsv2";

const SPOKE: &str = "spoke-1";

const TEST_MANAGER: &str = "e2e-test";

const DEADLINE: Duration = Duration::from_secs(180);

fn deadline() -> Duration {
    std::env::var("KMM_E2E_DEADLINE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(DEADLINE)
}

static ONE_FLEET_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
