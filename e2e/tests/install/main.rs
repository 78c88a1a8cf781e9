//! Installing kmm-fleet: the manifests of manifests/hub, manifests/spoke and manifests/policy,
//! checked offline and against real control planes.
//!
//! - RBAC is least privilege: the exact rule set of every role is pinned below (adding a
//!   permission means changing this file), wildcards are refused, and SubjectAccessReviews on
//!   the live servers show what the service accounts may not do.
//! - The Deployments are hardened and configured with flags and variables their binaries
//!   accept; the hub's shipped configuration parses.
//! - The RHACM Policy carries exactly the spoke manifests (it is generated from them).
//! - Every manifest applies with server-side apply and `dryRun=All`, the Policy and its
//!   placement against OCM's and the policy framework's released CRDs on the hub.
//! - Applied on the hub, `manifests/policy` reaches the spoke through the real Placement, the
//!   real policy propagator and the real configuration policy controller (the framework
//!   addon's sync between them is simulated: its module is refused by the Go proxy), and the
//!   objects it puts there give a working agent: the `kmm-spoke` binary, run with the
//!   Deployment's arguments and environment and its ServiceAccount's token, becomes ready,
//!   publishes the kernel ClusterClaim and loads a Module created by the work agent's
//!   ServiceAccount.
//! - Upstream's `controller_config.yaml` ships as upstream's ConfigMaps, fully used, and
//!   the spoke binary takes its addresses, Lease and loader settings from such a file.
//! - The hub, run with its ServiceAccount's token and the shipped configuration, ships a
//!   ManifestWork, runs a build, records events and answers its dashboard.
//!
//! Manifests are rendered with `kubectl kustomize` (the test world's kubectl), as users apply
//! them.
//! `just generate` regenerates manifests/policy/policy.yaml (`kmm-fleet generate-policy`);
//! `offline::policy_yaml_is_generated_from_the_spoke_manifests` is its drift check. The spoke
//! test builds the `kmm-spoke` binary with cargo
//! unless `KMM_SPOKE_BIN` names one.

mod access;
mod config;
mod dry_run;
mod hub_rbac;
mod manifests;
mod offline;
mod rbac;
mod spoke_agent;

use std::time::Duration;

const HUB_NS: &str = "kmm-hub";

const HUB_SA: &str = "kmm-hub";

const BUILD_NS: &str = "kmm-hub-builds";

const SPOKE_NS: &str = "kmm-spoke";

const SPOKE_SA: &str = "kmm-spoke";

const POLICY_NS: &str = kmm_e2e::manifests::POLICY_NS;

const POLICY: &str = kmm_e2e::manifests::POLICY;

const WORK_NS: &str = "open-cluster-management-agent";

const WORK_SA: &str = "klusterlet-work-sa";

const MODULE_NS: &str = "kmm-labs";

const SPOKE_EVENTS_NS: &str = kmm_spoke::controller::events::EVENT_NAMESPACE;

const MANAGER: &str = "kmm-install-test";

const K1: &str = "5.14.0-284.36.1.el9_2.x86_64";

const K2: &str = "6.1.0-18-amd64";

const DEADLINE: Duration = Duration::from_secs(120);

/// A fleet is several control planes: one at a time per test process.
static ONE_FLEET_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
