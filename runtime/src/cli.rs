//! The run arguments every controller binary shares, one duration grammar and one log-format
//! type. Each binary flattens [`CommonArgs`] into its own `run` arguments and gives the flags
//! its environment variables and defaults with clap's `mut_arg`, so that `kmm-hub` keeps
//! `KMM_HUB_*` and `kmm-spoke` keeps `KMM_SPOKE_*`:
//!
//! ```
//! use clap::Parser;
//! #[derive(Parser, Debug)]
//! #[command(mut_arg("resync", |a| a.env("EXAMPLE_RESYNC")))]
//! struct Run {
//!     #[command(flatten)]
//!     common: kmm_runtime::cli::CommonArgs,
//! }
//! let run = Run::try_parse_from(["run", "--resync", "30s"]).unwrap();
//! assert_eq!(run.common.resync, std::time::Duration::from_secs(30));
//! ```

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;

pub use crate::telemetry::LogFormat;

/// Flags of `run` shared by the hub and the spoke. Argument ids (for `mut_arg`) are the field
/// names: `log_format`, `log_filter`, `admin_address`, `metrics_address`, `leader_elect`, `lease_name`, `resync`.
#[derive(Args, Debug, Clone)]
pub struct CommonArgs {
    /// Log format: `plain` (also `text`) or `json`.
    #[arg(long, default_value = "plain")]
    pub log_format: LogFormat,
    /// Log filter (tracing EnvFilter syntax; RUST_LOG itself wins).
    #[arg(long, default_value = "info")]
    pub log_filter: String,
    /// Address of /livez, /readyz and /metrics.
    #[arg(long)]
    pub admin_address: Option<SocketAddr>,
    /// A second address serving /metrics (and the probes), e.g. upstream's
    /// `metrics.bindAddress`; none by default (the admin address serves /metrics).
    #[arg(long)]
    pub metrics_address: Option<SocketAddr>,
    /// Elect a leader among replicas on a coordination.k8s.io Lease.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    pub leader_elect: bool,
    /// Name of the leader-election Lease.
    #[arg(long, default_value = "kmm")]
    pub lease_name: String,
    /// How often everything is reconciled even without changes (e.g. 600, 600s, 10m, 1h30m).
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub resync: Duration,
}

impl CommonArgs {
    /// The admin address, or `default` when none was given.
    pub fn admin_address_or(&self, default: SocketAddr) -> SocketAddr {
        self.admin_address.unwrap_or(default)
    }
}

/// Durations on the command line: `600` (seconds), `600s`, `500ms`, `10m`, `1h`, and sums of
/// them (`1h30m`, `1h 30m`). Zero is refused (a zero period is a busy loop); so are days and
/// longer units (write hours).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let text = s.trim();
    let bad = || format!("{text:?} is not a duration (e.g. 600, 600s, 10m, 1h30m)");
    if text.is_empty() {
        return Err(bad());
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c.is_whitespace())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = rest[unit_len..].trim_start();
        let part = match unit {
            "" | "s" | "sec" | "secs" => Duration::from_secs(n),
            "ms" => Duration::from_millis(n),
            "m" | "min" | "mins" => Duration::from_secs(n.saturating_mul(60)),
            "h" | "hr" | "hrs" | "hour" | "hours" => Duration::from_secs(n.saturating_mul(3600)),
            other => return Err(format!("unknown unit {other:?} in {text:?} (ms, s, m, h)")),
        };
        // A bare number is only valid alone: "1h30" is ambiguous.
        if unit.is_empty() && (total != Duration::ZERO || !rest.is_empty()) {
            return Err(bad());
        }
        total = total.saturating_add(part);
    }
    if total.is_zero() {
        return Err("must be more than zero".into());
    }
    Ok(total)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("600").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("600s").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("1h 30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("2min").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("0").is_err());
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5d").is_err());
        assert!(parse_duration("x").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("1h30").is_err());
    }

    #[derive(Parser, Debug)]
    #[command(
        mut_arg("log_format", |a| a.env("KMM_RUNTIME_TEST_LOG_FORMAT").default_value("text")),
        mut_arg("resync", |a| a.long("resync-period").env("KMM_RUNTIME_TEST_RESYNC")),
        mut_arg("leader_elect", |a| a.default_value("true")),
    )]
    struct Run {
        #[command(flatten)]
        common: CommonArgs,
    }

    #[test]
    fn binaries_rename_and_redefault_the_shared_flags() {
        use clap::CommandFactory;
        Run::command().debug_assert();
        let run = Run::try_parse_from(["run", "--resync-period", "30s"]).unwrap();
        assert_eq!(run.common.resync, Duration::from_secs(30));
        assert_eq!(run.common.log_format, LogFormat::Plain);
        assert!(run.common.leader_elect);
        assert!(Run::try_parse_from(["run", "--resync", "30s"]).is_err());
        let run = Run::try_parse_from(["run", "--log-format", "json", "--leader-elect", "false"])
            .unwrap();
        assert_eq!(run.common.log_format, LogFormat::Json);
        assert!(!run.common.leader_elect);
        let help = Run::command().render_long_help().to_string();
        assert!(help.contains("KMM_RUNTIME_TEST_RESYNC"), "{help}");
    }
}
