//! Day 0 by CoreOS layering (`spec.day0`), the decisions: which RHCOS image each selected
//! OpenShift cluster runs, the layered image for it (one wanted image per distinct
//! (RHCOS image, kernel) of the fleet, added to the plan's images so that the normal pipeline
//! builds, signs and pins it once), and per cluster which MachineConfig to ship: the fresh
//! pinned image, else the one shipped before (never nothing, never a tag). Pure.

use std::collections::BTreeMap;

use shared_api::ManagedClusterModule;
use shared_api::day0::{OS_IMAGE_CLAIM, OSTREE_LINUX_LABEL, layered_image, sign_for};
use shared_api::mcm::ImageState;

use super::dtk::DTK_UNKNOWN;
use super::facts::ClusterFacts;
use super::image::ImageOutcome;
use super::plan::{ImageNeed, Plan};
use crate::render::day0::{Day0Want, ShippedDay0};
use crate::render::pin;

pub const OS_IMAGE_UNKNOWN: &str = "OSImageUnknown";
pub const OS_IMAGE_KERNEL_UNKNOWN: &str = "OSImageKernelUnknown";
pub const OS_IMAGE_LOOKUP_FAILED: &str = "OSImageLookupFailed";
pub const LAYERED_IMAGE_INVALID: &str = "LayeredImageInvalid";

/// What the registry said of an RHCOS image: its digest and its kernel (`None` without the
/// `ostree.linux` label).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseImage {
    pub digest: String,
    pub kernel: Option<String>,
}

/// A lookup of an RHCOS image: what it is, or why the registry could not say.
pub type BaseLookup = Result<BaseImage, String>;

/// What a layered build needs besides the MCM's `spec.day0.build`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layering {
    /// The RHCOS image pinned by digest (`RHCOS_IMAGE`).
    pub base_image: String,
}

/// The RHCOS image `spec.day0` layers on for a cluster: the override, else the cluster's claim.
pub fn os_image_of(mcm: &ManagedClusterModule, facts: &ClusterFacts) -> Option<String> {
    let d = mcm.spec.day0.as_ref()?;
    d.os_image.clone().or_else(|| facts.os_image.clone())
}

/// The distinct RHCOS images of the selected OpenShift clusters (to look up).
pub fn os_images_to_look_up<'a>(
    mcm: &ManagedClusterModule,
    plan: &Plan,
    facts: impl IntoIterator<Item = &'a ClusterFacts>,
) -> Vec<String> {
    if mcm.spec.day0.is_none() {
        return Vec::new();
    }
    let facts: BTreeMap<&str, &ClusterFacts> =
        facts.into_iter().map(|f| (f.name.as_str(), f)).collect();
    let mut out: Vec<String> = plan
        .clusters
        .iter()
        .filter(|c| c.openshift)
        .filter_map(|c| os_image_of(mcm, facts.get(c.cluster.as_str())?))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Adds the layered images to the plan and each selected OpenShift cluster's Day-0 want.
pub fn plan_day0<'a>(
    mcm: &ManagedClusterModule,
    plan: &mut Plan,
    facts: impl IntoIterator<Item = &'a ClusterFacts>,
    bases: &BTreeMap<String, BaseLookup>,
) {
    let Some(spec) = mcm.spec.day0.as_ref() else {
        return;
    };
    let name = mcm.metadata.name.as_deref().unwrap_or_default();
    let spoke_ns = mcm.spec.spoke_namespace.as_str();
    let facts: BTreeMap<&str, &ClusterFacts> =
        facts.into_iter().map(|f| (f.name.as_str(), f)).collect();
    for cp in plan.clusters.iter_mut().filter(|c| c.openshift) {
        let os_image = facts
            .get(cp.cluster.as_str())
            .and_then(|f| os_image_of(mcm, f));
        let mut want = Day0Want {
            os_image: os_image.clone(),
            ..Default::default()
        };
        let wait = |reason: &str, message: String| Some((reason.to_string(), message));
        let Some(os_image) = os_image else {
            want.waiting = wait(
                OS_IMAGE_UNKNOWN,
                format!(
                    "the cluster publishes no {OS_IMAGE_CLAIM} claim (its RHCOS image) and spec.day0.osImage is not set"
                ),
            );
            cp.day0 = Some(want);
            continue;
        };
        let base = match bases.get(&os_image) {
            Some(Ok(b)) => b,
            Some(Err(e)) => {
                want.waiting = wait(
                    OS_IMAGE_LOOKUP_FAILED,
                    format!("cannot read the RHCOS image {os_image}: {e}"),
                );
                cp.day0 = Some(want);
                continue;
            }
            None => {
                want.waiting = wait(
                    OS_IMAGE_LOOKUP_FAILED,
                    format!("the RHCOS image {os_image} was not looked up yet"),
                );
                cp.day0 = Some(want);
                continue;
            }
        };
        let Some(kernel) = base.kernel.clone() else {
            want.waiting = wait(
                OS_IMAGE_KERNEL_UNKNOWN,
                format!(
                    "the RHCOS image {os_image} has no {OSTREE_LINUX_LABEL} label naming its kernel; nothing is built for it"
                ),
            );
            cp.day0 = Some(want);
            continue;
        };
        want.kernel = Some(kernel.clone());
        let image =
            match layered_image(&spec.container_image, &kernel, &base.digest, name, spoke_ns) {
                Ok(i) => i,
                Err(e) => {
                    want.waiting = wait(
                        LAYERED_IMAGE_INVALID,
                        format!("spec.day0.containerImage: {e}"),
                    );
                    cp.day0 = Some(want);
                    continue;
                }
            };
        let sign = match spec
            .sign
            .as_ref()
            .map(|s| sign_for(s, &kernel, name, spoke_ns))
            .transpose()
        {
            Ok(s) => s,
            Err(e) => {
                want.waiting = wait(LAYERED_IMAGE_INVALID, format!("spec.day0.sign: {e}"));
                cp.day0 = Some(want);
                continue;
            }
        };
        let need = plan
            .images
            .entry(image.clone())
            .or_insert_with(|| ImageNeed {
                image: image.clone(),
                registry_tls: Default::default(),
                build: Some(spec.build.clone()),
                sign,
                kernels: [kernel.clone()].into(),
                clusters: 0,
                layering: Some(Layering {
                    base_image: pin(&os_image, &base.digest),
                }),
            });
        need.clusters += 1;
        want.image = Some(image);
        cp.day0 = Some(want);
    }
}

/// One cluster's Day-0 MachineConfig: the layered image freshly pinned when ready, else the
/// one it was shipped (kept while the new one is resolved, built, signed or failing), and the
/// want with why it waits (if so).
pub fn choose(
    mcm: &ManagedClusterModule,
    want: &Day0Want,
    outcomes: &BTreeMap<String, ImageOutcome>,
    shipped: Option<&ShippedDay0>,
) -> (Option<ShippedDay0>, Day0Want) {
    let mut want = want.clone();
    let Some(spec) = mcm.spec.day0.as_ref() else {
        return (None, want);
    };
    let name = spec.machine_config_name(mcm.metadata.name.as_deref().unwrap_or_default());
    let Some(image) = want.image.clone() else {
        return (shipped.cloned(), want);
    };
    let outcome = outcomes.get(&image);
    match outcome {
        Some(o) if o.state == ImageState::Ready && o.digest.is_some() => {
            let digest = o.digest.clone().unwrap_or_default();
            let fresh = ShippedDay0 {
                name,
                os_image_url: pin(&image, &digest),
                base_image: want.os_image.clone().unwrap_or_default(),
                kernel: want.kernel.clone().unwrap_or_default(),
            };
            (Some(fresh), want)
        }
        other => {
            let reason = other.and_then(|o| o.reason.clone()).unwrap_or_default();
            let code = match other.map(|o| o.state) {
                _ if reason.starts_with(DTK_UNKNOWN) => DTK_UNKNOWN,
                Some(ImageState::Building) => "ImageBuilding",
                Some(ImageState::Signing) => "ImageSigning",
                Some(ImageState::Failed) => "ImageFailed",
                Some(ImageState::Missing) => "ImageMissing",
                _ => "ImagePending",
            };
            let message = if reason.is_empty() {
                format!("waiting for the layered image {image}")
            } else {
                format!("layered image {image}: {reason}")
            };
            want.waiting = Some((code.to_string(), message));
            (shipped.cloned(), want)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::plan::plan;
    use crate::decide::plan::tests::{cluster, mcm};

    const BASE_A: &str =
        "reg:5000/rhcos@sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const DIGEST_A: &str =
        "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const BASE_B: &str = "reg:5000/rhcos:4.17";
    const DIGEST_B: &str =
        "sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
    const K1: &str = "5.14.0-427.13.1.el9_4.x86_64";
    const K2: &str = "5.14.0-427.40.1.el9_4.x86_64";

    const SPEC: &str = r#"
spokeNamespace: ns
selector: {}
moduleSpec:
  selector: {}
  devicePlugin: {container: {image: 'r/dp:1'}}
day0:
  machineConfigPool: worker
  containerImage: reg:5000/os/rhcos-kmod
  build: {dockerfileConfigMap: {name: layering}}
  sign:
    keySecret: {name: k}
    certSecret: {name: c}
    filesToSign: ['/usr/lib/modules/${KERNEL_FULL_VERSION}/simple-kmod.ko']
"#;

    fn os(name: &str, openshift: bool, image: Option<&str>) -> ClusterFacts {
        ClusterFacts {
            openshift,
            os_image: image.map(str::to_string),
            ..cluster(name, &[], None)
        }
    }

    fn bases() -> BTreeMap<String, BaseLookup> {
        [
            (
                BASE_A.to_string(),
                Ok(BaseImage {
                    digest: DIGEST_A.into(),
                    kernel: Some(K1.into()),
                }),
            ),
            (
                BASE_B.to_string(),
                Ok(BaseImage {
                    digest: DIGEST_B.into(),
                    kernel: Some(K2.into()),
                }),
            ),
            (
                "reg:5000/nolabel:1".to_string(),
                Ok(BaseImage {
                    digest: DIGEST_B.into(),
                    kernel: None,
                }),
            ),
            (
                "reg:5000/down:1".to_string(),
                Err("connection refused".into()),
            ),
        ]
        .into()
    }

    #[test]
    fn one_layered_image_per_distinct_base_and_kernel() {
        let m = mcm(SPEC);
        let cs = [
            os("a", true, Some(BASE_A)),
            os("b", true, Some(BASE_A)),
            os("c", true, Some(BASE_B)),
            os("plain", false, Some(BASE_A)),
            os("none", true, None),
            os("nolabel", true, Some("reg:5000/nolabel:1")),
            os("down", true, Some("reg:5000/down:1")),
        ];
        let mut p = plan(&m, &cs).unwrap();
        assert_eq!(
            os_images_to_look_up(&m, &p, &cs),
            vec!["reg:5000/down:1", "reg:5000/nolabel:1", BASE_B, BASE_A,]
        );
        plan_day0(&m, &mut p, &cs, &bases());
        let a = format!("reg:5000/os/rhcos-kmod:{K1}-aaaaaaaaaaaa");
        let b = format!("reg:5000/os/rhcos-kmod:{K2}-bbbbbbbbbbbb");
        assert_eq!(
            p.images.keys().cloned().collect::<Vec<_>>(),
            vec![a.clone(), b.clone()]
        );
        let need = &p.images[&a];
        assert_eq!(need.clusters, 2);
        assert_eq!(need.build_kernel(), K1);
        assert_eq!(
            need.layering,
            Some(Layering {
                base_image: BASE_A.into()
            })
        );
        assert_eq!(
            need.sign.as_ref().unwrap().files_to_sign,
            vec![format!("/usr/lib/modules/{K1}/simple-kmod.ko")]
        );
        // A tag is pinned by the digest the registry gave.
        assert_eq!(
            p.images[&b].layering.as_ref().unwrap().base_image,
            format!("reg:5000/rhcos@{DIGEST_B}")
        );
        let by: BTreeMap<&str, &Option<Day0Want>> = p
            .clusters
            .iter()
            .map(|c| (c.cluster.as_str(), &c.day0))
            .collect();
        assert_eq!(by["a"].as_ref().unwrap().image.as_deref(), Some(a.as_str()));
        assert_eq!(by["c"].as_ref().unwrap().image.as_deref(), Some(b.as_str()));
        assert_eq!(*by["plain"], None, "not OpenShift: no Day 0");
        let reason = |c: &str| by[c].as_ref().unwrap().waiting.clone().unwrap().0;
        assert_eq!(reason("none"), OS_IMAGE_UNKNOWN);
        assert_eq!(reason("nolabel"), OS_IMAGE_KERNEL_UNKNOWN);
        assert!(
            by["nolabel"]
                .as_ref()
                .unwrap()
                .waiting
                .clone()
                .unwrap()
                .1
                .contains("reg:5000/nolabel:1")
        );
        assert_eq!(reason("down"), OS_IMAGE_LOOKUP_FAILED);
    }

    #[test]
    fn the_override_applies_to_every_cluster() {
        let m = mcm(&format!("{SPEC}  osImage: {BASE_B}\n"));
        let cs = [os("a", true, Some(BASE_A)), os("b", true, None)];
        let mut p = plan(&m, &cs).unwrap();
        assert_eq!(os_images_to_look_up(&m, &p, &cs), vec![BASE_B]);
        plan_day0(&m, &mut p, &cs, &bases());
        assert_eq!(p.images.len(), 1);
        assert_eq!(p.images.values().next().unwrap().clusters, 2);
    }

    #[test]
    fn a_shipped_image_is_kept_until_the_new_one_is_ready() {
        let m = mcm(SPEC);
        let image = format!("reg:5000/os/rhcos-kmod:{K2}-bbbbbbbbbbbb");
        let want = Day0Want {
            os_image: Some(BASE_B.into()),
            kernel: Some(K2.into()),
            image: Some(image.clone()),
            waiting: None,
        };
        let old = ShippedDay0 {
            name: "99-worker-kmm-day0-mod-example".into(),
            os_image_url: format!("reg:5000/os/rhcos-kmod@{DIGEST_A}"),
            base_image: BASE_A.into(),
            kernel: K1.into(),
        };
        let building: BTreeMap<String, ImageOutcome> = [(
            image.clone(),
            ImageOutcome::building("build Job running".into()),
        )]
        .into();
        let (mc, w) = choose(&m, &want, &building, Some(&old));
        assert_eq!(mc, Some(old.clone()), "the old image stays while building");
        assert_eq!(w.waiting.unwrap().0, "ImageBuilding");
        let dtk: BTreeMap<String, ImageOutcome> = [(
            image.clone(),
            ImageOutcome::missing(format!("{DTK_UNKNOWN}: no toolkit")),
        )]
        .into();
        let (mc, w) = choose(&m, &want, &dtk, None);
        assert_eq!(mc, None, "nothing shipped, nothing unpinned");
        assert_eq!(w.waiting.unwrap().0, DTK_UNKNOWN);
        let ready: BTreeMap<String, ImageOutcome> =
            [(image.clone(), ImageOutcome::ready(DIGEST_B.into()))].into();
        let (mc, w) = choose(&m, &want, &ready, Some(&old));
        let mc = mc.unwrap();
        assert_eq!(
            mc.os_image_url,
            format!("reg:5000/os/rhcos-kmod@{DIGEST_B}")
        );
        assert_eq!((mc.base_image.as_str(), mc.kernel.as_str()), (BASE_B, K2));
        assert_eq!(mc.name, "99-worker-kmm-day0-mod-example");
        assert!(w.waiting.is_none());
    }
}
