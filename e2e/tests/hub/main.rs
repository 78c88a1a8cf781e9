//! The hub against real control planes: ManifestWorks per selected cluster with pinned
//! digests, delivery by the work agent, relabelling, deletion, registry outages, moving
//! tags, restarts without duplicate writes, and the admission webhook.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context as _;
use kmm_e2e::fleet::{Fleet, spoke_name, worker_node};
use kmm_e2e::labs::LAB_DOCKERFILE;
use kmm_e2e::oci::{KmodImage, push_kmod_image};
use kmm_e2e::testkit::{HubOptions, HubProcess, ensure_namespace, eventually};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use sha2::Digest as _;
use shared_api::ocm::{ClusterClaim, KERNEL_VERSIONS_CLAIM, ManifestWork};
use shared_api::{ManagedCluster, ManagedClusterModule, Module};

const HUB_NS: &str = "kmm-hub";
/// Where the hub runs build Jobs (the default `<operator namespace>-builds`).
const BUILD_NS: &str = "kmm-hub-builds";
const SPOKE_NS: &str = "kmm-labs";
const PULL_SECRET: &str = "registry-pull";

fn start_hub(fleet: &Fleet, resync: Duration) -> HubProcess {
    let mut o = HubOptions::new(fleet.hub().kubeconfig_path(), HUB_NS);
    o.resync = resync;
    HubProcess::start(o).expect("hub starts")
}

/// Hub namespace with the registry pull secret; spoke namespaces; kernel claims on spokes.
async fn prepare(fleet: &Fleet, kernels: &[&[&str]]) -> anyhow::Result<()> {
    let hub = fleet.hub().client().await;
    ensure_namespace(&hub, HUB_NS).await?;
    ensure_namespace(&hub, BUILD_NS).await?;
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(hub.clone(), HUB_NS);
    secrets
        .patch(
            PULL_SECRET,
            &PatchParams::apply("test").force(),
            &Patch::Apply(
                fleet
                    .registry()
                    .dockerconfigjson_secret(PULL_SECRET, HUB_NS),
            ),
        )
        .await?;
    for (i, ks) in kernels.iter().enumerate() {
        let spoke = fleet.spoke(i + 1).client().await;
        ensure_namespace(&spoke, SPOKE_NS).await?;
        set_claim(&spoke, ks).await?;
    }
    Ok(())
}

async fn set_claim(spoke: &Client, kernels: &[&str]) -> anyhow::Result<()> {
    let claims: Api<ClusterClaim> = Api::all(spoke.clone());
    let claim = json!({"apiVersion": "cluster.open-cluster-management.io/v1alpha1", "kind": "ClusterClaim",
        "metadata": {"name": KERNEL_VERSIONS_CLAIM}, "spec": {"value": kernels.join("\n")}});
    claims
        .patch(
            KERNEL_VERSIONS_CLAIM,
            &PatchParams::apply("test").force(),
            &Patch::Apply(claim),
        )
        .await?;
    Ok(())
}

fn image(fleet: &Fleet, kernel: &str) -> String {
    format!("{}/kmm/kmm-ci-a:{kernel}", fleet.registry().host())
}

async fn push(fleet: &Fleet, kernel: &str) -> anyhow::Result<String> {
    let img = KmodImage::new(&[kernel], &["kmm_ci_a"]);
    Ok(push_kmod_image(&fleet.registry().access(), &image(fleet, kernel), &img).await?)
}

fn mcm(
    fleet: &Fleet,
    name: &str,
    selector: serde_json::Value,
) -> anyhow::Result<ManagedClusterModule> {
    let host = fleet.registry().host();
    Ok(serde_json::from_value(json!({
        "apiVersion": "hub.kmm.sigs.x-k8s.io/v1beta1", "kind": "ManagedClusterModule",
        "metadata": {"name": name},
        "spec": {
            "spokeNamespace": SPOKE_NS,
            "selector": selector,
            "moduleSpec": {
                "selector": {"node-role.kubernetes.io/worker": ""},
                "imageRepoSecret": {"name": PULL_SECRET},
                "moduleLoader": {"container": {
                    "modprobe": {"moduleName": "kmm_ci_a"},
                    "kernelMappings": [{"regexp": "^.*$", "containerImage": format!("{host}/kmm/kmm-ci-a:${{KERNEL_FULL_VERSION}}")}]
                }}
            }
        }
    }))?)
}

async fn apply_mcm(hub: &Client, m: &ManagedClusterModule) -> anyhow::Result<()> {
    let api: Api<ManagedClusterModule> = Api::all(hub.clone());
    api.patch(
        &m.name_any(),
        &PatchParams::apply("test").force(),
        &Patch::Apply(m),
    )
    .await?;
    Ok(())
}

/// The works of an MCM, by cluster namespace.
async fn works(hub: &Client, mcm: &str) -> anyhow::Result<BTreeMap<String, ManifestWork>> {
    let api: Api<ManifestWork> = Api::all(hub.clone());
    let list = api
        .list(&kube::api::ListParams::default().labels(&format!(
            "kmm.node.kubernetes.io/managedclustermodule.name={mcm}"
        )))
        .await?;
    Ok(list
        .items
        .into_iter()
        .map(|w| (w.namespace().unwrap_or_default(), w))
        .collect())
}

fn work_images(w: &ManifestWork) -> Vec<String> {
    let m: Module = serde_json::from_value(w.spec.workload.manifests[0].0.clone())
        .unwrap_or_else(|_| Module::new("x", Default::default()));
    m.spec
        .module_loader
        .map(|l| {
            l.container
                .kernel_mappings
                .into_iter()
                .map(|k| format!("{}={}", k.literal.unwrap_or_default(), k.container_image))
                .collect()
        })
        .unwrap_or_default()
}

async fn mcm_status(hub: &Client, name: &str) -> anyhow::Result<ManagedClusterModule> {
    Ok(Api::<ManagedClusterModule>::all(hub.clone())
        .get(name)
        .await?)
}

fn condition(m: &ManagedClusterModule, t: &str) -> Option<(String, String, String)> {
    m.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == t)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_over_three_spokes_relabel_and_delete() -> anyhow::Result<()> {
    Fleet::builder()
        .spokes(3)
        .nodes_with(|_, spoke| {
            vec![worker_node(
                &format!("{spoke}-w1"),
                "5.14.0-284.36.1.el9_2.x86_64",
            )]
        })
        .registry_auth(true)
        .run(async |fleet: &mut Fleet| {
            let (k1, k2) = ("5.14.0-284.36.1.el9_2.x86_64", "6.1.0-13-amd64");
            prepare(fleet, &[&[k1], &[k1, k2], &[k2]]).await?;
            let d1 = push(fleet, k1).await?;
            let d2 = push(fleet, k2).await?;
            let hub = fleet.hub().client().await;
            let hub_proc = start_hub(fleet, Duration::from_secs(3));
            apply_mcm(&hub, &mcm(fleet, "kmm-ci-a", json!({}))?).await?;

            // Three works, each with exactly its cluster's kernels, pinned by digest.
            let ws = eventually("3 ManifestWorks", Duration::from_secs(60), || async {
                let ws = works(&hub, "kmm-ci-a").await?;
                Ok(if ws.len() == 3 {
                    Ok(ws)
                } else {
                    Err(format!("{:?}", ws.keys().collect::<Vec<_>>()))
                })
            })
            .await?;
            let repo = format!("{}/kmm/kmm-ci-a", fleet.registry().host());
            assert_eq!(
                work_images(&ws[&spoke_name(1)]),
                vec![format!("{k1}={repo}@{d1}")]
            );
            assert_eq!(
                work_images(&ws[&spoke_name(2)]),
                vec![format!("{k1}={repo}@{d1}"), format!("{k2}={repo}@{d2}")]
            );
            assert_eq!(
                work_images(&ws[&spoke_name(3)]),
                vec![format!("{k2}={repo}@{d2}")]
            );
            for w in ws.values() {
                let owner = &w.owner_references()[0];
                assert_eq!(
                    (owner.kind.as_str(), owner.name.as_str(), owner.controller),
                    ("ManagedClusterModule", "kmm-ci-a", Some(true))
                );
            }

            // The work agent delivers the trimmed Module to every spoke.
            for i in 1..=3 {
                let spoke = fleet.spoke(i).client().await;
                eventually("the Module on the spoke", Duration::from_secs(30), || {
                    let spoke = spoke.clone();
                    async move {
                        let m = Api::<Module>::namespaced(spoke, SPOKE_NS)
                            .get_opt("kmm-ci-a")
                            .await?;
                        Ok(match m {
                            Some(m)
                                if m.spec
                                    .module_loader
                                    .as_ref()
                                    .is_some_and(|l| l.container.build.is_none()) =>
                            {
                                Ok(())
                            }
                            other => Err(format!("{other:?}")),
                        })
                    }
                })
                .await?;
            }
            let status = eventually("status counts", Duration::from_secs(30), || async {
                let m = mcm_status(&hub, "kmm-ci-a").await?;
                let s = m.status.clone().unwrap_or_default();
                Ok(if s.number_desired == 3 && s.number_applied == 3 {
                    Ok(m)
                } else {
                    Err(format!("{s:?}"))
                })
            })
            .await?;
            let images = &status.status.as_ref().unwrap().images;
            assert_eq!(
                images.len(),
                2,
                "two distinct images for the fleet: {images:?}"
            );
            assert!(
                images
                    .iter()
                    .all(|i| i.state == shared_api::mcm::ImageState::Ready)
            );

            // A resync that finds nothing changed writes nothing.
            let before = hub_proc.works_written().await?;
            let mcm_rv = mcm_status(&hub, "kmm-ci-a").await?.resource_version();
            let resyncs = hub_proc
                .metric("kmm_hub_reconciles_total{outcome=\"ok\"}")
                .await?;
            tokio::time::sleep(Duration::from_secs(8)).await; // more than two resync periods
            assert!(
                hub_proc
                    .metric("kmm_hub_reconciles_total{outcome=\"ok\"}")
                    .await?
                    >= resyncs + 2.0,
                "resyncs happened"
            );
            assert_eq!(
                hub_proc.works_written().await?,
                before,
                "no ManifestWork write on a no-op resync"
            );
            assert_eq!(
                mcm_rv,
                mcm_status(&hub, "kmm-ci-a").await?.resource_version(),
                "no status write on a no-op resync"
            );

            // Relabelling one cluster out of the selector removes only its work.
            let written = hub_proc.works_written().await?;
            assert!(written >= 3.0, "three works written: {written}");
            let clusters: Api<ManagedCluster> = Api::all(hub.clone());
            for i in [1, 2] {
                clusters
                    .patch(
                        &spoke_name(i),
                        &PatchParams::default(),
                        &Patch::Merge(json!({"metadata": {"labels": {"fleet": "yes"}}})),
                    )
                    .await?;
            }
            apply_mcm(&hub, &mcm(fleet, "kmm-ci-a", json!({"fleet": "yes"}))?).await?;
            eventually("spoke-3's work gone", Duration::from_secs(30), || async {
                let ws = works(&hub, "kmm-ci-a").await?;
                Ok(
                    if ws.keys().cloned().collect::<Vec<_>>() == vec![spoke_name(1), spoke_name(2)]
                    {
                        Ok(())
                    } else {
                        Err(format!("{:?}", ws.keys().collect::<Vec<_>>()))
                    },
                )
            })
            .await?;
            let kept = works(&hub, "kmm-ci-a").await?;
            assert_eq!(
                kept[&spoke_name(1)].metadata.generation,
                ws[&spoke_name(1)].metadata.generation,
                "spoke-1's work unchanged"
            );
            assert_eq!(
                hub_proc.works_written().await?,
                written,
                "relabelling rewrote no remaining work"
            );
            let spoke3 = fleet.spoke(3).client().await;
            eventually(
                "the Module gone from spoke-3",
                Duration::from_secs(30),
                || {
                    let spoke3 = spoke3.clone();
                    async move {
                        let m = Api::<Module>::namespaced(spoke3, SPOKE_NS)
                            .get_opt("kmm-ci-a")
                            .await?;
                        Ok(if m.is_none() {
                            Ok(())
                        } else {
                            Err("still there".into())
                        })
                    }
                },
            )
            .await?;

            // Deleting the MCM removes every work, then the MCM itself.
            Api::<ManagedClusterModule>::all(hub.clone())
                .delete("kmm-ci-a", &DeleteParams::default())
                .await?;
            eventually(
                "works and the MCM gone",
                Duration::from_secs(60),
                || async {
                    let ws = works(&hub, "kmm-ci-a").await?;
                    let m = Api::<ManagedClusterModule>::all(hub.clone())
                        .get_opt("kmm-ci-a")
                        .await?;
                    Ok(if ws.is_empty() && m.is_none() {
                        Ok(())
                    } else {
                        Err(format!(
                            "works {:?}, mcm present {}",
                            ws.keys().collect::<Vec<_>>(),
                            m.is_some()
                        ))
                    })
                },
            )
            .await?;
            hub_proc.stop().await;
            Ok(())
        })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_outage_keeps_shipped_works_and_moving_tags_repin() -> anyhow::Result<()> {
    Fleet::builder()
        .spokes(1)
        .nodes_with(|_, spoke| vec![worker_node(&format!("{spoke}-w1"), "6.1.0-13-amd64")])
        .registry_auth(true)
        .run(async |fleet: &mut Fleet| {
            let k = "6.1.0-13-amd64";
            prepare(fleet, &[&[k]]).await?;
            let d1 = push(fleet, k).await?;
            let hub = fleet.hub().client().await;
            let hub_proc = start_hub(fleet, Duration::from_secs(2));
            apply_mcm(&hub, &mcm(fleet, "outage", json!({}))?).await?;
            let repo = format!("{}/kmm/kmm-ci-a", fleet.registry().host());
            let first = eventually("the work", Duration::from_secs(60), || async {
                let ws = works(&hub, "outage").await?;
                Ok(ws
                    .get(&spoke_name(1))
                    .cloned()
                    .ok_or_else(|| "none".to_string()))
            })
            .await?;
            assert_eq!(work_images(&first), vec![format!("{k}={repo}@{d1}")]);

            // Registry down: the shipped work stays as it is, and status says Degraded.
            fleet.registry_mut().stop().await;
            let degraded = eventually("Degraded", Duration::from_secs(60), || async {
                let m = mcm_status(&hub, "outage").await?;
                Ok(match condition(&m, "Degraded") {
                    Some((s, reason, msg)) if s == "True" => Ok((reason, msg)),
                    other => Err(format!("{other:?}")),
                })
            })
            .await?;
            assert!(degraded.1.contains("cannot be reached"), "{degraded:?}");
            let during = works(&hub, "outage").await?;
            assert_eq!(
                during[&spoke_name(1)].metadata.generation,
                first.metadata.generation,
                "shipped work untouched"
            );
            assert_eq!(
                work_images(&during[&spoke_name(1)]),
                vec![format!("{k}={repo}@{d1}")]
            );
            assert_eq!(hub_proc.works_written().await?, 1.0, "only the first write");

            // Back up: recovers by itself.
            fleet.registry_mut().start().await?;
            eventually("Degraded cleared", Duration::from_secs(120), || async {
                let m = mcm_status(&hub, "outage").await?;
                Ok(match condition(&m, "Degraded") {
                    Some((s, _, _)) if s == "False" => Ok(()),
                    other => Err(format!("{other:?}")),
                })
            })
            .await?;

            // The tag moves: the next resync re-pins it.
            let mut img = KmodImage::new(&[k], &["kmm_ci_a", "kmm_ci_b"]);
            img.annotations.insert("moved".into(), "yes".into());
            let d2 = push_kmod_image(&fleet.registry().access(), &image(fleet, k), &img).await?;
            assert_ne!(d1, d2);
            eventually("re-pinned", Duration::from_secs(60), || async {
                let ws = works(&hub, "outage").await?;
                let imgs = ws.get(&spoke_name(1)).map(work_images).unwrap_or_default();
                Ok(if imgs == vec![format!("{k}={repo}@{d2}")] {
                    Ok(())
                } else {
                    Err(format!("{imgs:?}"))
                })
            })
            .await?;
            hub_proc.stop().await;
            Ok(())
        })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_image_is_reported_and_a_restart_converges_without_duplicate_writes()
-> anyhow::Result<()> {
    Fleet::builder()
        .spokes(3)
        .nodes_with(|_, spoke| vec![worker_node(&format!("{spoke}-w1"), "6.1.0-13-amd64")])
        .registry_auth(true)
        .run(async |fleet: &mut Fleet| {
            let (ka, kb) = ("6.1.0-13-amd64", "6.1.0-21-amd64");
            prepare(fleet, &[&[ka], &[ka], &[kb]]).await?;
            push(fleet, ka).await?;
            let hub = fleet.hub().client().await;
            let hub_proc = start_hub(fleet, Duration::from_secs(30));
            apply_mcm(&hub, &mcm(fleet, "restart", json!({}))?).await?;
            let before = eventually(
                "works on spoke-1 and spoke-2",
                Duration::from_secs(60),
                || async {
                    let ws = works(&hub, "restart").await?;
                    Ok(if ws.len() == 2 {
                        Ok(ws)
                    } else {
                        Err(format!("{:?}", ws.keys().collect::<Vec<_>>()))
                    })
                },
            )
            .await?;
            // spoke-3's kernel has no image yet: reported with the image's name.
            let missing = image(fleet, kb);
            eventually("spoke-3 reported", Duration::from_secs(30), || async {
                let m = mcm_status(&hub, "restart").await?;
                let s = m.status.unwrap_or_default();
                let ok = s
                    .clusters
                    .iter()
                    .any(|c| c.name == spoke_name(3) && c.message.contains(&missing))
                    && s.images.iter().any(|i| {
                        i.image == missing && i.state == shared_api::mcm::ImageState::Missing
                    });
                Ok(if ok {
                    Ok(())
                } else {
                    Err(format!("{:?} / {:?}", s.clusters, s.images))
                })
            })
            .await?;

            // Kill the hub mid-rollout, let the image appear, start a new hub.
            hub_proc.stop().await;
            push(fleet, kb).await?;
            let hub_proc = start_hub(fleet, Duration::from_secs(30));
            eventually("all three works", Duration::from_secs(60), || async {
                let ws = works(&hub, "restart").await?;
                Ok(if ws.len() == 3 {
                    Ok(())
                } else {
                    Err(format!("{:?}", ws.keys().collect::<Vec<_>>()))
                })
            })
            .await?;
            let after = works(&hub, "restart").await?;
            for c in [spoke_name(1), spoke_name(2)] {
                assert_eq!(
                    after[&c].metadata.generation, before[&c].metadata.generation,
                    "{c}: unchanged after restart"
                );
            }
            assert_eq!(
                hub_proc.works_written().await?,
                1.0,
                "the restarted hub wrote only spoke-3's new work"
            );

            // The tag of kernel A moves; with a 30 s resync the cached digest would stay, but
            // changing imageRebuildTriggerGeneration re-verifies every image at once.
            let mut img = KmodImage::new(&[ka], &["kmm_ci_a"]);
            img.annotations.insert("rebuilt".into(), "yes".into());
            let moved =
                push_kmod_image(&fleet.registry().access(), &image(fleet, ka), &img).await?;
            let mut m = mcm(fleet, "restart", json!({}))?;
            m.spec.module_spec.image_rebuild_trigger_generation = Some(1);
            apply_mcm(&hub, &m).await?;
            let repo = format!("{}/kmm/kmm-ci-a", fleet.registry().host());
            eventually(
                "re-pinned after the rebuild trigger",
                Duration::from_secs(20),
                || async {
                    let imgs = works(&hub, "restart")
                        .await?
                        .get(&spoke_name(1))
                        .map(work_images)
                        .unwrap_or_default();
                    Ok(if imgs == vec![format!("{ka}={repo}@{moved}")] {
                        Ok(())
                    } else {
                        Err(format!("{imgs:?}"))
                    })
                },
            )
            .await?;
            // The status follows the works (a second write).
            eventually(
                "status records the rebuild trigger generation",
                Duration::from_secs(20),
                || async {
                    let status = mcm_status(&hub, "restart")
                        .await?
                        .status
                        .unwrap_or_default();
                    Ok(match status.image_rebuild_trigger_generation {
                        Some(1) => Ok(()),
                        other => Err(format!("{other:?}")),
                    })
                },
            )
            .await?;
            hub_proc.stop().await;
            Ok(())
        })
        .await
        .context("restart scenario")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_rejects_an_invalid_mcm_with_the_field_path() -> anyhow::Result<()> {
    Fleet::builder()
        .spokes(0)
        .run(async |fleet: &mut Fleet| {
            let hub = fleet.hub().client().await;
            ensure_namespace(&hub, HUB_NS).await?;
            let ca = kmm_e2e::pki::Ca::new("webhook-ca")?;
            let serving = ca.serving_cert("kmm-hub-webhook", &["127.0.0.1", "localhost"])?;
            let dir = fleet.dir().join("webhook");
            std::fs::create_dir_all(&dir)?;
            std::fs::write(dir.join("tls.crt"), &serving.cert_pem)?;
            std::fs::write(dir.join("tls.key"), &serving.key_pem)?;
            let port = kmm_e2e::process::free_port()?;
            let mut o = HubOptions::new(fleet.hub().kubeconfig_path(), HUB_NS);
            o.leader_elect = false;
            o.webhook = Some((format!("127.0.0.1:{port}").parse()?, dir.join("tls.crt"), dir.join("tls.key")));
            let hub_proc = HubProcess::start(o)?;

            // Registered by URL on loopback, as the test world requires.
            let manifest = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../manifests/hub/webhook.yaml"))?;
            let mut vwc: serde_json::Value = serde_yaml::from_str(&manifest)?;
            let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, ca.cert_pem());
            let hook = &mut vwc["webhooks"][0];
            hook["clientConfig"] = json!({"url": format!("https://127.0.0.1:{port}{}", kmm_hub::webhook::MCM_PATH), "caBundle": b64});
            let api: Api<k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration> = Api::all(hub.clone());
            api.create(&PostParams::default(), &serde_json::from_value(vwc)?).await?;

            let mut bad: serde_json::Value = serde_json::to_value(mcm(fleet, "bad-regexp", json!({}))?)?;
            bad["spec"]["moduleSpec"]["moduleLoader"]["container"]["kernelMappings"][0]["regexp"] = json!("^5\\.14(.*$");
            let bad: ManagedClusterModule = serde_json::from_value(bad)?;
            let mcms: Api<ManagedClusterModule> = Api::all(hub.clone());
            let err = eventually("the webhook to answer", Duration::from_secs(30), || async {
                Ok(match mcms.create(&PostParams::default(), &bad).await {
                    Err(kube::Error::Api(e)) if e.message.contains("denied the request") => Ok(e.message),
                    other => Err(format!("{other:?}")),
                })
            })
            .await?;
            assert!(err.contains("spec.moduleSpec.moduleLoader.container.kernelMappings[0].regexp"), "{err}");

            // kubectl users see the same message.
            {
                let kubectl = kmm_e2e::provision::ensure_provisioned()?.kubectl;
                let file = dir.join("bad.yaml");
                std::fs::write(&file, serde_yaml::to_string(&bad)?)?;
                let out = tokio::process::Command::new(kubectl)
                    .args(["--kubeconfig", &fleet.hub().kubeconfig_path().to_string_lossy(), "apply", "-f", &file.to_string_lossy()])
                    .output()
                    .await?;
                let stderr = String::from_utf8_lossy(&out.stderr);
                assert!(!out.status.success());
                assert!(stderr.contains("kernelMappings[0].regexp"), "{stderr}");
            }

            // A valid one is admitted.
            mcms.create(&PostParams::default(), &mcm(fleet, "good", json!({}))?).await?;
            hub_proc.stop().await;
            Ok(())
        })
        .await
}

// ---- builds and signing ------------------------------------------------------------------

fn openssl_keypair(
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

async fn put_secret(hub: &Client, name: &str, key: &str, value: &[u8]) -> anyhow::Result<()> {
    let api: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(hub.clone(), HUB_NS);
    let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, value);
    let s = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": HUB_NS}, "data": {key: b64}});
    api.patch(name, &PatchParams::apply("test").force(), &Patch::Apply(s))
        .await?;
    Ok(())
}

async fn put_dockerfile(hub: &Client, name: &str, dockerfile: &str) -> anyhow::Result<()> {
    let api: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(hub.clone(), HUB_NS);
    let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": HUB_NS}, "data": {"dockerfile": dockerfile}});
    api.patch(name, &PatchParams::apply("test").force(), &Patch::Apply(cm))
        .await?;
    Ok(())
}

/// The in-cluster build lab as an MCM (image moved to the local registry), optionally signed.
fn build_mcm(
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
async fn shipped(hub: &Client, name: &str) -> anyhow::Result<BTreeMap<String, Vec<String>>> {
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
                        e.reason.as_deref() == Some("BuildFailed")
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

/// Issue 15 point 1: registry clients are kept per credential. Two authenticated registries
/// with different passwords: an anonymous lookup does not lock the credentialed out, one
/// credential's access (or its cached digest) is not lent to another asker, and a rotated
/// Secret is used at once (its old client is dropped).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_clients_are_kept_apart_per_credential() -> anyhow::Result<()> {
    use kmm_hub::registry::{DockerConfig, LookupError, Resolver};
    use shared_api::module::TlsOptions;
    let binaries = tokio::task::spawn_blocking(kmm_e2e::provision::ensure_provisioned).await??;
    let dir = tempfile::tempdir()?;
    let r1 = kmm_e2e::registry::Registry::run(&binaries, &dir.path().join("r1"), true).await?;
    let r2 = kmm_e2e::registry::Registry::run(&binaries, &dir.path().join("r2"), true).await?;
    let k = "5.14.0-1.fake";
    let (a, b) = (
        format!("{}/team-a/mod:{k}", r1.host()),
        format!("{}/team-b/mod:{k}", r2.host()),
    );
    let img = KmodImage::new(&[k], &["kmm_ci_a"]);
    let da = push_kmod_image(&r1.access(), &a, &img).await?;
    let db = push_kmod_image(&r2.access(), &b, &img).await?;
    let tls = TlsOptions::default();
    let resolver = Resolver::new(Duration::from_secs(600), Default::default());
    let s1 = DockerConfig::parse(r1.dockerconfigjson().as_bytes())?.from_secret("team-a-pull");
    let s2 = DockerConfig::parse(r2.dockerconfigjson().as_bytes())?.from_secret("team-b-pull");
    let anonymous = DockerConfig::default();
    let unauthorized =
        |r: Result<String, LookupError>| matches!(r, Err(LookupError::Unauthorized(_)));

    // Anonymous first: refused, and it does not lock team A out of its registry.
    assert!(unauthorized(resolver.digest(&a, tls, &anonymous).await));
    assert_eq!(resolver.digest(&a, tls, &s1).await?, da);
    // Team A's access is not lent: neither to an anonymous asker nor to team B.
    assert!(unauthorized(resolver.digest(&a, tls, &anonymous).await));
    assert!(unauthorized(resolver.digest(&a, tls, &s2).await));
    assert_eq!(resolver.digest(&b, tls, &s2).await?, db);
    assert!(unauthorized(resolver.digest(&b, tls, &s1).await));

    // A Secret with a wrong password, then rotated to the right one: used at once.
    let (user, password) = r1.credentials().context("auth on")?;
    let wrong = kmm_e2e::oci::docker_config_json(&r1.host(), user, "wrong");
    let stale = DockerConfig::parse(wrong.as_bytes())?.from_secret("team-c-pull");
    assert!(unauthorized(resolver.digest(&a, tls, &stale).await));
    let before = resolver.clients();
    resolver.forget_secret("team-c-pull");
    assert_eq!(
        resolver.clients(),
        before - 1,
        "the stale client is dropped"
    );
    let right = kmm_e2e::oci::docker_config_json(&r1.host(), user, password);
    let rotated = DockerConfig::parse(right.as_bytes())?.from_secret("team-c-pull");
    assert_eq!(resolver.digest(&a, tls, &rotated).await?, da);
    Ok(())
}

fn signed_mcm(
    fleet: &Fleet,
    name: &str,
    policy: Option<&str>,
) -> anyhow::Result<ManagedClusterModule> {
    let host = fleet.registry().host();
    let mut spec = json!({"spokeNamespace": SPOKE_NS, "selector": {},
        "moduleSpec": {"selector": {"node-role.kubernetes.io/worker": ""},
            "imageRepoSecret": {"name": PULL_SECRET},
            "moduleLoader": {"container": {"modprobe": {"moduleName": "kmm_ci_a"}, "kernelMappings": [{
                "regexp": "^.*$",
                "containerImage": format!("{host}/kmm/signed:${{KERNEL_FULL_VERSION}}"),
                "sign": {"unsignedImage": format!("{host}/kmm/kmm-ci-a:${{KERNEL_FULL_VERSION}}"),
                    "keySecret": {"name": "mykey"}, "certSecret": {"name": "mycert"},
                    "filesToSign": ["/opt/lib/modules/${KERNEL_FULL_VERSION}/kmm_ci_a.ko"]}}]}}}});
    if let Some(p) = policy {
        spec["movedTagPolicy"] = json!(p);
    }
    Ok(serde_json::from_value(json!({
        "apiVersion": "hub.kmm.sigs.x-k8s.io/v1beta1", "kind": "ManagedClusterModule",
        "metadata": {"name": name}, "spec": spec
    }))?)
}

async fn set_hub_claim(hub: &Client, cluster: &str, value: &str) -> anyhow::Result<()> {
    Api::<ManagedCluster>::all(hub.clone())
        .patch_status(
            cluster,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {
                "clusterClaims": [{"name": KERNEL_VERSIONS_CLAIM, "value": value}]}})),
        )
        .await?;
    Ok(())
}

/// Issue 15 points 1, 3 and 17 through the running hub: a pull Secret with a wrong password
/// is fixed in place and used without a restart; a signed image whose tag is pushed over
/// keeps shipping the hub's digest and reports `TagMoved` (condition and event) until
/// `movedTagPolicy: Repin`; an empty kernel claim keeps the cluster's work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_pull_secret_moved_signed_tag_and_empty_claim() -> anyhow::Result<()> {
    Fleet::builder()
        .spokes(1)
        .simulators(false)
        .registry_auth(true)
        .run(async |fleet: &mut Fleet| {
            let k = "5.14.0-1.fake";
            let hub = fleet.hub().client().await;
            ensure_namespace(&hub, HUB_NS).await?;
            set_hub_claim(&hub, &spoke_name(1), k).await?;
            let (user, password) = {
                let (u, p) = fleet.registry().credentials().context("auth on")?;
                (u.to_string(), p.to_string())
            };
            let host = fleet.registry().host();
            let put_pull = |password: String| {
                let hub = hub.clone();
                let (user, host) = (user.clone(), host.clone());
                async move {
                    let json = kmm_e2e::oci::docker_config_json(&host, &user, &password);
                    put_secret(&hub, PULL_SECRET, ".dockerconfigjson", json.as_bytes()).await
                }
            };
            put_pull("wrong".into()).await?;
            let dir = tempfile::tempdir()?;
            let (key, cert, _) = openssl_keypair(dir.path(), "fleet")?;
            put_secret(&hub, "mykey", "key", &key).await?;
            put_secret(&hub, "mycert", "cert", &cert).await?;
            push_kmod_image(
                &fleet.registry().access(),
                &format!("{host}/kmm/kmm-ci-a:{k}"),
                &KmodImage::new(&[k], &["kmm_ci_a"]),
            )
            .await?;
            let hub_proc = start_hub(fleet, Duration::from_secs(2));
            apply_mcm(&hub, &signed_mcm(fleet, "signed", None)?).await?;

            // Wrong password: refused. Fixed in place: used without a restart.
            eventually(
                "the credentials refused",
                Duration::from_secs(60),
                || async {
                    let m = mcm_status(&hub, "signed").await?;
                    let reason = m
                        .status
                        .and_then(|s| s.images.first().and_then(|i| i.reason.clone()));
                    Ok(match reason {
                        Some(r) if r.contains("refused the credentials") => Ok(()),
                        other => Err(format!("{other:?}")),
                    })
                },
            )
            .await?;
            put_pull(password.clone()).await?;
            let repo = format!("{host}/kmm/signed");
            let signed = eventually("the signed work", Duration::from_secs(90), || async {
                let imgs = shipped(&hub, "signed")
                    .await?
                    .remove(&spoke_name(1))
                    .unwrap_or_default();
                Ok(match imgs.first().and_then(|i| i.split_once('@')) {
                    Some((_, d)) if imgs.len() == 1 => Ok(d.to_string()),
                    _ => Err(format!("{imgs:?}")),
                })
            })
            .await?;
            assert_eq!(
                shipped(&hub, "signed").await?[&spoke_name(1)],
                vec![format!("{k}={repo}@{signed}")]
            );

            // An empty claim (no node reports a kernel; OCM wants at least one character,
            // so a line break): the work stays.
            set_hub_claim(&hub, &spoke_name(1), "\n").await?;
            eventually("NoKernelClaim", Duration::from_secs(60), || async {
                let m = mcm_status(&hub, "signed").await?;
                let reasons: Vec<String> = m
                    .status
                    .iter()
                    .flat_map(|s| s.clusters.iter().map(|c| c.reason.clone()))
                    .collect();
                Ok(if reasons == ["NoKernelClaim"] {
                    Ok(())
                } else {
                    Err(format!("{reasons:?}"))
                })
            })
            .await?;
            assert_eq!(
                shipped(&hub, "signed").await?.get(&spoke_name(1)),
                Some(&vec![format!("{k}={repo}@{signed}")]),
                "the work of a cluster with an empty claim is kept"
            );
            set_hub_claim(&hub, &spoke_name(1), k).await?;

            // Someone pushes over the signed tag: the hub keeps its digest and says so.
            let mut other = KmodImage::new(&[k], &["kmm_ci_a", "kmm_ci_b"]);
            other
                .annotations
                .insert("pushed-by".into(), "someone".into());
            let moved =
                push_kmod_image(&fleet.registry().access(), &format!("{repo}:{k}"), &other).await?;
            let cond = eventually("TagMoved", Duration::from_secs(60), || async {
                let m = mcm_status(&hub, "signed").await?;
                Ok(match condition(&m, "TagMoved") {
                    Some((s, reason, msg)) if s == "True" => Ok((reason, msg)),
                    other => Err(format!("{other:?}")),
                })
            })
            .await?;
            assert_eq!(cond.0, "TagMovedNotRepinned");
            assert!(
                cond.1.contains(&moved) && cond.1.contains(&signed),
                "{cond:?}"
            );
            assert_eq!(
                shipped(&hub, "signed").await?[&spoke_name(1)],
                vec![format!("{k}={repo}@{signed}")],
                "the hub's digest is still shipped"
            );
            let events: Api<k8s_openapi::api::events::v1::Event> =
                Api::namespaced(hub.clone(), "default");
            eventually("a TagMoved event", Duration::from_secs(30), || async {
                let list = events.list(&Default::default()).await?;
                Ok(
                    if list.items.iter().any(|e| {
                        e.reason.as_deref() == Some("TagMoved")
                            && e.note.as_deref().unwrap_or("").contains(&moved)
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

            // Explicit choice: re-pin. The hub takes the tag again: it signs from
            // unsignedImage and pushes, so the tag points to the hub's digest again.
            apply_mcm(&hub, &signed_mcm(fleet, "signed", Some("Repin"))?).await?;
            let repinned = eventually("TagMoved cleared", Duration::from_secs(90), || async {
                let m = mcm_status(&hub, "signed").await?;
                let imgs = shipped(&hub, "signed")
                    .await?
                    .remove(&spoke_name(1))
                    .unwrap_or_default();
                let cleared = matches!(condition(&m, "TagMoved"), Some((s, _, _)) if s == "False");
                Ok(match imgs.first().and_then(|i| i.split_once('@')) {
                    Some((_, d)) if cleared && imgs.len() == 1 => Ok(d.to_string()),
                    _ => Err(format!("{imgs:?} {:?}", condition(&m, "TagMoved"))),
                })
            })
            .await?;
            let now =
                kmm_e2e::oci::manifest_digest(&fleet.registry().access(), &format!("{repo}:{k}"))
                    .await?;
            assert_eq!(now, repinned, "the tag points to what is shipped");
            assert_ne!(now, moved, "the pushed-over content is not shipped");
            hub_proc.stop().await;
            Ok(())
        })
        .await
}

// ---- admission: who may name which Secret -------------------------------------------------

/// The hub with its webhook on loopback; returns the process and the webhook configuration
/// (from manifests/hub/webhook.yaml, pointed at it) to register when the test wants.
async fn hub_with_webhook(
    fleet: &Fleet,
) -> anyhow::Result<(
    HubProcess,
    k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration,
)> {
    let ca = kmm_e2e::pki::Ca::new("webhook-ca")?;
    let serving = ca.serving_cert("kmm-hub-webhook", &["127.0.0.1", "localhost"])?;
    let dir = fleet.dir().join("webhook");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("tls.crt"), &serving.cert_pem)?;
    std::fs::write(dir.join("tls.key"), &serving.key_pem)?;
    let port = kmm_e2e::process::free_port()?;
    let mut o = HubOptions::new(fleet.hub().kubeconfig_path(), HUB_NS);
    o.leader_elect = false;
    o.resync = Duration::from_secs(2);
    o.webhook = Some((
        format!("127.0.0.1:{port}").parse()?,
        dir.join("tls.crt"),
        dir.join("tls.key"),
    ));
    let hub_proc = HubProcess::start(o)?;
    let manifest = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../manifests/hub/webhook.yaml"
    ))?;
    let mut vwc: serde_json::Value = serde_yaml::from_str(&manifest)?;
    let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, ca.cert_pem());
    vwc["webhooks"][0]["clientConfig"] = json!({"url": format!("https://127.0.0.1:{port}{}", kmm_hub::webhook::MCM_PATH), "caBundle": b64});
    Ok((hub_proc, serde_json::from_value(vwc)?))
}

/// A client for the hub cluster that acts as `user` in `groups` (impersonation by the admin).
async fn acting_as(fleet: &Fleet, user: &str, groups: &[&str]) -> anyhow::Result<Client> {
    let kc = kube::config::Kubeconfig::read_from(fleet.hub().kubeconfig_path())?;
    let mut config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
    config.auth_info.impersonate = Some(user.to_string());
    config.auth_info.impersonate_groups = Some(groups.iter().map(|g| g.to_string()).collect());
    Ok(Client::try_from(config)?)
}

async fn put_object(hub: &Client, doc: serde_json::Value) -> anyhow::Result<()> {
    kmm_e2e::sandbox::install::apply(hub, &doc).await
}

/// An MCM that pulls with the registry secret and signs with `sb-key`/`sb-cert`.
fn signing_mcm(fleet: &Fleet, name: &str) -> anyhow::Result<ManagedClusterModule> {
    let mut m = serde_json::to_value(mcm(fleet, name, json!({}))?)?;
    let unsigned = format!(
        "{}/kmm/unsigned:${{KERNEL_FULL_VERSION}}",
        fleet.registry().host()
    );
    m["spec"]["moduleSpec"]["moduleLoader"]["container"]["sign"] = json!({
        "keySecret": {"name": "sb-key"}, "certSecret": {"name": "sb-cert"}, "unsignedImage": unsigned,
        "filesToSign": ["/opt/lib/modules/${KERNEL_FULL_VERSION}/kmm_ci_a.ko"]});
    Ok(serde_json::from_value(m)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_admits_only_authors_who_may_read_every_referenced_secret() -> anyhow::Result<()> {
    Fleet::builder()
        .spokes(0)
        .run(async |fleet: &mut Fleet| {
            prepare(fleet, &[]).await?;
            let hub = fleet.hub().client().await;
            put_secret(&hub, "sb-key", "key", b"not a real key").await?;
            put_secret(&hub, "sb-cert", "cert", b"not a real cert").await?;
            // Both may write MCMs; both may read the pull secret and the certificate; only
            // the group `signers` may read the Secure Boot key.
            put_object(&hub, json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                "metadata": {"name": "mcm-author"},
                "rules": [{"apiGroups": ["hub.kmm.sigs.x-k8s.io"], "resources": ["managedclustermodules"],
                    "verbs": ["get", "list", "create", "update", "patch", "delete"]}]})).await?;
            put_object(&hub, json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                "metadata": {"name": "mcm-author"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "mcm-author"},
                "subjects": [{"kind": "Group", "name": "module-authors", "apiGroup": "rbac.authorization.k8s.io"}]})).await?;
            put_object(&hub, json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                "metadata": {"name": "read-public", "namespace": HUB_NS},
                "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"],
                    "resourceNames": [PULL_SECRET, "sb-cert"]}]})).await?;
            put_object(&hub, json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                "metadata": {"name": "read-public", "namespace": HUB_NS},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "read-public"},
                "subjects": [{"kind": "Group", "name": "module-authors", "apiGroup": "rbac.authorization.k8s.io"}]})).await?;
            put_object(&hub, json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                "metadata": {"name": "read-key", "namespace": HUB_NS},
                "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"], "resourceNames": ["sb-key"]}]})).await?;
            put_object(&hub, json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                "metadata": {"name": "read-key", "namespace": HUB_NS},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "read-key"},
                "subjects": [{"kind": "Group", "name": "signers", "apiGroup": "rbac.authorization.k8s.io"}]})).await?;
            let alice = acting_as(fleet, "alice", &["module-authors"]).await?;
            let bob = acting_as(fleet, "bob", &["module-authors", "signers"]).await?;

            // Written before the webhook exists, and invalid by its rules: it must still be
            // deletable once the webhook is there (finalizers are metadata).
            let mut legacy = serde_json::to_value(mcm(fleet, "legacy", json!({}))?)?;
            legacy["spec"]["moduleSpec"]["moduleLoader"]["container"]["kernelMappings"][0]["regexp"] = json!("^5\\.14(.*$");
            legacy["metadata"]["finalizers"] = json!(["test.kmm-fleet.io/hold"]);
            Api::<ManagedClusterModule>::all(hub.clone())
                .create(&PostParams::default(), &serde_json::from_value(legacy)?)
                .await?;

            let (hub_proc, vwc) = hub_with_webhook(fleet).await?;
            Api::<k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration>::all(hub.clone())
                .create(&PostParams::default(), &vwc)
                .await?;

            let as_alice: Api<ManagedClusterModule> = Api::all(alice.clone());
            let err = eventually("the webhook to answer alice", Duration::from_secs(30), || async {
                Ok(match as_alice.create(&PostParams::default(), &signing_mcm(fleet, "signed")?).await {
                    Err(kube::Error::Api(e)) if e.message.contains("denied the request") => Ok(e.message),
                    other => Err(format!("{other:?}")),
                })
            })
            .await?;
            assert!(
                err.contains(&format!(
                    "spec.moduleSpec.moduleLoader.container.sign.keySecret.name: \
                     user \"alice\" may not get secrets \"sb-key\" in namespace \"{HUB_NS}\""
                )),
                "{err}"
            );
            assert!(
                !err.contains("sb-cert") && !err.contains(PULL_SECRET) && !err.contains("required"),
                "only what alice lacks: {err}"
            );

            // Bob, through his group, may read all three: admitted.
            let as_bob: Api<ManagedClusterModule> = Api::all(bob.clone());
            as_bob.create(&PostParams::default(), &signing_mcm(fleet, "signed")?).await?;

            // Alice may relabel bob's MCM (metadata only), not aim the key elsewhere.
            let pp = PatchParams::default();
            as_alice
                .patch("signed", &pp, &Patch::Merge(json!({"metadata": {"labels": {"team": "kernel"}}})))
                .await
                .context("a metadata-only update by alice")?;
            let denied = as_alice
                .patch("signed", &pp, &Patch::Merge(json!({"spec": {"selector": {"env": "prod"}}})))
                .await;
            assert!(
                matches!(&denied, Err(kube::Error::Api(e)) if e.message.contains("may not get secrets \"sb-key\"")),
                "{denied:?}"
            );

            // The invalid MCM written before the webhook: labels, then deletion through its
            // finalizers (ours and the hub's) go through.
            let mcms: Api<ManagedClusterModule> = Api::all(hub.clone());
            mcms.patch("legacy", &pp, &Patch::Merge(json!({"metadata": {"labels": {"old": "yes"}}})))
                .await
                .context("a label on an MCM the rules now reject")?;
            mcms.delete("legacy", &DeleteParams::default()).await?;
            mcms.patch(
                "legacy",
                &pp,
                &Patch::Json::<()>(serde_json::from_value(json!([
                    {"op": "remove", "path": "/metadata/finalizers/0"}
                ]))?),
            )
            .await
            .context("releasing a finalizer of an MCM being deleted")?;
            eventually("the legacy MCM gone", Duration::from_secs(60), || async {
                Ok(match mcms.get_opt("legacy").await? {
                    None => Ok(()),
                    Some(m) => Err(format!("finalizers {:?}", m.finalizers())),
                })
            })
            .await?;
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

// ---- signing: bounded memory and verification -----------------------------------------------

/// Incompressible bytes (xorshift64*), fast to make.
fn filler(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Runs `kmm-hub <args>` under `/usr/bin/time` and returns its stdout and peak RSS in bytes
/// (the child's `ru_maxrss`).
fn run_measured(hub: &std::path::Path, args: &[String]) -> anyhow::Result<(String, u64)> {
    let out = std::process::Command::new("/usr/bin/time")
        .args(["-f", "KMM_PEAK_RSS_KB=%M"])
        .arg(hub)
        .args(args)
        .output()
        .context("running /usr/bin/time (Debian package `time`)")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    anyhow::ensure!(out.status.success(), "kmm-hub {args:?} failed: {stderr}");
    let kb: u64 = stderr
        .lines()
        .find_map(|l| l.strip_prefix("KMM_PEAK_RSS_KB="))
        .context("no peak RSS from /usr/bin/time")?
        .trim()
        .parse()?;
    Ok((
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        kb * 1024,
    ))
}

/// Signing an image far larger than the hub's memory keeps the hub's memory flat: the layers
/// go to disk and back, and only the modules are held. A 320 MiB incompressible layer plus a
/// module layer, on one real registry, signed into a second one (so the big layer is pulled
/// AND pushed), by `kmm-hub sign-image` in a child process whose peak RSS is measured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signing_an_image_larger_than_memory_keeps_peak_rss_bounded() -> anyhow::Result<()> {
    const FILLER: usize = 320 << 20;
    let binaries = tokio::task::spawn_blocking(kmm_e2e::provision::ensure_provisioned).await??;
    let dir = tempfile::tempdir()?;
    let (hub_bin, _) =
        kmm_e2e::sandbox::agents::locate_binaries(None, None, &dir.path().join("build.log"))
            .await?;
    let mut src_reg =
        kmm_e2e::registry::Registry::run(&binaries, &dir.path().join("src"), false).await?;
    let mut dst_reg =
        kmm_e2e::registry::Registry::run(&binaries, &dir.path().join("dst"), false).await?;
    let kernel = "6.1.0-13-amd64";
    let source = format!("{}/kmm/big:1", src_reg.host());
    let dest = format!("{}/kmm/big-signed:1", dst_reg.host());

    let big = {
        let mut files = BTreeMap::new();
        files.insert("/opt/filler.bin".to_string(), filler(FILLER));
        kmm_e2e::oci::tar_files(&files)?
    };
    let module = kmm_e2e::kmod::fake_module("kmm_ci_a", kernel);
    let ko = format!("/opt/lib/modules/{kernel}/kmm_ci_a.ko");
    let mods = kmm_e2e::oci::tar_files(&BTreeMap::from([(ko.clone(), module.clone())]))?;
    let image_bytes = (big.len() + mods.len()) as u64;
    kmm_e2e::oci::push_image(
        &src_reg.access(),
        &source,
        &[big, mods],
        &Default::default(),
        &BTreeMap::new(),
    )
    .await?;

    let keys = dir.path().join("keys");
    std::fs::create_dir_all(&keys)?;
    let (_, _, der) = openssl_keypair(&keys, "big-signer")?;
    let work = dir.path().join("work");
    // KMM_FLEET_SIGN_IMAGE_BIN measures another implementation taking the same arguments
    // (how the figure for the in-memory signer before streaming was taken).
    let (program, subcommand) = match std::env::var_os("KMM_FLEET_SIGN_IMAGE_BIN") {
        Some(p) => (std::path::PathBuf::from(p), vec![]),
        None => (hub_bin.clone(), vec!["sign-image".to_string()]),
    };
    let (digest, peak) = run_measured(
        &program,
        &[
            subcommand,
            vec![
                format!("--source={source}"),
                format!("--dest={dest}"),
                "--file=/opt/lib/modules/*/*.ko".into(),
                format!("--key={}", keys.join("big-signer.key").display()),
                format!("--cert={}", keys.join("big-signer.crt").display()),
                format!("--work-dir={}", work.display()),
            ],
        ]
        .concat(),
    )?;
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    eprintln!(
        "FIGURES sign-image: image {:.0} MiB (uncompressed layers), peak RSS {:.1} MiB",
        mib(image_bytes),
        mib(peak)
    );
    assert!(digest.starts_with("sha256:"), "{digest}");
    assert!(
        peak < image_bytes / 4 && peak < 128 << 20,
        "peak RSS {:.1} MiB for a {:.0} MiB image",
        mib(peak),
        mib(image_bytes)
    );
    // Nothing is left in the work directory.
    assert_eq!(
        std::fs::read_dir(&work)?.count(),
        0,
        "work directory not cleaned"
    );

    // The hub's verifier accepts the result, within the same bound.
    let (verified, vpeak) = run_measured(
        &hub_bin,
        &[
            "verify-image".into(),
            format!("--image={dest}"),
            "--file=/opt/lib/modules/*/*.ko".into(),
            format!("--cert={}", keys.join("big-signer.crt").display()),
            format!("--work-dir={}", work.display()),
        ],
    )?;
    eprintln!("FIGURES verify-image: peak RSS {:.1} MiB", mib(vpeak));
    assert_eq!(verified, digest);
    assert!(
        vpeak < image_bytes / 4 && vpeak < 128 << 20,
        "verify peak {:.1} MiB",
        mib(vpeak)
    );

    // The pushed image is whole: the filler arrived intact and the module verifies with openssl.
    let pulled = kmm_e2e::oci::pull_files(&dst_reg.access(), &dest).await?;
    assert_eq!(pulled.digest, digest);
    assert_eq!(pulled.files["/opt/filler.bin"].len(), FILLER);
    assert!(pulled.files["/opt/filler.bin"] == filler(FILLER));
    let (body, sig) =
        kmm_e2e::kmod::split_signature(&pulled.files[&ko]).context("the module is signed")?;
    assert_eq!(body, module.as_slice());
    kmm_e2e::sim::loader::verify_signature(body, &sig.signature, &[der])
        .map_err(anyhow::Error::msg)?;

    // A limit below the layer size is a clear error naming the flag.
    let out = std::process::Command::new(&hub_bin)
        .args([
            "sign-image",
            &format!("--source={source}"),
            &format!("--dest={dest}"),
        ])
        .args([
            "--file=/opt/lib/modules/*/*.ko",
            "--sign-max-layer-bytes=64Mi",
        ])
        .arg(format!("--key={}", keys.join("big-signer.key").display()))
        .arg(format!("--cert={}", keys.join("big-signer.crt").display()))
        .arg(format!("--work-dir={}", work.display()))
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("--sign-max-layer-bytes") && stderr.contains("64 MiB"),
        "{stderr}"
    );
    src_reg.stop().await;
    dst_reg.stop().await;
    Ok(())
}

/// "Signed" is not taken from the annotation: an image that claims the MCM's certificate but
/// whose module is unsigned (someone with push rights overwrote `containerImage`) is not
/// shipped, nor re-signed by the hub (Degraded, reason SignatureInvalid); once the tag
/// holds modules really signed with that certificate (by the kernel's sign-file, not by the
/// hub), the hub verifies and ships that digest. An image over a signing limit is reported
/// with the limit (reason SignLimitExceeded).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_annotation_without_valid_signatures_is_not_shipped() -> anyhow::Result<()> {
    Fleet::builder()
        .spokes(1)
        .run(async |fleet: &mut Fleet| {
            let kernel = "6.1.0-13-amd64";
            prepare(fleet, &[&[kernel]]).await?;
            let hub = fleet.hub().client().await;
            let keys = tempfile::tempdir()?;
            let (key, cert, der) = openssl_keypair(keys.path(), "kmm-verify")?;
            put_secret(&hub, "vkey", "key", &key).await?;
            put_secret(&hub, "vcert", "cert", &cert).await?;
            let claim = BTreeMap::from([(
                shared_api::labels::SIGNED_BY_ANNOTATION.to_string(),
                hex::encode(sha2::Sha256::digest(&der)),
            )]);
            let host = fleet.registry().host();
            let reference = format!("{host}/kmm/forged:{kernel}");
            let mut forged = KmodImage::new(&[kernel], &["kmm_ci_a"]);
            forged.annotations = claim.clone();
            let forged_digest =
                push_kmod_image(&fleet.registry().access(), &reference, &forged).await?;

            let mut o = HubOptions::new(fleet.hub().kubeconfig_path(), HUB_NS);
            o.resync = Duration::from_secs(4);
            // Small enough for the image of the second MCM below, large for the others.
            o.sign.sign_max_entries = 40;
            let _hub_proc = HubProcess::start(o)?;
            let mut m = mcm(fleet, "forged", json!({}))?;
            let mapping = json!([{"regexp": "^.*$",
                "containerImage": format!("{host}/kmm/forged:${{KERNEL_FULL_VERSION}}"),
                "sign": {"keySecret": {"name": "vkey"}, "certSecret": {"name": "vcert"},
                    "unsignedImage": format!("{host}/kmm/unsigned:${{KERNEL_FULL_VERSION}}"),
                    "filesToSign": ["/opt/lib/modules/*/kmm_ci_a.ko"]}}]);
            let mut value = serde_json::to_value(&m)?;
            value["spec"]["moduleSpec"]["moduleLoader"]["container"]["kernelMappings"] = mapping;
            m = serde_json::from_value(value)?;
            apply_mcm(&hub, &m).await?;

            let (_, _, message) = eventually(
                "Degraded with reason SignatureInvalid",
                Duration::from_secs(90),
                || async {
                    let s = mcm_status(&hub, "forged").await?;
                    Ok(match condition(&s, "Degraded") {
                        Some((st, reason, msg)) if st == "True" && reason == "SignatureInvalid" => {
                            Ok((st, reason, msg))
                        }
                        other => Err(format!("{other:?}")),
                    })
                },
            )
            .await?;
            assert!(
                message.contains("kmm_ci_a.ko") && message.contains("not signed"),
                "{message}"
            );
            assert!(message.contains(&forged_digest), "{message}");
            assert!(
                works(&hub, "forged").await?.is_empty(),
                "a forged image was shipped"
            );

            // Modules really signed with the certificate (by the kernel's sign-file) ship.
            let pem_key = keys.path().join("kmm-verify.key");
            let pem_cert = keys.path().join("kmm-verify.crt");
            let mut good = KmodImage::new(&[kernel], &["kmm_ci_a"]);
            good.annotations = claim;
            good.sign = Some(kmm_e2e::oci::SignWith {
                key: pem_key,
                cert: pem_cert,
            });
            let good_digest =
                push_kmod_image(&fleet.registry().access(), &reference, &good).await?;
            eventually(
                "the verified digest is shipped",
                Duration::from_secs(90),
                || async {
                    let s = shipped(&hub, "forged").await?;
                    Ok(if s.values().flatten().any(|i| i.ends_with(&good_digest)) {
                        Ok(())
                    } else {
                        Err(format!("{s:?}"))
                    })
                },
            )
            .await?;
            let s = mcm_status(&hub, "forged").await?;
            assert_eq!(
                condition(&s, "Degraded").map(|c| c.0),
                Some("False".to_string())
            );

            // An image over a signing limit: the MCM says which limit, and nothing ships.
            let mut big = KmodImage::new(&[kernel], &["kmm_ci_a"]);
            big.firmware = (0..60)
                .map(|i| (format!("/firmware/f{i}.bin"), vec![i as u8; 16]))
                .collect();
            push_kmod_image(
                &fleet.registry().access(),
                &format!("{host}/kmm/many-src:{kernel}"),
                &big,
            )
            .await?;
            let mut value = serde_json::to_value(mcm(fleet, "many", json!({}))?)?;
            value["spec"]["moduleSpec"]["moduleLoader"]["container"]["kernelMappings"] = json!([{
                "regexp": "^.*$",
                "containerImage": format!("{host}/kmm/many:${{KERNEL_FULL_VERSION}}"),
                "sign": {"keySecret": {"name": "vkey"}, "certSecret": {"name": "vcert"},
                    "unsignedImage": format!("{host}/kmm/many-src:${{KERNEL_FULL_VERSION}}"),
                    "filesToSign": ["/opt/lib/modules/*/kmm_ci_a.ko"]}}]);
            apply_mcm(&hub, &serde_json::from_value(value)?).await?;
            let (_, _, message) = eventually(
                "Degraded with reason SignLimitExceeded",
                Duration::from_secs(90),
                || async {
                    let s = mcm_status(&hub, "many").await?;
                    Ok(match condition(&s, "Degraded") {
                        Some((st, reason, msg))
                            if st == "True" && reason == "SignLimitExceeded" =>
                        {
                            Ok((st, reason, msg))
                        }
                        other => Err(format!("{other:?}")),
                    })
                },
            )
            .await?;
            assert!(
                message.contains("--sign-max-entries = 40") && message.contains("many-src"),
                "{message}"
            );
            assert!(works(&hub, "many").await?.is_empty());
            Ok(())
        })
        .await
}
