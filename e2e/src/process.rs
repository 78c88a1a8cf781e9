//! Child processes of the test world (etcd, kube-apiserver, kube-controller-manager,
//! docker-registry): spawned so that they never outlive the test process, logging to a
//! file, stopped by PID only.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;

/// A process we started. Dropping it kills it (SIGKILL); [`ManagedProcess::stop`] asks
/// politely first.
#[derive(Debug)]
pub struct ManagedProcess {
    name: String,
    pid: u32,
    child: tokio::process::Child,
    log: PathBuf,
}

impl ManagedProcess {
    /// Spawns `program args…` with stdout and stderr appended to `log`.
    ///
    /// The child gets `PR_SET_PDEATHSIG(SIGKILL)`: the kernel kills it when the *thread*
    /// that forked it exits. Call this from a runtime worker thread or the main thread,
    /// never from a `spawn_blocking` thread (those exit when idle).
    pub fn spawn(name: &str, program: &Path, args: &[String], log: &Path) -> anyhow::Result<Self> {
        Self::spawn_with_env(name, program, args, &[], log)
    }

    /// [`ManagedProcess::spawn`] with variables added to the environment.
    pub fn spawn_with_env(
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(String, String)],
        log: &Path,
    ) -> anyhow::Result<Self> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening log file {}", log.display()))?;
        let err = out.try_clone().context("duplicating log file handle")?;
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .kill_on_drop(true);
        set_parent_death_signal(&mut cmd);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({})", program.display()))?;
        let pid = child.id().context("spawned child has no pid")?;
        Ok(Self {
            name: name.to_string(),
            pid,
            child,
            log: log.to_path_buf(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// `Some(status)` when the process has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The last `lines` lines of the process log (for error messages).
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }

    /// SIGTERM, then SIGKILL after `grace`; waits for the process to be reaped.
    pub async fn stop(&mut self, grace: Duration) {
        if self.exited().is_some() {
            return;
        }
        signal(self.pid, libc::SIGTERM);
        if tokio::time::timeout(grace, self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.start_kill();
            let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
        }
    }
}

/// The last `lines` lines of a text file, or a note that it cannot be read.
pub fn log_tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// Whether a process with this PID exists and is not a zombie.
pub fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the first field after the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Resident set size of a process in bytes (from /proc/PID/status).
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Sends `sig` to one PID (ours). Errors (already gone) are ignored.
#[allow(unsafe_code)]
pub fn signal(pid: u32, sig: i32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    if pid <= 0 {
        return;
    }
    // SAFETY: kill(2) with a positive PID has no memory-safety preconditions.
    unsafe {
        libc::kill(pid, sig);
    }
}

#[allow(unsafe_code)]
fn set_parent_death_signal(cmd: &mut tokio::process::Command) {
    let parent = std::process::id();
    // SAFETY: the closure runs between fork and exec and only calls async-signal-safe
    // functions (prctl, getppid, _exit); it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl: then nobody would signal us.
            if libc::getppid() as u32 != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

/// A free TCP port on 127.0.0.1 (bound, then released; the caller binds it soon after).
///
/// Chosen below the kernel's ephemeral range (`net.ipv4.ip_local_port_range`): a port from
/// that range can be taken by any outgoing connection between this check and the server's
/// own bind (seen as `bind: address already in use` from kube-apiserver under load). Never
/// hands out the same port twice in one process; falls back to `127.0.0.1:0`.
pub fn free_port() -> anyhow::Result<u16> {
    use rand::Rng as _;
    use std::sync::{Mutex, OnceLock};
    static GIVEN: OnceLock<Mutex<std::collections::HashSet<u16>>> = OnceLock::new();
    let given = GIVEN.get_or_init(Default::default);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    const LOW: u16 = 10_000;
    if ephemeral_low > LOW + 1_000 {
        let mut rng = rand::rng();
        for _ in 0..200 {
            let port = rng.random_range(LOW..ephemeral_low);
            let mut g = given
                .lock()
                .map_err(|_| anyhow::anyhow!("port registry poisoned"))?;
            if g.contains(&port) {
                continue;
            }
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                g.insert(port);
                return Ok(port);
            }
        }
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// A plain-HTTP GET to a loopback address (`host:port`): `(status, body)`. For health
/// probes of etcd and the registry; no TLS, no redirects, small bodies.
pub async fn http_get(addr: &str, path: &str) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let fut = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let req = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        stream.read_to_end(&mut buf).await?;
        anyhow::Ok(buf)
    };
    let buf = tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .with_context(|| format!("GET http://{addr}{path} timed out"))??;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("GET http://{addr}{path}: no HTTP status in {head:?}"))?;
    Ok((status, body.to_string()))
}

/// Resolves on Ctrl-C (SIGINT) or SIGTERM: how the long-running commands are told to stop.
pub async fn shutdown_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C")?,
        _ = term.recv() => {}
    }
    Ok(())
}

/// The PID in `pid_file` if that process is alive and its command line names `program`
/// (PIDs get reused).
pub fn running_pid(pid_file: &Path, program: &str) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(pid_file)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    (pid_alive(pid) && String::from_utf8_lossy(&cmdline).contains(program)).then_some(pid)
}

/// `down` of a command that stays up in `dir` (`kmm-fleet`, `kmm-sandbox`): SIGTERM to the
/// process of `pid_file`, then wait up to `timeout` for it to finish its own clean-up.
/// `what` names it for people ("fleet", "sandbox").
pub fn stop_by_pid_file(
    dir: &Path,
    pid_file: &Path,
    program: &str,
    what: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let Some(pid) = running_pid(pid_file, program) else {
        let _ = std::fs::remove_file(pid_file);
        println!("no {what} running in {}", dir.display());
        return Ok(());
    };
    signal(pid, libc::SIGTERM);
    let started = std::time::Instant::now();
    while pid_alive(pid) {
        if started.elapsed() > timeout {
            anyhow::bail!(
                "{program} pid {pid} still running after {timeout:?}; kill it with `kill -9 {pid}`"
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "{what} in {} stopped ({:.1?})",
        dir.display(),
        started.elapsed()
    );
    Ok(())
}

/// `cargo` (the one running this process when there is one) without the build environment of
/// the test or build script this process may be. Under `cargo test`/nextest a process carries
/// its crate's `CARGO_MANIFEST_DIR`, `CARGO_PKG_*`, …; build scripts track some of it (ring's
/// tracks `CARGO_MANIFEST_DIR`), so passing it on would rebuild half the dependency tree in
/// the child and again at the next build from a shell.
pub fn cargo_command() -> tokio::process::Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = tokio::process::Command::new(cargo);
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("CARGO_PKG_")
            || k.starts_with("CARGO_BIN_")
            || k.starts_with("CARGO_CRATE_")
            || k.starts_with("NEXTEST")
            || [
                "CARGO_MANIFEST_DIR",
                "CARGO_MANIFEST_PATH",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "OUT_DIR",
            ]
            .contains(&k.as_ref())
        {
            cmd.env_remove(k.as_ref());
        }
    }
    cmd
}
