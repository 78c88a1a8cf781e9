//! Simulators for what the test world has no machines for: nodes and their kubelets
//! (with the module loader and the kaniko executor emulated). They are ordinary Kubernetes
//! clients, so they run against any API server. (OCM's agents are the real programs: see
//! `crate::ocm`.) Conventions are documented in `docs/test-world.md` ("Simulators").

use std::collections::BTreeMap;

mod context;
pub mod dockerfile;
pub mod host;
pub mod images;
pub mod kaniko;
pub mod loader;
pub mod node;
mod pod;
pub mod policy;
pub(crate) mod vmrun;

pub use node::{
    FIRMWARE_ANNOTATION, Kernels, LOADED_MODULES_ANNOTATION, NodeSim, REAL_KERNEL_ANNOTATION,
    SECURE_BOOT_ANNOTATION, read_loaded_modules,
};

/// A node: its name, kernel, labels, Secure Boot state with the DER certificates enrolled
/// in its MOK database, and the in-tree modules loaded at boot.
///
/// With `real_kernel` the node is backed by a VM running Debian's kernel ([`crate::vm`]):
/// `kernel` is that kernel's release (filled in when empty), Secure Boot is the real UEFI
/// path with `enrolled_certs` in the MOK list, `in_tree_modules` are loaded with the VM's
/// `modprobe` after boot, and every container of its pods runs in the VM
/// ([`vmrun`]). Otherwise the node and its kernel are simulated.
#[derive(Clone, Debug, Default)]
pub struct SimNode {
    pub name: String,
    pub kernel: String,
    pub labels: BTreeMap<String, String>,
    pub secure_boot: bool,
    pub enrolled_certs: Vec<Vec<u8>>,
    pub in_tree_modules: Vec<String>,
    pub real_kernel: bool,
    /// `status.nodeInfo.osImage`; `None`: a fixed simulated (or, on a real kernel, Debian) one.
    pub os_image: Option<String>,
}

impl SimNode {
    /// A real-kernel node (see the type's documentation).
    pub fn real(name: &str, labels: BTreeMap<String, String>) -> SimNode {
        SimNode {
            name: name.to_string(),
            kernel: crate::vm::KernelDist::locate(&crate::provision::cache_dir())
                .map(|d| d.release)
                .unwrap_or_default(),
            labels,
            real_kernel: true,
            ..Default::default()
        }
    }
}
