//! The container runtime of real-kernel nodes: a container of a pod bound to such a node
//! runs in the node's VM ([`crate::vm`]). Its image's layers, applied in order, become its
//! root file system (unpacked on the host into the VM's shared directory); the guest mounts
//! `/proc`, `/sys` (read-only unless privileged), `/dev` (the VM's own for privileged
//! containers, else a small tmpfs), the pod's `hostPath` volumes from the VM's file system and
//! a termination-log file, then `chroot`s into it and runs the container's real command with
//! its environment. Probes and the preStop hook run the same way in the same root; stopping
//! sends SIGTERM then SIGKILL to the container's processes.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Pod, Volume};
use tokio::sync::{mpsc, watch};

use super::images::{self, Pulled};
use crate::vm::{Job, JobOutput, Vm, shell_quote};

/// A VM being booted (`None`), booted, or failed to boot.
pub(crate) type VmState = Option<Result<Arc<Vm>, String>>;
pub(crate) type VmSlot = watch::Receiver<VmState>;

/// Waits for the node's VM.
pub(crate) async fn booted(slot: &VmSlot) -> Result<Arc<Vm>, String> {
    let mut slot = slot.clone();
    loop {
        if let Some(r) = slot.borrow().clone() {
            return r;
        }
        if slot.changed().await.is_err() {
            return Err("the node's VM is gone".to_string());
        }
    }
}

/// What the kubelet hears about a container running in a VM.
#[derive(Debug)]
pub(crate) enum Event {
    Ready {
        index: usize,
        generation: i32,
    },
    Exited {
        index: usize,
        generation: i32,
        status: i32,
        message: Option<String>,
        output: String,
    },
}

/// A container started in a VM.
#[derive(Clone, Debug)]
pub(crate) struct VmContainer {
    pub name: String,
    pub job: u64,
    /// `env -i NAME=value… chroot <root>`: the prefix of every process of this container.
    prefix: String,
    root: String,
    host_dir: PathBuf,
    vm: Arc<Vm>,
}

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The process a container runs, by Kubernetes' rules on `command`/`args` over the image's
/// `Entrypoint`/`Cmd`.
fn argv(c: &Container, pulled: &Pulled) -> Vec<String> {
    match (&c.command, &c.args) {
        (Some(cmd), args) if !cmd.is_empty() => {
            let mut v = cmd.clone();
            v.extend(args.clone().unwrap_or_default());
            v
        }
        (_, Some(args)) if !args.is_empty() => {
            let mut v = pulled.config.entrypoint.clone();
            v.extend(args.clone());
            v
        }
        _ => {
            let mut v = pulled.config.entrypoint.clone();
            v.extend(pulled.config.cmd.clone());
            v
        }
    }
}

fn env(pod: &Pod, c: &Container, pulled: &Pulled) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut set = |k: String, v: String| {
        out.retain(|(n, _)| *n != k);
        out.push((k, v));
    };
    set("PATH".into(), DEFAULT_PATH.into());
    set(
        "HOSTNAME".into(),
        pod.metadata.name.clone().unwrap_or_default(),
    );
    for kv in &pulled.config.env {
        if let Some((k, v)) = kv.split_once('=') {
            set(k.to_string(), v.to_string());
        }
    }
    for e in c.env.iter().flatten() {
        let value = match (&e.value, &e.value_from) {
            (Some(v), _) => v.clone(),
            (None, Some(from)) => match from.field_ref.as_ref().map(|f| f.field_path.as_str()) {
                Some("metadata.name") => pod.metadata.name.clone().unwrap_or_default(),
                Some("metadata.namespace") => pod.metadata.namespace.clone().unwrap_or_default(),
                Some("spec.nodeName") => pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.node_name.clone())
                    .unwrap_or_default(),
                Some("spec.serviceAccountName") => pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.service_account_name.clone())
                    .unwrap_or_default(),
                _ => String::new(),
            },
            (None, None) => String::new(),
        };
        set(e.name.clone(), value);
    }
    out
}

fn privileged(c: &Container) -> bool {
    c.security_context
        .as_ref()
        .and_then(|s| s.privileged)
        .unwrap_or(false)
}

/// Prepares the root file system and starts the container; returns it and its job.
pub(crate) async fn start(
    vm: Arc<Vm>,
    client: &kube::Client,
    pod: &Pod,
    c: &Container,
    pulled: &Pulled,
    cid: &str,
) -> Result<(VmContainer, Job), String> {
    let host_dir = vm.shared_dir().join("c").join(cid);
    let rootfs = host_dir.join("rootfs");
    let layers = pulled.layers.clone();
    let r2 = rootfs.clone();
    let _ = std::fs::remove_dir_all(&host_dir);
    tokio::task::spawn_blocking(move || crate::oci::unpack_layers(&r2, &layers))
        .await
        .map_err(|e| format!("unpacking the image: {e}"))?
        .map_err(|e| format!("failed to create containerd task: unpacking the image: {e}"))?;
    let argv = argv(c, pulled);
    if argv.is_empty() {
        return Err(
            "failed to create containerd task: no command specified (neither the pod nor the image gives one)"
                .to_string(),
        );
    }
    // Volumes other than hostPath: their files are written into the root file system.
    let volumes: Vec<Volume> = pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.clone())
        .unwrap_or_default();
    let mut binds = Vec::new();
    for m in c.volume_mounts.iter().flatten() {
        let Some(v) = volumes.iter().find(|v| v.name == m.name) else {
            continue;
        };
        if let Some(hp) = &v.host_path {
            binds.push((
                hp.path.clone(),
                m.mount_path.clone(),
                m.read_only.unwrap_or(false),
                hp.type_.clone().unwrap_or_default(),
            ));
            continue;
        }
        let at = rootfs.join(m.mount_path.trim_start_matches('/'));
        let _ = std::fs::create_dir_all(&at);
        for (path, data) in images::mounted_files(client, pod, c, &m.mount_path).await {
            let to = rootfs.join(path.trim_start_matches('/'));
            if let Some(d) = to.parent() {
                let _ = std::fs::create_dir_all(d);
            }
            let _ = std::fs::write(to, data);
        }
    }
    let root = format!("/shared/c/{cid}/rootfs");
    let r = shell_quote(&root);
    let env = env(pod, c, pulled);
    let mut prefix = String::from("env -i");
    for (k, v) in &env {
        prefix.push(' ');
        prefix.push_str(&shell_quote(&format!("{k}={v}")));
    }
    prefix.push_str(&format!(" chroot {r}"));
    let mut s = String::new();
    s.push_str("set -e\n");
    s.push_str(&format!("R={r}\n"));
    s.push_str("mkdir -p \"$R/proc\" \"$R/sys\" \"$R/dev\" \"$R/tmp\" \"$R/etc\"\n");
    s.push_str("mount -t proc proc \"$R/proc\"\n");
    if privileged(c) {
        s.push_str("mount -t sysfs sysfs \"$R/sys\"\n");
        s.push_str("mount --rbind /dev \"$R/dev\"\n");
    } else {
        s.push_str("mount -t sysfs -o ro sysfs \"$R/sys\"\n");
        s.push_str("mount -t tmpfs -o mode=755,nosuid tmpfs \"$R/dev\"\n");
        for (n, major, minor) in [
            ("null", 1, 3),
            ("zero", 1, 5),
            ("full", 1, 7),
            ("random", 1, 8),
            ("urandom", 1, 9),
            ("tty", 5, 0),
        ] {
            s.push_str(&format!("mknod -m 666 \"$R/dev/{n}\" c {major} {minor}\n"));
        }
        s.push_str("ln -s /proc/self/fd \"$R/dev/fd\"\n");
    }
    s.push_str(&format!(
        "echo {} > \"$R/etc/hostname\"\n",
        shell_quote(&pod.metadata.name.clone().unwrap_or_default())
    ));
    s.push_str(&format!(
        "T=/shared/c/{cid}/termination-log\n: > \"$T\"\n: > \"$R/dev/termination-log\"\nmount --bind \"$T\" \"$R/dev/termination-log\"\n"
    ));
    for (host, target, ro, type_) in &binds {
        let h = shell_quote(host);
        let t = shell_quote(target.trim_start_matches('/'));
        match type_.as_str() {
            "Directory" => s.push_str(&format!(
                "[ -d {h} ] || {{ echo \"hostPath type check failed: {host} is not a directory\" >&2; exit 128; }}\n"
            )),
            "File" | "FileOrCreate" => s.push_str(&format!("[ -e {h} ] || : > {h}\n")),
            _ => s.push_str(&format!("[ -e {h} ] || mkdir -p {h}\n")),
        }
        s.push_str(&format!(
            "if [ -d {h} ]; then mkdir -p \"$R/\"{t}; else mkdir -p \"$(dirname \"$R/\"{t})\"; [ -e \"$R/\"{t} ] || : > \"$R/\"{t}; fi\n"
        ));
        s.push_str(&format!("mount --bind {h} \"$R/\"{t}\n"));
        if *ro {
            s.push_str(&format!("mount -o remount,bind,ro \"$R/\"{t}\n"));
        }
    }
    s.push_str("set +e\n");
    let wd = c
        .working_dir
        .clone()
        .filter(|w| !w.is_empty())
        .unwrap_or_else(|| pulled.config.working_dir.clone());
    let args: Vec<String> = argv.iter().map(|a| shell_quote(a)).collect();
    if wd.is_empty() || wd == "/" {
        s.push_str(&format!("exec {prefix} {}\n", args.join(" ")));
    } else {
        s.push_str(&format!(
            "exec {prefix} /bin/sh -c 'cd \"$0\" && exec \"$@\"' {} {}\n",
            shell_quote(&wd),
            args.join(" ")
        ));
    }
    let job = vm
        .spawn(&s)
        .await
        .map_err(|e| format!("failed to start the container in the VM: {e:#}"))?;
    Ok((
        VmContainer {
            name: c.name.clone(),
            job: job.id,
            prefix,
            root,
            host_dir,
            vm,
        },
        job,
    ))
}

impl VmContainer {
    /// Runs `cmd` in the container (a probe, the preStop hook).
    pub async fn exec(&self, cmd: &[String]) -> anyhow::Result<JobOutput> {
        let args: Vec<String> = cmd.iter().map(|a| shell_quote(a)).collect();
        self.vm
            .exec(&format!("exec {} {}\n", self.prefix, args.join(" ")))
            .await
    }

    /// SIGTERM to the container's processes, SIGKILL after `grace`.
    pub async fn stop(&self, grace: Duration, exited: &mut watch::Receiver<bool>) {
        if *exited.borrow() {
            return;
        }
        let _ = self.vm.kill(self.job, "TERM").await;
        if tokio::time::timeout(grace, exited.wait_for(|e| *e))
            .await
            .is_err()
        {
            let _ = self.vm.kill(self.job, "KILL").await;
            let _ = tokio::time::timeout(Duration::from_secs(5), exited.wait_for(|e| *e)).await;
        }
    }

    /// After the container ended: its mounts undone, its root file system removed.
    async fn clean_up(&self) {
        let script = format!(
            "R={}\ngrep \" $R\" /proc/mounts | cut -d' ' -f2 | sort -r | while read -r m; do umount -l \"$m\"; done\n",
            shell_quote(&self.root)
        );
        let _ = self.vm.exec(&script).await;
        let dir = self.host_dir.clone();
        let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
    }
}

/// Watches a started container: readiness (`probe` run every second until it first
/// succeeds; ready at once without a probe) and its end (with the termination message:
/// `/dev/termination-log`, as the default `File` policy reads it). Also returns a flag that
/// turns true when the container has ended and been cleaned up.
pub(crate) fn monitor(
    container: VmContainer,
    job: Job,
    probe: Option<Vec<String>>,
    index: usize,
    generation: i32,
    tx: mpsc::UnboundedSender<Event>,
) -> watch::Receiver<bool> {
    let (done_tx, done_rx) = watch::channel(false);
    tokio::spawn(async move {
        let exit = job.wait();
        tokio::pin!(exit);
        let mut ready = probe.is_none();
        if ready {
            let _ = tx.send(Event::Ready { index, generation });
        }
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let result = loop {
            tokio::select! {
                r = &mut exit => break r,
                _ = tick.tick(), if !ready => {
                    if let Some(p) = &probe
                        && container.exec(p).await.is_ok_and(|o| o.status == 0)
                    {
                        ready = true;
                        let _ = tx.send(Event::Ready { index, generation });
                    }
                }
            }
        };
        let (status, output) = match result {
            Ok(o) => (o.status, o.output),
            Err(e) => (137, format!("{e:#}")),
        };
        let message = std::fs::read_to_string(container.host_dir.join("termination-log"))
            .ok()
            .map(|m| m.trim_end().to_string())
            .filter(|m| !m.is_empty());
        container.clean_up().await;
        let _ = tx.send(Event::Exited {
            index,
            generation,
            status,
            message,
            output,
        });
        let _ = done_tx.send(true);
    });
    done_rx
}
