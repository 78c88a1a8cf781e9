//! The Driver Toolkit found automatically: a spoke that serves ImageStreams (the CRD generated
//! from OpenShift's API module) with the `openshift/driver-toolkit` ImageStream and RHCOS nodes
//! publishes kernel → toolkit image, and the seeds' Dockerfile (`FROM ${DTK_AUTO}`) builds on
//! the hub without any `driverToolkit` table.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use kmm_e2e::fleet::{Fleet, worker_node};
use kmm_e2e::labs::LAB_DOCKERFILE;
use kmm_e2e::openshift::{install_imagestream_crd, put_dtk_imagestream, rhcos_os_image};
use kmm_e2e::sim::SimNode;
use kmm_e2e::testkit::{HubOptions, HubProcess, ensure_namespace, eventually, put_pull_secret};
use kube::Client;
use kube::api::{Api, ListParams};
use shared_api::labels::MCM_OWNER_LABEL;
use shared_api::mcm::ImageState;
use shared_api::ocm::DTK_IMAGES_CLAIM;
use shared_api::{ClusterClaim, ManagedCluster};

use crate::builds::{build_mcm, put_dockerfile, shipped};
use crate::setup::{apply_mcm, mcm_status};
use crate::spoke_agent::RunningAgent;
use crate::{BUILD_NS, HUB_NS, PULL_SECRET, SPOKE_NS};

const KERNEL: &str = "5.14.0-427.13.1.el9_4.x86_64";
const OS_VERSION: &str = "417.94.202410211619-0";
const DTK_IMAGE: &str = "quay.io/openshift-release-dev/ocp-v4.0-art-dev@sha256:4f8e4e3f8d1c2b0a9d8c7b6a5f4e3d2c1b0a9f8e7d6c5b4a3f2e1d0c9b8a7f6e";
const OLDER_DTK_IMAGE: &str = "quay.io/openshift-release-dev/ocp-v4.0-art-dev@sha256:0000000000000000000000000000000000000000000000000000000000000416";

/// The build args of the MCM's build Jobs.
async fn build_args(hub: &Client, mcm: &str) -> anyhow::Result<Vec<String>> {
    let jobs = Api::<Job>::namespaced(hub.clone(), BUILD_NS)
        .list(&ListParams::default().labels(&format!("{MCM_OWNER_LABEL}={mcm}")))
        .await?;
    Ok(jobs
        .items
        .iter()
        .filter_map(|j| j.spec.as_ref()?.template.spec.as_ref())
        .flat_map(|p| p.containers.iter())
        .flat_map(|c| c.args.clone().unwrap_or_default())
        .filter(|a| a.starts_with("--build-arg="))
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dtk_auto_comes_from_the_spoke_claim_without_a_table() -> anyhow::Result<()> {
    let binaries = kmm_e2e::provision::ensure_provisioned()?;
    Fleet::builder()
        .spokes(1)
        .nodes_with(|_, spoke| {
            vec![SimNode {
                os_image: Some(rhcos_os_image(OS_VERSION)),
                ..worker_node(&format!("{spoke}-w1"), KERNEL)
            }]
        })
        .registry_auth(true)
        .run(async |fleet: &mut Fleet| {
            let hub = fleet.hub().client().await;
            ensure_namespace(&hub, HUB_NS).await?;
            ensure_namespace(&hub, BUILD_NS).await?;
            put_pull_secret(&hub, fleet.registry(), PULL_SECRET, HUB_NS).await?;
            let spoke = fleet.spoke(1).client().await;
            ensure_namespace(&spoke, SPOKE_NS).await?;
            // OpenShift's API, without the release payload's ImageStream yet.
            install_imagestream_crd(&spoke, &binaries).await?;
            let agent = RunningAgent::start(spoke.clone());
            put_dockerfile(&hub, "build-module-labs", LAB_DOCKERFILE).await?;
            // No driverToolkit table; finished Jobs kept so that their arguments can be read.
            let config = fleet.dir().join("hub-config.yaml");
            std::fs::write(&config, "jobGcDelay: 10m\n")?;
            let mut o = HubOptions::new(fleet.hub().kubeconfig_path(), HUB_NS);
            o.resync = Duration::from_secs(4);
            o.config = Some(config);
            let _hub_proc = HubProcess::start(o)?;
            apply_mcm(
                &hub,
                &build_mcm(fleet, "kmm-ci-a", "build-module-labs", false)?,
            )
            .await?;

            // Nothing knows the toolkit of this kernel: the image waits with a reason a person
            // can act on, and no build starts.
            let reason = eventually(
                "the image waits for a Driver Toolkit",
                Duration::from_secs(120),
                || async {
                    let m = mcm_status(&hub, "kmm-ci-a").await?;
                    let images = m.status.map(|s| s.images).unwrap_or_default();
                    Ok(match images.as_slice() {
                        [i] if i.state == ImageState::Missing
                            && i.reason
                                .as_deref()
                                .is_some_and(|r| r.starts_with("DriverToolkitUnknown: ")) =>
                        {
                            Ok(i.reason.clone().unwrap_or_default())
                        }
                        other => Err(format!("{other:?}")),
                    })
                },
            )
            .await?;
            assert!(reason.contains(KERNEL), "{reason}");
            assert!(
                build_args(&hub, "kmm-ci-a").await?.is_empty(),
                "no build Job without a toolkit"
            );

            // The release payload's ImageStream appears: the spoke publishes kernel → image.
            put_dtk_imagestream(
                &spoke,
                &[
                    ("416.94.202409191851-0", OLDER_DTK_IMAGE),
                    (OS_VERSION, DTK_IMAGE),
                ],
            )
            .await?;
            let want = format!("{KERNEL}={DTK_IMAGE}");
            eventually(
                "the Driver Toolkit claim on the spoke",
                Duration::from_secs(60),
                || async {
                    let c = Api::<ClusterClaim>::all(spoke.clone())
                        .get_opt(DTK_IMAGES_CLAIM)
                        .await?;
                    let v = c.map(|c| c.spec.value);
                    Ok(if v.as_deref() == Some(want.as_str()) {
                        Ok(())
                    } else {
                        Err(format!("{v:?}"))
                    })
                },
            )
            .await?;
            eventually(
                "the Driver Toolkit claim on the hub",
                Duration::from_secs(120),
                || async {
                    let mc = Api::<ManagedCluster>::all(hub.clone())
                        .get("spoke-1")
                        .await?;
                    let got = mc.status.map(|s| s.dtk_images()).unwrap_or_default();
                    Ok(
                        if got == BTreeMap::from([(KERNEL.to_string(), DTK_IMAGE.to_string())]) {
                            Ok(())
                        } else {
                            Err(format!("{got:?}"))
                        },
                    )
                },
            )
            .await?;

            // The hub builds with DTK_AUTO from the claim and ships the result.
            eventually(
                "the work ships the built image",
                Duration::from_secs(180),
                || async {
                    let s = shipped(&hub, "kmm-ci-a").await?;
                    Ok(if s.values().map(Vec::len).sum::<usize>() == 1 {
                        Ok(())
                    } else {
                        Err(format!("{s:?}"))
                    })
                },
            )
            .await?;
            let args = build_args(&hub, "kmm-ci-a").await?;
            assert!(
                args.contains(&format!("--build-arg=DTK_AUTO={DTK_IMAGE}")),
                "{args:?}"
            );
            let built = kmm_e2e::oci::pull_files(
                &fleet.registry().access(),
                &format!(
                    "{}/kmm-labs:kmm-kmod-{KERNEL}-v1.0",
                    fleet.registry().host()
                ),
            )
            .await?;
            let ko = &built.files[&format!("/opt/lib/modules/{KERNEL}/kmm_ci_a.ko")];
            assert_eq!(kmm_e2e::kmod::vermagic_kernel(ko)?.as_deref(), Some(KERNEL));
            let m = mcm_status(&hub, "kmm-ci-a").await?;
            let images = m.status.map(|s| s.images).unwrap_or_default();
            assert!(
                images
                    .iter()
                    .all(|i| i.state == ImageState::Ready && i.reason.is_none()),
                "{images:?}"
            );
            agent.stop().await;
            Ok(())
        })
        .await
}
