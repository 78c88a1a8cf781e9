//! The hub's TLS servers against a real control plane: the webhook's and the dashboard's
//! certificates are served anew after their files change (no restart), and a server that
//! cannot serve keeps the hub's `/readyz` down.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use base64::Engine as _;
use kmm_e2e::fleet::Fleet;
use kmm_e2e::pki::Ca;
use kmm_e2e::process::{free_port, http_get};
use kmm_e2e::testkit::{HubOptions, HubProcess, ensure_namespace, eventually};
use rustls::pki_types::{CertificateDer, ServerName};

const HUB_NS: &str = "kmm-hub";

fn pem_to_der(pem: &str) -> anyhow::Result<Vec<u8>> {
    let b64: String = pem
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN CERTIFICATE"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    Ok(base64::engine::general_purpose::STANDARD.decode(b64)?)
}

/// The leaf certificate served at `port`, verified against `ca` for 127.0.0.1.
async fn served(ca: &Ca, port: u16) -> anyhow::Result<Vec<u8>> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(pem_to_der(ca.cert_pem())?))?;
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let tls = connector
        .connect(ServerName::try_from("127.0.0.1")?.to_owned(), tcp)
        .await?;
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .context("no certificate served")?;
    Ok(leaf.as_ref().to_vec())
}

fn write_pair(dir: &Path, ca: &Ca, cn: &str) -> anyhow::Result<Vec<u8>> {
    let pair = ca.serving_cert(cn, &["127.0.0.1", "localhost"])?;
    // As a Secret volume update: new files renamed into place.
    std::fs::write(dir.join("tls.crt.new"), &pair.cert_pem)?;
    std::fs::write(dir.join("tls.key.new"), &pair.key_pem)?;
    std::fs::rename(dir.join("tls.key.new"), dir.join("tls.key"))?;
    std::fs::rename(dir.join("tls.crt.new"), dir.join("tls.crt"))?;
    pem_to_der(&pair.cert_pem)
}

async fn readyz(hub: &HubProcess) -> anyhow::Result<(u16, String)> {
    http_get(&hub.admin.to_string(), "/readyz").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_reload_when_their_files_change_and_a_dead_server_takes_readiness_down()
-> anyhow::Result<()> {
    Fleet::builder()
        .spokes(0)
        .run(async |fleet: &mut Fleet| {
            let hub = fleet.hub().client().await;
            ensure_namespace(&hub, HUB_NS).await?;
            let ca = Ca::new("serving-ca")?;
            let (webhook_dir, dashboard_dir) =
                (fleet.dir().join("webhook"), fleet.dir().join("dashboard"));
            std::fs::create_dir_all(&webhook_dir)?;
            std::fs::create_dir_all(&dashboard_dir)?;
            let webhook_v1 = write_pair(&webhook_dir, &ca, "kmm-hub-webhook-v1")?;
            let dashboard_v1 = write_pair(&dashboard_dir, &ca, "kmm-hub-dashboard-v1")?;
            let (webhook_port, dashboard_port) = (free_port()?, free_port()?);
            let hub_proc = HubProcess::start(HubOptions {
                leader_elect: false,
                webhook: Some((
                    format!("127.0.0.1:{webhook_port}").parse()?,
                    webhook_dir.join("tls.crt"),
                    webhook_dir.join("tls.key"),
                )),
                dashboard: Some(format!("127.0.0.1:{dashboard_port}").parse()?),
                dashboard_tls: Some((dashboard_dir.join("tls.crt"), dashboard_dir.join("tls.key"))),
                ..HubOptions::new(fleet.hub().kubeconfig_path(), HUB_NS)
            })?;
            eventually("the hub ready", Duration::from_secs(60), || async {
                let (code, body) = readyz(&hub_proc).await?;
                Ok(if code == 200 {
                    Ok(())
                } else {
                    Err(format!("{code} {body}"))
                })
            })
            .await?;
            assert_eq!(served(&ca, webhook_port).await?, webhook_v1);
            assert_eq!(served(&ca, dashboard_port).await?, dashboard_v1);

            // Renewed certificates: served without a restart.
            let webhook_v2 = write_pair(&webhook_dir, &ca, "kmm-hub-webhook-v2")?;
            let dashboard_v2 = write_pair(&dashboard_dir, &ca, "kmm-hub-dashboard-v2")?;
            for (what, port, want) in [
                ("webhook", webhook_port, &webhook_v2),
                ("dashboard", dashboard_port, &dashboard_v2),
            ] {
                eventually(
                    &format!("the {what}'s renewed certificate served"),
                    Duration::from_secs(30),
                    || async {
                        Ok(if &served(&ca, port).await? == want {
                            Ok(())
                        } else {
                            Err("the old certificate".to_string())
                        })
                    },
                )
                .await?;
            }
            hub_proc.stop().await;

            // A dashboard that cannot serve (its port is taken) keeps the hub unready while
            // everything else is ready.
            let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
            let hub_proc = HubProcess::start(HubOptions {
                leader_elect: false,
                dashboard: Some(taken.local_addr()?),
                ..HubOptions::new(fleet.hub().kubeconfig_path(), HUB_NS)
            })?;
            eventually(
                "readiness waiting for the dashboard server only",
                Duration::from_secs(60),
                || async {
                    let (code, body) = readyz(&hub_proc).await?;
                    Ok(
                        if code == 503 && body.trim() == "not ready; waiting for: dashboard-server"
                        {
                            Ok(())
                        } else {
                            Err(format!("{code} {body}"))
                        },
                    )
                },
            )
            .await?;
            hub_proc.stop().await;
            drop(taken);
            Ok(())
        })
        .await
}
