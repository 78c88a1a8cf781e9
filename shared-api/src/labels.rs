//! Label, annotation, finalizer and field-manager keys (SPEC §4.4 and ours).

use sha2::{Digest, Sha256};

pub const PREFIX: &str = "kmm.node.kubernetes.io";

/// On each spoke node: its kernel, normalised into a label value ([`kernel_label_value`]).
pub const KERNEL_LABEL: &str = "kmm.node.kubernetes.io/kernel-version.full";
/// On hub ManifestWorks and Jobs: the owning ManagedClusterModule.
pub const MCM_OWNER_LABEL: &str = "kmm.node.kubernetes.io/managedclustermodule.name";
/// On spoke DaemonSets and their pods: the owning Module.
pub const MODULE_NAME_LABEL: &str = "kmm.node.kubernetes.io/module.name";
/// On spoke DaemonSets and pods: `module-loader` or `device-plugin`.
pub const ROLE_LABEL: &str = "kmm.node.kubernetes.io/role";
pub const ROLE_LOADER: &str = "module-loader";
pub const ROLE_DEVICE_PLUGIN: &str = "device-plugin";
/// Role of the DRA driver DaemonSet (upstream `dra`).
pub const ROLE_DRA: &str = "dra";
/// Namespace of the Module that owns a cluster-scoped object (DeviceClasses), as upstream.
pub const MODULE_NAMESPACE_LABEL: &str = "kmm.node.kubernetes.io/module.namespace";
/// On loader DaemonSets and pods: the kernel (label form) they load for.
pub const TARGET_KERNEL_LABEL: &str = "kmm.node.kubernetes.io/target-kernel";
/// On loader DaemonSets and pods of a versioned Module: the version.
pub const MODULE_VERSION_LABEL: &str = "kmm.node.kubernetes.io/module-version";
/// On build Jobs: what they do (`BuildImage`).
pub const RESOURCE_TYPE_LABEL: &str = "kmm.node.kubernetes.io/resource-type";
/// On build Jobs: the image they produce, hashed (label values cannot hold references).
pub const IMAGE_HASH_LABEL: &str = "kmm.node.kubernetes.io/image-hash";
/// Hash of a rendered object's spec (the hub's ManifestWorks, the spoke's DaemonSets): an
/// object is rewritten only when the hash of what would be written differs.
pub const SPEC_HASH_ANNOTATION: &str = "kmm.node.kubernetes.io/spec-hash";
/// Annotation on build Jobs: hash of everything that defines the build.
pub const BUILD_HASH_ANNOTATION: &str = "kmm.node.kubernetes.io/last-hash";
/// Annotation on build Jobs: the image reference they push.
pub const BUILD_IMAGE_ANNOTATION: &str = "kmm.node.kubernetes.io/image";
/// Annotation on loader pods and Node events: `<namespace>/<name>` of the Module.
pub const MODULE_ANNOTATION: &str = "module";
/// OCI manifest annotation: SHA-256 fingerprint of the certificate that signed the modules.
pub const SIGNED_BY_ANNOTATION: &str = "io.kmm-fleet.signing-cert-sha256";
/// OCI manifest annotation: the files signed.
pub const SIGNED_FILES_ANNOTATION: &str = "io.kmm-fleet.signed-files";

pub const MCM_FINALIZER: &str = "hub.kmm.sigs.x-k8s.io/manifestwork-cleanup";
pub const MODULE_FINALIZER: &str = "kmm.node.kubernetes.io/module-finalizer";
/// On loader pods: kept until the spoke agent has read whether the stopped loader left its
/// module in the kernel (the node's labels follow that).
pub const LOADER_POD_FINALIZER: &str = "kmm.node.kubernetes.io/node-labeler";
/// Prefix of the agent's internal ordered-upgrade labels (as upstream).
pub const BETA_PREFIX: &str = "beta.kmm.node.kubernetes.io";

pub const HUB_MANIFESTWORK_MANAGER: &str = "kmm-hub/manifestwork";
pub const HUB_STATUS_MANAGER: &str = "kmm-hub/status";
pub const HUB_BUILD_MANAGER: &str = "kmm-hub/build";
pub const SPOKE_DAEMONSET_MANAGER: &str = "kmm-spoke/daemonset";
pub const SPOKE_NODE_MANAGER: &str = "kmm-spoke/node-labels";
pub const SPOKE_CLAIM_MANAGER: &str = "kmm-spoke/clusterclaim";
pub const SPOKE_STATUS_MANAGER: &str = "kmm-spoke/status";
pub const SPOKE_NAMESPACE_MANAGER: &str = "kmm-spoke/namespace-guard";
/// On a namespace while it holds Modules (value ""), as upstream: the spoke's namespace
/// webhook selects namespaces by it and refuses their deletion.
pub const NAMESPACE_CONTAINS_MODULES_LABEL: &str = "kmm.node.k8s.io/contains-modules";

/// `kmm.node.kubernetes.io/<ns>.<name>.ready`: the module is loaded on the node.
pub fn module_ready_label(namespace: &str, name: &str) -> String {
    format!("{PREFIX}/{namespace}.{name}.ready")
}

/// Node annotation `kmm.node.kubernetes.io/<ns>.<name>.ready-boot-id`: the boot the ready
/// label was last confirmed in and the loader container that confirmed it,
/// `<bootID> <pod uid>/<restartCount>`. After a reboot (another `bootID`) the ready label comes
/// back only once a loader container that started after it is Ready again.
pub fn ready_boot_annotation(namespace: &str, name: &str) -> String {
    format!("{PREFIX}/{namespace}.{name}.ready-boot-id")
}

/// The boot ID a [`ready_boot_annotation`] value records (`None` for a value not of its form).
pub fn recorded_boot_id(value: &str) -> Option<&str> {
    value.split_once(' ').map(|(boot, _)| boot)
}

/// Whether `key` is a [`ready_boot_annotation`] of some Module.
pub fn is_ready_boot_annotation(key: &str) -> bool {
    key.strip_prefix(PREFIX)
        .is_some_and(|k| k.starts_with('/') && k.ends_with(".ready-boot-id"))
}

/// `kmm.node.kubernetes.io/<ns>.<name>.version.ready=<version>`.
pub fn module_version_ready_label(namespace: &str, name: &str) -> String {
    format!("{PREFIX}/{namespace}.{name}.version.ready")
}

/// `kmm.node.kubernetes.io/version-module.<ns>.<name>=<version>`, set by the user.
pub fn version_module_label(namespace: &str, name: &str) -> String {
    format!("{PREFIX}/version-module.{namespace}.{name}")
}

/// `beta.kmm.node.kubernetes.io/version-worker-pod.<ns>.<name>=<version>`: set by the agent
/// on the nodes where the Module's loader should run (empty value for an unversioned Module);
/// loader DaemonSets select on it.
pub fn worker_version_label(namespace: &str, name: &str) -> String {
    format!("{BETA_PREFIX}/version-worker-pod.{namespace}.{name}")
}

/// `beta.kmm.node.kubernetes.io/version-schedule-pod.<ns>.<name>=<version>`: set by the
/// agent where the device plugin may run; removed (and the plugin gone) before a loader stops.
pub fn schedule_version_label(namespace: &str, name: &str) -> String {
    format!("{BETA_PREFIX}/version-schedule-pod.{namespace}.{name}")
}

/// `kmm.node.kubernetes.io/<ns>.<name>.device-plugin-ready`.
pub fn device_plugin_ready_label(namespace: &str, name: &str) -> String {
    format!("{PREFIX}/{namespace}.{name}.device-plugin-ready")
}

/// `kmm.node.kubernetes.io/<ns>.<name>.dra-ready`.
pub fn dra_ready_label(namespace: &str, name: &str) -> String {
    format!("{PREFIX}/{namespace}.{name}.dra-ready")
}

/// Deprecated `kmm.node.kubernetes.io/<name>.ready`, removed when seen.
pub fn deprecated_ready_label(name: &str) -> String {
    format!("{PREFIX}/{name}.ready")
}

/// Whether a node label key is one of the labels the spoke owns for this Module.
pub fn is_module_node_label(key: &str, namespace: &str, name: &str) -> bool {
    key == module_ready_label(namespace, name)
        || key == module_version_ready_label(namespace, name)
        || key == device_plugin_ready_label(namespace, name)
        || key == dra_ready_label(namespace, name)
        || key == worker_version_label(namespace, name)
        || key == schedule_version_label(namespace, name)
}

/// A kernel version as a label value: the trailing `+` trimmed, characters outside
/// `[A-Za-z0-9._-]` replaced with `_`, ends trimmed to alphanumerics, and when longer
/// than 63 characters, shortened with a hash suffix so distinct kernels stay distinct.
pub fn kernel_label_value(kernel: &str) -> String {
    let normal = normalize_kernel(kernel);
    let trimmed = normal.trim_matches(|c: char| !c.is_ascii_alphanumeric());
    if !trimmed.is_empty() && trimmed.len() <= 63 {
        return trimmed.to_string();
    }
    let hash = short_hash(kernel, 10);
    let keep: String = trimmed.chars().take(63 - 11).collect();
    let keep = keep.trim_end_matches(|c: char| !c.is_ascii_alphanumeric());
    if keep.is_empty() {
        hash
    } else {
        format!("{keep}-{hash}")
    }
}

/// A kernel in DNS-label form (for object names): lower-case, `.` and `_` as `-`.
pub fn kernel_dns_form(kernel: &str) -> String {
    let s: String = normalize_kernel(kernel)
        .chars()
        .map(|c| match c {
            '.' | '_' => '-',
            c => c.to_ascii_lowercase(),
        })
        .collect();
    s.trim_matches('-').to_string()
}

/// Trailing `+` trimmed, characters outside `[A-Za-z0-9._-]` replaced with `_`.
pub fn normalize_kernel(kernel: &str) -> String {
    kernel
        .trim()
        .trim_end_matches('+')
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The first `len` hex digits of the SHA-256 of `s`.
pub fn short_hash(s: &str, len: usize) -> String {
    let digest = Sha256::digest(s.as_bytes());
    let mut h = hex::encode(digest);
    h.truncate(len);
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_keys() {
        assert_eq!(
            module_ready_label("labsv2", "kmm-ci-a"),
            "kmm.node.kubernetes.io/labsv2.kmm-ci-a.ready"
        );
        assert_eq!(
            version_module_label("labsv2", "kmm-ci-a"),
            "kmm.node.kubernetes.io/version-module.labsv2.kmm-ci-a"
        );
        assert_eq!(
            device_plugin_ready_label("ns", "m"),
            "kmm.node.kubernetes.io/ns.m.device-plugin-ready"
        );
        assert_eq!(
            dra_ready_label("ns", "m"),
            "kmm.node.kubernetes.io/ns.m.dra-ready"
        );
        assert!(is_module_node_label(&dra_ready_label("ns", "m"), "ns", "m"));
        assert_eq!(
            module_version_ready_label("ns", "m"),
            "kmm.node.kubernetes.io/ns.m.version.ready"
        );
        // The rest of upstream KMM's keys (internal/constants, internal/utils/kmmlabels.go).
        assert_eq!(
            worker_version_label("ns", "m"),
            "beta.kmm.node.kubernetes.io/version-worker-pod.ns.m"
        );
        assert_eq!(
            schedule_version_label("ns", "m"),
            "beta.kmm.node.kubernetes.io/version-schedule-pod.ns.m"
        );
        assert_eq!(
            deprecated_ready_label("m"),
            "kmm.node.kubernetes.io/m.ready"
        );
        for (ours, upstream) in [
            (MODULE_NAME_LABEL, "kmm.node.kubernetes.io/module.name"),
            (TARGET_KERNEL_LABEL, "kmm.node.kubernetes.io/target-kernel"),
            (RESOURCE_TYPE_LABEL, "kmm.node.kubernetes.io/resource-type"),
            (KERNEL_LABEL, "kmm.node.kubernetes.io/kernel-version.full"),
            (ROLE_LABEL, "kmm.node.kubernetes.io/role"),
            (
                MCM_OWNER_LABEL,
                "kmm.node.kubernetes.io/managedclustermodule.name",
            ),
            (MODULE_FINALIZER, "kmm.node.kubernetes.io/module-finalizer"),
            (LOADER_POD_FINALIZER, "kmm.node.kubernetes.io/node-labeler"),
            (MODULE_ANNOTATION, "module"),
        ] {
            assert_eq!(ours, upstream);
        }
    }

    #[test]
    fn kernel_values() {
        assert_eq!(
            kernel_label_value("5.14.0-284.36.1.el9_2.x86_64"),
            "5.14.0-284.36.1.el9_2.x86_64"
        );
        assert_eq!(kernel_label_value("6.1.0-rc1+"), "6.1.0-rc1");
        assert_eq!(kernel_label_value("6.1.0 #1~weird"), "6.1.0__1_weird");
        let long = format!("6.1.0-{}", "x".repeat(80));
        let v = kernel_label_value(&long);
        assert!(v.len() <= 63, "{v}");
        assert_ne!(v, kernel_label_value(&format!("{long}y")));
        assert_eq!(
            kernel_dns_form("5.14.0-284.36.1.el9_2.x86_64"),
            "5-14-0-284-36-1-el9-2-x86-64"
        );
    }
}
