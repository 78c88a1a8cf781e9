//! Pure renderers: what the hub writes, from what it knows. No I/O.
//!
//! - [`manifestwork`]: one cluster's ManifestWork (the trimmed, digest-pinned Module).
//! - [`prerequisites`]: the spoke namespace, ServiceAccounts and pull-secret copy it carries.
//! - [`build_job`]: the kaniko Job of one image build.
//! - [`machineconfig`]: Day-1 loading and the firmware path as MachineConfigs (OpenShift).
//! - [`day0`]: the Day-0 MachineConfig (`osImageURL`) a work carries (`spec.day0`).
//! - [`day1`]: the Day-1 MachineConfig and read-only pool a work carries (`spec.day1`).

pub mod build_job;
pub mod day0;
pub mod day1;
pub mod machineconfig;
pub mod manifestwork;
pub mod prerequisites;

pub use manifestwork::*;
