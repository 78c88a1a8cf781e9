//! The command line of `kmm-hub`: one place for the tests and the binary. Every flag of `run`
//! can also be set through the environment variable named next to it.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

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
    /// Print the OpenShift MachineConfig that loads a kernel module on Day 1 (before the
    /// network), or that adds a firmware search path (no cluster needed).
    Machineconfig(crate::commands::machineconfig::MachineConfigArgs),
    /// Write a support bundle of the hub (objects, logs, events; Secrets as names only).
    MustGather(crate::commands::must_gather::MustGatherArgs),
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

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
