//! The KMM labs (the seed examples: in-cluster build, build and sign, load an existing image,
//! in-tree removal, device plugin, soft dependencies) as ManagedClusterModules for the local
//! fleet, with what each should leave on the nodes. Used by `kmm-sandbox`, the scenario
//! suite and `docs/user-guide.md`.
//!
//! Each lab is the seed's Module (`shared_api::fixtures`, which loads the seeds' YAML files),
//! with two changes: images live in the local registry (`myrepo.xyz/…` and `quay.io/…` become
//! `<registry>/…`), and every lab has its own
//! name so that all of them run side by side (the seeds apply them one at a time, all named
//! `kmm-ci-a`). The unsigned in-cluster build also selects `sandbox.kmm-fleet.io/secure-boot:
//! "false"`: a Secure Boot node refuses unsigned modules, exactly as a real kernel does.

use std::collections::BTreeMap;

use regex::Regex;
use serde_json::Value;

use shared_api::Module;
use shared_api::fixtures::Lab as Seed;

use crate::sim::SimNode;

/// Namespace of the labs on the spokes (the seeds' `labsv2`).
pub const LAB_NAMESPACE: &str = "labsv2";
/// The labs' ServiceAccount on the spokes (loader and device-plugin pods).
pub const LAB_SERVICE_ACCOUNT: &str = "labsv2sa";
/// The labs' `imageRepoSecret`, on the hub (digests, builds) and on every spoke (pulls).
pub const PULL_SECRET: &str = "myrepo-pull-secret";
/// The seeds' kernel, the sandbox's "kernel A".
pub const KERNEL_A: &str = "5.14.0-284.36.1.el9_2.x86_64";
/// A second kernel that the `^.*\.x86_64$` mappings do not match.
pub const KERNEL_B: &str = "6.1.0-18-amd64";
/// Node label that keeps unsigned modules off Secure Boot nodes.
pub const SECURE_BOOT_LABEL: &str = "sandbox.kmm-fleet.io/secure-boot";
/// The worker role the labs select.
pub const WORKER_LABEL: &str = "node-role.kubernetes.io/worker";

/// The in-cluster build Dockerfile of the labs, unchanged (ConfigMaps `build-module-labs`
/// and `labs-dockerfile`, key `dockerfile`).
pub const LAB_DOCKERFILE: &str = r#"ARG DTK_AUTO
ARG KERNEL_VERSION
FROM ${DTK_AUTO} as builder
WORKDIR /build/
RUN git clone -b main --single-branch https://github.com/rh-ecosystem-edge/kernel-module-management.git
WORKDIR kernel-module-management/ci/kmm-kmod/
RUN make
FROM docker.io/redhat/ubi8-minimal
ARG KERNEL_VERSION
RUN microdnf -y install kmod openssl && \
    microdnf clean all && \
    rm -rf /var/cache/yum
RUN mkdir -p /opt/lib/modules/${KERNEL_VERSION}
COPY --from=builder /build/kernel-module-management/ci/kmm-kmod/*.ko /opt/lib/modules/${KERNEL_VERSION}/
RUN /usr/sbin/depmod -b /opt
"#;

/// Dockerfile ConfigMaps the labs reference (in the hub's namespace).
pub const DOCKERFILE_CONFIGMAPS: &[&str] = &["build-module-labs", "labs-dockerfile"];
/// Signing Secrets of the build-and-sign lab (in the hub's namespace): name and key.
pub const SIGNING_KEY_SECRET: (&str, &str) = ("mykey", "key");
pub const SIGNING_CERT_SECRET: (&str, &str) = ("mycert", "cert");

/// A prebuilt image the sandbox pushes (the seeds' "existing images").
#[derive(Debug, Clone)]
pub struct PrebuiltImage {
    /// Reference without the registry host, e.g. `vendor/kmm-labs:…`.
    pub path: String,
    /// Kernels A and B, and the real-kernel nodes' kernel when this machine has it.
    pub kernels: Vec<String>,
    pub modules: Vec<&'static str>,
    /// Signed with the sandbox's key (loadable on Secure Boot nodes).
    pub signed: bool,
}

/// The device plugin image (any image runs in the simulator; this one carries a config).
pub const DEVICE_PLUGIN_IMAGE: &str = "simple-device-plugin:latest";

/// One lab: the MCM and what it should do on the nodes.
#[derive(Debug, Clone)]
pub struct Lab {
    /// The MCM's name (and the Module's on the spokes).
    pub name: &'static str,
    /// The seed section it comes from.
    pub title: &'static str,
    pub mcm: Value,
    /// Kernel modules loaded on every targeted node (names as `lsmod` prints them).
    pub modules: Vec<&'static str>,
    /// In-tree modules that must be gone from every targeted node.
    pub removes: Vec<&'static str>,
    /// A device plugin runs on every targeted node.
    pub device_plugin: bool,
    /// The hub builds its images.
    pub builds: bool,
    /// The hub signs its images.
    pub signs: bool,
}

fn mcm(name: &str, module: &Module) -> Value {
    serde_json::json!({
        "apiVersion": "hub.kmm.sigs.x-k8s.io/v1beta1",
        "kind": "ManagedClusterModule",
        "metadata": {"name": name},
        // Nothing is prepared on the spokes: the work carries the labs' namespace and
        // ServiceAccount (by default) and a copy of their pull secret.
        "spec": {"spokeNamespace": LAB_NAMESPACE, "selector": {},
            "spokePrerequisites": {"pullSecret": true}, "moduleSpec": module.spec},
    })
}

/// The prebuilt images every lab needs, pushed by the sandbox before the labs are applied.
pub fn prebuilt_images() -> Vec<PrebuiltImage> {
    let fixed = format!("kmm-labs:kmm-kmod-{KERNEL_A}-v1.0");
    let real = crate::vm::KernelDist::locate(&crate::provision::cache_dir()).map(|d| d.release);
    let kernels = |ks: &[&str]| -> Vec<String> {
        ks.iter()
            .map(|k| k.to_string())
            .chain(real.clone())
            .collect()
    };
    vec![
        // "Load Module from an existing image" and "Device Plugins": a vendor's image. The seed
        // pins the one kernel of its cluster in the tag; this image serves both kernels.
        PrebuiltImage {
            path: format!("vendor/{fixed}"),
            kernels: kernels(&[KERNEL_A, KERNEL_B]),
            modules: vec!["kmm-ci-a"],
            signed: true,
        },
        // "Replacing In-Tree Modules" (the seed pulls it from the lab author's repository).
        PrebuiltImage {
            path: format!("ebelarte/{fixed}"),
            kernels: kernels(&[KERNEL_A, KERNEL_B]),
            modules: vec!["kmm-ci-a"],
            signed: true,
        },
        // "Loading soft dependencies": one image per kernel with both modules.
        PrebuiltImage {
            path: format!("myrepo/kmmo-lab:kmm-kmod-{KERNEL_A}"),
            kernels: vec![KERNEL_A.to_string()],
            modules: vec!["kmm-ci-a", "kmm-ci-b"],
            signed: true,
        },
    ]
    .into_iter()
    .chain(real.iter().map(|k| PrebuiltImage {
        path: format!("myrepo/kmmo-lab:kmm-kmod-{k}"),
        kernels: vec![k.clone()],
        modules: vec!["kmm-ci-a", "kmm-ci-b"],
        signed: true,
    }))
    .collect()
}

/// The labs' device plugin (`simple-device-plugin`): on the base userspace, a script that
/// says what it advertises and, like a real driver's plugin, holds the driver's device
/// (`/dev/kmm_ci_a`) open while it runs — so the module is in use until the plugin stops.
pub const DEVICE_PLUGIN_SCRIPT: &str = r#"# simple-device-plugin: advertises example.com/simple-device
echo "simple-device-plugin $*"
dev=/dev/kmm_ci_a
while [ ! -e "$dev" ]; do sleep 1; done
exec 3<"$dev"
echo "holding $dev"
# Stopping takes a moment (a real plugin drains its gRPC server and devices).
trap 'echo "releasing $dev"; sleep 3; exit 0' TERM INT
while :; do sleep 1 & wait $!; done
"#;

/// Push the device plugin image to `reference`.
pub async fn push_device_plugin_image(
    access: &crate::oci::RegistryAccess,
    reference: &str,
) -> anyhow::Result<String> {
    let files = BTreeMap::from([
        (
            "/usr/bin/simple-device-plugin".to_string(),
            DEVICE_PLUGIN_SCRIPT.as_bytes().to_vec(),
        ),
        (
            "/config-labs.yaml".to_string(),
            b"resources:\n  - name: example.com/simple-device\n    count: 1\n".to_vec(),
        ),
    ]);
    let base = crate::userspace::layer()?.to_vec();
    let top = crate::oci::tar_files(&files)?;
    let config = crate::oci::ImageConfig {
        entrypoint: vec!["/bin/sh".into(), "/usr/bin/simple-device-plugin".into()],
        ..Default::default()
    };
    Ok(crate::oci::push_image(access, reference, &[base, top], &config, &BTreeMap::new()).await?)
}

/// A lab's Module spec from the seed fixture, with its images in the local registry
/// (`myrepo.xyz/…` and `quay.io/…` become `<registry>/…`; the prebuilt `kmm-labs` images of the
/// "existing image" labs live under `vendor/`).
fn seed_spec(seed: Seed, registry: &str, prebuilt: bool) -> Module {
    Module::lab(seed).with_images(|image| {
        let path = image
            .strip_prefix("myrepo.xyz/")
            .or_else(|| image.strip_prefix("quay.io/"))
            .unwrap_or(image);
        if prebuilt && path.starts_with("kmm-labs:") {
            format!("{registry}/vendor/{path}")
        } else {
            format!("{registry}/{path}")
        }
    })
}

/// Every lab, for a registry at `registry` (`host:port`).
pub fn labs(registry: &str) -> Vec<Lab> {
    let lab = |name: &'static str, title: &'static str, module: Module| Lab {
        name,
        title,
        mcm: mcm(name, &module),
        modules: vec!["kmm_ci_a"],
        removes: vec![],
        device_plugin: false,
        builds: false,
        signs: false,
    };
    vec![
        Lab {
            builds: true,
            ..lab(
                "kmm-ci-a",
                "Building In-Cluster Modules from Sources",
                seed_spec(Seed::InClusterBuild, registry, false)
                    .with_node_label(SECURE_BOOT_LABEL, "false"),
            )
        },
        Lab {
            builds: true,
            signs: true,
            ..lab(
                "labs-signed-module",
                "Building and Signing In-Cluster Modules from Sources",
                seed_spec(Seed::BuildAndSign, registry, false),
            )
        },
        lab(
            "kmm-ci-a-load",
            "Load Module from an existing image",
            seed_spec(Seed::Load, registry, true),
        ),
        Lab {
            removes: vec!["joydev"],
            ..lab(
                "kmm-ci-a-in-tree",
                "Replacing In-Tree Modules",
                seed_spec(Seed::RemoveInTree, registry, true),
            )
        },
        Lab {
            device_plugin: true,
            ..lab(
                "kmm-ci-a-device-plugin",
                "Device Plugins",
                seed_spec(Seed::DevicePlugin, registry, true),
            )
        },
        Lab {
            modules: vec!["kmm_ci_b", "kmm_ci_a"],
            ..lab(
                "kmm-ci-a-softdep",
                "Loading soft dependencies",
                seed_spec(Seed::LoadDependencies, registry, true),
            )
        },
    ]
}

/// The lab named `name`.
pub fn lab(registry: &str, name: &str) -> Option<Lab> {
    labs(registry).into_iter().find(|l| l.name == name)
}

/// A cluster of the fleet as the labs see it: its ManagedCluster labels and its nodes.
#[derive(Debug, Clone)]
pub struct ClusterNodes {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub nodes: Vec<SimNode>,
}

/// The `(cluster, node)` pairs an MCM targets: clusters matching `spec.selector`, nodes
/// matching `moduleSpec.selector` whose kernel has a kernel mapping (first literal or regexp
/// match, as the hub and the spoke resolve them).
pub fn targeted_nodes(mcm: &Value, clusters: &[ClusterNodes]) -> Vec<(String, String)> {
    let spec = &mcm["spec"];
    let cluster_selector = string_map(&spec["selector"]);
    let node_selector = string_map(&spec["moduleSpec"]["selector"]);
    let mappings = spec["moduleSpec"]["moduleLoader"]["container"]["kernelMappings"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut out = Vec::new();
    for c in clusters {
        if !matches_selector(&c.labels, &cluster_selector) {
            continue;
        }
        for n in &c.nodes {
            if matches_selector(&n.labels, &node_selector) && has_mapping(&mappings, &n.kernel) {
                out.push((c.name.clone(), n.name.clone()));
            }
        }
    }
    out
}

fn string_map(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .map(|o| {
            o.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default()
}

fn matches_selector(
    labels: &BTreeMap<String, String>,
    selector: &BTreeMap<String, String>,
) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn has_mapping(mappings: &[Value], kernel: &str) -> bool {
    let kernel = kernel.trim_end_matches('+');
    mappings.iter().any(|m| {
        if let Some(l) = m["literal"].as_str() {
            return l == kernel;
        }
        m["regexp"]
            .as_str()
            .and_then(|r| Regex::new(r).ok())
            .is_some_and(|r| r.is_match(kernel))
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn node(name: &str, kernel: &str, labels: &[(&str, &str)]) -> SimNode {
        SimNode {
            name: name.into(),
            kernel: kernel.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn every_lab_is_a_valid_mcm() {
        for lab in labs("127.0.0.1:5000") {
            let m: shared_api::ManagedClusterModule =
                serde_json::from_value(lab.mcm.clone()).unwrap();
            let v = shared_api::validate::validate_mcm(&m);
            assert!(v.is_empty(), "{}: {v:?}", lab.name);
        }
    }

    #[test]
    fn targeting_follows_selectors_and_mappings() {
        let clusters = vec![ClusterNodes {
            name: "c1".into(),
            labels: BTreeMap::from([("name".into(), "c1".into())]),
            nodes: vec![
                node(
                    "a",
                    KERNEL_A,
                    &[(WORKER_LABEL, ""), (SECURE_BOOT_LABEL, "false")],
                ),
                node(
                    "b",
                    KERNEL_B,
                    &[(WORKER_LABEL, ""), (SECURE_BOOT_LABEL, "false")],
                ),
                node(
                    "sb",
                    KERNEL_A,
                    &[(WORKER_LABEL, ""), (SECURE_BOOT_LABEL, "true")],
                ),
                node(
                    "cp",
                    KERNEL_A,
                    &[("node-role.kubernetes.io/control-plane", "")],
                ),
            ],
        }];
        let names = |lab: &str| {
            targeted_nodes(&lab_mcm(lab), &clusters)
                .into_iter()
                .map(|(_, n)| n)
                .collect::<Vec<_>>()
        };
        assert_eq!(names("kmm-ci-a"), vec!["a", "b"]);
        assert_eq!(names("labs-signed-module"), vec!["a", "sb"]);
        assert_eq!(names("kmm-ci-a-load"), vec!["a", "b", "sb"]);
        assert_eq!(names("kmm-ci-a-softdep"), vec!["a", "sb"]);
    }

    fn lab_mcm(name: &str) -> Value {
        lab("r:1", name).unwrap().mcm
    }
}
