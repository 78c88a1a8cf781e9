//! The spoke agent installed by the Policy, running under its own ServiceAccount.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::events::v1::Event;
use kmm_e2e::fleet::{Fleet, spoke_name, worker_node};
use kmm_e2e::oci::{KmodImage, push_kmod_image};
use kmm_e2e::openshift::{install_imagestream_crd, put_dtk_imagestream, rhcos_os_image};
use kmm_e2e::testkit::{ensure_namespace, eventually};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, PostParams};
use kube::{Client, ResourceExt as _};
use serde_json::{Value, json};
use shared_api::labels::{KERNEL_LABEL, ROLE_LABEL, kernel_label_value};
use shared_api::ocm::{ClusterClaim, DTK_IMAGES_CLAIM, KERNEL_VERSIONS_CLAIM};
use shared_api::{ManagedCluster, Module};

use crate::access::{check_access, service_account, token_kubeconfig};
use crate::dry_run::{api_resource, apply, wait_established};
use crate::manifests::{all_manifest_docs, find, ident, kustomize, policy_objects, repo, s};
use crate::manifests::{args, container};
use crate::rbac::rbac_matches_what_the_binary_asked;
use crate::{
    DEADLINE, K1, K2, MODULE_NS, ONE_FLEET_AT_A_TIME, POLICY, POLICY_NS, SPOKE_EVENTS_NS, SPOKE_NS,
    SPOKE_SA, WORK_NS, WORK_SA,
};

/// The `kmm-spoke` binary next to this test's executable (target/<profile>/), built first;
/// cargo finds it up to date in the common case. `KMM_SPOKE_BIN` names a prebuilt one.
pub(crate) async fn spoke_binary() -> anyhow::Result<PathBuf> {
    binary("kmm-spoke", "KMM_SPOKE_BIN").await
}

/// The `kmm-hub` binary, as [`spoke_binary`] (`KMM_HUB_BIN` names a prebuilt one).
pub(crate) async fn hub_binary() -> anyhow::Result<PathBuf> {
    binary("kmm-hub", "KMM_HUB_BIN").await
}

async fn binary(package: &str, env_var: &str) -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os(env_var) {
        return Ok(p.into());
    }
    let exe = std::env::current_exe()?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("the test executable is not in target/<profile>/deps")?;
    let target_dir = profile_dir.parent().context("no target directory")?;
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "dev",
        Some(p) => p,
        None => bail!("no profile directory"),
    };
    let bin = profile_dir.join(package);
    // scripts/test builds both binaries right before the tests.
    if std::env::var_os("KMM_E2E_BINARIES_BUILT").is_some() && bin.is_file() {
        return Ok(bin);
    }
    let mut cmd = kmm_e2e::process::cargo_command();
    let status = cmd
        .args([
            "build",
            "-p",
            package,
            "--bin",
            package,
            "--profile",
            profile,
        ])
        .arg("--target-dir")
        .arg(target_dir)
        .current_dir(repo())
        .status()
        .await
        .with_context(|| format!("running cargo build -p {package}"))?;
    ensure!(status.success(), "cargo build -p {package} failed");
    ensure!(bin.is_file(), "{} missing after the build", bin.display());
    Ok(bin)
}

/// The agent's process, run as the Deployment would run it: its args, its environment
/// (downward-API fields resolved as the kubelet does), the ServiceAccount's token.
struct SpokeProcess {
    child: tokio::process::Child,
    admin: String,
    log: PathBuf,
}

impl SpokeProcess {
    fn start(
        bin: &Path,
        deployment: &Value,
        kubeconfig: &Path,
        pod_name: &str,
        log: PathBuf,
    ) -> anyhow::Result<Self> {
        let c = container(deployment)?;
        let mut env: BTreeMap<String, String> = BTreeMap::new();
        for e in c["env"].as_array().into_iter().flatten() {
            let value = match s(e, "/valueFrom/fieldRef/fieldPath") {
                "" => s(e, "/value").to_string(),
                "metadata.namespace" => s(deployment, "/metadata/namespace").to_string(),
                "metadata.name" => pod_name.to_string(),
                other => bail!("unsupported fieldRef {other}"),
            };
            env.insert(s(e, "/name").to_string(), value);
        }
        // Loopback only, on a free port, instead of 0.0.0.0:8081.
        let admin = format!("127.0.0.1:{}", kmm_e2e::process::free_port()?);
        env.insert("KMM_SPOKE_ADMIN_ADDRESS".into(), admin.clone());
        env.insert("KUBECONFIG".into(), kubeconfig.display().to_string());
        let out = std::fs::File::create(&log)?;
        let child = tokio::process::Command::new(bin)
            .args(args(c))
            .env_clear()
            .envs(&env)
            .stdout(out.try_clone()?)
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(Self { child, admin, log })
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn stop(mut self) -> String {
        let _ = self.child.kill().await;
        self.log()
    }
}

pub(crate) async fn http_status(addr: &str, path: &str) -> anyhow::Result<u16> {
    Ok(kmm_e2e::process::http_get(addr, path).await?.0)
}

fn lab_module(image: &str) -> anyhow::Result<Module> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "kmm.sigs.x-k8s.io/v1beta1", "kind": "Module",
        "metadata": {"name": "kmm-ci-a", "namespace": MODULE_NS},
        "spec": {
            "selector": {"node-role.kubernetes.io/worker": ""},
            "moduleLoader": {"container": {
                "modprobe": {"moduleName": "kmm_ci_a"},
                "kernelMappings": [{"regexp": "^.*$", "containerImage": image}],
            }},
        },
    }))?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_installs_a_working_spoke_agent() -> anyhow::Result<()> {
    let policy_docs = kustomize("policy")?;
    let objects = policy_objects(&policy_docs)?;
    let deployment = find(&objects, "Deployment", "kmm-spoke")?.clone();
    let bin = spoke_binary().await?;
    let binaries = kmm_e2e::provision::ensure_provisioned()?;
    let _one = ONE_FLEET_AT_A_TIME.lock().await;
    Fleet::builder()
        .spokes(1)
        .spoke_nodes(
            1,
            vec![
                // An RHCOS node: with the ImageStream below, the Driver Toolkit claim.
                kmm_e2e::sim::SimNode {
                    os_image: Some(rhcos_os_image(DTK_OS)),
                    ..worker_node("n1", K1)
                },
                worker_node("n2", K2),
            ],
        )
        .run(async |fleet: &mut Fleet| {
            let admin = fleet.spoke(1).client().await;
            // OpenShift's ImageStream API and the release payload's Driver Toolkit
            // ImageStream: the agent lists and watches it under its own RBAC.
            install_imagestream_crd(&admin, &binaries).await?;
            put_dtk_imagestream(&admin, &[(DTK_OS, DTK_IMAGE)]).await?;
            // On the hub, as a platform team does; the policy framework does the rest.
            let hub = fleet.hub().client().await;
            for d in &policy_docs {
                apply(&hub, d, false).await?;
            }
            policy_reaches_the_spoke(&hub, &admin, &objects).await?;
            wait_established(&admin, "modules.kmm.sigs.x-k8s.io").await?;

            let token = fleet
                .spoke(1)
                .service_account_token(SPOKE_NS, SPOKE_SA)
                .await?;
            let kubeconfig = fleet.dir().join("kmm-spoke.kubeconfig");
            token_kubeconfig(fleet.spoke(1), &token, &kubeconfig)?;
            let pod = "kmm-spoke-5d9c7b6f4-x2x7q";
            let agent = SpokeProcess::start(
                &bin,
                &deployment,
                &kubeconfig,
                pod,
                fleet.dir().join("kmm-spoke.log"),
            )?;
            let mut outcome = spoke_agent_works(fleet, &admin, &agent, pod).await;
            if outcome.is_ok() {
                outcome = lease_renewed(&admin, SPOKE_NS, "kmm-spoke").await;
            }
            if outcome.is_ok() {
                outcome = dtk_claim_published(&admin).await;
            }
            let log = agent.stop().await;
            if outcome.is_err() {
                eprintln!("kmm-spoke log:\n{log}");
            }
            outcome?;
            // Every call the agent made was allowed.
            let denied: Vec<&str> = log
                .lines()
                .filter(|l| l.to_ascii_lowercase().contains("forbidden"))
                .collect();
            ensure!(
                denied.is_empty(),
                "the agent was denied:\n{}",
                denied.join("\n")
            );
            rbac_matches_what_the_binary_asked(
                fleet.spoke(1),
                &all_manifest_docs()?,
                (SPOKE_NS, SPOKE_SA),
                &[
                    // As for the hub: blockOwnerDeletion on the DaemonSets.
                    (
                        "ClusterRole/kmm-spoke",
                        "kmm.sigs.x-k8s.io modules/finalizers update",
                    ),
                    // Replaces an outdated loader pod (a re-pinned image, a new agent
                    // script), one node at a time; this run changes neither.
                    ("ClusterRole/kmm-spoke", "core pods delete"),
                    // Claims beyond the first are deleted when a cluster's kernels shrink
                    // to fewer claims.
                    (
                        "ClusterRole/kmm-spoke",
                        "cluster.open-cluster-management.io clusterclaims delete",
                    ),
                    // DeviceClasses are only touched for a Module with `dra` (the spoke
                    // suite's dra tests); this run's Module has none.
                    (
                        "ClusterRole/kmm-spoke",
                        "resource.k8s.io deviceclasses list",
                    ),
                    ("ClusterRole/kmm-spoke", "resource.k8s.io deviceclasses get"),
                    (
                        "ClusterRole/kmm-spoke",
                        "resource.k8s.io deviceclasses create",
                    ),
                    (
                        "ClusterRole/kmm-spoke",
                        "resource.k8s.io deviceclasses patch",
                    ),
                    (
                        "ClusterRole/kmm-spoke",
                        "resource.k8s.io deviceclasses delete",
                    ),
                ],
            )
        })
        .await
}

const DTK_OS: &str = "417.94.202410211619-0";
const DTK_IMAGE: &str = "quay.io/openshift-release-dev/ocp-v4.0-art-dev@sha256:dddd";

/// Waits until the agent published the Driver Toolkit claim of the RHCOS node's kernel.
async fn dtk_claim_published(client: &Client) -> anyhow::Result<()> {
    let want = format!("{K1}={DTK_IMAGE}");
    eventually("the Driver Toolkit claim", DEADLINE, || async {
        let v = Api::<ClusterClaim>::all(client.clone())
            .get_opt(DTK_IMAGES_CLAIM)
            .await?
            .map(|c| c.spec.value);
        Ok(if v.as_deref() == Some(want.as_str()) {
            Ok(())
        } else {
            Err(format!("{v:?}"))
        })
    })
    .await
}

/// Waits until the holder of a Lease has renewed it once (renewTime past acquireTime).
async fn lease_renewed(client: &Client, ns: &str, name: &str) -> anyhow::Result<()> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), ns);
    eventually("the Lease renewed", DEADLINE, || async {
        let spec = leases.get(name).await?.spec.unwrap_or_default();
        Ok(match (spec.acquire_time, spec.renew_time) {
            (Some(a), Some(r)) if r.0 > a.0 => Ok(()),
            other => Err(format!("{other:?}")),
        })
    })
    .await
}

/// Waits until every object of the Policy exists on the spoke and the root Policy on the hub
/// reports the cluster Compliant.
async fn policy_reaches_the_spoke(
    hub: &Client,
    spoke: &Client,
    objects: &[Value],
) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let policy_ar = kube::discovery::ApiResource::from_gvk_with_plural(
        &kube::api::GroupVersionKind::gvk("policy.open-cluster-management.io", "v1", "Policy"),
        "policies",
    );
    let root: Api<DynamicObject> = Api::namespaced_with(hub.clone(), POLICY_NS, &policy_ar);
    loop {
        let mut missing = Vec::new();
        for o in objects {
            let (ar, namespaced) = api_resource(spoke, o).await?;
            let api: Api<DynamicObject> = match (namespaced, o["metadata"]["namespace"].as_str()) {
                (true, Some(ns)) => Api::namespaced_with(spoke.clone(), ns, &ar),
                _ => Api::all_with(spoke.clone(), &ar),
            };
            if api.get_opt(s(o, "/metadata/name")).await?.is_none() {
                missing.push(ident(o));
            }
        }
        let status = root
            .get_opt(POLICY)
            .await?
            .map(|p| p.data["status"].clone());
        let compliant = status
            .as_ref()
            .and_then(|s| s["status"].as_array())
            .is_some_and(|clusters| {
                clusters
                    .iter()
                    .any(|c| c["clustername"] == "spoke-1" && c["compliant"] == "Compliant")
            });
        if missing.is_empty() && compliant {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!(
                "the Policy did not reach the spoke in 120 s: missing {missing:?}; root Policy status {status:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn spoke_agent_works(
    fleet: &Fleet,
    admin: &Client,
    agent: &SpokeProcess,
    pod: &str,
) -> anyhow::Result<()> {
    eventually("the agent ready", DEADLINE, || async {
        Ok(match http_status(&agent.admin, "/readyz").await {
            Ok(200) => Ok(()),
            Ok(code) => Err(format!("/readyz {code}; log: {}", agent.log())),
            Err(e) => Err(format!("{e:#}; log: {}", agent.log())),
        })
    })
    .await?;
    let lease = Api::<Lease>::namespaced(admin.clone(), SPOKE_NS)
        .get("kmm-spoke")
        .await
        .context("the agent's Lease in its namespace")?;
    ensure!(
        lease.spec.and_then(|s| s.holder_identity).as_deref() == Some(pod),
        "the Lease is held by the agent"
    );

    // Kernel facts: node labels and the ClusterClaim, which the hub then sees.
    let want = [K1, K2].join("\n");
    let claims: Api<ClusterClaim> = Api::all(admin.clone());
    eventually("the kernel ClusterClaim", DEADLINE, || async {
        Ok(match claims.get_opt(KERNEL_VERSIONS_CLAIM).await? {
            Some(c) if c.spec.value == want => Ok(()),
            other => Err(format!("{:?}", other.map(|c| c.spec.value))),
        })
    })
    .await?;
    // Node labels go through the node writer's short window.
    for (node, kernel) in [("n1", K1), ("n2", K2)] {
        eventually("the node labelled with its kernel", DEADLINE, || async {
            let n = Api::<Node>::all(admin.clone()).get(node).await?;
            Ok(
                if n.labels().get(KERNEL_LABEL) == Some(&kernel_label_value(kernel)) {
                    Ok(())
                } else {
                    Err(format!("{node}: {:?}", n.labels()))
                },
            )
        })
        .await?;
    }
    let hub = fleet.hub().client().await;
    eventually(
        "the claim on the hub's ManagedCluster",
        DEADLINE,
        || async {
            let mc = Api::<ManagedCluster>::all(hub.clone())
                .get(&spoke_name(1))
                .await?;
            let claims = mc.status.map(|s| s.cluster_claims).unwrap_or_default();
            Ok(
                if claims
                    .iter()
                    .any(|c| c.name == KERNEL_VERSIONS_CLAIM && c.value == want)
                {
                    Ok(())
                } else {
                    Err(format!("{claims:?}"))
                },
            )
        },
    )
    .await?;

    // The work agent's ServiceAccount, with the Policy's binding, creates a Module; the
    // agent turns it into loader DaemonSets and the nodes load it.
    let work_token = service_account(fleet.spoke(1), WORK_NS, WORK_SA).await?;
    let work = fleet.spoke(1).client_for_token(&work_token).await?;
    ensure_namespace(admin, MODULE_NS).await?;
    let image = format!("{}/kmm/kmm-ci-a:v1", fleet.registry().host());
    push_kmod_image(
        &fleet.registry().access(),
        &image,
        &KmodImage::new(&[K1, K2], &["kmm_ci_a"]),
    )
    .await?;
    let modules: Api<Module> = Api::namespaced(work.clone(), MODULE_NS);
    modules
        .create(&PostParams::default(), &lab_module(&image)?)
        .await
        .context("the work agent's ServiceAccount creates a Module")?;
    for node in ["n1", "n2"] {
        eventually(&format!("kmm_ci_a loaded on {node}"), DEADLINE, || async {
            let got = fleet.node_sim(&spoke_name(1)).loaded_modules(node);
            Ok(if got == ["kmm_ci_a"] {
                Ok(())
            } else {
                Err(format!("{got:?}"))
            })
        })
        .await?;
    }
    let m = eventually("the Module's status", DEADLINE, || async {
        let m = modules.get("kmm-ci-a").await?;
        Ok(match &m.status {
            Some(st) if st.module_loader.is_some() => Ok(m),
            other => Err(format!("{other:?}")),
        })
    })
    .await?;
    ensure!(
        m.finalizers()
            .iter()
            .any(|f| f == shared_api::labels::MODULE_FINALIZER),
        "the agent's finalizer on the Module: {:?}",
        m.finalizers()
    );
    eventually("a ModuleLoaded event", DEADLINE, || async {
        let events = Api::<Event>::namespaced(admin.clone(), SPOKE_EVENTS_NS)
            .list(&ListParams::default())
            .await?;
        Ok(
            if events.items.iter().any(|e| {
                e.reason.as_deref() == Some(kmm_spoke::controller::events::MODULE_LOADED)
                    && e.reporting_controller.as_deref()
                        == Some(kmm_spoke::controller::events::REPORTING_CONTROLLER)
            }) {
                Ok(())
            } else {
                Err(format!("{} events", events.items.len()))
            },
        )
    })
    .await?;

    // Deleting it through the work agent: the agent removes its DaemonSets and finalizer.
    modules.delete("kmm-ci-a", &DeleteParams::default()).await?;
    eventually("the Module gone", DEADLINE, || async {
        Ok(match modules.get_opt("kmm-ci-a").await? {
            None => Ok(()),
            Some(m) => Err(format!("finalizers {:?}", m.finalizers())),
        })
    })
    .await?;
    let daemonsets: Api<DaemonSet> = Api::namespaced(admin.clone(), MODULE_NS);
    eventually("the loader DaemonSets gone", DEADLINE, || async {
        let left = daemonsets
            .list(&ListParams::default().labels(ROLE_LABEL))
            .await?;
        Ok(if left.items.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{:?}",
                left.items.iter().map(|d| d.name_any()).collect::<Vec<_>>()
            ))
        })
    })
    .await?;

    // What the live server says the agent and the work agent may (not) do.
    check_access(
        admin,
        (SPOKE_NS, SPOKE_SA),
        &[
            "no list secrets",
            "no get secrets any -n kmm-spoke",
            "no get secrets any -n kmm-labs",
            "no watch secrets -n kmm-labs",
            "yes patch clusterclaims.cluster.open-cluster-management.io kernel-versions.kmm.node.kubernetes.io",
            "yes create clusterclaims.cluster.open-cluster-management.io kernel-versions.kmm.node.kubernetes.io.9",
            "no create clusterclaims.cluster.open-cluster-management.io kernel-versions.kmm.node.kubernetes.io.10",
            "yes create clusterclaims.cluster.open-cluster-management.io kernel-dtk-images.kmm.node.kubernetes.io.4",
            "no create clusterclaims.cluster.open-cluster-management.io kernel-dtk-images.kmm.node.kubernetes.io.5",
            "yes watch imagestreams.image.openshift.io driver-toolkit -n openshift",
            "no list imagestreams.image.openshift.io -n openshift",
            "no get imagestreams.image.openshift.io driver-toolkit -n openshift",
            "no watch imagestreams.image.openshift.io other -n openshift",
            "yes create clusterclaims.cluster.open-cluster-management.io os-image.kmm.node.kubernetes.io",
            "yes watch configmaps machine-config-osimageurl -n openshift-machine-config-operator",
            "no list configmaps -n openshift-machine-config-operator",
            "no get configmaps machine-config-osimageurl -n openshift-machine-config-operator",
            "no watch configmaps other -n openshift-machine-config-operator",
            "no patch clusterclaims.cluster.open-cluster-management.io id.k8s.io",
            "no create clusterclaims.cluster.open-cluster-management.io",
            "no delete clusterclaims.cluster.open-cluster-management.io id.k8s.io",
            "yes patch nodes n1",
            "no delete nodes n1",
            "yes patch namespaces kmm-labs",
            "yes get namespaces kmm-labs",
            "no list namespaces",
            "no update namespaces kmm-labs",
            "no delete namespaces kmm-labs",
            "no create namespaces x",
            "no create pods -n kmm-labs",
            "yes patch daemonsets.apps x -n kmm-labs",
            "yes delete deviceclasses.resource.k8s.io x",
            "no create resourceslices.resource.k8s.io",
            "no patch deployments.apps x -n kmm-labs",
            "yes update leases.coordination.k8s.io kmm-spoke -n kmm-spoke",
            "no update leases.coordination.k8s.io x -n kube-node-lease",
            &format!("yes create events.events.k8s.io -n {SPOKE_EVENTS_NS}"),
            "no create events.events.k8s.io -n kmm-labs",
            "no create modules.kmm.sigs.x-k8s.io -n kmm-labs",
            "yes patch modules.kmm.sigs.x-k8s.io/status m -n kmm-labs",
            "yes update modules.kmm.sigs.x-k8s.io/finalizers m -n kmm-labs",
        ],
    )
    .await?;
    check_access(
        admin,
        (WORK_NS, WORK_SA),
        &[
            "yes create modules.kmm.sigs.x-k8s.io -n kmm-labs",
            "yes delete modules.kmm.sigs.x-k8s.io m -n kmm-labs",
            "no patch modules.kmm.sigs.x-k8s.io/status m -n kmm-labs",
            "no update modules.kmm.sigs.x-k8s.io m -n kmm-labs",
            "no create daemonsets.apps -n kmm-labs",
            "no get secrets any -n kmm-labs",
        ],
    )
    .await?;
    // The executor of the hub's works: exactly what the work agent checks for a Module the
    // work owns and for the spoke prerequisites (namespace and ServiceAccounts orphaned, so
    // no delete; pull-secret copies owned), and nothing else.
    check_access(
        admin,
        (SPOKE_NS, "kmm-work-executor"),
        &[
            "yes create modules.kmm.sigs.x-k8s.io m -n kmm-labs",
            "yes get modules.kmm.sigs.x-k8s.io m -n kmm-labs",
            "yes update modules.kmm.sigs.x-k8s.io m -n kmm-labs",
            "yes patch modules.kmm.sigs.x-k8s.io m -n kmm-labs",
            "yes delete modules.kmm.sigs.x-k8s.io m -n kmm-labs",
            "no patch modules.kmm.sigs.x-k8s.io/status m -n kmm-labs",
            "no create clusterrolebindings.rbac.authorization.k8s.io x",
            "no create daemonsets.apps -n kmm-labs",
            "yes create namespaces x",
            "yes patch namespaces x",
            "no delete namespaces x",
            "yes create serviceaccounts -n kmm-labs",
            "no delete serviceaccounts s -n kmm-labs",
            "no create serviceaccounts/token s -n kmm-labs",
            "yes create secrets -n kmm-labs",
            "yes delete secrets p -n kmm-labs",
            "no list secrets -n kmm-labs",
        ],
    )
    .await?;
    Ok(())
}
