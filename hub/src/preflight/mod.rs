//! Fleet preflight: `FleetPreflightValidation` objects ask whether every
//! ManagedClusterModule would work on a coming kernel, and optionally build its images ahead.
//!
//! - [`check`]: gathering the facts (registry, the hub's Secrets and ConfigMaps, the Driver
//!   Toolkit), from the cluster or from files; the verdicts are `decide::preflight`'s.
//! - [`controller`]: the reconciler, sharing the MCM reconciler's caches, registry client
//!   and image pipeline.
//! - [`metrics`]: the gauges.

pub mod check;
pub mod controller;
pub mod metrics;

pub use metrics::PreflightMetrics;
