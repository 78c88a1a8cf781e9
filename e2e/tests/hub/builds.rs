//! Builds and signing: one build per image, key rotation, failed builds and their backoff.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context as _;
use kmm_e2e::fleet::{Fleet, worker_node};
use kmm_e2e::labs::LAB_DOCKERFILE;
use kmm_e2e::testkit::{HubOptions, HubProcess, eventually};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt as _};
use serde_json::json;
use sha2::Digest as _;
use shared_api::ManagedClusterModule;

use crate::setup::{apply_mcm, mcm_status, prepare, work_images, works};
use crate::{BUILD_NS, HUB_NS, PULL_SECRET, SPOKE_NS};

pub(crate) fn openssl_keypair(
    dir: &std::path::Path,
    name: &str,
) -> anyhow::Result<(Vec<u8>, Vec<u8>, Vec<u8>)> {
    let key = dir.join(format!("{name}.key"));
    let cert = dir.join(format!("{name}.crt"));
    let der = dir.join(format!("{name}.der"));
    let ok = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-sha256", "-nodes", "-days", "30", "-newkey", "rsa:2048", "-subj",
        ])
        .arg(format!("/CN={name}"))
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()?
        .status
        .success();
    anyhow::ensure!(ok, "openssl req failed");
    let ok = std::process::Command::new("openssl")
        .args(["x509", "-outform", "DER", "-in"])
        .arg(&cert)
        .arg("-out")
        .arg(&der)
        .output()?
        .status
        .success();
    anyhow::ensure!(ok, "openssl x509 failed");
    Ok((
        std::fs::read(key)?,
        std::fs::read(cert)?,
        std::fs::read(der)?,
    ))
}

pub(crate) async fn put_secret(
    hub: &Client,
    name: &str,
    key: &str,
    value: &[u8],
) -> anyhow::Result<()> {
    let api: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(hub.clone(), HUB_NS);
    let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, value);
    let s = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": HUB_NS}, "data": {key: b64}});
    api.patch(name, &PatchParams::apply("test").force(), &Patch::Apply(s))
        .await?;
    Ok(())
}

pub(crate) async fn put_dockerfile(
    hub: &Client,
    name: &str,
    dockerfile: &str,
) -> anyhow::Result<()> {
    let api: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(hub.clone(), HUB_NS);
    let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": HUB_NS}, "data": {"dockerfile": dockerfile}});
    api.patch(name, &PatchParams::apply("test").force(), &Patch::Apply(cm))
        .await?;
    Ok(())
}

/// The in-cluster build lab as an MCM (image moved to the local registry), optionally signed.
pub(crate) fn build_mcm(
    fleet: &Fleet,
    name: &str,
    dockerfile_cm: &str,
    sign: bool,
) -> anyhow::Result<ManagedClusterModule> {
    let host = fleet.registry().host();
    let mut mapping = json!({
        "regexp": "^.*",
        "containerImage": format!("{host}/kmm-labs:kmm-kmod-${{KERNEL_FULL_VERSION}}-v1.0"),
        "build": {"dockerfileConfigMap": {"name": dockerfile_cm}}
    });
    if sign {
        mapping["sign"] = json!({"keySecret": {"name": "mykey"}, "certSecret": {"name": "mycert"},
            "filesToSign": ["/opt/lib/modules/$KERNEL_FULL_VERSION/kmm_ci_a.ko"]});
    }
    Ok(serde_json::from_value(json!({
        "apiVersion": "hub.kmm.sigs.x-k8s.io/v1beta1", "kind": "ManagedClusterModule",
        "metadata": {"name": name},
        "spec": {"spokeNamespace": SPOKE_NS, "selector": {},
            "moduleSpec": {"selector": {"node-role.kubernetes.io/worker": ""},
                "imageRepoSecret": {"name": PULL_SECRET},
                "moduleLoader": {"container": {"modprobe": {"moduleName": "kmm-ci-a"}, "kernelMappings": [mapping]}}}}
    }))?)
}

fn hub_config(fleet: &Fleet) -> anyhow::Result<std::path::PathBuf> {
    let path = fleet.dir().join("hub-config.yaml");
    std::fs::write(
        &path,
        "driverToolkit:\n  - kernel: '.*'\n    image: public.sim.kmm-fleet.io/driver-toolkit:latest\n",
    )?;
    Ok(path)
}

/// The digests every work of the MCM ships, by cluster.
pub(crate) async fn shipped(
    hub: &Client,
    name: &str,
) -> anyhow::Result<BTreeMap<String, Vec<String>>> {
    Ok(works(hub, name)
        .await?
        .into_iter()
        .map(|(c, w)| (c, work_images(&w)))
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_build_per_image_then_signing_and_key_rotation() -> anyhow::Result<()> {
    Fleet::builder()
        .spokes(2)
        .nodes_with(|_, spoke| vec![worker_node(&format!("{spoke}-w1"), "6.1.0-13-amd64")])
        .registry_auth(true)
        .run(async |fleet: &mut Fleet| {
            let (ka, kb) = ("5.14.0-284.36.1.el9_2.x86_64", "6.1.0-13-amd64");
            // Two spokes that share a kernel: two distinct images for the fleet.
            prepare(fleet, &[&[ka, kb], &[ka]]).await?;
            let hub = fleet.hub().client().await;
            put_dockerfile(&hub, "build-module-labs", LAB_DOCKERFILE).await?;
            let mut o = HubOptions::new(fleet.hub().kubeconfig_path(), HUB_NS);
            o.resync = Duration::from_secs(4);
            o.config = Some(hub_config(fleet)?);
            let hub_proc = HubProcess::start(o)?;
            apply_mcm(
                &hub,
                &build_mcm(fleet, "kmm-ci-a", "build-module-labs", false)?,
            )
            .await?;

            let first = eventually(
                "both works with every kernel",
                Duration::from_secs(120),
                || async {
                    let s = shipped(&hub, "kmm-ci-a").await?;
                    let total: usize = s.values().map(Vec::len).sum();
                    Ok(if s.len() == 2 && total == 3 {
                        Ok(s)
                    } else {
                        Err(format!("{s:?}"))
                    })
                },
            )
            .await?;
            assert_eq!(
                hub_proc
                    .metric("kmm_hub_builds_total{outcome=\"created\"}")
                    .await?,
                2.0,
                "one build per distinct image"
            );
            // The works may ship as soon as the pushed image resolves, a moment before the
            // hub sees its Job complete: the success is counted then.
            eventually(
                "both builds counted as succeeded",
                Duration::from_secs(30),
                || async {
                    let n = hub_proc
                        .metric("kmm_hub_builds_total{outcome=\"succeeded\"}")
                        .await?;
                    Ok(if n == 2.0 {
                        Ok(())
                    } else {
                        Err(format!("{n}"))
                    })
                },
            )
            .await?;
            // The built image holds the lab's modules for its kernel.
            let built = kmm_e2e::oci::pull_files(
                &fleet.registry().access(),
                &format!("{}/kmm-labs:kmm-kmod-{ka}-v1.0", fleet.registry().host()),
            )
            .await?;
            let ko = &built.files[&format!("/opt/lib/modules/{ka}/kmm_ci_a.ko")];
            assert_eq!(kmm_e2e::kmod::vermagic_kernel(ko)?.as_deref(), Some(ka));
            // Finished Jobs are cleaned up (jobGcDelay 0).
            eventually("build Jobs cleaned up", Duration::from_secs(30), || async {
                let jobs =
                    Api::<k8s_openapi::api::batch::v1::Job>::namespaced(hub.clone(), BUILD_NS)
                        .list(&Default::default())
                        .await?;
                Ok(if jobs.items.is_empty() {
                    Ok(())
                } else {
                    Err(format!("{} Jobs", jobs.items.len()))
                })
            })
            .await?;

            // Adding `sign` to the built MCM signs the existing images: no rebuild.
            let keys = tempfile::tempdir()?;
            let (key_a, cert_a, der_a) = openssl_keypair(keys.path(), "kmm-signing-a")?;
            put_secret(&hub, "mykey", "key", &key_a).await?;
            put_secret(&hub, "mycert", "cert", &cert_a).await?;
            apply_mcm(
                &hub,
                &build_mcm(fleet, "kmm-ci-a", "build-module-labs", true)?,
            )
            .await?;
            let signed = eventually(
                "new digests after signing",
                Duration::from_secs(90),
                || async {
                    let s = shipped(&hub, "kmm-ci-a").await?;
                    Ok(
                        if s.values()
                            .flatten()
                            .all(|m| !first.values().flatten().any(|f| f == m))
                            && s.len() == 2
                        {
                            Ok(s)
                        } else {
                            Err(format!("{s:?}"))
                        },
                    )
                },
            )
            .await?;
            assert_eq!(
                hub_proc
                    .metric("kmm_hub_builds_total{outcome=\"created\"}")
                    .await?,
                2.0,
                "signing did not rebuild"
            );
            let image_a = format!("{}/kmm-labs:kmm-kmod-{ka}-v1.0", fleet.registry().host());
            let pulled = kmm_e2e::oci::pull_files(&fleet.registry().access(), &image_a).await?;
            let ko = &pulled.files[&format!("/opt/lib/modules/{ka}/kmm_ci_a.ko")];
            let (body, sig) =
                kmm_e2e::kmod::split_signature(ko).context("kmm_ci_a.ko is signed")?;
            kmm_e2e::sim::loader::verify_signature(
                body,
                &sig.signature,
                std::slice::from_ref(&der_a),
            )
            .map_err(anyhow::Error::msg)?;
            let fp = hex::encode(sha2::Sha256::digest(&der_a));
            assert_eq!(
                pulled
                    .annotations
                    .get(shared_api::labels::SIGNED_BY_ANNOTATION),
                Some(&fp)
            );

            // Rotating the key and certificate re-signs; the spokes get the new digests.
            let (key_b, cert_b, der_b) = openssl_keypair(keys.path(), "kmm-signing-b")?;
            put_secret(&hub, "mykey", "key", &key_b).await?;
            put_secret(&hub, "mycert", "cert", &cert_b).await?;
            eventually(
                "re-signed digests after rotation",
                Duration::from_secs(90),
                || async {
                    let s = shipped(&hub, "kmm-ci-a").await?;
                    Ok(
                        if s.values()
                            .flatten()
                            .all(|m| !signed.values().flatten().any(|f| f == m))
                            && s.len() == 2
                        {
                            Ok(())
                        } else {
                            Err(format!("{s:?}"))
                        },
                    )
                },
            )
            .await?;
            let pulled = kmm_e2e::oci::pull_files(&fleet.registry().access(), &image_a).await?;
            let ko = &pulled.files[&format!("/opt/lib/modules/{ka}/kmm_ci_a.ko")];
            let (body, sig) = kmm_e2e::kmod::split_signature(ko).context("still signed")?;
            let sig_bytes = &sig.signature;
            kmm_e2e::sim::loader::verify_signature(body, sig_bytes, std::slice::from_ref(&der_b))
                .map_err(anyhow::Error::msg)?;
            assert!(
                kmm_e2e::sim::loader::verify_signature(body, sig_bytes, &[der_a]).is_err(),
                "no longer signed by the old key"
            );
            assert_eq!(
                hub_proc
                    .metric("kmm_hub_builds_total{outcome=\"created\"}")
                    .await?,
                2.0,
                "rotation did not rebuild"
            );
            // The key never shows up in the hub's status.
            let status = serde_json::to_string(&mcm_status(&hub, "kmm-ci-a").await?.status)?;
            assert!(!status.contains("PRIVATE KEY"));
            hub_proc.stop().await;
            Ok(())
        })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_build_is_reported_and_retried_with_backoff() -> anyhow::Result<()> {
    Fleet::builder()
        .spokes(1)
        .nodes_with(|_, spoke| vec![worker_node(&format!("{spoke}-w1"), "6.1.0-13-amd64")])
        .registry_auth(true)
        .run(async |fleet: &mut Fleet| {
            prepare(fleet, &[&["6.1.0-13-amd64"]]).await?;
            let hub = fleet.hub().client().await;
            put_dockerfile(
                &hub,
                "broken",
                "FROM docker.io/redhat/ubi8-minimal\nRUN exit 3\n",
            )
            .await?;
            let mut o = HubOptions::new(fleet.hub().kubeconfig_path(), HUB_NS);
            o.resync = Duration::from_secs(2);
            let hub_proc = HubProcess::start(o)?;
            apply_mcm(&hub, &build_mcm(fleet, "broken-build", "broken", false)?).await?;
            let reason = eventually("the failure in status", Duration::from_secs(90), || async {
                let s = mcm_status(&hub, "broken-build")
                    .await?
                    .status
                    .unwrap_or_default();
                Ok(match s.images.first() {
                    Some(i) if i.state == shared_api::mcm::ImageState::Failed => {
                        Ok(i.reason.clone().unwrap_or_default())
                    }
                    other => Err(format!("{other:?}")),
                })
            })
            .await?;
            assert!(reason.contains("next attempt in"), "{reason}");
            let events: Api<k8s_openapi::api::events::v1::Event> =
                Api::namespaced(hub.clone(), "default");
            eventually("a BuildFailed event", Duration::from_secs(30), || async {
                let list = events.list(&Default::default()).await?;
                Ok(
                    if list.items.iter().any(|e| {
                        e.reason.as_deref() == Some(kmm_hub::reconcile::events::BUILD_FAILED)
                            && e.note.as_deref().unwrap_or("").contains("exit")
                    }) {
                        Ok(())
                    } else {
                        Err(format!(
                            "{:?}",
                            list.items
                                .iter()
                                .map(|e| e.reason.clone())
                                .collect::<Vec<_>>()
                        ))
                    },
                )
            })
            .await?;
            // Resyncs every 2 s, but the next build waits for the backoff (30 s for the first retry).
            tokio::time::sleep(Duration::from_secs(10)).await;
            assert_eq!(
                hub_proc
                    .metric("kmm_hub_builds_total{outcome=\"created\"}")
                    .await?,
                1.0,
                "no retry before the backoff"
            );
            let works = works(&hub, "broken-build").await?;
            assert!(
                works.is_empty(),
                "nothing shipped for a kernel without an image"
            );
            hub_proc.stop().await;
            Ok(())
        })
        .await
}

/// A registry that loses what builds push: whenever a build pod in the build namespace
/// succeeds (kaniko has pushed), delete `repo:tag` from the (unauthenticated) test registry —
/// before the Job controller marks the Job complete and the hub looks.
async fn lose_pushed_images(hub: Client, host: String, repo: String, tag: String) {
    use futures::StreamExt as _;
    use kube::runtime::watcher;
    let http = reqwest::Client::new();
    let accept = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(hub, BUILD_NS);
    let mut events = std::pin::pin!(watcher::watcher(pods, watcher::Config::default()));
    while let Some(ev) = events.next().await {
        let succeeded = match ev {
            Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => {
                p.status.and_then(|s| s.phase).as_deref() == Some("Succeeded")
            }
            _ => false,
        };
        if !succeeded {
            continue;
        }
        let head = http
            .head(format!("http://{host}/v2/{repo}/manifests/{tag}"))
            .header("Accept", accept)
            .send()
            .await;
        if let Ok(r) = head
            && r.status().is_success()
            && let Some(digest) = r
                .headers()
                .get("Docker-Content-Digest")
                .and_then(|d| d.to_str().ok())
        {
            let _ = http
                .delete(format!("http://{host}/v2/{repo}/manifests/{digest}"))
                .send()
                .await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_whose_image_goes_missing_is_a_failed_attempt_with_backoff() -> anyhow::Result<()> {
    Fleet::builder()
        .spokes(1)
        .nodes_with(|_, spoke| vec![worker_node(&format!("{spoke}-w1"), "6.1.0-13-amd64")])
        .run(async |fleet: &mut Fleet| {
            let kernel = "6.1.0-13-amd64";
            prepare(fleet, &[&[kernel]]).await?;
            let hub = fleet.hub().client().await;
            put_dockerfile(&hub, "build-module-labs", LAB_DOCKERFILE).await?;
            let deleter = tokio::spawn(lose_pushed_images(
                hub.clone(),
                fleet.registry().host(),
                "kmm-labs".into(),
                format!("kmm-kmod-{kernel}-v1.0"),
            ));
            // Only Job changes trigger reconciles here (a resync could look at the image in
            // the moment between its push and its deletion).
            let mut o = HubOptions::new(fleet.hub().kubeconfig_path(), HUB_NS);
            o.resync = Duration::from_secs(600);
            o.config = Some(hub_config(fleet)?);
            let hub_proc = HubProcess::start(o)?;
            apply_mcm(&hub, &build_mcm(fleet, "lost", "build-module-labs", false)?).await?;
            let reason = eventually(
                "the lost image as a failed attempt",
                Duration::from_secs(120),
                || async {
                    let s = mcm_status(&hub, "lost").await?.status.unwrap_or_default();
                    Ok(match s.images.first() {
                        Some(i) if i.state == shared_api::mcm::ImageState::Failed => {
                            Ok(i.reason.clone().unwrap_or_default())
                        }
                        other => Err(format!("{other:?}")),
                    })
                },
            )
            .await?;
            assert!(
                reason.contains("succeeded but") && reason.contains("next attempt in"),
                "{reason}"
            );
            // The next build waits for the backoff (30 s after the first); without it the
            // deleted Job's event would start the next build at once.
            tokio::time::sleep(Duration::from_secs(10)).await;
            assert_eq!(
                hub_proc
                    .metric("kmm_hub_builds_total{outcome=\"created\"}")
                    .await?,
                1.0,
                "no rebuild before the backoff"
            );
            deleter.abort();
            hub_proc.stop().await;
            Ok(())
        })
        .await
}

/// A hub stopped between creating a build Job and writing its inputs (the Dockerfile and
/// pull-secret copies the Job mounts) writes them when it is back: the pod does not wait for
/// its volumes forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_job_left_without_its_inputs_gets_them_from_the_next_hub() -> anyhow::Result<()> {
    use k8s_openapi::api::core::v1::{ConfigMap, Node, Secret};
    Fleet::builder()
        .spokes(1)
        .nodes_with(|_, spoke| vec![worker_node(&format!("{spoke}-w1"), "6.1.0-13-amd64")])
        .run(async |fleet: &mut Fleet| {
            let kernel = "6.1.0-13-amd64";
            prepare(fleet, &[&[kernel]]).await?;
            let hub = fleet.hub().client().await;
            put_dockerfile(&hub, "build-module-labs", LAB_DOCKERFILE).await?;
            // The build node takes no pod until the inputs are gone.
            let nodes = Api::<Node>::all(hub.clone());
            let build_nodes: Vec<String> = nodes
                .list(&Default::default())
                .await?
                .items
                .iter()
                .map(|n| n.name_any())
                .collect();
            let cordon = async |on: bool| -> anyhow::Result<()> {
                for n in &build_nodes {
                    nodes
                        .patch(
                            n,
                            &PatchParams::default(),
                            &Patch::Merge(json!({"spec": {"unschedulable": on}})),
                        )
                        .await?;
                }
                Ok(())
            };
            cordon(true).await?;
            let hub_options = || -> anyhow::Result<HubOptions> {
                let mut o = HubOptions::new(fleet.hub().kubeconfig_path(), HUB_NS);
                o.config = Some(hub_config(fleet)?);
                Ok(o)
            };
            let first = HubProcess::start(hub_options()?)?;
            apply_mcm(
                &hub,
                &build_mcm(fleet, "restaged", "build-module-labs", false)?,
            )
            .await?;
            let inputs = ListParams::default().labels("app.kubernetes.io/component=build-input");
            let (cms, secrets) = (
                Api::<ConfigMap>::namespaced(hub.clone(), BUILD_NS),
                Api::<Secret>::namespaced(hub.clone(), BUILD_NS),
            );
            eventually(
                "the build Job and its inputs",
                Duration::from_secs(120),
                || async {
                    let (c, s) = (
                        cms.list(&inputs).await?.items.len(),
                        secrets.list(&inputs).await?.items.len(),
                    );
                    Ok(if c == 1 && s == 1 {
                        Ok(())
                    } else {
                        Err(format!("{c} ConfigMap(s), {s} Secret(s)"))
                    })
                },
            )
            .await?;
            first.stop().await;
            // As if the hub had stopped right after creating the Job.
            cms.delete_collection(&DeleteParams::default(), &inputs)
                .await?;
            secrets
                .delete_collection(&DeleteParams::default(), &inputs)
                .await?;
            cordon(false).await?;
            let second = HubProcess::start(hub_options()?)?;
            eventually("the image built", Duration::from_secs(120), || async {
                let s = mcm_status(&hub, "restaged")
                    .await?
                    .status
                    .unwrap_or_default();
                Ok(match s.images.first() {
                    Some(i) if i.state == shared_api::mcm::ImageState::Ready => Ok(()),
                    other => Err(format!("{other:?}")),
                })
            })
            .await?;
            second.stop().await;
            Ok(())
        })
        .await
}
