//! kmm-hub: reconciles ManagedClusterModules into builds, signed images and
//! digest-pinned ManifestWorks for every selected cluster.
//!
//! - [`decide`]: pure decisions (plan, per-cluster work, status, build-Job steps), unit-tested.
//! - [`render`]: pure renderers (ManifestWork, build Job, MachineConfig).
//! - [`pipeline`]: the image pipeline's I/O (registry, builds, signing); returns what happened.
//! - [`reconcile`]: the MCM reconciler: reads caches, calls the above, writes, publishes.
//! - [`preflight`]: FleetPreflightValidations: every MCM against a coming kernel, images
//!   built ahead through the same pipeline.
//! - [`cache`], [`registry`], [`sign`], [`webhook`], [`dashboard`]: watches, the registry
//!   client, native signing, admission, the dashboard API.
//! - [`commands`]: the offline `render`, `preflight`, `validate` and `machineconfig` subcommands, and
//!   `must-gather` (the support bundle).

pub mod access;
pub mod cache;
pub mod cli;
pub mod commands;
pub mod config;
pub mod dashboard;
pub mod decide;
pub mod last_decisions;
pub mod metrics;
pub mod pipeline;
pub mod preflight;
pub mod reconcile;
pub mod registry;
pub mod render;
pub mod run;
pub mod sign;
pub mod webhook;
