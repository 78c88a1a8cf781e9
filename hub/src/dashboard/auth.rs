//! Who may read the fleet: a bearer token is checked with a TokenReview, and its user with a
//! SubjectAccessReview for `list managedclustermodules.hub.kmm.sigs.x-k8s.io` — the same
//! question `kubectl get mcm` asks. Decisions (allowed, forbidden and unauthenticated) are
//! cached briefly, keyed by the token's SHA-256, so page refreshes do not reach the API server.

use std::time::Duration;

use axum::extract::{Query, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::Response;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::Client;
use kube::api::{Api, PostParams};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::AppState;
use super::error::ApiError;

/// The permission a viewer needs.
pub const GROUP: &str = "hub.kmm.sigs.x-k8s.io";
pub const RESOURCE: &str = "managedclustermodules";
pub const VERB: &str = "list";

/// How long a decision is reused, and how many are kept.
pub const DECISION_TTL: Duration = Duration::from_secs(30);
pub const DECISION_CAPACITY: u64 = 1024;

/// The query parameter that carries the token where headers cannot be set (EventSource).
pub const ACCESS_TOKEN_PARAM: &str = "access_token";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allowed { user: String },
    Forbidden { user: String },
    Unauthenticated,
}

/// The authenticated caller, in the request's extensions for handlers that want it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Viewer {
    pub user: String,
}

/// Where decisions come from. Production uses the API server; router tests use a table.
enum Backend {
    Kubernetes(Client),
    #[cfg(test)]
    Table(table::Table),
}

/// Checks tokens, with a short-lived bounded cache of decisions.
pub struct Authenticator {
    backend: Backend,
    cache: moka::future::Cache<[u8; 32], Decision>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let backend = match self.backend {
            Backend::Kubernetes(_) => "kubernetes",
            #[cfg(test)]
            Backend::Table(_) => "table",
        };
        f.debug_struct("Authenticator")
            .field("backend", &backend)
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    /// TokenReview and SubjectAccessReview against the hub's API server.
    pub fn kubernetes(client: Client) -> Self {
        Self::with_backend(Backend::Kubernetes(client))
    }

    fn with_backend(backend: Backend) -> Self {
        let cache = moka::future::Cache::builder()
            .max_capacity(DECISION_CAPACITY)
            .time_to_live(DECISION_TTL)
            .build();
        Self { backend, cache }
    }

    /// The decision for a token; concurrent checks of one token share one review.
    pub async fn decide(&self, token: &str) -> Result<Decision, ApiError> {
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        self.cache
            .try_get_with(key, self.review(token))
            .await
            .map_err(|e| ApiError::AuthBackend(e.to_string()))
    }

    async fn review(&self, token: &str) -> Result<Decision, kube::Error> {
        match &self.backend {
            Backend::Kubernetes(client) => review(client, token).await,
            #[cfg(test)]
            Backend::Table(t) => Ok(t.decide(token)),
        }
    }
}

async fn review(client: &Client, token: &str) -> Result<Decision, kube::Error> {
    let tr = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_string()),
            audiences: None,
        },
        ..Default::default()
    };
    let tr = Api::<TokenReview>::all(client.clone())
        .create(&PostParams::default(), &tr)
        .await?;
    let status = tr.status.unwrap_or_default();
    let Some(user) = status.user.filter(|_| status.authenticated == Some(true)) else {
        return Ok(Decision::Unauthenticated);
    };
    let name = user.username.clone().unwrap_or_default();
    let sar = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: user.username,
            groups: user.groups,
            uid: user.uid,
            extra: user.extra,
            resource_attributes: Some(ResourceAttributes {
                group: Some(GROUP.into()),
                resource: Some(RESOURCE.into()),
                verb: Some(VERB.into()),
                ..Default::default()
            }),
            non_resource_attributes: None,
        },
        ..Default::default()
    };
    let sar = Api::<SubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &sar)
        .await?;
    Ok(if sar.status.is_some_and(|s| s.allowed) {
        Decision::Allowed { user: name }
    } else {
        Decision::Forbidden { user: name }
    })
}

/// The bearer token of a request: from `Authorization: Bearer …`, or (where `allow_query`)
/// from the `access_token` query parameter.
fn bearer(req: &Request, allow_query: bool) -> Result<String, ApiError> {
    if let Some(value) = req.headers().get(header::AUTHORIZATION) {
        let value = value.to_str().map_err(|_| {
            ApiError::BadRequest("the Authorization header is not visible ASCII".into())
        })?;
        let (scheme, token) = value.split_once(' ').unwrap_or((value, ""));
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(ApiError::Unauthenticated("only bearer tokens are accepted"));
        }
        return valid_token(token.trim()).ok_or_else(|| {
            ApiError::BadRequest("the Authorization header must be `Bearer <token>`".into())
        });
    }
    if allow_query {
        #[derive(Deserialize)]
        struct TokenQuery {
            access_token: Option<String>,
        }
        let q = Query::<TokenQuery>::try_from_uri(req.uri())
            .map_err(|_| ApiError::BadRequest("the query string is malformed".into()))?;
        if let Some(token) = q.0.access_token {
            return valid_token(&token).ok_or_else(|| {
                ApiError::BadRequest(format!("the {ACCESS_TOKEN_PARAM} parameter is not a token"))
            });
        }
    }
    Err(ApiError::Unauthenticated(
        "no bearer token: send `Authorization: Bearer <token>`",
    ))
}

fn valid_token(token: &str) -> Option<String> {
    (!token.is_empty() && token.len() <= 16 * 1024 && token.chars().all(|c| c.is_ascii_graphic()))
        .then(|| token.to_string())
}

async fn authorize(state: &AppState, token: Result<String, ApiError>) -> Result<Viewer, ApiError> {
    match state.auth.decide(&token?).await? {
        Decision::Allowed { user } => Ok(Viewer { user }),
        Decision::Forbidden { user } => Err(ApiError::Forbidden { user }),
        Decision::Unauthenticated => Err(ApiError::Unauthenticated("the token was not accepted")),
    }
}

/// Middleware of the JSON API: the token in the Authorization header only.
pub(super) async fn require_viewer(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let viewer = authorize(&state, bearer(&req, false)).await?;
    req.extensions_mut().insert(viewer);
    Ok(next.run(req).await)
}

/// Middleware of the live stream: the header, or `?access_token=` for EventSource.
pub(super) async fn require_stream_viewer(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let viewer = authorize(&state, bearer(&req, true)).await?;
    req.extensions_mut().insert(viewer);
    Ok(next.run(req).await)
}

impl Authenticator {
    /// A fixed table of tokens (router tests); unknown tokens are unauthenticated.
    #[cfg(test)]
    pub(crate) fn table(
        entries: impl IntoIterator<Item = (&'static str, Decision)>,
    ) -> (std::sync::Arc<Self>, table::Calls) {
        let t = table::Table::new(entries);
        let calls = t.calls();
        (
            std::sync::Arc::new(Self::with_backend(Backend::Table(t))),
            calls,
        )
    }
}

#[cfg(test)]
pub(crate) mod table {
    use std::collections::HashMap;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::Decision;

    /// How often the backend was asked (to see the cache work).
    pub type Calls = Arc<AtomicUsize>;

    pub struct Table {
        entries: HashMap<String, Decision>,
        calls: Calls,
    }

    impl Table {
        pub fn new(entries: impl IntoIterator<Item = (&'static str, Decision)>) -> Self {
            Self {
                entries: entries
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect(),
                calls: Calls::default(),
            }
        }

        pub fn calls(&self) -> Calls {
            self.calls.clone()
        }

        pub fn decide(&self, token: &str) -> Decision {
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.entries
                .get(token)
                .cloned()
                .unwrap_or(Decision::Unauthenticated)
        }
    }
}
