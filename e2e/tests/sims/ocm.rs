//! The real OCM agents: registration, claims, ManifestWorks and their status.

use anyhow::{Context as _, bail, ensure};
use k8s_openapi::api::core::v1::ConfigMap;
use kmm_e2e::fleet::Fleet;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;
use shared_api::ocm::{ClusterClaim, ManagedCluster, ManifestWork};

use kmm_e2e::testkit::ensure_namespace;

use crate::{K1, K2, eventually};

/// (c) The OCM agents: a ManifestWork is applied to its spoke with conditions and
/// feedback; removals and deletion clean up; spoke ClusterClaims reach the hub.
pub(crate) async fn ocm_agents(fleet: &Fleet) -> anyhow::Result<()> {
    let hub = fleet.hub().client().await;
    let spoke = fleet.spoke(1).client().await;
    ensure_namespace(&spoke, "sim-ocm").await?;
    let works: Api<ManifestWork> = Api::namespaced(hub.clone(), "spoke-1");
    let module = json!({
        "apiVersion": "kmm.sigs.x-k8s.io/v1beta1", "kind": "Module",
        "metadata": {"name": "sim-mod", "namespace": "sim-ocm"},
        "spec": {"selector": {}, "moduleLoader": {"container": {
            "modprobe": {"moduleName": "sim_mod"},
            "kernelMappings": [{"literal": K1, "containerImage": "127.0.0.1:1/sim:1"}],
        }}},
    });
    let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "sim-cm", "namespace": "sim-ocm"}, "data": {"k": "v1"}});
    let feedback = |name: &str, resource: &str, group: &str, paths: &[(&str, &str)]| {
        json!({"resourceIdentifier": {"group": group, "resource": resource, "name": name, "namespace": "sim-ocm"},
               "feedbackRules": [{"type": "JSONPaths", "jsonPaths": paths.iter().map(|(n, p)| json!({"name": n, "path": p})).collect::<Vec<_>>()}]})
    };
    let work: ManifestWork = serde_json::from_value(json!({
        "apiVersion": "work.open-cluster-management.io/v1", "kind": "ManifestWork",
        "metadata": {"name": "sim-work", "namespace": "spoke-1"},
        "spec": {
            "workload": {"manifests": [module, cm]},
            "manifestConfigs": [
                feedback("sim-mod", "modules", "kmm.sigs.x-k8s.io", &[("moduleLoader.availableNumber", ".status.moduleLoader.availableNumber")]),
                feedback("sim-cm", "configmaps", "", &[("k", ".data.k")]),
            ],
        },
    }))?;
    works.create(&PostParams::default(), &work).await?;
    let modules: Api<shared_api::Module> = Api::namespaced(spoke.clone(), "sim-ocm");
    let cms: Api<ConfigMap> = Api::namespaced(spoke.clone(), "sim-ocm");
    eventually(
        "work applied and available, objects on the spoke, string feedback",
        || async {
            let w = works.get("sim-work").await?;
            let st = w.status.clone().unwrap_or_default();
            let cm_value = st.resource_status.as_ref().and_then(|r| {
                r.manifests.iter().find_map(|m| {
                    m.status_feedback
                        .as_ref()?
                        .values
                        .iter()
                        .find(|v| v.name == "k")?
                        .field_value
                        .string
                        .clone()
                })
            });
            let on_spoke = modules.get_opt("sim-mod").await?.is_some()
                && cms.get_opt("sim-cm").await?.is_some();
            let fin = w
                .finalizers()
                .iter()
                .any(|f| f == kmm_e2e::ocm::WORK_FINALIZER);
            Ok(
                if st.condition_true("Applied")
                    && st.condition_true("Available")
                    && on_spoke
                    && fin
                    && cm_value.as_deref() == Some("v1")
                {
                    Ok(())
                } else {
                    Err(format!(
                        "on spoke {on_spoke}, finalizer {fin}, status {st:?}"
                    ))
                },
            )
        },
    )
    .await?;
    let managed = cms
        .get("sim-cm")
        .await?
        .metadata
        .managed_fields
        .unwrap_or_default();
    ensure!(
        managed
            .iter()
            .any(|m| m.manager.as_deref() == Some("work-agent")),
        "no work-agent field manager: {managed:?}"
    );
    // Integer feedback follows the live object's status.
    modules
        .patch_status(
            "sim-mod",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"moduleLoader": {"nodesMatchingSelectorNumber": 3, "desiredNumber": 3, "availableNumber": 2}}})),
        )
        .await?;
    eventually("integer feedback from the Module status", || async {
        let st = works.get("sim-work").await?.status.unwrap_or_default();
        Ok(
            if st.feedback_integer("moduleLoader.availableNumber") == Some(2) {
                Ok(())
            } else {
                Err(format!("{st:?}"))
            },
        )
    })
    .await?;
    // OCM's own webhook refuses a work whose manifests exceed 512,000 bytes, exactly the
    // limit the hub renders against (kmm_hub::render::MAX_MANIFESTS_BYTES).
    let limit = kmm_hub::render::MAX_MANIFESTS_BYTES;
    let sized = |name: &str, size: usize| -> anyhow::Result<ManifestWork> {
        let mut cm = json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": "sim-ocm"}, "data": {"k": ""}});
        let base = serde_json::to_vec(&cm)?.len();
        cm["data"]["k"] = json!("x".repeat(size - base));
        ensure!(serde_json::to_vec(&cm)?.len() == size);
        Ok(serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "spoke-1"},
            "spec": {"workload": {"manifests": [cm]}},
        }))?)
    };
    // OCM counts a manifest's protobuf size (the JSON plus a tag and a 3-byte length here):
    // 511,996 JSON bytes count exactly 512,000; one more is refused.
    let at_limit = limit - 4;
    ensure!(kmm_hub::render::ocm_manifest_size(at_limit) == limit);
    match works
        .create(&PostParams::default(), &sized("sim-too-big", at_limit + 1)?)
        .await
    {
        Err(kube::Error::Api(e))
            if e.message
                .contains("manifestworkvalidators.admission.work.open-cluster-management.io")
                && e.message.contains(&format!(
                    "{} bytes which exceeds the {limit} limit",
                    limit + 1
                )) => {}
        other => bail!(
            "a work of {} JSON bytes: want OCM's webhook to refuse it, got {other:?}",
            at_limit + 1
        ),
    }
    works
        .create(&PostParams::default(), &sized("sim-at-limit", at_limit)?)
        .await
        .context("a work that counts exactly the limit must be admitted")?;
    works
        .delete("sim-at-limit", &DeleteParams::default())
        .await?;

    // A manifest into a namespace that does not exist: Applied=False on the work, and the
    // API server's reason on the manifest's own condition (the real agent keeps the work-level
    // message generic: "Failed to apply manifest work").
    let bad: ManifestWork = serde_json::from_value(json!({
        "metadata": {"name": "sim-bad", "namespace": "spoke-1"},
        "spec": {"workload": {"manifests": [{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x", "namespace": "sim-nowhere"}}]}},
    }))?;
    works.create(&PostParams::default(), &bad).await?;
    eventually("Applied=False for a missing namespace", || async {
        let st = works.get("sim-bad").await?.status.unwrap_or_default();
        let applied = st.conditions.iter().find(|c| c.type_ == "Applied");
        let manifest_applied = st
            .resource_status
            .as_ref()
            .and_then(|r| r.manifests.first())
            .and_then(|m| m.conditions.iter().find(|c| c.type_ == "Applied"));
        Ok(match (applied, manifest_applied) {
            (Some(c), Some(m))
                if c.status == "False"
                    && c.reason == "AppliedManifestWorkFailed"
                    && m.status == "False"
                    && m.message.contains("namespaces \"sim-nowhere\" not found") =>
            {
                Ok(())
            }
            _ => Err(format!("{st:?}")),
        })
    })
    .await?;
    works.delete("sim-bad", &DeleteParams::default()).await?;
    // Removing a manifest from the work deletes its object from the spoke.
    let patch =
        json!({"spec": {"workload": {"manifests": [work.spec.workload.manifests[0].0.clone()]}}});
    works
        .patch("sim-work", &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    eventually(
        "ConfigMap removed from the work is deleted on the spoke",
        || async {
            Ok(if cms.get_opt("sim-cm").await?.is_none() {
                Ok(())
            } else {
                Err("still there".to_string())
            })
        },
    )
    .await?;
    ensure!(
        modules.get_opt("sim-mod").await?.is_some(),
        "the Module must stay"
    );
    // Deleting the work deletes the Module, then the work goes (finalizer removed).
    works.delete("sim-work", &DeleteParams::default()).await?;
    eventually("work and its Module gone", || async {
        let w = works.get_opt("sim-work").await?.is_none();
        let m = modules.get_opt("sim-mod").await?.is_none();
        let bad = works.get_opt("sim-bad").await?.is_none();
        Ok(if w && m && bad {
            Ok(())
        } else {
            Err(format!(
                "work gone {w}, module gone {m}, bad work gone {bad}"
            ))
        })
    })
    .await?;
    // ClusterClaims, including the numbered overflow, reach the ManagedCluster status.
    let claims: Api<ClusterClaim> = Api::all(spoke.clone());
    let main = shared_api::ocm::KERNEL_VERSIONS_CLAIM;
    for (name, value) in [
        (main.to_string(), format!("{K1}\n{K2}")),
        (format!("{main}.1"), "7.0.0-1".to_string()),
    ] {
        let c = ClusterClaim::new(&name, shared_api::ocm::ClusterClaimSpec { value });
        claims.create(&PostParams::default(), &c).await?;
    }
    let mcs: Api<ManagedCluster> = Api::all(hub.clone());
    eventually("claims in ManagedCluster spoke-1 status", || async {
        let st = mcs.get("spoke-1").await?.status.unwrap_or_default();
        let kernels = st.kernel_versions().unwrap_or_default();
        Ok(if kernels == [K1, K2, "7.0.0-1"] {
            Ok(())
        } else {
            Err(format!("{:?}", st.cluster_claims))
        })
    })
    .await?;
    claims
        .patch(
            main,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"value": K1}})),
        )
        .await?;
    eventually("claim change reaches the hub", || async {
        let st = mcs.get("spoke-1").await?.status.unwrap_or_default();
        let kernels = st.kernel_versions().unwrap_or_default();
        Ok(if kernels == [K1, "7.0.0-1"] {
            Ok(())
        } else {
            Err(format!("{:?}", st.cluster_claims))
        })
    })
    .await?;
    Ok(())
}
