//! Rules for kernel mappings, modprobe, in-tree removal and signing.

use super::*;

#[allow(clippy::too_many_arguments)]
pub(super) fn mapping_rules(
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

pub(super) fn modprobe_rules(r: &mut Report, p: &str, c: &ModuleLoaderContainerSpec) {
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

pub(super) fn in_tree_names(
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

pub(super) fn sign_rules(r: &mut Report, p: &str, s: &Sign, dir: &str) {
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
pub(super) fn image_template_rule(
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
