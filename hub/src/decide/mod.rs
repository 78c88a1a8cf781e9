//! The hub's decisions, as pure functions: no client, no clock of their own, no locks.
//! The reconciler feeds them what the caches and the registry said and carries out what
//! they return; each has unit tests of its truth table.
//!
//! - [`facts`]: what the hub keeps of ManagedClusters, ManifestWorks and build Jobs.
//! - [`plan`]: selected clusters, their kernels' images, the distinct images of the fleet.
//! - [`image`]: one image's outcome, and whether a moved tag is held.
//! - [`build_job`]: the build-Job state machine (create, wait, restart, retry after backoff).
//! - [`cluster`]: one cluster's work: which mapping per kernel, or why none.
//! - [`day0`]: `spec.day0`: the layered OS images of the fleet and each cluster's MachineConfig.
//! - [`status`]: counts, per-image list, conditions and what to do next.
//! - [`release`]: when a ManifestWork that should go may be deleted or released.
//! - [`preflight`]: an MCM against a coming kernel: its image, and whether the hub can make it.
//! - [`dtk`]: the Driver Toolkit image for a kernel (`DTK_AUTO`): hub table, then claims.
//! - [`placement`]: the clusters (and decision groups) of `spec.placementRef`'s Placement.

pub mod build_job;
pub mod cluster;
pub mod day0;
pub mod dtk;
pub mod facts;
pub mod image;
pub mod placement;
pub mod plan;
pub mod preflight;
pub mod release;
pub mod rollout;
pub mod status;
