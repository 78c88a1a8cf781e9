//! The hub's configuration file (`--config`, a ConfigMap in a cluster): the Driver Toolkit
//! table, the kaniko image, where and how build Jobs run and their clean-up delay. Decoded
//! strictly: an unknown key is an error at start-up, not a silently ignored setting.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use serde::Deserialize;

use crate::render::build_job::{DEFAULT_KANIKO_IMAGE, DtkEntry, DtkTable};

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HubConfigFile {
    /// Kernel regexp → Driver Toolkit image, for Dockerfiles declaring `ARG DTK_AUTO`.
    #[serde(default)]
    pub driver_toolkit: Vec<DtkEntry>,
    /// The kaniko executor image for build Jobs.
    #[serde(default)]
    pub kaniko_image: Option<String>,
    /// How long finished build Jobs are kept (e.g. `10m`).
    #[serde(default)]
    pub job_gc_delay: Option<String>,
    /// The namespace build Jobs run in (default `<operator namespace>-builds`); never the
    /// hub's own, which holds the signing keys.
    #[serde(default)]
    pub build_namespace: Option<String>,
    /// Requests and limits of the kaniko container (default: [`default_build_resources`]).
    #[serde(default)]
    pub build_resources: Option<ResourceRequirements>,
    /// How long one build may run before Kubernetes stops it (`activeDeadlineSeconds`).
    #[serde(default)]
    pub build_deadline: Option<String>,
}

/// One build's CPU and memory unless configured: requests 500m / 1Gi, limits 2 / 4Gi.
pub fn default_build_resources() -> ResourceRequirements {
    let q = |cpu: &str, mem: &str| {
        BTreeMap::from([
            ("cpu".to_string(), Quantity(cpu.into())),
            ("memory".to_string(), Quantity(mem.into())),
        ])
    };
    ResourceRequirements {
        requests: Some(q("500m", "1Gi")),
        limits: Some(q("2", "4Gi")),
        ..Default::default()
    }
}

pub const DEFAULT_BUILD_DEADLINE: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone)]
pub struct HubConfig {
    pub dtk: DtkTable,
    pub kaniko_image: String,
    pub job_gc_delay: Duration,
    /// Empty until [`HubConfig::resolve`] fills in the default.
    pub build_namespace: String,
    pub build_resources: ResourceRequirements,
    pub build_deadline: Duration,
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            dtk: DtkTable::default(),
            kaniko_image: DEFAULT_KANIKO_IMAGE.into(),
            job_gc_delay: Duration::ZERO,
            build_namespace: String::new(),
            build_resources: default_build_resources(),
            build_deadline: DEFAULT_BUILD_DEADLINE,
        }
    }
}

impl HubConfig {
    pub fn parse(text: &str) -> Result<Self, String> {
        let f: HubConfigFile = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
        Ok(Self {
            dtk: DtkTable::new(&f.driver_toolkit)?,
            kaniko_image: f
                .kaniko_image
                .unwrap_or_else(|| DEFAULT_KANIKO_IMAGE.into()),
            job_gc_delay: match f.job_gc_delay {
                Some(d) => {
                    humantime::parse_duration(&d).map_err(|e| format!("jobGcDelay {d:?}: {e}"))?
                }
                None => Duration::ZERO,
            },
            build_namespace: f.build_namespace.unwrap_or_default(),
            build_resources: f.build_resources.unwrap_or_else(default_build_resources),
            build_deadline: match f.build_deadline {
                Some(d) => match humantime::parse_duration(&d) {
                    Ok(d) if d >= Duration::from_secs(1) => d,
                    Ok(_) => return Err(format!("buildDeadline {d:?}: at least 1s")),
                    Err(e) => return Err(format!("buildDeadline {d:?}: {e}")),
                },
                None => DEFAULT_BUILD_DEADLINE,
            },
        })
    }

    /// Fill in the build namespace for this operator namespace; refuse the operator
    /// namespace itself (a build pod there could mount the signing keys).
    pub fn resolve(mut self, operator_namespace: &str) -> Result<Self, String> {
        if self.build_namespace.is_empty() {
            self.build_namespace = format!("{operator_namespace}-builds");
        }
        if self.build_namespace == operator_namespace {
            return Err(format!(
                "buildNamespace must not be the hub's namespace {operator_namespace:?}: \
                 build pods there could mount its signing keys"
            ));
        }
        Ok(self)
    }

    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_and_complete() {
        let c = HubConfig::parse("driverToolkit:\n- {kernel: '^5\\.14', image: 'dtk:1'}\nkanikoImage: k:1\njobGcDelay: 5m\n").unwrap();
        assert_eq!(c.dtk.image_for("5.14.0-1"), Some("dtk:1"));
        assert_eq!(c.kaniko_image, "k:1");
        assert_eq!(c.job_gc_delay, Duration::from_secs(300));
        assert!(
            HubConfig::parse("kanikoImagee: x\n")
                .unwrap_err()
                .contains("unknown field")
        );
        assert!(HubConfig::parse("jobGcDelay: soon\n").is_err());
    }

    #[test]
    fn build_settings() {
        let c = HubConfig::parse("").unwrap().resolve("kmm-hub").unwrap();
        assert_eq!(c.build_namespace, "kmm-hub-builds");
        assert_eq!(c.build_resources, default_build_resources());
        assert_eq!(c.build_deadline, DEFAULT_BUILD_DEADLINE);
        let c = HubConfig::parse(
            "buildNamespace: b\nbuildDeadline: 20m\nbuildResources: {limits: {memory: 8Gi}}\n",
        )
        .unwrap()
        .resolve("kmm-hub")
        .unwrap();
        assert_eq!(c.build_namespace, "b");
        assert_eq!(c.build_deadline, Duration::from_secs(1200));
        assert_eq!(
            c.build_resources.limits.unwrap()["memory"],
            Quantity("8Gi".into())
        );
        assert!(
            HubConfig::parse("buildNamespace: kmm-hub\n")
                .unwrap()
                .resolve("kmm-hub")
                .unwrap_err()
                .contains("signing keys")
        );
        assert!(HubConfig::parse("buildDeadline: 0s\n").is_err());
    }
}
