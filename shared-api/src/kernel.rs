//! Kernel mapping (first match wins) and variable substitution (SPEC §1.1, §4.7).

use std::collections::BTreeMap;

use regex::Regex;

use crate::labels::normalize_kernel;
use crate::module::{Build, BuildArg, ModuleLoaderContainerSpec, Sign, TlsOptions};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MappingError {
    #[error("kernelMappings[{index}].regexp {regexp:?} does not compile: {reason}")]
    BadRegexp {
        index: usize,
        regexp: String,
        reason: String,
    },
    #[error("{field}: {source}")]
    Substitution { field: String, source: SubstError },
    #[error("kernelMappings[{index}]: no containerImage on the mapping and none on the container")]
    NoImage { index: usize },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubstError {
    #[error("unknown variable ${{{0}}} (known: {known})", known = KNOWN_VARIABLES.join(", "))]
    Unknown(String),
    #[error("unterminated ${{…}} in {0:?}")]
    Unterminated(String),
    #[error(
        "kernel {kernel:?} has fewer than 3 parts separated by '.', ',' or '-', so ${{{var}}} is undefined"
    )]
    MalformedKernel { kernel: String, var: String },
}

pub const KNOWN_VARIABLES: [&str; 8] = [
    "KERNEL_FULL_VERSION",
    "KERNEL_VERSION",
    "KERNEL_XYZ",
    "KERNEL_X",
    "KERNEL_Y",
    "KERNEL_Z",
    "MOD_NAME",
    "MOD_NAMESPACE",
];

/// The values substituted into a Module's templated fields for one kernel.
/// `MOD_NAMESPACE` is the namespace the Module lives in; on the hub that is the
/// spoke namespace (DESIGN decision 5).
///
/// The kernel is kept raw (only a trailing `+` trimmed): it names the module directory
/// (`/lib/modules/<kernel>`), so build arguments and file paths need it as `uname -r` says
/// it. Image references cannot hold every character a kernel may have (`6.6.31+rpt-rpi-v8`),
/// so [`Variables::substitute_image`] uses the normalised form ([`normalize_kernel`]).
#[derive(Debug, Clone)]
pub struct Variables {
    kernel: String,
    xyz: Option<[String; 3]>,
    image_kernel: String,
    image_xyz: Option<[String; 3]>,
    mod_name: String,
    mod_namespace: String,
}

fn xyz_of(kernel: &str) -> Option<[String; 3]> {
    let parts: Vec<&str> = kernel.split(['.', ',', '-']).collect();
    (parts.len() >= 3).then(|| {
        [
            parts[0].to_string(),
            parts[1].to_string(),
            parts[2].to_string(),
        ]
    })
}

/// A kernel as matched, shipped and passed to builds: trimmed, trailing `+` removed.
pub fn raw_kernel(kernel: &str) -> &str {
    kernel.trim().trim_end_matches('+')
}

impl Variables {
    pub fn new(kernel: &str, mod_name: &str, mod_namespace: &str) -> Self {
        let raw = raw_kernel(kernel).to_string();
        let image_kernel = normalize_kernel(kernel);
        Self {
            xyz: xyz_of(&raw),
            image_xyz: xyz_of(&image_kernel),
            kernel: raw,
            image_kernel,
            mod_name: mod_name.to_string(),
            mod_namespace: mod_namespace.to_string(),
        }
    }

    /// The raw kernel (trailing `+` trimmed).
    pub fn kernel(&self) -> &str {
        &self.kernel
    }

    fn get(&self, var: &str, image: bool) -> Result<String, SubstError> {
        let (kernel, xyz) = if image {
            (&self.image_kernel, &self.image_xyz)
        } else {
            (&self.kernel, &self.xyz)
        };
        let part = |i: usize| {
            xyz.as_ref()
                .map(|p| p[i].clone())
                .ok_or_else(|| SubstError::MalformedKernel {
                    kernel: kernel.clone(),
                    var: var.to_string(),
                })
        };
        match var {
            "KERNEL_FULL_VERSION" | "KERNEL_VERSION" => Ok(kernel.clone()),
            "KERNEL_XYZ" => Ok(format!("{}.{}.{}", part(0)?, part(1)?, part(2)?)),
            "KERNEL_X" => part(0),
            "KERNEL_Y" => part(1),
            "KERNEL_Z" => part(2),
            "MOD_NAME" => Ok(self.mod_name.clone()),
            "MOD_NAMESPACE" => Ok(self.mod_namespace.clone()),
            other => Err(SubstError::Unknown(other.to_string())),
        }
    }

    /// Shell-style `$VAR` / `${VAR}` substitution with the raw kernel (paths, build
    /// inputs); `$$` is a literal `$`. Unknown variables are an error rather than silently
    /// empty.
    pub fn substitute(&self, input: &str) -> Result<String, SubstError> {
        substitute_with(input, |v| self.get(v, false))
    }

    /// [`Variables::substitute`] for image references: the kernel in its normalised form
    /// (characters outside `[A-Za-z0-9._-]` as `_`), valid in a tag.
    pub fn substitute_image(&self, input: &str) -> Result<String, SubstError> {
        substitute_with(input, |v| self.get(v, true))
    }
}

/// The variable names used in a template (for validation without a kernel).
pub fn variables_in(input: &str) -> Result<Vec<String>, SubstError> {
    let mut out = Vec::new();
    substitute_with(input, |v| {
        out.push(v.to_string());
        Ok(String::new())
    })?;
    Ok(out)
}

fn substitute_with(
    input: &str,
    mut lookup: impl FnMut(&str) -> Result<String, SubstError>,
) -> Result<String, SubstError> {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(braced) = after.strip_prefix('{') {
            let end = braced
                .find('}')
                .ok_or_else(|| SubstError::Unterminated(input.to_string()))?;
            out.push_str(&lookup(&braced[..end])?);
            rest = &braced[end + 1..];
        } else {
            let len = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            if len == 0 {
                out.push('$');
                rest = after;
            } else {
                out.push_str(&lookup(&after[..len])?);
                rest = &after[len..];
            }
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// What a Module's loader means for one kernel: the first matching mapping merged
/// with the container defaults, variables substituted.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedMapping {
    /// The raw kernel as matched (trailing `+` trimmed): what the hub ships as a literal
    /// mapping and passes to builds.
    pub kernel: String,
    /// Index of the mapping in `kernelMappings`.
    pub mapping_index: usize,
    pub container_image: String,
    pub registry_tls: TlsOptions,
    pub in_tree_modules_to_remove: Vec<String>,
    pub build: Option<Build>,
    pub sign: Option<Sign>,
}

/// Compiled kernel mappings of one Module loader, reusable across many kernels.
#[derive(Debug)]
pub struct KernelMapper<'a> {
    container: &'a ModuleLoaderContainerSpec,
    regexps: Vec<Option<Regex>>,
}

impl<'a> KernelMapper<'a> {
    pub fn new(container: &'a ModuleLoaderContainerSpec) -> Result<Self, MappingError> {
        let regexps = container
            .kernel_mappings
            .iter()
            .enumerate()
            .map(|(index, m)| match (&m.literal, &m.regexp) {
                (None, Some(re)) => Regex::new(re)
                    .map(Some)
                    .map_err(|e| MappingError::BadRegexp {
                        index,
                        regexp: re.clone(),
                        reason: regex_error_reason(&e),
                    }),
                _ => Ok(None),
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { container, regexps })
    }

    /// The index of the first mapping matching the kernel.
    pub fn find(&self, kernel: &str) -> Option<usize> {
        let kernel = raw_kernel(kernel);
        self.container
            .kernel_mappings
            .iter()
            .enumerate()
            .position(|(i, m)| match &m.literal {
                Some(lit) => lit == kernel,
                None => self.regexps[i]
                    .as_ref()
                    .is_some_and(|re| re.is_match(kernel)),
            })
    }

    /// Resolve the kernel: `Ok(None)` when no mapping matches.
    pub fn resolve(
        &self,
        kernel: &str,
        mod_name: &str,
        mod_namespace: &str,
    ) -> Result<Option<ResolvedMapping>, MappingError> {
        let Some(index) = self.find(kernel) else {
            return Ok(None);
        };
        let c = self.container;
        let m = &c.kernel_mappings[index];
        let vars = Variables::new(kernel, mod_name, mod_namespace);
        let field = |f: &str| format!("kernelMappings[{index}].{f}");
        let subst = |f: String, s: &str| {
            vars.substitute(s)
                .map_err(|source| MappingError::Substitution { field: f, source })
        };
        let subst_image = |f: String, s: &str| {
            vars.substitute_image(s)
                .map_err(|source| MappingError::Substitution { field: f, source })
        };

        let image_template = if m.container_image.is_empty() {
            c.container_image
                .as_deref()
                .filter(|s| !s.is_empty())
                .ok_or(MappingError::NoImage { index })?
        } else {
            m.container_image.as_str()
        };
        let container_image = subst_image(field("containerImage"), image_template)?;

        let build = merge_build(c.build.as_ref(), m.build.as_ref());
        let sign = match merge_sign(c.sign.as_ref(), m.sign.as_ref()) {
            None => None,
            Some(mut s) => {
                if let Some(u) = &s.unsigned_image {
                    s.unsigned_image = Some(subst_image(field("sign.unsignedImage"), u)?);
                }
                s.files_to_sign = s
                    .files_to_sign
                    .iter()
                    .enumerate()
                    .map(|(i, f)| subst(field(&format!("sign.filesToSign[{i}]")), f))
                    .collect::<Result<_, _>>()?;
                Some(s)
            }
        };

        Ok(Some(ResolvedMapping {
            kernel: vars.kernel().to_string(),
            mapping_index: index,
            container_image,
            registry_tls: m.registry_tls.or(c.registry_tls).unwrap_or_default(),
            in_tree_modules_to_remove: m.in_tree_removals().unwrap_or_else(|| c.in_tree_removals()),
            build,
            sign,
        }))
    }
}

/// The useful line of a regex error (the crate prints the pattern and a caret above it).
pub(crate) fn regex_error_reason(e: &regex::Error) -> String {
    let text = e.to_string();
    text.lines()
        .rfind(|l| !l.trim().is_empty())
        .unwrap_or(&text)
        .trim()
        .to_string()
}

/// Container build, overridden by the mapping's: `dockerfileConfigMap` replaced,
/// `buildArgs` overridden by name or appended, `secrets` appended, other set fields replaced.
pub fn merge_build(container: Option<&Build>, mapping: Option<&Build>) -> Option<Build> {
    match (container, mapping) {
        (None, None) => None,
        (Some(c), None) => Some(c.clone()),
        (None, Some(m)) => Some(m.clone()),
        (Some(c), Some(m)) => {
            let mut b = c.clone();
            if m.dockerfile_config_map.is_some() {
                b.dockerfile_config_map = m.dockerfile_config_map.clone();
            }
            b.build_args = merge_build_args(&c.build_args, &m.build_args);
            b.secrets.extend(m.secrets.iter().cloned());
            if m.base_image_registry_tls.is_some() {
                b.base_image_registry_tls = m.base_image_registry_tls;
            }
            if m.kaniko_params.is_some() {
                b.kaniko_params = m.kaniko_params.clone();
            }
            if !m.selector.is_empty() {
                b.selector = m.selector.clone();
            }
            Some(b)
        }
    }
}

/// Later arguments override earlier ones of the same name; order of first appearance is kept.
pub fn merge_build_args(base: &[BuildArg], overrides: &[BuildArg]) -> Vec<BuildArg> {
    let mut out: Vec<BuildArg> = base.to_vec();
    for o in overrides {
        match out.iter_mut().find(|a| a.name == o.name) {
            Some(a) => a.value = o.value.clone(),
            None => out.push(o.clone()),
        }
    }
    out
}

/// Container sign, overridden by the mapping's: `unsignedImage`, `keySecret`, `certSecret`
/// replaced when set, `filesToSign` appended.
pub fn merge_sign(container: Option<&Sign>, mapping: Option<&Sign>) -> Option<Sign> {
    match (container, mapping) {
        (None, None) => None,
        (Some(c), None) => Some(c.clone()),
        (None, Some(m)) => Some(m.clone()),
        (Some(c), Some(m)) => {
            let mut s = c.clone();
            if m.unsigned_image.is_some() {
                s.unsigned_image = m.unsigned_image.clone();
            }
            if m.unsigned_image_registry_tls.is_some() {
                s.unsigned_image_registry_tls = m.unsigned_image_registry_tls;
            }
            if m.key_secret.is_some() {
                s.key_secret = m.key_secret.clone();
            }
            if m.cert_secret.is_some() {
                s.cert_secret = m.cert_secret.clone();
            }
            s.files_to_sign.extend(m.files_to_sign.iter().cloned());
            Some(s)
        }
    }
}

/// The kaniko build arguments for one kernel: the merged user arguments, then
/// `KERNEL_VERSION`, `KERNEL_FULL_VERSION`, `MOD_NAME`, `MOD_NAMESPACE` (always set by us).
pub fn build_args_for(build: &Build, vars: &Variables) -> BTreeMap<String, String> {
    let mut args: BTreeMap<String, String> = build
        .build_args
        .iter()
        .map(|a| (a.name.clone(), a.value.clone()))
        .collect();
    args.insert("KERNEL_VERSION".into(), vars.kernel.clone());
    args.insert("KERNEL_FULL_VERSION".into(), vars.kernel.clone());
    args.insert("MOD_NAME".into(), vars.mod_name.clone());
    args.insert("MOD_NAMESPACE".into(), vars.mod_namespace.clone());
    args
}

#[cfg(test)]
#[path = "kernel_tests.rs"]
mod tests;
