//! Who may read the fleet: a bearer token is checked with a TokenReview **for the dashboard's
//! own audience** (default `kmm-fleet-dashboard`; the answer must name that audience, so a
//! token minted for the API server or another service is refused), and its user with
//! SubjectAccessReviews for `list managedclustermodules.hub.kmm.sigs.x-k8s.io` (every endpoint)
//! and `list managedclusters.cluster.open-cluster-management.io` (the endpoints that show the
//! cluster inventory). Decisions are cached briefly, keyed by the token's SHA-256.
//!
//! Tokens never travel in URLs: the live stream (EventSource cannot set headers) takes a
//! single-use ticket from `POST /api/v1/stream/tickets`, bound to the user and valid 60 s.
//! Failed authentication is limited per client address (429 with `Retry-After`).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{ConnectInfo, Query, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::Response;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, UserInfo};
use k8s_openapi::api::authorization::v1::ResourceAttributes;
use kube::Client;
use kube::api::{Api, PostParams};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::AppState;
use super::error::ApiError;
use super::model::StreamTicket;

/// The permission every viewer needs.
pub const GROUP: &str = "hub.kmm.sigs.x-k8s.io";
pub const RESOURCE: &str = "managedclustermodules";
pub const VERB: &str = "list";
/// The permission the cluster inventory needs (what `kubectl get managedclusters` asks).
pub const CLUSTER_GROUP: &str = "cluster.open-cluster-management.io";
pub const CLUSTER_RESOURCE: &str = "managedclusters";

/// The audience a dashboard token must be issued for, unless configured otherwise.
pub const DEFAULT_AUDIENCE: &str = "kmm-fleet-dashboard";

/// How long a decision is reused, and how many are kept.
pub const DECISION_TTL: Duration = Duration::from_secs(30);
pub const DECISION_CAPACITY: u64 = 1024;

/// The query parameter of the stream's ticket.
pub const TICKET_PARAM: &str = "ticket";
/// How long a stream ticket is valid (it is used once, at once, by the page).
pub const TICKET_TTL: Duration = Duration::from_secs(60);
pub const TICKET_CAPACITY: u64 = 4096;

/// Failed authentications allowed per client address within [`FAILURE_WINDOW`]; beyond that
/// requests are answered 429 until the window ends, without asking the API server.
pub const FAILURE_LIMIT: u32 = 10;
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Addresses tracked at most (the expired ones are dropped first).
const FAILURE_CAPACITY: usize = 8192;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// May list MCMs; `clusters`: may list ManagedClusters too (sees the inventory).
    Allowed {
        user: String,
        clusters: bool,
    },
    Forbidden {
        user: String,
    },
    Unauthenticated,
}

/// The authenticated caller, in the request's extensions for handlers that want it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Viewer {
    pub user: String,
    /// May list ManagedClusters.
    pub clusters: bool,
}

/// Where decisions come from. Production uses the API server; router tests use a table.
enum Backend {
    Kubernetes {
        client: Client,
        audience: String,
    },
    #[cfg(test)]
    Table(table::Table),
}

/// Checks tokens, with a short-lived bounded cache of decisions; issues and redeems stream
/// tickets; counts failed attempts per client address.
pub struct Authenticator {
    backend: Backend,
    cache: moka::future::Cache<[u8; 32], Decision>,
    tickets: moka::future::Cache<String, Viewer>,
    failures: FailureLimiter,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let backend = match &self.backend {
            Backend::Kubernetes { audience, .. } => format!("kubernetes (audience {audience})"),
            #[cfg(test)]
            Backend::Table(_) => "table".into(),
        };
        f.debug_struct("Authenticator")
            .field("backend", &backend)
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    /// TokenReview (for `audience`) and SubjectAccessReview against the hub's API server.
    pub fn kubernetes(client: Client, audience: impl Into<String>) -> Self {
        Self::with_backend(Backend::Kubernetes {
            client,
            audience: audience.into(),
        })
    }

    fn with_backend(backend: Backend) -> Self {
        let cache = moka::future::Cache::builder()
            .max_capacity(DECISION_CAPACITY)
            .time_to_live(DECISION_TTL)
            .build();
        let tickets = moka::future::Cache::builder()
            .max_capacity(TICKET_CAPACITY)
            .time_to_live(TICKET_TTL)
            .build();
        Self {
            backend,
            cache,
            tickets,
            failures: FailureLimiter::default(),
        }
    }

    /// The decision for a token; concurrent checks of one token share one review.
    pub async fn decide(&self, token: &str) -> Result<Decision, ApiError> {
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        self.cache
            .try_get_with(key, self.review(token))
            .await
            .map_err(ApiError::AuthBackend)
    }

    async fn review(&self, token: &str) -> Result<Decision, kube::Error> {
        match &self.backend {
            Backend::Kubernetes { client, audience } => review(client, audience, token).await,
            #[cfg(test)]
            Backend::Table(t) => Ok(t.decide(token)),
        }
    }

    /// A new single-use stream ticket for `viewer`.
    pub async fn issue_ticket(&self, viewer: Viewer) -> String {
        let ticket = hex::encode(rand::random::<[u8; 32]>());
        self.tickets.insert(ticket.clone(), viewer).await;
        ticket
    }

    /// The viewer a ticket was issued to; the ticket is spent.
    async fn redeem_ticket(&self, ticket: &str) -> Option<Viewer> {
        self.tickets.remove(ticket).await
    }
}

async fn review(client: &Client, audience: &str, token: &str) -> Result<Decision, kube::Error> {
    let tr = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_string()),
            audiences: Some(vec![audience.to_string()]),
        },
        ..Default::default()
    };
    let tr = Api::<TokenReview>::all(client.clone())
        .create(&PostParams::default(), &tr)
        .await?;
    let status = tr.status.unwrap_or_default();
    // An audience-unaware authenticator would not name the audience: refuse that too.
    let for_us = status
        .audiences
        .as_ref()
        .is_some_and(|a| a.iter().any(|a| a == audience));
    let Some(user) = status
        .user
        .filter(|_| status.authenticated == Some(true) && for_us)
    else {
        return Ok(Decision::Unauthenticated);
    };
    let name = user.username.clone().unwrap_or_default();
    if !may_list(client, &user, GROUP, RESOURCE).await? {
        return Ok(Decision::Forbidden { user: name });
    }
    let clusters = may_list(client, &user, CLUSTER_GROUP, CLUSTER_RESOURCE).await?;
    Ok(Decision::Allowed {
        user: name,
        clusters,
    })
}

/// A SubjectAccessReview: may `user` list `resource.group` (cluster-wide)?
async fn may_list(
    client: &Client,
    user: &UserInfo,
    group: &str,
    resource: &str,
) -> Result<bool, kube::Error> {
    crate::access::review(
        client,
        user,
        ResourceAttributes {
            group: Some(group.into()),
            resource: Some(resource.into()),
            verb: Some(VERB.into()),
            ..Default::default()
        },
    )
    .await
}

/// The bearer token of a request, from `Authorization: Bearer …` only.
fn bearer(req: &Request) -> Result<String, ApiError> {
    let Some(value) = req.headers().get(header::AUTHORIZATION) else {
        return Err(ApiError::Unauthenticated(
            "no bearer token: send `Authorization: Bearer <token>`",
        ));
    };
    let value = value.to_str().map_err(|_| {
        ApiError::BadRequest("the Authorization header is not visible ASCII".into())
    })?;
    let (scheme, token) = value.split_once(' ').unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(ApiError::Unauthenticated("only bearer tokens are accepted"));
    }
    valid_token(token.trim()).ok_or_else(|| {
        ApiError::BadRequest("the Authorization header must be `Bearer <token>`".into())
    })
}

fn valid_token(token: &str) -> Option<String> {
    (!token.is_empty() && token.len() <= 16 * 1024 && token.chars().all(|c| c.is_ascii_graphic()))
        .then(|| token.to_string())
}

/// The client's address (the TCP peer); one shared bucket when unknown (router tests).
fn peer(req: &Request) -> IpAddr {
    req.extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
}

/// Authenticate a request's bearer token, counting rejected tokens against the client.
async fn authorize(
    state: &AppState,
    client: IpAddr,
    token: Result<String, ApiError>,
) -> Result<Viewer, ApiError> {
    state.auth.failures.check(client)?;
    let token = token?;
    match state.auth.decide(&token).await? {
        Decision::Allowed { user, clusters } => Ok(Viewer { user, clusters }),
        Decision::Forbidden { user } => Err(ApiError::Forbidden {
            user,
            permission: "list managedclustermodules.hub.kmm.sigs.x-k8s.io",
        }),
        Decision::Unauthenticated => {
            state.auth.failures.failed(client);
            Err(ApiError::Unauthenticated(
                "the token was not accepted (is it issued for the dashboard's audience?)",
            ))
        }
    }
}

/// Middleware of the JSON API: a token (header only) whose user may list MCMs.
pub(super) async fn require_viewer(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let (client, token) = (peer(&req), bearer(&req));
    let viewer = authorize(&state, client, token).await?;
    req.extensions_mut().insert(viewer);
    Ok(next.run(req).await)
}

/// Middleware of the endpoints that show the cluster inventory: the user must also be
/// allowed to list ManagedClusters.
pub(super) async fn require_inventory_viewer(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let (client, token) = (peer(&req), bearer(&req));
    let viewer = authorize(&state, client, token).await?;
    if !viewer.clusters {
        return Err(ApiError::Forbidden {
            user: viewer.user,
            permission: "list managedclusters.cluster.open-cluster-management.io",
        });
    }
    req.extensions_mut().insert(viewer);
    Ok(next.run(req).await)
}

/// Middleware of the live stream: a ticket (`?ticket=`), or the Authorization header for
/// clients that can set one. A token in the URL is refused.
pub(super) async fn require_stream_viewer(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    #[derive(Deserialize)]
    struct StreamQuery {
        ticket: Option<String>,
        access_token: Option<String>,
    }
    let q = Query::<StreamQuery>::try_from_uri(req.uri())
        .map_err(|_| ApiError::BadRequest("the query string is malformed".into()))?;
    if q.0.access_token.is_some() {
        return Err(ApiError::BadRequest(
            "tokens are not accepted in URLs: POST /api/v1/stream/tickets for a stream ticket"
                .into(),
        ));
    }
    let client = peer(&req);
    let viewer = match q.0.ticket {
        Some(ticket) => {
            state.auth.failures.check(client)?;
            match state.auth.redeem_ticket(&ticket).await {
                Some(v) => v,
                None => {
                    state.auth.failures.failed(client);
                    return Err(ApiError::Unauthenticated(
                        "the stream ticket is unknown, spent or expired",
                    ));
                }
            }
        }
        None => {
            let token = bearer(&req);
            authorize(&state, client, token).await?
        }
    };
    req.extensions_mut().insert(viewer);
    Ok(next.run(req).await)
}

/// `POST /api/v1/stream/tickets`: a single-use ticket for the stream, bound to the caller.
pub(super) async fn issue_ticket(
    State(state): State<AppState>,
    viewer: Option<axum::Extension<Viewer>>,
) -> Result<Json<StreamTicket>, ApiError> {
    let axum::Extension(viewer) = viewer.ok_or(ApiError::Unauthenticated("no bearer token"))?;
    let ticket = state.auth.issue_ticket(viewer).await;
    Ok(Json(StreamTicket {
        ticket,
        expires_in_seconds: TICKET_TTL.as_secs(),
    }))
}

/// Failed authentications per client address in fixed windows.
#[derive(Default)]
struct FailureLimiter {
    windows: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl FailureLimiter {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, (Instant, u32)>> {
        // A poisoned map of counters is still a valid map.
        self.windows.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// 429 while `client` has used up its failures in the current window.
    fn check(&self, client: IpAddr) -> Result<(), ApiError> {
        let windows = self.lock();
        match windows.get(&client) {
            Some((start, n)) if *n >= FAILURE_LIMIT && start.elapsed() < FAILURE_WINDOW => {
                let left = FAILURE_WINDOW.saturating_sub(start.elapsed());
                Err(ApiError::TooManyFailures {
                    retry_after_secs: left.as_secs() + u64::from(left.subsec_nanos() > 0),
                })
            }
            _ => Ok(()),
        }
    }

    fn failed(&self, client: IpAddr) {
        let mut windows = self.lock();
        if windows.len() >= FAILURE_CAPACITY {
            windows.retain(|_, (start, _)| start.elapsed() < FAILURE_WINDOW);
        }
        if windows.len() >= FAILURE_CAPACITY && !windows.contains_key(&client) {
            // Full of live windows: forget the oldest rather than grow without bound.
            if let Some(oldest) = windows.iter().min_by_key(|(_, (s, _))| *s).map(|(k, _)| *k) {
                windows.remove(&oldest);
            }
        }
        let entry = windows.entry(client).or_insert((Instant::now(), 0));
        if entry.0.elapsed() >= FAILURE_WINDOW {
            *entry = (Instant::now(), 0);
        }
        entry.1 = entry.1.saturating_add(1);
    }
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
