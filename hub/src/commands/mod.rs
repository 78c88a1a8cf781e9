//! The offline subcommands: `kmm-hub render`, `kmm-hub preflight`, `kmm-hub validate` and
//! `kmm-hub machineconfig` (no cluster needed), and `kmm-hub must-gather` (the support bundle).

pub mod machineconfig;
pub mod must_gather;
pub mod preflight;
pub mod render;
pub mod validate;
