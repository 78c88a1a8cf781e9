//! The validating admission webhook for ManagedClusterModules: the same rules as
//! `kmm-hub validate` and the reconciler, answered with every violation's field path, and
//! an access check: whoever writes an MCM must be allowed to `get` every Secret and
//! ConfigMap it makes the hub read (in the hub's namespace), checked with a
//! SubjectAccessReview for the requesting user. Otherwise an MCM would be a way to sign
//! with, push with or build with credentials its author cannot read.
//!
//! Metadata-only updates (finalizers, labels) and updates of an MCM being deleted are
//! always admitted: a rule added later must not keep the hub from releasing its finalizer.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use k8s_openapi::api::authentication::v1::UserInfo;
use k8s_openapi::api::authorization::v1::ResourceAttributes;
use kube::Client;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use shared_api::ManagedClusterModule;
use shared_api::refs::{RefKind, hub_refs};
use shared_api::validate::{validate_mcm, validate_update};

pub const MCM_PATH: &str = "/validate-hub-kmm-sigs-x-k8s-io-v1beta1-managedclustermodule";
/// FleetPreflightValidations: upstream's PreflightValidation rule for each kernel.
pub const PREFLIGHT_PATH: &str = "/validate-hub-kmm-sigs-x-k8s-io-v1beta1-fleetpreflightvalidation";

/// A SubjectAccessReview that does not answer in this time denies the request.
pub const ACCESS_REVIEW_TIMEOUT: Duration = Duration::from_secs(5);

/// Why an access question got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    #[error("{0}")]
    Api(#[from] kube::Error),
    #[error("no answer within {}s", .0.as_secs())]
    Timeout(Duration),
}

impl kmm_runtime::ErrorCategory for ReviewError {
    /// A short static category for metrics and logs.
    fn category(&self) -> &'static str {
        match self {
            ReviewError::Api(_) => "kube_api",
            ReviewError::Timeout(_) => "timeout",
        }
    }
}

/// Answers "may this user get this object in this namespace?".
pub trait AccessReviewer: Send + Sync + 'static {
    fn may_get(
        &self,
        user: &UserInfo,
        kind: RefKind,
        namespace: &str,
        name: &str,
    ) -> impl Future<Output = Result<bool, ReviewError>> + Send;
}

/// The API server's answer, by SubjectAccessReview (the hub may `create subjectaccessreviews`).
#[derive(Clone)]
pub struct SarReviewer {
    client: Client,
}

impl SarReviewer {
    pub fn new(client: Client) -> Self {
        Self { client }
    }
}

impl AccessReviewer for SarReviewer {
    async fn may_get(
        &self,
        user: &UserInfo,
        kind: RefKind,
        namespace: &str,
        name: &str,
    ) -> Result<bool, ReviewError> {
        let attributes = ResourceAttributes {
            group: Some(String::new()),
            version: Some("v1".into()),
            resource: Some(kind.resource().into()),
            verb: Some("get".into()),
            namespace: Some(namespace.into()),
            name: Some(name.into()),
            ..Default::default()
        };
        match tokio::time::timeout(
            ACCESS_REVIEW_TIMEOUT,
            crate::access::review(&self.client, user, attributes),
        )
        .await
        {
            Ok(Ok(allowed)) => Ok(allowed),
            Ok(Err(e)) => Err(ReviewError::Api(e)),
            Err(_) => Err(ReviewError::Timeout(ACCESS_REVIEW_TIMEOUT)),
        }
    }
}

/// What the webhook needs: who answers access questions, and where the hub reads Secrets
/// and ConfigMaps.
pub struct WebhookState<R> {
    pub reviewer: R,
    pub namespace: String,
}

pub fn router<R: AccessReviewer>(state: Arc<WebhookState<R>>) -> Router {
    Router::new()
        .route(MCM_PATH, post(review::<R>))
        .route(PREFLIGHT_PATH, post(review_preflight))
        .with_state(state)
}

async fn review<R: AccessReviewer>(
    State(state): State<Arc<WebhookState<R>>>,
    Json(review): Json<AdmissionReview<DynamicObject>>,
) -> Json<AdmissionReview<DynamicObject>> {
    let req: AdmissionRequest<DynamicObject> = match review.try_into() {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "malformed AdmissionReview");
            return Json(
                AdmissionResponse::invalid(format!("malformed AdmissionReview: {e}")).into_review(),
            );
        }
    };
    Json(decide(&req, &state).await.into_review())
}

/// A FleetPreflightValidation: every kernel checked as upstream checks `kernelVersion`.
async fn review_preflight(
    Json(review): Json<AdmissionReview<DynamicObject>>,
) -> Json<AdmissionReview<DynamicObject>> {
    let req: AdmissionRequest<DynamicObject> = match review.try_into() {
        Ok(r) => r,
        Err(e) => {
            return Json(
                AdmissionResponse::invalid(format!("malformed AdmissionReview: {e}")).into_review(),
            );
        }
    };
    Json(decide_preflight(&req).into_review())
}

/// Allow or deny one FleetPreflightValidation request.
pub fn decide_preflight(req: &AdmissionRequest<DynamicObject>) -> AdmissionResponse {
    let resp = AdmissionResponse::from(req);
    if !matches!(req.operation, Operation::Create | Operation::Update) || exempt_update(req) {
        return resp;
    }
    let Some(obj) = &req.object else { return resp };
    let fpv: shared_api::FleetPreflightValidation =
        match serde_json::to_value(obj).and_then(serde_json::from_value) {
            Ok(p) => p,
            Err(e) => return resp.deny(format!("not a FleetPreflightValidation: {e}")),
        };
    let violations: Vec<String> = shared_api::preflight::validate_preflight(&fpv)
        .iter()
        .map(ToString::to_string)
        .collect();
    if violations.is_empty() {
        resp
    } else {
        resp.deny(violations.join("; "))
    }
}

/// Whether an update leaves the spec alone (finalizers, labels, annotations) or touches an
/// object whose deletion has begun: admitted without any check.
fn exempt_update(req: &AdmissionRequest<DynamicObject>) -> bool {
    let (Some(new), Some(old)) = (&req.object, &req.old_object) else {
        return false;
    };
    new.metadata.deletion_timestamp.is_some() || new.data.get("spec") == old.data.get("spec")
}

/// Allow or deny one request.
pub async fn decide<R: AccessReviewer>(
    req: &AdmissionRequest<DynamicObject>,
    state: &WebhookState<R>,
) -> AdmissionResponse {
    let resp = AdmissionResponse::from(req);
    if !matches!(req.operation, Operation::Create | Operation::Update) {
        return resp;
    }
    if req.operation == Operation::Update && exempt_update(req) {
        return resp;
    }
    let Some(obj) = &req.object else { return resp };
    let mcm: ManagedClusterModule = match serde_json::to_value(obj).and_then(serde_json::from_value)
    {
        Ok(m) => m,
        Err(e) => return resp.deny(format!("not a ManagedClusterModule: {e}")),
    };
    let mut violations: Vec<String> = validate_mcm(&mcm).iter().map(ToString::to_string).collect();
    if req.operation == Operation::Update
        && let Some(old) = &req.old_object
        && let Ok(old) =
            serde_json::to_value(old).and_then(serde_json::from_value::<ManagedClusterModule>)
    {
        violations.extend(
            validate_update(
                "spec.moduleSpec",
                &old.spec.module_spec,
                &mcm.spec.module_spec,
            )
            .iter()
            .map(ToString::to_string),
        );
    }
    violations.extend(access_violations(&mcm, &req.user_info, state).await);
    if violations.is_empty() {
        resp
    } else {
        resp.deny(violations.join("; "))
    }
}

/// One line per referenced Secret or ConfigMap the user may not read (every field path
/// that names it). Each distinct object is reviewed once; an unanswered review denies.
async fn access_violations<R: AccessReviewer>(
    mcm: &ManagedClusterModule,
    user: &UserInfo,
    state: &WebhookState<R>,
) -> Vec<String> {
    let mut by_object: BTreeMap<(RefKind, String), Vec<String>> = BTreeMap::new();
    for r in hub_refs(&mcm.spec) {
        // An empty name is a validation error of its own, not "every object".
        if !r.name.is_empty() {
            by_object.entry((r.kind, r.name)).or_default().push(r.path);
        }
    }
    let ns = state.namespace.as_str();
    let who = user.username.as_deref().unwrap_or("");
    let answers = futures::future::join_all(
        by_object
            .iter()
            .map(|((kind, name), _)| state.reviewer.may_get(user, *kind, ns, name)),
    )
    .await;
    let mut out = Vec::new();
    for (((kind, name), paths), answer) in by_object.iter().zip(answers) {
        let what = format!("{} {name:?} in namespace {ns:?}", kind.resource());
        let reason = match answer {
            Ok(true) => continue,
            Ok(false) => format!("user {who:?} may not get {what}"),
            Err(e) => {
                tracing::warn!(user = who, object = %what, error = %e, "access review failed");
                format!("cannot check whether user {who:?} may get {what}: {e}")
            }
        };
        out.extend(paths.iter().map(|p| format!("{p}: {reason}")));
    }
    out
}

#[cfg(test)]
#[path = "webhook_tests.rs"]
mod tests;
