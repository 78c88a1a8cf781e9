//! Router tests: every endpoint through `oneshot`, the caches, views and MCM store filled
//! directly, authentication by a fixed table (and the real TokenReview path against an
//! unreachable API server for the 503).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use http_body_util::BodyExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::runtime::reflector::store::Writer;
use kube::runtime::watcher;
use serde_json::{Value, json};
use shared_api::ManagedClusterModule;
use shared_api::mcm::{ClusterProblem, ImageState, ImageStatus, ManagedClusterModuleStatus};
use tower::ServiceExt;

use super::auth::{Authenticator, Decision, table::Calls};
use super::{DashboardState, router, router_with};
use crate::cache::{Caches, RecentEvent, WorkEntry};
use crate::decide::plan::ClusterFacts;
use crate::last_decisions::{ClusterView, KernelView, McmView, Views};

const VIEWER: &str = "viewer-token";
const OUTSIDER: &str = "outsider-token";
/// May list MCMs but not ManagedClusters.
const MCM_ONLY: &str = "mcm-only-token";
const K1: &str = "5.14.0-284.36.1.el9_2.x86_64";
const K2: &str = "6.1.0-13-amd64";
const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

/// A client whose every request fails, as if the API server were down.
fn unreachable_client() -> Client {
    let svc = tower::service_fn(|_req: http::Request<kube::client::Body>| async {
        Err::<http::Response<kube::client::Body>, std::io::Error>(std::io::Error::other(
            "secret-internal-detail: connection refused",
        ))
    });
    Client::new(svc, "default")
}

fn condition(type_: &str, status: bool, reason: &str) -> Condition {
    Condition {
        type_: type_.into(),
        status: if status { "True" } else { "False" }.into(),
        reason: reason.into(),
        message: format!("{type_} is {status}"),
        last_transition_time: Time(Timestamp::UNIX_EPOCH),
        observed_generation: Some(1),
    }
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn mcm(
    name: &str,
    selector: &[(&str, &str)],
    status: Option<ManagedClusterModuleStatus>,
) -> ManagedClusterModule {
    let mut m: ManagedClusterModule = serde_json::from_value(json!({
        "apiVersion": "hub.kmm.sigs.x-k8s.io/v1beta1", "kind": "ManagedClusterModule",
        "metadata": {"name": name, "generation": 2},
        "spec": {"spokeNamespace": "kmm-labs", "selector": labels(selector), "moduleSpec": {"selector": {}}}
    }))
    .expect("a valid MCM");
    m.status = status;
    m
}

fn work(mcm: &str, cluster: &str, available: bool, loader: (i64, i64, i64)) -> WorkEntry {
    WorkEntry {
        mcm: mcm.into(),
        cluster: cluster.into(),
        applied: true,
        available,
        feedback: BTreeMap::from([
            (
                "moduleLoader.nodesMatchingSelectorNumber".to_string(),
                loader.0,
            ),
            ("moduleLoader.desiredNumber".to_string(), loader.1),
            ("moduleLoader.availableNumber".to_string(), loader.2),
        ]),
        conditions: vec![
            condition("Applied", true, "AppliedManifestComplete"),
            condition("Available", available, "ResourcesAvailable"),
        ],
        ..Default::default()
    }
}

/// The fleet of the tests:
/// - spoke-1 (env=prod, K1): work available, 2/2 loader pods;
/// - spoke-2 (env=prod, K1+K2): work applied, 1/3, K2's image pending;
/// - spoke-3 (env=dev, no kernel claim); spoke-4 (env=prod): selected, not reconciled yet;
/// - spoke-gone: no cluster any more, its work still there.
///
/// MCM `kmm-ci-a` selects env=prod; MCM `everywhere` selects all and has no status.
struct Fixture {
    state: DashboardState,
}

fn fixture() -> Fixture {
    let caches = Caches::new();
    {
        let mut clusters = caches.clusters.write().expect("lock");
        for (name, env, kernels) in [
            ("spoke-1", "prod", Some(vec![K1])),
            ("spoke-2", "prod", Some(vec![K1, K2])),
            ("spoke-3", "dev", None),
            ("spoke-4", "prod", Some(vec![K1])),
        ] {
            clusters.insert(
                name.into(),
                ClusterFacts {
                    name: name.into(),
                    labels: labels(&[("name", name), ("env", env)]),
                    kernels: kernels.map(|ks| ks.into_iter().map(String::from).collect()),
                    available: true,
                },
            );
        }
    }
    {
        let mut works = caches.works.write().expect("lock");
        for w in [
            work("kmm-ci-a", "spoke-1", true, (2, 2, 2)),
            work("kmm-ci-a", "spoke-2", true, (3, 3, 1)),
            WorkEntry {
                deleting: true,
                ..work("kmm-ci-a", "spoke-gone", false, (1, 1, 0))
            },
        ] {
            works.insert((w.cluster.clone(), w.mcm.clone()), w);
        }
    }
    for (i, reason) in [
        "ManifestWorksCreated",
        "ManifestWorksDeleted",
        "ManifestWorksCreated",
    ]
    .into_iter()
    .enumerate()
    {
        caches.record_event(RecentEvent {
            time: format!("2024-01-01T00:00:0{i}Z"),
            kind: "ManagedClusterModule".into(),
            name: if i == 1 { "everywhere" } else { "kmm-ci-a" }.into(),
            type_: "Normal".into(),
            reason: reason.into(),
            message: format!("event {i}"),
        });
    }

    let image = |k: &str| format!("registry.test/kmm/kmm-ci-a:{k}");
    let images = vec![
        ImageStatus {
            image: image(K1),
            kernel: K1.into(),
            digest: Some(D1.into()),
            state: ImageState::Ready,
            reason: None,
            clusters: 3,
        },
        ImageStatus {
            image: image(K2),
            kernel: K2.into(),
            digest: None,
            state: ImageState::Missing,
            reason: Some("not in the registry".into()),
            clusters: 1,
        },
    ];
    let views = Arc::new(Views::default());
    let ready = |k: &str| KernelView {
        kernel: k.into(),
        image: image(k),
        pinned: Some(format!("registry.test/kmm/kmm-ci-a@{D1}")),
        state: ImageState::Ready,
        reason: None,
    };
    views.put(McmView {
        name: "kmm-ci-a".into(),
        clusters: vec![
            ClusterView {
                name: "spoke-1".into(),
                kernels: vec![ready(K1)],
                unmapped_kernels: vec![],
                problem: None,
            },
            ClusterView {
                name: "spoke-2".into(),
                kernels: vec![
                    ready(K1),
                    KernelView {
                        kernel: K2.into(),
                        image: image(K2),
                        pinned: None,
                        state: ImageState::Missing,
                        reason: Some("not in the registry".into()),
                    },
                ],
                unmapped_kernels: vec![],
                problem: Some(ClusterProblem {
                    name: "spoke-2".into(),
                    reason: "ImagesPending".into(),
                    message: "waiting for image(s)".into(),
                }),
            },
        ],
        images: images.clone(),
        last_error: Some("an image is missing".into()),
    });

    let status = ManagedClusterModuleStatus {
        number_desired: 2,
        number_applied: 2,
        number_available: 1,
        number_degraded: 0,
        conditions: vec![
            condition("Ready", false, "NotAllClustersAvailable"),
            condition("Progressing", true, "RollingOut"),
        ],
        images,
        observed_generation: Some(2),
        ..Default::default()
    };
    let mut writer = Writer::<ManagedClusterModule>::default();
    writer.apply_watcher_event(&watcher::Event::Apply(mcm(
        "kmm-ci-a",
        &[("env", "prod")],
        Some(status),
    )));
    writer.apply_watcher_event(&watcher::Event::Apply(mcm("everywhere", &[], None)));
    let state = DashboardState {
        caches,
        views,
        mcms: writer.as_reader(),
        client: unreachable_client(),
        audience: super::auth::DEFAULT_AUDIENCE.into(),
    };
    Fixture { state }
}

impl Fixture {
    fn router(&self) -> (Router, Calls) {
        let (auth, calls) = Authenticator::table([
            (
                VIEWER,
                Decision::Allowed {
                    user: "system:serviceaccount:ops:viewer".into(),
                    clusters: true,
                },
            ),
            (
                MCM_ONLY,
                Decision::Allowed {
                    user: "mcm-reader".into(),
                    clusters: false,
                },
            ),
            (
                OUTSIDER,
                Decision::Forbidden {
                    user: "outsider".into(),
                },
            ),
        ]);
        (router_with(self.state.clone(), auth), calls)
    }
}

async fn send(router: &Router, req: Request<Body>) -> (StatusCode, http::HeaderMap, Vec<u8>) {
    let resp = router
        .clone()
        .oneshot(req)
        .await
        .expect("infallible router");
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes()
        .to_vec();
    (status, headers, body)
}

fn get(path: &str, token: Option<&str>) -> Request<Body> {
    let mut b = Request::get(path);
    if let Some(t) = token {
        b = b.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    b.body(Body::empty()).expect("request")
}

async fn get_json(router: &Router, path: &str, token: Option<&str>) -> (StatusCode, Value) {
    let (status, headers, body) = send(router, get(path, token)).await;
    assert_eq!(
        headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok()),
        Some("application/json"),
        "{path}"
    );
    (status, serde_json::from_slice(&body).expect("JSON body"))
}

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

#[tokio::test]
async fn without_a_token_or_with_a_bad_one_every_endpoint_is_401_json() {
    let (router, _) = fixture().router();
    for path in [
        "/api/v1/managedclustermodules",
        "/api/v1/managedclustermodules/kmm-ci-a",
        "/api/v1/clusters",
        "/api/v1/events",
        "/api/v1/stream",
    ] {
        for token in [None, Some("wrong-token")] {
            let (status, headers, body) = send(&router, get(path, token)).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{path} {token:?}");
            assert_eq!(
                headers
                    .get(header::WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok()),
                Some("Bearer")
            );
            let body: Value = serde_json::from_slice(&body).expect("JSON");
            assert_eq!(body["error"], "unauthenticated", "{path}");
            assert!(body["reason"].as_str().is_some_and(|r| !r.is_empty()));
        }
    }
    // Another scheme is no bearer token.
    let req = Request::get("/api/v1/clusters")
        .header(header::AUTHORIZATION, "Basic dXNlcjpwYXNz")
        .body(Body::empty())
        .expect("request");
    assert_eq!(send(&router, req).await.0, StatusCode::UNAUTHORIZED);
    // The query parameter is for the stream only.
    let (status, _) = get_json(
        &router,
        &format!("/api/v1/clusters?access_token={VIEWER}"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn malformed_authorization_headers_are_400_json() {
    let (router, _) = fixture().router();
    for value in [
        &b"Bearer"[..],
        b"Bearer ",
        b"Bearer two words",
        b"Bearer \xfftoken",
    ] {
        let req = Request::get("/api/v1/clusters")
            .header(
                header::AUTHORIZATION,
                http::HeaderValue::from_bytes(value).expect("header bytes"),
            )
            .body(Body::empty())
            .expect("request");
        let (status, _, body) = send(&router, req).await;
        assert_eq!(
            status,
            StatusCode::BAD_REQUEST,
            "{:?}",
            String::from_utf8_lossy(value)
        );
        let body: Value = serde_json::from_slice(&body).expect("JSON");
        assert_eq!(body["error"], "bad_request");
    }
}

#[tokio::test]
async fn a_user_without_the_permission_is_403_json() {
    let (router, _) = fixture().router();
    for path in [
        "/api/v1/managedclustermodules",
        "/api/v1/clusters",
        "/api/v1/events",
        "/api/v1/managedclustermodules/kmm-ci-a",
    ] {
        let (status, body) = get_json(&router, path, Some(OUTSIDER)).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}");
        assert_eq!(body["error"], "forbidden");
        assert_eq!(
            body["reason"],
            "user \"outsider\" may not list managedclustermodules.hub.kmm.sigs.x-k8s.io"
        );
    }
    let (status, _, _) = send(&router, get("/api/v1/stream", Some(OUTSIDER))).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _, _) = send(&router, post("/api/v1/stream/tickets", Some(OUTSIDER))).await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "no ticket for a forbidden user"
    );
}

#[tokio::test]
async fn the_cluster_inventory_needs_list_managedclusters() {
    let (router, _) = fixture().router();
    let (status, body) = get_json(&router, "/api/v1/managedclustermodules", Some(MCM_ONLY)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    for path in [
        "/api/v1/clusters",
        "/api/v1/managedclustermodules/kmm-ci-a",
        "/api/v1/events",
    ] {
        let (status, body) = get_json(&router, path, Some(MCM_ONLY)).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}: {body}");
        assert_eq!(
            body["reason"],
            "user \"mcm-reader\" may not list managedclusters.cluster.open-cluster-management.io",
            "{path}"
        );
        assert!(!body.to_string().contains("spoke-1"), "{path}: {body}");
        assert_eq!(
            get_json(&router, path, Some(VIEWER)).await.0,
            StatusCode::OK
        );
    }
}

fn from_peer(mut req: Request<Body>, ip: [u8; 4]) -> Request<Body> {
    req.extensions_mut()
        .insert(axum::extract::ConnectInfo(std::net::SocketAddr::from((
            ip, 40000,
        ))));
    req
}

#[tokio::test]
async fn failed_authentication_is_limited_per_client_address() {
    let (router, calls) = fixture().router();
    let (a, b) = ([192, 0, 2, 1], [192, 0, 2, 2]);
    for i in 0..super::auth::FAILURE_LIMIT {
        let (status, _, _) = send(
            &router,
            from_peer(get("/api/v1/clusters", Some(&format!("guess-{i}"))), a),
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "attempt {i}");
    }
    let reviews = calls.load(Ordering::SeqCst);
    // The next attempt from that address is refused without asking the API server, even
    // with a good token, and says when to come back.
    for token in ["guess-again", VIEWER] {
        let (status, headers, body) =
            send(&router, from_peer(get("/api/v1/clusters", Some(token)), a)).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{token}");
        let retry: u64 = headers
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .expect("Retry-After in seconds");
        assert!((1..=60).contains(&retry), "{retry}");
        let body: Value = serde_json::from_slice(&body).expect("JSON");
        assert_eq!(body["error"], "rate_limited");
    }
    // Spent tickets count as failures too.
    let (status, _, _) = send(
        &router,
        from_peer(get("/api/v1/stream?ticket=forged", None), a),
    )
    .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        reviews,
        "no review while limited"
    );
    // Another client is not affected.
    let (status, _, _) = send(&router, from_peer(get("/api/v1/clusters", Some(VIEWER)), b)).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn decisions_are_cached_per_token() {
    let (router, calls) = fixture().router();
    for _ in 0..3 {
        assert_eq!(
            get_json(&router, "/api/v1/clusters", Some(VIEWER)).await.0,
            StatusCode::OK
        );
        assert_eq!(
            get_json(&router, "/api/v1/clusters", Some("wrong-token"))
                .await
                .0,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            get_json(&router, "/api/v1/clusters", Some(OUTSIDER))
                .await
                .0,
            StatusCode::FORBIDDEN
        );
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "one review per token, positive and negative"
    );
}

#[tokio::test]
async fn an_unreachable_api_server_is_503_without_details() {
    // The production authenticator (TokenReview), against an API server that does not answer.
    let router = router(fixture().state);
    let (status, body) = get_json(&router, "/api/v1/clusters", Some(VIEWER)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["error"], "unavailable");
    let text = body.to_string();
    assert!(
        !text.contains("secret-internal-detail") && !text.contains("refused"),
        "{text}"
    );
}

/// The next `data:` of an event stream body, with its event name.
async fn next_event(body: &mut Body) -> (String, Value) {
    let mut buf = String::new();
    loop {
        let frame = body.frame().await.expect("stream open").expect("frame");
        if let Ok(data) = frame.into_data() {
            buf.push_str(&String::from_utf8_lossy(&data));
        }
        if let Some(end) = buf.find("\n\n") {
            let event: String = buf[..end].to_string();
            let name = event
                .lines()
                .find_map(|l| l.strip_prefix("event: "))
                .unwrap_or("")
                .to_string();
            let data = event
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .unwrap_or("null");
            return (name, serde_json::from_str(data).expect("JSON data"));
        }
    }
}

fn post(path: &str, token: Option<&str>) -> Request<Body> {
    let mut b = Request::post(path);
    if let Some(t) = token {
        b = b.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    b.body(Body::empty()).expect("request")
}

async fn ticket(router: &Router, token: &str) -> String {
    let (status, _, body) = send(router, post("/api/v1/stream/tickets", Some(token))).await;
    assert_eq!(status, StatusCode::OK);
    let body: Value = serde_json::from_slice(&body).expect("JSON");
    assert_eq!(body["expiresInSeconds"], 60);
    body["ticket"].as_str().expect("a ticket").to_string()
}

#[tokio::test]
async fn the_stream_announces_changes_with_a_single_use_ticket_and_refuses_tokens_in_urls() {
    let f = fixture();
    let (router, _) = f.router();
    let first = *f.state.caches.changes.borrow();
    let t = ticket(&router, VIEWER).await;
    let resp = router
        .clone()
        .oneshot(get(&format!("/api/v1/stream?ticket={t}"), None))
        .await
        .expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok()),
        Some("text/event-stream")
    );
    let mut body = resp.into_body();
    let (name, data) = next_event(&mut body).await;
    assert_eq!(name, "change");
    assert_eq!(
        data,
        json!({"revision": first}),
        "the current revision at once"
    );
    f.state.caches.bump();
    let (name, data) = next_event(&mut body).await;
    assert_eq!(name, "change");
    assert_eq!(data, json!({"revision": first + 1}));

    // A ticket is good once; an unknown one not at all.
    for path in [
        format!("/api/v1/stream?ticket={t}"),
        "/api/v1/stream?ticket=0123".to_string(),
    ] {
        let (status, body) = get_json(&router, &path, None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}: {body}");
    }
    // A token in the URL is refused even when valid; tickets need a token.
    let (status, body) = get_json(
        &router,
        &format!("/api/v1/stream?access_token={VIEWER}"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["reason"]
            .as_str()
            .is_some_and(|r| r.contains("tickets")),
        "{body}"
    );
    let (status, _, _) = send(&router, post("/api/v1/stream/tickets", None)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // The Authorization header works too.
    let resp = router
        .oneshot(get("/api/v1/stream", Some(VIEWER)))
        .await
        .expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
}

/// Every object schema with properties also forbids others, so undocumented fields fail.
fn strict(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            if map.contains_key("properties") && !map.contains_key("additionalProperties") {
                map.insert("additionalProperties".into(), Value::Bool(false));
            }
            map.values_mut().for_each(strict);
        }
        Value::Array(items) => items.iter_mut().for_each(strict),
        _ => {}
    }
}

#[tokio::test]
async fn openapi_describes_every_endpoint_and_real_answers_match_it() {
    let (router, _) = fixture().router();
    let (status, doc) = get_json(&router, "/api/v1/openapi.json", None).await;
    assert_eq!(status, StatusCode::OK, "served without a token");
    assert_eq!(doc["openapi"], "3.1.0");
    let paths: Vec<&str> = doc["paths"]
        .as_object()
        .expect("paths")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        paths,
        vec![
            "/api/v1/clusters",
            "/api/v1/events",
            "/api/v1/managedclustermodules",
            "/api/v1/managedclustermodules/{name}",
            "/api/v1/openapi.json",
            "/api/v1/stream",
            "/api/v1/stream/tickets"
        ]
    );
    let mut strict_doc = doc.clone();
    strict(&mut strict_doc);
    let validate = |schema: &Value, answer: &Value, what: &str| {
        let mut root = strict_doc.clone();
        root["$ref"] = schema["$ref"].clone();
        assert!(
            root["$ref"].is_string(),
            "{what}: the schema is a reference: {schema}"
        );
        let validator = jsonschema::draft202012::new(&root).expect("a valid schema");
        let errors: Vec<String> = validator
            .iter_errors(answer)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        assert!(
            errors.is_empty(),
            "{what} does not match its schema: {errors:#?}"
        );
    };
    let cases = [
        (
            "/api/v1/managedclustermodules",
            "/api/v1/managedclustermodules",
            "200",
        ),
        (
            "/api/v1/managedclustermodules/{name}",
            "/api/v1/managedclustermodules/kmm-ci-a",
            "200",
        ),
        (
            "/api/v1/managedclustermodules/{name}",
            "/api/v1/managedclustermodules/everywhere",
            "200",
        ),
        (
            "/api/v1/managedclustermodules/{name}",
            "/api/v1/managedclustermodules/nope",
            "404",
        ),
        (
            "/api/v1/managedclustermodules/{name}",
            "/api/v1/managedclustermodules/Bad_Name",
            "400",
        ),
        ("/api/v1/clusters", "/api/v1/clusters", "200"),
        ("/api/v1/events", "/api/v1/events", "200"),
    ];
    for (template, path, code) in cases {
        let (status, answer) = get_json(&router, path, Some(VIEWER)).await;
        assert_eq!(status.as_str(), code, "{path}");
        let schema = &doc["paths"][template]["get"]["responses"][code]["content"]["application/json"]
            ["schema"];
        validate(schema, &answer, path);
    }
    for (token, code) in [(None, "401"), (Some(OUTSIDER), "403")] {
        let (_, answer) = get_json(&router, "/api/v1/clusters", token).await;
        let schema = &doc["paths"]["/api/v1/clusters"]["get"]["responses"][code]["content"]["application/json"]
            ["schema"];
        validate(schema, &answer, code);
    }
    let (_, _, answer) = send(&router, post("/api/v1/stream/tickets", Some(VIEWER))).await;
    let schema = &doc["paths"]["/api/v1/stream/tickets"]["post"]["responses"]["200"]["content"]["application/json"]
        ["schema"];
    validate(
        schema,
        &serde_json::from_slice(&answer).expect("JSON"),
        "a ticket",
    );
    let (_, answer) = get_json(&router, "/api/v1/clusters", Some(MCM_ONLY)).await;
    let schema = &doc["paths"]["/api/v1/clusters"]["get"]["responses"]["403"]["content"]["application/json"]
        ["schema"];
    validate(schema, &answer, "403 inventory");
    let change = &doc["paths"]["/api/v1/stream"]["get"]["responses"]["200"]["content"]["text/event-stream"]
        ["x-event-data"];
    validate(change, &json!({"revision": 7}), "a change event");
}

#[tokio::test]
async fn the_page_is_served_without_a_token_and_unknown_paths_are_json() {
    let (router, _) = fixture().router();
    for (path, kind) in [
        ("/", "text/html"),
        ("/app.js", "text/javascript"),
        ("/style.css", "text/css"),
    ] {
        let (status, headers, body) = send(&router, get(path, None)).await;
        assert_eq!(status, StatusCode::OK, "{path}");
        let ct = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        assert!(ct.starts_with(kind), "{path}: {ct}");
        assert!(headers.contains_key(header::CONTENT_SECURITY_POLICY));
        assert!(!body.is_empty());
    }
    let (_, _, html) = send(&router, get("/", None)).await;
    let html = String::from_utf8_lossy(&html);
    assert!(
        html.contains("id=\"token\"") && html.contains("src=\"app.js\""),
        "{html}"
    );

    let (status, body) = get_json(&router, "/api/v1/nothing-here", Some(VIEWER)).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found"))
    );
    let (status, body) = get_json(&router, "/favicon.ico", None).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found"))
    );

    let req = Request::builder()
        .method(Method::DELETE)
        .uri("/api/v1/managedclustermodules/kmm-ci-a")
        .header(header::AUTHORIZATION, format!("Bearer {VIEWER}"))
        .body(Body::empty())
        .expect("request");
    let (status, _, body) = send(&router, req).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    let body: Value = serde_json::from_slice(&body).expect("JSON");
    assert_eq!(body["error"], "method_not_allowed");
}
