//! The validating admission webhook for ManagedClusterModules: the same rules as
//! `kmm-hub validate` and the reconciler, answered with every violation's field path.

use axum::routing::post;
use axum::{Json, Router};
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use shared_api::ManagedClusterModule;
use shared_api::validate::{validate_mcm, validate_update};

pub const MCM_PATH: &str = "/validate-hub-kmm-sigs-x-k8s-io-v1beta1-managedclustermodule";

pub fn router() -> Router {
    Router::new().route(MCM_PATH, post(review))
}

async fn review(
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
    Json(decide(&req).into_review())
}

/// Allow or deny one request.
pub fn decide(req: &AdmissionRequest<DynamicObject>) -> AdmissionResponse {
    let resp = AdmissionResponse::from(req);
    if !matches!(req.operation, Operation::Create | Operation::Update) {
        return resp;
    }
    let Some(obj) = &req.object else { return resp };
    let mcm: ManagedClusterModule = match serde_json::to_value(obj).and_then(serde_json::from_value)
    {
        Ok(m) => m,
        Err(e) => return resp.deny(format!("not a ManagedClusterModule: {e}")),
    };
    let mut violations = validate_mcm(&mcm);
    if req.operation == Operation::Update
        && let Some(old) = &req.old_object
        && let Ok(old) =
            serde_json::to_value(old).and_then(serde_json::from_value::<ManagedClusterModule>)
    {
        violations.extend(validate_update(
            "spec.moduleSpec",
            &old.spec.module_spec,
            &mcm.spec.module_spec,
        ));
    }
    if violations.is_empty() {
        resp
    } else {
        let msg = violations
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        resp.deny(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use http::Request;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    fn review_json(
        op: &str,
        mcm: serde_json::Value,
        old: Option<serde_json::Value>,
    ) -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {
                "uid": "u1", "operation": op,
                "kind": {"group": "hub.kmm.sigs.x-k8s.io", "version": "v1beta1", "kind": "ManagedClusterModule"},
                "resource": {"group": "hub.kmm.sigs.x-k8s.io", "version": "v1beta1", "resource": "managedclustermodules"},
                "name": "m", "userInfo": {"username": "admin"},
                "object": mcm, "oldObject": old, "dryRun": false
            }
        })
    }

    fn mcm(regexp: &str, version: Option<&str>) -> serde_json::Value {
        let mut container = serde_json::json!({"modprobe": {"moduleName": "m"},
            "kernelMappings": [{"regexp": regexp, "containerImage": "r/x:1"}]});
        if let Some(v) = version {
            container["version"] = serde_json::json!(v);
        }
        serde_json::json!({"apiVersion": "hub.kmm.sigs.x-k8s.io/v1beta1", "kind": "ManagedClusterModule",
            "metadata": {"name": "m"},
            "spec": {"spokeNamespace": "ns", "selector": {}, "moduleSpec": {"selector": {}, "moduleLoader": {"container": container}}}})
    }

    async fn post(body: serde_json::Value) -> (http::StatusCode, serde_json::Value) {
        let resp = router()
            .oneshot(
                Request::post(MCM_PATH)
                    .header("content-type", "application/json")
                    .body(Body::from(body.to_string()))
                    .unwrap(),
            )
            .await
            .unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
        )
    }

    #[tokio::test]
    async fn allows_a_valid_mcm_and_denies_an_invalid_one_with_the_path() {
        let (_, ok) = post(review_json("CREATE", mcm(".*", None), None)).await;
        assert_eq!(ok["response"]["allowed"], true, "{ok}");
        assert_eq!(ok["response"]["uid"], "u1");
        let (_, bad) = post(review_json("CREATE", mcm("(", None), None)).await;
        assert_eq!(bad["response"]["allowed"], false);
        let msg = bad["response"]["status"]["message"].as_str().unwrap();
        assert!(
            msg.contains("spec.moduleSpec.moduleLoader.container.kernelMappings[0].regexp"),
            "{msg}"
        );
    }

    #[tokio::test]
    async fn version_cannot_be_switched_on_update() {
        let (_, r) = post(review_json(
            "UPDATE",
            mcm(".*", Some("1.0")),
            Some(mcm(".*", None)),
        ))
        .await;
        assert_eq!(r["response"]["allowed"], false);
        assert!(
            r["response"]["status"]["message"]
                .as_str()
                .unwrap()
                .contains("delete and re-create")
        );
        let (_, r) = post(review_json("DELETE", mcm("(", None), None)).await;
        assert_eq!(r["response"]["allowed"], true);
    }

    #[tokio::test]
    async fn malformed_requests_are_rejected() {
        let (status, _) = post(serde_json::json!({"nonsense": true})).await;
        assert!(status.is_client_error(), "{status}");
        let (_, r) = post(
            serde_json::json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}),
        )
        .await;
        assert_eq!(r["response"]["allowed"], false, "{r}");
    }
}
