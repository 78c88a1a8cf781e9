//! Reading the fleet: works, loaded modules, MCM status, and small writes the scenarios share.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use kmm_e2e::labs::{self, KERNEL_A, KERNEL_B};
use kmm_e2e::oci::{KmodImage, SignWith, push_kmod_image};
use kmm_e2e::sandbox::Sandbox;
use kmm_e2e::sandbox::converge::Observation;
use kmm_e2e::testkit::eventually;
pub(crate) use kmm_e2e::testkit::works;
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde_json::{Value, json};
use shared_api::{ManagedCluster, ManagedClusterModule};

use crate::DEADLINE;

/// Generation of every lab's work, `"<cluster>/<mcm>"` → generation.
pub(crate) async fn work_generations(sb: &Sandbox) -> anyhow::Result<BTreeMap<String, i64>> {
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

pub(crate) async fn loaded_now(sb: &Sandbox) -> anyhow::Result<BTreeMap<String, Vec<String>>> {
    Ok(loaded(&sb.observe().await?))
}

/// Wait until every node's loaded modules are `before` again.
pub(crate) async fn loaded_back_to(
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

pub(crate) async fn mcm(hub: &Client, name: &str) -> anyhow::Result<Option<ManagedClusterModule>> {
    Ok(Api::<ManagedClusterModule>::all(hub.clone())
        .get_opt(name)
        .await?)
}

pub(crate) fn status_text(m: &ManagedClusterModule) -> String {
    serde_json::to_string(&m.status).unwrap_or_default()
}

/// Every lab converged again within the deadline.
pub(crate) async fn labs_converge_again(sb: &Sandbox) -> anyhow::Result<()> {
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
pub(crate) async fn labs_still_converged(sb: &Sandbox) -> anyhow::Result<()> {
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

pub(crate) async fn delete_mcm(hub: &Client, name: &str) -> anyhow::Result<()> {
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
pub(crate) fn prebuilt_mcm(
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

pub(crate) fn worker_selector() -> Value {
    json!({labs::WORKER_LABEL: ""})
}

/// Push a kmod image with `module` for both kernels; signed with the sandbox key when `signed`.
pub(crate) async fn push_module(
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
pub(crate) fn real_kernel() -> String {
    kmm_e2e::testkit::real_kernel().unwrap_or_default()
}

pub(crate) async fn label_cluster(
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
pub(crate) async fn get_with_token(
    addr: &str,
    path: &str,
    token: &str,
) -> anyhow::Result<(u16, String)> {
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
