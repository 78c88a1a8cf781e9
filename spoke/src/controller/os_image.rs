//! The RHCOS image of OpenShift spokes: watch the Machine Config Operator's ConfigMap
//! `openshift-machine-config-operator/machine-config-osimageurl` (by name) and keep its
//! `baseOSContainerImage` (the release's `rhel-coreos` image) for the kernel facts loop,
//! which publishes it as the ClusterClaim `os-image.kmm.node.kubernetes.io` (`facts.rs`);
//! the hub layers Day-0 images (`spec.day0`) on it.
//!
//! Elsewhere the namespace does not exist: the watch lists nothing and nothing is published.

use std::sync::{Arc, RwLock};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use kmm_runtime::queue::WorkQueue;
use kmm_runtime::shutdown::CancellationToken;
use kube::Client;
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use shared_api::day0::{BASE_OS_IMAGE_KEY, MCO_NAMESPACE, OS_IMAGE_URL_CONFIGMAP};

/// The RHCOS image; `None` while the ConfigMap (or its key) does not exist.
pub type OsImage = Arc<RwLock<Option<String>>>;

/// The `baseOSContainerImage` of the ConfigMap, if set.
pub fn base_os_image(cm: &ConfigMap) -> Option<String> {
    cm.data
        .as_ref()?
        .get(BASE_OS_IMAGE_KEY)
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// Watch the ConfigMap (by name, in its namespace) until `token` is cancelled, keeping
/// `image` current and waking the facts loop on every change.
pub async fn watch(
    client: Client,
    image: OsImage,
    facts: Arc<WorkQueue<()>>,
    token: CancellationToken,
) {
    let api: Api<ConfigMap> = Api::namespaced(client, MCO_NAMESPACE);
    let cfg = watcher::Config::default().fields(&format!("metadata.name={OS_IMAGE_URL_CONFIGMAP}"));
    let mut stream = watcher::watcher(api, cfg).default_backoff().boxed();
    // No periodic relist (unlike the ImageStream CRD's watch): a ConfigMap watch of the core
    // API is dependable, and an idle agent polls nothing.
    let mut listed: Option<String> = None;
    let set = |value: Option<String>| {
        let changed = image
            .write()
            .map(|mut t| {
                let changed = *t != value;
                *t = value;
                changed
            })
            .unwrap_or(false);
        if changed {
            facts.add(());
        }
    };
    loop {
        let ev = tokio::select! {
            _ = token.cancelled() => return,
            ev = stream.try_next() => ev,
        };
        match ev {
            Ok(Some(Event::Init)) => listed = None,
            Ok(Some(Event::InitApply(cm))) => listed = base_os_image(&cm),
            Ok(Some(Event::InitDone)) => set(listed.take()),
            Ok(Some(Event::Apply(cm))) => {
                let v = base_os_image(&cm);
                tracing::info!(image = ?v, "RHCOS image ConfigMap changed");
                set(v);
            }
            Ok(Some(Event::Delete(_))) => {
                tracing::info!("RHCOS image ConfigMap deleted");
                set(None);
            }
            Ok(None) => return,
            Err(e) => tracing::warn!(error = %e, "RHCOS image ConfigMap watch error"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_base_image_is_the_key_when_set() {
        let mut cm = ConfigMap::default();
        assert_eq!(base_os_image(&cm), None);
        cm.data = Some(
            [(
                BASE_OS_IMAGE_KEY.to_string(),
                " quay.io/ocp@sha256:12\n".to_string(),
            )]
            .into(),
        );
        assert_eq!(base_os_image(&cm).as_deref(), Some("quay.io/ocp@sha256:12"));
        cm.data = Some([(BASE_OS_IMAGE_KEY.to_string(), String::new())].into());
        assert_eq!(base_os_image(&cm), None);
    }
}
