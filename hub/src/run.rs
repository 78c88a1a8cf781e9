//! `kmm-hub run`: caches, the MCM controller under a leader lease, the admin port,
//! the admission webhook and the dashboard, with graceful shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt;
use kube::api::Api;
use kube::runtime::Controller;
use kube::runtime::controller::Config as ControllerConfig;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Client, Config};
use prometheus_client::registry::Registry;
use shared_api::ManagedClusterModule;
use shared_api::runtime::backoff::KeyedBackoff;
use shared_api::runtime::{admin, lease, shutdown};
use tokio_util::sync::CancellationToken;

use crate::cache::{Caches, watch_clusters, watch_jobs, watch_works};
use crate::images::ImagePipeline;
use crate::metrics::Metrics;
use crate::reconcile::{Context, error_policy, reconcile};
use crate::registry::Resolver;
use crate::views::Views;

#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// Kubeconfig of the hub cluster; in a pod, the in-cluster configuration is used.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Namespace of the hub: pull secrets, build Jobs, signing secrets, the lease.
    #[arg(long, env = "OPERATOR_NAMESPACE", default_value = "kmm-hub")]
    pub operator_namespace: String,
    /// Address of /livez, /readyz and /metrics.
    #[arg(long, env = "KMM_HUB_ADMIN_ADDRESS", default_value = "127.0.0.1:8081")]
    pub admin_address: SocketAddr,
    /// Address of the admission webhook (TLS); off when not set.
    #[arg(long, env = "KMM_HUB_WEBHOOK_ADDRESS")]
    pub webhook_address: Option<SocketAddr>,
    /// PEM certificate (chain) of the webhook.
    #[arg(long, env = "KMM_HUB_WEBHOOK_CERT", requires = "webhook_address")]
    pub webhook_cert: Option<PathBuf>,
    /// PEM private key of the webhook.
    #[arg(long, env = "KMM_HUB_WEBHOOK_KEY", requires = "webhook_address")]
    pub webhook_key: Option<PathBuf>,
    /// The hub configuration file (Driver Toolkit table, kaniko image, Job clean-up delay).
    #[arg(long, env = "KMM_HUB_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address of the dashboard (web page and fleet API); off when not set.
    #[arg(long, env = "KMM_HUB_DASHBOARD_ADDRESS")]
    pub dashboard_address: Option<SocketAddr>,
    /// PEM certificate of the dashboard; with --dashboard-key it serves HTTPS.
    #[arg(long, env = "KMM_HUB_DASHBOARD_CERT", requires = "dashboard_key")]
    pub dashboard_cert: Option<PathBuf>,
    /// PEM private key of the dashboard.
    #[arg(long, env = "KMM_HUB_DASHBOARD_KEY", requires = "dashboard_cert")]
    pub dashboard_key: Option<PathBuf>,
    /// How often every MCM is reconciled even without changes; also the digest cache lifetime.
    #[arg(long, env = "KMM_HUB_RESYNC", default_value = "10m", value_parser = humantime::parse_duration)]
    pub resync: Duration,
    /// ManagedClusterModules reconciled at once.
    #[arg(long, env = "KMM_HUB_CONCURRENCY", default_value_t = 4)]
    pub concurrency: u16,
    /// ManifestWork writes in flight within one reconcile.
    #[arg(long, env = "KMM_HUB_WRITE_CONCURRENCY", default_value_t = 32)]
    pub write_concurrency: usize,
    /// Elect a leader with a Lease (turn off only for a single replica in development).
    #[arg(long, env = "KMM_HUB_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_elect: bool,
    /// Name of the Lease in the operator namespace.
    #[arg(
        long,
        env = "KMM_HUB_LEASE_NAME",
        default_value = "kmm-hub.sigs.x-k8s.io"
    )]
    pub lease_name: String,
    /// Log format: `text` or `json`.
    #[arg(long, env = "KMM_HUB_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "RUST_LOG", default_value = "info,kube_runtime=warn")]
    pub log_filter: String,
    /// Image signing: work directory, concurrency and size limits.
    #[command(flatten)]
    pub sign: crate::sign::SignArgs,
}

pub async fn client_from(kubeconfig: Option<&PathBuf>) -> anyhow::Result<Client> {
    crate::registry::install_crypto_provider();
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading {}", path.display()))?;
            Config::from_custom_kubeconfig(kc, &Default::default()).await?
        }
        None => Config::infer().await?,
    };
    Ok(Client::try_from(config)?)
}

/// Run the hub until a shutdown signal (or `token`) stops it.
pub async fn run(args: RunArgs, token: CancellationToken) -> anyhow::Result<()> {
    let config = match &args.config {
        Some(path) => crate::config::HubConfig::load(path).map_err(anyhow::Error::msg)?,
        None => crate::config::HubConfig::default(),
    };
    let client = client_from(args.kubeconfig.as_ref()).await?;
    let signing = args.sign.runtime();
    signing.clean_work_dir();
    tracing::info!(?signing, "image signing");
    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    let registry = Arc::new(registry);
    let health = admin::Health::new();
    let caches_gate = health.gate("caches");
    let lease_gate = health.gate("lease");

    let admin_token = token.clone();
    let admin_task = tokio::spawn(admin::serve(
        args.admin_address,
        admin::router(health.clone(), registry.clone()),
        async move { admin_token.cancelled().await },
        |_| {},
    ));

    if let Some(addr) = args.webhook_address {
        let (cert, key) = match (&args.webhook_cert, &args.webhook_key) {
            (Some(c), Some(k)) => (c.clone(), k.clone()),
            _ => anyhow::bail!("--webhook-address needs --webhook-cert and --webhook-key"),
        };
        let tls = axum_server::tls_rustls::RustlsConfig::from_pem_file(&cert, &key)
            .await
            .with_context(|| format!("loading webhook certificate {} and key", cert.display()))?;
        let handle = axum_server::Handle::new();
        let h = handle.clone();
        let t = token.clone();
        tokio::spawn(async move {
            t.cancelled().await;
            h.graceful_shutdown(Some(Duration::from_secs(5)));
        });
        tokio::spawn(async move {
            tracing::info!(%addr, "admission webhook listening");
            if let Err(e) = axum_server::bind_rustls(addr, tls)
                .handle(handle)
                .serve(crate::webhook::router().into_make_service())
                .await
            {
                tracing::error!(error = %e, "webhook server failed");
            }
        });
    }

    let caches = Caches::new();
    let controller = Controller::new(
        Api::<ManagedClusterModule>::all(client.clone()),
        watcher::Config::default(),
    )
    .with_config(ControllerConfig::default().concurrency(args.concurrency));
    let store = controller.store();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(watch_clusters(
        client.clone(),
        caches.clone(),
        store.clone(),
        tx.clone(),
    ));
    tokio::spawn(watch_works(client.clone(), caches.clone(), tx.clone()));
    tokio::spawn(watch_jobs(
        client.clone(),
        args.operator_namespace.clone(),
        caches.clone(),
        tx.clone(),
    ));

    let views = Arc::new(Views::default());
    if let Some(addr) = args.dashboard_address {
        let state = crate::dashboard::DashboardState {
            caches: caches.clone(),
            views: views.clone(),
            mcms: store.clone(),
            client: client.clone(),
        };
        let tls = match (&args.dashboard_cert, &args.dashboard_key) {
            (Some(c), Some(k)) => Some(
                axum_server::tls_rustls::RustlsConfig::from_pem_file(c, k)
                    .await
                    .with_context(|| {
                        format!("loading dashboard certificate {} and key", c.display())
                    })?,
            ),
            _ => None,
        };
        let router = crate::dashboard::router(state);
        let handle = axum_server::Handle::new();
        let h = handle.clone();
        let t = token.clone();
        tokio::spawn(async move {
            t.cancelled().await;
            h.graceful_shutdown(Some(Duration::from_secs(5)));
        });
        tokio::spawn(async move {
            tracing::info!(%addr, tls = tls.is_some(), "dashboard listening");
            let served = match tls {
                Some(tls) => {
                    axum_server::bind_rustls(addr, tls)
                        .handle(handle)
                        .serve(router.into_make_service())
                        .await
                }
                None => {
                    axum_server::bind(addr)
                        .handle(handle)
                        .serve(router.into_make_service())
                        .await
                }
            };
            if let Err(e) = served {
                tracing::error!(error = %e, "dashboard server failed");
            }
        });
    }

    // The dashboard's live stream also announces MCMs appearing and going.
    let (fp_store, fp_caches, fp_token) = (store.clone(), caches.clone(), token.clone());
    tokio::spawn(async move {
        let mut last = Vec::new();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = fp_token.cancelled() => return,
            }
            let mut now: Vec<(String, String)> = fp_store
                .state()
                .iter()
                .map(|m| {
                    (
                        m.metadata.name.clone().unwrap_or_default(),
                        m.metadata.resource_version.clone().unwrap_or_default(),
                    )
                })
                .collect();
            now.sort();
            if now != last {
                fp_caches.bump();
                last = now;
            }
        }
    });

    let ctx = Arc::new(Context {
        client: client.clone(),
        operator_namespace: args.operator_namespace.clone(),
        write_concurrency: args.write_concurrency,
        caches: caches.clone(),
        resolver: Resolver::new(args.resync, metrics.clone()),
        images: ImagePipeline::new(8),
        metrics: metrics.clone(),
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "kmm-hub".into(),
                // events.k8s.io/v1 requires a reporting instance.
                instance: Some(
                    std::env::var("POD_NAME")
                        .unwrap_or_else(|_| format!("kmm-hub-{}", std::process::id())),
                ),
            },
        ),
        backoff: KeyedBackoff::new(Duration::from_secs(1), Duration::from_secs(300)),
        views: views.clone(),
        resync: args.resync,
        config,
        signing,
    });

    // Ready only with synced caches (and the lease, below).
    let sync_caches = caches.clone();
    tokio::spawn(async move {
        while !sync_caches.synced() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        caches_gate.set(true);
    });

    let (mut leadership, lease_task) = if args.leader_elect {
        let identity =
            std::env::var("POD_NAME").unwrap_or_else(|_| format!("kmm-hub-{}", std::process::id()));
        let (l, task) = lease::spawn(
            client.clone(),
            lease::LeaseConfig::new(&args.lease_name, &args.operator_namespace, identity),
            token.clone(),
        );
        (l, Some(task))
    } else {
        (lease::Leadership::always(), None)
    };
    tokio::select! {
        _ = leadership.wait_for(true) => {}
        _ = token.cancelled() => return finish(admin_task, lease_task).await,
    }
    lease_gate.set(true);
    tracing::info!("leading: reconciling ManagedClusterModules");

    // Lost leadership means another replica may act: stop reconciling (and exit, to restart clean).
    let lost = CancellationToken::new();
    let lost_tx = lost.clone();
    let stop = token.clone();
    let gate = lease_gate.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = leadership.wait_for(false) => {
                tracing::warn!("lost the lease: stopping");
                gate.set(false);
                lost_tx.cancel();
            }
            _ = stop.cancelled() => {}
        }
    });

    let triggers = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
    let shutdown_on = {
        let token = token.clone();
        let lost = lost.clone();
        async move {
            tokio::select! {
                _ = token.cancelled() => {}
                _ = lost.cancelled() => {}
            }
        }
    };
    let resync_every = args.resync;
    let resync = futures::stream::unfold((), move |()| async move {
        tokio::time::sleep(resync_every).await;
        Some(((), ()))
    });
    let gauge_caches = caches.clone();
    let gauge_store = store.clone();
    let gauge_metrics = metrics.clone();
    controller
        .reconcile_on(triggers)
        .reconcile_all_on(resync)
        .graceful_shutdown_on(shutdown_on)
        .run(
            move |mcm, ctx: Arc<Context>| {
                let caches = gauge_caches.clone();
                let metrics = gauge_metrics.clone();
                let mcm_store = gauge_store.clone();
                async move {
                    metrics
                        .clusters
                        .set(caches.clusters.read().map(|c| c.len() as i64).unwrap_or(0));
                    metrics
                        .managed_cluster_modules
                        .set(mcm_store.state().len() as i64);
                    if !caches.synced() {
                        return Ok(kube::runtime::controller::Action::requeue(
                            Duration::from_millis(200),
                        ));
                    }
                    reconcile(mcm, ctx).await
                }
            },
            error_policy,
            ctx,
        )
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "controller event");
            }
        })
        .await;
    if lost.is_cancelled() && !token.is_cancelled() {
        token.cancel();
        finish(admin_task, lease_task).await?;
        anyhow::bail!("lost leadership");
    }
    finish(admin_task, lease_task).await
}

async fn finish(
    admin_task: tokio::task::JoinHandle<Result<(), admin::AdminError>>,
    lease_task: Option<tokio::task::JoinHandle<()>>,
) -> anyhow::Result<()> {
    if let Some(t) = lease_task {
        let _ = shutdown::drain(t, Duration::from_secs(5)).await;
    }
    match admin_task.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.into()),
        Err(e) => Err(anyhow::anyhow!("admin server task: {e}")),
    }
}
