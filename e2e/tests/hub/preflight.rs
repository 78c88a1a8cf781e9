//! Fleet preflight: an MCM checked against coming kernels (one without a mapping, one whose
//! image is missing but can be built, one whose build has no Dockerfile), then the image
//! built ahead — once — and a real kernel upgrade of a spoke's node shipping it with no
//! further build.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::ensure;
use k8s_openapi::api::batch::v1::Job;
use kmm_e2e::fleet::{Fleet, spoke_name, worker_node};
use kmm_e2e::labs::LAB_DOCKERFILE;
use kmm_e2e::testkit::{HubOptions, HubProcess, eventually};
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt as _};
use serde_json::json;
use shared_api::FleetPreflightValidation;
use shared_api::ManagedClusterModule;
use shared_api::preflight::{PreflightResult, VerificationStatus};

use crate::builds::shipped;
use crate::setup::{apply_mcm, prepare};
use crate::spoke_agent::RunningAgent;
use crate::{BUILD_NS, HUB_NS, PULL_SECRET, SPOKE_NS};

/// The kernel the spoke runs now.
const K_NOW: &str = "5.14.0-284.36.1.el9_2.x86_64";
/// The next minor release: mapped, its image missing, buildable.
const K_NEXT: &str = "5.14.0-427.13.1.el9_4.x86_64";
/// A kernel no mapping matches.
const K_UNMAPPED: &str = "6.1.0-13-amd64";
/// Mapped to a build whose Dockerfile ConfigMap does not exist.
const K_NO_DOCKERFILE: &str = "5.15.0-1.el9.x86_64";
const DEADLINE: Duration = Duration::from_secs(180);

fn image_of(fleet: &Fleet, kernel: &str) -> String {
    format!(
        "{}/kmm-labs:kmm-kmod-{kernel}-v1.0",
        fleet.registry().host()
    )
}

fn built_mcm(fleet: &Fleet) -> anyhow::Result<ManagedClusterModule> {
    let host = fleet.registry().host();
    let image = format!("{host}/kmm-labs:kmm-kmod-${{KERNEL_FULL_VERSION}}-v1.0");
    Ok(serde_json::from_value(json!({
        "apiVersion": "hub.kmm.sigs.x-k8s.io/v1beta1", "kind": "ManagedClusterModule",
        "metadata": {"name": "kmm-ci-a"},
        "spec": {"spokeNamespace": SPOKE_NS, "selector": {},
            "moduleSpec": {"selector": {"node-role.kubernetes.io/worker": ""},
                "imageRepoSecret": {"name": PULL_SECRET},
                "moduleLoader": {"container": {"modprobe": {"moduleName": "kmm_ci_a"}, "kernelMappings": [
                    {"regexp": "^5\\.14\\..*", "containerImage": image,
                        "build": {"dockerfileConfigMap": {"name": "build-module-labs"}}},
                    {"regexp": "^5\\.15\\..*", "containerImage": image,
                        "build": {"dockerfileConfigMap": {"name": "no-such-dockerfile"}}}
                ]}}}}
    }))?)
}

fn preflight(name: &str, kernels: &[&str], push: bool) -> anyhow::Result<FleetPreflightValidation> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "hub.kmm.sigs.x-k8s.io/v1beta1", "kind": "FleetPreflightValidation",
        "metadata": {"name": name},
        "spec": {"kernelVersions": kernels, "pushBuiltImage": push}
    }))?)
}

async fn apply_preflight(hub: &Client, p: &FleetPreflightValidation) -> anyhow::Result<()> {
    Api::<FleetPreflightValidation>::all(hub.clone())
        .patch(
            &p.name_any(),
            &PatchParams::apply("test").force(),
            &Patch::Apply(p),
        )
        .await?;
    Ok(())
}

/// The results of a preflight once every one is settled (none in progress), by kernel.
async fn settled(hub: &Client, name: &str) -> anyhow::Result<Vec<PreflightResult>> {
    let api: Api<FleetPreflightValidation> = Api::all(hub.clone());
    eventually(&format!("preflight {name} settled"), DEADLINE, || async {
        let s = api.get(name).await?.status.unwrap_or_default();
        Ok(
            if !s.results.is_empty()
                && s.results
                    .iter()
                    .all(|r| r.verification_status != VerificationStatus::InProgress)
            {
                let mut r = s.results;
                r.sort_by(|a, b| a.kernel.cmp(&b.kernel));
                Ok(r)
            } else {
                Err(format!("{s:?}"))
            },
        )
    })
    .await
}

fn hub_config(fleet: &Fleet) -> anyhow::Result<std::path::PathBuf> {
    let path = fleet.dir().join("hub-config.yaml");
    std::fs::write(
        &path,
        "driverToolkit:\n  - kernel: '.*'\n    image: public.sim.kmm-fleet.io/driver-toolkit:latest\n",
    )?;
    Ok(path)
}

/// Build Jobs seen: (name, UID).
type SeenJobs = Arc<Mutex<BTreeSet<(String, String)>>>;

/// Every build Job created in the build namespace (by UID), whoever created it.
fn record_build_jobs(hub: Client) -> (SeenJobs, tokio::task::JoinHandle<()>) {
    use futures::StreamExt as _;
    use kube::runtime::watcher;
    let seen: SeenJobs = Arc::default();
    let s = seen.clone();
    let task = tokio::spawn(async move {
        let jobs: Api<Job> = Api::namespaced(hub, BUILD_NS);
        let mut events = std::pin::pin!(watcher::watcher(jobs, watcher::Config::default()));
        while let Some(ev) = events.next().await {
            if let Ok(watcher::Event::Apply(j) | watcher::Event::InitApply(j)) = ev
                && let Ok(mut s) = s.lock()
            {
                s.insert((j.name_any(), j.uid().unwrap_or_default()));
            }
        }
    });
    (seen, task)
}

fn jobs_seen(seen: &Mutex<BTreeSet<(String, String)>>) -> usize {
    seen.lock().map(|s| s.len()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preflight_reports_then_builds_ahead_once_for_the_upgrade() -> anyhow::Result<()> {
    Fleet::builder()
        .spokes(1)
        .nodes_with(|_, spoke| vec![worker_node(&format!("{spoke}-w1"), K_NOW)])
        .run(async |fleet: &mut Fleet| {
            prepare(fleet, &[]).await?;
            let hub = fleet.hub().client().await;
            let cms: Api<k8s_openapi::api::core::v1::ConfigMap> =
                Api::namespaced(hub.clone(), HUB_NS);
            cms.patch(
                "build-module-labs",
                &PatchParams::apply("test").force(),
                &Patch::Apply(json!({"apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": "build-module-labs", "namespace": HUB_NS},
                    "data": {"dockerfile": LAB_DOCKERFILE}})),
            )
            .await?;
            let (jobs, watch) = record_build_jobs(hub.clone());
            // The spoke agent publishes the node's kernel as the claim.
            let spoke = fleet.spoke(1).client().await;
            let agent = RunningAgent::start(spoke.clone());
            let mut o = HubOptions::new(fleet.hub().kubeconfig_path(), HUB_NS);
            o.resync = Duration::from_secs(5);
            o.config = Some(hub_config(fleet)?);
            let hub_proc = HubProcess::start(o)?;
            let outcome = async {
                apply_mcm(&hub, &built_mcm(fleet)?).await?;
                let now = eventually("the current kernel's image shipped", DEADLINE, || async {
                    let s = shipped(&hub, "kmm-ci-a").await?;
                    Ok(match s.get(&spoke_name(1)) {
                        Some(m) if m.len() == 1 && m[0].starts_with(&format!("{K_NOW}=")) => {
                            Ok(m.clone())
                        }
                        other => Err(format!("{other:?}")),
                    })
                })
                .await?;
                ensure!(jobs_seen(&jobs) == 1, "one build for the current kernel");

                // Check only: three kernels, three verdicts, nothing built.
                apply_preflight(
                    &hub,
                    &preflight("next-os", &[K_NEXT, K_UNMAPPED, K_NO_DOCKERFILE], false)?,
                )
                .await?;
                let r = settled(&hub, "next-os").await?;
                let got: Vec<(&str, VerificationStatus, &str)> = r
                    .iter()
                    .map(|r| (r.kernel.as_str(), r.verification_status, r.reason.as_str()))
                    .collect();
                ensure!(
                    got == [
                        (K_NEXT, VerificationStatus::Success, "WouldBuild"),
                        (
                            K_NO_DOCKERFILE,
                            VerificationStatus::Failure,
                            "DockerfileMissing"
                        ),
                        (K_UNMAPPED, VerificationStatus::Failure, "NoMapping"),
                    ],
                    "{r:#?}"
                );
                let no_df = &r[1];
                ensure!(
                    no_df
                        .message
                        .contains(&format!("{HUB_NS}/no-such-dockerfile"))
                        && no_df.image.as_deref()
                            == Some(image_of(fleet, K_NO_DOCKERFILE).as_str()),
                    "names the ConfigMap and the image: {no_df:?}"
                );
                let s = Api::<FleetPreflightValidation>::all(hub.clone())
                    .get("next-os")
                    .await?
                    .status
                    .unwrap_or_default();
                ensure!(
                    (s.mcms, s.success, s.failure, s.in_progress) == (1, 1, 2, 0),
                    "{s:?}"
                );
                let ready = s.conditions.iter().find(|c| c.type_ == "Ready");
                ensure!(
                    ready.is_some_and(|c| c.status == "False" && c.reason == "Failed"),
                    "{ready:?}"
                );
                ensure!(
                    hub_proc
                        .metric("kmm_hub_preflight_results{status=\"Failure\"}")
                        .await?
                        == 2.0
                        && hub_proc.metric("kmm_hub_preflight_validations").await? == 1.0,
                    "gauges"
                );
                tokio::time::sleep(Duration::from_secs(6)).await;
                ensure!(jobs_seen(&jobs) == 1, "checking builds nothing");

                // Build ahead: the next kernel's image, once.
                apply_preflight(&hub, &preflight("next-os-ahead", &[K_NEXT], true)?).await?;
                let r = eventually("the image built ahead", DEADLINE, || async {
                    let s = Api::<FleetPreflightValidation>::all(hub.clone())
                        .get("next-os-ahead")
                        .await?
                        .status
                        .unwrap_or_default();
                    Ok(match s.results.first() {
                        Some(r)
                            if r.verification_status == VerificationStatus::Success
                                && matches!(r.reason.as_str(), "ImageBuilt" | "ImageExists") =>
                        {
                            Ok(r.clone())
                        }
                        other => Err(format!("{other:?}")),
                    })
                })
                .await?;
                ensure!(
                    r.image.as_deref() == Some(image_of(fleet, K_NEXT).as_str()),
                    "{r:?}"
                );
                ensure!(
                    jobs_seen(&jobs) == 2,
                    "one build ahead: {}",
                    jobs_seen(&jobs)
                );
                let pulled =
                    kmm_e2e::oci::pull_files(&fleet.registry().access(), &image_of(fleet, K_NEXT))
                        .await?;
                let ko = &pulled.files[&format!("/opt/lib/modules/{K_NEXT}/kmm_ci_a.ko")];
                ensure!(
                    kmm_e2e::kmod::vermagic_kernel(ko)?.as_deref() == Some(K_NEXT),
                    "built for the next kernel"
                );
                // The check-only preflight now sees the image.
                eventually("the check sees the image", DEADLINE, || async {
                    let r = settled(&hub, "next-os").await?;
                    Ok(if r[0].reason == "ImageExists" {
                        Ok(())
                    } else {
                        Err(format!("{:?}", r[0]))
                    })
                })
                .await?;

                // `kmm-hub preflight`, offline but asking the registry: the same answers.
                let file = fleet.dir().join("preflight-mcm.yaml");
                std::fs::write(&file, serde_yaml::to_string(&built_mcm(fleet)?)?)?;
                let args = kmm_hub::commands::preflight::PreflightArgs {
                    kernels: vec![K_NEXT.into(), K_UNMAPPED.into()],
                    mcms: vec![file],
                    digests: None,
                    pull_secret: None,
                    inputs: None,
                    config: None,
                    namespace: HUB_NS.into(),
                };
                let mut out = Vec::new();
                let all = kmm_hub::commands::preflight::run(args, &mut out).await?;
                let text = String::from_utf8(out)?;
                ensure!(
                    !all && text.contains(&format!("kmm-ci-a\t{K_NEXT}\tSuccess\tImageExists"))
                        && text.contains(&format!("kmm-ci-a\t{K_UNMAPPED}\tFailure\tNoMapping")),
                    "{text}"
                );

                // The node reboots into the next kernel: the agent's claim changes, the hub
                // ships the image built ahead, and builds nothing.
                fleet
                    .node_sim(&spoke_name(1))
                    .set_kernel(&format!("{}-w1", spoke_name(1)), K_NEXT)
                    .await?;
                eventually("the next kernel's image shipped", DEADLINE, || async {
                    let s = shipped(&hub, "kmm-ci-a").await?;
                    Ok(match s.get(&spoke_name(1)) {
                        Some(m) if m.iter().any(|i| i.starts_with(&format!("{K_NEXT}="))) => Ok(()),
                        other => Err(format!("{other:?} (was {now:?})")),
                    })
                })
                .await?;
                tokio::time::sleep(Duration::from_secs(6)).await;
                ensure!(
                    jobs_seen(&jobs) == 2,
                    "the upgrade started no build: {:?}",
                    jobs.lock().map(|j| j.clone()).unwrap_or_default()
                );
                ensure!(
                    hub_proc
                        .metric("kmm_hub_builds_total{outcome=\"created\"}")
                        .await?
                        == 2.0,
                    "the hub counted two builds"
                );
                Ok::<(), anyhow::Error>(())
            }
            .await;
            hub_proc.stop().await;
            agent.stop().await;
            watch.abort();
            outcome
        })
        .await
}
