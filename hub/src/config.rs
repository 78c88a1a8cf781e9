//! The hub's configuration file (`--config`, a ConfigMap in a cluster): the Driver Toolkit
//! table, the kaniko image and the build Job clean-up delay. Decoded strictly: an unknown
//! key is an error at start-up, not a silently ignored setting.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::build::{DEFAULT_KANIKO_IMAGE, DtkEntry, DtkTable};

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
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
}

#[derive(Debug, Clone)]
pub struct HubConfig {
    pub dtk: DtkTable,
    pub kaniko_image: String,
    pub job_gc_delay: Duration,
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            dtk: DtkTable::default(),
            kaniko_image: DEFAULT_KANIKO_IMAGE.into(),
            job_gc_delay: Duration::ZERO,
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
        })
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
}
