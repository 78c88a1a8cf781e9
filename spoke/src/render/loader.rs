//! The module-loader DaemonSet: one per (Module, kernel, version), following the loader pod
//! contract in `docs/kmod-image.md`.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{DaemonSet, DaemonSetUpdateStrategy};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, EnvVar, ExecAction, HostPathVolumeSource, Lifecycle, LifecycleHandler,
    LocalObjectReference, PodSpec, Probe, ResourceRequirements, SELinuxOptions, SecurityContext,
    Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use shared_api::Module;
use shared_api::kernel::ResolvedMapping;
use shared_api::labels::{
    KERNEL_LABEL, ROLE_LOADER, TARGET_KERNEL_LABEL, short_hash, worker_version_label,
};
use shared_api::module::ModuleLoaderSpec;

use super::{
    LOADER_SCRIPT, RenderSettings, TEMPLATE_HASH_ANNOTATION, bounded_name, module_daemonset,
    module_key, module_version,
};

/// The container name the node simulator (and people) look for.
pub const LOADER_CONTAINER: &str = "module-loader";
/// The file the loader writes once it loaded (the module version it expects).
pub const READY_FILE: &str = "/tmp/kmm-loaded";
/// The loader container's exit status when stopped with its module still in the kernel
/// (the preStop unload failed).
pub const UNLOAD_FAILED_EXIT: i32 = 3;

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
    let mut labels = super::role_labels(module_name, ROLE_LOADER, version);
    labels.insert(TARGET_KERNEL_LABEL.to_string(), kernel_label.to_string());
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

    // Not `spec.selector` itself: the agent's worker label follows it, and leaves a node
    // only once no device-plugin pod of the Module runs there (the kernel refuses to unload
    // a module in use), so deselection and upgrades unload in order.
    let node_selector = BTreeMap::from([
        (KERNEL_LABEL.to_string(), target.kernel_label.clone()),
        (
            worker_version_label(&namespace, &name),
            version.unwrap_or_default().to_string(),
        ),
    ]);

    let firmware = loader
        .container
        .modprobe
        .firmware_path
        .clone()
        .filter(|p| !p.is_empty());
    // Only the running kernel's own module tree, read-only (in-tree removals need it).
    let host_modules = format!("/lib/modules/{}", target.mapping.kernel);
    let mut volumes = vec![host_path_volume("lib-modules", &host_modules, None)];
    let mut mounts = vec![VolumeMount {
        name: "lib-modules".into(),
        mount_path: host_modules.clone(),
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
        env: Some({
            let mut env = loader_env(&loader, &target.mapping, settings);
            env.push(EnvVar {
                name: "KMM_MODULE_KEY".into(),
                value: Some(format!("{namespace}.{name}")),
                value_from: None,
            });
            env
        }),
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
        // Ready while the kernel has the module (in the image's version when it has one).
        readiness_probe: Some(Probe {
            exec: Some(ExecAction {
                command: Some(vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    LOADER_SCRIPT.into(),
                    "loader".into(),
                    "check".into(),
                ]),
            }),
            period_seconds: Some(5),
            ..Default::default()
        }),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_string(), Quantity("10m".into())),
                ("memory".to_string(), Quantity("64Mi".into())),
            ])),
            limits: Some(BTreeMap::from([(
                "memory".to_string(),
                Quantity("128Mi".into()),
            )])),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            run_as_user: Some(settings.loader_run_as_user),
            capabilities: Some(Capabilities {
                add: Some(vec!["SYS_MODULE".into()]),
                drop: None,
            }),
            se_linux_options: Some(SELinuxOptions {
                type_: Some(settings.loader_selinux_type.clone()),
                ..Default::default()
            }),
            // Writing the host's firmware directory (and the firmware search path) needs it;
            // the API server refuses `allowPrivilegeEscalation: false` next to privileged.
            privileged: firmware.is_some().then_some(true),
            allow_privilege_escalation: firmware.is_none().then_some(false),
            ..Default::default()
        }),
        volume_mounts: Some(mounts),
        ..Default::default()
    };

    let pod_spec = PodSpec {
        node_selector: Some(node_selector),
        tolerations: Some(super::pod_tolerations(module)),
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
        // Evicting a loader unloads its driver: only the node's own critical pods go first.
        priority_class_name: settings.loader_priority_class.clone(),
        containers: vec![container],
        volumes: Some(volumes),
        ..Default::default()
    };

    let mut ds = module_daemonset(
        module,
        loader_daemonset_name(&name, &target.kernel_label, version),
        labels,
        pod_spec,
    );
    if let Some(spec) = ds.spec.as_mut() {
        // The agent replaces loader pods itself, one node at a time (docs/spoke.md).
        spec.update_strategy = Some(DaemonSetUpdateStrategy {
            type_: Some("OnDelete".into()),
            rolling_update: None,
        });
        // No finalizer here: the agent holds a loader pod with its finalizer just before it
        // stops one (controller::sequence::needs_hold) and releases it once it read what the
        // kernel has; a pod that goes because its node rebooted into another kernel holds
        // nothing and needs no release.
        let template_hash = loader_template_hash(module, spec.template.spec.as_ref());
        if let Some(meta) = spec.template.metadata.as_mut() {
            meta.annotations
                .get_or_insert_with(BTreeMap::new)
                .insert(TEMPLATE_HASH_ANNOTATION.into(), template_hash.clone());
        }
        ds.metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(TEMPLATE_HASH_ANNOTATION.into(), template_hash);
    }
    super::stamp_hash(&mut ds);
    ds
}

/// The hash of a loader pod template, over the pod spec with the Module's own tolerations
/// only: the built-in pressure tolerations ([`super::pod_tolerations`]) change nothing for a
/// DaemonSet pod (the DaemonSet controller adds them to every one), so adding them to the
/// render does not make running loaders outdated (no unload and reload on an agent upgrade).
pub fn loader_template_hash(module: &Module, spec: Option<&PodSpec>) -> String {
    let mut spec = spec.cloned();
    if let Some(s) = spec.as_mut() {
        s.tolerations =
            (!module.spec.tolerations.is_empty()).then(|| module.spec.tolerations.clone());
    }
    short_hash(&serde_json::to_string(&spec).unwrap_or_default(), 16)
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
