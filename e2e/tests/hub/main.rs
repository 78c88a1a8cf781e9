//! The hub against real control planes: ManifestWorks per selected cluster with pinned
//! digests, delivery by the work agent, relabelling, deletion, registry outages, moving
//! tags, restarts without duplicate writes, the admission webhook, Day 0 (CoreOS layering) and
//! Day 1 on OpenShift spokes, the spoke prerequisites a work carries (a fresh spoke, with the
//! spoke agent in-process), and fleet preflight for a coming kernel.

mod admission;
mod builds;
mod day0;
mod day1;
mod dra;
mod dtk;
mod must_gather;
mod placement;
mod preflight;
mod prerequisites;
mod progressive;
mod registry;
mod rollout;
mod setup;
mod signing;
#[path = "../common/spoke_agent.rs"]
mod spoke_agent;

const HUB_NS: &str = "kmm-hub";

/// Where the hub runs build Jobs (the default `<operator namespace>-builds`).
const BUILD_NS: &str = "kmm-hub-builds";

const SPOKE_NS: &str = "kmm-labs";

const PULL_SECRET: &str = "registry-pull";
