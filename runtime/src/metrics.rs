//! The shared controller metrics: reconciles, failures by error category, durations and
//! queue depth, one set per process, labelled by controller.
//!
//! Metric labels are bounded: the controller name (a constant) and an error category (a
//! `&'static str` from [`ErrorCategory::category`]), never object names or messages.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::ErrorCategory;

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

    /// Record one reconcile of `controller` that took `took` and ended in `result`.
    pub fn observe_result<T, E: ErrorCategory>(
        &self,
        controller: &'static str,
        took: Duration,
        result: &Result<T, E>,
    ) {
        let failure = result.as_ref().err().map(|e| e.category());
        self.observe(controller, took, failure);
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

#[cfg(test)]
mod tests {
    use super::*;

    struct Refused;

    impl ErrorCategory for Refused {
        fn category(&self) -> &'static str {
            "refused"
        }
    }

    #[test]
    fn failures_are_counted_by_category() {
        let m = ControllerMetrics::unregistered();
        m.observe_result::<(), Refused>("module", Duration::from_millis(3), &Ok(()));
        m.observe_result::<(), Refused>("module", Duration::from_millis(3), &Err(Refused));
        assert_eq!(m.reconciles("module"), 2);
        assert_eq!(m.failures("module", "refused"), 1);
        assert_eq!(m.reconciles("kernel-facts"), 0);
    }
}
