//! The reconciler's writes: ManifestWorks by server-side apply (in parallel, bounded),
//! their deletion, and the MCM status (only when it changed).

use futures::StreamExt;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde_json::{Value, json};
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
    // A merge patch keeps every member it does not mention: what the new status leaves out
    // (an emptied `clusters` list, a finished rollout's `haltReason`) must be sent as null,
    // or the stale value would stay on the object.
    let old = mcm.status.as_ref().map_or(Value::Null, |s| json!(s));
    let patch = merge_patch(&old, &json!(status));
    let api: Api<ManagedClusterModule> = Api::all(ctx.client.clone());
    api.patch_status(
        &mcm.name_any(),
        &PatchParams::default(),
        &Patch::Merge(json!({ "status": patch })),
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

/// The JSON merge patch (RFC 7386) that turns `old` into `new`: members added or changed as in
/// `new`, members `new` lacks as null, nested objects patched member by member, anything else
/// (arrays, scalars) replaced whole.
pub fn merge_patch(old: &Value, new: &Value) -> Value {
    match (old, new) {
        (Value::Object(o), Value::Object(n)) => {
            let mut patch = serde_json::Map::new();
            for (k, nv) in n {
                match o.get(k) {
                    Some(ov) if ov == nv => {}
                    Some(ov) => {
                        patch.insert(k.clone(), merge_patch(ov, nv));
                    }
                    None => {
                        patch.insert(k.clone(), nv.clone());
                    }
                }
            }
            for k in o.keys().filter(|k| !n.contains_key(*k)) {
                patch.insert(k.clone(), Value::Null);
            }
            Value::Object(patch)
        }
        _ => new.clone(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::merge_patch;

    /// Applying the patch to `old` (RFC 7386, as the API server does) gives `new`.
    fn roundtrip(old: serde_json::Value, new: serde_json::Value) -> serde_json::Value {
        let patch = merge_patch(&old, &new);
        let mut applied = old;
        json_patch::merge(&mut applied, &patch);
        assert_eq!(applied, new);
        patch
    }

    #[test]
    fn members_the_new_status_lacks_are_removed() {
        let old = json!({"clusters": [{"name": "old", "reason": "DRANotSupported"}],
            "numberDesired": 2, "rollout": {"phase": "Halted", "haltReason": "x"}});
        let new = json!({"numberDesired": 2, "rollout": {"phase": "Complete"}});
        let patch = roundtrip(old, new);
        assert_eq!(
            patch,
            json!({"clusters": null, "rollout": {"phase": "Complete", "haltReason": null}})
        );
    }

    #[test]
    fn unchanged_members_are_left_out_and_arrays_replaced_whole() {
        let old = json!({"a": 1, "images": [{"image": "x"}, {"image": "y"}]});
        let new = json!({"a": 1, "images": [{"image": "y"}]});
        assert_eq!(roundtrip(old, new), json!({"images": [{"image": "y"}]}));
        assert_eq!(
            roundtrip(serde_json::Value::Null, json!({"a": 1})),
            json!({"a": 1})
        );
    }
}
