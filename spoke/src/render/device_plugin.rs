//! The device-plugin DaemonSet (SPEC §4.5): scheduled on nodes where the module is ready
//! (or on the selected nodes when the Module has no loader).

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{
    Container, HostPathVolumeSource, LocalObjectReference, PodSpec, SecurityContext, Volume,
    VolumeMount,
};
use shared_api::Module;
use shared_api::labels::{
    ROLE_DEVICE_PLUGIN, module_ready_label, module_version_ready_label, schedule_version_label,
    short_hash,
};
use shared_api::module::DevicePluginContainerSpec;

use super::{
    DEVICE_PLUGIN_HOST_PATH, RenderSettings, bounded_name, module_daemonset, module_key,
    module_version,
};

const DEVICE_PLUGIN_VOLUME: &str = "kubelet-device-plugins";

/// `<module>-device-plugin`, with `-<version>` when versioned (a hash when the version is
/// not usable in a name), at most 63 characters.
pub fn device_plugin_daemonset_name(module_name: &str, version: Option<&str>) -> String {
    let suffix = match version {
        None => String::new(),
        Some(v) if shared_api::names::dns_subdomain(v).is_ok() => format!("-{v}"),
        Some(v) => format!("-v{}", short_hash(v, 8)),
    };
    bounded_name(&format!("{module_name}-device-plugin"), &suffix)
}

/// The labels of a device-plugin DaemonSet, its selector and its pods.
pub fn device_plugin_labels(module_name: &str, version: Option<&str>) -> BTreeMap<String, String> {
    super::role_labels(module_name, ROLE_DEVICE_PLUGIN, version)
}

/// The device-plugin DaemonSet of `module`; `None` without `spec.devicePlugin`.
pub fn render_device_plugin_daemonset(
    module: &Module,
    settings: &RenderSettings,
) -> Option<DaemonSet> {
    let dp = module.spec.device_plugin.as_ref()?;
    let (_, name) = module_key(module);
    let version = module_version(module);
    let labels = device_plugin_labels(&name, version);

    let node_selector = plugin_node_selector(module);

    let mut plugin = plugin_container("device-plugin", &dp.container);
    plugin.volume_mounts.get_or_insert_with(Vec::new).insert(
        0,
        VolumeMount {
            name: DEVICE_PLUGIN_VOLUME.into(),
            mount_path: DEVICE_PLUGIN_HOST_PATH.into(),
            ..Default::default()
        },
    );
    let mut volumes = vec![Volume {
        name: DEVICE_PLUGIN_VOLUME.into(),
        host_path: Some(HostPathVolumeSource {
            path: DEVICE_PLUGIN_HOST_PATH.into(),
            type_: Some("Directory".into()),
        }),
        ..Default::default()
    }];
    volumes.extend(dp.volumes.iter().cloned());

    let pod_spec = PodSpec {
        node_selector: Some(node_selector),
        tolerations: Some(super::pod_tolerations(module)),
        image_pull_secrets: module.spec.image_repo_secret.as_ref().map(|s| {
            vec![LocalObjectReference {
                name: s.name.clone(),
            }]
        }),
        service_account_name: dp.service_account_name.clone().filter(|s| !s.is_empty()),
        automount_service_account_token: dp.automount_service_account_token,
        priority_class_name: settings.device_plugin_priority_class.clone(),
        init_containers: dp
            .init_container
            .as_ref()
            .map(|c| vec![plugin_container("device-plugin-init", c)]),
        containers: vec![plugin],
        volumes: Some(volumes),
        ..Default::default()
    };

    Some(module_daemonset(
        module,
        device_plugin_daemonset_name(&name, version),
        labels,
        pod_spec,
    ))
}

/// Where a plugin (device plugin or DRA driver) of `module` runs: with a loader, on the nodes
/// where the module is ready and the agent's schedule label allows it — taken off a node (and
/// the plugin gone) before its loader stops, so the driver is never in use when it is
/// unloaded; without one, on the nodes `spec.selector` selects.
pub fn plugin_node_selector(module: &Module) -> BTreeMap<String, String> {
    if module.spec.module_loader.is_none() {
        return module.spec.selector.clone();
    }
    let (namespace, name) = module_key(module);
    let version = module_version(module);
    let mut s = BTreeMap::from([
        (module_ready_label(&namespace, &name), String::new()),
        (
            schedule_version_label(&namespace, &name),
            version.unwrap_or_default().to_string(),
        ),
    ]);
    if let Some(v) = version {
        s.insert(module_version_ready_label(&namespace, &name), v.to_string());
    }
    s
}

/// A privileged plugin container from the Module's container spec.
pub fn plugin_container(name: &str, c: &DevicePluginContainerSpec) -> Container {
    let some_vec = |v: &Vec<String>| (!v.is_empty()).then(|| v.clone());
    Container {
        name: name.into(),
        image: Some(c.image.clone()),
        image_pull_policy: c.image_pull_policy.clone().filter(|p| !p.is_empty()),
        command: some_vec(&c.command),
        args: some_vec(&c.args),
        env: (!c.env.is_empty()).then(|| c.env.clone()),
        resources: c.resources.clone(),
        volume_mounts: (!c.volume_mounts.is_empty()).then(|| c.volume_mounts.clone()),
        security_context: Some(SecurityContext {
            privileged: Some(true),
            ..Default::default()
        }),
        ..Default::default()
    }
}
