//! Pushing and pulling small file-based images on the test world's registry, with
//! oci-client over plain HTTP. Only loopback registries are ever contacted: a reference
//! on any other host fails with [`OciError::Unavailable`] without touching the network.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use base64::Engine;
use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::config::{ConfigFile, Rootfs};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::{self, OciImageManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use sha2::{Digest, Sha256};

use crate::kmod;

/// Where and as whom to reach a registry. `host` is `127.0.0.1:PORT` (plain HTTP).
#[derive(Clone, Debug)]
pub struct RegistryAccess {
    pub host: String,
    pub username: Option<String>,
    pub password: Option<String>,
}

impl RegistryAccess {
    pub fn anonymous(host: impl Into<String>) -> Self {
        RegistryAccess {
            host: host.into(),
            username: None,
            password: None,
        }
    }

    pub fn basic(
        host: impl Into<String>,
        username: impl Into<String>,
        password: impl Into<String>,
    ) -> Self {
        RegistryAccess {
            host: host.into(),
            username: Some(username.into()),
            password: Some(password.into()),
        }
    }

    fn auth(&self) -> RegistryAuth {
        match (&self.username, &self.password) {
            (Some(u), Some(p)) => RegistryAuth::Basic(u.clone(), p.clone()),
            (Some(u), None) => RegistryAuth::Basic(u.clone(), String::new()),
            _ => RegistryAuth::Anonymous,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("image not found: {0}")]
    NotFound(String),
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    #[error("registry unavailable: {0}")]
    Unavailable(String),
    #[error("{0}")]
    Other(String),
}

impl OciError {
    pub fn category(&self) -> &'static str {
        match self {
            OciError::NotFound(_) => "not-found",
            OciError::Unauthorized(_) => "unauthorized",
            OciError::Unavailable(_) => "unavailable",
            OciError::Other(_) => "other",
        }
    }
}

/// An image's files merged over its layers (whiteouts honoured), its manifest
/// annotations and its manifest digest.
#[derive(Clone, Debug, Default)]
pub struct ImageContents {
    /// Absolute paths (`/opt/lib/modules/…`) to contents; regular files only.
    pub files: BTreeMap<String, Vec<u8>>,
    pub annotations: BTreeMap<String, String>,
    /// `sha256:…` of the manifest.
    pub digest: String,
    pub layers: usize,
}

/// Whether `host` (with or without a port) is loopback: `localhost`, `127.0.0.0/8`, `::1`.
pub fn is_loopback_host(host: &str) -> bool {
    let h = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':')
            .map(|(h, _)| h)
            .filter(|h| !h.contains(':'))
            .unwrap_or(host)
    };
    h == "localhost"
        || h.parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The registry host of an image reference, as a container runtime reads it
/// (`docker.io` when the first path component is not a host).
pub fn reference_host(reference: &str) -> String {
    match reference.split_once('/') {
        Some((first, _)) if first.contains('.') || first.contains(':') || first == "localhost" => {
            first.to_string()
        }
        _ => "docker.io".to_string(),
    }
}

fn parse_ref(reference: &str) -> Result<Reference, OciError> {
    let host = reference_host(reference);
    if !is_loopback_host(&host) {
        return Err(OciError::Unavailable(format!(
            "dial tcp: lookup {}: no such host (only loopback registries are reachable)",
            host.split(':').next().unwrap_or(&host)
        )));
    }
    Reference::try_from(reference)
        .map_err(|e| OciError::Other(format!("invalid reference {reference:?}: {e}")))
}

fn client() -> Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        connect_timeout: Some(Duration::from_secs(5)),
        read_timeout: Some(Duration::from_secs(60)),
        ..Default::default()
    })
}

fn map_err(reference: &str, e: OciDistributionError) -> OciError {
    let msg = format!("{reference}: {e}");
    match &e {
        OciDistributionError::ImageManifestNotFoundError(_) => OciError::NotFound(msg),
        OciDistributionError::UnauthorizedError { .. }
        | OciDistributionError::AuthenticationFailure(_) => OciError::Unauthorized(msg),
        OciDistributionError::RegistryError { envelope, .. } => {
            let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
            if codes
                .iter()
                .any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied))
            {
                OciError::Unauthorized(msg)
            } else if codes.iter().any(|c| {
                matches!(
                    c,
                    OciErrorCode::ManifestUnknown
                        | OciErrorCode::NameUnknown
                        | OciErrorCode::BlobUnknown
                        | OciErrorCode::ManifestBlobUnknown
                )
            }) {
                OciError::NotFound(msg)
            } else {
                OciError::Other(msg)
            }
        }
        OciDistributionError::ServerError { code, .. } => match code {
            404 => OciError::NotFound(msg),
            401 | 403 => OciError::Unauthorized(msg),
            500.. => OciError::Unavailable(msg),
            _ => OciError::Other(msg),
        },
        OciDistributionError::RequestError(r) if r.is_connect() || r.is_timeout() => {
            OciError::Unavailable(msg)
        }
        OciDistributionError::RequestError(r) if r.status().is_some_and(|s| s.as_u16() == 401) => {
            OciError::Unauthorized(msg)
        }
        _ => OciError::Other(msg),
    }
}

/// Push a one-layer image holding `files` (absolute paths) with manifest `annotations`.
/// Returns the manifest digest (`sha256:…`).
pub async fn push_files(
    access: &RegistryAccess,
    reference: &str,
    files: &BTreeMap<String, Vec<u8>>,
    annotations: &BTreeMap<String, String>,
) -> Result<String, OciError> {
    push_layers(access, reference, std::slice::from_ref(files), annotations).await
}

/// Push an image with one layer per map. A path whose file name starts with `.wh.` is
/// written as an OCI whiteout entry (it deletes the named file of lower layers).
pub async fn push_layers(
    access: &RegistryAccess,
    reference: &str,
    layers: &[BTreeMap<String, Vec<u8>>],
    annotations: &BTreeMap<String, String>,
) -> Result<String, OciError> {
    let image = parse_ref(reference)?;
    let mut oci_layers = Vec::new();
    let mut diff_ids = Vec::new();
    for files in layers {
        let tar = tar_files(files).map_err(|e| OciError::Other(format!("writing layer: {e}")))?;
        diff_ids.push(format!("sha256:{}", hex::encode(Sha256::digest(&tar))));
        let gz = gzip(&tar).map_err(|e| OciError::Other(format!("compressing layer: {e}")))?;
        oci_layers.push(ImageLayer::oci_v1_gzip(gz, None));
    }
    let config_file = ConfigFile {
        architecture: oci_client::config::Architecture::Amd64,
        os: oci_client::config::Os::Linux,
        rootfs: Rootfs {
            r#type: "layers".to_string(),
            diff_ids,
        },
        ..Default::default()
    };
    let config =
        Config::oci_v1_from_config_file(config_file, None).map_err(|e| map_err(reference, e))?;
    let annotations = (!annotations.is_empty()).then(|| annotations.clone());
    let manifest = OciImageManifest::build(&oci_layers, &config, annotations);
    let client = client();
    client
        .push(&image, &oci_layers, config, &access.auth(), Some(manifest))
        .await
        .map_err(|e| map_err(reference, e))?;
    client
        .fetch_manifest_digest(&image, &access.auth())
        .await
        .map_err(|e| map_err(reference, e))
}

/// The manifest digest of an image, or `NotFound`.
pub async fn manifest_digest(access: &RegistryAccess, reference: &str) -> Result<String, OciError> {
    let image = parse_ref(reference)?;
    client()
        .fetch_manifest_digest(&image, &access.auth())
        .await
        .map_err(|e| map_err(reference, e))
}

/// Pull an image and merge its layers into one file map.
pub async fn pull_files(
    access: &RegistryAccess,
    reference: &str,
) -> Result<ImageContents, OciError> {
    let image = parse_ref(reference)?;
    let data = client()
        .pull(
            &image,
            &access.auth(),
            vec![
                manifest::IMAGE_LAYER_MEDIA_TYPE,
                manifest::IMAGE_LAYER_GZIP_MEDIA_TYPE,
                manifest::IMAGE_DOCKER_LAYER_TAR_MEDIA_TYPE,
                manifest::IMAGE_DOCKER_LAYER_GZIP_MEDIA_TYPE,
            ],
        )
        .await
        .map_err(|e| map_err(reference, e))?;
    // oci-client's `pull` hands layers back in download-completion order; apply them in the
    // manifest's order, or a later layer (a signed module) may be overwritten by its base.
    let order: Vec<String> = data
        .manifest
        .as_ref()
        .map(|m| m.layers.iter().map(|l| l.digest.clone()).collect())
        .unwrap_or_default();
    let mut layers: Vec<(usize, &ImageLayer)> = data
        .layers
        .iter()
        .map(|l| {
            let digest = l.sha256_digest();
            let at = order
                .iter()
                .position(|d| *d == digest)
                .unwrap_or(usize::MAX);
            (at, l)
        })
        .collect();
    layers.sort_by_key(|(at, _)| *at);
    let mut files = BTreeMap::new();
    for (_, layer) in layers {
        let gz = layer.media_type.ends_with("gzip");
        apply_layer(&mut files, &layer.data, gz)
            .map_err(|e| OciError::Other(format!("{reference}: layer: {e}")))?;
    }
    Ok(ImageContents {
        files,
        annotations: data
            .manifest
            .and_then(|m| m.annotations)
            .unwrap_or_default(),
        digest: data.digest.unwrap_or_default(),
        layers: data.layers.len(),
    })
}

fn normal_path(p: &str) -> String {
    let trimmed = p.trim_start_matches("./").trim_start_matches('/');
    format!("/{}", trimmed.trim_end_matches('/'))
}

/// Apply one layer (a tar, optionally gzipped) over `files`, honouring OCI whiteouts.
pub fn apply_layer(
    files: &mut BTreeMap<String, Vec<u8>>,
    data: &[u8],
    gzipped: bool,
) -> std::io::Result<()> {
    let reader: Box<dyn Read + '_> = if gzipped {
        Box::new(flate2::read::GzDecoder::new(data))
    } else {
        Box::new(data)
    };
    let mut archive = tar::Archive::new(reader);
    let mut added = BTreeMap::new();
    let mut whiteouts = Vec::new();
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = normal_path(&entry.path()?.to_string_lossy());
        let (dir, name) = path.rsplit_once('/').unwrap_or(("", path.as_str()));
        if name == ".wh..wh..opq" {
            whiteouts.push(format!("{dir}/"));
            continue;
        }
        if let Some(target) = name.strip_prefix(".wh.") {
            whiteouts.push(format!("{dir}/{target}"));
            continue;
        }
        if entry.header().entry_type().is_file() {
            let mut buf = Vec::new();
            entry.read_to_end(&mut buf)?;
            added.insert(path, buf);
        }
    }
    for w in whiteouts {
        if w.ends_with('/') {
            files.retain(|p, _| !p.starts_with(&w));
        } else {
            let sub = format!("{w}/");
            files.retain(|p, _| p != &w && !p.starts_with(&sub));
        }
    }
    files.extend(added);
    Ok(())
}

/// A deterministic tar of `files` (with parent directories), for a layer.
pub fn tar_files(files: &BTreeMap<String, Vec<u8>>) -> std::io::Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    let mut dirs = std::collections::BTreeSet::new();
    for path in files.keys() {
        let rel = path.trim_start_matches('/');
        let mut acc = String::new();
        if let Some((parent, _)) = rel.rsplit_once('/') {
            for part in parent.split('/') {
                acc.push_str(part);
                acc.push('/');
                dirs.insert(acc.clone());
            }
        }
    }
    for d in &dirs {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        h.set_mtime(0);
        builder.append_data(&mut h, d, std::io::empty())?;
    }
    for (path, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_mtime(0);
        builder.append_data(&mut h, path.trim_start_matches('/'), data.as_slice())?;
    }
    builder.into_inner()
}

fn gzip(data: &[u8]) -> std::io::Result<Vec<u8>> {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(data)?;
    enc.finish()
}

/// Credentials for `host` in a Docker config (`.dockerconfigjson` / `config.json`, or the
/// legacy `.dockercfg` map), in the order a kubelet would try them. Keys may carry a
/// scheme or path (`https://host/v1/`).
pub fn docker_config_credentials(config: &[u8], host: &str) -> Vec<(String, String)> {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(config) else {
        return Vec::new();
    };
    let auths = v.get("auths").unwrap_or(&v);
    let Some(map) = auths.as_object() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (key, entry) in map {
        let k = key
            .trim_start_matches("https://")
            .trim_start_matches("http://");
        let k = k.split('/').next().unwrap_or(k);
        if k != host {
            continue;
        }
        let mut user = entry
            .get("username")
            .and_then(|u| u.as_str())
            .unwrap_or_default()
            .to_string();
        let mut pass = entry
            .get("password")
            .and_then(|u| u.as_str())
            .unwrap_or_default()
            .to_string();
        if let Some(auth) = entry.get("auth").and_then(|a| a.as_str())
            && let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(auth)
            && let Some((u, p)) = String::from_utf8_lossy(&decoded).split_once(':')
            && user.is_empty()
        {
            user = u.to_string();
            pass = p.to_string();
        }
        if !user.is_empty() {
            out.push((user, pass));
        }
    }
    out
}

/// A `.dockerconfigjson` value granting `username:password` on `host`.
pub fn docker_config_json(host: &str, username: &str, password: &str) -> String {
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"));
    serde_json::json!({"auths": {host: {"username": username, "password": password, "auth": auth}}})
        .to_string()
}

/// How to sign the modules of a fixture image with the kernel's `sign-file`.
#[derive(Clone, Debug)]
pub struct SignWith {
    /// PEM private key.
    pub key: PathBuf,
    /// PEM or DER certificate.
    pub cert: PathBuf,
}

/// A kmod image fixture: `<dir>/lib/modules/<kernel>/<name>.ko` for every kernel and
/// module (a [`kmod::fake_module`] with that kernel's vermagic), plus firmware files.
#[derive(Clone, Debug, Default)]
pub struct KmodImage {
    pub kernels: Vec<String>,
    pub modules: Vec<String>,
    /// Defaults to `/opt` when empty.
    pub dir: String,
    /// Absolute paths in the image (e.g. `/firmware/fw.bin`) to contents.
    pub firmware: BTreeMap<String, Vec<u8>>,
    pub sign: Option<SignWith>,
    pub annotations: BTreeMap<String, String>,
}

impl KmodImage {
    pub fn new(kernels: &[&str], modules: &[&str]) -> Self {
        KmodImage {
            kernels: kernels.iter().map(|s| s.to_string()).collect(),
            modules: modules.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    /// The image's files.
    pub fn files(&self) -> Result<BTreeMap<String, Vec<u8>>, kmod::KmodError> {
        let dir = if self.dir.is_empty() {
            "/opt"
        } else {
            self.dir.trim_end_matches('/')
        };
        let mut files = self.firmware.clone();
        for kernel in &self.kernels {
            for m in &self.modules {
                let mut ko = kmod::fake_module(m, kernel);
                if let Some(s) = &self.sign {
                    ko = kmod::sign_with_sign_file(&ko, &s.key, &s.cert)?;
                }
                files.insert(
                    format!("{dir}/lib/modules/{kernel}/{}", kmod::module_file_name(m)),
                    ko,
                );
            }
        }
        Ok(files)
    }
}

/// Build and push a kmod image fixture; returns the manifest digest.
pub async fn push_kmod_image(
    access: &RegistryAccess,
    reference: &str,
    image: &KmodImage,
) -> Result<String, OciError> {
    let files = image.files().map_err(|e| OciError::Other(e.to_string()))?;
    push_files(access, reference, &files, &image.annotations).await
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts() {
        assert!(is_loopback_host("127.0.0.1:5000"));
        assert!(is_loopback_host("localhost:5000"));
        assert!(is_loopback_host("127.3.0.1"));
        assert!(is_loopback_host("[::1]:5000"));
        assert!(!is_loopback_host("docker.io"));
        assert!(!is_loopback_host("10.0.0.1:5000"));
        assert_eq!(reference_host("docker.io/redhat/ubi8-minimal"), "docker.io");
        assert_eq!(reference_host("redhat/ubi8-minimal"), "docker.io");
        assert_eq!(reference_host("127.0.0.1:5000/a/b:c"), "127.0.0.1:5000");
    }

    #[test]
    fn layers_merge_with_whiteouts() {
        let mut lower = BTreeMap::new();
        lower.insert("/opt/a.ko".to_string(), b"a".to_vec());
        lower.insert("/opt/d/x".to_string(), b"x".to_vec());
        lower.insert("/keep".to_string(), b"k".to_vec());
        let mut upper = BTreeMap::new();
        upper.insert("/opt/.wh.a.ko".to_string(), Vec::new());
        upper.insert("/opt/d/.wh..wh..opq".to_string(), Vec::new());
        upper.insert("/opt/b.ko".to_string(), b"b".to_vec());
        let mut files = BTreeMap::new();
        apply_layer(
            &mut files,
            &gzip(&tar_files(&lower).unwrap()).unwrap(),
            true,
        )
        .unwrap();
        apply_layer(&mut files, &tar_files(&upper).unwrap(), false).unwrap();
        assert_eq!(
            files.keys().cloned().collect::<Vec<_>>(),
            vec!["/keep", "/opt/b.ko"]
        );
    }

    #[test]
    fn docker_config() {
        let json = docker_config_json("127.0.0.1:5000", "u", "p:w");
        assert_eq!(
            docker_config_credentials(json.as_bytes(), "127.0.0.1:5000"),
            vec![("u".into(), "p:w".into())]
        );
        let legacy = r#"{"https://127.0.0.1:5000/v1/":{"auth":"dTpw"}}"#;
        assert_eq!(
            docker_config_credentials(legacy.as_bytes(), "127.0.0.1:5000"),
            vec![("u".into(), "p".into())]
        );
        assert!(docker_config_credentials(json.as_bytes(), "127.0.0.1:5001").is_empty());
    }

    #[test]
    fn error_mapping() {
        let e = parse_ref("docker.io/redhat/ubi8-minimal").unwrap_err();
        assert!(matches!(e, OciError::Unavailable(_)), "{e}");
    }
}
