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
    ) -> Result<bool, ReviewError> {
        let q = format!("{}/{name}", kind.resource());
        if let Ok(mut a) = self.asked.lock() {
            a.push(format!(
                "{} {namespace} {q}",
                user.username.as_deref().unwrap_or("")
            ));
        }
        if self.fail {
            return Err(ReviewError::Timeout(ACCESS_REVIEW_TIMEOUT));
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
async fn a_bad_rollout_strategy_is_denied_with_the_path() {
    let mut m = mcm(".*", None);
    m["spec"]["rolloutStrategy"] = serde_json::json!({"type": "Progressive",
        "progressive": {"maxConcurrency": "120%", "progressDeadline": "later"}});
    let (_, r) = post(review_json("CREATE", m.clone(), None)).await;
    assert_eq!(r["response"]["allowed"], false, "{r}");
    let msg = message(&r);
    assert!(
        msg.contains("spec.rolloutStrategy.progressive.maxConcurrency")
            && msg.contains("spec.rolloutStrategy.progressive.progressDeadline"),
        "{msg}"
    );
    m["spec"]["rolloutStrategy"]["progressive"] =
        serde_json::json!({"maxConcurrency": "20%", "progressDeadline": "10m"});
    let (_, r) = post(review_json("CREATE", m, None)).await;
    assert_eq!(r["response"]["allowed"], true, "{r}");
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
    let (_, r) =
        post(serde_json::json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}))
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

/// FleetPreflightValidations: each kernel as upstream's PreflightValidation checks it, with
/// its index in the field path.
#[tokio::test]
async fn preflight_kernels_are_checked_with_their_path() {
    let fpv = |kernels: serde_json::Value| {
        let mut r = review_json(
            "CREATE",
            serde_json::json!({"apiVersion": "hub.kmm.sigs.x-k8s.io/v1beta1",
                "kind": "FleetPreflightValidation", "metadata": {"name": "next"},
                "spec": {"kernelVersions": kernels}}),
            None,
        );
        r["request"]["kind"]["kind"] = serde_json::json!("FleetPreflightValidation");
        r["request"]["resource"]["resource"] = serde_json::json!("fleetpreflightvalidations");
        r
    };
    let send = |body: serde_json::Value| async move {
        let resp = router(state(vec![]))
            .oneshot(
                Request::post(PREFLIGHT_PATH)
                    .header("content-type", "application/json")
                    .body(Body::from(body.to_string()))
                    .unwrap(),
            )
            .await
            .unwrap();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice::<serde_json::Value>(&bytes).unwrap()
    };
    let ok = send(fpv(serde_json::json!(["5.14.0-570.el9.x86_64"]))).await;
    assert_eq!(ok["response"]["allowed"], true, "{ok}");
    let bad = send(fpv(serde_json::json!(["6.1.0-13-amd64", "6.1"]))).await;
    assert_eq!(bad["response"]["allowed"], false, "{bad}");
    let msg = message(&bad);
    assert!(msg.contains("spec.kernelVersions[1]"), "{msg}");
    assert!(!msg.contains("[0]"), "{msg}");
}
