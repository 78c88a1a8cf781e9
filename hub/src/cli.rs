//! The command line of `kmm-hub`: one place for the tests and the binary. Every flag of `run`
//! can also be set through the environment variable named next to it.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use kmm_runtime::upstream_config::{self, Loaded, Overlay, UpstreamConfigError};

use crate::run::RunArgs;

/// kmm-fleet hub: ManagedClusterModule -> builds, signing, digest-pinned ManifestWorks.
#[derive(Parser, Debug)]
#[command(name = "kmm-hub", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Print the CRDs as YAML, or write one file per CRD into a directory.
    Crd {
        /// Write `<group>_<plural>.yaml` files here instead of printing.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Also write the generated CRD reference page to this file.
        #[arg(long)]
        reference: Option<PathBuf>,
    },
    /// Validate Module and ManagedClusterModule YAML files (multi-document allowed).
    Validate {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Sign a kernel module like the kernel's scripts/sign-file (replaces an existing signature).
    SignFile(crate::sign::cli::SignFileArgs),
    /// Sign the modules of an image and push it, as the hub does for a `sign` section.
    SignImage(Box<crate::sign::cli::SignImageArgs>),
    /// Check that an image's modules carry valid signatures by a certificate.
    VerifyImage(Box<crate::sign::cli::VerifyImageArgs>),
    /// Run the hub controller (MCM reconciler, webhook, admin port).
    Run(Box<crate::run::RunArgs>),
    /// Print, as YAML, the ManifestWorks the controller would write (no cluster needed).
    Render(crate::commands::render::RenderArgs),
    /// Check every ManagedClusterModule against coming kernels: one line per MCM and kernel
    /// with its verdict and reason; exit 0 only when all would work (no cluster needed).
    Preflight(crate::commands::preflight::PreflightArgs),
    /// Print the OpenShift MachineConfig that loads a kernel module on Day 1 (before the
    /// network), or that adds a firmware search path (no cluster needed).
    Machineconfig(crate::commands::machineconfig::MachineConfigArgs),
    /// Write a support bundle of the hub (objects, logs, events; Secrets as names only).
    MustGather(crate::commands::must_gather::MustGatherArgs),
}

/// Apply `--upstream-config` (if any) to the flags of `run` not given explicitly; `matches`
/// are those of `run`. A missing file changes nothing (upstream without its ConfigMap).
pub fn apply_upstream_config(
    run: &mut RunArgs,
    matches: Option<&clap::ArgMatches>,
) -> Result<Option<upstream_config::Report>, UpstreamConfigError> {
    let Some(path) = run.upstream_config.clone() else {
        return Ok(None);
    };
    if !path.exists() {
        return Ok(Some((path.display().to_string(), Vec::new())));
    }
    let loaded = Loaded::load(&path)?;
    let mut o = Overlay::new(&loaded, matches);
    apply_loaded(run, &loaded, &mut o)?;
    Ok(Some((loaded.path, o.report)))
}

/// The hub's mapping of upstream's keys.
pub fn apply_loaded(
    run: &mut RunArgs,
    loaded: &Loaded,
    o: &mut Overlay<'_>,
) -> Result<(), UpstreamConfigError> {
    upstream_config::apply_common(loaded, o, &mut run.common)?;
    let c = &loaded.config;
    if let Some(d) = c.job.as_ref().and_then(|j| j.gc_delay.as_deref()) {
        let d =
            upstream_config::go_duration(d).map_err(|m| loaded.value_error("job.gcDelay", m))?;
        o.set(
            "job.gcDelay",
            "job_gc_delay",
            &mut run.job_gc_delay,
            Some(d),
        );
    }
    let webhook = c.webhook.clone().unwrap_or_default();
    if let Some(dir) = &webhook.cert_dir {
        // controller-runtime's file names in its certificate directory.
        let dir = PathBuf::from(dir);
        o.set(
            "webhook.certDir",
            "webhook_cert",
            &mut run.webhook_cert,
            Some(dir.join("tls.crt")),
        );
        if run.webhook_cert == Some(dir.join("tls.crt")) {
            run.webhook_key = Some(dir.join("tls.key"));
        }
    }
    let port = [
        ("webhookPort", c.webhook_port),
        ("webhook.port", webhook.port),
    ];
    for (key, port) in port {
        let Some(port) = port else { continue };
        if run.webhook_cert.is_none() && !o.explicit("webhook_address") {
            o.ignore(
                key,
                "the webhook is off without a certificate (--webhook-cert/--webhook-key or webhook.certDir)",
            );
            continue;
        }
        o.set(
            key,
            "webhook_address",
            &mut run.webhook_address,
            Some(SocketAddr::from(([0, 0, 0, 0], port))),
        );
    }
    if webhook.disable_http2.is_some() {
        o.ignore(
            "webhook.disableHTTP2",
            "not configurable: the webhook listener negotiates HTTP/1.1 or HTTP/2",
        );
    }
    if c.worker.is_some() {
        o.ignore(
            "worker",
            "the hub runs no loader pods: set worker.* in the spoke's --upstream-config",
        );
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use kmm_runtime::upstream_config::Outcome;

    #[test]
    fn cli_parses_and_keeps_the_flag_names() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "kmm-hub",
            "run",
            "--resync",
            "30s",
            "--leader-elect",
            "false",
            "--log-format",
            "json",
            "--admin-address",
            "127.0.0.1:9000",
        ])
        .unwrap();
        let Command::Run(run) = cli.command else {
            panic!("not run")
        };
        assert_eq!(run.common.resync, std::time::Duration::from_secs(30));
        assert!(!run.common.leader_elect);
        assert_eq!(
            run.common.log_format,
            kmm_runtime::telemetry::LogFormat::Json
        );
        assert_eq!(run.admin_address().port(), 9000);
        let Command::Run(run) = Cli::try_parse_from(["kmm-hub", "run"]).unwrap().command else {
            panic!("not run")
        };
        assert!(run.common.leader_elect, "the hub elects by default");
        assert_eq!(run.common.lease_name, "kmm-hub.sigs.x-k8s.io");
        assert_eq!(run.admin_address().to_string(), "127.0.0.1:8081");
        assert_eq!(run.common.resync, std::time::Duration::from_secs(600));
        assert_eq!(run.common.log_filter, "info,kube_runtime=warn");
    }

    fn run_with(args: &[&str], file: &str) -> (RunArgs, Vec<(String, Outcome)>) {
        use clap::{CommandFactory, FromArgMatches};
        let m = Cli::command()
            .try_get_matches_from(["kmm-hub", "run"].iter().chain(args))
            .unwrap();
        let Command::Run(mut run) = Cli::from_arg_matches(&m).unwrap().command else {
            panic!("not run")
        };
        let loaded = Loaded::parse("f", file).unwrap();
        let mut o = Overlay::new(&loaded, m.subcommand_matches("run"));
        apply_loaded(&mut run, &loaded, &mut o).unwrap();
        (*run, o.report)
    }

    #[test]
    fn upstream_config_maps_onto_the_hub_flags() {
        let file = "healthProbeBindAddress: :9081\njob: {gcDelay: 1h30m}\n\
                    leaderElection: {enabled: false, resourceID: kmm-hub.sigs.x-k8s.io}\n\
                    webhookPort: 9443\nworker: {runAsUser: 0}\nmetrics: {bindAddress: '0'}\n";
        let (run, report) = run_with(&[], file);
        assert_eq!(run.admin_address().to_string(), "0.0.0.0:9081");
        assert_eq!(run.job_gc_delay, Some(std::time::Duration::from_secs(5400)));
        assert!(!run.common.leader_elect);
        assert_eq!(run.common.metrics_address, None);
        // No certificate: the webhook stays off and the port is reported, as is worker.*.
        assert_eq!(run.webhook_address, None);
        let ignored: Vec<&str> = report
            .iter()
            .filter(|(_, o)| matches!(o, Outcome::Ignored(_)))
            .map(|(k, _)| k.as_str())
            .collect();
        assert_eq!(ignored, vec!["webhookPort", "worker"]);

        // webhook.certDir gives the certificate, so the port turns the webhook on.
        let (run, _) = run_with(&[], "webhook: {port: 9444, certDir: /certs}\n");
        assert_eq!(run.webhook_address.unwrap().to_string(), "0.0.0.0:9444");
        assert_eq!(run.webhook_cert.unwrap(), PathBuf::from("/certs/tls.crt"));
        assert_eq!(run.webhook_key.unwrap(), PathBuf::from("/certs/tls.key"));
    }

    #[test]
    fn hub_flags_win_over_the_upstream_config() {
        let (run, report) = run_with(
            &["--job-gc-delay", "0s", "--admin-address", "127.0.0.1:7000"],
            "healthProbeBindAddress: :9081\njob: {gcDelay: 10m}\n",
        );
        assert_eq!(run.job_gc_delay, Some(std::time::Duration::ZERO));
        assert_eq!(run.admin_address().to_string(), "127.0.0.1:7000");
        assert!(report.contains(&(
            "job.gcDelay".to_string(),
            Outcome::Overridden("--job-gc-delay".into())
        )));
    }

    #[test]
    fn run_flags_read_the_hub_environment() {
        use clap::CommandFactory;
        let cmd = Cli::command();
        let run = cmd
            .get_subcommands()
            .find(|c| c.get_name() == "run")
            .unwrap();
        let env: Vec<String> = run
            .get_arguments()
            .filter_map(|a| a.get_env())
            .map(|e| e.to_string_lossy().into_owned())
            .collect();
        for name in [
            "KMM_HUB_LOG_FORMAT",
            "RUST_LOG",
            "KMM_HUB_ADMIN_ADDRESS",
            "KMM_HUB_LEADER_ELECT",
            "KMM_HUB_LEASE_NAME",
            "KMM_HUB_RESYNC",
            "KMM_HUB_RELEASE_AFTER",
        ] {
            assert!(env.iter().any(|e| e == name), "{name} missing: {env:?}");
        }
    }
}
