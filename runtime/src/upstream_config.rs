//! Upstream KMM's operator configuration (`controller_config.yaml`, the key of the ConfigMaps
//! `kmm-operator-manager-config` and `kmm-operator-hub-manager-config`), read by both binaries
//! with `--upstream-config FILE` besides their flags.
//!
//! Upstream decodes it strictly and falls back to all defaults on any unknown key; here an
//! unknown key is reported (a warning naming it) and the rest still applies. Each binary maps
//! the keys that mean something to it ([`Overlay`]) and reports the others as ignored, with
//! why. Precedence: a flag (or its environment variable) > this file > the default.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::time::Duration;

use clap::ArgMatches;
use clap::parser::ValueSource;
use serde::Deserialize;

/// The ConfigMap key upstream reads.
pub const CONFIG_KEY: &str = "controller_config.yaml";

#[derive(Debug, thiserror::Error)]
pub enum UpstreamConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not upstream's controller_config.yaml: {message}")]
    Decode { path: String, message: String },
    #[error("{path}: {key}: {message}")]
    Value {
        path: String,
        key: &'static str,
        message: String,
    },
}

impl crate::ErrorCategory for UpstreamConfigError {
    fn category(&self) -> &'static str {
        match self {
            Self::Read { .. } => "config-read",
            Self::Decode { .. } => "config-decode",
            Self::Value { .. } => "config-value",
        }
    }
}

/// The file, every key optional (absent keys leave our defaults alone).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamConfig {
    pub health_probe_bind_address: Option<String>,
    pub webhook_port: Option<u16>,
    /// The midstream spelling of the webhook settings.
    pub webhook: Option<Webhook>,
    pub leader_election: Option<LeaderElection>,
    pub metrics: Option<Metrics>,
    pub job: Option<Job>,
    pub worker: Option<Worker>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Webhook {
    pub port: Option<u16>,
    pub cert_dir: Option<String>,
    #[serde(rename = "disableHTTP2")]
    pub disable_http2: Option<bool>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LeaderElection {
    pub enabled: Option<bool>,
    #[serde(rename = "resourceID")]
    pub resource_id: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Metrics {
    pub bind_address: Option<String>,
    pub enable_authn_authz: Option<bool>,
    pub secure_serving: Option<bool>,
    #[serde(rename = "disableHTTP2")]
    pub disable_http2: Option<bool>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Job {
    /// A Go duration (`0s`, `10m`, `1h30m`).
    pub gc_delay: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Worker {
    pub run_as_user: Option<i64>,
    #[serde(rename = "seLinuxType")]
    pub se_linux_type: Option<String>,
    pub firmware_host_path: Option<String>,
    /// The name `firmwareHostPath` had until 2024-08.
    pub set_firmware_class_path: Option<String>,
}

/// A parsed file and the keys in it that upstream does not know.
#[derive(Debug, Clone, Default)]
pub struct Loaded {
    pub path: String,
    pub config: UpstreamConfig,
    pub unknown: Vec<String>,
}

impl Loaded {
    pub fn load(path: &Path) -> Result<Self, UpstreamConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| UpstreamConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::parse(&shown, &text)
    }

    /// The content of `controller_config.yaml`, or a whole ConfigMap document holding it.
    pub fn parse(path: &str, text: &str) -> Result<Self, UpstreamConfigError> {
        let decode = |message: String| UpstreamConfigError::Decode {
            path: path.into(),
            message,
        };
        let value: serde_yaml::Value =
            serde_yaml::from_str(text).map_err(|e| decode(e.to_string()))?;
        let value = match configmap_payload(&value) {
            Some(inner) => serde_yaml::from_str(inner).map_err(|e| decode(e.to_string()))?,
            None => value,
        };
        let value = match value {
            // An empty file: every default.
            serde_yaml::Value::Null => serde_yaml::Value::Mapping(Default::default()),
            v => v,
        };
        let mut unknown = Vec::new();
        let config: UpstreamConfig = serde_ignored::deserialize(value, |p| {
            // serde_ignored writes `?` for each Option on the way; users write the keys.
            unknown.push(p.to_string().replace(".?", "").replace("?.", ""));
        })
        .map_err(|e| decode(e.to_string()))?;
        Ok(Self {
            path: path.into(),
            config,
            unknown,
        })
    }

    pub fn value_error(&self, key: &'static str, message: String) -> UpstreamConfigError {
        UpstreamConfigError::Value {
            path: self.path.clone(),
            key,
            message,
        }
    }
}

/// `data.controller_config.yaml` when the document is a ConfigMap.
fn configmap_payload(v: &serde_yaml::Value) -> Option<&str> {
    if v.get("kind")?.as_str()? != "ConfigMap" {
        return None;
    }
    v.get("data")?.get(CONFIG_KEY)?.as_str()
}

/// A file's path and what became of each of its keys.
pub type Report = (String, Vec<(String, Outcome)>);

/// What became of one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Set the flag's value.
    Applied(String),
    /// The flag (or its environment variable) was given and wins.
    Overridden(String),
    /// Means nothing to this binary; why.
    Ignored(&'static str),
    /// Not one of upstream's keys.
    Unknown,
}

/// Maps keys onto a binary's flags, honouring flags given explicitly, and records what
/// happened to each key.
#[derive(Debug, Default)]
pub struct Overlay<'a> {
    matches: Option<&'a ArgMatches>,
    pub report: Vec<(String, Outcome)>,
}

impl<'a> Overlay<'a> {
    /// `matches`: the `run` subcommand's matches (`None`: treat every flag as defaulted).
    pub fn new(loaded: &Loaded, matches: Option<&'a ArgMatches>) -> Self {
        let report = loaded
            .unknown
            .iter()
            .map(|k| (k.clone(), Outcome::Unknown))
            .collect();
        Self { matches, report }
    }

    /// Whether the flag `id` was given on the command line or through its variable.
    pub fn explicit(&self, id: &str) -> bool {
        self.matches
            .and_then(|m| m.try_get_raw(id).ok().flatten().map(|_| m.value_source(id)))
            .flatten()
            .is_some_and(|s| matches!(s, ValueSource::CommandLine | ValueSource::EnvVariable))
    }

    /// Set `target` from `key` unless the flag `id` was given.
    pub fn set<T: std::fmt::Debug>(&mut self, key: &str, id: &str, target: &mut T, value: T) {
        if self.explicit(id) {
            self.report.push((
                key.into(),
                Outcome::Overridden(format!("--{}", id.replace('_', "-"))),
            ));
        } else {
            self.report
                .push((key.into(), Outcome::Applied(format!("{value:?}"))));
            *target = value;
        }
    }

    pub fn ignore(&mut self, key: &str, why: &'static str) {
        self.report.push((key.into(), Outcome::Ignored(why)));
    }

    /// Log each key's outcome: unknown and ignored keys as warnings.
    pub fn log(&self, path: &str) {
        log_report(path, &self.report);
    }

    /// Keys that are unknown or ignored, for tests and status lines.
    pub fn not_applied(&self) -> Vec<&str> {
        self.report
            .iter()
            .filter(|(_, o)| matches!(o, Outcome::Unknown | Outcome::Ignored(_)))
            .map(|(k, _)| k.as_str())
            .collect()
    }
}

/// Log what became of each key: unknown and ignored keys as warnings (an empty report: the
/// file does not exist, so every default stays, as upstream does without its ConfigMap).
pub fn log_report(path: &str, report: &[(String, Outcome)]) {
    if report.is_empty() {
        tracing::info!(
            file = path,
            "no upstream config keys (missing or empty file): defaults"
        );
    }
    for (key, outcome) in report {
        match outcome {
            Outcome::Applied(v) => {
                tracing::info!(file = path, key, value = %v, "upstream config applied")
            }
            Outcome::Overridden(flag) => {
                tracing::info!(file = path, key, flag = %flag, "upstream config key overridden by a flag")
            }
            Outcome::Ignored(why) => {
                tracing::warn!(file = path, key, "upstream config key ignored: {why}")
            }
            Outcome::Unknown => tracing::warn!(
                file = path,
                key,
                "unknown upstream config key ignored (upstream would refuse the whole file)"
            ),
        }
    }
}

/// The keys both binaries share: `healthProbeBindAddress` (our admin port: probes and
/// metrics), `metrics.bindAddress` (a second listener serving the same routes), leader
/// election, and the metrics options we do not implement.
pub fn apply_common(
    loaded: &Loaded,
    overlay: &mut Overlay<'_>,
    common: &mut crate::cli::CommonArgs,
) -> Result<(), UpstreamConfigError> {
    let c = &loaded.config;
    if let Some(a) = &c.health_probe_bind_address {
        match bind_address(a).map_err(|m| loaded.value_error("healthProbeBindAddress", m))? {
            Some(addr) => overlay.set(
                "healthProbeBindAddress",
                "admin_address",
                &mut common.admin_address,
                Some(addr),
            ),
            None => overlay.ignore(
                "healthProbeBindAddress",
                "\"0\": the admin port serves the probes and cannot be turned off",
            ),
        }
    }
    if let Some(le) = &c.leader_election {
        if let Some(on) = le.enabled {
            overlay.set(
                "leaderElection.enabled",
                "leader_elect",
                &mut common.leader_elect,
                on,
            );
        }
        if let Some(id) = &le.resource_id {
            overlay.set(
                "leaderElection.resourceID",
                "lease_name",
                &mut common.lease_name,
                id.clone(),
            );
        }
    }
    if let Some(m) = &c.metrics {
        if let Some(a) = &m.bind_address {
            let addr = bind_address(a).map_err(|e| loaded.value_error("metrics.bindAddress", e))?;
            overlay.set(
                "metrics.bindAddress",
                "metrics_address",
                &mut common.metrics_address,
                addr,
            );
        }
        if m.secure_serving.is_some() {
            overlay.ignore(
                "metrics.secureServing",
                "metrics are served over plain HTTP (the admin port); terminate TLS in front",
            );
        }
        if m.enable_authn_authz.is_some() {
            overlay.ignore(
                "metrics.enableAuthnAuthz",
                "metrics carry no object names; restrict the port with a NetworkPolicy",
            );
        }
        if m.disable_http2.is_some() {
            overlay.ignore(
                "metrics.disableHTTP2",
                "the metrics listener speaks HTTP/1.1",
            );
        }
    }
    Ok(())
}

/// A controller-runtime bind address: `:8081` (every interface), `host:port`, or `0`
/// (off: `None`).
pub fn bind_address(s: &str) -> Result<Option<SocketAddr>, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(None);
    }
    if let Some(port) = s.strip_prefix(':') {
        let port: u16 = port
            .parse()
            .map_err(|_| format!("{s:?}: not a port after ':'"))?;
        return Ok(Some(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            port,
        )));
    }
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(Some(addr));
    }
    // A host name (e.g. `localhost:8080`): resolved once, at start-up.
    s.to_socket_addrs()
        .map_err(|e| format!("{s:?}: {e}"))?
        .next()
        .map(Some)
        .ok_or_else(|| format!("{s:?}: resolves to no address"))
}

/// A Go duration (`time.ParseDuration`): `0`, `300ms`, `1.5h`, `1h30m`, `2m3s`.
pub fn go_duration(s: &str) -> Result<Duration, String> {
    let text = s.trim();
    let bad = || format!("{text:?} is not a duration (e.g. 0s, 90s, 10m, 1h30m)");
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    if text.is_empty() || text.starts_with('-') {
        return Err(bad());
    }
    let mut rest = text.strip_prefix('+').unwrap_or(text);
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let n: f64 = rest[..num_len].parse().map_err(|_| bad())?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        rest = &rest[unit_len..];
        total += n * scale;
    }
    Duration::try_from_secs_f64(total).map_err(|_| bad())
}

#[cfg(test)]
#[path = "upstream_config_tests.rs"]
mod tests;
