//! Authentication and authorization: 401, 400, 403, the failure limit, the 503.

use super::*;

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
    for i in 0..crate::dashboard::auth::FAILURE_LIMIT {
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
