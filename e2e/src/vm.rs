//! Real-kernel nodes: one long-lived `qemu-system-x86_64` VM (software emulation, TCG) per
//! node, running Debian's packaged kernel from a small initramfs.
//!
//! Nothing uses a network address. The host talks to the guest over a virtio-serial port
//! (a unix socket on the host) and shares two directories over 9p: `shared` (read-write: job
//! scripts, their output, container root file systems) and the kernel's `lib/modules`
//! (read-only, mounted at `/lib/modules`, so in-tree modules such as `joydev` exist).
//!
//! The guest's `/init` is a busybox shell agent. Host to guest, one line per request:
//! `run <id>` starts `/shared/jobs/<id>/job.sh` in its own session (output to
//! `/shared/jobs/<id>/out`), `kill <id> <SIG>` signals that session, `poweroff`. Guest to
//! host: `ready <uname -r>` once, then `exit <id> <status>` for every job.
//!
//! A Secure Boot VM boots the real UEFI path instead: OVMF with Secure Boot on and
//! Microsoft's keys, Debian's signed shim, GRUB and kernel, and the given certificates
//! enrolled in the MOK list of its variable store (by `virt-fw-vars`); the kernel then locks
//! itself down, trusts the MOK certificates through its machine keyring and refuses any
//! module not signed by a key it trusts.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{oneshot, watch};

use crate::process::ManagedProcess;

/// The virtio-serial port's name inside the guest.
const AGENT_PORT: &str = "kmm.agent";
/// Kernel modules the initramfs loads to reach the host (with their dependencies).
const BOOT_MODULES: &[&str] = &["virtio_pci", "virtio_console", "9pnet_virtio", "9p"];
/// How long a boot may take (TCG, a loaded machine, OVMF for Secure Boot).
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
/// Guest memory.
const MEMORY_MIB: u32 = 384;

/// Debian's kernel package unpacked by the provisioning script: `$CACHE/vm/<release>/root`.
#[derive(Clone, Debug)]
pub struct KernelDist {
    /// `uname -r` of the kernel, e.g. `6.1.0-57-amd64`.
    pub release: String,
    pub root: PathBuf,
}

impl KernelDist {
    /// The unpacked kernel whose headers are installed (modules are compiled against them).
    pub fn locate(cache: &Path) -> Option<KernelDist> {
        let mut found: Vec<KernelDist> = std::fs::read_dir(cache.join("vm"))
            .ok()?
            .flatten()
            .filter(|e| e.path().join(".complete-1").is_file())
            .filter_map(|e| {
                let release = e.file_name().to_string_lossy().to_string();
                headers_dir(&release)
                    .join("Makefile")
                    .is_file()
                    .then(|| KernelDist {
                        root: e.path().join("root"),
                        release,
                    })
            })
            .collect();
        found.sort_by(|a, b| a.release.cmp(&b.release));
        found.pop()
    }

    pub fn vmlinuz(&self) -> PathBuf {
        self.root.join(format!("boot/vmlinuz-{}", self.release))
    }

    pub fn modules_dir(&self) -> PathBuf {
        self.root.join("lib/modules").join(&self.release)
    }

    /// `modules.dep` as a map from module name (`_`) to its file and its dependencies' names.
    fn modules_dep(&self) -> anyhow::Result<BTreeMap<String, (String, Vec<String>)>> {
        let dep = self.modules_dir().join("modules.dep");
        let text =
            std::fs::read_to_string(&dep).with_context(|| format!("reading {}", dep.display()))?;
        let name = |p: &str| {
            let file = p.rsplit('/').next().unwrap_or(p);
            file.split(".ko").next().unwrap_or(file).replace('-', "_")
        };
        Ok(text
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(m, deps)| {
                (
                    name(m),
                    (
                        m.trim().to_string(),
                        deps.split_whitespace().map(name).collect(),
                    ),
                )
            })
            .collect())
    }

    /// The files of `modules` and their dependencies, in an order `insmod` accepts.
    fn load_order(&self, modules: &[&str]) -> anyhow::Result<Vec<(String, PathBuf)>> {
        let deps = self.modules_dep()?;
        let mut out: Vec<(String, PathBuf)> = Vec::new();
        fn visit(
            m: &str,
            deps: &BTreeMap<String, (String, Vec<String>)>,
            seen: &mut BTreeSet<String>,
            out: &mut Vec<(String, PathBuf)>,
            dir: &Path,
        ) -> anyhow::Result<()> {
            if !seen.insert(m.to_string()) {
                return Ok(());
            }
            let (file, ds) = deps
                .get(m)
                .with_context(|| format!("module {m} is not in modules.dep"))?;
            for d in ds.iter().rev() {
                visit(d, deps, seen, out, dir)?;
            }
            out.push((m.to_string(), dir.join(file)));
            Ok(())
        }
        let mut seen = BTreeSet::new();
        for m in modules {
            visit(m, &deps, &mut seen, &mut out, &self.modules_dir())?;
        }
        Ok(out)
    }
}

/// Where Debian keeps a kernel's build headers.
pub fn headers_dir(release: &str) -> PathBuf {
    PathBuf::from(format!("/usr/src/linux-headers-{release}"))
}

/// Whether modules for `kernel` can be compiled and loaded for real on this machine.
pub fn is_real_kernel(kernel: &str) -> bool {
    KernelDist::locate(&crate::provision::cache_dir()).is_some_and(|d| d.release == kernel)
}

/// How a VM boots.
#[derive(Clone, Debug, Default)]
pub struct VmSpec {
    /// A name for logs and the host name.
    pub name: String,
    /// Boot through UEFI Secure Boot with these DER certificates in the MOK list; `None`
    /// boots the kernel directly (no firmware signature checks).
    pub secure_boot: Option<Vec<Vec<u8>>>,
}

/// The guest agent's init script (see the module documentation).
const INIT: &str = r#"#!/bin/busybox sh
# Links in the usual places: the kernel runs /sbin/modprobe itself (e.g. for sha512).
/bin/busybox --install -s
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t securityfs securityfs /sys/kernel/security 2>/dev/null
mkdir -p /dev/pts /run /tmp /var/lib/firmware /etc/modprobe.d /var/lib/kubelet/device-plugins
mount -t devpts devpts /dev/pts
hostname "$(cat /etc/hostname)"
while read -r m; do
  insmod "/boot-modules/$m.ko" || echo "kmm-vm: insmod $m failed"
done < /boot-modules/order
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,cache=none shared /shared \
  || echo "kmm-vm: cannot mount the shared directory"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,ro modules /lib/modules \
  || echo "kmm-vm: cannot mount /lib/modules"
port=
for i in $(seq 1 50); do
  for p in /sys/class/virtio-ports/*; do
    if [ "$(cat "$p/name" 2>/dev/null)" = kmm.agent ]; then port=/dev/${p##*/}; fi
  done
  if [ -n "$port" ] && [ -e "$port" ]; then break; fi
  sleep 0.1
done
echo "kmm-vm: agent on $port"
exec 3<>"$port"
cut -d' ' -f1 /proc/modules > /run/baseline-modules
echo "ready $(uname -r)" >&3
while read -r verb id arg <&3; do
  case "$verb" in
    run)
      (
        setsid sh "/shared/jobs/$id/job.sh" > "/shared/jobs/$id/out" 2>&1 < /dev/null &
        echo $! > "/run/job-$id.pid"
        wait $!
        echo "exit $id $?" >&3
        rm -f "/run/job-$id.pid"
      ) &
      ;;
    kill)
      pid=$(cat "/run/job-$id.pid" 2>/dev/null) && kill -"${arg:-TERM}" -- "-$pid" 2>/dev/null
      ;;
    poweroff)
      sync
      poweroff -f
      ;;
  esac
done
echo "kmm-vm: agent port closed"
poweroff -f
"#;

/// A job's result: its exit status (`128 + n` when killed by signal `n`) and its output.
#[derive(Clone, Debug)]
pub struct JobOutput {
    pub status: i32,
    pub output: String,
}

/// A running VM.
pub struct Vm {
    name: String,
    dir: PathBuf,
    release: String,
    process: tokio::sync::Mutex<ManagedProcess>,
    pid: u32,
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Arc<Mutex<HashMap<u64, oneshot::Sender<i32>>>>,
    alive: watch::Receiver<bool>,
    next: AtomicU64,
    baseline: Vec<String>,
    boot_time: Duration,
    secure_boot: bool,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("name", &self.name)
            .field("release", &self.release)
            .field("secure_boot", &self.secure_boot)
            .finish_non_exhaustive()
    }
}

/// A job started with [`Vm::spawn`].
#[derive(Debug)]
pub struct Job {
    pub id: u64,
    done: oneshot::Receiver<i32>,
    out: PathBuf,
}

impl Job {
    /// Waits for the job to end; its status and output.
    pub async fn wait(self) -> anyhow::Result<JobOutput> {
        let status = self
            .done
            .await
            .context("the VM stopped before the job ended")?;
        let output = std::fs::read_to_string(&self.out).unwrap_or_default();
        if let Some(dir) = self.out.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
        Ok(JobOutput { status, output })
    }
}

/// Quote `s` for a POSIX shell.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

impl Vm {
    /// Boots a VM in `dir` (created; its old contents removed) and waits for its agent.
    pub async fn boot(
        bins: &crate::provision::Binaries,
        spec: &VmSpec,
        dir: &Path,
    ) -> anyhow::Result<Vm> {
        let t0 = Instant::now();
        let dist = &bins.kernel;
        if dir.exists() {
            std::fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
        }
        let shared = dir.join("shared");
        std::fs::create_dir_all(shared.join("jobs"))?;
        let initrd = dir.join("initrd.gz");
        let d = dist.clone();
        let host = spec.name.clone();
        let initrd2 = initrd.clone();
        tokio::task::spawn_blocking(move || write_initramfs(&d, &host, &initrd2))
            .await
            .context("initramfs task")??;
        let socket = dir.join("agent.sock");
        let console = dir.join("console.log");
        let mut args: Vec<String> = [
            "-accel",
            "tcg",
            "-m",
            &MEMORY_MIB.to_string(),
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-nic",
            "none",
            "-no-reboot",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend([
            "-serial".into(),
            format!("file:{}", console.display()),
            "-device".into(),
            "virtio-serial-pci".into(),
            "-chardev".into(),
            format!(
                "socket,id=agent,path={},server=on,wait=on",
                socket.display()
            ),
            "-device".into(),
            format!("virtserialport,chardev=agent,name={AGENT_PORT}"),
            "-fsdev".into(),
            format!(
                "local,id=shared,path={},security_model=none",
                shared.display()
            ),
            "-device".into(),
            "virtio-9p-pci,fsdev=shared,mount_tag=shared".into(),
            "-fsdev".into(),
            format!(
                "local,id=modules,path={},security_model=none,readonly=on",
                dist.root.join("lib/modules").display()
            ),
            "-device".into(),
            "virtio-9p-pci,fsdev=modules,mount_tag=modules".into(),
        ]);
        let cmdline = "console=ttyS0 panic=-1 quiet";
        match &spec.secure_boot {
            None => args.extend([
                "-kernel".into(),
                dist.vmlinuz().display().to_string(),
                "-initrd".into(),
                initrd.display().to_string(),
                "-append".into(),
                cmdline.into(),
            ]),
            Some(certs) => {
                let (code, vars, esp) =
                    prepare_secure_boot(bins, dir, &initrd, certs, cmdline).await?;
                args.extend([
                    "-machine".into(),
                    "q35,smm=on".into(),
                    "-global".into(),
                    "driver=cfi.pflash01,property=secure,value=on".into(),
                    "-drive".into(),
                    format!(
                        "if=pflash,format=raw,unit=0,readonly=on,file={}",
                        code.display()
                    ),
                    "-drive".into(),
                    format!("if=pflash,format=raw,unit=1,file={}", vars.display()),
                    "-drive".into(),
                    format!(
                        "file=fat:{},format=raw,if=virtio,readonly=on",
                        esp.display()
                    ),
                ]);
            }
        }
        let process = ManagedProcess::spawn(
            &format!("vm {}", spec.name),
            &bins.qemu,
            &args,
            &dir.join("qemu.log"),
        )?;
        // qemu waits for this connection before it starts the guest.
        let stream = {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                match UnixStream::connect(&socket).await {
                    Ok(s) => break s,
                    Err(e) if Instant::now() > deadline => {
                        bail!(
                            "VM {}: cannot reach qemu's agent socket: {e}\n{}",
                            spec.name,
                            process.log_tail(20)
                        )
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        };
        let (read, write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        let ready = tokio::time::timeout(BOOT_TIMEOUT, async {
            while let Some(line) = lines.next_line().await? {
                if let Some(r) = line.strip_prefix("ready ") {
                    return Ok::<_, std::io::Error>(Some(r.trim().to_string()));
                }
            }
            Ok(None)
        })
        .await;
        let release = match ready {
            Ok(Ok(Some(r))) => r,
            other => bail!(
                "VM {} did not boot ({}): console:\n{}",
                spec.name,
                match other {
                    Err(_) => format!("no agent after {}s", BOOT_TIMEOUT.as_secs()),
                    Ok(Err(e)) => e.to_string(),
                    _ => "agent port closed".to_string(),
                },
                crate::process::log_tail(&console, 30)
            ),
        };
        let pending: Arc<Mutex<HashMap<u64, oneshot::Sender<i32>>>> = Arc::default();
        let (alive_tx, alive) = watch::channel(true);
        let p2 = pending.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let mut parts = line.split_whitespace();
                if parts.next() == Some("exit")
                    && let (Some(id), Some(status)) = (parts.next(), parts.next())
                    && let (Ok(id), Ok(status)) = (id.parse::<u64>(), status.parse::<i32>())
                    && let Some(tx) = p2.lock().unwrap_or_else(|e| e.into_inner()).remove(&id)
                {
                    let _ = tx.send(status);
                }
            }
            // The VM is gone: every waiting job fails.
            p2.lock().unwrap_or_else(|e| e.into_inner()).clear();
            let _ = alive_tx.send(false);
        });
        let pid = process.pid();
        let mut vm = Vm {
            name: spec.name.clone(),
            dir: dir.to_path_buf(),
            release,
            pid,
            process: tokio::sync::Mutex::new(process),
            writer: tokio::sync::Mutex::new(write),
            pending,
            alive,
            next: AtomicU64::new(1),
            baseline: Vec::new(),
            boot_time: t0.elapsed(),
            secure_boot: spec.secure_boot.is_some(),
        };
        let base = vm.exec("cat /run/baseline-modules").await?;
        vm.baseline = base.output.lines().map(str::to_string).collect();
        tracing::info!(vm = %vm.name, release = %vm.release, secs = vm.boot_time.as_secs_f32(), "VM booted");
        Ok(vm)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The guest kernel's `uname -r`.
    pub fn release(&self) -> &str {
        &self.release
    }

    pub fn secure_boot(&self) -> bool {
        self.secure_boot
    }

    /// From starting qemu to the agent's `ready`.
    pub fn boot_time(&self) -> Duration {
        self.boot_time
    }

    /// The host side of the guest's `/shared`.
    pub fn shared_dir(&self) -> PathBuf {
        self.dir.join("shared")
    }

    /// The serial console's log.
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }

    pub fn is_alive(&self) -> bool {
        *self.alive.borrow()
    }

    /// qemu's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// qemu's resident memory.
    pub fn rss_bytes(&self) -> Option<u64> {
        crate::process::rss_bytes(self.pid)
    }

    /// Starts `script` (POSIX sh, run by the guest's busybox as root) in its own session.
    pub async fn spawn(&self, script: &str) -> anyhow::Result<Job> {
        if !self.is_alive() {
            bail!("VM {} is not running", self.name);
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let jdir = self.shared_dir().join("jobs").join(id.to_string());
        std::fs::create_dir_all(&jdir)?;
        std::fs::write(jdir.join("job.sh"), script)?;
        let (tx, done) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tx);
        self.send(&format!("run {id}")).await?;
        Ok(Job {
            id,
            done,
            out: jdir.join("out"),
        })
    }

    /// Runs `script` to its end.
    pub async fn exec(&self, script: &str) -> anyhow::Result<JobOutput> {
        self.spawn(script).await?.wait().await
    }

    /// Sends `signal` (a name: `TERM`, `KILL`) to every process of job `id`.
    pub async fn kill(&self, id: u64, signal: &str) -> anyhow::Result<()> {
        self.send(&format!("kill {id} {signal}")).await
    }

    async fn send(&self, line: &str) -> anyhow::Result<()> {
        let mut w = self.writer.lock().await;
        w.write_all(format!("{line}\n").as_bytes())
            .await
            .with_context(|| format!("VM {}: agent", self.name))?;
        w.flush().await?;
        Ok(())
    }

    /// Loaded modules (names from `/proc/modules`, most recent first) other than those the
    /// VM loaded to boot.
    pub async fn modules(&self) -> anyhow::Result<Vec<String>> {
        let out = self.exec("cut -d' ' -f1 /proc/modules").await?;
        Ok(out
            .output
            .lines()
            .filter(|m| !self.baseline.iter().any(|b| b == m))
            .map(str::to_string)
            .collect())
    }

    /// Powers the VM off (the agent syncs first) and waits for qemu to exit.
    pub async fn shutdown(&self) {
        let _ = self.send("poweroff x").await;
        let mut p = self.process.lock().await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while p.exited().is_none() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        p.stop(Duration::from_secs(1)).await;
    }
}

/// A gzipped newc initramfs: busybox, the agent, the boot modules.
fn write_initramfs(dist: &KernelDist, hostname: &str, out: &Path) -> anyhow::Result<()> {
    use cpio::newc::Builder;
    use std::io::Write as _;
    let busybox = std::fs::read("/bin/busybox").context("reading /bin/busybox (busybox-static)")?;
    let order = dist.load_order(BOOT_MODULES)?;
    let gz = flate2::write::GzEncoder::new(
        std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?,
        flate2::Compression::fast(),
    );
    let mut w = gz;
    let mut ino = 1u32;
    let mut entry = |w: flate2::write::GzEncoder<std::fs::File>,
                     name: &str,
                     mode: u32,
                     data: &[u8]|
     -> std::io::Result<flate2::write::GzEncoder<std::fs::File>> {
        ino += 1;
        let mut f = Builder::new(name)
            .ino(ino)
            .mode(mode)
            .nlink(if mode & 0o040000 != 0 { 2 } else { 1 })
            .write(w, data.len() as u32);
        f.write_all(data)?;
        f.finish()
    };
    for d in [
        "bin",
        "sbin",
        "usr",
        "usr/bin",
        "usr/sbin",
        "proc",
        "sys",
        "dev",
        "run",
        "tmp",
        "etc",
        "shared",
        "lib",
        "lib/modules",
        "boot-modules",
        "var",
        "var/lib",
    ] {
        w = entry(w, d, 0o040755, &[])?;
    }
    w = entry(w, "bin/busybox", 0o100755, &busybox)?;
    w = entry(w, "init", 0o100755, INIT.as_bytes())?;
    w = entry(
        w,
        "etc/hostname",
        0o100644,
        format!("{hostname}\n").as_bytes(),
    )?;
    let mut names = String::new();
    for (name, path) in &order {
        let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        w = entry(w, &format!("boot-modules/{name}.ko"), 0o100644, &data)?;
        names.push_str(name);
        names.push('\n');
    }
    w = entry(w, "boot-modules/order", 0o100644, names.as_bytes())?;
    let w = cpio::newc::trailer(w)?;
    w.finish()?.sync_all()?;
    Ok(())
}

/// OVMF's Secure Boot firmware, a variable store with Microsoft's keys and `certs` in the
/// MOK list, and an EFI system partition (a directory qemu presents as a FAT disk) with
/// Debian's signed shim, GRUB and kernel.
async fn prepare_secure_boot(
    bins: &crate::provision::Binaries,
    dir: &Path,
    initrd: &Path,
    certs: &[Vec<u8>],
    cmdline: &str,
) -> anyhow::Result<(PathBuf, PathBuf, PathBuf)> {
    let ovmf = Path::new("/usr/share/OVMF");
    let code = ovmf.join("OVMF_CODE_4M.secboot.fd");
    let template = ovmf.join("OVMF_VARS_4M.ms.fd");
    for f in [&code, &template] {
        if !f.is_file() {
            bail!("{} is missing (Debian package ovmf)", f.display());
        }
    }
    let vars = dir.join("OVMF_VARS.fd");
    let mut cmd = tokio::process::Command::new(&bins.virt_fw_vars);
    cmd.arg("--input").arg(&template).arg("--output").arg(&vars);
    for (i, der) in certs.iter().enumerate() {
        let f = dir.join(format!("mok-{i}.der"));
        std::fs::write(&f, der)?;
        // The owner GUID of each MOK entry: shim's own.
        cmd.arg("--add-mok")
            .arg("605dab50-e046-4300-abb6-3dd810dd8b23")
            .arg(&f);
    }
    let out = cmd.output().await.context("running virt-fw-vars")?;
    if !out.status.success() {
        bail!(
            "virt-fw-vars failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let esp = dir.join("esp");
    let boot = esp.join("EFI/BOOT");
    let debian = esp.join("EFI/debian");
    std::fs::create_dir_all(&boot)?;
    std::fs::create_dir_all(&debian)?;
    let r = &bins.kernel.root;
    let copies = [
        (
            r.join("usr/lib/shim/shimx64.efi.signed"),
            boot.join("BOOTX64.EFI"),
        ),
        (
            r.join("usr/lib/shim/mmx64.efi.signed"),
            boot.join("mmx64.efi"),
        ),
        (
            r.join("usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed"),
            boot.join("grubx64.efi"),
        ),
        (bins.kernel.vmlinuz(), esp.join("vmlinuz")),
        (initrd.to_path_buf(), esp.join("initrd.gz")),
    ];
    for (from, to) in copies {
        std::fs::copy(&from, &to)
            .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    }
    // Debian's signed GRUB reads its configuration from EFI/debian on the disk it came from.
    let cfg = format!("set timeout=0\nlinux /vmlinuz {cmdline}\ninitrd /initrd.gz\nboot\n");
    std::fs::write(debian.join("grub.cfg"), &cfg)?;
    std::fs::write(boot.join("grub.cfg"), &cfg)?;
    Ok((code, vars, esp))
}
