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
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::Client;
use kube::api::{Api, PostParams};
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use shared_api::ManagedClusterModule;
use shared_api::refs::{RefKind, hub_refs};
use shared_api::validate::{validate_mcm, validate_update};

pub const MCM_PATH: &str = "/validate-hub-kmm-sigs-x-k8s-io-v1beta1-managedclustermodule";

/// A SubjectAccessReview that does not answer in this time denies the request.
pub const ACCESS_REVIEW_TIMEOUT: Duration = Duration::from_secs(5);

/// Answers "may this user get this object in this namespace?".
pub trait AccessReviewer: Send + Sync + 'static {
    fn may_get(
        &self,
        user: &UserInfo,
        kind: RefKind,
        namespace: &str,
        name: &str,
    ) -> impl Future<Output = Result<bool, String>> + Send;
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
    ) -> Result<bool, String> {
        let sar = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: user.username.clone(),
                groups: user.groups.clone(),
                uid: user.uid.clone(),
                extra: user.extra.clone(),
                resource_attributes: Some(ResourceAttributes {
                    group: Some(String::new()),
                    version: Some("v1".into()),
                    resource: Some(kind.resource().into()),
                    verb: Some("get".into()),
                    namespace: Some(namespace.into()),
                    name: Some(name.into()),
                    ..Default::default()
                }),
                non_resource_attributes: None,
            },
            ..Default::default()
        };
        let api = Api::<SubjectAccessReview>::all(self.client.clone());
        match tokio::time::timeout(
            ACCESS_REVIEW_TIMEOUT,
            api.create(&PostParams::default(), &sar),
        )
        .await
        {
            Ok(Ok(r)) => Ok(r
                .status
                .is_some_and(|s| s.allowed && !s.denied.unwrap_or(false))),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "no answer within {}s",
                ACCESS_REVIEW_TIMEOUT.as_secs()
            )),
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
mod tests {
    use super::*;
    use axum::body::Body;
    use http::Request;
    use http_body_util::BodyExt;
    use std::sync::Mutex;
    use tower::ServiceExt;

    /// Allows `get` on the listed `resource/name`s; remembers every question.
    #[derive(Default)]
    struct Table {
        allowed: Vec<&'static str>,
        fail: bool,
        asked: Mutex<Vec<String>>,
    }

    impl AccessReviewer for Table {
        async fn may_get(
            &self,
            user: &UserInfo,
            kind: RefKind,
            namespace: &str,
            name: &str,
        ) -> Result<bool, String> {
            let q = format!("{}/{name}", kind.resource());
            if let Ok(mut a) = self.asked.lock() {
                a.push(format!(
                    "{} {namespace} {q}",
                    user.username.as_deref().unwrap_or("")
                ));
            }
            if self.fail {
                return Err("connection refused".into());
            }
            Ok(self.allowed.contains(&q.as_str()))
        }
    }

    fn state(allowed: Vec<&'static str>) -> Arc<WebhookState<Table>> {
        Arc::new(WebhookState {
            reviewer: Table {
                allowed,
                ..Default::default()
            },
            namespace: "kmm-hub".into(),
        })
    }

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
                "name": "m", "userInfo": {"username": "alice", "groups": ["devs"], "uid": "42"},
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

    /// An MCM that signs with `sb-key`/`sb-cert` and pulls with `pull`.
    fn signed_mcm(image: &str) -> serde_json::Value {
        let mut m = mcm(".*", None);
        m["spec"]["moduleSpec"]["imageRepoSecret"] = serde_json::json!({"name": "pull"});
        m["spec"]["moduleSpec"]["moduleLoader"]["container"]["kernelMappings"][0]["containerImage"] =
            serde_json::json!(image);
        m["spec"]["moduleSpec"]["moduleLoader"]["container"]["sign"] = serde_json::json!({
            "keySecret": {"name": "sb-key"}, "certSecret": {"name": "sb-cert"},
            "unsignedImage": "r/unsigned:1", "filesToSign": ["/opt/lib/modules/x/m.ko"]});
        m
    }

    async fn post_to(
        state: Arc<WebhookState<Table>>,
        body: serde_json::Value,
    ) -> (http::StatusCode, serde_json::Value) {
        let resp = router(state)
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

    async fn post(body: serde_json::Value) -> (http::StatusCode, serde_json::Value) {
        post_to(state(vec![]), body).await
    }

    fn message(r: &serde_json::Value) -> String {
        r["response"]["status"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    #[tokio::test]
    async fn allows_a_valid_mcm_and_denies_an_invalid_one_with_the_path() {
        let (_, ok) = post(review_json("CREATE", mcm(".*", None), None)).await;
        assert_eq!(ok["response"]["allowed"], true, "{ok}");
        assert_eq!(ok["response"]["uid"], "u1");
        let (_, bad) = post(review_json("CREATE", mcm("(", None), None)).await;
        assert_eq!(bad["response"]["allowed"], false);
        let msg = message(&bad);
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
        assert!(message(&r).contains("delete and re-create"));
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

    #[tokio::test]
    async fn every_referenced_secret_needs_get_for_the_requesting_user() {
        // Allowed the pull secret and the certificate, not the key.
        let st = state(vec!["secrets/pull", "secrets/sb-cert"]);
        let (_, r) = post_to(st.clone(), review_json("CREATE", signed_mcm("r/x:1"), None)).await;
        assert_eq!(r["response"]["allowed"], false, "{r}");
        assert_eq!(
            message(&r),
            "spec.moduleSpec.moduleLoader.container.sign.keySecret.name: \
             user \"alice\" may not get secrets \"sb-key\" in namespace \"kmm-hub\""
        );
        let mut asked = st.reviewer.asked.lock().unwrap().clone();
        asked.sort();
        assert_eq!(
            asked,
            vec![
                "alice kmm-hub secrets/pull",
                "alice kmm-hub secrets/sb-cert",
                "alice kmm-hub secrets/sb-key",
            ]
        );

        // With all three, admitted.
        let st = state(vec!["secrets/pull", "secrets/sb-cert", "secrets/sb-key"]);
        let (_, r) = post_to(st, review_json("CREATE", signed_mcm("r/x:1"), None)).await;
        assert_eq!(r["response"]["allowed"], true, "{r}");

        // A Dockerfile ConfigMap and build secrets are checked too, per path.
        let mut m = mcm(".*", None);
        m["spec"]["moduleSpec"]["moduleLoader"]["container"]["kernelMappings"][0]["build"] = serde_json::json!({
            "dockerfileConfigMap": {"name": "df"}, "secrets": [{"name": "git"}]});
        let (_, r) = post_to(state(vec!["secrets/git"]), review_json("CREATE", m, None)).await;
        assert_eq!(
            message(&r),
            "spec.moduleSpec.moduleLoader.container.kernelMappings[0].build.dockerfileConfigMap.name: \
             user \"alice\" may not get configmaps \"df\" in namespace \"kmm-hub\""
        );
    }

    #[tokio::test]
    async fn an_unanswered_access_review_denies() {
        let st = Arc::new(WebhookState {
            reviewer: Table {
                fail: true,
                ..Default::default()
            },
            namespace: "kmm-hub".into(),
        });
        let (_, r) = post_to(st, review_json("CREATE", signed_mcm("r/x:1"), None)).await;
        assert_eq!(r["response"]["allowed"], false);
        assert!(
            message(&r).contains("cannot check whether user \"alice\" may get secrets \"sb-key\""),
            "{r}"
        );
    }

    #[tokio::test]
    async fn spec_updates_are_checked_again() {
        // Pointing the fleet's key at another image is a new use of the key.
        let st = state(vec!["secrets/pull", "secrets/sb-cert"]);
        let (_, r) = post_to(
            st,
            review_json("UPDATE", signed_mcm("r/other:1"), Some(signed_mcm("r/x:1"))),
        )
        .await;
        assert_eq!(r["response"]["allowed"], false, "{r}");
        assert!(message(&r).contains("sign.keySecret.name"));
    }

    #[tokio::test]
    async fn metadata_updates_and_deletion_pass_whatever_the_spec() {
        // Invalid and referencing a key nobody may read: the hub still takes its finalizer off.
        let mut old = signed_mcm("r/x:1");
        old["spec"]["moduleSpec"]["moduleLoader"]["container"]["kernelMappings"][0]["regexp"] =
            serde_json::json!("(");
        let mut new = old.clone();
        new["metadata"]["finalizers"] = serde_json::json!(["kmm.node.kubernetes.io/hub-finalizer"]);
        new["metadata"]["labels"] = serde_json::json!({"team": "a"});
        let st = state(vec![]);
        let (_, r) = post_to(
            st.clone(),
            review_json("UPDATE", new.clone(), Some(old.clone())),
        )
        .await;
        assert_eq!(r["response"]["allowed"], true, "{r}");
        assert!(
            st.reviewer.asked.lock().unwrap().is_empty(),
            "no review for metadata"
        );

        // Being deleted: even a spec difference (e.g. a defaulted field) passes.
        let mut deleting = new.clone();
        deleting["metadata"]["deletionTimestamp"] = serde_json::json!("2025-01-01T00:00:00Z");
        deleting["metadata"]["finalizers"] = serde_json::json!([]);
        deleting["spec"]["selector"] = serde_json::json!({"x": "y"});
        let (_, r) = post_to(st.clone(), review_json("UPDATE", deleting, Some(new))).await;
        assert_eq!(r["response"]["allowed"], true, "{r}");

        // A spec change of the same object is judged.
        let mut changed = old.clone();
        changed["spec"]["selector"] = serde_json::json!({"x": "y"});
        let (_, r) = post_to(st, review_json("UPDATE", changed, Some(old))).await;
        assert_eq!(r["response"]["allowed"], false, "{r}");
    }
}
