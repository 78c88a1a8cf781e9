//! The hub's rule for signed images: ship only digests this process produced or verified.
//! [`verified_outcome`] is what the image pipeline calls for an image whose annotation says it
//! is signed with the current certificate.

use kube::runtime::events::EventType;
use shared_api::ManagedClusterModule;
use shared_api::mcm::ImageStatus;

use super::verify::ensure_verified;
use super::{SIGN_LIMIT_EXCEEDED, SIGNATURE_INVALID, SigningCert};
use crate::images::ImageOutcome;
use crate::metrics::OutcomeLabel;
use crate::plan::ImageNeed;
use crate::reconcile::{Context, event};
use crate::registry::{DockerConfig, parse_reference};

/// Condition/event reason when the signatures could not be checked (registry down, image
/// unreadable): the image is not shipped either.
pub const SIGNATURE_UNVERIFIED: &str = "SignatureUnverified";

/// `Ready` when `digest` of the needed image was signed here or its modules verify against
/// `cert`; otherwise `Failed` with a reason that starts with `SignatureInvalid:` (or
/// `SignatureUnverified:` / `SignLimitExceeded:`) and a Warning event. A failed image is
/// retried with the MCM's capped backoff like any failed image.
pub async fn verified_outcome(
    ctx: &Context,
    mcm: &ManagedClusterModule,
    need: &ImageNeed,
    creds: &DockerConfig,
    digest: &str,
    files_to_sign: &[String],
    cert: &SigningCert,
) -> ImageOutcome {
    let image = match parse_reference(&need.image) {
        Ok(r) => r,
        Err(e) => return ImageOutcome::failed(e.to_string()),
    };
    let client = ctx
        .resolver
        .client_for(image.resolve_registry(), need.registry_tls)
        .clone();
    let auth = creds.auth_for(image.resolve_registry());
    match ensure_verified(
        &client,
        &ctx.signing,
        &image,
        digest,
        &auth,
        files_to_sign,
        cert,
    )
    .await
    {
        Ok(()) => ImageOutcome::ready(digest.to_string()),
        Err(e) => {
            let reason = e.status_reason().unwrap_or(SIGNATURE_UNVERIFIED);
            ctx.metrics
                .signs
                .get_or_create(&OutcomeLabel {
                    outcome: "verify-failed",
                })
                .inc();
            let msg = format!("{}@{digest} is not shipped: {e}", need.image);
            tracing::warn!(image = %need.image, digest, reason, error = %e, "signed image rejected");
            event(ctx, mcm, EventType::Warning, reason, &msg).await;
            ImageOutcome::failed(format!("{reason}: {msg}"))
        }
    }
}

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
