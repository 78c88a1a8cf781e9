//! Every manifest applied to live API servers with server-side dry run, Pod Security included.

use anyhow::{Context as _, bail, ensure};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kmm_e2e::fleet::Fleet;
use kmm_e2e::testkit::eventually;
use kube::Client;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use kube::discovery::Scope;
use serde_json::{Value, json};

use crate::manifests::{find, ident, kustomize, policy_objects, s};
use crate::{BUILD_NS, DEADLINE, HUB_NS, MANAGER, ONE_FLEET_AT_A_TIME, SPOKE_NS};

/// Server-side apply of one manifest; `dry_run` is `dryRun=All`.
/// The API resource of a document's kind, and whether it is namespaced.
pub(crate) async fn api_resource(
    client: &Client,
    doc: &Value,
) -> anyhow::Result<(kube::discovery::ApiResource, bool)> {
    let api_version = s(doc, "/apiVersion");
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    let gvk = GroupVersionKind::gvk(group, version, s(doc, "/kind"));
    let (resource, caps) = kube::discovery::pinned_kind(client, &gvk)
        .await
        .with_context(|| format!("discovering {}", ident(doc)))?;
    Ok((resource, caps.scope == Scope::Namespaced))
}

pub(crate) async fn apply(client: &Client, doc: &Value, dry_run: bool) -> anyhow::Result<()> {
    let (resource, namespaced) = api_resource(client, doc).await?;
    let api: Api<DynamicObject> = if namespaced {
        let ns = s(doc, "/metadata/namespace");
        ensure!(!ns.is_empty(), "{} has no namespace", ident(doc));
        Api::namespaced_with(client.clone(), ns, &resource)
    } else {
        Api::all_with(client.clone(), &resource)
    };
    let mut pp = PatchParams::apply(MANAGER).force();
    pp.dry_run = dry_run;
    api.patch(s(doc, "/metadata/name"), &pp, &Patch::Apply(doc))
        .await
        .with_context(|| {
            format!(
                "{} {}",
                if dry_run {
                    "dry-run applying"
                } else {
                    "applying"
                },
                ident(doc)
            )
        })?;
    Ok(())
}

pub(crate) async fn wait_established(client: &Client, name: &str) -> anyhow::Result<()> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    eventually(&format!("CRD {name} established"), DEADLINE, || async {
        let crd = api.get(name).await?;
        let conds = crd.status.and_then(|s| s.conditions).unwrap_or_default();
        Ok(
            if conds
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
            {
                Ok(())
            } else {
                Err(format!("{conds:?}"))
            },
        )
    })
    .await
}

/// Create the Namespaces of `docs` for real (namespaced objects cannot be dry-run into a
/// namespace that does not exist), then dry-run every document.
async fn dry_run_all(client: &Client, docs: &[Value], what: &str) -> anyhow::Result<()> {
    for d in docs.iter().filter(|d| s(d, "/kind") == "Namespace") {
        apply(client, d, false).await.context(what.to_string())?;
    }
    for d in docs {
        apply(client, d, true).await.context(what.to_string())?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_manifest_applies_with_server_side_dry_run() -> anyhow::Result<()> {
    let hub_docs = kustomize("hub")?;
    let build_docs = kustomize("hub-builds")?;
    let spoke_docs = kustomize("spoke")?;
    let policy_docs = kustomize("policy")?;
    let _one = ONE_FLEET_AT_A_TIME.lock().await;
    Fleet::builder()
        .spokes(1)
        .run(async |fleet: &mut Fleet| {
            let hub = fleet.hub().client().await;
            let spoke = fleet.spoke(1).client().await;
            dry_run_all(&hub, &hub_docs, "manifests/hub on the hub").await?;
            dry_run_all(&hub, &build_docs, "manifests/hub-builds on the hub").await?;
            dry_run_all(&spoke, &spoke_docs, "manifests/spoke on a spoke").await?;
            // The hub has OCM's and the policy framework's released CRDs.
            dry_run_all(&hub, &policy_docs, "manifests/policy on the hub").await?;
            // What the config-policy controller applies on each spoke.
            dry_run_all(
                &spoke,
                &policy_objects(&policy_docs)?,
                "the Policy's objects on a spoke",
            )
            .await?;

            // Pod Security as the namespaces declare it: each Deployment's pod passes its
            // namespace's enforced level (a dry-run create is admitted by PodSecurity), and a
            // privileged pod is refused there.
            for (client, docs, name, ns) in [
                (&hub, &hub_docs, "kmm-hub", HUB_NS),
                (&spoke, &spoke_docs, "kmm-spoke", SPOKE_NS),
            ] {
                let d = find(docs, "Deployment", name)?;
                let mut pod = json!({"apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": format!("{name}-pss"), "namespace": ns},
                    "spec": d["spec"]["template"]["spec"].clone()});
                // A dry run only validates: the ServiceAccount the Deployment names is not
                // there (admission would refuse for that before PodSecurity looks).
                if let Some(spec) = pod["spec"].as_object_mut() {
                    spec.remove("serviceAccountName");
                }
                let pods: Api<DynamicObject> = Api::namespaced_with(
                    client.clone(),
                    ns,
                    &kube::discovery::ApiResource::erase::<k8s_openapi::api::core::v1::Pod>(&()),
                );
                let dry = PostParams {
                    dry_run: true,
                    ..Default::default()
                };
                let obj: DynamicObject = serde_json::from_value(pod.clone())?;
                pods.create(&dry, &obj)
                    .await
                    .with_context(|| format!("{name}'s pod in namespace {ns} (Pod Security)"))?;
                pod["spec"]["containers"][0]["securityContext"] = json!({"privileged": true});
                let obj: DynamicObject = serde_json::from_value(pod)?;
                match pods.create(&dry, &obj).await {
                    Err(kube::Error::Api(e)) if e.message.contains("violates PodSecurity") => {}
                    other => {
                        bail!("a privileged pod in {ns}: want PodSecurity to refuse, got {other:?}")
                    }
                }
            }
            build_pod_passes_pod_security(&hub).await?;

            // Dry runs wrote nothing, and they do validate: a bad manifest is refused.
            let deployments: Api<DynamicObject> = Api::namespaced_with(
                hub.clone(),
                HUB_NS,
                &kube::discovery::ApiResource::erase::<k8s_openapi::api::apps::v1::Deployment>(&()),
            );
            ensure!(
                deployments.get_opt("kmm-hub").await?.is_none(),
                "a dry run created the hub Deployment"
            );
            let mut bad = find(&hub_docs, "Deployment", "kmm-hub")?.clone();
            bad["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] =
                json!(70000);
            let refused = apply(&hub, &bad, true).await;
            ensure!(
                refused
                    .as_ref()
                    .is_err_and(|e| format!("{e:#}").contains("containerPort")),
                "a Deployment with port 70000 was not refused: {refused:?}"
            );
            Ok(())
        })
        .await
}

/// The hub's rendered kaniko build pod, with the shipped configuration, is admitted by the
/// build namespace's Pod Security level (`baseline`); the hub's namespace (`restricted`)
/// refuses it, and the build namespace refuses a privileged variant.
async fn build_pod_passes_pod_security(hub: &Client) -> anyhow::Result<()> {
    let docs = kustomize("hub")?;
    let config = kmm_hub::config::HubConfig::parse(s(
        find(&docs, "ConfigMap", "kmm-hub-config")?,
        "/data/config.yaml",
    ))
    .and_then(|c| c.resolve(HUB_NS))
    .map_err(anyhow::Error::msg)?;
    ensure!(
        config.build_namespace == BUILD_NS,
        "the shipped buildNamespace is {:?}, manifests/hub-builds makes {BUILD_NS}",
        config.build_namespace
    );
    let build: shared_api::module::Build = serde_json::from_value(json!({
        "dockerfileConfigMap": {"name": "df"}, "secrets": [{"name": "git"}]}))?;
    let job =
        kmm_hub::render::build_job::render_build_job(&kmm_hub::render::build_job::BuildInputs {
            mcm: "m",
            namespace: BUILD_NS,
            image: "registry.example.com/m:6.1",
            kernel: "6.1",
            mod_name: "m",
            mod_namespace: "ns",
            build: &build,
            dockerfile: "FROM x",
            registry_tls: Default::default(),
            registry_secret: true,
            kaniko_image: &config.kaniko_image,
            dtk_image: None,
            attempt: 1,
            resources: &config.build_resources,
            deadline: config.build_deadline,
            extra_args: Default::default(),
        });
    let template = job.spec.context("no Job spec")?.template;
    let pod = |ns: &str| {
        json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "kaniko-pss", "namespace": ns},
            "spec": serde_json::to_value(&template.spec).unwrap_or_default()})
    };
    let dry = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let pods = |ns: &str| -> Api<DynamicObject> {
        Api::namespaced_with(
            hub.clone(),
            ns,
            &kube::discovery::ApiResource::erase::<k8s_openapi::api::core::v1::Pod>(&()),
        )
    };
    pods(BUILD_NS)
        .create(&dry, &serde_json::from_value(pod(BUILD_NS))?)
        .await
        .context("the kaniko build pod in the build namespace (Pod Security)")?;
    match pods(HUB_NS)
        .create(&dry, &serde_json::from_value(pod(HUB_NS))?)
        .await
    {
        Err(kube::Error::Api(e)) if e.message.contains("violates PodSecurity") => {}
        other => bail!("a root kaniko pod in {HUB_NS}: want PodSecurity to refuse, got {other:?}"),
    }
    let mut privileged = pod(BUILD_NS);
    privileged["spec"]["containers"][0]["securityContext"] = json!({"privileged": true});
    match pods(BUILD_NS)
        .create(&dry, &serde_json::from_value(privileged)?)
        .await
    {
        Err(kube::Error::Api(e)) if e.message.contains("violates PodSecurity") => Ok(()),
        other => bail!("a privileged pod in {BUILD_NS}: want PodSecurity to refuse, got {other:?}"),
    }
}
