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
                Arc::new(ClusterFacts {
                    name: name.into(),
                    labels: labels(&[("name", name), ("env", env)]),
                    kernels: kernels.map(|ks| ks.into_iter().map(String::from).collect()),
                    available: true,
                    ..Default::default()
                }),
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
            works.insert((w.cluster.clone(), w.mcm.clone()), Arc::new(w));
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
                rollout: Some("Updated".into()),
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
                rollout: Some("Pending".into()),
            },
        ],
        images: images.clone(),
        rollout: Some(rollout_status()),
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
        rollout: Some(rollout_status()),
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

fn post(path: &str, token: Option<&str>) -> Request<Body> {
    let mut b = Request::post(path);
    if let Some(t) = token {
        b = b.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    b.body(Body::empty()).expect("request")
}

mod api;
mod auth;
mod stream;

/// A progressive rollout one cluster into its revision.
pub(crate) fn rollout_status() -> shared_api::rollout::RolloutStatus {
    shared_api::rollout::RolloutStatus {
        revision: "0123456789".into(),
        strategy: "Progressive".into(),
        phase: shared_api::rollout::RolloutPhase::Progressing,
        total: 2,
        updated: 1,
        pending: 1,
        wave: 2,
        ..Default::default()
    }
}
