//! The live stream, the OpenAPI document and the page.

use super::*;

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
