//! Tracing initialisation and the per-controller reconcile metrics.
//!
//! Metric labels are bounded: the controller name (a constant) and an outcome or error
//! category (a `&'static str` from the error's `category()`), never object names.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::FmtSpan;

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("invalid log filter {filter:?}: {reason}")]
    Filter { filter: String, reason: String },
    #[error("a tracing subscriber is already installed")]
    AlreadyInstalled,
}

impl TelemetryError {
    pub fn category(&self) -> &'static str {
        match self {
            TelemetryError::Filter { .. } => "filter",
            TelemetryError::AlreadyInstalled => "already-installed",
        }
    }
}

/// How logs are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Plain,
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "plain" | "text" => Ok(LogFormat::Plain),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("unknown log format {other:?} (plain or json)")),
        }
    }
}

/// Install the global tracing subscriber. `filter` uses `RUST_LOG` syntax; the `RUST_LOG`
/// environment variable, when set, wins.
pub fn init_tracing(format: LogFormat, filter: &str) -> Result<(), TelemetryError> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(env) if !env.is_empty() => env,
        _ => filter.to_string(),
    };
    let env_filter = EnvFilter::try_new(&filter).map_err(|e| TelemetryError::Filter {
        filter: filter.clone(),
        reason: e.to_string(),
    })?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(env_filter)
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Plain => builder.with_span_events(FmtSpan::NONE).try_init(),
        LogFormat::Json => builder.json().with_current_span(true).try_init(),
    };
    result.map_err(|_| TelemetryError::AlreadyInstalled)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabel {
    pub controller: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub controller: &'static str,
    pub category: &'static str,
}

/// Reconcile counters, failures by category, durations, queue depth: one set per process,
/// labelled by controller.
#[derive(Clone, Debug)]
pub struct ControllerMetrics {
    reconciles: Family<ControllerLabel, Counter>,
    failures: Family<FailureLabels, Counter>,
    duration: Family<ControllerLabel, Histogram>,
    queue_depth: Family<ControllerLabel, Gauge>,
}

impl ControllerMetrics {
    /// Register under `<prefix>_reconcile_total`, `<prefix>_reconcile_errors_total`,
    /// `<prefix>_reconcile_duration_seconds` and `<prefix>_queue_depth`.
    pub fn register(registry: &mut Registry, prefix: &str) -> Self {
        let reconciles = Family::<ControllerLabel, Counter>::default();
        let failures = Family::<FailureLabels, Counter>::default();
        let duration = Family::<ControllerLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 16))
        });
        let queue_depth = Family::<ControllerLabel, Gauge>::default();
        registry.register(
            format!("{prefix}_reconcile"),
            "Reconciles run",
            reconciles.clone(),
        );
        registry.register(
            format!("{prefix}_reconcile_errors"),
            "Reconciles that failed, by error category",
            failures.clone(),
        );
        registry.register(
            format!("{prefix}_reconcile_duration_seconds"),
            "Time spent in one reconcile",
            duration.clone(),
        );
        registry.register(
            format!("{prefix}_queue_depth"),
            "Keys waiting in the work queue",
            queue_depth.clone(),
        );
        Self {
            reconciles,
            failures,
            duration,
            queue_depth,
        }
    }

    /// A set that is not registered anywhere (tests, tools).
    pub fn unregistered() -> Self {
        Self::register(&mut Registry::default(), "unregistered")
    }

    pub fn observe(&self, controller: &'static str, took: Duration, failure: Option<&'static str>) {
        let label = ControllerLabel { controller };
        self.reconciles.get_or_create(&label).inc();
        self.duration
            .get_or_create(&label)
            .observe(took.as_secs_f64());
        if let Some(category) = failure {
            self.failures
                .get_or_create(&FailureLabels {
                    controller,
                    category,
                })
                .inc();
        }
    }

    pub fn set_queue_depth(&self, controller: &'static str, depth: usize) {
        self.queue_depth
            .get_or_create(&ControllerLabel { controller })
            .set(depth as i64);
    }

    pub fn failures(&self, controller: &'static str, category: &'static str) -> u64 {
        self.failures
            .get_or_create(&FailureLabels {
                controller,
                category,
            })
            .get()
    }

    pub fn reconciles(&self, controller: &'static str) -> u64 {
        self.reconciles
            .get_or_create(&ControllerLabel { controller })
            .get()
    }
}
