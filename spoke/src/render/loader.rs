//! The module-loader DaemonSet: one per (Module, kernel, version), following the loader pod
//! contract in `docs/kmod-image.md`.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{
    Capabilities, Container, EnvVar, ExecAction, HostPathVolumeSource, Lifecycle, LifecycleHandler,
    LocalObjectReference, PodSpec, Probe, SecurityContext, Volume, VolumeMount,
};
use shared_api::Module;
use shared_api::kernel::ResolvedMapping;
use shared_api::labels::{
    KERNEL_LABEL, MODULE_NAME_LABEL, MODULE_VERSION_LABEL, ROLE_LABEL, ROLE_LOADER,
    TARGET_KERNEL_LABEL, short_hash, version_module_label,
};
use shared_api::module::ModuleLoaderSpec;

use super::{
    LOADER_SCRIPT, RenderSettings, bounded_name, module_daemonset, module_key, module_version,
};

/// The container name the node simulator (and people) look for.
pub const LOADER_CONTAINER: &str = "module-loader";
/// The file whose presence makes the loader container ready.
pub const READY_FILE: &str = "/tmp/kmm-loaded";

/// One kernel a Module loads for: the kernel in label form and its resolved mapping.
#[derive(Debug, Clone, PartialEq)]
pub struct LoaderTarget {
    /// `kernel_label_value` of the nodes' kernel: the loader's nodeSelector value.
    pub kernel_label: String,
    pub mapping: ResolvedMapping,
}

/// `<module>-loader-<10 hex of sha256(kernel label, version)>`, at most 63 characters.
pub fn loader_daemonset_name(
    module_name: &str,
    kernel_label: &str,
    version: Option<&str>,
) -> String {
    let hash = short_hash(
        &format!("{kernel_label}\n{}", version.unwrap_or_default()),
        10,
    );
    bounded_name(&format!("{module_name}-loader"), &format!("-{hash}"))
}

/// The labels of a loader DaemonSet, its selector and its pods.
pub fn loader_labels(
    module_name: &str,
    kernel_label: &str,
    version: Option<&str>,
) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::from([
        (MODULE_NAME_LABEL.to_string(), module_name.to_string()),
        (ROLE_LABEL.to_string(), ROLE_LOADER.to_string()),
        (TARGET_KERNEL_LABEL.to_string(), kernel_label.to_string()),
    ]);
    if let Some(v) = version {
        labels.insert(MODULE_VERSION_LABEL.to_string(), v.to_string());
    }
    labels
}

/// The loader DaemonSet of `module` for one kernel. A Module without `moduleLoader` is
/// rendered with an empty loader (callers do not ask for one).
pub fn render_loader_daemonset(
    module: &Module,
    target: &LoaderTarget,
    settings: &RenderSettings,
) -> DaemonSet {
    let (namespace, name) = module_key(module);
    let version = module_version(module);
    let loader = module.spec.module_loader.clone().unwrap_or_default();
    let labels = loader_labels(&name, &target.kernel_label, version);

    let mut node_selector = module.spec.selector.clone();
    node_selector.insert(KERNEL_LABEL.to_string(), target.kernel_label.clone());
    if let Some(v) = version {
        node_selector.insert(version_module_label(&namespace, &name), v.to_string());
    }

    let firmware = loader
        .container
        .modprobe
        .firmware_path
        .clone()
        .filter(|p| !p.is_empty());
    let mut volumes = vec![host_path_volume("lib-modules", "/lib/modules", None)];
    let mut mounts = vec![VolumeMount {
        name: "lib-modules".into(),
        mount_path: "/lib/modules".into(),
        read_only: Some(true),
        ..Default::default()
    }];
    if firmware.is_some() {
        volumes.push(host_path_volume(
            "firmware",
            &settings.firmware_host_path,
            Some("DirectoryOrCreate"),
        ));
        mounts.push(VolumeMount {
            name: "firmware".into(),
            mount_path: settings.firmware_host_path.clone(),
            ..Default::default()
        });
    }

    let container = Container {
        name: LOADER_CONTAINER.into(),
        image: Some(target.mapping.container_image.clone()),
        image_pull_policy: loader
            .container
            .image_pull_policy
            .clone()
            .filter(|p| !p.is_empty()),
        command: Some(vec!["/bin/sh".into(), "-c".into()]),
        args: Some(vec![LOADER_SCRIPT.into()]),
        env: Some(loader_env(&loader, &target.mapping, settings)),
        lifecycle: Some(Lifecycle {
            pre_stop: Some(LifecycleHandler {
                exec: Some(ExecAction {
                    command: Some(vec![
                        "/bin/sh".into(),
                        "-c".into(),
                        LOADER_SCRIPT.into(),
                        "loader".into(),
                        "unload".into(),
                    ]),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        readiness_probe: Some(Probe {
            exec: Some(ExecAction {
                command: Some(vec!["cat".into(), READY_FILE.into()]),
            }),
            period_seconds: Some(5),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            run_as_user: Some(0),
            capabilities: Some(Capabilities {
                add: Some(vec!["SYS_MODULE".into()]),
                drop: None,
            }),
            // Writing the host's firmware directory (and the firmware search path) needs it.
            privileged: firmware.is_some().then_some(true),
            ..Default::default()
        }),
        volume_mounts: Some(mounts),
        ..Default::default()
    };

    let pod_spec = PodSpec {
        node_selector: Some(node_selector),
        tolerations: (!module.spec.tolerations.is_empty()).then(|| module.spec.tolerations.clone()),
        image_pull_secrets: module.spec.image_repo_secret.as_ref().map(|s| {
            vec![LocalObjectReference {
                name: s.name.clone(),
            }]
        }),
        service_account_name: Some(
            loader
                .service_account_name
                .clone()
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| settings.loader_service_account.clone()),
        ),
        // The loader never talks to the API.
        automount_service_account_token: Some(false),
        containers: vec![container],
        volumes: Some(volumes),
        ..Default::default()
    };

    module_daemonset(
        module,
        loader_daemonset_name(&name, &target.kernel_label, version),
        labels,
        pod_spec,
    )
}

fn host_path_volume(name: &str, path: &str, type_: Option<&str>) -> Volume {
    Volume {
        name: name.into(),
        host_path: Some(HostPathVolumeSource {
            path: path.into(),
            type_: type_.map(str::to_string),
        }),
        ..Default::default()
    }
}

/// The `KMM_*` environment of the loader container (only non-empty values are set).
pub fn loader_env(
    loader: &ModuleLoaderSpec,
    mapping: &ResolvedMapping,
    settings: &RenderSettings,
) -> Vec<EnvVar> {
    let m = &loader.container.modprobe;
    let mut env = Vec::new();
    let mut set = |name: &str, value: String| {
        if !value.is_empty() {
            env.push(EnvVar {
                name: name.into(),
                value: Some(value),
                value_from: None,
            });
        }
    };
    let list = |v: Option<&Vec<String>>| v.map(|v| v.join("\n")).unwrap_or_default();
    set("KMM_MODULE_NAME", m.module_name.clone().unwrap_or_default());
    set("KMM_DIR_NAME", m.dir_name().to_string());
    set("KMM_PARAMETERS", list(m.parameters.as_ref()));
    set("KMM_ARGS_LOAD", list(m.args.as_ref().map(|a| &a.load)));
    set("KMM_ARGS_UNLOAD", list(m.args.as_ref().map(|a| &a.unload)));
    set("KMM_RAW_LOAD", list(m.raw_args.as_ref().map(|a| &a.load)));
    set(
        "KMM_RAW_UNLOAD",
        list(m.raw_args.as_ref().map(|a| &a.unload)),
    );
    set("KMM_LOADING_ORDER", list(m.modules_loading_order.as_ref()));
    set(
        "KMM_IN_TREE_REMOVE",
        mapping.in_tree_modules_to_remove.join("\n"),
    );
    if let Some(fw) = m.firmware_path.clone().filter(|p| !p.is_empty()) {
        set("KMM_FIRMWARE_PATH", fw);
        set(
            "KMM_FIRMWARE_HOST_PATH",
            settings.firmware_host_path.clone(),
        );
    }
    env
}
