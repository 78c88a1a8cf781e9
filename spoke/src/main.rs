//! `kmm-spoke`: see `docs/spoke.md`.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{CommandFactory, FromArgMatches};
use kmm_runtime::lease::LeaseConfig;
use kmm_runtime::{Runtime, admin, telemetry};
use kmm_spoke::cli::{Cli, Command, RenderArgs, RunArgs};
use kmm_spoke::{Agent, AgentConfig};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use prometheus_client::registry::Registry;

fn main() -> ExitCode {
    let matches = Cli::command()
        .get_matches_from(kmm_runtime::gather::argv("kmm-spoke", std::env::args_os()));
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    match cli.command {
        Command::Render(args) => render(args),
        Command::MustGather(args) => must_gather(args),
        Command::Run(mut args) => {
            if let Err(e) = telemetry::init_tracing(args.common.log_format, &args.common.log_filter)
            {
                eprintln!("kmm-spoke: {e}");
                return ExitCode::FAILURE;
            }
            // Precedence: a flag (or its variable) > upstream's config file > the default.
            match args.apply_upstream_config(matches.subcommand_matches("run")) {
                Ok(Some((path, report))) => {
                    kmm_runtime::upstream_config::log_report(&path, &report)
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(error = %e, "kmm-spoke: cannot use --upstream-config");
                    return ExitCode::FAILURE;
                }
            }
            kmm_runtime::alloc::frugal_malloc();
            // A single-threaded runtime: the agent is I/O-bound and should stay small.
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("kmm-spoke: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(run(*args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = format!("{e:#}"), "kmm-spoke failed");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn must_gather(args: kmm_runtime::gather::GatherArgs) -> ExitCode {
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(kmm_spoke::must_gather::run(&args)));
    match result {
        Ok(w) => {
            println!(
                "wrote {} ({} files, {} errors, {} values redacted)",
                w.dir.display(),
                w.files,
                w.errors,
                w.redactions
            );
            if let Some(t) = &w.tarball {
                println!("wrote {}", t.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("kmm-spoke must-gather: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn render(args: RenderArgs) -> ExitCode {
    let read = |p: &std::path::Path| {
        std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))
    };
    let (module, nodes) = match (read(&args.module), read(&args.nodes)) {
        (Ok(m), Ok(n)) => (m, n),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("kmm-spoke render: {e:#}");
            return ExitCode::from(2);
        }
    };
    match kmm_spoke::render_cmd::render(
        &module,
        &nodes,
        &args.render.settings(),
        args.kubernetes_minor,
    ) {
        Ok((yaml, warnings)) => {
            for w in warnings {
                eprintln!("warning: {w}");
            }
            print!("{yaml}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("kmm-spoke render: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn client(args: &RunArgs) -> anyhow::Result<Client> {
    let config = match &args.kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .context("kubeconfig")?
        }
        None => Config::infer()
            .await
            .context("no in-cluster configuration and no kubeconfig")?,
    };
    Client::try_from(config).context("building the API client")
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = client(&args).await?;
    let identity = args.identity();
    let cfg = AgentConfig {
        settings: args.render.settings(),
        resync: args.common.resync,
        // The process campaigns (below); the agent follows.
        leader_election: None,
        cluster_claims: args.cluster_claims,
        identity: identity.clone(),
        workers: args.workers,
        node_write_delay: args.node_write_delay,
        node_write_interval: args.node_write_interval,
        status_write_delay: args.status_write_delay,
    };
    let lease = args.common.leader_elect.then(|| {
        LeaseConfig::new(
            args.common.lease_name.clone(),
            args.lease_namespace.clone(),
            identity,
        )
    });
    let webhook_state = match args.webhook_address {
        Some(_) => Some(
            kmm_spoke::webhook::WebhookState::new(client.clone())
                .await
                .context("reading the API server version for the webhook")?,
        ),
        None => None,
    };
    let mut registry = Registry::default();
    let health = admin::Health::new();
    let webhook_health = health.clone();
    let agent = Agent::new(client.clone(), cfg, &mut registry, &health);
    let registry = Arc::new(registry);
    let rt = Runtime::builder(args.admin_address())
        .health(health)
        .leader_election(client, lease)
        .build(registry.clone());
    if let Some(addr) = args.common.metrics_address {
        // Upstream's `metrics.bindAddress`: the admin routes on a second listener.
        rt.serve(
            "metrics",
            addr,
            None,
            admin::router(rt.health().clone(), registry),
        )
        .await
        .context("metrics listener")?;
    }
    if let (Some(addr), Some(cert), Some(key), Some(state)) = (
        args.webhook_address,
        args.webhook_cert.clone(),
        args.webhook_key.clone(),
        webhook_state,
    ) {
        tokio::spawn(kmm_spoke::webhook::serve_when_certified(
            addr,
            cert,
            key,
            kmm_spoke::webhook::router(Arc::new(state)),
            webhook_health,
            rt.shutdown_token(),
        ));
    }
    let result = agent
        .with_campaign(rt.campaign().clone())
        .run(rt.shutdown_token())
        .await;
    let finished = rt.finish().await;
    result.context("agent")?;
    match finished {
        // The agent reported the lost lease already.
        Err(kmm_runtime::RuntimeError::LostLease) | Ok(()) => Ok(()),
        Err(e) => Err(e).context("admin server"),
    }
}
