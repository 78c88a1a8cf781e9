//! The hub dashboard: an authenticated, read-only fleet API, a web page and a live stream,
//! answered from the controller's caches.
//!
//! - `api`: the JSON endpoints; `model`: their shapes; `openapi`: the document describing them.
//! - `auth`: bearer token → TokenReview (dashboard audience) → SubjectAccessReviews, with a
//!   short decision cache; stream tickets; a limit on failed authentication per client.
//! - `sse`: the change stream; `page`: the embedded web page.
//!
//! See docs/dashboard.md.

mod api;
pub mod auth;
mod error;
pub mod model;
pub mod openapi;
mod page;
mod sse;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use axum::Router;
use axum::middleware::from_fn_with_state;
use axum::routing::{get, post};
use kube::Client;
use kube::runtime::reflector::Store;
use shared_api::ManagedClusterModule;

pub use auth::Authenticator;
pub use error::ApiError;

use crate::cache::Caches;
use crate::last_decisions::Views;

/// What the dashboard reads: the controller's caches, never the API server per request
/// (only TokenReview/SubjectAccessReview to authenticate callers).
#[derive(Clone)]
pub struct DashboardState {
    pub caches: Arc<Caches>,
    pub views: Arc<Views>,
    pub mcms: Store<ManagedClusterModule>,
    /// For TokenReview and SubjectAccessReview.
    pub client: Client,
    /// The audience dashboard tokens must be issued for.
    pub audience: String,
}

/// What the handlers share.
#[derive(Clone)]
struct AppState {
    fleet: DashboardState,
    auth: Arc<Authenticator>,
}

/// The dashboard, authenticating callers against the hub's API server.
pub fn router(state: DashboardState) -> Router {
    let auth = Arc::new(Authenticator::kubernetes(
        state.client.clone(),
        state.audience.clone(),
    ));
    router_with(state, auth)
}

/// The dashboard with a given authenticator (router tests use a fixed table).
fn router_with(fleet: DashboardState, auth: Arc<Authenticator>) -> Router {
    let state = AppState { fleet, auth };
    let data = Router::new()
        .route("/managedclustermodules", get(api::list_mcms))
        .route("/stream/tickets", post(auth::issue_ticket))
        .route_layer(from_fn_with_state(state.clone(), auth::require_viewer));
    // What names clusters: the inventory, an MCM's per-cluster rollout, the events.
    let inventory = Router::new()
        .route("/managedclustermodules/{name}", get(api::get_mcm))
        .route("/clusters", get(api::list_clusters))
        .route("/events", get(api::list_events))
        .route_layer(from_fn_with_state(
            state.clone(),
            auth::require_inventory_viewer,
        ));
    let stream = Router::new()
        .route("/stream", get(sse::stream))
        .route_layer(from_fn_with_state(
            state.clone(),
            auth::require_stream_viewer,
        ));
    let v1 = Router::new()
        .merge(data)
        .merge(inventory)
        .merge(stream)
        .route("/openapi.json", get(openapi::serve));
    Router::new()
        .nest("/api/v1", v1)
        .route("/", get(page::index))
        .route("/app.js", get(page::script))
        .route("/style.css", get(page::style))
        .fallback(|| async { ApiError::NoSuchPath })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .with_state(state)
}
