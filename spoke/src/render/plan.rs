//! Everything the agent wants for one Module given the nodes it sees.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::resource::v1::DeviceClass;
use kube::ResourceExt;
use shared_api::Module;
use shared_api::kernel::KernelMapper;
use shared_api::labels::kernel_label_value;

use super::{
    LoaderTarget, RenderSettings, module_key, node_kernel, render_device_classes,
    render_device_plugin_daemonset, render_dra_daemonset, render_loader_daemonset, targeted_nodes,
};

/// The desired objects for one Module and what could not be rendered.
#[derive(Debug, Clone, Default)]
pub struct ModulePlan {
    /// Loader DaemonSets of the current version, one per targeted kernel with a mapping.
    pub loaders: Vec<DaemonSet>,
    /// The device-plugin DaemonSet of the current version.
    pub device_plugin: Option<DaemonSet>,
    /// The DRA driver DaemonSet of the current version.
    pub dra: Option<DaemonSet>,
    /// The DeviceClasses of `spec.dra.deviceClasses`.
    pub device_classes: Vec<DeviceClass>,
    /// DeviceClasses that could not be rendered or written, with the reason: existing ones
    /// of that name are kept.
    pub failed_device_classes: BTreeMap<String, String>,
    /// Names of the targeted nodes (selector and taints).
    pub targeted_nodes: Vec<String>,
    /// Kernels of targeted nodes that no mapping matches (no loader for them).
    pub unmapped_kernels: BTreeSet<String>,
    /// Kernel label values whose mapping failed to resolve, with the reason: loader
    /// DaemonSets already there for them are kept (bad input never deletes what works).
    pub failed_kernels: BTreeMap<String, String>,
    /// Kernels of targeted nodes whose mapping has `build` or `sign`: those run only on the
    /// hub (which ships Modules without them), so no loader is rendered for these kernels.
    pub needs_hub: BTreeSet<String>,
}

impl ModulePlan {
    /// The names of every desired DaemonSet.
    pub fn names(&self) -> BTreeSet<String> {
        self.loaders
            .iter()
            .chain(self.device_plugin.as_ref())
            .chain(self.dra.as_ref())
            .map(|d| d.name_any())
            .collect()
    }
}

/// Render everything for `module` over `nodes`. The Module is assumed valid
/// (`shared_api::validate::validate_module`); problems that remain are reported per kernel.
pub fn plan_module<'a>(
    module: &Module,
    nodes: impl IntoIterator<Item = &'a Node>,
    settings: &RenderSettings,
) -> ModulePlan {
    let (namespace, name) = module_key(module);
    let targeted = targeted_nodes(module, nodes);
    let (device_classes, failed_device_classes) = render_device_classes(module);
    let mut plan = ModulePlan {
        targeted_nodes: targeted.iter().map(|n| n.name_any()).collect(),
        device_plugin: render_device_plugin_daemonset(module, settings),
        dra: render_dra_daemonset(module, settings),
        device_classes,
        failed_device_classes,
        ..Default::default()
    };
    let Some(loader) = module.spec.module_loader.as_ref() else {
        return plan;
    };

    // One loader per kernel label value; the first raw kernel seen stands for it.
    let mut kernels: BTreeMap<String, String> = BTreeMap::new();
    for node in &targeted {
        if let Some(k) = node_kernel(node) {
            kernels
                .entry(kernel_label_value(k))
                .or_insert_with(|| k.to_string());
        }
    }
    let mapper = match KernelMapper::new(&loader.container) {
        Ok(m) => m,
        Err(e) => {
            plan.failed_kernels = kernels.into_keys().map(|k| (k, e.to_string())).collect();
            return plan;
        }
    };
    for (kernel_label, kernel) in kernels {
        match mapper.resolve(&kernel, &name, &namespace) {
            Ok(Some(mapping)) if mapping.build.is_some() || mapping.sign.is_some() => {
                plan.needs_hub.insert(kernel);
            }
            Ok(Some(mapping)) => {
                let target = LoaderTarget {
                    kernel_label,
                    mapping,
                };
                plan.loaders
                    .push(render_loader_daemonset(module, &target, settings));
            }
            Ok(None) => {
                plan.unmapped_kernels.insert(kernel);
            }
            Err(e) => {
                plan.failed_kernels
                    .insert(kernel_label, format!("kernel {kernel}: {e}"));
            }
        }
    }
    plan
}
