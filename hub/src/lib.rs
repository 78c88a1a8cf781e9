//! kmm-hub: reconciles ManagedClusterModules into builds, signed images and
//! digest-pinned ManifestWorks for every selected cluster.

pub mod sign;
pub mod validate_cmd;
