//! What a registry lookup can end in, from oci-client's errors.

use oci_client::errors::{OciDistributionError, OciErrorCode};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    #[error("image {0} does not exist in its registry")]
    NotFound(String),
    #[error("the registry refused the credentials for {0}")]
    Unauthorized(String),
    #[error("the registry of {image} cannot be reached: {reason}")]
    Unavailable { image: String, reason: String },
    #[error("{image}: {reason}")]
    Invalid { image: String, reason: String },
}

impl LookupError {
    /// Whether the image is known not to exist (as opposed to not knowing).
    pub fn is_not_found(&self) -> bool {
        matches!(self, LookupError::NotFound(_))
    }
}

impl kmm_runtime::ErrorCategory for LookupError {
    /// A short static category for metrics and events.
    fn category(&self) -> &'static str {
        match self {
            LookupError::NotFound(_) => "not_found",
            LookupError::Unauthorized(_) => "unauthorized",
            LookupError::Unavailable { .. } => "unavailable",
            LookupError::Invalid { .. } => "invalid",
        }
    }
}

pub(super) fn classify(image: &str, e: OciDistributionError) -> LookupError {
    let image = image.to_string();
    match e {
        OciDistributionError::ImageManifestNotFoundError(_) => LookupError::NotFound(image),
        OciDistributionError::AuthenticationFailure(_)
        | OciDistributionError::UnauthorizedError { .. } => LookupError::Unauthorized(image),
        OciDistributionError::RegistryError { envelope, .. } => {
            let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
            if codes.iter().any(|c| {
                matches!(
                    c,
                    OciErrorCode::ManifestUnknown
                        | OciErrorCode::NameUnknown
                        | OciErrorCode::NotFound
                )
            }) {
                LookupError::NotFound(image)
            } else if codes
                .iter()
                .any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied))
            {
                LookupError::Unauthorized(image)
            } else {
                LookupError::Unavailable {
                    image,
                    reason: envelope.to_string(),
                }
            }
        }
        OciDistributionError::ServerError { code: 404, .. } => LookupError::NotFound(image),
        OciDistributionError::ServerError {
            code: 401 | 403, ..
        } => LookupError::Unauthorized(image),
        OciDistributionError::ServerError { code, message, .. } => LookupError::Unavailable {
            image,
            reason: format!("HTTP {code}: {message}"),
        },
        OciDistributionError::RequestError(r) => LookupError::Unavailable {
            image,
            reason: short_reqwest(&r),
        },
        other => LookupError::Unavailable {
            image,
            reason: other.to_string(),
        },
    }
}

fn short_reqwest(e: &reqwest::Error) -> String {
    if e.is_connect() {
        "connection refused or unreachable".into()
    } else if e.is_timeout() {
        "timed out".into()
    } else {
        e.to_string()
    }
}
