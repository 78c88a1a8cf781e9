//! The RHCOS image of OpenShift spokes: watch the Machine Config Operator's ConfigMap
//! `openshift-machine-config-operator/machine-config-osimageurl` (by name) and keep its
//! `baseOSContainerImage` (the release's `rhel-coreos` image) for the kernel facts loop,
//! which publishes it as the ClusterClaim `os-image.kmm.node.kubernetes.io` (`facts.rs`);
//! the hub layers Day-0 images (`spec.day0`) on it.
//!
//! Elsewhere the namespace does not exist: the watch lists nothing and nothing is published.

use std::sync::{Arc, RwLock};

use k8s_openapi::api::core::v1::ConfigMap;
use kmm_runtime::queue::WorkQueue;
use kmm_runtime::shutdown::CancellationToken;
use kube::Client;
use kube::api::Api;
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
    // No periodic relist (unlike the ImageStream CRD's watch): a ConfigMap watch of the core
    // API is dependable, and an idle agent polls nothing.
    super::named::follow(
        Api::<ConfigMap>::namespaced(client, MCO_NAMESPACE),
        OS_IMAGE_URL_CONFIGMAP,
        "RHCOS image ConfigMap",
        base_os_image,
        &image,
        &facts,
        None,
        token,
    )
    .await;
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
