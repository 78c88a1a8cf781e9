//! Rollout over spokes, relabelling and deletion, registry outages, missing images and
//! restarts, and the webhook's field paths.

use std::time::Duration;

use anyhow::Context as _;
use kmm_e2e::fleet::{Fleet, spoke_name, worker_node};
use kmm_e2e::oci::{KmodImage, push_kmod_image};
use kmm_e2e::testkit::{HubOptions, HubProcess, ensure_namespace, eventually};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;
use shared_api::{ManagedCluster, ManagedClusterModule, Module};

use crate::setup::{
    apply_mcm, condition, image, mcm, mcm_status, prepare, push, start_hub, work_images, works,
};
use crate::{HUB_NS, SPOKE_NS};

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
                .metric("kmm_hub_reconcile_total{controller=\"mcm\"}")
                .await?;
            tokio::time::sleep(Duration::from_secs(8)).await; // more than two resync periods
            assert!(
                hub_proc
                    .metric("kmm_hub_reconcile_total{controller=\"mcm\"}")
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
