//! The namespace label the spoke's namespace webhook selects by (as upstream): set on a
//! namespace when a Module there is reconciled, removed when its last Module is cleaned up.
//! The webhook (`crate::webhook`) refuses deleting a labelled namespace that still holds
//! Modules, so the label only narrows which deletions are asked about.

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use shared_api::labels::{NAMESPACE_CONTAINS_MODULES_LABEL, SPOKE_NAMESPACE_MANAGER};

use super::Context;
use crate::error::ReconcileError;

/// Whether the label should stay once the Module `name` is gone: another Module is left in
/// the namespace.
pub fn others_left(name: &str, names_in_namespace: &[String]) -> bool {
    names_in_namespace.iter().any(|n| n != name)
}

/// Set (`true`) or remove (`false`) the label on `namespace`, by server-side apply under
/// the agent's own field manager (so the label is the only field it owns there). A label this
/// process set is looked at again once per resync period (someone else's full update may have
/// dropped it) and written only if it is missing; a removal is always written (the label may
/// come from an earlier run); a namespace that is gone is fine.
pub async fn ensure(namespace: &str, wanted: bool, ctx: &Context) -> Result<(), ReconcileError> {
    let fresh = ctx
        .labelled_namespaces
        .lock()
        .map(|s| s.get(namespace).is_some_and(|at| at.elapsed() < ctx.resync))
        .unwrap_or(false);
    if wanted && fresh {
        return Ok(());
    }
    let api: Api<Namespace> = Api::all(ctx.client.clone());
    if wanted && has_label(&api, namespace).await? {
        remember(namespace, true, ctx);
        return Ok(());
    }
    let labels = if wanted {
        json!({ NAMESPACE_CONTAINS_MODULES_LABEL: "" })
    } else {
        json!({})
    };
    let body = json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": { "name": namespace, "labels": labels },
    });
    let result = api
        .patch(
            namespace,
            &PatchParams::apply(SPOKE_NAMESPACE_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await;
    match result {
        Ok(_) => ctx.metrics.write("namespace-label"),
        // Gone (or going): nothing left to label.
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        Err(source) => {
            return Err(ReconcileError::NamespaceLabel {
                namespace: namespace.to_string(),
                source,
            });
        }
    }
    remember(namespace, wanted, ctx);
    Ok(())
}

/// Whether `namespace` carries the label now (a namespace that is gone does not).
async fn has_label(api: &Api<Namespace>, namespace: &str) -> Result<bool, ReconcileError> {
    match api.get_metadata_opt(namespace).await {
        Ok(ns) => Ok(ns.is_some_and(|ns| {
            ns.metadata
                .labels
                .is_some_and(|l| l.contains_key(NAMESPACE_CONTAINS_MODULES_LABEL))
        })),
        Err(source) => Err(ReconcileError::NamespaceLabel {
            namespace: namespace.to_string(),
            source,
        }),
    }
}

fn remember(namespace: &str, labelled: bool, ctx: &Context) {
    if let Ok(mut s) = ctx.labelled_namespaces.lock() {
        if labelled {
            s.insert(namespace.to_string(), std::time::Instant::now());
        } else {
            s.remove(namespace);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_label_stays_while_another_module_is_left() {
        let names = |n: &[&str]| n.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(!others_left("a", &names(&["a"])));
        assert!(!others_left("a", &names(&[])));
        assert!(others_left("a", &names(&["a", "b"])));
    }
}
