//! One image's outcome in a reconcile, and the moved-tag rule (spec.movedTagPolicy).

use shared_api::ManagedClusterModule;
use shared_api::mcm::{ImageState, MovedTagPolicy};

use super::plan::ImageNeed;
use crate::registry::pinned_digest;

/// What the image pipeline found out about one image of the plan.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ImageOutcome {
    pub state: ImageState,
    pub digest: Option<String>,
    pub reason: Option<String>,
    /// The tag moved to this digest and was not re-pinned (`digest` is the one kept).
    pub moved_to: Option<String>,
}

impl ImageOutcome {
    pub fn ready(digest: String) -> Self {
        Self::with(ImageState::Ready, Some(digest), None)
    }
    pub fn failed(reason: String) -> Self {
        Self::with(ImageState::Failed, None, Some(reason))
    }
    pub fn missing(reason: String) -> Self {
        Self::with(ImageState::Missing, None, Some(reason))
    }
    /// A build is on its way: a state to wait in, not a failure.
    pub fn building(reason: String) -> Self {
        Self::with(ImageState::Building, None, Some(reason))
    }
    fn with(state: ImageState, digest: Option<String>, reason: Option<String>) -> Self {
        Self {
            state,
            digest,
            reason,
            moved_to: None,
        }
    }
}

/// A tag that moved away from the digest this MCM ships, when re-pinning is off: keep the
/// shipped digest (and do nothing with the new content, e.g. not sign it). `None`: take
/// `digest` as usual. `ours`: the hub pushed `digest` itself, or its build Job just did.
pub fn held_moved_tag(
    mcm: &ManagedClusterModule,
    need: &ImageNeed,
    digest: &str,
    ours: bool,
) -> Option<ImageOutcome> {
    let keep = match mcm.spec.moved_tag_policy {
        Some(MovedTagPolicy::Repin) => false,
        Some(MovedTagPolicy::Keep) => true,
        None => need.sign.is_some(),
    };
    if !keep || pinned_digest(&need.image).is_some() {
        return None;
    }
    let status = mcm.status.as_ref()?;
    let accepted = status
        .images
        .iter()
        .find(|i| i.image == need.image)
        .and_then(|i| i.digest.clone())?;
    if accepted == digest
        // Asked for: re-verify and take what the tags point to now.
        || mcm.spec.module_spec.image_rebuild_trigger_generation
            != status.image_rebuild_trigger_generation
        || ours
    {
        return None;
    }
    let policy = match mcm.spec.moved_tag_policy {
        Some(_) => "spec.movedTagPolicy is Keep",
        None => "spec.movedTagPolicy is unset: Keep for images the hub signs",
    };
    let msg = format!(
        "tag {} moved from {accepted} to {digest}; still shipping {accepted} ({policy}; set movedTagPolicy: Repin or change imageRebuildTriggerGeneration to take the new digest)",
        need.image
    );
    Some(ImageOutcome {
        state: ImageState::Ready,
        digest: Some(accepted),
        reason: Some(msg),
        moved_to: Some(digest.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::plan::tests::mcm;
    use shared_api::mcm::{ImageStatus, ManagedClusterModuleStatus};
    use shared_api::module::{Sign, TlsOptions};

    const OLD: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const NEW: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    fn need(image: &str, signed: bool) -> ImageNeed {
        ImageNeed {
            image: image.into(),
            registry_tls: TlsOptions::default(),
            build: None,
            sign: signed.then(Sign::default),
            kernels: ["5.14.0-1".to_string()].into(),
            clusters: 1,
            layering: None,
        }
    }

    /// An MCM that shipped `OLD` for `reg/m:1`, with the given policy line.
    fn shipped(policy: &str) -> ManagedClusterModule {
        let mut m = mcm(&format!(
            "spokeNamespace: ns\nselector: {{}}\n{policy}moduleSpec:\n  selector: {{}}\n"
        ));
        m.status = Some(ManagedClusterModuleStatus {
            images: vec![ImageStatus {
                image: "reg/m:1".into(),
                digest: Some(OLD.into()),
                ..Default::default()
            }],
            ..Default::default()
        });
        m
    }

    #[test]
    fn tag_moved_is_held_by_policy_and_for_signed_images() {
        let held = held_moved_tag(&shipped(""), &need("reg/m:1", true), NEW, false)
            .expect("unset policy holds a signed image");
        assert_eq!(held.state, ImageState::Ready);
        assert_eq!(
            held.digest.as_deref(),
            Some(OLD),
            "keeps the shipped digest"
        );
        assert_eq!(held.moved_to.as_deref(), Some(NEW));
        assert!(held.reason.unwrap().contains("movedTagPolicy is unset"));
        assert!(
            held_moved_tag(&shipped(""), &need("reg/m:1", false), NEW, false).is_none(),
            "unset policy re-pins an unsigned image"
        );
        let keep = shipped("movedTagPolicy: Keep\n");
        assert!(held_moved_tag(&keep, &need("reg/m:1", false), NEW, false).is_some());
        let repin = shipped("movedTagPolicy: Repin\n");
        assert!(held_moved_tag(&repin, &need("reg/m:1", true), NEW, false).is_none());
    }

    #[test]
    fn tag_moved_is_not_held_when_unmoved_ours_asked_for_or_unknown() {
        let keep = shipped("movedTagPolicy: Keep\n");
        let n = need("reg/m:1", false);
        assert!(held_moved_tag(&keep, &n, OLD, false).is_none(), "not moved");
        assert!(
            held_moved_tag(&keep, &n, NEW, true).is_none(),
            "the hub's own push"
        );
        let mut asked = keep.clone();
        asked.spec.module_spec.image_rebuild_trigger_generation = Some(2);
        assert!(
            held_moved_tag(&asked, &n, NEW, false).is_none(),
            "rebuild trigger"
        );
        assert!(
            held_moved_tag(&keep, &need("reg/other:1", false), NEW, false).is_none(),
            "nothing shipped yet"
        );
        let pinned = format!("reg/m@{NEW}");
        assert!(held_moved_tag(&keep, &need(&pinned, false), NEW, false).is_none());
    }
}
