//! The offline subcommands: `kmm-hub render` and `kmm-hub validate` (no cluster needed).

pub mod render;
pub mod validate;
