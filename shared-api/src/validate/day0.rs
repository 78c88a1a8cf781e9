//! `spec.day0` (CoreOS layering through the hub).

use super::Report;
use super::mapping::sign_rules;
use super::pod::build_selector_rules;
use crate::day0::{OS_IMAGE_DIGEST_VAR, has_tag, layered_image, tag_is_distinct};
use crate::mcm::{Day0Layering, ManagedClusterModule};
use crate::names;

/// A sample RHCOS image digest for checking templates without a cluster.
const SAMPLE_DIGEST: &str =
    "sha256:127670aaa6073e97bd6d919e1b57bd16b60435410b096aeefce7cd64f6c83d24";

pub(super) fn day0_rules(r: &mut Report, mcm: &ManagedClusterModule, d: &Day0Layering, name: &str) {
    let p = "spec.day0";
    if mcm.spec.day1.is_some() {
        r.push(
            p,
            "spec.day0 and spec.day1 cannot both be set: a node boots the layered OS image with the module in it, or loads the module at boot, not both",
        );
    }
    let pool = &d.machine_config_pool;
    r.check(format!("{p}.machineConfigPool"), names::label_value(pool));
    r.check(format!("{p}.machineConfigPool"), names::dns_subdomain(pool));
    let mc = d.machine_config_name(name);
    let field = if d.machine_config_name.is_some() {
        format!("{p}.machineConfigName")
    } else {
        format!("{p}.machineConfigPool")
    };
    if let Err(e) = names::dns_subdomain(&mc) {
        r.push(field, format!("the MachineConfig name {mc:?}: {e}"));
    }

    // The layered image: a repository, or a tag template naming kernel and RHCOS digest.
    let ip = format!("{p}.containerImage");
    let template = &d.container_image;
    if template.contains('@') {
        r.push(
            &ip,
            "must not carry a digest: the hub builds the image and pins the digest it pushed",
        );
    } else if has_tag(template) && !tag_is_distinct(template) {
        r.push(
            &ip,
            format!(
                "a tag must contain both ${{KERNEL_FULL_VERSION}} and ${{{OS_IMAGE_DIGEST_VAR}}}, so that layered images of distinct RHCOS images and kernels never share a tag (or give no tag: the hub tags <kernel>-<12 hex of the RHCOS digest>)"
            ),
        );
    } else {
        let ns = if mcm.spec.spoke_namespace.is_empty() {
            "default"
        } else {
            mcm.spec.spoke_namespace.as_str()
        };
        let sample = super::SAMPLE_KERNEL;
        match layered_image(template, sample, SAMPLE_DIGEST, name, ns) {
            Err(e) => r.push(&ip, e.to_string()),
            Ok(image) => {
                if let Err(e) = names::image_reference(&image) {
                    r.push(&ip, format!("{e} (with the sample kernel {sample})"));
                }
            }
        }
    }

    let bp = format!("{p}.build");
    match &d.build.dockerfile_config_map {
        Some(cm) => r.check(
            format!("{bp}.dockerfileConfigMap.name"),
            names::dns_subdomain(&cm.name),
        ),
        None => r.push(
            format!("{bp}.dockerfileConfigMap"),
            "is required: the Dockerfile that layers the module onto ${RHCOS_IMAGE}",
        ),
    }
    for (i, s) in d.build.secrets.iter().enumerate() {
        r.check(
            format!("{bp}.secrets[{i}].name"),
            names::dns_subdomain(&s.name),
        );
    }
    build_selector_rules(r, &bp, &d.build);

    if let Some(s) = &d.sign {
        let sp = format!("{p}.sign");
        // Paths inside the layered image: anywhere under '/'.
        sign_rules(r, &sp, s, "/");
        if s.unsigned_image.is_some() {
            r.push(
                format!("{sp}.unsignedImage"),
                "must not be set: the hub signs the layered image it built",
            );
        }
        if s.key_secret.is_none() {
            r.push(format!("{sp}.keySecret"), "is required");
        }
        if s.cert_secret.is_none() {
            r.push(format!("{sp}.certSecret"), "is required");
        }
    }

    if let Some(os) = &d.os_image {
        let op = format!("{p}.osImage");
        if let Err(e) = names::image_reference(os) {
            r.push(&op, e);
        } else if !os.contains('@') && !has_tag(os) {
            r.push(&op, format!("{os:?} needs a tag or a digest (':' or '@')"));
        }
    }
}
