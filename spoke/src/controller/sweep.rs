//! The orphan sweep: what is left of Modules gone from the cache without our finalizer
//! (removed by hand, or deleted while no agent ran). kube's `Controller` reconciles objects of
//! its store only, and drops a trigger whose object is gone; these keys go through a queue of
//! their own, fed by Module deletions, relists, events of the DaemonSets and pods they leave,
//! and a look at every resync.

use std::collections::BTreeSet;

use kube::runtime::reflector::ObjectRef;
use shared_api::Module;

use super::triggers::Owned;
use super::{ModuleKey, Stores};

/// The metric label of the sweep's reconciles.
pub const SWEEP_CONTROLLER: &str = "module-orphans";

/// Modules that DaemonSets or pods in the cache still name but that are not in the cache.
pub fn absent_owners(stores: &Stores) -> BTreeSet<ModuleKey> {
    let daemonsets = stores.daemonsets.state();
    let pods = stores.pods.state();
    daemonsets
        .iter()
        .filter_map(|d| d.module_key())
        .chain(pods.iter().filter_map(|p| p.module_key()))
        .filter(|(ns, name)| {
            stores
                .modules
                .get(&ObjectRef::<Module>::new(name).within(ns))
                .is_none()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use kube::runtime::reflector;
    use kube::runtime::watcher::Event;

    use super::*;
    use crate::cache::CachedPod;
    use crate::controller::testkit::{NAME, NS, loader_ds, loader_pod, module, plugin_pod};

    fn stores(
        modules: Vec<Module>,
        daemonsets: Vec<k8s_openapi::api::apps::v1::DaemonSet>,
        pods: Vec<CachedPod>,
    ) -> Stores {
        fn fill<K>(objects: Vec<K>) -> reflector::Store<K>
        where
            K: kube::Resource<DynamicType = ()> + Clone + 'static,
        {
            let (store, mut writer) = reflector::store();
            for o in objects {
                writer.apply_watcher_event(&Event::Apply(o));
            }
            store
        }
        Stores {
            modules: fill(modules),
            daemonsets: fill(daemonsets),
            pods: fill(pods),
            nodes: fill(Vec::new()),
            claims: None,
        }
    }

    #[test]
    fn leftovers_of_a_module_gone_from_the_cache_are_swept() {
        let s = stores(Vec::new(), vec![loader_ds("6.1.0", None)], Vec::new());
        assert_eq!(
            absent_owners(&s),
            BTreeSet::from([(NS.to_string(), NAME.to_string())])
        );
        // Pods alone name it too (their DaemonSet already gone).
        let s = stores(Vec::new(), Vec::new(), vec![loader_pod("n1")]);
        assert_eq!(absent_owners(&s).len(), 1);
    }

    #[test]
    fn a_module_in_the_cache_is_the_controllers() {
        let s = stores(
            vec![module()],
            vec![loader_ds("6.1.0", None)],
            vec![loader_pod("n1"), plugin_pod("n1")],
        );
        assert!(absent_owners(&s).is_empty());
        assert!(absent_owners(&stores(Vec::new(), Vec::new(), Vec::new())).is_empty());
    }
}
