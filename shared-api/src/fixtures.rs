//! Test fixtures: the KMM labs as Modules, with builder methods that adapt them to a test
//! (feature `fixtures`). The seeds' YAML files under `tests/fixtures/seeds/` stay the
//! acceptance inputs they are; these fixtures load exactly those files, so the hub's, the
//! spoke's and the test world's tests all start from the same labs.
//!
//! ```
//! use shared_api::Module;
//! use shared_api::fixtures::Lab;
//!
//! let m = Module::lab(Lab::Load).named("kmm-ci-a-load").with_uid("uid-1");
//! assert_eq!(m.metadata.name.as_deref(), Some("kmm-ci-a-load"));
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // fixtures: a broken seed is a broken test

use crate::Module;
use crate::parse::{Object, parse_documents};

/// One lab of the seeds (each teaches one thing).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Lab {
    /// "Building In-Cluster Modules from Sources": a Dockerfile ConfigMap and a build.
    InClusterBuild,
    /// "Building and Signing In-Cluster Modules from Sources".
    BuildAndSign,
    /// "Load Module from an existing image".
    Load,
    /// "Replacing In-Tree Modules": `inTreeModuleToRemove: joydev`.
    RemoveInTree,
    /// "Device Plugins".
    DevicePlugin,
    /// The ordered upgrade's first step: a build with `version` (v0.9).
    BuildWithVersion,
    /// "Loading soft dependencies": `modulesLoadingOrder`.
    LoadDependencies,
}

impl Lab {
    pub const ALL: [Lab; 7] = [
        Lab::InClusterBuild,
        Lab::BuildAndSign,
        Lab::Load,
        Lab::RemoveInTree,
        Lab::DevicePlugin,
        Lab::BuildWithVersion,
        Lab::LoadDependencies,
    ];

    /// The seed's file name under `shared-api/tests/fixtures/seeds/`.
    pub fn file(self) -> &'static str {
        match self {
            Lab::InClusterBuild => "lab_in_cluster_build.yaml",
            Lab::BuildAndSign => "lab_build_and_sign.yaml",
            Lab::Load => "lab_load.yaml",
            Lab::RemoveInTree => "lab_remove_in_tree.yaml",
            Lab::DevicePlugin => "lab_device_plugin.yaml",
            Lab::BuildWithVersion => "lab_build_with_version.yaml",
            Lab::LoadDependencies => "lab_load_dependencies.yaml",
        }
    }

    /// The seed's path, for tools that take a file (e.g. `kmm-spoke render --module`).
    pub fn path(self) -> String {
        format!(
            "{}/tests/fixtures/seeds/{}",
            env!("CARGO_MANIFEST_DIR"),
            self.file()
        )
    }

    /// The seed's text, as the lab writes it.
    pub fn yaml(self) -> &'static str {
        match self {
            Lab::InClusterBuild => {
                include_str!("../tests/fixtures/seeds/lab_in_cluster_build.yaml")
            }
            Lab::BuildAndSign => include_str!("../tests/fixtures/seeds/lab_build_and_sign.yaml"),
            Lab::Load => include_str!("../tests/fixtures/seeds/lab_load.yaml"),
            Lab::RemoveInTree => include_str!("../tests/fixtures/seeds/lab_remove_in_tree.yaml"),
            Lab::DevicePlugin => include_str!("../tests/fixtures/seeds/lab_device_plugin.yaml"),
            Lab::BuildWithVersion => {
                include_str!("../tests/fixtures/seeds/lab_build_with_version.yaml")
            }
            Lab::LoadDependencies => {
                include_str!("../tests/fixtures/seeds/lab_load_dependencies.yaml")
            }
        }
    }
}

impl Module {
    /// The lab's Module exactly as its seed declares it (name `kmm-ci-a` or the lab's,
    /// namespace `labsv2`, images in `myrepo.xyz`/`quay.io`).
    pub fn lab(lab: Lab) -> Module {
        let docs =
            parse_documents(lab.yaml()).unwrap_or_else(|e| panic!("seed {}: {e}", lab.file()));
        docs.into_iter()
            .find_map(|d| match d.object {
                Object::Module(m) => {
                    assert!(
                        d.unknown_fields.is_empty(),
                        "seed {}: unknown fields {:?}",
                        lab.file(),
                        d.unknown_fields
                    );
                    Some(*m)
                }
                _ => None,
            })
            .unwrap_or_else(|| panic!("seed {} holds no Module", lab.file()))
    }

    /// Rename it.
    pub fn named(mut self, name: &str) -> Self {
        self.metadata.name = Some(name.into());
        self
    }

    /// Move it to another namespace.
    pub fn in_namespace(mut self, namespace: &str) -> Self {
        self.metadata.namespace = Some(namespace.into());
        self
    }

    /// Give it a UID, as the API server would (owner references need one).
    pub fn with_uid(mut self, uid: &str) -> Self {
        self.metadata.uid = Some(uid.into());
        self
    }

    /// Rewrite every image it names (kernel mappings, the loader's default, the device
    /// plugin and its init container) with `f`.
    pub fn with_images(mut self, f: impl Fn(&str) -> String) -> Self {
        if let Some(c) = self.spec.module_loader.as_mut().map(|l| &mut l.container) {
            for m in &mut c.kernel_mappings {
                m.container_image = f(&m.container_image);
            }
            if let Some(i) = c.container_image.as_mut() {
                *i = f(i);
            }
        }
        if let Some(p) = self.spec.device_plugin.as_mut() {
            p.container.image = f(&p.container.image);
            if let Some(i) = p.init_container.as_mut() {
                i.image = f(&i.image);
            }
        }
        self
    }

    /// Every kernel mapping loads `image` (the device plugin keeps its own).
    pub fn with_image(mut self, image: &str) -> Self {
        if let Some(l) = self.spec.module_loader.as_mut() {
            for m in &mut l.container.kernel_mappings {
                m.container_image = image.into();
            }
        }
        self
    }

    /// Add `key=value` to the node selector.
    pub fn with_node_label(mut self, key: &str, value: &str) -> Self {
        self.spec.selector.insert(key.into(), value.into());
        self
    }

    /// Without `build` and `sign`, as the hub ships a Module to a spoke.
    pub fn as_shipped(mut self) -> Self {
        if let Some(c) = self.spec.module_loader.as_mut().map(|l| &mut l.container) {
            c.build = None;
            c.sign = None;
            for m in &mut c.kernel_mappings {
                m.build = None;
                m.sign = None;
            }
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_lab_loads_and_the_builders_change_what_they_say() {
        for lab in Lab::ALL {
            let m = Module::lab(lab);
            assert!(m.spec.module_loader.is_some(), "{lab:?}");
            assert!(std::path::Path::new(&lab.path()).exists(), "{lab:?}");
        }
        let m = Module::lab(Lab::InClusterBuild)
            .named("x")
            .in_namespace("ns")
            .with_uid("u")
            .with_images(|i| format!("r/{i}"))
            .with_node_label("a", "b")
            .as_shipped();
        assert_eq!(m.metadata.name.as_deref(), Some("x"));
        assert_eq!(m.metadata.namespace.as_deref(), Some("ns"));
        assert_eq!(m.metadata.uid.as_deref(), Some("u"));
        assert_eq!(m.spec.selector.get("a").map(String::as_str), Some("b"));
        let c = &m.spec.module_loader.as_ref().unwrap().container;
        assert!(
            c.kernel_mappings[0]
                .container_image
                .starts_with("r/myrepo.xyz/")
        );
        assert!(c.kernel_mappings.iter().all(|k| k.build.is_none()));
        let p = Module::lab(Lab::DevicePlugin).with_image("img");
        let k = &p
            .spec
            .module_loader
            .as_ref()
            .unwrap()
            .container
            .kernel_mappings;
        assert_eq!(k[0].container_image, "img");
        assert_ne!(p.spec.device_plugin.unwrap().container.image, "img");
    }
}
