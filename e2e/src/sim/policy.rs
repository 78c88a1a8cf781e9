//! The one part of OCM's policy framework the test world simulates: the policy framework
//! addon's spec, template and status synchronisation between the hub and a spoke. Its Go
//! module (`open-cluster-management.io/governance-policy-framework-addon`) is refused by the Go
//! module proxy at every version (403 "This module version is not available"), so it cannot be
//! built here. Everything around it is real: the policy propagator on the hub replicates root
//! Policies into cluster namespaces through the real Placement, and the real
//! configuration policy controller on the spoke enforces the ConfigurationPolicies this
//! simulator creates and reports their compliance.
//!
//! What it does, per spoke, every [`SYNC`]:
//! - spec sync: every Policy in the hub namespace named like the cluster (the propagator's
//!   replicated policies) is server-side applied into the namespace of the same name on the
//!   spoke; spoke Policies the hub no longer has are deleted;
//! - template sync: every `policy-templates[].objectDefinition` of a spoke Policy is applied in
//!   that namespace, owned by the spoke Policy, with the Policy's `remediationAction` (when set)
//!   overriding the template's, as the addon does;
//! - status sync: each template's `status.compliant` (and its latest message) is written to
//!   the replicated Policy's status on the hub (`compliant`, `details`); the propagator rolls
//!   it up into the root Policy.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::api::{
    ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams,
};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};

/// How often the hub and the spoke are compared.
pub const SYNC: Duration = Duration::from_secs(2);
const FIELD_MANAGER: &str = "governance-policy-framework-addon";
const GROUP: &str = "policy.open-cluster-management.io";

fn resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(GROUP, "v1", kind), plural)
}

/// The policy framework addon of one spoke.
pub struct PolicyFrameworkSim {
    task: tokio::task::JoinHandle<()>,
    logs: Arc<Mutex<Vec<String>>>,
}

impl std::fmt::Debug for PolicyFrameworkSim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyFrameworkSim").finish_non_exhaustive()
    }
}

impl PolicyFrameworkSim {
    pub fn start(hub: Client, spoke: Client, cluster: &str) -> Self {
        let logs = Arc::new(Mutex::new(Vec::new()));
        let task = {
            let (cluster, logs) = (cluster.to_string(), logs.clone());
            tokio::spawn(async move {
                let mut said = String::new();
                loop {
                    let line = match sync_once(&hub, &spoke, &cluster).await {
                        Ok(()) => String::new(),
                        Err(e) => format!("{cluster}: policy sync: {e:#}"),
                    };
                    if line != said && !line.is_empty() {
                        tracing::info!("{line}");
                        logs.lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(line.clone());
                    }
                    said = line;
                    tokio::time::sleep(SYNC).await;
                }
            })
        };
        Self { task, logs }
    }

    /// What went wrong, once per distinct failure.
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

async fn sync_once(hub: &Client, spoke: &Client, cluster: &str) -> anyhow::Result<()> {
    let policy = resource("Policy", "policies");
    let hub_policies: Api<DynamicObject> = Api::namespaced_with(hub.clone(), cluster, &policy);
    let spoke_policies: Api<DynamicObject> = Api::namespaced_with(spoke.clone(), cluster, &policy);
    let wanted = hub_policies.list(&ListParams::default()).await?.items;
    let apply = PatchParams::apply(FIELD_MANAGER).force();

    // Spec sync.
    for p in &wanted {
        let name = p.name_any();
        let copy = json!({
            "apiVersion": format!("{GROUP}/v1"), "kind": "Policy",
            "metadata": {"name": name, "namespace": cluster, "labels": p.labels()},
            "spec": p.data.get("spec").cloned().unwrap_or(Value::Null),
        });
        spoke_policies
            .patch(&name, &apply, &Patch::Apply(&copy))
            .await?;
    }
    for p in spoke_policies.list(&ListParams::default()).await?.items {
        if !wanted.iter().any(|w| w.name_any() == p.name_any()) {
            spoke_policies
                .delete(&p.name_any(), &DeleteParams::background())
                .await?;
        }
    }

    // Template sync, then status sync.
    for hub_policy in &wanted {
        let name = hub_policy.name_any();
        let Some(spoke_policy) = spoke_policies.get_opt(&name).await? else {
            continue;
        };
        let owner = json!({
            "apiVersion": format!("{GROUP}/v1"), "kind": "Policy", "name": name,
            "uid": spoke_policy.uid().unwrap_or_default(),
            "blockOwnerDeletion": false, "controller": true,
        });
        let remediation = hub_policy.data["spec"]["remediationAction"].as_str();
        let mut details = Vec::new();
        let templates = hub_policy.data["spec"]["policy-templates"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for t in templates {
            let mut def = t["objectDefinition"].clone();
            let (Some(api_version), Some(kind), Some(tname)) = (
                def["apiVersion"].as_str().map(str::to_string),
                def["kind"].as_str().map(str::to_string),
                def["metadata"]["name"].as_str().map(str::to_string),
            ) else {
                continue;
            };
            let Some((group, version)) = api_version.split_once('/') else {
                continue;
            };
            def["metadata"]["namespace"] = json!(cluster);
            def["metadata"]["ownerReferences"] = json!([owner]);
            if let Some(action) = remediation
                && def["spec"].is_object()
            {
                def["spec"]["remediationAction"] = json!(action);
            }
            let lower = kind.to_lowercase();
            let plural = match lower.strip_suffix('y') {
                Some(stem) => format!("{stem}ies"),
                None => format!("{lower}s"),
            };
            let ar = ApiResource::from_gvk_with_plural(
                &GroupVersionKind::gvk(group, version, &kind),
                &plural,
            );
            let api: Api<DynamicObject> = Api::namespaced_with(spoke.clone(), cluster, &ar);
            api.patch(&tname, &apply, &Patch::Apply(&def)).await?;
            let live = api.get_opt(&tname).await?;
            let status = live.as_ref().map(|o| o.data["status"].clone());
            let compliant = status
                .as_ref()
                .and_then(|s| s["compliant"].as_str())
                .unwrap_or("Pending")
                .to_string();
            let message = status
                .as_ref()
                .and_then(|s| s["compliancyDetails"].as_array())
                .map(|d| {
                    d.iter()
                        .flat_map(|c| c["conditions"].as_array().cloned().unwrap_or_default())
                        .filter_map(|c| c["message"].as_str().map(str::to_string))
                        .collect::<Vec<_>>()
                        .join("; ")
                })
                .unwrap_or_default();
            details.push(json!({
                "compliant": compliant,
                "templateMeta": {"name": tname},
                "history": [{"message": format!("{compliant}; {message}"), "eventName": format!("{cluster}.{name}")}],
            }));
        }
        let overall = if details.is_empty() {
            "Pending"
        } else if details.iter().any(|d| d["compliant"] == "NonCompliant") {
            "NonCompliant"
        } else if details.iter().all(|d| d["compliant"] == "Compliant") {
            "Compliant"
        } else {
            "Pending"
        };
        let status = json!({"status": {"compliant": overall, "details": details}});
        if hub_policy.data["status"]["compliant"] != json!(overall)
            || hub_policy.data["status"]["details"] != status["status"]["details"]
        {
            hub_policies
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                .await?;
            let _ = spoke_policies
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                .await;
        }
    }
    Ok(())
}
