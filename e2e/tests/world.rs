//! The core of the test world against the real control plane: clusters start and stop
//! cleanly, spokes join through OCM's real registration, RBAC and static tokens behave, the
//! registry authenticates, our CRDs work on the current API server. Each test starts its own
//! small fleet.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use k8s_openapi::api::core::v1::{Namespace, Node, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, RoleRef, Subject};
use kmm_e2e::fleet::Fleet;
use kmm_e2e::oci::{self, OciError};
use kmm_e2e::process::pid_alive;
use kube::api::{Api, ListParams, ObjectMeta, PostParams};

fn names<K: kube::Resource>(list: &[K]) -> Vec<String> {
    list.iter().filter_map(|o| o.meta().name.clone()).collect()
}

async fn wait_gone(pids: &[u32]) -> Vec<u32> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let alive: Vec<u32> = pids.iter().copied().filter(|p| pid_alive(*p)).collect();
        if alive.is_empty() || Instant::now() > deadline {
            return alive;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// (a) hub + 2 spokes start; kubectl and the kube client see every cluster; after stop no
/// process of ours remains and the temporary directory is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_and_two_spokes_start_serve_and_stop_cleanly() -> anyhow::Result<()> {
    let t = Instant::now();
    let fleet = Fleet::builder().spokes(2).start().await?;
    eprintln!("fleet (hub + 2 spokes) started in {:.2?}", t.elapsed());
    eprintln!("memory:\n{}", fleet.memory_report());
    let pids: Vec<u32> = fleet.pids().into_iter().map(|(_, _, pid)| pid).collect();
    let dir = fleet.dir().to_path_buf();
    let kubectl = kmm_e2e::provision::ensure_provisioned()?.kubectl;
    // etcd, the registry, a control plane per cluster, OCM's hub controllers and per spoke the
    // klusterlet agent and the configuration policy controller.
    let mut have: Vec<(String, String)> = fleet
        .pids()
        .into_iter()
        .map(|(c, comp, _)| (c, comp))
        .collect();
    have.sort();
    let mut want: Vec<(String, String)> = vec![
        ("fleet".into(), "docker-registry".into()),
        ("fleet".into(), "etcd".into()),
    ];
    for c in ["hub", "spoke-1", "spoke-2"] {
        for comp in [
            "kube-apiserver",
            "kube-controller-manager",
            "kube-scheduler",
        ] {
            want.push((c.into(), comp.into()));
        }
    }
    for comp in [
        "governance-policy-propagator",
        "ocm-placement-controller",
        "ocm-registration-controller",
        "ocm-work-webhook",
    ] {
        want.push(("hub".into(), comp.into()));
    }
    for c in ["spoke-1", "spoke-2"] {
        for comp in ["config-policy-controller", "ocm-klusterlet-agent"] {
            want.push((c.into(), comp.into()));
        }
    }
    want.sort();
    ensure!(have == want, "processes {have:?}, want {want:?}");

    let checks = async {
        let names_of: Vec<&str> = fleet.clusters().map(|c| c.name()).collect();
        ensure!(
            names_of == ["hub", "spoke-1", "spoke-2"],
            "cluster names {names_of:?}"
        );
        for c in fleet.clusters() {
            let ns = Api::<Namespace>::all(c.client().await)
                .list(&ListParams::default())
                .await?;
            let ns = names(&ns.items);
            for want in ["default", "kube-system", "kube-public", "kube-node-lease"] {
                ensure!(
                    ns.iter().any(|n| n == want),
                    "{}: namespace {want} missing from {ns:?}",
                    c.name()
                );
            }
            if c.name() == "hub" {
                ensure!(
                    ns.iter().any(|n| n == "spoke-1") && ns.iter().any(|n| n == "spoke-2"),
                    "hub namespaces {ns:?}"
                );
            }
            {
                let out = tokio::process::Command::new(&kubectl)
                    .args(["version", "-o", "json"])
                    .env("KUBECONFIG", c.kubeconfig_path())
                    .output()
                    .await?;
                let version: serde_json::Value = serde_json::from_slice(&out.stdout)
                    .with_context(|| String::from_utf8_lossy(&out.stderr).to_string())?;
                let want = kmm_e2e::provision::k8s_version();
                ensure!(
                    version["serverVersion"]["gitVersion"] == want.as_str()
                        && version["clientVersion"]["gitVersion"] == want.as_str(),
                    "{}: kubectl version {version}",
                    c.name()
                );
                let out = tokio::process::Command::new(&kubectl)
                    .args(["get", "ns", "-o", "name"])
                    .env("KUBECONFIG", c.kubeconfig_path())
                    .output()
                    .await?;
                let stdout = String::from_utf8_lossy(&out.stdout);
                ensure!(
                    out.status.success() && stdout.contains("namespace/kube-system"),
                    "{}: kubectl get ns failed: {}{}",
                    c.name(),
                    stdout,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        // The dump shows every cluster and the hub's build node (registered by its simulator).
        let dump = fleet.dump().await;
        if std::env::var_os("KMM_FLEET_SHOW_DUMP").is_some() {
            eprintln!("{dump}");
        }
        for want in [
            "==== cluster hub",
            "==== cluster spoke-1",
            "==== cluster spoke-2",
            "hub-build-1",
        ] {
            ensure!(dump.contains(want), "dump lacks {want:?}:\n{dump}");
        }
        // The hub knows both spokes as accepted, joined and available ManagedClusters (the
        // real registration agent's conditions) labelled with their names.
        let mcs = Api::<shared_api::ManagedCluster>::all(fleet.hub().client().await)
            .list(&ListParams::default())
            .await?;
        for spoke in ["spoke-1", "spoke-2"] {
            let mc = mcs
                .iter()
                .find(|m| m.metadata.name.as_deref() == Some(spoke))
                .context("ManagedCluster missing")?;
            ensure!(mc.spec.hub_accepts_client, "{spoke} not accepted");
            let conds = mc
                .status
                .as_ref()
                .map(|s| s.conditions.clone())
                .unwrap_or_default();
            for t in [
                "HubAcceptedManagedCluster",
                "ManagedClusterJoined",
                "ManagedClusterConditionAvailable",
            ] {
                ensure!(
                    conds.iter().any(|c| c.type_ == t && c.status == "True"),
                    "{spoke}: condition {t} not True: {conds:?}"
                );
            }
            ensure!(
                mc.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get("name"))
                    .map(String::as_str)
                    == Some(spoke),
                "{spoke} labels {:?}",
                mc.metadata.labels
            );
        }
        anyhow::Ok(())
    }
    .await;
    if checks.is_err() {
        eprintln!("{}", fleet.dump().await);
    }
    fleet.stop().await;
    checks?;
    let alive = wait_gone(&pids).await;
    ensure!(
        alive.is_empty(),
        "processes still alive after stop: {alive:?}"
    );
    ensure!(
        !dir.exists() || std::env::var("KMM_FLEET_KEEP").is_ok(),
        "fleet dir {} not removed",
        dir.display()
    );
    Ok(())
}

/// (b) With htpasswd auth the registry refuses an anonymous pull and serves an
/// authenticated one; stop/start keeps the port and the content.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_requires_auth_and_survives_restart() -> anyhow::Result<()> {
    let binaries = tokio::task::spawn_blocking(kmm_e2e::provision::ensure_provisioned).await??;
    let dir = tempfile::tempdir()?;
    let mut registry = kmm_e2e::registry::Registry::run(&binaries, dir.path(), true).await?;
    let files = BTreeMap::from([(
        "lib/modules/6.1.0-13-amd64/hello.ko".to_string(),
        b"not really elf".to_vec(),
    )]);
    let annotations = BTreeMap::new();
    let reference = format!("{}/default/hello:6.1.0-13-amd64", registry.host());

    let anonymous = oci::push_files(
        &registry.anonymous_access(),
        &reference,
        &files,
        &annotations,
    )
    .await;
    ensure!(
        matches!(anonymous, Err(OciError::Unauthorized(_))),
        "anonymous push: {anonymous:?}"
    );
    let digest = oci::push_files(&registry.access(), &reference, &files, &annotations).await?;
    ensure!(digest.starts_with("sha256:"), "digest {digest}");

    let anonymous = oci::pull_files(&registry.anonymous_access(), &reference).await;
    ensure!(
        matches!(anonymous, Err(OciError::Unauthorized(_))),
        "anonymous pull: {:?}",
        anonymous.err()
    );
    let wrong = kmm_e2e::oci::RegistryAccess {
        password: Some("wrong".into()),
        ..registry.access()
    };
    let wrong = oci::pull_files(&wrong, &reference).await;
    ensure!(
        matches!(wrong, Err(OciError::Unauthorized(_))),
        "wrong password pull: {:?}",
        wrong.err()
    );
    oci::pull_files(&registry.access(), &reference)
        .await
        .context("authenticated pull")?;

    // Layers apply in the manifest's order however their downloads finish: a small upper
    // layer that overrides a file of a large base layer always wins.
    let mut noise = vec![0u8; 6 << 20];
    let mut x = 0x9e37_79b9_u32;
    for b in &mut noise {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x as u8;
    }
    let base = BTreeMap::from([
        ("/opt/noise".to_string(), noise),
        ("/opt/m.ko".to_string(), b"base".to_vec()),
    ]);
    let top = BTreeMap::from([("/opt/m.ko".to_string(), b"top".to_vec())]);
    let layered = format!("{}/default/layered:v1", registry.host());
    oci::push_layers(&registry.access(), &layered, &[base, top], &annotations).await?;
    for _ in 0..3 {
        let got = oci::pull_files(&registry.access(), &layered).await?;
        ensure!(
            got.files["/opt/m.ko"] == b"top",
            "the upper layer's file wins"
        );
    }

    // Down: unavailable. Back: same port, same content.
    let port = registry.port();
    registry.stop().await;
    let down = oci::pull_files(&registry.access(), &reference).await;
    ensure!(
        matches!(down, Err(OciError::Unavailable(_))),
        "pull while down: {:?}",
        down.err()
    );
    registry.start().await?;
    ensure!(registry.port() == port);
    oci::pull_files(&registry.access(), &reference)
        .await
        .context("pull after restart")?;

    let secret = registry.dockerconfigjson_secret("pull", "default");
    ensure!(secret.type_.as_deref() == Some("kubernetes.io/dockerconfigjson"));
    let doc = registry.dockerconfigjson();
    ensure!(
        doc.contains(&registry.host()) && doc.contains("\"auth\""),
        "dockerconfigjson {doc}"
    );
    let pid = registry.pid().context("registry pid")?;
    registry.stop().await;
    ensure!(wait_gone(&[pid]).await.is_empty(), "registry still running");
    Ok(())
}

/// (c) A static-token user without RBAC gets 403; a service account gets what its
/// binding grants. Dropping the fleet (as on panic) kills its processes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_denies_token_user_and_drop_kills_processes() -> anyhow::Result<()> {
    let fleet = Fleet::builder()
        .spokes(0)
        .hub_build_node(false)
        .simulators(false)
        .start()
        .await?;
    let pids: Vec<u32> = fleet.pids().into_iter().map(|(_, _, pid)| pid).collect();
    let hub = fleet.hub();

    let nobody = hub.client_for_token(hub.nobody_token()).await?;
    match Api::<Node>::all(nobody).list(&ListParams::default()).await {
        Err(kube::Error::Api(s)) if s.code == 403 => {}
        other => bail!("nobody listing nodes: want 403, got {other:?}"),
    }
    // The same through the nobody kubeconfig, as a person would use it.
    {
        let kubectl = kmm_e2e::provision::ensure_provisioned()?.kubectl;
        let out = tokio::process::Command::new(kubectl)
            .args(["get", "nodes"])
            .env("KUBECONFIG", hub.nobody_kubeconfig_path())
            .output()
            .await?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success() && err.contains("forbidden"),
            "kubectl as nobody: {err}"
        );
    }

    // A service account: 403 first, allowed after a ClusterRoleBinding.
    let admin = hub.client().await;
    let sa = ServiceAccount {
        metadata: ObjectMeta {
            name: Some("reader".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<ServiceAccount>::namespaced(admin.clone(), "default")
        .create(&PostParams::default(), &sa)
        .await?;
    let sa_client = hub.service_account_client("default", "reader").await?;
    match Api::<Node>::all(sa_client.clone())
        .list(&ListParams::default())
        .await
    {
        Err(kube::Error::Api(s)) if s.code == 403 => {}
        other => bail!("service account before binding: want 403, got {other:?}"),
    }
    let role = ClusterRole {
        metadata: ObjectMeta {
            name: Some("node-reader".into()),
            ..Default::default()
        },
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["nodes".into()]),
            verbs: vec!["list".into()],
            ..Default::default()
        }]),
        ..Default::default()
    };
    Api::<ClusterRole>::all(admin.clone())
        .create(&PostParams::default(), &role)
        .await?;
    let binding = ClusterRoleBinding {
        metadata: ObjectMeta {
            name: Some("reader-nodes".into()),
            ..Default::default()
        },
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "ClusterRole".into(),
            name: "node-reader".into(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: "reader".into(),
            namespace: Some("default".into()),
            ..Default::default()
        }]),
    };
    Api::<ClusterRoleBinding>::all(admin)
        .create(&PostParams::default(), &binding)
        .await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Api::<Node>::all(sa_client.clone())
            .list(&ListParams::default())
            .await
        {
            Ok(_) => break,
            Err(e) if Instant::now() > deadline => bail!("service account after binding: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }

    // Drop without stop, as a panicking test would.
    drop(fleet);
    let alive = wait_gone(&pids).await;
    ensure!(alive.is_empty(), "processes alive after drop: {alive:?}");
    Ok(())
}

fn module_spec() -> serde_json::Value {
    serde_json::json!({
        "moduleLoader": {
            "container": {
                "modprobe": { "moduleName": "kmm_ci_a", "modulesLoadingOrder": ["kmm_ci_a", "kmm_ci_b"] },
                "inTreeModulesToRemove": ["dummy"],
                "kernelMappings": [
                    { "regexp": "^.+$", "containerImage": "127.0.0.1:5000/$MOD_NAMESPACE/$MOD_NAME:$KERNEL_FULL_VERSION" },
                    { "literal": "6.1.0-13-amd64", "containerImage": "127.0.0.1:5000/x/y:z",
                      "registryTLS": { "insecure": true } }
                ]
            }
        },
        "selector": { "node-role.kubernetes.io/worker": "" }
    })
}

/// (d) Module, ManagedClusterModule and ManifestWork objects can be created and read
/// back with our generated CRDs and OCM's, and the CRDs' CEL rules are enforced by the API
/// server itself (no webhook runs in this fleet).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kmm_and_ocm_objects_can_be_created() -> anyhow::Result<()> {
    Fleet::builder()
        .spokes(1)
        .hub_build_node(false)
        .simulators(false)
        .run(async |fleet| {
            let module: shared_api::Module = serde_json::from_value(serde_json::json!({
                "apiVersion": "kmm.sigs.x-k8s.io/v1beta1",
                "kind": "Module",
                "metadata": { "name": "kmm-ci", "namespace": "default" },
                "spec": module_spec(),
            }))?;
            let spoke =
                Api::<shared_api::Module>::namespaced(fleet.spoke(1).client().await, "default");
            spoke
                .create(&PostParams::default(), &module)
                .await
                .context("creating Module on spoke-1")?;
            let back = spoke.get("kmm-ci").await?;
            ensure!(
                back.spec == module.spec,
                "Module spec changed on the way:\n{:#?}\nvs\n{:#?}",
                back.spec,
                module.spec
            );

            let mcm: shared_api::ManagedClusterModule =
                serde_json::from_value(serde_json::json!({
                    "apiVersion": "hub.kmm.sigs.x-k8s.io/v1beta1",
                    "kind": "ManagedClusterModule",
                    "metadata": { "name": "mod-example" },
                    "spec": { "moduleSpec": module_spec(), "spokeNamespace": "kmm-operator-system",
                              "selector": { "name": "spoke-1" } },
                }))?;
            let hub = fleet.hub().client().await;
            let mcms = Api::<shared_api::ManagedClusterModule>::all(hub.clone());
            mcms.create(&PostParams::default(), &mcm)
                .await
                .context("creating ManagedClusterModule on the hub")?;
            let back = mcms.get("mod-example").await?;
            ensure!(back.spec == mcm.spec, "MCM spec changed on the way");

            // A ManifestWork embedding the Module (OCM's CRD preserves unknown fields there).
            let mw: shared_api::ManifestWork = serde_json::from_value(serde_json::json!({
                "apiVersion": "work.open-cluster-management.io/v1",
                "kind": "ManifestWork",
                "metadata": { "name": "mod-example", "namespace": "spoke-1" },
                "spec": { "workload": { "manifests": [ serde_json::to_value(&module)? ] } },
            }))?;
            let works = Api::<shared_api::ManifestWork>::namespaced(hub, "spoke-1");
            works
                .create(&PostParams::default(), &mw)
                .await
                .context("creating ManifestWork")?;
            let back = works.get("mod-example").await?;
            ensure!(back.spec == mw.spec, "ManifestWork spec changed on the way");

            cel_rules_are_enforced(&spoke, &mcms, &module).await?;

            // A spoke's API server restarts on the same port with the same certificates:
            // existing clients reconnect and the data is still there.
            let before = fleet.spoke(1).server_url();
            fleet.spoke_mut(1).restart_apiserver().await?;
            ensure!(fleet.spoke(1).server_url() == before);
            let back = spoke
                .get("kmm-ci")
                .await
                .context("reading the Module after the restart")?;
            ensure!(back.spec == module.spec);
            Ok(())
        })
        .await
}

/// Each CEL rule of our CRDs refuses what it describes, with the field path and message.
async fn cel_rules_are_enforced(
    modules: &Api<shared_api::Module>,
    mcms: &Api<shared_api::ManagedClusterModule>,
    valid: &shared_api::Module,
) -> anyhow::Result<()> {
    let base = serde_json::to_value(valid)?;
    let container = "/spec/moduleLoader/container";
    let cases: Vec<(&str, serde_json::Value, &str, &str)> = vec![
        (
            "a mapping with both literal and regexp",
            serde_json::json!([{"op": "add", "path": format!("{container}/kernelMappings/0/literal"), "value": "6.1.0"}]),
            "spec.moduleLoader.container.kernelMappings[0]",
            "exactly one of literal and regexp must be set",
        ),
        (
            "a mapping with neither literal nor regexp",
            serde_json::json!([{"op": "remove", "path": format!("{container}/kernelMappings/0/regexp")}]),
            "spec.moduleLoader.container.kernelMappings[0]",
            "exactly one of literal and regexp must be set",
        ),
        (
            "no kernel mapping",
            serde_json::json!([{"op": "replace", "path": format!("{container}/kernelMappings"), "value": []}]),
            "spec.moduleLoader.container.kernelMappings",
            "at least one kernel mapping is required",
        ),
        (
            "both in-tree fields on the container",
            serde_json::json!([{"op": "add", "path": format!("{container}/inTreeModuleToRemove"), "value": "dummy"}]),
            "spec.moduleLoader.container.inTreeModuleToRemove",
            "cannot be used together with inTreeModulesToRemove",
        ),
        (
            "both in-tree fields on a mapping",
            serde_json::json!([
                {"op": "add", "path": format!("{container}/kernelMappings/1/inTreeModuleToRemove"), "value": "a"},
                {"op": "add", "path": format!("{container}/kernelMappings/1/inTreeModulesToRemove"), "value": ["b"]}]),
            "spec.moduleLoader.container.kernelMappings[1].inTreeModuleToRemove",
            "cannot be used together with inTreeModulesToRemove",
        ),
        (
            "dra and devicePlugin together",
            serde_json::json!([
                {"op": "add", "path": "/spec/devicePlugin", "value": {"container": {"image": "registry.invalid/plugin:1"}}},
                {"op": "add", "path": "/spec/dra", "value": {"driverName": "gpu.example.com", "container": {"image": "registry.invalid/dra:1"}}}]),
            "spec",
            "dra and devicePlugin cannot both be set",
        ),
        (
            "nothing to run",
            serde_json::json!([{"op": "remove", "path": "/spec/moduleLoader"}]),
            "spec",
            "at least one of moduleLoader, devicePlugin or dra must be set",
        ),
    ];
    for (i, (what, patch, path, message)) in cases.into_iter().enumerate() {
        let mut doc = base.clone();
        let patch: json_patch::Patch = serde_json::from_value(patch)?;
        json_patch::patch(&mut doc, &patch)?;
        doc["metadata"] = serde_json::json!({"name": format!("cel-{i}"), "namespace": "default"});
        let module: shared_api::Module = serde_json::from_value(doc.clone())?;
        match modules.create(&PostParams::default(), &module).await {
            Err(kube::Error::Api(e))
                if e.code == 422 && e.message.contains(path) && e.message.contains(message) => {}
            other => anyhow::bail!("{what}: want 422 naming {path} and {message:?}, got {other:?}"),
        }
        // The same rule holds inside an MCM's moduleSpec.
        let mcm: shared_api::ManagedClusterModule = serde_json::from_value(serde_json::json!({
            "apiVersion": "hub.kmm.sigs.x-k8s.io/v1beta1", "kind": "ManagedClusterModule",
            "metadata": {"name": format!("cel-{i}")},
            "spec": {"moduleSpec": doc["spec"], "spokeNamespace": "kmm-operator-system",
                     "selector": {"name": "spoke-1"}},
        }))?;
        let mcm_path = path.replacen("spec", "spec.moduleSpec", 1);
        match mcms.create(&PostParams::default(), &mcm).await {
            Err(kube::Error::Api(e)) if e.code == 422 && e.message.contains(&mcm_path) => {}
            other => anyhow::bail!("{what} in an MCM: want 422 naming {mcm_path}, got {other:?}"),
        }
    }

    // A transition rule: version can change, but not between set and unset.
    let name = valid.metadata.name.clone().unwrap_or_default();
    let patch = |v: serde_json::Value| {
        kube::api::Patch::Merge(serde_json::json!(
            {"spec": {"moduleLoader": {"container": {"version": v}}}}))
    };
    match modules
        .patch(&name, &Default::default(), &patch(serde_json::json!("1.0")))
        .await
    {
        Err(kube::Error::Api(e))
            if e.code == 422
                && e.message.contains("spec.moduleLoader.container.version")
                && e.message.contains("delete and re-create") => {}
        other => anyhow::bail!("setting version on an existing Module: want 422, got {other:?}"),
    }
    let mut versioned = valid.clone();
    versioned.metadata = kube::api::ObjectMeta {
        name: Some("cel-versioned".into()),
        namespace: Some("default".into()),
        ..Default::default()
    };
    if let Some(l) = versioned.spec.module_loader.as_mut() {
        l.container.version = Some("1.0".into());
    }
    modules.create(&PostParams::default(), &versioned).await?;
    modules
        .patch(
            "cel-versioned",
            &Default::default(),
            &patch(serde_json::json!("1.1")),
        )
        .await
        .context("changing a set version is allowed")?;
    match modules
        .patch(
            "cel-versioned",
            &Default::default(),
            &patch(serde_json::Value::Null),
        )
        .await
    {
        Err(kube::Error::Api(e)) if e.code == 422 && e.message.contains("delete and re-create") => {
        }
        other => anyhow::bail!("unsetting version: want 422, got {other:?}"),
    }
    modules.delete("cel-versioned", &Default::default()).await?;
    Ok(())
}
