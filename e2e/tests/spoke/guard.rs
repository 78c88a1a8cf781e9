//! The spoke's admission webhook on the real API server (the namespace guard and Module
//! validation), the CRDs' CEL rules, and a Module with `build` applied directly on a spoke.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use anyhow::{Context as _, bail, ensure};
use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Namespace;
use kmm_e2e::fleet::{Fleet, worker_node};
use kmm_runtime::admin::Health;
use kmm_runtime::shutdown::CancellationToken;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::{Client, ResourceExt};
use serde::Deserialize as _;
use serde_json::{Value, json};
use shared_api::conditions::{DEGRADED, READY};
use shared_api::labels::{NAMESPACE_CONTAINS_MODULES_LABEL, ROLE_LABEL};
use shared_api::{ManagedClusterModule, Module};

use crate::setup::{RunningAgent, eventually};
use crate::{K1, ONE_FLEET_AT_A_TIME};

/// A namespace of this test (not the labs' one).
const GUARDED: &str = "guarded";

fn module(name: &str, namespace: &str, selector: Value) -> Module {
    serde_json::from_value(json!({
        "apiVersion": "kmm.sigs.x-k8s.io/v1beta1", "kind": "Module",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "selector": selector,
            "moduleLoader": {"container": {
                "modprobe": {"moduleName": "kmm_ci_a"},
                "kernelMappings": [{"regexp": "^.+$", "containerImage": "example.com/kmm/kmod:v1"}],
            }},
        },
    }))
    .unwrap()
}

/// The agent's webhook served in this process on loopback with a fresh CA, and
/// manifests/spoke/webhook.yaml's configuration pointed at it (by URL) and registered.
async fn serve_and_register_webhook(
    fleet: &Fleet,
    client: &Client,
) -> anyhow::Result<CancellationToken> {
    let ca = kmm_e2e::pki::Ca::new("spoke-webhook-ca")?;
    let serving = ca.serving_cert("kmm-spoke-webhook", &["127.0.0.1", "localhost"])?;
    let dir = fleet.dir().join("spoke-webhook");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("tls.crt"), &serving.cert_pem)?;
    std::fs::write(dir.join("tls.key"), &serving.key_pem)?;
    let port = kmm_e2e::process::free_port()?;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let state = kmm_spoke::webhook::WebhookState::new(client.clone()).await?;
    let token = CancellationToken::new();
    tokio::spawn(kmm_spoke::webhook::serve_when_certified(
        addr,
        dir.join("tls.crt"),
        dir.join("tls.key"),
        kmm_spoke::webhook::router(Arc::new(state)),
        Health::new(),
        token.clone(),
    ));
    eventually("the webhook listening", async || {
        Ok(tokio::net::TcpStream::connect(addr)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()))
    })
    .await?;

    let manifest = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../manifests/spoke/webhook.yaml"
    ))?;
    let mut vwc: Value = serde_yaml::Deserializer::from_str(&manifest)
        .map(Value::deserialize)
        .filter_map(Result::ok)
        .find(|d| d["kind"] == "ValidatingWebhookConfiguration")
        .context("no ValidatingWebhookConfiguration in manifests/spoke/webhook.yaml")?;
    let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, ca.cert_pem());
    for w in vwc["webhooks"].as_array_mut().into_iter().flatten() {
        let path = w["clientConfig"]["service"]["path"]
            .as_str()
            .context("a webhook without a path")?
            .to_string();
        w["clientConfig"] = json!({"url": format!("https://{addr}{path}"), "caBundle": b64});
    }
    let vwc: ValidatingWebhookConfiguration = serde_json::from_value(vwc)?;
    Api::<ValidatingWebhookConfiguration>::all(client.clone())
        .create(&PostParams::default(), &vwc)
        .await?;
    Ok(token)
}

/// The message of a refused write, or an error when it was admitted.
fn refusal<T>(r: Result<T, kube::Error>, what: &str) -> anyhow::Result<String> {
    match r {
        Ok(_) => bail!("{what} was admitted"),
        Err(kube::Error::Api(s)) => Ok(s.message),
        Err(e) => bail!("{what}: {e}"),
    }
}

async fn namespace_label(client: &Client, ns: &str) -> anyhow::Result<Option<String>> {
    Ok(Api::<Namespace>::all(client.clone())
        .get_opt(ns)
        .await?
        .and_then(|n| n.labels().get(NAMESPACE_CONTAINS_MODULES_LABEL).cloned()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_holding_modules_is_not_deleted_and_invalid_modules_are_refused()
-> anyhow::Result<()> {
    let _one = ONE_FLEET_AT_A_TIME.lock().await;
    Fleet::builder()
        .spoke_nodes(1, vec![worker_node("n1", K1)])
        .run(async |fleet: &mut Fleet| {
            let client = fleet.spoke(1).client().await;
            kmm_e2e::testkit::ensure_namespace(&client, GUARDED).await?;
            let modules: Api<Module> = Api::namespaced(client.clone(), GUARDED);

            // CEL alone (no webhook registered yet): the API server checks the tolerations.
            let mut bad = module("tolerating", GUARDED, json!({"guard": "none"}));
            bad.spec.tolerations = serde_json::from_value(json!([
                {"key": "k", "operator": "Exists", "effect": "NoSchedule", "tolerationSeconds": 5}
            ]))?;
            let msg = refusal(
                modules.create(&PostParams::default(), &bad).await,
                "a bad toleration",
            )?;
            ensure!(
                msg.contains("spec.tolerations[0].tolerationSeconds") && msg.contains("NoExecute"),
                "{msg}"
            );
            // And on the hub, an MCM whose name and spokeNamespace exceed 41 characters.
            let mut mcm: ManagedClusterModule = serde_json::from_value(json!({
                "apiVersion": "hub.kmm.sigs.x-k8s.io/v1beta1", "kind": "ManagedClusterModule",
                "metadata": {"name": "a".repeat(30)},
                "spec": {"spokeNamespace": "b".repeat(12), "selector": {},
                         "moduleSpec": serde_json::to_value(&module("x", "y", json!({})).spec)?},
            }))?;
            let mcms: Api<ManagedClusterModule> = Api::all(fleet.hub().client().await);
            let msg = refusal(
                mcms.create(&PostParams::default(), &mcm).await,
                "an over-long MCM",
            )?;
            ensure!(
                msg.contains("spec.spokeNamespace") && msg.contains("at most 41 characters"),
                "{msg}"
            );
            mcm.spec.spoke_namespace = "b".repeat(11);
            mcms.create(&PostParams::default(), &mcm)
                .await
                .context("41 characters are fine")?;

            let agent = RunningAgent::start(client.clone());
            let webhook = serve_and_register_webhook(fleet, &client).await?;

            // Module validation at admission, with the field path (a dry run until the
            // configuration is live, so nothing is created meanwhile).
            let long = "m".repeat(41 - GUARDED.len() + 1);
            let dry = PostParams {
                dry_run: true,
                ..Default::default()
            };
            let msg = eventually("an over-long Module refused by the webhook", async || {
                let r = modules
                    .create(&dry, &module(&long, GUARDED, json!({"guard": "none"})))
                    .await;
                Ok(match r {
                    Err(kube::Error::Api(s)) => Ok(s.message),
                    other => Err(format!("{:?}", other.map(|m| m.name_any()))),
                })
            })
            .await?;
            ensure!(
                msg.contains("metadata.name: name and namespace together must be at most 41"),
                "{msg}"
            );

            // A Module (selecting no node, so its deletion has nothing to unload): the agent
            // labels its namespace, and deleting the namespace is refused with its name.
            modules
                .create(
                    &PostParams::default(),
                    &module("guarded-a", GUARDED, json!({"guard": "none"})),
                )
                .await?;
            eventually("the namespace labelled", async || {
                let l = namespace_label(&client, GUARDED).await?;
                Ok(if l.as_deref() == Some("") {
                    Ok(())
                } else {
                    Err(format!("{l:?}"))
                })
            })
            .await?;
            let namespaces: Api<Namespace> = Api::all(client.clone());
            let msg = refusal(
                namespaces.delete(GUARDED, &DeleteParams::default()).await,
                "deleting a namespace that holds a Module",
            )?;
            ensure!(
                msg.contains("namespace guarded still holds Modules (guarded-a)"),
                "{msg}"
            );
            ensure!(
                namespaces
                    .get(GUARDED)
                    .await?
                    .metadata
                    .deletion_timestamp
                    .is_none(),
                "the namespace is not being deleted"
            );

            // Once the Module is gone (the agent released it), the label goes and so does
            // the namespace.
            modules
                .delete("guarded-a", &DeleteParams::default())
                .await?;
            eventually("the Module gone and the label removed", async || {
                let m = modules.get_opt("guarded-a").await?;
                let l = namespace_label(&client, GUARDED).await?;
                Ok(if m.is_none() && l.is_none() {
                    Ok(())
                } else {
                    Err(format!(
                        "module {:?}, label {l:?}",
                        m.map(|m| m.finalizers().to_vec())
                    ))
                })
            })
            .await?;
            namespaces
                .delete(GUARDED, &DeleteParams::default())
                .await
                .context("deleting the namespace without Modules")?;
            eventually("the namespace deleted", async || {
                Ok(match namespaces.get_opt(GUARDED).await? {
                    None => Ok(()),
                    Some(n) => Err(format!("{:?}", n.status)),
                })
            })
            .await?;
            webhook.cancel();
            agent.stop().await;
            Ok(())
        })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_that_builds_applied_on_a_spoke_points_to_the_hub() -> anyhow::Result<()> {
    let _one = ONE_FLEET_AT_A_TIME.lock().await;
    Fleet::builder()
        .spoke_nodes(1, vec![worker_node("n1", K1)])
        .run(async |fleet: &mut Fleet| {
            let client = fleet.spoke(1).client().await;
            kmm_e2e::testkit::ensure_namespace(&client, GUARDED).await?;
            let agent = RunningAgent::start(client.clone());
            let mut m = module(
                "builds",
                GUARDED,
                json!({"node-role.kubernetes.io/worker": ""}),
            );
            if let Some(l) = m.spec.module_loader.as_mut() {
                l.container.build = Some(serde_json::from_value(
                    json!({"dockerfileConfigMap": {"name": "dockerfile"}}),
                )?);
            }
            let modules: Api<Module> = Api::namespaced(client.clone(), GUARDED);
            modules.create(&PostParams::default(), &m).await?;
            let status = eventually("Ready=False BuildUnsupportedOnSpoke", async || {
                let m = modules.get("builds").await?;
                let conds = m.status.map(|s| s.conditions).unwrap_or_default();
                let find = |t: &str| conds.iter().find(|c| c.type_ == t).cloned();
                Ok(match (find(READY), find(DEGRADED)) {
                    (Some(r), Some(d))
                        if r.reason == "BuildUnsupportedOnSpoke"
                            && r.status == "False"
                            && d.reason == "BuildUnsupportedOnSpoke"
                            && d.status == "True" =>
                    {
                        Ok(r.message)
                    }
                    other => Err(format!("{other:?}")),
                })
            })
            .await?;
            ensure!(
                status.contains("ManagedClusterModule") && status.contains(K1),
                "{status}"
            );
            let loaders = Api::<DaemonSet>::namespaced(client.clone(), GUARDED)
                .list(&ListParams::default().labels(ROLE_LABEL))
                .await?;
            ensure!(
                loaders.items.is_empty(),
                "no loader DaemonSet for a kernel that needs a build: {:?}",
                loaders
                    .items
                    .iter()
                    .map(|d| d.name_any())
                    .collect::<Vec<_>>()
            );
            agent.stop().await;
            Ok(())
        })
        .await
}
