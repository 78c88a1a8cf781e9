//! The base userspace of the test world's kmod images: what a real loader container needs
//! (a shell and its tools, `modprobe`), taken from this machine's Debian packages —
//! busybox-static with one link per applet, dash as `/bin/sh`, and kmod with the shared
//! libraries they load — as one deterministic layer. (Debian's static busybox shell runs
//! its own applets before `PATH`, so `modprobe` in it would be busybox's, not kmod's: the
//! shell is dash, as on Debian itself.) The simulated public base images of the labs' Dockerfiles
//! (`ubi8-minimal`, `ubi9/ubi-minimal`) stand for it, and every prebuilt kmod image for a
//! real kernel is built on it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context as _, bail};

/// Where the layer lives on the test registry, as an image of its own (`FROM`-able).
pub const USERSPACE_REPOSITORY: &str = "kmm-fleet/userspace";

/// kmod's programs (links to `/bin/kmod`), which take precedence over busybox's applets.
const KMOD_TOOLS: &[&str] = &[
    "sbin/modprobe",
    "sbin/insmod",
    "sbin/rmmod",
    "sbin/lsmod",
    "sbin/depmod",
    "sbin/modinfo",
    "bin/lsmod",
];

#[derive(Debug)]
enum Node {
    Dir(u32),
    File(u32, PathBuf),
    Text(u32, Vec<u8>),
    Link(String),
}

/// The layer (an uncompressed tar), built once per process.
pub fn layer() -> anyhow::Result<&'static [u8]> {
    static LAYER: OnceLock<Result<Vec<u8>, String>> = OnceLock::new();
    LAYER
        .get_or_init(|| build().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map(Vec::as_slice)
        .map_err(|e| anyhow::anyhow!("building the base userspace layer: {e}"))
}

fn build() -> anyhow::Result<Vec<u8>> {
    let mut tree: BTreeMap<String, Node> = BTreeMap::new();
    for d in [
        "bin",
        "sbin",
        "usr",
        "usr/bin",
        "usr/sbin",
        "lib",
        "lib64",
        "etc",
        "etc/modprobe.d",
        "proc",
        "sys",
        "dev",
        "run",
        "var",
        "var/lib",
        "opt",
        "root",
    ] {
        tree.insert(d.to_string(), Node::Dir(0o755));
    }
    tree.insert("tmp".into(), Node::Dir(0o1777));
    tree.insert(
        "bin/busybox".into(),
        Node::File(0o755, PathBuf::from("/bin/busybox")),
    );
    let out = Command::new("/bin/busybox")
        .arg("--list-full")
        .output()
        .context("running busybox --list-full (Debian package busybox-static)")?;
    for applet in String::from_utf8_lossy(&out.stdout).lines() {
        let applet = applet.trim();
        if applet.is_empty()
            || applet == "bin/busybox"
            || applet == "bin/sh"
            || KMOD_TOOLS.contains(&applet)
        {
            continue;
        }
        add_parents(&mut tree, applet);
        tree.insert(applet.to_string(), Node::Link("/bin/busybox".into()));
    }
    let kmod = Path::new("/bin/kmod");
    if !kmod.is_file() {
        bail!("/bin/kmod is missing (Debian package kmod)");
    }
    tree.insert("bin/kmod".into(), Node::File(0o755, kmod.to_path_buf()));
    for t in KMOD_TOOLS {
        tree.insert(t.to_string(), Node::Link("/bin/kmod".into()));
    }
    let dash = Path::new("/bin/dash");
    if !dash.is_file() {
        bail!("/bin/dash is missing (Debian package dash)");
    }
    tree.insert("bin/dash".into(), Node::File(0o755, dash.to_path_buf()));
    tree.insert("bin/sh".into(), Node::Link("/bin/dash".into()));
    for program in [kmod, dash] {
        for lib in shared_libraries(program)? {
            add_file_with_links(&mut tree, &lib)?;
        }
    }
    tar_tree(&tree)
}

/// The tree as a deterministic uncompressed tar (mtime 0, owner root).
fn tar_tree(tree: &BTreeMap<String, Node>) -> anyhow::Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, node) in tree {
        let mut h = tar::Header::new_gnu();
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        match node {
            Node::Dir(mode) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(*mode);
                h.set_size(0);
                b.append_data(&mut h, format!("{path}/"), std::io::empty())?;
            }
            Node::File(mode, from) => {
                let data =
                    std::fs::read(from).with_context(|| format!("reading {}", from.display()))?;
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, path, data.as_slice())?;
            }
            Node::Text(mode, data) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, path, data.as_slice())?;
            }
            Node::Link(target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                b.append_link(&mut h, path, target)?;
            }
        }
    }
    Ok(b.into_inner()?)
}

/// A layer for the host OS of a node, to go over [`layer`]: Debian's `bash` with the
/// libraries it loads, and `files` (path without the leading `/`, mode, contents) — the
/// test world's stand-ins for what a node has and this machine cannot run in a VM.
pub fn host_layer(files: &[(&str, u32, &[u8])]) -> anyhow::Result<Vec<u8>> {
    let mut tree: BTreeMap<String, Node> = BTreeMap::new();
    let bash = Path::new("/bin/bash");
    if !bash.is_file() {
        bail!("/bin/bash is missing (Debian package bash)");
    }
    add_parents(&mut tree, "bin/bash");
    tree.insert("bin/bash".into(), Node::File(0o755, bash.to_path_buf()));
    for lib in shared_libraries(bash)? {
        add_file_with_links(&mut tree, &lib)?;
    }
    for (path, mode, data) in files {
        let path = path.trim_start_matches('/');
        add_parents(&mut tree, path);
        tree.insert(path.to_string(), Node::Text(*mode, data.to_vec()));
    }
    tar_tree(&tree)
}

fn add_parents(tree: &mut BTreeMap<String, Node>, path: &str) {
    let mut acc = String::new();
    if let Some((parent, _)) = path.rsplit_once('/') {
        for part in parent.split('/') {
            if !acc.is_empty() {
                acc.push('/');
            }
            acc.push_str(part);
            tree.entry(acc.clone()).or_insert(Node::Dir(0o755));
        }
    }
}

/// The libraries `ldd` lists for `program` (the dynamic loader included).
fn shared_libraries(program: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(program)
        .output()
        .context("running ldd")?;
    if !out.status.success() {
        bail!(
            "ldd {}: {}",
            program.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

/// `path` as the image sees it, following its symbolic links down to the file (each link
/// kept), with the file's real contents.
fn add_file_with_links(tree: &mut BTreeMap<String, Node>, path: &Path) -> anyhow::Result<()> {
    let mut at = path.to_path_buf();
    for _ in 0..8 {
        let rel = at.to_string_lossy().trim_start_matches('/').to_string();
        add_parents(tree, &rel);
        let meta =
            std::fs::symlink_metadata(&at).with_context(|| format!("reading {}", at.display()))?;
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&at)?;
            tree.insert(rel, Node::Link(target.to_string_lossy().to_string()));
            at = match target.is_absolute() {
                true => target,
                false => at.parent().unwrap_or(Path::new("/")).join(target),
            };
        } else {
            tree.insert(rel, Node::File(0o755, std::fs::canonicalize(&at)?));
            return Ok(());
        }
    }
    bail!("too many symbolic links at {}", path.display())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_layer_has_a_shell_modprobe_and_its_libraries() {
        let data = layer().unwrap();
        let mut archive = tar::Archive::new(data);
        let entries: BTreeMap<String, (tar::EntryType, String)> = archive
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let link = e
                    .link_name()
                    .unwrap()
                    .map(|l| l.to_string_lossy().to_string())
                    .unwrap_or_default();
                (
                    e.path()
                        .unwrap()
                        .to_string_lossy()
                        .trim_end_matches('/')
                        .to_string(),
                    (e.header().entry_type(), link),
                )
            })
            .collect();
        assert_eq!(
            entries["bin/sh"],
            (tar::EntryType::Symlink, "/bin/dash".into())
        );
        assert_eq!(
            entries["bin/grep"],
            (tar::EntryType::Symlink, "/bin/busybox".into())
        );
        assert_eq!(
            entries["sbin/modprobe"],
            (tar::EntryType::Symlink, "/bin/kmod".into())
        );
        assert_eq!(entries["bin/kmod"].0, tar::EntryType::Regular);
        assert!(entries.contains_key("lib64/ld-linux-x86-64.so.2"));
        assert!(entries.keys().any(|k| k.contains("libzstd.so.1")));
        // Deterministic: the same bytes every time.
        assert_eq!(build().unwrap(), data);
    }
}
