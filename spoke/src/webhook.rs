//! The spoke's validating admission webhook (off unless `--webhook-address` is given):
//!
//! - Modules, on create and update: the rules the agent applies (`shared_api::validate`, with
//!   this cluster's Kubernetes version), every violation with its field path. Metadata-only
//!   updates (finalizers, labels) and updates of a Module being deleted are always admitted,
//!   so a rule added later never keeps the agent from releasing its finalizer.
//! - Namespaces, on delete: refused while the namespace still holds Modules, naming them (as
//!   upstream). The webhook configuration selects only namespaces labelled
//!   `kmm.node.k8s.io/contains-modules` (the agent sets it, [`crate::controller::namespace_label`]);
//!   the Modules are listed from the API server, so a stale label admits rather than refuses.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use kmm_runtime::admin::Health;
use kmm_runtime::shutdown::CancellationToken;
use kmm_runtime::tls;
use kube::api::{Api, ListParams};
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use kube::{Client, ResourceExt};
use shared_api::Module;
use shared_api::validate::{self, validate_module, validate_update};

/// Upstream's path of the Module validator.
pub const MODULE_PATH: &str = "/validate-kmm-sigs-x-k8s-io-v1beta1-module";
/// Upstream's path of the namespace-deletion guard.
pub const NAMESPACE_PATH: &str = "/validate--v1-namespace";

/// A Module listing that does not answer in this time refuses the deletion.
pub const LIST_TIMEOUT: Duration = Duration::from_secs(5);

/// How many Module names a refusal lists before "and N more".
const NAMES_SHOWN: usize = 10;

/// Why the Modules of a namespace could not be listed.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("listing Modules: {0}")]
    List(#[from] kube::Error),
    #[error("listing Modules: no answer within {}s", .0.as_secs())]
    Timeout(Duration),
}

impl kmm_runtime::ErrorCategory for WebhookError {
    fn category(&self) -> &'static str {
        match self {
            WebhookError::List(_) => "kube_api",
            WebhookError::Timeout(_) => "timeout",
        }
    }
}

/// What the webhook needs: a client to list Modules, and the server's minor version for the
/// rules that depend on it (DRA).
pub struct WebhookState {
    pub client: Client,
    pub kubernetes_minor: Option<u32>,
}

impl WebhookState {
    /// Ask the API server for its version (unknown for an unstamped build, as in the agent).
    pub async fn new(client: Client) -> Result<Self, kube::Error> {
        let info = client.apiserver_version().await?;
        let kubernetes_minor = if info.major == "1" {
            crate::controller::parse_minor(&info.minor)
        } else {
            None
        };
        Ok(Self {
            client,
            kubernetes_minor,
        })
    }
}

pub fn router(state: Arc<WebhookState>) -> Router {
    Router::new()
        .route(MODULE_PATH, post(review_module))
        .route(NAMESPACE_PATH, post(review_namespace))
        .with_state(state)
}

/// Serve `router` with TLS on `addr` once `cert` and `key` exist (the Deployment mounts them
/// from an optional Secret), until `token` is cancelled. Until then the agent runs without its
/// webhook and stays ready; once serving, the `webhook-server` readiness gate follows the
/// server. A pair that does not load is retried until one does.
pub async fn serve_when_certified(
    addr: SocketAddr,
    cert: PathBuf,
    key: PathBuf,
    router: Router,
    health: Health,
    token: CancellationToken,
) {
    let mut reported = false;
    let config = loop {
        if cert.is_file() && key.is_file() {
            match tls::reloading("webhook", cert.clone(), key.clone(), token.clone()).await {
                Ok(config) => break config,
                Err(e) if !reported => {
                    tracing::warn!(error = %e, category = kmm_runtime::ErrorCategory::category(&e), "webhook certificate does not load; retrying");
                    reported = true;
                }
                Err(_) => {}
            }
        } else if !reported {
            tracing::warn!(cert = %cert.display(), key = %key.display(), "no webhook certificate yet: the webhook starts once both files exist");
            reported = true;
        }
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep(tls::POLL) => {}
        }
    };
    tls::serve(
        "webhook",
        addr,
        Some(config),
        router,
        health.gate("webhook-server"),
        token,
    );
}

fn parse(
    review: AdmissionReview<DynamicObject>,
) -> Result<AdmissionRequest<DynamicObject>, Box<AdmissionResponse>> {
    review.try_into().map_err(|e| {
        tracing::warn!(error = %e, "malformed AdmissionReview");
        Box::new(AdmissionResponse::invalid(format!(
            "malformed AdmissionReview: {e}"
        )))
    })
}

async fn review_module(
    State(state): State<Arc<WebhookState>>,
    Json(review): Json<AdmissionReview<DynamicObject>>,
) -> Json<AdmissionReview<DynamicObject>> {
    let resp = match parse(review) {
        Ok(req) => decide_module(&req, state.kubernetes_minor),
        Err(resp) => *resp,
    };
    Json(resp.into_review())
}

async fn review_namespace(
    State(state): State<Arc<WebhookState>>,
    Json(review): Json<AdmissionReview<DynamicObject>>,
) -> Json<AdmissionReview<DynamicObject>> {
    let req = match parse(review) {
        Ok(req) => req,
        Err(resp) => return Json((*resp).into_review()),
    };
    if req.operation != Operation::Delete {
        return Json(AdmissionResponse::from(&req).into_review());
    }
    let listed = modules_in(&state.client, &req.name).await;
    if let Err(e) = &listed {
        tracing::warn!(namespace = %req.name, error = %e, category = kmm_runtime::ErrorCategory::category(e), "namespace deletion refused: cannot list its Modules");
    }
    Json(decide_namespace(&req, listed).into_review())
}

/// The names of the Modules in `namespace`, from the API server.
pub async fn modules_in(client: &Client, namespace: &str) -> Result<Vec<String>, WebhookError> {
    let api: Api<Module> = Api::namespaced(client.clone(), namespace);
    match tokio::time::timeout(LIST_TIMEOUT, api.list_metadata(&ListParams::default())).await {
        Ok(Ok(list)) => Ok(list.items.iter().map(ResourceExt::name_any).collect()),
        Ok(Err(e)) => Err(WebhookError::List(e)),
        Err(_) => Err(WebhookError::Timeout(LIST_TIMEOUT)),
    }
}

/// Allow or refuse the deletion of the namespace `req.name`, given its Modules.
pub fn decide_namespace(
    req: &AdmissionRequest<DynamicObject>,
    modules: Result<Vec<String>, WebhookError>,
) -> AdmissionResponse {
    let resp = AdmissionResponse::from(req);
    let ns = &req.name;
    match modules {
        Ok(names) if names.is_empty() => resp,
        Ok(mut names) => {
            names.sort();
            let more = names.len().saturating_sub(NAMES_SHOWN);
            names.truncate(NAMES_SHOWN);
            let mut list = names.join(", ");
            if more > 0 {
                list.push_str(&format!(" and {more} more"));
            }
            resp.deny(format!(
                "namespace {ns} still holds Modules ({list}); delete them first and wait until they are gone (kmm-spoke unloads their kernel modules), then delete the namespace"
            ))
        }
        Err(e) => resp.deny(format!(
            "cannot tell whether namespace {ns} still holds Modules: {e}"
        )),
    }
}

/// Whether an update leaves the spec alone (finalizers, labels, annotations, status) or
/// touches a Module whose deletion has begun: admitted without any check.
fn exempt_update(req: &AdmissionRequest<DynamicObject>) -> bool {
    let (Some(new), Some(old)) = (&req.object, &req.old_object) else {
        return false;
    };
    new.metadata.deletion_timestamp.is_some() || new.data.get("spec") == old.data.get("spec")
}

fn as_module(obj: &DynamicObject) -> Result<Module, serde_json::Error> {
    serde_json::to_value(obj).and_then(serde_json::from_value)
}

/// Allow or deny the creation or update of a Module.
pub fn decide_module(
    req: &AdmissionRequest<DynamicObject>,
    kubernetes_minor: Option<u32>,
) -> AdmissionResponse {
    let resp = AdmissionResponse::from(req);
    if !matches!(req.operation, Operation::Create | Operation::Update)
        || (req.operation == Operation::Update && exempt_update(req))
    {
        return resp;
    }
    let Some(obj) = &req.object else { return resp };
    let mut module = match as_module(obj) {
        Ok(m) => m,
        Err(e) => return resp.deny(format!("not a Module: {e}")),
    };
    // On create the object may not carry its namespace yet; the request does.
    if module.metadata.namespace.is_none() {
        module.metadata.namespace = req.namespace.clone();
    }
    let mut violations = validate_module(&module, validate::Context { kubernetes_minor });
    if req.operation == Operation::Update
        && let Some(Ok(old)) = req.old_object.as_ref().map(as_module)
    {
        violations.extend(validate_update("spec", &old.spec, &module.spec));
    }
    if violations.is_empty() {
        resp
    } else {
        let msg: Vec<String> = violations.iter().map(ToString::to_string).collect();
        resp.deny(msg.join("; "))
    }
}

#[cfg(test)]
#[path = "webhook_tests.rs"]
mod tests;
