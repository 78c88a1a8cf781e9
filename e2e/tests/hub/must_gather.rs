//! Issue 18 point 4: the support bundles of `kmm-hub must-gather` and `kmm-spoke
//! must-gather`, run as the real binaries against a fleet with one failing MCM.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use kmm_e2e::fleet::{Fleet, spoke_name};
use kmm_e2e::sim::SimNode;
use kmm_e2e::testkit::{ensure_namespace, eventually, put_pull_secret};
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use shared_api::ManagedCluster;
use shared_api::ocm::KERNEL_VERSIONS_CLAIM;

use crate::builds::{openssl_keypair, put_secret};
use crate::setup::{apply_mcm, mcm, mcm_status, prepare, start_hub};
use crate::{HUB_NS, PULL_SECRET};

/// Every file under `dir`, with its text (lossy).
fn files(dir: &Path) -> anyhow::Result<Vec<(PathBuf, String)>> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d)? {
            let p = e?.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                let text = String::from_utf8_lossy(&std::fs::read(&p)?).into_owned();
                out.push((p, text));
            }
        }
    }
    Ok(out)
}

/// `bin must-gather` with `args`; when `bin` is named `gather`, without the subcommand
/// (as `oc adm must-gather` runs the image's `/usr/bin/gather`), with `KUBECONFIG` set.
async fn gather(bin: &Path, kubeconfig: &Path, args: &[&str]) -> anyhow::Result<String> {
    let mut cmd = tokio::process::Command::new(bin);
    if bin.file_name().is_some_and(|n| n == "gather") {
        cmd.env("KUBECONFIG", kubeconfig);
    } else {
        cmd.arg("must-gather").arg("--kubeconfig").arg(kubeconfig);
    }
    let out = cmd
        .args(args)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    anyhow::ensure!(
        out.status.success(),
        "{} must-gather failed: {stdout}{}",
        bin.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(stdout)
}

/// A fleet with an MCM whose image does not exist (and no build): the hub's bundle holds
/// the MCM with the reason, its summary line, the ManagedClusters and the hub's namespaces;
/// the spoke's bundle the Nodes and the kernel claim; and no secret value is anywhere in
/// either (the registry password, its `auth` form, a signing key's PEM body kept in a Secret
/// and, misplaced, in a ConfigMap). `--tar` writes the tarball.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundles_hold_the_failure_and_no_secret() -> anyhow::Result<()> {
    Fleet::builder()
        .spokes(1)
        .spoke_nodes(
            1,
            vec![SimNode {
                name: "worker-1".into(),
                kernel: "5.14.0-1.fake".into(),
                labels: [("node-role.kubernetes.io/worker".to_string(), String::new())].into(),
                ..Default::default()
            }],
        )
        .registry_auth(true)
        .run(async |fleet: &mut Fleet| {
            let k = "5.14.0-1.fake";
            prepare(fleet, &[&[k]]).await?;
            let hub = fleet.hub().client().await;
            let (user, password) = {
                let (u, p) = fleet.registry().credentials().context("auth on")?;
                (u.to_string(), p.to_string())
            };
            let auth = base64::Engine::encode(
                &base64::engine::general_purpose::STANDARD,
                format!("{user}:{password}"),
            );
            let b64 =
                |b: &[u8]| base64::Engine::encode(&base64::engine::general_purpose::STANDARD, b);
            // The Secrets' data as the API server returns it (base64), in part.
            let pull_data = b64(fleet.registry().dockerconfigjson().as_bytes())[..60].to_string();
            let dir = tempfile::tempdir()?;
            let (key, _, _) = openssl_keypair(dir.path(), "gather")?;
            let key_data = b64(&key)[100..160].to_string();
            put_secret(&hub, "signing-key", "key", &key).await?;
            let key_text = String::from_utf8(key)?;
            // A line of the key's body (not the BEGIN/END markers).
            let key_body = key_text
                .lines()
                .find(|l| !l.starts_with("-----") && l.len() > 40)
                .context("a PEM body line")?
                .to_string();
            Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(hub.clone(), HUB_NS)
                .patch(
                    "misplaced",
                    &PatchParams::apply("test").force(),
                    &Patch::Apply(json!({"apiVersion": "v1", "kind": "ConfigMap",
                        "metadata": {"name": "misplaced", "namespace": HUB_NS},
                        "data": {"key.pem": key_text}})),
                )
                .await?;
            let spoke = fleet.spoke(1).client().await;
            ensure_namespace(&spoke, "kmm-spoke").await?;
            put_pull_secret(&spoke, fleet.registry(), PULL_SECRET, "kmm-spoke").await?;

            // The cluster's kernel claim, as its registration agent reports it.
            Api::<ManagedCluster>::all(hub.clone())
                .patch_status(
                    &spoke_name(1),
                    &PatchParams::default(),
                    &Patch::Merge(json!({"status": {
                        "clusterClaims": [{"name": KERNEL_VERSIONS_CLAIM, "value": k}]}})),
                )
                .await?;
            // The image is never pushed: the MCM reports it missing.
            let hub_proc = start_hub(fleet, Duration::from_secs(2));
            apply_mcm(&hub, &mcm(fleet, "broken", json!({}))?).await?;
            let reason = eventually("the missing image", Duration::from_secs(60), || async {
                let s = mcm_status(&hub, "broken").await?.status.unwrap_or_default();
                let reason = s.images.first().and_then(|i| i.reason.clone());
                Ok(reason.ok_or_else(|| format!("{s:?}")))
            })
            .await?;
            hub_proc.stop().await;

            let log = dir.path().join("build.log");
            let (hub_bin, spoke_bin) =
                kmm_e2e::sandbox::agents::locate_binaries(None, None, &log).await?;
            let hub_out = dir.path().join("hub");
            let printed = gather(
                &hub_bin,
                &fleet.hub().kubeconfig_path(),
                &["--output", &hub_out.to_string_lossy(), "--tar"],
            )
            .await?;
            assert!(printed.contains("hub.tar.gz"), "{printed}");
            assert!(dir.path().join("hub.tar.gz").is_file());
            // The spoke as the image's /usr/bin/gather: a link to the binary.
            let link = dir.path().join("gather");
            std::os::unix::fs::symlink(&spoke_bin, &link)?;
            let spoke_out = dir.path().join("spoke");
            gather(
                &link,
                &fleet.spoke(1).kubeconfig_path(),
                &["--output", &spoke_out.to_string_lossy()],
            )
            .await?;

            let hub_files = files(&hub_out)?;
            let spoke_files = files(&spoke_out)?;
            let read = |root: &Path, rel: &str| {
                std::fs::read_to_string(root.join(rel)).with_context(|| rel.to_string())
            };
            // The failure's reason, in the MCM and in the summary.
            let m = read(&hub_out, "managedclustermodule/_cluster/broken.yaml")?;
            assert!(m.contains(&reason), "{reason} not in {m}");
            let summary = read(&hub_out, "summary.txt")?;
            assert!(
                summary.contains("MCM broken:") && summary.contains(&reason),
                "{summary}"
            );
            assert!(summary.contains("redacted values: "), "{summary}");
            read(
                &hub_out,
                &format!("managedcluster/_cluster/{}.yaml", spoke_name(1)),
            )?;
            read(&hub_out, "events/default-managedclustermodules.txt")?;
            // Secrets by name and key names only.
            let secrets = read(&hub_out, "secrets/kmm-hub.yaml")?;
            for want in [PULL_SECRET, "signing-key", ".dockerconfigjson", "key"] {
                assert!(secrets.contains(want), "{want} not in {secrets}");
            }
            let misplaced = read(&hub_out, "configmap/kmm-hub/misplaced.yaml")?;
            assert!(misplaced.contains("[REDACTED]"), "{misplaced}");

            let spoke_summary = read(&spoke_out, "summary.txt")?;
            assert!(spoke_summary.contains("kmm-spoke must-gather"));
            let claim = read(
                &spoke_out,
                &format!("clusterclaim/_cluster/{}.yaml", KERNEL_VERSIONS_CLAIM),
            )?;
            assert!(claim.contains(k), "{claim}");
            assert!(
                spoke_files
                    .iter()
                    .any(|(p, t)| p.starts_with(spoke_out.join("node")) && t.contains("bootID")),
                "no Node in the spoke bundle: {}",
                read(&spoke_out, "errors.txt")?
            );
            let spoke_secrets = read(&spoke_out, "secrets/kmm-spoke.yaml")?;
            assert!(spoke_secrets.contains(PULL_SECRET), "{spoke_secrets}");

            // No secret value anywhere, in either bundle.
            for (path, text) in hub_files.iter().chain(&spoke_files) {
                for (what, value) in [
                    ("password", password.as_str()),
                    ("auth", auth.as_str()),
                    ("key body", key_body.as_str()),
                    ("pull Secret's data", pull_data.as_str()),
                    ("key Secret's data", key_data.as_str()),
                ] {
                    assert!(!text.contains(value), "the {what} is in {}", path.display());
                }
            }
            Ok(())
        })
        .await
}
