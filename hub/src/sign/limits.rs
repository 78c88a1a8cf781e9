//! What image signing (and signature verification) may cost: size and count limits, the work
//! directory layers are streamed to, and the semaphore that bounds how many images are unpacked
//! and signed at once. One [`SignRuntime`] per hub process; the `kmm-hub run` flags
//! ([`SignArgs`]) set it up.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::sync::{Semaphore, SemaphorePermit};

use super::SignError;

const KI: u64 = 1024;
const MI: u64 = 1024 * KI;
const GI: u64 = 1024 * MI;

/// Size and count limits for one image. Exceeding one fails the signing (or verification) with
/// [`SignError::Limit`], which names the flag that sets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignLimits {
    /// Layers in the image (`--sign-max-layers`).
    pub max_layers: u64,
    /// Compressed size of one layer blob as downloaded (`--sign-max-layer-bytes`).
    pub max_layer_bytes: u64,
    /// Uncompressed size of one layer tar (`--sign-max-unpacked-bytes`).
    pub max_unpacked_bytes: u64,
    /// Tar entries over all layers of the image (`--sign-max-entries`).
    pub max_entries: u64,
    /// Bytes of the files `filesToSign` matches, summed over all layers: these are held in
    /// memory to be signed or verified (`--sign-max-signed-bytes`).
    pub max_signed_bytes: u64,
    /// Manifest and config blobs (fixed).
    pub max_metadata_bytes: u64,
}

impl Default for SignLimits {
    fn default() -> Self {
        SignLimits {
            max_layers: 128,
            max_layer_bytes: 4 * GI,
            max_unpacked_bytes: 16 * GI,
            max_entries: 500_000,
            max_signed_bytes: 64 * MI,
            max_metadata_bytes: 4 * MI,
        }
    }
}

/// Which limit was hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Layers,
    LayerBytes,
    UnpackedBytes,
    Entries,
    SignedBytes,
    MetadataBytes,
}

impl Limit {
    /// The `kmm-hub run` flag that sets it.
    pub fn flag(self) -> &'static str {
        match self {
            Limit::Layers => "--sign-max-layers",
            Limit::LayerBytes => "--sign-max-layer-bytes",
            Limit::UnpackedBytes => "--sign-max-unpacked-bytes",
            Limit::Entries => "--sign-max-entries",
            Limit::SignedBytes => "--sign-max-signed-bytes",
            Limit::MetadataBytes => "(fixed) manifest/config size",
        }
    }

    /// What is limited, in words.
    pub fn what(self) -> &'static str {
        match self {
            Limit::Layers => "layers in the image",
            Limit::LayerBytes => "compressed size of a layer",
            Limit::UnpackedBytes => "uncompressed size of a layer",
            Limit::Entries => "tar entries in the image",
            Limit::SignedBytes => "total size of the files to sign",
            Limit::MetadataBytes => "size of the manifest or config",
        }
    }

    fn is_bytes(self) -> bool {
        !matches!(self, Limit::Layers | Limit::Entries)
    }

    /// `value` as the limit's unit: bytes in IEC units, counts as they are.
    pub fn show(self, value: u64) -> String {
        if self.is_bytes() {
            format_size(value)
        } else {
            value.to_string()
        }
    }
}

impl SignLimits {
    pub(crate) fn of(&self, limit: Limit) -> u64 {
        match limit {
            Limit::Layers => self.max_layers,
            Limit::LayerBytes => self.max_layer_bytes,
            Limit::UnpackedBytes => self.max_unpacked_bytes,
            Limit::Entries => self.max_entries,
            Limit::SignedBytes => self.max_signed_bytes,
            Limit::MetadataBytes => self.max_metadata_bytes,
        }
    }

    /// `Err` when `value` exceeds `limit`; `where_` says which layer or file.
    pub(crate) fn check(
        &self,
        limit: Limit,
        value: u64,
        image: &str,
        where_: impl fmt::Display,
    ) -> Result<(), SignError> {
        let max = self.of(limit);
        if value > max {
            return Err(SignError::Limit {
                image: image.to_string(),
                limit,
                max,
                detail: format!("{where_}: {} is over", limit.show(value)),
            });
        }
        Ok(())
    }
}

/// `1536` → `1.5 KiB`; exact multiples print without decimals (`2 GiB`).
pub fn format_size(bytes: u64) -> String {
    for (unit, size) in [("GiB", GI), ("MiB", MI), ("KiB", KI)] {
        if bytes >= size {
            return if bytes.is_multiple_of(size) {
                format!("{} {unit}", bytes / size)
            } else {
                format!("{:.1} {unit}", bytes as f64 / size as f64)
            };
        }
    }
    format!("{bytes} B")
}

/// `512Mi`, `2Gi`, `64Ki`, `1G`, `4096`: IEC (`Ki`, `Mi`, `Gi`, `Ti`) and SI (`K`, `M`, `G`,
/// `T`) suffixes as in Kubernetes quantities.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, suffix) = t.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size (e.g. 512Mi, 2Gi, 1000000)"))?;
    let factor: u64 = match suffix {
        "" => 1,
        "Ki" => KI,
        "Mi" => MI,
        "Gi" => GI,
        "Ti" => 1024 * GI,
        "K" | "k" => 1000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        other => return Err(format!("{text:?}: unknown size suffix {other:?}")),
    };
    n.checked_mul(factor)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// The signing flags of `kmm-hub run` (and of `kmm-hub sign-image`).
#[derive(clap::Args, Debug, Clone)]
pub struct SignArgs {
    /// Directory for temporary files: image layers are streamed here while an image is signed
    /// or verified (a `kmm-sign-*` directory per image, removed afterwards). Default: the
    /// system temporary directory.
    #[arg(long, env = "KMM_HUB_WORK_DIR")]
    pub work_dir: Option<PathBuf>,
    /// Images unpacked and signed or verified at once (the CPU work runs on blocking threads).
    #[arg(long, env = "KMM_HUB_SIGN_CONCURRENCY", default_value_t = 2)]
    pub sign_concurrency: usize,
    /// Most layers an image to sign or verify may have.
    #[arg(long, env = "KMM_HUB_SIGN_MAX_LAYERS", default_value_t = 128)]
    pub sign_max_layers: u64,
    /// Largest compressed layer blob (e.g. 4Gi).
    #[arg(long, env = "KMM_HUB_SIGN_MAX_LAYER_BYTES", default_value = "4Gi", value_parser = parse_size)]
    pub sign_max_layer_bytes: u64,
    /// Largest uncompressed layer tar (a gzip bomb stops here).
    #[arg(long, env = "KMM_HUB_SIGN_MAX_UNPACKED_BYTES", default_value = "16Gi", value_parser = parse_size)]
    pub sign_max_unpacked_bytes: u64,
    /// Most tar entries over all layers of an image.
    #[arg(long, env = "KMM_HUB_SIGN_MAX_ENTRIES", default_value_t = 500_000)]
    pub sign_max_entries: u64,
    /// Most bytes of files matched by filesToSign (held in memory while signing/verifying).
    #[arg(long, env = "KMM_HUB_SIGN_MAX_SIGNED_BYTES", default_value = "64Mi", value_parser = parse_size)]
    pub sign_max_signed_bytes: u64,
}

impl Default for SignArgs {
    /// The flags' defaults (for a hub started in process).
    fn default() -> Self {
        let l = SignLimits::default();
        SignArgs {
            work_dir: None,
            sign_concurrency: 2,
            sign_max_layers: l.max_layers,
            sign_max_layer_bytes: l.max_layer_bytes,
            sign_max_unpacked_bytes: l.max_unpacked_bytes,
            sign_max_entries: l.max_entries,
            sign_max_signed_bytes: l.max_signed_bytes,
        }
    }
}

impl SignArgs {
    pub fn limits(&self) -> SignLimits {
        SignLimits {
            max_layers: self.sign_max_layers,
            max_layer_bytes: self.sign_max_layer_bytes,
            max_unpacked_bytes: self.sign_max_unpacked_bytes,
            max_entries: self.sign_max_entries,
            max_signed_bytes: self.sign_max_signed_bytes,
            ..SignLimits::default()
        }
    }

    pub fn runtime(&self) -> SignRuntime {
        SignRuntime::new(
            self.limits(),
            self.work_dir.clone().unwrap_or_else(std::env::temp_dir),
            self.sign_concurrency,
        )
    }
}

/// The process-wide signing resources: limits, work directory, the CPU semaphore and the
/// digests known to carry valid signatures.
#[derive(Clone)]
pub struct SignRuntime {
    pub limits: SignLimits,
    pub work_dir: PathBuf,
    permits: Arc<Semaphore>,
    verified: Arc<Mutex<HashSet<(String, String)>>>,
    /// (digest, certificate) whose modules did not verify, with the reason: a digest never
    /// changes, so it is not pulled again at every retry.
    rejected: Arc<Mutex<HashMap<(String, String), Rejection>>>,
}

/// Image, file and reason of a failed verification.
pub type Rejection = (String, String, String);

/// Remembered (digest, certificate) pairs before the set is cleared (it only saves pulls).
const VERIFIED_CAPACITY: usize = 4096;

/// Prefix of the temporary directories under the work directory.
pub(crate) const WORK_PREFIX: &str = "kmm-sign-";

impl fmt::Debug for SignRuntime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignRuntime")
            .field("limits", &self.limits)
            .field("work_dir", &self.work_dir)
            .field("available", &self.permits.available_permits())
            .finish()
    }
}

impl Default for SignRuntime {
    fn default() -> Self {
        SignRuntime::new(SignLimits::default(), std::env::temp_dir(), 2)
    }
}

impl SignRuntime {
    pub fn new(limits: SignLimits, work_dir: PathBuf, concurrency: usize) -> Self {
        SignRuntime {
            limits,
            work_dir,
            permits: Arc::new(Semaphore::new(concurrency.max(1))),
            verified: Arc::default(),
            rejected: Arc::default(),
        }
    }

    /// Wait for a turn to unpack and sign (or verify) an image.
    pub(crate) async fn permit(&self) -> SemaphorePermit<'_> {
        // The semaphore is never closed.
        match self.permits.acquire().await {
            Ok(p) => p,
            Err(_) => unreachable!("the signing semaphore is never closed"),
        }
    }

    /// A fresh temporary directory under the work directory (removed when dropped).
    pub(crate) fn temp_dir(&self) -> Result<tempfile::TempDir, SignError> {
        std::fs::create_dir_all(&self.work_dir)
            .map_err(|e| SignError::io(self.work_dir.display(), e))?;
        tempfile::Builder::new()
            .prefix(WORK_PREFIX)
            .tempdir_in(&self.work_dir)
            .map_err(|e| SignError::io(self.work_dir.display(), e))
    }

    /// Remove `kmm-sign-*` directories a previous process left behind (crash, kill).
    pub fn clean_work_dir(&self) {
        let Ok(entries) = std::fs::read_dir(&self.work_dir) else {
            return;
        };
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(WORK_PREFIX)
                && let Err(error) = std::fs::remove_dir_all(e.path())
            {
                tracing::warn!(path = %e.path().display(), %error, "cannot remove a stale signing directory");
            }
        }
    }

    /// Why `digest` failed verification for `key`, if it did.
    pub fn rejection(&self, digest: &str, key: &str) -> Option<Rejection> {
        self.rejected
            .lock()
            .ok()
            .and_then(|r| r.get(&(digest.to_string(), key.to_string())).cloned())
    }

    /// Remember that `digest`'s modules do not verify for `key`.
    pub fn mark_rejected(&self, digest: &str, key: &str, why: Rejection) {
        if let Ok(mut r) = self.rejected.lock() {
            if r.len() >= VERIFIED_CAPACITY {
                r.clear();
            }
            r.insert((digest.to_string(), key.to_string()), why);
        }
    }

    /// What a verification result depends on besides the digest: the certificate and the
    /// `filesToSign` patterns.
    pub fn verification_key(cert: &super::SigningCert, files_to_sign: &[String]) -> String {
        format!("{}|{}", cert.sha256_hex(), files_to_sign.join("\n"))
    }

    /// Whether `digest` was produced or verified for `key` ([`Self::verification_key`]).
    pub fn is_verified(&self, digest: &str, key: &str) -> bool {
        self.verified
            .lock()
            .is_ok_and(|v| v.contains(&(digest.to_string(), key.to_string())))
    }

    /// Remember that `digest` carries valid signatures for `key`.
    pub fn mark_verified(&self, digest: &str, key: &str) {
        if let Ok(mut v) = self.verified.lock() {
            if v.len() >= VERIFIED_CAPACITY {
                v.clear();
            }
            v.insert((digest.to_string(), key.to_string()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kmm_runtime::ErrorCategory as _;

    #[test]
    fn sizes_parse_and_print() {
        assert_eq!(parse_size("512Mi"), Ok(512 * MI));
        assert_eq!(parse_size("2Gi"), Ok(2 * GI));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert_eq!(parse_size("1G"), Ok(1_000_000_000));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("5Qi").is_err());
        assert!(parse_size("99999999999999Ti").is_err());
        assert_eq!(format_size(2 * GI), "2 GiB");
        assert_eq!(format_size(1536), "1.5 KiB");
        assert_eq!(format_size(12), "12 B");
    }

    #[test]
    fn flag_defaults_are_the_library_defaults() {
        use crate::cli::{Cli, Command};
        use clap::Parser;
        let sign = |args: &[&str]| {
            let argv = ["kmm-hub", "run"].iter().chain(args);
            match Cli::parse_from(argv).command {
                Command::Run(run) => run.sign,
                other => panic!("not run: {other:?}"),
            }
        };
        let parsed = sign(&[]);
        assert_eq!(parsed.limits(), SignLimits::default());
        assert_eq!(SignArgs::default().limits(), SignLimits::default());
        let set = sign(&["--sign-max-layer-bytes", "1Gi"]);
        assert_eq!(set.limits().max_layer_bytes, GI);
    }

    #[test]
    fn limit_errors_name_the_flag() {
        let l = SignLimits {
            max_entries: 10,
            ..SignLimits::default()
        };
        assert!(l.check(Limit::Entries, 10, "r/x", "layer 0").is_ok());
        let err = l
            .check(Limit::Entries, 11, "r/x", "layer 0")
            .expect_err("over");
        assert_eq!(err.category(), "limit");
        let text = err.to_string();
        assert!(
            text.contains("--sign-max-entries") && text.contains("r/x"),
            "{text}"
        );
    }
}
