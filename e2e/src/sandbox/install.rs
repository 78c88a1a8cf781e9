//! Installing kmm-fleet into the local fleet from the shipped manifests: namespaces and RBAC
//! of manifests/hub and manifests/spoke, the hub's configuration, the admission webhook
//! (registered by URL on loopback), a read-only dashboard viewer, and kubeconfigs that
//! authenticate with ServiceAccount tokens.

use std::path::Path;

use anyhow::{Context as _, ensure};
use kube::Client;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::GroupVersionKind;
use kube::discovery::Scope;
use serde::Deserialize as _;
use serde_json::{Value, json};

use crate::cluster::Cluster;

pub const MANAGER: &str = "kmm-sandbox";

pub const HUB_NAMESPACE_YAML: &str = include_str!("../../../manifests/hub/namespace.yaml");
pub const HUB_RBAC_YAML: &str = include_str!("../../../manifests/hub/rbac.yaml");
pub const HUB_CONFIG_YAML: &str = include_str!("../../../manifests/hub/config.yaml");
pub const HUB_WEBHOOK_YAML: &str = include_str!("../../../manifests/hub/webhook.yaml");
/// manifests/hub-builds: the build namespace and the hub's Role there.
pub const HUB_BUILDS_YAMLS: [&str; 2] = [
    include_str!("../../../manifests/hub-builds/namespace.yaml"),
    include_str!("../../../manifests/hub-builds/rbac.yaml"),
];
pub const SPOKE_NAMESPACE_YAML: &str = include_str!("../../../manifests/spoke/namespace.yaml");
pub const SPOKE_RBAC_YAML: &str = include_str!("../../../manifests/spoke/rbac.yaml");
pub const SPOKE_WORK_AGENT_RBAC_YAML: &str =
    include_str!("../../../manifests/spoke/work-agent-rbac.yaml");
/// manifests/policy: the Policy that installs the spoke agent, its Placement and namespace.
pub const POLICY_YAMLS: [&str; 3] = [
    include_str!("../../../manifests/policy/namespace.yaml"),
    include_str!("../../../manifests/policy/policy.yaml"),
    include_str!("../../../manifests/policy/placement.yaml"),
];
pub const POLICY_NAMESPACE: &str = "kmm-policies";
pub const POLICY_NAME: &str = "install-kmm-spoke";

/// The hub's namespace and ServiceAccount (manifests/hub).
pub const HUB_NAMESPACE: &str = "kmm-hub";
pub const HUB_SERVICE_ACCOUNT: &str = "kmm-hub";
/// Where the hub's build Jobs run (manifests/hub-builds, `buildNamespace`).
pub const BUILD_NAMESPACE: &str = "kmm-hub-builds";
/// The spoke agent's namespace and ServiceAccount (manifests/spoke).
pub const SPOKE_NAMESPACE: &str = "kmm-spoke";
pub const SPOKE_SERVICE_ACCOUNT: &str = "kmm-spoke";
/// The dashboard's read-only viewer (docs/dashboard.md, "RBAC for a viewer").
pub const VIEWER_SERVICE_ACCOUNT: &str = "dashboard-viewer";

/// Every non-empty document of a multi-document YAML text.
pub fn yaml_docs(text: &str) -> anyhow::Result<Vec<Value>> {
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(text) {
        let v = Value::deserialize(doc)?;
        if !v.is_null() {
            docs.push(v);
        }
    }
    Ok(docs)
}

fn s<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

/// `Kind namespace/name`, for messages.
pub fn ident(v: &Value) -> String {
    let ns = s(v, "/metadata/namespace");
    let ns = if ns.is_empty() {
        String::new()
    } else {
        format!("{ns}/")
    };
    format!("{} {ns}{}", s(v, "/kind"), s(v, "/metadata/name"))
}

/// Server-side apply of one object of any kind (field manager `kmm-sandbox`).
pub async fn apply(client: &Client, doc: &Value) -> anyhow::Result<()> {
    let api_version = s(doc, "/apiVersion");
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    let gvk = GroupVersionKind::gvk(group, version, s(doc, "/kind"));
    let (resource, caps) = kube::discovery::pinned_kind(client, &gvk)
        .await
        .with_context(|| format!("discovering {}", ident(doc)))?;
    let api: Api<DynamicObject> = if caps.scope == Scope::Namespaced {
        let ns = s(doc, "/metadata/namespace");
        let ns = if ns.is_empty() { "default" } else { ns };
        Api::namespaced_with(client.clone(), ns, &resource)
    } else {
        Api::all_with(client.clone(), &resource)
    };
    api.patch(
        s(doc, "/metadata/name"),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(doc),
    )
    .await
    .with_context(|| format!("applying {}", ident(doc)))?;
    Ok(())
}

/// Apply every document of `yaml`.
pub async fn apply_yaml(client: &Client, yaml: &str) -> anyhow::Result<usize> {
    let docs = yaml_docs(yaml)?;
    for d in &docs {
        apply(client, d).await?;
    }
    Ok(docs.len())
}

/// The hub's namespace and RBAC, its build namespace, and the dashboard viewer.
pub async fn install_hub_rbac(hub: &Client) -> anyhow::Result<usize> {
    let mut n = apply_yaml(hub, HUB_NAMESPACE_YAML).await?;
    n += apply_yaml(hub, HUB_RBAC_YAML).await?;
    for yaml in HUB_BUILDS_YAMLS {
        n += apply_yaml(hub, yaml).await?;
    }
    for doc in viewer_rbac() {
        apply(hub, &doc).await?;
        n += 1;
    }
    Ok(n)
}

/// The spoke agent's namespace and RBAC, and the work agent's grant on Modules.
pub async fn install_spoke_rbac(spoke: &Client) -> anyhow::Result<usize> {
    let mut n = apply_yaml(spoke, SPOKE_NAMESPACE_YAML).await?;
    n += apply_yaml(spoke, SPOKE_RBAC_YAML).await?;
    n += apply_yaml(spoke, SPOKE_WORK_AGENT_RBAC_YAML).await?;
    Ok(n)
}

/// Rolls the spoke agent's objects out as a platform team does: manifests/policy applied on
/// the hub, and OCM's policy propagator, Placement and configuration policy controller put
/// the namespace, ServiceAccount, RBAC (also the work agent's grant on Modules) and the
/// Deployment on every spoke. Waits until the root Policy reports each spoke Compliant and
/// the ServiceAccount is there; returns the number of objects applied on the hub.
pub async fn roll_out_spoke_policy(
    hub: &Client,
    spokes: &[(String, Client)],
    timeout: std::time::Duration,
) -> anyhow::Result<usize> {
    let mut n = 0;
    for yaml in POLICY_YAMLS {
        n += apply_yaml(hub, yaml).await?;
    }
    let policy_ar = kube::discovery::ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("policy.open-cluster-management.io", "v1", "Policy"),
        "policies",
    );
    let policies: Api<DynamicObject> =
        Api::namespaced_with(hub.clone(), POLICY_NAMESPACE, &policy_ar);
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let status = policies
            .get_opt(POLICY_NAME)
            .await?
            .map(|p| p.data["status"]["status"].clone())
            .unwrap_or(Value::Null);
        let mut waiting = Vec::new();
        for (name, client) in spokes {
            let compliant = status.as_array().is_some_and(|cs| {
                cs.iter()
                    .any(|c| c["clustername"] == name.as_str() && c["compliant"] == "Compliant")
            });
            let sa = Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(
                client.clone(),
                SPOKE_NAMESPACE,
            )
            .get_opt(SPOKE_SERVICE_ACCOUNT)
            .await
            .ok()
            .flatten()
            .is_some();
            if !(compliant && sa) {
                waiting.push(format!(
                    "{name} (Compliant: {compliant}, ServiceAccount: {sa})"
                ));
            }
        }
        if waiting.is_empty() {
            return Ok(n);
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "the Policy {POLICY_NAMESPACE}/{POLICY_NAME} did not reach every spoke in {timeout:?}: \
             waiting for {}; root Policy status {status}",
            waiting.join(", ")
        );
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

fn viewer_rbac() -> Vec<Value> {
    vec![
        json!({"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": VIEWER_SERVICE_ACCOUNT, "namespace": HUB_NAMESPACE}}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": "kmm-dashboard-viewer"},
            // The dashboard shows MCMs to whoever may list them, and clusters to whoever may
            // list ManagedClusters too.
            "rules": [{"apiGroups": ["hub.kmm.sigs.x-k8s.io"], "resources": ["managedclustermodules"], "verbs": ["get", "list", "watch"]},
                      {"apiGroups": ["cluster.open-cluster-management.io"], "resources": ["managedclusters"], "verbs": ["list"]}]}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": "kmm-dashboard-viewer"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "kmm-dashboard-viewer"},
            "subjects": [{"kind": "ServiceAccount", "name": VIEWER_SERVICE_ACCOUNT, "namespace": HUB_NAMESPACE}]}),
    ]
}

/// The hub's configuration file: the shipped ConfigMap's `config.yaml`, with a Driver
/// Toolkit row for the simulated builds (the shipped table is empty).
pub fn hub_config() -> anyhow::Result<String> {
    let cm: Value =
        serde_yaml::from_str(HUB_CONFIG_YAML).context("parsing manifests/hub/config.yaml")?;
    let text = s(&cm, "/data/config.yaml");
    ensure!(
        !text.is_empty(),
        "manifests/hub/config.yaml has no data.config.yaml"
    );
    let mut config: Value = serde_yaml::from_str(text).context("parsing the hub configuration")?;
    config["driverToolkit"] =
        json!([{"kernel": ".*", "image": "public.sim.kmm-fleet.io/driver-toolkit:latest"}]);
    Ok(serde_yaml::to_string(&config)?)
}

/// Register the hub's webhook (manifests/hub/webhook.yaml) by URL on loopback.
pub async fn register_webhook(hub: &Client, url: &str, ca_pem: &str) -> anyhow::Result<()> {
    use base64::Engine as _;
    let mut vwc: Value =
        serde_yaml::from_str(HUB_WEBHOOK_YAML).context("parsing manifests/hub/webhook.yaml")?;
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    // Each webhook keeps its own path (MCMs, FleetPreflightValidations).
    for hook in vwc["webhooks"].as_array_mut().into_iter().flatten() {
        let path = s(hook, "/clientConfig/service/path").to_string();
        hook["clientConfig"] = json!({"url": format!("{url}{path}"), "caBundle": ca});
    }
    apply(hub, &vwc).await
}

/// A kubeconfig for `cluster` that authenticates with a bearer token.
pub fn token_kubeconfig(cluster: &Cluster, token: &str, path: &Path) -> anyhow::Result<()> {
    use base64::Engine as _;
    let ca = base64::engine::general_purpose::STANDARD.encode(cluster.ca_pem());
    let doc = json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": cluster.name(), "cluster": {"server": cluster.server_url(), "certificate-authority-data": ca}}],
        "users": [{"name": "token", "user": {"token": token}}],
        "contexts": [{"name": cluster.name(), "context": {"cluster": cluster.name(), "user": "token"}}],
        "current-context": cluster.name(),
    });
    write_private(path, &serde_yaml::to_string(&doc)?)
}

/// One kubeconfig with a context per cluster (admin credentials), named like the clusters.
pub fn merged_kubeconfig<'a>(
    clusters: impl Iterator<Item = &'a Cluster>,
    path: &Path,
) -> anyhow::Result<()> {
    let (mut cs, mut us, mut xs) = (Vec::new(), Vec::new(), Vec::new());
    let mut first = None;
    for c in clusters {
        let text = std::fs::read_to_string(c.kubeconfig_path())
            .with_context(|| format!("reading {}", c.kubeconfig_path().display()))?;
        let kc: Value = serde_yaml::from_str(&text)?;
        cs.extend(kc["clusters"].as_array().cloned().unwrap_or_default());
        us.extend(kc["users"].as_array().cloned().unwrap_or_default());
        xs.extend(kc["contexts"].as_array().cloned().unwrap_or_default());
        first.get_or_insert_with(|| c.name().to_string());
    }
    let doc = json!({"apiVersion": "v1", "kind": "Config", "clusters": cs, "users": us, "contexts": xs,
        "current-context": first.unwrap_or_default()});
    write_private(path, &serde_yaml::to_string(&doc)?)
}

pub fn write_private(path: &Path, content: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::write(path, content).with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod {}", path.display()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn shipped_manifests_parse() {
        assert!(yaml_docs(HUB_RBAC_YAML).unwrap().len() >= 4);
        assert!(yaml_docs(SPOKE_RBAC_YAML).unwrap().len() >= 4);
        let c = hub_config().unwrap();
        kmm_hub::config::HubConfig::parse(&c).unwrap();
    }
}
