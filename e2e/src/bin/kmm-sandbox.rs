//! `kmm-sandbox`: kmm-fleet on a local fleet with the KMM labs applied.
//!
//! ```text
//! kmm-sandbox                       # = up: start, apply the labs, stay up until Ctrl-C
//! kmm-sandbox up --until-ready      # exit 0 once every lab has converged, else explain why
//! kmm-sandbox up --labs kmm-ci-a,kmm-ci-a-load
//! kmm-sandbox up --ordered-upgrade  # then the labs' ordered upgrade, scripted, on spoke-1
//! kmm-sandbox down                  # stop a sandbox running in --dir
//! kmm-sandbox labs                  # list the labs
//! ```
//!
//! It starts the test world's hub and two spokes (real kube-apiservers, simulated nodes
//! with two kernels and a Secure Boot node), installs kmm-fleet from manifests/, runs the
//! real `kmm-hub` and `kmm-spoke` binaries under their ServiceAccounts, applies every lab of
//! the KMM labs as a ManagedClusterModule, and waits until each has converged. See
//! docs/user-guide.md.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand};
use kmm_e2e::process::{running_pid, shutdown_signal, stop_by_pid_file};
use kmm_e2e::sandbox::progress::Progress;
use kmm_e2e::sandbox::{Sandbox, SandboxOptions};

const PID_FILE: &str = "kmm-sandbox.pid";

#[derive(Parser, Debug)]
#[command(
    name = "kmm-sandbox",
    about = "kmm-fleet with the KMM labs on a local fleet (hub + 2 spokes, simulated nodes)"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    up: UpArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Start the sandbox and apply the labs (the default).
    Up(UpArgs),
    /// Stop the sandbox running in --dir.
    Down {
        #[arg(long, env = "KMM_SANDBOX_DIR", default_value = "/tmp/kmm-sandbox")]
        dir: PathBuf,
    },
    /// List the labs.
    Labs,
}

#[derive(Args, Debug, Clone)]
struct UpArgs {
    /// Exit once every lab has converged (0), or when --timeout passes (1, with the reason),
    /// instead of staying up until Ctrl-C.
    #[arg(long, env = "KMM_SANDBOX_UNTIL_READY", default_value_t = false)]
    until_ready: bool,
    /// How long the labs may take to converge.
    #[arg(long, env = "KMM_SANDBOX_TIMEOUT", default_value = "10m", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Directory for kubeconfigs, certificates, logs and registry storage (kept).
    #[arg(long, env = "KMM_SANDBOX_DIR", default_value = "/tmp/kmm-sandbox")]
    dir: PathBuf,
    /// Labs to apply (comma-separated names, see `kmm-sandbox labs`); all by default.
    #[arg(long, env = "KMM_SANDBOX_LABS", value_delimiter = ',')]
    labs: Vec<String>,
    /// After the labs, demonstrate the ordered upgrade on spoke-1 (0.9 -> 1.0, scripted).
    #[arg(long, env = "KMM_SANDBOX_ORDERED_UPGRADE", default_value_t = false)]
    ordered_upgrade: bool,
    /// The hub's resync period.
    #[arg(long, env = "KMM_SANDBOX_HUB_RESYNC", default_value = "30s", value_parser = humantime::parse_duration)]
    hub_resync: Duration,
    /// A prebuilt kmm-hub binary (default: next to this one, built with cargo if needed).
    #[arg(long, env = "KMM_SANDBOX_HUB_BIN")]
    hub_bin: Option<PathBuf>,
    /// A prebuilt kmm-spoke binary (default: next to this one, built with cargo if needed).
    #[arg(long, env = "KMM_SANDBOX_SPOKE_BIN")]
    spoke_bin: Option<PathBuf>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error,kube_client=off")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let outcome = match cli.command {
        Some(Command::Labs) => {
            list_labs();
            Ok(())
        }
        Some(Command::Down { dir }) => down(&dir),
        Some(Command::Up(args)) => run_up(args),
        None => run_up(cli.up),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kmm-sandbox: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn list_labs() {
    for lab in kmm_e2e::labs::labs("<registry>") {
        println!("{:<24} {}", lab.name, lab.title);
    }
}

fn run_up(args: UpArgs) -> anyhow::Result<()> {
    // Multi-threaded runtime: the fleet's processes are forked by its worker threads, which
    // live until the runtime shuts down at exit.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(up(args))
}

async fn up(args: UpArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    let pid_file = args.dir.join(PID_FILE);
    if let Some(pid) = running_pid(&pid_file, "kmm-sandbox") {
        bail!(
            "a sandbox is already up in {} (pid {pid}); run `kmm-sandbox down --dir {}` first",
            args.dir.display(),
            args.dir.display()
        );
    }
    std::fs::write(&pid_file, format!("{}\n", std::process::id())).context("writing pid file")?;
    let result = up_inner(&args).await;
    let _ = std::fs::remove_file(&pid_file);
    result
}

async fn up_inner(args: &UpArgs) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let progress = Progress::new(if args.ordered_upgrade { 12 } else { 8 });
    let opts = SandboxOptions {
        dir: Some(args.dir.clone()),
        labs: args.labs.clone(),
        hub_resync: args.hub_resync,
        hub_bin: args.hub_bin.clone(),
        spoke_bin: args.spoke_bin.clone(),
        nodes: None,
    };
    // Ctrl-C during start-up stops what has started (dropping the fleet kills its processes).
    let sandbox = tokio::select! {
        s = Sandbox::start(opts, &progress) => s?,
        _ = shutdown_signal() => bail!("interrupted while starting"),
    };
    let converged = tokio::select! {
        r = async {
            sandbox.apply_labs(&progress).await?;
            let obs = sandbox.wait_converged(args.timeout, &progress).await?;
            if args.ordered_upgrade {
                kmm_e2e::sandbox::upgrade::ordered_upgrade(&sandbox, &progress).await?;
                return sandbox.observe().await;
            }
            anyhow::Ok(obs)
        } => Some(r),
        _ = shutdown_signal() => None,
    };
    progress.clear();
    let outcome = match converged {
        None => {
            eprintln!("kmm-sandbox: interrupted");
            Ok(())
        }
        Some(Err(e)) => {
            if !args.until_ready {
                // Keep it up for a look; the reason is printed now.
                eprintln!("kmm-sandbox: {e:#}");
                println!(
                    "{}",
                    sandbox.summary(&sandbox.observe().await.unwrap_or_default())
                );
                println!("The sandbox stays up for inspection. Stop it with Ctrl-C.");
                let _ = shutdown_signal().await;
                Err(anyhow::anyhow!("not every lab converged"))
            } else {
                Err(e)
            }
        }
        Some(Ok(obs)) => {
            println!();
            println!(
                "kmm-sandbox: every lab converged, {:.0?} after start",
                t0.elapsed()
            );
            println!();
            print!("{}", sandbox.summary(&obs));
            if args.until_ready {
                Ok(())
            } else {
                println!();
                println!(
                    "The sandbox stays up until Ctrl-C (or `kmm-sandbox down --dir {}`).",
                    args.dir.display()
                );
                let _ = shutdown_signal().await;
                Ok(())
            }
        }
    };
    eprintln!("kmm-sandbox: tearing down");
    let t = Instant::now();
    sandbox.stop().await;
    eprintln!("kmm-sandbox: stopped in {:.1?}", t.elapsed());
    outcome
}

fn down(dir: &Path) -> anyhow::Result<()> {
    stop_by_pid_file(
        dir,
        &dir.join(PID_FILE),
        "kmm-sandbox",
        "sandbox",
        Duration::from_secs(90),
    )
}
