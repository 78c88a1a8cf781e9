//! The DeviceClasses of a Module's `spec.dra` (cluster-scoped `resource.k8s.io/v1`), tied to
//! the Module by the `module.name`/`module.namespace` labels as upstream: server-side applied
//! when missing or different, deleted when no longer listed, when `dra` goes and when the
//! Module goes. Read with a labelled list (no watch): a class edited by hand is put back at
//! the next reconcile.

use k8s_openapi::api::resource::v1::DeviceClass;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use serde_json::json;
use shared_api::Module;
use shared_api::labels::{MODULE_NAME_LABEL, MODULE_NAMESPACE_LABEL};

use super::Context;
use crate::error::ReconcileError;
use crate::render::ModulePlan;

/// Field manager of the agent's DeviceClasses.
pub const DEVICE_CLASS_MANAGER: &str = "kmm-spoke/deviceclass";

fn device_class_error(name: &str, source: kube::Error) -> ReconcileError {
    ReconcileError::DeviceClass {
        name: name.to_string(),
        source,
    }
}

/// The DeviceClasses labelled for the Module `namespace/name`; none when the server does not
/// serve `resource.k8s.io/v1` (before Kubernetes 1.34).
async fn owned(
    namespace: &str,
    name: &str,
    ctx: &Context,
) -> Result<Vec<DeviceClass>, ReconcileError> {
    let api: Api<DeviceClass> = Api::all(ctx.client.clone());
    let lp = ListParams::default().labels(&format!(
        "{MODULE_NAME_LABEL}={name},{MODULE_NAMESPACE_LABEL}={namespace}"
    ));
    match api.list(&lp).await {
        Ok(list) => Ok(list.items),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(Vec::new()),
        Err(source) => Err(device_class_error("(list)", source)),
    }
}

/// Whether the stored class already is what we want (labels and spec).
fn up_to_date(current: &DeviceClass, desired: &DeviceClass) -> bool {
    let labels_ok = desired
        .labels()
        .iter()
        .all(|(k, v)| current.labels().get(k) == Some(v));
    labels_ok
        && serde_json::to_value(&current.spec).ok() == serde_json::to_value(&desired.spec).ok()
}

/// Bring the Module's DeviceClasses in line with `plan.device_classes`. A class the API
/// server refuses (an invalid CEL selector, say), or whose name another Module or a user
/// already holds, is recorded in `plan.failed_device_classes` (reported in the Module's
/// `Degraded` condition) and kept as it is; the others are written.
pub async fn sync_device_classes(
    module: &Module,
    plan: &mut ModulePlan,
    ctx: &Context,
) -> Result<(), ReconcileError> {
    // Nothing to do for a Module that never had `dra` (spares a list per reconcile).
    let had_dra = module.status.as_ref().is_some_and(|s| s.dra.is_some());
    if module.spec.dra.is_none() && !had_dra {
        return Ok(());
    }
    let namespace = module.namespace().unwrap_or_default();
    let name = module.name_any();
    let existing = owned(&namespace, &name, ctx).await?;
    let api: Api<DeviceClass> = Api::all(ctx.client.clone());
    for desired in &plan.device_classes {
        let class = desired.name_any();
        let current = existing.iter().find(|c| c.name_any() == class);
        if current.is_some_and(|c| up_to_date(c, desired)) {
            continue;
        }
        if current.is_none() {
            // Not ours by label: someone else's class of that name is never taken over.
            match api.get_opt(&class).await {
                Ok(Some(other)) => {
                    let holder = match (
                        other.labels().get(MODULE_NAMESPACE_LABEL),
                        other.labels().get(MODULE_NAME_LABEL),
                    ) {
                        (Some(ns), Some(n)) => format!("Module {ns}/{n}"),
                        _ => "an object not made by kmm-spoke".to_string(),
                    };
                    plan.failed_device_classes.insert(
                        class.clone(),
                        format!("DeviceClass {class} already exists and belongs to {holder}"),
                    );
                    continue;
                }
                Ok(None) => {}
                Err(source) => return Err(device_class_error(&class, source)),
            }
        }
        let mut body = serde_json::to_value(desired).map_err(|source| ReconcileError::Encode {
            what: "DeviceClass",
            source,
        })?;
        body["apiVersion"] = json!("resource.k8s.io/v1");
        body["kind"] = json!("DeviceClass");
        match api
            .patch(
                &class,
                &PatchParams::apply(DEVICE_CLASS_MANAGER).force(),
                &Patch::Apply(&body),
            )
            .await
        {
            Ok(_) => {
                ctx.metrics.write("deviceclass-apply");
                tracing::info!(deviceclass = %class, "applied DeviceClass");
            }
            // Refused as invalid: the user's input, reported on the Module.
            Err(kube::Error::Api(s)) if s.code == 422 || s.code == 400 => {
                plan.failed_device_classes
                    .insert(class.clone(), format!("DeviceClass {class}: {}", s.message));
            }
            Err(source) => return Err(device_class_error(&class, source)),
        }
    }
    // Classes no longer listed go; one whose new spec failed to render is kept.
    for stale in existing.iter().filter(|c| {
        let class = c.name_any();
        !plan.device_classes.iter().any(|d| d.name_any() == class)
            && !plan.failed_device_classes.contains_key(&class)
    }) {
        delete(&api, &stale.name_any(), ctx).await?;
    }
    Ok(())
}

/// Delete every DeviceClass of the Module `namespace/name` (deletion of the Module).
pub async fn delete_device_classes(
    namespace: &str,
    name: &str,
    ctx: &Context,
) -> Result<(), ReconcileError> {
    let api: Api<DeviceClass> = Api::all(ctx.client.clone());
    for class in owned(namespace, name, ctx).await? {
        delete(&api, &class.name_any(), ctx).await?;
    }
    Ok(())
}

async fn delete(api: &Api<DeviceClass>, class: &str, ctx: &Context) -> Result<(), ReconcileError> {
    match api.delete(class, &DeleteParams::default()).await {
        Ok(_) => {
            ctx.metrics.write("deviceclass-delete");
            tracing::info!(deviceclass = %class, "deleted DeviceClass");
            Ok(())
        }
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(source) => Err(device_class_error(class, source)),
    }
}
