//! Day-1 loading and the firmware search path through OpenShift's Machine Config Operator:
//! the MachineConfig (Ignition 3 inside `spec.config`) and, when asked, its MachineConfigPool.
//! Pure: values in, objects out; `kmm-hub machineconfig` prints them.
//!
//! The Day-1 MachineConfig installs two scripts and two systemd units per module:
//! - `kmm-day1-load-<module>.service` runs before `network-pre.target` (so before
//!   NetworkManager configures anything): it takes the kmod image from the node's storage (or
//!   pulls it, if the network already allows) and replaces the in-tree module with the
//!   out-of-tree one ([`LOAD_SCRIPT`]);
//! - `kmm-day1-pull-<module>.service` runs after NetworkManager: it makes sure the image is on
//!   the node and, when it had to pull it, reboots the node once ([`PULL_SCRIPT`]).

use std::collections::BTreeMap;

use base64::Engine as _;
use serde_json::{Value, json};

/// The Ignition spec version written into `spec.config`; every MCO of OpenShift 4.x reads it.
pub const IGNITION_VERSION: &str = "3.2.0";
/// The label that ties a MachineConfig to the pools selecting it.
pub const ROLE_LABEL: &str = "machineconfiguration.openshift.io/role";
pub const MC_API_VERSION: &str = "machineconfiguration.openshift.io/v1";
/// Where the scripts go (`/usr` is read-only on RHCOS; `/usr/local` is writable).
pub const LOAD_SCRIPT_PATH: &str = "/usr/local/bin/kmm-day1-load";
pub const PULL_SCRIPT_PATH: &str = "/usr/local/bin/kmm-day1-pull";
/// The load step: `kmm-day1-load IMAGE MODULE [IN_TREE_MODULE]`.
pub const LOAD_SCRIPT: &str = include_str!("day1/load.sh");
/// The pull step: `kmm-day1-pull IMAGE MODULE`.
pub const PULL_SCRIPT: &str = include_str!("day1/pull.sh");
/// Where a MachineConfig with an image per kernel lists them (`<kernel> <image>` lines); the
/// scripts take `@<that file>` for IMAGE and use the running kernel's image.
pub const IMAGES_DIR: &str = "/etc/kmm-day1";
/// The kernel argument that sets the firmware search path.
pub const FIRMWARE_ARG: &str = "firmware_class.path";

/// Longest kernel module name (the kernel's `MODULE_NAME_LEN` less its terminating NUL).
const MODULE_NAME_MAX: usize = 55;

/// What a Day-1 MachineConfig loads, and for which pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Day1 {
    /// The MachineConfig's name.
    pub name: String,
    /// The MachineConfigPool whose nodes get it (the role label's value).
    pub pool: String,
    /// The kmod image(s) (modules under `/opt/lib/modules/<kernel>/`).
    pub images: Day1Images,
    /// The out-of-tree module to load.
    pub module: String,
    /// The in-tree module to unload first; `None`: the one named like `module`.
    pub in_tree_module: Option<String>,
}

/// Which kmod image a Day-1 node loads from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Day1Images {
    /// One image for every kernel of the pool (it holds `/opt/lib/modules/<kernel>/` for each
    /// kernel the pool's nodes may boot).
    One(String),
    /// An image per kernel (what the hub ships: each kernel's image pinned by digest). Written
    /// to `/etc/kmm-day1/<module>.images`; a node takes the line of the kernel it booted, and
    /// a kernel without a line loads nothing early (the Day-2 loader still does).
    PerKernel(BTreeMap<String, String>),
}

/// A MachineConfig that adds a directory to the kernel's firmware search path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirmwarePath {
    pub name: String,
    pub pool: String,
    /// An absolute directory, e.g. `/var/lib/firmware`.
    pub path: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MachineConfigError {
    #[error("{field} {value:?}: {reason}")]
    Invalid {
        field: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error(
        "the {0} MachineConfigPool exists on every OpenShift cluster; --with-pool is for a pool of your own"
    )]
    BuiltInPool(String),
}

impl kmm_runtime::ErrorCategory for MachineConfigError {
    fn category(&self) -> &'static str {
        match self {
            MachineConfigError::Invalid { .. } => "InvalidValue",
            MachineConfigError::BuiltInPool(_) => "BuiltInPool",
        }
    }
}

fn invalid(field: &'static str, value: &str, reason: &'static str) -> MachineConfigError {
    MachineConfigError::Invalid {
        field,
        value: value.to_string(),
        reason,
    }
}

/// RFC 1123 subdomain (object names), or label (`max` 63) when `dots` is false.
fn check_dns(
    field: &'static str,
    v: &str,
    max: usize,
    dots: bool,
) -> Result<(), MachineConfigError> {
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    if v.is_empty() || v.len() > max {
        return Err(invalid(field, v, "is empty or too long"));
    }
    let parts: Vec<&str> = if dots {
        v.split('.').collect()
    } else {
        vec![v]
    };
    for p in parts {
        let ok = p.chars().next().is_some_and(alnum)
            && p.chars().last().is_some_and(alnum)
            && p.chars().all(|c| alnum(c) || c == '-');
        if !ok {
            return Err(invalid(
                field,
                v,
                "must be lowercase letters, digits and '-', starting and ending alphanumeric",
            ));
        }
    }
    Ok(())
}

fn check_name(v: &str) -> Result<(), MachineConfigError> {
    check_dns("name", v, 253, true)
}

/// The pool name is also a label value and the name part of `node-role.kubernetes.io/<pool>`.
fn check_pool(v: &str) -> Result<(), MachineConfigError> {
    check_dns("pool", v, 63, false)
}

fn check_module(field: &'static str, v: &str) -> Result<(), MachineConfigError> {
    if v.is_empty() || v.len() > MODULE_NAME_MAX {
        return Err(invalid(
            field,
            v,
            "a kernel module name has 1 to 55 characters",
        ));
    }
    if !v
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(invalid(
            field,
            v,
            "a kernel module name is letters, digits, '_' and '-'",
        ));
    }
    Ok(())
}

/// The image lands unquoted in a unit's `ExecStart=`: no spaces, quotes, `%` or `$`.
fn check_image(v: &str) -> Result<(), MachineConfigError> {
    let ok = !v.is_empty()
        && v.len() <= 1024
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-/:@+".contains(c))
        && v.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "image",
            v,
            "an image reference is letters, digits and . _ - / : @ + (no spaces, quotes, % or $)",
        ))
    }
}

/// A kernel release lands in the images file, one per line before its image.
fn check_kernel(v: &str) -> Result<(), MachineConfigError> {
    let ok = !v.is_empty()
        && v.len() <= 255
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-+~".contains(c));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "kernel",
            v,
            "a kernel release is letters, digits and . _ - + ~",
        ))
    }
}

fn check_firmware_path(v: &str) -> Result<(), MachineConfigError> {
    let ok = v.starts_with('/')
        && v.len() <= 255
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-/+".contains(c));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "firmware path",
            v,
            "an absolute path of letters, digits and . _ - / + (one directory: the kernel takes one)",
        ))
    }
}

fn metadata(name: &str, pool: &str) -> Value {
    json!({"name": name, "labels": {ROLE_LABEL: pool}})
}

/// An Ignition file of mode 0755 with `text` as its contents (a base64 data URL).
fn executable_file(path: &str, text: &str) -> Value {
    ignition_file(path, 0o755, text)
}

/// An Ignition file of `mode` with `text` as its contents (a base64 data URL).
fn ignition_file(path: &str, mode: u32, text: &str) -> Value {
    let data = base64::engine::general_purpose::STANDARD.encode(text);
    json!({
        "path": path,
        "mode": mode,
        "overwrite": true,
        "contents": {"source": format!("data:text/plain;charset=utf-8;base64,{data}")},
    })
}

impl Day1 {
    fn in_tree(&self) -> &str {
        self.in_tree_module.as_deref().unwrap_or(&self.module)
    }

    /// The file listing the image of each kernel (with [`Day1Images::PerKernel`]).
    pub fn images_file(&self) -> String {
        format!("{IMAGES_DIR}/{}.images", self.module)
    }

    /// The IMAGE argument of both scripts: the image, or `@` and the file listing them.
    fn image_arg(&self) -> String {
        match &self.images {
            Day1Images::One(image) => image.clone(),
            Day1Images::PerKernel(_) => format!("@{}", self.images_file()),
        }
    }

    /// The kernel → image list as the scripts read it.
    fn images_text(&self) -> Option<String> {
        match &self.images {
            Day1Images::One(_) => None,
            Day1Images::PerKernel(m) => Some(m.iter().map(|(k, i)| format!("{k} {i}\n")).collect()),
        }
    }

    /// What the units' descriptions say the module is loaded from.
    fn source_text(&self) -> String {
        match &self.images {
            Day1Images::One(image) => image.clone(),
            Day1Images::PerKernel(_) => {
                format!("the running kernel's image in {}", self.images_file())
            }
        }
    }

    pub fn load_unit_name(&self) -> String {
        format!("kmm-day1-load-{}.service", self.module)
    }

    pub fn pull_unit_name(&self) -> String {
        format!("kmm-day1-pull-{}.service", self.module)
    }

    /// Before `network-pre.target` and without the default dependencies (which would order
    /// it after basic.target, too late); after the local file systems, where the images are.
    pub fn load_unit(&self) -> String {
        format!(
            "[Unit]\n\
             Description=kmm-fleet Day 1: replace in-tree {in_tree} with {module} from {from} before the network\n\
             DefaultDependencies=no\n\
             After=local-fs.target\n\
             Before=network-pre.target NetworkManager.service {pull}\n\
             Wants=network-pre.target\n\
             \n\
             [Service]\n\
             Type=oneshot\n\
             RemainAfterExit=yes\n\
             TimeoutStartSec=300\n\
             ExecStart={LOAD_SCRIPT_PATH} {image} {module} {in_tree}\n\
             \n\
             [Install]\n\
             WantedBy=multi-user.target\n",
            in_tree = self.in_tree(),
            module = self.module,
            from = self.source_text(),
            image = self.image_arg(),
            pull = self.pull_unit_name(),
        )
    }

    /// After NetworkManager and the network being online; with the cluster's proxy settings
    /// when the MCO wrote them.
    pub fn pull_unit(&self) -> String {
        format!(
            "[Unit]\n\
             Description=kmm-fleet Day 1: make sure {from} is on the node for {module} (reboots once after pulling it)\n\
             After=NetworkManager.service network-online.target {load}\n\
             Wants=network-online.target\n\
             \n\
             [Service]\n\
             Type=oneshot\n\
             RemainAfterExit=yes\n\
             EnvironmentFile=-/etc/mco/proxy.env\n\
             ExecStart={PULL_SCRIPT_PATH} {image} {module}\n\
             \n\
             [Install]\n\
             WantedBy=multi-user.target\n",
            module = self.module,
            from = self.source_text(),
            image = self.image_arg(),
            load = self.load_unit_name(),
        )
    }

    fn check(&self) -> Result<(), MachineConfigError> {
        check_name(&self.name)?;
        check_pool(&self.pool)?;
        match &self.images {
            Day1Images::One(image) => check_image(image)?,
            Day1Images::PerKernel(m) => {
                if m.is_empty() {
                    return Err(invalid("images", "", "at least one kernel and its image"));
                }
                for (kernel, image) in m {
                    check_kernel(kernel)?;
                    check_image(image)?;
                }
            }
        }
        check_module("module", &self.module)?;
        if let Some(m) = &self.in_tree_module {
            check_module("in-tree module", m)?;
        }
        Ok(())
    }
}

/// The Day-1 MachineConfig: both scripts and both units in its Ignition config.
pub fn day1_machine_config(d: &Day1) -> Result<Value, MachineConfigError> {
    d.check()?;
    let mut files = vec![
        executable_file(LOAD_SCRIPT_PATH, LOAD_SCRIPT),
        executable_file(PULL_SCRIPT_PATH, PULL_SCRIPT),
    ];
    if let Some(text) = d.images_text() {
        files.push(ignition_file(&d.images_file(), 0o644, &text));
    }
    Ok(json!({
        "apiVersion": MC_API_VERSION,
        "kind": "MachineConfig",
        "metadata": metadata(&d.name, &d.pool),
        "spec": {
            "config": {
                "ignition": {"version": IGNITION_VERSION},
                "storage": {"files": files},
                "systemd": {"units": [
                    {"name": d.load_unit_name(), "enabled": true, "contents": d.load_unit()},
                    {"name": d.pull_unit_name(), "enabled": true, "contents": d.pull_unit()},
                ]},
            },
        },
    }))
}

/// The MachineConfig that adds `path` to the firmware search path (`firmware_class.path=`).
pub fn firmware_machine_config(f: &FirmwarePath) -> Result<Value, MachineConfigError> {
    check_name(&f.name)?;
    check_pool(&f.pool)?;
    check_firmware_path(&f.path)?;
    Ok(json!({
        "apiVersion": MC_API_VERSION,
        "kind": "MachineConfig",
        "metadata": metadata(&f.name, &f.pool),
        "spec": {
            "config": {"ignition": {"version": IGNITION_VERSION}},
            "kernelArguments": [format!("{FIRMWARE_ARG}={}", f.path)],
        },
    }))
}

/// A custom pool as OpenShift documents it: the worker configs plus the pool's own, on the
/// nodes labelled `node-role.kubernetes.io/<pool>`, one node at a time.
pub fn machine_config_pool(pool: &str) -> Result<Value, MachineConfigError> {
    check_pool(pool)?;
    if pool == "worker" || pool == "master" {
        return Err(MachineConfigError::BuiltInPool(pool.to_string()));
    }
    Ok(json!({
        "apiVersion": MC_API_VERSION,
        "kind": "MachineConfigPool",
        "metadata": {"name": pool},
        "spec": {
            "machineConfigSelector": {"matchExpressions": [
                {"key": ROLE_LABEL, "operator": "In", "values": ["worker", pool]},
            ]},
            "nodeSelector": {"matchLabels": {format!("node-role.kubernetes.io/{pool}"): ""}},
            "paused": false,
            "maxUnavailable": 1,
        },
    }))
}

/// The objects as a multi-document YAML stream, each starting with `---`.
pub fn to_yaml(objects: &[Value]) -> Result<String, serde_yaml::Error> {
    let mut out = String::new();
    for o in objects {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(o)?);
    }
    Ok(out)
}

#[cfg(test)]
#[path = "machineconfig_tests.rs"]
mod tests;
