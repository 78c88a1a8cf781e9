//! The queue worker of the agent's two loops that are not per object in kube's sense: the
//! kernel facts (one key for the whole cluster) and the orphan sweep (keys of Modules gone
//! from the cache, which kube's `Controller` cannot reconcile).

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use kmm_runtime::ErrorCategory;
use kmm_runtime::backoff::KeyedBackoff;
use kmm_runtime::lease::Campaign;
use kmm_runtime::queue::{Action, WorkQueue};
use kmm_runtime::shutdown::CancellationToken;

use super::Context;
use crate::error::ReconcileError;

/// Take keys once `ready` completes, reconcile, requeue per the result or the key's capped
/// backoff; stop when the queue closes or the lease is lost.
pub async fn worker<K, F, Fut>(
    controller: &'static str,
    queue: Arc<WorkQueue<K>>,
    ready: impl Future<Output = ()>,
    campaign: Campaign,
    stop: CancellationToken,
    ctx: Arc<Context>,
    reconcile: F,
) where
    K: std::hash::Hash + Eq + Clone + std::fmt::Debug + Send + Sync + 'static,
    F: Fn(K) -> Fut,
    Fut: Future<Output = Result<Action, ReconcileError>>,
{
    let backoff = KeyedBackoff::<K>::default();
    tokio::select! {
        _ = ready => {}
        _ = stop.cancelled() => return,
    }
    tracing::debug!(controller, "worker started");
    loop {
        let Some(key) = queue.next().await else { break };
        tracing::debug!(controller, key = ?key, "reconciling");
        ctx.metrics
            .controllers
            .set_queue_depth(controller, queue.len());
        let started = Instant::now();
        // Losing the lease drops the reconcile where it stands (its client is fenced too) and
        // stops the agent.
        let result = tokio::select! {
            biased;
            _ = campaign.lost() => {
                tracing::info!(controller, key = ?key, "lost the lease: reconcile abandoned");
                queue.done(&key);
                break;
            }
            r = reconcile(key.clone()) => r,
        };
        ctx.metrics
            .controllers
            .observe_result(controller, started.elapsed(), &result);
        match result {
            Ok(action) => {
                backoff.reset(&key);
                if let Action::Requeue(after) = action {
                    queue.add_after(key.clone(), after);
                }
            }
            Err(e) => {
                let delay = backoff.next(&key);
                tracing::warn!(controller, key = ?key, error = %e, category = e.category(), retry_in = ?delay, "reconcile failed");
                queue.add_after(key.clone(), delay);
            }
        }
        queue.done(&key);
    }
}
