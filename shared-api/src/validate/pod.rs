//! Rules for what lands in pod specs: device-plugin containers, pull policy, volumes,
//! selectors, tolerations.

use super::*;

pub(super) fn plugin_container_rules(r: &mut Report, p: &str, c: &DevicePluginContainerSpec) {
    if c.image.is_empty() {
        r.push(format!("{p}.image"), "required");
    } else {
        r.check(format!("{p}.image"), names::image_reference(&c.image));
    }
    if let Some(policy) = &c.image_pull_policy {
        pull_policy_rule(r, &format!("{p}.imagePullPolicy"), policy);
    }
    for (i, m) in c.volume_mounts.iter().enumerate() {
        if !m.mount_path.starts_with('/') {
            r.push(
                format!("{p}.volumeMounts[{i}].mountPath"),
                format!("{:?} must be an absolute path", m.mount_path),
            );
        }
    }
}

pub(super) fn pull_policy_rule(r: &mut Report, p: &str, policy: &str) {
    if !matches!(policy, "Always" | "IfNotPresent" | "Never") {
        r.push(
            p,
            format!("{policy:?} is not one of Always, IfNotPresent, Never"),
        );
    }
}

pub(super) fn volume_rules(r: &mut Report, p: &str, volumes: &[Volume]) {
    let mut seen = BTreeSet::new();
    for (i, v) in volumes.iter().enumerate() {
        r.check(format!("{p}[{i}].name"), names::dns_label(&v.name));
        if !seen.insert(v.name.as_str()) {
            r.push(
                format!("{p}[{i}].name"),
                format!("duplicate volume {:?}", v.name),
            );
        }
        if let Some(hp) = &v.host_path
            && !HOST_PATH_ROOTS
                .iter()
                .any(|root| names::path_within(&hp.path, root))
        {
            r.push(
                format!("{p}[{i}].hostPath.path"),
                format!(
                    "{:?} (cleaned: {:?}) is not allowed; hostPath volumes must be under {}",
                    hp.path,
                    names::clean_path(&hp.path),
                    HOST_PATH_ROOTS.join(", ")
                ),
            );
        }
    }
}

pub(super) fn selector_rules(r: &mut Report, p: &str, selector: &BTreeMap<String, String>) {
    for (k, v) in selector {
        r.check(format!("{p}[{k}]"), names::qualified_name(k));
        r.check(format!("{p}[{k}]"), names::label_value(v));
    }
}

pub(super) fn build_selector_rules(r: &mut Report, p: &str, b: &crate::module::Build) {
    selector_rules(r, &format!("{p}.selector"), &b.selector);
    if let Some(k) = &b.kaniko_params
        && let Some(tag) = &k.tag
        && (tag.is_empty() || tag.contains(['/', ':', '@']))
    {
        r.push(
            format!("{p}.kanikoParams.tag"),
            format!("{tag:?} is not an image tag"),
        );
    }
}

pub(super) fn toleration_rules(r: &mut Report, p: &str, tolerations: &[Toleration]) {
    for (i, t) in tolerations.iter().enumerate() {
        let tp = format!("{p}[{i}]");
        let key = t.key.as_deref().unwrap_or("");
        let op = t.operator.as_deref().unwrap_or("");
        let value = t.value.as_deref().unwrap_or("");
        let effect = t.effect.as_deref().unwrap_or("");
        if !key.is_empty() {
            r.check(format!("{tp}.key"), names::qualified_name(key));
        } else if op != "Exists" {
            r.push(
                format!("{tp}.operator"),
                "must be Exists when key is empty (matching every taint)",
            );
        }
        if t.toleration_seconds.is_some() && effect != "NoExecute" {
            r.push(
                format!("{tp}.tolerationSeconds"),
                "may only be set with effect NoExecute",
            );
        }
        match op {
            "" | "Equal" => r.check(format!("{tp}.value"), names::label_value(value)),
            "Exists" => {
                if !value.is_empty() {
                    r.push(
                        format!("{tp}.value"),
                        "must be empty when operator is Exists",
                    );
                }
            }
            other => r.push(
                format!("{tp}.operator"),
                format!("{other:?} is not Equal or Exists"),
            ),
        }
        if !matches!(effect, "" | "NoSchedule" | "PreferNoSchedule" | "NoExecute") {
            r.push(
                format!("{tp}.effect"),
                format!("{effect:?} is not NoSchedule, PreferNoSchedule or NoExecute"),
            );
        }
    }
}
