//! The Driver Toolkit (DTK) of OpenShift clusters, found the way KMM finds it there: the
//! `driver-toolkit` ImageStream in namespace `openshift` has one tag per RHCOS version
//! (`spec.tags[].name`, e.g. `417.94.202410211619-0`) pointing at that release's toolkit image
//! (`spec.tags[].from.name`), and each node says its RHCOS version in `status.nodeInfo.osImage`
//! (`Red Hat Enterprise Linux CoreOS 417.94.202410211619-0 (Plow)`) beside its kernel. Kernel →
//! OS version → tag gives the toolkit image of each kernel. Types and pure functions only.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use kube::CustomResource;
use regex::Regex;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Where OpenShift keeps the Driver Toolkit ImageStream.
pub const DTK_IMAGESTREAM_NAMESPACE: &str = "openshift";
pub const DTK_IMAGESTREAM_NAME: &str = "driver-toolkit";
/// The API group/version that serves ImageStreams (OpenShift's API server; absent elsewhere).
pub const IMAGE_API_GROUP_VERSION: &str = "image.openshift.io/v1";
/// The tag that follows the newest release; not an OS version, so never mapped to a kernel.
pub const LATEST_TAG: &str = "latest";

/// `ImageStream` (`image.openshift.io/v1`, namespaced): the fields the spoke reads.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "image.openshift.io",
    version = "v1",
    kind = "ImageStream",
    plural = "imagestreams",
    namespaced
)]
#[serde(rename_all = "camelCase")]
pub struct ImageStreamSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<TagReference>,
}

/// One `spec.tags[]` entry.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct TagReference {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<TagSource>,
}

/// `spec.tags[].from` (a `corev1.ObjectReference`: kind `DockerImage`, `ImageStreamTag`, …).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct TagSource {
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub name: String,
}

static OS_VERSION: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\d+\.\d+\.\d+-\d+").expect("valid regex"));

/// The RHCOS version in a node's `status.nodeInfo.osImage` (`417.94.202410211619-0` in
/// `Red Hat Enterprise Linux CoreOS 417.94.202410211619-0 (Plow)`); `None` when there is none
/// (any other OS).
pub fn os_image_version(os_image: &str) -> Option<&str> {
    OS_VERSION.find(os_image).map(|m| m.as_str())
}

/// OS version → toolkit image, from the ImageStream's `spec.tags`: tags pointing at a
/// `DockerImage` (what OpenShift's release payload writes), `latest` skipped.
pub fn imagestream_tags(is: &ImageStreamSpec) -> BTreeMap<String, String> {
    is.tags
        .iter()
        .filter(|t| t.name != LATEST_TAG && !t.name.is_empty())
        .filter_map(|t| {
            let from = t.from.as_ref()?;
            (from.kind == "DockerImage" && !from.name.trim().is_empty())
                .then(|| (t.name.clone(), from.name.trim().to_string()))
        })
        .collect()
}

/// Kernel → toolkit image for nodes given as `(kernel, osImage)`: a kernel whose nodes run an
/// OS version with a tag gets that tag's image; kernels without one are left out. Nodes of one
/// kernel on different OS versions (rare: the same kernel in two releases) take the newest OS
/// version's image, so the answer does not depend on node order.
pub fn kernel_dtk_images<'a>(
    nodes: impl IntoIterator<Item = (&'a str, &'a str)>,
    tags: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut best: BTreeMap<String, (Vec<u64>, String)> = BTreeMap::new();
    for (kernel, os_image) in nodes {
        if kernel.trim().is_empty() {
            continue;
        }
        let Some(version) = os_image_version(os_image) else {
            continue;
        };
        let Some(image) = tags.get(version) else {
            continue;
        };
        let key = version_key(version);
        match best.get(kernel) {
            Some((k, _)) if *k >= key => {}
            _ => {
                best.insert(kernel.to_string(), (key, image.clone()));
            }
        }
    }
    best.into_iter().map(|(k, (_, i))| (k, i)).collect()
}

/// `417.94.202410211619-0` → `[417, 94, 202410211619, 0]`, for ordering versions.
fn version_key(v: &str) -> Vec<u64> {
    v.split(['.', '-'])
        .map(|p| p.parse().unwrap_or(0))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(name: &str, kind: &str, image: &str) -> TagReference {
        TagReference {
            name: name.into(),
            from: Some(TagSource {
                kind: kind.into(),
                name: image.into(),
            }),
        }
    }

    #[test]
    fn os_versions_from_os_images() {
        for (os, want) in [
            (
                "Red Hat Enterprise Linux CoreOS 417.94.202410211619-0 (Plow)",
                Some("417.94.202410211619-0"),
            ),
            (
                "Red Hat Enterprise Linux CoreOS 411.86.202210072320-0 (Ootpa)",
                Some("411.86.202210072320-0"),
            ),
            (
                "Red Hat Enterprise Linux CoreOS 9.6.20250601-12 (Plow)",
                Some("9.6.20250601-12"),
            ),
            ("Debian GNU/Linux 12 (bookworm)", None),
            ("Ubuntu 24.04.1 LTS", None),
            ("", None),
        ] {
            assert_eq!(os_image_version(os), want, "{os:?}");
        }
    }

    #[test]
    fn tags_skip_latest_and_non_docker_sources() {
        let spec = ImageStreamSpec {
            tags: vec![
                tag(
                    "417.94.202410211619-0",
                    "DockerImage",
                    "quay.io/dtk@sha256:aa",
                ),
                tag("latest", "DockerImage", "quay.io/dtk@sha256:aa"),
                tag("416.94.1-0", "ImageStreamTag", "driver-toolkit:x"),
                TagReference {
                    name: "415.92.1-0".into(),
                    from: None,
                },
            ],
        };
        assert_eq!(
            imagestream_tags(&spec),
            BTreeMap::from([(
                "417.94.202410211619-0".to_string(),
                "quay.io/dtk@sha256:aa".to_string()
            )])
        );
    }

    #[test]
    fn kernels_map_through_the_os_version() {
        let tags = BTreeMap::from([
            ("417.94.1-0".to_string(), "dtk:417".to_string()),
            ("418.94.1-0".to_string(), "dtk:418".to_string()),
        ]);
        let os = |v: &str| format!("Red Hat Enterprise Linux CoreOS {v} (Plow)");
        let (a, b, c) = (os("417.94.1-0"), os("418.94.1-0"), os("419.94.1-0"));
        let nodes = [
            ("5.14.0-427", a.as_str()),
            ("5.14.0-570", b.as_str()),
            ("5.14.0-600", c.as_str()),
            ("6.1.0", "Debian GNU/Linux 12 (bookworm)"),
            ("", a.as_str()),
        ];
        assert_eq!(
            kernel_dtk_images(nodes, &tags),
            BTreeMap::from([
                ("5.14.0-427".to_string(), "dtk:417".to_string()),
                ("5.14.0-570".to_string(), "dtk:418".to_string()),
            ])
        );
        // One kernel on two OS versions: the newest wins, whatever the node order.
        let same = [("k", a.as_str()), ("k", b.as_str())];
        let mut reversed = same;
        reversed.reverse();
        assert_eq!(kernel_dtk_images(same, &tags)["k"], "dtk:418");
        assert_eq!(kernel_dtk_images(reversed, &tags)["k"], "dtk:418");
    }
}
