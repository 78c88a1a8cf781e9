//! The admin HTTP server: `/livez`, `/readyz` and `/metrics` on one port.
//!
//! `/readyz` starts unready. Each thing readiness waits for (a synced cache, a held lease)
//! registers a [`ReadyGate`] with [`Health::gate`]; the process is ready only when every gate
//! is open. `/metrics` renders the one prometheus-client [`Registry`] made in `main`.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::registry::Registry;

/// The content type of the OpenMetrics text format.
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot bind the admin server to {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("admin server failed: {0}")]
    Serve(std::io::Error),
}

impl crate::ErrorCategory for AdminError {
    fn category(&self) -> &'static str {
        match self {
            AdminError::Bind { .. } => "bind",
            AdminError::Serve(_) => "serve",
        }
    }
}

/// Liveness and readiness of the process. Cheap to clone; all clones share state.
#[derive(Clone, Default)]
pub struct Health {
    inner: Arc<HealthInner>,
}

#[derive(Default)]
struct HealthInner {
    gates: Mutex<BTreeMap<String, bool>>,
    dead: AtomicBool,
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health")
            .field("ready", &self.is_ready())
            .finish()
    }
}

impl Health {
    pub fn new() -> Self {
        Self::default()
    }

    /// Register a readiness gate, closed (unready) until [`ReadyGate::set`]`(true)`.
    /// Registering the same name twice returns handles to the same gate.
    pub fn gate(&self, name: &str) -> ReadyGate {
        self.lock().entry(name.to_string()).or_insert(false);
        ReadyGate {
            name: name.to_string(),
            health: self.clone(),
        }
    }

    /// Ready when at least one gate exists and every gate is open.
    pub fn is_ready(&self) -> bool {
        let gates = self.lock();
        !gates.is_empty()
            && gates.values().all(|open| *open)
            && !self.inner.dead.load(Ordering::Relaxed)
    }

    /// The names of the gates still closed.
    pub fn waiting_for(&self) -> Vec<String> {
        self.lock()
            .iter()
            .filter(|(_, open)| !**open)
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Mark the process as failed: `/livez` answers 503 from now on (so the kubelet restarts it).
    pub fn set_dead(&self) {
        self.inner.dead.store(true, Ordering::Relaxed);
    }

    pub fn is_live(&self) -> bool {
        !self.inner.dead.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, bool>> {
        // A poisoned map of booleans is still a valid map.
        self.inner.gates.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One readiness condition. Dropping the handle leaves the gate as it is.
#[derive(Clone, Debug)]
pub struct ReadyGate {
    name: String,
    health: Health,
}

impl ReadyGate {
    pub fn set(&self, open: bool) {
        self.health.lock().insert(self.name.clone(), open);
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

#[derive(Clone)]
struct AdminState {
    health: Health,
    registry: Arc<Registry>,
}

/// The admin routes. Tested with `tower::ServiceExt::oneshot`, served by [`serve`].
pub fn router(health: Health, registry: Arc<Registry>) -> Router {
    Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(AdminState { health, registry })
}

async fn livez(State(s): State<AdminState>) -> Response {
    if s.health.is_live() {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "failed\n").into_response()
    }
}

async fn readyz(State(s): State<AdminState>) -> Response {
    if s.health.is_ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        let waiting = s.health.waiting_for();
        let body = if waiting.is_empty() {
            "not ready\n".to_string()
        } else {
            format!("not ready; waiting for: {}\n", waiting.join(", "))
        };
        (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
    }
}

async fn metrics(State(s): State<AdminState>) -> Response {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &s.registry) {
        Ok(()) => ([(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)], body).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot encode metrics");
            (StatusCode::INTERNAL_SERVER_ERROR, "cannot encode metrics\n").into_response()
        }
    }
}

/// Bind `addr` and serve `router` until `shutdown` completes. Returns the bound address
/// through `on_bound` (useful with port 0) before serving.
pub async fn serve(
    addr: SocketAddr,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_bound: impl FnOnce(SocketAddr),
) -> Result<(), AdminError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| AdminError::Bind { addr, source })?;
    let local = listener.local_addr().map_err(AdminError::Serve)?;
    on_bound(local);
    tracing::info!(addr = %local, "admin server listening");
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(AdminError::Serve)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use prometheus_client::metrics::counter::Counter;
    use tower::ServiceExt;

    async fn get(router: &Router, path: &str) -> (StatusCode, String) {
        let resp = router
            .clone()
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn ready_only_when_every_gate_is_open() {
        let health = Health::new();
        let router = router(health.clone(), Arc::new(Registry::default()));
        assert_eq!(
            get(&router, "/readyz").await.0,
            StatusCode::SERVICE_UNAVAILABLE,
            "no gate yet: unready"
        );
        let caches = health.gate("caches");
        let lease = health.gate("lease");
        let (code, body) = get(&router, "/readyz").await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("caches") && body.contains("lease"), "{body}");
        caches.set(true);
        assert_eq!(
            get(&router, "/readyz").await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        lease.set(true);
        assert_eq!(get(&router, "/readyz").await.0, StatusCode::OK);
        lease.set(false);
        assert_eq!(
            get(&router, "/readyz").await.0,
            StatusCode::SERVICE_UNAVAILABLE,
            "losing the lease makes it unready"
        );
        assert_eq!(get(&router, "/livez").await.0, StatusCode::OK);
        health.set_dead();
        assert_eq!(
            get(&router, "/livez").await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[tokio::test]
    async fn metrics_render_the_registry() {
        let mut registry = Registry::default();
        let c = Counter::<u64>::default();
        registry.register("kmm_test_things", "Things", c.clone());
        c.inc();
        let router = router(Health::new(), Arc::new(registry));
        let (code, body) = get(&router, "/metrics").await;
        assert_eq!(code, StatusCode::OK);
        assert!(body.contains("kmm_test_things_total 1"), "{body}");
        assert!(body.ends_with("# EOF\n"), "{body}");
    }
}
