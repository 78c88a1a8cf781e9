//! The module-loader container, emulated: what the loader script does on start
//! (in-tree removal, firmware copy, modprobe with soft dependencies) and on preStop
//! (unload, firmware removal), against a simulated node kernel that checks vermagic and,
//! with Secure Boot, the appended signature (verified by the real `openssl cms`).

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use k8s_openapi::api::core::v1::{Container, Pod};

use crate::kmod;

/// The loader container's name in module-loader pods.
pub const LOADER_CONTAINER: &str = "module-loader";
/// Default `KMM_DIR_NAME`.
pub const DEFAULT_DIR: &str = "/opt";
/// Default `KMM_FIRMWARE_HOST_PATH`.
pub const DEFAULT_FIRMWARE_HOST_PATH: &str = "/var/lib/firmware";

/// The simulated kernel state of one node.
#[derive(Clone, Debug, Default)]
pub struct NodeKernel {
    pub kernel: String,
    pub secure_boot: bool,
    /// DER certificates in the node's MOK database.
    pub enrolled_certs: Vec<Vec<u8>>,
    /// Loaded modules in load order, kernel-style names (`_`).
    pub loaded: Vec<String>,
    /// Files in the node's firmware directories.
    pub firmware: BTreeSet<String>,
    /// Modules in use (a process holds their device): they refuse to unload.
    pub in_use: BTreeSet<String>,
    /// Modules held by running pods (pod uid → module), as a device plugin's process holds
    /// its driver's device from its start until its containers stop.
    pub pod_holds: BTreeMap<String, String>,
    /// The node is rebooting: its kubelet is down, so pod statuses stay as last written
    /// (stale, as on a real node) until it is back and restarts the containers.
    pub kubelet_down: bool,
}

impl NodeKernel {
    fn is_in_use(&self, kname: &str) -> bool {
        self.in_use.contains(kname) || self.pod_holds.values().any(|m| m == kname)
    }

    fn is_loaded(&self, name: &str) -> bool {
        self.loaded.iter().any(|m| kmod::same_module(m, name))
    }
}

/// The loader's inputs, from the container's environment (lists newline-separated).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoaderEnv {
    pub module_name: String,
    pub dir_name: String,
    pub parameters: Vec<String>,
    pub args_load: Vec<String>,
    pub args_unload: Vec<String>,
    pub raw_load: Vec<String>,
    pub raw_unload: Vec<String>,
    pub loading_order: Vec<String>,
    pub in_tree_remove: Vec<String>,
    pub firmware_path: String,
    pub firmware_host_path: String,
}

/// Whether a pod is a module-loader pod per the loader contract.
pub fn is_loader_pod(pod: &Pod) -> bool {
    let role = pod
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(shared_api::labels::ROLE_LABEL));
    role.is_some_and(|r| r == shared_api::labels::ROLE_LOADER)
        && pod
            .spec
            .as_ref()
            .is_some_and(|s| s.containers.iter().any(|c| c.name == LOADER_CONTAINER))
}

impl LoaderEnv {
    pub fn from_container(c: &Container) -> LoaderEnv {
        let env: BTreeMap<&str, &str> = c
            .env
            .iter()
            .flatten()
            .map(|e| (e.name.as_str(), e.value.as_deref().unwrap_or("")))
            .collect();
        let get = |k: &str| env.get(k).copied().unwrap_or("").to_string();
        let list = |k: &str| -> Vec<String> {
            env.get(k)
                .copied()
                .unwrap_or("")
                .split('\n')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        };
        let or = |v: String, d: &str| if v.is_empty() { d.to_string() } else { v };
        LoaderEnv {
            module_name: get("KMM_MODULE_NAME"),
            dir_name: or(get("KMM_DIR_NAME"), DEFAULT_DIR),
            parameters: list("KMM_PARAMETERS"),
            args_load: list("KMM_ARGS_LOAD"),
            args_unload: list("KMM_ARGS_UNLOAD"),
            raw_load: list("KMM_RAW_LOAD"),
            raw_unload: list("KMM_RAW_UNLOAD"),
            loading_order: list("KMM_LOADING_ORDER"),
            in_tree_remove: list("KMM_IN_TREE_REMOVE"),
            firmware_path: get("KMM_FIRMWARE_PATH"),
            firmware_host_path: or(get("KMM_FIRMWARE_HOST_PATH"), DEFAULT_FIRMWARE_HOST_PATH),
        }
    }
}

/// What a successful start did, for the preStop to undo.
#[derive(Clone, Debug, Default)]
pub struct Loaded {
    pub firmware_copied: Vec<String>,
}

/// The loader's start: returns the log and, on failure, modprobe's error message.
pub fn start(
    env: &LoaderEnv,
    image: &BTreeMap<String, Vec<u8>>,
    node: &mut NodeKernel,
) -> (Vec<String>, Result<Loaded, String>) {
    let mut log = Vec::new();
    for m in &env.in_tree_remove {
        if node.is_loaded(m) {
            node.loaded.retain(|l| !kmod::same_module(l, m));
            log.push(format!("modprobe -r {m}: removed in-tree module"));
        } else {
            log.push(format!("in-tree module {m} not loaded: nothing to remove"));
        }
    }
    let mut loaded = Loaded::default();
    if !env.firmware_path.is_empty() {
        let prefix = format!("{}/", env.firmware_path.trim_end_matches('/'));
        for path in image.keys().filter(|p| p.starts_with(&prefix)) {
            let host = format!(
                "{}/{}",
                env.firmware_host_path.trim_end_matches('/'),
                &path[prefix.len()..]
            );
            node.firmware.insert(host.clone());
            log.push(format!("cp {path} {host}"));
            loaded.firmware_copied.push(host);
        }
    }
    let result = if !env.raw_load.is_empty() {
        modprobe(&env.raw_load, image, node, &mut log)
    } else {
        let order: Vec<String> = if env.loading_order.is_empty() {
            vec![env.module_name.clone()]
        } else {
            env.loading_order.iter().rev().cloned().collect()
        };
        let mut r = Ok(());
        for (i, m) in order.iter().enumerate() {
            let mut argv = vec!["-d".to_string(), env.dir_name.clone()];
            argv.extend(env.args_load.iter().cloned());
            argv.push(m.clone());
            if i + 1 == order.len() {
                argv.extend(env.parameters.iter().cloned());
            }
            r = modprobe(&argv, image, node, &mut log);
            if r.is_err() {
                break;
            }
        }
        r
    };
    match result {
        Ok(()) => {
            log.push("touch /tmp/kmm-loaded; sleep infinity".to_string());
            (log, Ok(loaded))
        }
        Err(e) => (log, Err(e)),
    }
}

/// The module the loader script checks when stopped (`KMM_MODULE_NAME`), when the kernel
/// still has it.
pub fn still_loaded(env: &LoaderEnv, node: &NodeKernel) -> Option<String> {
    (!env.module_name.is_empty() && node.is_loaded(&env.module_name))
        .then(|| env.module_name.replace('-', "_"))
}

/// The loader's preStop: unload in stop order and remove the firmware the start copied.
pub fn stop(
    env: &LoaderEnv,
    image: &BTreeMap<String, Vec<u8>>,
    copied: &[String],
    node: &mut NodeKernel,
) -> Vec<String> {
    let mut log = Vec::new();
    let argv: Vec<String> = if !env.raw_unload.is_empty() {
        env.raw_unload.clone()
    } else {
        let mut a = vec!["-r".to_string(), "-d".to_string(), env.dir_name.clone()];
        a.extend(env.args_unload.iter().cloned());
        if env.loading_order.is_empty() {
            a.push(env.module_name.clone());
        } else {
            a.extend(env.loading_order.iter().cloned());
        }
        a
    };
    if let Err(e) = modprobe(&argv, image, node, &mut log) {
        log.push(e);
    }
    for f in copied {
        node.firmware.remove(f);
        log.push(format!("rm {f}"));
    }
    log
}

/// `modprobe ARGS` against the simulated kernel, with the image's files as the container's.
pub fn modprobe(
    argv: &[String],
    image: &BTreeMap<String, Vec<u8>>,
    node: &mut NodeKernel,
    log: &mut Vec<String>,
) -> Result<(), String> {
    let mut remove = false;
    let mut all = false;
    let mut dir = String::new();
    let mut names = Vec::new();
    let mut it = argv.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-r" | "--remove" | "-rv" | "-vr" => remove = true,
            "-a" | "--all" => all = true,
            "-d" | "--dirname" => dir = it.next().cloned().unwrap_or_default(),
            "-C" | "--config" | "-S" | "--set-version" | "-o" => {
                it.next();
            }
            a if a.starts_with("--dirname=") => dir = a["--dirname=".len()..].to_string(),
            a if a.starts_with("-d") && a.len() > 2 => dir = a[2..].to_string(),
            a if a.starts_with("-r") && a.len() > 2 && !a.contains('=') => {
                remove = true;
                if a.contains('d') {
                    dir = it.next().cloned().unwrap_or_default();
                }
            }
            a if a.starts_with('-') => {}
            a => names.push(a.to_string()),
        }
    }
    let dir = dir.trim_end_matches('/').to_string();
    if names.is_empty() {
        return Err("modprobe: ERROR: missing parameters. See -h.".to_string());
    }
    if remove {
        for name in &names {
            let kname = name.replace('-', "_");
            if node.is_loaded(name) && node.is_in_use(&kname) {
                return Err(format!("modprobe: FATAL: Module {kname} is in use."));
            }
            if node.is_loaded(name) {
                node.loaded.retain(|l| !kmod::same_module(l, name));
                log.push(format!("modprobe -r: rmmod {kname}"));
            } else {
                log.push(format!("modprobe -r: {kname} is not loaded"));
            }
        }
        return Ok(());
    }
    let (modules, params): (Vec<String>, Vec<String>) = if all {
        (names, Vec::new())
    } else {
        (vec![names[0].clone()], names[1..].to_vec())
    };
    for name in modules {
        insert(&name, &dir, &params, image, node, log)?;
    }
    Ok(())
}

fn insert(
    name: &str,
    dir: &str,
    params: &[String],
    image: &BTreeMap<String, Vec<u8>>,
    node: &mut NodeKernel,
    log: &mut Vec<String>,
) -> Result<(), String> {
    let kname = name.replace('-', "_");
    if node.is_loaded(name) {
        log.push(format!("modprobe {kname}: already loaded"));
        return Ok(());
    }
    let moddir = format!("{dir}/lib/modules/{}", node.kernel);
    let prefix = format!("{moddir}/");
    let file = image.iter().find(|(p, _)| {
        p.starts_with(&prefix)
            && p.rsplit('/')
                .next()
                .and_then(|f| f.strip_suffix(".ko"))
                .is_some_and(|stem| kmod::same_module(stem, name))
    });
    let Some((path, data)) = file else {
        return Err(format!(
            "modprobe: FATAL: Module {kname} not found in directory {moddir}"
        ));
    };
    let exec_format = || format!("modprobe: ERROR: could not insert '{kname}': Exec format error");
    match kmod::vermagic_kernel(data) {
        Ok(Some(k)) if k == node.kernel => {}
        Ok(Some(k)) => {
            log.push(format!("{kname}: disagrees about version of symbol module_layout (vermagic {k}, kernel {})", node.kernel));
            return Err(exec_format());
        }
        _ => return Err(exec_format()),
    }
    if node.secure_boot {
        match kmod::split_signature(data) {
            None => {
                // As Linux 6.1 with enforced signatures: "Loading of unsigned module is
                // rejected", EKEYREJECTED (older kernels said ENOKEY, "Required key not
                // available").
                log.push(format!("{kname}: Loading of unsigned module is rejected"));
                return Err(format!(
                    "modprobe: ERROR: could not insert '{kname}': Key was rejected by service"
                ));
            }
            Some((content, sig)) => {
                if let Err(why) = verify_signature(content, &sig.signature, &node.enrolled_certs) {
                    log.push(format!("{kname}: signature not accepted: {why}"));
                    return Err(format!(
                        "modprobe: ERROR: could not insert '{kname}': Key was rejected by service"
                    ));
                }
            }
        }
    }
    node.loaded.push(kname.clone());
    let shown = if params.is_empty() {
        String::new()
    } else {
        format!(" {}", params.join(" "))
    };
    log.push(format!("insmod {path}{shown}"));
    Ok(())
}

/// Verify a CMS signature over `content` with exactly the enrolled certificates, using
/// `openssl cms -verify` (no chain check: the MOK database is the trust anchor).
pub fn verify_signature(
    content: &[u8],
    signature: &[u8],
    certs_der: &[Vec<u8>],
) -> Result<(), String> {
    if certs_der.is_empty() {
        return Err("no certificates enrolled".to_string());
    }
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let sig = dir.path().join("sig.der");
    let body = dir.path().join("module");
    let certs = dir.path().join("mok.pem");
    std::fs::write(&sig, signature).map_err(|e| e.to_string())?;
    std::fs::write(&body, content).map_err(|e| e.to_string())?;
    std::fs::write(
        &certs,
        certs_der.iter().map(|c| der_to_pem(c)).collect::<String>(),
    )
    .map_err(|e| e.to_string())?;
    let out = Command::new("openssl")
        .args(["cms", "-verify", "-binary", "-inform", "DER", "-in"])
        .arg(&sig)
        .arg("-content")
        .arg(&body)
        .arg("-certfile")
        .arg(&certs)
        .args([
            "-nointern",
            "-noverify",
            "-purpose",
            "any",
            "-out",
            "/dev/null",
        ])
        .output()
        .map_err(|e| format!("running openssl: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr)
            .lines()
            .next()
            .unwrap_or("verification failed")
            .to_string())
    }
}

/// PEM text of a DER certificate.
pub fn der_to_pem(der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(chunk));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn image(kernel: &str, mods: &[&str]) -> BTreeMap<String, Vec<u8>> {
        mods.iter()
            .map(|m| {
                (
                    format!("/opt/lib/modules/{kernel}/{}", kmod::module_file_name(m)),
                    kmod::fake_module(m, kernel),
                )
            })
            .collect()
    }

    fn env(module: &str) -> LoaderEnv {
        LoaderEnv {
            module_name: module.into(),
            dir_name: "/opt".into(),
            firmware_host_path: DEFAULT_FIRMWARE_HOST_PATH.into(),
            ..Default::default()
        }
    }

    #[test]
    fn softdeps_load_first_and_unload_in_order() {
        let img = image("k1", &["kmm_ci_a", "kmm_ci_b"]);
        let mut node = NodeKernel {
            kernel: "k1".into(),
            loaded: vec!["dummy".into()],
            ..Default::default()
        };
        let mut e = env("kmm-ci-a");
        e.loading_order = vec!["kmm-ci-a".into(), "kmm-ci-b".into()];
        e.in_tree_remove = vec!["dummy".into(), "joydev".into()];
        let (_, r) = start(&e, &img, &mut node);
        r.unwrap();
        assert_eq!(node.loaded, vec!["kmm_ci_b", "kmm_ci_a"]);
        stop(&e, &img, &[], &mut node);
        assert!(node.loaded.is_empty());
    }

    #[test]
    fn kernel_errors() {
        let img = image("k1", &["a"]);
        let mut node = NodeKernel {
            kernel: "k2".into(),
            ..Default::default()
        };
        let err = start(&env("a"), &img, &mut node).1.unwrap_err();
        assert_eq!(
            err,
            "modprobe: FATAL: Module a not found in directory /opt/lib/modules/k2"
        );
        let mut wrong = BTreeMap::new();
        wrong.insert(
            "/opt/lib/modules/k2/extra/a.ko".to_string(),
            kmod::fake_module("a", "k1"),
        );
        let err = start(&env("a"), &wrong, &mut node).1.unwrap_err();
        assert_eq!(
            err,
            "modprobe: ERROR: could not insert 'a': Exec format error"
        );
        let mut sb = NodeKernel {
            kernel: "k1".into(),
            secure_boot: true,
            ..Default::default()
        };
        let err = start(&env("a"), &img, &mut sb).1.unwrap_err();
        assert_eq!(
            err,
            "modprobe: ERROR: could not insert 'a': Key was rejected by service"
        );
    }

    #[test]
    fn firmware_and_raw_args() {
        let mut img = image("k1", &["a"]);
        img.insert("/firmware/x/fw.bin".into(), b"fw".to_vec());
        let mut node = NodeKernel {
            kernel: "k1".into(),
            ..Default::default()
        };
        let mut e = env("");
        e.raw_load = vec!["-d".into(), "/opt".into(), "a".into(), "p=1".into()];
        e.raw_unload = vec!["-rd".into(), "/opt".into(), "a".into()];
        e.firmware_path = "/firmware".into();
        let (_, r) = start(&e, &img, &mut node);
        let loaded = r.unwrap();
        assert_eq!(loaded.firmware_copied, vec!["/var/lib/firmware/x/fw.bin"]);
        assert_eq!(node.loaded, vec!["a"]);
        stop(&e, &img, &loaded.firmware_copied, &mut node);
        assert!(node.loaded.is_empty() && node.firmware.is_empty());
    }
}
