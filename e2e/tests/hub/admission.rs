//! Admission: who may name which Secret in an MCM.

use std::time::Duration;

use anyhow::Context as _;
use kmm_e2e::fleet::Fleet;
use kmm_e2e::testkit::{HubOptions, HubProcess, eventually};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use shared_api::ManagedClusterModule;

use crate::builds::put_secret;
use crate::setup::{mcm, prepare};
use crate::{HUB_NS, PULL_SECRET};

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
    for hook in vwc["webhooks"].as_array_mut().into_iter().flatten() {
        let path = hook["clientConfig"]["service"]["path"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        hook["clientConfig"] =
            json!({"url": format!("https://127.0.0.1:{port}{path}"), "caBundle": b64});
    }
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

            // A FleetPreflightValidation goes to its own webhook, which admits a valid one;
            // a kernel that is not one is refused with its field path.
            let fpvs: Api<shared_api::FleetPreflightValidation> = Api::all(hub.clone());
            let fpv = |kernel: &str| -> anyhow::Result<shared_api::FleetPreflightValidation> {
                Ok(serde_json::from_value(json!({
                    "apiVersion": "hub.kmm.sigs.x-k8s.io/v1beta1", "kind": "FleetPreflightValidation",
                    "metadata": {"name": "next-kernel"},
                    "spec": {"kernelVersions": ["6.1.0-13-amd64", kernel]}}))?)
            };
            fpvs.create(&PostParams::default(), &fpv("5.14.0-570.el9.x86_64")?)
                .await
                .context("a valid FleetPreflightValidation")?;
            let refused = fpvs
                .patch("next-kernel", &pp, &Patch::Merge(json!({"spec": {"kernelVersions": ["6.1.0-13-amd64", "6.1"]}})))
                .await;
            assert!(
                matches!(&refused, Err(kube::Error::Api(e)) if e.message.contains("spec.kernelVersions[1]")),
                "{refused:?}"
            );
            hub_proc.stop().await;
            Ok(())
        })
        .await
}
