//! Leader election on a `coordination.k8s.io/v1` Lease, in the manner of client-go's
//! leaderelection: the holder renews every `retry_period`; another candidate takes over when
//! the record has not changed for `lease_duration` *as observed on its own clock* (no clock
//! skew between processes matters); writes carry the `resourceVersion`, so a conflict means
//! someone else won the race. A leader that cannot renew within `renew_deadline` steps down.
//! On shutdown the holder releases the lease so a successor can take it at once.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};
use tokio::sync::watch;

use crate::ErrorCategory;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("lease {namespace}/{name}: {source}")]
    Api {
        namespace: String,
        name: String,
        source: kube::Error,
    },
    #[error("lease {namespace}/{name}: no answer within {after:?}")]
    Deadline {
        namespace: String,
        name: String,
        after: Duration,
    },
}

impl crate::ErrorCategory for LeaseError {
    fn category(&self) -> &'static str {
        match self {
            LeaseError::Api {
                source: kube::Error::Api(s),
                ..
            } if s.code == 403 => "forbidden",
            LeaseError::Api { .. } => "api",
            LeaseError::Deadline { .. } => "deadline",
        }
    }
}

/// Where the lease lives and the timings (client-go's defaults: 15 s / 10 s / 2 s).
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub name: String,
    pub namespace: String,
    /// This candidate's identity, unique among candidates (pod name, or host name + pid).
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

impl LeaseConfig {
    pub fn new(
        name: impl Into<String>,
        namespace: impl Into<String>,
        identity: impl Into<String>,
    ) -> Self {
        Self {
            name: name.into(),
            namespace: namespace.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// Whether this process leads. With election off, [`Leadership::always`] leads forever.
#[derive(Debug, Clone)]
pub struct Leadership {
    rx: watch::Receiver<bool>,
}

impl Leadership {
    /// A leadership that is always held (leader election disabled).
    pub fn always() -> Self {
        let (tx, rx) = watch::channel(true);
        // Keep the sender alive for the life of the process so `changed()` never errors.
        std::mem::forget(tx);
        Self { rx }
    }

    pub fn is_leader(&self) -> bool {
        *self.rx.borrow()
    }

    /// Wait until leadership is `leader` (returns at once if it already is).
    pub async fn wait_for(&mut self, leader: bool) {
        // An error means the elector stopped: leadership will not change any more.
        let _ = self.rx.wait_for(|l| *l == leader).await;
    }

    /// Wait for the next change of leadership.
    pub async fn changed(&mut self) -> bool {
        let _ = self.rx.changed().await;
        *self.rx.borrow_and_update()
    }

    /// `client`, refusing every write (anything but GET, HEAD and OPTIONS) while this process
    /// does not lead. Reads pass. The refusal is a [`NotLeading`] error from the client.
    pub fn fence(&self, client: Client) -> Client {
        let namespace = client.default_namespace().to_string();
        Client::new(
            Fence {
                inner: client,
                leadership: self.clone(),
            },
            namespace,
        )
    }
}

/// A write refused by a [`Leadership::fence`]d client: this process does not lead.
#[derive(Debug, thiserror::Error)]
#[error("not the leader: {method} {path} refused")]
pub struct NotLeading {
    pub method: http::Method,
    pub path: String,
}

/// True when `e` is a write a fenced client refused.
pub fn is_not_leading(e: &kube::Error) -> bool {
    match e {
        kube::Error::Service(b) => {
            let mut source: Option<&(dyn std::error::Error + 'static)> = Some(b.as_ref());
            while let Some(err) = source {
                if err.is::<NotLeading>() {
                    return true;
                }
                source = err.source();
            }
            false
        }
        _ => false,
    }
}

#[derive(Clone)]
struct Fence {
    inner: Client,
    leadership: Leadership,
}

impl tower::Service<http::Request<kube::client::Body>> for Fence {
    type Response = http::Response<kube::client::Body>;
    type Error = tower::BoxError;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<kube::client::Body>) -> Self::Future {
        let read = matches!(
            *req.method(),
            http::Method::GET | http::Method::HEAD | http::Method::OPTIONS
        );
        if !read && !self.leadership.is_leader() {
            let refused = NotLeading {
                method: req.method().clone(),
                path: req.uri().path().to_string(),
            };
            tracing::debug!(error = %refused, "fenced client");
            return Box::pin(async move { Err(tower::BoxError::from(refused)) });
        }
        let inner = self.inner.clone();
        Box::pin(async move { inner.send(req).await.map_err(tower::BoxError::from) })
    }
}

/// Start electing in the background. The task ends (releasing the lease if held) when
/// `token` is cancelled.
pub fn spawn(
    client: Client,
    cfg: LeaseConfig,
    token: CancellationToken,
) -> (Leadership, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(false);
    let elector = Elector {
        api: Api::namespaced(client, &cfg.namespace),
        cfg,
        tx,
        observed: None,
    };
    let handle = tokio::spawn(elector.run(token));
    (Leadership { rx }, handle)
}

struct Elector {
    api: Api<Lease>,
    cfg: LeaseConfig,
    tx: watch::Sender<bool>,
    /// The last lease record seen (holder, renew time, resourceVersion) and when it changed.
    observed: Option<(Record, Instant)>,
}

#[derive(Debug, Clone, PartialEq)]
struct Record {
    holder: Option<String>,
    renew: Option<Timestamp>,
    resource_version: Option<String>,
}

impl Elector {
    async fn run(mut self, token: CancellationToken) {
        let mut last_renew: Option<Instant> = None;
        loop {
            // A leader must renew by its last renewal + renew_deadline; a candidate gives one
            // round no longer than renew_deadline.
            let deadline = match last_renew {
                Some(t) if *self.tx.borrow() => t + self.cfg.renew_deadline,
                _ => Instant::now() + self.cfg.renew_deadline,
            };
            let round = tokio::time::timeout_at(deadline, self.try_acquire_or_renew());
            let result = tokio::select! {
                _ = token.cancelled() => break,
                r = round => r.unwrap_or_else(|_| Err(self.deadline_err(self.cfg.renew_deadline))),
            };
            match result {
                Ok(true) => {
                    last_renew = Some(Instant::now());
                    self.set_leader(true);
                }
                Ok(false) => {
                    last_renew = None;
                    self.set_leader(false);
                }
                Err(e) => {
                    tracing::warn!(error = %e, category = e.category(), "lease update failed");
                    if last_renew.is_none_or(|t| t.elapsed() >= self.cfg.renew_deadline) {
                        self.set_leader(false);
                    }
                }
            }
            tokio::select! {
                _ = token.cancelled() => break,
                _ = tokio::time::sleep(self.cfg.retry_period) => {}
            }
        }
        if *self.tx.borrow() {
            self.set_leader(false);
            let release = tokio::time::timeout(self.cfg.renew_deadline, self.release());
            let released = release
                .await
                .unwrap_or_else(|_| Err(self.deadline_err(self.cfg.renew_deadline)));
            if let Err(e) = released {
                tracing::warn!(error = %e, "cannot release the lease; a successor waits for it to expire");
            }
        }
    }

    fn set_leader(&self, leader: bool) {
        let changed = self
            .tx
            .send_if_modified(|l| std::mem::replace(l, leader) != leader);
        if changed {
            tracing::info!(lease = %self.cfg.name, identity = %self.cfg.identity, leader, "leadership changed");
        }
    }

    fn err(&self, source: kube::Error) -> LeaseError {
        LeaseError::Api {
            namespace: self.cfg.namespace.clone(),
            name: self.cfg.name.clone(),
            source,
        }
    }

    fn deadline_err(&self, after: Duration) -> LeaseError {
        LeaseError::Deadline {
            namespace: self.cfg.namespace.clone(),
            name: self.cfg.name.clone(),
            after,
        }
    }

    fn duration_secs(&self) -> i32 {
        i32::try_from(self.cfg.lease_duration.as_secs())
            .unwrap_or(i32::MAX)
            .max(1)
    }

    /// One round: `Ok(true)` when this candidate holds the lease afterwards.
    async fn try_acquire_or_renew(&mut self) -> Result<bool, LeaseError> {
        let now = Timestamp::now();
        let Some(lease) = self
            .api
            .get_opt(&self.cfg.name)
            .await
            .map_err(|e| self.err(e))?
        else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.cfg.name.clone()),
                    namespace: Some(self.cfg.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.cfg.identity.clone()),
                    lease_duration_seconds: Some(self.duration_secs()),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(self.err(e)),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let record = Record {
            holder: holder.clone(),
            renew: spec.renew_time.as_ref().map(|t| t.0),
            resource_version: lease.resource_version(),
        };
        if self.observed.as_ref().is_none_or(|(r, _)| *r != record) {
            self.observed = Some((record, Instant::now()));
        }
        let i_hold = holder.as_deref() == Some(self.cfg.identity.as_str());
        if !i_hold && holder.is_some() {
            let duration = spec
                .lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map(Duration::from_secs)
                .unwrap_or(self.cfg.lease_duration);
            let unchanged_since = self
                .observed
                .as_ref()
                .map(|(_, at)| *at)
                .unwrap_or_else(Instant::now);
            if unchanged_since.elapsed() < duration {
                return Ok(false);
            }
        }
        let mut next = lease.clone();
        next.spec = Some(LeaseSpec {
            holder_identity: Some(self.cfg.identity.clone()),
            lease_duration_seconds: Some(self.duration_secs()),
            acquire_time: if i_hold {
                spec.acquire_time.clone()
            } else {
                Some(MicroTime(now))
            },
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(spec.lease_transitions.unwrap_or(0) + i32::from(!i_hold)),
            ..spec
        });
        match self
            .api
            .replace(&self.cfg.name, &PostParams::default(), &next)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(self.err(e)),
        }
    }

    async fn release(&self) -> Result<(), LeaseError> {
        let Some(mut lease) = self
            .api
            .get_opt(&self.cfg.name)
            .await
            .map_err(|e| self.err(e))?
        else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(self.cfg.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        match self
            .api
            .replace(&self.cfg.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => {
                tracing::info!(lease = %self.cfg.name, "lease released");
                Ok(())
            }
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
            Err(e) => Err(self.err(e)),
        }
    }
}

/// A campaign for the lease as the binaries run it: leadership, a readiness gate that follows
/// it, and a token cancelled once a lease that was held is lost. Losing the lease ends the
/// process's reconciling for good (the binaries then exit non-zero so that the pod restarts
/// and campaigns afresh, as controller-runtime does): nothing it had in flight may write on.
#[derive(Debug, Clone)]
pub struct Campaign {
    pub leadership: Leadership,
    lost: CancellationToken,
}

impl Campaign {
    /// Leadership always held (election off): never lost.
    pub fn always() -> Self {
        Self {
            leadership: Leadership::always(),
            lost: CancellationToken::new(),
        }
    }

    /// Campaign with `cfg` (or lead at once when `None`) until `token` is cancelled. `gate`,
    /// when given, is open exactly while this process leads. Returns the elector's task, if
    /// any, to be drained on shutdown (it releases the lease).
    pub fn start(
        client: Client,
        cfg: Option<LeaseConfig>,
        gate: Option<crate::admin::ReadyGate>,
        token: CancellationToken,
    ) -> (Self, Option<tokio::task::JoinHandle<()>>) {
        let (leadership, task) = match cfg {
            Some(cfg) => {
                let (l, t) = spawn(client, cfg, token.clone());
                (l, Some(t))
            }
            None => (Leadership::always(), None),
        };
        (Self::follow(leadership, gate, token), task)
    }

    /// Follow `leadership`: open `gate` while leading, and mark the campaign lost when a
    /// lease once held goes (unless `token`, shutdown, was cancelled first).
    fn follow(
        leadership: Leadership,
        gate: Option<crate::admin::ReadyGate>,
        token: CancellationToken,
    ) -> Self {
        let campaign = Self {
            leadership: leadership.clone(),
            lost: CancellationToken::new(),
        };
        let (mut l, lost) = (leadership, campaign.lost.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = l.wait_for(true) => {}
                _ = token.cancelled() => return,
            }
            if let Some(g) = &gate {
                g.set(true);
            }
            tokio::select! {
                _ = l.wait_for(false) => {
                    if !token.is_cancelled() {
                        tracing::warn!("lost the lease: stopping");
                        lost.cancel();
                    }
                }
                _ = token.cancelled() => {}
            }
            if let Some(g) = &gate {
                g.set(false);
            }
        });
        campaign
    }

    /// Whether a lease once held has been lost.
    pub fn is_lost(&self) -> bool {
        self.lost.is_cancelled()
    }

    /// Completes when a lease once held is lost.
    pub async fn lost(&self) {
        self.lost.cancelled().await
    }

    /// Wait until this process leads; `false` when `stop` completes first.
    pub async fn wait_to_lead(&self, stop: &CancellationToken) -> bool {
        let mut l = self.leadership.clone();
        tokio::select! {
            _ = l.wait_for(true) => true,
            _ = stop.cancelled() => false,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
#[path = "lease_tests.rs"]
mod tests;
