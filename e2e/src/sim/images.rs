//! What a kubelet reads for a pod: images (pulled from the real registry with the
//! pod's `imagePullSecrets`), and the files of its ConfigMap/Secret/downward-API volumes.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Secret, Volume};
use kube::Api;

use crate::oci::{self, ImageContents, OciError, RegistryAccess};

/// Images that are "public" in the test world: never pulled, always present, with an
/// empty file system. A reference matches when it starts with one of these prefixes.
/// Anything else off loopback fails to pull (there is no network).
pub const SIMULATED_PUBLIC_IMAGES: &[&str] = &[
    "gcr.io/kaniko-project/",
    "docker.io/redhat/ubi8-minimal",
    "registry.redhat.io/ubi9/ubi-minimal",
    "public.sim.kmm-fleet.io/",
];

/// Whether `image` is one of the [`SIMULATED_PUBLIC_IMAGES`].
pub fn is_simulated_public_image(image: &str) -> bool {
    SIMULATED_PUBLIC_IMAGES.iter().any(|p| image.starts_with(p))
}

/// An image as a kubelet pulled it.
#[derive(Clone, Debug, Default)]
pub struct Pulled {
    pub files: BTreeMap<String, Vec<u8>>,
    /// `repo@sha256:…`, for `containerStatuses[].imageID`.
    pub image_id: String,
    /// The layers, lowest first (empty for simulated public images), and the image's
    /// configuration: what a real-kernel node unpacks and runs.
    pub layers: Vec<oci::Layer>,
    pub config: oci::ImageConfig,
}

/// A failed pull: the kubelet-style message for `waiting.message`.
#[derive(Clone, Debug)]
pub struct PullFailure {
    pub message: String,
    pub category: &'static str,
}

fn repo_of(image: &str) -> &str {
    let no_digest = image.split('@').next().unwrap_or(image);
    match no_digest.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') => repo,
        _ => no_digest,
    }
}

/// The Docker config credentials a pod's `imagePullSecrets` give for `host`, in order.
pub async fn pull_secret_credentials(
    client: &kube::Client,
    pod: &Pod,
    host: &str,
    log: &mut Vec<String>,
) -> Vec<(String, String)> {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let mut out = Vec::new();
    for r in pod
        .spec
        .as_ref()
        .and_then(|s| s.image_pull_secrets.clone())
        .unwrap_or_default()
    {
        let name = r.name;
        match secrets.get_opt(&name).await {
            Ok(Some(s)) => {
                let data = s.data.unwrap_or_default();
                for key in [".dockerconfigjson", ".dockercfg"] {
                    if let Some(v) = data.get(key) {
                        out.extend(oci::docker_config_credentials(&v.0, host));
                    }
                }
            }
            Ok(None) => log.push(format!(
                "imagePullSecret {ns}/{name} not found: pulling without it"
            )),
            Err(e) => log.push(format!("reading imagePullSecret {ns}/{name}: {e}")),
        }
    }
    out
}

/// Pull `image` with the given credentials (each tried in turn; anonymous when none).
pub async fn pull_with(
    host: &str,
    image: &str,
    creds: &[(String, String)],
) -> Result<Pulled, PullFailure> {
    let full = if image.contains('@') || image.rsplit('/').next().is_some_and(|l| l.contains(':')) {
        image.to_string()
    } else {
        format!("{image}:latest")
    };
    if is_simulated_public_image(image) {
        let digest = shared_api::labels::short_hash(&full, 64);
        return Ok(Pulled {
            files: BTreeMap::new(),
            image_id: format!("{}@sha256:{digest}", repo_of(&full)),
            ..Default::default()
        });
    }
    if !oci::is_loopback_host(host) {
        let h = host.split(':').next().unwrap_or(host);
        return Err(PullFailure {
            message: format!(
                "rpc error: code = Unknown desc = failed to pull and unpack image \"{full}\": failed to resolve reference \"{full}\": failed to do request: Head \"https://{host}/v2/\": dial tcp: lookup {h}: no such host"
            ),
            category: "unavailable",
        });
    }
    let mut accesses: Vec<RegistryAccess> = creds
        .iter()
        .map(|(u, p)| RegistryAccess::basic(host, u.clone(), p.clone()))
        .collect();
    if accesses.is_empty() {
        accesses.push(RegistryAccess::anonymous(host));
    }
    let mut last = None;
    for access in &accesses {
        match oci::pull_files(access, &full).await {
            Ok(ImageContents {
                files,
                digest,
                raw_layers,
                config,
                ..
            }) => {
                return Ok(Pulled {
                    files,
                    image_id: format!("{}@{digest}", repo_of(&full)),
                    layers: raw_layers,
                    config,
                });
            }
            Err(e) => last = Some(e),
        }
    }
    let e = last.unwrap_or_else(|| OciError::Other("no attempt".into()));
    let prefix = format!(
        "rpc error: code = Unknown desc = failed to pull and unpack image \"{full}\": failed to resolve reference \"{full}\""
    );
    let (message, category) = match &e {
        OciError::NotFound(_) => (
            format!(
                "rpc error: code = NotFound desc = failed to pull and unpack image \"{full}\": failed to resolve reference \"{full}\": {full}: not found"
            ),
            "not-found",
        ),
        OciError::Unauthorized(_) => (
            format!(
                "{prefix}: pull access denied, repository does not exist or may require authorization: authorization failed: 401 Unauthorized"
            ),
            "unauthorized",
        ),
        OciError::Unavailable(m) => (format!("{prefix}: {m}"), "unavailable"),
        OciError::Other(m) => (format!("{prefix}: {m}"), "other"),
    };
    Err(PullFailure { message, category })
}

/// Pull a pod's image as its kubelet would.
pub async fn pull_for_pod(
    client: &kube::Client,
    pod: &Pod,
    image: &str,
    log: &mut Vec<String>,
) -> Result<Pulled, PullFailure> {
    let host = oci::reference_host(image);
    let creds = if oci::is_loopback_host(&host) {
        pull_secret_credentials(client, pod, &host, log).await
    } else {
        Vec::new()
    };
    pull_with(&host, image, &creds).await
}

/// The first missing ConfigMap/Secret a pod's volumes need (`MountVolume.SetUp failed …`).
pub async fn missing_volume(client: &kube::Client, pod: &Pod) -> Option<String> {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    for v in pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.clone())
        .unwrap_or_default()
    {
        if let Some(cm) = &v.config_map {
            let name = cm.name.clone();
            if !cm.optional.unwrap_or(false)
                && matches!(
                    Api::<ConfigMap>::namespaced(client.clone(), &ns)
                        .get_opt(&name)
                        .await,
                    Ok(None)
                )
            {
                return Some(format!(
                    "MountVolume.SetUp failed for volume \"{}\" : configmap \"{name}\" not found",
                    v.name
                ));
            }
        }
        if let Some(s) = &v.secret {
            let name = s.secret_name.clone().unwrap_or_default();
            if !s.optional.unwrap_or(false)
                && matches!(
                    Api::<Secret>::namespaced(client.clone(), &ns)
                        .get_opt(&name)
                        .await,
                    Ok(None)
                )
            {
                return Some(format!(
                    "MountVolume.SetUp failed for volume \"{}\" : secret \"{name}\" not found",
                    v.name
                ));
            }
        }
    }
    None
}

/// Every file the container sees under `dir` through ConfigMap/Secret/downward-API volumes.
pub async fn mounted_files(
    client: &kube::Client,
    pod: &Pod,
    container: &Container,
    dir: &str,
) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let dir = dir.trim_end_matches('/');
    let volumes: BTreeMap<String, Volume> = pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|v| (v.name.clone(), v))
        .collect();
    for m in container.volume_mounts.iter().flatten() {
        let mount = m.mount_path.trim_end_matches('/');
        if !(mount == dir
            || mount.starts_with(&format!("{dir}/"))
            || dir.starts_with(&format!("{mount}/")))
        {
            continue;
        }
        let Some(v) = volumes.get(&m.name) else {
            continue;
        };
        let files = volume_files(client, pod, v).await;
        for (rel, data) in files {
            let path = match &m.sub_path {
                Some(sp) if !sp.is_empty() => {
                    if &rel != sp {
                        continue;
                    }
                    mount.to_string()
                }
                _ => format!("{mount}/{rel}"),
            };
            if path == dir || path.starts_with(&format!("{dir}/")) {
                out.insert(path, data);
            }
        }
    }
    out
}

/// One file the container sees at `path`, if a volume provides it.
pub async fn mounted_file(
    client: &kube::Client,
    pod: &Pod,
    container: &Container,
    path: &str,
) -> Option<Vec<u8>> {
    let parent = path
        .rsplit_once('/')
        .map(|(p, _)| p)
        .filter(|p| !p.is_empty())
        .unwrap_or("/");
    mounted_files(client, pod, container, parent)
        .await
        .remove(path)
}

/// The files a volume holds, by path relative to its mount point.
async fn volume_files(client: &kube::Client, pod: &Pod, v: &Volume) -> BTreeMap<String, Vec<u8>> {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let mut out = BTreeMap::new();
    let pick = |data: BTreeMap<String, Vec<u8>>,
                items: Option<Vec<k8s_openapi::api::core::v1::KeyToPath>>| {
        match items {
            Some(items) if !items.is_empty() => items
                .into_iter()
                .filter_map(|i| data.get(&i.key).map(|d| (i.path.clone(), d.clone())))
                .collect(),
            _ => data,
        }
    };
    if let Some(cm) = &v.config_map
        && let Ok(Some(obj)) = Api::<ConfigMap>::namespaced(client.clone(), &ns)
            .get_opt(&cm.name)
            .await
    {
        let mut data: BTreeMap<String, Vec<u8>> = obj
            .data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.into_bytes()))
            .collect();
        data.extend(
            obj.binary_data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.0)),
        );
        out.extend(pick(data, cm.items.clone()));
    }
    if let Some(s) = &v.secret
        && let Some(name) = &s.secret_name
        && let Ok(Some(obj)) = Api::<Secret>::namespaced(client.clone(), &ns)
            .get_opt(name)
            .await
    {
        let mut data: BTreeMap<String, Vec<u8>> = obj
            .data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.0))
            .collect();
        data.extend(
            obj.string_data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.into_bytes())),
        );
        out.extend(pick(data, s.items.clone()));
    }
    if let Some(d) = &v.downward_api {
        for item in d.items.iter().flatten() {
            if let Some(f) = &item.field_ref
                && let Some(value) = field_value(pod, &f.field_path)
            {
                out.insert(item.path.clone(), value.into_bytes());
            }
        }
    }
    out
}

/// A downward-API field of the pod (`metadata.annotations['k']`, `metadata.name`, …).
fn field_value(pod: &Pod, path: &str) -> Option<String> {
    let md = &pod.metadata;
    let keyed = |prefix: &str| {
        path.strip_prefix(prefix)
            .and_then(|r| r.strip_suffix("']"))
            .or_else(|| {
                path.strip_prefix(&prefix.replace('\'', "\""))
                    .and_then(|r| r.strip_suffix("\"]"))
            })
            .map(str::to_string)
    };
    if let Some(k) = keyed("metadata.annotations['") {
        return md.annotations.as_ref()?.get(&k).cloned();
    }
    if let Some(k) = keyed("metadata.labels['") {
        return md.labels.as_ref()?.get(&k).cloned();
    }
    match path {
        "metadata.name" => md.name.clone(),
        "metadata.namespace" => md.namespace.clone(),
        "metadata.uid" => md.uid.clone(),
        "metadata.annotations" => Some(
            md.annotations
                .iter()
                .flatten()
                .map(|(k, v)| format!("{k}={v:?}\n"))
                .collect(),
        ),
        "metadata.labels" => Some(
            md.labels
                .iter()
                .flatten()
                .map(|(k, v)| format!("{k}={v:?}\n"))
                .collect(),
        ),
        _ => None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn public_images_and_repos() {
        assert!(is_simulated_public_image(
            "gcr.io/kaniko-project/executor:latest"
        ));
        assert!(is_simulated_public_image("docker.io/redhat/ubi8-minimal"));
        assert!(!is_simulated_public_image("docker.io/library/busybox"));
        assert_eq!(repo_of("127.0.0.1:5000/a/b:t"), "127.0.0.1:5000/a/b");
        assert_eq!(
            repo_of("127.0.0.1:5000/a/b@sha256:00"),
            "127.0.0.1:5000/a/b"
        );
        assert_eq!(repo_of("127.0.0.1:5000/a/b"), "127.0.0.1:5000/a/b");
    }

    #[tokio::test]
    async fn off_loopback_images_fail_without_network() {
        let e = pull_with("docker.io", "docker.io/library/busybox", &[])
            .await
            .unwrap_err();
        assert!(e.message.contains("no such host"), "{}", e.message);
        assert!(
            pull_with("gcr.io", "gcr.io/kaniko-project/executor:v1", &[])
                .await
                .is_ok()
        );
    }
}
