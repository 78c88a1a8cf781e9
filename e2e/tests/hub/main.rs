//! The hub against real control planes: ManifestWorks per selected cluster with pinned
//! digests, delivery by the work agent, relabelling, deletion, registry outages, moving
//! tags, restarts without duplicate writes, and the admission webhook.

mod admission;
mod builds;
mod must_gather;
mod registry;
mod rollout;
mod setup;
mod signing;

const HUB_NS: &str = "kmm-hub";

/// Where the hub runs build Jobs (the default `<operator namespace>-builds`).
const BUILD_NS: &str = "kmm-hub-builds";

const SPOKE_NS: &str = "kmm-labs";

const PULL_SECRET: &str = "registry-pull";
