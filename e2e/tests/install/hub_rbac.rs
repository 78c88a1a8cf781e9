//! The hub under its own RBAC: installed from manifests/hub, running with its token.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::events::v1::Event;
use kmm_e2e::fleet::{Fleet, spoke_name, worker_node};
use kmm_e2e::oci::{KmodImage, push_kmod_image};
use kmm_e2e::testkit::{HubOptions, HubProcess, eventually, mcm_status};
use kube::api::{Api, DeleteParams, ListParams};
use kube::{Client, ResourceExt as _};
use serde_json::{Value, json};
use shared_api::ManagedClusterModule;
use shared_api::labels::MCM_OWNER_LABEL;
use shared_api::ocm::{KERNEL_VERSIONS_CLAIM, ManifestWork};

use crate::access::{check_access, token_kubeconfig};
use crate::dry_run::apply;
use crate::manifests::{all_manifest_docs, find, kustomize, s};
use crate::rbac::{executor_user, rbac_matches_what_the_binary_asked};
use crate::spoke_agent::http_status;
use crate::{DEADLINE, HUB_NS, HUB_SA, K1, MODULE_NS, ONE_FLEET_AT_A_TIME};

async fn http_get_bearer(addr: &str, path: &str, token: &str) -> anyhow::Result<u16> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let req = format!(
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buf)).await??;
    let text = String::from_utf8_lossy(&buf);
    text.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no HTTP status in {text:?}"))
}

async fn put(client: &Client, doc: Value) -> anyhow::Result<()> {
    apply(client, &doc, false).await
}

fn mcm(name: &str, mapping: Value) -> Value {
    json!({
        "apiVersion": "hub.kmm.sigs.x-k8s.io/v1beta1", "kind": "ManagedClusterModule",
        "metadata": {"name": name},
        "spec": {"spokeNamespace": MODULE_NS, "selector": {},
            "moduleSpec": {"selector": {"node-role.kubernetes.io/worker": ""},
                "imageRepoSecret": {"name": "registry-pull"},
                "moduleLoader": {"container": {"modprobe": {"moduleName": "kmm_ci_a"}, "kernelMappings": [mapping]}}}}
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hub_runs_under_its_own_rbac() -> anyhow::Result<()> {
    let mut docs = kustomize("hub")?;
    docs.extend(kustomize("hub-builds")?);
    let _one = ONE_FLEET_AT_A_TIME.lock().await;
    Fleet::builder()
        .spokes(1)
        .nodes_with(|_, spoke| vec![worker_node(&format!("{spoke}-w1"), K1)])
        .registry_auth(true)
        .run(async |fleet: &mut Fleet| {
            let admin = fleet.hub().client().await;
            // Everything but the Deployment (the hub runs in this process instead) and the
            // webhook registration (its Service has no endpoints in the test world).
            for d in docs.iter().filter(|d| {
                !matches!(
                    s(d, "/kind"),
                    "Deployment" | "ValidatingWebhookConfiguration"
                )
            }) {
                apply(&admin, d, false).await?;
            }
            let token = fleet.hub().service_account_token(HUB_NS, HUB_SA).await?;
            let kubeconfig = fleet.dir().join("kmm-hub.kubeconfig");
            token_kubeconfig(fleet.hub(), &token, &kubeconfig)?;
            let config = fleet.dir().join("kmm-hub-config.yaml");
            std::fs::write(
                &config,
                s(
                    find(&docs, "ConfigMap", "kmm-hub-config")?,
                    "/data/config.yaml",
                ),
            )?;

            // What an admin provides: the pull secret and a Dockerfile in the hub's
            // namespace, an image for the spoke's kernel, the spoke's kernel claim.
            let mut secret = serde_json::to_value(
                fleet
                    .registry()
                    .dockerconfigjson_secret("registry-pull", HUB_NS),
            )?;
            secret["apiVersion"] = json!("v1");
            secret["kind"] = json!("Secret");
            put(&admin, secret).await?;
            put(
                &admin,
                json!({"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "broken", "namespace": HUB_NS},
                "data": {"dockerfile": "FROM docker.io/redhat/ubi8-minimal\nRUN exit 3\n"}}),
            )
            .await?;
            let image = format!("{}/kmm/kmm-ci-a:{K1}", fleet.registry().host());
            push_kmod_image(
                &fleet.registry().access(),
                &image,
                &KmodImage::new(&[K1], &["kmm_ci_a"]),
            )
            .await?;
            let spoke = fleet.spoke(1).client().await;
            put(
                &spoke,
                json!({"apiVersion": "cluster.open-cluster-management.io/v1alpha1",
                "kind": "ClusterClaim", "metadata": {"name": KERNEL_VERSIONS_CLAIM},
                "spec": {"value": K1}}),
            )
            .await?;

            let dashboard: std::net::SocketAddr =
                format!("127.0.0.1:{}", kmm_e2e::process::free_port()?).parse()?;
            let mut o = HubOptions::new(kubeconfig, HUB_NS);
            o.config = Some(config);
            o.dashboard = Some(dashboard);
            o.resync = Duration::from_secs(5);
            let hub_proc = HubProcess::start(o)?;
            // The dashboard takes only tokens issued for its audience.
            let dashboard_token = fleet
                .hub()
                .service_account_token_for(
                    HUB_NS,
                    HUB_SA,
                    Some(kmm_hub::dashboard::auth::DEFAULT_AUDIENCE),
                )
                .await?;
            let outcome = hub_works(fleet, &admin, &hub_proc, &dashboard_token, dashboard).await;
            hub_proc.stop().await;
            outcome?;
            rbac_matches_what_the_binary_asked(
                fleet.hub(),
                &all_manifest_docs()?,
                (HUB_NS, HUB_SA),
                &[
                    // OwnerReferencesPermissionEnforcement (on OpenShift) checks it when the
                    // hub sets blockOwnerDeletion on a work; that check is no request.
                    (
                        "ClusterRole/kmm-hub",
                        "hub.kmm.sigs.x-k8s.io managedclustermodules/finalizers update",
                    ),
                    // kube-runtime's Recorder patches an event that repeats into a series.
                    ("Role/kmm-hub-events", "events.k8s.io events patch"),
                    // OCM's work webhook asks (SubjectAccessReview) whether the hub may
                    // execute-as the works' executor; the hub itself makes no such request.
                    (
                        "ClusterRole/kmm-hub",
                        "work.open-cluster-management.io manifestworks execute-as",
                    ),
                ],
            )
        })
        .await
}

async fn hub_works(
    fleet: &Fleet,
    admin: &Client,
    hub_proc: &HubProcess,
    token: &str,
    dashboard: std::net::SocketAddr,
) -> anyhow::Result<()> {
    // Ready: caches synced (ManagedClusters, ManifestWorks, Jobs) and the Lease held.
    let admin_addr = hub_proc.admin.to_string();
    eventually("the hub ready", DEADLINE, || async {
        Ok(match http_status(&admin_addr, "/readyz").await {
            Ok(200) => Ok(()),
            other => Err(format!("{other:?}")),
        })
    })
    .await?;

    // A prebuilt image: a finalizer, a digest read with the pull secret, a ManifestWork
    // created in the cluster's namespace, the status.
    let host = fleet.registry().host();
    put(
        admin,
        mcm(
            "prebuilt",
            json!({"regexp": "^.*$", "containerImage": format!("{host}/kmm/kmm-ci-a:${{KERNEL_FULL_VERSION}}")}),
        ),
    )
    .await?;
    let works: Api<ManifestWork> = Api::namespaced(admin.clone(), &spoke_name(1));
    eventually("the ManifestWork", DEADLINE, || async {
        let list = works
            .list(&ListParams::default().labels(&format!("{MCM_OWNER_LABEL}=prebuilt")))
            .await?;
        Ok(if list.items.len() == 1 {
            Ok(())
        } else {
            Err(format!("{} works", list.items.len()))
        })
    })
    .await?;
    eventually("the prebuilt MCM's status", DEADLINE, || async {
        let m = mcm_status(admin, "prebuilt").await?;
        let st = m.status.clone().unwrap_or_default();
        Ok(
            if !m.finalizers().is_empty()
                && st.number_desired == 1
                && st
                    .images
                    .iter()
                    .all(|i| i.state == shared_api::mcm::ImageState::Ready)
            {
                Ok(())
            } else {
                Err(format!("finalizers {:?}, {st:?}", m.finalizers()))
            },
        )
    })
    .await?;

    // A build that fails: a Job from the Dockerfile ConfigMap, the failed pod's message in
    // the status, events about the cluster-scoped MCM in `default`.
    put(
        admin,
        mcm(
            "broken",
            json!({"regexp": "^.*$", "containerImage": format!("{host}/kmm/broken:${{KERNEL_FULL_VERSION}}"),
                "build": {"dockerfileConfigMap": {"name": "broken"}}}),
        ),
    )
    .await?;
    let reason = eventually("the build failure in status", DEADLINE, || async {
        let st = mcm_status(admin, "broken")
            .await?
            .status
            .unwrap_or_default();
        Ok(match st.images.first() {
            Some(i) if i.state == shared_api::mcm::ImageState::Failed => {
                Ok(i.reason.clone().unwrap_or_default())
            }
            other => Err(format!("{other:?}")),
        })
    })
    .await?;
    let events: Api<Event> = Api::namespaced(admin.clone(), "default");
    let note = eventually("a BuildFailed event", DEADLINE, || async {
        let list = events.list(&ListParams::default()).await?;
        Ok(
            match list
                .items
                .iter()
                .find(|e| e.reason.as_deref() == Some(kmm_hub::reconcile::events::BUILD_FAILED))
            {
                Some(e) => Ok(e.note.clone().unwrap_or_default()),
                None => Err(format!("{} events", list.items.len())),
            },
        )
    })
    .await?;
    // "the build pod failed" would mean the pods could not be listed.
    ensure!(
        note.contains("exit") && !note.contains("the build pod failed"),
        "the failed pod's message in the event: {note:?} (status: {reason:?})"
    );

    // Fixing the Dockerfile restarts the build at once: the failed Job is deleted, not
    // left to its backoff.
    let jobs: Api<Job> = Api::all(admin.clone());
    let failed: BTreeSet<String> = jobs
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .filter_map(|j| j.metadata.uid.clone())
        .collect();
    ensure!(!failed.is_empty(), "no build Job for the broken MCM");
    put(
        admin,
        json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "broken", "namespace": HUB_NS},
        "data": {"dockerfile": "FROM docker.io/redhat/ubi8-minimal\nRUN exit 4\n"}}),
    )
    .await?;
    eventually("the failed build Job replaced", DEADLINE, || async {
        let now: BTreeSet<String> = jobs
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .filter_map(|j| j.metadata.uid.clone())
            .collect();
        Ok(if now.is_disjoint(&failed) {
            Ok(())
        } else {
            Err(format!("jobs {now:?}"))
        })
    })
    .await?;

    // The dashboard reviews tokens: the hub's own account (with a token for the dashboard's
    // audience) may list MCMs; nobody's token does not even authenticate.
    let addr = dashboard.to_string();
    let path = "/api/v1/managedclustermodules";
    eventually("the dashboard answers", DEADLINE, || async {
        Ok(match http_get_bearer(&addr, path, token).await {
            Ok(200) => Ok(()),
            other => Err(format!("{other:?}")),
        })
    })
    .await?;
    let nobody = http_get_bearer(&addr, path, fleet.hub().nobody_token()).await?;
    // A static token is not issued for the dashboard's audience: unauthenticated.
    ensure!(nobody == 401, "nobody gets {nobody} from the dashboard");

    // A preflight: the MCMs against the spoke's kernel, results written to its status.
    put(
        admin,
        json!({"apiVersion": "hub.kmm.sigs.x-k8s.io/v1beta1", "kind": "FleetPreflightValidation",
            "metadata": {"name": "same-kernel"}, "spec": {"kernelVersions": [K1]}}),
    )
    .await?;
    eventually("the preflight's results", DEADLINE, || async {
        let s = Api::<shared_api::FleetPreflightValidation>::all(admin.clone())
            .get("same-kernel")
            .await?
            .status
            .unwrap_or_default();
        let prebuilt = s.results.iter().find(|r| r.mcm == "prebuilt");
        Ok(match prebuilt {
            Some(r) if r.reason == "ImageExists" => Ok(()),
            _ => Err(format!("{s:?}")),
        })
    })
    .await?;

    // Deleting the MCM: its work deleted, then the finalizer released.
    Api::<ManagedClusterModule>::all(admin.clone())
        .delete("prebuilt", &DeleteParams::default())
        .await?;
    eventually("the prebuilt MCM and its work gone", DEADLINE, || async {
        let m = Api::<ManagedClusterModule>::all(admin.clone())
            .get_opt("prebuilt")
            .await?;
        let w = works
            .list(&ListParams::default().labels(&format!("{MCM_OWNER_LABEL}=prebuilt")))
            .await?;
        Ok(if m.is_none() && w.items.is_empty() {
            Ok(())
        } else {
            Err(format!("mcm {}, {} works", m.is_some(), w.items.len()))
        })
    })
    .await?;

    check_access(
        admin,
        (HUB_NS, HUB_SA),
        &[
            "yes list secrets -n kmm-hub",
            "yes watch secrets -n kmm-hub",
            "no list secrets -n default",
            "no get secrets registry-pull -n default",
            "no get secrets x -n spoke-1",
            "no watch secrets",
            "no get configmaps x -n default",
            "yes create jobs.batch -n kmm-hub-builds",
            "no create jobs.batch -n kmm-hub",
            "no create jobs.batch -n default",
            "yes patch secrets x -n kmm-hub-builds",
            "no get secrets x -n kmm-hub-builds",
            "no create pods -n kmm-hub-builds",
            "no create pods -n kmm-hub",
            "yes create events.events.k8s.io -n default",
            "no create events.events.k8s.io -n kmm-hub",
            "no update managedclustermodules.hub.kmm.sigs.x-k8s.io x",
            "no create managedclustermodules.hub.kmm.sigs.x-k8s.io",
            "no delete managedclustermodules.hub.kmm.sigs.x-k8s.io x",
            "no update fleetpreflightvalidations.hub.kmm.sigs.x-k8s.io x",
            "no patch fleetpreflightvalidations.hub.kmm.sigs.x-k8s.io x",
            "no delete managedclusters.cluster.open-cluster-management.io spoke-1",
            "yes create manifestworks.work.open-cluster-management.io -n spoke-1",
            &format!(
                "yes execute-as manifestworks.work.open-cluster-management.io {} -n spoke-1",
                executor_user()
            ),
            "no execute-as manifestworks.work.open-cluster-management.io system:serviceaccount:open-cluster-management-agent:klusterlet-work-sa -n spoke-1",
            "no execute-as manifestworks.work.open-cluster-management.io system:serviceaccount:kube-system:default -n spoke-1",
            "no create modules.kmm.sigs.x-k8s.io -n kmm-labs",
        ],
    )
    .await?;
    Ok(())
}
