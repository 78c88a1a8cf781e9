//! kmm-spoke: the light agent on every spoke cluster. It turns each delivered `Module` into
//! module-loader and device-plugin DaemonSets, keeps node labels and events, and publishes
//! the node kernels as an OCM ClusterClaim. It never builds or signs. See `docs/spoke.md`.

pub mod cache;
pub mod cli;
pub mod controller;
pub mod error;
pub mod metrics;
pub mod must_gather;
pub mod render;
pub mod render_cmd;
pub mod webhook;

pub use controller::{Agent, AgentConfig};
