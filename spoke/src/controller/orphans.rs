//! Which of a Module's DaemonSets are no longer wanted: a pure choice over the Module, its
//! current render and the DaemonSets it owns. The reconciler deletes what this returns.

use std::sync::Arc;

use k8s_openapi::api::apps::v1::DaemonSet;
use kube::ResourceExt;
use shared_api::Module;
use shared_api::labels::{
    MODULE_VERSION_LABEL, ROLE_DEVICE_PLUGIN, ROLE_DRA, ROLE_LABEL, ROLE_LOADER,
    TARGET_KERNEL_LABEL,
};

use crate::render::{ModulePlan, module_version};

/// Whether a DaemonSet's status says it targets no node for its current spec.
pub fn targets_no_node(ds: &DaemonSet) -> bool {
    let Some(st) = ds.status.as_ref() else {
        return false;
    };
    st.desired_number_scheduled == 0
        && st.observed_generation.unwrap_or(0) >= ds.metadata.generation.unwrap_or(0)
}

/// The DaemonSets among `owned` to delete, in `owned`'s order: those not in `plan` and not
/// already being deleted, except
/// - a loader of the current version whose kernel failed to render this time (bad input
///   never deletes what works);
/// - a loader, or (while the Module has a device plugin) a device plugin, of an older version
///   that still targets a node: ordered upgrade — nodes still labelled for the old version
///   keep it until they are relabelled.
pub fn orphans<'a>(
    module: &Module,
    plan: &ModulePlan,
    owned: &'a [Arc<DaemonSet>],
) -> Vec<&'a Arc<DaemonSet>> {
    let wanted = plan.names();
    let version = module_version(module);
    owned
        .iter()
        .filter(|ds| {
            if wanted.contains(&ds.name_any()) || ds.metadata.deletion_timestamp.is_some() {
                return false;
            }
            let labels = ds.labels();
            let ds_version = labels.get(MODULE_VERSION_LABEL).map(String::as_str);
            let role = labels.get(ROLE_LABEL).map(String::as_str);
            if role == Some(ROLE_LOADER)
                && ds_version == version
                && labels
                    .get(TARGET_KERNEL_LABEL)
                    .is_some_and(|k| plan.failed_kernels.contains_key(k))
            {
                return false;
            }
            let older_version = version.is_some() && ds_version.is_some() && ds_version != version;
            let plugin_wanted = match role {
                Some(ROLE_DEVICE_PLUGIN) => module.spec.device_plugin.is_some(),
                Some(ROLE_DRA) => module.spec.dra.is_some(),
                _ => false,
            };
            if plugin_wanted && older_version && !targets_no_node(ds) {
                return false;
            }
            !(role == Some(ROLE_LOADER) && older_version && !targets_no_node(ds))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::testkit::*;

    const K_OLD: &str = "5.14.0-old";
    const K_NEW: &str = "6.1.0-new";

    /// The render of `module`: a loader for each kernel, and its device plugin if it has one.
    fn plan(module: &Module, kernels: &[&str]) -> ModulePlan {
        let v = module_version(module);
        ModulePlan {
            loaders: kernels.iter().map(|k| loader_ds(k, v)).collect(),
            device_plugin: module.spec.device_plugin.as_ref().map(|_| plugin_ds(v)),
            dra: module.spec.dra.as_ref().map(|_| dra_ds(v)),
            ..Default::default()
        }
    }

    fn chosen(module: &Module, plan: &ModulePlan, owned: Vec<DaemonSet>) -> Vec<String> {
        orphans(module, plan, &cached(owned))
            .into_iter()
            .map(|d| d.name_any())
            .collect()
    }

    #[test]
    fn what_is_no_longer_rendered_goes_at_once_unversioned() {
        let m = module();
        let p = plan(&m, &[K_NEW]);
        assert_eq!(
            chosen(
                &m,
                &p,
                vec![
                    loader_ds(K_NEW, None).observed(1, 1),
                    plugin_ds(None).observed(1, 1),
                    loader_ds(K_OLD, None).observed(1, 1), // a kernel no node runs now
                    loader_ds("gone", None).deleting(),    // already going
                ]
            ),
            vec![loader_ds(K_OLD, None).name_any()],
            "a loader of a kernel no longer targeted goes, even while it has pods"
        );
        // The device plugin goes with spec.devicePlugin.
        let m = module().without_device_plugin();
        let p = plan(&m, &[K_NEW]);
        assert_eq!(
            chosen(
                &m,
                &p,
                vec![loader_ds(K_NEW, None), plugin_ds(None).observed(1, 1)]
            ),
            vec![plugin_ds(None).name_any()]
        );
    }

    #[test]
    fn an_older_version_loader_stays_while_it_targets_a_node() {
        let m = module().version("2.0");
        let p = plan(&m, &[K_NEW]);
        let old = || loader_ds(K_NEW, Some("1.0"));
        for (ds, kept, why) in [
            (old().observed(1, 1), true, "a node still runs 1.0"),
            (old(), true, "not observed yet: unknown"),
            (old().observed(0, 0).bumped(), true, "a stale status of 0"),
            (old().observed(0, 0), false, "observed, targets no node"),
        ] {
            let got = chosen(&m, &p, vec![ds]);
            assert_eq!(got.is_empty(), kept, "{why}: {got:?}");
        }
        // The same for an older device plugin, while the Module has one.
        for (ds, kept) in [
            (plugin_ds(Some("1.0")).observed(2, 2), true),
            (plugin_ds(Some("1.0")).observed(0, 0), false),
        ] {
            assert_eq!(chosen(&m, &p, vec![ds]).is_empty(), kept);
        }
        let m = m.without_device_plugin();
        assert_eq!(
            chosen(&m, &p, vec![plugin_ds(Some("1.0")).observed(2, 2)]),
            vec![plugin_ds(Some("1.0")).name_any()],
            "no device plugin wanted at all: every version goes"
        );
        // Unversioned Module: an old versioned loader is not "older", it goes.
        let m = module();
        let p = plan(&m, &[K_NEW]);
        assert_eq!(
            chosen(&m, &p, vec![loader_ds(K_NEW, Some("1.0")).observed(1, 1)]).len(),
            1
        );
    }

    #[test]
    fn an_older_dra_driver_stays_while_it_targets_a_node_and_goes_with_dra() {
        let m = module().with_dra().version("2.0");
        let p = plan(&m, &[K_NEW]);
        assert!(chosen(&m, &p, vec![dra_ds(Some("2.0")).observed(1, 1)]).is_empty());
        assert!(chosen(&m, &p, vec![dra_ds(Some("1.0")).observed(1, 1)]).is_empty());
        assert_eq!(
            chosen(&m, &p, vec![dra_ds(Some("1.0")).observed(0, 0)]).len(),
            1
        );
        let m = module().version("2.0");
        let p = plan(&m, &[K_NEW]);
        assert_eq!(
            chosen(&m, &p, vec![dra_ds(Some("2.0")).observed(1, 1)]),
            vec![dra_ds(Some("2.0")).name_any()],
            "dra removed from the spec: its driver goes"
        );
    }

    #[test]
    fn a_loader_whose_kernel_failed_to_render_is_kept() {
        let m = module().version("2.0");
        let mut p = plan(&m, &[]);
        p.failed_kernels
            .insert(K_OLD.into(), "kernel 5.14.0-old: bad mapping".into());
        assert_eq!(
            chosen(
                &m,
                &p,
                vec![
                    loader_ds(K_OLD, Some("2.0")).observed(1, 1),
                    loader_ds(K_NEW, Some("2.0")).observed(1, 1),
                    loader_ds(K_OLD, Some("1.0")).observed(0, 0),
                ]
            ),
            vec![
                loader_ds(K_NEW, Some("2.0")).name_any(),
                loader_ds(K_OLD, Some("1.0")).name_any(),
            ],
            "only the current version's loader of the failed kernel is kept"
        );
    }

    #[test]
    fn targets_no_node_needs_an_observed_zero() {
        assert!(!targets_no_node(&loader_ds(K_NEW, None)));
        assert!(!targets_no_node(&loader_ds(K_NEW, None).observed(1, 0)));
        assert!(!targets_no_node(
            &loader_ds(K_NEW, None).observed(0, 0).bumped()
        ));
        assert!(targets_no_node(&loader_ds(K_NEW, None).observed(0, 0)));
    }
}
