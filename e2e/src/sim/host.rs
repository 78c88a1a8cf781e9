//! The host OS of a real-kernel node, for what runs on the node itself rather than in a pod:
//! the Day-1 services a MachineConfig installs. A root file system in the VM's shared
//! directory — the base userspace ([`crate::userspace::layer`]: busybox, dash, kmod), Debian's
//! `bash`, and stand-ins for the two programs this machine cannot put in a VM: `podman` (an
//! image store of unpacked root file systems; pulls succeed only for what the test made
//! reachable) and `systemctl` (requests recorded, acted on by the test). The guest `chroot`s
//! into it with the VM's own `/proc`, `/sys`, `/dev` and `/lib/modules` bound in, so the
//! scripts' `modprobe` works on the real kernel.
//!
//! [`HostRoot::install_machine_config`] writes a MachineConfig's Ignition files and units
//! where Ignition would; [`HostRoot::start_unit`] runs a unit's `ExecStart` as systemd would.

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use base64::Engine as _;
use serde_json::Value;

use crate::oci::{Layer, unpack_layers};
use crate::vm::{JobOutput, Vm, shell_quote};

/// The stand-in for podman (see the script's header).
pub const PODMAN: &str = include_str!("host/podman.sh");
/// The stand-in for systemctl.
pub const SYSTEMCTL: &str = include_str!("host/systemctl.sh");

const STORE: &str = "var/lib/kmm-sim-podman";
const REQUESTS: &str = "var/lib/kmm-sim-systemd/requests";
const UNIT_DIR: &str = "etc/systemd/system";

/// How the podman stand-in names an image in its store.
fn key(image: &str) -> String {
    image.replace(['/', ':', '@'], "_")
}

/// A node's host root file system inside a VM's shared directory.
pub struct HostRoot {
    /// On this machine.
    dir: PathBuf,
    /// In the guest.
    guest: String,
}

impl HostRoot {
    /// Unpacks the host OS into `<shared>/<name>` of `vm`.
    pub fn create(vm: &Vm, name: &str) -> anyhow::Result<HostRoot> {
        let dir = vm.shared_dir().join(name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        let host = crate::userspace::host_layer(&[
            ("usr/bin/podman", 0o755, PODMAN.as_bytes()),
            ("usr/bin/systemctl", 0o755, SYSTEMCTL.as_bytes()),
        ])?;
        let layers = [
            Layer {
                data: crate::userspace::layer()?.to_vec(),
                gzipped: false,
            },
            Layer {
                data: host,
                gzipped: false,
            },
        ];
        unpack_layers(&dir, &layers).context("unpacking the host OS")?;
        for d in ["usr/local/bin", UNIT_DIR, "var/lib/kubelet"] {
            std::fs::create_dir_all(dir.join(d))?;
        }
        Ok(HostRoot {
            dir,
            guest: format!("/shared/{name}"),
        })
    }

    /// Puts `image` (its layers, lowest first) in the node's image store, as if pulled before.
    pub fn put_image(&self, image: &str, layers: &[Layer]) -> anyhow::Result<()> {
        unpack_layers(
            &self.dir.join(STORE).join("images").join(key(image)),
            layers,
        )
        .with_context(|| format!("storing {image}"))
    }

    /// Whether `image` is in the node's image store.
    pub fn has_image(&self, image: &str) -> bool {
        self.dir
            .join(STORE)
            .join("images")
            .join(key(image))
            .is_dir()
    }

    /// Makes `image` pullable: what its registry serves once the node's network is up.
    pub fn make_reachable(&self, image: &str, layers: &[Layer]) -> anyhow::Result<()> {
        unpack_layers(
            &self.dir.join(STORE).join("reachable").join(key(image)),
            layers,
        )
        .with_context(|| format!("serving {image}"))
    }

    /// What the node asked of systemd (`systemctl` argument lines), oldest first.
    pub fn systemd_requests(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join(REQUESTS))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Writes a MachineConfig's Ignition `storage.files` (data URLs) and `systemd.units` into
    /// the root as Ignition does; returns the names of the enabled units.
    pub fn install_machine_config(&self, mc: &Value) -> anyhow::Result<Vec<String>> {
        let config = &mc["spec"]["config"];
        for f in config["storage"]["files"].as_array().into_iter().flatten() {
            let path = f["path"].as_str().context("a file without a path")?;
            let source = f["contents"]["source"]
                .as_str()
                .with_context(|| format!("{path}: no contents.source"))?;
            let data = data_url(source).with_context(|| format!("{path}: contents"))?;
            let to = self.dir.join(path.trim_start_matches('/'));
            if let Some(parent) = to.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(&to, data)?;
            let mode = f["mode"].as_u64().unwrap_or(0o644) as u32;
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(mode))?;
        }
        let mut enabled = Vec::new();
        for u in config["systemd"]["units"].as_array().into_iter().flatten() {
            let name = u["name"].as_str().context("a unit without a name")?;
            if let Some(contents) = u["contents"].as_str() {
                std::fs::write(self.dir.join(UNIT_DIR).join(name), contents)?;
            }
            if u["enabled"].as_bool() == Some(true) {
                enabled.push(name.to_string());
            }
        }
        Ok(enabled)
    }

    /// The `ExecStart` command line of an installed unit.
    pub fn exec_start(&self, unit: &str) -> anyhow::Result<String> {
        let text = std::fs::read_to_string(self.dir.join(UNIT_DIR).join(unit))
            .with_context(|| format!("unit {unit} is not installed"))?;
        let mut lines = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("ExecStart="));
        match (lines.next(), lines.next()) {
            (Some(cmd), None) => Ok(cmd.to_string()),
            (None, _) => bail!("unit {unit} has no ExecStart"),
            (Some(_), Some(_)) => bail!("unit {unit} has more than one ExecStart"),
        }
    }

    /// Runs a unit's `ExecStart` in the host root as systemd would start it (root, a plain
    /// environment plus the unit's own, its output collected).
    pub async fn start_unit(&self, vm: &Vm, unit: &str) -> anyhow::Result<JobOutput> {
        let cmd = self.exec_start(unit)?;
        self.run(vm, &cmd).await
    }

    /// Runs `command` (split on white space, as the units' command lines are simple) in the
    /// host root.
    pub async fn run(&self, vm: &Vm, command: &str) -> anyhow::Result<JobOutput> {
        let root = shell_quote(&self.guest);
        let argv: Vec<String> = command.split_whitespace().map(shell_quote).collect();
        let script = format!(
            "set -e\n\
             r={root}\n\
             for d in proc sys dev lib/modules; do\n\
               mkdir -p \"$r/$d\"\n\
               grep -q \" $r/$d \" /proc/mounts || mount -o bind \"/$d\" \"$r/$d\"\n\
             done\n\
             set +e\n\
             env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
             chroot \"$r\" {}\n",
            argv.join(" ")
        );
        vm.exec(&script).await
    }
}

/// The bytes of a `data:` URL (base64 or percent-encoded, as Ignition accepts).
fn data_url(source: &str) -> anyhow::Result<Vec<u8>> {
    let rest = source.strip_prefix("data:").context("not a data: URL")?;
    let (meta, data) = rest.split_once(',').context("no ',' in the data: URL")?;
    if meta.ends_with(";base64") {
        Ok(base64::engine::general_purpose::STANDARD.decode(data)?)
    } else {
        let mut out = Vec::new();
        let b = data.as_bytes();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%' && i + 2 < b.len() {
                let hex = std::str::from_utf8(&b[i + 1..i + 3])?;
                out.push(u8::from_str_radix(hex, 16)?);
                i += 3;
            } else {
                out.push(b[i]);
                i += 1;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn data_urls_as_ignition_writes_them() {
        assert_eq!(
            data_url("data:text/plain;charset=utf-8;base64,aGVsbG8K").unwrap(),
            b"hello\n"
        );
        assert_eq!(data_url("data:,a%20b%0A").unwrap(), b"a b\n");
        assert!(data_url("https://example.com/x").is_err());
    }

    #[test]
    fn image_keys_are_one_path_component() {
        assert_eq!(
            key("127.0.0.1:5000/kmm/a@sha256:ab"),
            "127.0.0.1_5000_kmm_a_sha256_ab"
        );
    }
}
