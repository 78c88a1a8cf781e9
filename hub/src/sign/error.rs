//! The signing error type. Messages name the problem and the input (file, pattern, image) but
//! never carry key material: parser errors from key decoding are reduced to a fixed text.
//! Underlying errors are part of the message (events and status show `Display` only), so they
//! are not also chained as `source`.

use thiserror::Error;

/// Condition/event reason: an image's modules do not verify against the MCM's certificate.
pub const SIGNATURE_INVALID: &str = "SignatureInvalid";
/// Condition/event reason: an image is larger than a signing limit allows.
pub const SIGN_LIMIT_EXCEEDED: &str = "SignLimitExceeded";

/// Everything that can go wrong while loading signing material, signing a module or signing an
/// image.
#[derive(Debug, Error)]
pub enum SignError {
    /// The private key could not be read or is of an unsupported kind.
    #[error("private key: {0}")]
    Key(String),

    /// The certificate could not be read or is of an unsupported kind.
    #[error("certificate: {0}")]
    Certificate(String),

    /// The private key does not belong to the certificate.
    #[error("private key does not match the certificate ({0})")]
    KeyCertMismatch(String),

    /// An unsupported hash algorithm was requested.
    #[error("unsupported hash algorithm {0:?} (supported: sha256, sha384, sha512)")]
    Hash(String),

    /// A module (or its appended signature) is malformed.
    #[error("module {what}: {reason}")]
    Module { what: String, reason: String },

    /// A `filesToSign` pattern is not usable.
    #[error("filesToSign pattern {pattern:?}: {reason}")]
    Pattern { pattern: String, reason: String },

    /// A `filesToSign` pattern matched no regular file in the image.
    #[error("filesToSign pattern {pattern:?} matches no file in the image")]
    NoMatch { pattern: String },

    /// The image (manifest, config or a layer) could not be understood.
    #[error("image {image}: {reason}")]
    Image { image: String, reason: String },

    /// The registry refused or failed a request.
    #[error("registry, image {image}: {error}")]
    Registry {
        image: String,
        error: oci_client::errors::OciDistributionError,
    },

    /// Building the CMS structure failed (an encoding error, not an input problem).
    #[error("CMS encoding: {0}")]
    Encoding(String),

    /// The image is larger than a configured limit allows (see `sign::limits`).
    #[error("image {image}: {detail} the limit {flag} = {max_shown} ({what})",
        flag = .limit.flag(), max_shown = .limit.show(*.max), what = .limit.what())]
    Limit {
        image: String,
        limit: super::limits::Limit,
        max: u64,
        detail: String,
    },

    /// A module of an image that claims to be signed does not carry a valid signature by the
    /// expected certificate.
    #[error("image {image}: {file}: {reason}")]
    SignatureInvalid {
        image: String,
        file: String,
        reason: String,
    },

    /// Reading or writing a file failed.
    #[error("{path}: {error}")]
    Io { path: String, error: std::io::Error },
}

impl SignError {
    /// Name the file a module error is about.
    pub fn in_file(self, path: impl std::fmt::Display) -> Self {
        match self {
            SignError::Module { reason, .. } => SignError::Module {
                what: path.to_string(),
                reason,
            },
            other => other,
        }
    }

    /// The CamelCase reason for status conditions and events, for the errors that have their
    /// own: `SignLimitExceeded`, `SignatureInvalid`.
    pub fn status_reason(&self) -> Option<&'static str> {
        match self {
            SignError::Limit { .. } => Some(SIGN_LIMIT_EXCEEDED),
            SignError::SignatureInvalid { .. } => Some(SIGNATURE_INVALID),
            _ => None,
        }
    }

    pub(crate) fn io(path: impl std::fmt::Display, error: std::io::Error) -> Self {
        SignError::Io {
            path: path.to_string(),
            error,
        }
    }
}

impl kmm_runtime::ErrorCategory for SignError {
    /// A short, bounded category for metrics labels and event reasons.
    fn category(&self) -> &'static str {
        match self {
            SignError::Key(_) | SignError::KeyCertMismatch(_) => "key",
            SignError::Certificate(_) => "certificate",
            SignError::Hash(_) => "hash",
            SignError::Module { .. } => "module",
            SignError::Pattern { .. } | SignError::NoMatch { .. } => "pattern",
            SignError::Image { .. } => "image",
            SignError::Registry { .. } => "registry",
            SignError::Encoding(_) => "encoding",
            SignError::Io { .. } => "io",
            SignError::Limit { .. } => "limit",
            SignError::SignatureInvalid { .. } => "signature",
        }
    }
}

impl From<der::Error> for SignError {
    fn from(e: der::Error) -> Self {
        SignError::Encoding(e.to_string())
    }
}
