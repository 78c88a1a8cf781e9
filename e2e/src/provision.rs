//! Makes sure the real parts of the test world are on this machine: Debian packages, and the
//! Go programs built from their published modules (Kubernetes, etcd, Open Cluster Management,
//! the policy framework) by the wrapper modules in `e2e/provision/`, and the MachineConfig and
//! MachineConfigPool CRDs from OpenShift's published API module.
//!
//! The fast path only looks (binaries present, `dpkg-query` says the packages are
//! installed). Otherwise the embedded `provision/provision.sh` runs, under an exclusive
//! lock, so that concurrent test processes provision once.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{Context as _, bail};

/// The provisioning script, embedded so that the compiled binary works from anywhere.
pub const SCRIPT: &str = include_str!("../provision/provision.sh");

/// The wrapper Go modules the script builds from, embedded beside it.
const GO_MODULES: &[(&str, &str)] = &[
    ("kube/go.mod", include_str!("../provision/kube/go.mod")),
    ("kube/go.sum", include_str!("../provision/kube/go.sum")),
    ("kube/tools.go", include_str!("../provision/kube/tools.go")),
    ("etcd/go.mod", include_str!("../provision/etcd/go.mod")),
    ("etcd/go.sum", include_str!("../provision/etcd/go.sum")),
    ("etcd/tools.go", include_str!("../provision/etcd/tools.go")),
    ("ocm/go.mod", include_str!("../provision/ocm/go.mod")),
    ("ocm/go.sum", include_str!("../provision/ocm/go.sum")),
    ("ocm/tools.go", include_str!("../provision/ocm/tools.go")),
    (
        "ocm/cmd/work-webhook/main.go",
        include_str!("../provision/ocm/cmd/work-webhook/main.go"),
    ),
    (
        "governance/go.mod",
        include_str!("../provision/governance/go.mod"),
    ),
    (
        "governance/go.sum",
        include_str!("../provision/governance/go.sum"),
    ),
    (
        "governance/tools.go",
        include_str!("../provision/governance/tools.go"),
    ),
    (
        "openshift-api/go.mod",
        include_str!("../provision/openshift-api/go.mod"),
    ),
    (
        "openshift-api/go.sum",
        include_str!("../provision/openshift-api/go.sum"),
    ),
    (
        "openshift-api/tools.go",
        include_str!("../provision/openshift-api/tools.go"),
    ),
];

/// A `NAME="value"` line of the script.
fn script_var(name: &str) -> String {
    SCRIPT
        .lines()
        .find_map(|l| {
            let v = l.strip_prefix(name)?.strip_prefix("=\"")?;
            Some(v.split('"').next()?.to_string())
        })
        .unwrap_or_default()
}

/// The Kubernetes release of the test world's control planes.
pub fn k8s_version() -> String {
    script_var("K8S_VERSION")
}

/// The etcd release.
pub fn etcd_version() -> String {
    script_var("ETCD_VERSION")
}

/// The Open Cluster Management release (registration, work, placement).
pub fn ocm_version() -> String {
    script_var("OCM_VERSION")
}

/// The policy framework release (propagator, configuration policy controller).
pub fn governance_version() -> String {
    script_var("GOVERNANCE_VERSION")
}

/// The pseudo-version of `github.com/openshift/api` whose MachineConfig CRDs the world uses.
pub fn openshift_api_version() -> String {
    script_var("OPENSHIFT_API_VERSION")
}

/// The controller-tools release whose controller-gen generates the ImageStream CRD.
pub fn controller_tools_version() -> String {
    script_var("CONTROLLER_TOOLS_VERSION")
}

/// Where the script puts one set of programs: `<cache>/bin/<set>-<version>-<build id>`.
pub fn bin_dir(set: &str, version: &str) -> PathBuf {
    cache_dir()
        .join("bin")
        .join(format!("{set}-{version}-{}", script_var("BUILD_ID")))
}

/// Where the test world's programs are.
#[derive(Clone, Debug)]
pub struct Binaries {
    pub kube_apiserver: PathBuf,
    pub kube_controller_manager: PathBuf,
    pub kube_scheduler: PathBuf,
    /// kubectl of the same release (the sandbox puts its directory first on `PATH`).
    pub kubectl: PathBuf,
    pub etcd: PathBuf,
    /// `registration controller|agent|webhook-server` of OCM.
    pub ocm_registration: PathBuf,
    /// `work manager|agent|webhook-server` of OCM.
    pub ocm_work: PathBuf,
    /// OCM's ManifestWork admission webhook on loopback addresses (`ocm/cmd/work-webhook`).
    pub ocm_work_webhook: PathBuf,
    /// `placement controller` of OCM.
    pub ocm_placement: PathBuf,
    /// `registration-operator agent`: OCM's singleton klusterlet agent (registration + work).
    pub ocm_klusterlet: PathBuf,
    pub policy_propagator: PathBuf,
    pub config_policy_controller: PathBuf,
    /// The released CRDs: `hub/` (OCM hub and policy) and `spoke/` (klusterlet and
    /// configuration policy), copied from the modules.
    pub ocm_crds: PathBuf,
    /// The MachineConfig and MachineConfigPool CRDs of OpenShift's API module (not installed
    /// on any cluster by default; `e2e/tests/machineconfig.rs` installs them).
    pub machineconfig_crds: PathBuf,
    /// The ImageStream CRD (`image.openshift.io`), generated by controller-gen from OpenShift's
    /// API module (OpenShift serves ImageStreams itself and ships no CRD): installed on spokes
    /// that play OpenShift for the Driver Toolkit (see `crate::openshift`).
    pub imagestream_crd: PathBuf,
    pub docker_registry: PathBuf,
    pub htpasswd: PathBuf,
    pub openssl: PathBuf,
    /// Debian's kernel for the real-kernel nodes, unpacked (`boot/`, `lib/modules/`, the
    /// signed shim and GRUB under `usr/lib/`).
    pub kernel: crate::vm::KernelDist,
    pub qemu: PathBuf,
    /// `virt-fw-vars` (PyPI virt-firmware): enrolls certificates in OVMF variable stores.
    pub virt_fw_vars: PathBuf,
}

impl Binaries {
    /// OCM's released RBAC files the test world uses (the bootstrap ClusterRole).
    pub fn ocm_rbac(&self) -> PathBuf {
        self.ocm_crds.with_file_name("rbac")
    }

    /// `(component, version)` of every program of the test world built from Go modules.
    pub fn versions() -> Vec<(&'static str, String)> {
        vec![
            ("kube-apiserver", k8s_version()),
            ("kube-controller-manager", k8s_version()),
            ("kube-scheduler", k8s_version()),
            ("kubectl", k8s_version()),
            ("etcd", etcd_version()),
            (
                "ocm registration, work, placement, klusterlet agent",
                ocm_version(),
            ),
            ("governance-policy-propagator", governance_version()),
            ("config-policy-controller", governance_version()),
        ]
    }
}

/// `$KMM_FLEET_CACHE`, else `~/.cache/kmm-fleet` (the script uses the same rule).
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("KMM_FLEET_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".cache/kmm-fleet")
}

/// The Debian packages the script installs (parsed from its `PACKAGES=(…)` line, plus
/// `$KMM_FLEET_EXTRA_PACKAGES`), so the fast path checks exactly what the script installs.
pub fn packages() -> Vec<String> {
    let mut out: Vec<String> = SCRIPT
        .lines()
        .skip_while(|l| !l.starts_with("PACKAGES=("))
        .scan(false, |done, line| {
            if *done {
                return None;
            }
            *done = line.contains(')');
            Some(line.to_string())
        })
        .flat_map(|l| {
            l.replace("PACKAGES=(", " ")
                .replace(')', " ")
                .split_whitespace()
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect();
    if let Ok(extra) = std::env::var("KMM_FLEET_EXTRA_PACKAGES") {
        out.extend(extra.split_whitespace().map(str::to_string));
    }
    out
}

/// Paths the test world uses; `None` when something is missing.
fn locate() -> Option<Binaries> {
    let kube = bin_dir("kube", &k8s_version());
    let ocm = bin_dir("ocm", &ocm_version());
    let gov = bin_dir("governance", &governance_version());
    let b = Binaries {
        kube_apiserver: kube.join("kube-apiserver"),
        kube_controller_manager: kube.join("kube-controller-manager"),
        kube_scheduler: kube.join("kube-scheduler"),
        kubectl: kube.join("kubectl"),
        etcd: bin_dir("etcd", &etcd_version()).join("etcd"),
        ocm_registration: ocm.join("registration"),
        ocm_work: ocm.join("work"),
        ocm_placement: ocm.join("placement"),
        ocm_work_webhook: ocm.join("work-webhook"),
        ocm_klusterlet: ocm.join("registration-operator"),
        policy_propagator: gov.join("governance-policy-propagator"),
        config_policy_controller: gov.join("config-policy-controller"),
        ocm_crds: ocm.join("crds"),
        machineconfig_crds: cache_dir()
            .join("crds")
            .join(format!("openshift-api-{}", openshift_api_version())),
        imagestream_crd: cache_dir()
            .join("crds")
            .join(format!(
                "openshift-api-{}-image-{}",
                openshift_api_version(),
                controller_tools_version()
            ))
            .join("image.openshift.io_imagestreams.yaml"),
        docker_registry: which("docker-registry")?,
        htpasswd: which("htpasswd")?,
        openssl: which("openssl")?,
        kernel: crate::vm::KernelDist::locate(&cache_dir())?,
        qemu: which("qemu-system-x86_64")?,
        virt_fw_vars: cache_dir()
            .join("venv")
            .join(format!(
                "virt-firmware-{}",
                script_var("VIRT_FIRMWARE_VERSION")
            ))
            .join("bin/virt-fw-vars"),
    };
    let programs = [
        &b.kube_apiserver,
        &b.kube_controller_manager,
        &b.kube_scheduler,
        &b.kubectl,
        &b.etcd,
        &b.ocm_registration,
        &b.ocm_work,
        &b.ocm_placement,
        &b.ocm_work_webhook,
        &b.ocm_klusterlet,
        &b.policy_propagator,
        &b.config_policy_controller,
        &b.virt_fw_vars,
    ];
    (programs.iter().all(|p| is_executable(p))
        && b.ocm_crds.join(".complete-2").is_file()
        && b.machineconfig_crds.join(".complete-1").is_file()
        && b.imagestream_crd.with_file_name(".complete-1").is_file())
    .then_some(b)
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Packages that `dpkg-query` does not report as installed.
fn missing_packages() -> anyhow::Result<Vec<String>> {
    let pkgs = packages();
    let out = Command::new("dpkg-query")
        .arg("-W")
        .arg("-f=${Package} ${db:Status-Status}\n")
        .args(&pkgs)
        .stderr(Stdio::null())
        .output()
        .context("running dpkg-query (is this a Debian system?)")?;
    let installed: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(_, status)| *status == "installed")
        .map(|(name, _)| name.split(':').next().unwrap_or(name).to_string())
        .collect();
    Ok(pkgs
        .into_iter()
        .filter(|p| !installed.contains(p))
        .collect())
}

/// Whether provisioning is complete, without changing anything.
pub fn check() -> anyhow::Result<Binaries> {
    let missing = missing_packages()?;
    if !missing.is_empty() {
        bail!("Debian packages not installed: {}", missing.join(" "));
    }
    locate().with_context(|| {
        format!(
            "a program of the test world (Kubernetes {}, etcd {}, OCM {}, policy framework {}) is not in {} \
             or a Debian tool is missing from PATH",
            k8s_version(),
            etcd_version(),
            ocm_version(),
            governance_version(),
            cache_dir().join("bin").display()
        )
    })
}

/// Returns the binaries, provisioning first when needed (see the module doc). Blocking: it
/// may run for minutes on a cold machine. Within one process the result is remembered.
pub fn ensure_provisioned() -> anyhow::Result<Binaries> {
    static DONE: Mutex<Option<Binaries>> = Mutex::new(None);
    let mut done = DONE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(b) = done.as_ref() {
        return Ok(b.clone());
    }
    let b = match check() {
        Ok(b) => b,
        Err(why) => {
            eprintln!("kmm-fleet: provisioning the test world ({why:#})");
            provision_locked()?
        }
    };
    *done = Some(b.clone());
    Ok(b)
}

/// Runs the script under an exclusive flock; re-checks after getting the lock because
/// another process may have provisioned meanwhile.
fn provision_locked() -> anyhow::Result<Binaries> {
    let cache = cache_dir();
    std::fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    let lock_path = cache.join("provision.lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("opening {}", lock_path.display()))?;
    let started = Instant::now();
    lock.lock()
        .with_context(|| format!("locking {}", lock_path.display()))?;
    if started.elapsed().as_secs() >= 1 {
        eprintln!(
            "kmm-fleet: waited {:.1?} for another process's provisioning",
            started.elapsed()
        );
    }
    if let Ok(b) = check() {
        return Ok(b);
    }
    run_script(&cache)?;
    check().context(
        "provisioning ran but the test world is still incomplete; run `bash e2e/provision/provision.sh` by hand",
    )
}

fn run_script(cache: &Path) -> anyhow::Result<()> {
    // The script builds from the wrapper modules beside it: lay both out in a temp directory.
    let dir = tempfile::Builder::new()
        .prefix("kmm-fleet-provision-")
        .tempdir()
        .context("creating a temp directory for the provision script")?;
    let script = dir.path().join("provision.sh");
    std::fs::write(&script, SCRIPT).context("writing the provision script")?;
    for (path, content) in GO_MODULES {
        let dest = dir.path().join(path);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&dest, content).with_context(|| format!("writing {}", dest.display()))?;
    }
    let started = Instant::now();
    eprintln!("kmm-fleet: running provision script (output follows)");
    // The script's output goes to our stderr as it happens (a cold build takes minutes).
    let status = Command::new("bash")
        .arg(&script)
        .env("KMM_FLEET_CACHE", cache)
        // This process holds the lock the script would take (provision_locked).
        .env("KMM_FLEET_PROVISION_LOCK_HELD", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::from(std::io::stderr()))
        .stderr(Stdio::from(std::io::stderr()))
        .status()
        .context("starting bash for the provision script")?;
    if !status.success() {
        bail!(
            "provisioning the test world failed ({status}) after {:.0?}; the lines above starting with \
             `provision: FAILED` say which step. Fix it and run by hand: \
             `bash e2e/provision/provision.sh` (or `cargo run -p kmm-e2e --bin kmm-fleet -- provision`)",
            started.elapsed()
        );
    }
    eprintln!("kmm-fleet: provisioned in {:.1?}", started.elapsed());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packages_are_parsed_from_the_script() {
        let p = packages();
        for want in ["docker-registry", "apache2-utils", "openssl", "kmod"] {
            assert!(p.iter().any(|x| x == want), "{want} missing from {p:?}");
        }
        assert!(!p.iter().any(|x| x.contains('(') || x.contains(')')));
    }

    #[test]
    fn versions_come_from_the_script() {
        assert!(k8s_version().starts_with("v1.3"), "{}", k8s_version());
        assert!(etcd_version().starts_with("v3."), "{}", etcd_version());
        assert!(ocm_version().starts_with('v'), "{}", ocm_version());
        assert!(governance_version().starts_with('v'));
        let dir = bin_dir("kube", &k8s_version());
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        assert!(
            name.starts_with("kube-v1.3") && !name.ends_with('-'),
            "{name}"
        );
    }

    #[test]
    fn embedded_modules_pin_what_the_script_builds() {
        let find = |p: &str| {
            GO_MODULES
                .iter()
                .find(|(n, _)| *n == p)
                .map(|(_, c)| *c)
                .unwrap()
        };
        assert!(find("kube/go.mod").contains(&format!("k8s.io/kubernetes {}", k8s_version())));
        assert!(find("etcd/go.mod").contains(&format!("server/v3 {}", etcd_version())));
        assert!(find("ocm/go.mod").contains(&format!("ocm {}", ocm_version())));
        assert!(
            find("governance/go.mod").contains(&format!("propagator {}", governance_version()))
        );
        let openshift = format!("github.com/openshift/api {}", openshift_api_version());
        assert!(openshift_api_version().starts_with("v0.0.0-"));
        assert!(find("openshift-api/go.mod").contains(&openshift));
        assert!(find("openshift-api/go.sum").contains(&openshift));
        let tools = format!(
            "sigs.k8s.io/controller-tools {}",
            controller_tools_version()
        );
        assert!(controller_tools_version().starts_with("v0."));
        assert!(find("openshift-api/go.mod").contains(&tools));
        assert!(find("openshift-api/go.sum").contains(&tools));
        // Every staging module is mapped to the release's v0.X.Y, none left at v0.0.0.
        let staging = format!("v0.{}", k8s_version().trim_start_matches("v1."));
        let kube = find("kube/go.mod");
        assert!(
            kube.contains(&format!("k8s.io/api => k8s.io/api {staging}")),
            "{kube}"
        );
        for (_, content) in GO_MODULES.iter().filter(|(n, _)| n.ends_with("go.sum")) {
            assert!(!content.is_empty());
        }
    }
}
