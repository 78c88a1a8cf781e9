//! Serving certificates that follow their files: the webhook's and the dashboard's certificate
//! and key are read again when their content changes (a renewed cert-manager Secret, a
//! rotated mounted volume), without a restart. The files are polled: reading two small files
//! every [`POLL`] costs nothing, and it sees every way a file can change (rewrite, rename, the
//! kubelet's symlink swap of a Secret volume), which mtime- or inotify-based watching can miss.
//! A pair that does not load (half-written, mismatched) is logged and the last good one stays.

use std::path::{Path, PathBuf};
use std::time::Duration;

use axum_server::tls_rustls::RustlsConfig;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

/// How often the files are compared with what is served.
pub const POLL: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("loading certificate {cert} and key: {source}")]
    Load {
        cert: PathBuf,
        source: std::io::Error,
    },
}

impl TlsError {
    pub fn category(&self) -> &'static str {
        match self {
            TlsError::Read { .. } => "read",
            TlsError::Load { .. } => "load",
        }
    }
}

async fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    tokio::fs::read(path)
        .await
        .map_err(|source| TlsError::Read {
            path: path.to_path_buf(),
            source,
        })
}

fn fingerprint(cert: &[u8], key: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update((cert.len() as u64).to_be_bytes());
    h.update(cert);
    h.update(key);
    h.finalize().into()
}

/// Load `cert` and `key` now (an error if they do not load) and keep reloading them on change
/// until `token` is cancelled. `what` names the server in logs.
pub async fn reloading(
    what: &'static str,
    cert: PathBuf,
    key: PathBuf,
    token: CancellationToken,
) -> Result<RustlsConfig, TlsError> {
    let (c, k) = (read(&cert).await?, read(&key).await?);
    let mut served = fingerprint(&c, &k);
    let config = RustlsConfig::from_pem(c, k)
        .await
        .map_err(|source| TlsError::Load {
            cert: cert.clone(),
            source,
        })?;
    let reload = config.clone();
    tokio::spawn(async move {
        // The last pair that failed to load, so it is reported once.
        let mut failed: Option<[u8; 32]> = None;
        loop {
            tokio::select! {
                _ = token.cancelled() => return,
                _ = tokio::time::sleep(POLL) => {}
            }
            let (c, k) = match (read(&cert).await, read(&key).await) {
                (Ok(c), Ok(k)) => (c, k),
                (Err(e), _) | (_, Err(e)) => {
                    tracing::debug!(server = what, error = %e, "certificate files not readable; keeping the served one");
                    continue;
                }
            };
            let now = fingerprint(&c, &k);
            if now == served || Some(now) == failed {
                continue;
            }
            match reload.reload_from_pem(c, k).await {
                Ok(()) => {
                    served = now;
                    failed = None;
                    tracing::info!(server = what, cert = %cert.display(), "serving certificate reloaded");
                }
                Err(e) => {
                    failed = Some(now);
                    tracing::warn!(server = what, cert = %cert.display(), error = %e,
                        category = "load", "new certificate does not load; keeping the served one");
                }
            }
        }
    });
    Ok(config)
}
