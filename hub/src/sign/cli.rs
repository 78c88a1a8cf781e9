//! `kmm-hub sign-file`: the kernel's `scripts/sign-file` with the same arguments, backed by the
//! same library code the hub uses for images.

use std::path::{Path, PathBuf};

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
