//! `kmm-fleet`: a local fleet (hub + spokes on real control planes, a registry, simulated
//! nodes and OCM agents) for people and scripts.
//!
//! ```text
//! kmm-fleet up --spokes 2 --nodes 3 --dir /tmp/kmm-fleet   # runs until Ctrl-C or `down`
//! kmm-fleet down --dir /tmp/kmm-fleet
//! kmm-fleet provision                                      # only install/build what is needed
//! kmm-fleet generate-policy                                # manifests/policy/policy.yaml
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use kmm_e2e::fleet::{Fleet, worker_node};
use kmm_e2e::process::{running_pid, shutdown_signal, stop_by_pid_file};

/// Kernels given to simulated worker nodes, round-robin.
const DEFAULT_KERNELS: &[&str] = &["6.1.0-13-amd64", "6.1.0-18-amd64", "5.10.0-26-amd64"];
const PID_FILE: &str = "kmm-fleet.pid";

#[derive(Parser, Debug)]
#[command(
    name = "kmm-fleet",
    about = "A local kmm-fleet test world: real control planes, simulated machines"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Start a fleet and keep it running until Ctrl-C, SIGTERM or `kmm-fleet down`.
    Up {
        /// Number of spoke clusters.
        #[arg(long, env = "KMM_FLEET_SPOKES", default_value_t = 2)]
        spokes: usize,
        /// Simulated worker nodes per spoke (kernels from a small default mix).
        #[arg(long, env = "KMM_FLEET_NODES", default_value_t = 2)]
        nodes: usize,
        /// Directory for kubeconfigs, certificates, logs and registry storage.
        #[arg(long, env = "KMM_FLEET_DIR", default_value = "/tmp/kmm-fleet")]
        dir: PathBuf,
        /// Require htpasswd authentication on the registry.
        #[arg(long, env = "KMM_FLEET_REGISTRY_AUTH", default_value_t = false)]
        registry_auth: bool,
        /// Do not put a build node on the hub.
        #[arg(long, env = "KMM_FLEET_NO_HUB_BUILD_NODE", default_value_t = false)]
        no_hub_build_node: bool,
    },
    /// Stop the fleet started by `up` in DIR and wait until it is gone.
    Down {
        #[arg(long, env = "KMM_FLEET_DIR", default_value = "/tmp/kmm-fleet")]
        dir: PathBuf,
        /// Seconds to wait before giving up.
        #[arg(long, env = "KMM_FLEET_DOWN_TIMEOUT", default_value_t = 60)]
        timeout: u64,
    },
    /// Install Debian packages and build kube-apiserver/kube-controller-manager if needed.
    Provision,
    /// Write manifests/policy/policy.yaml from `kubectl kustomize manifests/spoke`.
    GeneratePolicy,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // kube's client logs every refused connection while an API server starts.
                .unwrap_or_else(|_| {
                    tracing_subscriber::EnvFilter::new("warn,kube_client::client::builder=off")
                }),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::GeneratePolicy => {
            let path = kmm_e2e::manifests::write_policy()?;
            println!("wrote {}", path.display());
            Ok(())
        }
        Command::Provision => {
            let b = kmm_e2e::provision::ensure_provisioned()?;
            for (name, path) in [
                ("kube-apiserver", &b.kube_apiserver),
                ("kube-controller-manager", &b.kube_controller_manager),
                ("kube-scheduler", &b.kube_scheduler),
                ("kubectl", &b.kubectl),
                ("etcd", &b.etcd),
                ("ocm registration", &b.ocm_registration),
                ("ocm placement", &b.ocm_placement),
                ("ocm work webhook", &b.ocm_work_webhook),
                ("ocm klusterlet agent", &b.ocm_klusterlet),
                ("policy propagator", &b.policy_propagator),
                ("config-policy-controller", &b.config_policy_controller),
                ("docker-registry", &b.docker_registry),
            ] {
                println!("{name:<25} {}", path.display());
            }
            Ok(())
        }
        Command::Down { dir, timeout } => down(&dir, Duration::from_secs(timeout)),
        Command::Up {
            spokes,
            nodes,
            dir,
            registry_auth,
            no_hub_build_node,
        } => {
            // Multi-threaded runtime: the fleet's processes are forked by its worker
            // threads, which live until the runtime shuts down at exit.
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(up(spokes, nodes, &dir, registry_auth, !no_hub_build_node))
        }
    }
}

async fn up(
    spokes: usize,
    nodes: usize,
    dir: &Path,
    registry_auth: bool,
    hub_build_node: bool,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let pid_file = dir.join(PID_FILE);
    if let Some(pid) = running_pid(&pid_file, "kmm-fleet") {
        bail!(
            "a fleet is already up in {} (pid {pid}); run `kmm-fleet down --dir {}` first",
            dir.display(),
            dir.display()
        );
    }
    std::fs::write(&pid_file, format!("{}\n", std::process::id())).context("writing pid file")?;

    let result = async {
        let fleet = Fleet::builder()
            .spokes(spokes)
            .dir(dir)
            .registry_auth(registry_auth)
            .hub_build_node(hub_build_node)
            .nodes_with(move |_, spoke| {
                (1..=nodes)
                    .map(|j| {
                        worker_node(
                            &format!("{spoke}-worker-{j}"),
                            DEFAULT_KERNELS[(j - 1) % DEFAULT_KERNELS.len()],
                        )
                    })
                    .collect()
            })
            .start()
            .await?;
        print_summary(&fleet);
        shutdown_signal().await?;
        eprintln!("kmm-fleet: stopping");
        fleet.stop().await;
        anyhow::Ok(())
    }
    .await;
    let _ = std::fs::remove_file(&pid_file);
    result
}

fn print_summary(fleet: &Fleet) {
    println!(
        "kmm-fleet is up (pid {}), directory {}",
        std::process::id(),
        fleet.dir().display()
    );
    for c in fleet.clusters() {
        println!(
            "  {:<10} {}  KUBECONFIG={}",
            c.name(),
            c.server_url(),
            c.kubeconfig_path().display()
        );
    }
    let r = fleet.registry();
    match r.credentials() {
        Some((u, p)) => println!("  registry   {} (user {u}, password {p})", r.host()),
        None => println!("  registry   {} (no auth)", r.host()),
    }
    println!("  env file   {}", fleet.dir().join("fleet.env").display());
    println!("Components:");
    for (component, version) in kmm_e2e::provision::Binaries::versions() {
        println!("  {component:<52} {version}");
    }
    println!("  {:<52} Debian's docker-registry", "registry");
    if let Some(k) = kmm_e2e::vm::KernelDist::locate(&kmm_e2e::provision::cache_dir()) {
        println!(
            "  {:<52} {} (Debian's linux-image, in qemu VMs)",
            "kernel of the real-kernel nodes", k.release
        );
    }
    let mut running: Vec<(String, String, u32)> = fleet.pids();
    running.sort();
    println!("Processes:");
    for (cluster, component, pid) in running {
        println!("  {cluster:<10} {component:<30} pid {pid}");
    }
    println!(
        "kubectl of the same release: export PATH={}:$PATH",
        kmm_e2e::provision::bin_dir("kube", &kmm_e2e::provision::k8s_version()).display()
    );
    println!(
        "Stop with Ctrl-C or `kmm-fleet down --dir {}`.",
        fleet.dir().display()
    );
}

fn down(dir: &Path, timeout: Duration) -> anyhow::Result<()> {
    stop_by_pid_file(dir, &dir.join(PID_FILE), "kmm-fleet", "fleet", timeout)
}
