//! Image signing: pull the unsigned image, sign the files `filesToSign` matches, push the
//! original layers plus one layer holding the signed files, and mark the manifest with the
//! signing certificate's fingerprint so the hub can tell whether an image carries the current
//! certificate's signature.
//!
//! The pushed manifest is an OCI image manifest whatever the source format (Docker schema 2
//! layer and config media types are mapped to their OCI equivalents; the blobs are unchanged).
//! Signing is deterministic: the same image, key, certificate and patterns give the same digest.
//! Re-signing an image this module produced (for example after a certificate rotation) replaces
//! its signing layer instead of stacking another one.
//!
//! Memory stays bounded whatever the image size: layers are streamed to files in a temporary
//! directory under the hub's work directory (and streamed back when they must be uploaded), the
//! unpacking, hashing and signing run on a blocking thread while holding one of the
//! [`SignRuntime`]'s permits, and the [`SignLimits`](super::limits::SignLimits) cap layer sizes,
//! unpacked sizes, entry counts and the bytes of matched files.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use oci_client::manifest::{
    IMAGE_CONFIG_MEDIA_TYPE, IMAGE_DOCKER_CONFIG_MEDIA_TYPE, IMAGE_DOCKER_LAYER_GZIP_MEDIA_TYPE,
    IMAGE_DOCKER_LAYER_TAR_MEDIA_TYPE, IMAGE_LAYER_GZIP_MEDIA_TYPE, IMAGE_LAYER_MEDIA_TYPE,
    OCI_IMAGE_MEDIA_TYPE, OciDescriptor, OciImageManifest,
};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};
use sha2::{Digest, Sha256};
use shared_api::labels::{SIGNED_BY_ANNOTATION, SIGNED_FILES_ANNOTATION};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::Instrument;

pub use super::layers::{
    FilePatterns, LayerSource, MergedTree, SigningLayer, Unpack, build_signing_layer,
};
use super::limits::{Limit, SignRuntime};
use super::{HashAlgorithm, SignError, Signer, SigningCert};

/// `created_by` of the history entry for the signing layer; also how a previous signing layer
/// is recognised.
pub const HISTORY_CREATED_BY: &str = "kmm-fleet sign";

/// The certificate fingerprint an image was signed with (`io.kmm-fleet.signing-cert-sha256`),
/// from its manifest annotations.
pub fn signed_by(annotations: &BTreeMap<String, String>) -> Option<String> {
    annotations.get(SIGNED_BY_ANNOTATION).cloned()
}

/// Whether the manifest annotations say the image was signed with `cert`.
pub fn is_signed_with(annotations: &BTreeMap<String, String>, cert: &SigningCert) -> bool {
    signed_by(annotations).is_some_and(|fp| fp.eq_ignore_ascii_case(&cert.sha256_hex()))
}

/// What to sign and where to put it.
pub struct ImageSignRequest<'a> {
    /// The unsigned image: the built image, or `sign.unsignedImage`.
    pub source: &'a Reference,
    pub source_auth: &'a RegistryAuth,
    /// Where the signed image goes: `containerImage` (may equal `source`).
    pub destination: &'a Reference,
    pub destination_auth: &'a RegistryAuth,
    /// `sign.filesToSign`: absolute paths, globs allowed.
    pub files_to_sign: &'a [String],
    pub signer: &'a Signer,
    pub hash: HashAlgorithm,
}

impl fmt::Debug for ImageSignRequest<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImageSignRequest")
            .field("source", &self.source.whole())
            .field("destination", &self.destination.whole())
            .field("files_to_sign", &self.files_to_sign)
            .field("signer", &self.signer)
            .field("hash", &self.hash)
            .finish_non_exhaustive()
    }
}

/// The result of signing an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedImage {
    /// `sha256:…` of the pushed manifest.
    pub digest: String,
    /// `sha256:…` of the source manifest that was signed.
    pub source_digest: String,
    /// The files that were signed, sorted.
    pub signed_files: Vec<String>,
    /// Hex SHA-256 of the certificate DER (the `SIGNED_BY_ANNOTATION` value).
    pub cert_sha256: String,
}

/// The signed image, ready to push: produced from the pulled parts without a registry.
#[derive(Debug, Clone)]
pub struct SignedImagePlan {
    /// Source layers that are kept (all of them, or all but a previous signing layer).
    pub kept_layers: usize,
    pub layer: SigningLayer,
    pub config: Vec<u8>,
    pub manifest: OciImageManifest,
    /// The manifest exactly as pushed, and its digest.
    pub manifest_bytes: Vec<u8>,
    pub digest: String,
}

fn sha256_id(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

fn oci_media_type(media_type: &str) -> &str {
    match media_type {
        IMAGE_DOCKER_LAYER_GZIP_MEDIA_TYPE => IMAGE_LAYER_GZIP_MEDIA_TYPE,
        IMAGE_DOCKER_LAYER_TAR_MEDIA_TYPE => IMAGE_LAYER_MEDIA_TYPE,
        IMAGE_DOCKER_CONFIG_MEDIA_TYPE => IMAGE_CONFIG_MEDIA_TYPE,
        other => other,
    }
}

/// Whether `manifest`/`config` describe an image this module signed: its last layer is then a
/// signing layer to drop before signing again.
fn previous_signing_layer(manifest: &OciImageManifest, config: &serde_json::Value) -> bool {
    let annotated = manifest
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(SIGNED_BY_ANNOTATION));
    let last_history_is_ours = config
        .get("history")
        .and_then(|h| h.as_array())
        .and_then(|h| h.last())
        .and_then(|e| e.get("created_by"))
        .and_then(|c| c.as_str())
        .is_some_and(|c| c.starts_with(HISTORY_CREATED_BY));
    let diff_ids = config
        .pointer("/rootfs/diff_ids")
        .and_then(|d| d.as_array())
        .map_or(0, Vec::len);
    annotated
        && last_history_is_ours
        && manifest.layers.len() >= 2
        && diff_ids == manifest.layers.len()
}

/// Sign the files of a pulled image and describe the image to push. `layers` are the source
/// layer blobs in manifest order; `image` names the source in errors.
pub fn plan_signed_image(
    manifest: &OciImageManifest,
    config: &[u8],
    layers: &[&dyn LayerSource],
    patterns: &FilePatterns,
    signer: &Signer,
    hash: HashAlgorithm,
    unpack: &Unpack,
) -> Result<SignedImagePlan, SignError> {
    let image = unpack.image.as_str();
    let bad = |reason: String| SignError::Image {
        image: image.to_string(),
        reason,
    };
    if layers.len() != manifest.layers.len() {
        return Err(bad(format!(
            "{} layer blobs for {} manifest layers",
            layers.len(),
            manifest.layers.len()
        )));
    }
    let mut config: serde_json::Value =
        serde_json::from_slice(config).map_err(|e| bad(format!("config is not JSON: {e}")))?;
    let resign = previous_signing_layer(manifest, &config);
    let kept_layers = if resign {
        layers.len() - 1
    } else {
        layers.len()
    };
    if resign {
        tracing::info!(
            image,
            "replacing the signing layer of a previously signed image"
        );
    }

    let layer = build_signing_layer(&layers[..kept_layers], patterns, signer, hash, unpack)?;
    let cert_sha256 = signer.cert().sha256_hex();

    let diff_ids = config
        .pointer_mut("/rootfs/diff_ids")
        .and_then(|d| d.as_array_mut())
        .ok_or_else(|| bad("config has no rootfs.diff_ids".into()))?;
    if resign {
        diff_ids.pop();
    }
    diff_ids.push(serde_json::Value::String(layer.diff_id.clone()));
    let created = config.get("created").cloned();
    if let Some(history) = config.get_mut("history").and_then(|h| h.as_array_mut()) {
        if resign {
            history.pop();
        }
        let mut entry = serde_json::Map::new();
        // The source's creation time, not now: signing stays reproducible.
        if let Some(created) = created {
            entry.insert("created".into(), created);
        }
        entry.insert(
            "created_by".into(),
            format!("{HISTORY_CREATED_BY} {hash} {}", layer.files.join(" ")).into(),
        );
        entry.insert(
            "comment".into(),
            format!("signed with certificate sha256:{cert_sha256}").into(),
        );
        history.push(serde_json::Value::Object(entry));
    }
    let config = serde_json::to_vec(&config).map_err(|e| bad(format!("config: {e}")))?;

    let mut layer_descriptors: Vec<OciDescriptor> = manifest.layers[..kept_layers]
        .iter()
        .map(|d| OciDescriptor {
            media_type: oci_media_type(&d.media_type).to_string(),
            ..d.clone()
        })
        .collect();
    layer_descriptors.push(OciDescriptor {
        media_type: IMAGE_LAYER_GZIP_MEDIA_TYPE.to_string(),
        digest: layer.digest.clone(),
        size: layer.blob.len() as i64,
        ..OciDescriptor::default()
    });
    let mut annotations = manifest.annotations.clone().unwrap_or_default();
    annotations.insert(SIGNED_BY_ANNOTATION.to_string(), cert_sha256);
    annotations.insert(SIGNED_FILES_ANNOTATION.to_string(), layer.files.join(","));
    let new_manifest = OciImageManifest {
        schema_version: 2,
        media_type: Some(OCI_IMAGE_MEDIA_TYPE.to_string()),
        config: OciDescriptor {
            media_type: oci_media_type(&manifest.config.media_type).to_string(),
            digest: sha256_id(&config),
            size: config.len() as i64,
            ..OciDescriptor::default()
        },
        layers: layer_descriptors,
        subject: None,
        artifact_type: None,
        annotations: Some(annotations),
    };
    let manifest_bytes =
        serde_json::to_vec(&new_manifest).map_err(|e| bad(format!("manifest: {e}")))?;
    Ok(SignedImagePlan {
        kept_layers,
        digest: sha256_id(&manifest_bytes),
        layer,
        config,
        manifest: new_manifest,
        manifest_bytes,
    })
}

fn registry_error(
    image: &Reference,
) -> impl Fn(oci_client::errors::OciDistributionError) -> SignError + '_ {
    move |error| SignError::Registry {
        image: image.whole(),
        error,
    }
}

/// Chunks of this size are read from layer files and sent per upload request.
const UPLOAD_CHUNK: usize = 4 * 1024 * 1024;

/// A pulled image: manifest and config in memory, layers in files.
pub(crate) struct Fetched {
    pub manifest: OciImageManifest,
    pub digest: String,
    pub config: Vec<u8>,
    pub layers: Vec<PathBuf>,
}

/// Stream one blob into `out`, failing once more than `max` bytes arrive (a descriptor's size
/// is checked before the download; this guards against a registry sending more). oci-client
/// checks the digest at the end of the stream.
async fn download(
    client: &Client,
    image: &Reference,
    descriptor: &OciDescriptor,
    out: &mut (impl AsyncWrite + Unpin),
    rt: &SignRuntime,
    limit: Limit,
    what: &str,
) -> Result<(), SignError> {
    use futures::StreamExt;
    let mut stream = client
        .pull_blob_stream(image, descriptor)
        .await
        .map_err(registry_error(image))?;
    let mut written = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| SignError::Registry {
            image: image.whole(),
            error: e.into(),
        })?;
        written += chunk.len() as u64;
        rt.limits.check(limit, written, &image.whole(), what)?;
        out.write_all(&chunk)
            .await
            .map_err(|e| SignError::io(what, e))?;
    }
    out.flush().await.map_err(|e| SignError::io(what, e))
}

/// Pull `image`'s manifest and config, and stream its layers to files under `dir`, within the
/// runtime's limits.
pub(crate) async fn fetch_image(
    client: &Client,
    rt: &SignRuntime,
    image: &Reference,
    auth: &RegistryAuth,
    dir: &Path,
) -> Result<Fetched, SignError> {
    let name = image.whole();
    client
        .auth(image, auth, RegistryOperation::Pull)
        .await
        .map_err(registry_error(image))?;
    let (manifest, digest) = client
        .pull_image_manifest(image, auth)
        .await
        .map_err(registry_error(image))?;
    let limits = &rt.limits;
    limits.check(
        Limit::Layers,
        manifest.layers.len() as u64,
        &name,
        "manifest",
    )?;
    let size = |d: &OciDescriptor| u64::try_from(d.size).unwrap_or(u64::MAX);
    limits.check(
        Limit::MetadataBytes,
        size(&manifest.config),
        &name,
        "config",
    )?;
    for (i, layer) in manifest.layers.iter().enumerate() {
        limits.check(
            Limit::LayerBytes,
            size(layer),
            &name,
            format!("layer {i} ({})", layer.digest),
        )?;
    }
    let mut config = Vec::new();
    download(
        client,
        image,
        &manifest.config,
        &mut config,
        rt,
        Limit::MetadataBytes,
        "config",
    )
    .await?;
    let mut layers = Vec::with_capacity(manifest.layers.len());
    for (i, layer) in manifest.layers.iter().enumerate() {
        let path = dir.join(format!("layer-{i}"));
        let what = format!("layer {i}");
        let file = tokio::fs::File::create(&path)
            .await
            .map_err(|e| SignError::io(path.display(), e))?;
        let mut out = tokio::io::BufWriter::with_capacity(256 * 1024, file);
        download(client, image, layer, &mut out, rt, Limit::LayerBytes, &what).await?;
        layers.push(path);
    }
    tracing::debug!(image = %name, layers = layers.len(), %digest, "pulled to disk");
    Ok(Fetched {
        manifest,
        digest,
        config,
        layers,
    })
}

/// Upload a layer file in chunks (never the whole blob in memory).
async fn upload_file(
    client: &Client,
    dst: &Reference,
    path: &Path,
    digest: &str,
    size: u64,
) -> Result<(), SignError> {
    let file = tokio::fs::File::open(path)
        .await
        .map_err(|e| SignError::io(path.display(), e))?;
    let chunks = futures::stream::try_unfold(file, |mut file| async move {
        let mut buf = vec![0u8; UPLOAD_CHUNK];
        let mut filled = 0;
        while filled < buf.len() {
            let n = file.read(&mut buf[filled..]).await?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            return Ok(None);
        }
        buf.truncate(filled);
        Ok(Some((bytes::Bytes::from(buf), file)))
    });
    client
        .push_blob_stream(dst, chunks, digest, Some(size))
        .await
        .map_err(registry_error(dst))?;
    Ok(())
}

/// Run CPU-bound work (gunzip, tar, hashing, signing, verifying) on a blocking thread while
/// holding one of the runtime's permits.
pub(crate) async fn blocking<T: Send + 'static>(
    rt: &SignRuntime,
    image: &str,
    work: impl FnOnce() -> Result<T, SignError> + Send + 'static,
) -> Result<T, SignError> {
    let _permit = rt.permit().await;
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| SignError::Image {
            image: image.to_string(),
            reason: format!("the signing task failed: {e}"),
        })?
}

/// Pull `source`, sign the matching files, push to `destination`; returns the pushed digest.
///
/// The client must have a rustls crypto provider installed (see `oci-client`'s
/// `rustls-tls-no-provider`). Source and destination credentials are applied per repository.
#[tracing::instrument(skip_all, fields(image = %req.source.whole(), destination = %req.destination.whole()))]
pub async fn sign_image(
    client: &Client,
    req: &ImageSignRequest<'_>,
    rt: &SignRuntime,
) -> Result<SignedImage, SignError> {
    let patterns = FilePatterns::new(req.files_to_sign)?;
    let src = req.source;
    let dst = req.destination;
    let dir = rt.temp_dir()?;

    let fetched = fetch_image(client, rt, src, req.source_auth, dir.path()).await?;
    let source_digest = fetched.digest.clone();
    let unpack = Unpack {
        image: src.whole(),
        limits: rt.limits,
    };
    let (manifest, config, layers) = (fetched.manifest, fetched.config, fetched.layers);
    let (signer, hash) = (req.signer.clone(), req.hash);
    let (manifest, layers, plan) = blocking(rt, &unpack.image.clone(), move || {
        let sources: Vec<&dyn LayerSource> = layers.iter().map(|p| p as &dyn LayerSource).collect();
        let plan = plan_signed_image(
            &manifest, &config, &sources, &patterns, &signer, hash, &unpack,
        )?;
        Ok((manifest, layers, plan))
    })
    .await?;

    let push = async {
        // Destination credentials for both the existence checks (pull) and the uploads (push).
        for op in [RegistryOperation::Pull, RegistryOperation::Push] {
            client
                .auth(dst, req.destination_auth, op)
                .await
                .map_err(registry_error(dst))?;
        }
        let same_registry = src.resolve_registry() == dst.resolve_registry();
        for (descriptor, path) in manifest.layers[..plan.kept_layers].iter().zip(&layers) {
            let digest = descriptor.digest.as_str();
            if client
                .blob_exists(dst, digest)
                .await
                .map_err(registry_error(dst))?
            {
                continue;
            }
            if same_registry && src.repository() != dst.repository() {
                // Cross-repository mount: no bytes move. A registry that declines starts an upload
                // session instead (an error here); the blob is then uploaded below.
                if client.mount_blob(dst, src, digest).await.is_ok()
                    && client.blob_exists(dst, digest).await.unwrap_or(false)
                {
                    continue;
                }
            }
            let size = u64::try_from(descriptor.size).unwrap_or(0);
            upload_file(client, dst, path, digest, size).await?;
        }
        drop(dir);
        for (digest, data) in [
            (plan.layer.digest.as_str(), &plan.layer.blob),
            (plan.manifest.config.digest.as_str(), &plan.config),
        ] {
            if client
                .blob_exists(dst, digest)
                .await
                .map_err(registry_error(dst))?
            {
                continue;
            }
            client
                .push_blob(dst, data.clone(), digest)
                .await
                .map_err(registry_error(dst))?;
        }
        let content_type = http::HeaderValue::from_static(OCI_IMAGE_MEDIA_TYPE);
        client
            .push_manifest_raw(dst, plan.manifest_bytes.clone(), content_type)
            .await
            .map_err(registry_error(dst))?;
        tracing::info!(digest = %plan.digest, files = plan.layer.files.len(), "pushed signed image");
        Ok::<(), SignError>(())
    };
    push.instrument(tracing::info_span!("push", destination = %dst.whole()))
        .await?;
    let cert_sha256 = req.signer.cert().sha256_hex();
    rt.mark_verified(
        &plan.digest,
        &SignRuntime::verification_key(req.signer.cert(), req.files_to_sign),
    );

    Ok(SignedImage {
        digest: plan.digest,
        source_digest,
        signed_files: plan.layer.files,
        cert_sha256,
    })
}

#[cfg(test)]
#[path = "image_tests.rs"]
mod tests;
