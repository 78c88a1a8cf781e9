//! Makes sure the real parts of the test world are on this machine: Debian packages and
//! kube-apiserver/kube-controller-manager v1.20.2 built from Debian's source package.
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
/// The Kubernetes version the script builds.
pub const K8S_VERSION: &str = "v1.20.2";

/// The script's `K8S_BUILD_ID` (version plus our patch level): the cache directory of the
/// binaries is `k8s-<build id>`, so a new patch level rebuilds everywhere.
pub fn build_id() -> String {
    script_var("K8S_BUILD_ID")
        .map(|v| v.replace("$K8S_GIT_VERSION", K8S_VERSION))
        .unwrap_or_else(|| K8S_VERSION.to_string())
}

/// The value of a `NAME="value"` line of the script.
fn script_var(name: &str) -> Option<String> {
    SCRIPT.lines().find_map(|l| {
        let v = l.strip_prefix(name)?.strip_prefix("=\"")?;
        Some(v.split('"').next()?.to_string())
    })
}

/// Where the script puts kube-apiserver and kube-controller-manager.
pub fn k8s_bin_dir() -> PathBuf {
    cache_dir().join(format!("k8s-{}", build_id()))
}

/// Where the test world's programs are.
#[derive(Clone, Debug)]
pub struct Binaries {
    pub kube_apiserver: PathBuf,
    pub kube_controller_manager: PathBuf,
    pub etcd: PathBuf,
    pub docker_registry: PathBuf,
    pub htpasswd: PathBuf,
    pub openssl: PathBuf,
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
    let k8s = k8s_bin_dir();
    let b = Binaries {
        kube_apiserver: k8s.join("kube-apiserver"),
        kube_controller_manager: k8s.join("kube-controller-manager"),
        etcd: which("etcd")?,
        docker_registry: which("docker-registry")?,
        htpasswd: which("htpasswd")?,
        openssl: which("openssl")?,
    };
    (is_executable(&b.kube_apiserver) && is_executable(&b.kube_controller_manager)).then_some(b)
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
            "kube-apiserver/kube-controller-manager {} not in {} or a Debian tool missing from PATH",
            build_id(),
            k8s_bin_dir().display()
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
    let script = tempfile::Builder::new()
        .prefix("kmm-fleet-provision-")
        .suffix(".sh")
        .tempfile()
        .context("creating a temp file for the provision script")?;
    std::fs::write(script.path(), SCRIPT).context("writing the provision script")?;
    let started = Instant::now();
    eprintln!("kmm-fleet: running provision script (output follows)");
    // The script's output goes to our stderr as it happens (a cold build takes minutes).
    let status = Command::new("bash")
        .arg(script.path())
        .env("KMM_FLEET_CACHE", cache)
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
        for want in [
            "etcd-server",
            "docker-registry",
            "apache2-utils",
            "openssl",
            "golang-1.19-go",
        ] {
            assert!(p.iter().any(|x| x == want), "{want} missing from {p:?}");
        }
        assert!(!p.iter().any(|x| x.contains('(') || x.contains(')')));
    }

    #[test]
    fn build_id_comes_from_the_script() {
        let id = build_id();
        assert!(id.starts_with("v1.20.2-"), "{id}");
        assert!(!id.contains('$'));
    }
}
