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
    r.0
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

#[allow(clippy::too_many_arguments)]
fn mapping_rules(
    r: &mut Report,
    p: &str,
    m: &KernelMapping,
    c: &ModuleLoaderContainerSpec,
    has_top_image: bool,
    dir: &str,
    name: &str,
    namespace: &str,
) {
    match (&m.literal, &m.regexp) {
        (Some(_), Some(_)) => r.push(p, "exactly one of literal and regexp must be set, not both"),
        (None, None) => r.push(p, "exactly one of literal and regexp must be set"),
        (Some(lit), None) if lit.trim().is_empty() => {
            r.push(format!("{p}.literal"), "must not be empty")
        }
        (None, Some(re)) => {
            if let Err(e) = Regex::new(re) {
                let reason = crate::kernel::regex_error_reason(&e);
                r.push(
                    format!("{p}.regexp"),
                    format!("{re:?} is not a valid regular expression: {reason}"),
                );
            }
        }
        _ => {}
    }
    if m.container_image.is_empty() {
        if !has_top_image {
            r.push(
                format!("{p}.containerImage"),
                "required: neither this mapping nor the container sets containerImage",
            );
        }
    } else {
        image_template_rule(
            r,
            &format!("{p}.containerImage"),
            &m.container_image,
            name,
            namespace,
            true,
        );
    }
    in_tree_names(
        r,
        &format!("{p}.inTreeModulesToRemove"),
        &format!("{p}.inTreeModuleToRemove"),
        m.in_tree_modules_to_remove.as_deref(),
        m.in_tree_module_to_remove.as_deref(),
    );
    if let Some(b) = &m.build {
        build_selector_rules(r, &format!("{p}.build"), b);
    }
    if let Some(s) = &m.sign {
        sign_rules(r, &format!("{p}.sign"), s, dir);
    }
    // What the mapping means after merging with the container defaults.
    let build = merge_build(c.build.as_ref(), m.build.as_ref());
    if let Some(b) = &build {
        match &b.dockerfile_config_map {
            None => r.push(
                format!("{p}.build.dockerfileConfigMap"),
                "required: the build of this mapping has no dockerfileConfigMap (neither here nor at container level)",
            ),
            Some(cm) => r.check(format!("{p}.build.dockerfileConfigMap.name"), names::dns_subdomain(&cm.name)),
        }
        for (i, s) in b.secrets.iter().enumerate() {
            r.check(
                format!("{p}.build.secrets[{i}].name"),
                names::dns_subdomain(&s.name),
            );
        }
        for (i, a) in b.build_args.iter().enumerate() {
            if a.name.is_empty()
                || !a
                    .name
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
            {
                r.push(
                    format!("{p}.build.buildArgs[{i}].name"),
                    format!(
                        "{:?} is not a build argument name (letters, digits, '_')",
                        a.name
                    ),
                );
            }
        }
    }
    if let Some(s) = merge_sign(c.sign.as_ref(), m.sign.as_ref()) {
        let sp = format!("{p}.sign");
        match &s.key_secret {
            None => r.push(
                format!("{sp}.keySecret"),
                "required: a secret holding the private key under 'key'",
            ),
            Some(k) => r.check(
                format!("{sp}.keySecret.name"),
                names::dns_subdomain(&k.name),
            ),
        }
        match &s.cert_secret {
            None => r.push(
                format!("{sp}.certSecret"),
                "required: a secret holding the certificate under 'cert'",
            ),
            Some(k) => r.check(
                format!("{sp}.certSecret.name"),
                names::dns_subdomain(&k.name),
            ),
        }
        match (&s.unsigned_image, &build) {
            (None, None) => r.push(
                format!("{sp}.unsignedImage"),
                "required when there is no build: the image whose modules are to be signed",
            ),
            (Some(u), _) => {
                image_template_rule(r, &format!("{sp}.unsignedImage"), u, name, namespace, true)
            }
            _ => {}
        }
    }
}

fn modprobe_rules(r: &mut Report, p: &str, c: &ModuleLoaderContainerSpec) {
    let m = &c.modprobe;
    let has_raw = m
        .raw_args
        .as_ref()
        .is_some_and(|a| !a.load.is_empty() || !a.unload.is_empty());
    match &m.module_name {
        Some(n) if !n.is_empty() => {
            r.check(format!("{p}.moduleName"), names::kmod_name(n));
            if has_raw {
                r.push(format!("{p}.rawArgs"), "must be empty when moduleName is set (rawArgs replaces the whole modprobe command)");
            }
        }
        _ => {
            let raw = m.raw_args.clone().unwrap_or_default();
            if raw.load.is_empty() {
                r.push(
                    format!("{p}.rawArgs.load"),
                    "required when moduleName is not set",
                );
            }
            if raw.unload.is_empty() {
                r.push(
                    format!("{p}.rawArgs.unload"),
                    "required when moduleName is not set",
                );
            }
        }
    }
    if let Some(args) = &m.args {
        if args.load.is_empty() {
            r.push(
                format!("{p}.args.load"),
                "must have at least one item when args is set",
            );
        }
        if args.unload.is_empty() {
            r.push(
                format!("{p}.args.unload"),
                "must have at least one item when args is set",
            );
        }
    }
    if let Some(dir) = &m.dir_name
        && !dir.is_empty()
        && !dir.starts_with('/')
    {
        r.push(
            format!("{p}.dirName"),
            format!("{dir:?} must be an absolute path"),
        );
    }
    if let Some(fw) = &m.firmware_path {
        if !fw.starts_with('/') {
            r.push(
                format!("{p}.firmwarePath"),
                format!("{fw:?} must be an absolute path in the image"),
            );
        } else if fw.trim_end_matches('/').is_empty() {
            r.push(
                format!("{p}.firmwarePath"),
                format!("{fw:?} is the image's root: name the firmware directory"),
            );
        } else if fw.split('/').any(|c| c == "..") {
            r.push(
                format!("{p}.firmwarePath"),
                format!("{fw:?} must not contain '..'"),
            );
        }
    }
    if let Some(order) = &m.modules_loading_order {
        let op = format!("{p}.modulesLoadingOrder");
        if order.len() < 2 {
            r.push(
                op.clone(),
                "must list the module and at least one dependency (2 or more entries)",
            );
        }
        match m.module_name.as_deref().filter(|n| !n.is_empty()) {
            None => r.push(op.clone(), "requires moduleName"),
            Some(n) => {
                if order
                    .first()
                    .is_some_and(|first| !names::same_kmod(first, n))
                {
                    r.push(
                        format!("{op}[0]"),
                        format!(
                            "must be the moduleName {n:?} (it is loaded last), found {:?}",
                            order[0]
                        ),
                    );
                }
            }
        }
        let mut seen = BTreeSet::new();
        for (i, entry) in order.iter().enumerate() {
            r.check(format!("{op}[{i}]"), names::kmod_name(entry));
            if !seen.insert(entry.replace('-', "_")) {
                r.push(format!("{op}[{i}]"), format!("duplicate module {entry:?}"));
            }
        }
    }
}

fn in_tree_names(
    r: &mut Report,
    plural_path: &str,
    singular_path: &str,
    plural: Option<&[String]>,
    singular: Option<&str>,
) {
    for (i, n) in plural.unwrap_or_default().iter().enumerate() {
        r.check(format!("{plural_path}[{i}]"), names::kmod_name(n));
    }
    if let Some(n) = singular
        && !n.is_empty()
    {
        r.check(singular_path, names::kmod_name(n));
    }
}

fn sign_rules(r: &mut Report, p: &str, s: &Sign, dir: &str) {
    if s.files_to_sign.is_empty() {
        r.push(
            format!("{p}.filesToSign"),
            "at least one file (or glob) to sign is required",
        );
    }
    let prefix = format!("{}/", dir.trim_end_matches('/'));
    for (i, f) in s.files_to_sign.iter().enumerate() {
        if !f.starts_with(&prefix) {
            r.push(
                format!("{p}.filesToSign[{i}]"),
                format!("{f:?} must be under the module directory {prefix:?} (modprobe.dirName)"),
            );
        }
        if f.split('/').any(|c| c == "..") {
            r.push(
                format!("{p}.filesToSign[{i}]"),
                format!("{f:?} must not contain '..'"),
            );
        }
        if let Err(e) = variables_in(f).and_then(|vars| unknown_variable(&vars)) {
            r.push(format!("{p}.filesToSign[{i}]"), e.to_string());
        }
    }
}

fn unknown_variable(vars: &[String]) -> Result<(), crate::kernel::SubstError> {
    match vars.iter().find(|v| !KNOWN_VARIABLES.contains(&v.as_str())) {
        Some(v) => Err(crate::kernel::SubstError::Unknown(v.clone())),
        None => Ok(()),
    }
}

/// A templated image: variables known, and a valid reference once substituted
/// with a sample kernel; with `needs_tag`, a tag or digest is required (rule 5).
fn image_template_rule(
    r: &mut Report,
    path: &str,
    template: &str,
    name: &str,
    namespace: &str,
    needs_tag: bool,
) {
    let vars = Variables::new(
        SAMPLE_KERNEL,
        if name.is_empty() { "module" } else { name },
        namespace,
    );
    match vars.substitute_image(template) {
        Err(e) => r.push(path, e.to_string()),
        Ok(image) => {
            if let Err(e) = names::image_reference(&image) {
                let shown = if image == template {
                    e
                } else {
                    format!("{e} (with the sample kernel {SAMPLE_KERNEL})")
                };
                r.push(path, shown);
            } else if needs_tag && !template.contains(':') && !template.contains('@') {
                r.push(
                    path,
                    format!("{template:?} needs a tag or a digest (':' or '@')"),
                );
            }
        }
    }
}

fn plugin_container_rules(r: &mut Report, p: &str, c: &DevicePluginContainerSpec) {
    if c.image.is_empty() {
        r.push(format!("{p}.image"), "required");
    } else {
        r.check(format!("{p}.image"), names::image_reference(&c.image));
    }
    if let Some(policy) = &c.image_pull_policy {
        pull_policy_rule(r, &format!("{p}.imagePullPolicy"), policy);
    }
    for (i, m) in c.volume_mounts.iter().enumerate() {
        if !m.mount_path.starts_with('/') {
            r.push(
                format!("{p}.volumeMounts[{i}].mountPath"),
                format!("{:?} must be an absolute path", m.mount_path),
            );
        }
    }
}

fn pull_policy_rule(r: &mut Report, p: &str, policy: &str) {
    if !matches!(policy, "Always" | "IfNotPresent" | "Never") {
        r.push(
            p,
            format!("{policy:?} is not one of Always, IfNotPresent, Never"),
        );
    }
}

fn volume_rules(r: &mut Report, p: &str, volumes: &[Volume]) {
    let mut seen = BTreeSet::new();
    for (i, v) in volumes.iter().enumerate() {
        r.check(format!("{p}[{i}].name"), names::dns_label(&v.name));
        if !seen.insert(v.name.as_str()) {
            r.push(
                format!("{p}[{i}].name"),
                format!("duplicate volume {:?}", v.name),
            );
        }
        if let Some(hp) = &v.host_path
            && !HOST_PATH_ROOTS
                .iter()
                .any(|root| names::path_within(&hp.path, root))
        {
            r.push(
                format!("{p}[{i}].hostPath.path"),
                format!(
                    "{:?} (cleaned: {:?}) is not allowed; hostPath volumes must be under {}",
                    hp.path,
                    names::clean_path(&hp.path),
                    HOST_PATH_ROOTS.join(", ")
                ),
            );
        }
    }
}

fn selector_rules(r: &mut Report, p: &str, selector: &BTreeMap<String, String>) {
    for (k, v) in selector {
        r.check(format!("{p}[{k}]"), names::qualified_name(k));
        r.check(format!("{p}[{k}]"), names::label_value(v));
    }
}

fn build_selector_rules(r: &mut Report, p: &str, b: &crate::module::Build) {
    selector_rules(r, &format!("{p}.selector"), &b.selector);
    if let Some(k) = &b.kaniko_params
        && let Some(tag) = &k.tag
        && (tag.is_empty() || tag.contains(['/', ':', '@']))
    {
        r.push(
            format!("{p}.kanikoParams.tag"),
            format!("{tag:?} is not an image tag"),
        );
    }
}

fn toleration_rules(r: &mut Report, p: &str, tolerations: &[Toleration]) {
    for (i, t) in tolerations.iter().enumerate() {
        let tp = format!("{p}[{i}]");
        let key = t.key.as_deref().unwrap_or("");
        let op = t.operator.as_deref().unwrap_or("");
        let value = t.value.as_deref().unwrap_or("");
        let effect = t.effect.as_deref().unwrap_or("");
        if !key.is_empty() {
            r.check(format!("{tp}.key"), names::qualified_name(key));
        } else if op != "Exists" {
            r.push(
                format!("{tp}.operator"),
                "must be Exists when key is empty (matching every taint)",
            );
        }
        if t.toleration_seconds.is_some() && effect != "NoExecute" {
            r.push(
                format!("{tp}.tolerationSeconds"),
                "may only be set with effect NoExecute",
            );
        }
        match op {
            "" | "Equal" => r.check(format!("{tp}.value"), names::label_value(value)),
            "Exists" => {
                if !value.is_empty() {
                    r.push(
                        format!("{tp}.value"),
                        "must be empty when operator is Exists",
                    );
                }
            }
            other => r.push(
                format!("{tp}.operator"),
                format!("{other:?} is not Equal or Exists"),
            ),
        }
        if !matches!(effect, "" | "NoSchedule" | "PreferNoSchedule" | "NoExecute") {
            r.push(
                format!("{tp}.effect"),
                format!("{effect:?} is not NoSchedule, PreferNoSchedule or NoExecute"),
            );
        }
    }
}
