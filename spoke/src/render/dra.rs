//! The DRA driver DaemonSet and its DeviceClasses (SPEC §4.5, upstream main): the driver runs
//! where the device plugin would (nodes where the module is ready, or the selected nodes when
//! the Module has no loader), on the host network, with the kubelet's plugin and registration
//! directories and the CDI directory mounted.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{
    EnvVar, EnvVarSource, GRPCAction, HostPathVolumeSource, LocalObjectReference,
    ObjectFieldSelector, PodSpec, Probe, Volume, VolumeMount,
};
use k8s_openapi::api::resource::v1::DeviceClass;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::json;
use shared_api::Module;
use shared_api::labels::{MODULE_NAME_LABEL, MODULE_NAMESPACE_LABEL, ROLE_DRA, short_hash};

use super::device_plugin::{plugin_container, plugin_node_selector};
use super::{RenderSettings, bounded_name, module_daemonset, module_key, module_version};

/// The kubelet's DRA plugin directory.
pub const KUBELET_PLUGINS_PATH: &str = "/var/lib/kubelet/plugins/";
/// The kubelet's plugin registration directory.
pub const KUBELET_REGISTRY_PATH: &str = "/var/lib/kubelet/plugins_registry/";
/// The Container Device Interface spec directory.
pub const CDI_PATH: &str = "/var/run/cdi";
/// The driver's gRPC health port (upstream's `HEALTHCHECK_PORT`).
pub const DRA_HEALTHCHECK_PORT: i32 = 51515;
/// Name of the driver container (and `dra-init` for its init container), as upstream.
pub const DRA_CONTAINER: &str = "dra";

/// `<module>-dra`, with `-<version>` when versioned (a hash when the version is not usable
/// in a name), at most 63 characters — named like the device-plugin DaemonSet.
pub fn dra_daemonset_name(module_name: &str, version: Option<&str>) -> String {
    let suffix = match version {
        None => String::new(),
        Some(v) if shared_api::names::dns_subdomain(v).is_ok() => format!("-{v}"),
        Some(v) => format!("-v{}", short_hash(v, 8)),
    };
    bounded_name(&format!("{module_name}-dra"), &suffix)
}

/// The DRA driver DaemonSet of `module`; `None` without `spec.dra`.
pub fn render_dra_daemonset(module: &Module, settings: &RenderSettings) -> Option<DaemonSet> {
    let dra = module.spec.dra.as_ref()?;
    let (_, name) = module_key(module);
    let version = module_version(module);
    let labels = super::role_labels(&name, ROLE_DRA, version);

    let host_dir = |volume: &str, path: &str, type_: &str| Volume {
        name: volume.into(),
        host_path: Some(HostPathVolumeSource {
            path: path.into(),
            type_: Some(type_.into()),
        }),
        ..Default::default()
    };
    let mut volumes = vec![
        host_dir("kubelet-plugins", KUBELET_PLUGINS_PATH, "DirectoryOrCreate"),
        host_dir(
            "kubelet-plugins-registry",
            KUBELET_REGISTRY_PATH,
            "Directory",
        ),
        host_dir("cdi", CDI_PATH, "DirectoryOrCreate"),
    ];
    volumes.extend(dra.volumes.iter().cloned());
    let mounts = [
        ("kubelet-plugins", KUBELET_PLUGINS_PATH),
        ("kubelet-plugins-registry", KUBELET_REGISTRY_PATH),
        ("cdi", CDI_PATH),
    ]
    .map(|(n, p)| VolumeMount {
        name: n.into(),
        mount_path: p.into(),
        ..Default::default()
    });

    let mut driver = plugin_container(DRA_CONTAINER, &dra.container);
    let user_mounts = driver.volume_mounts.take().unwrap_or_default();
    driver.volume_mounts = Some(mounts.into_iter().chain(user_mounts).collect());
    let user_env = driver.env.take().unwrap_or_default();
    driver.env = Some(preset_env().into_iter().chain(user_env).collect());
    driver.liveness_probe = Some(Probe {
        grpc: Some(GRPCAction {
            port: DRA_HEALTHCHECK_PORT,
            service: Some("liveness".into()),
        }),
        initial_delay_seconds: Some(30),
        period_seconds: Some(10),
        timeout_seconds: Some(5),
        failure_threshold: Some(3),
        ..Default::default()
    });

    let pod_spec = PodSpec {
        node_selector: Some(plugin_node_selector(module)),
        tolerations: Some(super::pod_tolerations(module)),
        image_pull_secrets: module.spec.image_repo_secret.as_ref().map(|s| {
            vec![LocalObjectReference {
                name: s.name.clone(),
            }]
        }),
        service_account_name: dra.service_account_name.clone().filter(|s| !s.is_empty()),
        automount_service_account_token: dra.automount_service_account_token,
        priority_class_name: settings.device_plugin_priority_class.clone(),
        host_network: Some(true),
        init_containers: dra
            .init_container
            .as_ref()
            .map(|c| vec![plugin_container("dra-init", c)]),
        containers: vec![driver],
        volumes: Some(volumes),
        ..Default::default()
    };

    Some(module_daemonset(
        module,
        dra_daemonset_name(&name, version),
        labels,
        pod_spec,
    ))
}

/// The environment upstream gives every DRA driver container, before the Module's own.
fn preset_env() -> Vec<EnvVar> {
    let field = |name: &str, path: &str| EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let value = |name: &str, v: &str| EnvVar {
        name: name.into(),
        value: Some(v.into()),
        ..Default::default()
    };
    vec![
        field("NODE_NAME", "spec.nodeName"),
        field("POD_UID", "metadata.uid"),
        value("CDI_ROOT", CDI_PATH),
        value("KUBELET_REGISTRAR_DIRECTORY_PATH", KUBELET_REGISTRY_PATH),
        value("KUBELET_PLUGINS_DIRECTORY_PATH", KUBELET_PLUGINS_PATH),
        value("HEALTHCHECK_PORT", &DRA_HEALTHCHECK_PORT.to_string()),
    ]
}

/// The labels that tie a (cluster-scoped) DeviceClass to its Module, as upstream: the
/// Module's name and namespace (an owner reference cannot cross from cluster to namespace
/// scope).
pub fn device_class_labels(namespace: &str, name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (MODULE_NAME_LABEL.to_string(), name.to_string()),
        (MODULE_NAMESPACE_LABEL.to_string(), namespace.to_string()),
    ])
}

/// The DeviceClasses `spec.dra.deviceClasses` asks for, in order, and those whose
/// `selectors`/`config` do not decode as `resource.k8s.io/v1` (class name and why).
pub fn render_device_classes(module: &Module) -> (Vec<DeviceClass>, BTreeMap<String, String>) {
    let mut classes = Vec::new();
    let mut failed = BTreeMap::new();
    let Some(dra) = module.spec.dra.as_ref() else {
        return (classes, failed);
    };
    let (namespace, name) = module_key(module);
    for (i, class) in dra.device_classes.iter().enumerate() {
        let mut spec = serde_json::Map::new();
        if !class.selectors.is_empty() {
            spec.insert("selectors".into(), json!(class.selectors));
        }
        if !class.config.is_empty() {
            spec.insert("config".into(), json!(class.config));
        }
        match serde_json::from_value(serde_json::Value::Object(spec)) {
            Ok(spec) => classes.push(DeviceClass {
                metadata: ObjectMeta {
                    name: Some(class.name.clone()),
                    labels: Some(device_class_labels(&namespace, &name)),
                    ..Default::default()
                },
                spec,
            }),
            Err(e) => {
                failed.insert(
                    class.name.clone(),
                    format!("spec.dra.deviceClasses[{i}] ({}): {e}", class.name),
                );
            }
        }
    }
    (classes, failed)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
