//! Signing in the pipeline: an image that must be signed ships only a digest this process
//! produced (signed and pushed here) or verified (its modules' signatures checked against the
//! current certificate, not its annotation trusted).

use std::collections::BTreeMap;

use tracing::Instrument;

use super::{ImageOutcome, McmEvent, Run};
use crate::decide::plan::ImageNeed;
use crate::metrics::OutcomeLabel;
use crate::registry::parse_reference;
use crate::sign::gate::SIGNATURE_UNVERIFIED;
use crate::sign::image::{ImageSignRequest, is_signed_with, sign_image};
use crate::sign::verify::ensure_verified;
use crate::sign::{HashAlgorithm, SigningCert};

/// Ready when the image carries the current certificate's signature; otherwise sign it
/// here (from the built image in place, or from `sign.unsignedImage`) and push.
pub(super) async fn ensure_signed(
    run: &mut Run<'_>,
    need: &ImageNeed,
    digest: &str,
    annotations: &BTreeMap<String, String>,
    from_build: bool,
) -> ImageOutcome {
    let deps = run.deps;
    let Some(sign) = &need.sign else {
        return ImageOutcome::ready(digest.to_string());
    };
    let signer = match run.inputs.signer(sign) {
        Ok(s) => s,
        Err(e) => {
            deps.metrics
                .signs
                .get_or_create(&OutcomeLabel { outcome: "failed" })
                .inc();
            return ImageOutcome::failed(e.to_string());
        }
    };
    if !digest.is_empty() && is_signed_with(annotations, signer.cert()) {
        // The annotation is a claim: ship the digest only if its modules verify.
        let span = tracing::info_span!("verify", digest);
        return verified_outcome(run, need, digest, &sign.files_to_sign, signer.cert())
            .instrument(span)
            .await;
    }
    let source = if from_build || sign.unsigned_image.is_none() {
        need.image.clone()
    } else {
        sign.unsigned_image.clone().unwrap_or_default()
    };
    let (src_ref, dst_ref) = match (parse_reference(&source), parse_reference(&need.image)) {
        (Ok(s), Ok(d)) => (s, d),
        (Err(e), _) | (_, Err(e)) => return ImageOutcome::failed(e.to_string()),
    };
    let src_tls = sign
        .unsigned_image_registry_tls
        .unwrap_or(need.registry_tls);
    let client = deps
        .resolver
        .fresh_client(src_ref.resolve_registry(), src_tls);
    let req = ImageSignRequest {
        source: &src_ref,
        source_auth: &run.creds.auth_for(src_ref.resolve_registry()),
        destination: &dst_ref,
        destination_auth: &run.creds.auth_for(dst_ref.resolve_registry()),
        files_to_sign: &sign.files_to_sign,
        signer: &signer,
        hash: HashAlgorithm::Sha256,
    };
    let span = tracing::info_span!("sign", source = %source);
    match sign_image(&client, &req, deps.signing)
        .instrument(span)
        .await
    {
        Ok(signed) => {
            deps.resolver.invalidate([need.image.as_str()]);
            deps.resolver.store(&need.image, &signed.digest);
            deps.metrics
                .signs
                .get_or_create(&OutcomeLabel {
                    outcome: "succeeded",
                })
                .inc();
            let msg = format!(
                "Signed {} file(s) of {} for kernel {} with certificate {}",
                signed.signed_files.len(),
                need.image,
                need.build_kernel(),
                &signed.cert_sha256[..16.min(signed.cert_sha256.len())]
            );
            run.events.push(McmEvent::normal(
                crate::reconcile::events::SIGN_SUCCEEDED,
                msg,
            ));
            ImageOutcome::ready(signed.digest)
        }
        Err(e) => {
            deps.metrics
                .signs
                .get_or_create(&OutcomeLabel { outcome: "failed" })
                .inc();
            let msg = format!(
                "{}Signing {} for kernel {} failed: {e}",
                e.status_reason()
                    .map(|r| format!("{r}: "))
                    .unwrap_or_default(),
                need.image,
                need.build_kernel()
            );
            run.events.push(McmEvent::warning(
                crate::reconcile::events::SIGN_FAILED,
                msg.clone(),
            ));
            ImageOutcome::failed(msg)
        }
    }
}

/// `Ready` when `digest` of the needed image verifies against `cert`; otherwise `Failed`
/// with a reason that starts with `SignatureInvalid:` (or `SignatureUnverified:` /
/// `SignLimitExceeded:`) and a Warning event. A failed image is retried with the MCM's
/// capped backoff like any failed image.
async fn verified_outcome(
    run: &mut Run<'_>,
    need: &ImageNeed,
    digest: &str,
    files_to_sign: &[String],
    cert: &SigningCert,
) -> ImageOutcome {
    let deps = run.deps;
    let image = match parse_reference(&need.image) {
        Ok(r) => r,
        Err(e) => return ImageOutcome::failed(e.to_string()),
    };
    // A client of its own: verification authenticates with this MCM's credential only.
    let client = deps
        .resolver
        .fresh_client(image.resolve_registry(), need.registry_tls);
    let auth = run.creds.auth_for(image.resolve_registry());
    match ensure_verified(
        &client,
        deps.signing,
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
            deps.metrics
                .signs
                .get_or_create(&OutcomeLabel {
                    outcome: "verify-failed",
                })
                .inc();
            let msg = format!("{}@{digest} is not shipped: {e}", need.image);
            tracing::warn!(digest, reason, error = %e, "signed image rejected");
            run.events.push(McmEvent::warning(reason, msg.clone()));
            ImageOutcome::failed(format!("{reason}: {msg}"))
        }
    }
}
