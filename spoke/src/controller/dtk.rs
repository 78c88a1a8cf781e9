//! The Driver Toolkit of OpenShift spokes: where the ImageStream API is served, watch the
//! `openshift/driver-toolkit` ImageStream and keep its OS-version tags for the kernel facts
//! loop, which publishes kernel → toolkit image as ClusterClaims (`facts.rs`).
//!
//! Elsewhere (no `image.openshift.io/v1` in discovery) this only looks again once per resync
//! period: no watch, no error, nothing published.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use kmm_runtime::queue::WorkQueue;
use kmm_runtime::shutdown::CancellationToken;
use kube::Client;
use kube::api::Api;
use shared_api::dtk::{
    DTK_IMAGESTREAM_NAME, DTK_IMAGESTREAM_NAMESPACE, IMAGE_API_GROUP_VERSION, ImageStream,
    imagestream_tags,
};

/// OS version → toolkit image from the ImageStream; `None` while the API is not served or
/// the ImageStream does not exist.
pub type DtkTags = Arc<RwLock<Option<BTreeMap<String, String>>>>;

/// Whether this cluster serves ImageStreams (OpenShift's API server, or a CRD of them).
pub async fn imagestreams_served(client: &Client) -> Result<bool, kube::Error> {
    match client
        .list_api_group_resources(IMAGE_API_GROUP_VERSION)
        .await
    {
        Ok(list) => Ok(list.resources.iter().any(|r| r.name == "imagestreams")),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Look for the ImageStream API every `recheck`; once served, watch the Driver Toolkit
/// ImageStream (by name, in its namespace, listed again every `recheck`) until `token` is
/// cancelled, keeping `tags` current and waking the facts loop on every change.
pub async fn watch(
    client: Client,
    tags: DtkTags,
    facts: Arc<WorkQueue<()>>,
    recheck: Duration,
    token: CancellationToken,
) {
    loop {
        match imagestreams_served(&client).await {
            Ok(true) => break,
            Ok(false) => tracing::debug!("no ImageStream API: no Driver Toolkit claim"),
            Err(e) => tracing::warn!(error = %e, "cannot ask discovery for the ImageStream API"),
        }
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep(recheck) => {}
        }
    }
    tracing::info!(
        namespace = DTK_IMAGESTREAM_NAMESPACE,
        name = DTK_IMAGESTREAM_NAME,
        "ImageStream API served: watching the Driver Toolkit ImageStream"
    );
    // Listed afresh once per `recheck` as well: one small object, and a watch that went
    // quiet (seen on a just-established CRD of a kube-apiserver) cannot hide a new release's
    // tag for longer than that.
    super::named::follow(
        Api::<ImageStream>::namespaced(client, DTK_IMAGESTREAM_NAMESPACE),
        DTK_IMAGESTREAM_NAME,
        "Driver Toolkit ImageStream",
        |is: &ImageStream| Some(imagestream_tags(&is.spec)),
        &tags,
        &facts,
        Some(recheck),
        token,
    )
    .await;
}
