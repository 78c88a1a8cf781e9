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

use crate::cache::{Caches, watch_clusters, watch_jobs, watch_secrets, watch_works};
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
    /// Namespace of the hub: pull secrets, signing secrets, Dockerfiles, the lease.
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
    /// The audience dashboard tokens must be issued for (`kubectl create token SA --audience …`).
    #[arg(
        long,
        env = "KMM_HUB_DASHBOARD_AUDIENCE",
        default_value = crate::dashboard::auth::DEFAULT_AUDIENCE
    )]
    pub dashboard_audience: String,
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
    /// The spoke ServiceAccount (`namespace/name`) ManifestWorks are executed as; the work
    /// agent applies a manifest only if that account may manage it. Empty: the work agent's
    /// own identity (not recommended: OCM gives it far wider rights).
    #[arg(long, env = "KMM_HUB_WORK_EXECUTOR", default_value = crate::render::DEFAULT_WORK_EXECUTOR)]
    pub work_executor: String,
    /// How long the deletion of a ManagedClusterModule waits for the work agents of
    /// unavailable clusters before the hub releases their ManifestWorks (and how long a work's
    /// deletion is held for its Module to be recorded).
    #[arg(long, env = "KMM_HUB_RELEASE_AFTER", default_value = "10m", value_parser = humantime::parse_duration)]
    pub release_after: Duration,
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
    }
    .resolve(&args.operator_namespace)
    .map_err(anyhow::Error::msg)?;
    let work_executor =
        crate::render::parse_executor(&args.work_executor).map_err(anyhow::Error::msg)?;
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
        let tls = crate::tls::reloading("webhook", cert, key, token.clone()).await?;
        let webhook_router = crate::webhook::router(Arc::new(crate::webhook::WebhookState {
            reviewer: crate::webhook::SarReviewer::new(client.clone()),
            namespace: args.operator_namespace.clone(),
        }));
        serve(
            "webhook",
            addr,
            Some(tls),
            webhook_router,
            health.gate("webhook-server"),
            token.clone(),
        );
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
        config.build_namespace.clone(),
        caches.clone(),
        tx.clone(),
    ));

    let resolver = Resolver::new(args.resync, metrics.clone());
    let (secrets, secrets_writer) = kube::runtime::reflector::store();
    tokio::spawn(watch_secrets(
        client.clone(),
        args.operator_namespace.clone(),
        caches.clone(),
        secrets_writer,
        resolver.clone(),
        store.clone(),
        tx.clone(),
    ));

    let views = Arc::new(Views::default());
    if let Some(addr) = args.dashboard_address {
        let state = crate::dashboard::DashboardState {
            caches: caches.clone(),
            views: views.clone(),
            mcms: store.clone(),
            client: client.clone(),
            audience: args.dashboard_audience.clone(),
        };
        let tls = match (&args.dashboard_cert, &args.dashboard_key) {
            (Some(c), Some(k)) => {
                Some(crate::tls::reloading("dashboard", c.clone(), k.clone(), token.clone()).await?)
            }
            _ => None,
        };
        serve(
            "dashboard",
            addr,
            tls,
            crate::dashboard::router(state),
            health.gate("dashboard-server"),
            token.clone(),
        );
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
    // Everything the reconcilers write goes through a client that refuses writes once the
    // lease is lost (a reconcile still running then writes nothing more).
    let writer = leadership.fence(client.clone());
    let ctx = Arc::new(Context {
        client: writer.clone(),
        operator_namespace: args.operator_namespace.clone(),
        write_concurrency: args.write_concurrency,
        caches: caches.clone(),
        resolver,
        images: ImagePipeline::new(8),
        metrics: metrics.clone(),
        recorder: Recorder::new(
            writer.clone(),
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
        work_executor,
        release: crate::release::Releaser::new(args.release_after),
        secrets,
    });

    // What is kept per MCM goes with the MCM, also when it vanishes without our finalizer.
    let (gc_store, gc_ctx, gc_token) = (store.clone(), ctx.clone(), token.clone());
    tokio::spawn(async move {
        let mut known: std::collections::BTreeSet<String> = Default::default();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                _ = gc_token.cancelled() => return,
            }
            let now: std::collections::BTreeSet<String> = gc_store
                .state()
                .iter()
                .map(|m| m.metadata.name.clone().unwrap_or_default())
                .collect();
            for gone in known.difference(&now) {
                crate::reconcile::forget_mcm(&gc_ctx, gone);
            }
            known = now;
        }
    });

    // Ready only with synced caches (and the lease, below).
    let sync_caches = caches.clone();
    tokio::spawn(async move {
        while !sync_caches.synced() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        caches_gate.set(true);
    });

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
    let reconcile_lost = lost.clone();
    controller
        .reconcile_on(triggers)
        .reconcile_all_on(resync)
        .graceful_shutdown_on(shutdown_on)
        .run(
            move |mcm, ctx: Arc<Context>| {
                let lost = reconcile_lost.clone();
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
                    // On loss an in-flight reconcile is dropped where it stands.
                    tokio::select! {
                        biased;
                        _ = lost.cancelled() => Ok(kube::runtime::controller::Action::await_change()),
                        r = reconcile(mcm, ctx) => r,
                    }
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

/// Serve `router` on `addr` (TLS when given) in a task until `token` is cancelled. `gate` is
/// open while the server listens: a server that cannot bind or whose task ends (fails,
/// panics) takes `/readyz` down with it.
fn serve(
    what: &'static str,
    addr: SocketAddr,
    tls: Option<axum_server::tls_rustls::RustlsConfig>,
    router: axum::Router,
    gate: admin::ReadyGate,
    token: CancellationToken,
) {
    /// Closes the gate when the server task ends, however it ends.
    struct Closed(admin::ReadyGate);
    impl Drop for Closed {
        fn drop(&mut self) {
            self.0.set(false);
        }
    }
    let handle = axum_server::Handle::new();
    let (h, t) = (handle.clone(), token.clone());
    tokio::spawn(async move {
        t.cancelled().await;
        h.graceful_shutdown(Some(Duration::from_secs(5)));
    });
    let (h, g, with_tls) = (handle.clone(), gate.clone(), tls.is_some());
    tokio::spawn(async move {
        if let Some(bound) = h.listening().await {
            tracing::info!(server = what, addr = %bound, tls = with_tls, "listening");
            g.set(true);
        }
    });
    tokio::spawn(async move {
        let _closed = Closed(gate);
        let service = router.into_make_service_with_connect_info::<SocketAddr>();
        let served = match tls {
            Some(tls) => {
                axum_server::bind_rustls(addr, tls)
                    .handle(handle)
                    .serve(service)
                    .await
            }
            None => axum_server::bind(addr).handle(handle).serve(service).await,
        };
        match served {
            Err(e) => tracing::error!(server = what, %addr, error = %e, "server failed; not ready"),
            Ok(()) if !token.is_cancelled() => {
                tracing::error!(server = what, %addr, "server stopped; not ready")
            }
            Ok(()) => {}
        }
    });
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
