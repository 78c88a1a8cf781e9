//! `kmm-hub sign-file`: the kernel's `scripts/sign-file` with the same arguments, backed by the
//! same library code the hub uses for images.

use std::path::{Path, PathBuf};

use oci_client::secrets::RegistryAuth;

use super::{HashAlgorithm, SignError, Signer, module_sig};

/// Sign a kernel module: `sign-file [-dp] <hash> <key> <x509> <module> [<dest>]`.
///
/// Unlike the kernel tool, an existing signature is replaced rather than signed over.
#[derive(clap::Args, Debug, Clone)]
pub struct SignFileArgs {
    /// Write only the detached signature to `<module>.p7s`; leave the module alone.
    #[arg(short = 'd')]
    pub detached_only: bool,
    /// Also write the detached signature to `<module>.p7s`.
    #[arg(short = 'p')]
    pub save_signature: bool,
    /// Digest algorithm: sha256, sha384 or sha512.
    pub hash: String,
    /// Private key file (PEM or DER; RSA PKCS#1/PKCS#8, ECDSA P-256/P-384 SEC1/PKCS#8).
    pub key: PathBuf,
    /// Certificate file (PEM or DER).
    pub cert: PathBuf,
    /// Module to sign (signed in place unless `dest` is given).
    pub module: PathBuf,
    /// Where to write the signed module.
    pub dest: Option<PathBuf>,
}

fn read(path: &Path) -> Result<Vec<u8>, SignError> {
    std::fs::read(path).map_err(|e| SignError::io(path.display(), e))
}

fn write(path: &Path, data: &[u8]) -> Result<(), SignError> {
    std::fs::write(path, data).map_err(|e| SignError::io(path.display(), e))
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

impl SignFileArgs {
    /// Run the command.
    pub fn run(&self) -> Result<(), SignError> {
        let hash: HashAlgorithm = self.hash.parse()?;
        let signer = Signer::from_pem_or_der(&read(&self.key)?, &read(&self.cert)?)?;
        let module = read(&self.module)?;
        let unsigned =
            module_sig::strip_signature(&module).map_err(|e| e.in_file(self.module.display()))?;
        let cms = super::cms::sign_detached(&signer, hash, unsigned)?;
        tracing::debug!(module = %self.module.display(), %hash, algorithm = %signer.algorithm(), "signed");

        if self.detached_only || self.save_signature {
            write(&with_suffix(&self.module, ".p7s"), &cms)?;
        }
        if self.detached_only {
            return Ok(());
        }
        let signed = module_sig::append_signature(unsigned, &cms)?;
        match &self.dest {
            Some(dest) => write(dest, &signed),
            None => {
                // Like sign-file: write next to the module, then rename over it.
                let tmp = with_suffix(&self.module, ".~signed~");
                write(&tmp, &signed)?;
                if let Ok(meta) = std::fs::metadata(&self.module) {
                    // Keep the module's permissions; failing to is not worth failing the sign.
                    let _ = std::fs::set_permissions(&tmp, meta.permissions());
                }
                std::fs::rename(&tmp, &self.module)
                    .map_err(|e| SignError::io(self.module.display(), e))
            }
        }
    }
}

/// Registry access for the image commands: plain HTTP for loopback registries (as the hub
/// does), HTTPS otherwise; credentials from a Docker config file.
#[derive(clap::Args, Debug, Clone)]
pub struct RegistryArgs {
    /// A Docker config JSON (`{"auths": {...}}`) with the registries' credentials.
    #[arg(long)]
    pub auth_file: Option<PathBuf>,
    /// Use plain HTTP for every registry (loopback registries always use it).
    #[arg(long)]
    pub insecure: bool,
}

impl RegistryArgs {
    fn auth(&self, reference: &oci_client::Reference) -> Result<RegistryAuth, SignError> {
        let Some(path) = &self.auth_file else {
            return Ok(RegistryAuth::Anonymous);
        };
        let config = crate::registry::DockerConfig::parse(&read(path)?)
            .map_err(|e| SignError::io(path.display(), std::io::Error::other(e)))?;
        Ok(config.auth_for(reference.resolve_registry()))
    }

    fn client(&self, reference: &oci_client::Reference) -> oci_client::Client {
        crate::registry::install_crypto_provider();
        let registry = reference.resolve_registry();
        let plain = self.insecure || crate::registry::is_loopback_registry(registry);
        oci_client::Client::new(oci_client::client::ClientConfig {
            protocol: if plain {
                oci_client::client::ClientProtocol::Http
            } else {
                oci_client::client::ClientProtocol::Https
            },
            ..Default::default()
        })
    }
}

fn reference(image: &str) -> Result<oci_client::Reference, SignError> {
    image.parse().map_err(|e| SignError::Image {
        image: image.to_string(),
        reason: format!("not an image reference: {e}"),
    })
}

/// `kmm-hub sign-image`: what the hub does for a `sign` section, from the command line —
/// pull `--source`, sign the files `--file` patterns match, push to `--dest`.
#[derive(clap::Args, Debug, Clone)]
pub struct SignImageArgs {
    /// The unsigned image.
    #[arg(long)]
    pub source: String,
    /// Where the signed image goes (may equal --source).
    #[arg(long)]
    pub dest: String,
    /// A filesToSign pattern (repeat for several).
    #[arg(long = "file", required = true)]
    pub files: Vec<String>,
    /// Private key file (as for sign-file).
    #[arg(long)]
    pub key: PathBuf,
    /// Certificate file.
    #[arg(long)]
    pub cert: PathBuf,
    /// Digest algorithm.
    #[arg(long, default_value = "sha256")]
    pub hash: String,
    #[command(flatten)]
    pub registry: RegistryArgs,
    #[command(flatten)]
    pub sign: super::limits::SignArgs,
}

impl SignImageArgs {
    /// Sign and push; prints the pushed digest.
    pub async fn run(&self) -> Result<super::image::SignedImage, SignError> {
        let hash: HashAlgorithm = self.hash.parse()?;
        let signer = Signer::from_pem_or_der(&read(&self.key)?, &read(&self.cert)?)?;
        let (source, dest) = (reference(&self.source)?, reference(&self.dest)?);
        let rt = self.sign.runtime();
        let req = super::image::ImageSignRequest {
            source: &source,
            source_auth: &self.registry.auth(&source)?,
            destination: &dest,
            destination_auth: &self.registry.auth(&dest)?,
            files_to_sign: &self.files,
            signer: &signer,
            hash,
        };
        super::image::sign_image(&self.registry.client(&source), &req, &rt).await
    }
}

/// `kmm-hub verify-image`: the hub's check before it ships a signed image — every file the
/// `--file` patterns match must carry a valid module signature by `--cert`.
#[derive(clap::Args, Debug, Clone)]
pub struct VerifyImageArgs {
    /// The image (a tag or `@sha256:` digest).
    #[arg(long)]
    pub image: String,
    /// A filesToSign pattern (repeat for several).
    #[arg(long = "file", required = true)]
    pub files: Vec<String>,
    /// The certificate the modules must be signed with.
    #[arg(long)]
    pub cert: PathBuf,
    #[command(flatten)]
    pub registry: RegistryArgs,
    #[command(flatten)]
    pub sign: super::limits::SignArgs,
}

impl VerifyImageArgs {
    /// Verify; returns the digest and the verified files.
    pub async fn run(&self) -> Result<(String, Vec<String>), SignError> {
        let cert = super::SigningCert::from_pem_or_der(&read(&self.cert)?)?;
        let image = reference(&self.image)?;
        let auth = self.registry.auth(&image)?;
        let client = self.registry.client(&image);
        let digest = match image.digest() {
            Some(d) => d.to_string(),
            None => client
                .fetch_manifest_digest(&image, &auth)
                .await
                .map_err(|error| SignError::Registry {
                    image: image.whole(),
                    error,
                })?,
        };
        let rt = self.sign.runtime();
        let files =
            super::verify::verify_image(&client, &rt, &image, &digest, &auth, &self.files, &cert)
                .await?;
        Ok((digest, files))
    }
}
