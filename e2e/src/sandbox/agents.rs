//! The real `kmm-hub` and `kmm-spoke` binaries, run as processes the way their Deployments in
//! manifests/ run them: the Deployment's arguments and environment (downward-API fields
//! resolved as the kubelet would), the ServiceAccount's token as the only credential, and
//! loopback addresses instead of `0.0.0.0`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use serde_json::Value;

use crate::process::{ManagedProcess, free_port, http_get};

/// The hub and spoke Deployments, as shipped.
pub const HUB_DEPLOYMENT: &str = include_str!("../../../manifests/hub/deployment.yaml");
pub const SPOKE_DEPLOYMENT: &str = include_str!("../../../manifests/spoke/deployment.yaml");

/// The workspace root (where `cargo build` runs).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `kmm-hub` and `kmm-spoke` next to the running executable (`target/<profile>/`, also for
/// test executables in `target/<profile>/deps/`). For tests and under `cargo run` (`$CARGO`
/// is set) they are (re)built first with the same profile, a no-op when they are up to
/// date; otherwise only when missing. Build output goes to `log`.
pub async fn locate_binaries(
    hub: Option<PathBuf>,
    spoke: Option<PathBuf>,
    log: &Path,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    if let (Some(h), Some(s)) = (&hub, &spoke) {
        return Ok((h.clone(), s.clone()));
    }
    let exe = std::env::current_exe().context("locating the running executable")?;
    let mut profile_dir = exe.parent().context("executable without a directory")?;
    // Test executables live in target/<profile>/deps/: always build for them, as cargo
    // test does not rebuild other packages' binaries.
    let is_test = profile_dir.file_name().is_some_and(|n| n == "deps");
    if is_test {
        profile_dir = profile_dir.parent().context("deps without a parent")?;
    }
    let hub_bin = hub.unwrap_or_else(|| profile_dir.join("kmm-hub"));
    let spoke_bin = spoke.unwrap_or_else(|| profile_dir.join("kmm-spoke"));
    let under_cargo = is_test || std::env::var_os("CARGO").is_some();
    // scripts/test builds them right before the tests (same command as below).
    let prebuilt = std::env::var_os("KMM_E2E_BINARIES_BUILT").is_some();
    if (under_cargo && !prebuilt) || !hub_bin.is_file() || !spoke_bin.is_file() {
        let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") => "dev".to_string(),
            Some(p) => p.to_string(),
            None => bail!("cannot tell the cargo profile of {}", exe.display()),
        };
        let target_dir = profile_dir.parent().context("no target directory")?;
        let out =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = crate::process::cargo_command();
        let status = cmd
            .args([
                "build",
                "-p",
                "kmm-hub",
                "-p",
                "kmm-spoke",
                "--bin",
                "kmm-hub",
                "--bin",
                "kmm-spoke",
                "--profile",
                &profile,
            ])
            .arg("--target-dir")
            .arg(target_dir)
            .current_dir(workspace_root())
            .stdout(out.try_clone()?)
            .stderr(out)
            .status()
            .await
            .context("running cargo build -p kmm-hub -p kmm-spoke")?;
        ensure!(
            status.success(),
            "cargo build -p kmm-hub -p kmm-spoke failed:\n{}",
            crate::process::log_tail(log, 30)
        );
    }
    for b in [&hub_bin, &spoke_bin] {
        ensure!(b.is_file(), "{} does not exist", b.display());
    }
    Ok((hub_bin, spoke_bin))
}

/// The first container, the args and the environment of a Deployment, with `fieldRef`s
/// resolved for a pod named `pod_name`.
pub fn deployment_command(
    yaml: &str,
    pod_name: &str,
) -> anyhow::Result<(Vec<String>, BTreeMap<String, String>)> {
    let d: Value = serde_yaml::from_str(yaml).context("parsing a Deployment")?;
    let c = &d["spec"]["template"]["spec"]["containers"][0];
    let args = c["args"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a.as_str().map(str::to_string))
        .collect();
    let mut env = BTreeMap::new();
    for e in c["env"].as_array().into_iter().flatten() {
        let name = e["name"].as_str().unwrap_or_default().to_string();
        let value = match e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            None => e["value"].as_str().unwrap_or_default().to_string(),
            Some("metadata.namespace") => d["metadata"]["namespace"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            Some("metadata.name") => pod_name.to_string(),
            Some(other) => bail!("unsupported fieldRef {other} in the Deployment"),
        };
        env.insert(name, value);
    }
    Ok((args, env))
}

/// One agent process (the hub or a spoke agent) that can be stopped, killed and started
/// again with the same command.
#[derive(Debug)]
pub struct Agent {
    pub name: String,
    program: PathBuf,
    args: Vec<String>,
    env: BTreeMap<String, String>,
    pub admin: SocketAddr,
    pub log: PathBuf,
    process: Option<ManagedProcess>,
}

impl Agent {
    fn new(
        name: &str,
        program: &Path,
        args: Vec<String>,
        env: BTreeMap<String, String>,
        admin: SocketAddr,
        log: PathBuf,
    ) -> Self {
        Self {
            name: name.into(),
            program: program.into(),
            args,
            env,
            admin,
            log,
            process: None,
        }
    }

    /// The hub, as manifests/hub/deployment.yaml runs it: `kubeconfig` holds the
    /// ServiceAccount's token, `config` the configuration file; webhook on `webhook`
    /// (with `tls` = (cert, key)), dashboard in plain HTTP on `dashboard` (loopback only).
    #[allow(clippy::too_many_arguments)]
    pub fn hub(
        program: &Path,
        kubeconfig: &Path,
        config: &Path,
        webhook: SocketAddr,
        tls: (&Path, &Path),
        dashboard: SocketAddr,
        resync: Duration,
        log: PathBuf,
    ) -> anyhow::Result<Self> {
        let (args, mut env) = deployment_command(HUB_DEPLOYMENT, "kmm-hub-sandbox")?;
        let args = args
            .into_iter()
            .map(|a| {
                if a.starts_with("--config=") {
                    format!("--config={}", config.display())
                } else {
                    a
                }
            })
            .collect();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        env.insert("KUBECONFIG".into(), kubeconfig.display().to_string());
        env.insert("KMM_HUB_ADMIN_ADDRESS".into(), admin.to_string());
        env.insert("KMM_HUB_WEBHOOK_ADDRESS".into(), webhook.to_string());
        env.insert("KMM_HUB_WEBHOOK_CERT".into(), tls.0.display().to_string());
        env.insert("KMM_HUB_WEBHOOK_KEY".into(), tls.1.display().to_string());
        env.insert("KMM_HUB_DASHBOARD_ADDRESS".into(), dashboard.to_string());
        // Plain HTTP on loopback: the browser needs no certificate exception.
        env.remove("KMM_HUB_DASHBOARD_CERT");
        env.remove("KMM_HUB_DASHBOARD_KEY");
        env.insert("KMM_HUB_LOG_FORMAT".into(), "text".into());
        // The pod's emptyDir: a directory beside the log.
        env.insert(
            "KMM_HUB_WORK_DIR".into(),
            log.with_file_name("kmm-hub-work").display().to_string(),
        );
        env.insert(
            "KMM_HUB_RESYNC".into(),
            format!("{}s", resync.as_secs().max(1)),
        );
        Ok(Self::new("kmm-hub", program, args, env, admin, log))
    }

    /// A spoke agent, as manifests/spoke/deployment.yaml runs it.
    pub fn spoke(
        program: &Path,
        cluster: &str,
        kubeconfig: &Path,
        log: PathBuf,
    ) -> anyhow::Result<Self> {
        let (args, mut env) =
            deployment_command(SPOKE_DEPLOYMENT, &format!("kmm-spoke-{cluster}"))?;
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        env.insert("KUBECONFIG".into(), kubeconfig.display().to_string());
        env.insert("KMM_SPOKE_ADMIN_ADDRESS".into(), admin.to_string());
        env.insert("KMM_SPOKE_LOG_FORMAT".into(), "plain".into());
        // No webhook in the sandbox: its API servers are not configured to call one, and the
        // Deployment's listen address is not loopback.
        for k in [
            "KMM_SPOKE_WEBHOOK_ADDRESS",
            "KMM_SPOKE_WEBHOOK_CERT",
            "KMM_SPOKE_WEBHOOK_KEY",
        ] {
            env.remove(k);
        }
        Ok(Self::new(
            &format!("kmm-spoke ({cluster})"),
            program,
            args,
            env,
            admin,
            log,
        ))
    }

    /// Starts the process (`env -i` gives it exactly the Deployment's environment) and
    /// waits until `/readyz` answers 200.
    pub async fn start(&mut self, timeout: Duration) -> anyhow::Result<()> {
        if self.process.is_some() {
            return Ok(());
        }
        let mut args = vec!["-i".to_string()];
        args.extend(self.env.iter().map(|(k, v)| format!("{k}={v}")));
        args.push(self.program.display().to_string());
        args.extend(self.args.iter().cloned());
        let mut p = ManagedProcess::spawn(&self.name, Path::new("/usr/bin/env"), &args, &self.log)?;
        let started = Instant::now();
        let addr = self.admin.to_string();
        loop {
            if let Ok((200, _)) = http_get(&addr, "/readyz").await {
                break;
            }
            if let Some(status) = p.exited() {
                bail!(
                    "{} exited ({status}) while starting; log {}:\n{}",
                    self.name,
                    self.log.display(),
                    p.log_tail(30)
                );
            }
            if started.elapsed() > timeout {
                let why = http_get(&addr, "/readyz")
                    .await
                    .map(|(c, b)| format!("{c} {b}"))
                    .unwrap_or_else(|e| e.to_string());
                bail!(
                    "{} not ready after {timeout:?} (/readyz: {why}); log {}:\n{}",
                    self.name,
                    self.log.display(),
                    p.log_tail(30)
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        self.process = Some(p);
        Ok(())
    }

    /// SIGTERM, then SIGKILL after a grace period.
    pub async fn stop(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.stop(Duration::from_secs(10)).await;
        }
    }

    /// SIGKILL at once, as a crash or an evicted pod.
    pub async fn kill(&mut self) {
        if let Some(mut p) = self.process.take() {
            crate::process::signal(p.pid(), libc::SIGKILL);
            p.stop(Duration::from_secs(5)).await;
        }
    }

    pub async fn restart(&mut self, timeout: Duration) -> anyhow::Result<()> {
        self.stop().await;
        self.start(timeout).await
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(ManagedProcess::pid)
    }

    /// Whether it is running (started and not exited).
    pub fn running(&mut self) -> bool {
        self.process.as_mut().is_some_and(|p| p.exited().is_none())
    }

    pub fn log_tail(&self, lines: usize) -> String {
        crate::process::log_tail(&self.log, lines)
    }

    /// A sample from `/metrics`, e.g. `kmm_hub_builds_total{outcome="created"}` (0 when absent).
    pub async fn metric(&self, name_and_labels: &str) -> anyhow::Result<f64> {
        let (_, text) = http_get(&self.admin.to_string(), "/metrics").await?;
        Ok(text
            .lines()
            .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn deployments_resolve() {
        let (args, env) = deployment_command(HUB_DEPLOYMENT, "p").unwrap();
        assert_eq!(args[0], "run");
        assert_eq!(env["OPERATOR_NAMESPACE"], "kmm-hub");
        assert_eq!(env["POD_NAME"], "p");
        let (args, env) = deployment_command(SPOKE_DEPLOYMENT, "p").unwrap();
        assert_eq!(args[0], "run");
        assert_eq!(env["KMM_SPOKE_LEASE_NAMESPACE"], "kmm-spoke");
    }
}
