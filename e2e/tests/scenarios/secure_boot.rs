//! Secure Boot: unsigned and foreign-key modules refused, hub-signed ones loaded.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use k8s_openapi::api::core::v1::Pod;
use kmm_e2e::labs::{self, KERNEL_A};
use kmm_e2e::sandbox::converge::condition;
use kmm_e2e::sandbox::install::HUB_NAMESPACE;
use kmm_e2e::sandbox::{Sandbox, apply_mcm};
use kmm_e2e::testkit::eventually;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use serde_json::{Value, json};
use shared_api::labels::{ROLE_LABEL, ROLE_LOADER};

use crate::DEADLINE;
use crate::observe::{
    delete_mcm, loaded_back_to, loaded_now, mcm, prebuilt_mcm, push_module, status_text,
};

pub(crate) async fn secure_boot_refuses_unsigned(sb: &Sandbox) -> anyhow::Result<()> {
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
pub(crate) async fn secure_boot_rejects_a_foreign_key(sb: &Sandbox) -> anyhow::Result<()> {
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
pub(crate) async fn secure_boot_loads_what_the_hub_signed(sb: &Sandbox) -> anyhow::Result<()> {
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
