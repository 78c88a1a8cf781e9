//! The hub's Prometheus metrics: one registry made in `main` and passed down;
//! labels are bounded (outcomes and static error categories, never names).

use kmm_runtime::metrics::ControllerMetrics;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::last_decisions::RolloutTotals;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CategoryLabel {
    pub category: &'static str,
}

impl CategoryLabel {
    pub fn new(category: &'static str) -> Self {
        Self { category }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    pub phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

/// Cheap to clone: every metric is reference-counted inside.
#[derive(Clone, Debug)]
pub struct Metrics {
    /// Reconciles, failures by category and durations, as the spoke counts them
    /// (`kmm_hub_reconcile_total{controller="mcm"}`, …).
    pub controller: ControllerMetrics,
    pub objects_written: Family<KindLabel, Counter>,
    pub objects_deleted: Family<KindLabel, Counter>,
    pub writes_skipped: Counter,
    pub registry_lookups: Counter,
    pub registry_cache_hits: Counter,
    pub registry_errors: Family<CategoryLabel, Counter>,
    pub builds: Family<OutcomeLabel, Counter>,
    pub signs: Family<OutcomeLabel, Counter>,
    pub managed_cluster_modules: Gauge,
    pub clusters: Gauge,
    /// Clusters moved to a new revision by progressive rollouts.
    pub rollout_moved: Counter,
    /// Progressive rollouts that halted.
    pub rollout_halts: Counter,
    /// Clusters of progressive rollouts by state, over every MCM.
    pub rollout_clusters: Family<StateLabel, Gauge>,
    /// MCMs with a progressive rollout, by phase.
    pub rollouts: Family<PhaseLabel, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            controller: ControllerMetrics::unregistered(),
            objects_written: Family::default(),
            objects_deleted: Family::default(),
            writes_skipped: Counter::default(),
            registry_lookups: Counter::default(),
            registry_cache_hits: Counter::default(),
            registry_errors: Family::default(),
            builds: Family::default(),
            signs: Family::default(),
            managed_cluster_modules: Gauge::default(),
            clusters: Gauge::default(),
            rollout_moved: Counter::default(),
            rollout_halts: Counter::default(),
            rollout_clusters: Family::default(),
            rollouts: Family::default(),
        }
    }
}

impl Metrics {
    /// Create the metrics and register them under `kmm_hub_`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            controller: ControllerMetrics::register(registry, "kmm_hub"),
            ..Self::default()
        };
        let r = registry.sub_registry_with_prefix("kmm_hub");
        r.register(
            "objects_written",
            "Objects created or updated, by kind",
            m.objects_written.clone(),
        );
        r.register(
            "objects_deleted",
            "Objects deleted, by kind",
            m.objects_deleted.clone(),
        );
        r.register(
            "writes_skipped",
            "Writes skipped because the cached object already matched",
            m.writes_skipped.clone(),
        );
        r.register(
            "registry_lookups",
            "Registry manifest lookups sent",
            m.registry_lookups.clone(),
        );
        r.register(
            "registry_cache_hits",
            "Digest lookups answered from the cache",
            m.registry_cache_hits.clone(),
        );
        r.register(
            "registry_errors",
            "Registry lookup failures by category",
            m.registry_errors.clone(),
        );
        r.register("builds", "Build Jobs by outcome", m.builds.clone());
        r.register("signs", "Image signings by outcome", m.signs.clone());
        r.register(
            "managed_cluster_modules",
            "ManagedClusterModules known",
            m.managed_cluster_modules.clone(),
        );
        r.register("clusters", "ManagedClusters known", m.clusters.clone());
        r.register(
            "rollout_clusters_moved",
            "Clusters moved to a new revision by progressive rollouts",
            m.rollout_moved.clone(),
        );
        r.register(
            "rollout_halts",
            "Progressive rollouts that halted",
            m.rollout_halts.clone(),
        );
        r.register(
            "rollout_clusters",
            "Clusters of progressive rollouts by state (Updated, InProgress, Failed, Pending), over every ManagedClusterModule",
            m.rollout_clusters.clone(),
        );
        r.register(
            "rollouts",
            "ManagedClusterModules with a progressive rollout, by phase (Progressing, Halted, Complete)",
            m.rollouts.clone(),
        );
        m.set_rollouts(&RolloutTotals::default());
        m
    }

    /// Set the rollout gauges from the sums over every MCM.
    pub fn set_rollouts(&self, t: &RolloutTotals) {
        for (state, n) in [
            ("Updated", t.updated),
            ("InProgress", t.in_progress),
            ("Failed", t.failed),
            ("Pending", t.pending),
        ] {
            self.rollout_clusters
                .get_or_create(&StateLabel { state })
                .set(n);
        }
        for (phase, n) in [
            ("Progressing", t.progressing),
            ("Halted", t.halted),
            ("Complete", t.complete),
        ] {
            self.rollouts.get_or_create(&PhaseLabel { phase }).set(n);
        }
    }
}
