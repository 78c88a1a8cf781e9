//! `kmm-hub run`: caches, the MCM controller under a leader lease, the admin port,
//! the admission webhook and the dashboard, with graceful shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt;
use kmm_runtime::backoff::KeyedBackoff;
use kmm_runtime::tls::TlsFiles;
use kmm_runtime::{Runtime, admin, lease};
use kube::api::Api;
use kube::runtime::Controller;
use kube::runtime::controller::Config as ControllerConfig;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Client, Config};
use prometheus_client::registry::Registry;
use shared_api::ManagedClusterModule;
use tokio_util::sync::CancellationToken;

use crate::cache::{Caches, watch_clusters, watch_jobs, watch_secrets, watch_works};
use crate::last_decisions::Views;
use crate::metrics::Metrics;
use crate::pipeline::ImagePipeline;
use crate::reconcile::{Context, error_policy, reconcile};
use crate::registry::Resolver;

/// The default address of /livez, /readyz and /metrics.
pub const DEFAULT_ADMIN_ADDRESS: &str = "127.0.0.1:8081";

#[derive(clap::Args, Debug, Clone)]
#[command(
    mut_arg("log_format", |a| a.env("KMM_HUB_LOG_FORMAT").default_value("text")),
    mut_arg("log_filter", |a| a.env("RUST_LOG").default_value("info,kube_runtime=warn")),
    mut_arg("admin_address", |a| a.env("KMM_HUB_ADMIN_ADDRESS").default_value(DEFAULT_ADMIN_ADDRESS)),
    mut_arg("metrics_address", |a| a.env("KMM_HUB_METRICS_ADDRESS")),
    mut_arg("leader_elect", |a| a
        .env("KMM_HUB_LEADER_ELECT")
        .default_value("true")
        .help("Elect a leader with a Lease (turn off only for a single replica in development)")),
    mut_arg("lease_name", |a| a
        .env("KMM_HUB_LEASE_NAME")
        .default_value("kmm-hub.sigs.x-k8s.io")
        .help("Name of the Lease in the operator namespace")),
    mut_arg("resync", |a| a
        .env("KMM_HUB_RESYNC")
        .help("How often every MCM is reconciled even without changes; also the digest cache lifetime")),
)]
pub struct RunArgs {
    /// Log format and filter, admin address, leader election, resync period.
    #[command(flatten)]
    pub common: kmm_runtime::cli::CommonArgs,
    /// Kubeconfig of the hub cluster; in a pod, the in-cluster configuration is used.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Namespace of the hub: pull secrets, signing secrets, Dockerfiles, the lease.
    #[arg(long, env = "OPERATOR_NAMESPACE", default_value = "kmm-hub")]
    pub operator_namespace: String,
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
    /// Upstream KMM's `controller_config.yaml` (the `kmm-operator-hub-manager-config`
    /// ConfigMap, mounted): its keys set the flags not given explicitly. A missing file
    /// means defaults.
    #[arg(long, env = "KMM_HUB_UPSTREAM_CONFIG")]
    pub upstream_config: Option<PathBuf>,
    /// How long finished build Jobs are kept (e.g. 0s, 10m); wins over `jobGcDelay` of
    /// --config [default: jobGcDelay, else 0s].
    #[arg(long, env = "KMM_HUB_JOB_GC_DELAY", value_parser = kmm_runtime::upstream_config::go_duration)]
    pub job_gc_delay: Option<Duration>,
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
    /// ManagedClusterModules reconciled at once.
    #[arg(long, env = "KMM_HUB_CONCURRENCY", default_value_t = 4)]
    pub concurrency: u16,
    /// ManifestWork writes in flight within one reconcile.
    #[arg(long, env = "KMM_HUB_WRITE_CONCURRENCY", default_value_t = 32)]
    pub write_concurrency: usize,
    /// The spoke ServiceAccount (`namespace/name`) ManifestWorks are executed as; the work
    /// agent applies a manifest only if that account may manage it. Empty: the work agent's
    /// own identity (not recommended: OCM gives it far wider rights).
    #[arg(long, env = "KMM_HUB_WORK_EXECUTOR", default_value = crate::render::DEFAULT_WORK_EXECUTOR)]
    pub work_executor: String,
    /// How long the deletion of a ManagedClusterModule waits for the work agents of
    /// unavailable clusters before the hub releases their ManifestWorks (and how long a work's
    /// deletion is held for its Module to be recorded).
    #[arg(long, env = "KMM_HUB_RELEASE_AFTER", default_value = "10m", value_parser = kmm_runtime::cli::parse_duration)]
    pub release_after: Duration,
    /// Image signing: work directory, concurrency and size limits.
    #[command(flatten)]
    pub sign: crate::sign::SignArgs,
}

impl RunArgs {
    pub fn admin_address(&self) -> SocketAddr {
        self.common
            .admin_address
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8081)))
    }
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
    let config = crate::config::HubConfig {
        job_gc_delay: args.job_gc_delay.unwrap_or(config.job_gc_delay),
        ..config
    };
    let work_executor =
        crate::render::parse_executor(&args.work_executor).map_err(anyhow::Error::msg)?;
    let client = client_from(args.kubeconfig.as_ref()).await?;
    let signing = args.sign.runtime();
    signing.clean_work_dir();
    tracing::info!(?signing, "image signing");
    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    let preflight_metrics = crate::preflight::PreflightMetrics::register(&mut registry);
    let identity =
        std::env::var("POD_NAME").unwrap_or_else(|_| format!("kmm-hub-{}", std::process::id()));
    // Ready only with synced caches and the lease held (and every server listening).
    let health = admin::Health::new();
    // Registered before anything can open its gate, so that /readyz never runs ahead of it.
    health.gate("caches");
    let registry = Arc::new(registry);
    let rt = Runtime::builder(args.admin_address())
        .health(health)
        .shutdown_on(token.clone())
        .leader_election(
            client.clone(),
            args.common.leader_elect.then(|| {
                lease::LeaseConfig::new(
                    &args.common.lease_name,
                    &args.operator_namespace,
                    identity.clone(),
                )
            }),
        )
        .build(registry.clone());
    if let Some(addr) = args.common.metrics_address {
        // Upstream's `metrics.bindAddress`: the admin routes on a second listener.
        let router = admin::router(rt.health().clone(), registry.clone());
        rt.serve("metrics", addr, None, router).await?;
    }

    if let Some(addr) = args.webhook_address {
        let tls = match (&args.webhook_cert, &args.webhook_key) {
            (Some(cert), Some(key)) => TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
            },
            _ => anyhow::bail!("--webhook-address needs --webhook-cert and --webhook-key"),
        };
        let webhook_router = crate::webhook::router(Arc::new(crate::webhook::WebhookState {
            reviewer: crate::webhook::SarReviewer::new(client.clone()),
            namespace: args.operator_namespace.clone(),
        }));
        rt.serve("webhook", addr, Some(tls), webhook_router).await?;
    }

    let caches = Caches::new();
    let controller = Controller::new(
        Api::<ManagedClusterModule>::all(client.clone()),
        watcher::Config::default(),
    )
    .with_config(ControllerConfig::default().concurrency(args.concurrency));
    let store = controller.store();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    // What a fan-out left in the heap goes back to the system once the hub is quiet again.
    tokio::spawn(kmm_runtime::alloc::release_free_when_quiet(
        std::time::Duration::from_secs(10),
    ));
    tokio::spawn(watch_clusters(
        client.clone(),
        caches.clone(),
        store.clone(),
        tx.clone(),
    ));
    tokio::spawn(watch_works(client.clone(), caches.clone(), tx.clone()));
    // spec.placementRef: Placements and their decisions in the hub's namespace.
    tokio::spawn(crate::cache::watch_placements(
        client.clone(),
        args.operator_namespace.clone(),
        caches.clone(),
        store.clone(),
        tx.clone(),
    ));
    tokio::spawn(crate::cache::watch_placement_decisions(
        client.clone(),
        args.operator_namespace.clone(),
        caches.clone(),
        store.clone(),
        tx.clone(),
    ));
    tokio::spawn(watch_jobs(
        client.clone(),
        config.build_namespace.clone(),
        caches.clone(),
        tx.clone(),
    ));

    let resolver = Resolver::new(args.common.resync, metrics.clone());
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
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
            }),
            _ => None,
        };
        rt.serve("dashboard", addr, tls, crate::dashboard::router(state))
            .await?;
    }

    // The dashboard's live stream also announces MCMs appearing and going.
    let (fp_store, fp_caches) = (store.clone(), caches.clone());
    let mut last = Vec::new();
    rt.every(Duration::from_secs(1), move || {
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
    });

    // Everything the reconcilers write goes through a client that refuses writes once the
    // lease is lost (a reconcile still running then writes nothing more).
    let writer = rt.leadership().fence(client.clone());
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
                instance: Some(identity.clone()),
            },
        ),
        backoff: KeyedBackoff::new(Duration::from_secs(1), Duration::from_secs(300)),
        views: views.clone(),
        resync: args.common.resync,
        config,
        signing,
        work_executor,
        release: crate::reconcile::release::Releaser::new(args.release_after),
        secrets,
    });

    // What is kept per MCM goes with the MCM, also when it vanishes without our finalizer.
    let (gc_store, gc_ctx) = (store.clone(), ctx.clone());
    let mut known: std::collections::BTreeSet<String> = Default::default();
    rt.every(Duration::from_secs(5), move || {
        let now: std::collections::BTreeSet<String> = gc_store
            .state()
            .iter()
            .map(|m| m.metadata.name.clone().unwrap_or_default())
            .collect();
        for gone in known.difference(&now) {
            crate::reconcile::forget_mcm(&gc_ctx, gone);
        }
        known = now;
    });

    let sync_caches = caches.clone();
    rt.ready_when("caches", async move {
        while !sync_caches.synced() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });

    if !rt.wait_to_lead().await {
        return Ok(rt.finish().await?);
    }
    tracing::info!("leading: reconciling ManagedClusterModules");

    let triggers = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
    // Lost leadership means another replica may act: stop reconciling and exit (non-zero, so
    // that the pod restarts and campaigns afresh).
    let shutdown_on = rt.stopping();
    let resync_every = args.common.resync;
    let resync = futures::stream::unfold((), move |()| async move {
        tokio::time::sleep(resync_every).await;
        Some(((), ()))
    });
    let gauge_caches = caches.clone();
    let gauge_store = store.clone();
    let gauge_metrics = metrics.clone();
    let reconcile_lost = rt.campaign().clone();
    // FleetPreflightValidations: checked (and images built ahead) with this reconciler's
    // caches, registry client and image pipeline.
    let preflight = crate::preflight::controller::run(
        client.clone(),
        ctx.clone(),
        store.clone(),
        preflight_metrics,
        rt.stopping(),
    );
    let mcm_controller = controller
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
                        _ = lost.lost() => Ok(kube::runtime::controller::Action::await_change()),
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
        });
    futures::join!(mcm_controller, preflight);
    // `Err(lost leadership)` when the lease was lost.
    Ok(rt.finish().await?)
}
