//! Command-line interface: `kmm-spoke run` and `kmm-spoke render`. Every flag can also be
//! set through the environment variable named next to it.

use std::net::SocketAddr;
use std::path::PathBuf;

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
    /// Write a support bundle of the spoke (objects, logs, events; Secrets as names only).
    MustGather(kmm_runtime::gather::GatherArgs),
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
#[command(
    mut_arg("log_format", |a| a.env("KMM_SPOKE_LOG_FORMAT")),
    mut_arg("log_filter", |a| a.env("KMM_SPOKE_LOG_FILTER").default_value("info,kube=warn")),
    mut_arg("admin_address", |a| a.env("KMM_SPOKE_ADMIN_ADDRESS").help(
        "Address of /livez, /readyz and /metrics [default: 0.0.0.0:8081 in a pod, 127.0.0.1:8081 elsewhere]"
    )),
    mut_arg("leader_elect", |a| a.env("KMM_SPOKE_LEADER_ELECT")),
    mut_arg("lease_name", |a| a.env("KMM_SPOKE_LEASE_NAME").default_value("kmm-spoke")),
    mut_arg("resync", |a| a
        .long("resync-period")
        .value_name("RESYNC_PERIOD")
        .env("KMM_SPOKE_RESYNC_PERIOD")
        .help("Full resync period (e.g. 600, 600s, 10m, 1h)")),
)]
pub struct RunArgs {
    /// Log format and filter, admin address, leader election, resync period.
    #[command(flatten)]
    pub common: kmm_runtime::cli::CommonArgs,
    /// Kubeconfig file; without it the in-cluster configuration (or the default kubeconfig) is used.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
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
    /// Publish the kernel-versions ClusterClaim(s) (needs the OCM ClusterClaim CRD).
    #[arg(long, env = "KMM_SPOKE_CLUSTER_CLAIMS", default_value_t = true, action = clap::ArgAction::Set)]
    pub cluster_claims: bool,
    /// Concurrent Module reconciles.
    #[arg(long, env = "KMM_SPOKE_WORKERS", default_value_t = 2)]
    pub workers: usize,
    #[command(flatten)]
    pub render: RenderFlags,
}

impl RunArgs {
    pub fn admin_address(&self) -> SocketAddr {
        self.common.admin_address.unwrap_or_else(|| {
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

pub use kmm_runtime::cli::parse_duration;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::time::Duration;

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
        assert!(run.common.leader_elect);
        assert_eq!(run.common.resync, Duration::from_secs(30));
        assert_eq!(run.render.firmware_host_path, "/var/lib/firmware");
        let Command::Run(run) = Cli::try_parse_from(["kmm-spoke", "run"]).unwrap().command else {
            panic!("not run")
        };
        assert!(
            !run.common.leader_elect,
            "the spoke runs one replica by default"
        );
        assert_eq!(run.common.lease_name, "kmm-spoke");
        assert_eq!(run.common.resync, Duration::from_secs(600));
        assert_eq!(run.common.log_filter, "info,kube=warn");
        assert_eq!(
            run.common.log_format,
            kmm_runtime::telemetry::LogFormat::Plain
        );
    }
}
