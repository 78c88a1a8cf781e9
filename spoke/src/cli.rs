//! Command-line interface: `kmm-spoke run` and `kmm-spoke render`. Every flag can also be
//! set through the environment variable named next to it.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use kmm_runtime::upstream_config::{self, Loaded, Overlay, UpstreamConfigError};

use crate::render::{
    DEFAULT_FIRMWARE_HOST_PATH, DEFAULT_LOADER_SELINUX_TYPE, DEFAULT_LOADER_SERVICE_ACCOUNT,
    RenderSettings,
};

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
    Run(Box<RunArgs>),
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
    /// `runAsUser` of loader containers.
    #[arg(long, env = "KMM_SPOKE_LOADER_RUN_AS_USER", default_value_t = 0)]
    pub loader_run_as_user: i64,
    /// SELinux type of loader containers.
    #[arg(long, env = "KMM_SPOKE_LOADER_SELINUX_TYPE", default_value = DEFAULT_LOADER_SELINUX_TYPE)]
    pub loader_selinux_type: String,
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
            loader_run_as_user: self.loader_run_as_user,
            loader_selinux_type: self.loader_selinux_type.clone(),
        }
    }
}

#[derive(Args, Debug)]
#[command(
    mut_arg("log_format", |a| a.env("KMM_SPOKE_LOG_FORMAT")),
    mut_arg("log_filter", |a| a.env("KMM_SPOKE_LOG_FILTER").default_value("info,kube=warn")),
    mut_arg("metrics_address", |a| a.env("KMM_SPOKE_METRICS_ADDRESS")),
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
    /// How long a node's label writes (every Module's and the kernel label) are gathered
    /// before the one write that carries them all (e.g. 500ms, 1s).
    #[arg(long, env = "KMM_SPOKE_NODE_WRITE_DELAY", default_value = "500ms", value_parser = kmm_runtime::cli::parse_duration)]
    pub node_write_delay: std::time::Duration,
    /// The least time between two writes of one node: changes that follow a write within it
    /// wait and go together in the next one.
    #[arg(long, env = "KMM_SPOKE_NODE_WRITE_INTERVAL", default_value = "2s", value_parser = kmm_runtime::cli::parse_duration)]
    pub node_write_interval: std::time::Duration,
    /// How long a Module status change under the same spec (pods and DaemonSets moving) must
    /// last before it is written; a spec change's status is written at once.
    #[arg(long, env = "KMM_SPOKE_STATUS_WRITE_DELAY", default_value = "2s", value_parser = kmm_runtime::cli::parse_duration)]
    pub status_write_delay: std::time::Duration,
    /// Address of the admission webhook (TLS): Module validation and the namespace guard;
    /// off when not set.
    #[arg(long, env = "KMM_SPOKE_WEBHOOK_ADDRESS", requires_all = ["webhook_cert", "webhook_key"])]
    pub webhook_address: Option<SocketAddr>,
    /// PEM certificate (chain) of the webhook, reloaded when the file changes.
    #[arg(long, env = "KMM_SPOKE_WEBHOOK_CERT", requires = "webhook_address")]
    pub webhook_cert: Option<PathBuf>,
    /// PEM private key of the webhook.
    #[arg(long, env = "KMM_SPOKE_WEBHOOK_KEY", requires = "webhook_address")]
    pub webhook_key: Option<PathBuf>,
    #[command(flatten)]
    pub render: RenderFlags,
    /// Upstream KMM's `controller_config.yaml` (the `kmm-operator-manager-config` ConfigMap,
    /// mounted): its keys set the flags not given explicitly. A missing file means defaults.
    #[arg(long, visible_alias = "config", env = "KMM_SPOKE_UPSTREAM_CONFIG")]
    pub upstream_config: Option<PathBuf>,
}

impl RunArgs {
    /// Apply `--upstream-config` (if any) to the flags not given explicitly; `matches` are
    /// those of `run`. Returns what became of each key, for the log.
    pub fn apply_upstream_config(
        &mut self,
        matches: Option<&clap::ArgMatches>,
    ) -> Result<Option<upstream_config::Report>, UpstreamConfigError> {
        let Some(path) = self.upstream_config.clone() else {
            return Ok(None);
        };
        if !path.exists() {
            return Ok(Some((path.display().to_string(), Vec::new())));
        }
        let loaded = Loaded::load(&path)?;
        let mut o = Overlay::new(&loaded, matches);
        self.apply_loaded(&loaded, &mut o)?;
        Ok(Some((loaded.path, o.report)))
    }

    /// The spoke's mapping of upstream's keys.
    pub fn apply_loaded(
        &mut self,
        loaded: &Loaded,
        o: &mut Overlay<'_>,
    ) -> Result<(), UpstreamConfigError> {
        upstream_config::apply_common(loaded, o, &mut self.common)?;
        let c = &loaded.config;
        if c.webhook_port.is_some() {
            o.ignore(
                "webhookPort",
                "kmm-spoke has no webhook listener to configure",
            );
        }
        if c.webhook.is_some() {
            o.ignore("webhook", "kmm-spoke has no webhook listener to configure");
        }
        if c.job.as_ref().is_some_and(|j| j.gc_delay.is_some()) {
            o.ignore(
                "job.gcDelay",
                "the spoke runs no build or sign pods (the hub builds)",
            );
        }
        if let Some(w) = &c.worker {
            if let Some(u) = w.run_as_user {
                o.set(
                    "worker.runAsUser",
                    "loader_run_as_user",
                    &mut self.render.loader_run_as_user,
                    u,
                );
            }
            if let Some(t) = &w.se_linux_type {
                o.set(
                    "worker.seLinuxType",
                    "loader_selinux_type",
                    &mut self.render.loader_selinux_type,
                    t.clone(),
                );
            }
            // The loader copies firmware there and points the kernel's firmware_class
            // search path at it: both of upstream's keys mean that directory.
            for (key, value) in [
                ("worker.firmwareHostPath", &w.firmware_host_path),
                ("worker.setFirmwareClassPath", &w.set_firmware_class_path),
            ] {
                if let Some(p) = value {
                    o.set(
                        key,
                        "firmware_host_path",
                        &mut self.render.firmware_host_path,
                        p.clone(),
                    );
                }
            }
        }
        Ok(())
    }

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
    fn upstream_config_maps_onto_the_spoke_flags() {
        use clap::{CommandFactory, FromArgMatches};
        use kmm_runtime::upstream_config::Outcome;
        let m = Cli::command()
            .try_get_matches_from([
                "kmm-spoke",
                "run",
                "--config",
                "/x.yaml",
                "--loader-selinux-type",
                "flag_t",
            ])
            .unwrap();
        let Command::Run(mut run) = Cli::from_arg_matches(&m).unwrap().command else {
            panic!("not run")
        };
        assert_eq!(run.upstream_config, Some(PathBuf::from("/x.yaml")));
        let loaded = Loaded::parse(
            "f",
            "worker: {runAsUser: 1000, seLinuxType: file_t, setFirmwareClassPath: /lib/firmware}\n\
             job: {gcDelay: 1m}\nwebhookPort: 9443\nleaderElection: {enabled: true, resourceID: s}\n\
             metrics: {bindAddress: '127.0.0.1:9090'}\nbogus: {x: 1}\n",
        )
        .unwrap();
        let mut o = Overlay::new(&loaded, m.subcommand_matches("run"));
        run.apply_loaded(&loaded, &mut o).unwrap();
        let s = run.render.settings();
        assert_eq!(s.loader_run_as_user, 1000);
        assert_eq!(s.loader_selinux_type, "flag_t", "the flag wins");
        assert_eq!(s.firmware_host_path, "/lib/firmware");
        assert!(run.common.leader_elect);
        assert_eq!(run.common.lease_name, "s");
        assert_eq!(
            run.common.metrics_address,
            Some("127.0.0.1:9090".parse().unwrap())
        );
        assert_eq!(o.not_applied(), vec!["bogus", "webhookPort", "job.gcDelay"]);
        assert!(o.report.contains(&(
            "worker.seLinuxType".to_string(),
            Outcome::Overridden("--loader-selinux-type".into())
        )));
        // A missing file: nothing applied, no error (upstream without its ConfigMap).
        run.upstream_config = Some(PathBuf::from("/nonexistent/controller_config.yaml"));
        let (_, report) = run.apply_upstream_config(None).unwrap().unwrap();
        assert!(report.is_empty());
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
        assert!(
            run.webhook_address.is_none(),
            "the webhook is off by default"
        );
    }

    #[test]
    fn the_webhook_needs_its_certificate_and_key() {
        let base = ["kmm-spoke", "run", "--webhook-address", "127.0.0.1:9443"];
        assert!(Cli::try_parse_from(base).is_err());
        assert!(Cli::try_parse_from(["kmm-spoke", "run", "--webhook-cert", "c"]).is_err());
        let full = [&base[..], &["--webhook-cert", "c", "--webhook-key", "k"]].concat();
        let Command::Run(run) = Cli::try_parse_from(full).unwrap().command else {
            panic!("not run")
        };
        assert_eq!(run.webhook_cert, Some(PathBuf::from("c")));
    }
}
