//! kmm-hub: reconciles ManagedClusterModules into builds, signed images and
//! digest-pinned ManifestWorks for every selected cluster.

pub mod build;
pub mod buildns;
pub mod cache;
pub mod cli;
pub mod config;
pub mod dashboard;
pub mod images;
pub mod metrics;
pub mod plan;
pub mod reconcile;
pub mod registry;
pub mod release;
pub mod render;
pub mod render_cmd;
pub mod run;
pub mod sign;
pub mod validate_cmd;
pub mod views;
pub mod webhook;
