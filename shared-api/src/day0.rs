//! Day 0 by CoreOS layering (`spec.day0`): where a cluster's RHCOS image comes from, how its
//! kernel is read, and how the layered image is named. Pure.

use crate::kernel::{SubstError, Variables};
use crate::module::Sign;

/// The ClusterClaim an OpenShift spoke publishes: its release's RHCOS base image
/// (`oc adm release info --image-for=rhel-coreos`), as the Machine Config Operator keeps it.
pub const OS_IMAGE_CLAIM: &str = "os-image.kmm.node.kubernetes.io";
/// Where the Machine Config Operator keeps the release's RHCOS image.
pub const MCO_NAMESPACE: &str = "openshift-machine-config-operator";
pub const OS_IMAGE_URL_CONFIGMAP: &str = "machine-config-osimageurl";
pub const BASE_OS_IMAGE_KEY: &str = "baseOSContainerImage";
/// The image-config label of rpm-ostree container images that names their kernel.
pub const OSTREE_LINUX_LABEL: &str = "ostree.linux";
/// The variable of `spec.day0.containerImage` for the RHCOS image's digest (12 hex digits).
pub const OS_IMAGE_DIGEST_VAR: &str = "OS_IMAGE_DIGEST";
/// How many hex digits of the RHCOS image's digest name a layered image.
pub const DIGEST_HEX: usize = 12;

/// Build arguments the hub sets for a layered build.
pub const RHCOS_IMAGE_ARG: &str = "RHCOS_IMAGE";
pub const DTK_IMAGE_ARG: &str = "DTK_IMAGE";

/// Annotations of the Day-0 MachineConfig: what the layered image was built from.
pub const BASE_IMAGE_ANNOTATION: &str = "hub.kmm.sigs.x-k8s.io/day0-os-image";
pub const KERNEL_ANNOTATION: &str = "hub.kmm.sigs.x-k8s.io/day0-kernel";

/// Why a layered image cannot be named.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("{0}")]
    Subst(#[from] SubstError),
    #[error("the RHCOS image digest {0:?} is not sha256:<hex>")]
    Digest(String),
}

/// The first [`DIGEST_HEX`] hex digits of a `sha256:<hex>` digest.
pub fn short_digest(digest: &str) -> Result<&str, NameError> {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    if hex.len() < DIGEST_HEX || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(NameError::Digest(digest.to_string()));
    }
    Ok(&hex[..DIGEST_HEX])
}

/// Whether an image reference has a tag (a `:` after its last `/`).
pub fn has_tag(image: &str) -> bool {
    let name = image.split('@').next().unwrap_or(image);
    name.rsplit('/')
        .next()
        .is_some_and(|last| last.contains(':'))
}

/// Replace `${OS_IMAGE_DIGEST}` and `$OS_IMAGE_DIGEST` (not followed by a name character).
fn replace_digest_var(template: &str, short: &str) -> String {
    let braced = format!("${{{OS_IMAGE_DIGEST_VAR}}}");
    let s = template.replace(&braced, short);
    let plain = format!("${OS_IMAGE_DIGEST_VAR}");
    let mut out = String::with_capacity(s.len());
    let mut rest = s.as_str();
    while let Some(i) = rest.find(&plain) {
        let after = &rest[i + plain.len()..];
        let continues = after
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        out.push_str(&rest[..i]);
        if continues {
            out.push_str(&plain);
        } else {
            out.push_str(short);
        }
        rest = after;
    }
    out.push_str(rest);
    out
}

/// The layered image for `kernel` built on an RHCOS image of digest `base_digest`: the
/// template with its variables expanded, tagged `<kernel>-<12 hex>` when it has no tag.
pub fn layered_image(
    template: &str,
    kernel: &str,
    base_digest: &str,
    mod_name: &str,
    mod_namespace: &str,
) -> Result<String, NameError> {
    let short = short_digest(base_digest)?;
    let vars = Variables::new(kernel, mod_name, mod_namespace);
    let image = vars.substitute_image(&replace_digest_var(template, short))?;
    if has_tag(&image) {
        Ok(image)
    } else {
        let tag = vars.substitute_image("${KERNEL_FULL_VERSION}")?;
        Ok(format!("{image}:{tag}-{short}"))
    }
}

/// Whether a tag template names both the kernel and the RHCOS image digest.
pub fn tag_is_distinct(template: &str) -> bool {
    let tag = template
        .rsplit('/')
        .next()
        .and_then(|last| last.split_once(':'))
        .map_or("", |(_, t)| t);
    let has = |v: &str| tag.contains(&format!("${{{v}}}")) || tag.contains(&format!("${v}"));
    has("KERNEL_FULL_VERSION") && has(OS_IMAGE_DIGEST_VAR)
}

/// `spec.day0.sign` for one kernel: `filesToSign` with the variables expanded.
pub fn sign_for(
    sign: &Sign,
    kernel: &str,
    mod_name: &str,
    mod_namespace: &str,
) -> Result<Sign, SubstError> {
    let vars = Variables::new(kernel, mod_name, mod_namespace);
    let files = sign
        .files_to_sign
        .iter()
        .map(|f| vars.substitute(f))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Sign {
        files_to_sign: files,
        ..sign.clone()
    })
}

/// The kernel an rpm-ostree container image boots: the `ostree.linux` label of its image
/// configuration (the config blob's JSON); `None` without it.
pub fn kernel_of_config(config: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(config).ok()?;
    v["config"]["Labels"][OSTREE_LINUX_LABEL]
        .as_str()
        .map(|k| k.trim().to_string())
        .filter(|k| !k.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:127670aaa6073e97bd6d919e1b57bd16b60435410b096aeefce7cd64f6c83d24";
    const K: &str = "4.18.0-372.53.1.el8_6.x86_64";

    #[test]
    fn untagged_repositories_get_kernel_and_digest() {
        assert_eq!(
            layered_image("reg:5000/os/rhcos-kmod", K, D, "m", "ns").unwrap(),
            format!("reg:5000/os/rhcos-kmod:{K}-127670aaa607")
        );
    }

    #[test]
    fn tag_templates_expand_both_variables() {
        assert_eq!(
            layered_image(
                "reg/os:${KERNEL_FULL_VERSION}_$OS_IMAGE_DIGEST",
                K,
                D,
                "m",
                "ns"
            )
            .unwrap(),
            format!("reg/os:{K}_127670aaa607")
        );
        assert_eq!(
            layered_image(
                "reg/$MOD_NAME:${OS_IMAGE_DIGEST}-${KERNEL_FULL_VERSION}",
                K,
                D,
                "m",
                "ns"
            )
            .unwrap(),
            format!("reg/m:127670aaa607-{K}")
        );
        assert!(tag_is_distinct(
            "reg/os:${KERNEL_FULL_VERSION}-${OS_IMAGE_DIGEST}"
        ));
        assert!(!tag_is_distinct("reg/os:${KERNEL_FULL_VERSION}"));
        assert!(!tag_is_distinct(
            "reg:5000/${KERNEL_FULL_VERSION}/${OS_IMAGE_DIGEST}:v1"
        ));
        assert!(!tag_is_distinct("reg/os"));
    }

    #[test]
    fn a_bad_digest_or_variable_is_an_error() {
        assert!(matches!(
            layered_image("reg/os", K, "sha256:abc", "m", "ns"),
            Err(NameError::Digest(_))
        ));
        assert!(matches!(
            layered_image("reg/os:${NOPE}", K, D, "m", "ns"),
            Err(NameError::Subst(_))
        ));
    }

    #[test]
    fn tags_are_found_after_the_last_slash() {
        assert!(has_tag("reg:5000/a/b:t"));
        assert!(!has_tag("reg:5000/a/b"));
        assert!(!has_tag("reg:5000/a/b@sha256:00"));
    }

    #[test]
    fn files_to_sign_are_expanded_per_kernel() {
        let s = Sign {
            files_to_sign: vec!["/usr/lib/modules/${KERNEL_FULL_VERSION}/simple-kmod.ko".into()],
            ..Default::default()
        };
        assert_eq!(
            sign_for(&s, K, "m", "ns").unwrap().files_to_sign,
            vec![format!("/usr/lib/modules/{K}/simple-kmod.ko")]
        );
    }

    #[test]
    fn the_kernel_is_the_ostree_linux_label() {
        let config = format!(
            r#"{{"architecture":"amd64","config":{{"Labels":{{"ostree.linux":"{K}","version":"417.94"}}}}}}"#
        );
        assert_eq!(kernel_of_config(&config).as_deref(), Some(K));
        assert_eq!(kernel_of_config(r#"{"config":{"Labels":{}}}"#), None);
        assert_eq!(kernel_of_config(r#"{"config":{}}"#), None);
        assert_eq!(
            kernel_of_config(r#"{"config":{"Labels":{"ostree.linux":" "}}}"#),
            None
        );
        assert_eq!(kernel_of_config("not json"), None);
    }
}
