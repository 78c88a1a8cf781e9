//! The reconciler's writes: ManifestWorks by server-side apply (in parallel, bounded),
//! their deletion, and the MCM status (only when it changed).

use futures::StreamExt;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde_json::json;
use shared_api::ManagedClusterModule;
use shared_api::labels::HUB_MANIFESTWORK_MANAGER;
use shared_api::mcm::ManagedClusterModuleStatus;
use shared_api::ocm::ManifestWork;
use tracing::Instrument;

use super::Context;
use super::error::{Error, WorkWriteError};
use crate::metrics::KindLabel;

/// Apply the works, `write_concurrency` at a time; returns the writes that failed. `works` is
/// pulled only as writes start, so a lazy iterator that renders each work keeps no more
/// rendered works than writes in flight.
pub async fn apply_works<I>(ctx: &Context, works: I) -> Vec<WorkWriteError>
where
    I: IntoIterator<Item = ManifestWork>,
    I::IntoIter: Send,
{
    let pp = PatchParams::apply(HUB_MANIFESTWORK_MANAGER).force();
    futures::stream::iter(works)
        .map(|w| {
            let pp = pp.clone();
            let cluster = w.namespace().unwrap_or_default();
            let span = tracing::debug_span!("apply_work", cluster = %cluster);
            async move {
                let name = w.name_any();
                let api: Api<ManifestWork> = Api::namespaced(ctx.client.clone(), &cluster);
                match api.patch(&name, &pp, &Patch::Apply(&w)).await {
                    Ok(applied) => {
                        ctx.metrics
                            .objects_written
                            .get_or_create(&KindLabel {
                                kind: "ManifestWork",
                            })
                            .inc();
                        ctx.caches.put_work(&applied);
                        Ok(())
                    }
                    Err(source) => Err(WorkWriteError::Apply {
                        cluster,
                        name,
                        source,
                    }),
                }
            }
            .instrument(span)
        })
        .buffer_unordered(ctx.write_concurrency.max(1))
        .filter_map(|r| std::future::ready(r.err()))
        .collect()
        .await
}

/// Delete the works of `name` on these clusters; returns the deletions that failed.
pub async fn delete_works(ctx: &Context, name: &str, clusters: &[String]) -> Vec<WorkWriteError> {
    let results: Vec<Result<(), WorkWriteError>> = futures::stream::iter(clusters.iter().cloned())
        .map(|cluster| async move { delete_work(ctx, &cluster, name).await })
        .buffer_unordered(ctx.write_concurrency.max(1))
        .collect()
        .await;
    results.into_iter().filter_map(Result::err).collect()
}

/// Delete one ManifestWork; one already gone leaves the cache too.
pub async fn delete_work(ctx: &Context, cluster: &str, name: &str) -> Result<(), WorkWriteError> {
    let api: Api<ManifestWork> = Api::namespaced(ctx.client.clone(), cluster);
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => {
            ctx.metrics
                .objects_deleted
                .get_or_create(&KindLabel {
                    kind: "ManifestWork",
                })
                .inc();
            Ok(())
        }
        Err(kube::Error::Api(s)) if s.code == 404 => {
            ctx.caches.remove_work(cluster, name);
            Ok(())
        }
        Err(source) => Err(WorkWriteError::Delete {
            cluster: cluster.to_string(),
            name: name.to_string(),
            source,
        }),
    }
}

/// Write status only when it changed; returns whether it did.
pub async fn write_status(
    ctx: &Context,
    mcm: &ManagedClusterModule,
    status: ManagedClusterModuleStatus,
) -> Result<bool, Error> {
    if mcm.status.as_ref() == Some(&status) {
        ctx.metrics.writes_skipped.inc();
        return Ok(false);
    }
    let api: Api<ManagedClusterModule> = Api::all(ctx.client.clone());
    api.patch_status(
        &mcm.name_any(),
        &PatchParams::default(),
        &Patch::Merge(json!({ "status": status })),
    )
    .await?;
    ctx.metrics
        .objects_written
        .get_or_create(&KindLabel {
            kind: "ManagedClusterModuleStatus",
        })
        .inc();
    ctx.caches.bump();
    Ok(true)
}
