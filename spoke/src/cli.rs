//! Command-line interface: `kmm-spoke run` and `kmm-spoke render`. Every flag can also be
//! set through the environment variable named next to it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::render::{DEFAULT_FIRMWARE_HOST_PATH, DEFAULT_LOADER_SERVICE_ACCOUNT, RenderSettings};

#[derive(Parser, Debug)]
#[command(
    name = "kmm-spoke",
    version,
    about = "kmm-fleet spoke agent: Modules into loader and device-plugin DaemonSets"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the agent against the cluster.
    Run(RunArgs),
    /// Print, as YAML, the DaemonSets and node labels the agent would write for a Module
    /// and a set of Nodes, without a cluster.
    Render(RenderArgs),
}

#[derive(Args, Debug, Clone)]
pub struct RenderFlags {
    /// Host directory that firmware files are copied into.
    #[arg(long, env = "KMM_SPOKE_FIRMWARE_HOST_PATH", default_value = DEFAULT_FIRMWARE_HOST_PATH)]
    pub firmware_host_path: String,
    /// Service account of loader pods when the Module names none.
    #[arg(long, env = "KMM_SPOKE_LOADER_SERVICE_ACCOUNT", default_value = DEFAULT_LOADER_SERVICE_ACCOUNT)]
    pub loader_service_account: String,
    /// Priority class of device-plugin pods; empty for none.
    #[arg(
        long,
        env = "KMM_SPOKE_DEVICE_PLUGIN_PRIORITY_CLASS",
        default_value = "system-node-critical"
    )]
    pub device_plugin_priority_class: String,
    /// Priority class of loader pods; empty for none.
    #[arg(
        long,
        env = "KMM_SPOKE_LOADER_PRIORITY_CLASS",
        default_value = "system-node-critical"
    )]
    pub loader_priority_class: String,
}

impl RenderFlags {
    pub fn settings(&self) -> RenderSettings {
        RenderSettings {
            firmware_host_path: self.firmware_host_path.clone(),
            loader_service_account: self.loader_service_account.clone(),
            device_plugin_priority_class: Some(self.device_plugin_priority_class.clone())
                .filter(|p| !p.is_empty()),
            loader_priority_class: Some(self.loader_priority_class.clone())
                .filter(|p| !p.is_empty()),
        }
    }
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Kubeconfig file; without it the in-cluster configuration (or the default kubeconfig) is used.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Address of /livez, /readyz and /metrics [default: 0.0.0.0:8081 in a pod, 127.0.0.1:8081 elsewhere].
    #[arg(long, env = "KMM_SPOKE_ADMIN_ADDRESS")]
    pub admin_address: Option<SocketAddr>,
    /// Elect a leader among replicas on a coordination.k8s.io Lease.
    #[arg(long, env = "KMM_SPOKE_LEADER_ELECT", default_value_t = false, action = clap::ArgAction::Set)]
    pub leader_elect: bool,
    /// Name of the leader-election Lease.
    #[arg(long, env = "KMM_SPOKE_LEASE_NAME", default_value = "kmm-spoke")]
    pub lease_name: String,
    /// Namespace of the leader-election Lease.
    #[arg(
        long,
        env = "KMM_SPOKE_LEASE_NAMESPACE",
        default_value = "kmm-operator-system"
    )]
    pub lease_namespace: String,
    /// Identity for the lease and events [default: $POD_NAME, else the host name].
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Full resync period (e.g. 600, 600s, 10m, 1h).
    #[arg(long, env = "KMM_SPOKE_RESYNC_PERIOD", default_value = "10m", value_parser = parse_duration)]
    pub resync_period: Duration,
    /// Publish the kernel-versions ClusterClaim(s) (needs the OCM ClusterClaim CRD).
    #[arg(long, env = "KMM_SPOKE_CLUSTER_CLAIMS", default_value_t = true, action = clap::ArgAction::Set)]
    pub cluster_claims: bool,
    /// Concurrent Module reconciles.
    #[arg(long, env = "KMM_SPOKE_WORKERS", default_value_t = 2)]
    pub workers: usize,
    /// Log format: plain or json.
    #[arg(long, env = "KMM_SPOKE_LOG_FORMAT", default_value = "plain")]
    pub log_format: shared_api::runtime::telemetry::LogFormat,
    /// Log filter (RUST_LOG syntax; RUST_LOG itself wins).
    #[arg(long, env = "KMM_SPOKE_LOG_FILTER", default_value = "info,kube=warn")]
    pub log_filter: String,
    #[command(flatten)]
    pub render: RenderFlags,
}

impl RunArgs {
    pub fn admin_address(&self) -> SocketAddr {
        self.admin_address.unwrap_or_else(|| {
            let in_pod = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
            let ip = if in_pod { [0, 0, 0, 0] } else { [127, 0, 0, 1] };
            SocketAddr::from((ip, 8081))
        })
    }

    pub fn identity(&self) -> String {
        self.identity
            .clone()
            .filter(|i| !i.is_empty())
            .unwrap_or_else(|| {
                let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .map(|h| h.trim().to_string())
                    .ok()
                    .filter(|h| !h.is_empty())
                    .unwrap_or_else(|| "kmm-spoke".into());
                format!("{host}-{}", std::process::id())
            })
    }
}

#[derive(Args, Debug)]
pub struct RenderArgs {
    /// A YAML file holding the Module (other documents are ignored).
    #[arg(long, env = "KMM_SPOKE_RENDER_MODULE")]
    pub module: PathBuf,
    /// A YAML file of Nodes: a list, a `kind: List`, or several documents.
    #[arg(long, env = "KMM_SPOKE_RENDER_NODES")]
    pub nodes: PathBuf,
    /// Validate as for this Kubernetes minor version (e.g. 20); unknown by default.
    #[arg(long, env = "KMM_SPOKE_RENDER_KUBERNETES_MINOR")]
    pub kubernetes_minor: Option<u32>,
    #[command(flatten)]
    pub render: RenderFlags,
}

/// `600`, `600s`, `10m`, `1h`, `500ms`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 600, 600s, 10m, 1h)"))?;
    let d = match unit {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        other => return Err(format!("unknown unit {other:?} in {s:?} (ms, s, m, h)")),
    };
    if d.is_zero() {
        return Err("must be more than zero".into());
    }
    Ok(d)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("600").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert!(parse_duration("0").is_err());
        assert!(parse_duration("5d").is_err());
        assert!(parse_duration("x").is_err());
    }

    #[test]
    fn cli_parses() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "kmm-spoke",
            "run",
            "--leader-elect",
            "true",
            "--resync-period",
            "30s",
        ])
        .unwrap();
        let Command::Run(run) = cli.command else {
            panic!("not run")
        };
        assert!(run.leader_elect);
        assert_eq!(run.resync_period, Duration::from_secs(30));
        assert_eq!(run.render.firmware_host_path, "/var/lib/firmware");
    }
}
