//! The orphan sweep: what is left of Modules gone from the cache without our finalizer
//! (removed by hand, or deleted while no agent ran). kube's `Controller` reconciles objects of
//! its store only, and drops a trigger whose object is gone; these keys go through a queue of
//! their own, fed by Module deletions, relists, events of the DaemonSets and pods they leave,
//! and a look at every resync.

use std::collections::BTreeSet;

use kube::runtime::reflector::ObjectRef;
use shared_api::Module;

use super::triggers::owner_key;
use super::{ModuleKey, Stores};

/// The metric label of the sweep's reconciles.
pub const SWEEP_CONTROLLER: &str = "module-orphans";

/// Modules that DaemonSets or pods in the cache still name but that are not in the cache.
pub fn absent_owners(stores: &Stores) -> BTreeSet<ModuleKey> {
    let daemonsets = stores.daemonsets.state();
    let pods = stores.pods.state();
    daemonsets
        .iter()
        .filter_map(|d| owner_key(d.as_ref()))
        .chain(pods.iter().filter_map(|p| owner_key(p.as_ref())))
        .filter(|(ns, name)| {
            stores
                .modules
                .get(&ObjectRef::<Module>::new(name).within(ns))
                .is_none()
        })
        .collect()
}
