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
/// annotations and its manifest digest; also the layers themselves and the image
/// configuration, for a runtime that unpacks a real root file system.
#[derive(Clone, Debug, Default)]
pub struct ImageContents {
    /// Absolute paths (`/opt/lib/modules/…`) to contents; regular files only.
    pub files: BTreeMap<String, Vec<u8>>,
    pub annotations: BTreeMap<String, String>,
    /// `sha256:…` of the manifest.
    pub digest: String,
    pub layers: usize,
    /// The layer blobs in the manifest's order.
    pub raw_layers: Vec<Layer>,
    pub config: ImageConfig,
}

/// One layer blob: a tar, gzipped or not.
#[derive(Clone, Debug, Default)]
pub struct Layer {
    pub data: Vec<u8>,
    pub gzipped: bool,
}

/// What an image's configuration says about running it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// `NAME=value`.
    pub env: Vec<String>,
    pub working_dir: String,
    /// The configuration's labels (e.g. `ostree.linux` of an rpm-ostree image).
    pub labels: BTreeMap<String, String>,
}

impl ImageConfig {
    fn from_json(data: &[u8]) -> ImageConfig {
        let v: serde_json::Value = serde_json::from_slice(data).unwrap_or_default();
        let c = &v["config"];
        let list = |k: &str| -> Vec<String> {
            c[k].as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default()
        };
        ImageConfig {
            entrypoint: list("Entrypoint"),
            cmd: list("Cmd"),
            env: list("Env"),
            working_dir: c["WorkingDir"].as_str().unwrap_or_default().to_string(),
            labels: c["Labels"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    fn to_oci(&self) -> Option<oci_client::config::Config> {
        if *self == ImageConfig::default() {
            return None;
        }
        let some = |v: &Vec<String>| (!v.is_empty()).then(|| v.clone());
        Some(oci_client::config::Config {
            entrypoint: some(&self.entrypoint),
            cmd: some(&self.cmd),
            env: some(&self.env),
            working_dir: (!self.working_dir.is_empty()).then(|| self.working_dir.clone()),
            labels: (!self.labels.is_empty()).then(|| {
                self.labels
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            }),
            ..Default::default()
        })
    }
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
    let tars = layers
        .iter()
        .map(tar_files)
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(|e| OciError::Other(format!("writing layer: {e}")))?;
    push_image(
        access,
        reference,
        &tars,
        &ImageConfig::default(),
        annotations,
    )
    .await
}

/// Push an image made of `tars` (uncompressed layer tars, lowest first) with `config`.
pub async fn push_image(
    access: &RegistryAccess,
    reference: &str,
    tars: &[Vec<u8>],
    config: &ImageConfig,
    annotations: &BTreeMap<String, String>,
) -> Result<String, OciError> {
    let image = parse_ref(reference)?;
    let mut oci_layers = Vec::new();
    let mut diff_ids = Vec::new();
    for tar in tars {
        diff_ids.push(format!("sha256:{}", hex::encode(Sha256::digest(tar))));
        let gz = gzip(tar).map_err(|e| OciError::Other(format!("compressing layer: {e}")))?;
        oci_layers.push(ImageLayer::oci_v1_gzip(gz, None));
    }
    let config_file = ConfigFile {
        architecture: oci_client::config::Architecture::Amd64,
        os: oci_client::config::Os::Linux,
        rootfs: Rootfs {
            r#type: "layers".to_string(),
            diff_ids,
        },
        config: config.to_oci(),
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
    let mut raw_layers = Vec::new();
    for (_, layer) in layers {
        let gz = layer.media_type.ends_with("gzip");
        apply_layer(&mut files, &layer.data, gz)
            .map_err(|e| OciError::Other(format!("{reference}: layer: {e}")))?;
        raw_layers.push(Layer {
            data: layer.data.to_vec(),
            gzipped: gz,
        });
    }
    Ok(ImageContents {
        files,
        annotations: data
            .manifest
            .and_then(|m| m.annotations)
            .unwrap_or_default(),
        digest: data.digest.unwrap_or_default(),
        layers: data.layers.len(),
        raw_layers,
        config: ImageConfig::from_json(&data.config.data),
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

/// Unpack `layers` (lowest first) into `dir` as a container runtime does: modes, owners,
/// symbolic and hard links kept, OCI whiteouts honoured, nothing written outside `dir`.
pub fn unpack_layers(dir: &std::path::Path, layers: &[Layer]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for layer in layers {
        let reader: Box<dyn Read + '_> = if layer.gzipped {
            Box::new(flate2::read::GzDecoder::new(layer.data.as_slice()))
        } else {
            Box::new(layer.data.as_slice())
        };
        let mut archive = tar::Archive::new(reader);
        archive.set_preserve_permissions(true);
        // Everything here runs as root; files belong to root as in a rootful runtime.
        archive.set_preserve_ownerships(false);
        archive.set_overwrite(true);
        for entry in archive.entries()? {
            let mut entry = entry?;
            let rel = normal_path(&entry.path()?.to_string_lossy());
            if rel.split('/').any(|c| c == "..") {
                continue;
            }
            let (parent, name) = rel.rsplit_once('/').unwrap_or(("", rel.as_str()));
            let host_parent = dir.join(parent.trim_start_matches('/'));
            if name == ".wh..wh..opq" {
                if let Ok(rd) = std::fs::read_dir(&host_parent) {
                    for e in rd.flatten() {
                        remove_path(&e.path())?;
                    }
                }
                continue;
            }
            if let Some(target) = name.strip_prefix(".wh.") {
                remove_path(&host_parent.join(target))?;
                continue;
            }
            let target = dir.join(rel.trim_start_matches('/'));
            let is_dir = entry.header().entry_type().is_dir();
            if let Ok(m) = std::fs::symlink_metadata(&target)
                && !(is_dir && m.is_dir())
            {
                remove_path(&target)?;
            }
            entry.unpack_in(dir)?;
        }
    }
    Ok(())
}

/// A layer as an uncompressed tar.
pub fn layer_tar(layer: &Layer) -> std::io::Result<Vec<u8>> {
    if !layer.gzipped {
        return Ok(layer.data.clone());
    }
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(layer.data.as_slice()).read_to_end(&mut out)?;
    Ok(out)
}

fn remove_path(p: &std::path::Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p),
        Ok(_) => std::fs::remove_file(p),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
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
        h.set_uid(0);
        h.set_gid(0);
        builder.append_data(&mut h, d, std::io::empty())?;
    }
    for (path, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
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
/// module, plus firmware files. For the kernel of the real-kernel nodes the modules are
/// real ([`crate::kbuild`]: compiled, indexed by `depmod`) and the image is built on the
/// base userspace ([`crate::userspace`]); for simulated kernels they are
/// [`kmod::fake_module`]s with that kernel's vermagic.
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
    /// `MODULE_VERSION` of real modules (default [`crate::kbuild::DEFAULT_VERSION`]).
    pub version: Option<String>,
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
            let real = crate::vm::is_real_kernel(kernel);
            let compiled = if real {
                let names: Vec<&str> = self.modules.iter().map(String::as_str).collect();
                let version = self
                    .version
                    .as_deref()
                    .unwrap_or(crate::kbuild::DEFAULT_VERSION);
                crate::kbuild::compile(kernel, &names, version)
                    .map_err(|e| kmod::KmodError::Build(format!("{e:#}")))?
            } else {
                BTreeMap::new()
            };
            let mut these = BTreeMap::new();
            for m in &self.modules {
                let mut ko = match compiled.get(&m.replace('-', "_")) {
                    Some(ko) => ko.clone(),
                    None => kmod::fake_module(m, kernel),
                };
                if let Some(s) = &self.sign {
                    ko = kmod::sign_with_sign_file(&ko, &s.key, &s.cert)?;
                }
                these.insert(
                    format!("{dir}/lib/modules/{kernel}/{}", kmod::module_file_name(m)),
                    ko,
                );
            }
            if real {
                let index = crate::kbuild::depmod(&these, dir, kernel)
                    .map_err(|e| kmod::KmodError::Build(format!("{e:#}")))?;
                these.extend(index);
            }
            files.extend(these);
        }
        Ok(files)
    }

    /// Whether the image carries modules for a real kernel (and so the base userspace).
    pub fn for_real_kernel(&self) -> bool {
        self.kernels.iter().any(|k| crate::vm::is_real_kernel(k))
    }
}

/// Build and push a kmod image fixture; returns the manifest digest.
pub async fn push_kmod_image(
    access: &RegistryAccess,
    reference: &str,
    image: &KmodImage,
) -> Result<String, OciError> {
    let files = image.files().map_err(|e| OciError::Other(e.to_string()))?;
    if image.for_real_kernel() {
        let base = crate::userspace::layer()
            .map_err(|e| OciError::Other(format!("{e:#}")))?
            .to_vec();
        let top = tar_files(&files).map_err(|e| OciError::Other(format!("writing layer: {e}")))?;
        return push_image(
            access,
            reference,
            &[base, top],
            &ImageConfig::default(),
            &image.annotations,
        )
        .await;
    }
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod unpack_tests {
    use super::*;

    #[test]
    fn layers_unpack_into_a_root_file_system() {
        let base = crate::userspace::layer().unwrap().to_vec();
        let mut lower = BTreeMap::new();
        lower.insert("/opt/lib/modules/k/a.ko".to_string(), b"a".to_vec());
        lower.insert("/etc/gone".to_string(), b"x".to_vec());
        let mut upper = BTreeMap::new();
        upper.insert("/etc/.wh.gone".to_string(), Vec::new());
        upper.insert("/opt/lib/modules/k/b.ko".to_string(), b"b".to_vec());
        let layers = vec![
            Layer {
                data: gzip(&base).unwrap(),
                gzipped: true,
            },
            Layer {
                data: tar_files(&lower).unwrap(),
                gzipped: false,
            },
            Layer {
                data: tar_files(&upper).unwrap(),
                gzipped: false,
            },
        ];
        let dir = tempfile::tempdir().unwrap();
        if let Err(e) = unpack_layers(dir.path(), &layers) {
            let mut chain = format!("{e}");
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                chain.push_str(&format!(": {s}"));
                src = s.source();
            }
            panic!("{chain}");
        }
        let root = dir.path();
        assert!(
            std::fs::symlink_metadata(root.join("bin/sh"))
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(
            std::fs::read(root.join("opt/lib/modules/k/a.ko")).unwrap(),
            b"a"
        );
        assert_eq!(
            std::fs::read(root.join("opt/lib/modules/k/b.ko")).unwrap(),
            b"b"
        );
        assert!(!root.join("etc/gone").exists());
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(root.join("bin/kmod"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o111, 0o111, "executables stay executable");
    }
}
