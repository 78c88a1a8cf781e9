//! The offline subcommands: `kmm-hub render`, `kmm-hub validate` and `kmm-hub machineconfig`
//! (no cluster needed).

pub mod machineconfig;
pub mod render;
pub mod validate;
