//! Real kernel modules for real kernels: the project's C sources (`e2e/modules/`) compiled
//! with the kernel's own build system against Debian's `linux-headers-<release>`, and
//! indexed by the real `depmod`. Used wherever the test world makes modules (prebuilt kmod
//! images, the build executor's `make`) when the target kernel is the one the real-kernel
//! nodes run; simulated kernels keep [`crate::kmod::fake_module`].
//!
//! Builds are cached in `$CACHE/kmod-build/<release>/<hash of sources, names, version>/`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};
use sha2::{Digest, Sha256};

/// Module sources: modules with a source of their own; every other name is built from
/// `generic.c`.
const SOURCES: &[(&str, &str)] = &[
    ("kmm_ci_a", include_str!("../modules/kmm_ci_a.c")),
    ("kmm_ci_fw", include_str!("../modules/kmm_ci_fw.c")),
];
const GENERIC: &str = include_str!("../modules/generic.c");
/// The version every module reports unless asked otherwise (`/sys/module/<m>/version`).
pub const DEFAULT_VERSION: &str = "1.0";

/// The C source of module `name` (`-` and `_` alike).
pub fn source(name: &str) -> &'static str {
    let n = name.replace('-', "_");
    SOURCES
        .iter()
        .find(|(m, _)| *m == n)
        .map(|(_, s)| *s)
        .unwrap_or(GENERIC)
}

/// Compile `modules` for `release` with `MODULE_VERSION(version)`; returns each module's
/// `.ko` by module name (`_`).
pub fn compile(
    release: &str,
    modules: &[&str],
    version: &str,
) -> anyhow::Result<BTreeMap<String, Vec<u8>>> {
    let headers = crate::vm::headers_dir(release);
    if !headers.join("Makefile").is_file() {
        bail!(
            "no headers for kernel {release} at {} (Debian package linux-headers-{release})",
            headers.display()
        );
    }
    let mut names: Vec<String> = modules.iter().map(|m| m.replace('-', "_")).collect();
    names.sort();
    names.dedup();
    if names
        .iter()
        .any(|n| n.is_empty() || !n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
    {
        bail!("module names must be [A-Za-z0-9_-]+: {modules:?}");
    }
    if version.contains('"') || version.contains('\\') {
        bail!("invalid module version {version:?}");
    }
    let mut h = Sha256::new();
    h.update(release);
    h.update(version);
    for n in &names {
        h.update(n);
        h.update(source(n));
    }
    let key = hex::encode(h.finalize());
    let dir = crate::provision::cache_dir()
        .join("kmod-build")
        .join(release)
        .join(&key[..16]);
    let read_all = |dir: &Path| -> Option<BTreeMap<String, Vec<u8>>> {
        names
            .iter()
            .map(|n| Some((n.clone(), std::fs::read(dir.join(format!("{n}.ko"))).ok()?)))
            .collect()
    };
    if let Some(done) = read_all(&dir) {
        return Ok(done);
    }
    let parent = dir.parent().context("cache path")?;
    std::fs::create_dir_all(parent)?;
    let work = tempfile::tempdir_in(parent)?;
    let objs: Vec<String> = names.iter().map(|n| format!("{n}.o")).collect();
    std::fs::write(
        work.path().join("Kbuild"),
        format!(
            "obj-m := {}\nccflags-y += -DKMM_CI_VERSION='\"{version}\"'\n",
            objs.join(" ")
        ),
    )?;
    for n in &names {
        std::fs::write(work.path().join(format!("{n}.c")), source(n))?;
    }
    let out = Command::new("make")
        .arg("-s")
        .arg("-C")
        .arg(&headers)
        .arg(format!("M={}", work.path().display()))
        .arg("modules")
        .output()
        .context("running make (Debian packages make, gcc)")?;
    if !out.status.success() {
        bail!(
            "compiling {names:?} for {release}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let built = read_all(work.path()).context("make left no .ko")?;
    // Publish atomically; a concurrent build of the same set may have won.
    let tmp = work.keep();
    if std::fs::rename(&tmp, &dir).is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    Ok(built)
}

/// The index files the real `depmod` writes for the modules of `files` under
/// `<base>/lib/modules/<release>/` (paths as in `files`, e.g. `/opt/lib/modules/…`).
pub fn depmod(
    files: &BTreeMap<String, Vec<u8>>,
    base: &str,
    release: &str,
) -> anyhow::Result<BTreeMap<String, Vec<u8>>> {
    let base = base.trim_end_matches('/');
    let prefix = format!("{base}/lib/modules/{release}/");
    let tmp = tempfile::tempdir()?;
    let root = tmp.path().join("lib/modules").join(release);
    std::fs::create_dir_all(&root)?;
    for (p, data) in files {
        if let Some(rel) = p.strip_prefix(&prefix)
            && !rel.contains("..")
        {
            let to = root.join(rel);
            if let Some(d) = to.parent() {
                std::fs::create_dir_all(d)?;
            }
            std::fs::write(to, data)?;
        }
    }
    let out = Command::new(depmod_program())
        .arg("-b")
        .arg(tmp.path())
        .arg(release)
        .output()
        .context("running depmod (Debian package kmod)")?;
    if !out.status.success() {
        bail!("depmod: {}", String::from_utf8_lossy(&out.stderr));
    }
    let mut index = BTreeMap::new();
    for e in std::fs::read_dir(&root)?.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with("modules.") {
            index.insert(format!("{prefix}{name}"), std::fs::read(e.path())?);
        }
    }
    Ok(index)
}

fn depmod_program() -> PathBuf {
    ["/usr/sbin/depmod", "/sbin/depmod"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("depmod"))
}
