//! Validation of Modules and ManagedClusterModules as a pure function that returns
//! *every* violation, each with its field path and a reason a person can act on.
//! The same rules run in `kmm-hub validate`, the hub's admission webhook, the hub
//! reconciler and the spoke agent (a Module can arrive through a ManifestWork).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use k8s_openapi::api::core::v1::{Toleration, Volume};
use regex::Regex;
use serde::Serialize;

use crate::kernel::{KNOWN_VARIABLES, Variables, merge_build, merge_sign, variables_in};
use crate::mcm::ManagedClusterModule;
use crate::module::{
    DevicePluginContainerSpec, KernelMapping, Module, ModuleLoaderContainerSpec, ModuleSpec, Sign,
};
use crate::names;

mod day0;
mod mapping;
mod pod;
mod rollout;
use mapping::{image_template_rule, in_tree_names, mapping_rules, modprobe_rules, sign_rules};
use pod::{
    build_selector_rules, plugin_container_rules, pull_policy_rule, selector_rules,
    toleration_rules, volume_rules,
};

/// Upstream's limit: `len(name) + len(namespace) ≤ 41`, so that every label and
/// object name derived from the pair stays within 63 characters.
pub const MAX_NAME_PLUS_NAMESPACE: usize = 41;
/// The hub's build Jobs are named `<mcm>-build-<10 hex>`; Job pod labels need ≤ 63.
pub const MAX_MCM_NAME: usize = 63 - "-build-".len() - 10 - 6;
/// Allowed roots for hostPath volumes of device plugins.
pub const HOST_PATH_ROOTS: [&str; 5] = ["/dev", "/sys", "/var", "/opt", "/run"];
/// A sample kernel used to check templated image references without a cluster.
pub const SAMPLE_KERNEL: &str = "5.14.0-284.36.1.el9_2.x86_64";

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Violation {
    /// A field path such as `spec.moduleLoader.container.kernelMappings[0].regexp`.
    pub path: String,
    pub reason: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.reason)
    }
}

/// Where the spec is validated; the DRA gate needs the server's version.
#[derive(Debug, Clone, Copy, Default)]
pub struct Context {
    /// The target server's minor version (`Some(20)` for 1.20); `None` when unknown (the hub).
    pub kubernetes_minor: Option<u32>,
}

#[derive(Default)]
struct Report(Vec<Violation>);

impl Report {
    fn push(&mut self, path: impl Into<String>, reason: impl Into<String>) {
        self.0.push(Violation {
            path: path.into(),
            reason: reason.into(),
        });
    }
    fn check(&mut self, path: impl Into<String>, r: Result<(), String>) {
        if let Err(reason) = r {
            self.push(path, reason);
        }
    }
}

/// Validate a Module (metadata and spec).
pub fn validate_module(module: &Module, ctx: Context) -> Vec<Violation> {
    let mut r = Report::default();
    let name = module.metadata.name.clone().unwrap_or_default();
    let namespace = module.metadata.namespace.clone().unwrap_or_default();
    r.check("metadata.name", names::dns_subdomain(&name));
    if !namespace.is_empty() {
        r.check("metadata.namespace", names::dns_label(&namespace));
    }
    if name.len() + namespace.len() > MAX_NAME_PLUS_NAMESPACE {
        r.push(
            "metadata.name",
            format!(
                "name and namespace together must be at most {MAX_NAME_PLUS_NAMESPACE} characters (are {}): node labels such as <namespace>.<name>.device-plugin-ready are built from them",
                name.len() + namespace.len()
            ),
        );
    }
    let ns = if namespace.is_empty() {
        "default"
    } else {
        namespace.as_str()
    };
    spec_rules(&mut r, "spec", &module.spec, &name, ns, ctx);
    r.0
}

/// Validate a ManagedClusterModule: its own fields, then the Module rules on `moduleSpec`
/// (as the Module `<mcm name>` in `spokeNamespace`, which is what the spokes receive).
pub fn validate_mcm(mcm: &ManagedClusterModule) -> Vec<Violation> {
    let mut r = Report::default();
    let name = mcm.metadata.name.clone().unwrap_or_default();
    let spoke_ns = &mcm.spec.spoke_namespace;
    r.check("metadata.name", names::dns_subdomain(&name));
    if name.len() > MAX_MCM_NAME {
        r.push(
            "metadata.name",
            format!("must be at most {MAX_MCM_NAME} characters (is {}): build Jobs are named <name>-build-<hash>", name.len()),
        );
    }
    r.check("spec.spokeNamespace", names::dns_label(spoke_ns));
    if name.len() + spoke_ns.len() > MAX_NAME_PLUS_NAMESPACE {
        r.push(
            "metadata.name",
            format!(
                "name and spec.spokeNamespace together must be at most {MAX_NAME_PLUS_NAMESPACE} characters (are {}): the spoke Module <spokeNamespace>/<name> would be rejected there",
                name.len() + spoke_ns.len()
            ),
        );
    }
    selector_rules(&mut r, "spec.selector", &mcm.spec.selector);
    if let Some(s) = &mcm.spec.rollout_strategy {
        rollout::rollout_rules(&mut r, "spec.rolloutStrategy", s);
    }
    if let Some(p) = &mcm.spec.placement_ref {
        r.check("spec.placementRef.name", names::dns_subdomain(&p.name));
        if !mcm.spec.selector.is_empty() {
            r.push(
                "spec.selector",
                "must be empty when spec.placementRef is set: the Placement chooses the clusters"
                    .to_string(),
            );
        }
    }
    let ns = if spoke_ns.is_empty() {
        "default"
    } else {
        spoke_ns.as_str()
    };
    spec_rules(
        &mut r,
        "spec.moduleSpec",
        &mcm.spec.module_spec,
        &name,
        ns,
        Context::default(),
    );
    if let Some(d) = &mcm.spec.day1 {
        day1_rules(&mut r, mcm, d, &name);
    }
    if let Some(d) = &mcm.spec.day0 {
        day0::day0_rules(&mut r, mcm, d, &name);
    }
    r.0
}

/// `spec.day1`: a pool name that is a label value and a DNS subdomain (it is the role label's
/// value and a MachineConfigPool's name), a MachineConfig name that fits, a module to load.
fn day1_rules(r: &mut Report, mcm: &ManagedClusterModule, d: &crate::mcm::Day1Loading, name: &str) {
    let pool = &d.machine_config_pool;
    r.check("spec.day1.machineConfigPool", names::label_value(pool));
    r.check("spec.day1.machineConfigPool", names::dns_subdomain(pool));
    let mc = d.machine_config_name(name);
    let field = if d.machine_config_name.is_some() {
        "spec.day1.machineConfigName"
    } else {
        "spec.day1.machineConfigPool"
    };
    if let Err(e) = names::dns_subdomain(&mc) {
        r.push(field, format!("the MachineConfig name {mc:?}: {e}"));
    }
    if let Some(m) = &d.in_tree_module {
        r.check("spec.day1.inTreeModule", names::kmod_name(m));
    }
    let module_name = mcm
        .spec
        .module_spec
        .module_loader
        .as_ref()
        .and_then(|l| l.container.modprobe.module_name.as_deref())
        .filter(|m| !m.is_empty());
    if module_name.is_none() {
        r.push(
            "spec.day1",
            "needs spec.moduleSpec.moduleLoader with modprobe.moduleName: Day 1 loads that module at boot",
        );
    }
}

/// Rules that compare an update with the stored object (rule 8).
pub fn validate_update(path: &str, old: &ModuleSpec, new: &ModuleSpec) -> Vec<Violation> {
    let version = |s: &ModuleSpec| {
        s.module_loader
            .as_ref()
            .and_then(|l| l.container.version.as_deref())
            .filter(|v| !v.is_empty())
            .is_some()
    };
    let mut r = Report::default();
    if version(old) != version(new) {
        r.push(
            format!("{path}.moduleLoader.container.version"),
            "cannot change between set and unset on an existing object; delete and re-create it to switch to or from ordered upgrade",
        );
    }
    r.0
}

fn spec_rules(
    r: &mut Report,
    p: &str,
    spec: &ModuleSpec,
    name: &str,
    namespace: &str,
    ctx: Context,
) {
    selector_rules(r, &format!("{p}.selector"), &spec.selector);
    toleration_rules(r, &format!("{p}.tolerations"), &spec.tolerations);
    if let Some(secret) = &spec.image_repo_secret {
        r.check(
            format!("{p}.imageRepoSecret.name"),
            names::dns_subdomain(&secret.name),
        );
    }
    if spec.module_loader.is_none() && spec.device_plugin.is_none() && spec.dra.is_none() {
        r.push(
            p,
            "at least one of moduleLoader, devicePlugin or dra must be set",
        );
    }
    if let Some(dp) = &spec.device_plugin {
        let dpp = format!("{p}.devicePlugin");
        plugin_container_rules(r, &format!("{dpp}.container"), &dp.container);
        if let Some(init) = &dp.init_container {
            plugin_container_rules(r, &format!("{dpp}.initContainer"), init);
        }
        if let Some(sa) = &dp.service_account_name {
            r.check(
                format!("{dpp}.serviceAccountName"),
                names::dns_subdomain(sa),
            );
        }
        volume_rules(r, &format!("{dpp}.volumes"), &dp.volumes);
    }
    if let Some(dra) = &spec.dra {
        let dp = format!("{p}.dra");
        if spec.device_plugin.is_some() {
            r.push(p, "dra and devicePlugin cannot both be set");
        }
        if let Some(minor) = ctx.kubernetes_minor
            && minor < 34
        {
            r.push(
                dp.clone(),
                format!("DRA requires Kubernetes 1.34 or later; this cluster runs 1.{minor}"),
            );
        }
        r.check(
            format!("{dp}.driverName"),
            names::dns_subdomain(&dra.driver_name),
        );
        plugin_container_rules(r, &format!("{dp}.container"), &dra.container);
        volume_rules(r, &format!("{dp}.volumes"), &dra.volumes);
        let mut seen = BTreeSet::new();
        for (i, class) in dra.device_classes.iter().enumerate() {
            let cp = format!("{dp}.deviceClasses[{i}]");
            r.check(format!("{cp}.name"), names::dns_subdomain(&class.name));
            if !seen.insert(class.name.as_str()) {
                r.push(
                    format!("{cp}.name"),
                    format!("duplicate device class {:?}", class.name),
                );
            }
            if class.selectors.len() > 32 {
                r.push(format!("{cp}.selectors"), "at most 32 selectors");
            }
            if class.config.len() > 32 {
                r.push(format!("{cp}.config"), "at most 32 config entries");
            }
        }
    }
    if let Some(loader) = &spec.module_loader {
        let lp = format!("{p}.moduleLoader");
        if let Some(sa) = &loader.service_account_name {
            r.check(format!("{lp}.serviceAccountName"), names::dns_subdomain(sa));
        }
        container_rules(
            r,
            &format!("{lp}.container"),
            &loader.container,
            name,
            namespace,
        );
    }
}

fn container_rules(
    r: &mut Report,
    p: &str,
    c: &ModuleLoaderContainerSpec,
    name: &str,
    namespace: &str,
) {
    let modprobe = &c.modprobe;
    let dir = modprobe.dir_name().to_string();
    modprobe_rules(r, &format!("{p}.modprobe"), c);

    if let Some(policy) = &c.image_pull_policy {
        pull_policy_rule(r, &format!("{p}.imagePullPolicy"), policy);
    }
    if let Some(v) = &c.version {
        r.check(format!("{p}.version"), names::label_value(v));
    }

    // Rule 5: never both the plural and the deprecated singular in-tree field.
    let mut singular = Vec::new();
    let mut plural = Vec::new();
    if c.in_tree_module_to_remove.is_some() {
        singular.push(format!("{p}.inTreeModuleToRemove"));
    }
    if c.in_tree_modules_to_remove.is_some() {
        plural.push(format!("{p}.inTreeModulesToRemove"));
    }
    for (i, m) in c.kernel_mappings.iter().enumerate() {
        if m.in_tree_module_to_remove.is_some() {
            singular.push(format!("{p}.kernelMappings[{i}].inTreeModuleToRemove"));
        }
        if m.in_tree_modules_to_remove.is_some() {
            plural.push(format!("{p}.kernelMappings[{i}].inTreeModulesToRemove"));
        }
    }
    if !singular.is_empty() && !plural.is_empty() {
        for path in &singular {
            r.push(
                path.clone(),
                format!(
                    "the deprecated inTreeModuleToRemove cannot be used together with inTreeModulesToRemove (set at {}); use only inTreeModulesToRemove",
                    plural.join(", ")
                ),
            );
        }
    }
    in_tree_names(
        r,
        &format!("{p}.inTreeModulesToRemove"),
        &format!("{p}.inTreeModuleToRemove"),
        c.in_tree_modules_to_remove.as_deref(),
        c.in_tree_module_to_remove.as_deref(),
    );

    let top_image = c.container_image.as_deref().filter(|s| !s.is_empty());
    if let Some(img) = top_image {
        image_template_rule(
            r,
            &format!("{p}.containerImage"),
            img,
            name,
            namespace,
            true,
        );
    }
    if let Some(b) = &c.build {
        build_selector_rules(r, &format!("{p}.build"), b);
    }
    if let Some(s) = &c.sign {
        sign_rules(r, &format!("{p}.sign"), s, &dir);
    }

    if c.kernel_mappings.is_empty() {
        r.push(
            format!("{p}.kernelMappings"),
            "at least one kernel mapping is required",
        );
    }
    for (i, m) in c.kernel_mappings.iter().enumerate() {
        mapping_rules(
            r,
            &format!("{p}.kernelMappings[{i}]"),
            m,
            c,
            top_image.is_some(),
            &dir,
            name,
            namespace,
        );
    }
}
