//! TLS servers with readiness and certificates that follow their files: a served certificate
//! and key are read again when their content changes (a renewed cert-manager Secret, a
//! rotated mounted volume), without a restart. The files are polled: reading two small files
//! every [`POLL`] costs nothing, and it sees every way a file can change (rewrite, rename, the
//! kubelet's symlink swap of a Secret volume), which mtime- or inotify-based watching can miss.
//! A pair that does not load (half-written, mismatched) is logged and the last good one stays.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use axum_server::tls_rustls::RustlsConfig;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::admin::ReadyGate;

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

impl crate::ErrorCategory for TlsError {
    fn category(&self) -> &'static str {
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

/// A PEM certificate (chain) and its private key, served and reloaded on change.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// How long a server drains open connections after shutdown begins.
pub const DRAIN: Duration = Duration::from_secs(5);

/// Serve `router` on `addr` (TLS when given) in a task until `token` is cancelled. `gate` is
/// open while the server listens: a server that cannot bind or whose task ends (fails,
/// panics) takes `/readyz` down with it.
pub fn serve(
    what: &'static str,
    addr: SocketAddr,
    tls: Option<RustlsConfig>,
    router: axum::Router,
    gate: ReadyGate,
    token: CancellationToken,
) {
    /// Closes the gate when the server task ends, however it ends.
    struct Closed(ReadyGate);
    impl Drop for Closed {
        fn drop(&mut self) {
            self.0.set(false);
        }
    }
    let handle = axum_server::Handle::new();
    let (h, t) = (handle.clone(), token.clone());
    tokio::spawn(async move {
        t.cancelled().await;
        h.graceful_shutdown(Some(DRAIN));
    });
    let (h, g, with_tls) = (handle.clone(), gate.clone(), tls.is_some());
    tokio::spawn(async move {
        if let Some(bound) = h.listening().await {
            tracing::info!(server = what, addr = %bound, tls = with_tls, "listening");
            g.set(true);
        }
    });
    tokio::spawn(async move {
        let _closed = Closed(gate);
        let service = router.into_make_service_with_connect_info::<SocketAddr>();
        let served = match tls {
            Some(tls) => {
                axum_server::bind_rustls(addr, tls)
                    .handle(handle)
                    .serve(service)
                    .await
            }
            None => axum_server::bind(addr).handle(handle).serve(service).await,
        };
        match served {
            Err(e) => tracing::error!(server = what, %addr, error = %e, "server failed; not ready"),
            Ok(()) if !token.is_cancelled() => {
                tracing::error!(server = what, %addr, "server stopped; not ready")
            }
            Ok(()) => {}
        }
    });
}
