//! The labs and the upstream acceptance cases (SPEC §7) on the converged sandbox.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context as _, ensure};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::events::v1::Event;
use kmm_e2e::labs::{KERNEL_A, KERNEL_B, LAB_NAMESPACE};
use kmm_e2e::sandbox::Sandbox;
use kmm_e2e::sandbox::converge::{self};
use kmm_e2e::sandbox::install::BUILD_NAMESPACE;
use kube::ResourceExt as _;
use kube::api::{Api, ListParams};
use serde_json::Value;
use shared_api::labels::MCM_OWNER_LABEL;
use shared_api::ocm::KERNEL_VERSIONS_CLAIM;
use shared_api::{ClusterClaim, ManagedCluster};

use crate::observe::{get_with_token, mcm, real_kernel, works};

pub(crate) async fn labs_on_the_right_nodes(sb: &Sandbox) -> anyhow::Result<()> {
    let obs = sb.observe().await?;
    // The build lab is unsigned: never on the Secure Boot node; the x86_64 mappings skip kernel B.
    let sb_node = obs
        .node("spoke-1", "spoke-1-worker-sb")
        .context("the Secure Boot node")?;
    ensure!(sb_node.secure_boot, "spoke-1-worker-sb has Secure Boot");
    let ready = |n: &converge::NodeState, lab: &str| {
        n.labels
            .contains_key(&shared_api::labels::module_ready_label(LAB_NAMESPACE, lab))
    };
    ensure!(
        !ready(sb_node, "kmm-ci-a"),
        "unsigned build lab on the Secure Boot node"
    );
    ensure!(
        ready(sb_node, "labs-signed-module"),
        "signed lab on the Secure Boot node"
    );
    let b = obs
        .node("spoke-2", "spoke-2-worker-2")
        .context("kernel B node")?;
    ensure!(b.kernel == KERNEL_B);
    ensure!(
        !ready(b, "labs-signed-module") && !ready(b, "kmm-ci-a-softdep"),
        "x86_64-only labs on kernel B: {:?}",
        b.labels
    );
    ensure!(
        b.loaded == vec!["kmm_ci_a"],
        "kernel B node loads only kmm_ci_a: {:?}",
        b.loaded
    );
    // The in-tree lab removed joydev wherever it was loaded.
    for n in &obs.nodes {
        ensure!(
            !n.loaded.iter().any(|m| m == "joydev"),
            "joydev still on {}",
            n.name
        );
    }
    // Soft dependencies: kmm_ci_b wherever the softdep lab is ready, and only there.
    for n in &obs.nodes {
        ensure!(
            ready(n, "kmm-ci-a-softdep") == n.loaded.iter().any(|m| m == "kmm_ci_b"),
            "kmm_ci_b on {}: {:?}",
            n.name,
            n.loaded
        );
    }
    let cp = obs
        .node("spoke-1", "spoke-1-control-plane")
        .context("control plane")?;
    ensure!(
        cp.loaded.is_empty(),
        "nothing on the control-plane node: {:?}",
        cp.loaded
    );
    // The real-kernel nodes (what their kernels' /proc/modules say): the in-cluster build
    // compiled kmm_ci_a for Debian's kernel and it loaded; the Secure Boot one loaded the
    // images signed with the sandbox's key, never the unsigned build.
    let real_sb = obs
        .node("spoke-1", "spoke-1-worker-sb-real")
        .context("the real Secure Boot node")?;
    ensure!(real_sb.secure_boot);
    ensure!(
        !ready(real_sb, "kmm-ci-a") && ready(real_sb, "kmm-ci-a-load"),
        "real Secure Boot node: {:?}",
        real_sb.labels
    );
    for (cluster, node) in [
        ("spoke-1", "spoke-1-worker-real"),
        ("spoke-2", "spoke-2-worker-real"),
        ("spoke-1", "spoke-1-worker-sb-real"),
    ] {
        let n = obs.node(cluster, node).context("a real-kernel node")?;
        ensure!(
            n.loaded == vec!["kmm_ci_a"],
            "{node} ({}): {:?}",
            n.kernel,
            n.loaded
        );
    }
    let real = obs
        .node("spoke-1", "spoke-1-worker-real")
        .context("spoke-1-worker-real")?;
    ensure!(
        ready(real, "kmm-ci-a"),
        "the in-cluster build for Debian's kernel: {:?}",
        real.labels
    );
    Ok(())
}

pub(crate) async fn work_shape(sb: &Sandbox) -> anyhow::Result<()> {
    let hub = sb.hub_client().await;
    let ws = works(&hub, "kmm-ci-a-load").await?;
    ensure!(
        ws.keys().cloned().collect::<Vec<_>>() == vec!["spoke-1", "spoke-2"],
        "works {:?}",
        ws.keys()
    );
    for (cluster, w) in &ws {
        let v = serde_json::to_value(w)?;
        ensure!(
            w.labels()
                == &BTreeMap::from([(MCM_OWNER_LABEL.to_string(), "kmm-ci-a-load".to_string())]),
            "{cluster}: labels {:?}",
            w.labels()
        );
        ensure!(
            w.name_any() == "kmm-ci-a-load",
            "{cluster}: work name {}",
            w.name_any()
        );
        let owner = w.owner_references().first().context("no owner")?;
        ensure!(
            (owner.kind.as_str(), owner.name.as_str(), owner.controller)
                == ("ManagedClusterModule", "kmm-ci-a-load", Some(true)),
            "{cluster}: owner {owner:?}"
        );
        let manifests = v["spec"]["workload"]["manifests"]
            .as_array()
            .context("manifests")?;
        // One Module, last, after the spoke prerequisites the lab asks for (spokePrerequisites).
        let kinds: Vec<&str> = manifests
            .iter()
            .map(|m| m["kind"].as_str().unwrap_or("?"))
            .collect();
        ensure!(
            kinds.last() == Some(&"Module")
                && kinds.iter().filter(|k| **k == "Module").count() == 1
                && kinds[..kinds.len() - 1].iter().all(|k| [
                    "Namespace",
                    "ServiceAccount",
                    "Secret"
                ]
                .contains(k)),
            "{cluster}: manifests {kinds:?}"
        );
        let m = &manifests[manifests.len() - 1];
        ensure!(
            m["kind"] == "Module"
                && m["metadata"]["namespace"] == LAB_NAMESPACE
                && m["metadata"]["name"] == "kmm-ci-a-load",
            "{cluster}: {}",
            m["metadata"]
        );
        let container = &m["spec"]["moduleLoader"]["container"];
        ensure!(
            container.get("build").is_none_or(Value::is_null)
                && container.get("sign").is_none_or(Value::is_null),
            "{cluster}: build/sign shipped"
        );
        let mappings = container["kernelMappings"].as_array().context("mappings")?;
        let kernels: Vec<&str> = mappings
            .iter()
            .map(|k| k["literal"].as_str().unwrap_or("?"))
            .collect();
        let real = real_kernel();
        // Both spokes also run a real-kernel node (Debian's kernel).
        let want: Vec<&str> = if cluster == "spoke-1" {
            vec![KERNEL_A, &real]
        } else {
            vec![KERNEL_A, KERNEL_B, &real]
        };
        ensure!(
            kernels == want,
            "{cluster}: literal mappings {kernels:?}, want {want:?}"
        );
        for k in mappings {
            ensure!(
                k.get("regexp").is_none_or(Value::is_null),
                "{cluster}: regexp shipped: {k}"
            );
            ensure!(
                k["containerImage"]
                    .as_str()
                    .is_some_and(|i| i.contains("@sha256:")),
                "{cluster}: not pinned: {k}"
            );
            ensure!(
                k.get("build").is_none_or(Value::is_null)
                    && k.get("sign").is_none_or(Value::is_null),
                "{cluster}: {k}"
            );
        }
        let module_config = v["spec"]["manifestConfigs"]
            .as_array()
            .and_then(|cs| {
                cs.iter()
                    .find(|c| c["resourceIdentifier"]["resource"] == "modules")
            })
            .context("no manifestConfig for the Module")?;
        let paths = module_config["feedbackRules"][0]["jsonPaths"]
            .as_array()
            .map(Vec::len);
        ensure!(
            paths == Some(9),
            "{cluster}: feedback JSONPaths {paths:?}: {}",
            v["spec"]["manifestConfigs"]
        );
    }
    Ok(())
}

pub(crate) async fn builds_and_signing(sb: &Sandbox) -> anyhow::Result<()> {
    let hub = sb.hub_client().await;
    // kmm-ci-a: kernels A, B and the real nodes' Debian kernel; labs-signed-module: kernel A
    // only (its mapping is x86_64).
    let jobs = Api::<Job>::namespaced(hub.clone(), BUILD_NAMESPACE)
        .list(&ListParams::default())
        .await?
        .items;
    let names: BTreeSet<String> = jobs.iter().map(|j| j.name_any()).collect();
    ensure!(
        jobs.len() == 4 && names.len() == 4,
        "4 build Jobs for 4 distinct images, got {names:?}"
    );
    let created = sb
        .hub
        .metric("kmm_hub_builds_total{outcome=\"created\"}")
        .await?;
    ensure!(
        created == 4.0,
        "kmm_hub_builds_total{{outcome=\"created\"}} = {created}"
    );
    // The signed image: signed by the sandbox's certificate, annotated with its fingerprint.
    // What the spokes run is the digest the works ship; the tag must point at it too.
    let access = sb.fleet().registry().access();
    let tag = format!("{}/kmm-labs:signed-module-1.0", sb.registry_host());
    let shipped = works(&hub, "labs-signed-module")
        .await?
        .get("spoke-1")
        .and_then(|w| {
            kmm_e2e::testkit::work_module(w)?["spec"]["moduleLoader"]["container"]["kernelMappings"]
                [0]["containerImage"]
                .as_str()
                .map(str::to_string)
        })
        .context("no image shipped to spoke-1")?;
    let tag_digest = kmm_e2e::oci::manifest_digest(&access, &tag).await?;
    let image = shipped.clone();
    let pulled = kmm_e2e::oci::pull_files(&access, &image).await?;
    let ko = pulled
        .files
        .get(&format!("/opt/lib/modules/{KERNEL_A}/kmm_ci_a.ko"))
        .with_context(|| format!("no kmm_ci_a.ko in {image}: {:?}", pulled.files.keys()))?;
    let (body, sig) = kmm_e2e::kmod::split_signature(ko).with_context(|| {
        format!("kmm_ci_a.ko of the shipped {shipped} is not signed (the tag is at {tag_digest})")
    })?;
    ensure!(
        shipped.ends_with(&tag_digest),
        "the works ship {shipped} but {tag} is at {tag_digest}"
    );
    kmm_e2e::sim::loader::verify_signature(
        body,
        &sig.signature,
        std::slice::from_ref(&sb.keys.cert_der),
    )
    .map_err(anyhow::Error::msg)?;
    use sha2::Digest as _;
    let fp = hex::encode(sha2::Sha256::digest(&sb.keys.cert_der));
    ensure!(
        pulled
            .annotations
            .get(shared_api::labels::SIGNED_BY_ANNOTATION)
            == Some(&fp),
        "annotations {:?}",
        pulled.annotations
    );
    // Spokes never see build or sign sections.
    for (cluster, client) in sb.spoke_clients().await {
        let m = Api::<shared_api::Module>::namespaced(client, LAB_NAMESPACE)
            .get("labs-signed-module")
            .await?;
        let c = &m
            .spec
            .module_loader
            .as_ref()
            .context("moduleLoader")?
            .container;
        ensure!(
            c.build.is_none() && c.sign.is_none(),
            "{cluster}: build/sign on the spoke"
        );
        ensure!(
            c.kernel_mappings
                .iter()
                .all(|k| k.build.is_none() && k.sign.is_none()),
            "{cluster}: mapping build/sign on the spoke"
        );
    }
    // Events on the MCMs (cluster-scoped: namespace default).
    let events = Api::<Event>::namespaced(hub, "default")
        .list(&ListParams::default())
        .await?
        .items;
    for reason in [
        kmm_hub::reconcile::events::BUILD_CREATED,
        kmm_hub::reconcile::events::BUILD_SUCCEEDED,
        kmm_hub::reconcile::events::SIGN_SUCCEEDED,
    ] {
        ensure!(
            events.iter().any(|e| e.reason.as_deref() == Some(reason)),
            "no {reason} event; reasons: {:?}",
            events
                .iter()
                .filter_map(|e| e.reason.clone())
                .collect::<BTreeSet<_>>()
        );
    }
    Ok(())
}

pub(crate) async fn status_counts(sb: &Sandbox) -> anyhow::Result<()> {
    let hub = sb.hub_client().await;
    for lab in sb.labs() {
        let m = mcm(&hub, lab.name).await?.context("MCM")?;
        let s = m.status.clone().unwrap_or_default();
        ensure!(
            (
                s.number_desired,
                s.number_applied,
                s.number_available,
                s.number_degraded
            ) == (2, 2, 2, 0),
            "{}: desired/applied/available/degraded = {}/{}/{}/{}",
            lab.name,
            s.number_desired,
            s.number_applied,
            s.number_available,
            s.number_degraded
        );
        ensure!(
            m.status.as_ref().and_then(|s| s.observed_generation) == m.metadata.generation,
            "{}: observedGeneration",
            lab.name
        );
    }
    Ok(())
}

pub(crate) async fn kernel_claims(sb: &Sandbox) -> anyhow::Result<()> {
    let real = real_kernel();
    let want = BTreeMap::from([
        ("spoke-1", format!("{KERNEL_A}\n{real}")),
        ("spoke-2", format!("{KERNEL_A}\n{KERNEL_B}\n{real}")),
    ]);
    let hub = sb.hub_client().await;
    for (cluster, client) in sb.spoke_clients().await {
        let claim = Api::<ClusterClaim>::all(client)
            .get(KERNEL_VERSIONS_CLAIM)
            .await?;
        let value = serde_json::to_value(&claim)?["spec"]["value"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        ensure!(
            value == want[cluster.as_str()],
            "{cluster}: claim {value:?}"
        );
        let mc = serde_json::to_value(
            Api::<ManagedCluster>::all(hub.clone())
                .get(&cluster)
                .await?,
        )?;
        let on_hub = mc["status"]["clusterClaims"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["name"] == KERNEL_VERSIONS_CLAIM)
            .and_then(|c| c["value"].as_str())
            .unwrap_or_default()
            .to_string();
        ensure!(
            on_hub == value,
            "{cluster}: ManagedCluster claim {on_hub:?}"
        );
    }
    Ok(())
}

/// Node labels follow the kernel: on every node of every spoke, a Module's ready label is there
/// exactly when the node's kernel (simulated, or the real one in a VM) has the module loaded,
/// and every labelled node has its `ModuleLoaded` event naming the Module.
pub(crate) async fn events_and_labels(sb: &Sandbox) -> anyhow::Result<()> {
    use k8s_openapi::api::core::v1::Node;
    let mut problems = Vec::new();
    let mut checked = 0;
    for (cluster, client) in sb.spoke_clients().await {
        let events = Api::<Event>::namespaced(
            client.clone(),
            kmm_spoke::controller::events::EVENT_NAMESPACE,
        )
        .list(&ListParams::default())
        .await?
        .items;
        let modules = Api::<shared_api::Module>::all(client.clone())
            .list(&ListParams::default())
            .await?
            .items;
        let nodes = Api::<Node>::all(client.clone())
            .list(&ListParams::default())
            .await?
            .items;
        let sim = sb.fleet().node_sim(&cluster);
        let vms: BTreeMap<String, _> = sim.vms().into_iter().collect();
        for node in &nodes {
            let name = node.name_any();
            let loaded: Vec<String> = match vms.get(&name) {
                Some(vm) => vm.modules().await?,
                None => sim.loaded_modules(&name),
            };
            let labels = node.labels();
            for m in &modules {
                let Some(module_name) = m
                    .spec
                    .module_loader
                    .as_ref()
                    .and_then(|l| l.container.modprobe.module_name.clone())
                else {
                    continue;
                };
                let ns = m.namespace().unwrap_or_default();
                let kernel_name = module_name.replace('-', "_");
                let in_kernel = loaded.contains(&kernel_name);
                let label = shared_api::labels::module_ready_label(&ns, &m.name_any());
                let labelled = labels.contains_key(&label);
                // Another Module may load the same kernel module on this node: then the
                // kernel's state answers for that Module's label, not this one's.
                let shared = modules.iter().any(|o| {
                    o.uid() != m.uid()
                        && o.spec
                            .module_loader
                            .as_ref()
                            .and_then(|l| l.container.modprobe.module_name.as_deref())
                            .is_some_and(|n| n.replace('-', "_") == kernel_name)
                        && labels.contains_key(&shared_api::labels::module_ready_label(
                            &o.namespace().unwrap_or_default(),
                            &o.name_any(),
                        ))
                });
                checked += 1;
                if labelled != in_kernel && !(in_kernel && shared) {
                    problems.push(format!(
                        "{cluster}/{name}: {ns}/{}: kernel has {kernel_name}: {in_kernel}, \
                         label {label}: {labelled} (loaded: {loaded:?})",
                        m.name_any()
                    ));
                }
                if labelled {
                    let announced = events.iter().any(|e| {
                        e.reason.as_deref() == Some(kmm_spoke::controller::events::MODULE_LOADED)
                            && e.regarding.as_ref().and_then(|r| r.name.as_deref())
                                == Some(name.as_str())
                            // One event names every Module that loaded in the same node
                            // write: `module=<ns>/<a>,<ns>/<b>`.
                            && e.metadata
                                .annotations
                                .as_ref()
                                .and_then(|a| a.get("module"))
                                .is_some_and(|v| {
                                    v.split(',').any(|k| k == format!("{ns}/{}", m.name_any()))
                                })
                    });
                    if !announced {
                        problems.push(format!(
                            "{cluster}/{name}: no ModuleLoaded event for {ns}/{}",
                            m.name_any()
                        ));
                    }
                }
            }
        }
    }
    ensure!(checked > 0, "no Module on any node to check");
    ensure!(problems.is_empty(), "{}", problems.join("\n"));
    Ok(())
}

pub(crate) async fn dashboard(sb: &Sandbox) -> anyhow::Result<()> {
    let addr = sb
        .dashboard_url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let path = "/api/v1/managedclustermodules";
    let (code, body) = get_with_token(&addr, path, &sb.dashboard_token).await?;
    ensure!(code == 200, "viewer token: {code} {body}");
    let v: Value = serde_json::from_str(&body)?;
    let names: BTreeSet<&str> = v["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["name"].as_str())
        .collect();
    for lab in sb.labs() {
        ensure!(
            names.contains(lab.name),
            "{} missing from the dashboard: {names:?}",
            lab.name
        );
    }
    // A token not issued for the dashboard's audience does not authenticate.
    let (code, _) = get_with_token(&addr, path, sb.fleet().hub().nobody_token()).await?;
    ensure!(code == 401, "nobody gets {code}");
    let (code, _) = kmm_e2e::process::http_get(&addr, "/").await?;
    ensure!(code == 200, "the page: {code}");
    Ok(())
}
