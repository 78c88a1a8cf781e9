//! Tracing initialisation: one subscriber, plain or JSON, on stderr.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::FmtSpan;

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("invalid log filter {filter:?}: {reason}")]
    Filter { filter: String, reason: String },
    #[error("a tracing subscriber is already installed")]
    AlreadyInstalled,
}

impl crate::ErrorCategory for TelemetryError {
    fn category(&self) -> &'static str {
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
