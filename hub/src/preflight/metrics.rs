//! The preflight gauges (labels bounded: the three verification statuses).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use shared_api::preflight::VerificationStatus;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: &'static str,
}

/// Cheap to clone: every metric is reference-counted inside.
#[derive(Clone, Debug, Default)]
pub struct PreflightMetrics {
    /// FleetPreflightValidations known (upstream's `kmm_preflight_num`).
    pub validations: Gauge,
    /// Results of every preflight (MCM × kernel), by verification status.
    pub results: Family<StatusLabel, Gauge>,
}

impl PreflightMetrics {
    /// Create the gauges and register them under `kmm_hub_`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("kmm_hub");
        r.register(
            "preflight_validations",
            "FleetPreflightValidations known",
            m.validations.clone(),
        );
        r.register(
            "preflight_results",
            "Preflight results (MCM x kernel) by verification status",
            m.results.clone(),
        );
        m
    }

    pub fn results_of(&self, status: VerificationStatus) -> Gauge {
        self.results
            .get_or_create(&StatusLabel {
                status: status.as_str(),
            })
            .clone()
    }
}
