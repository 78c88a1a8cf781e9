//! Simulators for what the test world has no machines for: nodes and their kubelets
//! (with the module loader and the kaniko executor emulated). They are ordinary Kubernetes
//! clients, so they run against any API server. (OCM's agents are the real programs: see
//! `crate::ocm`.) Conventions are documented in `docs/test-world.md` ("Simulators").

use std::collections::BTreeMap;

pub mod dockerfile;
pub mod images;
pub mod kaniko;
pub mod loader;
pub mod node;
mod pod;
pub mod policy;

pub use node::{
    FIRMWARE_ANNOTATION, LOADED_MODULES_ANNOTATION, NodeSim, SECURE_BOOT_ANNOTATION,
    read_loaded_modules,
};

/// A simulated node: its name, kernel, labels, Secure Boot state with the DER
/// certificates enrolled in its MOK database, and the in-tree modules loaded at boot.
#[derive(Clone, Debug, Default)]
pub struct SimNode {
    pub name: String,
    pub kernel: String,
    pub labels: BTreeMap<String, String>,
    pub secure_boot: bool,
    pub enrolled_certs: Vec<Vec<u8>>,
    pub in_tree_modules: Vec<String>,
}
