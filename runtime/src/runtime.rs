//! The process around a controller, built once in `run`: the admin server, readiness gates,
//! the leader lease, graceful shutdown and the TLS servers. Both binaries start the same way:
//!
//! ```ignore
//! let rt = Runtime::builder(admin_address)
//!     .shutdown_on(token)
//!     .leader_election(client.clone(), lease_config)
//!     .build(Arc::new(registry))?;
//! rt.ready_when("caches", caches_synced);
//! rt.serve_tls("webhook", addr, Some(files), router).await?;
//! if rt.wait_to_lead().await { /* reconcile until rt.stopping() */ }
//! rt.finish().await?; // Err(LostLease) when the lease was lost
//! ```
//!
//! `/readyz` starts unready and turns ready only when every gate is open: the caches, the lease
//! (while held) and every server while it listens.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum_server::tls_rustls::RustlsConfig;
use kube::Client;
use prometheus_client::registry::Registry;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, AdminError, Health};
use crate::lease::{Campaign, Leadership, LeaseConfig};
use crate::shutdown;
use crate::tls::{self, TlsError, TlsFiles};

/// The readiness gate that is open while the lease is held.
pub const LEASE_GATE: &str = "lease";

/// How long the elector gets to release the lease on shutdown.
const RELEASE_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Admin(#[from] AdminError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("admin server task: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("lost leadership: another replica may lead now")]
    LostLease,
}

impl crate::ErrorCategory for RuntimeError {
    fn category(&self) -> &'static str {
        match self {
            RuntimeError::Admin(e) => e.category(),
            RuntimeError::Tls(e) => e.category(),
            RuntimeError::Task(_) => "task",
            RuntimeError::LostLease => "lost-lease",
        }
    }
}

/// Builds a [`Runtime`].
pub struct Builder {
    admin_address: SocketAddr,
    token: Option<CancellationToken>,
    lease: Option<(Client, Option<LeaseConfig>)>,
    health: Health,
}

impl Builder {
    /// Cancel `token` to shut down (default: the first SIGTERM/SIGINT, see [`shutdown::install`]).
    pub fn shutdown_on(mut self, token: CancellationToken) -> Self {
        self.token = Some(token);
        self
    }

    /// Campaign for the lease `cfg` (`None`: lead at once); `/readyz` waits for the lease.
    pub fn leader_election(mut self, client: Client, cfg: Option<LeaseConfig>) -> Self {
        self.lease = Some((client, cfg));
        self
    }

    /// Use `health` (whose gates others may already hold) instead of a new one.
    pub fn health(mut self, health: Health) -> Self {
        self.health = health;
        self
    }

    /// Start the admin server on the builder's address (serving `registry`) and the lease
    /// campaign. Must be called inside a tokio runtime.
    pub fn build(self, registry: Arc<Registry>) -> Runtime {
        let token = self.token.unwrap_or_else(shutdown::install);
        let health = self.health;
        let t = token.clone();
        let admin_task = tokio::spawn(admin::serve(
            self.admin_address,
            admin::router(health.clone(), registry),
            async move { t.cancelled().await },
            |_| {},
        ));
        let (campaign, lease_task) = match self.lease {
            Some((client, cfg)) => {
                let gate = health.gate(LEASE_GATE);
                Campaign::start(client, cfg, Some(gate), token.clone())
            }
            None => (Campaign::always(), None),
        };
        Runtime {
            health,
            token,
            campaign,
            admin_task,
            lease_task,
        }
    }
}

/// A running process: see the module documentation.
#[derive(Debug)]
pub struct Runtime {
    health: Health,
    token: CancellationToken,
    campaign: Campaign,
    admin_task: JoinHandle<Result<(), AdminError>>,
    lease_task: Option<JoinHandle<()>>,
}

impl Runtime {
    pub fn builder(admin_address: SocketAddr) -> Builder {
        Builder {
            admin_address,
            token: None,
            lease: None,
            health: Health::new(),
        }
    }

    pub fn health(&self) -> &Health {
        &self.health
    }

    /// Cancelled when shutdown begins.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.token.clone()
    }

    pub fn campaign(&self) -> &Campaign {
        &self.campaign
    }

    pub fn leadership(&self) -> Leadership {
        self.campaign.leadership.clone()
    }

    /// Completes when the controllers must stop: shutdown began or the lease was lost.
    pub fn stopping(&self) -> impl Future<Output = ()> + Send + Sync + 'static {
        let (token, campaign) = (self.token.clone(), self.campaign.clone());
        async move {
            tokio::select! {
                _ = token.cancelled() => {}
                _ = campaign.lost() => {}
            }
        }
    }

    /// Wait until this process leads; `false` when shutdown comes first.
    pub async fn wait_to_lead(&self) -> bool {
        self.campaign.wait_to_lead(&self.token).await
    }

    /// A gate named `name`, opened once `ready` completes (unless shutdown comes first).
    pub fn ready_when(&self, name: &str, ready: impl Future<Output = ()> + Send + 'static) {
        let (gate, token) = (self.health.gate(name), self.token.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = ready => gate.set(true),
                _ = token.cancelled() => {}
            }
        });
    }

    /// Run `tick` every `period` until shutdown (for what has no watch to follow).
    pub fn every(&self, period: Duration, mut tick: impl FnMut() + Send + 'static) {
        let token = self.token.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(period) => tick(),
                    _ = token.cancelled() => return,
                }
            }
        });
    }

    /// Serve `router` on `addr` until shutdown, over TLS when `tls` is given (its files are
    /// loaded now, an error if they do not load, and reloaded when they change). The gate
    /// `<what>-server` is open while the server listens.
    pub async fn serve(
        &self,
        what: &'static str,
        addr: SocketAddr,
        tls: Option<TlsFiles>,
        router: axum::Router,
    ) -> Result<(), RuntimeError> {
        let config: Option<RustlsConfig> = match tls {
            Some(f) => Some(tls::reloading(what, f.cert, f.key, self.token.clone()).await?),
            None => None,
        };
        let gate = self.health.gate(&format!("{what}-server"));
        tls::serve(what, addr, config, router, gate, self.token.clone());
        Ok(())
    }

    /// Shut down: stop the servers, release the lease (bounded), wait for the admin server.
    /// `Err(LostLease)` when the process stops because its lease was lost.
    pub async fn finish(self) -> Result<(), RuntimeError> {
        let lost = self.campaign.is_lost() && !self.token.is_cancelled();
        self.token.cancel();
        if let Some(t) = self.lease_task {
            let _ = shutdown::drain(t, RELEASE_GRACE).await;
        }
        self.admin_task.await??;
        if lost {
            return Err(RuntimeError::LostLease);
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn free_addr() -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    }

    #[tokio::test]
    async fn ready_only_after_every_gate_and_finished_on_shutdown() {
        let token = CancellationToken::new();
        let rt = Runtime::builder(free_addr())
            .shutdown_on(token.clone())
            .build(Arc::new(Registry::default()));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        rt.ready_when("caches", async move {
            let _ = rx.await;
        });
        assert!(!rt.health().is_ready());
        assert_eq!(rt.health().waiting_for(), vec!["caches".to_string()]);
        tx.send(()).unwrap();
        for _ in 0..100 {
            if rt.health().is_ready() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(rt.health().is_ready());
        assert!(rt.wait_to_lead().await, "no election: leads at once");
        token.cancel();
        rt.stopping().await;
        rt.finish().await.unwrap();
    }
}
