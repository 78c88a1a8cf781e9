//! Registry credentials and tags: clients kept apart per credential, a rotated pull secret,
//! a moved signed tag, an empty kernel claim.

use std::time::Duration;

use anyhow::Context as _;
use kmm_e2e::fleet::{Fleet, spoke_name};
use kmm_e2e::oci::{KmodImage, push_kmod_image};
use kmm_e2e::testkit::{ensure_namespace, eventually};
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use shared_api::ocm::KERNEL_VERSIONS_CLAIM;
use shared_api::{ManagedCluster, ManagedClusterModule};

use crate::builds::{openssl_keypair, put_secret, shipped};
use crate::setup::{apply_mcm, condition, mcm_status, start_hub};
use crate::{HUB_NS, PULL_SECRET, SPOKE_NS};

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
