//! Live permissions: clients with a ServiceAccount's token, and access reviews.

use std::path::Path;

use anyhow::{bail, ensure};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::ServiceAccount;
use kmm_e2e::cluster::Cluster;
use kmm_e2e::testkit::ensure_namespace;
use kube::Client;
use kube::api::{Api, PostParams};
use serde_json::json;

/// A kubeconfig for `cluster` that authenticates with a bearer token.
pub(crate) fn token_kubeconfig(cluster: &Cluster, token: &str, path: &Path) -> anyhow::Result<()> {
    use base64::Engine as _;
    let ca = base64::engine::general_purpose::STANDARD.encode(cluster.ca_pem());
    let doc = json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": cluster.server_url(), "certificate-authority-data": ca}}],
        "users": [{"name": "u", "user": {"token": token}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "c",
    });
    std::fs::write(path, serde_yaml::to_string(&doc)?)?;
    Ok(())
}

/// Ask the server, by SubjectAccessReview, what service account `ns/sa` may do, and fail
/// with every answer that differs. A question reads like `kubectl auth can-i`, prefixed with
/// the expected answer: `yes|no <verb> <resource>[.<group>][/<subresource>] [<name>] [-n <ns>]`.
pub(crate) async fn check_access(
    admin: &Client,
    (ns, sa): (&str, &str),
    questions: &[&str],
) -> anyhow::Result<()> {
    let api: Api<SubjectAccessReview> = Api::all(admin.clone());
    let mut wrong = Vec::new();
    for q in questions {
        let words: Vec<&str> = q.split_whitespace().collect();
        let (want, verb, target) = match words[..] {
            [want, verb, target, ..] => (want == "yes", verb, target),
            _ => bail!("bad question {q:?}"),
        };
        let mut rest = &words[3..];
        let mut namespace = None;
        if let Some(i) = rest.iter().position(|w| *w == "-n") {
            namespace = rest.get(i + 1).map(|n| n.to_string());
            rest = &rest[..i];
        }
        let name = rest.first().map(|n| n.to_string());
        let (target, subresource) = match target.split_once('/') {
            Some((t, sub)) => (t, Some(sub.to_string())),
            None => (target, None),
        };
        let (resource, group) = target.split_once('.').unwrap_or((target, ""));
        let sar = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(format!("system:serviceaccount:{ns}:{sa}")),
                groups: Some(vec![
                    "system:serviceaccounts".into(),
                    format!("system:serviceaccounts:{ns}"),
                    "system:authenticated".into(),
                ]),
                resource_attributes: Some(ResourceAttributes {
                    verb: Some(verb.into()),
                    group: Some(group.into()),
                    resource: Some(resource.into()),
                    subresource,
                    namespace,
                    name,
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let allowed = api
            .create(&PostParams::default(), &sar)
            .await?
            .status
            .is_some_and(|s| s.allowed);
        if allowed != want {
            wrong.push(format!(
                "{q}: the server says {}",
                if allowed { "yes" } else { "no" }
            ));
        }
    }
    ensure!(wrong.is_empty(), "{ns}/{sa}:\n{}", wrong.join("\n"));
    Ok(())
}

/// A service account (and its namespace), waiting for its token.
pub(crate) async fn service_account(
    cluster: &Cluster,
    ns: &str,
    name: &str,
) -> anyhow::Result<String> {
    let admin = cluster.client().await;
    ensure_namespace(&admin, ns).await?;
    let sa: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": name, "namespace": ns}}))?;
    match Api::<ServiceAccount>::namespaced(admin, ns)
        .create(&PostParams::default(), &sa)
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => return Err(e.into()),
    }
    cluster.service_account_token(ns, name).await
}
