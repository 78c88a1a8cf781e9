//! The agent's metrics, registered once in the registry made by `main`. Labels are bounded:
//! controller names, write kinds, event reasons and error categories, never object names.

use kmm_runtime::metrics::ControllerMetrics;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriteLabel {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug)]
pub struct Metrics {
    pub controllers: ControllerMetrics,
    writes: Family<WriteLabel, Counter>,
    events: Family<ReasonLabel, Counter>,
    pub modules: Gauge,
    pub nodes: Gauge,
    pub kernels: Gauge,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let controllers = ControllerMetrics::register(registry, "kmm_spoke");
        let writes = Family::<WriteLabel, Counter>::default();
        let events = Family::<ReasonLabel, Counter>::default();
        let modules = Gauge::default();
        let nodes = Gauge::default();
        let kernels = Gauge::default();
        registry.register(
            "kmm_spoke_api_writes",
            "Writes sent to the API server, by kind",
            writes.clone(),
        );
        registry.register(
            "kmm_spoke_node_events",
            "Node events recorded, by reason",
            events.clone(),
        );
        registry.register("kmm_spoke_modules", "Modules in the cache", modules.clone());
        registry.register("kmm_spoke_nodes", "Nodes in the cache", nodes.clone());
        registry.register(
            "kmm_spoke_kernels",
            "Distinct node kernels",
            kernels.clone(),
        );
        Self {
            controllers,
            writes,
            events,
            modules,
            nodes,
            kernels,
        }
    }

    pub fn unregistered() -> Self {
        Self::register(&mut Registry::default())
    }

    pub fn write(&self, kind: &'static str) {
        self.writes.get_or_create(&WriteLabel { kind }).inc();
    }

    pub fn writes(&self, kind: &'static str) -> u64 {
        self.writes.get_or_create(&WriteLabel { kind }).get()
    }

    pub fn event(&self, reason: &'static str) {
        self.events.get_or_create(&ReasonLabel { reason }).inc();
    }
}
