//! A spoke that plays OpenShift for the Driver Toolkit: the ImageStream CRD generated from
//! OpenShift's API module (see `provision.rs`), the `openshift/driver-toolkit` ImageStream with
//! one tag per RHCOS version as OpenShift's release payload writes it, and the OS image string
//! RHCOS nodes report.

use std::time::Duration;

use anyhow::{Context as _, ensure};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use shared_api::dtk::{DTK_IMAGESTREAM_NAME, DTK_IMAGESTREAM_NAMESPACE, ImageStream};

use crate::cluster::read_crd_dir;
use crate::provision::Binaries;

const MANAGER: &str = "kmm-e2e-openshift";

/// `status.nodeInfo.osImage` of an RHCOS node of that OS version.
pub fn rhcos_os_image(version: &str) -> String {
    format!("Red Hat Enterprise Linux CoreOS {version} (Plow)")
}

/// Install the generated ImageStream CRD and wait until it is Established.
pub async fn install_imagestream_crd(client: &Client, binaries: &Binaries) -> anyhow::Result<()> {
    let dir = binaries
        .imagestream_crd
        .parent()
        .context("the ImageStream CRD's directory")?;
    let crds = read_crd_dir(dir)?;
    ensure!(
        crds.len() == 1
            && crds[0].metadata.name.as_deref() == Some("imagestreams.image.openshift.io"),
        "expected only the ImageStream CRD in {}",
        dir.display()
    );
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let name = "imagestreams.image.openshift.io";
    api.patch(
        name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&crds[0]),
    )
    .await
    .context("installing the ImageStream CRD")?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let conds = api
            .get(name)
            .await?
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default();
        if conds
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True")
        {
            return Ok(());
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "ImageStream CRD not Established: {conds:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Create or update `openshift/driver-toolkit` with `(OS version, image)` tags (kind
/// `DockerImage`) and a `latest` tag following the last one, as OpenShift does.
pub async fn put_dtk_imagestream(client: &Client, tags: &[(&str, &str)]) -> anyhow::Result<()> {
    crate::testkit::ensure_namespace(client, DTK_IMAGESTREAM_NAMESPACE).await?;
    let mut spec_tags: Vec<serde_json::Value> = tags
        .iter()
        .map(|(v, image)| json!({"name": v, "from": {"kind": "DockerImage", "name": image}}))
        .collect();
    if let Some((_, image)) = tags.last() {
        spec_tags.push(json!({"name": "latest", "from": {"kind": "DockerImage", "name": image}}));
    }
    let is = json!({
        "apiVersion": "image.openshift.io/v1", "kind": "ImageStream",
        "metadata": {"name": DTK_IMAGESTREAM_NAME, "namespace": DTK_IMAGESTREAM_NAMESPACE},
        "spec": {"tags": spec_tags},
    });
    Api::<ImageStream>::namespaced(client.clone(), DTK_IMAGESTREAM_NAMESPACE)
        .patch(
            DTK_IMAGESTREAM_NAME,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&is),
        )
        .await
        .context("applying the driver-toolkit ImageStream")?;
    Ok(())
}
