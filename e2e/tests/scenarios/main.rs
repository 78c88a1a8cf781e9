//! End-to-end scenarios on the sandbox: the real `kmm-hub` and `kmm-spoke` binaries, installed
//! from manifests/ and running under their ServiceAccounts, on a hub and two spokes with two
//! kernels and a Secure Boot node.
//!
//! - `labs_acceptance_and_bad_input`: every KMM lab as an MCM across both spokes, checked on
//!   the simulated nodes' module lists; the upstream acceptance cases that apply (SPEC §7:
//!   ManifestWork shape, a cluster without the kernel claim, builds before works, status
//!   counts, relabelling, deletion, the claim, ready labels and events); a Secure Boot node
//!   refusing an unsigned module; bad input rejected by the webhook or reported in status
//!   while nothing that already runs changes.
//! - `faults`: the hub killed mid-rollout (no duplicate builds), a spoke agent restarted,
//!   the registry down and back, a spoke API server restarted, a cluster removed from the fleet.
//!
//! Each test shares one sandbox between its scenarios (one namespace or MCM each), runs them
//! all, and fails at the end listing every failed scenario; on failure it prints the fleet
//! (objects, events, simulator logs) and the agents' logs.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event;
use kmm_e2e::labs::{self, KERNEL_A, KERNEL_B, LAB_NAMESPACE};
use kmm_e2e::oci::{KmodImage, SignWith, push_kmod_image};
use kmm_e2e::sandbox::converge::{self, Observation, condition};
use kmm_e2e::sandbox::install::{BUILD_NAMESPACE, HUB_NAMESPACE};
use kmm_e2e::sandbox::progress::Progress;
use kmm_e2e::sandbox::{Sandbox, SandboxOptions, apply_mcm};
use kmm_e2e::testkit::eventually;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt as _};
use serde_json::{Value, json};
use shared_api::labels::{MCM_OWNER_LABEL, ROLE_LABEL, ROLE_LOADER};
use shared_api::ocm::{KERNEL_VERSIONS_CLAIM, ManifestWork};
use shared_api::{ClusterClaim, ManagedCluster, ManagedClusterModule};

const DEADLINE: Duration = Duration::from_secs(120);
const CONVERGE: Duration = Duration::from_secs(300);

// ---------------------------------------------------------------------------------------
// Running scenarios

/// Runs scenarios one after the other, keeps going after a failure, and reports them all.
#[derive(Default)]
struct Runner {
    results: Vec<(String, Duration, Result<(), String>)>,
}

impl Runner {
    async fn run(&mut self, name: &str, scenario: impl Future<Output = anyhow::Result<()>>) {
        let t = Instant::now();
        eprintln!("scenario {name}: running");
        let r = scenario.await.map_err(|e| format!("{e:#}"));
        let took = t.elapsed();
        match &r {
            Ok(()) => eprintln!("scenario {name}: ok ({took:.1?})"),
            Err(e) => eprintln!("scenario {name}: FAILED ({took:.1?}): {e}"),
        }
        self.results.push((name.to_string(), took, r));
    }

    fn finish(self) -> anyhow::Result<()> {
        let failed: Vec<String> = self
            .results
            .iter()
            .filter_map(|(n, _, r)| r.as_ref().err().map(|e| format!("{n}: {e}")))
            .collect();
        eprintln!("scenario summary:");
        for (n, t, r) in &self.results {
            eprintln!(
                "  {:<6} {n} ({t:.1?})",
                if r.is_ok() { "ok" } else { "FAILED" }
            );
        }
        ensure!(
            failed.is_empty(),
            "{} scenario(s) failed:\n{}",
            failed.len(),
            failed.join("\n")
        );
        Ok(())
    }
}

/// Start a sandbox, run `body`, print what the fleet looks like when it fails, stop.
async fn with_sandbox(
    opts: SandboxOptions,
    body: impl AsyncFnOnce(&mut Sandbox, &Progress) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            std::env::var("RUST_LOG").unwrap_or_else(|_| "error,kube_client=off".into()),
        )
        .try_init();
    let progress = Progress::plain(8);
    let t = Instant::now();
    let mut sb = Sandbox::start(opts, &progress).await?;
    eprintln!("sandbox started in {:.1?}", t.elapsed());
    let outcome = body(&mut sb, &progress).await;
    if let Err(e) = &outcome {
        eprintln!("sandbox test failed: {e:#}\n{}", sb.dump().await);
    }
    sb.stop().await;
    outcome
}

// ---------------------------------------------------------------------------------------
// Reading the fleet

/// The works of an MCM, by cluster namespace.
async fn works(hub: &Client, mcm: &str) -> anyhow::Result<BTreeMap<String, ManifestWork>> {
    let list = Api::<ManifestWork>::all(hub.clone())
        .list(&ListParams::default().labels(&format!("{MCM_OWNER_LABEL}={mcm}")))
        .await?;
    Ok(list
        .items
        .into_iter()
        .map(|w| (w.namespace().unwrap_or_default(), w))
        .collect())
}

/// Generation of every lab's work, `"<cluster>/<mcm>"` → generation.
async fn work_generations(sb: &Sandbox) -> anyhow::Result<BTreeMap<String, i64>> {
    let hub = sb.hub_client().await;
    let mut out = BTreeMap::new();
    for lab in sb.labs() {
        for (c, w) in works(&hub, lab.name).await? {
            out.insert(
                format!("{c}/{}", lab.name),
                w.metadata.generation.unwrap_or_default(),
            );
        }
    }
    Ok(out)
}

/// `"<cluster>/<node>"` → loaded modules.
fn loaded(obs: &Observation) -> BTreeMap<String, Vec<String>> {
    obs.nodes
        .iter()
        .map(|n| (format!("{}/{}", n.cluster, n.name), n.loaded.clone()))
        .collect()
}

async fn loaded_now(sb: &Sandbox) -> anyhow::Result<BTreeMap<String, Vec<String>>> {
    Ok(loaded(&sb.observe().await?))
}

/// Wait until every node's loaded modules are `before` again.
async fn loaded_back_to(
    sb: &Sandbox,
    before: &BTreeMap<String, Vec<String>>,
    what: &str,
) -> anyhow::Result<()> {
    eventually(what, DEADLINE, || async {
        let l = loaded_now(sb).await?;
        Ok(if l == *before {
            Ok(())
        } else {
            Err(format!("before {before:?}\nnow {l:?}"))
        })
    })
    .await
}

async fn mcm(hub: &Client, name: &str) -> anyhow::Result<Option<ManagedClusterModule>> {
    Ok(Api::<ManagedClusterModule>::all(hub.clone())
        .get_opt(name)
        .await?)
}

fn status_text(m: &ManagedClusterModule) -> String {
    serde_json::to_string(&m.status).unwrap_or_default()
}

/// Every lab converged again within the deadline.
async fn labs_converge_again(sb: &Sandbox) -> anyhow::Result<()> {
    eventually("every lab converged again", DEADLINE, || async {
        let obs = sb.observe().await?;
        let bad: Vec<String> = sb
            .verdicts(&obs)
            .into_iter()
            .filter(|v| !v.converged)
            .map(|v| format!("{}: {}", v.name, v.problems.join("; ")))
            .collect();
        Ok(if bad.is_empty() {
            Ok(())
        } else {
            Err(format!("{bad:?}"))
        })
    })
    .await
}

/// Every lab still converged (no waiting: it must be true now).
async fn labs_still_converged(sb: &Sandbox) -> anyhow::Result<()> {
    let obs = sb.observe().await?;
    let bad: Vec<String> = sb
        .verdicts(&obs)
        .into_iter()
        .filter(|v| !v.converged)
        .map(|v| format!("{}: {}", v.name, v.problems.join("; ")))
        .collect();
    ensure!(bad.is_empty(), "labs no longer converged: {bad:?}");
    Ok(())
}

async fn wait_gone(hub: &Client, name: &str) -> anyhow::Result<()> {
    eventually(
        &format!("MCM {name} and its works gone"),
        DEADLINE,
        || async {
            let m = mcm(hub, name).await?;
            let w = works(hub, name).await?;
            Ok(if m.is_none() && w.is_empty() {
                Ok(())
            } else {
                Err(format!(
                    "mcm present {}, works {:?}",
                    m.is_some(),
                    w.keys().collect::<Vec<_>>()
                ))
            })
        },
    )
    .await
}

async fn delete_mcm(hub: &Client, name: &str) -> anyhow::Result<()> {
    match Api::<ManagedClusterModule>::all(hub.clone())
        .delete(name, &DeleteParams::default())
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => return Err(e.into()),
    }
    wait_gone(hub, name).await
}

/// An MCM for the modules of `image` (a prebuilt image), in spoke namespace `ns`.
fn prebuilt_mcm(
    name: &str,
    ns: &str,
    selector: Value,
    node_selector: Value,
    image: &str,
    module: &str,
) -> Value {
    json!({
        "apiVersion": "hub.kmm.sigs.x-k8s.io/v1beta1", "kind": "ManagedClusterModule",
        "metadata": {"name": name},
        "spec": {"spokeNamespace": ns, "selector": selector,
            "moduleSpec": {"selector": node_selector,
                "imageRepoSecret": {"name": labs::PULL_SECRET},
                "moduleLoader": {"serviceAccountName": labs::LAB_SERVICE_ACCOUNT, "container": {
                    "modprobe": {"moduleName": module},
                    "kernelMappings": [{"regexp": "^.*$", "containerImage": image}]}}}}
    })
}

fn worker_selector() -> Value {
    json!({labs::WORKER_LABEL: ""})
}

/// Push a kmod image with `module` for both kernels; signed with the sandbox key when `signed`.
async fn push_module(
    sb: &Sandbox,
    path: &str,
    module: &str,
    signed: bool,
) -> anyhow::Result<String> {
    let reference = format!("{}/{path}", sb.registry_host());
    let real = real_kernel();
    let mut img = KmodImage::new(&[KERNEL_A, KERNEL_B, real.as_str()], &[module]);
    if signed {
        img.sign = Some(SignWith {
            key: sb.keys.key_pem_path.clone(),
            cert: sb.keys.cert_pem_path.clone(),
        });
    }
    push_kmod_image(&sb.fleet().registry().access(), &reference, &img).await?;
    Ok(reference)
}

/// The kernel of the sandbox's real-kernel nodes (Debian's, in VMs).
fn real_kernel() -> String {
    kmm_e2e::vm::KernelDist::locate(&kmm_e2e::provision::cache_dir())
        .map(|d| d.release)
        .unwrap_or_default()
}

async fn label_cluster(
    hub: &Client,
    cluster: &str,
    key: &str,
    value: Option<&str>,
) -> anyhow::Result<()> {
    Api::<ManagedCluster>::all(hub.clone())
        .patch(
            cluster,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {key: value}}})),
        )
        .await?;
    Ok(())
}

/// Plain HTTP GET with a bearer token: (status, body).
async fn get_with_token(addr: &str, path: &str, token: &str) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let req = format!(
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buf)).await??;
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no HTTP status in {head:?}"))?;
    Ok((status, body.to_string()))
}

// ---------------------------------------------------------------------------------------
// The labs and the acceptance cases

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labs_acceptance_and_bad_input() -> anyhow::Result<()> {
    let opts = SandboxOptions {
        hub_resync: Duration::from_secs(5),
        ..Default::default()
    };
    with_sandbox(opts, async |sb: &mut Sandbox, progress: &Progress| {
        sb.apply_labs(progress).await?;
        let t = Instant::now();
        sb.wait_converged(CONVERGE, progress).await?;
        eprintln!("every lab converged in {:.1?}", t.elapsed());
        let sb: &Sandbox = sb;
        let mut r = Runner::default();
        r.run(
            "labs: modules on exactly the targeted nodes",
            labs_on_the_right_nodes(sb),
        )
        .await;
        r.run(
            "spec 7.1: ManifestWork shape (literal mappings, pinned, no build/sign, feedback)",
            work_shape(sb),
        )
        .await;
        r.run(
            "spec 7.3: one build per distinct image, signed by the hub",
            builds_and_signing(sb),
        )
        .await;
        r.run("spec 7.7: status counts", status_counts(sb)).await;
        r.run("spec 7.8: kernel claims", kernel_claims(sb)).await;
        r.run(
            "spec 7.10: ready labels and ModuleLoaded events",
            events_and_labels(sb),
        )
        .await;
        r.run(
            "dashboard: viewer token reads, nobody is refused",
            dashboard(sb),
        )
        .await;
        r.run(
            "secure boot: an unsigned module is refused",
            secure_boot_refuses_unsigned(sb),
        )
        .await;
        r.run(
            "secure boot: a module the hub signed with an unenrolled key is rejected",
            secure_boot_rejects_a_foreign_key(sb),
        )
        .await;
        r.run(
            "secure boot: a module the hub signed with the enrolled key loads, on the real kernel too",
            secure_boot_loads_what_the_hub_signed(sb),
        )
        .await;
        r.run(
            "spec 7.5/7.6: relabel a cluster out, then delete the MCM",
            relabel_then_delete(sb),
        )
        .await;
        r.run(
            "spec 7.2: a cluster without the claim, then with it",
            claim_added_later(sb),
        )
        .await;
        r.run(
            "bad input: rejected or reported, nothing running changes",
            bad_input(sb),
        )
        .await;
        r.run(
            "ordered upgrade (the lab, scripted)",
            ordered_upgrade(sb, progress),
        )
        .await;
        r.finish()
    })
    .await
}

async fn labs_on_the_right_nodes(sb: &Sandbox) -> anyhow::Result<()> {
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

async fn work_shape(sb: &Sandbox) -> anyhow::Result<()> {
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
        ensure!(
            manifests.len() == 1,
            "{cluster}: {} manifests",
            manifests.len()
        );
        let m = &manifests[0];
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
        let paths = v["spec"]["manifestConfigs"][0]["feedbackRules"][0]["jsonPaths"]
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

async fn builds_and_signing(sb: &Sandbox) -> anyhow::Result<()> {
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
            serde_json::to_value(w).ok()?["spec"]["workload"]["manifests"][0]["spec"]
                ["moduleLoader"]["container"]["kernelMappings"][0]["containerImage"]
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
    for reason in ["BuildCreated", "BuildSucceeded", "Signed"] {
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

async fn status_counts(sb: &Sandbox) -> anyhow::Result<()> {
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

async fn kernel_claims(sb: &Sandbox) -> anyhow::Result<()> {
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
async fn events_and_labels(sb: &Sandbox) -> anyhow::Result<()> {
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
                            && e.note
                                .as_deref()
                                .unwrap_or_default()
                                .contains(&format!("Module {ns}/{} ", m.name_any()))
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

async fn dashboard(sb: &Sandbox) -> anyhow::Result<()> {
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

async fn secure_boot_refuses_unsigned(sb: &Sandbox) -> anyhow::Result<()> {
    const NS: &str = "scn-sb";
    let spoke1 = sb.fleet().spoke(1).client().await;
    sb.prepare_spoke_namespace(&spoke1, NS).await?;
    let image = push_module(sb, "scenario/unsigned:v1", "kmm-scn-unsigned", false).await?;
    let m = prebuilt_mcm(
        "scn-sb-unsigned",
        NS,
        json!({"name": "spoke-1"}),
        json!({labs::WORKER_LABEL: "", labs::SECURE_BOOT_LABEL: "true"}),
        &image,
        "kmm-scn-unsigned",
    );
    secure_boot_refuses(sb, &m, "kmm_scn_unsigned", "Key was rejected by service").await
}

/// Issue 6's negative case end to end: the hub signs a module with a key the Secure Boot node
/// has not enrolled (its only enrolled certificate is the sandbox's); the node's kernel
/// rejects it exactly as a real one does, and nothing that runs changes.
async fn secure_boot_rejects_a_foreign_key(sb: &Sandbox) -> anyhow::Result<()> {
    const NS: &str = "scn-sb-foreign";
    let hub = sb.hub_client().await;
    let spoke1 = sb.fleet().spoke(1).client().await;
    sb.prepare_spoke_namespace(&spoke1, NS).await?;
    let dir = tempfile::tempdir()?;
    let other = kmm_e2e::sandbox::world::SigningKeys::generate(dir.path(), "kmm-scn-other")?;
    ensure!(
        other.cert_der != sb.keys.cert_der,
        "a different certificate"
    );
    let secrets = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(hub.clone(), HUB_NAMESPACE);
    for (name, key, data) in [
        ("scn-other-key", "key", &other.key_pem),
        ("scn-other-cert", "cert", &other.cert_pem),
    ] {
        let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(json!({
            "metadata": {"name": name},
            "data": {key: base64_encode(data)},
        }))?;
        secrets
            .patch(
                name,
                &PatchParams::apply("kmm-scenarios").force(),
                &Patch::Apply(&secret),
            )
            .await?;
    }
    let unsigned = push_module(sb, "scenario/foreign:unsigned", "kmm-scn-foreign", false).await?;
    let target = format!("{}/scenario/foreign:signed", sb.registry_host());
    let mut m = prebuilt_mcm(
        "scn-sb-foreign",
        NS,
        json!({"name": "spoke-1"}),
        json!({labs::WORKER_LABEL: "", labs::SECURE_BOOT_LABEL: "true"}),
        &target,
        "kmm-scn-foreign",
    );
    m["spec"]["moduleSpec"]["moduleLoader"]["container"]["sign"] = json!({
        "unsignedImage": unsigned,
        "keySecret": {"name": "scn-other-key"},
        "certSecret": {"name": "scn-other-cert"},
        "filesToSign": ["/opt/lib/modules/$KERNEL_FULL_VERSION/kmm_scn_foreign.ko"],
    });
    let outcome =
        secure_boot_refuses(sb, &m, "kmm_scn_foreign", "Key was rejected by service").await;
    // The hub did sign it, with the other certificate.
    let signed = async {
        let pulled = kmm_e2e::oci::pull_files(&sb.fleet().registry().access(), &target).await?;
        let ko = pulled
            .files
            .get(&format!("/opt/lib/modules/{KERNEL_A}/kmm_scn_foreign.ko"))
            .context("kmm_scn_foreign.ko in the signed image")?;
        let (body, sig) = kmm_e2e::kmod::split_signature(ko).context("the hub signed it")?;
        kmm_e2e::sim::loader::verify_signature(
            body,
            &sig.signature,
            std::slice::from_ref(&other.cert_der),
        )
        .map_err(anyhow::Error::msg)?;
        ensure!(
            kmm_e2e::sim::loader::verify_signature(
                body,
                &sig.signature,
                std::slice::from_ref(&sb.keys.cert_der)
            )
            .is_err(),
            "not verifiable with the enrolled certificate"
        );
        anyhow::Ok(())
    }
    .await;
    for name in ["scn-other-key", "scn-other-cert"] {
        let _ = secrets.delete(name, &DeleteParams::default()).await;
    }
    outcome.and(signed)
}

/// The positive case: the hub signs (in-process, RustCrypto CMS) with the sandbox's key, which
/// both Secure Boot nodes trust — the simulated one through `openssl cms`, the real one through
/// its MOK list and machine keyring. The module loads on both and unloads when the MCM goes.
async fn secure_boot_loads_what_the_hub_signed(sb: &Sandbox) -> anyhow::Result<()> {
    const NS: &str = "scn-sb-signed";
    let hub = sb.hub_client().await;
    let spoke1 = sb.fleet().spoke(1).client().await;
    sb.prepare_spoke_namespace(&spoke1, NS).await?;
    let unsigned = push_module(
        sb,
        "scenario/hub-signed:unsigned",
        "kmm-scn-hub-signed",
        false,
    )
    .await?;
    // One signed image per kernel: with one tag for every kernel, each kernel's signing would
    // overwrite the others' (the module of only one kernel would end up signed).
    let target = format!(
        "{}/scenario/hub-signed:signed-${{KERNEL_FULL_VERSION}}",
        sb.registry_host()
    );
    let mut m = prebuilt_mcm(
        "scn-sb-signed",
        NS,
        json!({"name": "spoke-1"}),
        json!({labs::WORKER_LABEL: "", labs::SECURE_BOOT_LABEL: "true"}),
        &target,
        "kmm-scn-hub-signed",
    );
    m["spec"]["moduleSpec"]["moduleLoader"]["container"]["sign"] = json!({
        "unsignedImage": unsigned,
        "keySecret": {"name": labs::SIGNING_KEY_SECRET.0},
        "certSecret": {"name": labs::SIGNING_CERT_SECRET.0},
        "filesToSign": ["/opt/lib/modules/$KERNEL_FULL_VERSION/kmm_scn_hub_signed.ko"],
    });
    let before = loaded_now(sb).await?;
    apply_mcm(&hub, &m).await?;
    let nodes = [
        "spoke-1/spoke-1-worker-sb",
        "spoke-1/spoke-1-worker-sb-real",
    ];
    let loaded = eventually(
        "kmm_scn_hub_signed on both Secure Boot nodes",
        DEADLINE,
        || async {
            let l = loaded_now(sb).await?;
            let missing: Vec<&&str> = nodes
                .iter()
                .filter(|n| {
                    !l.get(**n)
                        .is_some_and(|m| m.iter().any(|x| x == "kmm_scn_hub_signed"))
                })
                .collect();
            Ok(if missing.is_empty() {
                Ok(())
            } else {
                Err(format!("missing on {missing:?}: {l:?}"))
            })
        },
    )
    .await;
    delete_mcm(&hub, "scn-sb-signed").await?;
    loaded?;
    loaded_back_to(sb, &before, "kmm_scn_hub_signed unloaded").await
}

fn base64_encode(data: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// Apply `mcm` (one module for spoke-1's Secure Boot node) and expect the node's loader to
/// report `kernel_error` for `module`; the MCM never claims Ready while its module is loaded
/// nowhere, and no loaded module anywhere changes. Deletes the MCM afterwards.
async fn secure_boot_refuses(
    sb: &Sandbox,
    m: &Value,
    module: &str,
    kernel_error: &str,
) -> anyhow::Result<()> {
    let hub = sb.hub_client().await;
    let spoke1 = sb.fleet().spoke(1).client().await;
    let name = m["metadata"]["name"]
        .as_str()
        .context("MCM name")?
        .to_string();
    let ns = m["spec"]["spokeNamespace"]
        .as_str()
        .context("spokeNamespace")?
        .to_string();
    let before = loaded_now(sb).await?;
    apply_mcm(&hub, m).await?;
    // From the apply until the refusal shows, and a while after: the MCM must never claim
    // Ready, since the module is loaded nowhere.
    let started = Instant::now();
    let mut refused = None;
    let mut false_ready = None;
    while started.elapsed() < Duration::from_secs(60) {
        if let Some(m) = mcm(&hub, &name).await?
            && condition(&m, "Ready").is_some_and(|(s, _, _)| s == "True")
            && false_ready.is_none()
        {
            let module = Api::<shared_api::Module>::namespaced(spoke1.clone(), &ns)
                .get_opt(&name)
                .await?
                .map(|m| serde_json::to_string(&m.status).unwrap_or_default());
            false_ready = Some(format!(
                "after {:.1?}: MCM status {}; spoke Module status {}",
                started.elapsed(),
                status_text(&m),
                module.unwrap_or_else(|| "(no Module yet)".into())
            ));
        }
        if refused.is_none() {
            let pods = Api::<Pod>::namespaced(spoke1.clone(), &ns)
                .list(&ListParams::default().labels(&format!("{ROLE_LABEL}={ROLE_LOADER}")))
                .await?
                .items;
            let text = serde_json::to_string(&pods.iter().map(|p| &p.status).collect::<Vec<_>>())?;
            if text.contains(kernel_error) {
                refused = Some((started.elapsed(), text));
            }
        }
        if refused
            .as_ref()
            .is_some_and(|(t, _)| started.elapsed() > *t + Duration::from_secs(6))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = mcm(&hub, &name).await?.map(|m| status_text(&m));
    let Some((_, message)) = refused else {
        delete_mcm(&hub, &name).await?;
        bail!("the loader never reported {kernel_error:?}; MCM status {status:?}");
    };
    let outcome = (|| {
        ensure!(
            message.contains(module) || message.contains(&module.replace('_', "-")),
            "{message}"
        );
        if let Some(seen) = &false_ready {
            bail!("the MCM was Ready=True while its module was loaded on no node: {seen}");
        }
        Ok(())
    })();
    let unchanged = loaded_now(sb).await? == before;
    delete_mcm(&hub, &name).await?;
    outcome?;
    ensure!(unchanged, "loaded modules changed");
    Ok(())
}

async fn relabel_then_delete(sb: &Sandbox) -> anyhow::Result<()> {
    const NS: &str = "scn-select";
    const NAME: &str = "scn-select";
    let hub = sb.hub_client().await;
    for (_, c) in sb.spoke_clients().await {
        sb.prepare_spoke_namespace(&c, NS).await?;
    }
    let image = push_module(sb, "scenario/select:v1", "kmm-scn-select", true).await?;
    for c in ["spoke-1", "spoke-2"] {
        label_cluster(&hub, c, "scenario", Some("select")).await?;
    }
    let before = loaded_now(sb).await?;
    apply_mcm(
        &hub,
        &prebuilt_mcm(
            NAME,
            NS,
            json!({"scenario": "select"}),
            worker_selector(),
            &image,
            "kmm-scn-select",
        ),
    )
    .await?;
    let workers: Vec<String> = before
        .keys()
        .filter(|k| !k.contains("control-plane"))
        .cloned()
        .collect();
    let has = |l: &BTreeMap<String, Vec<String>>, node: &str| {
        l[node].iter().any(|m| m == "kmm_scn_select")
    };
    eventually("kmm_scn_select on every worker", DEADLINE, || async {
        let l = loaded_now(sb).await?;
        let missing: Vec<&String> = workers.iter().filter(|w| !has(&l, w)).collect();
        Ok(if missing.is_empty() {
            Ok(())
        } else {
            Err(format!("missing on {missing:?}: {l:?}"))
        })
    })
    .await?;
    let first = works(&hub, NAME).await?;
    ensure!(first.len() == 2, "works {:?}", first.keys());

    // spoke-2 leaves the selector: its work goes, spoke-1's is untouched.
    label_cluster(&hub, "spoke-2", "scenario", None).await?;
    eventually(
        "spoke-2's work gone and its module unloaded",
        DEADLINE,
        || async {
            let ws = works(&hub, NAME).await?;
            let l = loaded_now(sb).await?;
            let on2: Vec<&String> = workers
                .iter()
                .filter(|w| w.starts_with("spoke-2/") && has(&l, w))
                .collect();
            Ok(
                if ws.keys().cloned().collect::<Vec<_>>() == vec!["spoke-1"] && on2.is_empty() {
                    Ok(())
                } else {
                    Err(format!("works {:?}, still on {on2:?}", ws.keys()))
                },
            )
        },
    )
    .await?;
    let kept = works(&hub, NAME).await?;
    ensure!(
        kept["spoke-1"].metadata.generation == first["spoke-1"].metadata.generation,
        "spoke-1's work rewritten"
    );
    let l = loaded_now(sb).await?;
    for w in workers.iter().filter(|w| w.starts_with("spoke-1/")) {
        ensure!(has(&l, w), "kmm_scn_select unloaded from {w}");
    }
    eventually("counts drop", DEADLINE, || async {
        let s = mcm(&hub, NAME)
            .await?
            .and_then(|m| m.status)
            .unwrap_or_default();
        Ok(if s.number_desired == 1 && s.number_available == 1 {
            Ok(())
        } else {
            Err(format!("{s:?}"))
        })
    })
    .await?;

    // Deleting the MCM: works gone, then the MCM; the module unloaded, other modules untouched.
    delete_mcm(&hub, NAME).await?;
    loaded_back_to(sb, &before, "kmm_scn_select unloaded everywhere").await?;
    let spoke1 = sb.fleet().spoke(1).client().await;
    let unloaded = Api::<Event>::namespaced(spoke1, kmm_spoke::controller::events::EVENT_NAMESPACE)
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some(kmm_spoke::controller::events::MODULE_UNLOADED))
        .count();
    ensure!(unloaded > 0, "no ModuleUnloaded event on spoke-1");
    label_cluster(&hub, "spoke-1", "scenario", None).await?;
    labs_still_converged(sb).await
}

async fn claim_added_later(sb: &Sandbox) -> anyhow::Result<()> {
    const GHOST: &str = "spoke-ghost";
    const NAME: &str = "scn-ghost";
    let hub = sb.hub_client().await;
    kmm_e2e::testkit::ensure_namespace(&hub, GHOST).await?;
    let mc: ManagedCluster = serde_json::from_value(json!({
        "apiVersion": "cluster.open-cluster-management.io/v1", "kind": "ManagedCluster",
        "metadata": {"name": GHOST, "labels": {"name": GHOST, "scenario": "ghost"}},
        "spec": {"hubAcceptsClient": true}}))?;
    Api::<ManagedCluster>::all(hub.clone())
        .create(&PostParams::default(), &mc)
        .await?;
    let image = format!(
        "{}/vendor/kmm-labs:kmm-kmod-{KERNEL_A}-v1.0",
        sb.registry_host()
    );
    apply_mcm(
        &hub,
        &prebuilt_mcm(
            NAME,
            LAB_NAMESPACE,
            json!({"scenario": "ghost"}),
            worker_selector(),
            &image,
            "kmm-ci-a",
        ),
    )
    .await?;
    // Reconciled (status written for this generation), yet no work: the cluster has no claim.
    eventually("the MCM reconciled", DEADLINE, || async {
        let m = mcm(&hub, NAME).await?.context("MCM")?;
        Ok(
            if m.status
                .as_ref()
                .and_then(|s| s.observed_generation)
                .is_some()
            {
                Ok(())
            } else {
                Err(status_text(&m))
            },
        )
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(6)).await; // more than a resync
    let ws = works(&hub, NAME).await?;
    ensure!(
        ws.is_empty(),
        "a work for a cluster without the kernel claim: {:?}",
        ws.keys()
    );
    // The claim appears: the work follows.
    Api::<ManagedCluster>::all(hub.clone())
        .patch_status(
            GHOST,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {
            "clusterClaims": [{"name": KERNEL_VERSIONS_CLAIM, "value": KERNEL_A}]}})),
        )
        .await?;
    let w = eventually("the work for the ghost cluster", DEADLINE, || async {
        let ws = works(&hub, NAME).await?;
        Ok(ws
            .get(GHOST)
            .cloned()
            .ok_or_else(|| format!("{:?}", ws.keys())))
    })
    .await?;
    let v = serde_json::to_value(&w)?;
    let lit = &v["spec"]["workload"]["manifests"][0]["spec"]["moduleLoader"]["container"]["kernelMappings"]
        [0]["literal"];
    ensure!(lit == KERNEL_A, "mapping {lit}");
    delete_mcm(&hub, NAME).await?;
    // The labs select every cluster: the ghost one counted against them until it goes.
    Api::<ManagedCluster>::all(hub.clone())
        .delete(GHOST, &DeleteParams::default())
        .await?;
    labs_converge_again(sb).await
}

async fn bad_input(sb: &Sandbox) -> anyhow::Result<()> {
    let hub = sb.hub_client().await;
    let host = sb.registry_host();
    let loaded_before = loaded_now(sb).await?;
    let works_before = work_generations(sb).await?;
    let good = |name: &str| {
        prebuilt_mcm(
            name,
            "scn-bad",
            json!({}),
            worker_selector(),
            &format!("{host}/vendor/kmm-labs:kmm-kmod-{KERNEL_A}-v1.0"),
            "kmm-ci-a",
        )
    };
    let mapping = "/spec/moduleSpec/moduleLoader/container/kernelMappings/0";

    // Rejected at admission, with the field path.
    let mut rejected = Vec::new();
    let mut m = good("bad-regexp");
    m.pointer_mut(mapping).unwrap()["regexp"] = json!("^5\\.14(.*$");
    rejected.push((
        m,
        "spec.moduleSpec.moduleLoader.container.kernelMappings[0].regexp",
    ));
    let mut m = good("bad-literal-and-regexp");
    m.pointer_mut(mapping).unwrap()["literal"] = json!(KERNEL_A);
    rejected.push((
        m,
        "spec.moduleSpec.moduleLoader.container.kernelMappings[0]",
    ));
    let mut m = good("bad-files-to-sign");
    m.pointer_mut(mapping).unwrap()["sign"] = json!({"keySecret": {"name": "mykey"}, "certSecret": {"name": "mycert"},
        "unsignedImage": format!("{host}/vendor/kmm-labs:kmm-kmod-{KERNEL_A}-v1.0"),
        "filesToSign": ["/lib/modules/$KERNEL_FULL_VERSION/kmm_ci_a.ko"]});
    rejected.push((
        m,
        "spec.moduleSpec.moduleLoader.container.kernelMappings[0].sign.filesToSign[0]",
    ));
    let long = "bad-a-name-that-is-too-long-for-the-spoke";
    rejected.push((good(long), "metadata.name"));
    for (m, path) in &rejected {
        let name = m["metadata"]["name"].as_str().unwrap().to_string();
        match apply_mcm(&hub, m).await {
            Ok(()) => bail!("{name} was admitted"),
            Err(e) => {
                let text = format!("{e:#}");
                // Refused by the webhook, or first by the CRD's own CEL rules (422 Invalid);
                // both name the field.
                let refused = text.contains("denied the request")
                    || (text.contains("is invalid") && text.contains("Invalid value"));
                ensure!(refused && text.contains(path), "{name}: {text}");
            }
        }
        ensure!(mcm(&hub, &name).await?.is_none(), "{name} exists");
    }

    // Admitted, then reported in status with the reason; nothing shipped.
    let mut reported = Vec::new();
    let mut m = good("bad-dockerfile");
    m.pointer_mut(mapping).unwrap()["containerImage"] = json!(format!(
        "{host}/scenario/never-built:${{KERNEL_FULL_VERSION}}"
    ));
    m.pointer_mut(mapping).unwrap()["build"] =
        json!({"dockerfileConfigMap": {"name": "no-such-dockerfile"}});
    reported.push((
        m,
        vec!["no-such-dockerfile".to_string(), "does not exist".into()],
    ));
    let mut m = good("bad-key-secret");
    m.pointer_mut(mapping).unwrap()["containerImage"] = json!(format!(
        "{host}/scenario/never-signed:${{KERNEL_FULL_VERSION}}"
    ));
    m.pointer_mut(mapping).unwrap()["sign"] = json!({"keySecret": {"name": "no-such-key"}, "certSecret": {"name": "mycert"},
        "unsignedImage": format!("{host}/vendor/kmm-labs:kmm-kmod-{KERNEL_A}-v1.0"),
        "filesToSign": ["/opt/lib/modules/$KERNEL_FULL_VERSION/kmm_ci_a.ko"]});
    reported.push((m, vec!["no-such-key".to_string(), "does not exist".into()]));
    let mut m = good("bad-pull-secret");
    m["spec"]["moduleSpec"]["imageRepoSecret"]["name"] = json!("no-such-pull-secret");
    reported.push((
        m,
        vec!["no-such-pull-secret".to_string(), "does not exist".into()],
    ));
    let mut m = good("bad-image");
    m.pointer_mut(mapping).unwrap()["containerImage"] =
        json!(format!("{host}/nowhere/kmm-ci-a:${{KERNEL_FULL_VERSION}}"));
    reported.push((
        m,
        vec![
            format!("{host}/nowhere/kmm-ci-a:{KERNEL_A}"),
            "does not exist".into(),
        ],
    ));
    for (m, _) in &reported {
        apply_mcm(&hub, m).await?;
    }
    let mut problems = Vec::new();
    for (m, words) in &reported {
        let name = m["metadata"]["name"].as_str().unwrap().to_string();
        let r = eventually(&format!("{name} reported"), DEADLINE, || async {
            let m = mcm(&hub, &name).await?.context("MCM")?;
            let text = status_text(&m);
            let not_ready = condition(&m, "Ready").is_some_and(|(s, _, _)| s == "False");
            Ok(
                if not_ready && words.iter().all(|w| text.contains(w.as_str())) {
                    Ok(())
                } else {
                    Err(text)
                },
            )
        })
        .await;
        if let Err(e) = r {
            problems.push(format!("{name}: {e:#}"));
        }
        let ws = works(&hub, &name).await?;
        if !ws.is_empty() {
            problems.push(format!("{name}: shipped works to {:?}", ws.keys()));
        }
    }
    tokio::time::sleep(Duration::from_secs(6)).await; // a resync with every bad MCM in place
    let loaded_after = loaded_now(sb).await?;
    if loaded_after != loaded_before {
        problems.push(format!(
            "loaded modules changed:\nbefore {loaded_before:?}\nafter  {loaded_after:?}"
        ));
    }
    let works_after = work_generations(sb).await?;
    if works_after != works_before {
        problems.push(format!(
            "lab works changed:\nbefore {works_before:?}\nafter  {works_after:?}"
        ));
    }
    if let Err(e) = labs_still_converged(sb).await {
        problems.push(format!("{e:#}"));
    }
    for (m, _) in &reported {
        delete_mcm(&hub, m["metadata"]["name"].as_str().unwrap()).await?;
    }
    ensure!(problems.is_empty(), "{}", problems.join("\n"));
    Ok(())
}

async fn ordered_upgrade(sb: &Sandbox, progress: &Progress) -> anyhow::Result<()> {
    let before = loaded_now(sb).await?;
    kmm_e2e::sandbox::upgrade::ordered_upgrade(sb, progress).await?;
    let hub = sb.hub_client().await;
    delete_mcm(&hub, kmm_e2e::sandbox::upgrade::NAME).await?;
    loaded_back_to(sb, &before, "the upgraded module unloaded").await?;
    labs_still_converged(sb).await
}

// ---------------------------------------------------------------------------------------
// Faults

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults() -> anyhow::Result<()> {
    let opts = SandboxOptions {
        hub_resync: Duration::from_secs(5),
        labs: [
            "kmm-ci-a",
            "labs-signed-module",
            "kmm-ci-a-load",
            "kmm-ci-a-in-tree",
        ]
        .map(String::from)
        .to_vec(),
        ..Default::default()
    };
    with_sandbox(opts, async |sb: &mut Sandbox, progress: &Progress| {
        let mut r = Runner::default();
        r.run(
            "hub killed mid-rollout and restarted: no duplicate builds",
            hub_killed_mid_rollout(sb, progress),
        )
        .await;
        r.run(
            "spoke agent restarted: nothing changes",
            spoke_agent_restarted(sb),
        )
        .await;
        r.run("registry down and back", registry_down_and_back(sb))
            .await;
        r.run(
            "spoke API server restarted, then a new module",
            spoke_apiserver_restarted(sb),
        )
        .await;
        r.run(
            "cluster removed from the fleet: its work goes, nothing else changes",
            cluster_removed(sb),
        )
        .await;
        r.finish()
    })
    .await
}

async fn build_jobs(hub: &Client) -> anyhow::Result<Vec<Job>> {
    Ok(Api::<Job>::namespaced(hub.clone(), BUILD_NAMESPACE)
        .list(&ListParams::default())
        .await?
        .items)
}

async fn hub_killed_mid_rollout(sb: &mut Sandbox, progress: &Progress) -> anyhow::Result<()> {
    let hub = sb.hub_client().await;
    sb.prepare_lab_inputs(LAB_NAMESPACE).await?;
    for lab in sb.labs().to_vec() {
        apply_mcm(&hub, &lab.mcm).await?;
    }
    eventually("a first build Job", DEADLINE, || async {
        let n = build_jobs(&hub).await?.len();
        Ok(if n > 0 { Ok(()) } else { Err("none".into()) })
    })
    .await?;
    sb.hub.kill().await;
    let at_kill: BTreeSet<String> = build_jobs(&hub)
        .await?
        .iter()
        .map(|j| j.name_any())
        .collect();
    eprintln!(
        "hub killed with {} build Job(s): {at_kill:?}",
        at_kill.len()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    sb.hub.start(Duration::from_secs(60)).await?;
    sb.wait_converged(CONVERGE, progress).await?;
    let jobs = build_jobs(&hub).await?;
    let names: BTreeSet<String> = jobs.iter().map(|j| j.name_any()).collect();
    ensure!(
        jobs.len() == 4 && names.len() == 4,
        "4 distinct images, 4 Jobs; got {names:?}"
    );
    ensure!(
        at_kill.is_subset(&names),
        "a Job of the first hub was replaced: {at_kill:?} vs {names:?}"
    );
    let created = sb
        .hub
        .metric("kmm_hub_builds_total{outcome=\"created\"}")
        .await?;
    // A build that failed (e.g. the registry refused a push) is retried with a new Job: that
    // is a retry, not a duplicate.
    let failed = sb
        .hub
        .metric("kmm_hub_builds_total{outcome=\"failed\"}")
        .await
        .unwrap_or(0.0);
    ensure!(
        (created - failed) as usize == 4 - at_kill.len(),
        "the restarted hub created {created} Jobs ({failed} after failed builds); {} existed",
        at_kill.len()
    );
    Ok(())
}

/// Everything the spokes run: loaded modules, DaemonSet and loader pod UIDs, work generations.
async fn running_state(sb: &Sandbox) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out: BTreeMap<String, String> = loaded_now(sb)
        .await?
        .into_iter()
        .map(|(k, v)| (format!("node {k}"), v.join(",")))
        .collect();
    for (cluster, c) in sb.spoke_clients().await {
        for d in Api::<DaemonSet>::namespaced(c.clone(), LAB_NAMESPACE)
            .list(&ListParams::default())
            .await?
            .items
        {
            out.insert(
                format!("ds {cluster}/{}", d.name_any()),
                d.uid().unwrap_or_default(),
            );
        }
        for p in Api::<Pod>::namespaced(c.clone(), LAB_NAMESPACE)
            .list(&ListParams::default())
            .await?
            .items
        {
            out.insert(
                format!("pod {cluster}/{}", p.name_any()),
                p.uid().unwrap_or_default(),
            );
        }
    }
    for (k, g) in work_generations(sb).await? {
        out.insert(format!("work {k}"), g.to_string());
    }
    Ok(out)
}

fn diff(before: &BTreeMap<String, String>, after: &BTreeMap<String, String>) -> Vec<String> {
    let keys: BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    keys.into_iter()
        .filter(|k| before.get(*k) != after.get(*k))
        .map(|k| format!("{k}: {:?} -> {:?}", before.get(k), after.get(k)))
        .collect()
}

async fn spoke_agent_restarted(sb: &mut Sandbox) -> anyhow::Result<()> {
    let before = running_state(sb).await?;
    sb.spoke_agent_mut(1)
        .restart(Duration::from_secs(60))
        .await?;
    tokio::time::sleep(Duration::from_secs(8)).await;
    labs_still_converged(sb).await?;
    let d = diff(&before, &running_state(sb).await?);
    ensure!(d.is_empty(), "after the restart:\n{}", d.join("\n"));
    Ok(())
}

async fn registry_down_and_back(sb: &mut Sandbox) -> anyhow::Result<()> {
    let hub = sb.hub_client().await;
    let before = running_state(sb).await?;
    sb.fleet_mut().registry_mut().stop().await;
    let seen = eventually(
        "an MCM Degraded because the registry is down",
        DEADLINE,
        || async {
            for lab in sb.labs() {
                if let Some(m) = mcm(&hub, lab.name).await?
                    && let Some((s, reason, msg)) = condition(&m, "Degraded")
                    && s == "True"
                {
                    return Ok(Ok(format!("{}: {reason}: {msg}", lab.name)));
                }
            }
            Ok(Err("no Degraded MCM".into()))
        },
    )
    .await;
    let during = running_state(sb).await?;
    sb.fleet_mut().registry_mut().start().await?;
    let seen = seen?;
    eprintln!("while the registry was down: {seen}");
    let d = diff(&before, &during);
    ensure!(
        d.is_empty(),
        "while the registry was down:\n{}",
        d.join("\n")
    );
    eventually("Degraded cleared on every MCM", DEADLINE, || async {
        let mut still = Vec::new();
        for lab in sb.labs() {
            if let Some(m) = mcm(&hub, lab.name).await?
                && condition(&m, "Degraded").is_some_and(|(s, _, _)| s == "True")
            {
                still.push(lab.name);
            }
        }
        Ok(if still.is_empty() {
            Ok(())
        } else {
            Err(format!("{still:?}"))
        })
    })
    .await?;
    labs_still_converged(sb).await?;
    let d = diff(&before, &running_state(sb).await?);
    ensure!(
        d.is_empty(),
        "after the registry came back:\n{}",
        d.join("\n")
    );
    Ok(())
}

async fn spoke_apiserver_restarted(sb: &mut Sandbox) -> anyhow::Result<()> {
    const NAME: &str = "scn-after-restart";
    let before = running_state(sb).await?;
    let hub = sb.hub_client().await;
    // The spoke-2 agent is frozen across the restart and until the new Module is on the
    // spoke: its watches come back with resource versions the new API server has expired
    // (410), so it learns of the Module only from its relist, never from a watch event.
    let agent = sb.spokes[1].pid().context("the spoke-2 agent's pid")?;
    kmm_e2e::process::signal(agent, libc::SIGSTOP);
    let frozen = async {
        sb.fleet_mut().spoke_mut(2).restart_apiserver().await?;
        let image = push_module(sb, "scenario/after-restart:v1", "kmm-scn-restart", true).await?;
        apply_mcm(
            &hub,
            &prebuilt_mcm(
                NAME,
                LAB_NAMESPACE,
                json!({}),
                worker_selector(),
                &image,
                "kmm-scn-restart",
            ),
        )
        .await?;
        let modules = Api::<shared_api::Module>::namespaced(
            sb.fleet().spoke(2).client().await,
            LAB_NAMESPACE,
        );
        eventually(
            "the work agent puts the Module on spoke-2",
            DEADLINE,
            || async {
                Ok(match modules.get_opt(NAME).await? {
                    Some(_) => Ok(()),
                    None => Err("not yet".to_string()),
                })
            },
        )
        .await
    }
    .await;
    kmm_e2e::process::signal(agent, libc::SIGCONT);
    frozen?;
    eventually(
        "kmm_scn_restart on every worker of spoke-2",
        CONVERGE,
        || async {
            let l = loaded_now(sb).await?;
            let missing: Vec<&String> = l
                .iter()
                .filter(|(n, mods)| {
                    n.starts_with("spoke-2/") && !mods.iter().any(|m| m == "kmm_scn_restart")
                })
                .map(|(n, _)| n)
                .collect();
            Ok(if missing.is_empty() {
                Ok(())
            } else {
                Err(format!("missing on {missing:?}"))
            })
        },
    )
    .await?;
    // OCM's work agent deletes on work deletion only what its AppliedManifestWork has recorded,
    // which lags behind the Module (more so after the restart): deleted at once, the MCM's work
    // must be held by the hub until the work agent reports the Module recorded
    // (kmm_hub::release), or the Module stays behind.
    delete_mcm(&hub, NAME).await?;
    eventually("kmm_scn_restart unloaded", DEADLINE, || async {
        let d = diff(&before, &running_state(sb).await?);
        Ok(if d.is_empty() {
            Ok(())
        } else {
            Err(d.join("\n"))
        })
    })
    .await?;
    // Nothing running changed (above); the spoke's status reports catch up with the restarted
    // API server (kube-controller-manager re-observes the DaemonSets) within the deadline.
    labs_converge_again(sb).await
}

async fn cluster_removed(sb: &mut Sandbox) -> anyhow::Result<()> {
    let hub = sb.hub_client().await;
    let before = running_state(sb).await?;
    Api::<ManagedCluster>::all(hub.clone())
        .delete("spoke-2", &DeleteParams::default())
        .await?;
    let spoke2 = sb.fleet().spoke(2).client().await;
    eventually(
        "spoke-2's works, Modules and modules gone",
        DEADLINE,
        || async {
            let mut left = Vec::new();
            for lab in sb.labs() {
                if works(&hub, lab.name).await?.contains_key("spoke-2") {
                    left.push(format!("work {}", lab.name));
                }
            }
            let modules = Api::<shared_api::Module>::namespaced(spoke2.clone(), LAB_NAMESPACE)
                .list(&ListParams::default())
                .await?
                .items;
            left.extend(modules.iter().map(|m| format!("Module {}", m.name_any())));
            for (node, mods) in loaded_now(sb).await? {
                if node.starts_with("spoke-2/") && mods.iter().any(|m| m.starts_with("kmm_")) {
                    left.push(format!("{node}: {mods:?}"));
                }
            }
            Ok(if left.is_empty() {
                Ok(())
            } else {
                Err(format!("{left:?}"))
            })
        },
    )
    .await?;
    let after = running_state(sb).await?;
    let spoke1_changes: Vec<String> = diff(&before, &after)
        .into_iter()
        .filter(|d| !d.contains("spoke-2"))
        .collect();
    ensure!(
        spoke1_changes.is_empty(),
        "outside spoke-2:\n{}",
        spoke1_changes.join("\n")
    );
    eventually(
        "every MCM Ready on the one remaining cluster",
        DEADLINE,
        || async {
            let mut bad = Vec::new();
            for lab in sb.labs() {
                let m = mcm(&hub, lab.name).await?.context("MCM")?;
                let s = m.status.clone().unwrap_or_default();
                if s.number_desired != 1
                    || condition(&m, "Ready").is_none_or(|(s, _, _)| s != "True")
                {
                    bad.push(format!("{}: {}", lab.name, status_text(&m)));
                }
            }
            Ok(if bad.is_empty() {
                Ok(())
            } else {
                Err(bad.join("\n"))
            })
        },
    )
    .await
}
