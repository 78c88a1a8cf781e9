//! The image plan: which clusters an MCM selects, what each of their kernels needs,
//! and the distinct images over the whole fleet. Pure: no I/O.

use std::collections::{BTreeMap, BTreeSet};

use shared_api::ManagedClusterModule;
use shared_api::kernel::{KernelMapper, MappingError};
use shared_api::mcm::ClusterProblem;
use shared_api::module::{Build, Sign, TlsOptions};

pub use super::facts::ClusterFacts;

/// Equality label selector; an empty selector selects everything.
pub fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// One kernel of one cluster, resolved to its (unpinned) image.
#[derive(Debug, Clone, PartialEq)]
pub struct KernelTarget {
    pub kernel: String,
    pub image: String,
    pub registry_tls: TlsOptions,
    pub in_tree_modules_to_remove: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct ClusterPlan {
    pub cluster: String,
    /// Sorted by kernel.
    pub targets: Vec<KernelTarget>,
    /// Claimed kernels that no mapping matches.
    pub unmapped_kernels: Vec<String>,
    /// Why this cluster gets no (or not all of its) work, if so.
    pub problem: Option<ClusterProblem>,
    /// The cluster runs OpenShift (Day-1 MachineConfigs apply, `spec.day1`).
    pub openshift: bool,
    /// With `spec.placementRef`: the Placement's decision group of this cluster (index and
    /// name, as OCM's `ProgressivePerGroup` orders them); `None` with a label selector.
    pub decision_group: Option<super::placement::DecisionGroup>,
    /// `spec.day0` on an OpenShift cluster: the layered image it should boot, or why it
    /// waits ([`super::day0::plan_day0`]); `None` elsewhere.
    pub day0: Option<crate::render::day0::Day0Want>,
}

/// One distinct image of the fleet-wide plan.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageNeed {
    pub image: String,
    pub registry_tls: TlsOptions,
    pub build: Option<Build>,
    pub sign: Option<Sign>,
    /// The kernels served by this image; the first is the one it is built for.
    pub kernels: BTreeSet<String>,
    pub clusters: usize,
    /// A layered OS image of `spec.day0` (built `FROM` this RHCOS image).
    pub layering: Option<super::day0::Layering>,
}

impl ImageNeed {
    pub fn build_kernel(&self) -> &str {
        self.kernels.iter().next().map_or("", String::as_str)
    }
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Plan {
    /// Selected clusters, sorted by name.
    pub clusters: Vec<ClusterPlan>,
    /// Distinct images, by reference.
    pub images: BTreeMap<String, ImageNeed>,
    /// Whether the MCM loads modules at all (a device-plugin-only MCM needs no kernels).
    pub has_loader: bool,
}

/// Build the plan for one MCM over the known clusters. Substitution uses the spoke
/// namespace for `MOD_NAMESPACE` (DESIGN decision 5) and the MCM name for `MOD_NAME`,
/// because that is the Module the spokes receive.
pub fn plan<'a>(
    mcm: &ManagedClusterModule,
    clusters: impl IntoIterator<Item = &'a ClusterFacts>,
) -> Result<Plan, MappingError> {
    let name = mcm.metadata.name.as_deref().unwrap_or_default();
    let spoke_ns = mcm.spec.spoke_namespace.as_str();
    let loader = mcm.spec.module_spec.module_loader.as_ref();
    let mapper = loader
        .map(|l| KernelMapper::new(&l.container))
        .transpose()?;
    let mut selected: Vec<&ClusterFacts> = clusters
        .into_iter()
        .filter(|c| selects(&mcm.spec.selector, &c.labels))
        .collect();
    selected.sort_by(|a, b| a.name.cmp(&b.name));

    let mut out = Plan {
        has_loader: mapper.is_some(),
        ..Default::default()
    };
    for facts in selected {
        let mut cp = ClusterPlan {
            cluster: facts.name.clone(),
            openshift: facts.openshift,
            ..Default::default()
        };
        if let Some(p) = dra_unsupported(mcm, facts) {
            // Nothing new for it: the cluster keeps what it was shipped.
            cp.problem = Some(p);
            out.clusters.push(cp);
            continue;
        }
        let Some(mapper) = &mapper else {
            out.clusters.push(cp);
            continue;
        };
        // No claim, or a claim listing no kernel (no node reports one yet): the cluster
        // keeps whatever it was shipped until it says which kernels it runs.
        let Some(kernels) = facts.kernels.as_ref().filter(|k| !k.is_empty()) else {
            let message = match &facts.kernels {
                None => format!(
                    "the cluster publishes no {} claim yet",
                    shared_api::ocm::KERNEL_VERSIONS_CLAIM
                ),
                Some(_) => format!(
                    "the cluster's {} claim lists no kernel yet",
                    shared_api::ocm::KERNEL_VERSIONS_CLAIM
                ),
            };
            cp.problem = Some(problem(&facts.name, "NoKernelClaim", message));
            out.clusters.push(cp);
            continue;
        };
        let mut seen_images: BTreeSet<String> = BTreeSet::new();
        for kernel in kernels {
            match mapper.resolve(kernel, name, spoke_ns) {
                Ok(None) => cp.unmapped_kernels.push(kernel.clone()),
                Ok(Some(r)) => {
                    let need = out
                        .images
                        .entry(r.container_image.clone())
                        .or_insert_with(|| ImageNeed {
                            image: r.container_image.clone(),
                            registry_tls: r.registry_tls,
                            build: r.build.clone(),
                            sign: r.sign.clone(),
                            kernels: BTreeSet::new(),
                            clusters: 0,
                            layering: None,
                        });
                    need.kernels.insert(r.kernel.clone());
                    if seen_images.insert(r.container_image.clone()) {
                        need.clusters += 1;
                    }
                    cp.targets.push(KernelTarget {
                        kernel: r.kernel,
                        image: r.container_image,
                        registry_tls: r.registry_tls,
                        in_tree_modules_to_remove: r.in_tree_modules_to_remove,
                    });
                }
                Err(e) => {
                    cp.problem = Some(problem(
                        &facts.name,
                        "MappingError",
                        format!("kernel {kernel}: {e}"),
                    ));
                }
            }
        }
        cp.targets.sort_by(|a, b| a.kernel.cmp(&b.kernel));
        cp.targets.dedup_by(|a, b| a.kernel == b.kernel);
        if cp.targets.is_empty() && cp.problem.is_none() {
            cp.problem = Some(problem(
                &facts.name,
                "NoMatchingKernel",
                format!(
                    "no kernel mapping matches the cluster's kernels ({})",
                    kernels.join(", ")
                ),
            ));
        }
        out.clusters.push(cp);
    }
    Ok(out)
}

/// The first Kubernetes release that serves `resource.k8s.io/v1` (DRA).
pub const DRA_MIN_MINOR: u32 = 34;

/// Why an MCM with `dra` is not shipped to a cluster: its reported Kubernetes version is
/// older than 1.34. A cluster that reports no version is not held back (as upstream's webhook
/// skips the check when the version is unknown); its agent then refuses the Module itself.
pub fn dra_unsupported(mcm: &ManagedClusterModule, facts: &ClusterFacts) -> Option<ClusterProblem> {
    mcm.spec.module_spec.dra.as_ref()?;
    let (major, minor) = facts.kubernetes?;
    (major == 1 && minor < DRA_MIN_MINOR).then(|| {
        problem(
            &facts.name,
            "DRANotSupported",
            format!(
                "spec.moduleSpec.dra needs Kubernetes 1.{DRA_MIN_MINOR} or later; the cluster runs {major}.{minor}, so it keeps what it was shipped"
            ),
        )
    })
}

fn problem(cluster: &str, reason: &str, message: String) -> ClusterProblem {
    ClusterProblem {
        name: cluster.to_string(),
        reason: reason.to_string(),
        message,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use shared_api::mcm::ManagedClusterModuleSpec;

    pub(crate) fn mcm(yaml_spec: &str) -> ManagedClusterModule {
        let spec: ManagedClusterModuleSpec = serde_yaml::from_str(yaml_spec).unwrap();
        ManagedClusterModule::new("mod-example", spec)
    }

    pub(crate) fn cluster(
        name: &str,
        labels: &[(&str, &str)],
        kernels: Option<&[&str]>,
    ) -> ClusterFacts {
        ClusterFacts {
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            kernels: kernels.map(|ks| ks.iter().map(|k| k.to_string()).collect()),
            available: true,
            ..Default::default()
        }
    }

    pub(crate) const SPEC: &str = r#"
spokeNamespace: spoke-ns
selector: {wants: "yes"}
moduleSpec:
  selector: {}
  moduleLoader:
    container:
      modprobe: {moduleName: m}
      kernelMappings:
        - regexp: '^5\.14.*$'
          containerImage: reg/x/$MOD_NAMESPACE:${KERNEL_FULL_VERSION}
"#;

    #[test]
    fn distinct_images_over_the_fleet_and_namespace_is_the_spokes() {
        let m = mcm(SPEC);
        let cs = [
            cluster("c1", &[("wants", "yes")], Some(&["5.14.0-1", "5.15.0-2"])),
            cluster("c2", &[("wants", "yes")], Some(&["5.14.0-1", "5.14.0-3"])),
            cluster("c3", &[("wants", "no")], Some(&["5.14.0-9"])),
        ];
        let p = plan(&m, &cs).unwrap();
        assert_eq!(
            p.clusters
                .iter()
                .map(|c| c.cluster.as_str())
                .collect::<Vec<_>>(),
            vec!["c1", "c2"]
        );
        assert_eq!(
            p.images.keys().collect::<Vec<_>>(),
            vec!["reg/x/spoke-ns:5.14.0-1", "reg/x/spoke-ns:5.14.0-3"]
        );
        assert_eq!(p.images["reg/x/spoke-ns:5.14.0-1"].clusters, 2);
        assert_eq!(p.clusters[0].unmapped_kernels, vec!["5.15.0-2"]);
    }

    #[test]
    fn no_claim_and_no_match_are_problems_not_errors() {
        let m = mcm(SPEC);
        let cs = [
            cluster("a", &[("wants", "yes")], None),
            cluster("b", &[("wants", "yes")], Some(&["6.1.0"])),
        ];
        let p = plan(&m, &cs).unwrap();
        assert_eq!(
            p.clusters[0].problem.as_ref().unwrap().reason,
            "NoKernelClaim"
        );
        assert_eq!(
            p.clusters[1].problem.as_ref().unwrap().reason,
            "NoMatchingKernel"
        );
        assert!(p.images.is_empty());
    }

    /// An empty claim (no node reports a kernel yet) is no claim: the cluster keeps its
    /// work instead of losing it to `NoMatchingKernel`.
    #[test]
    fn an_empty_claim_is_like_no_claim() {
        let m = mcm(SPEC);
        let p = plan(&m, &[cluster("a", &[("wants", "yes")], Some(&[]))]).unwrap();
        let problem = p.clusters[0].problem.as_ref().unwrap();
        assert_eq!(problem.reason, "NoKernelClaim", "{problem:?}");
        assert!(problem.message.contains("lists no kernel"), "{problem:?}");
    }

    const DRA_SPEC: &str = r#"
spokeNamespace: spoke-ns
selector: {wants: "yes"}
moduleSpec:
  selector: {}
  moduleLoader:
    container:
      modprobe: {moduleName: m}
      kernelMappings:
        - regexp: '^5\.14.*$'
          containerImage: reg/x/$MOD_NAMESPACE:${KERNEL_FULL_VERSION}
  dra:
    driverName: gpu.example.com
    container: {image: 'r/dra:1'}
    deviceClasses: [{name: gpu}]
"#;

    /// `dra` goes only to clusters that report Kubernetes 1.34 or later, or no version.
    #[test]
    fn dra_ships_only_to_clusters_that_serve_it() {
        let at = |name: &str, v: Option<(u32, u32)>| ClusterFacts {
            kubernetes: v,
            ..cluster(name, &[("wants", "yes")], Some(&["5.14.0-1"]))
        };
        let cs = [
            at("old", Some((1, 33))),
            at("new", Some((1, 34))),
            at("unknown", None),
            at("two", Some((2, 0))),
        ];
        let p = plan(&mcm(DRA_SPEC), &cs).unwrap();
        let by: BTreeMap<&str, &ClusterPlan> =
            p.clusters.iter().map(|c| (c.cluster.as_str(), c)).collect();
        let old = by["old"].problem.as_ref().unwrap();
        assert_eq!(old.reason, "DRANotSupported");
        assert!(
            old.message.contains("1.34") && old.message.contains("1.33"),
            "{old:?}"
        );
        assert!(by["old"].targets.is_empty(), "nothing new is built for it");
        for c in ["new", "unknown", "two"] {
            assert!(by[c].problem.is_none(), "{c}: {:?}", by[c].problem);
            assert_eq!(by[c].targets.len(), 1);
        }
        // Without `dra` the version does not matter.
        let p = plan(&mcm(SPEC), &[at("old", Some((1, 33)))]).unwrap();
        assert!(p.clusters[0].problem.is_none());
    }

    #[test]
    fn device_plugin_only_needs_no_kernels() {
        let m = mcm(
            "spokeNamespace: ns\nselector: {}\nmoduleSpec:\n  selector: {}\n  devicePlugin:\n    container: {image: 'r/dp:1'}\n",
        );
        let p = plan(&m, &[cluster("a", &[], None)]).unwrap();
        assert!(!p.has_loader);
        assert_eq!(p.clusters.len(), 1);
        assert!(p.clusters[0].problem.is_none());
    }
}
