//! The read endpoints: MCMs, clusters, events.

use super::*;

#[tokio::test]
async fn lists_mcms_with_counts_conditions_selector_and_images() {
    let (router, _) = fixture().router();
    let (status, body) = get_json(&router, "/api/v1/managedclustermodules", Some(VIEWER)).await;
    assert_eq!(status, StatusCode::OK);
    let items = body["items"].as_array().expect("items");
    assert_eq!(
        items.iter().map(|i| i["name"].as_str()).collect::<Vec<_>>(),
        vec![Some("everywhere"), Some("kmm-ci-a")]
    );
    let a = &items[1];
    assert_eq!(
        a["counts"],
        json!({"selected": 3, "desired": 2, "applied": 2, "available": 1, "degraded": 0})
    );
    assert_eq!(a["selector"], json!({"env": "prod"}));
    assert_eq!(a["spokeNamespace"], "kmm-labs");
    assert_eq!(a["observedGeneration"], 2);
    assert_eq!(a["conditions"][0]["type"], "Ready");
    assert_eq!(a["conditions"][0]["status"], "False");
    assert_eq!(
        a["images"],
        json!({"total": 2, "ready": 1, "pending": 0, "building": 0, "signing": 0, "missing": 1, "failed": 0, "omitted": 0})
    );
    let all = &items[0];
    assert_eq!(
        all["counts"],
        json!({"selected": 4, "desired": 0, "applied": 0, "available": 0, "degraded": 0}),
        "no status yet"
    );
}

#[tokio::test]
async fn mcm_detail_per_cluster_and_kernel() {
    let (router, _) = fixture().router();
    let (status, body) = get_json(
        &router,
        "/api/v1/managedclustermodules/kmm-ci-a",
        Some(VIEWER),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["name"], "kmm-ci-a");
    assert_eq!(body["reconciled"], true);
    assert_eq!(body["lastError"], "an image is missing");
    let clusters: BTreeMap<&str, &Value> = body["clusters"]
        .as_array()
        .expect("clusters")
        .iter()
        .map(|c| (c["name"].as_str().unwrap_or(""), c))
        .collect();
    assert_eq!(
        clusters.keys().copied().collect::<Vec<_>>(),
        vec!["spoke-1", "spoke-2", "spoke-4", "spoke-gone"]
    );

    let s1 = clusters["spoke-1"];
    assert_eq!(s1["phase"], "Available");
    assert_eq!(s1["kernels"][0]["kernel"], K1);
    assert_eq!(s1["kernels"][0]["digest"], D1);
    assert_eq!(
        s1["kernels"][0]["pinnedImage"],
        format!("registry.test/kmm/kmm-ci-a@{D1}")
    );
    assert_eq!(
        s1["work"]["feedback"]["moduleLoader"],
        json!({"nodesMatching": 2, "desired": 2, "available": 2})
    );
    assert_eq!(s1["work"]["feedback"]["devicePlugin"], Value::Null);
    assert_eq!(s1["work"]["conditions"][0]["type"], "Applied");
    assert_eq!(s1["work"]["moduleAvailable"], true);

    let s2 = clusters["spoke-2"];
    assert_eq!(s2["phase"], "Waiting");
    assert_eq!(
        s2["problem"],
        json!({"reason": "ImagesPending", "message": "waiting for image(s)"})
    );
    assert_eq!(s2["kernels"][1]["state"], "Missing");
    assert_eq!(s2["kernels"][1]["digest"], Value::Null);
    assert_eq!(s2["work"]["feedback"]["moduleLoader"]["available"], 1);

    assert_eq!(
        clusters["spoke-4"]["phase"], "Pending",
        "selected, not reconciled yet"
    );
    assert_eq!(clusters["spoke-4"]["work"], Value::Null);
    assert_eq!(clusters["spoke-gone"]["phase"], "Removing");
    assert_eq!(clusters["spoke-gone"]["selected"], false);

    // The progressive rollout: the MCM's, and each cluster's place in it.
    assert_eq!(s1["rolloutState"], "Updated");
    assert_eq!(s2["rolloutState"], "Pending");
    assert_eq!(clusters["spoke-4"]["rolloutState"], Value::Null);
    assert_eq!(
        (
            &body["rollout"]["revision"],
            &body["rollout"]["phase"],
            &body["rollout"]["updated"],
            &body["rollout"]["pending"],
            &body["rollout"]["wave"]
        ),
        (
            &json!("0123456789"),
            &json!("Progressing"),
            &json!(1),
            &json!(1),
            &json!(2)
        )
    );

    let plan = body["imagePlan"].as_array().expect("imagePlan");
    assert_eq!(plan.len(), 2);
    assert_eq!(plan[1]["state"], "Missing");
    assert_eq!(plan[1]["reason"], "not in the registry");
    assert_eq!(plan[0]["digest"], D1);
}

#[tokio::test]
async fn mcm_not_reconciled_yet_lists_selected_clusters_as_pending() {
    let (router, _) = fixture().router();
    let (status, body) = get_json(
        &router,
        "/api/v1/managedclustermodules/everywhere",
        Some(VIEWER),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["reconciled"], false);
    let phases: Vec<(&str, &str)> = body["clusters"]
        .as_array()
        .expect("clusters")
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap_or(""),
                c["phase"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        phases,
        vec![
            ("spoke-1", "Pending"),
            ("spoke-2", "Pending"),
            ("spoke-3", "Pending"),
            ("spoke-4", "Pending")
        ]
    );
}

#[tokio::test]
async fn unknown_mcm_is_404_json() {
    let (router, _) = fixture().router();
    let (status, body) =
        get_json(&router, "/api/v1/managedclustermodules/nope", Some(VIEWER)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"], "not_found");
    assert!(
        body["reason"].as_str().is_some_and(|r| r.contains("nope")),
        "{body}"
    );
}

#[tokio::test]
async fn malformed_names_and_queries_are_400_json() {
    let (router, _) = fixture().router();
    for path in [
        "/api/v1/managedclustermodules/Not_A_Name",
        "/api/v1/managedclustermodules/%FF%FE",
        "/api/v1/events?limit=many",
    ] {
        let (status, body) = get_json(&router, path, Some(VIEWER)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {body}");
        assert_eq!(body["error"], "bad_request", "{path}");
    }
}

#[tokio::test]
async fn clusters_with_labels_kernels_and_the_mcms_selecting_them() {
    let (router, _) = fixture().router();
    let (status, body) = get_json(&router, "/api/v1/clusters", Some(VIEWER)).await;
    assert_eq!(status, StatusCode::OK);
    let items = body["items"].as_array().expect("items");
    assert_eq!(items.len(), 4);
    assert_eq!(items[1]["name"], "spoke-2");
    assert_eq!(items[1]["kernels"], json!([K1, K2]));
    assert_eq!(items[1]["kernelClaim"], true);
    assert_eq!(items[1]["labels"]["env"], "prod");
    assert_eq!(
        items[1]["managedClusterModules"],
        json!(["everywhere", "kmm-ci-a"])
    );
    assert_eq!(items[2]["name"], "spoke-3");
    assert_eq!(items[2]["kernelClaim"], false);
    assert_eq!(items[2]["managedClusterModules"], json!(["everywhere"]));
}

#[tokio::test]
async fn events_newest_first_with_limit_and_name() {
    let (router, _) = fixture().router();
    let (status, body) = get_json(&router, "/api/v1/events", Some(VIEWER)).await;
    assert_eq!(status, StatusCode::OK);
    let messages: Vec<&str> = body["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|e| e["message"].as_str())
        .collect();
    assert_eq!(messages, vec!["event 2", "event 1", "event 0"]);
    assert_eq!(body["items"][0]["type"], "Normal");
    let (_, body) = get_json(
        &router,
        "/api/v1/events?limit=1&name=kmm-ci-a",
        Some(VIEWER),
    )
    .await;
    assert_eq!(body["items"].as_array().map(Vec::len), Some(1));
    assert_eq!(body["items"][0]["message"], "event 2");
    let (_, body) = get_json(&router, "/api/v1/events?name=everywhere", Some(VIEWER)).await;
    assert_eq!(body["items"][0]["reason"], "ManifestWorksDeleted");
}
