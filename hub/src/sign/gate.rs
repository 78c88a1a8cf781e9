//! The hub's rule for signed images: ship only digests this process produced or verified
//! (carried out by `pipeline::sign`). Here: the reasons a signed image is refused with, as
//! status sees them.

use shared_api::mcm::ImageStatus;

use super::{SIGN_LIMIT_EXCEEDED, SIGNATURE_INVALID};

/// Condition/event reason when the signatures could not be checked (registry down, image
/// unreadable): the image is not shipped either.
pub const SIGNATURE_UNVERIFIED: &str = "SignatureUnverified";

/// The condition reason of the Degraded condition when a failed image's reason starts with one
/// of the signing reasons (`SignatureInvalid` first).
pub fn status_reason_of(failed: &[ImageStatus]) -> Option<&'static str> {
    [SIGNATURE_INVALID, SIGNATURE_UNVERIFIED, SIGN_LIMIT_EXCEEDED]
        .into_iter()
        .find(|r| {
            failed.iter().any(|i| {
                i.reason
                    .as_deref()
                    .is_some_and(|m| m.strip_prefix(r).is_some_and(|t| t.starts_with(':')))
            })
        })
}
